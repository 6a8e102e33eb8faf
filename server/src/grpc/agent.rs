//! `greenlight.v1.AgentService`: the stream of desired revisions and the status reports.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use greenlight::backoff::Backoff;
use greenlight::digest::ContentDigest;
use greenlight::telemetry;
use greenlight::v1::{self, agent_service_server::AgentService, sync_event::Event};
use prost::Message;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span, warn};

use super::rate::RateLimit;
use super::streams::{Outbox, OutboxStream, StreamSettings, StreamSlots};
use super::{bearer, known, revision_to_proto};
use crate::clock::now_ms;
use crate::config::{AgentSpec, ApplySettings, TokenHash};
use crate::engine::Engine;
use crate::gate::{Revision, Sha};
use crate::git::ManifestSet;
use crate::metrics::Metrics;
use crate::preview::{PreviewRequest, Previews};
use crate::store::SyncError;

/// Messages buffered per stream: a slow agent holds at most this many, and blocks only itself.
const STREAM_BUFFER: usize = 16;
/// Bytes buffered per stream: the messages above, each a manifest chunk at most.
const STREAM_BUFFER_BYTES: usize = STREAM_BUFFER * (MAX_CHUNK_BYTES + 1024);
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
    previews: Arc<Previews>,
    shutdown: CancellationToken,
    streams: StreamSlots,
    reports: RateLimit,
    settings: StreamSettings,
}

