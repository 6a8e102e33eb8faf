//! Chaos: two server replicas on one Redis with AOF, three agents on two refs (pipeline,
//! immediate and manual mode), a real git repository and the fake GitLab, while commits and
//! their pipelines arrive out of order with retries and redeliveries, and faults strike at
//! random moments: a replica or an agent SIGKILLed and restarted, Redis SIGKILLed and
//! restarted on its append-only file, the agents' streams cut, GitLab answering 500.
//!
//! Afterwards nothing accepted may be lost, no desired revision may have moved backwards,
//! every agent must run the newest commit its gate allows, and GitLab must hold each commit
//! status once. Everything is observed from outside: webhooks, the admin API, the fake
//! GitLab's records and the cluster's objects.
//!
//! Seeded (`GREENLIGHT_CHAOS_SEED`, random by default, printed on failure); sized by
//! `GREENLIGHT_CHAOS_COMMITS` (default 40) and `GREENLIGHT_CHAOS_FAULTS` (faults of each kind,
//! default 3). The long variant: `GREENLIGHT_CHAOS_COMMITS=200 GREENLIGHT_CHAOS_FAULTS=10`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use greenlight::auth::Bearer;
use greenlight::digest::sha256_hex;
use greenlight::v1::admin_service_client::AdminServiceClient;
use greenlight::v1::{
    GetAgentRequest, GetRefRequest, Phase, PipelineStatus, TriggerSyncRequest, WatchEventsRequest,
    decision, event,
};
use greenlight_e2e::control_plane::TestCluster;
use greenlight_e2e::fake_gitlab::FakeGitLab;
use greenlight_e2e::process::{AgentProcessOs, ServerProcess, binaries};
use greenlight_e2e::proxy::TcpProxy;
use greenlight_e2e::*;
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// ConfigMaps per revision: enough writes that an apply takes a moment to kill it in.
const OBJECTS: usize = 8;
/// A `greenlight/<agent>` status another replica took is posted by a live one after this.
const STATUS_TAKEOVER: Duration = Duration::from_secs(3);
/// Time between two commits, on average.
const COMMIT_EVERY: Duration = Duration::from_millis(500);
/// Deliveries held back and sent in random order: how far out of order they get.
const REORDER_WINDOW: usize = 6;
/// How long the system may take to converge once the faults stopped.
const CONVERGE_WITHIN: Duration = Duration::from_secs(180);

/// The three agents: name, branch, gate mode.
const AGENTS: [(&str, &str, &str); 3] = [
    ("prod", "main", "pipeline"),
    ("staging", "staging", "immediate"),
    ("release", "main", "manual"),
];

/// The size and seed of one run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    seed: u64,
    commits: usize,
    faults_per_kind: u32,
}

impl Plan {
    fn from_env() -> anyhow::Result<Self> {
        let number = |name: &str| -> anyhow::Result<Option<u64>> {
            match std::env::var(name) {
                Ok(value) => {
                    Ok(Some(value.trim().parse().with_context(|| {
                        format!("{name}={value} is not a number")
                    })?))
                }
                Err(_) => Ok(None),
            }
        };
        Ok(Self {
            seed: number("GREENLIGHT_CHAOS_SEED")?.unwrap_or_else(|| fastrand::u64(..)),
            commits: number("GREENLIGHT_CHAOS_COMMITS")?.map_or(40, |n| n as usize),
            faults_per_kind: number("GREENLIGHT_CHAOS_FAULTS")?.map_or(3, |n| n as u32),
        })
    }
}

/// The kinds of fault, each injected `faults_per_kind` times at least.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillServer,
    KillRedis,
    KillAgent,
    CutStreams,
    GitLab500,
}

const FAULTS: [Fault; 5] = [
    Fault::KillServer,
    Fault::KillRedis,
    Fault::KillAgent,
    Fault::CutStreams,
    Fault::GitLab500,
];

/// What a webhook told the server.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Claim {
    Push {
        branch: String,
        sha: String,
    },
    Pipeline {
        branch: String,
        sha: String,
        id: u64,
        status: String,
    },
}

/// One webhook delivery; a redelivery has the same id.
#[derive(Debug, Clone)]
struct Delivery {
    id: String,
    event: &'static str,
    body: Value,
    claim: Claim,
}

/// A delivery the server answered 2xx, with its `outcome`.
#[derive(Debug, Clone)]
struct Accepted {
    delivery: Delivery,
    outcome: String,
}

/// Everything observed during the run.
#[derive(Default)]
struct Record {
    accepted: Vec<Accepted>,
    /// Answers other than 2xx, and connection errors, that a retry followed.
    refused: u64,
    redeliveries: u64,
    /// Per observer ("events@a", "events@b", "polled"), per agent: the desired revisions in
    /// the order seen, without repeats.
    desired: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// Per agent: every (revision, phase) reported, as the event streams showed them.
    reports: BTreeMap<String, BTreeSet<(String, i32)>>,
    /// Per agent: whether its last report seen was `applying`.
    applying: HashMap<String, bool>,
    /// Manual triggers that the server accepted, in order.
    triggers: Vec<String>,
    faults: BTreeMap<Fault, u32>,
    /// Faults of note: agents killed while applying, connections cut.
    killed_mid_apply: u32,
    connections_cut: u64,
}

type Shared = Arc<Mutex<Record>>;

fn lock(record: &Shared) -> MutexGuard<'_, Record> {
    record.lock().unwrap_or_else(|e| e.into_inner())
}

