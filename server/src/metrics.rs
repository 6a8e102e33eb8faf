//! Prometheus metrics.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::git::GitStats;

/// Labels: event kind and outcome.
pub type EventLabels = Vec<(&'static str, String)>;

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    /// Webhook deliveries by `event` and `outcome`.
    pub webhooks: Family<EventLabels, Counter>,
    git_fetches: Counter,
    manifest_reads: Counter,
    gitlab_statuses: Family<EventLabels, Counter>,
    log_resyncs: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("greenlight");
        let webhooks = Family::<EventLabels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries by event and outcome",
            webhooks.clone(),
        );
        let git_fetches = Counter::default();
        registry.register(
            "git_fetches",
            "Fetches from git repositories",
            git_fetches.clone(),
        );
        let manifest_reads = Counter::default();
        registry.register(
            "manifest_reads",
            "Manifest sets read from git (shared by every agent that needs them)",
            manifest_reads.clone(),
        );
        let gitlab_statuses = Family::<EventLabels, Counter>::default();
        registry.register(
            "gitlab_commit_statuses",
            "Commit statuses by outcome: posted, retried, deferred (left for a later attempt), failed",
            gitlab_statuses.clone(),
        );
        let log_resyncs = Counter::default();
        registry.register(
            "change_log_resyncs",
            "Times this replica re-read every ref because change log entries were lost to it \
             (first start, entries trimmed unread, or Redis lost its data); not after a mere \
             reconnection",
            log_resyncs.clone(),
        );
        Self {
            registry,
            webhooks,
            git_fetches,
            manifest_reads,
            gitlab_statuses,
            log_resyncs,
        }
    }
}

impl Metrics {
    /// Counts one webhook delivery.
    pub fn webhook(&self, event: &str, outcome: &str) {
        self.webhooks
            .get_or_create(&vec![
                ("event", event.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    /// Counts one re-read of every ref after change log entries were lost.
    pub fn log_resync(&self) {
        self.log_resyncs.inc();
    }

    /// Counts `n` commit statuses with `outcome`.
    pub fn gitlab_status(&self, outcome: &str, n: u64) {
        self.gitlab_statuses
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc_by(n);
    }

    /// The OpenMetrics text exposition, with the git counters brought up to `git`.
    pub fn encode(&self, git: GitStats) -> Result<String, std::fmt::Error> {
        catch_up(&self.git_fetches, git.fetches);
        catch_up(&self.manifest_reads, git.reads);
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Counters only go up: add what the source counted since the last scrape.
fn catch_up(counter: &Counter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resyncs_are_exposed_under_the_name_operators_alert_on() {
        let metrics = Metrics::default();
        let line = |text: &str| {
            text.lines()
                .find(|l| l.starts_with("greenlight_change_log_resyncs_total "))
                .map(str::to_owned)
        };
        let text = metrics.encode(GitStats::default()).unwrap();
        assert_eq!(
            line(&text).as_deref(),
            Some("greenlight_change_log_resyncs_total 0")
        );
        metrics.log_resync();
        let text = metrics.encode(GitStats::default()).unwrap();
        assert_eq!(
            line(&text).as_deref(),
            Some("greenlight_change_log_resyncs_total 1")
        );
    }
}
