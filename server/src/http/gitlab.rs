//! `POST /webhooks/gitlab`: GitLab's push and pipeline hooks.
//!
//! GitLab disables a hook after four failures in a row (permanently after 4xx), so the
//! answers are: 401 for a bad token, 400 for a body that is not the event it claims to be,
//! 5xx only when the event cannot be recorded, and 2xx for everything else.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use super::HttpState;
use crate::catalog::Catalog;
use crate::gate::{
    Before, EXTERNAL_SOURCE, Pipeline, PipelineStatus, Push, Sha, aggregate_named_jobs,
};
use crate::gitlab::{CONTEXT_PREFIX, parse_gitlab_time};
use crate::ingest::{Fact, FactKind, Origin, Recording};
use crate::preview::PreviewTrigger;
use crate::trust::{Claimed, check_jobs, check_label, check_pipeline_id, check_stages, check_time};

/// Leaves GitLab's 10 s budget some slack for the network.
const RECORD_DEADLINE: Duration = Duration::from_secs(8);

/// How much of [`RECORD_DEADLINE`] asking for previews may take: all of it for a merge
/// request hook, which brings nothing else; half for a pipeline hook, whose fact is recorded
/// after them and matters more.
fn preview_budget(event: &str) -> Duration {
    match event {
        "Merge Request Hook" => RECORD_DEADLINE,
        _ => RECORD_DEADLINE / 2,
    }
}

#[derive(Deserialize)]
struct Project {
    id: Option<u64>,
    path_with_namespace: Option<String>,
}

/// The project a delivery names, read before anything else to pick its secret.
#[derive(Deserialize)]
struct ProjectClaim {
    project: Option<Project>,
    project_id: Option<u64>,
}

impl ProjectClaim {
    /// The project a body names, read leniently: any fields but these may be missing or
    /// malformed. Only an object names one: serde would also read a JSON array's elements
    /// as the fields in order, a reading the event's own would not share.
    fn read(body: &[u8]) -> Option<Self> {
        is_object(body)
            .then(|| serde_json::from_slice(body).ok())
            .flatten()
    }

    fn claimed(&self) -> Option<Claimed<'_>> {
        claimed(self.project.as_ref(), self.project_id)
    }
}

/// Whether `body` is a JSON object, as every GitLab hook is.
fn is_object(body: &[u8]) -> bool {
    body.iter()
        .find(|byte| !byte.is_ascii_whitespace())
        .is_some_and(|byte| *byte == b'{')
}

/// The project a body names, by path, id or both.
fn claimed(project: Option<&Project>, project_id: Option<u64>) -> Option<Claimed<'_>> {
    let path = project.and_then(|p| p.path_with_namespace.as_deref());
    let id = project.and_then(|p| p.id).or(project_id);
    (path.is_some() || id.is_some()).then_some(Claimed { path, id })
}

/// A delivery's body, parsed once as the event its `X-Gitlab-Event` header names: the
/// secret, the preview and the fact all come from this one reading, and GitLab's pipeline
/// hooks carry every job of the pipeline.
enum Payload {
    Push(PushHook),
    Pipeline(PipelineHook),
    MergeRequest(MergeRequestHook),
    /// An event Greenlight does not use, by name; its body is not read.
    Other(String),
}

impl Payload {
    /// Parses `body` as `event`; `Err` says what is malformed.
    fn parse(event: &str, body: &[u8]) -> Result<Self, String> {
        fn read<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, String> {
            if !is_object(body) {
                return Err("the body is not a JSON object".into());
            }
            serde_json::from_slice(body).map_err(|e| e.to_string())
        }
        Ok(match event {
            "Push Hook" => Self::Push(read(body)?),
            "Pipeline Hook" => Self::Pipeline(read(body)?),
            "Merge Request Hook" => Self::MergeRequest(read(body)?),
            _ => Self::Other(event.to_owned()),
        })
    }

    /// The project the body names, which picks the secret; `None` for an event that is not
    /// read.
    fn claimed(&self) -> Option<Claimed<'_>> {
        match self {
            Self::Push(hook) => claimed(hook.project.as_ref(), hook.project_id),
            Self::Pipeline(hook) => claimed(hook.project.as_ref(), hook.project_id),
            Self::MergeRequest(hook) => claimed(hook.project.as_ref(), hook.project_id),
            Self::Other(_) => None,
        }
    }
}

#[derive(Deserialize)]
struct PushHook {
    #[serde(rename = "ref")]
    git_ref: String,
    before: Option<String>,
    after: String,
    project: Option<Project>,
    project_id: Option<u64>,
}

#[derive(Deserialize)]
struct PipelineHook {
    object_attributes: PipelineAttributes,
    project: Option<Project>,
    /// Read for the secret only, as [`ProjectClaim`] reads it.
    #[serde(default)]
    project_id: Option<u64>,
    #[serde(default)]
    builds: Vec<Build>,
    /// Set for a merge request pipeline, which previews follow. Read as any JSON, so that
    /// one without the fields a preview needs, or with fields of another type, asks for no
    /// preview rather than making the whole hook malformed.
    #[serde(default)]
    merge_request: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct MergeRequestHook {
    object_attributes: MergeRequestAttributes,
    project: Option<Project>,
    /// Read for the secret only, as [`ProjectClaim`] reads it.
    #[serde(default)]
    project_id: Option<u64>,
}

#[derive(Deserialize)]
struct MergeRequestAttributes {
    iid: u64,
    target_branch: String,
    #[serde(default)]
    action: Option<String>,
    last_commit: Option<LastCommit>,
}

#[derive(Deserialize)]
struct LastCommit {
    id: String,
}

/// The source of a merge request pipeline.
const MERGE_REQUEST_SOURCE: &str = "merge_request_event";
/// Merge request hook actions that bring a head worth previewing.
const PREVIEW_ACTIONS: [&str; 3] = ["open", "update", "reopen"];

#[derive(Deserialize)]
struct Build {
    /// The job name; commit statuses appear as jobs named by their context.
    #[serde(default)]
    name: String,
    /// Every job of a hook has one; commit statuses are filed under [`STATUS_STAGE`].
    stage: String,
    status: String,
    #[serde(default)]
    allow_failure: bool,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    started_at: Option<String>,
    #[serde(default)]
    finished_at: Option<String>,
}

/// The stage GitLab files a commit status under when its poster names none, as ours do.
const STATUS_STAGE: &str = "external";
/// Appended to an agent's context for the status of a preview deploy.
const PREVIEW_SUFFIX: &str = "/preview";

/// The agents Greenlight posts commit statuses for, each under contexts named after it.
pub trait AgentNames {
    /// Whether `name` is a configured agent.
    fn is_agent(&self, name: &str) -> bool;
}

impl AgentNames for Catalog {
    fn is_agent(&self, name: &str) -> bool {
        self.agent(name).is_some()
    }
}

/// Which of Greenlight's commit statuses for an agent a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum OwnContext {
    /// `greenlight/<agent>`: a deploy's progress and result.
    Deploy,
    /// `greenlight/<agent>/preview`.
    Preview,
}