impl Record {
    fn saw_desired(&mut self, observer: &str, agent: &str, sha: &str) {
        let seen = self
            .desired
            .entry(observer.to_owned())
            .or_default()
            .entry(agent.to_owned())
            .or_default();
        if seen.last().map(String::as_str) != Some(sha) {
            seen.push(sha.to_owned());
        }
    }
}

type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// An admin client of `url` that connects when first used and again after failures.
fn admin_lazy(url: &str, timeout: Option<Duration>) -> anyhow::Result<Admin> {
    let mut endpoint =
        Channel::from_shared(url.to_owned())?.connect_timeout(Duration::from_secs(2));
    if let Some(timeout) = timeout {
        endpoint = endpoint.timeout(timeout);
    }
    Ok(AdminServiceClient::with_interceptor(
        endpoint.connect_lazy(),
        Bearer::new(ADMIN_TOKEN)?,
    ))
}

/// The repository: two branches, each commit changing every object's value.
struct Repository {
    git: GitRepo,
    /// Per branch, every commit in order (each the child of the one before).
    commits: BTreeMap<String, Vec<String>>,
    /// The label each commit's objects carry.
    labels: HashMap<String, String>,
}

impl Repository {
    fn new() -> anyhow::Result<Self> {
        let git = GitRepo::new()?;
        Ok(Self {
            git,
            commits: BTreeMap::new(),
            labels: HashMap::new(),
        })
    }

    fn manifest(label: &str) -> String {
        (0..OBJECTS)
            .map(|i| configmap(&format!("cm-{i}"), label))
            .collect::<Vec<_>>()
            .join("---\n")
    }

    /// Commits on `branch` (created from `main`'s first commit); returns the new SHA.
    fn commit(&mut self, branch: &str) -> anyhow::Result<String> {
        let index = self.commits.get(branch).map_or(0, Vec::len);
        if branch != "main" && index == 0 {
            let base = self
                .commits
                .get("main")
                .and_then(|c| c.first())
                .context("main needs a commit before another branch starts")?;
            self.git.git(&["checkout", "-q", "-b", branch, base])?;
        } else if index > 0 {
            self.git.git(&["checkout", "-q", branch])?;
        }
        let label = format!("{branch}-{index}");
        let sha = self
            .git
            .commit(&[("app.yaml", Self::manifest(&label).as_bytes())], &[])?;
        self.commits
            .entry(branch.to_owned())
            .or_default()
            .push(sha.clone());
        self.labels.insert(sha.clone(), label);
        Ok(sha)
    }

    /// Whether `old` is an ancestor of `new` (or the same commit), by git.
    fn is_ancestor(&self, old: &str, new: &str) -> anyhow::Result<bool> {
        let status = std::process::Command::new("git")
            .args(["merge-base", "--is-ancestor", old, new])
            .current_dir(self.dir())
            .status()?;
        match status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => bail!("git merge-base --is-ancestor {old} {new} failed: {status}"),
        }
    }

    fn dir(&self) -> PathBuf {
        PathBuf::from(self.git.url().trim_start_matches("file://"))
    }
}

/// The pipelines of one commit, in id order, with their final status.
fn plan_pipelines(rng: &mut fastrand::Rng, next_id: &mut u64) -> Vec<(u64, &'static str)> {
    let outcome = rng.f32();
    let retried = rng.bool();
    let mut take = || {
        *next_id += 1 + rng.u64(0..3);
        *next_id
    };
    if outcome < 0.3 {
        let failed = take();
        if retried {
            // A retry that passes: the highest id is the verdict.
            vec![(failed, "failed"), (take(), "success")]
        } else {
            vec![(failed, "failed")]
        }
    } else {
        vec![(take(), "success")]
    }
}

/// Everything the run owns.
struct World {
    plan: Plan,
    /// Configs and logs, kept when the run fails.
    dir: PathBuf,
    cluster: TestCluster,
    redis: Redis,
    gitlab: Arc<FakeGitLab>,
    repo: Arc<Mutex<Repository>>,
    servers: Vec<ServerProcess>,
    proxy: Arc<TcpProxy>,
    agents: Vec<AgentProcessOs>,
    /// Each agent's namespace.
    namespaces: BTreeMap<String, String>,
    record: Shared,
}

fn agent_yaml(name: &str, branch: &str, mode: &str, repository: &str, namespace: &str) -> String {
    format!(
        "  - name: {name}\n    token_sha256: \"{}\"\n    project: \"{PROJECT}\"\n    ref: {branch}\n    repository: \"{repository}\"\n    default_namespace: {namespace}\n    gate: {{ mode: {mode} }}\n",
        sha256_hex(agent_token(name).as_bytes())
    )
}

impl World {
    async fn start(plan: Plan) -> anyhow::Result<Option<Self>> {
        let Some(cluster) = TestCluster::new().await? else {
            return Ok(None);
        };
        let binaries = binaries().await?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("chaos-{}-", plan.seed))
            .tempdir()?
            .keep();
        let redis = Redis::start().await?;
        let gitlab = Arc::new(FakeGitLab::start().await?);
        let repo = Repository::new()?;

