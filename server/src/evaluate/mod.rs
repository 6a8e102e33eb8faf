//! The evaluator: a keyed controller that runs the gate of every agent watching a ref after
//! the ref's facts changed, and carries out operators' requests on one agent.
//!
//! - A ref is evaluated by one replica at a time: the holder of its shard's lease. Facts
//!   recorded on any replica reach it through the change log.
//! - A burst of facts about a ref costs one evaluation: refs wait in a coalescing queue,
//!   and a ref being evaluated is not handed to a second worker.
//! - Every write of an agent's state is conditional on the version read and on the facts
//!   being at least as new as those the stored state was decided from, so two evaluators
//!   (a lease changing hands, an operator's request) can never move an agent backwards.
//! - The holder keeps the agents' states it wrote in memory, so an evaluation reads the
//!   ref's facts and nothing per agent.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::catalog::{LiveCatalog, ref_key, watches};
use crate::clock::now_ms;
use crate::config::AgentSpec;
use crate::gate::{Context, GateError, Lineage, PushOrder, RefState, Sha, Step};
use crate::git::{GitError, GitLineage, ManifestSet, Mirrors};
use crate::index::Index;
use crate::metrics::Metrics;
use crate::queue::Coalescing;
use crate::store::{
    AgentRead, AgentState, AgentWrite, AgentWrites, DeployedChange, Facts, RefKey, SHARDS, Store,
    StoreError, SyncError, Written, readable_agents, same_incarnation,
};
use crate::sync_errors::SyncErrors;
use greenlight::backoff::Backoff;

mod rules;
#[cfg(test)]
mod tests;

pub use rules::{Operation, StoredVersion, admit};

/// How long a shard's lease lasts without renewal: a dead holder's refs wait this long.
pub const LEASE_TTL: Duration = Duration::from_secs(6);
/// How often leases are renewed and free ones taken.
const LEASE_RENEW: Duration = Duration::from_secs(2);
/// Conditional writes of one agent retried this often before giving up under contention.
const MAX_ATTEMPTS: u32 = 16;
/// Refs evaluated at the same time by one replica.
const EVALUATORS: usize = 4;
/// Watchers' sync errors read at once when a fetch clears them.
const SYNC_ERROR_READS_IN_FLIGHT: usize = 64;
/// Background fetch attempts before waiting for the next event.
const FETCH_ATTEMPTS: u32 = 6;
/// How many revisions are read at the same time. Reads of one commit are shared by the
/// mirror, so this bounds distinct reads, not agents.
pub const PREPARE_WORKERS: usize = 4;
/// Pipeline records past what the gate keeps before they are forgotten in the store.
const FORGET_SLACK: usize = 64;

/// Why a request could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error("cannot reach the store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error("no agent named {0:?} is configured")]
    UnknownAgent(String),
    #[error("too many concurrent updates of agent {0}; try again")]
    Contention(String),
    #[error(
        "agent {0} was deleted and created again while the request ran, and this replica \
         has not heard of the new one yet; try again"
    )]
    Replaced(String),
}

