//! Where facts, per-agent state and the change log live: narrow traits, one per concern,
//! each implemented by the embedded store (one replica, zero setup) and by Redis (durable,
//! shared by every replica).
//!
//! - Facts are small records merged commutatively: recording one is a single atomic step
//!   that refuses a redelivery, merges the fact and appends it to the change log.
//! - Each agent's gate state is its own record, written only if its version is the one read
//!   and the facts it was decided from are at least as new as those of the stored state.
//! - The change log, sharded by hash tag, carries every change to every replica, which
//!   resumes from the last entry it processed; commit statuses are derived from it by
//!   whichever replica is alive to post them.

mod connection;
mod disk;
mod embedded;
mod records;
mod redis;
mod registry;

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::gate::{AgentGate, Decision, Pipeline, Push, RefState, Rejected, Revision, Sha};

pub(crate) use connection::{Conn as RedisConn, Source as RedisSource};
pub use embedded::EmbeddedStore;
pub use records::LAYOUT_VERSION;
pub use redis::RedisStore;
pub use registry::{RegisteredAgent, Registry, RegistryRecord, RegistryStore, RegistryWritten};

/// Redeliveries are recognised for this long after the first delivery.
pub const DELIVERY_MEMORY_SECS: u64 = 7 * 24 * 3600;

/// Claimed commit statuses are remembered this long.
pub const STATUS_MEMORY_SECS: u64 = 30 * 24 * 3600;

/// A presence record without a refresh for this long belongs to a dead replica.
pub const PRESENCE_TTL_SECS: u64 = 300;

/// How often a replica marks itself alive ([`PresenceStore::mark_alive`]).
pub const REPLICA_BEAT: Duration = Duration::from_secs(5);

/// A replica that marked itself alive and then stayed silent this long is dead to the
/// others' status publishers: what its publisher held is handed to them at once, rather
/// than after the status takeover time. Six beats, so that a slow store or a replica's
/// busy moment is not taken for death.
pub const REPLICA_SILENT: Duration = Duration::from_secs(30);

/// Entries each shard of the change log keeps, approximately. A replica that falls further
/// behind than this re-reads every agent's state once instead of resuming.
pub const LOG_MAX_ENTRIES: usize = 10_000;

/// Shards of the change log and of the evaluation leases. Every key of a ref, and every key
/// of an agent, carries its shard's hash tag, so that what changes atomically shares a
/// Redis Cluster slot while the shards spread over the cluster.
pub const SHARDS: u16 = 16;

/// Push records kept per ref: enough to rebuild the heads the gate keeps.
pub const PUSHES_KEPT: usize = 4 * crate::gate::MAX_HEADS;

/// Why the store could not serve a request.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {}", explain_redis(.0))]
    Redis(#[from] ::redis::RedisError),
    #[error("stored record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "the store under prefix {prefix:?} holds data in an older layout ({found}); this version \
         cannot read it. Point `redis.key_prefix` at a new prefix (the gate starts afresh: \
         agents keep running what they have and receive the next green commit), or delete the \
         old keys with `redis-cli --scan --pattern '{prefix}:*' | xargs redis-cli unlink`"
    )]
    OldLayout { prefix: String, found: String },
    #[error("embedded database: {0}")]
    Embedded(String),
}

/// A Redis error as an operator can act on it.
fn explain_redis(error: &::redis::RedisError) -> String {
    match error.kind() {
        ::redis::ErrorKind::RESP3NotSupported => format!(
            "the server does not speak RESP3 (it refused HELLO 3): Greenlight needs Redis 6.2 \
             or later ({error})"
        ),
        _ => error.to_string(),
    }
}

/// Shorthand for store results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One watched (project, branch).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RefKey {
    pub project: String,
    pub branch: String,
}

impl std::fmt::Display for RefKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.project, self.branch)
    }
}

impl RefKey {
    /// The shard of this ref's keys, log entries and evaluation lease.
    pub fn shard(&self) -> u16 {
        shard_of(&[self.project.as_bytes(), b"@", self.branch.as_bytes()])
    }
}

/// The shard of an agent's keys and log entries.
pub fn agent_shard(agent: &str) -> u16 {
    shard_of(&[agent.as_bytes()])
}

/// FNV-1a over `parts`: stable across versions and platforms, unlike std's hasher, since
/// every replica must agree where a key lives.
fn shard_of(parts: &[&[u8]]) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in parts.iter().flat_map(|part| part.iter()) {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % u32::from(SHARDS)) as u16
}

/// A value and the version it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// 0 when nothing is stored yet.
    pub version: u64,
    pub value: T,
}

impl<T> Versioned<T> {
    /// The same version of `f(value)`.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Versioned<U> {
        Versioned {
            version: self.version,
            value: f(self.value),
        }
    }
}

/// An agent's state as read, with the version of its record and the incarnation of the
/// agent the record belongs to (0 when not recorded): an evaluation that read the state of
/// an agent deleted since must not take it for the new agent's of the same name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentRead<T = AgentState> {
    /// 0 when nothing is stored yet.
    pub version: u64,
    pub incarnation: u64,
    pub value: T,
}

