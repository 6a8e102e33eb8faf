//! The agent, as its own process, applying to a real kube-apiserver (the test suite's control
//! plane), each scenario next to what kubectl does for the same in the same run: a first
//! apply, an unchanged re-apply, drift, Deployments rolled out by the real controllers, and
//! the agent's memory while it watches what it applied. Requests are counted from the API
//! server's audit log, the agent's by its user and kubectl's by its user agent.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use greenlight::v1::{GetAgentHistoryRequest, Phase, TriggerSyncRequest};
use greenlight_e2e::control_plane::{AuditedRequest, ControlPlane, NODE};
use greenlight_e2e::{GitRepo, Redis, TestServer, agent_token, git_agent_yaml, git_config_yaml};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ListParams;

use crate::common::{
    Admin, SETTLE, load_average, push_and_settle, require_tool, send_green, wait_connected,
    wait_healthy,
};
use crate::stats::{breakdown, ms};

const AGENT: &str = "prod";

/// Options of `apply`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// ConfigMaps in the revision.
    #[arg(long, default_value_t = 1000)]
    objects: usize,
    /// Files they are spread over (YAML streams of `---`-separated documents).
    #[arg(long, default_value_t = 10)]
    files: usize,
    /// Objects changed behind the agent's back in the drift scenario.
    #[arg(long, default_value_t = 10)]
    drifted: usize,
    /// Deployments in the rollout scenario (0 skips it).
    #[arg(long, default_value_t = 100)]
    deployments: usize,
}

fn configmap(index: usize) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{index:05}\n  labels:\n    app: bench\ndata:\n  index: \"{index}\"\n  value: \"some configuration value of object {index}\"\n"
    )
}

fn deployment(index: usize) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web-{index:03}\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: web-{index:03}}}\n  template:\n    metadata:\n      labels: {{app: web-{index:03}}}\n    spec:\n      containers:\n        - {{name: web, image: nginx}}\n"
    )
}

/// `objects` spread over `files` files under `dir/`.
fn spread(dir: &str, objects: &[String], files: usize) -> Vec<(String, String)> {
    let per_file = objects.len().div_ceil(files.max(1)).max(1);
    objects
        .chunks(per_file)
        .enumerate()
        .map(|(n, chunk)| (format!("{dir}/part-{n:03}.yaml"), chunk.join("---\n")))
        .collect()
}

/// `verb resource` of each request, counted.
pub(crate) fn count_requests(
    requests: &[AuditedRequest],
) -> (usize, usize, BTreeMap<String, usize>) {
    let mut by_target: BTreeMap<String, usize> = BTreeMap::new();
    let mut writes = 0;
    for request in requests {
        writes += usize::from(request.is_write());
        let dry = if request.uri.contains("dryRun=") {
            " (dry run)"
        } else {
            ""
        };
        let resource = if request.resource.is_empty() {
            "discovery"
        } else {
            &request.resource
        };
        *by_target
            .entry(format!("{} {resource}{dry}", request.verb))
            .or_default() += 1;
    }
    (requests.len(), writes, by_target)
}

/// The agent's requests, without its Lease renewals (which go on regardless).
pub(crate) fn agent_requests(
    plane: &ControlPlane,
    mark: u64,
    namespaces: &[&str],
) -> anyhow::Result<Vec<AuditedRequest>> {
    Ok(plane
        .agent_requests(mark, namespaces)?
        .into_iter()
        .filter(|r| r.resource != "leases")
        .collect())
}

fn print_requests(what: &str, requests: &[AuditedRequest]) {
    let (total, writes, targets) = count_requests(requests);
    println!(
        "  {what}: {total} requests to the API server, {writes} writes: {}",
        breakdown(&targets)
    );
}

/// The reports of `sha` at `generation`, oldest first, as (phase, ms after `since_ms`).
async fn phases(
    admin: &mut Admin,
    sha: &str,
    generation: u64,
    since_ms: i64,
) -> anyhow::Result<Vec<(Phase, i64)>> {
    let history = admin
        .get_agent_history(GetAgentHistoryRequest { name: AGENT.into() })
        .await
        .context("GetAgentHistory failed")?
        .into_inner();
    let mut reports: Vec<_> = history
        .reports
        .into_iter()
        .filter(|r| r.revision == sha && r.generation == generation)
        .collect();
    reports.reverse();
    let mut marks: Vec<(Phase, i64)> = Vec::new();
    for report in &reports {
        // The first Applying, then each outcome.
        if report.phase() == Phase::Applying && !marks.is_empty() {
            continue;
        }
        marks.push((report.phase(), report.received_at_unix_ms - since_ms));
    }
    Ok(marks)
}

