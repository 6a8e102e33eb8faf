//! Human and JSON output.

use crate::v1::{AgentStatus, GetAgentHistoryResponse, Phase, RevisionState, StatusReport};
use clap::ValueEnum;
use serde_json::{Value, json};

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
}

/// The first 8 characters of a commit id.
pub fn short(sha: &str) -> &str {
    // By characters: the input may be anything a user typed.
    match sha.char_indices().nth(8) {
        Some((end, _)) => &sha[..end],
        None => sha,
    }
}

fn phase(phase: Phase) -> &'static str {
    match phase {
        Phase::Applying => "applying",
        Phase::Applied => "applied",
        Phase::Failed => "failed",
        Phase::Healthy => "healthy",
        Phase::Degraded => "degraded",
        Phase::Unspecified => "unknown",
    }
}

fn report_json(report: &StatusReport) -> Value {
    json!({
        "revision": report.revision,
        "phase": phase(report.phase()),
        "message": report.message,
        "objects_done": report.objects_done,
        "objects_total": report.objects_total,
        "received_at_unix_ms": report.received_at_unix_ms,
        "objects": report.objects.iter().map(|o| json!({
            "api_version": o.api_version, "kind": o.kind, "namespace": o.namespace, "name": o.name,
            "action": o.action().as_str_name(), "message": o.message,
        })).collect::<Vec<_>>(),
    })
}

fn status_json(status: &AgentStatus) -> Value {
    json!({
        "name": status.name,
        "project": status.project,
        "ref": status.r#ref,
        "mode": status.mode().as_str_name(),
        "connected": status.connected,
        "replica": status.replica,
        "desired": status.desired.as_ref().map(|d| json!({
            "sha": d.sha, "pipeline_id": d.pipeline_id, "reason": d.reason, "generation": d.generation,
        })),
        "applied_revision": status.applied_revision,
        "last_report": status.last_report.as_ref().map(report_json),
        "paused": status.paused.as_ref().map(|h| json!({"reason": h.reason, "since_unix_ms": h.since_unix_ms})),
        "pinned": status.pinned.as_ref().map(|h| json!({"sha": h.sha, "reason": h.reason, "since_unix_ms": h.since_unix_ms})),
        "last_decision": status.last_decision.as_ref().map(|d| json!({
            "outcome": d.outcome().as_str_name(), "sha": d.sha, "reason": d.reason,
        })),
        "sync_error": status.sync_error,
    })
}

/// Prints the agent list.
pub fn agents(format: Format, agents: &[AgentStatus]) {
    match format {
        Format::Json => println!("{}", Value::Array(agents.iter().map(status_json).collect())),
        Format::Human => {
            println!(
                "{:<20} {:<10} {:<10} {:<10} {:<10}",
                "AGENT", "CONNECTED", "DESIRED", "APPLIED", "HEALTH"
            );
            for agent in agents {
                let desired = agent.desired.as_ref().map_or("-", |d| short(&d.sha));
                let applied = if agent.applied_revision.is_empty() {
                    "-"
                } else {
                    short(&agent.applied_revision)
                };
                let health = agent.last_report.as_ref().map_or("-", |r| phase(r.phase()));
                println!(
                    "{:<20} {:<10} {:<10} {:<10} {:<10}",
                    agent.name, agent.connected, desired, applied, health
                );
            }
        }
    }
}

/// Prints one agent.
pub fn status(format: Format, status: &AgentStatus) {
    if format == Format::Json {
        println!("{}", status_json(status));
        return;
    }
    println!(
        "agent:     {} ({}@{}, {} mode)",
        status.name,
        status.project,
        status.r#ref,
        status
            .mode()
            .as_str_name()
            .trim_start_matches("GATE_MODE_")
            .to_lowercase()
    );
    println!(
        "connected: {}{}",
        status.connected,
        if status.replica.is_empty() {
            String::new()
        } else {
            format!(" (replica {})", status.replica)
        }
    );
    match &status.desired {
        Some(d) => println!("desired:   {} ({})", short(&d.sha), d.reason),
        None => println!("desired:   none yet"),
    }
    println!(
        "applied:   {}",
        if status.applied_revision.is_empty() {
            "none yet"
        } else {
            short(&status.applied_revision)
        }
    );
    if let Some(report) = &status.last_report {
        println!(
            "health:    {} {} {}",
            phase(report.phase()),
            short(&report.revision),
            report.message
        );
    }
    if let Some(hold) = &status.paused {
        println!("paused:    {}", hold.reason);
    }
    if let Some(pin) = &status.pinned {
        println!("pinned:    {} ({})", short(&pin.sha), pin.reason);
    }
    if let Some(decision) = &status.last_decision {
        let sha = if decision.sha.is_empty() {
            String::new()
        } else {
            format!("{} ", short(&decision.sha))
        };
        println!("decision:  {sha}{}", decision.reason);
    }
    if !status.sync_error.is_empty() {
        println!("error:     {}", status.sync_error);
    }
}