impl<T> AgentRead<T> {
    /// The same record, holding `f(value)`.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> AgentRead<U> {
        AgentRead {
            version: self.version,
            incarnation: self.incarnation,
            value: f(self.value),
        }
    }
}

/// A fact as it is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FactRecord {
    Push(Push),
    Pipeline {
        sha: Sha,
        pipeline: Pipeline,
    },
    /// A pipeline claim GitLab's API contradicted, kept for operators.
    Rejected(Rejected),
}

/// What recording a fact did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// Merged, at this position of the ref's facts.
    Recorded { position: u64 },
    /// Nothing new (a stale pipeline update); the delivery is remembered.
    Unchanged,
    /// The delivery was recorded before; nothing was written.
    Duplicate,
}

/// Everything recorded about one ref, as the evaluator rebuilds the gate's view from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// Bumped by every fact that changed something: the position decisions are made at.
    pub position: u64,
    /// In the order they were recorded.
    pub pushes: Vec<Push>,
    /// The merged state of each (commit, pipeline).
    pub pipelines: Vec<(Sha, Pipeline)>,
    /// Oldest first.
    pub rejected: Vec<Rejected>,
}

impl Facts {
    /// The gate's view of the ref: pushes replayed in order, pipelines merged.
    pub fn ref_state(&self) -> RefState {
        let mut state = RefState::default();
        state.record_pushes(&self.pushes);
        state.replay_pipelines(&self.pipelines);
        for rejected in &self.rejected {
            state.reject(rejected.clone());
        }
        state
    }
}

/// One agent's gate state as stored, with the position of the facts it was decided at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentState {
    pub gate: AgentGate,
    /// The facts position of the ref the state was last evaluated at.
    pub position: u64,
    /// W3C trace context of the decision that set the desired revision, so that the stream
    /// sending it, on whichever replica, and the agent's apply join that trace.
    pub traceparent: Option<String>,
}

/// A conditional write of an agent's state.
#[derive(Debug, Clone, Copy)]
pub struct AgentWrite<'a> {
    pub agent: &'a str,
    /// The incarnation of the agent it was decided for, logged with it.
    pub incarnation: u64,
    /// The version read; the write happens only if it is still the stored one.
    pub expected: u64,
    pub state: &'a AgentState,
    /// Decisions made by this write, appended to the agent's capped history.
    pub decisions: &'a [Decision],
    /// How the deployed set changed, so that a write carries only what is new.
    pub deployed: &'a DeployedChange,
}

/// What a write stores for an agent, shared by the agents decided alike.
#[derive(Debug, Clone, Copy)]
pub struct AgentChange<'a> {
    pub state: &'a AgentState,
    pub decisions: &'a [Decision],
    pub deployed: &'a DeployedChange,
}

/// One agent's part of [`AgentWrites`].
#[derive(Debug, Clone, Copy)]
pub struct QueuedWrite<'a> {
    pub agent: &'a str,
    pub incarnation: u64,
    /// The version read; the write happens only if it is still the stored one.
    pub expected: u64,
    /// Index of what it writes in [`AgentWrites::changes`].
    pub change: usize,
}

/// Conditional writes of many agents' states, each independent of the others, made in as
/// few store steps as the store allows.
///
/// An evaluation writes every agent watching a ref, and agents decided alike write the same
/// change: it is kept (and so encoded and logged) once, whatever the number of agents.
#[derive(Debug, Default)]
pub struct AgentWrites<'a> {
    changes: Vec<AgentChange<'a>>,
    agents: Vec<QueuedWrite<'a>>,
    /// Changes by the addresses of what they borrow: the same borrowed values are the same
    /// change.
    known: HashMap<[usize; 4], usize>,
}

impl<'a> AgentWrites<'a> {
    /// The writes of `writes`, in that order.
    pub fn of(writes: impl IntoIterator<Item = AgentWrite<'a>>) -> Self {
        let mut all = Self::default();
        for write in writes {
            all.push(write);
        }
        all
    }

    /// Adds `write`, sharing its change with earlier writes of the same borrowed values.
    pub fn push(&mut self, write: AgentWrite<'a>) {
        let identity = [
            std::ptr::from_ref(write.state).addr(),
            write.decisions.as_ptr().addr(),
            write.decisions.len(),
            std::ptr::from_ref(write.deployed).addr(),
        ];
        let next = self.changes.len();
        let change = *self.known.entry(identity).or_insert(next);
        if change == next {
            self.changes.push(AgentChange {
                state: write.state,
                decisions: write.decisions,
                deployed: write.deployed,
            });
        }
        self.agents.push(QueuedWrite {
            agent: write.agent,
            incarnation: write.incarnation,
            expected: write.expected,
            change,
        });
    }

    /// The distinct changes written.
    pub fn changes(&self) -> &[AgentChange<'a>] {
        &self.changes
    }

    /// Each agent's write, in the order added; its `change` indexes [`Self::changes`].
    pub fn agents(&self) -> &[QueuedWrite<'a>] {
        &self.agents
    }

