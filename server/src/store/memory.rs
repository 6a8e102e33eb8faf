//! The embedded store: one process, nothing on disk.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{Broadcast, Notice, RefDoc, RefKey, Result, SaveOutcome, Store, Versioned};

/// In-memory store for a single replica: zero setup, not durable.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    notices: broadcast::Sender<Notice>,
}

#[derive(Default)]
struct Inner {
    docs: HashMap<RefKey, (u64, RefDoc)>,
    deliveries: HashSet<(String, String)>,
    reports: HashMap<String, VecDeque<Vec<u8>>>,
    presence: HashMap<String, String>,
    sync_errors: HashMap<String, String>,
    statuses: HashSet<(String, String, String)>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            notices: broadcast::channel(1024).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-written entry: every write
        // below is a single insert, so the data stays usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn load(&self, key: &RefKey) -> Result<Versioned<RefDoc>> {
        let inner = self.lock();
        Ok(match inner.docs.get(key) {
            Some((version, doc)) => Versioned {
                version: *version,
                value: doc.clone(),
            },
            None => Versioned {
                version: 0,
                value: RefDoc::default(),
            },
        })
    }

    async fn save(
        &self,
        key: &RefKey,
        expected: u64,
        doc: &RefDoc,
        delivery: Option<&str>,
        notice: &Broadcast,
    ) -> Result<SaveOutcome> {
        let version = {
            let mut inner = self.lock();
            if let Some(id) = delivery
                && inner
                    .deliveries
                    .contains(&(key.project.clone(), id.to_owned()))
            {
                return Ok(SaveOutcome::Duplicate);
            }
            let current = inner.docs.get(key).map_or(0, |(v, _)| *v);
            if current != expected {
                return Ok(SaveOutcome::Conflict);
            }
            inner.docs.insert(key.clone(), (current + 1, doc.clone()));
            if let Some(id) = delivery {
                inner
                    .deliveries
                    .insert((key.project.clone(), id.to_owned()));
            }
            current + 1
        };
        let _ = self.notices.send(Notice::Message(notice.clone()));
        Ok(SaveOutcome::Saved { version })
    }

    async fn seen_delivery(&self, key: &RefKey, delivery: &str) -> Result<bool> {
        Ok(self
            .lock()
            .deliveries
            .contains(&(key.project.clone(), delivery.to_owned())))
    }

    async fn push_report(&self, agent: &str, report: &[u8], keep: usize) -> Result<()> {
        let mut inner = self.lock();
        let reports = inner.reports.entry(agent.to_owned()).or_default();
        reports.push_front(report.to_vec());
        reports.truncate(keep);
        Ok(())
    }

    async fn reports(&self, agent: &str, limit: usize) -> Result<Vec<Vec<u8>>> {
        let inner = self.lock();
        Ok(inner
            .reports
            .get(agent)
            .map(|r| r.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    async fn set_presence(&self, replica: &str, agent: &str, connected: bool) -> Result<()> {
        let mut inner = self.lock();
        if connected {
            inner.presence.insert(agent.to_owned(), replica.to_owned());
        } else if inner.presence.get(agent).is_some_and(|r| r == replica) {
            inner.presence.remove(agent);
        }
        Ok(())
    }

    async fn refresh_presence(&self, _replica: &str) -> Result<()> {
        Ok(())
    }

    async fn presence(&self, agent: &str) -> Result<Option<String>> {
        Ok(self.lock().presence.get(agent).cloned())
    }

    async fn set_sync_error(&self, agent: &str, error: Option<&str>) -> Result<()> {
        let mut inner = self.lock();
        match error {
            Some(error) => inner.sync_errors.insert(agent.to_owned(), error.to_owned()),
            None => inner.sync_errors.remove(agent),
        };
        Ok(())
    }

    async fn sync_error(&self, agent: &str) -> Result<Option<String>> {
        Ok(self.lock().sync_errors.get(agent).cloned())
    }

    async fn status_posted(&self, agent: &str, sha: &str, state: &str) -> Result<bool> {
        let key = (agent.to_owned(), sha.to_owned(), state.to_owned());
        Ok(self.lock().statuses.contains(&key))
    }

    async fn claim_status(&self, agent: &str, sha: &str, state: &str) -> Result<bool> {
        Ok(self
            .lock()
            .statuses
            .insert((agent.to_owned(), sha.to_owned(), state.to_owned())))
    }

    async fn publish(&self, message: &Broadcast) -> Result<()> {
        let _ = self.notices.send(Notice::Message(message.clone()));
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "embedded in-memory store (single replica, not durable)".to_owned()
    }
}
