//! Prometheus metrics.

mod counted_store;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::gate::{Decision, Outcome};
use crate::git::{GitStats, GitTimer};

pub use counted_store::CountedStore;

/// Labels: event kind and outcome.
pub type EventLabels = Vec<(&'static str, String)>;

/// Labels whose values the server names itself.
type StaticLabels = Vec<(&'static str, &'static str)>;

/// Seconds from a fact to its decision: milliseconds normally, up to seconds when GitLab is
/// asked to confirm a pipeline or writes contend.
const DECISION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Seconds of git work: a tree read takes milliseconds, a first clone minutes (the default
/// `git.fetch_timeout` is 60 s).
const GIT_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// How far behind the change log this replica's follower is: seconds between an entry's
/// append and its relay.
pub type LogLag = Gauge<f64, AtomicU64>;

/// What the store sees of the change log: shared with it, which sets them.
#[derive(Clone, Default)]
pub struct LogMetrics {
    /// How far behind the log this replica's follower is.
    pub lag: LogLag,
    /// Entries trimmed from the log before any status publisher read them.
    pub status_entries_lost: Counter,
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    /// Webhook deliveries by `event` and `outcome`.
    pub webhooks: Family<EventLabels, Counter>,
    git_fetches: Counter,
    manifest_reads: Counter,
    gitlab_statuses: Family<EventLabels, Counter>,
    log_resyncs: Counter,
    facts_behind: Counter,
    fact_to_decision: Histogram,
    decisions: Family<StaticLabels, Counter>,
    connected_agents: Gauge,
    stream_messages: Counter,
    stream_bytes: Counter,
    git_fetch_duration: Histogram,
    manifest_read_duration: Histogram,
    store_errors: Family<StaticLabels, Counter>,
    log: LogMetrics,
    stream_buffer: StreamBuffer,
}

/// What this replica's server streams hold that their readers have not taken yet, and the
/// streams it ended for their readers; shared by every stream's sending side.
#[derive(Clone, Default)]
pub struct StreamBuffer {
    messages: Gauge,
    bytes: Gauge,
    closed: Family<StaticLabels, Counter>,
}

impl StreamBuffer {
    /// One message of `bytes` more waits for its reader.
    pub fn hold(&self, bytes: usize) {
        self.messages.inc();
        self.bytes.inc_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// One message of `bytes` was taken by its reader, or dropped with its stream.
    pub fn release(&self, bytes: usize) {
        self.messages.dec();
        self.bytes.dec_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Counts a stream ended because of its reader: `stalled` or `behind`.
    pub fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&vec![("reason", reason)]).inc();
    }

    /// Messages and bytes held now.
    #[cfg(test)]
    pub fn held(&self) -> (i64, i64) {
        (self.messages.get(), self.bytes.get())
    }

    /// Streams closed so far for `reason`.
    #[cfg(test)]
    pub fn closed_for(&self, reason: &'static str) -> u64 {
        self.closed.get_or_create(&vec![("reason", reason)]).get()
    }
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
            "Commit statuses by outcome: posted, retried, deferred (left for a later attempt), \
             failed, already_posted (found on GitLab), superseded (older than the one shown)",
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
        let facts_behind = Counter::default();
        registry.register(
            "facts_position_raised",
            "Times a ref's facts were found older than the decisions of its agents (the store \
             lost its newest writes, as in a Redis Cluster failover) and its position was \
             raised to theirs",
            facts_behind.clone(),
        );
        let fact_to_decision = Histogram::new(DECISION_BUCKETS);
        registry.register(
            "fact_to_decision_seconds",
            "Seconds from a webhook or ingest fact being recorded to the evaluation of its ref \
             that saved the gate's decisions, by the evaluating replica's clock: one sample \
             per evaluation, timed from the oldest fact of the burst it covers; evaluations \
             that change nothing are not timed",
            fact_to_decision.clone(),
        );
        let decisions = Family::<StaticLabels, Counter>::default();
        registry.register(
            "decisions",
            "Gate decisions saved by this replica, by outcome: deploy, hold, skip, or superseded \
             (a green commit skipped because a newer deploy includes it)",
            decisions.clone(),
        );
        let connected_agents = Gauge::default();
        registry.register(
            "connected_agents",
            "Agents with at least one sync stream open on this replica",
            connected_agents.clone(),
        );
        let stream_messages = Counter::default();
        registry.register(
            "sync_stream_messages",
            "Messages (revision headers, manifest chunks, trailers) sent on agents' sync streams",
            stream_messages.clone(),
        );
        let stream_bytes = Counter::default();
        registry.register(
            "sync_stream_bytes",
            "Encoded protobuf bytes of the messages sent on agents' sync streams",
            stream_bytes.clone(),
        );
        let git_fetch_duration = Histogram::new(GIT_BUCKETS);
        registry.register(
            "git_fetch_duration_seconds",
            "Seconds each fetch (or first clone) took, failed and timed out ones included",
            git_fetch_duration.clone(),
        );
        let manifest_read_duration = Histogram::new(GIT_BUCKETS);
        registry.register(
            "manifest_read_duration_seconds",
            "Seconds each manifest read from a mirror took (cache hits are not reads)",
            manifest_read_duration.clone(),
        );
        let store_errors = Family::<StaticLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Store operations that failed, by operation",
            store_errors.clone(),
        );
        let log = LogMetrics::default();
        registry.register(
            "change_log_lag_seconds",
            "Seconds between the append of the last change log entry this replica relayed and \
             its relay (by the two clocks); 0 once caught up, and always with the embedded store",
            log.lag.clone(),
        );
        registry.register(
            "gitlab_commit_status_entries_lost",
            "Change log entries trimmed before a status publisher read or finished them, whose \
             commit statuses are not posted unless a publisher was posting them then (GitLab \
             unreachable while about 10,000 entries passed in one shard); counted by the replica \
             that notices",
            log.status_entries_lost.clone(),
        );
        let stream_buffer = StreamBuffer::default();
        // Served at 0 from the start, so that a rate over them needs no special case.
        for reason in ["stalled", "behind"] {
            stream_buffer
                .closed
                .get_or_create(&vec![("reason", reason)])
                .inc_by(0);
        }
        registry.register(
            "stream_buffered_messages",
            "Messages of server streams (agents' sync streams, event and revision watches) \
             waiting for their readers to take them; each stream's share is bounded",
            stream_buffer.messages.clone(),
        );
        registry.register(
            "stream_buffered_bytes",
            "Encoded protobuf bytes of the messages counted by stream_buffered_messages",
            stream_buffer.bytes.clone(),
        );
        registry.register(
            "streams_closed",
            "Server streams this replica ended because of their reader, by reason: stalled \
             (read nothing for streams.stall_timeout) or behind (an event watch that fell \
             behind the events)",
            stream_buffer.closed.clone(),
        );
        Self {
            registry,
            webhooks,
            git_fetches,
            manifest_reads,
            gitlab_statuses,
            log_resyncs,
            facts_behind,
            fact_to_decision,
            decisions,
            connected_agents,
            stream_messages,
            stream_bytes,
            git_fetch_duration,
            manifest_read_duration,
            store_errors,
            log,
            stream_buffer,
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

    /// Counts one ref whose facts position was raised to its agents'.
    pub fn facts_position_raised(&self) {
        self.facts_behind.inc();
    }

    /// Counts `n` commit statuses with `outcome`.
    pub fn gitlab_status(&self, outcome: &str, n: u64) {
        self.gitlab_statuses
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc_by(n);
    }

    /// Records that a fact's decision was saved `took` after the fact arrived.
    pub fn fact_decided(&self, took: Duration) {
        self.fact_to_decision.observe(took.as_secs_f64());
    }

    /// Counts saved decisions by outcome: each of `decisions` was saved for `agents` agents.
    pub fn decided<'a>(&self, decisions: impl IntoIterator<Item = &'a Decision>, agents: u64) {
        for decision in decisions {
            let outcome = match (decision.outcome, &decision.superseded_by) {
                (Outcome::Skip, Some(_)) => "superseded",
                (Outcome::Skip, None) => "skip",
                (Outcome::Deploy, _) => "deploy",
                (Outcome::Hold, _) => "hold",
            };
            self.decisions
                .get_or_create(&vec![("outcome", outcome)])
                .inc_by(agents);
        }
    }

    /// Follows an agent's first stream opening on this replica, or its last one closing.
    pub fn agent_connected(&self, connected: bool) {
        if connected {
            self.connected_agents.inc();
        } else {
            self.connected_agents.dec();
        }
    }

    /// Counts one message of `bytes` sent on an agent's sync stream.
    pub fn stream_sent(&self, bytes: usize) {
        self.stream_messages.inc();
        self.stream_bytes
            .inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    /// Counts a failed store `operation`.
    pub fn store_error(&self, operation: &'static str) {
        self.store_errors
            .get_or_create(&vec![("operation", operation)])
            .inc();
    }

    /// The gauges every server stream's sending side keeps up to date.
    pub fn stream_buffer(&self) -> StreamBuffer {
        self.stream_buffer.clone()
    }

    /// The figures the store keeps of the change log.
    pub fn log(&self) -> LogMetrics {
        self.log.clone()
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

impl GitTimer for Metrics {
    fn fetched(&self, took: Duration) {
        self.git_fetch_duration.observe(took.as_secs_f64());
    }

    fn read(&self, took: Duration) {
        self.manifest_read_duration.observe(took.as_secs_f64());
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
    use crate::gate::Sha;

    fn line(text: &str, prefix: &str) -> Option<String> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .map(str::to_owned)
    }

    #[test]
    fn resyncs_are_exposed_under_the_name_operators_alert_on() {
        let metrics = Metrics::default();
        let resyncs = "greenlight_change_log_resyncs_total ";
        let text = metrics.encode(GitStats::default()).unwrap();
        assert_eq!(
            line(&text, resyncs).as_deref(),
            Some("greenlight_change_log_resyncs_total 0")
        );
        metrics.log_resync();
        let text = metrics.encode(GitStats::default()).unwrap();
        assert_eq!(
            line(&text, resyncs).as_deref(),
            Some("greenlight_change_log_resyncs_total 1")
        );
    }

    fn decision(outcome: Outcome, superseded_by: Option<Sha>) -> Decision {
        Decision {
            outcome,
            sha: None,
            pipeline_id: None,
            reason: String::new(),
            at_ms: 0,
            superseded_by,
        }
    }

    #[test]
    fn a_superseded_skip_is_counted_as_superseded_only() {
        let metrics = Metrics::default();
        let newer = Sha::parse(&"a".repeat(40)).unwrap();
        // One step decided alike for three agents.
        metrics.decided(
            &[
                decision(Outcome::Deploy, None),
                decision(Outcome::Hold, None),
                decision(Outcome::Skip, None),
                decision(Outcome::Skip, Some(newer)),
            ],
            3,
        );
        let text = metrics.encode(GitStats::default()).unwrap();
        for outcome in ["deploy", "hold", "skip", "superseded"] {
            let sample = format!("greenlight_decisions_total{{outcome=\"{outcome}\"}} ");
            assert_eq!(
                line(&text, &sample),
                Some(format!("{sample}3")),
                "{outcome} in:\n{text}"
            );
        }
    }

    #[test]
    fn connections_streams_git_and_lag_are_exposed() {
        let metrics = Metrics::default();
        metrics.agent_connected(true);
        metrics.agent_connected(true);
        metrics.agent_connected(false);
        metrics.stream_sent(100);
        metrics.stream_sent(28);
        metrics.fetched(Duration::from_millis(1500));
        metrics.read(Duration::from_millis(3));
        metrics.fact_decided(Duration::from_millis(2));
        metrics.store_error("load");
        metrics.log().lag.set(0.25);
        let text = metrics.encode(GitStats::default()).unwrap();
        for expected in [
            "greenlight_connected_agents 1",
            "greenlight_sync_stream_messages_total 2",
            "greenlight_sync_stream_bytes_total 128",
            "greenlight_git_fetch_duration_seconds_count 1",
            "greenlight_git_fetch_duration_seconds_bucket{le=\"2.5\"} 1",
            "greenlight_git_fetch_duration_seconds_bucket{le=\"1.0\"} 0",
            "greenlight_manifest_read_duration_seconds_bucket{le=\"0.005\"} 1",
            "greenlight_fact_to_decision_seconds_bucket{le=\"0.0025\"} 1",
            "greenlight_fact_to_decision_seconds_bucket{le=\"0.001\"} 0",
            "greenlight_store_errors_total{operation=\"load\"} 1",
            "greenlight_change_log_lag_seconds 0.25",
        ] {
            assert!(
                text.lines().any(|l| l == expected),
                "{expected} in:\n{text}"
            );
        }
    }
}
