//! The server's memory under the worst client its limits allow, next to a quiet server: two
//! `greenlight-server` processes on one redis-server, their RSS read from `/proc`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use greenlight::digest::sha256_hex;
use greenlight::report::{MAX_OBJECT_MESSAGE_BYTES, MAX_REPORT_OBJECTS};
use greenlight::v1::{
    ObjectResult, Phase, StatusReport, WatchEventsRequest, WatchRevisionRequest,
    object_result::Action,
};
use greenlight_e2e::exposition::scrape;
use greenlight_e2e::process::ServerProcess;
use greenlight_e2e::{PROJECT, Redis, agent_token, config_yaml, next_revision, sha};

use crate::common::ZERO;

/// Options of `memory`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// How long the bad client runs.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Seconds between two RSS samples.
    #[arg(long, default_value_t = 30)]
    every: u64,
}

/// The CI token of agent `name`.
fn ci_token(name: &str) -> String {
    format!("ci-token-{name}")
}

/// A server config on `redis` under `prefix`, with agents `noisy` and `quiet` (CI tokens
/// included) on `PROJECT@main` in pipeline mode.
fn yaml(redis: &str, prefix: &str) -> String {
    let mut yaml = config_yaml(Some(redis), &[]).replace("gl-test", prefix);
    for name in ["noisy", "quiet"] {
        yaml.push_str(&format!(
            "  - name: {name}\n    token_sha256: \"{}\"\n    project: \"{PROJECT}\"\n    ref: main\n    ci_token_sha256: \"{}\"\n",
            sha256_hex(agent_token(name).as_bytes()),
            sha256_hex(ci_token(name).as_bytes()),
        ));
    }
    yaml
}

