//! The agent's Prometheus metrics and its probe endpoints, served on `--metrics-listen`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::get;
use greenlight::v1::{Phase, StatusReport, object_result::Action};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// What `/metrics` serves: OpenMetrics, which is what [`encode`] writes (a counter's samples
/// end in `_total`, which Prometheus's older text format would not attribute to it).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels: one name, one value.
pub type Labels = Vec<(&'static str, &'static str)>;

/// Seconds, from a reconcile that writes nothing (milliseconds) to a long rollout (the
/// default health timeout is 5 minutes).
const APPLY_BUCKETS: [f64; 16] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0,
];

/// What the agent counts.
pub struct AgentMetrics {
    registry: Registry,
    /// Reconciles by `result`: healthy, degraded, failed, stopped.
    pub applies: Family<Labels, Counter>,
    /// Seconds from the start of a reconcile to its outcome.
    pub apply_duration: Histogram,
    /// Objects by `action`: applied, unchanged, pruned, failed.
    pub objects: Family<Labels, Counter>,
    /// Reconciles woken by a watched object someone else changed.
    pub drift_corrections: Counter,
    /// Seconds spent waiting for health.
    pub health_wait: Histogram,
    /// Connections to the server after the first.
    pub reconnects: Counter,
    /// 1 while this replica holds the Lease.
    pub leader: Gauge,
    /// Connected to the server at least once: what `/readyz` says.
    connected: AtomicBool,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("greenlight_agent");
        let applies = Family::<Labels, Counter>::default();
        registry.register("applies", "Reconciles by result", applies.clone());
        let apply_duration = Histogram::new(APPLY_BUCKETS);
        registry.register(
            "apply_duration_seconds",
            "Seconds from the start of a reconcile to its outcome",
            apply_duration.clone(),
        );
        let objects = Family::<Labels, Counter>::default();
        registry.register("objects", "Objects by action", objects.clone());
        let drift_corrections = Counter::default();
        registry.register(
            "drift_corrections",
            "Reconciles woken by an object someone else changed",
            drift_corrections.clone(),
        );
        let health_wait = Histogram::new(APPLY_BUCKETS);
        registry.register(
            "health_wait_seconds",
            "Seconds spent waiting for health",
            health_wait.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "reconnects",
            "Connections to the server after the first",
            reconnects.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the Lease",
            leader.clone(),
        );
        Self {
            registry,
            applies,
            apply_duration,
            objects,
            drift_corrections,
            health_wait,
            reconnects,
            leader,
            connected: AtomicBool::new(false),
        }
    }
}

impl AgentMetrics {
    /// Counts one reconcile ending with `result`.
    pub fn applied(&self, result: &'static str, seconds: f64) {
        self.applies.get_or_create(&vec![("result", result)]).inc();
        self.apply_duration.observe(seconds);
    }

    /// Counts one object's `action`.
    pub fn object(&self, action: &'static str) {
        self.objects.get_or_create(&vec![("action", action)]).inc();
    }

    /// Counts the objects of `report` by what the apply did to them, once per apply: from
    /// the report that ends it, `Applied` or `Failed` (later health reports repeat objects).
    pub fn reported(&self, report: &StatusReport) {
        if !matches!(report.phase(), Phase::Applied | Phase::Failed) {
            return;
        }
        for object in &report.objects {
            self.object(match object.action() {
                Action::Applied => "applied",
                Action::Pruned => "pruned",
                Action::Failed => "failed",
                _ => "unchanged",
            });
        }
    }

    /// Records a connection to the server; all but the first are reconnects.
    pub fn connected(&self) {
        if self.connected.swap(true, Ordering::AcqRel) {
            self.reconnects.inc();
        }
    }

    /// The metrics in Prometheus's text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// Serves `/metrics`, `/healthz` (the process runs) and `/readyz` (it reached the server)
/// on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<AgentMetrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<AgentMetrics>>| async move {
                ([(header::CONTENT_TYPE, CONTENT_TYPE)], m.render())
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<AgentMetrics>>| async move {
                if m.connected.load(Ordering::Acquire) {
                    (StatusCode::OK, "ready")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not connected to the server yet",
                    )
                }
            }),
        )
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_what_was_counted() {
        let metrics = AgentMetrics::default();
        metrics.applied("healthy", 0.3);
        metrics.object("applied");
        metrics.connected();
        metrics.connected();
        metrics.leader.set(1);
        let text = metrics.render();
        assert!(
            text.contains("greenlight_agent_applies_total{result=\"healthy\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("greenlight_agent_objects_total{action=\"applied\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("greenlight_agent_reconnects_total 1"),
            "{text}"
        );
        assert!(text.contains("greenlight_agent_leader 1"), "{text}");
        assert!(
            text.contains("greenlight_agent_apply_duration_seconds_bucket"),
            "{text}"
        );
    }

    fn report(phase: Phase, actions: &[Action]) -> StatusReport {
        let mut report = StatusReport::default();
        report.set_phase(phase);
        report.objects = actions
            .iter()
            .map(|action| {
                let mut object = greenlight::v1::ObjectResult::default();
                object.set_action(*action);
                object
            })
            .collect();
        report
    }

    #[test]
    fn objects_are_counted_from_the_report_that_ends_an_apply_failed_ones_included() {
        let metrics = AgentMetrics::default();
        let count = |action: &str| {
            let sample = format!("greenlight_agent_objects_total{{action=\"{action}\"}} ");
            metrics
                .render()
                .lines()
                .find_map(|l| l.strip_prefix(sample.as_str()).map(str::to_owned))
                .unwrap_or_else(|| "0".to_owned())
        };
        // An apply that failed: one object written before another was refused.
        metrics.reported(&report(Phase::Failed, &[Action::Applied, Action::Failed]));
        assert_eq!(count("failed"), "1");
        assert_eq!(count("applied"), "1");
        // A successful apply, then its health reports, which repeat objects.
        let done = [Action::Applied, Action::Unchanged, Action::Pruned];
        metrics.reported(&report(Phase::Applied, &done));
        metrics.reported(&report(Phase::Degraded, &done));
        metrics.reported(&report(Phase::Healthy, &done));
        metrics.reported(&report(Phase::Applying, &done));
        assert_eq!(count("applied"), "2");
        assert_eq!(count("unchanged"), "1");
        assert_eq!(count("pruned"), "1");
        assert_eq!(count("failed"), "1");
    }
}