/// One of Greenlight's commit statuses, as a pipeline hook lists it among the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct OwnStatus<'a> {
    agent: &'a str,
    context: OwnContext,
}

impl std::fmt::Display for OwnStatus<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{CONTEXT_PREFIX}{}", self.agent)?;
        match self.context {
            OwnContext::Deploy => Ok(()),
            OwnContext::Preview => f.write_str(PREVIEW_SUFFIX),
        }
    }
}

/// Whose a pipeline hook's job is, which decides whether it counts towards the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobOwner<'a> {
    /// A commit status Greenlight posted: it never counts.
    Greenlight(OwnStatus<'a>),
    /// A CI job, or a status anyone else posted: it counts, whatever its name.
    Ci,
}

impl<'a> JobOwner<'a> {
    /// The owner of the job named `name` in `stage`. A name alone proves nothing (a CI job
    /// may well be called `greenlight/lint`): ours name a configured agent and, being commit
    /// statuses posted without a stage, sit in GitLab's `external` stage.
    fn of(name: &'a str, stage: &str, agents: &impl AgentNames) -> Self {
        let Some(rest) = name.strip_prefix(CONTEXT_PREFIX) else {
            return Self::Ci;
        };
        if stage != STATUS_STAGE {
            return Self::Ci;
        }
        let (agent, context) = match rest.strip_suffix(PREVIEW_SUFFIX) {
            Some(agent) => (agent, OwnContext::Preview),
            None => (rest, OwnContext::Deploy),
        };
        if agents.is_agent(agent) {
            Self::Greenlight(OwnStatus { agent, context })
        } else {
            Self::Ci
        }
    }
}

/// The latest job activity: when a running pipeline's state was last true.
fn latest_activity<'a>(builds: impl IntoIterator<Item = &'a Build>) -> Option<i64> {
    builds
        .into_iter()
        .flat_map(|b| [&b.created_at, &b.started_at, &b.finished_at])
        .filter_map(|t| t.as_deref().and_then(parse_gitlab_time))
        .max()
}

/// The latest job finish: when a result recomputed from the jobs became true.
fn latest_finish<'a>(builds: impl IntoIterator<Item = &'a Build>) -> Option<i64> {
    builds
        .into_iter()
        .filter_map(|b| b.finished_at.as_deref().and_then(parse_gitlab_time))
        .max()
}

/// GitLab's status of a pipeline made of `builds`, recomputed once Greenlight's own jobs are
/// left out; `None` when no job is left.
fn aggregate<'a>(builds: impl IntoIterator<Item = &'a Build>) -> Option<PipelineStatus> {
    aggregate_named_jobs(
        builds
            .into_iter()
            .map(|b| (b.status.as_str(), b.allow_failure)),
    )
}

/// Stages every job of which succeeded (or may fail): what `gate.stages` waits for. One
/// pass, so a hook listing many jobs costs linear time.
fn passed_stages<'a>(builds: impl IntoIterator<Item = &'a Build>) -> Vec<String> {
    let mut passed: std::collections::BTreeMap<&str, bool> = std::collections::BTreeMap::new();
    for build in builds {
        let ok = build.status == "success"
            || (build.allow_failure
                && PipelineStatus::parse(&build.status).is_ok_and(|s| s.is_final()));
        *passed.entry(build.stage.as_str()).or_insert(true) &= ok;
    }
    passed
        .into_iter()
        .filter(|(_, ok)| *ok)
        .map(|(stage, _)| stage.to_owned())
        .collect()
}

#[derive(Deserialize)]
struct PipelineAttributes {
    id: u64,
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(default)]
    tag: bool,
    sha: String,
    #[serde(default)]
    source: Option<String>,
    status: String,
    #[serde(default)]
    finished_at: Option<String>,
}

fn answer(status: StatusCode, outcome: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "outcome": outcome, "message": message.into() })),
    )
        .into_response()
}