/// Prints reports and decisions.
pub fn history(format: Format, history: &GetAgentHistoryResponse) {
    if format == Format::Json {
        let decisions: Vec<Value> = history
            .decisions
            .iter()
            .map(|d| json!({"outcome": d.outcome().as_str_name(), "sha": d.sha, "reason": d.reason, "at_unix_ms": d.at_unix_ms}))
            .collect();
        println!(
            "{}",
            json!({"reports": history.reports.iter().map(report_json).collect::<Vec<_>>(), "decisions": decisions})
        );
        return;
    }
    println!("REPORTS (newest first)");
    for report in &history.reports {
        println!(
            "  {} {:<9} {}",
            short(&report.revision),
            phase(report.phase()),
            report.message
        );
    }
    println!("DECISIONS (newest first)");
    for decision in &history.decisions {
        let outcome = decision
            .outcome()
            .as_str_name()
            .trim_start_matches("OUTCOME_")
            .to_lowercase();
        println!(
            "  {:<8} {:<8} {}",
            outcome,
            short(&decision.sha),
            decision.reason
        );
    }
}

/// One JSON line for a wait update.
pub fn state_json(state: &RevisionState) -> Value {
    json!({
        "state": state.state().as_str_name().trim_start_matches("STATE_").to_lowercase(),
        "message": state.message,
        "deployed_sha": state.deployed_sha,
        "objects_done": state.objects_done,
        "objects_total": state.objects_total,
    })
}

/// The URL of a badge.
pub fn badge_url(format: Format, url: &str) {
    match format {
        Format::Human => println!("{url}"),
        Format::Json => println!("{}", json!({ "url": url })),
    }
}

/// Prints a merge request preview: the verdict, the counts and the diff.
pub fn preview(format: Format, preview: &crate::v1::Preview) {
    use crate::preview::{Counts, render_diff, verdict};
    let counts = Counts::of(preview);
    match format {
        Format::Json => {
            let objects: Vec<Value> = preview
                .objects
                .iter()
                .map(|o| {
                    json!({
                        "api_version": o.api_version, "kind": o.kind, "namespace": o.namespace,
                        "name": o.name, "change": o.change().as_str_name(), "message": o.message,
                        "fields": o.fields.iter().map(|f| json!({
                            "path": f.path, "before": f.before, "after": f.after, "redacted": f.redacted,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            println!(
                "{}",
                json!({
                    "agent": preview.agent, "sha": preview.sha, "project": preview.project,
                    "merge_request_iid": preview.merge_request_iid,
                    "outcome": preview.outcome().as_str_name(), "reason": preview.reason,
                    "create": counts.create, "update": counts.update, "prune": counts.prune,
                    "refused": counts.refused, "unchanged": counts.unchanged,
                    "truncated": preview.truncated, "objects": objects,
                })
            );
        }
        Format::Human => {
            println!(
                "greenlight/{} preview of {} (merge request !{})",
                preview.agent,
                short(&preview.sha),
                preview.merge_request_iid
            );
            println!("{}", verdict(preview));
            println!("{counts}");
            let diff = render_diff(preview);
            if !diff.is_empty() {
                println!();
                print!("{diff}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_never_splits_a_character() {
        assert_eq!(short("aéééééééééé"), "aééééééé");
        assert_eq!(short("abc"), "abc");
        assert_eq!(short(&"f".repeat(40)), "ffffffff");
    }
}
