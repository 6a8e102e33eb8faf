//! The state model at scale (issue 8): thousands of agents on one ref, served by one or two
//! `greenlight-server` processes. Measures, in this order and in one run: the servers' RSS
//! per idle connected agent, idle Redis commands per minute, webhook → agent latency with
//! the webhook's own answer time over many rounds, and the fan-out of a manifest set.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use greenlight_e2e::{AgentDef, GitRepo, Redis, config_yaml, git_agent_yaml, git_config_yaml, sha};

use crate::common::{Streams, ZERO, load_average, require_tool, wait_for_mirror};
use crate::process::{ServerProcess, redis_command_calls};
use crate::stats::{Summary, ms};

/// Options of `state`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Agents on `group/app-manifests@main`, each with a Sync stream of its own.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Server processes on the same Redis; agent i connects to replica i mod this.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Measured latency rounds (push, then pipeline success, of a new commit).
    #[arg(long, default_value_t = 300)]
    rounds: u32,
    /// Latency rounds run first and not measured.
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    /// The store behind the server (embedded: one replica only).
    #[arg(long, value_enum, default_value_t = Store::Redis)]
    store: Store,
    /// Milliseconds between a round's push and its pipeline webhook. GitLab reports a
    /// pipeline's success minutes after the push; 0 sends it at once, while the push's own
    /// evaluation may still be writing every agent.
    #[arg(long, default_value_t = 0)]
    pipeline_after_ms: u64,
    /// Seconds the connected agents are left idle before their RSS is read.
    #[arg(long, default_value_t = 5)]
    settle: u64,
    /// Seconds of idle Redis traffic counted with INFO commandstats (0: skipped).
    #[arg(long, default_value_t = 0)]
    idle_seconds: u64,
    /// Files in a git repository the agents are configured with; 0 runs latency rounds on
    /// agents without a repository, more runs `--fanouts` green pipelines of those files.
    #[arg(long, default_value_t = 0)]
    manifest_files: usize,
    /// Total size of those files.
    #[arg(long, default_value_t = 10 * 1024)]
    manifest_bytes: u64,
    /// Green pipelines timed in the manifest fan-out, each of a new commit.
    #[arg(long, default_value_t = 3)]
    fanouts: u32,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    Redis,
    Embedded,
}

/// What the run needs beyond the servers: the git repository and each replica's mirror.
struct Git {
    repo: GitRepo,
    caches: Vec<tempfile::TempDir>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.agents == 0 || args.replicas == 0 {
        bail!("--agents and --replicas must be at least 1");
    }
    if args.store == Store::Embedded && args.replicas > 1 {
        bail!("the embedded store serves one replica only");
    }
    if args.store == Store::Embedded && args.manifest_files > 0 {
        bail!("the manifest fan-out runs on Redis only");
    }
    let redis = match args.store {
        Store::Redis => {
            println!(
                "redis: {}",
                require_tool("redis-server", "for the state scenario")?
            );
            Some(Redis::start().await.context("cannot start redis-server")?)
        }
        Store::Embedded => None,
    };
    let redis_url = redis.as_ref().map(Redis::url);
    let names: Vec<String> = (0..args.agents).map(|i| format!("agent-{i:05}")).collect();

    let git = if args.manifest_files > 0 {
        println!("git: {}", require_tool("git", "for the manifest fan-out")?);
        let repo = GitRepo::new().context("cannot create the git repository")?;
        let mut caches = Vec::new();
        for _ in 0..args.replicas {
            caches.push(tempfile::tempdir().context("cannot create a mirror directory")?);
        }
        Some(Git { repo, caches })
    } else {
        None
    };
    let mut servers = Vec::with_capacity(args.replicas);
    for replica in 0..args.replicas {
        let yaml = match (&git, &redis_url) {
            (Some(git), Some(url)) => {
                let agents: Vec<String> = names
                    .iter()
                    .map(|name| git_agent_yaml(name, &git.repo.url(), &[]))
                    .collect();
                git_config_yaml(
                    url,
                    git.caches[replica].path(),
                    &format!(
                        ", max_files: {}, max_total_bytes: {}",
                        args.manifest_files.max(1000),
                        args.manifest_bytes.max(20 * 1024 * 1024)
                    ),
                    &agents,
                )
            }
            _ => {
                let defs: Vec<AgentDef> = names.iter().map(|n| AgentDef::new(n)).collect();
                config_yaml(redis_url.as_deref(), &defs)
            }
        };
        let name = format!("replica-{replica}");
        let server = ServerProcess::start(&name, &yaml)
            .await
            .with_context(|| format!("cannot start {name}"))?;
        servers.push(server);
    }
    println!(
        "scenario: state, {} agents on one ref, {} replica(s) as processes, store {}",
        args.agents,
        args.replicas,
        match args.store {
            Store::Redis => "redis",
            Store::Embedded => "embedded",
        }
    );

