//! The HTTP listener: GitLab webhooks, health probes and metrics.

mod badge;
pub mod gitlab;
mod page;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};

use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::trust::WebhookSecrets;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub engine: Arc<Engine>,
    /// Merge request previews: requested by webhooks, shown on the status page.
    pub previews: Arc<crate::preview::Previews>,
    pub webhook_secrets: WebhookSecrets,
    pub metrics: Arc<Metrics>,
    /// GitLab's base URL (`gitlab.url`), for links to commits; none when unset.
    pub gitlab_url: Option<String>,
}

/// The HTTP routes.
pub fn router(state: HttpState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/webhooks/gitlab", post(gitlab::receive))
        .route("/badges/{file}", get(badge::serve_public))
        .route("/badges/{agent}/{file}", get(badge::serve_keyed))
        .route("/agents/{agent}", get(page::serve_public))
        .route("/agents/{agent}/{key}", get(page::serve_keyed))
        .route("/agents/{agent}/previews/{sha}", get(page::serve_preview))
        .route(
            "/agents/{agent}/{key}/previews/{sha}",
            get(page::serve_keyed_preview),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn ready(State(state): State<HttpState>) -> impl IntoResponse {
    if !state.engine.evaluator().leases_tried() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: taking the leases of the shards this replica evaluates".to_owned(),
        );
    }
    match tokio::time::timeout(Duration::from_secs(2), state.engine.store().ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready".to_owned()),
        Ok(Err(error)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unavailable: {error}"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "store did not answer within 2s".to_owned(),
        ),
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    match state.metrics.encode(state.engine.mirrors().stats()) {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "cannot encode metrics".to_owned(),
        ),
    }
}
