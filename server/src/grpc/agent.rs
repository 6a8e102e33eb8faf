//! `greenlight.v1.AgentService`: the stream of desired revisions and the status reports.

use std::sync::Arc;
use std::time::Duration;

use greenlight::backoff::Backoff;
use greenlight::digest::ContentDigest;
use greenlight::telemetry;
use greenlight::v1::{self, agent_service_server::AgentService, sync_event::Event};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span, warn};

use super::rate::RateLimit;
use super::streams::{Outbox, STALLED_READER, StreamSlots};
use super::{bearer, revision_to_proto};
use crate::catalog::ref_key;
use crate::clock::now_ms;
use crate::config::{AgentSpec, ApplySettings};
use crate::engine::Engine;
use crate::gate::{Revision, Sha};
use crate::git::ManifestSet;
use crate::metrics::Metrics;

/// Messages buffered per stream: a slow agent holds at most this many, and blocks only itself.
const STREAM_BUFFER: usize = 16;
/// Sync streams one agent may hold on one replica: its replicas, and a few more while they
/// roll, reconnect or rotate tokens.
const MAX_STREAMS_PER_AGENT: usize = 8;
/// Status reports one agent may send per second on one replica, with bursts: the agent
/// coalesces progress, so a revision costs a handful; more is a loop or an attack.
const REPORTS_PER_SECOND: f64 = 10.0;
const REPORT_BURST: f64 = 50.0;
/// Delivery retries after a retryable failure back off between these bounds.
const RETRY_INITIAL: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Serves agents.
pub struct AgentApi {
    engine: Arc<Engine>,
    shutdown: CancellationToken,
    streams: StreamSlots,
    reports: RateLimit,
}