    // A first release before any agent connects: every lazy path has run once, and each
    // agent receives it on connecting, which shows its stream is up.
    let mut head = match &git {
        Some(git) => commit_manifests(&git.repo, &args, 0)?,
        None => sha(1),
    };
    servers[0].push(ZERO, &head).await?;
    if let Some(git) = &git {
        wait_for_mirror(git.caches[0].path(), &head, Duration::from_secs(60)).await?;
    }
    servers[0].green(&head, 1).await?;
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let rss_before = rss_all(&servers)?;
    println!(
        "RSS before any agent connects: {} (load average {})",
        kib_list(&rss_before),
        load_average()
    );

    let started = Instant::now();
    let urls: Vec<String> = servers.iter().map(ServerProcess::grpc_url).collect();
    let mut streams = Streams::open_on(&urls, &names).await?;
    streams
        .all_receive(&head, Duration::from_secs(300))
        .await
        .context("agents connecting")?;
    println!(
        "setup: {} agents streaming and holding the first release after {} ms",
        args.agents,
        ms(started.elapsed())
    );
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let rss_after = rss_all(&servers)?;
    let grown: i64 = rss_after
        .iter()
        .zip(&rss_before)
        .map(|(a, b)| *a as i64 - *b as i64)
        .sum();
    println!(
        "RSS with {} idle streams: {} (load average {})",
        args.agents,
        kib_list(&rss_after),
        load_average()
    );
    println!(
        "  per idle connected agent: {:.2} KiB ({grown} KiB over {} agents, all replicas)",
        grown as f64 / args.agents as f64,
        args.agents
    );
    for server in &servers {
        println!(
            "  {}: greenlight_connected_agents {}",
            server.name,
            server.metric("greenlight_connected_agents").await?
        );
    }

    if args.idle_seconds > 0
        && let Some(redis) = &redis
    {
        idle_commands(redis.port(), args.idle_seconds).await?;
    }

    match &git {
        None => latency(&args, &servers, &mut streams, redis.as_ref(), &mut head).await?,
        Some(git) => fan_out(&args, &servers, &mut streams, git, &mut head).await?,
    }
    streams.close();
    for server in servers {
        server.stop().await?;
    }
    drop(redis);
    Ok(())
}

/// The manifest set of fan-out `round`: `--manifest-files` ConfigMaps adding up to
/// `--manifest-bytes`, the first of which names the round so that every commit differs.
fn manifest_files(args: &Args, round: u32) -> Vec<(String, Vec<u8>)> {
    let count = args.manifest_files;
    let per_file = usize::try_from(args.manifest_bytes / count as u64).unwrap_or(1024);
    (0..count)
        .map(|i| {
            let mut text = format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bench-{i:05}\ndata:\n  round: \"{}\"\n  payload: |\n",
                if i == 0 { round } else { 0 }
            );
            while text.len() + 60 < per_file {
                text.push_str("    the quick brown fox jumps over the lazy dog, again.\n");
            }
            (format!("deploy/bench-{i:05}.yaml"), text.into_bytes())
        })
        .collect()
}

/// Commits the manifest set of `round` to `repo`.
fn commit_manifests(repo: &GitRepo, args: &Args, round: u32) -> anyhow::Result<String> {
    let files = manifest_files(args, round);
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_slice()))
        .collect();
    repo.commit(&refs, &[])
        .context("cannot commit the manifests")
}

fn rss_all(servers: &[ServerProcess]) -> anyhow::Result<Vec<u64>> {
    servers.iter().map(ServerProcess::rss_kib).collect()
}

fn kib_list(values: &[u64]) -> String {
    values
        .iter()
        .map(|v| format!("{v} KiB"))
        .collect::<Vec<_>>()
        .join(" + ")
}

