//! `GET /agents/<agent>`: an agent's status page, server-rendered HTML without JavaScript.
//!
//! The same access rules as the badge: a public agent's page answers at `/agents/<agent>`, a
//! private one's only at `/agents/<agent>/<key>`, with the key of its badge URL
//! (`greenlightctl badge-url`); unknown agents and private ones without their key answer
//! alike. It reads what `GetAgent` and `GetAgentHistory` read, through the same functions,
//! turns that into a [`PageView`] and renders it: both steps are pure and tested as data.

use std::fmt::Write as _;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use greenlight::v1::{self, Phase, StatusReport, decision::Outcome, object_result::Action};

use super::HttpState;
use crate::clock::now_ms;
use crate::engine::EngineError;
use crate::grpc::AdminApi;

/// Decisions the page lists, newest first.
const DECISIONS_SHOWN: usize = 20;

/// A commit as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRef {
    pub sha: String,
    /// Its page in GitLab, when `gitlab.url` is set and the project is named by its path.
    pub url: Option<String>,
}

/// How a state is coloured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Good,
    Busy,
    Bad,
    Muted,
}

impl Tone {
    fn class(self) -> &'static str {
        match self {
            Tone::Good => "good",
            Tone::Busy => "busy",
            Tone::Bad => "bad",
            Tone::Muted => "muted",
        }
    }
}

/// The revision the gate wants on the agent, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredView {
    pub commit: CommitRef,
    pub pipeline_id: Option<u64>,
    pub reason: String,
    pub decided_at_ms: i64,
}

/// A pause or a pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldView {
    pub reason: String,
    pub since_ms: i64,
    /// The pinned commit; none for a pause.
    pub commit: Option<CommitRef>,
}

/// The agent's newest report, whatever its phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportView {
    pub commit: CommitRef,
    pub phase: &'static str,
    pub tone: Tone,
    pub message: String,
    pub objects_done: u32,
    pub objects_total: u32,
    pub received_at_ms: i64,
}

/// One gate decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionRow {
    pub at_ms: i64,
    pub outcome: &'static str,
    pub tone: Tone,
    pub commit: Option<CommitRef>,
    pub pipeline_id: Option<u64>,
    pub reason: String,
}

/// One object of the last apply: what the apply did to it and how its rollout went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRow {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub result: &'static str,
    pub result_tone: Tone,
    pub health: &'static str,
    pub health_tone: Tone,
    pub detail: String,
}

/// The last apply that ended, with its health when the agent reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyView {
    pub commit: CommitRef,
    pub generation: u64,
    pub phase: &'static str,
    pub tone: Tone,
    pub message: String,
    pub at_ms: i64,
    pub objects: Vec<ObjectRow>,
}

/// Everything the page shows, already decided: rendering only formats and escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageView {
    pub agent: String,
    pub project: String,
    pub branch: String,
    pub mode: &'static str,
    pub connected: bool,
    pub desired: Option<DesiredView>,
    pub applied: Option<CommitRef>,
    pub last_report: Option<ReportView>,
    pub paused: Option<HoldView>,
    pub pinned: Option<HoldView>,
    pub sync_error: Option<String>,
    pub decisions: Vec<DecisionRow>,
    pub last_apply: Option<ApplyView>,
    /// The newest merge request previews, newest first (filled in by the handler).
    pub previews: Vec<PreviewRow>,
    pub now_ms: i64,
}

/// One merge request preview on the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewRow {
    pub commit: CommitRef,
    pub merge_request_iid: u64,
    pub verdict: String,
    pub tone: Tone,
    pub counts: String,
    pub received_at_ms: i64,
    /// The full preview, relative to this page's URL.
    pub link: String,
}

/// The rows of `previews`, linking to the full previews under `page_path`.
pub fn preview_rows(
    previews: &[v1::Preview],
    gitlab_url: Option<&str>,
    page_path: &str,
) -> Vec<PreviewRow> {
    previews
        .iter()
        .map(|p| PreviewRow {
            commit: CommitRef {
                sha: p.sha.clone(),
                url: commit_url(gitlab_url, &p.project, &p.sha),
            },
            merge_request_iid: p.merge_request_iid,
            verdict: greenlight::preview::verdict(p),
            tone: if p.outcome() == v1::preview::Outcome::Clean {
                Tone::Good
            } else {
                Tone::Bad
            },
            counts: greenlight::preview::Counts::of(p).to_string(),
            received_at_ms: p.received_at_unix_ms,
            link: format!("{page_path}/previews/{}", p.sha),
        })
        .collect()
}

