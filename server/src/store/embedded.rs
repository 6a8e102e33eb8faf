//! The embedded store: one process, its state in memory and, when opened on a `data_dir`,
//! in a file (`disk.rs`) that every change reaches before it is answered or heard of. What a
//! single replica runs on without any setup, and (in memory only) what the unit tests use as
//! the reference of the store contract.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{Notify, broadcast, watch};
use tracing::{error, info};

use super::StoreError;

use super::disk::{self, Disk, Put, SEP, Table};
use super::records::{self, AgentFile, AgentFileV2, RefFactsFile, RefFactsV2, RingV1};

use super::{
    Against, AgentChange, AgentChanges, AgentRead, AgentState, AgentStore, AgentWrites, Broadcast,
    ChangeLog, ChangedAgent, DELIVERY_MEMORY_SECS, DecidedChange, DeployedChange, FactRecord,
    FactStore, Facts, Ingested, LOG_MAX_ENTRIES, LeaseStore, LogEntry, Notice, PUSHES_KEPT,
    PresenceStore, RefKey, Registry, RegistryRecord, RegistryStore, RegistryWritten, ReportStore,
    Reported, Result, STATUS_MEMORY_SECS, ShownStatus, StatusClaim, StatusKey, StatusOrder, Store,
    SyncError, Told, Versioned, Written, same_incarnation,
};
use crate::evaluate::StoredVersion;
use crate::gate::{DECISION_HISTORY, DEPLOYED_HISTORY, MAX_REJECTED, Pipeline, Sha};

/// How long `next_for_statuses` waits for an entry before answering `None`.
const STATUS_WAIT: Duration = Duration::from_secs(2);

/// Agents a fan-out writes in one step. Each step is one transaction made durable: smaller
/// steps send the first agents sooner and let a newer fact stop the fan-out sooner, at the
/// cost of an fsync each.
const WRITE_STEP: usize = 256;

/// How often the file forgets delivery and status markers past their time.
const FORGET_EVERY: Duration = Duration::from_secs(3600);

/// The store of a single replica: zero setup; durable when opened on a `data_dir`.
pub struct EmbeddedStore {
    inner: Arc<Mutex<Inner>>,
    notices: broadcast::Sender<Notice>,
    /// Wakes status publishers waiting for an entry.
    appended: Arc<Notify>,
    /// The file behind the memory, when there is one.
    journal: Option<Journal>,
    /// Agents a fan-out writes in one step, made durable and told before the next.
    write_step: usize,
    /// Whether the change log's entries are kept for a status publisher: without one they
    /// would only pile up, each naming every agent of its fan-out step.
    feeds_statuses: bool,
}

/// The writer of the file: a thread that commits what changed, batch by batch.
struct Journal {
    /// Dropped first on drop: the writer then writes what is left and closes the file.
    wake: Option<std::sync::mpsc::SyncSender<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
    committed: watch::Receiver<Committed>,
    path: String,
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.wake.take();
        // Joined so that the file is closed when the store is gone: a store opened next on
        // the same directory (a restart in the same process) finds it free.
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// How far the file has come.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Committed {
    /// Every change up to this ticket is on disk.
    upto: u64,
    /// Why a write failed: nothing after `upto` is answered as stored any more. A change
    /// committed before the failure still is, however late its caller looks.
    failed: Option<String>,
}

impl Committed {
    /// Whether the change of `ticket` is on disk: `None` while that is not known yet.
    fn stored(&self, ticket: u64) -> Option<std::result::Result<(), &str>> {
        if self.upto >= ticket {
            Some(Ok(()))
        } else {
            self.failed.as_deref().map(Err)
        }
    }
}

/// Changes made in memory and not yet on disk, and the notices that wait for them.
#[derive(Default)]
struct Pending {
    dirty: HashSet<Dirty>,
    notices: Vec<Broadcast>,
    ticket: u64,
}

/// A record that changed: its new value is read from memory when the batch is written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Dirty {
    /// The ref's record and what its rings lack.
    Facts(RefKey),
    /// One pipeline of the ref, written or removed.
    Pipeline(RefKey, Sha, u64),
    Delivery(RefKey, String),
    Agent(String),
    Reports(String),
    SyncError(String),
    Status(StatusId),
    Taken(StatusId),
    Feed(u64),
    Registry(String),
}

/// (agent, sha) of commit statuses.
type StatusId = (String, String);

struct Inner {
    facts: HashMap<RefKey, RefFacts>,
    deliveries: Expiring<(RefKey, String)>,
    agents: HashMap<String, StoredAgent>,
    reports: HashMap<String, VecDeque<Vec<u8>>>,
    presence: HashMap<String, String>,
    sync_errors: HashMap<String, SyncError>,
    /// The status GitLab shows, as far as the publishers know.
    statuses: Expiring<StatusId, ShownStatus>,
    /// Statuses being posted now, by whom and until when.
    posting: HashMap<StatusId, (String, Instant)>,
    /// Statuses claimed and not yet posted: the next claimant looks at GitLab first.
    taken: Expiring<StatusId>,
    status_feed: StatusFeed,
    leases: HashMap<u16, (String, Instant)>,
    registry: MemoryRegistry,
    /// What the file still lacks; `None` without a file.
    pending: Option<Pending>,
}

impl Inner {
    /// The incarnation `agent`'s record belongs to; 0 for none, or one without.
    fn incarnation_of(&self, agent: &str) -> u64 {
        self.agents
            .get(agent)
            .map_or(0, |stored| stored.incarnation)
    }

    /// Drops what is stored about `agent` (its gate, history, reports and shown statuses),
    /// leaving the empty record of `incarnation` when given.
    fn start_afresh(&mut self, agent: &str, incarnation: Option<u64>) {
        match incarnation {
            Some(incarnation) => {
                let version = self.agents.get(agent).map_or(0, |stored| stored.version);
                let born = StoredAgent::born(incarnation, version);
                self.agents.insert(agent.to_owned(), born);
            }
            None => {
                self.agents.remove(agent);
            }
        }
        self.reports.remove(agent);
        self.sync_errors.remove(agent);
        self.mark(Dirty::Agent(agent.to_owned()));
        self.mark(Dirty::Reports(agent.to_owned()));
        self.mark(Dirty::SyncError(agent.to_owned()));
        // Its generations start again: statuses shown for the old agent's would read as
        // later than the new one's.
        let of_agent = |(name, _): &StatusId| name == agent;
        for id in self.statuses.remove_where(of_agent) {
            self.mark(Dirty::Status(id));
        }
        for id in self.taken.remove_where(of_agent) {
            self.mark(Dirty::Taken(id));
        }
    }

    /// Notes that `dirty` changed, for the next batch written to the file.
    fn mark(&mut self, dirty: Dirty) {
        if let Some(pending) = &mut self.pending {
            pending.dirty.insert(dirty);
            pending.ticket += 1;
        }
    }

    /// The ticket to wait for so that every change marked so far is on disk.
    fn ticket(&self) -> Option<u64> {
        self.pending.as_ref().map(|pending| pending.ticket)
    }
}

/// An agent's state as the store holds it.
#[derive(Clone)]
struct StoredAgent {
    version: u64,
    /// The incarnation of the agent the record belongs to; 0 for file agents and records
    /// written before it was kept.
    incarnation: u64,
    /// Shared by the agents decided alike.
    state: Arc<AgentState>,
    /// Decisions and deployed commits appended since the agent was created: the numbers of
    /// the entries of its rings in the file.
    appended: Appended,
    /// How much of `appended` has been staged for the file.
    staged: Appended,
}

impl StoredAgent {
    /// The record of agent `incarnation` with nothing decided yet, in place of one at
    /// `version` (0 for none): the version goes on past it, since replicas take a lower or
    /// equal one for a state they have.
    fn born(incarnation: u64, version: u64) -> Self {
        Self {
            version: version + 1,
            incarnation,
            state: Arc::default(),
            appended: Appended::default(),
            staged: Appended::default(),
        }
    }

    /// An agent read from an earlier layout, its histories capped and numbered anew from 0:
    /// all of them are to be written.
    fn laid_out_anew(version: u64, incarnation: u64, state: &AgentState) -> Self {
        let state = capped(state);
        let appended = Appended {
            decisions: state.gate.decisions.len() as u64,
            deployed: state.gate.deployed.len() as u64,
        };
        Self {
            version,
            incarnation,
            state,
            appended,
            staged: appended,
        }
    }
}

/// Counts of entries appended to an agent's two histories.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Appended {
    decisions: u64,
    deployed: u64,
}

impl Appended {
    /// The counts once `change` is written.
    fn after(self, change: &AgentChange<'_>) -> Self {
        let deployed = match change.deployed {
            DeployedChange::Unchanged => 0,
            DeployedChange::Append { shas, .. } => shas.len(),
            DeployedChange::Replace(shas) => shas.len(),
        };
        Self {
            decisions: self.decisions + change.decisions.len() as u64,
            deployed: self.deployed + deployed as u64,
        }
    }

    /// What was appended since `earlier`.
    fn since(self, earlier: Self) -> Self {
        Self {
            decisions: self.decisions.saturating_sub(earlier.decisions),
            deployed: self.deployed.saturating_sub(earlier.deployed),
        }
    }
}

/// One ref's fact records.
#[derive(Default)]
struct RefFacts {
    position: u64,
    pushes: VecDeque<crate::gate::Push>,
    pipelines: BTreeMap<(Sha, u64), Pipeline>,
    rejected: VecDeque<crate::gate::Rejected>,
    /// Pushes and rejected claims appended since the ref was first recorded: the numbers of
    /// the entries of its rings in the file.
    appended: FactsAppended,
    /// How much of `appended` has been staged for the file.
    staged: FactsAppended,
}

/// Counts of entries appended to a ref's two rings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct FactsAppended {
    pushes: u64,
    rejected: u64,
}

impl FactsAppended {
    /// What was appended since `earlier`.
    fn since(self, earlier: Self) -> Self {
        Self {
            pushes: self.pushes.saturating_sub(earlier.pushes),
            rejected: self.rejected.saturating_sub(earlier.rejected),
        }
    }
}

impl RefFacts {
    /// A ref read from the file: everything in it is on disk already.
    fn loaded(
        header: RefFactsV2,
        pushes: VecDeque<crate::gate::Push>,
        pipelines: BTreeMap<(Sha, u64), Pipeline>,
        rejected: VecDeque<crate::gate::Rejected>,
    ) -> Self {
        let appended = FactsAppended {
            pushes: header.pushes.appended,
            rejected: header.rejected.appended,
        };
        Self {
            position: header.position,
            pushes,
            pipelines,
            rejected,
            appended,
            staged: appended,
        }
    }

    /// The facts read from an earlier layout, numbered anew from 0 in this version's slots,
    /// the newest kept: all of them are to be written.
    fn laid_out_anew(
        position: u64,
        mut pushes: VecDeque<crate::gate::Push>,
        pipelines: BTreeMap<(Sha, u64), Pipeline>,
        mut rejected: VecDeque<crate::gate::Rejected>,
    ) -> Self {
        pushes.drain(..pushes.len().saturating_sub(PUSHES_RING.1));
        rejected.drain(..rejected.len().saturating_sub(REJECTED_RING.1));
        let header = RefFactsV2 {
            position,
            pushes: RingV1::laid_out(pushes.len() as u64, pushes.len(), PUSHES_RING.1),
            rejected: RingV1::laid_out(rejected.len() as u64, rejected.len(), REJECTED_RING.1),
        };
        Self::loaded(header, pushes, pipelines, rejected)
    }

    /// Where the live entries of its rings are.
    fn header(&self) -> RefFactsV2 {
        RefFactsV2 {
            position: self.position,
            pushes: RingV1::laid_out(self.appended.pushes, self.pushes.len(), PUSHES_RING.1),
            rejected: RingV1::laid_out(
                self.appended.rejected,
                self.rejected.len(),
                REJECTED_RING.1,
            ),
        }
    }
}

/// The change log as the status publishers see it: entries not yet acknowledged, oldest
/// first, each with who took it and when.
struct StatusFeed {
    next_id: u64,
    entries: VecDeque<FeedEntry>,
    /// Entries after this one are not on disk yet: no publisher may act on them.
    durable_upto: u64,
}

impl Default for StatusFeed {
    fn default() -> Self {
        Self {
            next_id: 0,
            entries: VecDeque::new(),
            durable_upto: u64::MAX,
        }
    }
}

struct FeedEntry {
    id: u64,
    message: Broadcast,
    /// Which publisher took it, and when.
    taken: Option<(String, Instant)>,
}

impl StatusFeed {
    /// Appends `message`; returns its id and those of the entries that fell off.
    fn append(&mut self, message: Broadcast) -> (u64, Vec<u64>) {
        self.next_id += 1;
        self.entries.push_back(FeedEntry {
            id: self.next_id,
            message,
            taken: None,
        });
        // Bounded like the Redis log: what falls off was not acknowledged in time.
        let mut dropped = Vec::new();
        while self.entries.len() > LOG_MAX_ENTRIES {
            dropped.extend(self.entries.pop_front().map(|entry| entry.id));
        }
        (self.next_id, dropped)
    }

    fn get(&self, id: u64) -> Option<&Broadcast> {
        // Ids grow along the queue.
        let at = self
            .entries
            .binary_search_by_key(&id, |entry| entry.id)
            .ok()?;
        self.entries.get(at).map(|entry| &entry.message)
    }

    fn take(&mut self, consumer: &str, reclaim_after: Duration, now: Instant) -> Option<LogEntry> {
        let durable_upto = self.durable_upto;
        let entry = self
            .entries
            .iter_mut()
            .take_while(|entry| entry.id <= durable_upto)
            .find(|entry| {
                entry
                    .taken
                    .as_ref()
                    .is_none_or(|(_, at)| now.saturating_duration_since(*at) >= reclaim_after)
            })?;
        entry.taken = Some((consumer.to_owned(), now));
        Some(LogEntry {
            id: entry.id.to_string(),
            message: entry.message.clone(),
        })
    }