/// The trimmed value of header `name`, when it is present, text and not blank.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Handles one delivery; the root span of the trace that follows its fact to the clusters.
#[tracing::instrument(name = "webhook", skip_all, fields(event, trace_id))]
pub async fn receive(State(state): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    greenlight::telemetry::record_trace_id(&tracing::Span::current());
    if !state.webhook_secrets.enabled() {
        state.metrics.webhook("unknown", "disabled");
        return answer(
            StatusCode::NOT_FOUND,
            "rejected",
            "GitLab webhooks are not enabled: set webhooks.gitlab.secret_token or projects",
        );
    }
    let Some(token) = header(&headers, "x-gitlab-token") else {
        state.metrics.webhook("unknown", "unauthorized");
        return answer(
            StatusCode::UNAUTHORIZED,
            "rejected",
            "missing X-Gitlab-Token header",
        );
    };
    let event = header(&headers, "x-gitlab-event");
    // A token that matches no secret at all is refused before the body is parsed.
    if let Some(refused) = unauthorized(&state, "unknown", None, token) {
        return refused;
    }
    // With per-project secrets the project the body names picks the secret, so the body is
    // read (not trusted) before the token is checked against it. A body that is not the
    // event it claims to be, or of an event not used, is read for its project alone.
    let mut payload = None;
    if state.webhook_secrets.by_project() {
        payload = event.map(|event| Payload::parse(event, &body));
        let lenient;
        let claimed = match &payload {
            Some(Ok(payload)) if !matches!(payload, Payload::Other(_)) => payload.claimed(),
            _ => {
                lenient = ProjectClaim::read(&body);
                lenient.as_ref().and_then(ProjectClaim::claimed)
            }
        };
        if let Some(refused) = unauthorized(&state, "unknown", claimed, token) {
            return refused;
        }
    }
    let Some(event) = event else {
        state.metrics.webhook("unknown", "malformed");
        return answer(
            StatusCode::BAD_REQUEST,
            "rejected",
            "missing X-Gitlab-Event header",
        );
    };
    let payload = payload.unwrap_or_else(|| Payload::parse(event, &body));
    let delivery =
        header(&headers, "idempotency-key").or_else(|| header(&headers, "x-gitlab-event-uuid"));
    let label = match event {
        "Push Hook" => "push",
        "Pipeline Hook" => "pipeline",
        "Merge Request Hook" => "merge_request",
        _ => "other",
    };
    if let Some(Err(problem)) = delivery.map(|id| check_label("delivery id", id)) {
        state.metrics.webhook(label, "malformed");
        return answer(StatusCode::BAD_REQUEST, "rejected", problem.to_string());
    }
    tracing::Span::current().record("event", label);
    // Previews: a merge request's head. They never touch the gate, so a failure to ask for
    // one is logged and the pipeline hook is still recorded below.
    let preview = match &payload {
        Ok(payload) => payload.preview(),
        Err(problem) => preview_of_malformed(event, problem.clone()),
    };
    // One budget for the whole answer: the previews asked and the fact recorded after them.
    let started = tokio::time::Instant::now();
    let deadline = started + RECORD_DEADLINE;
    if let Ok(Some(trigger)) = &preview {
        let asking = started + preview_budget(event);
        let asked = tokio::time::timeout_at(asking, state.previews.request(trigger)).await;
        match (asked, event) {
            (Ok(Ok(agents)), "Merge Request Hook") => {
                state.metrics.webhook(label, "recorded");
                let message = if agents.is_empty() {
                    "no agent previews this head anew".to_owned()
                } else {
                    format!("preview asked of {}", agents.join(", "))
                };
                return answer(StatusCode::OK, "recorded", message);
            }
            (Ok(Ok(_)), _) => {}
            (Ok(Err(error)), _) => warn!(%error, "cannot ask for a preview"),
            (Err(_), _) => warn!("asking for a preview timed out"),
        }
        if event == "Merge Request Hook" {
            state.metrics.webhook(label, "failed");
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "failed",
                "cannot record the preview request; retry later",
            );
        }
    }
    if event == "Merge Request Hook" {
        return match preview {
            Err(problem) => {
                state.metrics.webhook(label, "malformed");
                answer(
                    StatusCode::BAD_REQUEST,
                    "rejected",
                    format!("invalid {event} payload: {problem}"),
                )
            }
            Ok(_) => {
                state.metrics.webhook(label, "ignored");
                answer(
                    StatusCode::OK,
                    "ignored",
                    "this merge request event brings no head to preview",
                )
            }
        };
    }
    // Agents may have been created while a preview was asked for, which can take seconds:
    // what the token may speak for is decided again before the fact is recorded.
    if matches!(preview, Ok(Some(_)))
        && state.webhook_secrets.by_project()
        && let Ok(payload) = &payload
        && let Some(refused) = unauthorized(&state, label, payload.claimed(), token)
    {
        return refused;
    }
    let catalog = state.engine.catalog();
    let fact = payload.and_then(|payload| payload.fact(crate::clock::now_ms(), catalog.as_ref()));
    let fact = match fact {
        Err(problem) => {
            state.metrics.webhook(label, "malformed");
            return answer(
                StatusCode::BAD_REQUEST,
                "rejected",
                format!("invalid {event} payload: {problem}"),
            );
        }
        Ok(Err(why)) => {
            state.metrics.webhook(label, "ignored");
            return answer(StatusCode::OK, "ignored", why);
        }
        Ok(Ok(fact)) => fact,
    };
    let recorded =
        tokio::time::timeout_at(deadline, state.engine.ingest().record(fact, delivery)).await;
    let (status, outcome, message) = match recorded {
        Ok(Ok(Recording::Recorded)) => (StatusCode::OK, "recorded", String::new()),
        Ok(Ok(Recording::Unchanged)) => (StatusCode::OK, "unchanged", "nothing new".to_owned()),
        Ok(Ok(Recording::Duplicate)) => (
            StatusCode::OK,
            "duplicate",
            "this delivery was recorded before".to_owned(),
        ),
        Ok(Ok(Recording::Ignored(why))) => (StatusCode::OK, "ignored", why),
        // Authenticated and recorded as rejected: a 4xx would get the hook disabled.
        Ok(Ok(Recording::Contradicted(why))) => (StatusCode::OK, "contradicted", why),
        Ok(Err(error)) => {
            warn!(%error, event, "cannot record webhook");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "failed",
                format!("cannot record the event, retry later: {error}"),
            )
        }
        Err(_) => {
            warn!(event, "recording a webhook timed out");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "failed",
                "the store did not answer in time; retry later".to_owned(),
            )
        }
    };
    state.metrics.webhook(label, outcome);
    if status == StatusCode::OK && outcome == "recorded" {
        info!(event, delivery, "recorded");
    }
    answer(status, outcome, message)
}

/// The 401 answer, unless `token` may speak for `claimed` among the projects agents watch
/// now.
fn unauthorized(
    state: &HttpState,
    label: &str,
    claimed: Option<Claimed<'_>>,
    token: &str,
) -> Option<Response> {
    let catalog = state.engine.catalog();
    let refused = state
        .webhook_secrets
        .check(claimed, token, |project| catalog.watches_project(project))
        .err()?;
    state.metrics.webhook(label, "unauthorized");
    Some(answer(
        StatusCode::UNAUTHORIZED,
        "rejected",
        refused.to_string(),
    ))
}

/// `Err` for a malformed payload; `Ok(Err)` for a valid one we do not act on.
type Parsed = Result<Result<Fact, String>, String>;

/// Parses `body` as the event `X-Gitlab-Event` names: the pure part of [`receive`].
pub fn parse_event(event: &str, body: &[u8], now_ms: i64, agents: &impl AgentNames) -> Parsed {
    Payload::parse(event, body)?.fact(now_ms, agents)
}

/// The merge request head a delivery asks previews of: a `Merge Request Hook` that opens,
/// updates or reopens one, or a `Pipeline Hook` of a merge request pipeline. `Err` for a
/// malformed merge request hook; `Ok(None)` for anything else.
pub fn parse_preview(event: &str, body: &[u8]) -> Result<Option<PreviewTrigger>, String> {
    match Payload::parse(event, body) {
        Ok(payload) => payload.preview(),
        Err(problem) => preview_of_malformed(event, problem),
    }
}

/// What a malformed body asks of previews: a merge request hook's problem is refused; a
/// malformed pipeline hook is the pipeline parser's to refuse.
fn preview_of_malformed(event: &str, problem: String) -> Result<Option<PreviewTrigger>, String> {
    match event {
        "Merge Request Hook" => Err(problem),
        _ => Ok(None),
    }
}

impl Payload {
    /// The fact the delivery brings: `Err` for a malformed one, `Ok(Err)` for one we do not
    /// act on.
    fn fact(self, now_ms: i64, agents: &impl AgentNames) -> Parsed {
        match self {
            Self::Push(hook) => parse_push(hook),
            Self::Pipeline(hook) => parse_pipeline(hook, now_ms, agents),
            Self::MergeRequest(_) => Ok(Err("Merge Request Hook events are not used".into())),
            Self::Other(event) => Ok(Err(format!("{event} events are not used"))),
        }
    }

    /// The merge request head the delivery asks previews of, as [`parse_preview`] says.
    fn preview(&self) -> Result<Option<PreviewTrigger>, String> {
        match self {
            Self::MergeRequest(hook) => {
                let attrs = &hook.object_attributes;
                if !attrs
                    .action
                    .as_deref()
                    .is_some_and(|a| PREVIEW_ACTIONS.contains(&a))
                {
                    return Ok(None);
                }
                let commit = attrs
                    .last_commit
                    .as_ref()
                    .ok_or("object_attributes.last_commit is required")?;
                let sha = Sha::parse(&commit.id)
                    .map_err(|e| format!("object_attributes.last_commit.id: {e}"))?;
                let trigger =
                    preview_of(hook.project.as_ref(), &attrs.target_branch, attrs.iid, &sha)?;
                Ok(Some(trigger))
            }
            Self::Pipeline(hook) => {
                let attrs = &hook.object_attributes;
                let merge_request = hook.merge_request.as_ref();
                let (Some(iid), Some(target_branch), Some(MERGE_REQUEST_SOURCE)) = (
                    merge_request.and_then(|mr| mr["iid"].as_u64()),
                    merge_request.and_then(|mr| mr["target_branch"].as_str()),
                    attrs.source.as_deref(),
                ) else {
                    return Ok(None);
                };
                // A merge request pipeline that cannot name its head asks for no preview;
                // the pipeline parser refuses what is malformed.
                let Ok(sha) = Sha::parse(&attrs.sha) else {
                    return Ok(None);
                };
                Ok(preview_of(hook.project.as_ref(), target_branch, iid, &sha).ok())
            }
            Self::Push(_) | Self::Other(_) => Ok(None),
        }
    }
}