/// The largest report the server accepts before cutting it: every object it keeps, each
/// message three times what it keeps.
fn largest_report(revision: &str, generation: u64) -> StatusReport {
    StatusReport {
        revision: revision.to_owned(),
        generation,
        phase: Phase::Applied.into(),
        message: "applied".into(),
        objects: (0..MAX_REPORT_OBJECTS)
            .map(|i| ObjectResult {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                namespace: "apps".into(),
                name: format!("cm-{i}"),
                action: Action::Applied.into(),
                message: "m".repeat(3 * MAX_OBJECT_MESSAGE_BYTES),
            })
            .collect(),
        ..Default::default()
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.seconds == 0 || args.every == 0 {
        bail!("--seconds and --every must be at least 1");
    }
    println!(
        "scenario: memory, {} s of the worst bounded client against one server, a quiet server beside it",
        args.seconds
    );
    println!(
        "bad client: agent `noisy` sends its largest report ({} objects, messages of {} bytes) as fast as the server answers (the rest is refused by the rate cap), \
         64 admin event watches and 16 CI revision watches that never read (each stream cap), re-opening them whenever a slot frees",
        MAX_REPORT_OBJECTS,
        3 * MAX_OBJECT_MESSAGE_BYTES
    );
    println!(
        "quiet server: agent `quiet` connected, one event watch read; streams.stall_timeout is the default (60 s) on both"
    );
    let redis = Redis::start().await?;
    let loaded = ServerProcess::from_yaml(&yaml(&redis.url(), "gl-loaded")).await?;
    let quiet = ServerProcess::from_yaml(&yaml(&redis.url(), "gl-quiet")).await?;
    for server in [&loaded, &quiet] {
        let x = sha(1);
        let agent = server.api.agent("quiet").await?;
        let mut stream = agent.sync(None).await?;
        server.api.release(ZERO, &x, 1).await?;
        next_revision(&mut stream, Duration::from_secs(30)).await?;
        // Kept open for the run.
        std::mem::forget(stream);
    }
    let mut quiet_events = quiet
        .api
        .admin()
        .await?
        .watch_events(WatchEventsRequest::default())
        .await?
        .into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = quiet_events.message().await {} });
    let idle = (loaded.rss_bytes()?, quiet.rss_bytes()?);
    println!(
        "RSS before the load: loaded {} MiB, quiet {} MiB",
        mib(idle.0),
        mib(idle.1)
    );

    let noisy = loaded.api.agent("noisy").await?;
    let mut noisy_stream = noisy.sync(None).await?;
    let revision = next_revision(&mut noisy_stream, Duration::from_secs(30)).await?;
    let generation = revision
        .header
        .revision
        .as_ref()
        .map_or(0, |r| r.generation);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let (accepted, refused, opened) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let reporter = tokio::spawn({
        let (accepted, refused) = (accepted.clone(), refused.clone());
        let report = largest_report(revision.sha(), generation);
        async move {
            while Instant::now() < deadline {
                match noisy.report(report.clone()).await {
                    Ok(()) => accepted.fetch_add(1, Ordering::Relaxed),
                    Err(_) => refused.fetch_add(1, Ordering::Relaxed),
                };
            }
        }
    });
    // Stalled watches, on connections of their own, never read; kept until the end.
    let watcher = tokio::spawn({
        let opened = opened.clone();
        let (grpc, http) = (loaded.api.grpc, loaded.api.http);
        let x = revision.sha().to_owned();
        async move {
            let api = greenlight_e2e::TestServer::attach(grpc, http).await?;
            let mut held = Vec::new();
            let mut held_revisions = Vec::new();
            while Instant::now() < deadline {
                if let Ok(watch) = api
                    .admin()
                    .await?
                    .watch_events(WatchEventsRequest::default())
                    .await
                {
                    held.push(watch.into_inner());
                    opened.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Ok(watch) = api
                    .admin_as(&ci_token("noisy"))
                    .await?
                    .watch_revision(WatchRevisionRequest {
                        name: "noisy".into(),
                        sha: x.clone(),
                    })
                    .await
                {
                    held_revisions.push(watch.into_inner());
                    opened.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            anyhow::Ok((held.len(), held_revisions.len()))
        }
    });

    println!();
    println!(
        "{:>6} {:>12} {:>12} {:>14} {:>9} {:>9} {:>8} {:>8}",
        "t (s)",
        "loaded MiB",
        "quiet MiB",
        "buffered MiB",
        "accepted",
        "refused",
        "watches",
        "stalled"
    );
    let started = Instant::now();
    let mut peak = (0u64, 0u64);
    let mut last = (0u64, 0u64);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(args.every).min(deadline - Instant::now())).await;
        last = (loaded.rss_bytes()?, quiet.rss_bytes()?);
        peak = (peak.0.max(last.0), peak.1.max(last.1));
        let metrics = scrape(loaded.api.http).await?;
        let buffered = metrics
            .value("greenlight_stream_buffered_bytes", &[])
            .unwrap_or(0.0);
        let stalled = metrics.count("greenlight_streams_closed_total", &[("reason", "stalled")]);
        println!(
            "{:>6} {:>12} {:>12} {:>14} {:>9} {:>9} {:>8} {:>8}",
            started.elapsed().as_secs(),
            mib(last.0),
            mib(last.1),
            mib(buffered as u64),
            accepted.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed),
            opened.load(Ordering::Relaxed),
            stalled
        );
    }
    reporter.await.context("the reporting client")?;
    let (events, revisions) = watcher.await.context("the watching client")??;
    println!();
    println!(
        "after {} s: loaded {} MiB (peak {}), quiet {} MiB (peak {}); {} reports accepted ({} MiB of requests), {} refused; {} event and {} revision watches held open unread",
        args.seconds,
        mib(last.0),
        mib(peak.0),
        mib(last.1),
        mib(peak.1),
        accepted.load(Ordering::Relaxed),
        mib(accepted.load(Ordering::Relaxed) * largest_report(&sha(1), 0).encoded_len_u64()),
        refused.load(Ordering::Relaxed),
        events,
        revisions
    );
    Ok(())
}

/// The encoded length as a `u64`.
trait EncodedLen {
    fn encoded_len_u64(&self) -> u64;
}

impl EncodedLen for StatusReport {
    fn encoded_len_u64(&self) -> u64 {
        use prost::Message;
        u64::try_from(self.encoded_len()).unwrap_or(u64::MAX)
    }
}
