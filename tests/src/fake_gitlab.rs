//! A fake GitLab REST API over real HTTP on loopback: records every request, accepts commit
//! statuses, and serves branch heads and pipelines from state the test sets.
//!
//! Commit statuses behave as on GitLab: one posted with `pipeline_id` (or on a commit that
//! has a pipeline) becomes an external job of that pipeline and changes its status; one
//! posted on a commit without a pipeline creates a pipeline of source `external`. Either
//! way a Pipeline Hook goes to the webhook set with `set_webhook`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One request as the fake received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The HTTP method, such as `GET` or `POST`.
    pub method: String,
    /// The path exactly as sent, still percent-encoded.
    pub path: String,
    /// The project named in `/api/v4/projects/<project>/…`, decoded.
    pub project: Option<String>,
    /// The decoded query parameters, in order.
    pub query: Vec<(String, String)>,
    /// The decoded `application/x-www-form-urlencoded` body fields, in order.
    pub form: Vec<(String, String)>,
    /// The `PRIVATE-TOKEN` header, if sent.
    pub private_token: Option<String>,
    /// The HTTP status the fake answered with.
    pub answered: u16,
}

impl RecordedRequest {
    /// The value of form field `name`, if sent.
    pub fn form_field(&self, name: &str) -> Option<&str> {
        lookup(&self.form, name)
    }

    /// The value of query parameter `name`, if sent.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        lookup(&self.query, name)
    }
}

/// A commit status the fake accepted (answered 201).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostedStatus {
    /// The decoded project path or id.
    pub project: String,
    /// The commit the status is on.
    pub sha: String,
    /// pending, running, success, failed or canceled.
    pub state: String,
    /// The context (`greenlight/<agent>`).
    pub name: String,
    /// The description, empty when not sent.
    pub description: String,
    /// The link, if sent.
    pub target_url: Option<String>,
}

/// A note on a merge request, as the fake holds it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeRequestNote {
    pub id: u64,
    /// The decoded project path or id.
    pub project: String,
    pub merge_request_iid: u64,
    /// The body as last posted or edited.
    pub body: String,
    /// How many times it was edited after being posted.
    pub edits: u32,
    /// When it was posted or last edited.
    pub updated_at: std::time::Instant,
}

/// A Pipeline Hook the fake sent, and how the receiver answered.
#[derive(Debug, Clone, PartialEq)]
pub struct FiredHook {
    /// The payload.
    pub body: Value,
    /// The receiver's HTTP status, 0 when it could not be reached.
    pub answered: u16,
    /// The receiver's `outcome` field (`recorded`, `ignored`, …), empty if none.
    pub outcome: String,
}

/// Where pipeline hooks go: the URL and the `X-Gitlab-Token` to send.
type Webhook = (String, String);

#[derive(Default)]
struct Inner {
    requests: Vec<RecordedRequest>,
    statuses: Vec<PostedStatus>,
    notes: Vec<MergeRequestNote>,
    branches: HashMap<(String, String), String>,
    /// Per project, newest first, as the list API answers.
    pipelines: HashMap<String, Vec<Value>>,
    fail: Option<u16>,
    /// The next status posts to file and then answer with this code, and how many.
    answers_lost: Option<(u16, usize)>,
    next_id: u64,
    /// Ids of pipelines the fake creates: far above the ones tests choose.
    next_pipeline_id: u64,
    webhook: Option<Webhook>,
    hooks: Vec<FiredHook>,
    outbox: Option<tokio::sync::mpsc::UnboundedSender<(Webhook, Value)>>,
}

type Shared = Arc<Mutex<Inner>>;

/// A fake GitLab listening on `127.0.0.1`; stops when dropped.
pub struct FakeGitLab {
    addr: SocketAddr,
    inner: Shared,
    handle: JoinHandle<()>,
    sender: JoinHandle<()>,
    /// Holds the API token file a server is configured with.
    _secrets: tempfile::TempDir,
    token_file: PathBuf,
}

impl FakeGitLab {
    /// The API token in [`FakeGitLab::token_file`], which servers send as `PRIVATE-TOKEN`.
    pub const API_TOKEN: &str = "glpat-fake-api-token";