/// The history the gate orders commits by: git's when the ref has a repository, push order
/// otherwise.
pub enum RefLineage<'a> {
    Push(PushOrder<'a>),
    Git(&'a GitLineage),
}

impl<'a> RefLineage<'a> {
    /// Git's lineage when there is one, else `refs`' push order.
    pub fn new(refs: &'a RefState, git: Option<&'a GitLineage>) -> Self {
        match git {
            Some(git) => Self::Git(git),
            None => Self::Push(PushOrder::new(refs)),
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

    fn generation(&self, sha: &Sha) -> Option<u32> {
        match self {
            Self::Push(order) => order.generation(sha),
            Self::Git(git) => git.generation(sha),
        }
    }
}

/// What asked for a ref's evaluation.
#[derive(Debug, Clone, Default)]
pub struct Asked {
    /// W3C trace context of the newest traced fact, which the evaluation joins.
    pub traceparent: Option<String>,
    /// When the oldest fact of the burst was recorded, in Unix milliseconds.
    pub since_ms: Option<i64>,
    /// The newest facts position of the ref that asked; 0 when no fact did.
    pub position: u64,
    /// An evaluation before this one left its decisions unwritten for newer facts: this one
    /// writes even if newer facts are queued, so that a steady stream of facts still gets
    /// decided.
    deferred_once: bool,
}

impl Asked {
    /// Asked by a fact recorded at `at_ms` at `position` of its ref, in the trace
    /// `traceparent`.
    pub fn by_fact(traceparent: Option<String>, at_ms: i64, position: u64) -> Self {
        Self {
            traceparent,
            since_ms: (at_ms > 0).then_some(at_ms),
            position,
            deferred_once: false,
        }
    }

    fn merge(&mut self, newer: Asked) {
        self.traceparent = newer.traceparent.or(self.traceparent.take());
        self.since_ms = match (self.since_ms, newer.since_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.position = self.position.max(newer.position);
        self.deferred_once |= newer.deferred_once;
    }

    /// What a deferred evaluation leaves in the queue: the burst's start, for the latency
    /// it is measured by, and that the next evaluation must write.
    fn deferred(&self) -> Self {
        Self {
            traceparent: None,
            since_ms: self.since_ms,
            position: 0,
            deferred_once: true,
        }
    }
}

/// Whether an evaluation may leave its decisions unwritten when a newer fact of its ref is
/// already queued: the next evaluation would supersede them at once, and writing every
/// agent twice only delays the newer decision (a push, then its pipeline a moment later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferral {
    /// The first evaluation of a burst: it may defer.
    Allowed,
    /// An evaluation after a deferral, or one asked for directly: it writes.
    Refused,
}

/// What an evaluation did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Evaluated {
    /// Whether it wrote any agent's state.
    pub wrote: bool,
    /// It left its decisions unwritten for a newer fact already queued (see [`Deferral`]).
    pub deferred: bool,
    /// The mirror lacked a commit the gate needed: fetch, then evaluate again. Holds the
    /// mirror's fetch mark ([`Mirrors::fetched`]) when it was read.
    pub mirror_behind: Option<u64>,
}

/// A decided change of one agent, not yet written.
struct Pending {
    agent: String,
    /// The incarnation of the agent it was decided for.
    incarnation: u64,
    read: Held,
    next: Arc<AgentState>,
    change: Arc<Change>,
}

/// What one decision changes, shared by the agents decided alike.
struct Change {
    step: Step,
    deployed: DeployedChange,
}

impl Change {
    /// The change from `read` to `next` made by `step`.
    fn new(read: &AgentState, next: &AgentState, step: Step) -> Self {
        Self {
            deployed: DeployedChange::between(&read.gate.deployed, &next.gate.deployed),
            step,
        }
    }
}

/// An agent's state as this replica read or wrote it.
///
/// The state is shared between the cache and the evaluations using it, and between the
/// agents of a ref that were decided alike: it holds up to 50 decisions and 256 deployed
/// commits, and copying and deciding it per agent and evaluation made allocation most of an
/// evaluation's cost.
type Held = AgentRead<Arc<AgentState>>;

/// Distinct states kept for sharing, per gate setting among decided states and per read among
/// states read from the store.
const DISTINCT_RESULTS: usize = 4;

/// Runs the gate: see the module documentation.
pub struct Evaluator {
    store: Arc<dyn Store>,
    catalog: Arc<LiveCatalog>,
    mirrors: Mirrors,
    index: Arc<Index>,
    replica: String,
    /// Refs to evaluate, with who asked.
    queue: Coalescing<RefKey, Asked>,
    /// Shards whose lease this replica holds.
    held: Mutex<HashSet<u16>>,
    /// Whether this replica has tried every shard's lease once since it started.
    leases_tried: std::sync::atomic::AtomicBool,
    /// Agents' states as this replica last wrote or read them.
    cache: Mutex<HashMap<String, Held>>,
    /// Agents whose desired revision this replica just decided and that no stream of this
    /// replica follows: their manifests are read (and failures recorded) even if no stream
    /// of theirs is connected anywhere.
    prepare: Coalescing<String, Sha>,
    /// Refs whose watchers may hold a fetch error: every ref until this replica's first
    /// successful fetch of it (another replica, or this one before a restart, may have
    /// recorded one), then only after a failed fetch.
    fetch_errors_cleared: Mutex<HashSet<RefKey>>,
    /// Why agents' desired revisions cannot be delivered, stored in batches.
    sync_errors: Arc<SyncErrors>,
    metrics: Arc<Metrics>,
    tasks: TaskTracker,
}

impl Evaluator {
    /// An evaluator for the agents of `catalog`.
    pub fn new(
        store: Arc<dyn Store>,
        catalog: Arc<LiveCatalog>,
        mirrors: Mirrors,
        index: Arc<Index>,
        replica: String,
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Self {
            sync_errors: SyncErrors::new(store.clone()),
            store,
            catalog,
            mirrors,
            index,
            replica,
            queue: Coalescing::default(),
            held: Mutex::new(HashSet::new()),
            leases_tried: std::sync::atomic::AtomicBool::new(false),
            cache: Mutex::new(HashMap::new()),
            prepare: Coalescing::default(),
            fetch_errors_cleared: Mutex::new(HashSet::new()),
            metrics,
            tasks,
        })
    }

    /// Whether every shard's lease was tried once: before, a fact heard of on a shard this
    /// replica is about to take would be evaluated by the takeover, without its trace.
    pub fn leases_tried(&self) -> bool {
        self.leases_tried.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Asks for `key` to be evaluated, if this replica holds its shard, as part of the trace
    /// `traceparent` when the request that asked was traced.
    pub fn enqueue(&self, key: &RefKey, asked: Asked) {
        if self.holds(key.shard()) {
            self.queue.push_merging(key, asked, Asked::merge);
        }
    }

    /// Asks for every ref this replica holds to be evaluated: at start, after the change
    /// log lost entries, and periodically as a safety net.
    pub fn enqueue_all(&self) {
        for key in self.catalog.load().refs() {
            self.enqueue(key, Asked::default());
        }
    }

    /// Hears that `agent`'s state was written at `version`, by this replica or another: a
    /// cached older state is dropped, to be read again when next needed.
    pub fn heard(&self, agent: &str, version: u64) {
        let mut cache = self.lock_cache();
        if cache.get(agent).is_some_and(|held| held.version < version) {
            cache.remove(agent);
        }
    }

    /// Drops the cached state of `agent`, deleted or changed at runtime.
    pub fn forget_agent(&self, agent: &str) {
        self.lock_cache().remove(agent);
    }

    /// Drops every cached state: the store may have lost its data.
    pub fn forget_cache(&self) {
        self.lock_cache().clear();
    }

    fn holds(&self, shard: u16) -> bool {
        self.lock_held().contains(&shard)
    }

    /// Takes and renews shard leases, evaluates queued refs and reads decided revisions'
    /// manifests until `shutdown`; then gives the leases up.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        self.tasks
            .spawn(self.sync_errors.clone().run(shutdown.clone()));
        for worker in 0..EVALUATORS {
            let this = self.clone();
            let stop = shutdown.clone();
            self.tasks.spawn(
                async move { this.evaluate_queued(stop).await }
                    .instrument(tracing::info_span!("evaluator", worker)),
            );
        }
        for worker in 0..PREPARE_WORKERS {
            let this = self.clone();
            let stop = shutdown.clone();
            self.tasks.spawn(
                async move { this.prepare_manifests(stop).await }
                    .instrument(tracing::info_span!("prepare_manifests", worker)),
            );
        }
        let mut renew = tokio::time::interval(LEASE_RENEW);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = renew.tick() => {
                    self.keep_leases().await;
                    self.leases_tried.store(true, std::sync::atomic::Ordering::Release);
                }
            }
        }
        let held: Vec<u16> = self.lock_held().drain().collect();
        for shard in held {
            if let Err(error) = self.store.release_lease(shard, &self.replica).await {
                debug!(%error, shard, "cannot release a lease; it expires");
            }
        }
    }

    async fn keep_leases(&self) {
        // All at once: one after another, a slow store would make the last renewals late
        // enough for the leases to lapse.
        let renewals = futures_util::future::join_all((0..SHARDS).map(|shard| async move {
            match self.store.hold_lease(shard, &self.replica, LEASE_TTL).await {
                Ok(held) => held,
                Err(error) => {
                    debug!(%error, shard, "cannot renew a lease");
                    // Without the store this replica cannot tell whether another took
                    // over: stop evaluating until it can.
                    false
                }
            }
        }))
        .await;
        for (shard, held) in (0..SHARDS).zip(renewals) {
            let was = {
                let mut shards = self.lock_held();
                if held {
                    !shards.insert(shard)
                } else {
                    shards.remove(&shard)
                }
            };
            if held && !was {
                info!(shard, "evaluating the refs of a shard");
                for key in self
                    .catalog
                    .load()
                    .refs()
                    .filter(|key| key.shard() == shard)
                {
                    // Another holder may have recorded fetch errors meanwhile.
                    self.lock_fetch_errors_cleared().remove(key);
                    self.queue.push_merging(key, Asked::default(), Asked::merge);
                }
            } else if !held && was {
                info!(shard, "another replica evaluates the refs of a shard now");
                let mut cache = self.lock_cache();
                for key in self
                    .catalog
                    .load()
                    .refs()
                    .filter(|key| key.shard() == shard)
                {
                    for agent in self.catalog.load().watchers(key) {
                        cache.remove(agent);
                    }
                }
            }
        }
    }

    async fn evaluate_queued(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let (key, asked) = tokio::select! {
                _ = shutdown.cancelled() => return,
                job = self.queue.next() => job,
            };
            if self.holds(key.shard()) {
                self.evaluate_job(&key, asked).await;
            }
            self.queue.done(&key);
        }
    }

    /// Evaluates `key` as `asked`, and queues what follows: a deferred evaluation, a retry
    /// after an error, a fetch for a mirror found behind.
    async fn evaluate_job(self: &Arc<Self>, key: &RefKey, asked: Asked) {
        let span = tracing::info_span!("evaluate", %key, trace_id = tracing::field::Empty);
        greenlight::telemetry::adopt(&span, asked.traceparent.as_deref());
        let deferral = if asked.deferred_once {
            Deferral::Refused
        } else {
            Deferral::Allowed
        };
        match self.evaluate_with(key, deferral).instrument(span).await {
            Ok(outcome) if outcome.deferred => {
                self.queue.push_merging(key, asked.deferred(), Asked::merge);
                // The next evaluation would find the mirror behind too: fetch now.
                if let Some(seen) = outcome.mirror_behind {
                    self.fetch_then_reevaluate(key.clone(), None, Some(seen));
                }
            }
            Ok(outcome) => {
                if outcome.wrote
                    && let Some(since) = asked.since_ms
                {
                    let took = now_ms().saturating_sub(since).max(0);
                    self.metrics
                        .fact_decided(Duration::from_millis(took.unsigned_abs()));
                }
                if let Some(seen) = outcome.mirror_behind {
                    self.fetch_then_reevaluate(key.clone(), asked.traceparent, Some(seen));
                }
            }
            Err(error) => {
                warn!(%error, %key, "cannot evaluate ref; will retry");
                // Retried once the key is released: paced so that a store that is down is
                // not asked in a tight loop.
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.queue.push_merging(key, asked, Asked::merge);
            }
        }
    }

    /// Runs the gate of every agent watching `key` against its recorded facts, and writes
    /// what changed.
    pub async fn evaluate(&self, key: &RefKey) -> Result<Evaluated, EvaluateError> {
        self.evaluate_with(key, Deferral::Refused).await
    }

    /// [`Self::evaluate`], unless `deferral` allows it to leave its decisions to the
    /// evaluation of a newer fact already queued.
    async fn evaluate_with(
        &self,
        key: &RefKey,
        deferral: Deferral,
    ) -> Result<Evaluated, EvaluateError> {
        let facts = self.store.facts(key).await?;
        let refs = facts.ref_state();
        self.forget_trimmed(key, &facts, &refs).await;
        let watchers: Vec<String> = self.catalog.load().watchers(key).to_vec();
        let mut states = self.states(&watchers).await?;
        self.settle_foreign(key, &mut states).await?;
        let decided_from = states.values().map(|state| state.value.position).max();
        let facts = self
            .not_behind(key, facts, decided_from.unwrap_or(0))
            .await?;
        let mut outcome = Evaluated::default();
        // After a conflict only the agents that lost it are decided again: the others'
        // writes went through, and deciding them from their old reads would only conflict.
        let mut deciding = watchers;
        for attempt in 0..MAX_ATTEMPTS {
            let anchors: Vec<Sha> = states
                .values()
                .filter_map(|s| s.value.gate.position.as_ref().map(|r| r.sha.clone()))
                .collect();
            let (git, behind) = self.git_lineage(key, &refs, &anchors, None).await;
            outcome.mirror_behind = outcome.mirror_behind.max(behind);
            let pending = {
                let _span = tracing::info_span!("evaluate_gate", %key, attempt).entered();
                self.decide(key, &facts, &refs, git.as_ref(), &deciding, &states)
            };
            if attempt == 0
                && deferral == Deferral::Allowed
                && !pending.is_empty()
                && self.newer_fact_queued(key, facts.position)
            {
                debug!(%key, position = facts.position, "a newer fact is queued; deferring");
                outcome.deferred = true;
                return Ok(outcome);
            }
            outcome.wrote |= !pending.is_empty();
            // A newer fact that comes while a fan-out is written stops it between store
            // steps, as it would have deferred it had it come before the decision.
            let stop_after =
                (attempt == 0 && deferral == Deferral::Allowed).then_some((key, facts.position));
            let written = self.write(pending, stop_after).await?;
            let withheld = written.iter().any(|(_, w)| *w == Written::Withheld);
            if withheld && stop_after.is_some() {
                debug!(%key, position = facts.position, "a newer fact is queued; deferring the agents not yet written");
                outcome.deferred = true;
                return Ok(outcome);
            }
            // A write withheld unasked is tried again, as one that lost a conflict; one
            // refused as for another agent reads the record again to see whose it is.
            let conflicted: Vec<String> = written
                .into_iter()
                .filter_map(|(agent, written)| {
                    matches!(
                        written,
                        Written::Conflict | Written::Withheld | Written::Replaced
                    )
                    .then_some(agent)
                })
                .collect();
            if conflicted.is_empty() {
                return Ok(outcome);
            }
            debug!(%key, attempt, agents = conflicted.len(), "concurrent updates; retrying");
            for (agent, state) in readable_agents(&*self.store, &conflicted).await? {
                states.insert(agent, state.map(Arc::new));
            }
            self.settle_foreign(key, &mut states).await?;
            deciding = conflicted;
        }
        Err(EvaluateError::Contention(key.to_string()))
    }

    /// `facts` of `key`, their position raised to `decided_from` (the newest an agent was
    /// decided from) when below it. There the store lost the ref's newest writes but not the
    /// agents' (a Redis Cluster failover to a replica that had not received them): every
    /// decision and operator action would be refused as older than the agents' until as
    /// many facts came again. What was lost stays lost; the gates never move back.
    async fn not_behind(
        &self,
        key: &RefKey,
        mut facts: Facts,
        decided_from: u64,
    ) -> Result<Facts, StoreError> {
        if decided_from <= facts.position {
            return Ok(facts);
        }
        warn!(
            %key,
            position = facts.position,
            decided_from,
            "the ref's facts are older than its agents' decisions: the store lost its newest \
             writes (or a file agent's ref was changed); going on from the agents' position"
        );
        facts.position = self.store.raise_position(key, decided_from).await?;
        self.metrics.facts_position_raised();
        Ok(facts)
    }

    /// Takes out of `states` those that belong to another incarnation of their agent than
    /// the catalog's. When the registry agrees with the catalog, such a record is a leftover
    /// of an agent deleted since (written in a race its successor's claim could not close,
    /// or by a replica of an earlier version), which would refuse every write of the agent
    /// registered: it is given to that agent, empty, and the ref evaluated again. Otherwise
    /// this replica has not heard of a change yet, and the evaluation it brings decides the
    /// agent.
    async fn settle_foreign(
        &self,
        key: &RefKey,
        states: &mut HashMap<String, Held>,
    ) -> Result<(), StoreError> {
        let catalog = self.catalog.load();
        let foreign: Vec<(String, u64, u64)> = states
            .iter()
            .filter_map(|(agent, read)| {
                let spec = catalog.agent(agent)?;
                (!same_incarnation(read.incarnation, spec.incarnation))
                    .then(|| (agent.clone(), read.incarnation, spec.incarnation))
            })
            .collect();
        let mut given = false;
        for (agent, held, current) in foreign {
            states.remove(&agent);
            self.lock_cache().remove(&agent);
            given |= self.give_if_registered(&agent, held, current).await?;
        }
        if given {
            self.queue.push_merging(key, Asked::default(), Asked::merge);
        }
        Ok(())
    }

    /// Gives `agent`'s record, held by incarnation `held`, to incarnation `current`, empty,
    /// if the registry holds `current` under the name; returns whether the record is
    /// `current`'s now. Otherwise this replica has not heard of a change of the agent yet.
    async fn give_if_registered(
        &self,
        agent: &str,
        held: u64,
        current: u64,
    ) -> Result<bool, StoreError> {
        let registered = self.store.registered(agent).await?;
        if registered.is_none_or(|record| record.value.incarnation() != current) {
            debug!(
                agent,
                held, "a state of an agent this replica has not heard of yet"
            );
            return Ok(false);
        }
        warn!(
            agent,
            held,
            registered = current,
            "the agent's stored state belongs to an agent deleted since; starting it afresh"
        );
        self.store.give_agent(agent, held, current).await
    }

    /// Whether a fact of `key` newer than `position` waits in the queue.
    fn newer_fact_queued(&self, key: &RefKey, position: u64) -> bool {
        self.queue
            .peek(key, |asked| asked.position > position)
            .unwrap_or(false)
    }

    /// The stored states of `agents`: cached ones as held, the rest read in one go; an agent
    /// whose record cannot be read is left out, and so not decided.
    async fn states(&self, agents: &[String]) -> Result<HashMap<String, Held>, StoreError> {
        let mut states = HashMap::with_capacity(agents.len());
        let mut missing = Vec::new();
        {
            let cache = self.lock_cache();
            for agent in agents {
                match cache.get(agent) {
                    Some(state) => {
                        states.insert(agent.clone(), state.clone());
                    }
                    None => missing.push(agent.clone()),
                }
            }
        }
        if !missing.is_empty() {
            let read = readable_agents(&*self.store, &missing).await?;
            let mut cache = self.lock_cache();
            // Agents read one by one (after a restart, say) that hold the same state share
            // one copy, as they did when it was written: a quiet ref may not be decided again
            // for days, and each copy holds a whole history.
            let mut seen = Vec::new();
            for (agent, state) in read {
                let state = state.map(|value| share(&mut seen, value));
                cache.insert(agent.clone(), state.clone());
                states.insert(agent, state);
            }
        }
        Ok(states)
    }

    /// The gate's step for each agent of `watchers` whose state it changes.
    fn decide(
        &self,
        key: &RefKey,
        facts: &Facts,
        refs: &RefState,
        git: Option<&GitLineage>,
        watchers: &[String],
        states: &HashMap<String, Held>,
    ) -> Vec<Pending> {
        let lineage = RefLineage::new(refs, git);
        let now = now_ms();
        let trace = greenlight::telemetry::traceparent(&tracing::Span::current());
        let catalog = self.catalog.load();
        // One context per gate setting: what it works out about the ref once serves every
        // agent with that setting.
        let mut contexts: Vec<Context<'_>> = Vec::new();
        // Agents decided alike hold the same state: it is decided once per setting.
        type Decided = Option<(Arc<AgentState>, Arc<Change>)>;
        let mut decided: HashMap<(usize, *const AgentState), Decided> = HashMap::new();
        let mut distinct: Vec<Vec<Arc<AgentState>>> = Vec::new();
        let mut pending = Vec::new();
        for agent in watchers {
            // The watchers were listed as the evaluation began: an agent deleted since may
            // have been created again under its name, watching another ref.
            let Some(spec) = catalog.agent(agent).filter(|spec| watches(spec, key)) else {
                continue;
            };
            // A state of another agent once under this name (see `settle_foreign`): deciding
            // it would write one agent's gate into the other's record.
            let Some(read) = states
                .get(agent)
                .filter(|read| same_incarnation(read.incarnation, spec.incarnation))
            else {
                continue;
            };
            let stages = spec.required_stages.as_slice();
            let at = match contexts
                .iter()
                .position(|cx| cx.mode == spec.mode && cx.stages == stages)
            {
                Some(at) => at,
                None => {
                    contexts.push(Context::new(spec.mode, stages, refs, &lineage, now));
                    distinct.push(Vec::new());
                    contexts.len() - 1
                }
            };
            let result = decided
                .entry((at, Arc::as_ptr(&read.value)))
                .or_insert_with(|| {
                    let (next, step) = rules::advance(
                        &read.value,
                        &contexts[at],
                        facts.position,
                        trace.as_deref(),
                    )?;
                    let change = Change::new(&read.value, &next, step);
                    let next = share(&mut distinct[at], next);
                    Some((next, Arc::new(change)))
                });
            if let Some((next, change)) = result {
                pending.push(Pending {
                    agent: agent.clone(),
                    incarnation: spec.incarnation,
                    read: read.clone(),
                    next: next.clone(),
                    change: change.clone(),
                });
            }
        }
        pending
    }

    /// Writes `pending` in as few store steps as the store allows; each agent saved is in
    /// this replica's streams and cache as soon as its step is done, not after the last
    /// one, and a new desired revision's manifests are read. With `stop_after` (a ref and
    /// the facts' position the decisions were made from), no step starts once a newer fact
    /// of that ref is queued: the writes left are withheld. Returns each agent with what
    /// became of its write.
    async fn write(
        &self,
        pending: Vec<Pending>,
        stop_after: Option<(&RefKey, u64)>,
    ) -> Result<Vec<(String, Written)>, StoreError> {
        let writes = AgentWrites::of(pending.iter().map(|change| AgentWrite {
            agent: &change.agent,
            incarnation: change.incarnation,
            expected: change.read.version,
            state: &change.next,
            decisions: &change.change.step.decisions,
            deployed: &change.change.deployed,
        }));
        // A fan-out to thousands of agents takes the store many steps: the agents of the
        // first are sent to while the rest are written.
        let mut told = |step: &[(usize, Written)]| {
            // Agents decided alike share a change: its decisions are counted once, by the
            // agents saved, step by step so that a later step's failure loses no count.
            let mut saved_by_change = vec![0u64; writes.changes().len()];
            for &(at, written) in step {
                if let Some(change) = pending.get(at) {
                    self.saved(change, written);
                }
                if let (Written::Saved { .. }, Some(queued)) = (written, writes.agents().get(at))
                    && let Some(saved) = saved_by_change.get_mut(queued.change)
                {
                    *saved += 1;
                }
            }
            for (change, agents) in writes.changes().iter().zip(saved_by_change) {
                if agents > 0 {
                    self.metrics.decided(change.decisions, agents);
                }
            }
            match stop_after {
                Some((key, position)) if self.newer_fact_queued(key, position) => {
                    ControlFlow::Break(())
                }
                _ => ControlFlow::Continue(()),
            }
        };
        let written = self
            .store
            .write_agents_telling(&writes, &mut told)
            .instrument(tracing::info_span!(
                "write_agents",
                agents = writes.agents().len(),
                changes = writes.changes().len()
            ))
            .await?;
        Ok(pending
            .into_iter()
            .zip(written)
            .map(|(change, written)| (change.agent, written))
            .collect())
    }

    /// Puts what became of `change`'s write in this replica's streams and cache.
    fn saved(&self, change: &Pending, written: Written) {
        let version = match written {
            Written::Saved { version } => version,
            // Someone else's write won, or the agent is gone: the next evaluation reads the
            // agent again.
            Written::Conflict | Written::Stale | Written::Replaced => {
                self.lock_cache().remove(&change.agent);
                return;
            }
            // The store holds what the cache holds.
            Written::Withheld => return,
        };
        let desired = change.next.gate.desired.as_ref();
        self.index.offer(
            &change.agent,
            change.incarnation,
            version,
            desired,
            change.next.traceparent.as_deref(),
            false,
        );
        // An agent streaming here has its manifests read by its stream as it sends;
        // preparing them too cost a queued job per agent of a fan-out. A stream that ends
        // before it reads them has them prepared then (`stream_ended`).
        if change.change.step.desired_changed
            && let Some(desired) = desired
            && !self.index.streamed_here(&change.agent)
        {
            self.prepare.push(change.agent.clone(), desired.sha.clone());
        }
        let saved = AgentRead {
            version,
            incarnation: change.incarnation,
            value: change.next.clone(),
        };
        self.lock_cache().insert(change.agent.clone(), saved);
    }

    /// Carries out an operator's request on `agent`, on whichever replica it arrives: the
    /// conditional write keeps it from racing the ref's evaluator.
    pub async fn operate(&self, agent: &str, operation: Operation) -> Result<(), EvaluateError> {
        let spec = self
            .catalog
            .load()
            .agent_arc(agent)
            .ok_or_else(|| EvaluateError::UnknownAgent(agent.to_owned()))?;
        let key = ref_key(&spec);
        let target = rules::subject(&operation).cloned();
        for _ in 0..MAX_ATTEMPTS {
            let read = self.store.agent(agent).await?;
            if !same_incarnation(read.incarnation, spec.incarnation) {
                if self
                    .give_if_registered(agent, read.incarnation, spec.incarnation)
                    .await?
                {
                    // The ref's other agents are decided again too, as after any change.
                    self.enqueue(&key, Asked::default());
                    continue;
                }
                return Err(EvaluateError::Replaced(agent.to_owned()));
            }
            let facts = self.store.facts(&key).await?;
            let facts = self.not_behind(&key, facts, read.value.position).await?;
            let refs = facts.ref_state();
            let anchors: Vec<Sha> = read
                .value
                .gate
                .position
                .iter()
                .map(|r| r.sha.clone())
                .collect();
            let (git, _) = self
                .git_lineage(&key, &refs, &anchors, target.as_ref())
                .await;
            let trace = greenlight::telemetry::traceparent(&tracing::Span::current());
            let (next, step) = {
                let lineage = RefLineage::new(&refs, git.as_ref());
                let cx = Context::new(
                    spec.mode,
                    spec.required_stages.as_slice(),
                    &refs,
                    &lineage,
                    now_ms(),
                );
                rules::operate(
                    &read.value,
                    &cx,
                    facts.position,
                    &operation,
                    trace.as_deref(),
                )?
            };
            let change = Pending {
                agent: agent.to_owned(),
                incarnation: spec.incarnation,
                change: Arc::new(Change::new(&read.value, &next, step)),
                read: read.map(Arc::new),
                next: Arc::new(next),
            };
            let written = self.write(vec![change], None).await?;
            match written.as_slice() {
                [(_, Written::Saved { .. })] => return Ok(()),
                [(_, Written::Replaced)] => return Err(EvaluateError::Replaced(agent.to_owned())),
                _ => {}
            }
        }
        Err(EvaluateError::Contention(agent.to_owned()))
    }

    /// Forgets pipeline records the gate no longer keeps, once enough have piled up.
    async fn forget_trimmed(&self, key: &RefKey, facts: &Facts, refs: &RefState) {
        let kept: usize = refs.pipelines.values().map(Vec::len).sum();
        if facts.pipelines.len() <= kept + FORGET_SLACK {
            return;
        }
        let forget: Vec<(Sha, u64)> = facts
            .pipelines
            .iter()
            .filter(|(sha, pipeline)| {
                refs.pipelines
                    .get(sha)
                    .is_none_or(|runs| runs.iter().all(|run| run.id != pipeline.id))
            })
            .map(|(sha, pipeline)| (sha.clone(), pipeline.id))
            .collect();
        if let Err(error) = self.store.forget_pipelines(key, &forget).await {
            debug!(%error, %key, "cannot forget trimmed pipelines; later");
        }
    }

    /// Git's view of the heads of `refs`, the facts of `key`, as the gate would read it;
    /// `None` when the ref has no repository.
    pub async fn lineage_of(&self, key: &RefKey, refs: &RefState) -> Option<GitLineage> {
        self.git_lineage(key, refs, &[], None).await.0
    }

    /// Git's view of the commits the gate may decide about (`None` when the ref has no
    /// repository: push order decides), and, when the mirror lacks any of them, the
    /// mirror's fetch mark before it was read.
    async fn git_lineage(
        &self,
        key: &RefKey,
        refs: &RefState,
        anchors: &[Sha],
        subject: Option<&Sha>,
    ) -> (Option<GitLineage>, Option<u64>) {
        let Some(source) = self.catalog.load().source(key).cloned() else {
            return (None, None);
        };
        let seen = self.mirrors.fetched(&source);
        let mut candidates: Vec<Sha> = refs.current_heads().map(|h| h.sha.clone()).collect();
        candidates.extend(subject.cloned());
        let mut anchors = anchors.to_vec();
        anchors.sort();
        anchors.dedup();
        match self
            .mirrors
            .lineage(&source, &key.branch, &candidates, &anchors)
            .await
        {
            Ok(lineage) => {
                let behind = subject.is_some_and(|sha| !lineage.knows(sha))
                    || anchors.iter().any(|sha| !lineage.knows(sha))
                    || refs.head().is_some_and(|head| !lineage.knows(&head.sha));
                (Some(lineage), behind.then_some(seen))
            }
            Err(error) => {
                // Knowing nothing holds every agent where it is until a fetch succeeds.
                debug!(%error, %key, "no lineage from the mirror yet");
                (Some(GitLineage::default()), Some(seen))
            }
        }
    }

    /// Fetches the repository of `key` in the background, retrying with backoff, then
    /// evaluates it again, in the trace `traceparent` of what asked for it. Fetches of one
    /// repository are coalesced by the mirror; with `seen`, the mirror's fetch mark when an
    /// evaluation found it behind, a fetch that finished since (or is running) serves
    /// instead of a new one.
    pub fn fetch_then_reevaluate(
        self: &Arc<Self>,
        key: RefKey,
        traceparent: Option<String>,
        seen: Option<u64>,
    ) {
        let Some(source) = self.catalog.load().source(&key).cloned() else {
            return;
        };
        let this = self.clone();
        let repository = crate::git::display_url(&source.url);
        let span =
            tracing::info_span!("fetch", %repository, %key, trace_id = tracing::field::Empty);
        greenlight::telemetry::adopt(&span, traceparent.as_deref());
        self.tasks.spawn(
            async move {
                let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
                let mut seen = seen;
                for _ in 0..FETCH_ATTEMPTS {
                    let fetched = match seen.take() {
                        Some(seen) => this.mirrors.fetch_unless_fetched_since(&source, seen).await,
                        None => this.mirrors.fetch(&source).await,
                    };
                    match fetched {
                        Ok(()) => {
                            this.clear_fetch_errors(&key).await;
                            let asked = Asked {
                                traceparent,
                                ..Asked::default()
                            };
                            this.queue.push_merging(&key, asked, Asked::merge);
                            return;
                        }
                        Err(error) => {
                            warn!(%error, "fetch failed");
                            let failure = SyncError::Fetch {
                                message: format!("cannot fetch {repository}: {error}"),
                            };
                            this.lock_fetch_errors_cleared().remove(&key);
                            for agent in this.catalog.load().watchers(&key) {
                                this.note_sync_error(agent, Some(failure.clone()));
                            }
                            if !error.retryable() {
                                return;
                            }
                        }
                    }
                    tokio::time::sleep(backoff.delay()).await;
                }
            }
            .instrument(span),
        );
    }

    /// Hears that a stream of `agent` ended having read the manifests of `read` last (or
    /// found the agent holding it). A desired revision the stream never read was not
    /// prepared when it was decided (the stream was to read it), so it is prepared now,
    /// unless another stream here follows the agent: a broken revision then shows while the
    /// agent is away, as it does for an agent that was away all along. Called once the
    /// stream no longer follows the agent, so that a decision made meanwhile is prepared
    /// either here or by the evaluation that made it.
    pub fn stream_ended(&self, agent: &str, read: Option<&Sha>) {
        if self.index.streamed_here(agent) {
            return;
        }
        let due = self
            .index
            .current(agent)
            .and_then(|desired| desired.revision)
            .map(|revision| revision.sha);
        if let Some(due) = due
            && read != Some(&due)
        {
            self.prepare.push(agent.to_owned(), due);
        }
    }

    /// Reads the manifests of newly decided revisions until `shutdown`, so that a broken
    /// revision shows on its agent even while the agent is offline.
    async fn prepare_manifests(&self, shutdown: CancellationToken) {
        loop {
            let (agent, sha) = tokio::select! {
                _ = shutdown.cancelled() => return,
                job = self.prepare.next() => job,
            };
            if let Some(spec) = self.catalog.load().agent(&agent)
                && let Err(error) = manifests(&self.mirrors, spec, &sha).await
            {
                let failure = SyncError::Manifests {
                    message: format!("cannot deliver {}: {error}", sha.short()),
                };
                self.note_sync_error(&agent, Some(failure));
            }
            self.prepare.done(&agent);
        }
    }

    /// After a successful fetch of `key`'s repository, clears the fetch errors its watchers
    /// may hold. Reading every watcher's error costs a store round trip each (ten thousand
    /// on a large ref), so it is done only where an error may be: see
    /// `fetch_errors_cleared`.
    async fn clear_fetch_errors(&self, key: &RefKey) {
        if self.lock_fetch_errors_cleared().contains(key) {
            return;
        }
        let watchers = self.catalog.load().watchers(key).to_vec();
        let cleared = stream::iter(watchers)
            .map(|agent| async move {
                match self.sync_errors.get(&agent).await {
                    Ok(Some(SyncError::Fetch { .. })) => {
                        self.note_sync_error(&agent, None);
                        true
                    }
                    Ok(_) => true,
                    Err(error) => {
                        warn!(%error, agent, "cannot read the sync error");
                        false
                    }
                }
            })
            .buffer_unordered(SYNC_ERROR_READS_IN_FLIGHT)
            .fold(true, |all, ok| async move { all && ok })
            .await;
        if cleared {
            self.lock_fetch_errors_cleared().insert(key.clone());
        }
    }

    fn lock_fetch_errors_cleared(&self) -> std::sync::MutexGuard<'_, HashSet<RefKey>> {
        self.fetch_errors_cleared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Records why `agent`'s desired revision cannot be delivered, or clears it.
    pub fn note_sync_error(&self, agent: &str, error: Option<SyncError>) {
        self.sync_errors.note(agent, error);
    }

    /// Why `agent`'s desired revision cannot be delivered, if it cannot.
    pub async fn sync_error(&self, agent: &str) -> Result<Option<SyncError>, StoreError> {
        self.sync_errors.get(agent).await
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        // Each change is one statement: the cache stays consistent under a poisoned lock.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashSet<u16>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `next`, or an equal state among `seen` so that agents decided alike share one copy.
fn share(seen: &mut Vec<Arc<AgentState>>, next: AgentState) -> Arc<AgentState> {
    if let Some(same) = seen.iter().find(|state| ***state == next) {
        return same.clone();
    }
    let next = Arc::new(next);
    if seen.len() < DISTINCT_RESULTS {
        seen.push(next.clone());
    }
    next
}

/// The manifests of `sha` for `agent`: `None` when the agent has no repository.
pub async fn manifests(
    mirrors: &Mirrors,
    agent: &AgentSpec,
    sha: &Sha,
) -> Result<Option<Arc<ManifestSet>>, GitError> {
    let Some(source) = &agent.source else {
        return Ok(None);
    };
    mirrors.manifests(source, sha, &agent.paths).await.map(Some)
}
