//! Pipeline webhook to revision on every connected agent.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use greenlight_e2e::{AgentDef, Redis, TestServer, config_yaml, sha};

use crate::common::{BRANCH, Streams, ZERO, ref_document_sizes, require_tool, send_green};
use crate::stats::{Summary, ms};

/// Options of `latency`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Agents connected with a Sync stream each.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Measured rounds (push, then pipeline success, of a new commit).
    #[arg(long, default_value_t = 200)]
    rounds: u32,
    /// Rounds run first and not measured.
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    /// The store behind the server.
    #[arg(long, value_enum, default_value_t = Store::Redis)]
    store: Store,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    Redis,
    Embedded,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.agents == 0 || args.rounds == 0 {
        bail!("--agents and --rounds must be at least 1");
    }
    let redis = match args.store {
        Store::Redis => {
            let version = require_tool("redis-server", "for the latency scenario on Redis")?;
            println!("redis: {version}");
            Some(Redis::start().await.context("cannot start redis-server")?)
        }
        Store::Embedded => None,
    };
    let redis_url = redis.as_ref().map(Redis::url);
    let names: Vec<String> = (0..args.agents).map(|i| format!("agent-{i:04}")).collect();
    let defs: Vec<AgentDef> = names.iter().map(|n| AgentDef::new(n)).collect();
    let server = TestServer::start(&config_yaml(redis_url.as_deref(), &defs))
        .await
        .context("cannot start the server")?;
    let started = Instant::now();
    let mut streams = Streams::open(&server, &names).await?;
    println!(
        "setup: {} agents streaming after {} ms",
        args.agents,
        ms(started.elapsed())
    );

    let mut samples: Vec<Duration> = Vec::with_capacity(args.agents * args.rounds as usize);
    let mut webhook: Vec<Duration> = Vec::with_capacity(args.rounds as usize);
    let mut first: Vec<Duration> = Vec::with_capacity(args.rounds as usize);
    let mut before = ZERO.to_owned();
    let measuring = Instant::now();
    for round in 1..=args.warmup + args.rounds {
        let commit = sha(round);
        let status = server
            .push(BRANCH, &before, &commit)
            .await
            .context("push webhook failed")?;
        if status != 200 {
            bail!("push webhook answered {status}");
        }
        let green = send_green(&server, &commit, u64::from(round)).await?;
        let (sent, answered) = (green.at, green.answered);
        let receipts = streams
            .all_receive(&commit, Duration::from_secs(10))
            .await
            .with_context(|| format!("round {round}"))?;
        if round > args.warmup {
            webhook.push(answered);
            let mut round_first = Duration::MAX;
            for receipt in &receipts {
                let latency = receipt.at.saturating_duration_since(sent);
                round_first = round_first.min(latency);
                samples.push(latency);
            }
            first.push(round_first);
        }
        before = commit;
    }
    let elapsed = measuring.elapsed();
    // In round order still: the webhook's time at the start and at the end of the run.
    let tenth = (webhook.len() / 10).max(1);
    let early = Summary::of(&mut webhook[..tenth].to_vec());
    let late = Summary::of(&mut webhook[webhook.len() - tenth..].to_vec());
    let document = redis_url.as_deref().map(ref_document_sizes);
    streams.close();
    server.stop().await.context("cannot stop the server")?;
    drop(redis);

    println!(
        "scenario: latency, {} agents, {} rounds (+{} warm-up), store {}",
        args.agents,
        args.rounds,
        args.warmup,
        match args.store {
            Store::Redis => "redis",
            Store::Embedded => "embedded",
        }
    );
    println!(
        "pipeline webhook sent -> revision received, every (agent, round):\n  {}",
        Summary::of(&mut samples).map_or_else(String::new, |s| s.line())
    );
    println!(
        "pipeline webhook sent -> first agent of the round:\n  {}",
        Summary::of(&mut first).map_or_else(String::new, |s| s.line())
    );
    println!(
        "pipeline webhook HTTP response time:\n  {}",
        Summary::of(&mut webhook).map_or_else(String::new, |s| s.line())
    );
    if let (Some(early), Some(late)) = (early, late) {
        println!(
            "pipeline webhook HTTP response time, first {tenth} vs last {tenth} rounds: p50 {} ms vs {} ms",
            ms(early.p50),
            ms(late.p50)
        );
    }
    if let Some(document) = document {
        println!("ref document in Redis at the end: {document}");
    }
    println!(
        "rounds took {} ms in all ({} ms per round incl. the push webhook)",
        ms(elapsed),
        ms(elapsed / (args.warmup + args.rounds))
    );
    Ok(())
}
