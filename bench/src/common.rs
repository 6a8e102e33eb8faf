//! What several scenarios share: the machine description, tool checks, agent streams read in
//! tasks of their own, and waiting on the server's view of things.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use greenlight::auth::Bearer;
use greenlight::v1::admin_service_client::AdminServiceClient;
use greenlight::v1::{GetAgentRequest, Phase, StatusReport};
use greenlight_agent::client::Client;
use greenlight_e2e::{TestServer, agent_token};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The admin client of the harness.
pub type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// Branch every scenario pushes to.
pub const BRANCH: &str = "main";
pub use greenlight_e2e::ZERO;

/// `nproc`, CPU model and memory, the load average, and the build, one line each.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "model name").then(|| value.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix("MemTotal:")?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0)))
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let build = if cfg!(debug_assertions) {
        "debug (numbers are not representative: use --release)"
    } else {
        "release"
    };
    format!(
        "machine: nproc {cpus}, CPU {model}, memory {memory}\nload average: {}\nbuild: {build}",
        load_average()
    )
}

/// The load averages over 1, 5 and 15 minutes, as `uptime` prints them: whether anything
/// else competed for the machine.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Runs `tool --version`; a clear error when it is not installed.
pub fn require_tool(tool: &str, why: &str) -> anyhow::Result<String> {
    let output = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "{tool} is required {why} but cannot be run: is it installed and on PATH? \
                 (on Debian: apt-get install {tool}; scripts/test installs it too)"
            )
        })?;
    if !output.status.success() {
        bail!(
            "{tool} --version failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// One revision an agent stream received.
pub struct Receipt {
    pub agent: usize,
    pub sha: String,
    pub files: usize,
    pub bytes: u64,
    pub at: Instant,
}

/// Agent streams, each read in a task of its own that reports what arrives.
pub struct Streams {
    receipts: mpsc::UnboundedReceiver<anyhow::Result<Receipt>>,
    tasks: Vec<JoinHandle<()>>,
    count: usize,
}

impl Streams {
    /// Connects one client per name (each its own HTTP/2 connection) and opens its `Sync`
    /// stream stating nothing applied.
    pub async fn open(server: &TestServer, names: &[String]) -> anyhow::Result<Self> {
        Self::open_on(&[server.grpc_url()], names).await
    }

    /// Like [`Streams::open`], agent `i` on server `urls[i % urls.len()]`, opening up to
    /// 64 at a time (10,000 one after the other take long on a busy machine).
    pub async fn open_on(urls: &[String], names: &[String]) -> anyhow::Result<Self> {
        if urls.is_empty() {
            bail!("no server to connect to");
        }
        let (tx, receipts) = mpsc::unbounded_channel();
        let mut tasks = Vec::with_capacity(names.len());
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
        let mut opening = tokio::task::JoinSet::new();
        for (agent, name) in names.iter().enumerate() {
            let url = urls[agent % urls.len()].clone();
            let name = name.clone();
            let permits = permits.clone();
            opening.spawn(async move {
                let _permit = permits.acquire_owned().await?;
                let client = Client::connect(&url, &agent_token(&name), None)
                    .await
                    .with_context(|| format!("cannot connect {name}"))?;
                let stream = client
                    .sync(None)
                    .await
                    .with_context(|| format!("cannot open the stream of {name}"))?;
                anyhow::Ok((agent, name, stream))
            });
        }
        while let Some(opened) = opening.join_next().await {
            let (agent, name, mut stream) = opened.context("a connecting task failed")??;
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let message = match stream.next().await {
                        Ok(Some(revision)) => {
                            let at = Instant::now();
                            Ok(Receipt {
                                agent,
                                sha: revision.sha().to_owned(),
                                files: revision.files.len(),
                                bytes: revision.files.iter().map(|(_, c)| c.len() as u64).sum(),
                                at,
                            })
                        }
                        Ok(None) => Err(anyhow::anyhow!("the stream of {name} ended")),
                        Err(error) => Err(anyhow::anyhow!("the stream of {name} failed: {error}")),
                    };
                    let failed = message.is_err();
                    if tx.send(message).is_err() || failed {
                        return;
                    }
                }
            }));
        }
        Ok(Self {
            receipts,
            tasks,
            count: names.len(),
        })
    }

    /// Waits until every agent received `sha`, failing on anything else or after `within`.
    pub async fn all_receive(
        &mut self,
        sha: &str,
        within: Duration,
    ) -> anyhow::Result<Vec<Receipt>> {
        let deadline = tokio::time::Instant::now() + within;
        let mut got: Vec<Receipt> = Vec::with_capacity(self.count);
        while got.len() < self.count {
            let next = tokio::time::timeout_at(deadline, self.receipts.recv()).await;
            let receipt = match next {
                Err(_) => bail!(
                    "only {} of {} agents received {} within {within:?}",
                    got.len(),
                    self.count,
                    &sha[..8]
                ),
                Ok(None) => bail!("every agent stream ended"),
                Ok(Some(receipt)) => receipt?,
            };
            if receipt.sha != sha {
                bail!(
                    "agent {} received {} while {} was expected",
                    receipt.agent,
                    receipt.sha,
                    sha
                );
            }
            got.push(receipt);
        }
        Ok(got)
    }

    /// Stops reading.
    pub fn close(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

/// Waits until a mirror under `cache_dir` has `refs/heads/main` at `sha`: the server's fetch
/// after a push is done, as it would be long before a real pipeline ends.
pub async fn wait_for_mirror(cache_dir: &Path, sha: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if mirror_has(cache_dir, sha).await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the server's mirror did not fetch {sha} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether a mirror under `cache_dir` has `refs/heads/main` at `sha`.
async fn mirror_has(cache_dir: &Path, sha: &str) -> anyhow::Result<bool> {
    let mut entries = tokio::fs::read_dir(cache_dir)
        .await
        .with_context(|| format!("cannot list {}", cache_dir.display()))?;
    while let Some(entry) = entries.next_entry().await? {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "git") {
            continue;
        }
        let output = tokio::process::Command::new("git")
            .arg("--git-dir")
            .arg(&path)
            .args(["rev-parse", "--verify", "-q", "refs/heads/main"])
            .output()
            .await
            .context("cannot run git")?;
        if output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == sha {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Sends the push webhook for `sha` and waits until the server fetched it (untimed: a real
/// pipeline ends minutes after its push); returns how long that took.
pub async fn push_and_settle(
    server: &TestServer,
    cache_dir: &Path,
    sha: &str,
) -> anyhow::Result<Duration> {
    let fetches_before = counter(server, "greenlight_git_fetches_total").await?;
    let status = server
        .push(BRANCH, ZERO, sha)
        .await
        .context("push webhook failed")?;
    if status != 200 {
        bail!("push webhook answered {status}");
    }
    settle_after_push(server, cache_dir, sha, fetches_before).await
}

/// After a push webhook: waits until the server started the fetch the push asked for
/// (`greenlight_git_fetches_total` above `fetches_before`) and its mirror has `sha`, then
/// lets that fetch finish, so that a following pipeline webhook is timed alone, as in real
/// life where the pipeline ends minutes after the push. Returns how long it waited.
pub async fn settle_after_push(
    server: &TestServer,
    cache_dir: &Path,
    sha: &str,
    fetches_before: f64,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    while counter(server, "greenlight_git_fetches_total").await? <= fetches_before {
        // Every replica fetches every repository as it starts: a commit made before the
        // server started needs no fetch after its push.
        if mirror_has(cache_dir, sha).await? {
            break;
        }
        if Instant::now() > deadline {
            bail!("the push webhook started no fetch within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_for_mirror(cache_dir, sha, Duration::from_secs(60)).await?;
    tokio::time::sleep(SETTLE).await;
    Ok(started.elapsed())
}

/// Time left for background work (the push's fetch and gate re-run) before timing starts.
pub const SETTLE: Duration = Duration::from_millis(300);

/// Polls `GetAgent` every 10 ms until the agent is connected.
pub async fn wait_connected(
    admin: &mut Admin,
    agent: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let status = admin
            .get_agent(GetAgentRequest { name: agent.into() })
            .await
            .context("GetAgent failed")?
            .into_inner();
        if status.connected {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("agent {agent} did not connect within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `GetAgent` every 10 ms until the last report is `Healthy` for `sha` at a generation
/// of at least `generation`; fails at once on a `Failed` or `Degraded` report for it.
pub async fn wait_healthy(
    admin: &mut Admin,
    agent: &str,
    sha: &str,
    generation: u64,
    within: Duration,
) -> anyhow::Result<StatusReport> {
    let deadline = Instant::now() + within;
    loop {
        let status = admin
            .get_agent(GetAgentRequest { name: agent.into() })
            .await
            .context("GetAgent failed")?
            .into_inner();
        if let Some(report) = status.last_report
            && report.revision == sha
            && report.generation >= generation
        {
            match report.phase() {
                Phase::Healthy => return Ok(report),
                Phase::Failed | Phase::Degraded => bail!(
                    "agent {agent} reported {:?} for {sha}: {}",
                    report.phase(),
                    report.message
                ),
                _ => {}
            }
        }
        if Instant::now() > deadline {
            bail!("agent {agent} did not report {sha} healthy within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of a counter in the server's `/metrics`.
pub async fn counter(server: &TestServer, name: &str) -> anyhow::Result<f64> {
    greenlight_e2e::metric(server, name)
        .await
        .with_context(|| format!("cannot read {name} from /metrics"))
}

/// Bytes of each ref document (`<prefix>:{project}:ref:<branch>`, hash field `doc`) in the
/// Redis at `url`, read with `redis-cli`, and what they are made of; a note instead when
/// they cannot be read.
pub fn ref_document_sizes(url: &str) -> String {
    let cli = |args: &[&str]| -> Option<Vec<u8>> {
        let output = std::process::Command::new("redis-cli")
            .args(["-u", url, "--no-raw"])
            .args(args)
            .output()
            .ok()?;
        output.status.success().then_some(output.stdout)
    };
    let Some(keys) = cli(&["--scan", "--pattern", "*:ref:*"]) else {
        return "unknown (redis-cli cannot be run)".to_owned();
    };
    let keys = String::from_utf8_lossy(&keys).to_string();
    let sizes: Vec<String> = keys
        .lines()
        .map(|key| key.trim().trim_matches('"'))
        .filter(|key| !key.is_empty())
        .map(|key| {
            let raw = std::process::Command::new("redis-cli")
                .args(["-u", url, "--raw", "HGET", key, "doc"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| o.stdout)
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&raw);
            let text = text.trim_end();
            match serde_json::from_str::<serde_json::Value>(text) {
                Ok(doc) => describe_document(key, text.len(), &doc),
                Err(_) => format!("{key}: {} bytes", text.len()),
            }
        })
        .collect();
    if sizes.is_empty() {
        "no ref document".to_owned()
    } else {
        sizes.join("; ")
    }
}

/// `key: N bytes (refs …, agents …, decisions …)` for one ref document.
fn describe_document(key: &str, bytes: usize, doc: &serde_json::Value) -> String {
    let size = |v: &serde_json::Value| serde_json::to_string(v).map_or(0, |s| s.len());
    let refs = size(&doc["refs"]);
    let agents = doc["agents"].as_object();
    let agent_count = agents.map_or(0, |a| a.len());
    let (mut decisions, mut decision_bytes) = (0usize, 0usize);
    for gate in agents.into_iter().flat_map(|a| a.values()) {
        if let Some(list) = gate["decisions"].as_array() {
            decisions += list.len();
            decision_bytes += list.iter().map(size).sum::<usize>();
        }
    }
    format!(
        "{key}: {bytes} bytes (facts {refs} bytes; {agent_count} agent gates {} bytes, of which {decisions} decisions {decision_bytes} bytes)",
        size(&doc["agents"])
    )
}

/// When a pipeline-success webhook was sent, and how long the server took to answer it.
pub struct Sent {
    pub at: Instant,
    pub at_unix_ms: i64,
    pub answered: Duration,
}

/// Sends the pipeline-success webhook for `sha` (pipeline `id`); fails unless it is answered 200.
pub async fn send_green(server: &TestServer, sha: &str, id: u64) -> anyhow::Result<Sent> {
    let body = greenlight_e2e::pipeline_payload(
        greenlight_e2e::PROJECT,
        BRANCH,
        sha,
        id,
        "success",
        "push",
    );
    let at_unix_ms = greenlight_server::clock::now_ms();
    let at = Instant::now();
    let (status, answer) = server
        .hook("Pipeline Hook", &body, None)
        .await
        .context("pipeline webhook failed")?;
    let answered = at.elapsed();
    if status != 200 {
        bail!("pipeline webhook answered {status}: {answer}");
    }
    Ok(Sent {
        at,
        at_unix_ms,
        answered,
    })
}
