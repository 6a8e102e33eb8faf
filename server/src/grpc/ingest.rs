//! `greenlight.v1.IngestService`: the same facts as GitLab's webhooks, from other CI systems.

use std::sync::Arc;

use greenlight::v1::{self, ingest_service_server::IngestService};
use tonic::{Request, Response, Status};

use super::{require_token, status_from_proto};
use crate::config::TokenHash;
use crate::engine::{Engine, Fact, FactKind, Recording};
use crate::gate::{Pipeline, Push, Sha};

/// Serves CI systems.
pub struct IngestApi {
    engine: Arc<Engine>,
    token: Option<TokenHash>,
}

impl IngestApi {
    /// Requests must carry a bearer token hashing to `token`.
    pub fn new(engine: Arc<Engine>, token: Option<TokenHash>) -> Self {
        Self { engine, token }
    }

    async fn record(
        &self,
        fact: Fact,
        delivery: &str,
    ) -> Result<Response<v1::RecordResponse>, Status> {
        let delivery = Some(delivery.trim()).filter(|d| !d.is_empty());
        let outcome = match self.engine.record(fact, delivery).await? {
            Recording::Recorded => "recorded".to_owned(),
            Recording::Unchanged => "unchanged".to_owned(),
            Recording::Duplicate => "duplicate".to_owned(),
            Recording::Ignored(why) => format!("ignored: {why}"),
        };
        Ok(Response::new(v1::RecordResponse { outcome }))
    }
}

fn branch(value: &str) -> Result<String, Status> {
    let branch = value.strip_prefix("refs/heads/").unwrap_or(value);
    if branch.is_empty() || branch.starts_with("refs/") {
        return Err(Status::invalid_argument(format!(
            "ref {value:?} is not a branch"
        )));
    }
    Ok(branch.to_owned())
}

fn optional_sha(field: &str, value: &str) -> Result<Option<Sha>, Status> {
    if value.is_empty() {
        return Ok(None);
    }
    let sha = Sha::parse(value).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))?;
    Ok(Some(sha).filter(|s| !s.is_null()))
}

fn project(value: &str) -> Result<(Option<String>, Option<u64>), Status> {
    let value = value.trim().trim_matches('/');
    if value.is_empty() {
        return Err(Status::invalid_argument("project is required"));
    }
    Ok((Some(value.to_owned()), value.parse().ok()))
}

#[tonic::async_trait]
impl IngestService for IngestApi {
    async fn record_push(
        &self,
        request: Request<v1::RecordPushRequest>,
    ) -> Result<Response<v1::RecordResponse>, Status> {
        require_token(&request, self.token.as_ref(), "ingest")?;
        let request = request.into_inner();
        let (project_path, project_id) = project(&request.project)?;
        if request.after.is_empty() {
            return Err(Status::invalid_argument(
                "after is required (all zeros for a deleted branch)",
            ));
        }
        let push = Push {
            before: optional_sha("before", &request.before)?,
            after: optional_sha("after", &request.after)?,
            at_ms: crate::clock::now_ms(),
        };
        let fact = Fact {
            project_path,
            project_id,
            branch: branch(&request.r#ref)?,
            kind: FactKind::Push(push),
        };
        self.record(fact, &request.delivery_id).await
    }

    async fn record_pipeline(
        &self,
        request: Request<v1::RecordPipelineRequest>,
    ) -> Result<Response<v1::RecordResponse>, Status> {
        require_token(&request, self.token.as_ref(), "ingest")?;
        let request = request.into_inner();
        let (project_path, project_id) = project(&request.project)?;
        let sha = optional_sha("sha", &request.sha)?
            .ok_or_else(|| Status::invalid_argument("sha is required"))?;
        let status = status_from_proto(request.status())
            .ok_or_else(|| Status::invalid_argument("status is required"))?;
        if request.pipeline_id == 0 {
            return Err(Status::invalid_argument("pipeline_id is required"));
        }
        let pipeline = Pipeline {
            id: request.pipeline_id,
            status,
            source: request.source.clone(),
            as_of_ms: request.finished_at_unix_ms,
            passed_stages: request.passed_stages.clone(),
        };
        let fact = Fact {
            project_path,
            project_id,
            branch: branch(&request.r#ref)?,
            kind: FactKind::Pipeline { sha, pipeline },
        };
        self.record(fact, &request.delivery_id).await
    }
}
