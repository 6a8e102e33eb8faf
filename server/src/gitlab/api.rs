//! The GitLab REST API calls the server makes: commit statuses and catch-up reads.

use std::time::{Duration, UNIX_EPOCH};

use serde::Deserialize;

use crate::config::Secret;
use crate::gate::{PipelineStatus, aggregate_named_jobs};

/// GitLab's limit on a commit status description.
pub const MAX_DESCRIPTION: usize = 255;

/// Why a GitLab API call failed.
#[derive(Debug, thiserror::Error)]
pub enum GitLabError {
    #[error("GitLab API request failed: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("GitLab API answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("invalid GitLab URL {0}")]
    Url(String),
    #[error("pipeline {0} lists more than {max} jobs", max = crate::trust::MAX_JOBS)]
    TooManyJobs(u64),
}

impl GitLabError {
    /// Whether trying again later can help (server errors, rate limits, the network).
    pub fn retryable(&self) -> bool {
        match self {
            GitLabError::Transport(_) => true,
            GitLabError::Status { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408
            }
            GitLabError::Url(_) | GitLabError::TooManyJobs(_) => false,
        }
    }
}

/// A commit status as GitLab's statuses API takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitStatus {
    /// pending, running, success, failed or canceled.
    pub state: &'static str,
    /// The context: one per agent, so clusters never overwrite each other.
    pub name: String,
    pub description: String,
    pub target_url: Option<String>,
    /// The pipeline that opened the gate: the status joins it as an external job instead of
    /// making GitLab create an `external` pipeline.
    pub pipeline_id: Option<u64>,
    /// The branch, so GitLab files the status under the ref the agent watches.
    pub git_ref: Option<String>,
}

/// A pipeline as `GET /projects/:id/pipelines` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiPipeline {
    pub id: u64,
    pub sha: String,
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub status: String,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
}

/// A CI job as `GET /projects/:id/pipelines/:pipeline_id/jobs` lists it: commit statuses
/// (ours among them) are not jobs, so the jobs tell the pipeline's status without them.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiJob {
    pub status: String,
    #[serde(default)]
    pub allow_failure: bool,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
}

impl ApiJob {
    /// The status `jobs` give their pipeline; `None` for no job GitLab's rules can weigh.
    pub fn pipeline_status(jobs: &[ApiJob]) -> Option<PipelineStatus> {
        aggregate_named_jobs(
            jobs.iter()
                .map(|job| (job.status.as_str(), job.allow_failure)),
        )
    }

    /// When any of `jobs` last started or finished (Unix ms).
    pub fn last_activity(jobs: &[ApiJob]) -> Option<i64> {
        jobs.iter()
            .flat_map(|job| [&job.started_at, &job.finished_at])
            .filter_map(|at| at.as_deref().and_then(parse_gitlab_time))
            .max()
    }
}

#[derive(Deserialize)]
struct ApiNote {
    id: u64,
}

/// A commit status as `GET /projects/:id/repository/commits/:sha/statuses` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct ApiCommitStatus {
    /// Grows with each status GitLab creates; absent, the list's own order tells.
    #[serde(default)]
    pub id: u64,
    pub name: String,
    /// pending, running, success, failed or canceled.
    pub status: String,
}

#[derive(Deserialize)]
struct ApiBranch {
    commit: ApiCommit,
}

#[derive(Deserialize)]
struct ApiCommit {
    id: String,
}

/// A client of one GitLab instance.
#[derive(Clone)]
pub struct GitLab {
    http: reqwest::Client,
    api: reqwest::Url,
    token: Secret,
}