/// GitLab's page of `sha` in `project`: only for a project named by its path, since a
/// numeric id has no web URL of its own.
pub fn commit_url(gitlab_url: Option<&str>, project: &str, sha: &str) -> Option<String> {
    let base = gitlab_url?.trim_end_matches('/');
    let by_id = project.bytes().all(|b| b.is_ascii_digit());
    if by_id || project.is_empty() || sha.is_empty() {
        return None;
    }
    Some(format!("{base}/{project}/-/commit/{sha}"))
}

fn phase_label(phase: Phase) -> (&'static str, Tone) {
    match phase {
        Phase::Applying => ("applying", Tone::Busy),
        Phase::Applied => ("applied, rolling out", Tone::Busy),
        Phase::Healthy => ("healthy", Tone::Good),
        Phase::Failed => ("failed", Tone::Bad),
        Phase::Degraded => ("degraded", Tone::Bad),
        Phase::Unspecified => ("unknown", Tone::Muted),
    }
}

fn action_label(action: Action) -> (&'static str, Tone) {
    match action {
        Action::Applied => ("applied", Tone::Good),
        Action::Unchanged => ("unchanged", Tone::Muted),
        Action::Pruned => ("pruned", Tone::Muted),
        Action::Failed => ("failed", Tone::Bad),
        Action::Healthy => ("healthy", Tone::Good),
        Action::NotHealthy => ("not healthy", Tone::Bad),
        Action::Unspecified => ("unknown", Tone::Muted),
    }
}

fn mode_label(mode: v1::GateMode) -> &'static str {
    match mode {
        v1::GateMode::Pipeline => "pipeline",
        v1::GateMode::Immediate => "immediate",
        v1::GateMode::Manual => "manual",
        v1::GateMode::Unspecified => "unknown",
    }
}

/// The page of the agent `status` describes, from `GetAgent`'s and `GetAgentHistory`'s
/// answers; commits link to GitLab at `gitlab_url` when set.
pub fn view(
    status: &v1::AgentStatus,
    history: &v1::GetAgentHistoryResponse,
    gitlab_url: Option<&str>,
    now_ms: i64,
) -> PageView {
    let commit = |sha: &str| CommitRef {
        sha: sha.to_owned(),
        url: commit_url(gitlab_url, &status.project, sha),
    };
    let non_empty = |text: &str| (!text.is_empty()).then(|| text.to_owned());
    let last_apply = last_apply(&history.reports, commit);
    PageView {
        previews: Vec::new(),
        agent: status.name.clone(),
        project: status.project.clone(),
        branch: status.r#ref.clone(),
        mode: mode_label(status.mode()),
        connected: status.connected,
        desired: status.desired.as_ref().map(|d| DesiredView {
            commit: commit(&d.sha),
            pipeline_id: d.pipeline_id,
            reason: d.reason.clone(),
            decided_at_ms: d.decided_at_unix_ms,
        }),
        applied: non_empty(&status.applied_revision).map(|sha| commit(&sha)),
        last_report: status.last_report.as_ref().map(|r| {
            let (phase, tone) = phase_label(r.phase());
            // Said once, under the last apply, when that is what the report is about.
            let repeated = last_apply.as_ref().is_some_and(|apply| {
                (apply.commit.sha.as_str(), apply.message.as_str())
                    == (r.revision.as_str(), r.message.as_str())
            });
            ReportView {
                commit: commit(&r.revision),
                phase,
                tone,
                message: if repeated {
                    String::new()
                } else {
                    r.message.clone()
                },
                objects_done: r.objects_done,
                objects_total: r.objects_total,
                received_at_ms: r.received_at_unix_ms,
            }
        }),
        paused: status.paused.as_ref().map(|h| HoldView {
            reason: h.reason.clone(),
            since_ms: h.since_unix_ms,
            commit: None,
        }),
        pinned: status.pinned.as_ref().map(|h| HoldView {
            reason: h.reason.clone(),
            since_ms: h.since_unix_ms,
            commit: non_empty(&h.sha).map(|sha| commit(&sha)),
        }),
        sync_error: non_empty(&status.sync_error),
        decisions: history
            .decisions
            .iter()
            .take(DECISIONS_SHOWN)
            .map(|d| {
                let (outcome, tone) = match d.outcome() {
                    Outcome::Deploy => ("deploy", Tone::Good),
                    Outcome::Hold => ("hold", Tone::Busy),
                    Outcome::Skip => ("skip", Tone::Muted),
                    Outcome::Unspecified => ("unknown", Tone::Muted),
                };
                DecisionRow {
                    at_ms: d.at_unix_ms,
                    outcome,
                    tone,
                    commit: non_empty(&d.sha).map(|sha| commit(&sha)),
                    pipeline_id: d.pipeline_id,
                    reason: d.reason.clone(),
                }
            })
            .collect(),
        last_apply,
        now_ms,
    }
}