    /// The change `write` stores.
    pub fn change_of(&self, write: &QueuedWrite<'_>) -> &AgentChange<'a> {
        // In range by construction: `push` is the only way in.
        &self.changes[write.change]
    }
}

/// How a write changes an agent's deployed set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployedChange {
    Unchanged,
    /// `shas` were appended, and the set keeps its newest `keep` entries: the oldest fell off
    /// (past the cap, or gone from the ref's history).
    Append {
        shas: Vec<Sha>,
        keep: usize,
    },
    /// The set is now exactly this.
    Replace(Vec<Sha>),
}

impl DeployedChange {
    /// The change that turns `before` into `after`: an append in the common case.
    pub fn between(before: &VecDeque<Sha>, after: &VecDeque<Sha>) -> Self {
        if before == after {
            return Self::Unchanged;
        }
        // `after` is `before` with its oldest entries dropped and new ones appended when a
        // suffix of `before` is a prefix of `after`: all a write then carries is what is new.
        for appended in 0..=after.len() {
            let kept = after.len() - appended;
            let Some(dropped) = before.len().checked_sub(kept) else {
                continue;
            };
            // Keeping nothing of a set that had entries is a rewrite, not an append.
            if kept == 0 && !before.is_empty() {
                continue;
            }
            if before.iter().skip(dropped).eq(after.iter().take(kept)) {
                return Self::Append {
                    shas: after.iter().skip(kept).cloned().collect(),
                    keep: after.len(),
                };
            }
        }
        Self::Replace(after.iter().cloned().collect())
    }
}

/// Result of a conditional write of an agent's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Saved {
        version: u64,
    },
    /// Someone else wrote first; read again and redo the decision.
    Conflict,
    /// The stored state was decided from newer facts: this write would move it backwards.
    Stale,
    /// The name is another agent's now (deleted and created again): the write was decided
    /// for the one before and must not be redone for it.
    Replaced,
    /// Not tried: the writer stopped the batch before this write's step.
    Withheld,
}

/// What every replica hears about, in order per ref and per agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Broadcast {
    /// A fact changed what is known about `key`: its evaluator decides again.
    Fact {
        key: RefKey,
        position: u64,
        /// A pipeline claim refused because GitLab's API contradicts it, for watchers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rejected: Option<Rejected>,
        /// W3C trace context of the request that brought the fact, which the evaluation
        /// and what follows it join.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
        /// When the recording replica recorded it, in Unix milliseconds.
        #[serde(default)]
        at_ms: i64,
    },
    /// Agents' states were written: their versions, desired revisions and decisions.
    AgentsChanged(AgentChanges),
    /// A prost-encoded `greenlight.v1.StatusReport`.
    Report {
        agent: String,
        report: Vec<u8>,
        /// The agent's incarnation the report came from, as in [`ChangedAgent`].
        #[serde(default, skip_serializing_if = "is_zero")]
        incarnation: u64,
    },
    Connection {
        agent: String,
        connected: bool,
        replica: String,
    },
    /// Change `seq` of the registry of runtime agents: `agent` now has `record`, or was
    /// deleted when it has none.
    Registry {
        agent: String,
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        record: Option<Box<RegistryRecord>>,
    },
}

impl Broadcast {
    /// A log entry's message, or `None` when this version cannot read it.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        /// Written by versions that logged each agent's change as its own entry.
        #[derive(Deserialize)]
        #[serde(tag = "kind", rename_all = "snake_case")]
        enum Legacy {
            AgentChanged {
                agent: String,
                version: u64,
                desired: Option<Revision>,
                decisions: Vec<Decision>,
                #[serde(default)]
                traceparent: Option<String>,
            },
        }
        /// Only the tag: the rest of the entry is skipped, not kept.
        #[derive(Deserialize)]
        struct Tagged {
            kind: Kind,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum Kind {
            AgentsChanged,
            #[serde(other)]
            Other,
        }
        // An internally tagged enum first copies the whole entry into a generic tree, then
        // reads its variant from that; a fan-out's entries name hundreds of agents each, and
        // every replica reads every one. Their body is read straight into its type instead
        // (the other kinds are small, and pay a second scan for the tag).
        if let Ok(Tagged {
            kind: Kind::AgentsChanged,
        }) = serde_json::from_slice(payload)
        {
            return serde_json::from_slice(payload)
                .ok()
                .map(Self::AgentsChanged);
        }
        if let Ok(message) = serde_json::from_slice(payload) {
            return Some(message);
        }
        let Legacy::AgentChanged {
            agent,
            version,
            desired,
            decisions,
            traceparent,
        } = serde_json::from_slice(payload).ok()?;
        Some(Self::AgentsChanged(AgentChanges::one(
            agent,
            version,
            DecidedChange {
                desired,
                decisions,
                traceparent,
            },
        )))
    }
}

/// Agents' states written in one step: what was decided, once per group of agents decided
/// alike, and which agents it was written for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentChanges {
    pub changes: Vec<DecidedChange>,
    pub agents: Vec<ChangedAgent>,
}

