//! Pipeline Hook deliveries per second, on Redis and on the embedded store.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use greenlight::v1::GetRefRequest;
use greenlight_e2e::{
    AgentDef, GITLAB_SECRET, PROJECT, Redis, TestServer, config_yaml, pipeline_payload, sha,
};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::common::{BRANCH, ZERO, load_average, require_tool};
use crate::process::{ServerProcess, redis_benchmark_set};
use crate::stats::{Summary, breakdown, ms};

/// Options of `throughput`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// How long each store is loaded.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent HTTP clients, each with its own connection, one request at a time.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Commits pushed before the load; pipelines are spread over them.
    #[arg(long, default_value_t = 64)]
    commits: u32,
    /// Which stores to measure.
    #[arg(long, value_enum, default_value_t = Stores::Both)]
    store: Stores,
    /// Every delivery is the success of a new pipeline of a commit never seen before
    /// (delivery i: pipeline 1000+i of commit 1000000+i), instead of running/success pairs
    /// over the pushed commits.
    #[arg(long)]
    fresh: bool,
    /// Jobs in each Pipeline Hook's `builds`, as GitLab lists them (a few hundred bytes each).
    #[arg(long, default_value_t = 0)]
    jobs: usize,
    /// Runs greenlight-server as a child process (built beside this binary) instead of in
    /// this process, so that the clients and the server do not share a runtime.
    #[arg(long)]
    process: bool,
}

/// The server under load: in this process, or a child process.
enum Target {
    InProcess(TestServer),
    Process(Box<ServerProcess>),
}

impl Target {
    fn http(&self) -> std::net::SocketAddr {
        match self {
            Self::InProcess(server) => server.http,
            Self::Process(server) => server.http,
        }
    }

    async fn push(&self, before: &str, after: &str) -> anyhow::Result<()> {
        match self {
            Self::InProcess(server) => {
                let status = server
                    .push(BRANCH, before, after)
                    .await
                    .context("push webhook failed")?;
                if status != 200 {
                    bail!("push webhook answered {status}");
                }
            }
            Self::Process(server) => {
                server.push(before, after).await?;
            }
        }
        Ok(())
    }