fn describe(marks: &[(Phase, i64)]) -> String {
    marks
        .iter()
        .map(|(phase, at)| format!("{} +{at} ms", format!("{phase:?}").to_lowercase()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The resident set of process `pid`, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("cannot read the agent's /proc status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc status")
}

/// `greenlight-agent`, built next to this binary (`cargo build --release -p greenlight-agent`).
pub(crate) fn agent_binary() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe().context("cannot locate this binary")?;
    let path = exe
        .parent()
        .context("this binary has no directory")?
        .join("greenlight-agent");
    if !path.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release -p greenlight-agent`",
            path.display()
        );
    }
    Ok(path)
}

pub(crate) struct AgentChild(pub(crate) Child);

impl Drop for AgentChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn start_agent(
    plane: &ControlPlane,
    server: &TestServer,
    home: &str,
    dir: &Path,
) -> anyhow::Result<AgentChild> {
    let token_file = dir.join("agent-token");
    std::fs::write(&token_file, agent_token(AGENT))?;
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let child = Command::new(agent_binary()?)
        .args([
            "--server",
            &server.grpc_url(),
            "--namespace",
            home,
            "--identity",
            "bench",
        ])
        .arg("--token-file")
        .arg(&token_file)
        .env("KUBECONFIG", plane.agent_kubeconfig())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start greenlight-agent")?;
    Ok(AgentChild(child))
}

fn commit_files(
    repo: &GitRepo,
    files: &[(String, String)],
    removed: &[&str],
) -> anyhow::Result<String> {
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_bytes()))
        .collect();
    repo.commit(&refs, removed)
        .context("cannot commit the files")
}

/// The label of every benchmark ConfigMap.
const SELECTOR: &str = "app=bench";
/// What the drift scenario writes behind the agent's (and kubectl's) back.
const EDITED: &str = "edited by hand";

/// One request in the API server's audit log, whoever sent it.
struct Logged {
    request: AuditedRequest,
    user_agent: String,
    subresource: String,
}

/// The API server's audit log, which the control plane keeps beside its admin kubeconfig.
fn audit_log(plane: &ControlPlane) -> anyhow::Result<PathBuf> {
    let path = plane
        .kubeconfig()
        .parent()
        .context("the control plane's kubeconfig has no directory")?
        .join("audit.log");
    if !path.exists() {
        bail!("no audit log at {}", path.display());
    }
    Ok(path)
}

/// Every request the API server completed since `mark` (`ControlPlane::audit_mark`), oldest
/// first.
fn logged_since(plane: &ControlPlane, mark: u64) -> anyhow::Result<Vec<Logged>> {
    use serde_json::Value;
    let mut file = std::fs::File::open(audit_log(plane)?)?;
    file.seek(SeekFrom::Start(mark))?;
    let mut logged = Vec::new();
    for line in BufReader::new(file).lines() {
        // A line being written as this reads it is not JSON yet, and not counted.
        let Ok(event) = serde_json::from_str::<Value>(&line?) else {
            continue;
        };
        if event["stage"] != "ResponseComplete" {
            continue;
        }
        let text = |pointer: &str| event.pointer(pointer).and_then(Value::as_str);
        let owned = |pointer: &str| text(pointer).unwrap_or_default().to_owned();
        logged.push(Logged {
            request: AuditedRequest {
                verb: owned("/verb"),
                uri: owned("/requestURI"),
                resource: owned("/objectRef/resource"),
                name: owned("/objectRef/name"),
                namespace: text("/objectRef/namespace").map(str::to_owned),
                code: event
                    .pointer("/responseStatus/code")
                    .and_then(Value::as_u64)
                    .and_then(|c| u16::try_from(c).ok()),
                completed: text("/stageTimestamp").and_then(|t| t.parse().ok()),
            },
            user_agent: owned("/userAgent"),
            subresource: owned("/objectRef/subresource"),
        });
    }
    Ok(logged)
}

/// kubectl's requests since `mark` to `namespace` or to none (discovery).
fn kubectl_requests(
    plane: &ControlPlane,
    mark: u64,
    namespace: &str,
) -> anyhow::Result<Vec<AuditedRequest>> {
    Ok(logged_since(plane, mark)?
        .into_iter()
        .filter(|l| l.user_agent.starts_with("kubectl/"))
        .filter(|l| {
            l.request
                .namespace
                .as_deref()
                .is_none_or(|n| n == namespace)
        })
        .map(|l| l.request)
        .collect())
}

/// A rollout as the API server saw it, in ms since the epoch by its clock.
struct Timeline {
    /// The applier's first and last write of a Deployment (server-side apply PATCHes).
    first_write: i64,
    last_write: i64,
    /// The controllers' last write of a Deployment's status: the end of the rollout.
    last_status: i64,
}

/// The rollout of the Deployments in `namespace` since `mark`.
fn timeline(plane: &ControlPlane, mark: u64, namespace: &str) -> anyhow::Result<Timeline> {
    let logged = logged_since(plane, mark)?;
    let at = |status: bool| {
        logged
            .iter()
            .filter(move |l| {
                l.request.resource == "deployments"
                    && l.request.namespace.as_deref() == Some(namespace)
                    && l.request.is_write()
                    && (l.subresource == "status") == status
                    // The appliers apply; the deployment controller updates annotations.
                    && (status || l.request.verb == "patch")
            })
            .filter_map(|l| l.request.completed)
            .map(|t| t.as_millisecond())
    };
    let context = || format!("no Deployment written in {namespace}");
    Ok(Timeline {
        first_write: at(false).min().with_context(context)?,
        last_write: at(false).max().with_context(context)?,
        last_status: at(true).max().with_context(context)?,
    })
}

/// How long kube-controller-manager must have written nothing before a rollout is timed.
const CONTROLLERS_QUIET: Duration = Duration::from_secs(3);

/// Waits until kube-controller-manager has written nothing for [`CONTROLLERS_QUIET`] (at most
/// a minute). Its controllers share client-side rate limits (20 requests a second, bursts of
/// 30, per controller) with the events they record, which trail a rollout by seconds: a
/// rollout started meanwhile would be slowed by the one before it.
async fn controllers_quiet(plane: &ControlPlane, mark: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = logged_since(plane, mark)?
            .iter()
            .filter(|l| {
                l.user_agent.starts_with("kube-controller-manager/") && l.request.is_write()
            })
            .filter_map(|l| l.request.completed)
            .map(|t| t.as_millisecond())
            .max();
        let quiet_for = last.map_or(i64::MAX, |last| greenlight_server::clock::now_ms() - last);
        if quiet_for >= ms_i64(CONTROLLERS_QUIET) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("kube-controller-manager still writing a minute after the rollout");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// kubectl acting as the tests' admin in one namespace, with a discovery cache of the run's
/// own (not the user's ~/.kube).
struct Kubectl<'a> {
    plane: &'a ControlPlane,
    namespace: String,
    cache: PathBuf,
}

/// One timed kubectl command and the requests it made.
struct Timed {
    took: Duration,
    started_unix_ms: i64,
    requests: Vec<AuditedRequest>,
}

impl Kubectl<'_> {
    fn run(&self, args: &[&str]) -> anyhow::Result<Timed> {
        let cache = format!("--cache-dir={}", self.cache.display());
        let mut all = vec![cache.as_str(), "-n", &self.namespace];
        all.extend(args);
        let mark = self.plane.audit_mark();
        let started_unix_ms = greenlight_server::clock::now_ms();
        let started = Instant::now();
        self.plane.kubectl_ok(&all)?;
        let took = started.elapsed();
        Ok(Timed {
            took,
            started_unix_ms,
            requests: kubectl_requests(self.plane, mark, &self.namespace)?,
        })
    }

    /// `kubectl apply --server-side` of every file under `dir`, forcing conflicts as the
    /// agent does (`force_conflicts` is on by default).
    fn apply(&self, dir: &Path) -> anyhow::Result<Timed> {
        self.run(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=bench-kubectl",
            "-R",
            "-f",
            &dir.to_string_lossy(),
        ])
    }

    /// `kubectl rollout status` of every Deployment under `dir`, one after the other.
    fn rollout_status(&self, dir: &Path) -> anyhow::Result<Timed> {
        self.run(&[
            "rollout",
            "status",
            "--timeout=600s",
            "-R",
            "-f",
            &dir.to_string_lossy(),
        ])
    }

    /// Changes `data.value` of ConfigMap `name`, as someone would by hand.
    fn edit(&self, name: &str) -> anyhow::Result<()> {
        let patch = format!(r#"{{"data":{{"value":"{EDITED}"}}}}"#);
        self.run(&["patch", "configmap", name, "--type=merge", "-p", &patch])?;
        Ok(())
    }
}

/// The resourceVersion of each benchmark ConfigMap in `namespace`, by name.
async fn versions(
    kube: &kube::Client,
    namespace: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(kube.clone(), namespace);
    let list = api
        .list_metadata(&ListParams::default().labels(SELECTOR))
        .await
        .with_context(|| format!("cannot list the ConfigMaps of {namespace}"))?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|o| Some((o.metadata.name?, o.metadata.resource_version?)))
        .collect())
}

/// How many objects of `before` the API server wrote since (or are gone): an apply that
/// changes nothing leaves an object's resourceVersion as it was.
fn changed(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> usize {
    before
        .iter()
        .filter(|(name, version)| after.get(*name) != Some(*version))
        .count()
}

/// Waits until none of ConfigMaps `names` in `namespace` holds the hand edit.
async fn wait_restored(
    kube: &kube::Client,
    namespace: &str,
    names: &[String],
    within: Duration,
) -> anyhow::Result<()> {
    let configmaps: kube::Api<ConfigMap> = kube::Api::namespaced(kube.clone(), namespace);
    let deadline = Instant::now() + within;
    loop {
        let mut restored = 0;
        for name in names {
            let cm = configmaps.get(name).await?;
            let value = cm.data.as_ref().and_then(|d| d.get("value"));
            restored += usize::from(value.is_some_and(|v| v != EDITED));
        }
        if restored == names.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{restored} of {} drifted objects in {namespace} restored within {within:?}",
                names.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `files` under `dir`.
fn write_files(dir: &Path, files: &[(String, String)]) -> anyhow::Result<()> {
    for (path, text) in files {
        let file = dir.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(file, text)?;
    }
    Ok(())
}

/// How long the fake node's Lease holds, and how often it is renewed: a kubelet's defaults.
const NODE_LEASE_SECONDS: i32 = 40;
const NODE_LEASE_RENEWAL: Duration = Duration::from_secs(10);

/// Renews the fake node's Lease for as long as it lives, as a kubelet would. kwok runs here
/// without `--node-lease-duration-seconds`, and its stages post the node's status only every
/// 10 to 20 minutes: without a renewed Lease the node lifecycle controller takes the node for
/// NotReady about a minute after it appeared and marks its pods unready, which kwok never
/// undoes: no Deployment rolled out after that becomes available.
struct NodeLease(tokio::task::JoinHandle<()>);

impl NodeLease {
    async fn keep(kube: &kube::Client) -> anyhow::Result<Self> {
        use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
        use kube::api::{Patch, PatchParams};
        let leases: kube::Api<Lease> = kube::Api::namespaced(kube.clone(), "kube-node-lease");
        let renew = move || {
            let leases = leases.clone();
            async move {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(NODE.to_owned()),
                        namespace: Some("kube-node-lease".to_owned()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(NODE.to_owned()),
                        lease_duration_seconds: Some(NODE_LEASE_SECONDS),
                        renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
                        ..LeaseSpec::default()
                    }),
                };
                let params = PatchParams::apply("greenlight-bench").force();
                leases.patch(NODE, &params, &Patch::Apply(&lease)).await
            }
        };
        renew()
            .await
            .context("cannot write the fake node's Lease")?;
        Ok(Self(tokio::spawn(async move {
            loop {
                tokio::time::sleep(NODE_LEASE_RENEWAL).await;
                if let Err(error) = renew().await {
                    eprintln!("cannot renew the fake node's Lease: {error}");
                }
            }
        })))
    }
}

impl Drop for NodeLease {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A rollout from its start (the webhook, kubectl starting) until the applier knew it was
/// done (the agent's Healthy report received, `kubectl rollout status` exited), in ms.
struct Rollout {
    /// Until the first Deployment was written.
    lead_in: i64,
    /// From the first Deployment written to the controllers' last status write.
    rollout: i64,
    /// The applier's writes, first to last: part of `rollout`, overlapping the controllers.
    writes: i64,
    /// From the last status write until the applier knew.
    noticing: i64,
}

impl Rollout {
    /// `start` and `end` in ms since the epoch.
    fn of(start: i64, timeline: &Timeline, end: i64) -> Self {
        Self {
            lead_in: timeline.first_write - start,
            rollout: timeline.last_status - timeline.first_write,
            writes: timeline.last_write - timeline.first_write,
            noticing: end - timeline.last_status,
        }
    }

    fn total(&self) -> i64 {
        self.lead_in + self.rollout + self.noticing
    }

    fn describe(&self, start: &str, noticing: &str) -> String {
        format!(
            "{} ms = {start} to its first Deployment write {} ms + from it to the controllers' last Deployment status write {} ms (its own writes took {} ms of it) + {noticing} {} ms",
            self.total(),
            self.lead_in,
            self.rollout,
            self.writes,
            self.noticing
        )
    }
}

/// The Deployments scenario, by the agent and by kubectl.
struct Rollouts {
    agent: Rollout,
    reports: Vec<(Phase, i64)>,
    agent_requests: Vec<AuditedRequest>,
    kubectl: Rollout,
    kubectl_apply: Timed,
    kubectl_status: Timed,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.objects == 0 || args.files == 0 {
        bail!("--objects and --files must be at least 1");
    }
    if args.drifted > args.objects {
        bail!("--drifted cannot exceed --objects");
    }
    let redis_version = require_tool("redis-server", "for the apply scenario")?;
    let git_version = require_tool("git", "for the apply scenario")?;
    greenlight_e2e::install_crypto();
    let plane = ControlPlane::shared().await?.with_context(|| {
        format!(
            "no control plane: set {} to the directory scripts/k8s-tools prints",
            greenlight_e2e::control_plane::BIN_DIR_ENV
        )
    })?;
    let kubectl_version = plane.kubectl_ok(&["version", "-o", "json"])?;
    let versions_json: serde_json::Value = serde_json::from_str(&kubectl_version)?;
    let version = |which: &str| {
        versions_json[which]["gitVersion"]
            .as_str()
            .unwrap_or("?")
            .to_owned()
    };
    println!(
        "redis: {redis_version}\ngit: {git_version}\nkube-apiserver: {} (with etcd, controller-manager, scheduler, kwok; one fake node); kubectl {}",
        version("serverVersion"),
        version("clientVersion")
    );
    let kube = plane.client().await?;
    let node_lease = NodeLease::keep(&kube).await?;
    let apps = plane.namespace(&kube, "bench-apps").await?;
    let home = plane.namespace(&kube, "bench-agent").await?;
    let ceiling = plane.namespace(&kube, "bench-kubectl").await?;

    let objects: Vec<String> = (0..args.objects).map(configmap).collect();
    let files = spread("config", &objects, args.files);
    let workloads: Vec<String> = (0..args.deployments).map(deployment).collect();
    let workload_files = spread("workloads", &workloads, args.files);
    let repo = GitRepo::new().context("cannot create the git repository")?;
    let commit = commit_files(&repo, &files, &[])?;
    let step = (args.objects / args.drifted.max(1)).max(1);
    let drifted: Vec<String> = (0..args.drifted)
        .map(|i| format!("cm-{:05}", i * step))
        .collect();

    // kubectl applies the same files, server-side, to the same apiserver: the first apply and
    // the unchanged re-apply now, its drift after the agent's, its Deployments before the
    // agent's.
    let work = tempfile::tempdir()?;
    let config_dir = work.path().join("kubectl-config");
    let workloads_dir = work.path().join("kubectl-workloads");
    write_files(&config_dir, &files)?;
    write_files(&workloads_dir, &workload_files)?;
    let kubectl = Kubectl {
        plane,
        namespace: ceiling.clone(),
        cache: work.path().join("kube-cache"),
    };
    let by_hand = Kubectl {
        plane,
        namespace: apps.clone(),
        cache: work.path().join("kube-cache"),
    };
    let kubectl_first = kubectl.apply(&config_dir)?;
    let before = versions(&kube, &ceiling).await?;
    let kubectl_again = kubectl.apply(&config_dir)?;
    let kubectl_again_changed = changed(&before, &versions(&kube, &ceiling).await?);

    let redis = Redis::start().await.context("cannot start redis-server")?;
    let cache = tempfile::tempdir().context("cannot create the mirror cache directory")?;
    let agent_yaml = git_agent_yaml(AGENT, &repo.url(), &[]).replace(
        "default_namespace: apps",
        &format!("default_namespace: {apps}"),
    ) + "    prune_limit: 10000\n";
    let server = TestServer::start(&git_config_yaml(
        &redis.url(),
        cache.path(),
        "",
        &[agent_yaml],
    ))
    .await
    .context("cannot start the server")?;
    let agent = start_agent(plane, &server, &home, work.path())?;
    let mut admin = server
        .admin()
        .await
        .context("cannot connect the admin client")?;
    wait_connected(&mut admin, AGENT, Duration::from_secs(30)).await?;
    let waited = push_and_settle(&server, cache.path(), &commit).await?;

    // First apply: everything is created.
    let mark = plane.audit_mark();
    let green = send_green(&server, &commit, 1).await?;
    let healthy = wait_healthy(&mut admin, AGENT, &commit, 0, Duration::from_secs(300)).await?;
    let first_ms = healthy.received_at_unix_ms - green.at_unix_ms;
    let first_phases = phases(&mut admin, &commit, healthy.generation, green.at_unix_ms).await?;
    let first_requests = agent_requests(plane, mark, &[&apps, &home])?;
    // Metadata watches of what it applied are open now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_watching = rss_kib(agent.0.id())?;

    // Re-apply of the same revision under a new generation: nothing changes.
    let before = versions(&kube, &apps).await?;
    let mark = plane.audit_mark();
    let trigger_ms = greenlight_server::clock::now_ms();
    let status = admin
        .trigger_sync(TriggerSyncRequest {
            name: AGENT.into(),
            sha: None,
            force_prune: false,
        })
        .await
        .context("TriggerSync failed")?
        .into_inner();
    let generation = status.desired.map_or(0, |d| d.generation);
    let again = wait_healthy(
        &mut admin,
        AGENT,
        &commit,
        generation,
        Duration::from_secs(300),
    )
    .await?;
    let again_ms = again.received_at_unix_ms - trigger_ms;
    let again_requests = agent_requests(plane, mark, &[&apps, &home])?;
    let again_changed = changed(&before, &versions(&kube, &apps).await?);

    // Drift: someone edits a field the agent owns on some objects.
    let mark = plane.audit_mark();
    let drift_started = Instant::now();
    for name in &drifted {
        by_hand.edit(name)?;
    }
    let edited = drift_started.elapsed();
    wait_restored(&kube, &apps, &drifted, Duration::from_secs(120)).await?;
    let drift_time = drift_started.elapsed();
    // Let any straggling writes land before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let drift_requests = agent_requests(plane, mark, &[&apps, &home])?;

    // The same edits to kubectl's copies, then kubectl applies the files again.
    for name in &drifted {
        kubectl.edit(name)?;
    }
    let before = versions(&kube, &ceiling).await?;
    let kubectl_drift = kubectl.apply(&config_dir)?;
    let kubectl_drift_changed = changed(&before, &versions(&kube, &ceiling).await?);
    wait_restored(&kube, &ceiling, &drifted, Duration::from_secs(5)).await?;

    // Deployments: kubectl's apply and `rollout status`, then, once the controllers are
    // quiet again, the agent's revision with them; each split by the API server's timeline.
    let mut rollouts = None;
    if args.deployments > 0 {
        let mark = plane.audit_mark();
        let kubectl_apply = kubectl.apply(&workloads_dir)?;
        let kubectl_status = kubectl.rollout_status(&workloads_dir)?;
        let by_kubectl = Rollout::of(
            kubectl_apply.started_unix_ms,
            &timeline(plane, mark, &ceiling)?,
            kubectl_status.started_unix_ms + ms_i64(kubectl_status.took),
        );

        let mut all = files.clone();
        all.extend(workload_files.iter().cloned());
        let with_deployments = commit_files(&repo, &all, &[])?;
        push_and_settle(&server, cache.path(), &with_deployments).await?;
        controllers_quiet(plane, mark).await?;
        let mark = plane.audit_mark();
        let green = send_green(&server, &with_deployments, 2).await?;
        let healthy = wait_healthy(
            &mut admin,
            AGENT,
            &with_deployments,
            0,
            Duration::from_secs(600),
        )
        .await?;
        let reports = phases(
            &mut admin,
            &with_deployments,
            healthy.generation,
            green.at_unix_ms,
        )
        .await?;
        let by_agent = Rollout::of(
            green.at_unix_ms,
            &timeline(plane, mark, &apps)?,
            healthy.received_at_unix_ms,
        );
        rollouts = Some(Rollouts {
            agent: by_agent,
            reports,
            agent_requests: agent_requests(plane, mark, &[&apps, &home])?,
            kubectl: by_kubectl,
            kubectl_apply,
            kubectl_status,
        });
    }
    let rss_end = rss_kib(agent.0.id())?;

    drop(agent);
    server.stop().await.context("cannot stop the server")?;
    drop(redis);
    drop(node_lease);

    println!(
        "scenario: apply, {} ConfigMaps in {} files, greenlight-agent (its own process) against kube-apiserver, store redis; kubectl in another namespace of the same apiserver",
        args.objects,
        files.len()
    );
    println!(
        "waited {} ms after the push webhook for its fetch (incl. {} ms settling); not timed",
        ms(waited),
        ms(SETTLE)
    );
    let applied_at = first_phases
        .iter()
        .find(|(p, _)| *p == Phase::Applied)
        .map_or(0, |(_, at)| *at);
    println!("first apply (creates every object):");
    println!(
        "  agent: pipeline webhook -> Healthy {first_ms} ms (server receive timestamps); kubectl apply --server-side of the same files {} ms; ratio {:.2}",
        ms(kubectl_first.took),
        first_ms as f64 / kubectl_first.took.as_millis().max(1) as f64
    );
    println!(
        "  reports: {} (applied at +{applied_at} ms)",
        describe(&first_phases)
    );
    print_requests("agent", &first_requests);
    print_requests("kubectl", &kubectl_first.requests);
    println!("re-apply without change (agent: TriggerSync, generation {generation}):");
    println!(
        "  agent: TriggerSync -> Healthy {again_ms} ms, {again_changed} objects changed; kubectl apply --server-side again {} ms, {kubectl_again_changed} objects changed",
        ms(kubectl_again.took)
    );
    print_requests("agent", &again_requests);
    print_requests("kubectl", &kubectl_again.requests);
    println!(
        "drift: {} objects edited with kubectl patch ({} ms for the edits):",
        drifted.len(),
        ms(edited)
    );
    println!(
        "  agent: first edit -> all restored {} ms; kubectl apply --server-side of all the files {} ms, {kubectl_drift_changed} objects changed",
        ms(drift_time),
        ms(kubectl_drift.took)
    );
    print_requests("agent", &drift_requests);
    print_requests("kubectl", &kubectl_drift.requests);
    println!(
        "agent RSS: {rss_watching} KiB holding {} objects under watch; {rss_end} KiB at the end",
        args.objects
    );
    if let Some(rollouts) = rollouts {
        println!(
            "rollout: {} Deployments (1 replica each; scheduler, controller-manager, kwok), kubectl's first:",
            args.deployments
        );
        println!(
            "  agent: webhook -> Healthy {}",
            rollouts
                .agent
                .describe("webhook", "until the Healthy report")
        );
        println!(
            "  kubectl: apply --server-side, then rollout status: {}",
            rollouts
                .kubectl
                .describe("start", "until rollout status exited")
        );
        println!("  reports: {}", describe(&rollouts.reports));
        print_requests("agent", &rollouts.agent_requests);
        print_requests("kubectl apply", &rollouts.kubectl_apply.requests);
        print_requests("kubectl rollout status", &rollouts.kubectl_status.requests);
    }
    println!("load average at the end: {}", load_average());
    Ok(())
}

/// Whole milliseconds of `duration`.
fn ms_i64(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
