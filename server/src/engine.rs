//! Records facts and operator actions, runs the gate, and keeps every replica's agents on
//! their desired revision. The only place that reads, decides and writes ref documents.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::catalog::{Catalog, ref_key};
use crate::clock::now_ms;
use crate::gate::{AgentGate, Context, GateError, Pipeline, Push, PushOrder, Recorded, Sha, Step};
use crate::hub::{Desired, Hub};
use crate::store::{Broadcast, Notice, RefDoc, RefKey, SaveOutcome, Store, StoreError, Versioned};

/// Conditional writes retried this often before giving up under contention.
const MAX_ATTEMPTS: u32 = 32;
/// Status reports kept per agent.
pub const REPORT_HISTORY: usize = 100;

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
}

/// A fact about a ref, from a webhook or the ingest API.
#[derive(Debug, Clone)]
pub struct Fact {
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
}

/// An operator's request about one agent.
#[derive(Debug, Clone)]
pub enum Operation {
    Trigger { sha: Option<Sha> },
    Pause { reason: String },
    Resume,
    Pin { sha: Sha, reason: String },
    Unpin,
}

/// Shared core of a server replica.
pub struct Engine {
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    hub: Hub,
    events: broadcast::Sender<Broadcast>,
    replica: String,
    connections: Mutex<HashMap<String, usize>>,
}

enum Change<T> {
    Dirty(T, Vec<(String, Step)>),
    Clean(T),
}

impl Engine {
    /// An engine over `store` for the agents in `catalog`.
    pub fn new(store: Arc<dyn Store>, catalog: Arc<Catalog>, replica: String) -> Arc<Self> {
        let hub = Hub::new(catalog.agents().map(|a| a.name.as_str()));
        Arc::new(Self {
            store,
            catalog,
            hub,
            events: broadcast::channel(4096).0,
            replica,
            connections: Mutex::new(HashMap::new()),
        })
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
        &self,
        fact: Fact,
        delivery: Option<&str>,
    ) -> Result<Recording, EngineError> {
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
        let mut outcome = Recording::Unchanged;
        for key in &keys {
            let result = self
                .update(key, delivery, |doc, now, catalog| {
                    let recorded = match &fact.kind {
                        FactKind::Push(push) => doc.refs.record_push(push),
                        FactKind::Pipeline { sha, pipeline } => {
                            doc.refs.record_pipeline(sha, pipeline.clone())
                        }
                    };
                    if recorded == Recorded::Unchanged {
                        return Ok(Change::Clean(()));
                    }
                    Ok(Change::Dirty((), advance_all(doc, key, catalog, now)))
                })
                .await?;
            outcome = match (result, outcome) {
                (Some(true), _) | (_, Recording::Recorded) => Recording::Recorded,
                (None, _) => Recording::Duplicate,
                (Some(false), previous) => previous,
            };
        }
        Ok(outcome)
    }

    /// Carries out an operator's request on `agent`.
    pub async fn operate(&self, agent: &str, operation: Operation) -> Result<(), EngineError> {
        let spec = self
            .catalog
            .agent(agent)
            .ok_or_else(|| EngineError::UnknownAgent(agent.to_owned()))?;
        let key = ref_key(spec);
        let mode = spec.mode;
        self.update(&key, None, |doc, now, _| {
            let RefDoc { refs, agents } = doc;
            let gate = agents.entry(agent.to_owned()).or_default();
            let lineage = PushOrder(refs);
            let cx = Context {
                mode,
                refs,
                lineage: &lineage,
                now_ms: now,
            };
            let step = match &operation {
                Operation::Trigger { sha } => gate.trigger(&cx, sha.as_ref())?,
                Operation::Pause { reason } => gate.pause(reason.clone(), now),
                Operation::Resume => gate.resume(now)?,
                Operation::Pin { sha, reason } => gate.pin(sha.clone(), reason.clone(), now)?,
                Operation::Unpin => gate.unpin(now)?,
            };
            Ok(Change::Dirty((), vec![(agent.to_owned(), step)]))
        })
        .await?;
        Ok(())
    }

    /// Re-runs the gate for every watched ref: at start, so that config changes (new agents,
    /// other modes) take effect without waiting for an event.
    pub async fn reconcile_all(&self) -> Result<(), EngineError> {
        let keys: Vec<RefKey> = self.catalog.refs().cloned().collect();
        for key in keys {
            self.update(&key, None, |doc, now, catalog| {
                let steps = advance_all(doc, &key, catalog, now);
                if steps
                    .iter()
                    .any(|(_, s)| s.desired_changed || !s.decisions.is_empty())
                {
                    Ok(Change::Dirty((), steps))
                } else {
                    Ok(Change::Clean(()))
                }
            })
            .await?;
            self.refresh(&key, true).await?;
        }
        Ok(())
    }

    /// The stored document of `key`.
    pub async fn load(&self, key: &RefKey) -> Result<Versioned<RefDoc>, EngineError> {
        Ok(self.store.load(key).await?)
    }

    /// The gate state of `agent` as stored now.
    pub async fn gate_of(&self, agent: &str) -> Result<(AgentGate, RefDoc), EngineError> {
        let spec = self
            .catalog
            .agent(agent)
            .ok_or_else(|| EngineError::UnknownAgent(agent.to_owned()))?;
        let doc = self.store.load(&ref_key(spec)).await?.value;
        Ok((doc.agents.get(agent).cloned().unwrap_or_default(), doc))
    }

