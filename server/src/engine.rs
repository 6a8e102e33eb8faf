//! One server replica: its ingest, its evaluator, its index, and the loop that keeps the
//! index and the evaluator in step with every replica's changes through the change log.
//! Also the read side the edges share: agents' states, reports and revision progress.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use greenlight::backoff::Backoff;
use greenlight::v1::{RevisionState, StatusReport};
use prost::Message;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::catalog::{Catalog, LiveCatalog, ref_key};
use crate::config::AgentSpec;
use crate::evaluate::{Asked, EvaluateError, Evaluator, RefLineage};
use crate::gate::{AgentGate, RefState, Sha};
use crate::git::{GitError, GitLineage, ManifestSet, Mirrors};
use crate::gitlab::PipelineConfirmer;
use crate::index::{Desired, Index};
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::store::{
    AgentRead, Broadcast, Notice, RefKey, Reported, Store, StoreError, SyncError, same_incarnation,
};

mod registry;

pub use registry::{Created, DEFAULT_ROTATION_GRACE, MAX_ROTATION_GRACE, RegistryError, Rotated};

/// Status reports kept per agent.
pub const REPORT_HISTORY: usize = 100;
/// How often every held ref is evaluated regardless of events: a safety net for a fetch
/// that gave up or an evaluation that failed.
const SAFETY_INTERVAL: Duration = Duration::from_secs(60);
/// Pacing of index rebuilds that failed after the store came back.
const RESYNC_RETRY_MIN: Duration = Duration::from_millis(200);
const RESYNC_RETRY_MAX: Duration = Duration::from_secs(10);

/// Why the engine could not carry out a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot reach the store: {0}")]
    Store(#[from] StoreError),
    #[error("no agent named {0:?} is configured")]
    UnknownAgent(String),
    /// An operator's request the evaluator could not carry out.
    #[error(transparent)]
    Evaluate(EvaluateError),
    #[error(
        "revision {sha} was never sent to agent {agent}; reports are accepted only for revisions the server sent"
    )]
    NotSent { agent: String, sha: Sha },
    #[error(
        "agent {0:?} was deleted, and another agent was created under its name since: the \
         deleted agent's report is dropped"
    )]
    Replaced(String),
}

impl From<EvaluateError> for EngineError {
    fn from(error: EvaluateError) -> Self {
        match error {
            EvaluateError::Store(error) => Self::Store(error),
            EvaluateError::UnknownAgent(agent) => Self::UnknownAgent(agent),
            other => Self::Evaluate(other),
        }
    }
}