    /// Makes what `consumer` took free to take again.
    fn release(&mut self, consumer: &str) {
        for entry in &mut self.entries {
            if entry
                .taken
                .as_ref()
                .is_some_and(|(holder, _)| holder == consumer)
            {
                entry.taken = None;
            }
        }
    }

    fn ack(&mut self, id: &str) -> Option<u64> {
        let id = id.parse::<u64>().ok()?;
        self.entries.retain(|entry| entry.id != id);
        Some(id)
    }
}

impl Default for EmbeddedStore {
    fn default() -> Self {
        Self::new()
    }
}

impl EmbeddedStore {
    /// An empty store that remembers deliveries and posted statuses as long as Redis does.
    pub fn new() -> Self {
        Self::with_memory(
            Duration::from_secs(DELIVERY_MEMORY_SECS),
            Duration::from_secs(STATUS_MEMORY_SECS),
        )
    }

    /// An empty store that forgets a delivery after `deliveries` and a posted status after
    /// `statuses`, so that neither grows without bound.
    pub fn with_memory(deliveries: Duration, statuses: Duration) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                facts: HashMap::new(),
                deliveries: Expiring::new(deliveries),
                agents: HashMap::new(),
                reports: HashMap::new(),
                presence: HashMap::new(),
                sync_errors: HashMap::new(),
                statuses: Expiring::new(statuses),
                posting: HashMap::new(),
                taken: Expiring::new(statuses),
                status_feed: StatusFeed::default(),
                leases: HashMap::new(),
                registry: MemoryRegistry::default(),
                pending: None,
            })),
            notices: broadcast::channel(4096).0,
            appended: Arc::new(Notify::new()),
            journal: None,
            write_step: WRITE_STEP,
            feeds_statuses: true,
        }
    }

    /// The durable embedded store: opens (or creates) the file under `data_dir`, loads what
    /// it holds, and from then on answers a change only once it is on disk.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let (mut store, writer) = Self::loaded(data_dir)?;
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        let writer = std::thread::Builder::new()
            .name("greenlight-store".into())
            .spawn(move || writer.run(woken))
            .map_err(|error| StoreError::Embedded(format!("cannot start its writer: {error}")))?;
        if let Some(journal) = &mut store.journal {
            journal.wake = Some(wake);
            journal.writer = Some(writer);
        }
        Ok(store)
    }

    /// The store loaded from the file under `data_dir`, and the writer of that file, not
    /// started yet.
    fn loaded(data_dir: &Path) -> Result<(Self, Writer)> {
        let disk = Disk::open(data_dir)?;
        let mut store = Self::new();
        {
            let mut inner = store.lock();
            load(&disk, &mut inner)?;
            inner.status_feed.durable_upto = inner.status_feed.next_id;
            inner.pending = Some(Pending::default());
            info!(
                path = %disk.path().display(),
                agents = inner.agents.len(),
                refs = inner.facts.len(),
                unacknowledged = inner.status_feed.entries.len(),
                "embedded store loaded"
            );
        }
        let (committed_tx, committed) = watch::channel(Committed::default());
        let path = disk.path().display().to_string();
        let writer = Writer {
            disk,
            inner: store.inner.clone(),
            notices: store.notices.clone(),
            appended: store.appended.clone(),
            committed: committed_tx,
        };
        store.journal = Some(Journal {
            wake: None,
            writer: None,
            committed,
            path,
        });
        Ok((store, writer))
    }

    /// Appends `message` to the change log: followers and status publishers see it, once it
    /// is on disk when there is a file.
    fn log(&self, inner: &mut Inner, message: Broadcast) {
        if inner.pending.is_none() {
            let _ = self.notices.send(Notice::Message(message.clone()));
            if self.feeds_statuses {
                inner.status_feed.append(message);
                self.appended.notify_waiters();
            }
            return;
        }
        if self.feeds_statuses {
            let (id, dropped) = inner.status_feed.append(message.clone());
            inner.mark(Dirty::Feed(id));
            for id in dropped {
                inner.mark(Dirty::Feed(id));
            }
        }
        if let Some(pending) = &mut inner.pending {
            pending.notices.push(message);
        }
    }

    /// The store of a server that publishes no commit statuses (no `gitlab` configured):
    /// the change log's entries are not kept for a publisher, and those kept before are
    /// removed, from the file too.
    pub fn without_status_feed(mut self) -> Self {
        self.feeds_statuses = false;
        // Removed from the file with the next batch; until then a restart removes them again.
        let mut inner = self.lock();
        let removed: Vec<u64> = inner.status_feed.entries.drain(..).map(|e| e.id).collect();
        for id in removed {
            inner.mark(Dirty::Feed(id));
        }
        drop(inner);
        self
    }

    /// Waits until the changes up to `ticket` are on disk (at once without a file).
    async fn durable(&self, ticket: Option<u64>) -> Result<()> {
        let (Some(journal), Some(ticket)) = (&self.journal, ticket) else {
            return Ok(());
        };
        // Full means a wake-up is already due, which covers this change too.
        if let Some(wake) = &journal.wake {
            let _ = wake.try_send(());
        }
        let mut committed = journal.committed.clone();
        let reached = committed.wait_for(|c| c.stored(ticket).is_some()).await;
        match reached.as_deref().ok().and_then(|c| c.stored(ticket)) {
            Some(Ok(())) => Ok(()),
            Some(Err(why)) => Err(failed_write(&journal.path, why)),
            None => Err(StoreError::Embedded("its writer stopped".into())),
        }
    }

    /// Makes a fan-out write `agents` agents a step.
    #[cfg(test)]
    pub(crate) fn set_write_step(&mut self, agents: usize) {
        self.write_step = agents;
    }

    /// Delivery and status markers held now, expired ones not yet swept included.
    pub fn markers(&self) -> usize {
        let inner = self.lock();
        inner.deliveries.len() + inner.statuses.len() + inner.taken.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-written entry: each write
        // below checks everything before it changes anything.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl FactStore for EmbeddedStore {
    async fn record_fact(
        &self,
        key: &RefKey,
        fact: &FactRecord,
        delivery: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<Ingested> {
        let (outcome, ticket) = 'change: {
            let mut inner = self.lock();
            let now = Instant::now();
            if let Some(id) = delivery {
                if !inner.deliveries.insert((key.clone(), id.to_owned()), now) {
                    return Ok(Ingested::Duplicate);
                }
                inner.mark(Dirty::Delivery(key.clone(), id.to_owned()));
            }
            let facts = inner.facts.entry(key.clone()).or_default();
            match fact {
                FactRecord::Push(push) => {
                    facts.pushes.push_back(push.clone());
                    facts.appended.pushes += 1;
                    if facts.pushes.len() > PUSHES_KEPT {
                        facts.pushes.pop_front();
                    }
                }
                FactRecord::Pipeline { sha, pipeline } => {
                    let id = (sha.clone(), pipeline.id);
                    match Pipeline::merged(facts.pipelines.get(&id), pipeline.clone()) {
                        Some(merged) => facts.pipelines.insert(id, merged),
                        None => break 'change (Ingested::Unchanged, inner.ticket()),
                    };
                }
                FactRecord::Rejected(rejected) => {
                    facts.rejected.push_back(rejected.clone());
                    facts.appended.rejected += 1;
                    if facts.rejected.len() > MAX_REJECTED {
                        facts.rejected.pop_front();
                    }
                }
            }
            facts.position += 1;
            let position = facts.position;
            inner.mark(Dirty::Facts(key.clone()));
            if let FactRecord::Pipeline { sha, pipeline } = fact {
                inner.mark(Dirty::Pipeline(key.clone(), sha.clone(), pipeline.id));
            }
            self.log(
                &mut inner,
                Broadcast::Fact {
                    key: key.clone(),
                    position,
                    rejected: match fact {
                        FactRecord::Rejected(rejected) => Some(rejected.clone()),
                        _ => None,
                    },
                    traceparent: traceparent.map(str::to_owned),
                    at_ms: crate::clock::now_ms(),
                },
            );
            (Ingested::Recorded { position }, inner.ticket())
        };
        self.durable(ticket).await?;
        Ok(outcome)
    }

    async fn facts(&self, key: &RefKey) -> Result<Facts> {
        let inner = self.lock();
        Ok(inner
            .facts
            .get(key)
            .map(|facts| Facts {
                position: facts.position,
                pushes: facts.pushes.iter().cloned().collect(),
                pipelines: facts
                    .pipelines
                    .iter()
                    .map(|((sha, _), pipeline)| (sha.clone(), pipeline.clone()))
                    .collect(),
                rejected: facts.rejected.iter().cloned().collect(),
            })
            .unwrap_or_default())
    }

    async fn pipeline(&self, key: &RefKey, sha: &Sha, id: u64) -> Result<Option<Pipeline>> {
        let inner = self.lock();
        Ok(inner
            .facts
            .get(key)
            .and_then(|facts| facts.pipelines.get(&(sha.clone(), id)))
            .cloned())
    }

    async fn forget_pipelines(&self, key: &RefKey, forget: &[(Sha, u64)]) -> Result<()> {
        let ticket = {
            let mut inner = self.lock();
            if let Some(facts) = inner.facts.get_mut(key) {
                for id in forget {
                    facts.pipelines.remove(id);
                }
                for (sha, id) in forget {
                    inner.mark(Dirty::Pipeline(key.clone(), sha.clone(), *id));
                }
            }
            inner.ticket()
        };
        self.durable(ticket).await
    }

    async fn raise_position(&self, key: &RefKey, at_least: u64) -> Result<u64> {
        let (position, ticket) = {
            let mut inner = self.lock();
            let facts = inner.facts.entry(key.clone()).or_default();
            if facts.position >= at_least {
                return Ok(facts.position);
            }
            facts.position = at_least;
            inner.mark(Dirty::Facts(key.clone()));
            (at_least, inner.ticket())
        };
        self.durable(ticket).await?;
        Ok(position)
    }
}

#[async_trait]
impl AgentStore for EmbeddedStore {
    async fn agent(&self, agent: &str) -> Result<AgentRead> {
        let inner = self.lock();
        Ok(match inner.agents.get(agent) {
            Some(stored) => AgentRead {
                version: stored.version,
                incarnation: stored.incarnation,
                value: AgentState::clone(&stored.state),
            },
            None => AgentRead::default(),
        })
    }

    async fn agents(&self, agents: &[String]) -> Result<Vec<AgentRead>> {
        let mut states = Vec::with_capacity(agents.len());
        for agent in agents {
            states.push(self.agent(agent).await?);
        }
        Ok(states)
    }

    async fn write_agents_telling(
        &self,
        writes: &AgentWrites<'_>,
        told: &mut Told<'_>,
    ) -> Result<Vec<Written>> {
        // Steps of `write_step` agents, each durable before it is told: a fan-out's first
        // agents are sent to while the rest are written, and a newer fact stops it between
        // steps.
        let mut outcomes = vec![Written::Withheld; writes.agents().len()];
        // One state per change however many agents write it: a fan-out to thousands of
        // agents would otherwise copy their whole histories as many times.
        let mut shared: Vec<Option<Arc<AgentState>>> = vec![None; writes.changes().len()];
        let size = self.write_step.max(1);
        for (n, step) in writes.agents().chunks(size).enumerate() {
            let first = n * size;
            let ticket = {
                let mut inner = self.lock();
                // The step's entry holds the changes its agents wrote, each once.
                let mut logged = AgentChanges {
                    changes: Vec::new(),
                    agents: Vec::new(),
                };
                let mut logged_as: HashMap<usize, usize> = HashMap::new();
                for (at, write) in (first..).zip(step) {
                    let change = writes.change_of(write);
                    let (held, appended, staged) = inner.agents.get(write.agent).map_or(
                        (
                            StoredVersion::default(),
                            Appended::default(),
                            Appended::default(),
                        ),
                        |stored| {
                            let held = StoredVersion {
                                version: stored.version,
                                position: stored.state.position,
                                incarnation: stored.incarnation,
                            };
                            (held, stored.appended, stored.staged)
                        },
                    );
                    let outcome = crate::evaluate::admit(
                        held,
                        write.incarnation,
                        write.expected,
                        change.state.position,
                    );
                    outcomes[at] = outcome;
                    let Written::Saved { version } = outcome else {
                        continue;
                    };
                    let state = match shared.get_mut(write.change) {
                        Some(slot) => slot.get_or_insert_with(|| capped(change.state)).clone(),
                        None => capped(change.state),
                    };
                    inner.agents.insert(
                        write.agent.to_owned(),
                        StoredAgent {
                            version,
                            // A writer without one leaves the record's incarnation.
                            incarnation: if write.incarnation == 0 {
                                held.incarnation
                            } else {
                                write.incarnation
                            },
                            state,
                            appended: appended.after(change),
                            staged,
                        },
                    );
                    inner.mark(Dirty::Agent(write.agent.to_owned()));
                    let logged_change = *logged_as.entry(write.change).or_insert_with(|| {
                        logged.changes.push(DecidedChange::of(change));
                        logged.changes.len() - 1
                    });
                    logged.agents.push(ChangedAgent {
                        agent: write.agent.to_owned(),
                        version,
                        change: logged_change,
                        incarnation: write.incarnation,
                    });
                }
                if !logged.agents.is_empty() {
                    self.log(&mut inner, Broadcast::AgentsChanged(logged));
                }
                inner.ticket()
            };
            self.durable(ticket).await?;
            let done: Vec<(usize, Written)> = (first..first + step.len())
                .map(|at| (at, outcomes[at]))
                .collect();
            if told(&done).is_break() {
                break;
            }
        }
        Ok(outcomes)
    }

    async fn give_agent(&self, agent: &str, from: u64, to: u64) -> Result<bool> {
        let ticket = {
            let mut inner = self.lock();
            let held = inner.incarnation_of(agent);
            if held == to {
                return Ok(true);
            }
            if held != from {
                return Ok(false);
            }
            inner.start_afresh(agent, Some(to));
            inner.ticket()
        };
        self.durable(ticket).await?;
        Ok(true)
    }