impl AgentChanges {
    /// `change`, written for `agent` at `version`.
    pub fn one(agent: String, version: u64, change: DecidedChange) -> Self {
        Self {
            changes: vec![change],
            agents: vec![ChangedAgent {
                agent,
                version,
                change: 0,
                incarnation: 0,
            }],
        }
    }

    /// Each agent written, with what was decided for it. An agent naming a change the
    /// entry lacks (a corrupt entry) is left out.
    pub fn iter(&self) -> impl Iterator<Item = (&ChangedAgent, &DecidedChange)> {
        self.agents
            .iter()
            .filter_map(|agent| Some((agent, self.changes.get(agent.change)?)))
    }

    /// Whether `agent` is among the agents written.
    pub fn concerns(&self, agent: &str) -> bool {
        self.agents.iter().any(|written| written.agent == agent)
    }
}

/// What a decision told the agents decided alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecidedChange {
    pub desired: Option<Revision>,
    pub decisions: Vec<Decision>,
    /// W3C trace context of the change, for whoever acts on it (commit statuses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl DecidedChange {
    /// What writing `change` tells its agents.
    pub fn of(change: &AgentChange<'_>) -> Self {
        Self {
            desired: change.state.gate.desired.clone(),
            decisions: change.decisions.to_vec(),
            traceparent: change.state.traceparent.clone(),
        }
    }
}

/// One agent of [`AgentChanges`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedAgent {
    pub agent: String,
    /// The version its state was written at.
    pub version: u64,
    /// Index of its change in [`AgentChanges::changes`].
    pub change: usize,
    /// The agent's [`crate::config::AgentSpec::incarnation`] it was written for.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub incarnation: u64,
}

/// Whether an entry written for incarnation `logged` of an agent is about `current`, the
/// agent now under its name. The log's shards are read in any order, so a deleted agent's
/// entries may be read after the registry change that created another one in its place;
/// they are not the new agent's. 0 on either side is a version that did not record
/// incarnations (an entry it wrote, or a record it wrote back during a rolling upgrade,
/// which drops the field): taken as the same agent, as that version took it.
pub fn same_incarnation(logged: u64, current: u64) -> bool {
    logged == 0 || current == 0 || logged == current
}

pub(crate) fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Message(Broadcast),
    /// Log entries were missed (trimmed before this replica read them, or the store lost its
    /// data): re-read every agent's state.
    Resync,
}

/// One entry of the change log, handed to a commit status publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The log's own id of the entry, for acknowledging it.
    pub id: String,
    pub message: Broadcast,
}

/// Why an agent's desired revision cannot be delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SyncError {
    /// The repository could not be fetched: cleared by the next successful fetch.
    Fetch { message: String },
    /// The revision's manifests could not be read: cleared when a revision is delivered.
    Manifests { message: String },
}

impl SyncError {
    /// What operators read.
    pub fn message(&self) -> &str {
        match self {
            Self::Fetch { message } | Self::Manifests { message } => message,
        }
    }
}

/// Facts about refs.
#[async_trait]
pub trait FactStore: Send + Sync {
    /// Refuses a redelivery, merges `fact` and appends it to the change log, in one atomic
    /// step whose cost grows neither with history nor with the agents watching `key`.
    async fn record_fact(
        &self,
        key: &RefKey,
        fact: &FactRecord,
        delivery: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<Ingested>;

    /// Everything recorded about `key`.
    async fn facts(&self, key: &RefKey) -> Result<Facts>;

    /// The merged state of one pipeline of `sha` on `key`, if recorded.
    async fn pipeline(&self, key: &RefKey, sha: &Sha, id: u64) -> Result<Option<Pipeline>>;

    /// Forgets pipeline records of `key` that the gate no longer keeps (trimmed commits).
    async fn forget_pipelines(&self, key: &RefKey, forget: &[(Sha, u64)]) -> Result<()>;

    /// Raises `key`'s facts position to `at_least` if it is below: the ref lost its newest
    /// writes (a Redis Cluster failover to a replica that had not received them), while
    /// agents were decided from them. Returns the position now.
    async fn raise_position(&self, key: &RefKey, at_least: u64) -> Result<u64>;
}

/// The stored states of `agents` that can be read, in order, with their names.
///
/// A record that cannot be decoded is skipped and logged, so that one corrupt agent does not
/// stop every other agent of its ref (or a replica's start); that agent stays where it is
/// and `GetAgent` reports the corrupt record. Fails only when the store does.
pub async fn readable_agents<S: AgentStore + ?Sized>(
    store: &S,
    agents: &[String],
) -> Result<Vec<(String, AgentRead)>> {
    match store.agents(agents).await {
        Ok(read) => Ok(agents.iter().cloned().zip(read).collect()),
        Err(StoreError::Corrupt { .. }) => {
            // Only after a batch failed: one round trip per agent finds the corrupt ones.
            let mut readable = Vec::with_capacity(agents.len());
            for agent in agents {
                match store.agent(agent).await {
                    Ok(state) => readable.push((agent.clone(), state)),
                    Err(StoreError::Corrupt { key, reason }) => tracing::warn!(
                        agent,
                        key,
                        reason,
                        "skipping an agent whose stored state cannot be read"
                    ),
                    Err(error) => return Err(error),
                }
            }
            Ok(readable)
        }
        Err(error) => Err(error),
    }
}

/// Hears the writes of each step of a batch, by place in the batch and outcome, as soon as
/// the store made them; answering `Break` stops the batch before its next step.
pub type Told<'a> = dyn FnMut(&[(usize, Written)]) -> ControlFlow<()> + Send + 'a;

/// Each agent's gate state.
#[async_trait]
pub trait AgentStore: Send + Sync {
    /// The state of `agent` (empty at version 0 when absent).
    async fn agent(&self, agent: &str) -> Result<AgentRead>;

