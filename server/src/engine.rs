//! Records facts and operator actions, runs the gate, and keeps every replica's agents on
//! their desired revision. The only place that reads, decides and writes ref documents.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::catalog::{Catalog, ref_key};
use crate::clock::now_ms;
use greenlight::backoff::Backoff;
use greenlight::v1::{RevisionState, StatusReport};
use prost::Message;

use crate::config::AgentSpec;
use crate::gate::{
    AgentGate, Context, Decision, GateError, Lineage, Outcome, Pipeline, PipelineStatus, Push,
    PushOrder, Recorded, RefState, Rejected, Sha, Step,
};
use crate::git::{GitError, GitLineage, ManifestSet, Mirrors};
use crate::gitlab::{Claim, Confirmation, PipelineConfirmer};
use crate::hub::{Desired, Hub};
use crate::metrics::Metrics;
use crate::prepare::{PREPARE_WORKERS, PrepareQueue};
use crate::store::{Broadcast, Notice, RefDoc, RefKey, SaveOutcome, Store, StoreError, Versioned};

/// Conditional writes retried this often before giving up under contention.
const MAX_ATTEMPTS: u32 = 32;
/// Status reports kept per agent.
pub const REPORT_HISTORY: usize = 100;
/// How a fetch failure recorded on an agent begins, so a later success can clear it.
const FETCH_ERROR: &str = "cannot fetch";
/// How often every ref is re-read and re-evaluated regardless of events.
const SAFETY_INTERVAL: Duration = Duration::from_secs(60);
/// Background fetch attempts before waiting for the next event.
const FETCH_ATTEMPTS: u32 = 6;
/// Pacing of re-reads that failed after the store came back.
const RESYNC_RETRY_MIN: Duration = Duration::from_millis(200);
const RESYNC_RETRY_MAX: Duration = Duration::from_secs(10);

/// What an update did.
struct Updated {
    /// `Some(true)` written, `Some(false)` nothing to write, `None` a duplicate delivery.
    written: Option<bool>,
    /// The mirror lacked a commit the decision was about.
    mirror_behind: bool,
}

/// Why the engine could not carry out a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot reach the store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error("no agent named {0:?} is configured")]
    UnknownAgent(String),
    #[error("too many concurrent updates of {0}; try again")]
    Contention(RefKey),
    #[error(
        "revision {sha} was never sent to agent {agent}; reports are accepted only for revisions the server sent"
    )]
    NotSent { agent: String, sha: Sha },
}

/// Where a fact came from, which decides whether it is checked with GitLab first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A GitLab webhook: its pipeline claims are confirmed through the API when one is set.
    GitLabHook,
    /// The ingest API, for CI systems GitLab knows nothing about.
    Ingest,
    /// Read from GitLab's API itself (catch-up).
    GitLabApi,
}

/// A fact about a ref, from a webhook or the ingest API.
#[derive(Debug, Clone)]
pub struct Fact {
    pub origin: Origin,
    pub project_path: Option<String>,
    pub project_id: Option<u64>,
    pub branch: String,
    pub kind: FactKind,
}

/// What happened on the ref.
#[derive(Debug, Clone)]
pub enum FactKind {
    Push(Push),
    Pipeline { sha: Sha, pipeline: Pipeline },
}

/// What recording a fact did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recording {
    Recorded,
    /// Nothing new: already known, or a stale update.
    Unchanged,
    /// The same delivery was recorded before.
    Duplicate,
    /// Not about anything an agent watches.
    Ignored(String),
    /// GitLab's API contradicts the claim: kept as a rejected fact, nothing else changed.
    Contradicted(String),
}

/// An operator's request about one agent.
#[derive(Debug, Clone)]
pub enum Operation {
    Trigger { sha: Option<Sha>, force_prune: bool },
    Pause { reason: String },
    Resume,
    Pin { sha: Sha, reason: String },
    Unpin,
}

/// Shared core of a server replica.
pub struct Engine {
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    mirrors: Mirrors,
    hub: Hub,
    events: broadcast::Sender<Broadcast>,
    replica: String,
    connections: Mutex<HashMap<String, usize>>,
    /// Confirms webhook pipeline claims with GitLab, when `gitlab.url` is set.
    confirmer: Option<PipelineConfirmer>,
    /// Agents whose desired revision this replica just decided: their manifests are read
    /// (and failures recorded) even if no stream of theirs is connected.
    prepare: PrepareQueue,
    /// Every task the engine starts, drained when the server stops.
    tasks: TaskTracker,
    metrics: Arc<Metrics>,
}