    async fn set_sync_errors(&self, errors: &[(&str, Option<&SyncError>)]) -> Result<()> {
        let ticket = {
            let mut inner = self.lock();
            for (agent, error) in errors {
                let changed = match error {
                    Some(error) => {
                        inner
                            .sync_errors
                            .insert((*agent).to_owned(), (*error).clone())
                            != Some((*error).clone())
                    }
                    None => inner.sync_errors.remove(*agent).is_some(),
                };
                if changed {
                    inner.mark(Dirty::SyncError((*agent).to_owned()));
                }
            }
            inner.ticket()
        };
        self.durable(ticket).await
    }

    async fn sync_error(&self, agent: &str) -> Result<Option<SyncError>> {
        Ok(self.lock().sync_errors.get(agent).cloned())
    }
}

#[async_trait]
impl ReportStore for EmbeddedStore {
    async fn push_report(
        &self,
        agent: &str,
        incarnation: u64,
        report: &[u8],
        keep: usize,
    ) -> Result<Reported> {
        let ticket = {
            let mut inner = self.lock();
            let held = inner.incarnation_of(agent);
            if !same_incarnation(held, incarnation) {
                return Ok(Reported::Replaced);
            }
            let reports = inner.reports.entry(agent.to_owned()).or_default();
            reports.push_front(report.to_vec());
            reports.truncate(keep);
            let message = Broadcast::Report {
                agent: agent.to_owned(),
                report: report.to_vec(),
                incarnation,
            };
            inner.mark(Dirty::Reports(agent.to_owned()));
            self.log(&mut inner, message);
            inner.ticket()
        };
        self.durable(ticket).await?;
        Ok(Reported::Kept)
    }