        let mut namespaces = BTreeMap::new();
        let mut agent_entries = String::new();
        for (name, branch, mode) in AGENTS {
            let namespace = cluster.plane.namespace(&cluster.kube, name).await?;
            agent_entries.push_str(&agent_yaml(name, branch, mode, &repo.git.url(), &namespace));
            namespaces.insert(name.to_owned(), namespace);
        }
        let mut servers = Vec::new();
        for replica in ["a", "b"] {
            let cache = dir.join(format!("git-cache-{replica}"));
            let yaml = format!(
                "redis: {{ url: \"{}\", key_prefix: \"chaos\" }}\n\
                 webhooks: {{ gitlab: {{ secret_token: \"{GITLAB_SECRET}\" }} }}\n\
                 admin: {{ token_sha256: \"{}\" }}\n\
                 git: {{ cache_dir: \"{}\", fetch_timeout: 30s }}\n\
                 {}\
                 agents:\n{agent_entries}",
                redis.url(),
                sha256_hex(ADMIN_TOKEN.as_bytes()),
                cache.display(),
                gitlab.config(&format!(
                    ", status_target_url: \"https://greenlight.example/\", status_takeover: {}s",
                    STATUS_TAKEOVER.as_secs()
                )),
            );
            let config = dir.join(format!("server-{replica}.yaml"));
            std::fs::write(&config, yaml)?;
            let log = dir.join(format!("server-{replica}.log"));
            servers.push(ServerProcess::start(&binaries, &config, replica, log).await?);
        }
        // GitLab's own statuses come back as Pipeline Hooks: the gate must not count them.
        gitlab.set_webhook(&servers[0].webhook_url(), GITLAB_SECRET);

        // Agents reach the replicas through one proxy, as through a Service.
        let proxy = Arc::new(TcpProxy::start(servers.iter().map(|s| s.grpc).collect()).await?);
        let mut agents = Vec::new();
        for (name, _, _) in AGENTS {
            let token = dir.join(format!("token-{name}"));
            std::fs::write(&token, agent_token(name))?;
            agents.push(AgentProcessOs::start(
                &binaries,
                &proxy.url(),
                &token,
                cluster.plane.agent_kubeconfig(),
                &cluster.home,
                &format!("{name}-0"),
                dir.join(format!("agent-{name}.log")),
            )?);
        }
        Ok(Some(Self {
            plan,
            dir,
            cluster,
            redis,
            gitlab,
            repo: Arc::new(Mutex::new(repo)),
            servers,
            proxy,
            agents,
            namespaces,
            record: Shared::default(),
        }))
    }

    fn replica_urls(&self) -> Vec<String> {
        self.servers.iter().map(ServerProcess::grpc_url).collect()
    }

    fn webhook_urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(ServerProcess::webhook_url)
            .collect()
    }
}

