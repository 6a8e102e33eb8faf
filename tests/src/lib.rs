//! Test harness: a real `redis-server` per test, servers on loopback ports, GitLab payloads,
//! git repositories, and a real Kubernetes control plane (`control_plane`).

pub mod cluster;
pub mod control_plane;
pub mod exposition;
pub mod fake_gitlab;
pub mod process;
pub mod proxy;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use greenlight::auth::Bearer;
use greenlight::digest::sha256_hex;
use greenlight::v1::admin_service_client::AdminServiceClient;
use greenlight::v1::ingest_service_client::IngestServiceClient;
use greenlight::v1::{
    AgentStatus, GetAgentHistoryRequest, GetAgentHistoryResponse, GetAgentRequest, Phase,
    StatusReport,
};
use greenlight_agent::assemble::ReadyRevision;
use greenlight_agent::client::{Client, RevisionStream};
use greenlight_server::config::{Config, Overrides};
use greenlight_server::{Listeners, RunError, run};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The GitLab webhook secret every test server uses.
pub const GITLAB_SECRET: &str = "hook-secret";
/// The admin token every test server accepts.
pub const ADMIN_TOKEN: &str = "admin-token";
/// The ingest token every test server accepts.
pub const INGEST_TOKEN: &str = "ingest-token";
/// The project every default agent watches.
pub const PROJECT: &str = "group/app-manifests";
/// Its numeric id.
pub const PROJECT_ID: u64 = 42;

/// Installs the process-wide TLS crypto provider (ring), as the binaries do at start.
pub fn install_crypto() {
    greenlight::tls::install_ring();
}

/// A ConfigMap manifest named `name` holding `value`.
pub fn configmap(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: \"{value}\"\n"
    )
}

/// A Deployment manifest `web` with two replicas.
pub const DEPLOYMENT: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      containers:\n        - {name: web, image: nginx}\n";

/// A Deployment of `replicas` whose pods fit only on a node labelled `pool: <pool>`.
pub fn deployment_on(name: &str, replicas: u32, pool: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: {replicas}\n  progressDeadlineSeconds: 3\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n      nodeSelector: {{pool: {pool}}}\n      containers:\n        - {{name: {name}, image: nginx}}\n"
    )
}

/// The `before` of a branch's first push, as GitLab sends it.
pub const ZERO: &str = "0000000000000000000000000000000000000000";

/// A 40-hex commit id made from `n`, distinct for distinct `n`.
pub fn sha(n: u32) -> String {
    format!("{n:08x}").repeat(5)
}

/// The bearer token of the agent named `name` in test configs.
pub fn agent_token(name: &str) -> String {
    format!("token-{name}")
}

/// A `redis-server` child process on a free port, with an append-only file so that a
/// restart keeps what was written.
pub struct Redis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    /// Starts a server and waits until it answers.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut redis = Self {
            port,
            dir,
            child: None,
        };
        for _ in 0..5 {
            match redis.spawn().await {
                Err(error) if error.downcast_ref::<PortTaken>().is_some() => {
                    redis.port = free_port()?;
                }
                other => return other.map(|()| redis),
            }
        }
        bail!("redis-server found no free port in 5 tries")
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server: is it installed? (scripts/test installs it)")?;
        self.child = Some(child);
        for _ in 0..200 {
            // Another process may have taken the port between our probe and redis-server's
            // bind: then ours exits, and what answers is someone else's server.
            if let Some(child) = self.child.as_mut()
                && child.try_wait()?.is_some()
            {
                bail!(PortTaken(self.port));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                // Answering, and still ours.
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Some(child) = self.child.as_mut()
                    && child.try_wait()?.is_some()
                {
                    bail!(PortTaken(self.port));
                }
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("redis-server did not start on port {}", self.port)
    }

    /// The URL servers connect to.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The loopback port it listens on, for `redis-cli -p`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server abruptly, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    /// Starts it again on the same port with none of its data, as a Redis whose storage
    /// went with its pod does.
    pub async fn restart_empty(&mut self) -> anyhow::Result<()> {
        self.kill();
        for entry in std::fs::read_dir(self.dir.path()).context("reading Redis's data dir")? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            }
            .with_context(|| format!("removing {}", path.display()))?;
        }
        self.spawn().await
    }

    /// Runs `redis-cli` against it with `args`; its output, if it succeeded.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .context("redis-cli")?;
        anyhow::ensure!(output.status.success(), "redis-cli {args:?}: {output:?}");
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The data directory, for tests that inspect it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// redis-server could not bind its port: another process took it first.
#[derive(Debug, thiserror::Error)]
#[error("port {0} was taken before redis-server could bind it")]
struct PortTaken(u16);