/// Shared core of a server replica.
pub struct Engine {
    store: Arc<dyn Store>,
    catalog: Arc<LiveCatalog>,
    mirrors: Mirrors,
    index: Arc<Index>,
    evaluator: Arc<Evaluator>,
    ingest: Ingest,
    events: broadcast::Sender<Broadcast>,
    replica: String,
    connections: Mutex<HashMap<String, usize>>,
    tasks: TaskTracker,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// An engine over `store` for the agents in `catalog`.
    pub fn new(
        store: Arc<dyn Store>,
        catalog: Arc<LiveCatalog>,
        mirrors: Mirrors,
        replica: String,
        confirmer: Option<PipelineConfirmer>,
        tasks: TaskTracker,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let index = Arc::new(Index::new(
            catalog
                .load()
                .agents()
                .map(|a| (a.name.as_str(), a.incarnation)),
        ));
        let evaluator = Evaluator::new(
            store.clone(),
            catalog.clone(),
            mirrors.clone(),
            index.clone(),
            replica.clone(),
            metrics.clone(),
            tasks.clone(),
        );
        let ingest = Ingest::new(store.clone(), catalog.clone(), confirmer, evaluator.clone());
        Arc::new(Self {
            store,
            catalog,
            mirrors,
            index,
            evaluator,
            ingest,
            events: broadcast::channel(4096).0,
            replica,
            connections: Mutex::new(HashMap::new()),
            tasks,
            metrics,
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

    /// The agents, as they are now.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.load()
    }

    /// The agents as they change at runtime.
    pub fn live_catalog(&self) -> &Arc<LiveCatalog> {
        &self.catalog
    }

    /// The store behind this engine.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Records facts.
    pub fn ingest(&self) -> &Ingest {
        &self.ingest
    }

    /// Runs the gate and carries out operators' requests.
    pub fn evaluator(&self) -> &Arc<Evaluator> {
        &self.evaluator
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
        self.index.subscribe(agent)
    }

    /// The manifests of `sha` for `agent`: `None` when the agent has no repository.
    pub async fn manifests(
        &self,
        agent: &AgentSpec,
        sha: &Sha,
    ) -> Result<Option<Arc<ManifestSet>>, GitError> {
        crate::evaluate::manifests(&self.mirrors, agent, sha).await
    }

    /// Records why `agent`'s desired revision cannot be delivered, or clears it.
    pub fn note_sync_error(&self, agent: &str, error: Option<SyncError>) {
        self.evaluator.note_sync_error(agent, error);
    }

    /// Hears that a stream of `agent` ended having read the manifests of `read` last: see
    /// [`Evaluator::stream_ended`].
    pub fn stream_ended(&self, agent: &str, read: Option<&Sha>) {
        self.evaluator.stream_ended(agent, read);
    }

    /// Why `agent`'s desired revision cannot be delivered, if it cannot.
    pub async fn sync_error(&self, agent: &str) -> Result<Option<SyncError>, StoreError> {
        self.evaluator.sync_error(agent).await
    }

    fn spec(&self, agent: &str) -> Result<Arc<AgentSpec>, EngineError> {
        self.catalog
            .load()
            .agent_arc(agent)
            .ok_or_else(|| EngineError::UnknownAgent(agent.to_owned()))
    }

    /// The gate state of `agent` as stored now: empty while the record still holds another
    /// agent's once under the name (the evaluator gives it to this one).
    pub async fn gate_of(&self, agent: &str) -> Result<AgentGate, EngineError> {
        let spec = self.spec(agent)?;
        let read = self.store.agent(agent).await?;
        Ok(if same_incarnation(read.incarnation, spec.incarnation) {
            read.value.gate
        } else {
            AgentGate::default()
        })
    }

    /// What is recorded about `key`, as the gate sees it.
    pub async fn facts(&self, key: &RefKey) -> Result<RefState, EngineError> {
        Ok(self.store.facts(key).await?.ref_state())
    }

    /// What is recorded about `key`, and git's view of its heads when it has a repository:
    /// what the gate orders the heads by.
    pub async fn facts_with_lineage(
        &self,
        key: &RefKey,
    ) -> Result<(RefState, Option<GitLineage>), EngineError> {
        let refs = self.facts(key).await?;
        let git = self.evaluator.lineage_of(key, &refs).await;
        Ok((refs, git))
    }

    /// Reads `agent`'s state and hands its desired revision to its streams: a connecting
    /// agent gets what was decided while it was away, even if this replica missed it.
    pub async fn reread(&self, agent: &str) -> Result<(), EngineError> {
        let state = self.store.agent(agent).await?;
        self.offer(agent, &state, false);
        Ok(())
    }

    /// Offers `agent`'s stored state to the index, which drops it when the record holds
    /// another agent's once under the name.
    fn offer(&self, agent: &str, read: &AgentRead, force: bool) {
        self.index.offer(
            agent,
            read.incarnation,
            read.version,
            read.value.gate.desired.as_ref(),
            read.value.traceparent.as_deref(),
            force,
        );
    }

    /// Rebuilds the index from the store: every agent's desired revision and every agent's
    /// replica. After the store lost data, versions start again, hence `force`.
    async fn rebuild_index(&self, force: bool) -> Result<(), EngineError> {
        self.reload_registry(force).await?;
        let names: Vec<String> = self.catalog().agents().map(|a| a.name.clone()).collect();
        for (agent, state) in crate::store::readable_agents(&*self.store, &names).await? {
            self.offer(&agent, &state, force);
        }
        self.reload_presence(true).await
    }

    /// Replaces the index's presence with the store's live records, so that agents of a
    /// replica that died (and never said goodbye) stop showing as connected once its
    /// records expire. With `restore`, this replica's own agents are written again too,
    /// for a store that lost them.
    async fn reload_presence(&self, restore: bool) -> Result<(), EngineError> {
        let presence = self.store.all_presence().await?;
        self.index.reset_presence(presence);
        let here: Vec<String> = self.lock_connections().keys().cloned().collect();
        for agent in here {
            self.index.set_presence(&agent, &self.replica, true);
            if restore
                && let Err(error) = self.store.set_presence(&self.replica, &agent, true).await
            {
                warn!(%error, agent, "cannot restore presence");
            }
        }
        Ok(())
    }

    /// Readies the replica at start: its index from the store, and, with `warm_mirrors`,
    /// every repository fetched (evaluations follow each fetch).
    pub async fn reconcile_all(self: &Arc<Self>, warm_mirrors: bool) -> Result<(), EngineError> {
        if warm_mirrors {
            for key in self.catalog().refs() {
                self.evaluator
                    .fetch_then_reevaluate(key.clone(), None, None);
            }
        }
        self.rebuild_index(false).await
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
        let key = ref_key(self.spec(agent)?.as_ref());
        let gate = self.store.agent(agent).await?.value.gate;
        let refs = self.store.facts(&key).await?.ref_state();
        let report = self.last_report(agent).await?;
        let mut candidates: Vec<Sha> = gate.desired.iter().map(|d| d.sha.clone()).collect();
        candidates.extend(report.as_ref().and_then(|r| Sha::parse(&r.revision).ok()));
        let git = match self.catalog().source(&key) {
            Some(source) => Some(
                self.mirrors
                    .lineage(source, &key.branch, &candidates, std::slice::from_ref(sha))
                    .await
                    .unwrap_or_default(),
            ),
            None => None,
        };
        let lineage = RefLineage::new(&refs, git.as_ref());
        Ok(crate::progress::progress(
            sha,
            &gate,
            report.as_ref(),
            &lineage,
        ))
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
        self.index.set_presence(agent, &self.replica, connected);
        if let Err(error) = self
            .store
            .set_presence(&self.replica, agent, connected)
            .await
        {
            warn!(%error, agent, connected, "cannot record presence");
        }
    }

    /// The replica `agent` is connected to, if any, as this replica's index knows it.
    pub fn presence(&self, agent: &str) -> Option<String> {
        if self.connected_here(agent) {
            return Some(self.replica.clone());
        }
        self.index.presence(agent)
    }

    /// Marks this replica alive every [`crate::store::REPLICA_BEAT`] until `shutdown`: the
    /// others' status publishers take what it holds soon after the marks stop.
    async fn keep_marked_alive(self: Arc<Self>, shutdown: CancellationToken) {
        let mut beat = tokio::time::interval(crate::store::REPLICA_BEAT);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = beat.tick() => {
                    if let Err(error) = self.store.mark_alive(&self.replica).await {
                        warn!(%error, "cannot mark this replica alive");
                    }
                }
            }
        }
    }