    /// The states of `agents`, in one round trip where the store allows it.
    async fn agents(&self, agents: &[String]) -> Result<Vec<AgentRead>>;

    /// Writes each agent of `writes` whose stored version is still the expected one and
    /// whose stored state was not decided from newer facts, appending the changes to the log
    /// in the same steps; returns what became of each write, in order.
    ///
    /// A large batch takes several steps: `told` hears each step's writes, by place in
    /// `writes.agents()` and outcome, as soon as the step is done, so that the first agents
    /// saved can be served while the rest are written. Outcomes told before an error stand.
    /// Once `told` answers `Break`, no further step is started and the writes left are
    /// [`Written::Withheld`].
    async fn write_agents_telling(
        &self,
        writes: &AgentWrites<'_>,
        told: &mut Told<'_>,
    ) -> Result<Vec<Written>>;

    /// [`Self::write_agents_telling`], with the outcomes at the end only.
    async fn write_agents(&self, writes: &AgentWrites<'_>) -> Result<Vec<Written>> {
        self.write_agents_telling(writes, &mut |_| ControlFlow::Continue(()))
            .await
    }

    /// [`Self::write_agents`] for one agent.
    async fn write_agent(&self, write: &AgentWrite<'_>) -> Result<Written> {
        let written = self.write_agents(&AgentWrites::of([*write])).await?;
        written
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Corrupt {
                key: write.agent.to_owned(),
                reason: "the store answered no result for the write".into(),
            })
    }

    /// Gives `agent`'s record, which belongs to incarnation `from` (0 for one without an
    /// incarnation), to incarnation `to`, empty: what it holds is another agent's. Returns
    /// whether the record is `to`'s now (not when another took it meanwhile).
    async fn give_agent(&self, agent: &str, from: u64, to: u64) -> Result<bool>;

    /// Records why each agent's desired revision cannot be delivered; `None` clears it.
    /// Each agent is named once: the order of two notes of one agent is not kept.
    async fn set_sync_errors(&self, errors: &[(&str, Option<&SyncError>)]) -> Result<()>;

    /// Why `agent`'s desired revision cannot be delivered, if it cannot.
    async fn sync_error(&self, agent: &str) -> Result<Option<SyncError>>;
}

/// What became of an agent's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Reported {
    /// Kept, and appended to the change log.
    Kept,
    /// Dropped: the agent's record belongs to another agent created under its name since,
    /// so the report is of a deleted agent.
    Replaced,
}

/// Agents' status reports.
#[async_trait]
pub trait ReportStore: Send + Sync {
    /// Keeps `report` as the newest of at most `keep` reports of `agent` (its
    /// `incarnation`), and appends it to the change log, in one atomic step; not when the
    /// agent's record belongs to another incarnation (see [`same_incarnation`]).
    async fn push_report(
        &self,
        agent: &str,
        incarnation: u64,
        report: &[u8],
        keep: usize,
    ) -> Result<Reported>;

    /// The newest `limit` reports of `agent`, newest first.
    async fn reports(&self, agent: &str, limit: usize) -> Result<Vec<Vec<u8>>>;
}

/// Which replica each agent is connected to.
#[async_trait]
pub trait PresenceStore: Send + Sync {
    /// Marks `agent` connected to (or gone from) `replica`, and tells every replica.
    async fn set_presence(&self, replica: &str, agent: &str, connected: bool) -> Result<()>;

    /// Keeps this replica's presence records alive: one call per interval, however many agents.
    async fn refresh_presence(&self, replica: &str) -> Result<()>;

    /// Marks `replica` alive, by the store's clock; called every [`REPLICA_BEAT`].
    async fn mark_alive(&self, replica: &str) -> Result<()>;

    /// Every live (agent, replica) pair, for a replica rebuilding its index.
    async fn all_presence(&self) -> Result<Vec<(String, String)>>;
}

/// The change log and the commit status feed derived from it.
#[async_trait]
pub trait ChangeLog: Send + Sync {
    /// Every change log entry from now on, in order per shard, and a resync notice when
    /// entries were missed.
    fn subscribe(&self) -> broadcast::Receiver<Notice>;

    /// The next change log entry for the commit status publishers, waiting a few seconds
    /// for one: each entry goes to one publisher (`consumer`), and an entry a publisher took
    /// but did not acknowledge within `reclaim_after` (its replica died) goes to another.
    async fn next_for_statuses(
        &self,
        consumer: &str,
        reclaim_after: Duration,
    ) -> Result<Option<LogEntry>>;

