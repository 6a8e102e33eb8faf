//! The state model at scale (issue 8): thousands of agents on one ref, served by one or two
//! `greenlight-server` processes. Measures, in this order and in one run: the servers' RSS
//! per idle connected agent, idle Redis commands per minute, webhook → agent latency with
//! the webhook's own answer time over many rounds, and the fan-out of a manifest set.
//! The same clients then measure the ceiling: the RSS per idle stream and the latency or
//! fan-out of a bare tonic server that sends each revision with no work behind it (see
//! `floor`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use greenlight_e2e::{AgentDef, GitRepo, Redis, config_yaml, git_agent_yaml, git_config_yaml, sha};

use crate::common::{Receipt, Streams, ZERO, load_average, require_tool, wait_for_mirror};
use crate::floor::FloorProcess;
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
    /// Leaves out the ceiling measured after the latency rounds or the fan-outs.
    #[arg(long)]
    skip_ceiling: bool,
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
    let (rss_after, grown) = idle_rss(&servers, &rss_before, args.settle).await?;
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
    if args.store == Store::Embedded {
        restart(&mut servers[0], &args, rss_before[0]).await?;
    }
    for server in servers {
        server.stop().await?;
    }
    drop(redis);
    if !args.skip_ceiling {
        let (floors, mut streams) = start_floors(&args, &names).await?;
        match git {
            None => ceiling_rounds(&args, &floors, &mut streams).await?,
            Some(_) => ceiling_fan_outs(&args, &floors, &mut streams).await?,
        }
        streams.close();
        for floor in floors {
            floor.stop().await?;
        }
    }
    Ok(())
}

/// Restarts `server` after a SIGKILL and prints how long loading the agents' states with
/// their histories took and what the server then holds in memory, next to the RSS of the
/// fresh server before any agent connected (`fresh_kib`).
async fn restart(server: &mut ServerProcess, args: &Args, fresh_kib: u64) -> anyhow::Result<()> {
    let took = server.kill_and_restart().await?;
    let ready = server.rss_kib()?;
    // The allocator returns what loading used and freed a few seconds later.
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let settled = server.rss_kib()?;
    println!(
        "restart after SIGKILL, {} agents with their histories in the file: ready after {} ms; RSS before any agent connects {ready} KiB when ready, {settled} KiB {} s later ({} KiB more than the fresh server's)",
        args.agents,
        ms(took),
        args.settle,
        settled.saturating_sub(fresh_kib)
    );
    Ok(())
}

/// Per-round figures of a run of latency rounds: every agent's time, the first and last
/// agent's of each round, and the trigger's answer time.
#[derive(Default)]
struct RoundTimes {
    every: Vec<Duration>,
    first: Vec<Duration>,
    last: Vec<Duration>,
    answers: Vec<Duration>,
}

impl RoundTimes {
    /// Adds a round whose trigger was sent at `sent` and answered after `answered`.
    fn record(&mut self, sent: Instant, answered: Duration, receipts: &[Receipt]) {
        let (mut first, mut last) = (Duration::MAX, Duration::ZERO);
        for receipt in receipts {
            let latency = receipt.at.saturating_duration_since(sent);
            first = first.min(latency);
            last = last.max(latency);
            self.every.push(latency);
        }
        self.first.push(first);
        self.last.push(last);
        self.answers.push(answered);
    }

    /// Prints every agent's, the first and the last agent's times since `trigger`, then the
    /// trigger's answer times, each line after `indent`.
    fn print(&mut self, indent: &str, trigger: &str, answered: &str) {
        for (what, samples) in [
            ("revision received, every (agent, round)", &mut self.every),
            ("first agent of the round", &mut self.first),
            ("last agent of the round", &mut self.last),
        ] {
            println!(
                "{indent}{trigger} -> {what}:\n{indent}  {}",
                summary_line(samples)
            );
        }
        println!(
            "{indent}{answered}:\n{indent}  {}",
            summary_line(&mut self.answers)
        );
    }
}

/// A summary line of `samples`, empty when there are none.
fn summary_line(samples: &mut [Duration]) -> String {
    Summary::of(samples).map_or_else(String::new, |s| s.line())
}