/// A loopback port free now and never handed out before in this process: the kernel may
/// give the same ephemeral port to two probes once the first is released, and two tests
/// (or a test and the control plane) would then race to bind it.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..100 {
        let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    bail!("no loopback port that was not handed out before, in 100 tries")
}

/// An agent entry of a test config.
#[derive(Debug, Clone)]
pub struct AgentDef {
    pub name: String,
    pub project: String,
    pub branch: String,
    pub mode: String,
}

impl AgentDef {
    /// An agent on `PROJECT@main` in pipeline mode.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            project: PROJECT.into(),
            branch: "main".into(),
            mode: "pipeline".into(),
        }
    }

    /// The same agent in another gate mode.
    pub fn mode(mut self, mode: &str) -> Self {
        self.mode = mode.into();
        self
    }
}

/// A server config for `agents`, on Redis at `redis_url` or on the embedded store.
pub fn config_yaml(redis_url: Option<&str>, agents: &[AgentDef]) -> String {
    let mut yaml = String::new();
    yaml.push_str("listen: { grpc: \"127.0.0.1:0\", http: \"127.0.0.1:0\" }\n");
    if let Some(url) = redis_url {
        yaml.push_str(&format!(
            "redis: {{ url: \"{url}\", key_prefix: \"gl-test\" }}\n"
        ));
    }
    yaml.push_str(&format!(
        "webhooks: {{ gitlab: {{ secret_token: \"{GITLAB_SECRET}\" }} }}\n"
    ));
    yaml.push_str(&format!(
        "admin: {{ token_sha256: \"{}\" }}\n",
        sha256_hex(ADMIN_TOKEN.as_bytes())
    ));
    yaml.push_str(&format!(
        "ingest: {{ token_sha256: \"{}\" }}\n",
        sha256_hex(INGEST_TOKEN.as_bytes())
    ));
    yaml.push_str("agents:\n");
    for agent in agents {
        yaml.push_str(&format!(
            "  - name: {}\n    token_sha256: \"{}\"\n    project: \"{}\"\n    ref: {}\n    gate: {{ mode: {} }}\n",
            agent.name,
            sha256_hex(agent_token(&agent.name).as_bytes()),
            agent.project,
            agent.branch,
            agent.mode
        ));
    }
    yaml
}