    /// Marks a status entry handled, so that no publisher takes it again.
    async fn ack_statuses(&self, id: &str) -> Result<()>;

    /// Hands back every entry `consumer` took and did not acknowledge, as its replica stops:
    /// another publisher takes them over at once rather than after `reclaim_after`.
    async fn release_statuses(&self, consumer: &str, reclaim_after: Duration) -> Result<()>;

    /// Claims the posting of commit status `status` for `holder`, for at most `lease`:
    /// several log entries can mean the same status, two publishers must never post
    /// statuses of one agent on one commit at once, and one older than the status GitLab
    /// shows must not replace it.
    async fn begin_status(
        &self,
        status: &StatusKey<'_>,
        holder: &str,
        lease: Duration,
    ) -> Result<StatusClaim>;

    /// Ends `holder`'s claim: the status is remembered as shown, unless a later one is, or
    /// released for a later attempt by anyone, who gets it as [`StatusClaim::Retaken`].
    async fn finish_status(&self, status: &StatusKey<'_>, holder: &str, posted: bool)
    -> Result<()>;
}

/// One commit status: agent, commit, state, and where it stands among the agent's statuses
/// on that commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusKey<'a> {
    pub agent: &'a str,
    pub sha: &'a str,
    pub state: &'a str,
    pub order: StatusOrder,
}

/// Where a commit status stands among its agent's statuses on one commit. GitLab shows the
/// last status posted under a name, and the log's shards reach the publishers in any order,
/// so a status is posted only when it is later than the one shown: a commit whose health
/// flips back shows its newest state, and a decision read late never hides a report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct StatusOrder {
    /// The generation of the revision it is about: a redeploy, a pin or a rollback to the
    /// commit starts a later one.
    pub generation: u64,
    /// When the server received the report it comes from (Unix ms); 0 for a decision, which
    /// comes before every report on its revision.
    pub reported_ms: u64,
    /// pending, running, then a final state: orders two reports received in the same
    /// millisecond.
    pub stage: u8,
}

impl StatusOrder {
    /// The order of a status decided at `generation`.
    pub fn decided(generation: u64) -> Self {
        Self {
            generation,
            ..Self::default()
        }
    }

    const SORTABLE_LEN: usize = 41;

    /// As text that sorts as the order does: generation and time in 20 digits each, then the
    /// stage.
    pub fn sortable(&self) -> String {
        format!(
            "{:020}{:020}{}",
            self.generation,
            self.reported_ms,
            self.stage.min(9)
        )
    }

    fn from_sortable(text: &str) -> Option<Self> {
        let stage = text.get(40..)?;
        (stage.len() == 1).then_some(())?;
        Some(Self {
            generation: text.get(..20)?.parse().ok()?,
            reported_ms: text.get(20..40)?.parse().ok()?,
            stage: stage.parse().ok()?,
        })
    }

    /// The order of a status reported on `generation`, received at `received_ms`.
    pub fn reported(generation: u64, received_ms: i64, state: &str) -> Self {
        Self {
            generation,
            reported_ms: u64::try_from(received_ms).unwrap_or(0),
            stage: Self::stage_of(state),
        }
    }

    /// Where commit status `state` stands in the life of one post: pending, running, then
    /// a final state, as GitLab moves one status of a name along in place.
    pub fn stage_of(state: &str) -> u8 {
        match state {
            "pending" => 0,
            "running" => 1,
            _ => 2,
        }
    }
}

/// The status GitLab shows, as far as the publishers know: the last one posted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShownStatus {
    pub order: StatusOrder,
    pub state: String,
}

/// What a status comes to against the one shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Against {
    /// Later, and another state: to post.
    Post,
    /// In the state shown, and not older: nothing to post (unless a claim left unfinished
    /// may have posted another state), but a later one is now the one shown.
    SameState,
    /// The one shown, or older: nothing to post.
    Older,
}

impl ShownStatus {
    /// What posting `status` would do to what is shown.
    pub fn against(shown: Option<&ShownStatus>, status: &StatusKey<'_>) -> Against {
        match shown {
            None => Against::Post,
            Some(shown) if status.order < shown.order => Against::Older,
            Some(shown) if shown.state == status.state => Against::SameState,
            Some(shown) if status.order == shown.order => Against::Older,
            Some(_) => Against::Post,
        }
    }

    /// `status` as shown.
    pub fn of(status: &StatusKey<'_>) -> Self {
        Self {
            order: status.order,
            state: status.state.to_owned(),
        }
    }

    /// As stored: the order as [`StatusOrder::sortable`] writes it, `:` and the state, as
    /// the Redis scripts read it too.
    pub fn encode(&self) -> String {
        format!("{}:{}", self.order.sortable(), self.state)
    }

    /// What [`Self::encode`] wrote; `None` when unreadable.
    pub fn decode(text: &str) -> Option<Self> {
        let (order, state) = text.split_at_checked(StatusOrder::SORTABLE_LEN)?;
        Some(Self {
            order: StatusOrder::from_sortable(order)?,
            state: state.strip_prefix(':')?.to_owned(),
        })
    }
}

