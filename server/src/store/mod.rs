//! Where recorded facts and decisions live: one trait, an in-memory store for a single
//! replica with zero setup, and Redis for durable, replicated deployments.
//!
//! Every change is also appended to a change log that replicas follow from the last entry
//! they processed, so a replica that lost its connection resumes where it stopped instead
//! of re-reading everything, and commit statuses are derived from the log by whichever
//! replica is alive to post them.

mod memory;
mod redis;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::gate::{AgentGate, Decision, RefState};

pub use memory::MemoryStore;
pub use redis::RedisStore;

/// Redeliveries are recognised for this long after the first delivery.
pub const DELIVERY_MEMORY_SECS: u64 = 7 * 24 * 3600;

/// Claimed commit statuses are remembered this long.
pub const STATUS_MEMORY_SECS: u64 = 30 * 24 * 3600;

/// A presence record without a refresh for this long belongs to a dead replica.
pub const PRESENCE_TTL_SECS: u64 = 300;

/// Entries the change log keeps, approximately. A replica that falls further behind than
/// this re-reads everything once instead of resuming.
pub const LOG_MAX_ENTRIES: usize = 10_000;

/// Why the store could not serve a request.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("stored document {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
}

/// Shorthand for store results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One watched (project, branch): the unit of atomic update.
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

/// Everything decided from one ref: its facts and the gate state of each agent watching it.
/// Kept in one document so that a decision reads and writes it atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefDoc {
    pub refs: RefState,
    pub agents: BTreeMap<String, AgentGate>,
    /// Per agent, the W3C trace context of the decision that set its desired revision, so
    /// that the stream sending it, on whichever replica, and the agent's apply join that
    /// trace. Not part of the gate: it never changes what is decided.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub traces: BTreeMap<String, String>,
}

/// A value and the version it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// 0 when nothing is stored yet.
    pub version: u64,
    pub value: T,
}

/// Result of a conditional save.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveOutcome {
    Saved {
        version: u64,
    },
    /// Someone else saved first; read again and redo the decision.
    Conflict,
    /// The delivery was recorded before; nothing was written.
    Duplicate,
}

/// What every replica hears about, so that agents and watchers on any replica see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Broadcast {
    RefChanged {
        key: RefKey,
        /// The version the change was saved as; 0 when unknown.
        #[serde(default)]
        version: u64,
        decisions: Vec<(String, Decision)>,
        /// W3C trace context of the change, for whoever acts on it (commit statuses).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
    },
    /// A prost-encoded `greenlight.v1.StatusReport`.
    Report { agent: String, report: Vec<u8> },
    Connection {
        agent: String,
        connected: bool,
        replica: String,
    },
}

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Message(Broadcast),
    /// Log entries were missed (trimmed before this replica read them, or the store lost its
    /// data): re-read everything.
    Resync,
}

/// One entry of the change log, handed to a commit status publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The log's own id of the entry, for acknowledging it.
    pub id: String,
    pub message: Broadcast,
}

/// The store every replica shares.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads the document of `key` (empty at version 0 when absent).
    async fn load(&self, key: &RefKey) -> Result<Versioned<RefDoc>>;

    /// Writes `doc` if the stored version is still `expected`, remembers `delivery`, and
    /// announces `notice` to every replica, all in one atomic step.
    async fn save(
        &self,
        key: &RefKey,
        expected: u64,
        doc: &RefDoc,
        delivery: Option<&str>,
        notice: &Broadcast,
    ) -> Result<SaveOutcome>;

    /// Whether `delivery` was already recorded for `key`'s project.
    async fn seen_delivery(&self, key: &RefKey, delivery: &str) -> Result<bool>;

    /// Keeps `report` as the newest of at most `keep` reports of `agent`, and appends
    /// `notice` to the change log, in one atomic step.
    async fn push_report(
        &self,
        agent: &str,
        report: &[u8],
        keep: usize,
        notice: &Broadcast,
    ) -> Result<()>;

    /// The newest `limit` reports of `agent`, newest first.
    async fn reports(&self, agent: &str, limit: usize) -> Result<Vec<Vec<u8>>>;

    /// Marks `agent` connected to (or gone from) `replica`.
    async fn set_presence(&self, replica: &str, agent: &str, connected: bool) -> Result<()>;

    /// Keeps this replica's presence records alive: one call per interval, however many agents.
    async fn refresh_presence(&self, replica: &str) -> Result<()>;

    /// The live replica `agent` is connected to, if any.
    async fn presence(&self, agent: &str) -> Result<Option<String>>;

    /// Records why `agent`'s desired revision cannot be delivered; `None` clears it.
    async fn set_sync_error(&self, agent: &str, error: Option<&str>) -> Result<()>;

    /// Why `agent`'s desired revision cannot be delivered, if it cannot.
    async fn sync_error(&self, agent: &str) -> Result<Option<String>>;

    /// Records that commit status `state` for `agent` on `sha` was posted: `true` for the
    /// first to record it.
    async fn claim_status(&self, agent: &str, sha: &str, state: &str) -> Result<bool>;

    /// Whether commit status `state` for `agent` on `sha` was posted already, by any replica
    /// or before a restart.
    async fn status_posted(&self, agent: &str, sha: &str, state: &str) -> Result<bool>;

    /// Appends `message` to the change log every replica follows.
    async fn append(&self, message: &Broadcast) -> Result<()>;

    /// Every change log entry from now on, in order, and a resync notice when entries were
    /// missed.
    fn subscribe(&self) -> broadcast::Receiver<Notice>;

    /// The next change log entry for the commit status publishers, waiting a few seconds
    /// for one: each entry goes to one publisher (`consumer`), and an entry a publisher took
    /// but did not acknowledge within `reclaim_after` (its replica died) goes to another.
    async fn next_for_statuses(
        &self,
        consumer: &str,
        reclaim_after: std::time::Duration,
    ) -> Result<Option<LogEntry>>;

    /// Marks a status entry handled, so that no publisher takes it again.
    async fn ack_statuses(&self, id: &str) -> Result<()>;

    /// Whether the store answers.
    async fn ping(&self) -> Result<()>;

    /// Which store this is, for logs.
    fn describe(&self) -> String;
}
