//! What the fuzz targets share: how a target's bytes become a webhook delivery.

use greenlight_server::http::gitlab::{AgentNames, header, parse_event};
use http::{HeaderMap, HeaderName, HeaderValue};

/// 2026-12-01 00:00 UTC: a fixed "now", so that a run does not depend on the clock.
pub const NOW_MS: i64 = 1_796_083_200_000;

/// The configured agents a pipeline's jobs may name.
pub struct Agents;

impl AgentNames for Agents {
    fn is_agent(&self, name: &str) -> bool {
        matches!(name, "staging" | "prod")
    }
}

/// Reads `data` as an HTTP request reads: `Name: value` lines up to the first empty line,
/// then the body. Without an empty line, all of `data` is the body. Lines that are no valid
/// header are dropped, as the HTTP server would have refused them.
pub fn delivery(data: &[u8]) -> (HeaderMap, &[u8]) {
    let mut headers = HeaderMap::new();
    let Some(end) = data.windows(2).position(|w| w == b"\n\n") else {
        return (headers, data);
    };
    for line in data[..end].split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    (headers, &data[end + 2..])
}

/// One delivery through the webhook's pure steps: the headers it reads, then the body parsed
/// as the event its `X-Gitlab-Event` names, or as `default_event` when it names none.
pub fn webhook(data: &[u8], default_event: &str) {
    let (headers, body) = delivery(data);
    let _ = header(&headers, "x-gitlab-token");
    let _ = header(&headers, "idempotency-key").or_else(|| header(&headers, "x-gitlab-event-uuid"));
    let event = header(&headers, "x-gitlab-event").unwrap_or(default_event);
    if let Ok(Ok(fact)) = parse_event(event, body, NOW_MS, &Agents) {
        assert!(
            fact.project_path.is_some() || fact.project_id.is_some(),
            "a fact names its project: {fact:?}"
        );
    }
    if let Ok(Some(trigger)) = greenlight_server::http::gitlab::parse_preview(event, body) {
        assert!(
            trigger.project_path.is_some() || trigger.project_id.is_some(),
            "a preview trigger names its project: {trigger:?}"
        );
        assert_eq!(trigger.sha.len(), 40, "a full head sha: {trigger:?}");
    }
}