/// Follows `WatchEvents` on replica `url` until `stop`, reconnecting after every failure.
fn watch_events(
    url: String,
    observer: String,
    record: Shared,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut admin) = admin_lazy(&url, None) else {
            return;
        };
        while !stop.is_cancelled() {
            let stream = tokio::select! {
                _ = stop.cancelled() => return,
                stream = admin.watch_events(WatchEventsRequest { agent: String::new() }) => stream,
            };
            let Ok(stream) = stream else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut stream = stream.into_inner();
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => return,
                    message = stream.message() => message,
                };
                let Ok(Some(event)) = message else { break };
                let mut record = lock(&record);
                match event.event {
                    Some(event::Event::Decision(d)) if d.outcome() == decision::Outcome::Deploy => {
                        record.saw_desired(&observer, &event.agent, &d.sha);
                    }
                    Some(event::Event::Report(report)) => {
                        let applying = report.phase() == Phase::Applying;
                        record.applying.insert(event.agent.clone(), applying);
                        record
                            .reports
                            .entry(event.agent.clone())
                            .or_default()
                            .insert((report.revision.clone(), report.phase));
                    }
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// Reads every agent's desired revision from replica `url` until `stop`.
fn poll_desired(
    url: String,
    observer: String,
    record: Shared,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(admin) = admin_lazy(&url, Some(Duration::from_secs(5))) else {
            return;
        };
        while !stop.is_cancelled() {
            for (name, _, _) in AGENTS {
                let mut admin = admin.clone();
                if let Ok(status) = admin.get_agent(GetAgentRequest { name: name.into() }).await
                    && let Some(desired) = status.into_inner().desired
                {
                    lock(&record).saw_desired(&observer, name, &desired.sha);
                }
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    })
}

/// Delivers webhooks from `queue` to either replica until it is closed, retrying every
/// answer other than 2xx and every connection error with the same delivery id, and
/// sometimes redelivering one that succeeded.
fn send_webhooks(
    urls: Vec<String>,
    queue: Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Delivery>>>,
    record: Shared,
    seed: u64,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        install_crypto();
        let mut rng = fastrand::Rng::with_seed(seed);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        loop {
            let Some(delivery) = queue.lock().await.recv().await else {
                return Ok(());
            };
            let times = if rng.f32() < 0.15 { 2 } else { 1 };
            for time in 0..times {
                if time > 0 {
                    tokio::time::sleep(Duration::from_millis(rng.u64(0..300))).await;
                    lock(&record).redeliveries += 1;
                }
                let mut backoff = Duration::from_millis(50);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                loop {
                    let url = &urls[rng.usize(..urls.len())];
                    let sent = client
                        .post(url)
                        .header("X-Gitlab-Event", delivery.event)
                        .header("X-Gitlab-Token", GITLAB_SECRET)
                        .header("X-Gitlab-Event-UUID", &delivery.id)
                        .header("Idempotency-Key", &delivery.id)
                        .json(&delivery.body)
                        .send()
                        .await;
                    if let Ok(response) = sent
                        && response.status().is_success()
                    {
                        let answer: Value = response.json().await.unwrap_or(Value::Null);
                        lock(&record).accepted.push(Accepted {
                            delivery: delivery.clone(),
                            outcome: answer["outcome"].as_str().unwrap_or("").to_owned(),
                        });
                        break;
                    }
                    lock(&record).refused += 1;
                    ensure!(
                        tokio::time::Instant::now() < deadline,
                        "delivery {} was refused for 120 s: {:?}",
                        delivery.id,
                        delivery.claim
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    })
}

/// Pushes `plan.commits` commits with their pipelines, queueing their webhooks out of order.
async fn generate(
    plan: Plan,
    repo: Arc<Mutex<Repository>>,
    gitlab: Arc<FakeGitLab>,
    queue: tokio::sync::mpsc::UnboundedSender<Delivery>,
) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(plan.seed ^ 0x6e6e);
    let mut next_pipeline = 1000u64;
    let mut held: Vec<Delivery> = Vec::new();
    let mut tips: HashMap<String, String> = HashMap::new();
    let mut delivery_id = 0u64;
    let mut new_id = || {
        delivery_id += 1;
        format!("chaos-{:016x}-{delivery_id}", plan.seed)
    };
    for n in 0..plan.commits {
        // main first, then both, main more often.
        let branch = if n == 0 || rng.f32() < 0.6 {
            "main"
        } else {
            "staging"
        };
        let sha = lock_repo(&repo).commit(branch)?;
        let before = tips.insert(branch.to_owned(), sha.clone());
        gitlab.set_branch_head(PROJECT, branch, &sha);
        let mut deliveries = vec![Delivery {
            id: new_id(),
            event: "Push Hook",
            body: push_payload(PROJECT, branch, before.as_deref().unwrap_or(ZERO), &sha),
            claim: Claim::Push {
                branch: branch.to_owned(),
                sha: sha.clone(),
            },
        }];
        for (id, status) in plan_pipelines(&mut rng, &mut next_pipeline) {
            // GitLab holds the pipeline in its final state before any hook about it arrives:
            // the server confirms gate-opening claims through the API.
            gitlab.put_pipeline(
                PROJECT,
                json!({
                    "id": id, "sha": sha, "ref": branch, "status": status, "source": "push",
                    "builds": [{ "name": "test", "stage": "test", "status": status }],
                }),
            );
            for update in ["running", status] {
                deliveries.push(Delivery {
                    id: new_id(),
                    event: "Pipeline Hook",
                    body: pipeline_payload(PROJECT, branch, &sha, id, update, "push"),
                    claim: Claim::Pipeline {
                        branch: branch.to_owned(),
                        sha: sha.clone(),
                        id,
                        status: update.to_owned(),
                    },
                });
            }
        }
        held.extend(deliveries);
        while held.len() > REORDER_WINDOW {
            let delivery = held.swap_remove(rng.usize(..held.len()));
            queue.send(delivery)?;
        }
        let pause = COMMIT_EVERY.as_millis() as u64;
        tokio::time::sleep(Duration::from_millis(rng.u64(pause / 2..pause * 3 / 2))).await;
    }
    rng.shuffle(&mut held);
    for delivery in held {
        queue.send(delivery)?;
    }
    Ok(())
}

fn lock_repo(repo: &Arc<Mutex<Repository>>) -> MutexGuard<'_, Repository> {
    repo.lock().unwrap_or_else(|e| e.into_inner())
}

/// Triggers the manual agent now and then on a recent `main` commit whose push the server
/// accepted, always forward; stops at `stop`.
fn trigger_manual(
    urls: Vec<String>,
    repo: Arc<Mutex<Repository>>,
    record: Shared,
    seed: u64,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(seed);
        let admins: Vec<Admin> = urls
            .iter()
            .filter_map(|url| admin_lazy(url, Some(Duration::from_secs(5))).ok())
            .collect();
        let mut last = 0usize;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(rng.u64(1500..4000))) => {}
            }
            let main = lock_repo(&repo)
                .commits
                .get("main")
                .cloned()
                .unwrap_or_default();
            let pushed: BTreeSet<String> = lock(&record)
                .accepted
                .iter()
                .filter_map(|a| match &a.delivery.claim {
                    Claim::Push { sha, .. } => Some(sha.clone()),
                    Claim::Pipeline { .. } => None,
                })
                .collect();
            let Some(index) = (last + 1..main.len())
                .rev()
                .find(|&i| pushed.contains(&main[i]))
            else {
                continue;
            };
            for _ in 0..10 {
                let mut admin = admins[rng.usize(..admins.len())].clone();
                let request = TriggerSyncRequest {
                    name: "release".into(),
                    sha: Some(main[index].clone()),
                    force_prune: false,
                };
                if admin.trigger_sync(request).await.is_ok() {
                    lock(&record).triggers.push(main[index].clone());
                    last = index;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    })
}