enum Change {
    Dirty(Vec<(String, Step)>),
    Clean,
}

/// What a decision may consult besides the document.
struct Env<'a> {
    now: i64,
    catalog: &'a Catalog,
    git: Option<&'a GitLineage>,
}

/// The history the gate orders commits by: git's when the ref has a repository, push order
/// otherwise.
enum RefLineage<'a> {
    Push(PushOrder<'a>),
    Git(&'a GitLineage),
}

impl<'a> RefLineage<'a> {
    fn new(refs: &'a RefState, git: Option<&'a GitLineage>) -> Self {
        match git {
            Some(git) => Self::Git(git),
            None => Self::Push(PushOrder(refs)),
        }
    }
}

impl Lineage for RefLineage<'_> {
    fn on_branch(&self, sha: &Sha) -> bool {
        match self {
            Self::Push(order) => order.on_branch(sha),
            Self::Git(git) => git.on_branch(sha),
        }
    }

    fn descends_from(&self, descendant: &Sha, ancestor: &Sha) -> bool {
        match self {
            Self::Push(order) => order.descends_from(descendant, ancestor),
            Self::Git(git) => git.descends_from(descendant, ancestor),
        }
    }

    fn knows(&self, sha: &Sha) -> bool {
        match self {
            Self::Push(order) => order.knows(sha),
            Self::Git(git) => git.knows(sha),
        }
    }
}

impl Engine {
    /// An engine over `store` for the agents in `catalog`.
    pub fn new(
        store: Arc<dyn Store>,
        catalog: Arc<Catalog>,
        mirrors: Mirrors,
        replica: String,
        confirmer: Option<PipelineConfirmer>,
        tasks: TaskTracker,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let hub = Hub::new(catalog.agents().map(|a| a.name.as_str()));
        Arc::new(Self {
            prepare: PrepareQueue::default(),
            tasks,
            metrics,
            confirmer,
            store,
            catalog,
            mirrors,
            hub,
            events: broadcast::channel(4096).0,
            replica,
            connections: Mutex::new(HashMap::new()),
        })
    }

    /// What this replica counts.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The git mirrors of this replica.
    pub fn mirrors(&self) -> &Mirrors {
        &self.mirrors
    }

    /// The configured agents.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The store behind this engine.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Everything every replica announces, from now on.
    pub fn events(&self) -> broadcast::Receiver<Broadcast> {
        self.events.subscribe()
    }

    /// Follows the desired revision of `agent` on this replica.
    pub fn desired(&self, agent: &str) -> Option<watch::Receiver<Desired>> {
        self.hub.subscribe(agent)
    }

    /// Records a fact and advances the gate of every agent watching its ref.
    pub async fn record(
        self: &Arc<Self>,
        fact: Fact,
        delivery: Option<&str>,
    ) -> Result<Recording, EngineError> {
        let arrived = Instant::now();
        let keys =
            self.catalog
                .refs_for(fact.project_path.as_deref(), fact.project_id, &fact.branch);
        if keys.is_empty() {
            let project = fact
                .project_path
                .clone()
                .or(fact.project_id.map(|id| id.to_string()))
                .unwrap_or_default();
            return Ok(Recording::Ignored(format!(
                "no agent watches {project}@{}",
                fact.branch
            )));
        }
        if let Some((rejected, decision)) = self.contradiction(&fact, &keys).await? {
            let reason = rejected.reason.clone();
            for key in &keys {
                self.update(key, delivery, None, |doc, env| {
                    doc.refs.reject(rejected.clone());
                    // Told to every watcher, so the events stream shows it.
                    let steps = env
                        .catalog
                        .watchers(key)
                        .iter()
                        .map(|agent| {
                            let step = Step {
                                decisions: vec![decision.clone()],
                                desired_changed: false,
                            };
                            (agent.clone(), step)
                        })
                        .collect();
                    Ok(Change::Dirty(steps))
                })
                .await?;
            }
            return Ok(Recording::Contradicted(reason));
        }
        let fact_sha = match &fact.kind {
            FactKind::Push(push) => push.after.clone(),
            FactKind::Pipeline { sha, .. } => Some(sha.clone()),
        };
        let mut outcome = Recording::Unchanged;
        for key in &keys {
            let result = self
                .update(key, delivery, fact_sha.as_ref(), |doc, env| {
                    let recorded = match &fact.kind {
                        FactKind::Push(push) => doc.refs.record_push(push),
                        FactKind::Pipeline { sha, pipeline } => {
                            doc.refs.record_pipeline(sha, pipeline.clone())
                        }
                    };
                    if recorded == Recorded::Unchanged {
                        return Ok(Change::Clean);
                    }
                    Ok(Change::Dirty(advance_all(doc, key, env)))
                })
                .await?;
            if result.written == Some(true) {
                self.metrics.fact_decided(arrived.elapsed());
            }
            outcome = match (result.written, outcome) {
                (Some(true), _) | (_, Recording::Recorded) => Recording::Recorded,
                (None, _) => Recording::Duplicate,
                (Some(false), previous) => previous,
            };
            // The decision used the mirror as it was; once it has fetched, decide again.
            let is_push = matches!(fact.kind, FactKind::Push(_));
            if result.written.is_some() && (is_push || result.mirror_behind) {
                self.fetch_then_reevaluate(key.clone());
            }
        }
        Ok(outcome)
    }

