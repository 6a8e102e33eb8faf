//! A fake GitLab REST API over real HTTP on loopback: records every request, accepts commit
//! statuses, and serves branch heads and pipelines from state the test sets.

use std::collections::HashMap;
use std::net::SocketAddr;
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

#[derive(Default)]
struct Inner {
    requests: Vec<RecordedRequest>,
    statuses: Vec<PostedStatus>,
    branches: HashMap<(String, String), String>,
    pipelines: HashMap<String, Vec<Value>>,
    fail: Option<u16>,
    next_id: u64,
}

type Shared = Arc<Mutex<Inner>>;

/// A fake GitLab listening on `127.0.0.1`; stops when dropped.
pub struct FakeGitLab {
    addr: SocketAddr,
    inner: Shared,
    handle: JoinHandle<()>,
}

impl FakeGitLab {
    /// Starts the fake on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner: Shared = Arc::default();
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            inner,
            handle,
        })
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

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FakeGitLab {
    fn drop(&mut self) {
        self.handle.abort();
    }
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
                    state.statuses.push(posted);
                    json_response(StatusCode::CREATED, body)
                }
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