    async fn admin(&self) -> anyhow::Result<crate::common::Admin> {
        match self {
            Self::InProcess(server) => server.admin().await,
            Self::Process(server) => server.admin().await,
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Self::InProcess(server) => server.stop().await,
            Self::Process(server) => (*server).stop().await,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Stores {
    Both,
    Redis,
    Embedded,
}

/// One finished request.
struct Sample {
    /// Since the load started, when the answer was complete.
    done: Duration,
    latency: Duration,
    /// `recorded`, `unchanged`, … or the error.
    outcome: Result<String, String>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.seconds == 0 || args.concurrency == 0 || args.commits == 0 {
        bail!("--seconds, --concurrency and --commits must be at least 1");
    }
    println!(
        "scenario: throughput, Pipeline Hook only, {} clients, {} s per store, pipelines over {} pushed commits, {} jobs in each hook",
        args.concurrency, args.seconds, args.commits, args.jobs
    );
    if args.fresh {
        println!(
            "each delivery: unique X-Gitlab-Event-UUID; delivery i is the success of pipeline 1000+i of commit 1000000+i, never seen before"
        );
    } else {
        println!(
            "each delivery: unique X-Gitlab-Event-UUID; delivery i is pipeline 1000+i/2 of commit (i/2) mod {}, status running (even i) or success (odd i)",
            args.commits
        );
    }
    println!(
        "server: {}",
        if args.process {
            "greenlight-server child process"
        } else {
            "in this process"
        }
    );
    if args.store != Stores::Embedded {
        let version = require_tool("redis-server", "for the Redis half of throughput")?;
        println!("redis: {version}");
        let redis = Redis::start().await.context("cannot start redis-server")?;
        let ceiling = |when: &str| match redis_benchmark_set(
            redis.port(),
            args.concurrency,
            200_000,
        ) {
            Ok(rate) => println!(
                "ceiling {when}: redis-benchmark -c {} -t set -n 200000 on the same redis-server: {rate:.0} SET/s (load average {})",
                args.concurrency,
                load_average()
            ),
            Err(error) => println!("ceiling {when}: redis-benchmark failed: {error:#}"),
        };
        ceiling("before");
        measure("redis", Some(&redis.url()), &args).await?;
        ceiling("after");
    }
    if args.store != Stores::Redis {
        measure("embedded", None, &args).await?;
    }
    Ok(())
}

async fn measure(label: &str, redis_url: Option<&str>, args: &Args) -> anyhow::Result<()> {
    let yaml = config_yaml(redis_url, &[AgentDef::new("prod")]);
    let server = if args.process {
        Target::Process(Box::new(ServerProcess::start(label, &yaml).await?))
    } else {
        Target::InProcess(
            TestServer::start(&yaml)
                .await
                .context("cannot start the server")?,
        )
    };
    let mut before = ZERO.to_owned();
    for n in 1..=args.commits {
        let commit = sha(n);
        server.push(&before, &commit).await?;
        before = commit;
    }
    let load_before = load_average();

    let payloads = Arc::new(Payloads::new(args.jobs).context("cannot render the payloads")?);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.seconds);
    let mut workers = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        workers.push(tokio::spawn(load(
            server.http(),
            payloads.clone(),
            label.to_owned(),
            (!args.fresh).then_some(args.commits),
            next.clone(),
            start,
            deadline,
        )));
    }
    let mut samples = Vec::new();
    for worker in workers {
        samples.extend(worker.await.context("a client task failed")?);
    }
    let elapsed = start.elapsed();

    let refs = server
        .admin()
        .await?
        .get_ref(GetRefRequest {
            project: PROJECT.into(),
            r#ref: BRANCH.into(),
        })
        .await
        .context("GetRef failed")?
        .into_inner();
    let pipelines: usize = refs.commits.iter().map(|c| c.pipelines.len()).sum();
    server.stop().await.context("cannot stop the server")?;

    println!(
        "load average at the start of the load: {load_before}, at its end: {}",
        load_average()
    );
    report(label, &mut samples, elapsed, args.seconds);
    println!(
        "  GetRef afterwards: {} pushed commits, {} pipelines of them (pipelines of commits never pushed are not listed)",
        refs.commits.len(),
        pipelines
    );
    Ok(())
}

/// One client: posts deliveries one after another over its own connection until
/// `deadline`.
async fn load(
    server: SocketAddr,
    payloads: Arc<Payloads>,
    label: String,
    // Running/success pairs over this many pushed commits; `None`: fresh commits.
    pairs_over: Option<u32>,
    next: Arc<AtomicU64>,
    start: Instant,
    deadline: Instant,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut connection = None;
    while Instant::now() < deadline {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let (pipeline, commit, status) = if let Some(commits) = pairs_over {
            let pipeline = i / 2;
            let commit = sha(1 + u32::try_from(pipeline % u64::from(commits)).unwrap_or(0));
            let status = if i.is_multiple_of(2) {
                PayloadStatus::Running
            } else {
                PayloadStatus::Success
            };
            (pipeline, commit, status)
        } else {
            (
                i,
                sha(1_000_000 + u32::try_from(i).unwrap_or(0)),
                PayloadStatus::Success,
            )
        };
        let body = payloads.render(status, 1000 + pipeline, &commit);
        let sent = Instant::now();
        let outcome = match tokio::time::timeout(
            REQUEST_TIMEOUT,
            deliver(&mut connection, server, &format!("bench-{label}-{i}"), body),
        )
        .await
        {
            Ok(Ok((200, answer))) => Ok(answer.outcome.unwrap_or_else(|| "?".into())),
            Ok(Ok((code, answer))) => {
                let message: String = answer
                    .message
                    .unwrap_or_default()
                    .chars()
                    .take(100)
                    .collect();
                Err(format!(
                    "HTTP {code} {}: {message}",
                    answer.outcome.unwrap_or_else(|| "?".into())
                ))
            }
            Ok(Err(error)) => {
                connection = None;
                Err(format!("transport: {error}"))
            }
            Err(_) => {
                connection = None;
                Err(format!("no answer within {REQUEST_TIMEOUT:?}"))
            }
        };
        samples.push(Sample {
            done: start.elapsed(),
            latency: sent.elapsed(),
            outcome,
        });
    }
    samples
}

/// How long one delivery may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// What the server's answer to a webhook says.
#[derive(serde::Deserialize, Default)]
struct Answer {
    outcome: Option<String>,
    message: Option<String>,
}

/// Posts one delivery over `connection`, opening it first if there is none: a bare HTTP/1.1
/// client, so that the load generator's own CPU (on the cores the server and Redis share)
/// stays small next to the server's.
async fn deliver(
    connection: &mut Option<http1::SendRequest<Full<Bytes>>>,
    server: SocketAddr,
    delivery: &str,
    body: String,
) -> anyhow::Result<(u16, Answer)> {
    let sender = match connection {
        Some(sender) => sender,
        None => {
            let stream = tokio::net::TcpStream::connect(server).await?;
            stream.set_nodelay(true)?;
            let (sender, driver) = http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(driver);
            connection.insert(sender)
        }
    };
    sender.ready().await?;
    let request = hyper::Request::post("/webhooks/gitlab")
        .header(hyper::header::HOST, server.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header("X-Gitlab-Event", "Pipeline Hook")
        .header("X-Gitlab-Token", GITLAB_SECRET)
        .header("X-Gitlab-Event-UUID", delivery)
        .body(Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    let code = response.status().as_u16();
    let text = response.into_body().collect().await?.to_bytes();
    Ok((code, serde_json::from_slice(&text).unwrap_or_default()))
}

/// Job `n` of a pipeline in `status`, with the fields GitLab sends for each job.
fn job(n: usize, status: &str) -> serde_json::Value {
    let stage = if n.is_multiple_of(2) {
        "test"
    } else {
        "deploy"
    };
    serde_json::json!({
        "id": 5000 + n,
        "stage": stage,
        "name": format!("{stage}-job-{n}"),
        "status": status,
        "created_at": "2026-11-26 09:58:00 UTC",
        "started_at": "2026-11-26 09:58:30 UTC",
        "finished_at": if status == "success" { serde_json::Value::from("2026-11-26 09:59:40 UTC") } else { serde_json::Value::Null },
        "duration": 70.2,
        "queued_duration": 1.4,
        "failure_reason": null,
        "when": "on_success",
        "manual": false,
        "allow_failure": false,
        "user": { "id": 1, "name": "Jane", "username": "jane", "avatar_url": "https://gitlab.example.com/uploads/-/system/user/avatar/1/avatar.png", "email": "[REDACTED]" },
        "runner": { "id": 12, "description": "shared-runner-2", "runner_type": "instance_type", "active": true, "is_shared": true, "tags": ["docker", "linux"] },
        "artifacts_file": { "filename": null, "size": null },
        "environment": null
    })
}

/// Which pipeline status a delivery reports.
#[derive(Clone, Copy)]
enum PayloadStatus {
    Running,
    Success,
}

/// The Pipeline Hook payloads, rendered once with placeholders for the pipeline id and the
/// commit, so that a delivery costs two substitutions instead of building a JSON document.
struct Payloads {
    running: String,
    success: String,
}

impl Payloads {
    const ID: u64 = 987_654_321;
    const COMMIT: &str = "feedfacefeedfacefeedfacefeedfacefeedface";

    fn new(jobs: usize) -> anyhow::Result<Self> {
        let render = |status| {
            let mut payload =
                pipeline_payload(PROJECT, BRANCH, Self::COMMIT, Self::ID, status, "push");
            payload["builds"] = (0..jobs).map(|n| job(n, status)).collect();
            serde_json::to_string(&payload)
        };
        Ok(Self {
            running: render("running")?,
            success: render("success")?,
        })
    }

    fn render(&self, status: PayloadStatus, id: u64, commit: &str) -> String {
        let template = match status {
            PayloadStatus::Running => &self.running,
            PayloadStatus::Success => &self.success,
        };
        template
            .replace(Self::COMMIT, commit)
            .replace(&Self::ID.to_string(), &id.to_string())
    }
}

fn report(label: &str, samples: &mut [Sample], elapsed: Duration, seconds: u64) {
    let total = samples.len();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for sample in samples.iter() {
        match &sample.outcome {
            Ok(outcome) => *outcomes.entry(outcome.clone()).or_default() += 1,
            Err(error) => *errors.entry(error.clone()).or_default() += 1,
        }
    }
    let error_count: usize = errors.values().sum();
    let mut latencies: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    let mut per_second = vec![0usize; usize::try_from(seconds).unwrap_or(0) + 1];
    for sample in samples.iter() {
        let second = usize::try_from(sample.done.as_secs()).unwrap_or(usize::MAX);
        if let Some(slot) = per_second.get_mut(second) {
            *slot += 1;
        }
    }
    // The last slot only holds requests that finished after the deadline.
    per_second.truncate(usize::try_from(seconds).unwrap_or(0));
    println!("store {label}:");
    println!(
        "  {} requests in {} ms: {:.0} requests/s; errors {}",
        total,
        ms(elapsed),
        total as f64 / elapsed.as_secs_f64(),
        error_count
    );
    if let Some(summary) = Summary::of(&mut latencies) {
        println!("  request latency: {}", summary.line());
    }
    println!("  outcomes: {}", breakdown(&outcomes));
    if !errors.is_empty() {
        println!("  errors: {}", breakdown(&errors));
    }
    println!(
        "  completed per second: {}",
        per_second
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
}
