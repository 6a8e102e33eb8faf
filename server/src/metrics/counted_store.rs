//! A [`Store`] that counts its failures by operation: every store error the replica, the
//! edges and the status publisher meet passes through it, so none is missed and none is
//! counted twice.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::Metrics;
use crate::gate::{Pipeline, Sha};
use crate::store::{
    AgentRead, AgentStore, AgentWrites, ChangeLog, FactRecord, FactStore, Facts, Ingested,
    LeaseStore, LogEntry, Notice, PresenceStore, RefKey, ReportStore, Reported, Result,
    StatusClaim, StatusKey, Store, SyncError, Told, Versioned, Written,
};
use crate::store::{Registry, RegistryRecord, RegistryStore, RegistryWritten};

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
impl FactStore for CountedStore {
    async fn record_fact(
        &self,
        key: &RefKey,
        fact: &FactRecord,
        delivery: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<Ingested> {
        let recorded = self
            .inner
            .record_fact(key, fact, delivery, traceparent)
            .await;
        self.count("record_fact", recorded)
    }

    async fn facts(&self, key: &RefKey) -> Result<Facts> {
        self.count("facts", self.inner.facts(key).await)
    }

    async fn pipeline(&self, key: &RefKey, sha: &Sha, id: u64) -> Result<Option<Pipeline>> {
        self.count("pipeline", self.inner.pipeline(key, sha, id).await)
    }

    async fn forget_pipelines(&self, key: &RefKey, forget: &[(Sha, u64)]) -> Result<()> {
        let forgot = self.inner.forget_pipelines(key, forget).await;
        self.count("forget_pipelines", forgot)
    }

    async fn raise_position(&self, key: &RefKey, at_least: u64) -> Result<u64> {
        let raised = self.inner.raise_position(key, at_least).await;
        self.count("raise_position", raised)
    }
}

#[async_trait]
impl AgentStore for CountedStore {
    async fn agent(&self, agent: &str) -> Result<AgentRead> {
        self.count("agent", self.inner.agent(agent).await)
    }

    async fn agents(&self, agents: &[String]) -> Result<Vec<AgentRead>> {
        self.count("agents", self.inner.agents(agents).await)
    }

    async fn write_agents_telling(
        &self,
        writes: &AgentWrites<'_>,
        told: &mut Told<'_>,
    ) -> Result<Vec<Written>> {
        let written = self.inner.write_agents_telling(writes, told).await;
        self.count("write_agents", written)
    }

    async fn give_agent(&self, agent: &str, from: u64, to: u64) -> Result<bool> {
        let given = self.inner.give_agent(agent, from, to).await;
        self.count("give_agent", given)
    }

    async fn set_sync_errors(&self, errors: &[(&str, Option<&SyncError>)]) -> Result<()> {
        let set = self.inner.set_sync_errors(errors).await;
        self.count("set_sync_errors", set)
    }

    async fn sync_error(&self, agent: &str) -> Result<Option<SyncError>> {
        self.count("sync_error", self.inner.sync_error(agent).await)
    }
}

#[async_trait]
impl ReportStore for CountedStore {
    async fn push_report(
        &self,
        agent: &str,
        incarnation: u64,
        report: &[u8],
        keep: usize,
    ) -> Result<Reported> {
        let pushed = self
            .inner
            .push_report(agent, incarnation, report, keep)
            .await;
        self.count("push_report", pushed)
    }

    async fn reports(&self, agent: &str, limit: usize) -> Result<Vec<Vec<u8>>> {
        self.count("reports", self.inner.reports(agent, limit).await)
    }
}

#[async_trait]
impl PresenceStore for CountedStore {
    async fn set_presence(&self, replica: &str, agent: &str, connected: bool) -> Result<()> {
        let set = self.inner.set_presence(replica, agent, connected).await;
        self.count("set_presence", set)
    }

    async fn refresh_presence(&self, replica: &str) -> Result<()> {
        let refreshed = self.inner.refresh_presence(replica).await;
        self.count("refresh_presence", refreshed)
    }

    async fn mark_alive(&self, replica: &str) -> Result<()> {
        let marked = self.inner.mark_alive(replica).await;
        self.count("mark_alive", marked)
    }

    async fn all_presence(&self) -> Result<Vec<(String, String)>> {
        self.count("all_presence", self.inner.all_presence().await)
    }
}

#[async_trait]
impl ChangeLog for CountedStore {
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

    async fn release_statuses(&self, consumer: &str, reclaim_after: Duration) -> Result<()> {
        let released = self.inner.release_statuses(consumer, reclaim_after).await;
        self.count("release_statuses", released)
    }

    async fn begin_status(
        &self,
        status: &StatusKey<'_>,
        holder: &str,
        lease: Duration,
    ) -> Result<StatusClaim> {
        let claimed = self.inner.begin_status(status, holder, lease).await;
        self.count("begin_status", claimed)
    }

    async fn finish_status(
        &self,
        status: &StatusKey<'_>,
        holder: &str,
        posted: bool,
    ) -> Result<()> {
        let finished = self.inner.finish_status(status, holder, posted).await;
        self.count("finish_status", finished)
    }
}

#[async_trait]
impl LeaseStore for CountedStore {
    async fn hold_lease(&self, shard: u16, replica: &str, ttl: Duration) -> Result<bool> {
        let held = self.inner.hold_lease(shard, replica, ttl).await;
        self.count("hold_lease", held)
    }

    async fn release_lease(&self, shard: u16, replica: &str) -> Result<()> {
        let released = self.inner.release_lease(shard, replica).await;
        self.count("release_lease", released)
    }
}

#[async_trait]
impl RegistryStore for CountedStore {
    async fn registry(&self) -> Result<Registry> {
        self.count("registry", self.inner.registry().await)
    }

    async fn registered(&self, name: &str) -> Result<Option<Versioned<RegistryRecord>>> {
        self.count("registered", self.inner.registered(name).await)
    }

    async fn change_registered(
        &self,
        name: &str,
        record: Option<&RegistryRecord>,
        expected: u64,
    ) -> Result<RegistryWritten> {
        let changed = self.inner.change_registered(name, record, expected).await;
        self.count("change_registered", changed)
    }
}

#[async_trait]
impl Store for CountedStore {
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
        let settings = RedisSettings::single("redis://127.0.0.1:1", "gl-unit");
        let metrics = Arc::new(Metrics::default());
        let stop = CancellationToken::new();
        let redis = RedisStore::connect(&settings, stop.clone(), metrics.log()).unwrap();
        let store = CountedStore::new(Arc::new(redis), metrics.clone());
        let key = RefKey {
            project: "group/app".into(),
            branch: "main".into(),
        };
        assert!(store.facts(&key).await.is_err());
        assert!(store.facts(&key).await.is_err());
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
                "greenlight_store_errors_total{operation=\"facts\"} 2",
                "greenlight_store_errors_total{operation=\"ping\"} 1",
            ],
            "{text}"
        );
    }
}
