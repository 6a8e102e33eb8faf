//! The agent's Prometheus metrics and its probe endpoints, served on `--metrics-listen`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Labels: one name, one value.
pub type Labels = Vec<(&'static str, &'static str)>;

/// Seconds, from a fast apply to a long rollout.
const APPLY_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
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
            get(|State(m): State<Arc<AgentMetrics>>| async move { m.render() }),
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
}