/// The newest apply that ended, from `reports` (newest first). The agent reports an apply's
/// object results when it ends (`applied` or `failed`), then its health: `healthy` without
/// objects, or `degraded` listing those that are not; objects it does not list are healthy.
fn last_apply(reports: &[StatusReport], commit: impl Fn(&str) -> CommitRef) -> Option<ApplyView> {
    let ended = |r: &StatusReport| !matches!(r.phase(), Phase::Applying | Phase::Unspecified);
    let anchor = reports.iter().find(|r| ended(r))?;
    let same = |r: &&StatusReport| {
        r.revision == anchor.revision && r.generation == anchor.generation && ended(r)
    };
    let position = |phases: &[Phase]| {
        reports
            .iter()
            .enumerate()
            .filter(|(_, r)| same(r))
            .find(|(_, r)| phases.contains(&r.phase()))
    };
    let applied = position(&[Phase::Applied, Phase::Failed]);
    // Health reported before the newest apply of the same revision is that of an older one.
    let health = position(&[Phase::Healthy, Phase::Degraded])
        .filter(|(at, _)| applied.is_none_or(|(applied_at, _)| at < &applied_at))
        .map(|(_, r)| r);
    let applied = applied.map(|(_, r)| r);
    let newest = health.or(applied).unwrap_or(anchor);
    let (phase, tone) = phase_label(newest.phase());

    let unhealthy = |object: &v1::ObjectResult| {
        health.and_then(|h| {
            h.objects.iter().find(|o| {
                (&o.api_version, &o.kind, &o.namespace, &o.name)
                    == (
                        &object.api_version,
                        &object.kind,
                        &object.namespace,
                        &object.name,
                    )
            })
        })
    };
    let mut objects = Vec::new();
    for object in applied.map(|r| r.objects.as_slice()).unwrap_or_default() {
        let (result, result_tone) = action_label(object.action());
        let not_healthy = unhealthy(object);
        let (health_label, health_tone) = match (object.action(), health, not_healthy) {
            (Action::Failed | Action::Pruned, _, _) => ("", Tone::Muted),
            (_, _, Some(_)) => ("not healthy", Tone::Bad),
            (_, Some(_), None) => ("healthy", Tone::Good),
            (_, None, None) if applied.is_some_and(|r| r.phase() == Phase::Failed) => {
                ("", Tone::Muted)
            }
            (_, None, None) => ("rolling out", Tone::Busy),
        };
        let detail = [object.message.as_str()]
            .into_iter()
            .chain(not_healthy.map(|o| o.message.as_str()))
            .filter(|m| !m.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        objects.push(ObjectRow {
            kind: object.kind.clone(),
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            result,
            result_tone,
            health: health_label,
            health_tone,
            detail,
        });
    }
    // Objects only the health report names (one being deleted, or an apply older than the
    // reports kept).
    for object in health.map(|r| r.objects.as_slice()).unwrap_or_default() {
        let listed = objects.iter().any(|row| {
            (&row.kind, &row.namespace, &row.name)
                == (&object.kind, &object.namespace, &object.name)
        });
        if !listed {
            let (health_label, health_tone) = action_label(object.action());
            objects.push(ObjectRow {
                kind: object.kind.clone(),
                namespace: object.namespace.clone(),
                name: object.name.clone(),
                result: "",
                result_tone: Tone::Muted,
                health: health_label,
                health_tone,
                detail: object.message.clone(),
            });
        }
    }
    Some(ApplyView {
        commit: commit(&anchor.revision),
        generation: anchor.generation,
        phase,
        tone,
        message: newest.message.clone(),
        at_ms: newest.received_at_unix_ms,
        objects,
    })
}

/// `text` safe in HTML text and in quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `ms` as `2026-11-26 10:00:00 UTC`; a dash for none, or for a time past any clock's.
fn timestamp(ms: i64) -> String {
    match crate::clock::rfc3339(ms).filter(|_| ms > 0) {
        Some(time) => time.replace('T', " ").replace('Z', " UTC"),
        None => "—".to_owned(),
    }
}

/// How long before `now` the time `at` was, roughly.
fn ago(now: i64, at: i64) -> String {
    if at <= 0 {
        return String::new();
    }
    let seconds = (now - at).max(0) / 1000;
    match seconds {
        0..60 => format!("{seconds} s ago"),
        60..3600 => format!("{} min ago", seconds / 60),
        3600..86_400 => format!("{} h ago", seconds / 3600),
        _ => format!("{} d ago", seconds / 86_400),
    }
}

/// A `<time>` element for `at`, with how long ago it was.
fn when(now: i64, at: i64) -> String {
    if at <= 0 {
        return "—".to_owned();
    }
    format!(
        r#"<time title="{stamp}">{stamp}</time> <span class="muted">({ago})</span>"#,
        stamp = timestamp(at),
        ago = ago(now, at),
    )
}

/// A commit: its short SHA, linked to GitLab when known, the full SHA as the title.
fn commit_html(commit: &CommitRef) -> String {
    let sha = escape(&commit.sha);
    let short = escape(&commit.sha.chars().take(12).collect::<String>());
    match &commit.url {
        Some(url) => format!(
            r#"<a class="sha" href="{}" title="{sha}" rel="noreferrer">{short}</a>"#,
            escape(url)
        ),
        None => format!(r#"<code class="sha" title="{sha}">{short}</code>"#),
    }
}

fn chip(label: &str, tone: Tone) -> String {
    if label.is_empty() {
        return String::new();
    }
    format!(
        r#"<span class="chip {}">{}</span>"#,
        tone.class(),
        escape(label)
    )
}

fn pipeline_html(id: Option<u64>) -> String {
    id.map(|id| format!(" · pipeline {id}")).unwrap_or_default()
}

const STYLE: &str = "
body{font:14.5px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;color:#1f2328;background:#f6f8fa;margin:0}
main{max-width:1120px;margin:0 auto;padding:20px 28px 32px}
h1{font-size:26px;margin:0 0 2px}
h2{font-size:17px;margin:12px 0 6px}
.sub{color:#57606a;margin:0 0 14px}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:2px 18px 10px;margin-bottom:14px}
section>p{margin:6px 0 10px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;vertical-align:top;padding:5px 10px;border-bottom:1px solid #eaeef2}
thead th{font-size:13px;color:#57606a;font-weight:600;border-bottom:2px solid #d0d7de}
tbody tr:nth-child(even){background:#f9fafb}
table.facts th{width:130px;color:#57606a;font-weight:600}
table.decisions td:first-child{white-space:nowrap}
.sha{font-family:ui-monospace,'DejaVu Sans Mono',monospace;font-size:13.5px}
a.sha{color:#0969da;text-decoration:none}
a.sha:hover{text-decoration:underline}
.chip{display:inline-block;padding:1px 9px;border-radius:999px;font-size:12.5px;font-weight:600;white-space:nowrap}
.good{background:#dafbe1;color:#116329}
.busy{background:#ddf4ff;color:#0550ae}
.bad{background:#ffebe9;color:#a40e26}
.muted{color:#6e7781}
.chip.muted{background:#eaeef2}
.notice{border-left:4px solid #bf8700;background:#fff8c5;padding:8px 12px;margin:14px 0;border-radius:4px}
.notice.bad{border-color:#cf222e;background:#ffebe9;color:#1f2328}
.empty{color:#6e7781;margin:12px 0}
footer{color:#6e7781;font-size:13px}
";

/// The page `view` describes, as a complete HTML document; every string from outside is
/// escaped.
pub fn render(view: &PageView) -> String {
    let now = view.now_ms;
    let mut html = String::with_capacity(8192);
    let agent = escape(&view.agent);
    // `write!` into a String cannot fail.
    let _ = write!(
        html,
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{agent} · Greenlight</title>
<style>{STYLE}</style>
</head>
<body>
<main>
<h1>{agent}</h1>
<p class="sub">{project} · <code>{branch}</code> · gate mode {mode} · {connection}</p>
"#,
        project = escape(&view.project),
        branch = escape(&view.branch),
        mode = view.mode,
        connection = if view.connected {
            chip("connected", Tone::Good)
        } else {
            chip("not connected", Tone::Muted)
        },
    );

    if let Some(hold) = &view.paused {
        let _ = write!(
            html,
            r#"<p class="notice"><strong>Paused</strong> since {}: {}</p>"#,
            when(now, hold.since_ms),
            escape(&hold.reason)
        );
    }
    if let Some(hold) = &view.pinned {
        let _ = write!(
            html,
            r#"<p class="notice"><strong>Pinned</strong> to {} since {}: {}</p>"#,
            hold.commit.as_ref().map(commit_html).unwrap_or_default(),
            when(now, hold.since_ms),
            escape(&hold.reason)
        );
    }
    if let Some(error) = &view.sync_error {
        let _ = write!(
            html,
            r#"<p class="notice bad"><strong>Cannot deliver the desired revision:</strong> {}</p>"#,
            escape(error)
        );
    }

    html.push_str("<section><h2>Revisions</h2><table class=\"facts\"><tbody>\n");
    match &view.desired {
        Some(desired) => {
            let _ = writeln!(
                html,
                "<tr><th>Desired</th><td>{}{} · {}<br>{}</td></tr>",
                commit_html(&desired.commit),
                pipeline_html(desired.pipeline_id),
                when(now, desired.decided_at_ms),
                escape(&desired.reason),
            );
        }
        None => html.push_str("<tr><th>Desired</th><td class=\"muted\">none yet</td></tr>\n"),
    }
    let applied = view
        .applied
        .as_ref()
        .map(commit_html)
        .unwrap_or_else(|| r#"<span class="muted">nothing yet</span>"#.to_owned());
    let _ = writeln!(html, "<tr><th>Applied</th><td>{applied}</td></tr>");
    match &view.last_report {
        Some(report) => {
            let progress = if report.objects_total > 0 {
                format!(
                    " · {}/{} objects",
                    report.objects_done, report.objects_total
                )
            } else {
                String::new()
            };
            let _ = write!(
                html,
                "<tr><th>Last report</th><td>{} on {}{progress} · {}",
                chip(report.phase, report.tone),
                commit_html(&report.commit),
                when(now, report.received_at_ms),
            );
            if !report.message.is_empty() {
                let _ = write!(html, "<br>{}", escape(&report.message));
            }
            html.push_str("</td></tr>\n");
        }
        None => html.push_str("<tr><th>Last report</th><td class=\"muted\">none yet</td></tr>\n"),
    }
    let holds = match (&view.paused, &view.pinned) {
        (None, None) => "none".to_owned(),
        (paused, pinned) => [
            paused.as_ref().map(|_| "paused"),
            pinned.as_ref().map(|_| "pinned"),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", "),
    };
    let _ = writeln!(html, "<tr><th>Holds</th><td>{holds}</td></tr>");
    html.push_str("</tbody></table></section>\n");

    html.push_str("<section><h2>Last apply</h2>\n");
    match &view.last_apply {
        Some(apply) => {
            let _ = writeln!(
                html,
                "<p>{} on {} (generation {}) · {}<br>{}</p>",
                chip(apply.phase, apply.tone),
                commit_html(&apply.commit),
                apply.generation,
                when(now, apply.at_ms),
                escape(&apply.message),
            );
            if apply.objects.is_empty() {
                html.push_str("<p class=\"empty\">The report lists no objects.</p>\n");
            } else {
                html.push_str("<table class=\"objects\"><thead><tr><th>Kind</th><th>Namespace</th><th>Name</th><th>Result</th><th>Health</th><th>Detail</th></tr></thead><tbody>\n");
                for row in &apply.objects {
                    let _ = writeln!(
                        html,
                        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        escape(&row.kind),
                        escape(&row.namespace),
                        escape(&row.name),
                        chip(row.result, row.result_tone),
                        chip(row.health, row.health_tone),
                        escape(&row.detail),
                    );
                }
                html.push_str("</tbody></table>\n");
            }
        }
        None => html.push_str("<p class=\"empty\">No apply has ended yet.</p>\n"),
    }
    html.push_str("</section>\n");

    if !view.previews.is_empty() {
        html.push_str("<section><h2>Merge request previews</h2>\n");
        html.push_str("<table class=\"decisions\"><thead><tr><th>When</th><th>MR</th><th>Commit</th><th>Verdict</th><th>Changes</th></tr></thead><tbody>\n");
        for row in &view.previews {
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>!{}</td><td>{}</td><td>{} <a href=\"{}\">full preview</a></td><td>{}</td></tr>",
                when(now, row.received_at_ms),
                row.merge_request_iid,
                commit_html(&row.commit),
                chip(&row.verdict, row.tone),
                escape(&row.link),
                escape(&row.counts),
            );
        }
        html.push_str("</tbody></table></section>\n");
    }
    html.push_str("<section><h2>Decisions</h2>\n");
    if view.decisions.is_empty() {
        html.push_str("<p class=\"empty\">No decision yet.</p>\n");
    } else {
        html.push_str("<table class=\"decisions\"><thead><tr><th>When</th><th>Outcome</th><th>Commit</th><th>Pipeline</th><th>Reason</th></tr></thead><tbody>\n");
        for row in &view.decisions {
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                when(now, row.at_ms),
                chip(row.outcome, row.tone),
                row.commit.as_ref().map(commit_html).unwrap_or_default(),
                row.pipeline_id.map(|id| id.to_string()).unwrap_or_default(),
                escape(&row.reason),
            );
        }
        html.push_str("</tbody></table>\n");
    }
    html.push_str("</section>\n");
    let _ = write!(
        html,
        "<footer>Greenlight · generated {}</footer>\n</main>\n</body>\n</html>\n",
        timestamp(now)
    );
    html
}

/// Unknown agents, private ones without their key and wrong keys all get this, so that
/// neither names nor keys can be probed.
fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "no such status page: a private agent's page is at /agents/<agent>/<key>, with the key of the URL `greenlightctl badge-url <agent>` prints",
    )
        .into_response()
}

/// Previews listed on the status page.
const PREVIEWS_SHOWN: usize = 5;

/// Serves the full preview of `sha` at `/agents/<agent>/previews/<sha>` as plain text, if
/// the agent is public.
pub async fn serve_preview(
    State(state): State<HttpState>,
    Path((name, sha)): Path<(String, String)>,
) -> Response {
    serve_full_preview(&state, &name, None, &sha).await
}

/// Serves the full preview at `/agents/<agent>/<key>/previews/<sha>`.
pub async fn serve_keyed_preview(
    State(state): State<HttpState>,
    Path((name, key, sha)): Path<(String, String, String)>,
) -> Response {
    serve_full_preview(&state, &name, Some(&key), &sha).await
}

async fn serve_full_preview(
    state: &HttpState,
    name: &str,
    key: Option<&str>,
    sha: &str,
) -> Response {
    if !state.engine.catalog().badge_visible(name, key) {
        return not_found();
    }
    match state.previews.get(name, Some(sha)).await {
        Ok(Some(preview)) => {
            let text = format!(
                "greenlight/{name} preview of {sha} (merge request !{})\n{}\n{}\n\n{}",
                preview.merge_request_iid,
                greenlight::preview::verdict(&preview),
                greenlight::preview::Counts::of(&preview),
                greenlight::preview::render_diff(&preview)
            );
            (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                    (header::CACHE_CONTROL, "no-cache, max-age=0"),
                    (header::REFERRER_POLICY, "no-referrer"),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                ],
                text,
            )
                .into_response()
        }
        Ok(None) => (StatusCode::NOT_FOUND, "no preview of this commit").into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response(),
    }
}

/// Serves the page at `/agents/<agent>`, if the agent is public.
pub async fn serve_public(State(state): State<HttpState>, Path(name): Path<String>) -> Response {
    serve(&state, &name, None).await
}

/// Serves the page at `/agents/<agent>/<key>`.
pub async fn serve_keyed(
    State(state): State<HttpState>,
    Path((name, key)): Path<(String, String)>,
) -> Response {
    serve(&state, &name, Some(&key)).await
}

async fn serve(state: &HttpState, name: &str, key: Option<&str>) -> Response {
    // The badge's rule, and its key.
    if !state.engine.catalog().badge_visible(name, key) {
        return not_found();
    }
    let read = async {
        let gate = state.engine.gate_of(name).await?;
        let status = AdminApi::read_status(&state.engine, name, &gate).await?;
        let history = AdminApi::read_history(&state.engine, name, &gate).await?;
        Ok::<_, EngineError>((status, history))
    };
    let (status, history) = match read.await {
        Ok(read) => read,
        Err(error) => return (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response(),
    };
    let mut page = view(&status, &history, state.gitlab_url.as_deref(), now_ms());
    // Previews are an extra: a store that cannot list them leaves the rest of the page.
    if let Ok(previews) = state.previews.latest(name, PREVIEWS_SHOWN).await {
        let path = match key {
            Some(key) => format!("/agents/{name}/{key}"),
            None => format!("/agents/{name}"),
        };
        page.previews = preview_rows(&previews, state.gitlab_url.as_deref(), &path);
    }
    let html = render(&page);
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache, max-age=0"),
            // A private page's URL holds its key: never send it along with a link.
            (header::REFERRER_POLICY, "no-referrer"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        html,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_000_000_000;

    fn sha(c: char) -> String {
        c.to_string().repeat(40)
    }

    fn object(kind: &str, name: &str, action: Action, message: &str) -> v1::ObjectResult {
        v1::ObjectResult {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            namespace: "apps".into(),
            name: name.into(),
            action: action.into(),
            message: message.into(),
        }
    }

    fn report(revision: &str, phase: Phase, objects: Vec<v1::ObjectResult>) -> StatusReport {
        StatusReport {
            revision: revision.into(),
            phase: phase.into(),
            message: format!("{phase:?}"),
            objects,
            generation: 3,
            received_at_unix_ms: NOW - 90_000,
            ..Default::default()
        }
    }

    fn status() -> v1::AgentStatus {
        v1::AgentStatus {
            name: "prod".into(),
            project: "group/app".into(),
            r#ref: "main".into(),
            mode: v1::GateMode::Pipeline.into(),
            connected: true,
            replica: "replica-a".into(),
            desired: Some(v1::Revision {
                sha: sha('a'),
                pipeline_id: Some(7),
                reason: "pipeline 7 succeeded".into(),
                decided_at_unix_ms: NOW - 120_000,
                generation: 3,
                force_prune: false,
            }),
            applied_revision: sha('a'),
            badge_path: "/badges/prod/secretkey.svg".into(),
            ..Default::default()
        }
    }

    fn history(reports: Vec<StatusReport>) -> v1::GetAgentHistoryResponse {
        v1::GetAgentHistoryResponse {
            reports,
            decisions: vec![
                v1::Decision {
                    outcome: Outcome::Deploy.into(),
                    sha: sha('a'),
                    pipeline_id: Some(7),
                    reason: "pipeline 7 succeeded".into(),
                    at_unix_ms: NOW - 120_000,
                },
                v1::Decision {
                    outcome: Outcome::Skip.into(),
                    sha: sha('b'),
                    pipeline_id: Some(6),
                    reason: "pipeline 6 failed".into(),
                    at_unix_ms: NOW - 3_600_000,
                },
            ],
        }
    }

    #[test]
    fn commits_link_to_gitlab_only_for_a_project_path() {
        let sha = sha('a');
        assert_eq!(
            commit_url(Some("https://gitlab.example/"), "group/app", &sha).as_deref(),
            Some(format!("https://gitlab.example/group/app/-/commit/{sha}").as_str())
        );
        assert_eq!(commit_url(Some("https://gitlab.example"), "42", &sha), None);
        assert_eq!(commit_url(None, "group/app", &sha), None);
        let page = view(&status(), &history(vec![]), Some("https://gl.example"), NOW);
        let desired = page.desired.unwrap();
        assert_eq!(
            desired.commit.url.as_deref(),
            Some(format!("https://gl.example/group/app/-/commit/{sha}").as_str())
        );
        assert_eq!(
            view(&status(), &history(vec![]), None, NOW)
                .applied
                .unwrap()
                .url,
            None
        );
    }

    #[test]
    fn objects_carry_their_apply_result_and_health() {
        let a = sha('a');
        let applied = report(
            &a,
            Phase::Applied,
            vec![
                object("Deployment", "web", Action::Applied, ""),
                object("ConfigMap", "settings", Action::Unchanged, ""),
                object("Service", "old", Action::Pruned, ""),
            ],
        );
        let degraded = report(
            &a,
            Phase::Degraded,
            vec![object(
                "Deployment",
                "web",
                Action::NotHealthy,
                "1 of 2 replicas available",
            )],
        );
        let applying = report(&sha('c'), Phase::Applying, vec![]);
        // Newest first: a newer apply in progress, the health, then the apply results.
        let page = view(
            &status(),
            &history(vec![applying, degraded, applied.clone()]),
            None,
            NOW,
        );
        let apply = page.last_apply.unwrap();
        assert_eq!(
            (apply.commit.sha.as_str(), apply.phase),
            (a.as_str(), "degraded")
        );
        let rows: Vec<(&str, &str, &str, &str)> = apply
            .objects
            .iter()
            .map(|r| (r.name.as_str(), r.result, r.health, r.detail.as_str()))
            .collect();
        assert_eq!(
            rows,
            [
                ("web", "applied", "not healthy", "1 of 2 replicas available"),
                ("settings", "unchanged", "healthy", ""),
                ("old", "pruned", "", ""),
            ]
        );

        // Before the health report: rolling out.
        let page = view(&status(), &history(vec![applied.clone()]), None, NOW);
        let apply = page.last_apply.unwrap();
        assert_eq!(apply.phase, "applied, rolling out");
        assert_eq!(apply.objects[0].health, "rolling out");

        // A health report older than the newest apply of the same revision is not its health.
        let healthy = report(&a, Phase::Healthy, vec![]);
        let page = view(
            &status(),
            &history(vec![applied.clone(), healthy.clone()]),
            None,
            NOW,
        );
        assert_eq!(page.last_apply.unwrap().objects[0].health, "rolling out");
        let page = view(&status(), &history(vec![healthy, applied]), None, NOW);
        let apply = page.last_apply.unwrap();
        assert_eq!(
            (apply.phase, apply.objects[0].health),
            ("healthy", "healthy")
        );

        // A failed apply has no health.
        let failed = report(
            &a,
            Phase::Failed,
            vec![
                object("Deployment", "web", Action::Failed, "forbidden"),
                object("ConfigMap", "settings", Action::Applied, ""),
            ],
        );
        let page = view(&status(), &history(vec![failed]), None, NOW);
        let apply = page.last_apply.unwrap();
        let rows: Vec<(&str, &str)> = apply.objects.iter().map(|r| (r.result, r.health)).collect();
        assert_eq!(rows, [("failed", ""), ("applied", "")]);
        assert_eq!(apply.objects[0].detail, "forbidden");

        // Nothing ended yet.
        let only_applying = report(&a, Phase::Applying, vec![]);
        assert_eq!(
            view(&status(), &history(vec![only_applying]), None, NOW).last_apply,
            None
        );
    }

    #[test]
    fn the_page_shows_revisions_holds_decisions_and_objects() {
        let a = sha('a');
        let mut status = status();
        status.paused = Some(v1::Hold {
            reason: "change freeze".into(),
            since_unix_ms: NOW - 60_000,
            sha: String::new(),
        });
        status.pinned = Some(v1::Hold {
            reason: "bad release".into(),
            since_unix_ms: NOW - 30_000,
            sha: sha('d'),
        });
        status.last_report = Some(report(&a, Phase::Healthy, vec![]));
        let applied = report(
            &a,
            Phase::Applied,
            vec![object("Deployment", "web", Action::Applied, "")],
        );
        let page = view(
            &status,
            &history(vec![report(&a, Phase::Healthy, vec![]), applied]),
            Some("https://gl.example"),
            NOW,
        );
        let last = page.last_report.as_ref().unwrap();
        assert_eq!(
            (last.phase, last.message.as_str()),
            ("healthy", ""),
            "the message is said once, under the last apply"
        );
        let html = render(&page);
        assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
        for expected in [
            "<h1>prod</h1>",
            &a,
            &a[..12],
            "pipeline 7 succeeded",
            "pipeline 6 failed",
            "<strong>Paused</strong>",
            "change freeze",
            "<strong>Pinned</strong>",
            "bad release",
            &sha('d')[..12],
            "<td>Deployment</td><td>apps</td><td>web</td>",
            "2 min ago",
            "1 h ago",
            "https://gl.example/group/app/-/commit/",
        ] {
            assert!(html.contains(expected), "{expected} missing from {html}");
        }
        assert!(!html.contains("<script"), "no JavaScript");
        assert!(!html.contains("secretkey"), "the badge key is never shown");
        assert!(!html.contains("replica-a"), "nor the replica's name");
    }

    #[test]
    fn every_string_from_outside_is_escaped() {
        let hostile = r#"<script>alert("x")</script>' onmouseover='x' &amp;"#;
        let mut status = status();
        status.name = hostile.into();
        status.project = hostile.into();
        status.r#ref = hostile.into();
        status.sync_error = hostile.into();
        status.paused = Some(v1::Hold {
            reason: hostile.into(),
            ..Default::default()
        });
        if let Some(desired) = status.desired.as_mut() {
            desired.reason = hostile.into();
            desired.sha = hostile.into();
        }
        let mut history = history(vec![report(
            hostile,
            Phase::Failed,
            vec![object(hostile, hostile, Action::Failed, hostile)],
        )]);
        history.decisions[0].reason = hostile.into();
        let html = render(&view(&status, &history, Some("https://gl.example"), NOW));
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("' onmouseover"), "{html}");
        assert!(!html.contains("\"x\""), "{html}");
        assert!(html.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&#39;"));
        assert!(html.contains("&amp;amp;"));
        assert_eq!(escape("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&#39;");
    }

    #[test]
    fn times_read_as_utc_and_how_long_ago() {
        assert_eq!(timestamp(1_764_151_200_000), "2025-11-26 10:00:00 UTC");
        assert_eq!(timestamp(0), "—");
        assert_eq!(timestamp(-5), "—");
        assert_eq!(
            timestamp(i64::MAX),
            "—",
            "a stored time past year 9999, not a panic"
        );
        assert_eq!(ago(NOW, NOW - 5_000), "5 s ago");
        assert_eq!(ago(NOW, NOW - 125_000), "2 min ago");
        assert_eq!(ago(NOW, NOW - 7_200_000), "2 h ago");
        assert_eq!(ago(NOW, NOW - 3 * 86_400_000), "3 d ago");
        assert_eq!(
            ago(NOW, NOW + 5_000),
            "0 s ago",
            "a clock ahead is not the future"
        );
    }
}
