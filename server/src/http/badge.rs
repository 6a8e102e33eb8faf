//! `GET /badges/<agent>.svg`: the deployed commit and its state, where people already look.
//! Private unless the agent's config says `badge: public`.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use greenlight::v1::{Phase, StatusReport};
use serde::Deserialize;

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

#[derive(Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

/// Serves the badge of the agent named in the path (`<agent>.svg`).
pub async fn serve(
    State(state): State<HttpState>,
    Path(file): Path<String>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    let Some(name) = file.strip_suffix(".svg") else {
        return (
            StatusCode::NOT_FOUND,
            "badges are served as /badges/<agent>.svg",
        )
            .into_response();
    };
    let catalog = state.engine.catalog();
    // Unknown and private agents get the same answer, so names cannot be probed.
    let unauthorized = || {
        let message =
            "this badge is private: pass ?token=<admin or CI token>, or set `badge: public`";
        (StatusCode::UNAUTHORIZED, message).into_response()
    };
    let token = query.token.as_deref().or_else(|| {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
    });
    let Some(agent) = catalog.agent(name) else {
        return unauthorized();
    };
    let allowed = agent.badge_public
        || token.is_some_and(|token| {
            state
                .admin_token
                .as_ref()
                .is_some_and(|admin| admin.matches(token))
                || agent.ci_token.as_ref().is_some_and(|ci| ci.matches(token))
        });
    if !allowed {
        return unauthorized();
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
