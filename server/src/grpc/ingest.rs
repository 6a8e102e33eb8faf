//! `greenlight.v1.IngestService`: the same facts as GitLab's webhooks, from other CI systems.

use std::sync::Arc;

use greenlight::v1::{self, ingest_service_server::IngestService};
use tonic::{Request, Response, Status};

use super::{bearer, known, status_from_proto};
use crate::engine::{Engine, EngineError};
use crate::gate::{Before, Pipeline, Push, Sha};
use crate::ingest::{Fact, FactKind, Origin, Recording};
use crate::trust::{
    IngestToken, authorize_ingest, check_label, check_pipeline_id, check_stages, check_time,
};

/// Serves CI systems.
pub struct IngestApi {
    engine: Arc<Engine>,
    tokens: Vec<IngestToken>,
}

impl IngestApi {
    /// Requests must carry a bearer token hashing to one of `tokens`, scoped to the project.
    pub fn new(engine: Arc<Engine>, tokens: Vec<IngestToken>) -> Self {
        Self { engine, tokens }
    }

    /// Admits a request about `project` (normalized), or says why not.
    fn authorize<T>(&self, request: &Request<T>, project: &str) -> Result<(), Status> {
        let token = bearer(request).ok_or_else(|| {
            Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
        })?;
        authorize_ingest(&self.tokens, token, project).map_err(|refused| {
            if refused.unauthenticated() {
                Status::unauthenticated(refused.to_string())
            } else {
                Status::permission_denied(refused.to_string())
            }
        })
    }

    /// The root span of the trace that follows an ingested fact to the clusters.
    #[tracing::instrument(name = "ingest", skip_all, fields(trace_id))]
    async fn record(
        &self,
        fact: Fact,
        delivery: &str,
    ) -> Result<Response<v1::RecordResponse>, Status> {
        greenlight::telemetry::record_trace_id(&tracing::Span::current());
        let delivery = Some(delivery.trim()).filter(|d| !d.is_empty());
        if let Some(delivery) = delivery {
            check_label("delivery_id", delivery)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let recorded = self.engine.ingest().record(fact, delivery).await;
        let outcome = match recorded.map_err(EngineError::from)? {
            Recording::Recorded => "recorded".to_owned(),
            Recording::Unchanged => "unchanged".to_owned(),
            Recording::Duplicate => "duplicate".to_owned(),
            Recording::Ignored(why) => format!("ignored: {why}"),
            Recording::Contradicted(why) => format!("contradicted: {why}"),
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
    let sha =
        Sha::parse_full(value).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))?;
    Ok(Some(sha).filter(|s| !s.is_null()))
}

/// The project as agents spell it; an empty one is refused only after authentication.
fn normalized(value: &str) -> &str {
    value.trim().trim_matches('/')
}

fn project(value: &str) -> Result<(Option<String>, Option<u64>), Status> {
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
        self.authorize(&request, normalized(&request.get_ref().project))?;
        let request = request.into_inner();
        let (project_path, project_id) = project(normalized(&request.project))?;
        if request.after.is_empty() {
            return Err(Status::invalid_argument(
                "after is required (all zeros for a deleted branch)",
            ));
        }
        let push = Push {
            before: optional_sha("before", &request.before)?.map_or(Before::Created, Before::Head),
            after: optional_sha("after", &request.after)?,
            at_ms: crate::clock::now_ms(),
        };
        let fact = Fact {
            origin: Origin::Ingest,
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
        self.authorize(&request, normalized(&request.get_ref().project))?;
        let request = request.into_inner();
        let (project_path, project_id) = project(normalized(&request.project))?;
        let sha = optional_sha("sha", &request.sha)?
            .ok_or_else(|| Status::invalid_argument("sha is required"))?;
        let status = status_from_proto(known("status", request.status)?)
            .ok_or_else(|| Status::invalid_argument("status is required"))?;
        if request.pipeline_id == 0 {
            return Err(Status::invalid_argument("pipeline_id is required"));
        }
        check_pipeline_id(request.pipeline_id)
            .map_err(|e| Status::invalid_argument(format!("pipeline_id: {e}")))?;
        if let Some(at) = request.finished_at_unix_ms {
            check_time("finished_at_unix_ms", at, crate::clock::now_ms())
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        check_stages(request.passed_stages.iter().map(String::as_str))
            .map_err(|e| Status::invalid_argument(format!("passed_stages: {e}")))?;
        check_label("source", &request.source)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let pipeline = Pipeline {
            id: request.pipeline_id,
            status,
            source: request.source.clone(),
            as_of_ms: request.finished_at_unix_ms,
            passed_stages: request.passed_stages.clone(),
        };
        let fact = Fact {
            origin: Origin::Ingest,
            project_path,
            project_id,
            branch: branch(&request.r#ref)?,
            kind: FactKind::Pipeline { sha, pipeline },
        };
        self.record(fact, &request.delivery_id).await
    }
}
