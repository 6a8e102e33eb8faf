//! `greenlight-server` as a child process of its own, so that its memory can be read from
//! `/proc` apart from the clients', and so that 10,000 agent connections fit in two
//! processes' file-descriptor limits.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use greenlight_e2e::{GITLAB_SECRET, PROJECT, pipeline_payload, push_payload};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::common::{Admin, BRANCH};

/// A `greenlight-server` child process on loopback ports, with what the benches ask of it.
pub struct ServerProcess {
    pub name: String,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    server: greenlight_e2e::process::ServerProcess,
    http_client: reqwest::Client,
    hooks: HookSender,
}

/// A webhook to send, and where its answer goes.
struct HookJob {
    event: String,
    body: Value,
    answered: oneshot::Sender<anyhow::Result<HookAnswer>>,
}

/// A webhook's answer, and when it was sent and how long the answer took.
struct HookAnswer {
    status: u16,
    body: Value,
    sent: Instant,
    took: Duration,
}

/// Sends webhooks from a thread and runtime of its own, as GitLab sends them from another
/// machine: an answer is timed as it arrives, not when the benchmark's runtime, busy with
/// thousands of agents' streams, next gets to it.
struct HookSender {
    jobs: mpsc::UnboundedSender<HookJob>,
}

impl HookSender {
    fn start(url: String) -> anyhow::Result<Self> {
        let (jobs, mut queue) = mpsc::unbounded_channel::<HookJob>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        std::thread::Builder::new()
            .name("webhook-sender".into())
            .spawn(move || {
                runtime.block_on(async move {
                    while let Some(job) = queue.recv().await {
                        let request = client
                            .post(&url)
                            .header("X-Gitlab-Event", &job.event)
                            .header("X-Gitlab-Token", GITLAB_SECRET)
                            .json(&job.body);
                        let sent = Instant::now();
                        let answer = async {
                            let response = request.send().await?;
                            let status = response.status().as_u16();
                            let body = response.json().await.unwrap_or(Value::Null);
                            Ok(HookAnswer {
                                status,
                                body,
                                sent,
                                took: sent.elapsed(),
                            })
                        };
                        let _ = job.answered.send(answer.await);
                    }
                });
            })?;
        Ok(Self { jobs })
    }

    async fn send(&self, event: &str, body: &Value) -> anyhow::Result<HookAnswer> {
        let (answered, answer) = oneshot::channel();
        let job = HookJob {
            event: event.to_owned(),
            body: body.clone(),
            answered,
        };
        self.jobs
            .send(job)
            .map_err(|_| anyhow::anyhow!("the webhook sender stopped"))?;
        answer.await.context("the webhook sender stopped")?
    }
}

impl ServerProcess {
    /// Starts the server of this build with config text `yaml` (its listen addresses are
    /// overridden) as replica `name`, and waits until it is ready. Logs go to a file in its
    /// own working directory, at level `warn` unless `RUST_LOG` says otherwise.
    pub async fn start(name: &str, yaml: &str) -> anyhow::Result<Self> {
        let log_level = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned());
        let server = greenlight_e2e::process::ServerProcess::from_yaml_with(yaml, |process| {
            process.set_env("GREENLIGHT_REPLICA_ID", name);
            process.set_env("RUST_LOG", &log_level);
        })
        .await
        .with_context(|| format!("cannot start greenlight-server {name}"))?;
        let hooks = HookSender::start(format!("http://{}/webhooks/gitlab", server.http))?;
        Ok(Self {
            name: name.to_owned(),
            grpc: server.grpc,
            http: server.http,
            hooks,
            server,
            http_client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
        })
    }

    /// The gRPC URL agents and operators dial.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.server.process.pid()
    }

    /// Resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        Ok(self.server.rss_bytes()? / 1024)
    }

    /// CPU time (user + system) the server has used so far.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        cpu_time_of(self.pid().context("the server is not running")?)
    }

    /// Posts a GitLab webhook with the right secret from the webhook sender's thread.
    async fn hook(&self, event: &str, body: &Value) -> anyhow::Result<HookAnswer> {
        let answer = self.hooks.send(event, body).await?;
        if answer.status != 200 {
            bail!("{event} answered {}: {}", answer.status, answer.body);
        }
        Ok(answer)
    }

    /// A push of `after` (previous head `before`) to `main`: how long its answer took; fails
    /// unless answered 200.
    pub async fn push(&self, before: &str, after: &str) -> anyhow::Result<Duration> {
        let body = push_payload(PROJECT, BRANCH, before, after);
        let answer = self.hook("Push Hook", &body).await?;
        Ok(answer.took)
    }

    /// The pipeline-success webhook for `sha` (pipeline `id`): when it was sent and how long
    /// its answer took; fails unless answered 200.
    pub async fn green(&self, sha: &str, id: u64) -> anyhow::Result<(Instant, Duration)> {
        let body = pipeline_payload(PROJECT, BRANCH, sha, id, "success", "push");
        let answer = self.hook("Pipeline Hook", &body).await?;
        Ok((answer.sent, answer.took))
    }

    /// The value of a metric in `/metrics` (summed over its label sets), 0 when absent.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self
            .http_client
            .get(format!("http://{}/metrics", self.http))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|line| line.split([' ', '{']).next() == Some(name))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// An admin API client.
    pub async fn admin(&self) -> anyhow::Result<Admin> {
        self.server.api.admin().await
    }

    /// SIGKILLs the server, starts it again on the same ports and store, and answers how
    /// long it took to be ready.
    pub async fn kill_and_restart(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.server.restart().await?;
        Ok(started.elapsed())
    }

    /// Stops the server with SIGTERM and waits up to 20 s for it to exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.server.process.terminate(Duration::from_secs(20)).await
    }
}

/// `INFO commandstats` of the Redis on `port`: calls per command.
pub fn redis_command_calls(port: u16) -> anyhow::Result<Vec<(String, u64)>> {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", "commandstats"])
        .output()
        .context("cannot run redis-cli")?;
    if !output.status.success() {
        bail!("redis-cli INFO commandstats failed");
    }
    let text = String::from_utf8_lossy(&output.stdout);
    // Lines like `cmdstat_xreadgroup:calls=12,usec=…`.
    Ok(text
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("cmdstat_")?;
            let (command, fields) = rest.split_once(':')?;
            let calls = fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((command.to_owned(), calls))
        })
        .collect())
}

/// `redis-benchmark -c <clients> -t set -n <requests>` against the Redis on `port`: SETs per
/// second, the ceiling of what one round trip per request can reach.
pub fn redis_benchmark_set(port: u16, clients: usize, requests: u64) -> anyhow::Result<f64> {
    let output = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", &clients.to_string(), "-t", "set"])
        .args(["-n", &requests.to_string(), "-q"])
        .output()
        .context("cannot run redis-benchmark: is it installed (it comes with redis-server)?")?;
    let text = String::from_utf8_lossy(&output.stdout);
    // `-q` prints `SET: 12345.68 requests per second, p50=…` after progress lines ending in \r.
    text.split(['\n', '\r'])
        .filter_map(|line| line.trim().strip_prefix("SET: "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .next_back()
        .with_context(|| format!("no SET figure in redis-benchmark's output: {text}"))
}

/// CPU time (user + system) process `pid` has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time_of(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the name.
    let total = ticks(11) + ticks(12);
    // USER_HZ is 100 on Linux.
    Ok(Duration::from_millis(total * 10))
}