/// The preview of `sha`, the head of merge request `iid` into `target_branch` of
/// `project`; `Err` when the body names no project.
fn preview_of(
    project: Option<&Project>,
    target_branch: &str,
    iid: u64,
    sha: &Sha,
) -> Result<PreviewTrigger, String> {
    let (project_path, project_id) = project_of(project, None)?;
    Ok(PreviewTrigger {
        project_path,
        project_id,
        target_branch: target_branch.to_owned(),
        merge_request_iid: iid,
        sha: sha.as_str().to_owned(),
    })
}

fn parse_push(hook: PushHook) -> Parsed {
    let Some(branch) = hook.git_ref.strip_prefix("refs/heads/") else {
        return Ok(Err(format!("{} is not a branch", hook.git_ref)));
    };
    let sha =
        |field: &str, value: &str| Sha::parse_full(value).map_err(|e| format!("{field}: {e}"));
    let after = Some(sha("after", &hook.after)?).filter(|s| !s.is_null());
    let before = match hook.before.as_deref() {
        Some(value) => Some(sha("before", value)?).filter(|s| !s.is_null()),
        None => None,
    }
    .map_or(Before::Created, Before::Head);
    let (path, id) = project_of(hook.project.as_ref(), hook.project_id)?;
    Ok(Ok(Fact {
        origin: Origin::GitLabHook,
        project_path: path,
        project_id: id,
        branch: branch.to_owned(),
        kind: FactKind::Push(Push {
            before,
            after,
            at_ms: crate::clock::now_ms(),
        }),
    }))
}

fn parse_pipeline(hook: PipelineHook, now_ms: i64, agents: &impl AgentNames) -> Parsed {
    let attrs = hook.object_attributes;
    if attrs.tag {
        return Ok(Err(format!(
            "pipeline {} is for tag {}",
            attrs.id, attrs.git_ref
        )));
    }
    let sha = Sha::parse_full(&attrs.sha).map_err(|e| format!("object_attributes.sha: {e}"))?;
    // A status a later GitLab adds is not a malformed hook: refused, it would count towards
    // GitLab disabling the hook, which carries every other event too. It opens no gate.
    let status = match PipelineStatus::parse(&attrs.status) {
        Ok(status) => status,
        Err(unknown) => {
            return Ok(Err(format!(
                "pipeline {}: {unknown}, which this version does not know",
                attrs.id
            )));
        }
    };
    let (path, id) = project_of(hook.project.as_ref(), None)?;
    check_pipeline_id(attrs.id).map_err(|e| format!("object_attributes.id: {e}"))?;
    let finished_at = attrs.finished_at.as_deref().and_then(parse_gitlab_time);
    if let Some(at) = finished_at {
        check_time("object_attributes.finished_at", at, now_ms).map_err(|e| e.to_string())?;
    }
    check_jobs(hook.builds.len()).map_err(|e| format!("builds: {e}"))?;
    let stages: std::collections::BTreeSet<&str> =
        hook.builds.iter().map(|b| b.stage.as_str()).collect();
    check_stages(stages).map_err(|e| format!("builds[].stage: {e}"))?;
    if let Some(at) = latest_activity(&hook.builds) {
        check_time("builds[].*_at", at, now_ms).map_err(|e| e.to_string())?;
    }
    let source = attrs.source.unwrap_or_default();
    check_label("object_attributes.source", &source).map_err(|e| e.to_string())?;
    if source == EXTERNAL_SOURCE {
        return Ok(Err(format!(
            "pipeline {} is external (made by commit statuses) and never opens a gate",
            attrs.id
        )));
    }
    // Greenlight's own statuses join the gate's pipeline as jobs and change its status: a
    // failed deploy on staging must not turn the pipeline red for prod, nor a "running"
    // deploy make a finished pipeline look unfinished.
    let mut own = std::collections::BTreeSet::new();
    let mut builds = Vec::with_capacity(hook.builds.len());
    for build in &hook.builds {
        match JobOwner::of(&build.name, &build.stage, agents) {
            JobOwner::Greenlight(status) => {
                own.insert(status);
            }
            JobOwner::Ci => builds.push(build),
        }
    }
    let (status, as_of_ms) = if own.is_empty() {
        let as_of = if status.is_final() {
            finished_at
        } else {
            latest_activity(builds.iter().copied())
        };
        (status, as_of)
    } else {
        let Some(status) = aggregate(builds.iter().copied()) else {
            let own: Vec<String> = own.iter().map(ToString::to_string).collect();
            return Ok(Err(format!(
                "pipeline {} holds only Greenlight's own statuses ({})",
                attrs.id,
                own.join(", ")
            )));
        };
        let as_of = if status.is_final() {
            latest_finish(builds.iter().copied())
        } else {
            latest_activity(builds.iter().copied())
        };
        (status, as_of)
    };
    let branch = attrs
        .git_ref
        .strip_prefix("refs/heads/")
        .unwrap_or(&attrs.git_ref)
        .to_owned();
    let pipeline = Pipeline {
        id: attrs.id,
        status,
        source,
        as_of_ms,
        passed_stages: passed_stages(builds.iter().copied()),
    };
    Ok(Ok(Fact {
        origin: Origin::GitLabHook,
        project_path: path,
        project_id: id,
        branch,
        kind: FactKind::Pipeline { sha, pipeline },
    }))
}