/// A server running in this process on loopback ports.
pub struct TestServer {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), RunError>>,
    http_client: reqwest::Client,
    /// The embedded store's own directory, when the config left it at the default.
    _data_dir: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Starts a server from YAML config text.
    pub async fn start(yaml: &str) -> anyhow::Result<Self> {
        let config = Config::from_yaml(yaml, &Overrides::default())?;
        Self::start_with(config).await
    }

    /// Starts a server from a parsed config; on the embedded store, in a directory of its
    /// own unless the config names one.
    pub async fn start_with(mut config: Config) -> anyhow::Result<Self> {
        install_crypto();
        let data_dir = match config.redis.is_none()
            && config.data_dir == Path::new(greenlight_server::config::DEFAULT_DATA_DIR)
        {
            true => {
                let dir = tempfile::tempdir()?;
                config.data_dir = dir.path().to_owned();
                Some(dir)
            }
            false => None,
        };
        let grpc = TcpListener::bind(config.grpc_addr).await?;
        let http = TcpListener::bind(config.http_addr).await?;
        let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(run(config, Listeners { grpc, http }, shutdown.clone()));
        let server = Self {
            grpc: grpc_addr,
            http: http_addr,
            shutdown,
            handle,
            http_client: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()?,
            _data_dir: data_dir,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// A handle on a server that runs elsewhere (another process) at `grpc` and `http`,
    /// for its clients and helpers, once it answers; its `stop` and `kill` do nothing to
    /// that server.
    pub async fn attach(grpc: SocketAddr, http: SocketAddr) -> anyhow::Result<Self> {
        let server = Self::attach_later(grpc, http)?;
        // A process may take a while to start on a loaded machine.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while let Err(error) = server.wait_ready().await {
            if tokio::time::Instant::now() > deadline {
                return Err(error);
            }
        }
        Ok(server)
    }

    /// [`Self::attach`] without waiting: for a caller that waits for the server itself.
    pub fn attach_later(grpc: SocketAddr, http: SocketAddr) -> anyhow::Result<Self> {
        install_crypto();
        Ok(Self {
            grpc,
            http,
            shutdown: CancellationToken::new(),
            handle: tokio::spawn(std::future::pending()),
            http_client: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()?,
            _data_dir: None,
        })
    }

    /// Waits until the server answers and has tried its shard leases once, so that a fact
    /// sent next is evaluated in its own trace; a store that is down (some tests start
    /// so) does not count as starting.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        for _ in 0..200 {
            if let Ok(response) = self
                .http_client
                .get(format!("http://{}/readyz", self.http))
                .send()
                .await
            {
                let starting = response.status().is_server_error()
                    && response
                        .text()
                        .await
                        .is_ok_and(|t| t.starts_with("starting:"));
                if !starting {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("server did not become healthy")
    }

    /// The gRPC URL agents and operators dial.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Stops the server as SIGTERM would and waits for it to exit.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle).await???;
        Ok(())
    }

    /// Stops the server as SIGKILL would, as far as a process can do that to itself: none of
    /// its stopping steps run (presence is not withdrawn, work in flight is not finished or
    /// acknowledged), and its background tasks end at their next step.
    pub fn kill(self) {
        self.handle.abort();
        self.shutdown.cancel();
    }

    /// Posts a GitLab webhook with the right secret; returns status and JSON body.
    pub async fn hook(
        &self,
        event: &str,
        body: &Value,
        delivery: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .http_client
            .post(format!("http://{}/webhooks/gitlab", self.http))
            .header("X-Gitlab-Event", event)
            .header("X-Gitlab-Token", GITLAB_SECRET)
            .json(body);
        if let Some(id) = delivery {
            request = request.header("X-Gitlab-Event-UUID", id);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// Posts raw bytes to the webhook endpoint with the given headers.
    pub async fn raw_hook(&self, headers: &[(&str, &str)], body: Vec<u8>) -> anyhow::Result<u16> {
        let mut request = self
            .http_client
            .post(format!("http://{}/webhooks/gitlab", self.http))
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Ok(request.send().await?.status().as_u16())
    }

    /// A push of `after` (previous head `before`) to `branch` of `PROJECT`.
    pub async fn push(&self, branch: &str, before: &str, after: &str) -> anyhow::Result<u16> {
        Ok(self
            .hook(
                "Push Hook",
                &push_payload(PROJECT, branch, before, after),
                None,
            )
            .await?
            .0)
    }

    /// A pipeline update for `sha` on `branch` of `PROJECT`.
    pub async fn pipeline(
        &self,
        branch: &str,
        sha: &str,
        id: u64,
        status: &str,
        source: &str,
    ) -> anyhow::Result<u16> {
        Ok(self
            .hook(
                "Pipeline Hook",
                &pipeline_payload(PROJECT, branch, sha, id, status, source),
                None,
            )
            .await?
            .0)
    }

    /// Pushes `sha` after `before` on `main` and marks its pipeline green.
    pub async fn release(&self, before: &str, sha: &str, pipeline: u64) -> anyhow::Result<()> {
        let pushed = self.push("main", before, sha).await?;
        let green = self
            .pipeline("main", sha, pipeline, "success", "push")
            .await?;
        if (pushed, green) != (200, 200) {
            bail!("webhooks answered {pushed} and {green}");
        }
        Ok(())
    }

    /// `GetAgent` for `agent`, with the admin token.
    pub async fn agent_status(&self, agent: &str) -> anyhow::Result<AgentStatus> {
        Ok(self
            .admin()
            .await?
            .get_agent(GetAgentRequest { name: agent.into() })
            .await?
            .into_inner())
    }

    /// `GetAgent` for `agent` once its desired revision is `sha`: a webhook's answer never
    /// waits for the gate, which decides a moment later.
    pub async fn desired_becomes(&self, agent: &str, sha: &str) -> anyhow::Result<AgentStatus> {
        eventually(&format!("{agent} to be told to run {sha}"), || async {
            let status = self.agent_status(agent).await?;
            let there = status.desired.as_ref().is_some_and(|d| d.sha == sha);
            Ok(there.then_some(status))
        })
        .await
    }

    /// `GetAgentHistory` for `agent`, with the admin token.
    pub async fn history(&self, agent: &str) -> anyhow::Result<GetAgentHistoryResponse> {
        let request = GetAgentHistoryRequest { name: agent.into() };
        Ok(self
            .admin()
            .await?
            .get_agent_history(request)
            .await?
            .into_inner())
    }

    /// The last status report of `agent`.
    pub async fn last_report(&self, agent: &str) -> anyhow::Result<Option<StatusReport>> {
        let status = self
            .admin()
            .await?
            .get_agent(GetAgentRequest { name: agent.into() })
            .await?
            .into_inner();
        Ok(status.last_report)
    }

    /// Waits until `agent` reports `sha` in `phase`.
    pub async fn reported(
        &self,
        agent: &str,
        sha: &str,
        phase: Phase,
    ) -> anyhow::Result<StatusReport> {
        eventually(&format!("{phase:?} report for {sha}"), || async {
            Ok(self
                .last_report(agent)
                .await?
                .filter(|r| r.revision == sha && r.phase() == phase))
        })
        .await
    }

    /// An admin client with the admin token.
    pub async fn admin(
        &self,
    ) -> anyhow::Result<AdminServiceClient<InterceptedService<Channel, Bearer>>> {
        let channel = Channel::from_shared(self.grpc_url())?.connect().await?;
        let bearer = Bearer::new(ADMIN_TOKEN)?;
        Ok(AdminServiceClient::with_interceptor(channel, bearer))
    }

    /// An admin API client presenting `token`, such as an agent's CI token.
    pub async fn admin_as(
        &self,
        token: &str,
    ) -> anyhow::Result<AdminServiceClient<InterceptedService<Channel, Bearer>>> {
        let channel = Channel::from_shared(self.grpc_url())?.connect().await?;
        Ok(AdminServiceClient::with_interceptor(
            channel,
            Bearer::new(token)?,
        ))
    }

    /// An ingest API client presenting `token`.
    pub async fn ingest_as(
        &self,
        token: &str,
    ) -> anyhow::Result<IngestServiceClient<InterceptedService<Channel, Bearer>>> {
        let channel = Channel::from_shared(self.grpc_url())?.connect().await?;
        Ok(IngestServiceClient::with_interceptor(
            channel,
            Bearer::new(token)?,
        ))
    }

    /// An agent client for `name`.
    pub async fn agent(&self, name: &str) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.grpc_url(), &agent_token(name), None).await?)
    }

    /// An open stream for agent `name` that has applied nothing yet.
    pub async fn stream(&self, name: &str) -> anyhow::Result<RevisionStream> {
        Ok(self.agent(name).await?.sync(None).await?)
    }
}