/// Where a commit status stands between publishers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClaim {
    /// Yours to post.
    Mine,
    /// Yours to post, but an earlier claim on the agent's statuses on the commit ended
    /// without its outcome recorded (its publisher or the store died mid-post, or GitLab
    /// failed): GitLab may show it already, so look before posting.
    Retaken,
    /// Shown already, posted by any replica or before a restart.
    Posted,
    /// Older than the status shown: posting it would hide a later one.
    Superseded,
    /// Another publisher is posting a status of the agent on the commit now.
    InFlight,
}

/// Which replica evaluates the refs of a shard.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Takes or renews the lease on `shard` for `replica` for `ttl`: `true` while held.
    async fn hold_lease(&self, shard: u16, replica: &str, ttl: Duration) -> Result<bool>;

    /// Gives up `replica`'s lease on `shard`, so another replica takes over at once.
    async fn release_lease(&self, shard: u16, replica: &str) -> Result<()>;
}

/// Everything a replica needs from its store.
#[async_trait]
pub trait Store:
    FactStore
    + AgentStore
    + ReportStore
    + PresenceStore
    + ChangeLog
    + LeaseStore
    + RegistryStore
    + 'static
{
    /// Whether the store answers.
    async fn ping(&self) -> Result<()>;

    /// Which store this is, for logs.
    fn describe(&self) -> String;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn order() -> impl Strategy<Value = StatusOrder> {
        (any::<u64>(), any::<u64>(), 0u8..3).prop_map(|(generation, reported_ms, stage)| {
            StatusOrder {
                generation,
                reported_ms,
                stage,
            }
        })
    }

    proptest! {
        #[test]
        fn shown_statuses_round_trip_and_sort_as_text_as_their_orders_do(
            a in order(),
            b in order(),
            state in "[a-z:]{0,12}",
        ) {
            let shown = ShownStatus { order: a, state };
            prop_assert_eq!(ShownStatus::decode(&shown.encode()), Some(shown.clone()));
            prop_assert_eq!(a.sortable().cmp(&b.sortable()), a.cmp(&b));
            prop_assert_eq!(a.sortable().len(), StatusOrder::SORTABLE_LEN);
        }

        #[test]
        fn unreadable_shown_statuses_are_refused_not_a_panic(text in "\\PC{0,60}") {
            let _ = ShownStatus::decode(&text);
        }
    }

    #[test]
    fn a_status_is_posted_only_when_later_than_the_one_shown() {
        let status = |generation, at_ms, state| StatusKey {
            agent: "prod",
            sha: "a",
            state,
            order: StatusOrder::reported(generation, at_ms, state),
        };
        let shown = ShownStatus::of(&status(2, 100, "success"));
        let against = |s: StatusKey<'_>| ShownStatus::against(Some(&shown), &s);
        assert_eq!(
            ShownStatus::against(None, &status(1, 0, "success")),
            Against::Post
        );
        assert_eq!(against(status(2, 101, "failed")), Against::Post, "flipped");
        assert_eq!(
            against(status(2, 100, "success")),
            Against::SameState,
            "again"
        );
        assert_eq!(against(status(2, 101, "success")), Against::SameState);
        assert_eq!(against(status(2, 99, "failed")), Against::Older);
        assert_eq!(
            against(status(2, 100, "failed")),
            Against::Older,
            "a tie keeps the first"
        );
        assert_eq!(
            against(status(1, 500, "running")),
            Against::Older,
            "an older revision"
        );
        assert_eq!(
            against(StatusKey {
                order: StatusOrder::decided(3),
                ..status(0, 0, "pending")
            }),
            Against::Post,
            "deployed again"
        );
        assert!(
            StatusOrder::reported(2, 100, "running") < StatusOrder::reported(2, 100, "success"),
            "a final state received in the same ms as running comes after it"
        );
        assert!(StatusOrder::decided(2) < StatusOrder::reported(2, 1, "running"));
        assert_eq!(StatusOrder::reported(2, -5, "failed").reported_ms, 0);
    }

    fn shas(ns: &[u8]) -> VecDeque<Sha> {
        ns.iter()
            .map(|n| Sha::parse(&format!("{n:040x}")).unwrap())
            .collect()
    }

    #[test]
    fn writes_of_the_same_values_share_one_change() {
        let alike = AgentState::default();
        let other = AgentState {
            position: 3,
            ..AgentState::default()
        };
        let unchanged = DeployedChange::Unchanged;
        let write = |agent, state| AgentWrite {
            incarnation: 0,
            agent,
            expected: 0,
            state,
            decisions: &[],
            deployed: &unchanged,
        };
        let writes = AgentWrites::of([write("a", &alike), write("b", &other), write("c", &alike)]);
        assert_eq!(writes.changes().len(), 2);
        let changes: Vec<usize> = writes.agents().iter().map(|w| w.change).collect();
        assert_eq!(changes, [0, 1, 0]);
        assert_eq!(writes.change_of(&writes.agents()[1]).state.position, 3);
    }

    #[test]
    fn a_change_logged_by_an_earlier_version_reads_as_one_agent_written() {
        let old = br#"{"kind":"agent_changed","agent":"prod","version":7,"desired":null,"decisions":[],"traceparent":"00-ab-cd-01"}"#;
        let Some(Broadcast::AgentsChanged(changes)) = Broadcast::decode(old) else {
            panic!("not read");
        };
        let written: Vec<_> = changes.iter().collect();
        assert_eq!(written.len(), 1);
        assert_eq!(
            (written[0].0.agent.as_str(), written[0].0.version),
            ("prod", 7)
        );
        assert_eq!(written[0].1.traceparent.as_deref(), Some("00-ab-cd-01"));
        assert_eq!(Broadcast::decode(b"{\"kind\":\"unknown\"}"), None);
    }

    #[test]
    fn every_kind_of_entry_reads_back_as_written() {
        let revision = Revision {
            sha: shas(&[7])[0].clone(),
            pipeline_id: Some(42),
            reason: "pipeline 42 passed".into(),
            decided_at_ms: 5,
            generation: 3,
            force_prune: false,
        };
        let change = |desired: Option<Revision>| DecidedChange {
            desired,
            decisions: Vec::new(),
            traceparent: Some("00-ab-cd-01".into()),
        };
        let mut agents = AgentChanges::one("prod".into(), 4, change(Some(revision)));
        agents.changes.push(change(None));
        agents.agents.push(ChangedAgent {
            incarnation: 0,
            agent: "staging".into(),
            version: 9,
            change: 1,
        });
        let key = RefKey {
            project: "group/app".into(),
            branch: "main".into(),
        };
        let entries = [
            Broadcast::AgentsChanged(agents),
            Broadcast::Fact {
                key,
                position: 12,
                rejected: None,
                traceparent: None,
                at_ms: 99,
            },
            Broadcast::Report {
                incarnation: 0,
                agent: "prod".into(),
                report: vec![1, 2, 3],
            },
            Broadcast::Connection {
                agent: "prod".into(),
                connected: true,
                replica: "replica-a".into(),
            },
            Broadcast::Registry {
                agent: "edge".into(),
                seq: 2,
                record: None,
            },
        ];
        for entry in entries {
            let payload = serde_json::to_vec(&entry).unwrap();
            assert_eq!(Broadcast::decode(&payload), Some(entry));
        }
        // As the agents script writes it: the tag first, the fields in any order after it.
        let scripted = br#"{"kind":"agents_changed","agents":[{"agent":"prod","version":2,"change":0}],"changes":[{"desired":null,"decisions":[]}]}"#;
        let Some(Broadcast::AgentsChanged(read)) = Broadcast::decode(scripted) else {
            panic!("not read");
        };
        assert_eq!(read.agents.len(), 1);
        assert_eq!(
            Broadcast::decode(br#"{"kind":"agents_changed","agents":7}"#),
            None,
            "a corrupt body is unreadable, not a panic"
        );
    }

    #[test]
    fn an_agent_naming_a_change_the_entry_lacks_is_left_out() {
        let mut changes = AgentChanges::one(
            "prod".into(),
            1,
            DecidedChange {
                desired: None,
                decisions: Vec::new(),
                traceparent: None,
            },
        );
        changes.agents.push(ChangedAgent {
            incarnation: 0,
            agent: "corrupt".into(),
            version: 1,
            change: 9,
        });
        let named: Vec<&str> = changes.iter().map(|(a, _)| a.agent.as_str()).collect();
        assert_eq!(named, ["prod"]);
    }

    #[test]
    fn deployed_changes_are_appends_unless_history_was_rewritten() {
        let change = |a: &[u8], b: &[u8]| DeployedChange::between(&shas(a), &shas(b));
        assert_eq!(change(&[1, 2], &[1, 2]), DeployedChange::Unchanged);
        let append = |new: &[u8], keep| DeployedChange::Append {
            shas: shas(new).into(),
            keep,
        };
        assert_eq!(change(&[1, 2], &[1, 2, 3]), append(&[3], 3));
        assert_eq!(change(&[], &[1]), append(&[1], 1));
        // The oldest gone from the ref's history, with or without a new one: still no rewrite.
        assert_eq!(change(&[1, 2, 3], &[2, 3, 4]), append(&[4], 3));
        assert_eq!(change(&[1, 2, 3], &[2, 3]), append(&[], 2));
        assert_eq!(change(&[1, 2], &[]), DeployedChange::Replace(Vec::new()));
        assert_eq!(
            change(&[1, 2, 3], &[1, 3]),
            DeployedChange::Replace(shas(&[1, 3]).into())
        );
    }

    #[test]
    fn shards_are_stable_and_spread() {
        // Replicas of different versions must agree: these values are part of the layout.
        assert_eq!(agent_shard("prod"), agent_shard("prod"));
        let key = RefKey {
            project: "group/app".into(),
            branch: "main".into(),
        };
        assert_eq!(key.shard(), shard_of(&[b"group/app@main"]));
        let used: std::collections::BTreeSet<u16> = (0..200)
            .map(|n| agent_shard(&format!("agent-{n}")))
            .collect();
        assert_eq!(used.len(), usize::from(SHARDS));
    }
}
