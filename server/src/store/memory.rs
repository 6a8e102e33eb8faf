//! The embedded store: one process, nothing on disk.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{Notify, broadcast};

use super::{
    Broadcast, DELIVERY_MEMORY_SECS, LOG_MAX_ENTRIES, LogEntry, Notice, RefDoc, RefKey, Result,
    STATUS_MEMORY_SECS, SaveOutcome, Store, Versioned,
};

/// How long `next_for_statuses` waits for an entry before answering `None`.
const STATUS_WAIT: Duration = Duration::from_secs(2);

/// In-memory store for a single replica: zero setup, not durable.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    notices: broadcast::Sender<Notice>,
    /// Wakes status publishers waiting for an entry.
    appended: Notify,
}

struct Inner {
    docs: HashMap<RefKey, (u64, RefDoc)>,
    deliveries: Expiring<(String, String)>,
    reports: HashMap<String, VecDeque<Vec<u8>>>,
    presence: HashMap<String, String>,
    sync_errors: HashMap<String, String>,
    statuses: Expiring<(String, String, String)>,
    status_feed: StatusFeed,
}

/// The change log as the status publishers see it: entries not yet acknowledged, oldest
/// first, each with who took it and when.
#[derive(Default)]
struct StatusFeed {
    next_id: u64,
    entries: VecDeque<FeedEntry>,
}

struct FeedEntry {
    id: u64,
    message: Broadcast,
    /// Which publisher took it, and when.
    taken: Option<(String, Instant)>,
}

impl StatusFeed {
    fn append(&mut self, message: Broadcast) {
        self.next_id += 1;
        self.entries.push_back(FeedEntry {
            id: self.next_id,
            message,
            taken: None,
        });
        // Bounded like the Redis log: what falls off was not acknowledged in time.
        while self.entries.len() > LOG_MAX_ENTRIES {
            self.entries.pop_front();
        }
    }

    fn take(&mut self, consumer: &str, reclaim_after: Duration, now: Instant) -> Option<LogEntry> {
        let entry = self.entries.iter_mut().find(|entry| {
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

    fn ack(&mut self, id: &str) {
        if let Ok(id) = id.parse::<u64>() {
            self.entries.retain(|entry| entry.id != id);
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
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
            inner: Mutex::new(Inner {
                docs: HashMap::new(),
                deliveries: Expiring::new(deliveries),
                reports: HashMap::new(),
                presence: HashMap::new(),
                sync_errors: HashMap::new(),
                statuses: Expiring::new(statuses),
                status_feed: StatusFeed::default(),
            }),
            notices: broadcast::channel(1024).0,
            appended: Notify::new(),
        }
    }

    /// Appends `message` to the change log: followers and status publishers see it.
    fn log(&self, inner: &mut Inner, message: &Broadcast) {
        inner.status_feed.append(message.clone());
        let _ = self.notices.send(Notice::Message(message.clone()));
        self.appended.notify_waiters();
    }

    /// Delivery and status markers held now, expired ones not yet swept included.
    pub fn markers(&self) -> usize {
        let inner = self.lock();
        inner.deliveries.len() + inner.statuses.len()
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
            let now = Instant::now();
            if let Some(id) = delivery
                && inner
                    .deliveries
                    .contains(&(key.project.clone(), id.to_owned()), now)
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
                    .insert((key.project.clone(), id.to_owned()), now);
            }
            self.log(&mut inner, notice);
            current + 1
        };
        Ok(SaveOutcome::Saved { version })
    }

    async fn seen_delivery(&self, key: &RefKey, delivery: &str) -> Result<bool> {
        Ok(self
            .lock()
            .deliveries
            .contains(&(key.project.clone(), delivery.to_owned()), Instant::now()))
    }

    async fn push_report(
        &self,
        agent: &str,
        report: &[u8],
        keep: usize,
        notice: &Broadcast,
    ) -> Result<()> {
        let mut inner = self.lock();
        let reports = inner.reports.entry(agent.to_owned()).or_default();
        reports.push_front(report.to_vec());
        reports.truncate(keep);
        self.log(&mut inner, notice);
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
        Ok(self.lock().statuses.contains(&key, Instant::now()))
    }

    async fn claim_status(&self, agent: &str, sha: &str, state: &str) -> Result<bool> {
        Ok(self.lock().statuses.insert(
            (agent.to_owned(), sha.to_owned(), state.to_owned()),
            Instant::now(),
        ))
    }

    async fn append(&self, message: &Broadcast) -> Result<()> {
        let mut inner = self.lock();
        self.log(&mut inner, message);
        Ok(())
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

    async fn ack_statuses(&self, id: &str) -> Result<()> {
        self.lock().status_feed.ack(id);
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

/// A set whose members are forgotten a fixed time after they were added, as Redis keys with
/// `EX` are. Members expire in the order they were added, so sweeping is a walk from the
/// front that stops at the first live one: amortised O(1) per insert.
struct Expiring<K> {
    ttl: Duration,
    expires: HashMap<K, Instant>,
    order: VecDeque<(Instant, K)>,
}

impl<K: Hash + Eq + Clone> Expiring<K> {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            expires: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Adds `key` unless it is held and live: `true` when it was added.
    fn insert(&mut self, key: K, now: Instant) -> bool {
        self.sweep(now);
        if self.contains(&key, now) {
            return false;
        }
        let expiry = now + self.ttl;
        self.expires.insert(key.clone(), expiry);
        self.order.push_back((expiry, key));
        true
    }

    fn contains(&self, key: &K, now: Instant) -> bool {
        self.expires.get(key).is_some_and(|expiry| *expiry > now)
    }

    fn len(&self) -> usize {
        self.expires.len()
    }

    fn sweep(&mut self, now: Instant) {
        while let Some((expiry, _)) = self.order.front()
            && *expiry <= now
        {
            if let Some((expiry, key)) = self.order.pop_front()
                && self.expires.get(&key) == Some(&expiry)
            {
                self.expires.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn redeliveries_and_claims_are_forgotten_after_the_configured_time() {
        let store = MemoryStore::with_memory(Duration::from_millis(50), Duration::from_millis(50));
        let key = RefKey {
            project: "p".to_owned(),
            branch: "main".to_owned(),
        };
        let notice = Broadcast::Report {
            agent: "a".to_owned(),
            report: Vec::new(),
        };
        let doc = RefDoc::default();
        store
            .save(&key, 0, &doc, Some("d1"), &notice)
            .await
            .unwrap();
        assert!(store.seen_delivery(&key, "d1").await.unwrap());
        assert!(store.claim_status("a", "sha", "success").await.unwrap());
        assert!(!store.claim_status("a", "sha", "success").await.unwrap());
        assert_eq!(store.markers(), 2);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!store.seen_delivery(&key, "d1").await.unwrap());
        assert!(!store.status_posted("a", "sha", "success").await.unwrap());
        store
            .save(&key, 1, &doc, Some("d2"), &notice)
            .await
            .unwrap();
        assert!(store.claim_status("a", "sha", "success").await.unwrap());
        assert_eq!(store.markers(), 2, "the expired markers were swept");
    }
}