/// GitLab's "Push Hook" body, trimmed to what matters plus some noise.
pub fn push_payload(project: &str, branch: &str, before: &str, after: &str) -> Value {
    json!({
        "object_kind": "push",
        "event_name": "push",
        "before": before,
        "after": after,
        "ref": format!("refs/heads/{branch}"),
        "checkout_sha": after,
        "user_name": "Jane",
        "project_id": PROJECT_ID,
        "project": { "id": PROJECT_ID, "name": "app-manifests", "path_with_namespace": project, "default_branch": "main" },
        "commits": [ { "id": after, "message": "change", "timestamp": "2026-11-26T10:00:00+00:00" } ],
        "total_commits_count": 1,
        "repository": { "name": "app-manifests" }
    })
}

/// GitLab's "Pipeline Hook" body.
pub fn pipeline_payload(
    project: &str,
    branch: &str,
    sha: &str,
    id: u64,
    status: &str,
    source: &str,
) -> Value {
    let finished = matches!(status, "success" | "failed" | "canceled" | "skipped");
    json!({
        "object_kind": "pipeline",
        "object_attributes": {
            "id": id,
            "iid": id,
            "ref": branch,
            "tag": false,
            "sha": sha,
            "before_sha": "0000000000000000000000000000000000000000",
            "source": source,
            "status": status,
            "stages": ["test", "deploy"],
            "created_at": "2026-11-26 10:00:00 UTC",
            "finished_at": if finished { Value::from(format!("2026-11-26 10:{:02}:00 UTC", id % 60)) } else { Value::Null },
            "duration": 60
        },
        "merge_request": if source == "merge_request_event" { json!({"id": 1, "iid": 1}) } else { Value::Null },
        "user": { "name": "Jane" },
        "project": { "id": PROJECT_ID, "path_with_namespace": project },
        "commit": { "id": sha, "message": "change" },
        "builds": []
    })
}