fn project_of(
    project: Option<&Project>,
    project_id: Option<u64>,
) -> Result<(Option<String>, Option<u64>), String> {
    let path = project.and_then(|p| p.path_with_namespace.clone());
    let id = project.and_then(|p| p.id).or(project_id);
    if path.is_none() && id.is_none() {
        return Err("project.path_with_namespace or project.id is required".to_owned());
    }
    Ok((path, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-01, a fixed "now" for the plausibility bounds.
    const NOW: i64 = 1_796_083_200_000;
    /// The configured agents.
    const AGENTS: [&str; 2] = ["staging", "prod"];

    impl AgentNames for [&str; 2] {
        fn is_agent(&self, name: &str) -> bool {
            self.contains(&name)
        }
    }

    #[test]
    fn tag_pushes_and_tag_pipelines_are_not_acted_on() {
        let push = br#"{"ref":"refs/tags/v1","before":"0000000000000000000000000000000000000000","after":"1111111111111111111111111111111111111111","project":{"id":1}}"#;
        assert!(matches!(
            parse_event("Push Hook", push, NOW, &AGENTS),
            Ok(Err(_))
        ));
        let pipeline = br#"{"object_attributes":{"id":1,"ref":"v1","tag":true,"sha":"1111111111111111111111111111111111111111","status":"success"},"project":{"id":1}}"#;
        assert!(matches!(
            parse_event("Pipeline Hook", pipeline, NOW, &AGENTS),
            Ok(Err(_))
        ));
    }

    /// The project a body names is the same whether it is read once as its event or read
    /// for the project alone, as a body that is not its event is: the secret it picks does
    /// not depend on which.
    #[test]
    fn a_body_read_once_claims_the_project_the_lenient_reading_claims() {
        let bodies: [(&str, &[u8]); 6] = [
            ("Push Hook", br#"{"ref":"refs/heads/main","after":"1111111111111111111111111111111111111111","project_id":7}"#),
            ("Push Hook", br#"{"ref":"refs/heads/main","after":"1111111111111111111111111111111111111111","project":{"id":3,"path_with_namespace":"g/a"},"project_id":7}"#),
            ("Pipeline Hook", br#"{"object_attributes":{"id":1,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"success"},"project":{"path_with_namespace":"g/a"}}"#),
            ("Pipeline Hook", br#"{"object_attributes":{"id":1,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"success"},"project_id":9}"#),
            ("Merge Request Hook", br#"{"object_attributes":{"iid":1,"target_branch":"main"},"project":{"id":4}}"#),
            ("Pipeline Hook", br#"{"object_attributes":{"id":1,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"success"}}"#),
        ];
        for (event, body) in bodies {
            let payload = Payload::parse(event, body).unwrap();
            let lenient = ProjectClaim::read(body).unwrap();
            assert_eq!(payload.claimed(), lenient.claimed(), "{event}");
        }
    }

    /// serde reads a JSON array's elements as a struct's fields in order. Neither reading
    /// accepts one, so an array can neither name a project to the lenient reading and
    /// another to the event's, nor name none to the secret check and one to the fact.
    #[test]
    fn a_body_that_is_no_json_object_names_no_project_and_is_malformed() {
        let push = format!(
            r#" ["refs/heads/main", null, "{}", {{"path_with_namespace": "g/prod"}}, null]"#,
            "1".repeat(40)
        );
        assert!(ProjectClaim::read(push.as_bytes()).is_none());
        // An array whose elements would be the claim's fields in order.
        let array = br#"[{"path_with_namespace":"g/prod"}, null]"#;
        assert!(serde_json::from_slice::<ProjectClaim>(array).is_ok());
        assert!(ProjectClaim::read(array).is_none());
        assert!(Payload::parse("Push Hook", push.as_bytes()).is_err());
        assert!(parse_event("Push Hook", push.as_bytes(), NOW, &AGENTS).is_err());
        // A wrongly typed project id fails both readings alike.
        let pipeline = br#"{"object_attributes":{"id":1,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"success"},"project":{"path_with_namespace":"g/prod"},"project_id":"x"}"#;
        assert!(ProjectClaim::read(pipeline).is_none());
        assert!(parse_event("Pipeline Hook", pipeline, NOW, &AGENTS).is_err());
    }

    /// A merge request pipeline whose merge request lacks the fields a preview needs is
    /// still a pipeline: it asks no preview and is recorded.
    #[test]
    fn a_merge_request_pipeline_without_its_merge_requests_fields_is_still_recorded() {
        for merge_request in [r#"{"id":5}"#, r#"{"iid":"5","target_branch":"main"}"#, "7"] {
            let body = format!(
                r#"{{"object_attributes":{{"id":1,"ref":"main","sha":"{}","source":"merge_request_event","status":"success"}},"project":{{"id":1}},"merge_request":{merge_request}}}"#,
                "1".repeat(40)
            );
            assert_eq!(
                parse_preview("Pipeline Hook", body.as_bytes()),
                Ok(None),
                "{merge_request}"
            );
            assert!(
                matches!(
                    parse_event("Pipeline Hook", body.as_bytes(), NOW, &AGENTS),
                    Ok(Ok(_))
                ),
                "{merge_request}"
            );
        }
        let complete = br#"{"object_attributes":{"id":1,"ref":"main","sha":"1111111111111111111111111111111111111111","source":"merge_request_event","status":"success"},"project":{"id":1},"merge_request":{"iid":5,"target_branch":"main"}}"#;
        let trigger = parse_preview("Pipeline Hook", complete).unwrap().unwrap();
        assert_eq!(
            (trigger.merge_request_iid, trigger.target_branch.as_str()),
            (5, "main")
        );
    }

    #[test]
    fn a_pipeline_hook_keeps_half_its_budget_for_its_fact_whatever_its_previews_take() {
        assert_eq!(preview_budget("Merge Request Hook"), RECORD_DEADLINE);
        let pipeline = preview_budget("Pipeline Hook");
        assert_eq!(pipeline, RECORD_DEADLINE / 2);
        assert!(RECORD_DEADLINE - pipeline >= Duration::from_secs(4));
    }

    #[test]
    fn malformed_payloads_name_the_problem() {
        let err = parse_event(
            "Push Hook",
            br#"{"ref":"refs/heads/main","after":"zz","project":{"id":1}}"#,
            NOW,
            &AGENTS,
        )
        .err()
        .unwrap();
        assert!(err.contains("after"), "{err}");
        let refused =
            |event: &str, body: &str| parse_event(event, body.as_bytes(), NOW, &AGENTS).err();
        let short_after = r#"{"ref":"refs/heads/main","after":"abc1234","project":{"id":1}}"#;
        let err = refused("Push Hook", short_after).unwrap();
        assert!(
            err.contains("after") && err.contains("full commit SHA"),
            "{err}"
        );
        let short_sha = r#"{"object_attributes":{"id":1,"ref":"main","sha":"abc1234","status":"success"},"project":{"id":1}}"#;
        let err = refused("Pipeline Hook", short_sha).unwrap();
        assert!(err.contains("full commit SHA"), "{err}");
        let long_source = format!(
            r#"{{"object_attributes":{{"id":1,"ref":"main","sha":"{}","status":"success","source":"{}"}},"project":{{"id":1}}}}"#,
            "1".repeat(40),
            "s".repeat(256)
        );
        let err = refused("Pipeline Hook", &long_source).unwrap();
        assert!(
            err.contains("object_attributes.source of 256 bytes"),
            "{err}"
        );
        let err = parse_event(
            "Pipeline Hook",
            br#"{"object_attributes":{"id":1}}"#,
            NOW,
            &AGENTS,
        )
        .err()
        .unwrap();
        assert!(err.contains("missing field"), "{err}");
    }

    #[test]
    fn statuses_of_later_gitlab_versions_never_refuse_a_hook_nor_pass_a_pipeline() {
        let hook = |status: &str, builds: &str| {
            format!(
                r#"{{"object_attributes":{{"id":1,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"{status}"}},"project":{{"id":1}},"builds":[{builds}]}}"#
            )
        };
        // Named on the way to a result: running, to the gate.
        let canceling = pipeline_of(hook("canceling", "").as_bytes()).unwrap();
        assert_eq!(canceling.status, PipelineStatus::Running);
        // Unknown: answered as ignored, not refused as malformed.
        let unknown = parse_event(
            "Pipeline Hook",
            hook("exploded", "").as_bytes(),
            NOW,
            &AGENTS,
        )
        .unwrap()
        .unwrap_err();
        assert!(unknown.contains("exploded"), "{unknown}");
        // A job of an unknown status, among our own, holds the pipeline as unfinished: left
        // out, the job beside it would make it green.
        let builds = r#"{"name":"test","stage":"test","status":"success"},
            {"name":"e2e","stage":"test","status":"exploded"},
            {"name":"greenlight/staging","stage":"external","status":"failed"}"#;
        let held = pipeline_of(hook("failed", builds).as_bytes()).unwrap();
        assert_eq!(held.status, PipelineStatus::Running);
        assert_eq!(held.passed_stages, Vec::<String>::new());
    }

    #[test]
    fn a_stage_passes_when_all_its_jobs_succeeded() {
        let body = br#"{"object_attributes":{"id":1,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"running"},"project":{"id":1},
            "builds":[{"stage":"test","status":"success"},{"stage":"test","status":"failed","allow_failure":true},
                      {"stage":"lint","status":"success"},{"stage":"lint","status":"running"},{"stage":"deploy","status":"created"}]}"#;
        let fact = parse_event("Pipeline Hook", body, NOW, &AGENTS)
            .unwrap()
            .unwrap();
        let FactKind::Pipeline { pipeline, .. } = fact.kind else {
            panic!("not a pipeline")
        };
        assert_eq!(pipeline.passed_stages, ["test"]);
    }

    #[test]
    fn too_many_jobs_or_an_oversized_stage_are_refused_naming_the_field() {
        let hook = |builds: &str| {
            format!(
                r#"{{"object_attributes":{{"id":1,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"running"}},"project":{{"id":1}},"builds":[{builds}]}}"#
            )
        };
        let job = r#"{"stage":"test","status":"success"}"#;
        let many = vec![job; crate::trust::MAX_JOBS + 1].join(",");
        let err = parse_event("Pipeline Hook", hook(&many).as_bytes(), NOW, &AGENTS)
            .err()
            .unwrap();
        assert!(err.starts_with("builds: 5001 jobs"), "{err}");
        let enough = vec![job; crate::trust::MAX_JOBS].join(",");
        let parsed = parse_event("Pipeline Hook", hook(&enough).as_bytes(), NOW, &AGENTS);
        assert!(parsed.is_ok(), "{:?}", parsed.err());
        let long = format!(r#"{{"stage":"{}","status":"success"}}"#, "s".repeat(256));
        let err = parse_event("Pipeline Hook", hook(&long).as_bytes(), NOW, &AGENTS)
            .err()
            .unwrap();
        assert!(
            err.starts_with("builds[].stage: a stage name of 256 bytes"),
            "{err}"
        );
    }

    fn pipeline_of(body: &[u8]) -> Option<Pipeline> {
        match parse_event("Pipeline Hook", body, NOW, &AGENTS) {
            Ok(Ok(Fact {
                kind: FactKind::Pipeline { pipeline, .. },
                ..
            })) => Some(pipeline),
            _ => None,
        }
    }

    #[test]
    fn greenlights_own_jobs_do_not_change_the_verdict() {
        // Staging's failed deploy, posted on the pipeline that opened the gate.
        let failed = br#"{"object_attributes":{"id":7,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"failed","source":"push","finished_at":"2026-11-26 10:05:00 UTC"},"project":{"id":1},
            "builds":[{"name":"test","stage":"test","status":"success","finished_at":"2026-11-26 10:01:00 UTC"},
                      {"name":"greenlight/staging","stage":"external","status":"failed","finished_at":"2026-11-26 10:05:00 UTC"}]}"#;
        let pipeline = pipeline_of(failed).unwrap();
        assert_eq!(pipeline.status, PipelineStatus::Success);
        assert_eq!(
            pipeline.as_of_ms,
            parse_gitlab_time("2026-11-26 10:01:00 UTC")
        );
        assert_eq!(pipeline.passed_stages, ["test"]);
        // A deploy still running does not make the finished pipeline look unfinished.
        let running = br#"{"object_attributes":{"id":7,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"running","source":"push"},"project":{"id":1},
            "builds":[{"name":"test","stage":"test","status":"success"},{"name":"greenlight/staging","stage":"external","status":"running","started_at":"2026-11-26 10:06:00 UTC"}]}"#;
        assert_eq!(
            pipeline_of(running).unwrap().status,
            PipelineStatus::Success
        );
        // Real jobs still decide.
        let red = br#"{"object_attributes":{"id":7,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"failed","source":"push"},"project":{"id":1},
            "builds":[{"name":"test","stage":"test","status":"failed"},{"name":"lint","stage":"test","status":"failed","allow_failure":true},{"name":"greenlight/prod","stage":"external","status":"success"}]}"#;
        assert_eq!(pipeline_of(red).unwrap().status, PipelineStatus::Failed);
        // A pipeline of nothing but our statuses, or made by them, is no verdict at all.
        let only_ours = br#"{"object_attributes":{"id":8,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"success","source":"push"},"project":{"id":1},
            "builds":[{"name":"greenlight/staging","stage":"external","status":"success"}]}"#;
        let ignored = parse_event("Pipeline Hook", only_ours, NOW, &AGENTS)
            .unwrap()
            .unwrap_err();
        assert_eq!(
            ignored,
            "pipeline 8 holds only Greenlight's own statuses (greenlight/staging)"
        );
        let external = br#"{"object_attributes":{"id":9,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"success","source":"external"},"project":{"id":1}}"#;
        assert!(matches!(
            parse_event("Pipeline Hook", external, NOW, &AGENTS),
            Ok(Err(_))
        ));
    }

    #[test]
    fn only_a_configured_agents_context_in_the_external_stage_is_ours() {
        let owner = |name, stage| JobOwner::of(name, stage, &AGENTS);
        let ours = |agent, context| JobOwner::Greenlight(OwnStatus { agent, context });
        assert_eq!(
            owner("greenlight/prod", "external"),
            ours("prod", OwnContext::Deploy)
        );
        assert_eq!(
            owner("greenlight/staging/preview", "external"),
            ours("staging", OwnContext::Preview)
        );
        let preview = OwnStatus {
            agent: "staging",
            context: OwnContext::Preview,
        };
        assert_eq!(preview.to_string(), "greenlight/staging/preview");
        // A CI job under our prefix, an unknown agent, a CI job named after an agent, and
        // contexts of other shapes are not ours.
        for (name, stage) in [
            ("greenlight/lint", "test"),
            ("greenlight/lint", "external"),
            ("greenlight/prod", "deploy"),
            ("greenlight/prod/preview", "test"),
            ("greenlight/prod/other", "external"),
            ("greenlight/prod/", "external"),
            ("greenlight/", "external"),
            ("greenlight/preview", "external"),
            ("prod", "external"),
        ] {
            assert_eq!(owner(name, stage), JobOwner::Ci, "{name} in {stage}");
        }
    }

    #[test]
    fn a_failed_ci_job_named_greenlight_something_keeps_the_pipeline_red() {
        let red = br#"{"object_attributes":{"id":7,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"failed","source":"push"},"project":{"id":1},
            "builds":[{"name":"test","stage":"test","status":"success"},{"name":"greenlight/lint","stage":"test","status":"failed"}]}"#;
        assert_eq!(pipeline_of(red).unwrap().status, PipelineStatus::Failed);
        // Even filed under `external`, a job that names no agent is not one of our statuses.
        let external = br#"{"object_attributes":{"id":7,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"failed","source":"push"},"project":{"id":1},
            "builds":[{"name":"test","stage":"test","status":"success"},{"name":"greenlight/lint","stage":"external","status":"failed"}]}"#;
        assert_eq!(
            pipeline_of(external).unwrap().status,
            PipelineStatus::Failed
        );
        // Beside our own failed status, the foreign job still decides.
        let both = br#"{"object_attributes":{"id":7,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"failed","source":"push"},"project":{"id":1},
            "builds":[{"name":"test","stage":"test","status":"success"},{"name":"greenlight/lint","stage":"test","status":"failed"},
                      {"name":"greenlight/staging","stage":"external","status":"failed"}]}"#;
        let pipeline = pipeline_of(both).unwrap();
        assert_eq!(pipeline.status, PipelineStatus::Failed);
        assert!(
            pipeline.passed_stages.is_empty(),
            "{:?}",
            pipeline.passed_stages
        );
        // Our own agent's context, deploy or preview, is still left out.
        let ours = br#"{"object_attributes":{"id":7,"ref":"main","sha":"1111111111111111111111111111111111111111","status":"failed","source":"push"},"project":{"id":1},
            "builds":[{"name":"test","stage":"test","status":"success"},{"name":"greenlight/staging","stage":"external","status":"failed"},
                      {"name":"greenlight/prod/preview","stage":"external","status":"failed"}]}"#;
        assert_eq!(pipeline_of(ours).unwrap().status, PipelineStatus::Success);
    }

    #[test]
    fn branch_deletion_has_no_after() {
        let body = br#"{"ref":"refs/heads/main","before":"1111111111111111111111111111111111111111","after":"0000000000000000000000000000000000000000","project":{"path_with_namespace":"g/a"}}"#;
        let fact = parse_event("Push Hook", body, NOW, &AGENTS)
            .unwrap()
            .unwrap();
        assert!(matches!(
            fact.kind,
            FactKind::Push(Push { after: None, .. })
        ));
    }

    use proptest::prelude::*;
    use serde_json::Value;

    /// JSON in the shape of a hook: the keys the parsers read, nested anyhow, holding values
    /// of every type, the plausible ones (SHAs, statuses, times, our contexts) included.
    fn hook_like() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[0-9a-fA-F]{0,66}".prop_map(Value::from),
            prop::sample::select(vec![
                "refs/heads/main",
                "refs/tags/v1",
                "main",
                "",
                "success",
                "failed",
                "running",
                "cancelled",
                "manual",
                "external",
                "push",
                "greenlight/prod",
                "greenlight/staging/preview",
                "greenlight/",
                "2026-11-26 10:05:00 UTC",
                "2026-11-26T10:05:00Z",
                "1999-12-31 23:59:59 UTC",
                "9999-12-31T23:59:59Z",
                "0000000000000000000000000000000000000000",
            ])
            .prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
        ];
        let key = prop::sample::select(vec![
            "ref",
            "before",
            "after",
            "project",
            "project_id",
            "id",
            "path_with_namespace",
            "object_attributes",
            "tag",
            "sha",
            "source",
            "status",
            "finished_at",
            "builds",
            "name",
            "stage",
            "allow_failure",
            "created_at",
            "started_at",
        ]);
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(key.clone(), inner, 0..8).prop_map(
                    |map| Value::Object(map.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                ),
            ]
        })
    }

    fn event() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("Push Hook".to_owned()),
            Just("Pipeline Hook".to_owned()),
            Just("Merge Request Hook".to_owned()),
            "\\PC{0,16}",
        ]
    }

    /// A GitLab time as hooks spell it, between 2000 and [`NOW`], and its value in ms.
    fn gitlab_time() -> impl Strategy<Value = (String, i64)> {
        (crate::trust::EARLIEST_TIME_MS / 1000..NOW / 1000).prop_map(|secs| {
            let at = std::time::UNIX_EPOCH + Duration::from_secs(secs as u64);
            let rfc3339 = humantime::format_rfc3339_seconds(at).to_string();
            let spelled = format!("{} UTC", rfc3339.trim_end_matches('Z').replace('T', " "));
            (spelled, secs * 1000)
        })
    }

    /// A project as a hook names it: its path, its id, or both.
    fn project() -> impl Strategy<Value = (Option<String>, Option<u64>)> {
        prop_oneof![
            ("[a-z0-9_.-]{1,12}(/[a-z0-9_.-]{1,12}){1,3}", any::<u64>())
                .prop_map(|(path, id)| (Some(path), Some(id))),
            "[a-z0-9_.-]{1,12}/[a-z0-9_.-]{1,12}".prop_map(|path| (Some(path), None)),
            any::<u64>().prop_map(|id| (None, Some(id))),
        ]
    }

    fn project_json(path: &Option<String>, id: Option<u64>) -> Value {
        json!({ "path_with_namespace": path, "id": id })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_webhook_parsers(
            event in event(),
            body in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            let _ = parse_event(&event, &body, NOW, &AGENTS);
            let _ = parse_event("Push Hook", &body, NOW, &AGENTS);
            let _ = parse_event("Pipeline Hook", &body, NOW, &AGENTS);
            let _ = parse_preview(&event, &body);
            let _ = parse_preview("Merge Request Hook", &body);
        }

        #[test]
        fn arbitrary_hook_shaped_json_never_panics_the_webhook_parsers(
            event in event(),
            hook in hook_like(),
            now in any::<i64>(),
        ) {
            let body = serde_json::to_vec(&hook).unwrap();
            let _ = parse_event(&event, &body, now, &AGENTS);
            let _ = parse_event("Push Hook", &body, NOW, &AGENTS);
            let _ = parse_event("Pipeline Hook", &body, now, &AGENTS);
        }

        #[test]
        fn a_valid_push_parses_to_the_values_it_was_built_from(
            branch in "\\PC{1,40}",
            before in prop::option::of(prop_oneof!["[0-9a-fA-F]{40}", Just("0".repeat(40))]),
            after in "[0-9a-fA-F]{40}",
            (path, id) in project(),
            id_at_top in any::<bool>(),
        ) {
            let mut hook = json!({ "ref": format!("refs/heads/{branch}"), "after": after });
            if let Some(before) = &before {
                hook["before"] = json!(before);
            }
            if id_at_top {
                hook["project"] = json!({ "path_with_namespace": path });
                hook["project_id"] = json!(id);
            } else {
                hook["project"] = project_json(&path, id);
            }
            let body = serde_json::to_vec(&hook).unwrap();
            let fact = parse_event("Push Hook", &body, NOW, &AGENTS).unwrap().unwrap();
            prop_assert_eq!(fact.origin, Origin::GitLabHook);
            prop_assert_eq!(&fact.branch, &branch);
            prop_assert_eq!(&fact.project_path, &path);
            prop_assert_eq!(fact.project_id, id);
            let FactKind::Push(push) = fact.kind else { panic!("not a push") };
            let parsed = |sha: &str| Sha::parse(&sha.to_ascii_lowercase()).unwrap();
            prop_assert_eq!(push.after, Some(parsed(&after)));
            let before = before.filter(|b| b.bytes().any(|c| c != b'0'));
            prop_assert_eq!(push.before, before.as_deref().map(parsed).map_or(Before::Created, Before::Head));
        }

        #[test]
        fn a_valid_pipeline_parses_to_the_values_it_was_built_from(
            id in 1..=crate::trust::MAX_PIPELINE_ID,
            branch in "[a-z0-9][a-z0-9/._-]{0,30}",
            full_ref in any::<bool>(),
            sha in "[0-9a-f]{40}|[0-9a-f]{64}",
            status in prop::sample::select(PipelineStatus::ALL.to_vec()),
            source in prop::sample::select(vec!["push", "web", "schedule", "merge_request_event", "api"]),
            finished_at in prop::option::of(gitlab_time()),
            (path, project_id) in project(),
            builds in prop::collection::vec(
                (
                    "[a-z][a-z0-9 :_-]{0,12}",
                    prop::sample::select(vec!["build", "test", "deploy"]),
                    prop::sample::select(PipelineStatus::ALL.to_vec()),
                    any::<bool>(),
                ),
                0..12,
            ),
        ) {
            let git_ref = if full_ref { format!("refs/heads/{branch}") } else { branch.clone() };
            let jobs: Vec<Value> = builds
                .iter()
                .map(|(name, stage, status, allow_failure)| {
                    json!({ "name": name, "stage": stage, "status": status.as_str(), "allow_failure": allow_failure })
                })
                .collect();
            let hook = json!({
                "object_attributes": {
                    "id": id, "ref": git_ref, "tag": false, "sha": sha, "source": source,
                    "status": status.as_str(), "finished_at": finished_at.as_ref().map(|(t, _)| t),
                },
                "project": project_json(&path, project_id),
                "builds": jobs,
            });
            let body = serde_json::to_vec(&hook).unwrap();
            let fact = parse_event("Pipeline Hook", &body, NOW, &AGENTS).unwrap().unwrap();
            prop_assert_eq!(&fact.branch, &branch);
            prop_assert_eq!(&fact.project_path, &path);
            prop_assert_eq!(fact.project_id, project_id);
            let FactKind::Pipeline { sha: parsed, pipeline } = fact.kind else { panic!("not a pipeline") };
            prop_assert_eq!(parsed.as_str(), sha.as_str());
            prop_assert_eq!(pipeline.id, id);
            prop_assert_eq!(pipeline.status, status);
            prop_assert_eq!(&pipeline.source, source);
            // No job carries a time: a final result is as of its finish, a running one unknown.
            let as_of = finished_at.map(|(_, ms)| ms).filter(|_| status.is_final());
            prop_assert_eq!(pipeline.as_of_ms, as_of);
            for stage in ["build", "test", "deploy"] {
                let jobs: Vec<_> = builds.iter().filter(|b| b.1 == stage).collect();
                let all_succeeded = !jobs.is_empty() && jobs.iter().all(|b| b.2 == PipelineStatus::Success);
                let one_failed = jobs.iter().any(|b| b.2 == PipelineStatus::Failed && !b.3);
                let passed = pipeline.passed_stages.iter().any(|s| s == stage);
                prop_assert!(!all_succeeded || passed, "{stage} succeeded: {:?}", pipeline.passed_stages);
                prop_assert!(!one_failed || !passed, "{stage} failed: {:?}", pipeline.passed_stages);
                prop_assert!(!jobs.is_empty() || !passed, "{stage} has no job: {:?}", pipeline.passed_stages);
            }
        }

        #[test]
        fn a_merge_request_hook_parses_to_the_head_it_was_built_from(
            iid in 1u64..1_000_000,
            target in "[a-z0-9][a-z0-9/._-]{0,30}",
            sha in "[0-9a-f]{40}",
            action in prop::sample::select(vec!["open", "update", "reopen", "close", "merge", "approved"]),
            (path, project_id) in project(),
        ) {
            let hook = json!({
                "object_kind": "merge_request",
                "project": project_json(&path, project_id),
                "object_attributes": {
                    "iid": iid, "target_branch": target, "source_branch": "feature",
                    "action": action, "state": "opened", "last_commit": { "id": sha },
                },
            });
            let body = serde_json::to_vec(&hook).unwrap();
            let trigger = parse_preview("Merge Request Hook", &body).unwrap();
            if PREVIEW_ACTIONS.contains(&action) {
                let trigger = trigger.expect("a head to preview");
                prop_assert_eq!(trigger.merge_request_iid, iid);
                prop_assert_eq!(&trigger.target_branch, &target);
                prop_assert_eq!(&trigger.sha, &sha);
                prop_assert_eq!(&trigger.project_path, &path);
                prop_assert_eq!(trigger.project_id, project_id);
            } else {
                prop_assert!(trigger.is_none(), "{action} brings no head");
            }
        }

        #[test]
        fn only_merge_request_pipelines_ask_for_previews(
            iid in 1u64..1_000_000,
            target in "[a-z0-9][a-z0-9/._-]{0,30}",
            sha in "[0-9a-f]{40}",
            source in prop::sample::select(vec!["push", "web", "merge_request_event", "external"]),
            with_mr in any::<bool>(),
            (path, project_id) in project(),
        ) {
            let mut hook = json!({
                "object_attributes": {
                    "id": 5, "ref": "refs/merge-requests/1/head", "tag": false, "sha": sha,
                    "source": source, "status": "running",
                },
                "project": project_json(&path, project_id),
                "builds": [],
            });
            if with_mr {
                hook["merge_request"] = json!({ "iid": iid, "target_branch": target, "source_branch": "f" });
            }
            let body = serde_json::to_vec(&hook).unwrap();
            let trigger = parse_preview("Pipeline Hook", &body).unwrap();
            if with_mr && source == "merge_request_event" {
                let trigger = trigger.expect("a head to preview");
                prop_assert_eq!(trigger.merge_request_iid, iid);
                prop_assert_eq!(&trigger.target_branch, &target);
                prop_assert_eq!(&trigger.sha, &sha);
            } else {
                prop_assert!(trigger.is_none());
            }
        }
    }
}
