//! `greenlight.v1.AgentService`: the stream of desired revisions and the status reports.

use std::sync::Arc;

use greenlight::digest::ContentDigest;
use greenlight::v1::{self, agent_service_server::AgentService, sync_event::Event};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span};

use super::{bearer, revision_to_proto};
use crate::catalog::ref_key;
use crate::clock::now_ms;
use crate::config::AgentSpec;
use crate::engine::Engine;
use crate::gate::{Revision, Sha};

/// Messages buffered per stream: a slow agent holds at most this many, and blocks only itself.
const STREAM_BUFFER: usize = 16;

/// Serves agents.
pub struct AgentApi {
    engine: Arc<Engine>,
    shutdown: CancellationToken,
}

impl AgentApi {
    /// Streams end when `shutdown` fires, so agents reconnect to another replica.
    pub fn new(engine: Arc<Engine>, shutdown: CancellationToken) -> Self {
        Self { engine, shutdown }
    }

    fn authenticate<T>(&self, request: &Request<T>) -> Result<AgentSpec, Status> {
        let token = bearer(request).ok_or_else(|| {
            Status::unauthenticated("missing `authorization: Bearer <agent token>` metadata")
        })?;
        self.engine
            .catalog()
            .agent_by_token(token)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown agent token"))
    }
}

/// The messages that carry one revision to an agent.
fn revision_events(agent: &AgentSpec, revision: &Revision) -> Vec<v1::SyncEvent> {
    let header = v1::RevisionHeader {
        revision: Some(revision_to_proto(revision)),
        project: agent.project.clone(),
        r#ref: agent.branch.clone(),
        file_count: 0,
        total_bytes: 0,
        settings: Some(v1::ApplySettings {
            default_namespace: "default".into(),
            prune: true,
            prune_propagation_policy: "background".into(),
            dry_run_strategy: "none".into(),
            health_timeout_seconds: 300,
            reconcile_interval_seconds: 300,
            force_conflicts: true,
        }),
    };
    let trailer = v1::RevisionTrailer {
        content_sha256: ContentDigest::new().finish(),
    };
    vec![
        v1::SyncEvent {
            event: Some(Event::Header(header)),
        },
        v1::SyncEvent {
            event: Some(Event::Trailer(trailer)),
        },
    ]
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SyncStream = ReceiverStream<Result<v1::SyncEvent, Status>>;

    async fn sync(
        &self,
        request: Request<v1::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let agent = self.authenticate(&request)?;
        let request = request.into_inner();
        let applied = match request
            .applied_revision
            .as_deref()
            .filter(|s| !s.is_empty())
        {
            None => None,
            Some(sha) => Some(
                Sha::parse(sha)
                    .map_err(|e| Status::invalid_argument(format!("applied_revision: {e}")))?,
            ),
        };
        let mut desired = self
            .engine
            .desired(&agent.name)
            .ok_or_else(|| Status::internal("agent has no channel"))?;
        // Level-triggered: read the store now so a reconnecting agent gets what was decided
        // while it was away even if this replica missed the announcement.
        if let Err(error) = self.engine.refresh(&ref_key(&agent), false).await {
            debug!(%error, agent = agent.name, "serving the last known desired revision");
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let engine = self.engine.clone();
        let shutdown = self.shutdown.clone();
        let span = info_span!("sync_stream", agent = %agent.name);
        tokio::spawn(
            async move {
                engine.connected(&agent.name).await;
                info!(applied = ?applied.as_ref().map(Sha::short), "agent connected");
                let mut sent: Option<(Sha, u64)> = None;
                let mut first = true;
                loop {
                    let revision = desired.borrow_and_update().revision.clone();
                    if let Some(revision) = revision {
                        let already = if first {
                            applied.as_ref() == Some(&revision.sha)
                        } else {
                            sent.as_ref() == Some(&(revision.sha.clone(), revision.generation))
                        };
                        if !already {
                            debug!(
                                sha = revision.sha.short(),
                                generation = revision.generation,
                                "sending revision"
                            );
                            for event in revision_events(&agent, &revision) {
                                if tx.send(Ok(event)).await.is_err() {
                                    break;
                                }
                            }
                        }
                        sent = Some((revision.sha.clone(), revision.generation));
                    }
                    first = false;
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tx.closed() => break,
                        changed = desired.changed() => if changed.is_err() { break },
                    }
                }
                engine.disconnected(&agent.name).await;
                info!("agent disconnected");
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_status(
        &self,
        request: Request<v1::ReportStatusRequest>,
    ) -> Result<Response<v1::ReportStatusResponse>, Status> {
        let agent = self.authenticate(&request)?;
        let mut report = request
            .into_inner()
            .report
            .ok_or_else(|| Status::invalid_argument("report is required"))?;
        Sha::parse(&report.revision)
            .map_err(|e| Status::invalid_argument(format!("report.revision: {e}")))?;
        if report.phase() == v1::Phase::Unspecified {
            return Err(Status::invalid_argument("report.phase is required"));
        }
        report.received_at_unix_ms = now_ms();
        self.engine
            .report(&agent.name, report.encode_to_vec())
            .await?;
        Ok(Response::new(v1::ReportStatusResponse {}))
    }
}