impl AgentApi {
    /// Streams end when `shutdown` fires, so agents reconnect to another replica, and when
    /// their agent reads nothing for `stall`.
    pub fn new(
        engine: Arc<Engine>,
        previews: Arc<Previews>,
        shutdown: CancellationToken,
        stall: Duration,
    ) -> Self {
        let settings = StreamSettings {
            stall,
            buffer: engine.metrics().stream_buffer(),
        };
        Self {
            engine,
            previews,
            shutdown,
            streams: StreamSlots::default(),
            reports: RateLimit::new(REPORTS_PER_SECOND, REPORT_BURST),
            settings,
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

/// Whether a stream of agent `name`, opened with the token hashing to `token`, may go on:
/// the agent as it is now, and until when the token is accepted (a rotated-out token in its
/// grace period); else the status the stream ends with.
fn credentials(
    engine: &Engine,
    name: &str,
    token: &TokenHash,
) -> Result<(Arc<AgentSpec>, Option<i64>), Status> {
    let catalog = engine.catalog();
    let Some(spec) = catalog.agent_arc(name) else {
        return Err(Status::not_found(format!("agent {name} was deleted")));
    };
    match catalog.token_grant(token, now_ms()) {
        Some(grant) if grant.agent == name => Ok((spec, grant.until_ms)),
        _ => Err(Status::unauthenticated(format!(
            "the token this stream of agent {name} was opened with is no longer accepted (it was \
             rotated and its grace period ended); reconnect with the new token"
        ))),
    }
}

/// Whether a stream must send its revision again for `after`: what the agent receives with
/// a revision changed.
fn delivery_changed(before: &AgentSpec, after: &AgentSpec) -> bool {
    before.apply != after.apply || before.paths != after.paths || before.source != after.source
}

/// How long until `until_ms` (Unix ms), none for never.
fn until(until_ms: Option<i64>) -> Option<Duration> {
    until_ms.map(|ms| Duration::from_millis(ms.saturating_sub(now_ms()).max(0).unsigned_abs()))
}

/// Sleeps for `duration`, or forever without one. The timer is made only when there is
/// one to wait for: a stream's loop waits at every wake, and most have none.
async fn sleep_if(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
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
    let header = revision_header(agent, revision_to_proto(revision), files, traceparent);
    deliver(tx, Event::Header(header), metrics).await && send_files(tx, files, metrics).await
}

/// Sends a preview request for `request`'s head as a preview header, chunks and trailer;
/// `false` when the agent went away.
async fn send_preview(
    tx: &mut Outbox<v1::SyncEvent>,
    agent: &AgentSpec,
    request: &PreviewRequest,
    files: Option<&ManifestSet>,
    metrics: &Metrics,
) -> bool {
    let revision = v1::Revision {
        sha: request.sha.clone(),
        reason: format!("preview of merge request !{}", request.merge_request_iid),
        decided_at_unix_ms: request.at_ms,
        ..v1::Revision::default()
    };
    let header = v1::PreviewHeader {
        revision: Some(revision_header(agent, revision, files, String::new())),
        id: request.id.clone(),
        merge_request_iid: request.merge_request_iid,
    };
    deliver(tx, Event::Preview(header), metrics).await && send_files(tx, files, metrics).await
}

/// The header announcing `revision` of `agent` with `files`.
fn revision_header(
    agent: &AgentSpec,
    revision: v1::Revision,
    files: Option<&ManifestSet>,
    traceparent: String,
) -> v1::RevisionHeader {
    let (file_count, total_bytes) = files.map_or((0, 0), |set| (set.files.len(), set.total_bytes));
    v1::RevisionHeader {
        revision: Some(revision),
        project: agent.project.clone(),
        r#ref: agent.branch.clone(),
        file_count: u32::try_from(file_count).unwrap_or(u32::MAX),
        total_bytes,
        settings: Some(settings_to_proto(&agent.apply)),
        agent: agent.name.clone(),
        traceparent,
    }
}

/// The chunks of one file, in order, each sharing `content`'s bytes; an empty file is still
/// one chunk, so that the agent learns its path.
pub fn file_chunks<'a>(
    path: &'a str,
    content: &'a Bytes,
) -> impl Iterator<Item = v1::ManifestChunk> + 'a {
    let starts = (0..content.len().max(1)).step_by(MAX_CHUNK_BYTES);
    starts.map(move |start| v1::ManifestChunk {
        path: path.to_owned(),
        data: content.slice(start..(start + MAX_CHUNK_BYTES).min(content.len())),
    })
}

/// Sends `files` as chunks and the trailer with their digest, after a header; `false` when
/// the agent went away.
async fn send_files(
    tx: &mut Outbox<v1::SyncEvent>,
    files: Option<&ManifestSet>,
    metrics: &Metrics,
) -> bool {
    for file in files.map(|set| set.files.as_slice()).unwrap_or_default() {
        for chunk in file_chunks(&file.path, &file.content) {
            if !deliver(tx, Event::Chunk(chunk), metrics).await {
                return false;
            }
        }
    }
    // The same for every agent without manifests: worked out once, not once a send.
    static NO_FILES: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| ContentDigest::new().finish());
    let content_sha256 = match files {
        Some(set) => set.content_sha256.clone(),
        None => NO_FILES.clone(),
    };
    deliver(
        tx,
        Event::Trailer(v1::RevisionTrailer { content_sha256 }),
        metrics,
    )
    .await
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
    /// The agent or its tokens may have changed.
    Recheck,
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SyncStream = OutboxStream<v1::SyncEvent>;