    /// The rejection of `fact`, if it is a webhook's pipeline claim that could open a gate
    /// and GitLab's API contradicts it.
    async fn contradiction(
        &self,
        fact: &Fact,
        keys: &[RefKey],
    ) -> Result<Option<(Rejected, Decision)>, EngineError> {
        let (Some(confirmer), Origin::GitLabHook, FactKind::Pipeline { sha, pipeline }) =
            (&self.confirmer, fact.origin, &fact.kind)
        else {
            return Ok(None);
        };
        let may_open = pipeline.counts_for_branch()
            && (pipeline.status == PipelineStatus::Success || !pipeline.passed_stages.is_empty());
        let Some(key) = keys.first().filter(|_| may_open) else {
            return Ok(None);
        };
        // A redelivery, or a hook that one of our own statuses caused, claims nothing new.
        let doc = self.store.load(key).await?.value;
        let known = doc.refs.pipelines.get(sha).is_some_and(|runs| {
            runs.iter().any(|p| {
                p.id == pipeline.id
                    && p.status == pipeline.status
                    && pipeline
                        .passed_stages
                        .iter()
                        .all(|stage| p.passed_stages.contains(stage))
            })
        });
        if known {
            return Ok(None);
        }
        let claim = Claim {
            id: pipeline.id,
            sha,
            branch: &fact.branch,
            status: pipeline.status,
        };
        let Confirmation::Contradicted(mismatch) = confirmer.confirm(&key.project, &claim).await
        else {
            return Ok(None);
        };
        warn!(%key, pipeline = pipeline.id, %mismatch, "pipeline claim rejected");
        let at_ms = now_ms();
        let rejected = Rejected {
            sha: sha.clone(),
            pipeline_id: pipeline.id,
            reason: mismatch.to_string(),
            at_ms,
        };
        let decision = Decision {
            outcome: Outcome::Skip,
            sha: Some(sha.clone()),
            pipeline_id: Some(pipeline.id),
            reason: format!("pipeline {} rejected: {mismatch}", pipeline.id),
            at_ms,
            superseded_by: None,
        };
        Ok(Some((rejected, decision)))
    }

    /// Carries out an operator's request on `agent`.
    pub async fn operate(&self, agent: &str, operation: Operation) -> Result<(), EngineError> {
        let spec = self
            .catalog
            .agent(agent)
            .ok_or_else(|| EngineError::UnknownAgent(agent.to_owned()))?;
        let key = ref_key(spec);
        let mode = spec.mode;
        let stages = spec.required_stages.clone();
        let target = match &operation {
            Operation::Trigger { sha, .. } => sha.clone(),
            Operation::Pin { sha, .. } => Some(sha.clone()),
            _ => None,
        };
        self.update(&key, None, target.as_ref(), |doc, env| {
            let RefDoc { refs, agents, .. } = doc;
            let gate = agents.entry(agent.to_owned()).or_default();
            let lineage = RefLineage::new(refs, env.git);
            let cx = Context {
                mode,
                stages: stages.as_slice(),
                refs,
                lineage: &lineage,
                now_ms: env.now,
            };
            let now = env.now;
            let step = match &operation {
                Operation::Trigger { sha, force_prune } => {
                    gate.trigger(&cx, sha.as_ref(), *force_prune)?
                }
                Operation::Pause { reason } => gate.pause(reason.clone(), now),
                Operation::Resume => gate.resume(now)?,
                Operation::Pin { sha, reason } => gate.pin(sha.clone(), reason.clone(), now)?,
                Operation::Unpin => gate.unpin(now)?,
            };
            Ok(Change::Dirty(vec![(agent.to_owned(), step)]))
        })
        .await?;
        Ok(())
    }

