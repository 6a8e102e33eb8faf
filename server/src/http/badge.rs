//! `GET /badges/<agent>.svg`: the deployed commit and its state, where people already look.
//! Private unless the agent's config says `badge: public`: a private badge is served only at
//! its unguessable `/badges/<agent>/<key>.svg`. No token is taken, in the query string least
//! of all: proxies and GitLab's badge settings would log it.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use greenlight::v1::{Phase, StatusReport};

use super::HttpState;
use crate::engine::EngineError;

/// A badge's colour and text, decided from the agent's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Badge {
    pub message: String,
    pub color: &'static str,
}

/// The badge of an agent: paused grey, healthy green, applying blue, failed red.
pub fn badge_for(paused: bool, report: Option<&StatusReport>) -> Badge {
    let Some(report) = report else {
        let message = if paused { "paused" } else { "no deploy yet" };
        return Badge {
            message: message.into(),
            color: "#9f9f9f",
        };
    };
    let short = &report.revision[..report.revision.len().min(8)];
    let (state, color) = match report.phase() {
        _ if paused => ("paused", "#9f9f9f"),
        Phase::Healthy => ("healthy", "#4c1"),
        Phase::Applying | Phase::Applied => ("applying", "#007ec6"),
        Phase::Failed => ("failed", "#e05d44"),
        Phase::Degraded => ("degraded", "#e05d44"),
        Phase::Unspecified => ("unknown", "#9f9f9f"),
    };
    Badge {
        message: format!("{short} {state}"),
        color,
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A flat badge in the shields.io layout; widths estimated from the character count.
pub fn render(label: &str, badge: &Badge) -> String {
    let width = |text: &str| 10 + 7 * text.chars().count();
    let (left, right) = (width(label), width(&badge.message));
    let total = left + right;
    let (label, message) = (escape(label), escape(&badge.message));
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="20" role="img" aria-label="{label}: {message}"><title>{label}: {message}</title><rect width="{left}" height="20" fill="#555"/><rect x="{left}" width="{right}" height="20" fill="{color}"/><g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" font-size="11"><text x="{lx}" y="14">{label}</text><text x="{rx}" y="14">{message}</text></g></svg>"##,
        color = badge.color,
        lx = left / 2,
        rx = left + right / 2,
    )
}

/// Unknown agents, private badges without their key and wrong keys all get this, so that
/// neither names nor keys can be probed.
fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "no such badge: a private badge is served at the URL `greenlightctl badge-url <agent>` prints",
    )
        .into_response()
}

/// Serves the badge of the agent named in the path (`<agent>.svg`), if public.
pub async fn serve_public(State(state): State<HttpState>, Path(file): Path<String>) -> Response {
    match file.strip_suffix(".svg") {
        Some(name) => serve(&state, name, None).await,
        None => not_found(),
    }
}

/// Serves the badge at `/badges/<agent>/<key>.svg`.
pub async fn serve_keyed(
    State(state): State<HttpState>,
    Path((name, file)): Path<(String, String)>,
) -> Response {
    match file.strip_suffix(".svg") {
        Some(key) => serve(&state, &name, Some(key)).await,
        None => not_found(),
    }
}

async fn serve(state: &HttpState, name: &str, key: Option<&str>) -> Response {
    if !state.engine.catalog().badge_visible(name, key) {
        return not_found();
    }
    let unavailable =
        |error: EngineError| (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response();
    let report = match state.engine.last_report(name).await {
        Ok(report) => report,
        Err(error) => return unavailable(error),
    };
    let paused = match state.engine.gate_of(name).await {
        Ok(gate) => gate.paused.is_some(),
        Err(error) => return unavailable(error),
    };
    let svg = render(name, &badge_for(paused, report.as_ref()));
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "no-cache, max-age=0"),
        ],
        svg,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(phase: Phase) -> StatusReport {
        StatusReport {
            revision: "1234567890abcdef".repeat(2) + "12345678",
            phase: phase.into(),
            ..Default::default()
        }
    }

    #[test]
    fn colours_follow_the_state() {
        assert_eq!(
            badge_for(false, Some(&report(Phase::Healthy))),
            Badge {
                message: "12345678 healthy".into(),
                color: "#4c1"
            }
        );
        assert_eq!(
            badge_for(false, Some(&report(Phase::Applying))).color,
            "#007ec6"
        );
        assert_eq!(
            badge_for(false, Some(&report(Phase::Failed))).color,
            "#e05d44"
        );
        assert_eq!(
            badge_for(true, Some(&report(Phase::Healthy))).message,
            "12345678 paused"
        );
        assert_eq!(badge_for(false, None).message, "no deploy yet");
    }

    #[test]
    fn svg_escapes_text() {
        let svg = render(
            "a<b",
            &Badge {
                message: "x&y".into(),
                color: "#4c1",
            },
        );
        assert!(svg.contains("a&lt;b") && svg.contains("x&amp;y"));
        assert!(svg.starts_with("<svg"));
    }
}