impl AgentApi {
    /// Streams end when `shutdown` fires, so agents reconnect to another replica.
    pub fn new(engine: Arc<Engine>, shutdown: CancellationToken) -> Self {
        Self {
            engine,
            shutdown,
            streams: StreamSlots::default(),
            reports: RateLimit::new(REPORTS_PER_SECOND, REPORT_BURST),
        }
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

/// The largest file chunk in one message: far below any gRPC message limit.
pub const MAX_CHUNK_BYTES: usize = 128 * 1024;

fn settings_to_proto(settings: &ApplySettings) -> v1::ApplySettings {
    v1::ApplySettings {
        default_namespace: settings.default_namespace.clone(),
        prune: settings.prune,
        prune_propagation_policy: settings.prune_propagation_policy.clone(),
        dry_run_strategy: settings.dry_run_strategy.clone(),
        health_timeout_seconds: settings.health_timeout.as_secs(),
        reconcile_interval_seconds: settings.reconcile_interval.as_secs(),
        force_conflicts: settings.force_conflicts,
        scope_namespaces: settings.scope_namespaces.clone(),
        scope_cluster_kinds: settings.scope_cluster_kinds.clone(),
        prune_limit: Some(settings.prune_limit),
        health_checks: settings
            .health_checks
            .iter()
            .map(|c| v1::HealthCheck {
                group: c.group.clone(),
                kind: c.kind.clone(),
                jsonpath: c.jsonpath.clone(),
                healthy_values: c.healthy.clone(),
                failed_values: c.failed.clone(),
            })
            .collect(),
        impersonate: settings.impersonate.clone().unwrap_or_default(),
    }
}

/// Sends one revision as header, chunks and trailer; `false` when the agent went away.
async fn send_revision(
    tx: &mut Outbox<v1::SyncEvent>,
    agent: &AgentSpec,
    revision: &Revision,
    files: Option<&ManifestSet>,
    metrics: &Metrics,
    traceparent: String,
) -> bool {
    let (file_count, total_bytes, digest) = match files {
        Some(set) => (set.files.len(), set.total_bytes, set.content_sha256.clone()),
        None => (0, 0, ContentDigest::new().finish()),
    };
    let header = v1::RevisionHeader {
        revision: Some(revision_to_proto(revision)),
        project: agent.project.clone(),
        r#ref: agent.branch.clone(),
        file_count: u32::try_from(file_count).unwrap_or(u32::MAX),
        total_bytes,
        settings: Some(settings_to_proto(&agent.apply)),
        agent: agent.name.clone(),
        traceparent,
    };
    if !deliver(tx, Event::Header(header), metrics).await {
        return false;
    }
    for file in files.map(|set| set.files.as_slice()).unwrap_or_default() {
        let mut offset = 0;
        // An empty file still needs one chunk so the agent learns its path.
        loop {
            let end = (offset + MAX_CHUNK_BYTES).min(file.content.len());
            let chunk = v1::ManifestChunk {
                path: file.path.clone(),
                data: file.content.slice(offset..end),
            };
            if !deliver(tx, Event::Chunk(chunk), metrics).await {
                return false;
            }
            offset = end;
            if offset >= file.content.len() {
                break;
            }
        }
    }
    let trailer = v1::RevisionTrailer {
        content_sha256: digest,
    };
    deliver(tx, Event::Trailer(trailer), metrics).await
}

/// Sends one event; `false` when the agent went away or stopped reading (see [`Outbox`]).
async fn deliver(tx: &mut Outbox<v1::SyncEvent>, event: Event, metrics: &Metrics) -> bool {
    let message = v1::SyncEvent { event: Some(event) };
    let bytes = message.encoded_len();
    let sent = tx.send(message).await;
    if sent {
        metrics.stream_sent(bytes);
    }
    sent
}

/// What waiting on a stream's inputs yielded.
enum Wake {
    Changed,
    Retry,
    Stop,
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SyncStream = ReceiverStream<Result<v1::SyncEvent, Status>>;

    async fn sync(
        &self,
        request: Request<v1::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let agent = self.authenticate(&request)?;
        let slot = self.streams.acquire(
            &format!("agent {}", agent.name),
            MAX_STREAMS_PER_AGENT,
            "sync streams",
        )?;
        let request = request.into_inner();
        let applied_generation = request.applied_generation;
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
        if let Err(error) = self.engine.reread(&ref_key(&agent)).await {
            debug!(%error, agent = agent.name, "serving the last known desired revision");
        }
        let (mut tx, rx) = Outbox::new(STREAM_BUFFER, STALLED_READER);
        let engine = self.engine.clone();
        let shutdown = self.shutdown.clone();
        let span = info_span!("sync_stream", agent = %agent.name);
        tokio::spawn(
            async move {
                engine.connected(&agent.name).await;
                info!(applied = ?applied.as_ref().map(Sha::short), "agent connected");
                let mut sent: Option<(Sha, u64)> = None;
                let mut first = true;
                let mut retry = Backoff::new(RETRY_INITIAL, RETRY_MAX);
                loop {
                    let (revision, trace) = {
                        let desired = desired.borrow_and_update();
                        (desired.revision.clone(), desired.traceparent.clone())
                    };
                    let mut wait_for_retry = false;
                    if let Some(revision) = revision {
                        let already = if first {
                            // A re-sync requested while the agent was away has a newer
                            // generation of the same commit: it must still be sent.
                            applied.as_ref() == Some(&revision.sha)
                                && applied_generation.is_none_or(|g| g >= revision.generation)
                        } else {
                            sent.as_ref() == Some(&(revision.sha.clone(), revision.generation))
                        };
                        if already {
                            sent = Some((revision.sha.clone(), revision.generation));
                        } else {
                            // Joins the trace of the decision that chose the revision.
                            let span = info_span!(
                                "send_revision",
                                sha = revision.sha.short(),
                                generation = revision.generation,
                                trace_id = tracing::field::Empty,
                            );
                            telemetry::adopt(&span, trace.as_deref());
                            // Shutdown must not wait for a fetch, or for an agent that stopped reading.
                            let files = tokio::select! {
                                _ = shutdown.cancelled() => break,
                                files = engine
                                    .manifests(&agent, &revision.sha)
                                    .instrument(info_span!(parent: &span, "read_manifests")) => files,
                            };
                            match files {
                                Ok(files) => {
                                    debug!(sha = revision.sha.short(), generation = revision.generation, "sending revision");
                                    let delivered = tokio::select! {
                                        _ = shutdown.cancelled() => false,
                                        delivered = send_revision(
                                            &mut tx,
                                            &agent,
                                            &revision,
                                            files.as_deref(),
                                            engine.metrics(),
                                            telemetry::traceparent(&span).unwrap_or_default(),
                                        )
                                        .instrument(span.clone()) => delivered,
                                    };
                                    if !delivered {
                                        break;
                                    }
                                    engine.note_sync_error(&agent.name, None).await;
                                    sent = Some((revision.sha.clone(), revision.generation));
                                    retry.reset();
                                }
                                Err(error) => {
                                    // The agent keeps its last good revision meanwhile.
                                    warn!(%error, sha = revision.sha.short(), "cannot deliver revision");
                                    let message = format!("cannot deliver {}: {error}", revision.sha.short());
                                    engine.note_sync_error(&agent.name, Some(message)).await;
                                    wait_for_retry = error.retryable();
                                }
                            }
                        }
                    }
                    first = false;
                    let pause = if wait_for_retry { retry.delay() } else { Duration::ZERO };
                    let wake = tokio::select! {
                        _ = shutdown.cancelled() => Wake::Stop,
                        _ = tx.closed() => Wake::Stop,
                        changed = desired.changed() => if changed.is_err() { Wake::Stop } else { Wake::Changed },
                        _ = tokio::time::sleep(pause), if wait_for_retry => Wake::Retry,
                    };
                    match wake {
                        Wake::Stop => break,
                        Wake::Changed => retry.reset(),
                        Wake::Retry => {}
                    }
                }
                engine.disconnected(&agent.name).await;
                drop(slot);
                info!("agent disconnected");
            }
            .instrument(span),
        );
        Ok(Response::new(rx))
    }

    async fn report_status(
        &self,
        request: Request<v1::ReportStatusRequest>,
    ) -> Result<Response<v1::ReportStatusResponse>, Status> {
        let agent = self.authenticate(&request)?;
        // The agent's apply span, sent as W3C metadata: the report and the commit status it
        // becomes join that trace.
        let span =
            info_span!("report_status", agent = %agent.name, trace_id = tracing::field::Empty);
        let parent = request
            .metadata()
            .get(telemetry::TRACEPARENT)
            .and_then(|value| value.to_str().ok());
        telemetry::adopt(&span, parent);
        if !self.reports.allow(&agent.name, std::time::Instant::now()) {
            return Err(Status::resource_exhausted(format!(
                "agent {} sends more than {REPORTS_PER_SECOND} status reports a second; retry later",
                agent.name
            )));
        }
        let mut report = request
            .into_inner()
            .report
            .ok_or_else(|| Status::invalid_argument("report is required"))?;
        let revision = Sha::parse(&report.revision)
            .map_err(|e| Status::invalid_argument(format!("report.revision: {e}")))?;
        if report.phase() == v1::Phase::Unspecified {
            return Err(Status::invalid_argument("report.phase is required"));
        }
        report.received_at_unix_ms = now_ms();
        report.traceparent = telemetry::traceparent(&span).unwrap_or_default();
        // An agent of another version may send more than this one would: keep what is
        // stored (a hundred times per agent) bounded all the same.
        greenlight::report::bound(&mut report);
        self.engine
            .report(&agent.name, &revision, report.encode_to_vec())
            .instrument(span)
            .await?;
        Ok(Response::new(v1::ReportStatusResponse {}))
    }
}