/// The ceiling of the figures above on this machine, with the same clients: `--replicas`
/// floor servers (a bare tonic server each, see `floor`) sending the same manifest set, if
/// any, and the same number of streams, connected and idle; prints their RSS per stream.
async fn start_floors(
    args: &Args,
    names: &[String],
) -> anyhow::Result<(Vec<FloorProcess>, Streams)> {
    let mut floors = Vec::with_capacity(args.replicas);
    for _ in 0..args.replicas {
        floors.push(FloorProcess::start(args.manifest_files, args.manifest_bytes).await?);
    }
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let rss_before = rss_all(&floors)?;
    let urls: Vec<String> = floors.iter().map(FloorProcess::grpc_url).collect();
    let mut streams = Streams::open_on(&urls, names).await?;
    streams
        .all_receive(&sha(1), Duration::from_secs(300))
        .await
        .context("agents connecting to the floor server")?;
    let (rss_after, grown) = idle_rss(&floors, &rss_before, args.settle).await?;
    println!(
        "ceiling: a bare tonic server (`floor-server`: the Sync protocol, nothing behind it) per replica, the same {} clients; load average {}",
        args.agents,
        load_average()
    );
    println!(
        "  RSS: {} before any stream, {} with {} idle streams: {:.2} KiB per idle stream",
        kib_list(&rss_before),
        kib_list(&rss_after),
        args.agents,
        grown as f64 / args.agents as f64
    );
    Ok((floors, streams))
}

/// The latency rounds against the floor servers: one revision published a round.
async fn ceiling_rounds(
    args: &Args,
    floors: &[FloorProcess],
    streams: &mut Streams,
) -> anyhow::Result<()> {
    let mut times = RoundTimes::default();
    let mut cpu_start = Vec::new();
    let mut measuring = Instant::now();
    for round in 1..=args.warmup + args.rounds {
        if round == args.warmup + 1 {
            cpu_start = cpu_all(floors)?;
            measuring = Instant::now();
        }
        // Other commits than the Greenlight rounds': a fresh server, but clearly apart.
        let commit = sha(1_000_000 + round);
        let mut sent = None;
        for floor in floors {
            let (at, answered) = floor.green(&commit, u64::from(round) + 1).await?;
            sent.get_or_insert((at, answered));
        }
        let receipts = streams
            .all_receive(&commit, Duration::from_secs(60))
            .await
            .with_context(|| format!("ceiling round {round}"))?;
        if round > args.warmup
            && let Some((at, answered)) = sent
        {
            times.record(at, answered, &receipts);
        }
    }
    let elapsed = measuring.elapsed();
    let cpu = cpu_since(floors, &cpu_start)?;
    println!(
        "  {} rounds (+{} warm-up) of one published revision; load average {}",
        args.rounds,
        args.warmup,
        load_average()
    );
    times.print("  ", "published", "publish call (gRPC) answered in");
    println!(
        "  rounds took {} ms in all; floor server CPU per round: {}",
        ms(elapsed),
        ms_list(&cpu, args.rounds)
    );
    Ok(())
}

/// The fan-outs against the floor servers: `--fanouts` times, the next manifest set
/// published to every floor server at once.
async fn ceiling_fan_outs(
    args: &Args,
    floors: &[FloorProcess],
    streams: &mut Streams,
) -> anyhow::Result<()> {
    for round in 1..=args.fanouts {
        let commit = sha(2_000_000 + round);
        let load = load_average();
        let cpu_start = cpu_all(floors)?;
        let mut sent = None;
        for floor in floors {
            let (at, answered) = floor.green(&commit, u64::from(round)).await?;
            sent.get_or_insert((at, answered));
        }
        let Some((at, answered)) = sent else {
            bail!("no floor server to publish to");
        };
        let receipts = streams
            .all_receive(&commit, Duration::from_secs(300))
            .await
            .with_context(|| format!("ceiling fan-out {round}"))?;
        let bytes = every_file_received(&receipts, args.manifest_files)?;
        let cpu = cpu_since(floors, &cpu_start)?;
        println!(
            "  fan-out {round}: {} files, {bytes} bytes to {} agents; load average {load}; publish answered in {} ms; floor server CPU {}",
            args.manifest_files,
            args.agents,
            ms(answered),
            ms_list(&cpu, 1)
        );
        println!(
            "    published -> agent holds every byte: {}",
            spread(&receipts, at)
        );
    }
    Ok(())
}

/// Checks that every agent received `expected` files; returns the bytes each received.
fn every_file_received(receipts: &[Receipt], expected: usize) -> anyhow::Result<u64> {
    let mut bytes = 0;
    for receipt in receipts {
        if receipt.files != expected {
            bail!(
                "agent {} received {} files; expected {expected}",
                receipt.agent,
                receipt.files
            );
        }
        bytes = receipt.bytes;
    }
    Ok(bytes)
}

/// `first …, median …, p99 …, last …` of the receipts' times since `sent`.
fn spread(receipts: &[Receipt], sent: Instant) -> String {
    let mut times: Vec<Duration> = receipts
        .iter()
        .map(|r| r.at.saturating_duration_since(sent))
        .collect();
    Summary::of(&mut times).map_or_else(
        || "no agent".to_owned(),
        |s| {
            format!(
                "first {} ms, median {} ms, p99 {} ms, last {} ms",
                ms(s.min),
                ms(s.p50),
                ms(s.p99),
                ms(s.max)
            )
        },
    )
}