    /// Re-reads `key` and hands its agents' desired revisions to their streams.
    pub async fn refresh(&self, key: &RefKey, force: bool) -> Result<(), EngineError> {
        let Versioned { version, value } = self.store.load(key).await?;
        self.offer(key, version, &value, force);
        Ok(())
    }

    fn offer(&self, key: &RefKey, version: u64, doc: &RefDoc, force: bool) {
        for agent in self.catalog.watchers(key) {
            let desired = doc.agents.get(agent).and_then(|g| g.desired.as_ref());
            self.hub.offer(agent, version, desired, force);
        }
    }

    /// Reads, decides with `change`, and writes `key` atomically, retrying on conflicts.
    /// Returns `Some(dirty)`, or `None` when `delivery` was seen before.
    async fn update<T>(
        &self,
        key: &RefKey,
        delivery: Option<&str>,
        mut change: impl FnMut(&mut RefDoc, i64, &Catalog) -> Result<Change<T>, GateError>,
    ) -> Result<Option<bool>, EngineError> {
        for attempt in 0..MAX_ATTEMPTS {
            let Versioned {
                version,
                value: mut doc,
            } = self.store.load(key).await?;
            let (decisions, dirty) = match change(&mut doc, now_ms(), &self.catalog)? {
                Change::Clean(_) => return Ok(Some(false)),
                Change::Dirty(_, steps) => {
                    let decisions: Vec<_> = steps
                        .into_iter()
                        .flat_map(|(agent, step)| {
                            step.decisions.into_iter().map(move |d| (agent.clone(), d))
                        })
                        .collect();
                    (decisions, true)
                }
            };
            let notice = Broadcast::RefChanged {
                key: key.clone(),
                decisions,
            };
            match self
                .store
                .save(key, version, &doc, delivery, &notice)
                .await?
            {
                SaveOutcome::Saved { version } => {
                    // Local agents need not wait for the round trip through the store.
                    self.offer(key, version, &doc, false);
                    return Ok(Some(dirty));
                }
                SaveOutcome::Duplicate => return Ok(None),
                SaveOutcome::Conflict => {
                    debug!(%key, attempt, "concurrent update; retrying");
                    let pause = 1 + fastrand::u64(0..=(1u64 << attempt.min(6)));
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
        }
        Err(EngineError::Contention(key.clone()))
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

    /// Whether `agent` has a stream on this replica.
    pub fn connected_here(&self, agent: &str) -> bool {
        self.lock_connections().contains_key(agent)
    }

    fn lock_connections(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Counters stay consistent under a poisoned lock: each change is one statement.
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn announce_presence(&self, agent: &str, connected: bool) {
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
        if let Err(error) = self.store.publish(&message).await {
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
        let mut notices = self.store.subscribe();
        let mut presence =
            tokio::time::interval(Duration::from_secs(crate::store::PRESENCE_TTL_SECS * 4 / 5));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = presence.tick() => {
                    if let Err(error) = self.store.refresh_presence(&self.replica).await {
                        warn!(%error, "cannot refresh presence");
                    }
                }
                notice = notices.recv() => match notice {
                    Ok(Notice::Message(message)) => {
                        if let Broadcast::RefChanged { key, .. } = &message
                            && let Err(error) = self.refresh(key, false).await
                        {
                            warn!(%error, %key, "cannot re-read a changed ref");
                        }
                        let _ = self.events.send(message);
                    }
                    Ok(Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => self.resync().await,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    /// Re-reads every watched ref, after announcements may have been missed.
    async fn resync(&self) {
        info!("re-reading the desired state of every agent");
        let keys: Vec<RefKey> = self.catalog.refs().cloned().collect();
        for key in keys {
            if let Err(error) = self.refresh(&key, true).await {
                warn!(%error, %key, "cannot re-read ref");
            }
        }
        let agents: Vec<String> = self.lock_connections().keys().cloned().collect();
        for agent in agents {
            if let Err(error) = self.store.set_presence(&self.replica, &agent, true).await {
                warn!(%error, agent, "cannot restore presence");
            }
        }
    }

    /// Keeps `report` for `agent` and announces it.
    pub async fn report(&self, agent: &str, report: Vec<u8>) -> Result<(), EngineError> {
        self.store
            .push_report(agent, &report, REPORT_HISTORY)
            .await?;
        let message = Broadcast::Report {
            agent: agent.to_owned(),
            report,
        };
        if let Err(error) = self.store.publish(&message).await {
            warn!(%error, agent, "cannot announce report");
        }
        Ok(())
    }
}

/// Advances the gate of every agent watching `key`.
fn advance_all(doc: &mut RefDoc, key: &RefKey, catalog: &Catalog, now: i64) -> Vec<(String, Step)> {
    let RefDoc { refs, agents } = doc;
    let lineage = PushOrder(refs);
    catalog
        .watchers(key)
        .iter()
        .filter_map(|name| {
            let spec = catalog.agent(name)?;
            let cx = Context {
                mode: spec.mode,
                refs,
                lineage: &lineage,
                now_ms: now,
            };
            let step = agents.entry(name.clone()).or_default().advance(&cx);
            Some((name.clone(), step))
        })
        .collect()
}