    async fn sync(
        &self,
        request: Request<v1::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let token = bearer(&request).map(TokenHash::of);
        let agent = self.authenticate(&request)?;
        let token = token.ok_or_else(|| Status::unauthenticated("missing token"))?;
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
        if let Err(error) = self.engine.reread(&agent.name).await {
            debug!(%error, agent = agent.name, "serving the last known desired revision");
        }
        let (mut tx, rx) = Outbox::new(STREAM_BUFFER, STREAM_BUFFER_BYTES, &self.settings);
        let engine = self.engine.clone();
        // Preview requests ride the same stream, after any revision that is due.
        let previews = self.previews.clone();
        let mut pending_previews = previews.watch(&agent.name);
        let shutdown = self.shutdown.clone();
        let span = info_span!("sync_stream", agent = %agent.name);
        // Deleting the agent or rotating its token ends the stream; so does the end of a
        // rotated-out token's grace period.
        let mut catalog_changes = WatchStream::from_changes(self.engine.live_catalog().subscribe());
        let (mut agent, mut expires) = credentials(&self.engine, &agent.name, &token)?;
        // The task lives as long as the agent stays connected, idle nearly all that time,
        // and an async task is as large as its largest state: the reads, sends and store
        // calls it makes now and then are boxed, so that they take memory only while they run.
        tokio::spawn(
            async move {
                Box::pin(engine.connected(&agent.name)).await;
                info!(applied = ?applied.as_ref().map(Sha::short), "agent connected");
                let mut sent: Option<(Sha, u64)> = None;
                // The revision whose manifests this stream read last (or that the agent
                // already held): one due but never read is prepared when the stream ends.
                let mut read: Option<Sha> = None;
                let mut first = true;
                let mut retry = Backoff::new(RETRY_INITIAL, RETRY_MAX);
                let mut previews_sent = std::collections::HashSet::new();
                // Waited on across the whole loop rather than anew at each wake: every stream
                // of the replica shares the token, and a fan-out wakes them all at once.
                let stopped = shutdown.cancelled();
                tokio::pin!(stopped);
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
                            read = Some(revision.sha.clone());
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
                                _ = &mut stopped => break,
                                files = Box::pin(engine
                                    .manifests(&agent, &revision.sha)
                                    .instrument(info_span!(parent: &span, "read_manifests"))) => files,
                            };
                            read = Some(revision.sha.clone());
                            match files {
                                Ok(files) => {
                                    debug!(sha = revision.sha.short(), generation = revision.generation, "sending revision");
                                    let delivered = tokio::select! {
                                        _ = &mut stopped => false,
                                        delivered = Box::pin(send_revision(
                                            &mut tx,
                                            &agent,
                                            &revision,
                                            files.as_deref(),
                                            engine.metrics(),
                                            telemetry::traceparent(&span).unwrap_or_default(),
                                        )
                                        .instrument(span.clone())) => delivered,
                                    };
                                    if !delivered {
                                        break;
                                    }
                                    engine.note_sync_error(&agent.name, None);
                                    sent = Some((revision.sha.clone(), revision.generation));
                                    retry.reset();
                                }
                                Err(error) => {
                                    // The agent keeps its last good revision meanwhile.
                                    warn!(%error, sha = revision.sha.short(), "cannot deliver revision");
                                    let failure = SyncError::Manifests {
                                        message: format!("cannot deliver {}: {error}", revision.sha.short()),
                                    };
                                    engine.note_sync_error(&agent.name, Some(failure));
                                    wait_for_retry = error.retryable();
                                }
                            }
                        }
                    }
                    first = false;
                    // Previews: each unanswered request once per stream, never before a
                    // revision that is due (above), so they cannot delay a deploy's delivery.
                    let wanted: Vec<PreviewRequest> = pending_previews
                        .borrow_and_update()
                        .requests
                        .values()
                        .filter(|r| !previews_sent.contains(&r.id))
                        .cloned()
                        .collect();
                    for request in wanted {
                        previews_sent.insert(request.id.clone());
                        let files = match Sha::parse(&request.sha) {
                            Ok(sha) => tokio::select! {
                                _ = &mut stopped => break,
                                files = Box::pin(engine.manifests(&agent, &sha)) => files.map_err(|e| e.to_string()),
                            },
                            Err(error) => Err(error.to_string()),
                        };
                        match files {
                            Ok(files) => {
                                let delivered = tokio::select! {
                                    _ = &mut stopped => false,
                                    delivered = Box::pin(send_preview(&mut tx, &agent, &request, files.as_deref(), engine.metrics())) => delivered,
                                };
                                if !delivered {
                                    break;
                                }
                            }
                            Err(error) => {
                                warn!(%error, sha = request.sha, "cannot read the manifests of a preview");
                                Box::pin(previews.unavailable(&request, format!("cannot read the manifests: {error}"))).await;
                            }
                        }
                    }
                    if previews_sent.len() > 1024 {
                        // Only what is still pending can be sent again.
                        let pending = pending_previews.borrow();
                        previews_sent.retain(|id| pending.requests.values().any(|r| &r.id == id));
                    }
                    let pause = if wait_for_retry { retry.delay() } else { Duration::ZERO };
                    let wake = tokio::select! {
                        _ = &mut stopped => Wake::Stop,
                        _ = tx.closed() => Wake::Stop,
                        changed = desired.changed() => if changed.is_err() { Wake::Recheck } else { Wake::Changed },
                        changed = pending_previews.changed() => if changed.is_err() { Wake::Stop } else { Wake::Retry },
                        _ = sleep_if(wait_for_retry.then_some(pause)) => Wake::Retry,
                        changed = catalog_changes.next() => if changed.is_none() { Wake::Stop } else { Wake::Recheck },
                        _ = sleep_if(until(expires)) => Wake::Recheck,
                    };
                    match wake {
                        Wake::Stop => break,
                        Wake::Changed => retry.reset(),
                        Wake::Retry => {}
                        Wake::Recheck => match credentials(&engine, &agent.name, &token) {
                            Err(status) => {
                                info!(reason = status.message(), "ending the stream");
                                tx.finish(status);
                                break;
                            }
                            Ok((now, valid_until)) => {
                                expires = valid_until;
                                if delivery_changed(&agent, &now) {
                                    sent = None;
                                    read = None;
                                }
                                agent = now;
                                if desired.has_changed().is_err() {
                                    // Deleted and created again: follow the new channel.
                                    match engine.desired(&agent.name) {
                                        Some(channel) => {
                                            desired = channel;
                                            sent = None;
                                            read = None;
                                        }
                                        None => break,
                                    }
                                }
                            }
                        },
                    }
                }
                drop(desired);
                engine.stream_ended(&agent.name, read.as_ref());
                Box::pin(engine.disconnected(&agent.name)).await;
                info!("agent disconnected");
            }
            .instrument(span),
        );
        Ok(Response::new(rx.holding(slot)))
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
        if known::<v1::Phase>("report.phase", report.phase)? == v1::Phase::Unspecified {
            return Err(Status::invalid_argument("report.phase is required"));
        }
        report.received_at_unix_ms = now_ms();
        report.traceparent = telemetry::traceparent(&span).unwrap_or_default();
        // An agent of another version may send more than this one would: keep what is
        // stored (a hundred times per agent) bounded all the same.
        greenlight::report::bound(&mut report);
        self.engine
            .report(&agent, &revision, report)
            .instrument(span)
            .await?;
        Ok(Response::new(v1::ReportStatusResponse {}))
    }

    async fn report_preview(
        &self,
        request: Request<v1::ReportPreviewRequest>,
    ) -> Result<Response<v1::ReportPreviewResponse>, Status> {
        let agent = self.authenticate(&request)?;
        if !self.reports.allow(&agent.name, std::time::Instant::now()) {
            return Err(Status::resource_exhausted(format!(
                "agent {} sends more than {REPORTS_PER_SECOND} reports a second; retry later",
                agent.name
            )));
        }
        let mut preview = request
            .into_inner()
            .preview
            .ok_or_else(|| Status::invalid_argument("preview is required"))?;
        Sha::parse(&preview.sha)
            .map_err(|e| Status::invalid_argument(format!("preview.sha: {e}")))?;
        // An agent speaks for itself only, about its own project.
        preview.agent = agent.name.clone();
        preview.project = agent.project.clone();
        preview.received_at_unix_ms = now_ms();
        crate::preview::bound(&mut preview);
        self.previews
            .answered(preview)
            .await
            .map_err(|e| Status::unavailable(format!("cannot record the preview: {e}")))?;
        Ok(Response::new(v1::ReportPreviewResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_cut_into_chunks_that_add_up_to_it_and_an_empty_one_is_one_chunk() {
        let empty = Bytes::new();
        let chunks: Vec<_> = file_chunks("a.yaml", &empty).collect();
        assert_eq!(chunks.len(), 1);
        assert!(chunks[0].data.is_empty() && chunks[0].path == "a.yaml");

        let content = Bytes::from(vec![7u8; 2 * MAX_CHUNK_BYTES + 1]);
        let chunks: Vec<_> = file_chunks("b.yaml", &content).collect();
        let sizes: Vec<usize> = chunks.iter().map(|c| c.data.len()).collect();
        assert_eq!(sizes, [MAX_CHUNK_BYTES, MAX_CHUNK_BYTES, 1]);
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.iter().copied()).collect();
        assert_eq!(joined, content);
    }
}