/// The next revision on `stream`, failing after `within`.
pub async fn next_revision(
    stream: &mut RevisionStream,
    within: Duration,
) -> anyhow::Result<ReadyRevision> {
    match tokio::time::timeout(within, stream.next()).await {
        Err(_) => bail!("no revision within {within:?}"),
        Ok(Err(error)) => bail!("stream failed: {error}"),
        Ok(Ok(None)) => bail!("stream ended"),
        Ok(Ok(Some(revision))) => Ok(revision),
    }
}

/// Fails if a revision arrives on `stream` within `window`.
pub async fn no_revision(stream: &mut RevisionStream, window: Duration) -> anyhow::Result<()> {
    match tokio::time::timeout(window, stream.next()).await {
        Err(_) => Ok(()),
        Ok(Ok(Some(revision))) => bail!("unexpected revision {}", revision.sha()),
        Ok(other) => bail!("stream ended unexpectedly: {:?}", other.map(|_| ())),
    }
}

/// How long to wait for something that should happen (generous for a loaded CI machine).
pub const SOON: Duration = Duration::from_secs(10);
/// How long to watch for something that must not happen.
pub const QUIET: Duration = Duration::from_millis(400);

/// A git repository built with the `git` CLI in a temporary directory.
pub struct GitRepo {
    dir: tempfile::TempDir,
}

impl GitRepo {
    /// An empty repository whose branch is `main`.
    pub fn new() -> anyhow::Result<Self> {
        let repo = Self {
            dir: tempfile::tempdir()?,
        };
        repo.git(&["init", "-q", "-b", "main"])?;
        Ok(repo)
    }

