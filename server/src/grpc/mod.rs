//! gRPC services: map requests to the engine and domain values to `greenlight.v1`.

mod admin;
mod agent;
mod ingest;
mod rate;
mod registry;
mod streams;

pub use admin::AdminApi;
pub use agent::{AgentApi, file_chunks};
pub use ingest::IngestApi;

use greenlight::v1;
use tonic::Status;

use crate::engine::EngineError;
use crate::evaluate::EvaluateError;
use crate::gate::{Decision, GateError, Mode, Outcome, PipelineStatus, Revision};
use crate::store::StoreError;

/// The bearer token of a request, if it carries one.
fn bearer<T>(request: &tonic::Request<T>) -> Option<&str> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

impl From<EngineError> for Status {
    fn from(error: EngineError) -> Self {
        let message = error.to_string();
        match error {
            // Retrying cannot help: an operator must repair or delete the record.
            EngineError::Store(StoreError::Corrupt { .. })
            | EngineError::Evaluate(EvaluateError::Store(StoreError::Corrupt { .. })) => {
                Status::data_loss(message)
            }
            EngineError::Store(_) => Status::unavailable(message),
            EngineError::UnknownAgent(_) | EngineError::Replaced(_) => Status::not_found(message),
            EngineError::Evaluate(EvaluateError::Contention(_) | EvaluateError::Replaced(_)) => {
                Status::aborted(message)
            }
            EngineError::Evaluate(EvaluateError::Gate(
                GateError::AbbreviatedPin(_) | GateError::AbbreviatedTrigger(_),
            )) => Status::invalid_argument(message),
            EngineError::Evaluate(EvaluateError::Store(_)) => Status::unavailable(message),
            EngineError::Evaluate(EvaluateError::UnknownAgent(_)) => Status::not_found(message),
            EngineError::Evaluate(EvaluateError::Gate(_)) | EngineError::NotSent { .. } => {
                Status::failed_precondition(message)
            }
        }
    }
}

fn revision_to_proto(revision: &Revision) -> v1::Revision {
    v1::Revision {
        sha: revision.sha.to_string(),
        pipeline_id: revision.pipeline_id,
        reason: revision.reason.clone(),
        decided_at_unix_ms: revision.decided_at_ms,
        generation: revision.generation,
        force_prune: revision.force_prune,
    }
}

fn decision_to_proto(decision: &Decision) -> v1::Decision {
    let outcome = match decision.outcome {
        Outcome::Deploy => v1::decision::Outcome::Deploy,
        Outcome::Hold => v1::decision::Outcome::Hold,
        Outcome::Skip => v1::decision::Outcome::Skip,
    };
    v1::Decision {
        outcome: outcome.into(),
        sha: decision
            .sha
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        pipeline_id: decision.pipeline_id,
        reason: decision.reason.clone(),
        at_unix_ms: decision.at_ms,
    }
}

fn mode_to_proto(mode: Mode) -> v1::GateMode {
    match mode {
        Mode::Pipeline => v1::GateMode::Pipeline,
        Mode::Immediate => v1::GateMode::Immediate,
        Mode::Manual => v1::GateMode::Manual,
    }
}

fn status_to_proto(status: PipelineStatus) -> v1::PipelineStatus {
    use v1::PipelineStatus as P;
    match status {
        PipelineStatus::Created => P::Created,
        PipelineStatus::WaitingForResource => P::WaitingForResource,
        PipelineStatus::Preparing => P::Preparing,
        PipelineStatus::Pending => P::Pending,
        PipelineStatus::Running => P::Running,
        PipelineStatus::Success => P::Success,
        PipelineStatus::Failed => P::Failed,
        PipelineStatus::Canceled => P::Canceled,
        PipelineStatus::Skipped => P::Skipped,
        PipelineStatus::Manual => P::Manual,
        PipelineStatus::Scheduled => P::Scheduled,
    }
}

/// The largest ingest request: the most stages a pipeline may have passed, each of the
/// longest name, leave room to spare; anything larger is no fact.
pub const MAX_INGEST_REQUEST_BYTES: usize = 256 * 1024;

/// The value of enum field `field`, refusing one this version does not know: prost reads it
/// as the enum's unspecified value, which would pass it as "none".
fn known<E: TryFrom<i32>>(field: &str, value: i32) -> Result<E, Status> {
    E::try_from(value)
        .map_err(|_| Status::invalid_argument(format!("{field}: unknown value {value}")))
}

fn status_from_proto(status: v1::PipelineStatus) -> Option<PipelineStatus> {
    PipelineStatus::ALL
        .into_iter()
        .find(|s| status_to_proto(*s) == status)
}