    /// Starts the fake on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner: Shared = Arc::default();
        let (outbox, hooks) = tokio::sync::mpsc::unbounded_channel();
        {
            let mut state = inner.lock().unwrap_or_else(|e| e.into_inner());
            state.outbox = Some(outbox);
            state.next_pipeline_id = 100_000;
        }
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let sender = tokio::spawn(send_hooks(inner.clone(), hooks));
        let secrets = tempfile::tempdir()?;
        let token_file = secrets.path().join("gitlab-token");
        std::fs::write(&token_file, format!("{}\n", Self::API_TOKEN))?;
        Ok(Self {
            addr,
            inner,
            handle,
            sender,
            _secrets: secrets,
            token_file,
        })
    }

    /// A file holding [`FakeGitLab::API_TOKEN`], for `gitlab.token_file`.
    pub fn token_file(&self) -> &Path {
        &self.token_file
    }

    /// The `gitlab:` line of a server config for this fake, with `extra` settings (each
    /// `, key: value`) after its URL and token file.
    pub fn config(&self, extra: &str) -> String {
        format!(
            "gitlab: {{ url: \"{}\", token_file: \"{}\"{extra} }}\n",
            self.url(),
            self.token_file.display()
        )
    }

    /// Sends a Pipeline Hook to `url` with `secret` whenever a status changes a pipeline.
    pub fn set_webhook(&self, url: &str, secret: &str) {
        self.lock().webhook = Some((url.to_owned(), secret.to_owned()));
    }

    /// Sets pipeline `pipeline["id"]` of `project` (id, sha, ref, status, source, builds[] of
    /// name, stage, status): a new one is the newest; an existing one keeps its jobs unless
    /// `pipeline` names some.
    pub fn put_pipeline(&self, project: &str, mut pipeline: Value) {
        let mut inner = self.lock();
        let pipelines = inner.pipelines.entry(project.to_owned()).or_default();
        match pipelines.iter_mut().find(|p| p["id"] == pipeline["id"]) {
            Some(existing) => {
                if pipeline.get("builds").is_none() {
                    pipeline["builds"] = existing["builds"].clone();
                }
                *existing = pipeline;
            }
            None => pipelines.insert(0, pipeline),
        }
    }

    /// The pipelines of `project` whose sha is `sha`, newest first.
    pub fn pipelines_for(&self, project: &str, sha: &str) -> Vec<Value> {
        self.lock()
            .pipelines
            .get(project)
            .into_iter()
            .flatten()
            .filter(|p| p["sha"].as_str() == Some(sha))
            .cloned()
            .collect()
    }

    /// Every Pipeline Hook sent so far, in order.
    pub fn hooks(&self) -> Vec<FiredHook> {
        self.lock().hooks.clone()
    }

    /// The base URL to configure as `gitlab.url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes `branch` of `project` point to `sha`.
    pub fn set_branch_head(&self, project: &str, branch: &str, sha: &str) {
        self.lock()
            .branches
            .insert((project.to_owned(), branch.to_owned()), sha.to_owned());
    }

    /// Sets the pipelines of `project` (objects with id, sha, ref, status, source, updated_at).
    pub fn set_pipelines(&self, project: &str, pipelines: Vec<Value>) {
        self.lock().pipelines.insert(project.to_owned(), pipelines);
    }

    /// While `Some(code)`, answers every request with that status; `None` serves again.
    pub fn fail_with(&self, status: Option<u16>) {
        self.lock().fail = status;
    }

    /// Files the next `posts` commit statuses and answers each with `code`, as a gateway
    /// in front of GitLab does when GitLab took the post but its answer was lost.
    pub fn lose_answers_to_posts(&self, code: u16, posts: usize) {
        self.lock().answers_lost = Some((code, posts));
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// Every commit status accepted so far, in arrival order.
    pub fn statuses(&self) -> Vec<PostedStatus> {
        self.lock().statuses.clone()
    }

    /// The accepted statuses of commit `sha` as (state, name, description), in arrival order.
    pub fn statuses_for(&self, sha: &str) -> Vec<(String, String, String)> {
        self.lock()
            .statuses
            .iter()
            .filter(|s| s.sha == sha)
            .map(|s| (s.state.clone(), s.name.clone(), s.description.clone()))
            .collect()
    }

    /// Status posts (accepted or not) received for commit `sha`.
    pub fn status_attempts(&self, sha: &str) -> Vec<RecordedRequest> {
        let suffix = format!("/statuses/{sha}");
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with(&suffix))
            .cloned()
            .collect()
    }

    /// Status posts, and reads of the statuses before posting again, received for commit
    /// `sha`.
    pub fn status_requests(&self, sha: &str) -> Vec<RecordedRequest> {
        let posted = format!("/statuses/{sha}");
        let listed = format!("/repository/commits/{sha}/statuses");
        self.lock()
            .requests
            .iter()
            .filter(|r| {
                (r.method == "POST" && r.path.ends_with(&posted))
                    || (r.method == "GET" && r.path.ends_with(&listed))
            })
            .cloned()
            .collect()
    }

    /// The notes on merge request `iid` of `project`, in the order they were posted.
    pub fn notes(&self, project: &str, iid: u64) -> Vec<MergeRequestNote> {
        self.lock()
            .notes
            .iter()
            .filter(|n| n.project == project && n.merge_request_iid == iid)
            .cloned()
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FakeGitLab {
    fn drop(&mut self) {
        self.handle.abort();
        self.sender.abort();
    }
}

/// Delivers hooks one at a time, in the order the statuses arrived, as GitLab's queue does.
async fn send_hooks(
    inner: Shared,
    mut hooks: tokio::sync::mpsc::UnboundedReceiver<(Webhook, Value)>,
) {
    crate::install_crypto();
    let Ok(client) = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
    else {
        return;
    };
    while let Some(((url, secret), body)) = hooks.recv().await {
        let sent = client
            .post(&url)
            .header("X-Gitlab-Event", "Pipeline Hook")
            .header("X-Gitlab-Token", &secret)
            .json(&body)
            .send()
            .await;
        let (answered, outcome) = match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let answer: Value = response.json().await.unwrap_or(Value::Null);
                (status, answer["outcome"].as_str().unwrap_or("").to_owned())
            }
            Err(_) => (0, String::new()),
        };
        inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .hooks
            .push(FiredHook {
                body,
                answered,
                outcome,
            });
    }
}