/// Injects `plan.faults_per_kind` faults of each kind, in random order, spread over the
/// run; returns the world it borrowed.
async fn inject_faults(mut world: World, stop_after: Duration) -> anyhow::Result<World> {
    let mut rng = fastrand::Rng::with_seed(world.plan.seed ^ 0xfa17);
    let mut faults: Vec<Fault> = FAULTS
        .iter()
        .flat_map(|&f| std::iter::repeat_n(f, world.plan.faults_per_kind as usize))
        .collect();
    rng.shuffle(&mut faults);
    let gap = stop_after.as_millis() as u64 / (faults.len() as u64 + 1);
    let mut journal = std::fs::File::create(world.dir.join("faults.log"))?;
    for fault in faults {
        tokio::time::sleep(Duration::from_millis(rng.u64(gap / 2..gap * 3 / 2 + 1))).await;
        let started = k8s_openapi::jiff::Timestamp::now();
        let mut what = format!("{fault:?}");
        match fault {
            Fault::KillServer => {
                let replica = rng.usize(..world.servers.len());
                what = format!("{what} replica {}", ["a", "b"][replica]);
                world.servers[replica].kill();
                tokio::time::sleep(Duration::from_millis(rng.u64(100..1500))).await;
                world.servers[replica].restart().await?;
            }
            Fault::KillRedis => {
                world.redis.kill();
                tokio::time::sleep(Duration::from_millis(rng.u64(100..1000))).await;
                world.redis.restart().await?;
            }
            Fault::KillAgent => {
                let which = rng.usize(..world.agents.len());
                let name = AGENTS[which].0;
                // Mid-apply when the events show one within a few seconds.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
                let mut mid_apply = false;
                while tokio::time::Instant::now() < deadline {
                    if lock(&world.record)
                        .applying
                        .get(name)
                        .copied()
                        .unwrap_or(false)
                    {
                        mid_apply = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                world.agents[which].kill();
                what = format!("{what} {name} (mid-apply: {mid_apply})");
                if mid_apply {
                    lock(&world.record).killed_mid_apply += 1;
                }
                tokio::time::sleep(Duration::from_millis(rng.u64(100..1000))).await;
                world.agents[which].restart()?;
            }
            Fault::CutStreams => {
                let cut = world.proxy.cut_all();
                what = format!("{what} ({cut} connections)");
                lock(&world.record).connections_cut += cut as u64;
            }
            Fault::GitLab500 => {
                world.gitlab.fail_with(Some(500));
                tokio::time::sleep(Duration::from_millis(rng.u64(300..2500))).await;
                world.gitlab.fail_with(None);
            }
        }
        use std::io::Write as _;
        writeln!(
            journal,
            "{started} .. {}: {what}",
            k8s_openapi::jiff::Timestamp::now()
        )?;
        *lock(&world.record).faults.entry(fault).or_default() += 1;
    }
    Ok(world)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loses_nothing_never_goes_backwards_and_converges() -> anyhow::Result<()> {
    let plan = Plan::from_env()?;
    eprintln!(
        "chaos: seed {} ({} commits, {} faults of each kind); reproduce with GREENLIGHT_CHAOS_SEED={}",
        plan.seed, plan.commits, plan.faults_per_kind, plan.seed
    );
    let Some(world) = World::start(plan).await? else {
        return Ok(());
    };
    let logs = world.dir.clone();
    match run(world).await {
        Ok(summary) => {
            eprintln!("chaos: {summary}");
            let _ = std::fs::remove_dir_all(&logs);
            Ok(())
        }
        Err(error) => Err(error.context(format!(
            "chaos run with seed {} failed (GREENLIGHT_CHAOS_SEED={} GREENLIGHT_CHAOS_COMMITS={} GREENLIGHT_CHAOS_FAULTS={}); configs and logs in {}",
            plan.seed,
            plan.seed,
            plan.commits,
            plan.faults_per_kind,
            logs.display()
        ))),
    }
}

/// Runs the workload and the faults, waits for convergence and checks every promise;
/// returns the run's figures.
async fn run(world: World) -> anyhow::Result<String> {
    let plan = world.plan;
    let started = tokio::time::Instant::now();
    let record = world.record.clone();
    let stop = CancellationToken::new();
    let mut observers = Vec::new();
    for (url, replica) in world.replica_urls().into_iter().zip(["a", "b"]) {
        observers.push(watch_events(
            url.clone(),
            format!("events@{replica}"),
            record.clone(),
            stop.clone(),
        ));
        observers.push(poll_desired(
            url,
            format!("polled@{replica}"),
            record.clone(),
            stop.clone(),
        ));
    }
    let triggers = trigger_manual(
        world.replica_urls(),
        world.repo.clone(),
        record.clone(),
        plan.seed ^ 0x7219,
        stop.clone(),
    );

    let (queue_tx, queue_rx) = tokio::sync::mpsc::unbounded_channel();
    let queue = Arc::new(tokio::sync::Mutex::new(queue_rx));
    let senders: Vec<_> = (0..3u64)
        .map(|i| {
            send_webhooks(
                world.webhook_urls(),
                queue.clone(),
                record.clone(),
                plan.seed ^ (0x5e00 + i),
            )
        })
        .collect();
    let workload = tokio::spawn(generate(
        plan,
        world.repo.clone(),
        world.gitlab.clone(),
        queue_tx,
    ));
    let expected_duration = COMMIT_EVERY * plan.commits as u32;
    let faults = tokio::spawn(inject_faults(world, expected_duration));

    workload.await??;
    for sender in senders {
        sender.await??;
    }
    let mut world = faults.await??;
    let workload_done = started.elapsed();
    // The faults stopped: everything is up again.
    for server in &mut world.servers {
        server.process.check_alive()?;
    }
    for agent in &mut world.agents {
        agent.process.check_alive()?;
    }

    // The manual agent's last word: the newest commit of main, retried until accepted.
    let main = lock_repo(&world.repo)
        .commits
        .get("main")
        .cloned()
        .unwrap_or_default();
    let newest_main = main.last().context("no commit on main")?.clone();
    triggers.abort();
    let mut admin = admin_lazy(&world.replica_urls()[0], Some(Duration::from_secs(5)))?;
    eventually_within("the manual agent's last trigger", CONVERGE_WITHIN, || {
        let mut admin = admin.clone();
        let record = record.clone();
        let sha = newest_main.clone();
        async move {
            let request = TriggerSyncRequest {
                name: "release".into(),
                sha: Some(sha.clone()),
                force_prune: false,
            };
            Ok(admin.trigger_sync(request).await.ok().map(|_| {
                lock(&record).triggers.push(sha);
            }))
        }
    })
    .await?;

    let expected = expected_revisions(&world)?;
    let mut problems = converge(&world, &mut admin, &expected).await?;
    // Statuses deferred while GitLab failed, or left by a dead replica, are posted after the
    // takeover time.
    let deadline = tokio::time::Instant::now() + CONVERGE_WITHIN;
    while !check_statuses(&world, &expected)?.missing.is_empty()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converged = started.elapsed();
    // Then two takeover times for late duplicates, before counting.
    tokio::time::sleep(STATUS_TAKEOVER * 2).await;
    stop.cancel();
    for observer in observers {
        let _ = observer.await;
    }

    problems.extend(check_store(&world, &mut admin).await?);
    problems.extend(check_forward_only(&world, &mut admin).await?);
    let statuses = check_statuses(&world, &expected)?;
    problems.extend(statuses.missing);
    problems.extend(statuses.duplicates);

    let summary = {
        let record = lock(&record);
        let faults: Vec<String> = record
            .faults
            .iter()
            .map(|(fault, n)| format!("{fault:?} {n}"))
            .collect();
        for kind in FAULTS {
            let injected = record.faults.get(&kind).copied().unwrap_or(0);
            if injected < plan.faults_per_kind {
                problems.push(format!("only {injected} faults of kind {kind:?} injected"));
            }
        }
        format!(
            "seed {}: {} commits ({} main, {} staging), {} deliveries accepted ({} redeliveries, {} refused and retried), {} manual triggers; faults: {} ({} agents killed mid-apply, {} connections cut); workload and faults {:.1} s, converged at {:.1} s",
            plan.seed,
            plan.commits,
            main.len(),
            plan.commits - main.len(),
            record.accepted.len(),
            record.redeliveries,
            record.refused,
            record.triggers.len(),
            faults.join(", "),
            record.killed_mid_apply,
            record.connections_cut,
            workload_done.as_secs_f64(),
            converged.as_secs_f64(),
        )
    };
    if !problems.is_empty() {
        let _ = dump_state(&world, &mut admin).await;
    }
    ensure!(
        problems.is_empty(),
        "{} problems:\n{}\n(run: {summary})",
        problems.len(),
        problems.join("\n")
    );
    Ok(summary)
}

/// The commit each agent must end on: prod the newest green commit of main, staging the head
/// of staging, release the last commit triggered.
fn expected_revisions(world: &World) -> anyhow::Result<BTreeMap<String, String>> {
    let repo = lock_repo(&world.repo);
    let record = lock(&world.record);
    let verdicts = verdicts(&record);
    let main = repo.commits.get("main").cloned().unwrap_or_default();
    let staging = repo.commits.get("staging").cloned().unwrap_or_default();
    let mut expected = BTreeMap::new();
    let green = main
        .iter()
        .rev()
        .find(|sha| verdicts.get(*sha).map(String::as_str) == Some("success"))
        .context("no green commit on main")?;
    expected.insert("prod".to_owned(), green.clone());
    expected.insert(
        "staging".to_owned(),
        staging.last().context("no commit on staging")?.clone(),
    );
    expected.insert(
        "release".to_owned(),
        record.triggers.last().context("no trigger")?.clone(),
    );
    Ok(expected)
}

/// Each commit's verdict: the final status of its highest pipeline.
fn verdicts(record: &Record) -> HashMap<String, String> {
    let mut highest: HashMap<String, (u64, String)> = HashMap::new();
    for accepted in &record.accepted {
        if let Claim::Pipeline {
            sha, id, status, ..
        } = &accepted.delivery.claim
            && status != "running"
        {
            let entry = highest.entry(sha.clone()).or_insert((*id, status.clone()));
            if *id >= entry.0 {
                *entry = (*id, status.clone());
            }
        }
    }
    highest
        .into_iter()
        .map(|(sha, (_, status))| (sha, status))
        .collect()
}

/// Waits until every agent runs its expected commit: desired, applied and healthy per the
/// admin API, its objects carrying that commit's label in the cluster, and `success` posted;
/// returns what is still wrong at the deadline.
async fn converge(
    world: &World,
    admin: &mut Admin,
    expected: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + CONVERGE_WITHIN;
    loop {
        let mut missing = Vec::new();
        for (agent, sha) in expected {
            let label = lock_repo(&world.repo)
                .labels
                .get(sha)
                .cloned()
                .unwrap_or_default();
            let status = match admin
                .get_agent(GetAgentRequest {
                    name: agent.clone(),
                })
                .await
            {
                Ok(status) => status.into_inner(),
                Err(error) => {
                    missing.push(format!("{agent}: GetAgent failed: {error}"));
                    continue;
                }
            };
            let desired = status
                .desired
                .as_ref()
                .map(|d| d.sha.as_str())
                .unwrap_or("");
            let report = status
                .last_report
                .as_ref()
                .map(|r| (r.revision.as_str(), r.phase()))
                .unwrap_or(("", Phase::Unspecified));
            if desired != sha
                || status.applied_revision != *sha
                || report != (sha.as_str(), Phase::Healthy)
            {
                missing.push(format!(
                    "{agent}: desired {desired}, applied {}, last report {report:?}, want {sha} ({label})",
                    status.applied_revision
                ));
                continue;
            }
            let configmaps: kube::Api<ConfigMap> =
                kube::Api::namespaced(world.cluster.kube.clone(), &world.namespaces[agent]);
            for i in 0..OBJECTS {
                let value = configmaps
                    .get_opt(&format!("cm-{i}"))
                    .await?
                    .and_then(|cm| cm.data)
                    .and_then(|data| data.get("value").cloned());
                if value.as_deref() != Some(label.as_str()) {
                    missing.push(format!("{agent}: cm-{i} holds {value:?}, want {label}"));
                }
            }
            // GitLab shows what runs: the newest status of the agent on the commit.
            let context = format!("greenlight/{agent}");
            let statuses = world.gitlab.statuses_for(sha);
            let shown = statuses.iter().rev().find(|(_, name, _)| *name == context);
            if shown.is_none_or(|(state, _, _)| state != "success") {
                missing.push(format!("{agent}: {sha} shows {shown:?}, not success yet"));
            }
        }
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        if tokio::time::Instant::now() > deadline {
            return Ok(missing
                .into_iter()
                .map(|m| format!("not converged within {CONVERGE_WITHIN:?}: {m}"))
                .collect());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every webhook answered 2xx is in the store: each push's commit on its ref, each pipeline
/// on its commit, in its final state when a final update was accepted.
async fn check_store(world: &World, admin: &mut Admin) -> anyhow::Result<Vec<String>> {
    let record = lock(&world.record).accepted.clone();
    let mut lost = Vec::new();
    for accepted in &record {
        if !matches!(
            accepted.outcome.as_str(),
            "recorded" | "unchanged" | "duplicate"
        ) {
            lost.push(format!(
                "{:?} was answered `{}`",
                accepted.delivery.claim, accepted.outcome
            ));
        }
    }
    for branch in ["main", "staging"] {
        let request = GetRefRequest {
            project: PROJECT.into(),
            r#ref: branch.into(),
        };
        let status = admin.get_ref(request).await?.into_inner();
        let commits: HashMap<&str, &greenlight::v1::CommitInfo> =
            status.commits.iter().map(|c| (c.sha.as_str(), c)).collect();
        // The final status each pipeline must show: its last final update accepted.
        let mut finals: HashMap<(String, u64), String> = HashMap::new();
        for accepted in &record {
            match &accepted.delivery.claim {
                Claim::Push { branch: b, sha }
                    if b == branch && !commits.contains_key(sha.as_str()) =>
                {
                    lost.push(format!(
                        "push of {sha} to {branch} (delivery {})",
                        accepted.delivery.id
                    ));
                }
                Claim::Pipeline {
                    branch: b,
                    sha,
                    id,
                    status,
                } if b == branch => {
                    let stored = commits
                        .get(sha.as_str())
                        .and_then(|c| c.pipelines.iter().find(|p| p.id == *id));
                    if stored.is_none() {
                        lost.push(format!(
                            "pipeline {id} ({status}) of {sha} on {branch} (delivery {})",
                            accepted.delivery.id
                        ));
                    }
                    if status != "running" {
                        finals.insert((sha.clone(), *id), status.clone());
                    }
                }
                _ => {}
            }
        }
        for ((sha, id), status) in &finals {
            let stored = commits
                .get(sha.as_str())
                .and_then(|c| c.pipelines.iter().find(|p| p.id == *id))
                .map(|p| p.status());
            let want = match status.as_str() {
                "success" => PipelineStatus::Success,
                _ => PipelineStatus::Failed,
            };
            if stored.is_some_and(|s| s != want) {
                lost.push(format!(
                    "pipeline {id} of {sha} is {stored:?} in the store, {status} was accepted"
                ));
            }
        }
    }
    Ok(lost
        .into_iter()
        .map(|l| format!("accepted but not in the store: {l}"))
        .collect())
}

/// No observer saw any agent's desired revision move to a commit that does not descend from
/// the one before, nor the decision history show one.
async fn check_forward_only(world: &World, admin: &mut Admin) -> anyhow::Result<Vec<String>> {
    let mut sequences: Vec<(String, String, Vec<String>)> = Vec::new();
    {
        let record = lock(&world.record);
        for (observer, agents) in &record.desired {
            for (agent, seen) in agents {
                sequences.push((observer.clone(), agent.clone(), seen.clone()));
            }
        }
    }
    for (agent, _, _) in AGENTS {
        let history = admin
            .get_agent_history(greenlight::v1::GetAgentHistoryRequest { name: agent.into() })
            .await?
            .into_inner();
        // Newest first.
        let deploys: Vec<String> = history
            .decisions
            .iter()
            .rev()
            .filter(|d| d.outcome() == decision::Outcome::Deploy)
            .map(|d| d.sha.clone())
            .collect();
        sequences.push(("history".into(), agent.into(), deploys));
    }
    let mut backwards = Vec::new();
    let repo = lock_repo(&world.repo);
    for (observer, agent, seen) in &sequences {
        for pair in seen.windows(2) {
            if pair[0] != pair[1] && !repo.is_ancestor(&pair[0], &pair[1])? {
                backwards.push(format!(
                    "{observer}: {agent} moved from {} ({}) to {} ({})",
                    pair[0],
                    repo.labels.get(&pair[0]).map_or("?", String::as_str),
                    pair[1],
                    repo.labels.get(&pair[1]).map_or("?", String::as_str),
                ));
            }
        }
    }
    Ok(backwards
        .into_iter()
        .map(|b| format!("backwards: {b}"))
        .collect())
}

/// GitLab never holds one state twice in a row for an (agent, commit); every deploy decision
/// has its `pending`, every report its `running`, `success` or `failed`, each agent's final
/// commit its `pending` and `success`, and every green commit of main that prod skipped its
/// `superseded`. A `pending` or `running` whose post failed is not posted once a later
/// state is there (GitLab would move the status back), so a later state stands for it.
fn check_statuses(world: &World, expected: &BTreeMap<String, String>) -> anyhow::Result<Statuses> {
    let statuses = world.gitlab.statuses();
    let posted: BTreeSet<(String, String, String)> = statuses
        .iter()
        .map(|status| {
            (
                status.name.clone(),
                status.sha.clone(),
                status.state.clone(),
            )
        })
        .collect();
    let has = |agent: &str, sha: &str, state: &str| {
        let later: &[&str] = match state {
            "pending" => &["running", "success", "failed", "canceled"],
            "running" => &["success", "failed", "canceled"],
            _ => &[],
        };
        std::iter::once(state)
            .chain(later.iter().copied())
            .any(|shown| {
                posted.contains(&(
                    format!("greenlight/{agent}"),
                    sha.to_owned(),
                    shown.to_owned(),
                ))
            })
    };
    // A state shown again only after another: a health that flipped, or a commit deployed
    // again. The same state posted twice in a row is a status posted twice.
    let mut last_posted: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    let mut duplicates = Vec::new();
    for status in &statuses {
        let key = (status.name.as_str(), status.sha.as_str());
        if last_posted.insert(key, status.state.as_str()) == Some(status.state.as_str()) {
            duplicates.push(format!(
                "commit status: {} {} on {} posted twice in a row",
                status.name, status.state, status.sha
            ));
        }
    }
    let mut wrong = Vec::new();
    let record = lock(&world.record);
    let mut deployed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for agents in record.desired.values() {
        for (agent, seen) in agents {
            deployed
                .entry(agent.clone())
                .or_default()
                .extend(seen.iter().cloned());
        }
    }
    for (agent, shas) in &deployed {
        for sha in shas {
            if !has(agent, sha, "pending") {
                wrong.push(format!(
                    "{agent} was sent {sha} but no pending status was posted"
                ));
            }
        }
    }
    for (agent, reports) in &record.reports {
        for (sha, phase) in reports {
            let state = match Phase::try_from(*phase) {
                Ok(Phase::Healthy) => "success",
                Ok(Phase::Failed | Phase::Degraded) => "failed",
                Ok(Phase::Applying) => "running",
                _ => continue,
            };
            if !has(agent, sha, state) {
                wrong.push(format!(
                    "{agent} reported {sha} {phase:?} but no {state} status was posted"
                ));
            }
        }
    }
    // `running` only where the agent's `applying` reached the server: its report queue
    // drops an `applying` that its `healthy` overtook.
    for (agent, sha) in expected {
        for state in ["pending", "success"] {
            if !has(agent, sha, state) {
                wrong.push(format!("{agent} runs {sha} but it has no {state} status"));
            }
        }
    }
    // Green commits prod passed over.
    let verdicts = verdicts(&record);
    let repo = lock_repo(&world.repo);
    let prod = expected.get("prod").context("no expected prod revision")?;
    let prod_deployed = deployed.get("prod").cloned().unwrap_or_default();
    for sha in repo.commits.get("main").into_iter().flatten() {
        if sha == prod {
            break;
        }
        let green = verdicts.get(sha).map(String::as_str) == Some("success");
        if green && !prod_deployed.contains(sha) && !has("prod", sha, "pending") {
            let superseded = statuses.iter().any(|s| {
                s.sha == *sha
                    && s.name == "greenlight/prod"
                    && s.state == "canceled"
                    && s.description.starts_with("superseded")
            });
            if !superseded {
                wrong.push(format!(
                    "green {sha} ({}) was skipped by prod without a superseded status",
                    repo.labels.get(sha).map_or("?", String::as_str)
                ));
            }
        }
    }
    Ok(Statuses {
        duplicates,
        missing: wrong
            .into_iter()
            .map(|w| format!("commit status: {w}"))
            .collect(),
    })
}

/// What is wrong with the statuses GitLab holds.
struct Statuses {
    /// An (agent, commit, state) posted more than once.
    duplicates: Vec<String>,
    /// A status owed but not posted.
    missing: Vec<String>,
}

/// Writes what the failure needs to be understood next to the logs: every accepted
/// delivery, each branch's commits with their labels and verdicts, and what the admin API
/// says of the refs and agents now.
async fn dump_state(world: &World, admin: &mut Admin) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mut out = String::new();
    {
        let repo = lock_repo(&world.repo);
        let record = lock(&world.record);
        let verdicts = verdicts(&record);
        for (branch, commits) in &repo.commits {
            writeln!(out, "# {branch}")?;
            for sha in commits {
                writeln!(
                    out,
                    "{sha} {} {}",
                    repo.labels.get(sha).map_or("?", String::as_str),
                    verdicts.get(sha).map_or("-", String::as_str)
                )?;
            }
        }
        writeln!(out, "# accepted deliveries, in order")?;
        for accepted in &record.accepted {
            writeln!(
                out,
                "{} {:?} -> {}",
                accepted.delivery.id, accepted.delivery.claim, accepted.outcome
            )?;
        }
        writeln!(out, "# triggers: {:?}", record.triggers)?;
        writeln!(out, "# desired revisions seen: {:#?}", record.desired)?;
    }
    for branch in ["main", "staging"] {
        let request = GetRefRequest {
            project: PROJECT.into(),
            r#ref: branch.into(),
        };
        writeln!(
            out,
            "# GetRef {branch}: {:#?}",
            admin.get_ref(request).await
        )?;
    }
    for (agent, _, _) in AGENTS {
        let request = GetAgentRequest { name: agent.into() };
        writeln!(
            out,
            "# GetAgent {agent}: {:#?}",
            admin.get_agent(request).await
        )?;
        let request = greenlight::v1::GetAgentHistoryRequest { name: agent.into() };
        let history = admin
            .get_agent_history(request)
            .await
            .map(|h| h.into_inner().decisions);
        writeln!(out, "# decisions of {agent}: {history:#?}")?;
    }
    writeln!(out, "# statuses: {:#?}", world.gitlab.statuses())?;
    std::fs::write(world.dir.join("state.txt"), out)?;
    Ok(())
}