    /// Keeps the index and the evaluator of this replica in step with every replica's
    /// changes until `shutdown`, and refreshes presence.
    pub async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        self.tasks
            .spawn(self.evaluator.clone().run(shutdown.clone()));
        let mut notices = self.store.subscribe();
        // A task of its own, so that no slow step of this loop (a rebuild after Redis lost
        // its data) keeps the mark from being renewed.
        self.tasks
            .spawn(self.clone().keep_marked_alive(shutdown.clone()));
        let mut presence =
            tokio::time::interval(Duration::from_secs(crate::store::PRESENCE_TTL_SECS * 4 / 5));
        let mut safety = tokio::time::interval(SAFETY_INTERVAL);
        safety.reset();
        // An index rebuild that failed (the store that just came back may not answer this
        // replica's commands quite yet) is retried with backoff rather than left to the
        // safety pass, which would leave agents a minute behind.
        let mut rebuild_pending = false;
        let mut rebuild_backoff = Backoff::new(RESYNC_RETRY_MIN, RESYNC_RETRY_MAX);
        let rebuild_retry = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(rebuild_retry);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = safety.tick() => self.evaluator.enqueue_all(),
                _ = presence.tick() => {
                    if let Err(error) = self.store.refresh_presence(&self.replica).await {
                        warn!(%error, "cannot refresh presence");
                    }
                    if let Err(error) = self.reload_presence(false).await {
                        warn!(%error, "cannot re-read presence");
                    }
                }
                () = &mut rebuild_retry, if rebuild_pending => {
                    match self.rebuild_index(true).await {
                        Ok(()) => {
                            rebuild_pending = false;
                            rebuild_backoff.reset();
                        }
                        Err(error) => {
                            warn!(%error, "cannot rebuild the index; will retry");
                            rebuild_retry.as_mut().reset(tokio::time::Instant::now() + rebuild_backoff.delay());
                        }
                    }
                }
                notice = notices.recv() => match notice {
                    Ok(Notice::Message(message)) => {
                        self.apply(&message);
                        let _ = self.events.send(message);
                    }
                    Ok(Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        info!("re-reading the desired state of every agent");
                        self.metrics.log_resync();
                        self.evaluator.forget_cache();
                        self.evaluator.enqueue_all();
                        rebuild_backoff.reset();
                        rebuild_pending = true;
                        rebuild_retry.as_mut().reset(tokio::time::Instant::now());
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    /// Applies one change log entry to this replica's index and evaluator.
    fn apply(&self, message: &Broadcast) {
        match message {
            Broadcast::Fact {
                key,
                traceparent,
                at_ms,
                position,
                ..
            } => self
                .evaluator
                .enqueue(key, Asked::by_fact(traceparent.clone(), *at_ms, *position)),
            Broadcast::AgentsChanged(changes) => {
                for (written, change) in changes.iter() {
                    self.evaluator.heard(&written.agent, written.version);
                    self.index.offer(
                        &written.agent,
                        written.incarnation,
                        written.version,
                        change.desired.as_ref(),
                        change.traceparent.as_deref(),
                        false,
                    );
                }
            }
            Broadcast::Connection {
                agent,
                connected,
                replica,
            } => {
                if *replica != self.replica {
                    self.index.set_presence(agent, replica, *connected);
                }
            }
            Broadcast::Report { .. } => {}
            Broadcast::Registry { agent, seq, record } => {
                self.apply_registry(*seq, agent, record.as_deref());
            }
        }
    }

    /// Keeps `report` (about `revision`) for `agent` and announces it, if the server ever
    /// sent the agent that revision: a report becomes a commit status and a `wait` result.
    /// A report's generation orders its commit status: one without (from a client that sets
    /// none) is taken as about the revision's current generation, and one above the agent's
    /// (sent before the agent was created anew) as about the agent's.
    pub async fn report(
        &self,
        spec: &AgentSpec,
        revision: &Sha,
        mut report: StatusReport,
    ) -> Result<(), EngineError> {
        let agent = spec.name.as_str();
        // What this replica streams now needs no read: nearly every report is about it.
        let streaming = self
            .index
            .current(agent)
            .and_then(|desired| desired.revision)
            .filter(|current| &current.sha == revision);
        let (newest, of_revision) = match streaming {
            Some(current) => (current.generation, Some(current.generation)),
            None => {
                let gate = self.gate_of(agent).await?;
                if !gate.was_told(revision) {
                    return Err(EngineError::NotSent {
                        agent: agent.to_owned(),
                        sha: revision.clone(),
                    });
                }
                let of_revision = gate
                    .desired
                    .filter(|desired| &desired.sha == revision)
                    .map(|desired| desired.generation);
                (gate.generation, of_revision)
            }
        };
        // Spelled as every other record of the commit is.
        report.revision = revision.to_string();
        if report.generation == 0 {
            report.generation = of_revision.unwrap_or(0);
        }
        report.generation = report.generation.min(newest);
        let report = report.encode_to_vec();
        // Kept and announced in one step: a report that is stored always becomes its commit
        // status and `wait` result, whichever replica is alive to act on it.
        match self
            .store
            .push_report(agent, spec.incarnation, &report, REPORT_HISTORY)
            .await?
        {
            Reported::Kept => Ok(()),
            Reported::Replaced => Err(EngineError::Replaced(agent.to_owned())),
        }
    }
}