    /// Re-runs the gate for every watched ref: at start, so that config changes (new agents,
    /// other modes) take effect without an event, and periodically as a safety net.
    /// With `warm_mirrors` every repository is fetched (at start); otherwise only those whose
    /// mirror lacks a commit the gate needs, so the git server is not polled.
    pub async fn reconcile_all(self: &Arc<Self>, warm_mirrors: bool) -> Result<(), EngineError> {
        let keys: Vec<RefKey> = self.catalog.refs().cloned().collect();
        let mut first_error = None;
        for key in keys {
            // One unreadable ref must not keep the others from being evaluated.
            let result = async {
                let mirror_behind = self.reevaluate(&key).await?;
                self.reread(&key).await?;
                Ok::<_, EngineError>(mirror_behind)
            }
            .await;
            match result {
                Ok(mirror_behind) => {
                    if mirror_behind || (warm_mirrors && self.catalog.source(&key).is_some()) {
                        self.fetch_then_reevaluate(key);
                    }
                }
                Err(error) => {
                    warn!(%error, %key, "cannot evaluate ref; will retry");
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Runs the gate for `key` without a new fact: after a fetch changed what git knows.
    /// Returns whether the mirror lacked a commit the gate needed.
    pub async fn reevaluate(&self, key: &RefKey) -> Result<bool, EngineError> {
        let updated = self
            .update(key, None, None, |doc, env| {
                let steps = advance_all(doc, key, env);
                if steps
                    .iter()
                    .any(|(_, s)| s.desired_changed || !s.decisions.is_empty())
                {
                    Ok(Change::Dirty(steps))
                } else {
                    Ok(Change::Clean)
                }
            })
            .await?;
        Ok(updated.mirror_behind)
    }

    /// Fetches the repository of `key` in the background, retrying with backoff, then runs
    /// the gate again. Fetches of one repository are coalesced by the mirror.
    pub fn fetch_then_reevaluate(self: &Arc<Self>, key: RefKey) {
        let Some(source) = self.catalog.source(&key).cloned() else {
            return;
        };
        let engine = self.clone();
        let repository = crate::git::display_url(&source.url);
        // Joins the trace of what asked for it (a push), so that a decision the fetch makes
        // possible is still part of that trace.
        let span =
            tracing::info_span!(parent: &tracing::Span::current(), "fetch", %repository, %key);
        self.tasks.spawn(tracing::Instrument::instrument(
            async move {
                let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
                for _ in 0..FETCH_ATTEMPTS {
                    match engine.mirrors.fetch(&source).await {
                        Ok(()) => {
                            for agent in engine.catalog.watchers(&key) {
                                let stale = engine.store.sync_error(agent).await.ok().flatten();
                                if stale.is_some_and(|e| e.starts_with(FETCH_ERROR)) {
                                    engine.note_sync_error(agent, None).await;
                                }
                            }
                            if let Err(error) = engine.reevaluate(&key).await {
                                warn!(%error, "cannot re-run the gate after a fetch");
                            }
                            return;
                        }
                        Err(error) => {
                            warn!(%error, "fetch failed");
                            let message = format!("{FETCH_ERROR} {repository}: {error}");
                            for agent in engine.catalog.watchers(&key) {
                                engine.note_sync_error(agent, Some(message.clone())).await;
                            }
                            if !error.retryable() {
                                return;
                            }
                        }
                    }
                    tokio::time::sleep(backoff.delay()).await;
                }
            },
            span,
        ));
    }

    /// Reads the manifests of newly decided revisions one at a time until `shutdown`: see
    /// [`crate::prepare`].
    async fn prepare_manifests(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let (agent, sha) = tokio::select! {
                _ = shutdown.cancelled() => return,
                job = self.prepare.next() => job,
            };
            let Some(spec) = self.catalog.agent(&agent).cloned() else {
                continue;
            };
            if let Err(error) = self.manifests(&spec, &sha).await {
                let message = format!("cannot deliver {}: {error}", sha.short());
                self.note_sync_error(&agent, Some(message)).await;
            }
        }
    }

    /// The manifests of `sha` for `agent`: `None` when the agent has no repository.
    pub async fn manifests(
        &self,
        agent: &AgentSpec,
        sha: &Sha,
    ) -> Result<Option<Arc<ManifestSet>>, GitError> {
        let Some(source) = &agent.source else {
            return Ok(None);
        };
        self.mirrors
            .manifests(source, sha, &agent.paths)
            .await
            .map(Some)
    }

    /// Records why `agent`'s desired revision cannot be delivered, or clears it.
    pub async fn note_sync_error(&self, agent: &str, error: Option<String>) {
        // Written every time: a cache here would hide another replica's newer error.
        if let Err(store_error) = self.store.set_sync_error(agent, error.as_deref()).await {
            warn!(%store_error, agent, "cannot record the sync error");
        }
    }

    /// The stored document of `key`.
    pub async fn load(&self, key: &RefKey) -> Result<Versioned<RefDoc>, EngineError> {
        Ok(self.store.load(key).await?)
    }

    /// The gate state of `agent` as stored now.
    pub async fn gate_of(&self, agent: &str) -> Result<AgentGate, EngineError> {
        let spec = self
            .catalog
            .agent(agent)
            .ok_or_else(|| EngineError::UnknownAgent(agent.to_owned()))?;
        let doc = self.store.load(&ref_key(spec)).await?.value;
        Ok(doc.agents.get(agent).cloned().unwrap_or_default())
    }

    /// The newest `limit` status reports of `agent`, newest first; undecodable ones (from a
    /// newer version) are left out.
    pub async fn reports(
        &self,
        agent: &str,
        limit: usize,
    ) -> Result<Vec<StatusReport>, EngineError> {
        let stored = self.store.reports(agent, limit).await?;
        Ok(stored
            .iter()
            .filter_map(|bytes| StatusReport::decode(bytes.as_slice()).ok())
            .collect())
    }

    /// The last status report of `agent`.
    pub async fn last_report(&self, agent: &str) -> Result<Option<StatusReport>, EngineError> {
        Ok(self.reports(agent, 1).await?.into_iter().next())
    }

    /// Where `sha` stands on `agent`: what `greenlightctl wait` follows.
    pub async fn revision_progress(
        &self,
        agent: &str,
        sha: &Sha,
    ) -> Result<RevisionState, EngineError> {
        let spec = self
            .catalog
            .agent(agent)
            .ok_or_else(|| EngineError::UnknownAgent(agent.to_owned()))?;
        let key = ref_key(spec);
        let doc = self.store.load(&key).await?.value;
        let gate = doc.agents.get(agent).cloned().unwrap_or_default();
        let report = self.last_report(agent).await?;
        let mut candidates: Vec<Sha> = gate.desired.iter().map(|d| d.sha.clone()).collect();
        candidates.extend(report.as_ref().and_then(|r| Sha::parse(&r.revision).ok()));
        let git = match self.catalog.source(&key) {
            Some(source) => Some(
                self.mirrors
                    .lineage(source, &key.branch, &candidates, std::slice::from_ref(sha))
                    .await
                    .unwrap_or_default(),
            ),
            None => None,
        };
        let lineage = RefLineage::new(&doc.refs, git.as_ref());
        Ok(crate::progress::progress(
            sha,
            &gate,
            report.as_ref(),
            &lineage,
        ))
    }

    /// Whether this replica's streams already follow `version` of `key` (its own saves come
    /// back through the store too: re-reading them would only repeat work).
    fn already_has(&self, key: &RefKey, version: u64) -> bool {
        version > 0
            && self.catalog.watchers(key).iter().all(|agent| {
                self.hub
                    .current(agent)
                    .is_some_and(|d| d.version >= version)
            })
    }

    /// Re-reads `key` and hands its agents' desired revisions to their streams, without
    /// trusting that versions only grow: a store that lost its data starts again at 0. A lower version read twice is such a reset, not a race with a
    /// concurrent save (which only raises it).
    pub async fn reread(&self, key: &RefKey) -> Result<(), EngineError> {
        let first = self.store.load(key).await?;
        let known = self
            .catalog
            .watchers(key)
            .iter()
            .filter_map(|agent| self.hub.current(agent))
            .map(|desired| desired.version)
            .max()
            .unwrap_or(0);
        if first.version >= known {
            self.offer(key, first.version, &first.value, false);
            return Ok(());
        }
        let second = self.store.load(key).await?;
        let reset = second.version < known;
        self.offer(key, second.version, &second.value, reset);
        Ok(())
    }

    fn offer(&self, key: &RefKey, version: u64, doc: &RefDoc, force: bool) {
        for agent in self.catalog.watchers(key) {
            let desired = doc.agents.get(agent).and_then(|g| g.desired.as_ref());
            let trace = doc.traces.get(agent).map(String::as_str);
            self.hub.offer(agent, version, desired, trace, force);
        }
    }

    /// Reads, decides with `change`, and writes `key` atomically, retrying on conflicts.
    /// `subject` is a commit the decision is about, which the git lineage must cover.
    async fn update(
        &self,
        key: &RefKey,
        delivery: Option<&str>,
        subject: Option<&Sha>,
        mut change: impl FnMut(&mut RefDoc, &Env<'_>) -> Result<Change, GateError>,
    ) -> Result<Updated, EngineError> {
        for attempt in 0..MAX_ATTEMPTS {
            let Versioned {
                version,
                value: mut doc,
            } = self.store.load(key).await?;
            let (git, mirror_behind) = self.git_lineage(key, &doc, subject).await;
            let env = Env {
                now: now_ms(),
                catalog: &self.catalog,
                git: git.as_ref(),
            };
            let evaluated = {
                let _span = tracing::info_span!("evaluate_gate", %key, attempt).entered();
                change(&mut doc, &env)?
            };
            let steps = match evaluated {
                Change::Clean => {
                    // Nothing to write, so the save's own duplicate check does not run: tell
                    // a redelivery from a new event that merely says nothing new.
                    let duplicate = match delivery {
                        Some(id) => self.store.seen_delivery(key, id).await?,
                        None => false,
                    };
                    let written = if duplicate { None } else { Some(false) };
                    return Ok(Updated {
                        written,
                        mirror_behind,
                    });
                }
                Change::Dirty(steps) => steps,
            };
            let trace = greenlight::telemetry::traceparent(&tracing::Span::current());
            let changed: Vec<(String, Sha)> = steps
                .iter()
                .filter(|(_, step)| step.desired_changed)
                .filter_map(|(agent, _)| {
                    let desired = doc.agents.get(agent)?.desired.as_ref()?;
                    Some((agent.clone(), desired.sha.clone()))
                })
                .collect();
            let decisions: Vec<_> = steps
                .into_iter()
                .flat_map(|(agent, step)| {
                    step.decisions.into_iter().map(move |d| (agent.clone(), d))
                })
                .collect();
            for (agent, _) in &changed {
                match &trace {
                    Some(trace) => doc.traces.insert(agent.clone(), trace.clone()),
                    None => doc.traces.remove(agent),
                };
            }
            let notice = Broadcast::RefChanged {
                key: key.clone(),
                // A successful conditional save writes exactly the next version.
                version: version + 1,
                decisions,
                traceparent: trace.clone(),
            };
            let saved = self
                .store
                .save(key, version, &doc, delivery, &notice)
                .instrument(tracing::info_span!("record_fact", %key))
                .await?;
            match saved {
                SaveOutcome::Saved { version } => {
                    if let Broadcast::RefChanged { decisions, .. } = &notice {
                        self.metrics.decided(decisions.iter().map(|(_, d)| d));
                    }
                    // Local agents need not wait for the round trip through the store.
                    self.offer(key, version, &doc, false);
                    for (agent, sha) in changed {
                        self.prepare.push(&agent, sha);
                    }
                    return Ok(Updated {
                        written: Some(true),
                        mirror_behind,
                    });
                }
                SaveOutcome::Duplicate => {
                    return Ok(Updated {
                        written: None,
                        mirror_behind,
                    });
                }
                SaveOutcome::Conflict => {
                    debug!(%key, attempt, "concurrent update; retrying");
                    let pause = 1 + fastrand::u64(0..=(1u64 << attempt.min(6)));
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
        }
        Err(EngineError::Contention(key.clone()))
    }

    /// Git's view of the commits `doc` may decide about, and whether the mirror lacks any of
    /// them; `None` when the ref has no repository (push order decides).
    async fn git_lineage(
        &self,
        key: &RefKey,
        doc: &RefDoc,
        subject: Option<&Sha>,
    ) -> (Option<GitLineage>, bool) {
        let Some(source) = self.catalog.source(key) else {
            return (None, false);
        };
        let mut candidates: Vec<Sha> = doc.refs.current_heads().map(|h| h.sha.clone()).collect();
        candidates.extend(subject.cloned());
        let mut anchors: Vec<Sha> = doc
            .agents
            .values()
            .filter_map(|gate| gate.position.as_ref().map(|r| r.sha.clone()))
            .collect();
        anchors.sort();
        anchors.dedup();
        match self
            .mirrors
            .lineage(source, &key.branch, &candidates, &anchors)
            .await
        {
            Ok(lineage) => {
                let behind = subject.is_some_and(|sha| !lineage.knows(sha))
                    || anchors.iter().any(|sha| !lineage.knows(sha));
                (Some(lineage), behind)
            }
            Err(error) => {
                // Knowing nothing holds every agent where it is until a fetch succeeds.
                debug!(%error, %key, "no lineage from the mirror yet");
                (Some(GitLineage::default()), true)
            }
        }
    }

    /// Counts a stream of `agent` on this replica and announces the first one.
    pub async fn connected(&self, agent: &str) {
        let first = {
            let mut connections = self.lock_connections();
            let count = connections.entry(agent.to_owned()).or_default();
            *count += 1;
            *count == 1
        };
        if first {
            self.announce_presence(agent, true).await;
        }
    }

    /// Counts a stream of `agent` gone and announces the last one.
    pub async fn disconnected(&self, agent: &str) {
        let last = {
            let mut connections = self.lock_connections();
            match connections.get_mut(agent) {
                Some(count) if *count > 1 => {
                    *count -= 1;
                    false
                }
                Some(_) => {
                    connections.remove(agent);
                    true
                }
                None => false,
            }
        };
        if last {
            self.announce_presence(agent, false).await;
        }
    }

    /// Withdraws this replica's presence records when it stops, so that other replicas do
    /// not list its agents as connected until the records expire.
    pub async fn withdraw_presence(&self) {
        let agents: Vec<String> = self
            .lock_connections()
            .drain()
            .map(|(agent, _)| agent)
            .collect();
        for agent in agents {
            self.announce_presence(&agent, false).await;
        }
    }

    /// Whether `agent` has a stream on this replica.
    pub fn connected_here(&self, agent: &str) -> bool {
        self.lock_connections().contains_key(agent)
    }

    fn lock_connections(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Counters stay consistent under a poisoned lock: each change is one statement.
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn announce_presence(&self, agent: &str, connected: bool) {
        // Called once per first stream and once per last: the gauge of connected agents.
        self.metrics.agent_connected(connected);
        if let Err(error) = self
            .store
            .set_presence(&self.replica, agent, connected)
            .await
        {
            warn!(%error, agent, connected, "cannot record presence");
        }
        let message = Broadcast::Connection {
            agent: agent.to_owned(),
            connected,
            replica: self.replica.clone(),
        };
        if let Err(error) = self.store.append(&message).await {
            warn!(%error, agent, "cannot announce connection");
        }
    }

    /// The replica `agent` is connected to, if any.
    pub async fn presence(&self, agent: &str) -> Result<Option<String>, EngineError> {
        if self.connected_here(agent) {
            return Ok(Some(self.replica.clone()));
        }
        Ok(self.store.presence(agent).await?)
    }

    /// Keeps the agents of this replica in step with every replica's decisions until
    /// `shutdown`, and refreshes presence.
    pub async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        for worker in 0..PREPARE_WORKERS {
            self.tasks.spawn(tracing::Instrument::instrument(
                self.clone().prepare_manifests(shutdown.clone()),
                tracing::info_span!("prepare_manifests", worker),
            ));
        }
        let mut notices = self.store.subscribe();
        let mut presence =
            tokio::time::interval(Duration::from_secs(crate::store::PRESENCE_TTL_SECS * 4 / 5));
        let mut safety = tokio::time::interval(SAFETY_INTERVAL);
        safety.reset();
        // Refs whose re-read after a missed-announcement gap failed: retried with backoff, since
        // the store that just came back may not answer this replica's commands quite yet, and
        // waiting for the safety pass would leave its agents a minute behind.
        let mut stale: BTreeSet<RefKey> = BTreeSet::new();
        let mut resync_backoff = Backoff::new(RESYNC_RETRY_MIN, RESYNC_RETRY_MAX);
        let resync_retry = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(resync_retry);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = safety.tick() => {
                    // Announcements can be missed without the store saying so, a fetch can
                    // have given up, and a start-up evaluation can have failed: go over
                    // everything once in a while.
                    if let Err(error) = self.reconcile_all(false).await {
                        debug!(%error, "periodic re-evaluation incomplete");
                    }
                }
                _ = presence.tick() => {
                    if let Err(error) = self.store.refresh_presence(&self.replica).await {
                        warn!(%error, "cannot refresh presence");
                    }
                }
                () = &mut resync_retry, if !stale.is_empty() => {
                    stale = self.resync(std::mem::take(&mut stale)).await;
                    if stale.is_empty() {
                        resync_backoff.reset();
                    } else {
                        resync_retry.as_mut().reset(tokio::time::Instant::now() + resync_backoff.delay());
                    }
                }
                notice = notices.recv() => match notice {
                    Ok(Notice::Message(message)) => {
                        if let Broadcast::RefChanged { key, version, .. } = &message
                            && !self.already_has(key, *version)
                            && let Err(error) = self.reread(key).await
                        {
                            warn!(%error, %key, "cannot re-read a changed ref");
                            stale.insert(key.clone());
                            resync_retry.as_mut().reset(tokio::time::Instant::now() + resync_backoff.delay());
                        }
                        let _ = self.events.send(message);
                    }
                    Ok(Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        info!("re-reading the desired state of every agent");
                        self.metrics.log_resync();
                        self.restore_presence().await;
                        resync_backoff.reset();
                        stale = self.resync(self.catalog.refs().cloned().collect()).await;
                        if !stale.is_empty() {
                            resync_retry.as_mut().reset(tokio::time::Instant::now() + resync_backoff.delay());
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    /// Re-reads `keys` after announcements may have been missed; returns those that could not
    /// be read.
    async fn resync(&self, keys: BTreeSet<RefKey>) -> BTreeSet<RefKey> {
        let mut failed = BTreeSet::new();
        for key in keys {
            if let Err(error) = self.reread(&key).await {
                warn!(%error, %key, "cannot re-read ref; will retry");
                failed.insert(key);
            }
        }
        failed
    }

    /// Announces again the agents connected here, after the store may have lost them.
    async fn restore_presence(&self) {
        let agents: Vec<String> = self.lock_connections().keys().cloned().collect();
        for agent in agents {
            if let Err(error) = self.store.set_presence(&self.replica, &agent, true).await {
                warn!(%error, agent, "cannot restore presence");
            }
        }
    }

    /// Keeps `report` (about `revision`) for `agent` and announces it, if the server ever
    /// sent the agent that revision: a report becomes a commit status and a `wait` result.
    pub async fn report(
        &self,
        agent: &str,
        revision: &Sha,
        report: Vec<u8>,
    ) -> Result<(), EngineError> {
        // What this replica streams now needs no read: nearly every report is about it.
        let streaming = self
            .hub
            .current(agent)
            .and_then(|desired| desired.revision)
            .is_some_and(|current| &current.sha == revision);
        if !streaming && !self.gate_of(agent).await?.was_told(revision) {
            return Err(EngineError::NotSent {
                agent: agent.to_owned(),
                sha: revision.clone(),
            });
        }
        // Kept and announced in one step: a report that is stored always becomes its commit
        // status and `wait` result, whichever replica is alive to act on it.
        let message = Broadcast::Report {
            agent: agent.to_owned(),
            report: report.clone(),
        };
        self.store
            .push_report(agent, &report, REPORT_HISTORY, &message)
            .await?;
        Ok(())
    }
}

/// Advances the gate of every agent watching `key`.
fn advance_all(doc: &mut RefDoc, key: &RefKey, env: &Env<'_>) -> Vec<(String, Step)> {
    let RefDoc { refs, agents, .. } = doc;
    let lineage = RefLineage::new(refs, env.git);
    let catalog = env.catalog;
    catalog
        .watchers(key)
        .iter()
        .filter_map(|name| {
            let spec = catalog.agent(name)?;
            let cx = Context {
                mode: spec.mode,
                stages: spec.required_stages.as_slice(),
                refs,
                lineage: &lineage,
                now_ms: env.now,
            };
            let step = agents.entry(name.clone()).or_default().advance(&cx);
            Some((name.clone(), step))
        })
        .collect()
}
