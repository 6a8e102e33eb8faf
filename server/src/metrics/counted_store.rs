//! A [`Store`] that counts its failures by operation: every store error the engine, the
//! edges and the status publisher meet passes through it, so none is missed and none is
//! counted twice.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::Metrics;
use crate::store::{
    Broadcast, LogEntry, Notice, RefDoc, RefKey, Result, SaveOutcome, Store, Versioned,
};

/// Wraps the store the server runs on.
pub struct CountedStore {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl CountedStore {
    /// Counts the failures of `inner` in `metrics`.
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    fn count<T>(&self, operation: &'static str, result: Result<T>) -> Result<T> {
        if result.is_err() {
            self.metrics.store_error(operation);
        }
        result
    }
}

#[async_trait]
impl Store for CountedStore {
    async fn load(&self, key: &RefKey) -> Result<Versioned<RefDoc>> {
        self.count("load", self.inner.load(key).await)
    }

    async fn save(
        &self,
        key: &RefKey,
        expected: u64,
        doc: &RefDoc,
        delivery: Option<&str>,
        notice: &Broadcast,
    ) -> Result<SaveOutcome> {
        let saved = self.inner.save(key, expected, doc, delivery, notice).await;
        self.count("save", saved)
    }

    async fn seen_delivery(&self, key: &RefKey, delivery: &str) -> Result<bool> {
        let seen = self.inner.seen_delivery(key, delivery).await;
        self.count("seen_delivery", seen)
    }

    async fn push_report(
        &self,
        agent: &str,
        report: &[u8],
        keep: usize,
        notice: &Broadcast,
    ) -> Result<()> {
        let pushed = self.inner.push_report(agent, report, keep, notice).await;
        self.count("push_report", pushed)
    }

    async fn reports(&self, agent: &str, limit: usize) -> Result<Vec<Vec<u8>>> {
        self.count("reports", self.inner.reports(agent, limit).await)
    }

    async fn set_presence(&self, replica: &str, agent: &str, connected: bool) -> Result<()> {
        let set = self.inner.set_presence(replica, agent, connected).await;
        self.count("set_presence", set)
    }

    async fn refresh_presence(&self, replica: &str) -> Result<()> {
        let refreshed = self.inner.refresh_presence(replica).await;
        self.count("refresh_presence", refreshed)
    }

    async fn presence(&self, agent: &str) -> Result<Option<String>> {
        self.count("presence", self.inner.presence(agent).await)
    }

    async fn set_sync_error(&self, agent: &str, error: Option<&str>) -> Result<()> {
        let set = self.inner.set_sync_error(agent, error).await;
        self.count("set_sync_error", set)
    }

    async fn sync_error(&self, agent: &str) -> Result<Option<String>> {
        self.count("sync_error", self.inner.sync_error(agent).await)
    }

    async fn claim_status(&self, agent: &str, sha: &str, state: &str) -> Result<bool> {
        let claimed = self.inner.claim_status(agent, sha, state).await;
        self.count("claim_status", claimed)
    }

    async fn status_posted(&self, agent: &str, sha: &str, state: &str) -> Result<bool> {
        let posted = self.inner.status_posted(agent, sha, state).await;
        self.count("status_posted", posted)
    }

    async fn append(&self, message: &Broadcast) -> Result<()> {
        self.count("append", self.inner.append(message).await)
    }

    fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.inner.subscribe()
    }

    async fn next_for_statuses(
        &self,
        consumer: &str,
        reclaim_after: Duration,
    ) -> Result<Option<LogEntry>> {
        let next = self.inner.next_for_statuses(consumer, reclaim_after).await;
        self.count("next_for_statuses", next)
    }

    async fn ack_statuses(&self, id: &str) -> Result<()> {
        self.count("ack_statuses", self.inner.ack_statuses(id).await)
    }

    async fn ping(&self) -> Result<()> {
        self.count("ping", self.inner.ping().await)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedisSettings;
    use crate::git::GitStats;
    use crate::store::RedisStore;
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn failures_are_counted_by_operation() {
        // Nothing listens on port 1: every command fails at once with "connection refused".
        let settings = RedisSettings {
            url: "redis://127.0.0.1:1".into(),
            key_prefix: "gl-unit".into(),
        };
        let metrics = Arc::new(Metrics::default());
        let stop = CancellationToken::new();
        let redis = RedisStore::connect(&settings, stop.clone(), metrics.log_lag()).unwrap();
        let store = CountedStore::new(Arc::new(redis), metrics.clone());
        let key = RefKey {
            project: "group/app".into(),
            branch: "main".into(),
        };
        assert!(store.load(&key).await.is_err());
        assert!(store.load(&key).await.is_err());
        assert!(store.ping().await.is_err());
        stop.cancel();
        let text = metrics.encode(GitStats::default()).unwrap();
        let mut errors: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("greenlight_store_errors_total"))
            .collect();
        errors.sort_unstable();
        assert_eq!(
            errors,
            [
                "greenlight_store_errors_total{operation=\"load\"} 2",
                "greenlight_store_errors_total{operation=\"ping\"} 1",
            ],
            "{text}"
        );
    }
}