    /// The `file://` URL the server fetches from.
    pub fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    /// Runs git in the repository and returns its trimmed stdout.
    pub fn git(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new("git")
            .args([
                "-c",
                "user.name=Test",
                "-c",
                "user.email=test@example.com",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .context("cannot run git")?;
        if !output.status.success() {
            bail!(
                "git {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8(output.stdout)?.trim().to_owned())
    }

    /// Writes `files` (path, content), removes `removed`, commits, and returns the new SHA.
    pub fn commit(&self, files: &[(&str, &[u8])], removed: &[&str]) -> anyhow::Result<String> {
        for (path, content) in files {
            let path = self.dir.path().join(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, content)?;
        }
        for path in removed {
            self.git(&["rm", "-q", path])?;
        }
        self.git(&["add", "-A"])?;
        self.git(&["commit", "-q", "--allow-empty", "-m", "change"])?;
        self.git(&["rev-parse", "HEAD"])
    }

    /// Moves `main` back to `sha`, as `git reset --hard` before a force push.
    pub fn reset_hard(&self, sha: &str) -> anyhow::Result<()> {
        self.git(&["reset", "-q", "--hard", sha])?;
        Ok(())
    }
}

/// An agent entry with a repository, in YAML, for tests that need more than `AgentDef`.
pub fn git_agent_yaml(name: &str, repository: &str, paths: &[&str]) -> String {
    let paths = paths
        .iter()
        .map(|p| format!("'{p}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "  - name: {name}\n    token_sha256: \"{}\"\n    project: \"{PROJECT}\"\n    ref: main\n    repository: \"{repository}\"\n    paths: [{paths}]\n    default_namespace: apps\n",
        sha256_hex(agent_token(name).as_bytes())
    )
}

/// A server config with git settings and the given agent entries (from `git_agent_yaml`).
pub fn git_config_yaml(
    redis_url: &str,
    cache_dir: &Path,
    git_extra: &str,
    agents: &[String],
) -> String {
    let mut yaml = config_yaml(Some(redis_url), &[]);
    yaml = yaml.replace("agents:\n", "");
    yaml.push_str(&format!(
        "git: {{ cache_dir: \"{}\", fetch_timeout: 30s{git_extra} }}\n",
        cache_dir.display()
    ));
    yaml.push_str("agents:\n");
    for agent in agents {
        yaml.push_str(agent);
    }
    yaml
}

/// The value of a counter in the server's `/metrics`, 0 when absent.
pub async fn metric(server: &TestServer, name: &str) -> anyhow::Result<f64> {
    install_crypto();
    let text = reqwest::get(format!("http://{}/metrics", server.http))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find(|line| line.split([' ', '{']).next() == Some(name))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0))
}

/// An agent running in this process against a cluster, as a replica would in a Pod.
pub struct AgentProcess {
    shutdown: CancellationToken,
    handle: JoinHandle<()>,
    /// What the agent counts, as its `/metrics` would show.
    pub metrics: Arc<greenlight_agent::metrics::AgentMetrics>,
}

impl AgentProcess {
    /// Starts agent `name` of `server` against `kube`, keeping its inventory and Lease in
    /// namespace `greenlight`; `identity` names the replica.
    pub fn start(server: &TestServer, name: &str, kube: kube::Client, identity: &str) -> Self {
        Self::start_in(server, name, kube, identity, AGENT_NAMESPACE)
    }

    /// Starts agent `name` keeping its inventory and Lease in `namespace`.
    pub fn start_in(
        server: &TestServer,
        name: &str,
        kube: kube::Client,
        identity: &str,
        namespace: &str,
    ) -> Self {
        Self::start_with(
            server,
            &agent_token(name),
            kube,
            identity,
            Duration::from_secs(3),
            namespace,
        )
    }

    /// Starts an agent holding `token`, competing for its Lease in `namespace` for
    /// `lease_duration`.
    pub fn start_with(
        server: &TestServer,
        token: &str,
        kube: kube::Client,
        identity: &str,
        lease_duration: Duration,
        namespace: &str,
    ) -> Self {
        let settings = greenlight_agent::run::Settings {
            target: greenlight_agent::session::Target {
                server: server.grpc_url(),
                token: token.to_owned(),
                ca_file: None,
            },
            namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            lease_duration,
            metrics: Arc::default(),
        };
        let metrics = settings.metrics.clone();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(greenlight_agent::run::run(settings, kube, shutdown.clone()));
        Self {
            shutdown,
            handle,
            metrics,
        }
    }

    /// Kills the agent at whatever it was doing, as SIGKILL would.
    pub fn kill(self) {
        self.handle.abort();
        self.shutdown.cancel();
    }

    /// Stops the agent as SIGTERM does, and waits until it exited.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let handle = std::mem::replace(&mut self.handle, tokio::spawn(async {}));
        tokio::time::timeout(Duration::from_secs(30), handle).await??;
        Ok(())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.handle.abort();
        self.shutdown.cancel();
    }
}

/// The namespace test agents keep their inventory and Lease in.
pub const AGENT_NAMESPACE: &str = "default";

/// Polls `check` until it returns `Some`, failing after 30 s with `what`.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    eventually_within(what, Duration::from_secs(30), check).await
}

/// Polls `check` until it returns `Some`, failing after `within` with `what`.
pub async fn eventually_within<T, F, Fut>(
    what: &str,
    within: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Headless Chromium (Debian's `chromium`), to look at a page as a person would.
pub struct Chromium {
    binary: std::path::PathBuf,
    /// A profile of its own, so that runs never share state or a profile lock.
    profile: tempfile::TempDir,
}

impl Chromium {
    /// How long one page may take to load and render.
    const TIMEOUT: Duration = Duration::from_secs(60);

    /// Chromium, if installed. In CI (`CI` set) its absence is an error, since scripts/test
    /// installs it; elsewhere `None`, after printing that `test` is skipped and why.
    pub fn find(test: &str) -> anyhow::Result<Option<Self>> {
        let on_path = std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("chromium"))
                .find(|candidate| candidate.is_file())
        });
        let Some(binary) = on_path else {
            let why = "chromium is not installed (scripts/test installs it with apt)";
            if std::env::var_os("CI").is_some() {
                bail!("{test}: {why}");
            }
            eprintln!("skipping {test}: {why}");
            return Ok(None);
        };
        Ok(Some(Self {
            binary,
            profile: tempfile::tempdir()?,
        }))
    }