/// `a ms, b ms, …`: each duration divided by `per` (at least 1).
fn ms_list(durations: &[Duration], per: u32) -> String {
    durations
        .iter()
        .map(|d| format!("{} ms", ms(*d / per.max(1))))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The manifest set of fan-out `round`: `count` ConfigMaps adding up to `total_bytes`, the
/// first of which names the round so that every commit differs.
pub fn manifest_files(count: usize, total_bytes: u64, round: u32) -> Vec<(String, Vec<u8>)> {
    let per_file = usize::try_from(total_bytes / count.max(1) as u64).unwrap_or(1024);
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
    let files = manifest_files(args.manifest_files, args.manifest_bytes, round);
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_slice()))
        .collect();
    repo.commit(&refs, &[])
        .context("cannot commit the manifests")
}

/// A child process whose RSS and CPU time `state` reads: a server or a floor server.
trait Measured {
    fn rss_kib(&self) -> anyhow::Result<u64>;
    fn cpu_time(&self) -> anyhow::Result<Duration>;
}

impl Measured for ServerProcess {
    fn rss_kib(&self) -> anyhow::Result<u64> {
        ServerProcess::rss_kib(self)
    }
    fn cpu_time(&self) -> anyhow::Result<Duration> {
        ServerProcess::cpu_time(self)
    }
}

impl Measured for FloorProcess {
    fn rss_kib(&self) -> anyhow::Result<u64> {
        FloorProcess::rss_kib(self)
    }
    fn cpu_time(&self) -> anyhow::Result<Duration> {
        FloorProcess::cpu_time(self)
    }
}

fn rss_all(processes: &[impl Measured]) -> anyhow::Result<Vec<u64>> {
    processes.iter().map(Measured::rss_kib).collect()
}

/// The processes' RSS once their streams have been idle for `settle` seconds, and the KiB
/// they grew by in all since `before`.
async fn idle_rss(
    processes: &[impl Measured],
    before: &[u64],
    settle: u64,
) -> anyhow::Result<(Vec<u64>, i64)> {
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let after = rss_all(processes)?;
    let grown = after
        .iter()
        .zip(before)
        .map(|(a, b)| *a as i64 - *b as i64)
        .sum();
    Ok((after, grown))
}

fn cpu_all(processes: &[impl Measured]) -> anyhow::Result<Vec<Duration>> {
    processes.iter().map(Measured::cpu_time).collect()
}

/// CPU time each process used since `start` (from [`cpu_all`]).
fn cpu_since(processes: &[impl Measured], start: &[Duration]) -> anyhow::Result<Vec<Duration>> {
    Ok(cpu_all(processes)?
        .into_iter()
        .zip(start)
        .map(|(now, start)| now.saturating_sub(*start))
        .collect())
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
    let mut times = RoundTimes::default();
    // Agents on the replica that took the webhook, and on the other one.
    let (mut same, mut other): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    let mut push_answers: Vec<Duration> = Vec::with_capacity(args.rounds as usize);
    let load_start = load_average();
    let mut cpu_start = Vec::new();
    let mut commands_start = BTreeMap::new();
    let mut measuring = Instant::now();
    for round in 1..=args.warmup + args.rounds {
        if round == args.warmup + 1 {
            cpu_start = cpu_all(servers)?;
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
            times.record(sent, answered, &receipts);
            push_answers.push(pushed);
            if replicas > 1 {
                for receipt in &receipts {
                    let latency = receipt.at.saturating_duration_since(sent);
                    if receipt.agent % replicas == round as usize % replicas {
                        same.push(latency);
                    } else {
                        other.push(latency);
                    }
                }
            }
        }
        *head = commit;
    }
    let elapsed = measuring.elapsed();
    let cpu = cpu_since(servers, &cpu_start)?;
    let answers = &times.answers;
    let tenth = (answers.len() / 10).max(1);
    let early = Summary::of(&mut answers[..tenth].to_vec());
    let late = Summary::of(&mut answers[answers.len().saturating_sub(tenth)..].to_vec());

    println!(
        "latency: {} rounds (+{} warm-up) of push + pipeline success {} ms later, webhooks to replica round mod {replicas}; load average {load_start} -> {}",
        args.rounds,
        args.warmup,
        args.pipeline_after_ms,
        load_average()
    );
    times.print(
        "",
        "pipeline webhook sent",
        "pipeline webhook HTTP response time",
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
        summary_line(&mut push_answers)
    );
    if replicas > 1 {
        println!(
            "pipeline webhook sent -> revision received, by the agent's replica:\n  on the replica that took the webhook: {}\n  on the other replica: {}",
            summary_line(&mut same),
            summary_line(&mut other)
        );
    }
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
        let bytes = every_file_received(&receipts, expected_files)?;
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
            "  pipeline webhook sent -> agent holds every byte: {}",
            spread(&receipts, sent)
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
