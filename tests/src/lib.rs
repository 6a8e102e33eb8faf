//! Test harness: a real `redis-server` per test, servers on loopback ports, GitLab payloads.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use greenlight::digest::sha256_hex;
use greenlight::v1::admin_service_client::AdminServiceClient;
use greenlight_agent::assemble::ReadyRevision;
use greenlight_agent::client::{Bearer, Client, RevisionStream};
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
        redis.spawn().await?;
        Ok(redis)
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
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
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

fn free_port() -> anyhow::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
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
}

impl TestServer {
    /// Starts a server from YAML config text.
    pub async fn start(yaml: &str) -> anyhow::Result<Self> {
        let config = Config::from_yaml(yaml, &Overrides::default())?;
        Self::start_with(config).await
    }

    /// Starts a server from a parsed config.
    pub async fn start_with(config: Config) -> anyhow::Result<Self> {
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
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        for _ in 0..200 {
            if let Ok(response) = self
                .http_client
                .get(format!("http://{}/healthz", self.http))
                .send()
                .await
                && response.status().is_success()
            {
                return Ok(());
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

    /// An admin client with the admin token.
    pub async fn admin(
        &self,
    ) -> anyhow::Result<AdminServiceClient<InterceptedService<Channel, Bearer>>> {
        let channel = Channel::from_shared(self.grpc_url())?.connect().await?;
        let bearer = Bearer::new(ADMIN_TOKEN)?;
        Ok(AdminServiceClient::with_interceptor(channel, bearer))
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