    /// Runs Chromium headless on `url` with `args` and returns its stdout.
    async fn run(&self, args: &[&str], url: &str) -> anyhow::Result<String> {
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1200,900",
            ])
            .arg(format!("--user-data-dir={}", self.profile.path().display()))
            .args(args)
            .arg(url)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(Self::TIMEOUT, command.output())
            .await
            .with_context(|| format!("chromium did not finish within {:?}", Self::TIMEOUT))?
            .context("cannot run chromium")?;
        if !output.status.success() {
            bail!(
                "chromium {args:?} {url} exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The DOM of `url` once loaded, serialized as HTML.
    pub async fn dump_dom(&self, url: &str) -> anyhow::Result<String> {
        self.run(&["--dump-dom"], url).await
    }

    /// Saves a PNG screenshot of `url`, 1200×900, at `path`.
    pub async fn screenshot(&self, url: &str, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        self.run(&[&format!("--screenshot={}", path.display())], url)
            .await?;
        let png = std::fs::read(path)
            .with_context(|| format!("chromium wrote no screenshot at {}", path.display()))?;
        if !png.starts_with(b"\x89PNG\r\n\x1a\n") {
            bail!("{} is not a PNG", path.display());
        }
        Ok(())
    }
}

/// The workspace's `target/` directory (or `CARGO_TARGET_DIR`), where CI keeps artifacts.
pub fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}