impl GitLab {
    /// A client of the GitLab at `url` authenticating with `token`.
    pub fn new(url: &str, token: Secret) -> Result<Self, GitLabError> {
        let mut api = reqwest::Url::parse(url.trim_end_matches('/'))
            .map_err(|_| GitLabError::Url(url.to_owned()))?;
        if api.cannot_be_a_base() {
            return Err(GitLabError::Url(url.to_owned()));
        }
        api.path_segments_mut()
            .map_err(|_| GitLabError::Url(url.to_owned()))?
            .pop_if_empty()
            .extend(["api", "v4"]);
        greenlight::tls::install_ring();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self { http, api, token })
    }

    /// `…/api/v4/projects/<project>/<rest…>`, the project path encoded as one segment.
    fn url(&self, project: &str, rest: &[&str]) -> Result<reqwest::Url, GitLabError> {
        let mut url = self.api.clone();
        url.path_segments_mut()
            .map_err(|_| GitLabError::Url(self.api.to_string()))?
            .push("projects")
            .push(project)
            .extend(rest);
        Ok(url)
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, GitLabError> {
        let response = request
            .header("PRIVATE-TOKEN", self.token.expose())
            .send()
            .await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        Err(GitLabError::Status {
            status: status.as_u16(),
            body: body.chars().take(300).collect(),
        })
    }

    /// Posts `status` on commit `sha` of `project`.
    pub async fn post_status(
        &self,
        project: &str,
        sha: &str,
        status: &CommitStatus,
    ) -> Result<(), GitLabError> {
        let url = self.url(project, &["statuses", sha])?;
        let mut form = vec![
            ("state", status.state.to_owned()),
            ("name", status.name.clone()),
            (
                "description",
                truncate(&status.description, MAX_DESCRIPTION),
            ),
        ];
        if let Some(target) = &status.target_url {
            form.push(("target_url", target.clone()));
        }
        if let Some(id) = status.pipeline_id {
            form.push(("pipeline_id", id.to_string()));
        }
        if let Some(git_ref) = &status.git_ref {
            form.push(("ref", git_ref.clone()));
        }
        self.send(self.http.post(url).form(&form)).await?;
        Ok(())
    }

    /// Every status named `name` on commit `sha` of `project`, older attempts included
    /// (the first hundred: the newest, on GitLab 17.8 and later, which sorts them).
    pub async fn commit_statuses(
        &self,
        project: &str,
        sha: &str,
        name: &str,
    ) -> Result<Vec<ApiCommitStatus>, GitLabError> {
        let mut url = self.url(project, &["repository", "commits", sha, "statuses"])?;
        url.query_pairs_mut()
            .append_pair("name", name)
            .append_pair("all", "true")
            .append_pair("order_by", "id")
            .append_pair("sort", "desc")
            .append_pair("per_page", "100");
        Ok(self.send(self.http.get(url)).await?.json().await?)
    }

    /// Posts a note with `body` on merge request `iid` of `project`; returns its id.
    pub async fn post_note(&self, project: &str, iid: u64, body: &str) -> Result<u64, GitLabError> {
        let url = self.url(project, &["merge_requests", &iid.to_string(), "notes"])?;
        let response = self
            .send(self.http.post(url).form(&[("body", body)]))
            .await?;
        Ok(response.json::<ApiNote>().await?.id)
    }

    /// Replaces the body of note `id` on merge request `iid` of `project`; `false` when the
    /// note is gone (someone deleted it).
    pub async fn edit_note(
        &self,
        project: &str,
        iid: u64,
        id: u64,
        body: &str,
    ) -> Result<bool, GitLabError> {
        let url = self.url(
            project,
            &["merge_requests", &iid.to_string(), "notes", &id.to_string()],
        )?;
        match self.send(self.http.put(url).form(&[("body", body)])).await {
            Ok(_) => Ok(true),
            Err(GitLabError::Status { status: 404, .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The commit `branch` of `project` points to now.
    pub async fn branch_head(
        &self,
        project: &str,
        branch: &str,
    ) -> Result<Option<String>, GitLabError> {
        let url = self.url(project, &["repository", "branches", branch])?;
        match self.send(self.http.get(url)).await {
            Ok(response) => Ok(Some(response.json::<ApiBranch>().await?.commit.id)),
            Err(GitLabError::Status { status: 404, .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Pipeline `id` of `project`, `None` when GitLab has no such pipeline.
    pub async fn pipeline(
        &self,
        project: &str,
        id: u64,
    ) -> Result<Option<ApiPipeline>, GitLabError> {
        let url = self.url(project, &["pipelines", &id.to_string()])?;
        match self.send(self.http.get(url)).await {
            Ok(response) => Ok(Some(response.json().await?)),
            Err(GitLabError::Status { status: 404, .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The CI jobs of pipeline `id` of `project` (latest attempts), trigger jobs among them:
    /// GitLab lists those apart (`…/bridges`), and a downstream pipeline that failed fails
    /// its trigger job and with it the pipeline.
    pub async fn pipeline_jobs(&self, project: &str, id: u64) -> Result<Vec<ApiJob>, GitLabError> {
        let mut jobs = self.pipeline_list(project, id, "jobs", Vec::new()).await?;
        jobs = self.pipeline_list(project, id, "bridges", jobs).await?;
        Ok(jobs)
    }

    /// `jobs` and every page of list `list` (`jobs` or `bridges`) of pipeline `id`.
    async fn pipeline_list(
        &self,
        project: &str,
        id: u64,
        list: &str,
        mut jobs: Vec<ApiJob>,
    ) -> Result<Vec<ApiJob>, GitLabError> {
        // A page of GitLab's holds 100 at most: the status of a larger pipeline needs them all.
        const PER_PAGE: usize = 100;
        for page in 1..=crate::trust::MAX_JOBS / PER_PAGE + 1 {
            let mut url = self.url(project, &["pipelines", &id.to_string(), list])?;
            url.query_pairs_mut()
                .append_pair("per_page", &PER_PAGE.to_string())
                .append_pair("page", &page.to_string());
            let listed: Vec<ApiJob> = self.send(self.http.get(url)).await?.json().await?;
            let last = listed.len() < PER_PAGE;
            jobs.extend(listed);
            if jobs.len() > crate::trust::MAX_JOBS {
                break;
            }
            if last {
                return Ok(jobs);
            }
        }
        Err(GitLabError::TooManyJobs(id))
    }

    /// The newest pipelines of `branch` of `project`, newest first.
    pub async fn pipelines(
        &self,
        project: &str,
        branch: &str,
    ) -> Result<Vec<ApiPipeline>, GitLabError> {
        let mut url = self.url(project, &["pipelines"])?;
        url.query_pairs_mut()
            .append_pair("ref", branch)
            .append_pair("order_by", "id")
            .append_pair("sort", "desc")
            .append_pair("per_page", "20");
        Ok(self.send(self.http.get(url)).await?.json().await?)
    }
}

/// GitLab writes `2016-08-12 15:26:29 UTC` in hooks and RFC 3339 in its API.
pub fn parse_gitlab_time(value: &str) -> Option<i64> {
    let value = value.trim();
    let time = match value.strip_suffix(" UTC") {
        Some(naive) => humantime::parse_rfc3339_weak(naive).ok()?,
        None => humantime::parse_rfc3339_weak(value.trim_end_matches('Z')).ok()?,
    };
    i64::try_from(time.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()
}

/// Cuts `text` to at most `max` characters, marking the cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// A client of a GitLab that `app` plays on a loopback port, and the task serving it.
#[cfg(test)]
pub(crate) async fn serving(app: axum::Router) -> (GitLab, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let gitlab = GitLab::new(&format!("http://{address}"), Secret::new("token")).unwrap();
    (gitlab, server)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitLab serving `total` jobs of every pipeline, 100 a page at most, the one at
    /// `failing` failed and the rest passed, and the trigger jobs `bridges`.
    async fn paged_gitlab(
        total: usize,
        failing: usize,
        bridges: serde_json::Value,
    ) -> (GitLab, tokio::task::JoinHandle<()>) {
        use axum::extract::Query;
        let app = axum::Router::new()
            .route(
                "/api/v4/projects/{project}/pipelines/{id}/bridges",
                axum::routing::get(move || {
                    let bridges = bridges.clone();
                    async move { axum::Json(bridges) }
                }),
            )
            .route(
            "/api/v4/projects/{project}/pipelines/{id}/jobs",
            axum::routing::get(
                move |Query(query): Query<std::collections::HashMap<String, usize>>| async move {
                    let per_page = query.get("per_page").copied().unwrap_or(20).min(100);
                    let page = query.get("page").copied().unwrap_or(1).max(1);
                    let jobs: Vec<serde_json::Value> = ((page - 1) * per_page..total)
                        .take(per_page)
                        .map(|at| {
                            let status = if at == failing { "failed" } else { "success" };
                            serde_json::json!({ "status": status,
                                "finished_at": format!("2026-11-26T10:{:02}:00Z", at % 60) })
                        })
                        .collect();
                    axum::Json(jobs)
                },
            ),
        );
        serving(app).await
    }

    #[tokio::test]
    async fn a_pipelines_jobs_are_read_past_the_first_page() {
        let (gitlab, server) = paged_gitlab(250, 230, serde_json::json!([])).await;
        let jobs = gitlab.pipeline_jobs("42", 7).await.unwrap();
        assert_eq!(jobs.len(), 250);
        assert_eq!(ApiJob::pipeline_status(&jobs), Some(PipelineStatus::Failed));
        assert_eq!(
            ApiJob::last_activity(&jobs),
            parse_gitlab_time("2026-11-26T10:59:00Z")
        );
        server.abort();

        let (gitlab, server) =
            paged_gitlab(crate::trust::MAX_JOBS, usize::MAX, serde_json::json!([])).await;
        let jobs = gitlab.pipeline_jobs("42", 7).await.unwrap();
        assert_eq!(jobs.len(), crate::trust::MAX_JOBS);
        assert_eq!(
            ApiJob::pipeline_status(&jobs),
            Some(PipelineStatus::Success)
        );
        server.abort();

        // A trigger job whose downstream pipeline failed fails the pipeline of passed jobs.
        let failed_downstream = serde_json::json!([{ "status": "failed" }]);
        let (gitlab, server) = paged_gitlab(20, usize::MAX, failed_downstream).await;
        let jobs = gitlab.pipeline_jobs("42", 7).await.unwrap();
        assert_eq!(jobs.len(), 21);
        assert_eq!(ApiJob::pipeline_status(&jobs), Some(PipelineStatus::Failed));
        server.abort();

        let (gitlab, server) = paged_gitlab(
            crate::trust::MAX_JOBS + 1,
            usize::MAX,
            serde_json::json!([]),
        )
        .await;
        assert!(matches!(
            gitlab.pipeline_jobs("42", 7).await,
            Err(GitLabError::TooManyJobs(7))
        ));
        server.abort();
    }

    #[test]
    fn project_paths_are_one_url_segment() {
        let gitlab = GitLab::new("https://gitlab.example.com/", Secret::new("t")).unwrap();
        let url = gitlab.url("group/sub/app", &["statuses", "abc"]).unwrap();
        assert_eq!(
            url.as_str(),
            "https://gitlab.example.com/api/v4/projects/group%2Fsub%2Fapp/statuses/abc"
        );
        let gitlab = GitLab::new("https://example.com/gitlab", Secret::new("t")).unwrap();
        assert_eq!(
            gitlab.url("42", &["pipelines"]).unwrap().as_str(),
            "https://example.com/gitlab/api/v4/projects/42/pipelines"
        );
    }

    #[test]
    fn gitlab_times_parse_in_both_spellings() {
        assert_eq!(parse_gitlab_time("1970-01-01 00:00:01 UTC"), Some(1000));
        assert_eq!(parse_gitlab_time("1970-01-01T00:00:02Z"), Some(2000));
        assert_eq!(parse_gitlab_time("yesterday"), None);
    }

    #[test]
    fn descriptions_are_cut_to_gitlabs_limit() {
        let long = "x".repeat(300);
        let cut = truncate(&long, MAX_DESCRIPTION);
        assert_eq!(cut.chars().count(), MAX_DESCRIPTION);
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short", MAX_DESCRIPTION), "short");
    }

    #[test]
    fn only_transient_errors_are_retried() {
        let status = |status| GitLabError::Status {
            status,
            body: String::new(),
        };
        assert!(status(502).retryable());
        assert!(status(429).retryable());
        assert!(!status(404).retryable());
        assert!(!status(401).retryable());
    }
}