/// Pipeline `id` (as written in the URL) of `project`.
fn find_pipeline(state: &Inner, project: &str, id: &str) -> Option<Value> {
    state
        .pipelines
        .get(project)
        .into_iter()
        .flatten()
        .find(|p| p["id"].as_u64().map(|n| n.to_string()).as_deref() == Some(id))
        .cloned()
}

/// A pipeline's status from its jobs, as GitLab aggregates them.
fn aggregate(jobs: &[Value]) -> &'static str {
    let statuses: Vec<(&str, bool)> = jobs
        .iter()
        .map(|j| {
            (
                j["status"].as_str().unwrap_or("created"),
                j["allow_failure"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    let is_final = |s: &str| matches!(s, "success" | "failed" | "canceled" | "skipped");
    if statuses.iter().any(|(s, _)| !is_final(s)) {
        "running"
    } else if statuses
        .iter()
        .any(|(s, optional)| *s == "failed" && !optional)
    {
        "failed"
    } else if statuses.iter().any(|(s, _)| *s == "canceled") {
        "canceled"
    } else if !statuses.is_empty() && statuses.iter().all(|(s, _)| *s == "skipped") {
        "skipped"
    } else {
        "success"
    }
}

/// Files a commit status as GitLab does: as an external job of the pipeline named by
/// `pipeline_id`, else of the newest pipeline of the commit, else of a new `external`
/// pipeline. Returns the Pipeline Hook it fires; none for a `pipeline_id` the fake does not
/// hold (tests often deliver a pipeline by webhook only).
fn file_status(
    state: &mut Inner,
    project: &str,
    sha: &str,
    posted: &PostedStatus,
    form: &[(String, String)],
) -> Option<Value> {
    let pipeline_id = lookup(form, "pipeline_id").and_then(|id| id.parse::<u64>().ok());
    let git_ref = lookup(form, "ref");
    let next_id = state.next_pipeline_id;
    let pipelines = state.pipelines.entry(project.to_owned()).or_default();
    let found = pipelines.iter().position(|p| match pipeline_id {
        Some(id) => p["id"].as_u64() == Some(id),
        None => {
            p["sha"].as_str() == Some(sha) && git_ref.is_none_or(|r| p["ref"].as_str() == Some(r))
        }
    });
    let at = match (found, pipeline_id) {
        (Some(at), _) => at,
        (None, Some(_)) => return None,
        (None, None) => {
            state.next_pipeline_id += 1;
            pipelines.insert(
                0,
                json!({
                    "id": next_id, "sha": sha, "ref": git_ref.unwrap_or("main"),
                    "status": "pending", "source": "external", "builds": [],
                }),
            );
            0
        }
    };
    let pipeline = &mut pipelines[at];
    let job = json!({
        "name": posted.name, "stage": "external", "status": posted.state, "allow_failure": false,
    });
    let mut builds: Vec<Value> = pipeline["builds"].as_array().cloned().unwrap_or_default();
    // A newer status of the same context replaces the older job.
    match builds.iter_mut().find(|b| b["name"] == job["name"]) {
        Some(existing) => *existing = job,
        None => builds.push(job),
    }
    pipeline["status"] = aggregate(&builds).into();
    pipeline["builds"] = Value::Array(builds);
    let pipeline = pipeline.clone();
    let project_json = match project.parse::<u64>() {
        Ok(id) => json!({ "id": id }),
        Err(_) => json!({ "path_with_namespace": project }),
    };
    Some(json!({
        "object_kind": "pipeline",
        "object_attributes": {
            "id": pipeline["id"], "iid": pipeline["id"], "ref": pipeline["ref"], "tag": false,
            "sha": pipeline["sha"], "source": pipeline["source"], "status": pipeline["status"],
            "finished_at": null,
        },
        "project": project_json,
        "builds": pipeline["builds"],
    }))
}

fn lookup<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Decodes `%XX` escapes, and `+` as a space when `plus_is_space`.
fn percent_decode(text: &str, plus_is_space: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `a=1&b=2` with form decoding.
fn parse_pairs(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            (percent_decode(key, true), percent_decode(value, true))
        })
        .collect()
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn not_found(what: &str) -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        json!({ "message": format!("404 {what} Not Found") }),
    )
}

async fn handle(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let query = uri.query().map(parse_pairs).unwrap_or_default();
    let is_form = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let form = if is_form {
        parse_pairs(&String::from_utf8_lossy(&body))
    } else {
        Vec::new()
    };
    let private_token = headers
        .get("PRIVATE-TOKEN")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // ["api", "v4", "projects", <project>, rest…], each segment still encoded.
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let project = match segments.as_slice() {
        ["api", "v4", "projects", project, ..] => Some(percent_decode(project, false)),
        _ => None,
    };
    let rest: Vec<String> = segments
        .iter()
        .skip(4)
        .map(|s| percent_decode(s, false))
        .collect();

    let mut state = inner.lock().unwrap_or_else(|e| e.into_inner());
    let response = if let Some(code) = state.fail {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(status, json!({ "message": format!("{code} fake failure") }))
    } else {
        match (&method, project.as_deref(), rest.as_slice()) {
            (&Method::POST, Some(project), [statuses, sha]) if statuses == "statuses" => {
                let state_field = lookup(&form, "state").unwrap_or_default().to_owned();
                if state_field.is_empty() {
                    json_response(
                        StatusCode::BAD_REQUEST,
                        json!({ "error": "state is missing" }),
                    )
                } else {
                    state.next_id += 1;
                    let posted = PostedStatus {
                        project: project.to_owned(),
                        sha: sha.clone(),
                        state: state_field,
                        name: lookup(&form, "name").unwrap_or("default").to_owned(),
                        description: lookup(&form, "description").unwrap_or_default().to_owned(),
                        target_url: lookup(&form, "target_url").map(str::to_owned),
                    };
                    let body = json!({
                        "id": state.next_id,
                        "sha": posted.sha,
                        "status": posted.state,
                        "name": posted.name,
                        "description": posted.description,
                        "target_url": posted.target_url,
                        "created_at": "2026-11-26T10:00:00.000Z",
                    });
                    let hook = file_status(&mut state, project, sha, &posted, &form);
                    if let (Some(hook), Some(webhook), Some(outbox)) =
                        (hook, &state.webhook, &state.outbox)
                    {
                        let _ = outbox.send((webhook.clone(), hook));
                    }
                    state.statuses.push(posted);
                    match &mut state.answers_lost {
                        Some((code, left)) if *left > 0 => {
                            *left -= 1;
                            let status = StatusCode::from_u16(*code)
                                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                            json_response(status, json!({ "message": "fake gateway error" }))
                        }
                        _ => json_response(StatusCode::CREATED, body),
                    }
                }
            }
            (&Method::POST, Some(project), [mrs, iid, notes])
                if mrs == "merge_requests" && notes == "notes" =>
            {
                match (iid.parse::<u64>(), lookup(&form, "body")) {
                    (Ok(iid), Some(body)) if !body.is_empty() => {
                        state.next_id += 1;
                        let note = MergeRequestNote {
                            id: state.next_id,
                            project: project.to_owned(),
                            merge_request_iid: iid,
                            body: body.to_owned(),
                            edits: 0,
                            updated_at: std::time::Instant::now(),
                        };
                        let answer = json!({ "id": note.id, "body": note.body });
                        state.notes.push(note);
                        json_response(StatusCode::CREATED, answer)
                    }
                    _ => json_response(
                        StatusCode::BAD_REQUEST,
                        json!({ "error": "body is missing" }),
                    ),
                }
            }
            (&Method::PUT, Some(project), [mrs, iid, notes, id])
                if mrs == "merge_requests" && notes == "notes" =>
            {
                let body = lookup(&form, "body").unwrap_or_default().to_owned();
                let found = state.notes.iter_mut().find(|n| {
                    n.project == project
                        && n.merge_request_iid.to_string() == *iid
                        && n.id.to_string() == *id
                });
                match found {
                    Some(note) => {
                        note.body = body;
                        note.edits += 1;
                        note.updated_at = std::time::Instant::now();
                        json_response(StatusCode::OK, json!({ "id": note.id, "body": note.body }))
                    }
                    None => not_found("Note"),
                }
            }
            (&Method::GET, Some(project), [repository, commits, sha, statuses])
                if repository == "repository" && commits == "commits" && statuses == "statuses" =>
            {
                // Every post is kept, so this answers as GitLab does with `all=true`.
                let wanted_name = lookup(&query, "name");
                // Ids as GitLab's grow, here with the arrival order.
                let mut list: Vec<Value> = state
                    .statuses
                    .iter()
                    .zip(1u64..)
                    .filter(|(s, _)| s.project == project && s.sha == *sha)
                    .filter(|(s, _)| wanted_name.is_none_or(|name| s.name == name))
                    .map(|(s, id)| json!({ "id": id, "sha": s.sha, "name": s.name, "status": s.state }))
                    .collect();
                if lookup(&query, "sort") == Some("desc") {
                    list.reverse();
                }
                json_response(StatusCode::OK, Value::Array(list))
            }
            (&Method::GET, Some(project), [repository, branches, branch])
                if repository == "repository" && branches == "branches" =>
            {
                match state
                    .branches
                    .get(&(project.to_owned(), branch.clone()))
                    .cloned()
                {
                    Some(sha) => json_response(
                        StatusCode::OK,
                        json!({ "name": branch, "commit": { "id": sha, "short_id": &sha[..sha.len().min(8)] } }),
                    ),
                    None => not_found("Branch"),
                }
            }
            (&Method::GET, Some(project), [pipelines]) if pipelines == "pipelines" => {
                let wanted_ref = lookup(&query, "ref");
                let per_page = lookup(&query, "per_page")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(20usize);
                let list: Vec<Value> = state
                    .pipelines
                    .get(project)
                    .into_iter()
                    .flatten()
                    .filter(|p| wanted_ref.is_none_or(|r| p["ref"].as_str() == Some(r)))
                    .take(per_page)
                    .cloned()
                    .collect();
                json_response(StatusCode::OK, Value::Array(list))
            }
            (&Method::GET, Some(project), [pipelines, id, jobs])
                if pipelines == "pipelines" && jobs == "jobs" =>
            {
                let found = find_pipeline(&state, project, id);
                match found {
                    // Commit statuses (stage `external` here) are not CI jobs.
                    Some(pipeline) => {
                        let jobs: Vec<Value> = pipeline["builds"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|b| b["stage"] != "external")
                            .cloned()
                            .collect();
                        json_response(StatusCode::OK, Value::Array(jobs))
                    }
                    None => not_found("Pipeline"),
                }
            }
            // Trigger jobs, which the jobs list leaves out: a pipeline's `bridges`.
            (&Method::GET, Some(project), [pipelines, id, bridges])
                if pipelines == "pipelines" && bridges == "bridges" =>
            {
                match find_pipeline(&state, project, id) {
                    Some(pipeline) => {
                        let bridges = pipeline["bridges"].as_array().cloned().unwrap_or_default();
                        json_response(StatusCode::OK, Value::Array(bridges))
                    }
                    None => not_found("Pipeline"),
                }
            }
            (&Method::GET, Some(project), [pipelines, id]) if pipelines == "pipelines" => {
                let found = find_pipeline(&state, project, id);
                match found {
                    Some(pipeline) => json_response(StatusCode::OK, pipeline),
                    None => not_found("Pipeline"),
                }
            }
            _ => not_found("Route"),
        }
    };
    state.requests.push(RecordedRequest {
        method: method.to_string(),
        path,
        project,
        query,
        form,
        private_token,
        answered: response.status().as_u16(),
    });
    response
}