    async fn reports(&self, agent: &str, limit: usize) -> Result<Vec<Vec<u8>>> {
        let inner = self.lock();
        Ok(inner
            .reports
            .get(agent)
            .map(|r| r.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }
}

#[async_trait]
impl PresenceStore for EmbeddedStore {
    async fn set_presence(&self, replica: &str, agent: &str, connected: bool) -> Result<()> {
        let ticket = {
            let mut inner = self.lock();
            if connected {
                inner.presence.insert(agent.to_owned(), replica.to_owned());
            } else if inner.presence.get(agent).is_some_and(|r| r == replica) {
                inner.presence.remove(agent);
            }
            let message = Broadcast::Connection {
                agent: agent.to_owned(),
                connected,
                replica: replica.to_owned(),
            };
            self.log(&mut inner, message);
            inner.ticket()
        };
        self.durable(ticket).await
    }

    async fn refresh_presence(&self, _replica: &str) -> Result<()> {
        Ok(())
    }

    /// One process holds the store: no other publisher could take what it holds.
    async fn mark_alive(&self, _replica: &str) -> Result<()> {
        Ok(())
    }

    async fn all_presence(&self) -> Result<Vec<(String, String)>> {
        let inner = self.lock();
        Ok(inner
            .presence
            .iter()
            .map(|(agent, replica)| (agent.clone(), replica.clone()))
            .collect())
    }
}

#[async_trait]
impl ChangeLog for EmbeddedStore {
    fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    async fn next_for_statuses(
        &self,
        consumer: &str,
        reclaim_after: Duration,
    ) -> Result<Option<LogEntry>> {
        let deadline = tokio::time::Instant::now() + STATUS_WAIT;
        loop {
            // Registered before looking, so an append in between still wakes this call.
            let appended = self.appended.notified();
            if let Some(entry) =
                self.lock()
                    .status_feed
                    .take(consumer, reclaim_after, Instant::now())
            {
                return Ok(Some(entry));
            }
            if tokio::time::timeout_at(deadline, appended).await.is_err() {
                return Ok(None);
            }
        }
    }

    async fn release_statuses(&self, consumer: &str, _reclaim_after: Duration) -> Result<()> {
        self.lock().status_feed.release(consumer);
        self.appended.notify_waiters();
        Ok(())
    }

    async fn ack_statuses(&self, id: &str) -> Result<()> {
        let ticket = {
            let mut inner = self.lock();
            if let Some(id) = inner.status_feed.ack(id) {
                inner.mark(Dirty::Feed(id));
            }
            inner.ticket()
        };
        self.durable(ticket).await
    }

    async fn begin_status(
        &self,
        status: &StatusKey<'_>,
        holder: &str,
        lease: Duration,
    ) -> Result<StatusClaim> {
        let key = status_id(status);
        let now = Instant::now();
        let (claim, ticket) = {
            let mut inner = self.lock();
            // Claims end with their post: the map holds only the statuses being posted now.
            inner.posting.retain(|_, (_, until)| *until > now);
            if let Some((other, _)) = inner.posting.get(&key)
                && other != holder
            {
                return Ok(StatusClaim::InFlight);
            }
            match ShownStatus::against(inner.statuses.get(&key, now), status) {
                Against::Older => return Ok(StatusClaim::Superseded),
                // A claim left unfinished may have posted another state: only GitLab can tell
                // whether the one shown is still the one posted last.
                Against::SameState if !inner.taken.contains(&key, now) => {
                    inner
                        .statuses
                        .put(key.clone(), ShownStatus::of(status), now);
                    inner.mark(Dirty::Status(key));
                    (StatusClaim::Posted, inner.ticket())
                }
                Against::SameState | Against::Post => {
                    inner
                        .posting
                        .insert(key.clone(), (holder.to_owned(), now + lease));
                    let claim = if inner.taken.insert(key.clone(), now) {
                        inner.mark(Dirty::Taken(key));
                        StatusClaim::Mine
                    } else {
                        StatusClaim::Retaken
                    };
                    (claim, inner.ticket())
                }
            }
        };
        self.durable(ticket).await?;
        Ok(claim)
    }

    async fn finish_status(
        &self,
        status: &StatusKey<'_>,
        holder: &str,
        posted: bool,
    ) -> Result<()> {
        let key = status_id(status);
        let now = Instant::now();
        let ticket = {
            let mut inner = self.lock();
            let claimant = inner
                .posting
                .get(&key)
                .map(|(claimant, until)| (claimant == holder, *until > now));
            if let Some((true, _)) = claimant {
                inner.posting.remove(&key);
            }
            // Another publisher holds the claim when this one's lease ended: its post may yet
            // fail, and the taken mark is left to whoever comes next.
            let held_by_another = matches!(claimant, Some((false, true)));
            if posted && !held_by_another {
                inner.taken.remove(&key);
                inner.mark(Dirty::Taken(key.clone()));
            }
            if posted {
                let later = inner
                    .statuses
                    .get(&key, now)
                    .is_none_or(|shown| shown.order < status.order);
                if later {
                    inner
                        .statuses
                        .put(key.clone(), ShownStatus::of(status), now);
                    inner.mark(Dirty::Status(key));
                }
            }
            inner.ticket()
        };
        self.durable(ticket).await
    }
}

#[async_trait]
impl LeaseStore for EmbeddedStore {
    async fn hold_lease(&self, shard: u16, replica: &str, ttl: Duration) -> Result<bool> {
        let mut inner = self.lock();
        let now = Instant::now();
        let free = inner
            .leases
            .get(&shard)
            .is_none_or(|(holder, until)| holder == replica || *until <= now);
        if free {
            inner.leases.insert(shard, (replica.to_owned(), now + ttl));
        }
        Ok(free)
    }

    async fn release_lease(&self, shard: u16, replica: &str) -> Result<()> {
        let mut inner = self.lock();
        if inner
            .leases
            .get(&shard)
            .is_some_and(|(holder, _)| holder == replica)
        {
            inner.leases.remove(&shard);
        }
        Ok(())
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn ping(&self) -> Result<()> {
        match &self.journal {
            Some(journal) => match &journal.committed.borrow().failed {
                Some(why) => Err(failed_write(&journal.path, why)),
                None => Ok(()),
            },
            None => Ok(()),
        }
    }

    fn describe(&self) -> String {
        match &self.journal {
            Some(journal) => format!("embedded store in {} (single replica)", journal.path),
            None => "embedded in-memory store (single replica, not durable)".to_owned(),
        }
    }
}

fn status_id(status: &StatusKey<'_>) -> StatusId {
    (status.agent.to_owned(), status.sha.to_owned())
}

/// The registry of runtime agents: the last change's number and each agent's record.
#[derive(Default)]
struct MemoryRegistry {
    seq: u64,
    records: BTreeMap<String, Versioned<RegistryRecord>>,
}

#[async_trait]
impl RegistryStore for EmbeddedStore {
    async fn registry(&self) -> Result<Registry> {
        let inner = self.lock();
        Ok(Registry {
            seq: inner.registry.seq,
            agents: inner.registry.records.values().cloned().collect(),
        })
    }

    async fn registered(&self, name: &str) -> Result<Option<Versioned<RegistryRecord>>> {
        Ok(self.lock().registry.records.get(name).cloned())
    }

    async fn change_registered(
        &self,
        name: &str,
        record: Option<&RegistryRecord>,
        expected: u64,
    ) -> Result<RegistryWritten> {
        let (outcome, ticket) = {
            let mut inner = self.lock();
            let stored = inner.registry.records.get(name).map_or(0, |r| r.version);
            if stored != expected {
                // As on Redis: the very record asked for, already written, is answered as
                // written (a write repeated after its answer was lost).
                return Ok(match (record, inner.registry.records.get(name)) {
                    (Some(record), Some(current)) if current.value == *record => {
                        RegistryWritten::Saved {
                            seq: current.version,
                        }
                    }
                    _ => RegistryWritten::Conflict,
                });
            }
            inner.registry.seq += 1;
            let seq = inner.registry.seq;
            if expected == 0 || record.is_none() {
                // A new agent starts afresh, even under the name of a deleted one; its empty
                // record carries its incarnation, so that an evaluation of the old agent
                // still running cannot write into it.
                inner.start_afresh(name, record.map(RegistryRecord::incarnation));
            }
            match record {
                Some(record) => inner.registry.records.insert(
                    name.to_owned(),
                    Versioned {
                        version: seq,
                        value: record.clone(),
                    },
                ),
                None => inner.registry.records.remove(name),
            };
            let message = Broadcast::Registry {
                agent: name.to_owned(),
                seq,
                record: record.cloned().map(Box::new),
            };
            inner.mark(Dirty::Registry(name.to_owned()));
            self.log(&mut inner, message);
            (RegistryWritten::Saved { seq }, inner.ticket())
        };
        self.durable(ticket).await?;
        Ok(outcome)
    }
}

fn failed_write(path: &str, why: &str) -> StoreError {
    StoreError::Embedded(format!(
        "writing {path} failed ({why}); nothing is accepted until the server is restarted with \
         the disk fixed"
    ))
}

fn ref_id(key: &RefKey) -> String {
    format!("{}{SEP}{}", key.project, key.branch)
}

/// A shown status as the file holds it: when it was posted (Unix ms), a space, the status.
fn encode_shown(at_ms: i64, shown: &ShownStatus) -> Vec<u8> {
    format!("{at_ms} {}", shown.encode()).into_bytes()
}

fn decode_shown(value: &[u8]) -> Option<(i64, ShownStatus)> {
    let (at_ms, shown) = std::str::from_utf8(value).ok()?.split_once(' ')?;
    Some((at_ms.parse().ok()?, ShownStatus::decode(shown)?))
}

fn status_key(id: &StatusId) -> String {
    format!("{}{SEP}{}", id.0, id.1)
}

/// The registry record of an agent as the file holds it: its version and the record.
#[derive(serde::Serialize, serde::Deserialize)]
struct RegistryFile {
    version: u64,
    record: RegistryRecord,
}

/// Writes what changed to the file, batch by batch, and tells the waiting callers and the
/// followers once a batch is on disk.
struct Writer {
    disk: Disk,
    inner: Arc<Mutex<Inner>>,
    notices: broadcast::Sender<Notice>,
    appended: Arc<Notify>,
    committed: watch::Sender<Committed>,
}

impl Writer {
    fn run(self, woken: std::sync::mpsc::Receiver<()>) {
        // The load dropped what had expired; the next sweep is due in an hour.
        let mut forgotten_at = Instant::now();
        loop {
            let stopping = match woken.recv_timeout(FORGET_EVERY) {
                Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
                // The store is gone: write what is left, then close the file.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => true,
            };
            if self.committed.borrow().failed.is_some() {
                if stopping {
                    return;
                }
                continue;
            }
            self.commit();
            if forgotten_at.elapsed() >= FORGET_EVERY {
                forgotten_at = Instant::now();
                self.forget_old();
            }
            if stopping {
                return;
            }
        }
    }

    /// Writes one batch: everything marked since the last one.
    fn commit(&self) {
        let (staged, notices, upto, feed_upto) = {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let feed_upto = inner.status_feed.next_id;
            let Some(pending) = inner.pending.as_mut() else {
                return;
            };
            let dirty = std::mem::take(&mut pending.dirty);
            let notices = std::mem::take(&mut pending.notices);
            let upto = pending.ticket;
            let staged: Vec<Staged> = dirty.iter().flat_map(|d| stage(&mut inner, d)).collect();
            (staged, notices, upto, feed_upto)
        };
        let mut puts = Vec::with_capacity(staged.len());
        let mut encoded = EncodedStates::new();
        for staged in staged {
            staged.encode_into(&mut encoded, &mut puts);
        }
        if !puts.is_empty()
            && let Err(failure) = self.disk.write(puts)
        {
            error!(error = %failure, "cannot write the embedded store; refusing every change from now on");
            self.committed
                .send_modify(|c| c.failed = Some(failure.to_string()));
            return;
        }
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .status_feed
            .durable_upto = feed_upto;
        for message in notices {
            let _ = self.notices.send(Notice::Message(message));
        }
        self.appended.notify_waiters();
        self.committed.send_if_modified(|c| {
            let advanced = c.upto < upto;
            c.upto = c.upto.max(upto);
            advanced
        });
    }

    fn forget_old(&self) {
        let now = crate::clock::now_ms();
        for (table, age) in [
            (Table::Deliveries, DELIVERY_MEMORY_SECS),
            (Table::Statuses, STATUS_MEMORY_SECS),
            (Table::Taken, STATUS_MEMORY_SECS),
        ] {
            if let Err(failure) = self.disk.forget_older(table, Duration::from_secs(age), now) {
                // Only space is lost; the next round tries again.
                error!(error = %failure, "cannot forget old markers in the embedded store");
            }
        }
    }
}

/// A record to write, taken while the store is locked.
enum Staged {
    Encoded(Put),
    /// An agent's state, encoded once the lock is released (a fan-out marks thousands of
    /// agents, and webhooks wait for the lock meanwhile), with what its rings lack.
    Agent {
        agent: String,
        stored: StoredAgent,
        unwritten: Appended,
    },
    /// An agent that is gone, rings and all.
    Removed(String),
}

impl Staged {
    fn encode_into(self, encoded: &mut EncodedStates, puts: &mut Vec<Put>) {
        match self {
            Self::Encoded(put) => puts.push(put),
            Self::Agent {
                agent,
                stored,
                unwritten,
            } => agent_puts(&agent, &stored, unwritten, encoded, puts),
            Self::Removed(agent) => {
                puts.push((Table::Agents, agent.clone(), None));
                for (table, capacity) in [DECISION_RING, DEPLOYED_RING] {
                    for slot in 0..capacity as u64 {
                        puts.push((table, slot_key(&agent, slot), None));
                    }
                }
            }
        }
    }
}

/// The texts of states being written, each encoded once however many agents share it.
type EncodedStates = HashMap<*const AgentState, EncodedState>;

/// A state's core record and (as they are asked for) its decisions, encoded.
struct EncodedState {
    core: String,
    decisions: Vec<Option<Vec<u8>>>,
}

/// The records that bring `agent`'s file up to `stored`: its own record, and the newest
/// `unwritten` entries of each ring (all of them, if more were appended than it keeps).
fn agent_puts(
    agent: &str,
    stored: &StoredAgent,
    unwritten: Appended,
    encoded: &mut EncodedStates,
    puts: &mut Vec<Put>,
) {
    let state = &stored.state;
    let texts = encoded
        .entry(Arc::as_ptr(state))
        .or_insert_with(|| EncodedState {
            core: records::encode_agent(state),
            decisions: vec![None; state.gate.decisions.len()],
        });
    let decisions = RingV1::laid_out(
        stored.appended.decisions,
        state.gate.decisions.len(),
        DECISION_RING.1,
    );
    let deployed = RingV1::laid_out(
        stored.appended.deployed,
        state.gate.deployed.len(),
        DEPLOYED_RING.1,
    );
    puts.push((
        Table::Agents,
        agent.to_owned(),
        Some(records::encode_agent_file(
            stored.version,
            stored.incarnation,
            &texts.core,
            decisions,
            deployed,
        )),
    ));
    for (index, number) in fresh(decisions, unwritten.decisions) {
        let (Some(decision), Some(text)) = (
            state.gate.decisions.get(index),
            texts.decisions.get_mut(index),
        ) else {
            continue;
        };
        let text = text.get_or_insert_with(|| records::encode_decision(decision).into_bytes());
        puts.push((
            DECISION_RING.0,
            slot_key(agent, number % DECISION_RING.1 as u64),
            Some(text.clone()),
        ));
    }
    for (index, number) in fresh(deployed, unwritten.deployed) {
        let Some(sha) = state.gate.deployed.get(index) else {
            continue;
        };
        puts.push((
            DEPLOYED_RING.0,
            slot_key(agent, number % DEPLOYED_RING.1 as u64),
            Some(sha.as_str().as_bytes().to_vec()),
        ));
    }
}

/// The live entries of `ring` among its newest `unwritten`, as (index among the live ones,
/// entry number): all of them if more were appended than it keeps.
fn fresh(ring: RingV1, unwritten: u64) -> impl Iterator<Item = (usize, u64)> {
    let old = ring
        .len
        .saturating_sub(usize::try_from(unwritten).unwrap_or(usize::MAX));
    ring.live().enumerate().skip(old)
}

/// The records that bring the file's `id` ref up to `facts`: its own record, and the newest
/// `unwritten` entries of each ring. Its pipelines are records of their own.
fn ref_puts(id: &str, facts: &RefFacts, unwritten: FactsAppended, puts: &mut Vec<Put>) {
    let header = facts.header();
    puts.push((
        Table::Facts,
        id.to_owned(),
        Some(records::encode_ref_facts(header)),
    ));
    let pushes = fresh(header.pushes, unwritten.pushes);
    ring_puts(
        id,
        PUSHES_RING,
        pushes,
        &facts.pushes,
        records::encode_push,
        puts,
    );
    let rejected = fresh(header.rejected, unwritten.rejected);
    ring_puts(
        id,
        REJECTED_RING,
        rejected,
        &facts.rejected,
        records::encode_rejected,
        puts,
    );
}

/// The entries `fresh` (index among the live ones, entry number) of the ref `id`'s ring in
/// `table`, from its live `entries`.
fn ring_puts<T>(
    id: &str,
    (table, capacity): (Table, usize),
    fresh: impl Iterator<Item = (usize, u64)>,
    entries: &VecDeque<T>,
    encode: impl Fn(&T) -> String,
    puts: &mut Vec<Put>,
) {
    for (index, number) in fresh {
        if let Some(entry) = entries.get(index) {
            let key = ring_entry_key(id, number % capacity as u64);
            puts.push((table, key, Some(encode(entry).into_bytes())));
        }
    }
}

/// The record of pipeline `pipeline_id` of `sha` of the ref `id`: written, or removed when
/// the ref no longer keeps it.
fn pipeline_put(id: &str, sha: &Sha, pipeline_id: u64, pipeline: Option<&Pipeline>) -> Put {
    (
        Table::FactPipelines,
        pipeline_key(id, sha, pipeline_id),
        pipeline.map(records::encode_pipeline_entry),
    )
}

/// The table of a ref's pushes, and how many it keeps.
const PUSHES_RING: (Table, usize) = (Table::FactPushes, PUSHES_KEPT);

/// The table of a ref's rejected claims, and how many it keeps.
const REJECTED_RING: (Table, usize) = (Table::FactRejected, MAX_REJECTED);

/// The key of the entry in ring slot `slot` of the ref `id`: the ref first, as one ref's
/// facts are written one after another.
fn ring_entry_key(id: &str, slot: u64) -> String {
    format!("{id}{SEP}{slot}")
}

/// The key of pipeline `id` of `sha` of the ref `ref_id`.
fn pipeline_key(ref_id: &str, sha: &Sha, id: u64) -> String {
    format!("{ref_id}{SEP}{}", records::pipeline_field(sha, id))
}

/// The table of an agent's decisions, and how many it keeps.
const DECISION_RING: (Table, usize) = (Table::AgentDecisions, DECISION_HISTORY);

/// The table of an agent's deployed commits, and how many it keeps.
const DEPLOYED_RING: (Table, usize) = (Table::AgentDeployed, DEPLOYED_HISTORY);

/// The key of `agent`'s entry in ring slot `slot`.
fn slot_key(agent: &str, slot: u64) -> String {
    format!("{slot:03}{SEP}{agent}")
}

/// `state` as stored: with the same caps on its decisions and deployed set as Redis's
/// lists, and as the file's rings hold.
fn capped(state: &AgentState) -> Arc<AgentState> {
    let mut state = state.clone();
    while state.gate.decisions.len() > DECISION_HISTORY {
        state.gate.decisions.pop_front();
    }
    while state.gate.deployed.len() > DEPLOYED_HISTORY {
        state.gate.deployed.pop_front();
    }
    Arc::new(state)
}

/// What `dirty` writes, with agents' states left to encode.
fn stage(inner: &mut Inner, dirty: &Dirty) -> Vec<Staged> {
    let now = Instant::now();
    let time = || Some(disk::encode_time(crate::clock::now_ms()));
    let puts = match dirty {
        Dirty::Facts(key) => {
            let mut puts = Vec::new();
            if let Some(facts) = inner.facts.get_mut(key) {
                let unwritten = facts.appended.since(facts.staged);
                facts.staged = facts.appended;
                ref_puts(&ref_id(key), facts, unwritten, &mut puts);
            }
            puts
        }
        Dirty::Pipeline(key, sha, id) => {
            let pipeline = inner
                .facts
                .get(key)
                .and_then(|facts| facts.pipelines.get(&(sha.clone(), *id)));
            vec![pipeline_put(&ref_id(key), sha, *id, pipeline)]
        }
        Dirty::Delivery(key, id) => vec![(
            Table::Deliveries,
            format!("{}{SEP}{id}", ref_id(key)),
            time(),
        )],
        Dirty::Agent(agent) => {
            return vec![match inner.agents.get_mut(agent) {
                Some(stored) => {
                    let unwritten = stored.appended.since(stored.staged);
                    stored.staged = stored.appended;
                    Staged::Agent {
                        agent: agent.clone(),
                        stored: stored.clone(),
                        unwritten,
                    }
                }
                None => Staged::Removed(agent.clone()),
            }];
        }
        Dirty::Reports(agent) => vec![(
            Table::Reports,
            agent.clone(),
            inner.reports.get(agent).map(disk::encode_frames),
        )],
        Dirty::SyncError(agent) => vec![(
            Table::SyncErrors,
            agent.clone(),
            inner
                .sync_errors
                .get(agent)
                .and_then(|e| serde_json::to_vec(e).ok()),
        )],
        Dirty::Status(id) => vec![(
            Table::Statuses,
            status_key(id),
            inner
                .statuses
                .get(id, now)
                .map(|shown| encode_shown(crate::clock::now_ms(), shown)),
        )],
        Dirty::Taken(id) => vec![(
            Table::Taken,
            status_key(id),
            inner.taken.contains(id, now).then(time).flatten(),
        )],
        Dirty::Feed(id) => vec![(
            Table::Feed,
            format!("{id:020}"),
            inner
                .status_feed
                .get(*id)
                .and_then(|m| serde_json::to_vec(m).ok()),
        )],
        Dirty::Registry(name) => vec![
            (
                Table::Registry,
                name.clone(),
                inner.registry.records.get(name).and_then(|r| {
                    serde_json::to_vec(&RegistryFile {
                        version: r.version,
                        record: r.value.clone(),
                    })
                    .ok()
                }),
            ),
            (
                Table::Meta,
                "registry_seq".to_owned(),
                Some(inner.registry.seq.to_string().into_bytes()),
            ),
        ],
    };
    puts.into_iter().map(Staged::Encoded).collect()
}

/// Fills `inner` with what the file holds.
fn load(disk: &Disk, inner: &mut Inner) -> Result<()> {
    let now = Instant::now();
    let now_ms = crate::clock::now_ms();
    let age_of = |at_ms: i64| Duration::from_millis(u64::try_from(now_ms - at_ms).unwrap_or(0));
    let age = |value: &[u8]| disk::time_of(value).map(age_of);
    // Markers past their time (or unreadable) are dropped from the file as they are read,
    // and records of an earlier version rewritten.
    let mut rewrites: Vec<Put> = Vec::new();
    load_facts(disk, inner, &mut rewrites)?;
    for (key, value) in disk.scan(Table::Deliveries)? {
        let mut parts = key.splitn(3, SEP);
        let kept = match (parts.next(), parts.next(), parts.next(), age(&value)) {
            (Some(project), Some(branch), Some(id), Some(age)) => {
                let delivery = RefKey {
                    project: project.to_owned(),
                    branch: branch.to_owned(),
                };
                inner
                    .deliveries
                    .insert_aged((delivery, id.to_owned()), now, age)
            }
            _ => false,
        };
        if !kept {
            rewrites.push((Table::Deliveries, key, None));
        }
    }
    load_agents(disk, inner, &mut rewrites)?;
    for (agent, value) in disk.scan(Table::Reports)? {
        let frames = disk::decode_frames(&value)
            .ok_or_else(|| corrupt_record("reports", &agent, "cut short"))?;
        inner.reports.insert(agent, frames.into());
    }
    for (agent, value) in disk.scan(Table::SyncErrors)? {
        let error = serde_json::from_slice(&value)
            .map_err(|e| corrupt_record("sync_errors", &agent, &e.to_string()))?;
        inner.sync_errors.insert(agent, error);
    }
    // Records of an earlier version name a state too, and hold only when it was posted:
    // of a commit's, the one posted last is read as shown, since before any status of this
    // version.
    let mut earlier_posted: HashMap<StatusId, i64> = HashMap::new();
    for (key, value) in disk.scan(Table::Statuses)? {
        let mut parts = key.splitn(3, SEP);
        let (agent, sha, old_state) = (parts.next(), parts.next(), parts.next());
        let shown = match old_state {
            Some(state) => disk::time_of(&value).map(|at_ms| {
                let shown = ShownStatus {
                    order: StatusOrder::default(),
                    state: state.to_owned(),
                };
                (at_ms, shown)
            }),
            None => decode_shown(&value),
        };
        let kept = match (agent, sha, shown) {
            (Some(agent), Some(sha), Some((at_ms, shown))) => {
                let id = (agent.to_owned(), sha.to_owned());
                let later_known = match (old_state, earlier_posted.get(&id)) {
                    (None, _) => false,
                    (Some(_), Some(posted_at)) => *posted_at > at_ms,
                    (Some(_), None) => inner.statuses.contains(&id, now),
                };
                let encoded = encode_shown(at_ms, &shown);
                let kept = !later_known
                    && inner
                        .statuses
                        .put_aged(id.clone(), shown, now, age_of(at_ms));
                if kept && old_state.is_some() {
                    earlier_posted.insert(id.clone(), at_ms);
                    rewrites.push((Table::Statuses, status_key(&id), Some(encoded)));
                }
                kept && old_state.is_none()
            }
            _ => false,
        };
        if !kept {
            rewrites.push((Table::Statuses, key, None));
        }
    }
    for (key, value) in disk.scan(Table::Taken)? {
        let mut parts = key.splitn(3, SEP);
        let (agent, sha, old_state) = (parts.next(), parts.next(), parts.next());
        let kept = match (agent, sha, age(&value)) {
            (Some(agent), Some(sha), Some(age)) => {
                let id = (agent.to_owned(), sha.to_owned());
                let kept = inner.taken.insert_aged(id.clone(), now, age);
                if kept && old_state.is_some() {
                    rewrites.push((Table::Taken, status_key(&id), Some(value.clone())));
                }
                kept && old_state.is_none()
            }
            _ => false,
        };
        if !kept {
            rewrites.push((Table::Taken, key, None));
        }
    }
    for (key, value) in disk.scan(Table::Feed)? {
        let id: u64 = key
            .parse()
            .map_err(|_| corrupt_record("feed", &key, "not an entry id"))?;
        inner.status_feed.next_id = inner.status_feed.next_id.max(id);
        // An entry this version cannot read is skipped, as the Redis log's would be.
        if let Some(message) = Broadcast::decode(&value) {
            inner.status_feed.entries.push_back(FeedEntry {
                id,
                message,
                taken: None,
            });
        }
    }
    for (name, value) in disk.scan(Table::Registry)? {
        let file: RegistryFile = serde_json::from_slice(&value)
            .map_err(|e| corrupt_record("registry", &name, &e.to_string()))?;
        inner.registry.records.insert(
            name,
            Versioned {
                version: file.version,
                value: file.record,
            },
        );
    }
    if !rewrites.is_empty() {
        disk.write(rewrites)?;
    }
    inner.deliveries.settle();
    inner.statuses.settle();
    inner.taken.settle();
    if let Some(seq) = disk.get(Table::Meta, "registry_seq")? {
        inner.registry.seq = disk::time_of(&seq).map_or(0, |seq| u64::try_from(seq).unwrap_or(0));
    }
    Ok(())
}

/// A ref read from the file whose rings and pipelines are being read.
struct LoadingRef {
    key: RefKey,
    header: RefFactsV2,
    pushes: Vec<Option<crate::gate::Push>>,
    rejected: Vec<Option<crate::gate::Rejected>>,
    pipelines: BTreeMap<(Sha, u64), Pipeline>,
}

/// Fills `inner.facts` from the file: the refs' records, then their rings' entries and
/// pipelines. A ref written whole by an earlier version is rewritten into records.
fn load_facts(disk: &Disk, inner: &mut Inner, rewrites: &mut Vec<Put>) -> Result<()> {
    let mut loading: HashMap<String, LoadingRef> = HashMap::new();
    for (id, value) in disk.scan(Table::Facts)? {
        let key = match id.split_once(SEP) {
            Some((project, branch)) => RefKey {
                project: project.to_owned(),
                branch: branch.to_owned(),
            },
            None => return Err(corrupt_record("facts", &id, "no branch")),
        };
        match records::decode_ref_facts(&id, &value)? {
            RefFactsFile::Split(header) => {
                if header.position > MAX_COUNT {
                    return Err(corrupt_record(
                        "facts",
                        &id,
                        "its position is not a real count",
                    ));
                }
                check_ring(&format!("facts {id}"), header.pushes, PUSHES_RING.1)?;
                check_ring(&format!("facts {id}"), header.rejected, REJECTED_RING.1)?;
                // Read where they were written; re-laid below when this version keeps
                // another number.
                let ref_loading = LoadingRef {
                    key,
                    header,
                    pushes: vec![None; header.pushes.len],
                    rejected: vec![None; header.rejected.len],
                    pipelines: BTreeMap::new(),
                };
                loading.insert(id, ref_loading);
            }
            RefFactsFile::Whole((position, pushes, pipelines, rejected)) => {
                let pipelines = pipelines
                    .into_iter()
                    .map(|(sha, p)| ((sha, p.id), p))
                    .collect();
                let facts =
                    RefFacts::laid_out_anew(position, pushes.into(), pipelines, rejected.into());
                ref_puts(&id, &facts, facts.appended, rewrites);
                for ((sha, pipeline_id), pipeline) in &facts.pipelines {
                    rewrites.push(pipeline_put(&id, sha, *pipeline_id, Some(pipeline)));
                }
                inner.facts.insert(key, facts);
            }
        }
    }
    load_ring(
        disk,
        PUSHES_RING,
        &mut loading,
        |r| (r.header.pushes, &mut r.pushes),
        |key, text| {
            let text = std::str::from_utf8(text)
                .map_err(|e| corrupt_record("fact_pushes", key, &e.to_string()))?;
            records::decode_push(&format!("fact_pushes {key}"), text)
        },
    )?;
    load_ring(
        disk,
        REJECTED_RING,
        &mut loading,
        |r| (r.header.rejected, &mut r.rejected),
        |key, text| records::decode_rejected(&format!("fact_rejected {key}"), text),
    )?;
    disk.scan_each(Table::FactPipelines, |key, value| {
        // Pipelines of no ref are left alone: nothing reads them.
        let Some((id, field)) = key.rsplit_once(SEP) else {
            return Ok(());
        };
        if let Some(ref_loading) = loading.get_mut(id) {
            let (sha, pipeline) =
                records::decode_pipeline_entry(&format!("fact_pipelines {key}"), field, value)?;
            ref_loading.pipelines.insert((sha, pipeline.id), pipeline);
        }
        Ok(())
    })?;
    for (id, ref_loading) in loading {
        let missing = || {
            corrupt_record(
                "facts",
                &id,
                "an entry of its history is missing from the file",
            )
        };
        let pushes = ref_loading
            .pushes
            .into_iter()
            .collect::<Option<VecDeque<_>>>()
            .ok_or_else(missing)?;
        let rejected = ref_loading
            .rejected
            .into_iter()
            .collect::<Option<VecDeque<_>>>()
            .ok_or_else(missing)?;
        let header = ref_loading.header;
        let relaid = header.pushes.slots(PUSHES_RING.1) != PUSHES_RING.1
            || header.rejected.slots(REJECTED_RING.1) != REJECTED_RING.1;
        let facts = if relaid {
            // The old slots go, so that none is read later as one of the new.
            for (table, ring) in [
                (PUSHES_RING.0, ref_loading.header.pushes),
                (REJECTED_RING.0, ref_loading.header.rejected),
            ] {
                let old = ring.capacity.unwrap_or_default() as u64;
                rewrites.extend((0..old).map(|slot| (table, ring_entry_key(&id, slot), None)));
            }
            let facts =
                RefFacts::laid_out_anew(header.position, pushes, ref_loading.pipelines, rejected);
            ref_puts(&id, &facts, facts.appended, rewrites);
            facts
        } else {
            RefFacts::loaded(header, pushes, ref_loading.pipelines, rejected)
        };
        inner.facts.insert(ref_loading.key, facts);
    }
    Ok(())
}

/// Reads the entries of one ring table into the refs being loaded: each entry in a live
/// slot of its ref's ring. Entries of no ref, or no longer live, are left to be overwritten.
fn load_ring<T>(
    disk: &Disk,
    (table, capacity): (Table, usize),
    loading: &mut HashMap<String, LoadingRef>,
    ring_of: impl Fn(&mut LoadingRef) -> (RingV1, &mut Vec<Option<T>>),
    decode: impl Fn(&str, &[u8]) -> Result<T>,
) -> Result<()> {
    disk.scan_each(table, |key, value| {
        let Some((id, slot)) = key.rsplit_once(SEP) else {
            return Ok(());
        };
        let (Ok(slot), Some(ref_loading)) = (slot.parse(), loading.get_mut(id)) else {
            return Ok(());
        };
        let (ring, entries) = ring_of(ref_loading);
        if let Some(entry) = ring
            .index_of(slot, ring.slots(capacity))
            .and_then(|index| entries.get_mut(index))
        {
            *entry = Some(decode(key, value)?);
        }
        Ok(())
    })
}

/// Refuses a ring that claims more live entries than it holds, or than were ever appended
/// to it: reading it would take slots no write of its owner filled.
fn check_ring(owner: &str, ring: RingV1, current: usize) -> Result<()> {
    let capacity = ring.slots(current);
    // No store appends 2^62 entries; a count that high was edited, and counting on from it
    // would overflow.
    if ring.appended > MAX_COUNT {
        return Err(StoreError::Corrupt {
            key: owner.to_owned(),
            reason: format!(
                "{} entries ever appended is not a real count",
                ring.appended
            ),
        });
    }
    if ring.len > capacity || ring.len as u64 > ring.appended {
        return Err(StoreError::Corrupt {
            key: owner.to_owned(),
            reason: format!(
                "{} entries in a ring of {capacity}, of {} ever appended",
                ring.len, ring.appended
            ),
        });
    }
    Ok(())
}

/// Above any count a store reaches: a ring's entries ever appended, a ref's facts.
const MAX_COUNT: u64 = 1 << 62;

/// A record of `table` under `key` that cannot be read, and why.
fn corrupt_record(table: &str, key: &str, reason: &str) -> StoreError {
    StoreError::Corrupt {
        key: format!("{table} {key}"),
        reason: reason.to_owned(),
    }
}

/// An agent read from the file whose rings are being read.
struct Loading {
    record: AgentFileV2,
    /// The live entries of its decisions, then of its deployed commits.
    found: [Found; 2],
}

/// A ring's live entries, oldest first, filled in as the scan finds them.
type Found = Vec<Option<Arc<[u8]>>>;

/// Fills `inner.agents` from the file: the agents' records, then their rings' entries.
fn load_agents(disk: &Disk, inner: &mut Inner, rewrites: &mut Vec<Put>) -> Result<()> {
    let mut loading: HashMap<String, Loading> = HashMap::new();
    let mut rewritten = EncodedStates::new();
    for (agent, value) in disk.scan(Table::Agents)? {
        match records::decode_agent_file(&agent, &value)? {
            AgentFile::Split(record) => {
                let rings = [
                    (record.decisions, DECISION_RING),
                    (record.deployed, DEPLOYED_RING),
                ];
                for (ring, (_, capacity)) in rings {
                    check_ring(&format!("agents {agent}"), ring, capacity)?;
                }
                let found = rings.map(|(ring, _)| vec![None; ring.len]);
                loading.insert(agent, Loading { record, found });
            }
            // Written by an earlier version, whole: rewritten now into rings.
            AgentFile::Whole { version, state } => {
                let stored = StoredAgent::laid_out_anew(version, 0, &state);
                agent_puts(&agent, &stored, stored.appended, &mut rewritten, rewrites);
                inner.agents.insert(agent, stored);
            }
        }
    }
    // Agents decided alike hold the same entries: each text is kept once while loading.
    let mut texts: HashSet<Arc<[u8]>> = HashSet::new();
    for (which, (table, capacity)) in [DECISION_RING, DEPLOYED_RING].into_iter().enumerate() {
        disk.scan_each(table, |key, value| {
            // Entries of no agent, or no longer live, are left to be overwritten.
            let Some((slot, agent)) = key.split_once(SEP) else {
                return Ok(());
            };
            let (Ok(slot), Some(agent)) = (slot.parse(), loading.get_mut(agent)) else {
                return Ok(());
            };
            let ring = [agent.record.decisions, agent.record.deployed][which];
            if let Some(entry) = ring
                .index_of(slot, ring.slots(capacity))
                .and_then(|i| agent.found[which].get_mut(i))
            {
                let text = match texts.get(value) {
                    Some(text) => text.clone(),
                    None => {
                        let text: Arc<[u8]> = Arc::from(value);
                        texts.insert(text.clone());
                        text
                    }
                };
                *entry = Some(text);
            }
            Ok(())
        })?;
    }
    // And they share one state in memory, as they did before the restart.
    let mut shared: HashMap<(String, Vec<*const u8>), Arc<AgentState>> = HashMap::new();
    for (agent, Loading { record, found }) in loading {
        let [decisions, deployed] = found.map(|found| {
            found
                .into_iter()
                .collect::<Option<Vec<Arc<[u8]>>>>()
                .ok_or_else(|| StoreError::Corrupt {
                    key: format!("agents {agent}"),
                    reason: "an entry of its history is missing from the file".into(),
                })
        });
        let (decisions, deployed) = (decisions?, deployed?);
        let same = (
            record.core,
            decisions
                .iter()
                .chain(&deployed)
                .map(|text| text.as_ptr())
                .collect(),
        );
        let state = match shared.get(&same) {
            Some(state) => state.clone(),
            None => {
                let state = Arc::new(decode_split(&agent, &same.0, &decisions, &deployed)?);
                shared.insert(same, state.clone());
                state
            }
        };
        let rings = [
            (DECISION_RING, record.decisions),
            (DEPLOYED_RING, record.deployed),
        ];
        if rings
            .iter()
            .any(|((_, current), ring)| ring.slots(*current) != *current)
        {
            // Numbered anew from 0 in this version's slots, the newest kept; the old slots
            // go, so that none is read later as one of the new.
            for ((table, _), ring) in rings {
                let old = ring.capacity.unwrap_or_default() as u64;
                rewrites.extend((0..old).map(|slot| (table, slot_key(&agent, slot), None)));
            }
            let stored = StoredAgent::laid_out_anew(record.version, record.incarnation, &state);
            agent_puts(
                &agent,
                &stored,
                stored.appended,
                &mut EncodedStates::new(),
                rewrites,
            );
            inner.agents.insert(agent, stored);
            continue;
        }
        let appended = Appended {
            decisions: record.decisions.appended,
            deployed: record.deployed.appended,
        };
        inner.agents.insert(
            agent,
            StoredAgent {
                version: record.version,
                incarnation: record.incarnation,
                state,
                appended,
                staged: appended,
            },
        );
    }
    Ok(())
}

/// The state of `agent` from its core record and its rings' live entries.
fn decode_split(
    agent: &str,
    core: &str,
    decisions: &[Arc<[u8]>],
    deployed: &[Arc<[u8]>],
) -> Result<AgentState> {
    let decisions = decisions
        .iter()
        .map(|text| records::decode_decision(agent, text))
        .collect::<Result<_>>()?;
    let key = format!("agent_deployed {agent}");
    let deployed = deployed
        .iter()
        .map(|text| records::decode_deployed(&key, text))
        .collect::<Result<_>>()?;
    records::decode_agent(agent, core.as_bytes(), decisions, deployed)
}

/// A set (or map, with values `V`) whose members are forgotten a fixed time after they were
/// last added, as Redis keys with `EX` are. Members expire in the order they were added, so
/// sweeping is a walk from the front that stops at the first live one: amortised O(1) per
/// insert.
struct Expiring<K, V = ()> {
    ttl: Duration,
    expires: HashMap<K, (Instant, V)>,
    order: VecDeque<(Instant, K)>,
}

impl<K: Hash + Eq + Clone, V> Expiring<K, V> {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            expires: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Adds `key` with `value`, or gives a live one `value` and its full time again.
    fn put(&mut self, key: K, value: V, now: Instant) {
        self.sweep(now);
        let expiry = now + self.ttl;
        self.expires.insert(key.clone(), (expiry, value));
        self.order.push_back((expiry, key));
    }

    /// Adds `key` with `value` as if it had been added `age` ago: `false`, and nothing
    /// added, when that is past its time.
    fn put_aged(&mut self, key: K, value: V, now: Instant, age: Duration) -> bool {
        let Some(left) = self.ttl.checked_sub(age) else {
            return false;
        };
        let expiry = now + left;
        self.expires.insert(key.clone(), (expiry, value));
        self.order.push_back((expiry, key));
        true
    }

    /// Puts members added with [`Self::put_aged`], in any order, in expiry order.
    fn settle(&mut self) {
        self.order
            .make_contiguous()
            .sort_by_key(|(expiry, _)| *expiry);
    }

    fn get(&self, key: &K, now: Instant) -> Option<&V> {
        self.expires
            .get(key)
            .filter(|(expiry, _)| *expiry > now)
            .map(|(_, value)| value)
    }

    fn contains(&self, key: &K, now: Instant) -> bool {
        self.get(key, now).is_some()
    }

    fn remove(&mut self, key: &K) {
        // Its place in `order` no longer matches an expiry, so the sweep skips it.
        self.expires.remove(key);
    }

    /// Removes every member `drop` picks: a walk over them all.
    fn remove_where(&mut self, mut drop: impl FnMut(&K) -> bool) -> Vec<K> {
        let dropped: Vec<K> = self
            .expires
            .keys()
            .filter(|key| drop(key))
            .cloned()
            .collect();
        for key in &dropped {
            self.expires.remove(key);
        }
        dropped
    }

    fn len(&self) -> usize {
        self.expires.len()
    }

    fn sweep(&mut self, now: Instant) {
        while let Some((expiry, _)) = self.order.front()
            && *expiry <= now
        {
            if let Some((expiry, key)) = self.order.pop_front()
                && self.expires.get(&key).map(|(at, _)| at) == Some(&expiry)
            {
                self.expires.remove(&key);
            }
        }
    }
}

impl<K: Hash + Eq + Clone> Expiring<K> {
    /// Adds `key` unless it is held and live: `true` when it was added.
    fn insert(&mut self, key: K, now: Instant) -> bool {
        self.sweep(now);
        if self.contains(&key, now) {
            return false;
        }
        self.put(key, (), now);
        true
    }

    /// Adds `key` as if it had been added `age` ago: `false`, and nothing added, when that
    /// is past its time.
    fn insert_aged(&mut self, key: K, now: Instant, age: Duration) -> bool {
        self.put_aged(key, (), now, age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose writer is played by the test: what it says through the returned sender
    /// is what the store's callers hear.
    fn store_with_writer() -> (EmbeddedStore, watch::Sender<Committed>) {
        let (committed_tx, committed) = watch::channel(Committed::default());
        let mut store = EmbeddedStore::new();
        store.journal = Some(Journal {
            wake: None,
            writer: None,
            committed,
            path: "/data/greenlight.redb".into(),
        });
        (store, committed_tx)
    }

    #[tokio::test]
    async fn a_change_on_disk_before_a_later_write_failed_is_answered_as_stored() {
        let (store, writer) = store_with_writer();
        // The batch with ticket 5 was written; the next one failed before the caller of
        // ticket 5 looked.
        writer.send_modify(|c| c.upto = 5);
        writer.send_modify(|c| c.failed = Some("File too large (os error 27)".into()));

        assert!(store.durable(Some(5)).await.is_ok());
        assert!(store.durable(Some(3)).await.is_ok());
        let refused = store
            .durable(Some(6))
            .await
            .expect_err("ticket 6 never reached disk");
        assert!(refused.to_string().contains("File too large"), "{refused}");
        assert!(
            store.ping().await.is_err(),
            "the store is not ready after a failure"
        );
    }

    #[tokio::test]
    async fn a_caller_waits_for_its_batch_and_hears_a_failure_of_it() {
        let (store, writer) = store_with_writer();
        let store = Arc::new(store);
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.durable(Some(2)).await }
        });
        writer.send_modify(|c| c.upto = 1);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "ticket 2 is not on disk yet");
        writer.send_modify(|c| c.failed = Some("No space left on device".into()));
        let answer = waiting.await.expect("the waiter ran");
        assert!(answer.is_err(), "{answer:?}");
    }

    #[tokio::test]
    async fn a_caller_whose_writer_is_gone_hears_so_rather_than_waiting() {
        let (store, writer) = store_with_writer();
        writer.send_modify(|c| c.upto = 1);
        drop(writer);
        assert!(
            store.durable(Some(1)).await.is_ok(),
            "on disk before it went"
        );
        let refused = store
            .durable(Some(2))
            .await
            .expect_err("nobody will write ticket 2");
        assert!(refused.to_string().contains("writer stopped"), "{refused}");
    }

    use crate::gate::{Before, Decision, Outcome};
    use crate::store::{AgentWrite, AgentWrites, RegistryStore};
    use futures_util::FutureExt;
    use proptest::prelude::*;

    /// One step of a run against the file.
    #[derive(Debug, Clone)]
    enum Step {
        /// The `agents` that read alike are decided alike: `decisions` new decisions, and
        /// `appended` new deployed commits with the `dropped` oldest falling off, or with
        /// `replaced`, a deployed set made anew of `appended` commits.
        Decide {
            agents: Vec<usize>,
            decisions: usize,
            appended: usize,
            dropped: usize,
            replaced: bool,
        },
        /// The writer writes everything marked so far.
        Commit,
        /// Everything is written, and the store opened again on the same file.
        Reopen,
        /// The agent is deleted from the registry.
        Remove(usize),
    }

    const AGENTS: [&str; 3] = ["a", "b", "c"];

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (
                prop::collection::vec(0..AGENTS.len(), 1..4),
                prop_oneof![0..3usize, 45..70usize],
                prop_oneof![0..3usize, 250..300usize],
                0..3usize,
                prop::bool::weighted(0.1),
            )
                .prop_map(|(agents, decisions, appended, dropped, replaced)| Step::Decide {
                    agents,
                    decisions,
                    appended,
                    dropped,
                    replaced,
                }),
            2 => Just(Step::Commit),
            1 => Just(Step::Reopen),
            1 => (0..AGENTS.len()).prop_map(Step::Remove),
        ]
    }

    /// Every agent's version and state as `store` holds them.
    fn held(store: &EmbeddedStore) -> Vec<(u64, AgentState)> {
        let inner = store.lock();
        AGENTS
            .iter()
            .map(|agent| {
                inner
                    .agents
                    .get(*agent)
                    .map_or_else(Default::default, |stored| {
                        (stored.version, AgentState::clone(&stored.state))
                    })
            })
            .collect()
    }

    /// Marks `agents`' next state in memory, as a fan-out does before the file has it: the
    /// caller's wait for the file is dropped, and the test's `Commit` plays the writer.
    fn decide(store: &EmbeddedStore, step: &Step, counter: &mut u64) {
        let Step::Decide {
            agents,
            decisions,
            appended,
            dropped,
            replaced,
        } = step
        else {
            return;
        };
        let all = held(store);
        let before = &all[agents[0]].1;
        let mut after = before.clone();
        let mut made = Vec::new();
        for _ in 0..*decisions {
            *counter += 1;
            let decision = Decision {
                outcome: Outcome::Deploy,
                sha: Some(sha(*counter)),
                pipeline_id: Some(*counter),
                reason: format!("decision {counter}"),
                at_ms: *counter as i64,
                superseded_by: None,
            };
            after.gate.decisions.push_back(decision.clone());
            made.push(decision);
        }
        while after.gate.decisions.len() > DECISION_HISTORY {
            after.gate.decisions.pop_front();
        }
        if *replaced {
            after.gate.deployed.clear();
        }
        for _ in 0..*appended {
            *counter += 1;
            after.gate.deployed.push_back(sha(*counter));
        }
        for _ in 0..*dropped {
            after.gate.deployed.pop_front();
        }
        while after.gate.deployed.len() > DEPLOYED_HISTORY {
            after.gate.deployed.pop_front();
        }
        *counter += 1;
        after.position = *counter;
        let deployed = DeployedChange::between(&before.gate.deployed, &after.gate.deployed);
        // Only agents that read alike share a change, as the evaluator's are.
        let mut alike: Vec<usize> = agents
            .iter()
            .copied()
            .filter(|&agent| all[agent].1 == *before)
            .collect();
        alike.dedup();
        let writes = AgentWrites::of(alike.iter().map(|&agent| AgentWrite {
            incarnation: 0,
            agent: AGENTS[agent],
            expected: all[agent].0,
            state: &after,
            decisions: &made,
            deployed: &deployed,
        }));
        let _marked_and_not_waited_for = store.write_agents(&writes).now_or_never();
        let now = held(store);
        for agent in alike {
            assert_eq!(
                now[agent].0,
                all[agent].0 + 1,
                "{} was written",
                AGENTS[agent]
            );
        }
    }

    fn sha(n: u64) -> Sha {
        Sha::parse(&format!("{n:040x}")).expect("forty hex digits")
    }

    /// One write of `state` over `agent`'s version `expected`, deciding and deploying nothing.
    fn single_write<'a>(agent: &'a str, expected: u64, state: &'a AgentState) -> AgentWrites<'a> {
        single_write_for((agent, 0), expected, state)
    }

    /// [`single_write`] for `incarnation` of the agent.
    fn single_write_for<'a>(
        (agent, incarnation): (&'a str, u64),
        expected: u64,
        state: &'a AgentState,
    ) -> AgentWrites<'a> {
        static UNCHANGED: DeployedChange = DeployedChange::Unchanged;
        AgentWrites::of([AgentWrite {
            incarnation,
            agent,
            expected,
            state,
            decisions: &[],
            deployed: &UNCHANGED,
        }])
    }

    /// A fan-out whose second step cannot be written fails with the file's error, and its
    /// caller has heard only the step that was written.
    #[test]
    fn a_fan_out_whose_step_fails_tells_only_the_steps_written() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (mut store, writer) = EmbeddedStore::loaded(dir.path()).expect("opened");
        store.set_write_step(1);
        let state = AgentState::default();
        let writes = AgentWrites::of(["a", "b"].map(|agent| AgentWrite {
            incarnation: 0,
            agent,
            expected: 0,
            state: &state,
            decisions: &[],
            deployed: &DeployedChange::Unchanged,
        }));
        let mut heard = Vec::new();
        let mut told = |step: &[(usize, Written)]| {
            heard.extend_from_slice(step);
            std::ops::ControlFlow::Continue(())
        };
        let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
        let answer = {
            let mut writing = std::pin::pin!(store.write_agents_telling(&writes, &mut told));
            assert!(writing.as_mut().poll(&mut cx).is_pending(), "step 1 waits");
            writer.commit();
            assert!(writing.as_mut().poll(&mut cx).is_pending(), "step 2 waits");
            writer
                .committed
                .send_modify(|c| c.failed = Some("No space left on device".into()));
            match writing.as_mut().poll(&mut cx) {
                std::task::Poll::Ready(answer) => answer,
                std::task::Poll::Pending => panic!("a failed write is answered"),
            }
        };
        let error = answer.expect_err("step 2 was not written");
        assert!(error.to_string().contains("No space left"), "{error}");
        assert_eq!(heard, [(0, Written::Saved { version: 1 })]);
    }

    /// A file whose agent record names history entries the file lacks, or more than a ring
    /// holds, is refused at start, naming the agent, rather than loaded with a history cut
    /// short.
    #[test]
    fn an_agent_whose_history_is_not_in_the_file_is_refused_at_start() {
        let core = records::encode_agent(&AgentState::default());
        let missing = RingV1 {
            appended: 3,
            len: 2,
            capacity: None,
        };
        let oversized = RingV1 {
            appended: 900,
            len: 900,
            capacity: None,
        };
        let unwritten = RingV1 {
            appended: 1,
            len: 5,
            capacity: None,
        };
        for (ring, why) in [
            (missing, "missing"),
            (oversized, "in a ring of 50"),
            (unwritten, "of 1 ever appended"),
        ] {
            let dir = tempfile::tempdir().expect("a temporary directory");
            {
                let disk = Disk::open(dir.path()).expect("opened");
                let record = records::encode_agent_file(1, 0, &core, ring, RingV1::default());
                disk.write(vec![(Table::Agents, "prod".into(), Some(record))])
                    .expect("written");
            }
            let Err(refused) = EmbeddedStore::loaded(dir.path()) else {
                panic!("{ring:?} is refused");
            };
            let message = refused.to_string();
            assert!(
                message.contains("prod") && message.contains(why),
                "{message}"
            );
        }
    }

    /// Which agent a record belongs to is kept in the file: after a restart, a write for
    /// another agent once under the name is still refused.
    #[test]
    fn the_agent_a_record_belongs_to_is_read_back_after_a_restart() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let state = AgentState::default();
        {
            let (store, writer) = EmbeddedStore::loaded(dir.path()).expect("opened");
            let _marked = store
                .write_agents(&single_write_for(("a", 22), 0, &state))
                .now_or_never();
            writer.commit();
        }
        let (store, _writer) = EmbeddedStore::loaded(dir.path()).expect("opened");
        let held = store
            .lock()
            .agents
            .get("a")
            .map(|a| (a.version, a.incarnation));
        assert_eq!(held, Some((1, 22)));
        let refused = store
            .write_agents(&single_write_for(("a", 11), 1, &state))
            .now_or_never()
            .expect("refused without waiting for the file")
            .expect("answered");
        assert_eq!(refused, [Written::Replaced]);
    }

    /// Without a status publisher the change log keeps nothing for one: entries kept before
    /// leave memory and the file, and new ones are not kept, while followers still hear
    /// every change.
    #[tokio::test]
    async fn a_store_without_a_status_feed_keeps_no_entries_for_one() {
        use crate::store::ChangeLog;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (store, writer) = EmbeddedStore::loaded(dir.path()).expect("opened");
        let state = AgentState::default();
        let _marked = store
            .write_agents(&single_write("a", 0, &state))
            .now_or_never();
        writer.commit();
        assert_eq!(
            store.lock().status_feed.entries.len(),
            1,
            "kept for a publisher"
        );

        let store = store.without_status_feed();
        let mut notices = store.subscribe();
        let next = AgentState {
            position: 1,
            ..AgentState::default()
        };
        let _marked = store
            .write_agents(&single_write("a", 1, &next))
            .now_or_never();
        writer.commit();
        assert!(
            matches!(
                notices.try_recv(),
                Ok(Notice::Message(Broadcast::AgentsChanged(_)))
            ),
            "followers hear the change"
        );
        assert!(store.lock().status_feed.entries.is_empty());
        drop((store, writer));
        let disk = Disk::open(dir.path()).expect("opened");
        assert!(
            disk.scan(Table::Feed).expect("read").is_empty(),
            "none in the file"
        );
        assert!(disk.get(Table::Agents, "a").expect("read").is_some());
    }

    /// A fan-out written in steps logs an entry per step holding the changes of that step's
    /// agents only, each once: agents decided apart would otherwise repeat every change in
    /// every entry.
    #[tokio::test]
    async fn each_step_of_a_fan_out_logs_only_its_agents_changes() {
        use crate::store::ChangeLog;
        let mut store = EmbeddedStore::new();
        store.set_write_step(2);
        let mut notices = store.subscribe();
        let states: Vec<AgentState> = (1..=3)
            .map(|n| {
                let mut state = AgentState::default();
                state.gate.generation = n;
                state
            })
            .collect();
        // a and b decided alike, c and d each on their own.
        let deployed = DeployedChange::Unchanged;
        let writes = AgentWrites::of([("a", 0), ("b", 0), ("c", 1), ("d", 2)].map(
            |(agent, state)| AgentWrite {
                incarnation: 0,
                agent,
                expected: 0,
                state: &states[state],
                decisions: &[],
                deployed: &deployed,
            },
        ));
        store.write_agents(&writes).await.expect("written");
        let mut entries = Vec::new();
        while let Ok(Notice::Message(Broadcast::AgentsChanged(entry))) = notices.try_recv() {
            let agents: Vec<(String, usize)> = entry
                .agents
                .iter()
                .map(|a| (a.agent.clone(), a.change))
                .collect();
            entries.push((entry.changes.len(), agents));
        }
        assert_eq!(
            entries,
            [
                (1, vec![("a".into(), 0), ("b".into(), 0)]),
                (2, vec![("c".into(), 0), ("d".into(), 1)]),
            ]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Whatever was written, in whatever batches, the file read again holds every
        /// agent's version and state as the memory held them, and agents that hold the
        /// same state share it again.
        #[test]
        fn agents_read_back_from_the_file_as_memory_held_them(
            steps in prop::collection::vec(step(), 1..24)
        ) {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let (mut store, mut writer) = EmbeddedStore::loaded(dir.path()).expect("opened");
            let mut counter = 0;
            for step in steps.iter().chain([&Step::Reopen]) {
                match step {
                    Step::Decide { .. } => decide(&store, step, &mut counter),
                    Step::Commit => writer.commit(),
                    Step::Remove(agent) => {
                        let _marked = store
                            .change_registered(AGENTS[*agent], None, 0)
                            .now_or_never();
                    }
                    Step::Reopen => {
                        writer.commit();
                        let before = held(&store);
                        drop((store, writer));
                        (store, writer) = EmbeddedStore::loaded(dir.path()).expect("reopened");
                        prop_assert_eq!(held(&store), before);
                        let inner = store.lock();
                        for (a, b) in [("a", "b"), ("b", "c"), ("a", "c")] {
                            if let (Some(a), Some(b)) = (inner.agents.get(a), inner.agents.get(b))
                                && a.state == b.state
                            {
                                prop_assert!(Arc::ptr_eq(&a.state, &b.state), "equal states are shared");
                            }
                        }
                    }
                }
            }
        }
    }

    /// A file written before histories had rings of their own: its agents read as they
    /// were, and their records are rewritten in this version's form as the file is opened.
    #[test]
    fn agents_of_a_file_written_whole_are_read_and_rewritten_into_rings() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut state = AgentState {
            position: 9,
            ..AgentState::default()
        };
        for n in 1..=300 {
            state.gate.deployed.push_back(sha(n));
        }
        for n in 1..=3 {
            state.gate.decisions.push_back(Decision {
                outcome: Outcome::Deploy,
                sha: Some(sha(n)),
                pipeline_id: Some(n),
                reason: format!("pipeline {n} succeeded"),
                at_ms: 5,
                superseded_by: None,
            });
        }
        let whole = records::AgentFileRecord::V1(records::AgentFileV1 {
            version: 4,
            core: records::encode_agent(&state),
            decisions: state
                .gate
                .decisions
                .iter()
                .map(records::encode_decision)
                .collect(),
            deployed: state.gate.deployed.iter().cloned().collect(),
        });
        {
            let disk = Disk::open(dir.path()).expect("opened");
            let bytes = serde_json::to_vec(&whole).expect("encoded");
            disk.write(vec![(Table::Agents, "prod".into(), Some(bytes))])
                .expect("written");
        }
        // The set is kept to what the rings hold: the newest commits, as Redis trims it.
        let mut expected = state.clone();
        while expected.gate.deployed.len() > DEPLOYED_HISTORY {
            expected.gate.deployed.pop_front();
        }
        for _ in 0..2 {
            let (store, _writer) = EmbeddedStore::loaded(dir.path()).expect("opened");
            assert_eq!(held(&store)[0], (0, AgentState::default()), "a is unknown");
            let prod = store.agent("prod").now_or_never().expect("in memory");
            let prod = prod.expect("readable");
            assert_eq!((prod.version, prod.value), (4, expected.clone()));
        }
        let disk = Disk::open(dir.path()).expect("opened");
        let record = disk
            .get(Table::Agents, "prod")
            .expect("read")
            .expect("kept");
        assert!(
            matches!(
                records::decode_agent_file("prod", &record),
                Ok(AgentFile::Split { .. })
            ),
            "rewritten"
        );
        assert_eq!(
            disk.scan(Table::AgentDeployed).expect("read").len(),
            DEPLOYED_HISTORY
        );
    }

    fn main_branch() -> RefKey {
        RefKey {
            project: "group/app".into(),
            branch: "main".into(),
        }
    }

    /// Records `fact` in memory; the writer is left to put it on disk.
    fn record(store: &EmbeddedStore, fact: FactRecord) {
        let _marked = store
            .record_fact(&main_branch(), &fact, None, None)
            .now_or_never();
    }

    fn push_of(n: u64) -> FactRecord {
        FactRecord::Push(crate::gate::Push {
            before: crate::gate::Before::Head(sha(n - 1)),
            after: Some(sha(n)),
            at_ms: i64::try_from(n).expect("small"),
        })
    }

    fn pipeline_of(n: u64, status: crate::gate::PipelineStatus) -> FactRecord {
        FactRecord::Pipeline {
            sha: sha(n),
            pipeline: Pipeline {
                id: n,
                status,
                source: "push".into(),
                as_of_ms: None,
                passed_stages: Vec::new(),
            },
        }
    }

    /// What the writer's next batch would put in the file, taken as it takes it.
    fn next_batch(store: &EmbeddedStore) -> Vec<Put> {
        let mut inner = store.lock();
        let pending = inner.pending.as_mut().expect("a file");
        let dirty = std::mem::take(&mut pending.dirty);
        let mut puts = Vec::new();
        for staged in dirty.iter().flat_map(|d| stage(&mut inner, d)) {
            staged.encode_into(&mut EncodedStates::new(), &mut puts);
        }
        puts
    }

    /// A fact costs the file its own record and the ref's small one, however long the
    /// ref's history: the same with 1,100 pushes behind it as with one.
    #[test]
    fn a_fact_writes_its_own_record_and_the_refs_whatever_the_history() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (store, writer) = EmbeddedStore::loaded(dir.path()).expect("opened");
        let mut sizes = Vec::new();
        for history in [1, 1_100] {
            for n in 1..=history {
                record(&store, push_of(n));
                record(&store, pipeline_of(n, crate::gate::PipelineStatus::Success));
            }
            writer.commit();
            record(&store, push_of(history + 1));
            let push = next_batch(&store);
            record(
                &store,
                pipeline_of(history + 1, crate::gate::PipelineStatus::Running),
            );
            let pipeline = next_batch(&store);
            let tables = |puts: &[Put]| {
                let mut tables: Vec<Table> = puts.iter().map(|(table, _, _)| *table).collect();
                tables.sort_by_key(|table| format!("{table:?}"));
                tables
            };
            // Its change log entry, for the status publishers, is as small.
            assert_eq!(
                tables(&push),
                [Table::FactPushes, Table::Facts, Table::Feed]
            );
            assert_eq!(
                tables(&pipeline),
                [Table::FactPipelines, Table::Facts, Table::Feed]
            );
            let bytes = |puts: &[Put]| {
                puts.iter()
                    .map(|(_, key, value)| key.len() + value.as_ref().map_or(0, Vec::len))
                    .sum::<usize>()
            };
            sizes.push((bytes(&push), bytes(&pipeline)));
            writer.commit();
        }
        assert!(
            sizes
                .iter()
                .all(|&(push, pipeline)| push < 400 && pipeline < 400),
            "{sizes:?}"
        );
    }

    /// Pushes and rejected claims past what their rings keep, pipelines forgotten, batches
    /// that appended more than a ring keeps: what the store held is what it holds again
    /// after a restart, and the file keeps only the live entries.
    #[test]
    fn facts_in_records_of_their_own_are_read_back_after_a_restart() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let expected = {
            let (store, writer) = EmbeddedStore::loaded(dir.path()).expect("opened");
            for n in 1..=10 {
                record(&store, push_of(n));
            }
            writer.commit();
            // More than the ring keeps between two batches: only the live ones are written.
            for n in 11..=1_100 {
                record(&store, push_of(n));
            }
            for n in 1..=30 {
                record(&store, pipeline_of(n, crate::gate::PipelineStatus::Failed));
                record(
                    &store,
                    FactRecord::Rejected(crate::gate::Rejected {
                        sha: sha(n),
                        pipeline_id: n,
                        reason: format!("GitLab says pipeline {n} is running"),
                        at_ms: 7,
                    }),
                );
            }
            writer.commit();
            record(&store, pipeline_of(3, crate::gate::PipelineStatus::Success));
            let _forgotten = store
                .forget_pipelines(&main_branch(), &[(sha(1), 1), (sha(2), 2)])
                .now_or_never();
            writer.commit();
            let facts = store
                .facts(&main_branch())
                .now_or_never()
                .expect("in memory");
            facts.expect("readable")
        };
        assert_eq!(expected.pushes.len(), PUSHES_KEPT);
        assert_eq!(expected.rejected.len(), MAX_REJECTED);
        assert_eq!(expected.pipelines.len(), 28);
        let mut expected = expected;
        for next in [1_101, 1_102] {
            let (store, writer) = EmbeddedStore::loaded(dir.path()).expect("opened");
            let held = |store: &EmbeddedStore| {
                let facts = store.facts(&main_branch()).now_or_never();
                facts.expect("in memory").expect("readable")
            };
            assert!(held(&store) == expected, "read back as it was held");
            // And it goes on from there.
            record(&store, push_of(next));
            writer.commit();
            expected = held(&store);
        }
        let disk = Disk::open(dir.path()).expect("opened");
        let count = |table| disk.scan(table).expect("read").len();
        assert_eq!(count(Table::FactPushes), PUSHES_KEPT);
        assert_eq!(count(Table::FactRejected), MAX_REJECTED);
        assert_eq!(count(Table::FactPipelines), 28);
    }

    /// A ring written with another number of slots than this version keeps (an earlier or
    /// later version's) is read where it was written, then laid out anew in this version's
    /// slots, its old slots gone.
    #[test]
    fn rings_laid_out_in_other_slots_are_read_in_order_and_laid_out_anew() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let id = ref_id(&main_branch());
        let pushes: Vec<crate::gate::Push> = (30..50)
            .map(|n| match push_of(n) {
                FactRecord::Push(push) => push,
                _ => unreachable!("push_of makes pushes"),
            })
            .collect();
        {
            let disk = Disk::open(dir.path()).expect("opened");
            let header = records::encode_ref_facts(RefFactsV2 {
                position: 50,
                pushes: RingV1::laid_out(50, 20, 20),
                rejected: RingV1::laid_out(0, 0, MAX_REJECTED),
            });
            let mut puts = vec![(Table::Facts, id.clone(), Some(header))];
            for (n, push) in (30u64..50).zip(&pushes) {
                let text = records::encode_push(push).into_bytes();
                puts.push((Table::FactPushes, ring_entry_key(&id, n % 20), Some(text)));
            }
            let core = records::encode_agent(&AgentState::default());
            let record = records::encode_agent_file(
                1,
                0,
                &core,
                RingV1::laid_out(0, 0, DECISION_RING.1),
                RingV1::laid_out(10, 4, 4),
            );
            puts.push((Table::Agents, "prod".into(), Some(record)));
            for n in 6u64..10 {
                let text = sha(n).as_str().as_bytes().to_vec();
                puts.push((Table::AgentDeployed, slot_key("prod", n % 4), Some(text)));
            }
            disk.write(puts).expect("written");
        }
        let deployed: Vec<Sha> = (6..10).map(sha).collect();
        for start in ["laid out anew", "as laid out"] {
            let (store, _writer) = EmbeddedStore::loaded(dir.path()).expect("opened");
            let facts = store.facts(&main_branch()).now_or_never();
            let facts = facts.expect("in memory").expect("readable");
            assert!(facts.pushes.iter().eq(&pushes), "{start}: oldest first");
            let agent = store.agent("prod").now_or_never();
            let agent = agent.expect("in memory").expect("readable");
            assert!(
                agent.value.gate.deployed.iter().eq(&deployed),
                "{start}: {:?}",
                agent.value.gate.deployed
            );
        }
        let disk = Disk::open(dir.path()).expect("opened");
        let header = disk.scan(Table::Facts).expect("read");
        let RefFactsFile::Split(header) =
            records::decode_ref_facts(&id, &header[0].1).expect("readable")
        else {
            panic!("a header");
        };
        assert_eq!(header.pushes, RingV1::laid_out(20, 20, PUSHES_KEPT));
        let slots = |table| -> Vec<String> {
            let rows = disk.scan(table).expect("read");
            rows.into_iter().map(|(key, _)| key).collect()
        };
        let mut expected: Vec<String> = (0..20).map(|slot| ring_entry_key(&id, slot)).collect();
        expected.sort();
        assert_eq!(slots(Table::FactPushes), expected, "the old slots are gone");
        let mut expected: Vec<String> = (0..4).map(|slot| slot_key("prod", slot)).collect();
        expected.sort();
        assert_eq!(slots(Table::AgentDeployed), expected);
    }

    /// A ref written whole by an earlier version is read, then rewritten into records.
    #[test]
    fn facts_of_a_file_written_whole_are_read_and_rewritten_into_records() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let pipeline = Pipeline {
            id: 4,
            status: crate::gate::PipelineStatus::Success,
            source: "push".into(),
            as_of_ms: Some(3),
            passed_stages: vec!["test".into()],
        };
        let pushes: Vec<crate::gate::Push> = (1..=3)
            .map(|n| match push_of(n) {
                FactRecord::Push(push) => push,
                _ => unreachable!("a push"),
            })
            .collect();
        let (head, stages) = records::encode_pipeline(&pipeline);
        let whole = records::RefFactsRecord::V1(records::RefFactsV1 {
            position: 9,
            pushes: pushes.iter().map(records::encode_push).collect(),
            pipelines: vec![(records::pipeline_field(&sha(3), 4), head, stages)],
            rejected: Vec::new(),
        });
        {
            let disk = Disk::open(dir.path()).expect("opened");
            let bytes = serde_json::to_vec(&whole).expect("encoded");
            disk.write(vec![(Table::Facts, ref_id(&main_branch()), Some(bytes))])
                .expect("written");
        }
        let expected = Facts {
            position: 9,
            pushes,
            pipelines: vec![(sha(3), pipeline)],
            rejected: Vec::new(),
        };
        for _ in 0..2 {
            let (store, _writer) = EmbeddedStore::loaded(dir.path()).expect("opened");
            let facts = store
                .facts(&main_branch())
                .now_or_never()
                .expect("in memory");
            assert_eq!(facts.expect("readable"), expected);
        }
        let disk = Disk::open(dir.path()).expect("opened");
        let record = disk
            .get(Table::Facts, &ref_id(&main_branch()))
            .expect("read")
            .expect("kept");
        assert!(
            matches!(
                records::decode_ref_facts("main", &record),
                Ok(RefFactsFile::Split(_))
            ),
            "rewritten"
        );
        assert_eq!(disk.scan(Table::FactPushes).expect("read").len(), 3);
        assert_eq!(disk.scan(Table::FactPipelines).expect("read").len(), 1);
    }

    /// A ref whose record names entries the file lacks, or more than its ring keeps, is
    /// refused at start, naming the ref.
    #[test]
    fn a_ref_whose_facts_are_not_in_the_file_is_refused_at_start() {
        let ring = |appended, len| RingV1 {
            appended,
            len,
            capacity: None,
        };
        for (pushes, rejected, why) in [
            (ring(3, 2), RingV1::default(), "missing"),
            (RingV1::default(), ring(1, 1), "missing"),
            (ring(2_000, 2_000), RingV1::default(), "in a ring of 1024"),
            (RingV1::default(), ring(1, 3), "of 1 ever appended"),
            (ring(u64::MAX, 1), RingV1::default(), "not a real count"),
        ] {
            let message = refused_at_start(pushes, rejected, Vec::new());
            assert!(
                message.contains("group/app") && message.contains(why),
                "{message}"
            );
        }
    }

    /// Why a file holding `main_branch`'s record, with rings `pushes` and `rejected`, and
    /// `others` is refused at start.
    fn refused_at_start(pushes: RingV1, rejected: RingV1, others: Vec<Put>) -> String {
        let dir = tempfile::tempdir().expect("a temporary directory");
        {
            let disk = Disk::open(dir.path()).expect("opened");
            let header = records::encode_ref_facts(RefFactsV2 {
                position: 1,
                pushes,
                rejected,
            });
            let mut puts = vec![(Table::Facts, ref_id(&main_branch()), Some(header))];
            puts.extend(others);
            disk.write(puts).expect("written");
        }
        match EmbeddedStore::loaded(dir.path()) {
            Err(refused) => refused.to_string(),
            Ok(_) => panic!("{pushes:?} {rejected:?} is refused"),
        }
    }

    /// A fact's own record that cannot be read (a bad restore, a hand edit) is refused at
    /// start, naming the record and why, rather than read as another fact.
    #[test]
    fn a_fact_record_that_cannot_be_read_is_refused_at_start_naming_it() {
        let id = ref_id(&main_branch());
        let one = RingV1 {
            appended: 1,
            len: 1,
            capacity: None,
        };
        for (pushes, rejected, entry, why) in [
            (
                one,
                RingV1::default(),
                (Table::FactPushes, format!("{id}{SEP}0")),
                "push record",
            ),
            (
                one,
                RingV1::default(),
                (Table::FactPushes, format!("{id}{SEP}0")),
                "utf-8",
            ),
            (
                RingV1::default(),
                one,
                (Table::FactRejected, format!("{id}{SEP}0")),
                "fact_rejected",
            ),
            (
                RingV1::default(),
                RingV1::default(),
                (Table::FactPipelines, pipeline_key(&id, &sha(1), 1)),
                "fact_pipelines",
            ),
        ] {
            let bad = if why == "utf-8" {
                vec![0xff, 0xfe]
            } else {
                b"zz|".to_vec()
            };
            let message = refused_at_start(pushes, rejected, vec![(entry.0, entry.1, Some(bad))]);
            assert!(
                message.contains("group/app") && message.to_lowercase().contains(why),
                "{message}"
            );
        }
    }

    #[test]
    fn members_are_forgotten_after_their_time_and_swept_on_insert() {
        let start = Instant::now();
        let mut set = Expiring::new(Duration::from_secs(10));
        assert!(set.insert("a", start));
        assert!(
            !set.insert("a", start + Duration::from_secs(5)),
            "still live"
        );
        assert!(set.contains(&"a", start + Duration::from_secs(9)));
        assert!(!set.contains(&"a", start + Duration::from_secs(10)));
        // Re-added after it expired: the old order entry must not evict the new one.
        assert!(set.insert("a", start + Duration::from_secs(11)));
        assert!(set.contains(&"a", start + Duration::from_secs(20)));
        assert!(set.insert("b", start + Duration::from_secs(22)));
        assert!(!set.contains(&"a", start + Duration::from_secs(22)));
        assert_eq!(set.len(), 1, "a was swept when b came");
    }

    #[test]
    fn a_stream_of_new_members_holds_only_the_live_ones() {
        let start = Instant::now();
        let mut set = Expiring::new(Duration::from_secs(60));
        for second in 0..10_000u64 {
            set.insert(second, start + Duration::from_secs(second));
        }
        assert_eq!(set.len(), 60);
        assert!(set.order.len() <= 61);
    }

    #[test]
    fn markers_past_their_time_or_unreadable_leave_the_file_when_it_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let recent = crate::clock::now_ms();
        {
            let disk = Disk::open(dir.path()).unwrap();
            disk.write(vec![
                (
                    Table::Deliveries,
                    format!("p{SEP}b{SEP}old"),
                    Some(disk::encode_time(0)),
                ),
                (
                    Table::Deliveries,
                    format!("p{SEP}b{SEP}new"),
                    Some(disk::encode_time(recent)),
                ),
                (
                    Table::Statuses,
                    "no parts".into(),
                    Some(disk::encode_time(recent)),
                ),
                (
                    Table::Taken,
                    format!("a{SEP}s{SEP}running"),
                    Some(b"x".to_vec()),
                ),
            ])
            .unwrap();
        }
        drop(EmbeddedStore::open(dir.path()).unwrap());
        let disk = Disk::open(dir.path()).unwrap();
        let kept: Vec<String> = disk
            .scan(Table::Deliveries)
            .unwrap()
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(kept, [format!("p{SEP}b{SEP}new")]);
        assert!(disk.scan(Table::Statuses).unwrap().is_empty());
        assert!(disk.scan(Table::Taken).unwrap().is_empty());
    }

    #[tokio::test]
    async fn statuses_of_the_earlier_records_are_read_as_shown_before_any_of_this_version() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let now_ms = crate::clock::now_ms();
        let at = disk::encode_time(now_ms);
        let old_key = |sha: &str, state: &str| format!("prod{SEP}{sha}{SEP}{state}");
        {
            let disk = Disk::open(dir.path()).expect("opened");
            disk.write(vec![
                // Keys sort by state: the one posted last is read first.
                (Table::Statuses, old_key("a1", "failed"), Some(at.clone())),
                (
                    Table::Statuses,
                    old_key("a1", "success"),
                    Some(disk::encode_time(now_ms - 1_000)),
                ),
                (Table::Taken, old_key("b2", "running"), Some(at.clone())),
            ])
            .expect("written");
        }
        let store = EmbeddedStore::open(dir.path()).expect("opened");
        let status = |sha, state, at_ms| StatusKey {
            agent: "prod",
            sha,
            state,
            order: StatusOrder::reported(1, at_ms, state),
        };
        let lease = Duration::from_secs(60);
        let mut claims = Vec::new();
        for (sha, state, at_ms) in [
            ("a1", "failed", 1),
            ("a1", "success", 2),
            ("b2", "success", 1),
        ] {
            let claim = store
                .begin_status(&status(sha, state, at_ms), "r", lease)
                .await;
            claims.push(claim.expect("claimed"));
        }
        assert_eq!(
            claims,
            [
                StatusClaim::Posted,
                // Any status of this version is later; a claim taken on the commit: look first.
                StatusClaim::Mine,
                StatusClaim::Retaken
            ]
        );
        drop(store);
        let disk = Disk::open(dir.path()).expect("reopened");
        let keys = |table| -> Vec<String> {
            let rows = disk.scan(table).expect("scanned");
            rows.into_iter().map(|(key, _)| key).collect()
        };
        assert_eq!(keys(Table::Statuses), [format!("prod{SEP}a1")], "rewritten");
        assert_eq!(
            keys(Table::Taken),
            [format!("prod{SEP}a1"), format!("prod{SEP}b2")]
        );
    }

    #[tokio::test]
    async fn redeliveries_and_claims_are_forgotten_after_the_configured_time() {
        let store =
            EmbeddedStore::with_memory(Duration::from_millis(50), Duration::from_millis(50));
        let key = RefKey {
            project: "p".to_owned(),
            branch: "main".to_owned(),
        };
        let push = FactRecord::Push(crate::gate::Push {
            before: Before::Created,
            after: Sha::parse(&"a".repeat(40)).ok(),
            at_ms: 0,
        });
        assert!(matches!(
            store
                .record_fact(&key, &push, Some("d1"), None)
                .await
                .unwrap(),
            Ingested::Recorded { position: 1 }
        ));
        assert_eq!(
            store
                .record_fact(&key, &push, Some("d1"), None)
                .await
                .unwrap(),
            Ingested::Duplicate
        );
        let status = StatusKey {
            agent: "a",
            sha: "sha",
            state: "success",
            order: StatusOrder::default(),
        };
        let lease = Duration::from_secs(60);
        store.begin_status(&status, "r", lease).await.unwrap();
        store.finish_status(&status, "r", true).await.unwrap();
        assert_eq!(
            store.begin_status(&status, "r", lease).await.unwrap(),
            StatusClaim::Posted
        );
        assert_eq!(store.markers(), 2);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            store.begin_status(&status, "r", lease).await.unwrap(),
            StatusClaim::Mine,
            "forgotten"
        );
        assert!(matches!(
            store
                .record_fact(&key, &push, Some("d1"), None)
                .await
                .unwrap(),
            Ingested::Recorded { .. }
        ));
        store.finish_status(&status, "r", true).await.unwrap();
        assert_eq!(store.markers(), 2, "the expired markers were swept");
    }
}