/// Calls per Redis command over a window, without the `info` calls that read them.
async fn idle_commands(port: u16, seconds: u64) -> anyhow::Result<()> {
    let load = load_average();
    let before: BTreeMap<String, u64> = redis_command_calls(port)?.into_iter().collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let after = redis_command_calls(port)?;
    let mut deltas: Vec<(String, u64)> = after
        .into_iter()
        .filter(|(command, _)| command != "info")
        .map(|(command, calls)| {
            let was = before.get(&command).copied().unwrap_or(0);
            (command, calls.saturating_sub(was))
        })
        .filter(|(_, delta)| *delta > 0)
        .collect();
    deltas.sort_by_key(|d| std::cmp::Reverse(d.1));
    let total: u64 = deltas.iter().map(|(_, d)| d).sum();
    println!(
        "idle Redis commands over {seconds} s (INFO commandstats, info itself left out; load average {load} -> {}):",
        load_average()
    );
    println!(
        "  {total} in all, {:.0} per minute; by command: {}",
        total as f64 * 60.0 / seconds as f64,
        deltas
            .iter()
            .map(|(c, d)| format!("{c} {d}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// Rounds of push + green pipeline of a new commit, webhooks sent to replica
/// `round mod replicas`; every agent's receive time and the webhooks' answer times.
async fn latency(
    args: &Args,
    servers: &[ServerProcess],
    streams: &mut Streams,
    redis: Option<&Redis>,
    head: &mut String,
) -> anyhow::Result<()> {
    let replicas = servers.len();
    let mut samples: Vec<Duration> = Vec::with_capacity(args.agents * args.rounds as usize);
    // Agents on the replica that took the webhook, and on the other one.
    let (mut same, mut other): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    let mut green_answers: Vec<Duration> = Vec::with_capacity(args.rounds as usize);
    let mut push_answers: Vec<Duration> = Vec::with_capacity(args.rounds as usize);
    let mut first: Vec<Duration> = Vec::with_capacity(args.rounds as usize);
    let mut last: Vec<Duration> = Vec::with_capacity(args.rounds as usize);
    let load_start = load_average();
    let mut cpu_start = Vec::new();
    let mut commands_start = BTreeMap::new();
    let mut measuring = Instant::now();
    for round in 1..=args.warmup + args.rounds {
        if round == args.warmup + 1 {
            cpu_start = servers
                .iter()
                .map(ServerProcess::cpu_time)
                .collect::<anyhow::Result<_>>()?;
            if let Some(redis) = redis {
                commands_start = redis_command_calls(redis.port())?.into_iter().collect();
            }
            measuring = Instant::now();
        }
        let server = &servers[round as usize % replicas];
        // Commit 1 was the first release.
        let commit = sha(round + 1);
        let pushed = server.push(head, &commit).await?;
        if args.pipeline_after_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.pipeline_after_ms)).await;
        }
        let (sent, answered) = server.green(&commit, u64::from(round) + 1).await?;
        let receipts = streams
            .all_receive(&commit, Duration::from_secs(60))
            .await
            .with_context(|| format!("round {round}"))?;
        if round > args.warmup {
            green_answers.push(answered);
            push_answers.push(pushed);
            let (mut round_first, mut round_last) = (Duration::MAX, Duration::ZERO);
            for receipt in &receipts {
                let latency = receipt.at.saturating_duration_since(sent);
                round_first = round_first.min(latency);
                round_last = round_last.max(latency);
                samples.push(latency);
                if replicas > 1 {
                    if receipt.agent % replicas == round as usize % replicas {
                        same.push(latency);
                    } else {
                        other.push(latency);
                    }
                }
            }
            first.push(round_first);
            last.push(round_last);
        }
        *head = commit;
    }
    let elapsed = measuring.elapsed();
    let cpu: Vec<Duration> = servers
        .iter()
        .zip(&cpu_start)
        .map(|(s, start)| s.cpu_time().map(|now| now.saturating_sub(*start)))
        .collect::<anyhow::Result<_>>()?;
    let tenth = (green_answers.len() / 10).max(1);
    let early = Summary::of(&mut green_answers[..tenth].to_vec());
    let late = Summary::of(&mut green_answers[green_answers.len() - tenth..].to_vec());

    println!(
        "latency: {} rounds (+{} warm-up) of push + pipeline success {} ms later, webhooks to replica round mod {replicas}; load average {load_start} -> {}",
        args.rounds,
        args.warmup,
        args.pipeline_after_ms,
        load_average()
    );
    let line = |v: &mut Vec<Duration>| Summary::of(v).map_or_else(String::new, |s| s.line());
    println!(
        "pipeline webhook sent -> revision received, every (agent, round):\n  {}",
        line(&mut samples)
    );
    if replicas > 1 {
        println!(
            "  agents on the replica that took the webhook: {}",
            line(&mut same)
        );
        println!("  agents on the other replica: {}", line(&mut other));
    }
    println!(
        "pipeline webhook sent -> first agent of the round:\n  {}",
        line(&mut first)
    );
    println!(
        "pipeline webhook sent -> last agent of the round:\n  {}",
        line(&mut last)
    );
    println!(
        "pipeline webhook HTTP response time:\n  {}",
        line(&mut green_answers)
    );
    if let (Some(early), Some(late)) = (early, late) {
        println!(
            "  first {tenth} vs last {tenth} rounds: p50 {} ms vs {} ms",
            ms(early.p50),
            ms(late.p50)
        );
    }
    println!(
        "push webhook HTTP response time:\n  {}",
        line(&mut push_answers)
    );
    println!(
        "rounds took {} ms in all ({} ms per round); server CPU per round: {}",
        ms(elapsed),
        ms(elapsed / args.rounds.max(1)),
        cpu.iter()
            .zip(servers)
            .map(|(c, s)| format!("{} {} ms", s.name, ms(*c / args.rounds.max(1))))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(redis) = redis {
        let after = redis_command_calls(redis.port())?;
        let mut per_round: Vec<(String, f64)> = after
            .into_iter()
            .filter(|(c, _)| c != "info")
            .map(|(c, calls)| {
                let was = commands_start.get(&c).copied().unwrap_or(0);
                (c, calls.saturating_sub(was) as f64 / f64::from(args.rounds))
            })
            .filter(|(_, d)| *d > 0.0)
            .collect();
        per_round.sort_by(|a, b| b.1.total_cmp(&a.1));
        println!(
            "Redis commands per round (push + pipeline webhook and all that follows): {:.1}; {}",
            per_round.iter().map(|(_, d)| d).sum::<f64>(),
            per_round
                .iter()
                .map(|(c, d)| format!("{c} {d:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// `--fanouts` times: a new commit of the manifest set is pushed and fetched (untimed),
/// then its pipeline turns green; time until the first, median and last agent holds every
/// byte, and the git fetches and manifest reads it took.
async fn fan_out(
    args: &Args,
    servers: &[ServerProcess],
    streams: &mut Streams,
    git: &Git,
    head: &mut String,
) -> anyhow::Result<()> {
    let expected_files = args.manifest_files;
    for round in 1..=args.fanouts {
        let commit = commit_manifests(&git.repo, args, round)?;
        let fetches_before = metric_all(servers, "greenlight_git_fetches_total").await?;
        let reads_before = metric_all(servers, "greenlight_manifest_reads_total").await?;
        servers[0].push(head, &commit).await?;
        // Only the replica that took the push fetches on it; the others fetch on demand.
        settle_mirror(git.caches[0].path(), &commit).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let load = load_average();
        let (sent, answered) = servers[0].green(&commit, 1000 + u64::from(round)).await?;
        let receipts = streams
            .all_receive(&commit, Duration::from_secs(300))
            .await
            .with_context(|| format!("fan-out {round}"))?;
        let mut bytes = 0;
        for receipt in &receipts {
            if receipt.files != expected_files {
                bail!(
                    "agent {} received {} files; expected {expected_files}",
                    receipt.agent,
                    receipt.files
                );
            }
            bytes = receipt.bytes;
        }
        let mut times: Vec<Duration> = receipts
            .iter()
            .map(|r| r.at.saturating_duration_since(sent))
            .collect();
        times.sort_unstable();
        let fetches = metric_all(servers, "greenlight_git_fetches_total").await?;
        let reads = metric_all(servers, "greenlight_manifest_reads_total").await?;
        let delta = |after: &[f64], before: &[f64]| {
            after
                .iter()
                .zip(before)
                .map(|(a, b)| format!("{}", a - b))
                .collect::<Vec<_>>()
                .join(" + ")
        };
        println!(
            "fan-out {round}: {} files, {bytes} bytes to {} agents; load average {load}; webhook answered in {} ms",
            expected_files,
            args.agents,
            ms(answered)
        );
        println!(
            "  pipeline webhook sent -> agent holds every byte: first {} ms, median {} ms, p99 {} ms, last {} ms",
            ms(times[0]),
            ms(times[(times.len() - 1) / 2]),
            ms(times[(times.len() * 99).div_ceil(100).max(1) - 1]),
            ms(times[times.len() - 1])
        );
        println!(
            "  since the push, per replica: git fetches {}, manifest reads {}",
            delta(&fetches, &fetches_before),
            delta(&reads, &reads_before)
        );
        *head = commit;
    }
    Ok(())
}

/// Waits until the mirror in `cache` has `sha` (the push's fetch, untimed); a replica that
/// does not fetch on a push of its own is given up on after 10 s.
async fn settle_mirror(cache: &Path, sha: &str) -> anyhow::Result<()> {
    if let Err(error) = wait_for_mirror(cache, sha, Duration::from_secs(10)).await {
        println!("  note: {error:#}");
    }
    Ok(())
}

async fn metric_all(servers: &[ServerProcess], name: &str) -> anyhow::Result<Vec<f64>> {
    let mut values = Vec::with_capacity(servers.len());
    for server in servers {
        values.push(server.metric(name).await?);
    }
    Ok(values)
}
