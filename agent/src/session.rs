//! The agent's life: stay connected, hand each ready revision over, reconnect on failure.

use std::time::Duration;

use greenlight::digest::ContentDigest;
use greenlight::v1::RevisionHeader;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::assemble::{Ready, ReadyRevision};
use crate::client::{Client, ClientError};
use greenlight::backoff::Backoff;

/// The longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The first wait between reconnection attempts.
const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// How long a stream that delivered nothing new must have stayed up for its end to count as
/// a first failure again. An up-to-date agent is sent nothing, so delivery alone cannot be
/// the test; a stream that opens and breaks at once must not reset the backoff either, or the
/// agent reconnects twice a second and the server re-reads its manifests each time. Shorter
/// than the idle timeouts proxies commonly cut streams at (30 s and more), so that a stream
/// cut by one still counts as healthy.
pub const STABLE_STREAM: Duration = Duration::from_secs(10);

/// Where the agent connects.
#[derive(Clone)]
pub struct Target {
    pub server: String,
    pub token: String,
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("Target")
            .field("server", &self.server)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// What tells one revision from another: everything the server decided, not the trace
/// context, which is new on every send. A re-send of the same revision is not news.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionIdentity {
    /// The header without its traceparent: SHA, generation, settings, agent.
    header: RevisionHeader,
    /// The digest of the files, as the trailer carried it.
    content: String,
}

impl RevisionIdentity {
    /// The identity of `revision`.
    pub fn of(revision: &ReadyRevision) -> Self {
        let mut digest = ContentDigest::new();
        for (path, data) in &revision.files {
            digest.add_file(path, data);
        }
        Self {
            header: RevisionHeader {
                traceparent: String::new(),
                ..revision.header.clone()
            },
            content: digest.finish(),
        }
    }
}

/// The newest revision the server sent, as the session hands it to the apply loop.
#[derive(Debug, Clone)]
pub struct Held {
    /// The revision, as first delivered.
    pub revision: ReadyRevision,
    /// Computed once on delivery, so that comparing at every safe point of an apply is cheap.
    pub identity: RevisionIdentity,
    /// Whether the stream connected now delivered or confirmed it. False once that stream
    /// ended: a newer revision may have been decided and applied by another replica since.
    pub current: bool,
}

impl Held {
    /// Whether this is the revision `sha` at `generation`.
    fn is_revision(&self, (sha, generation): &(String, u64)) -> bool {
        self.revision.sha() == sha && self.revision.generation() == *generation
    }
}

/// What delivering a revision changed on `latest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Another revision than the one held: news.
    News,
    /// The held revision, stale since its stream ended, is current again.
    Current,
    /// The held revision, sent again while current: nothing changed.
    Again,
}

impl Delivered {
    /// Whether anyone watching `latest` was woken.
    pub fn woke(self) -> bool {
        self != Self::Again
    }
}

/// Publishes `revision`, just delivered by the connected stream, on `latest`, and says what
/// that changed.
///
/// The server sends its current revision again on every connection. A re-send of the held
/// revision wakes nobody while it is current, so that an apply in progress is not restarted
/// (with its health deadline) and a failed one keeps its backoff. If it had gone stale it is
/// marked current and wakes the apply loop, which needs that to lead with it; the apply loop
/// compares identities, so that does not restart anything either.
pub fn deliver(latest: &watch::Sender<Option<Held>>, revision: ReadyRevision) -> Delivered {
    let identity = RevisionIdentity::of(&revision);
    let mut delivered = Delivered::Again;
    latest.send_if_modified(|held| {
        delivered = match held {
            Some(held) if held.identity == identity => {
                if std::mem::replace(&mut held.current, true) {
                    Delivered::Again
                } else {
                    Delivered::Current
                }
            }
            _ => {
                *held = Some(Held {
                    revision,
                    identity,
                    current: true,
                });
                Delivered::News
            }
        };
        delivered.woke()
    });
    delivered
}

/// Marks the held revision stale, its stream having ended; wakes nobody, so that a leader
/// goes on applying and correcting drift toward it while it reconnects.
fn stream_ended(latest: &watch::Sender<Option<Held>>) {
    latest.send_if_modified(|held| {
        if let Some(held) = held {
            held.current = false;
        }
        false
    });
}

/// Marks the held revision current if it is the one `stated` as applied when the connected
/// stream opened: the server sends nothing then unless a newer revision is due.
fn confirm_stated(latest: &watch::Sender<Option<Held>>, stated: Option<&(String, u64)>) {
    let Some(stated) = stated else {
        return;
    };
    latest.send_if_modified(|held| match held {
        Some(held) if held.is_revision(stated) => !std::mem::replace(&mut held.current, true),
        _ => false,
    });
}

/// Whether a stream that ended, having delivered something or not and having stayed up for
/// `up_for` (`None`: it never opened), was healthy enough that its end counts as a first
/// failure.
fn proved_stable(delivered: bool, up_for: Option<Duration>) -> bool {
    delivered || up_for.is_some_and(|up_for| up_for >= STABLE_STREAM)
}

/// Runs until `shutdown`: connects, streams, and publishes each ready revision on `latest`.
/// On every (re)connection it states `applied`, the revision the worker last applied while
/// it leads (nothing while it does not).
pub async fn run(
    target: Target,
    shutdown: CancellationToken,
    applied: watch::Receiver<Option<(String, u64)>>,
    latest: watch::Sender<Option<Held>>,
    metrics: std::sync::Arc<crate::metrics::AgentMetrics>,
    previews: crate::preview::Inbox,
) {
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    while !shutdown.is_cancelled() {
        let mut opened = None;
        let mut delivered = false;
        let attempt = async {
            let client =
                Client::connect(&target.server, &target.token, target.ca_file.as_deref()).await?;
            let stated = applied.borrow().clone();
            let mut stream = client
                .sync_from(
                    stated
                        .as_ref()
                        .map(|(sha, generation)| (sha.as_str(), Some(*generation))),
                )
                .await?;
            opened = Some(Instant::now());
            info!(
                server = target.server,
                applied = stated.as_ref().map_or("nothing", |(sha, _)| sha.as_str()),
                "connected"
            );
            metrics.connected();
            confirm_stated(&latest, stated.as_ref());
            while let Some(ready) = stream.next_any().await? {
                match ready {
                    Ready::Revision(revision) => {
                        info!(
                            sha = revision.sha(),
                            generation = revision.generation(),
                            files = revision.files.len(),
                            "revision ready"
                        );
                        // Only news proves the stream: a server that sends the revision held
                        // and drops the stream again must not be redialled at once.
                        delivered |= deliver(&latest, revision) == Delivered::News;
                    }
                    Ready::Preview(preview) => {
                        delivered = true;
                        info!(
                            sha = preview.revision.sha(),
                            merge_request = preview.merge_request_iid,
                            "preview requested"
                        );
                        previews.push(preview);
                    }
                }
            }
            Ok::<_, ClientError>(())
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = attempt => result,
        };
        stream_ended(&latest);
        match result {
            Ok(()) => warn!("server ended the stream; reconnecting"),
            Err(error) => warn!(%error, "stream failed; reconnecting"),
        }
        if proved_stable(delivered, opened.map(|at: Instant| at.elapsed())) {
            backoff.reset();
        }
        let delay = backoff.delay();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use greenlight::v1::agent_service_server::{AgentService, AgentServiceServer};
    use greenlight::v1::sync_event::Event;
    use greenlight::v1::{
        ManifestChunk, ReportPreviewRequest, ReportPreviewResponse, ReportStatusRequest,
        ReportStatusResponse, Revision, RevisionTrailer, SyncEvent, SyncRequest,
    };
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    /// What one connection's Sync call does.
    #[derive(Clone)]
    pub(crate) enum Scripted {
        /// Sends the events, then ends the stream.
        SendThenEnd(Vec<SyncEvent>),
        /// Sends the events, then ends the stream after a while.
        SendThenEndAfter(Vec<SyncEvent>, Duration),
        /// Sends the events, then keeps the stream open.
        SendThenHold(Vec<SyncEvent>),
        /// Refuses the call.
        Refuse,
    }

    /// An agent service whose Sync calls follow a script, one entry per call; the last entry
    /// repeats forever.
    #[derive(Clone, Default)]
    pub(crate) struct ScriptedServer {
        script: Arc<Mutex<VecDeque<Scripted>>>,
        requests: Arc<Mutex<Vec<SyncRequest>>>,
    }

    impl ScriptedServer {
        pub(crate) fn new(script: impl IntoIterator<Item = Scripted>) -> Self {
            Self {
                script: Arc::new(Mutex::new(script.into_iter().collect())),
                requests: Arc::default(),
            }
        }

        /// How many Sync calls were made.
        pub(crate) fn calls(&self) -> usize {
            self.requests
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len()
        }

        /// Serves on a free local port; returns where.
        pub(crate) async fn start(self) -> Target {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(AgentServiceServer::new(self))
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
            );
            Target {
                server: format!("http://{addr}"),
                token: "token".into(),
                ca_file: None,
            }
        }
    }

    #[tonic::async_trait]
    impl AgentService for ScriptedServer {
        type SyncStream = crate::testing::SyncEvents;

        async fn sync(
            &self,
            request: tonic::Request<SyncRequest>,
        ) -> Result<tonic::Response<Self::SyncStream>, tonic::Status> {
            use futures_util::StreamExt;
            self.requests
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(request.into_inner());
            let next = {
                let mut script = self.script.lock().unwrap_or_else(|p| p.into_inner());
                if script.len() > 1 {
                    script.pop_front()
                } else {
                    script.front().cloned()
                }
            };
            let (events, end_after) = match next {
                Some(Scripted::SendThenEnd(events)) => (events, Some(Duration::ZERO)),
                Some(Scripted::SendThenEndAfter(events, after)) => (events, Some(after)),
                Some(Scripted::SendThenHold(events)) => (events, None),
                Some(Scripted::Refuse) | None => {
                    return Err(tonic::Status::unavailable("scripted refusal"));
                }
            };
            let sent = futures_util::stream::iter(events.into_iter().map(Ok));
            let stream: Self::SyncStream = match end_after {
                Some(after) => Box::pin(
                    sent.chain(
                        futures_util::stream::once(tokio::time::sleep(after))
                            .filter_map(|()| std::future::ready(None)),
                    ),
                ),
                None => Box::pin(sent.chain(futures_util::stream::pending())),
            };
            Ok(tonic::Response::new(stream))
        }

        async fn report_status(
            &self,
            _: tonic::Request<ReportStatusRequest>,
        ) -> Result<tonic::Response<ReportStatusResponse>, tonic::Status> {
            Ok(tonic::Response::new(ReportStatusResponse {}))
        }

        async fn report_preview(
            &self,
            _: tonic::Request<ReportPreviewRequest>,
        ) -> Result<tonic::Response<ReportPreviewResponse>, tonic::Status> {
            Ok(tonic::Response::new(ReportPreviewResponse {}))
        }
    }

    /// A revision of agent `prod` whose one file is not UTF-8: applying it fails at once,
    /// without a call to the cluster.
    pub(crate) fn revision(sha: &str, generation: u64, traceparent: &str) -> ReadyRevision {
        let files = vec![("bad.yaml".to_owned(), vec![0xff, b'x'])];
        ReadyRevision {
            header: RevisionHeader {
                revision: Some(Revision {
                    sha: sha.into(),
                    generation,
                    ..Revision::default()
                }),
                agent: "prod".into(),
                file_count: 1,
                total_bytes: 2,
                traceparent: traceparent.into(),
                ..RevisionHeader::default()
            },
            files,
        }
    }

    /// `revision` as the server streams it.
    pub(crate) fn events(revision: &ReadyRevision) -> Vec<SyncEvent> {
        let mut events = vec![SyncEvent {
            event: Some(Event::Header(revision.header.clone())),
        }];
        let mut digest = ContentDigest::new();
        for (path, data) in &revision.files {
            digest.add_file(path, data);
            events.push(SyncEvent {
                event: Some(Event::Chunk(ManifestChunk {
                    path: path.clone(),
                    data: data.clone().into(),
                })),
            });
        }
        events.push(SyncEvent {
            event: Some(Event::Trailer(RevisionTrailer {
                content_sha256: digest.finish(),
            })),
        });
        events
    }

    /// Runs a session against `target` in the background, stating `applied`.
    pub(crate) fn spawn_session(
        target: Target,
        latest: watch::Sender<Option<Held>>,
        applied: Option<(String, u64)>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let (applied_tx, applied_rx) = watch::channel(applied);
        tokio::spawn(async move {
            run(
                target,
                shutdown,
                applied_rx,
                latest,
                Arc::new(crate::metrics::AgentMetrics::default()),
                crate::preview::Inbox::default(),
            )
            .await;
            drop(applied_tx);
        })
    }

    /// Waits (for at most 10 s) until the held revision satisfies `wanted`.
    pub(crate) async fn held_until(
        latest: &watch::Receiver<Option<Held>>,
        wanted: impl Fn(&Held) -> bool,
    ) -> Held {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(held) = latest.borrow().as_ref().filter(|h| wanted(h)) {
                return held.clone();
            }
            assert!(
                Instant::now() < deadline,
                "the held revision never got there"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many streams a session opens in 3 s against a server that answers each with
    /// `script`.
    async fn calls_in_3_s(script: impl IntoIterator<Item = Scripted>) -> usize {
        let server = ScriptedServer::new(script);
        let target = server.clone().start().await;
        let (latest, _held) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let session = spawn_session(target, latest, None, shutdown.clone());
        tokio::time::sleep(Duration::from_secs(3)).await;
        shutdown.cancel();
        session.await.unwrap();
        server.calls()
    }

    #[tokio::test]
    async fn a_stream_that_breaks_at_once_does_not_reset_the_backoff() {
        let calls = calls_in_3_s([Scripted::SendThenEnd(Vec::new())]).await;
        // Growing waits of at least 0.25, 0.5, 1 and 2 s allow at most 4 calls in 3 s; a
        // backoff reset on every open allows one every 0.5 s at most, 7 or more.
        assert!((2..=5).contains(&calls), "{calls} calls in 3 s");
    }

    #[tokio::test]
    async fn a_stream_that_delivered_a_new_revision_resets_the_backoff() {
        let news = (1..=12)
            .map(|generation| Scripted::SendThenEnd(events(&revision("a", generation, ""))));
        let calls = calls_in_3_s(news).await;
        assert!(calls >= 5, "only {calls} calls in 3 s");
    }

    #[tokio::test]
    async fn a_stream_that_only_sent_the_revision_held_does_not_reset_the_backoff() {
        let a = revision("a", 1, "");
        let calls = calls_in_3_s([Scripted::SendThenEnd(events(&a))]).await;
        // As for a stream that breaks at once, after the first delivery.
        assert!((2..=5).contains(&calls), "{calls} calls in 3 s");
    }

    #[test]
    fn a_stream_proves_stable_by_delivering_or_by_lasting() {
        assert!(proved_stable(true, Some(Duration::ZERO)));
        assert!(!proved_stable(false, Some(Duration::from_secs(1))));
        assert!(!proved_stable(false, None));
        assert!(proved_stable(false, Some(STABLE_STREAM)));
    }

    #[tokio::test]
    async fn a_revision_whose_stream_ended_is_no_longer_current() {
        let a = revision("a", 1, "");
        let server = ScriptedServer::new([Scripted::SendThenEnd(events(&a)), Scripted::Refuse]);
        let target = server.start().await;
        let (latest, held) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let session = spawn_session(target, latest, None, shutdown.clone());
        let stale = held_until(&held, |h| !h.current).await;
        assert_eq!(stale.revision.sha(), "a");
        shutdown.cancel();
        session.await.unwrap();
    }

    #[tokio::test]
    async fn the_revision_stated_as_applied_is_current_once_a_stream_opens() {
        let a = revision("a", 1, "");
        let server = ScriptedServer::new([Scripted::SendThenHold(Vec::new())]);
        let target = server.start().await;
        let (latest, held) = watch::channel(Some(Held {
            identity: RevisionIdentity::of(&a),
            revision: a,
            current: false,
        }));
        let shutdown = CancellationToken::new();
        let session = spawn_session(target, latest, Some(("a".into(), 1)), shutdown.clone());
        held_until(&held, |h| h.current).await;
        shutdown.cancel();
        session.await.unwrap();
    }

    #[test]
    fn only_the_revision_stated_as_applied_is_confirmed() {
        let a = revision("a", 1, "");
        let (latest, _held) = watch::channel(Some(Held {
            identity: RevisionIdentity::of(&a),
            revision: a,
            current: false,
        }));
        confirm_stated(&latest, None);
        confirm_stated(&latest, Some(&("a".into(), 2)));
        confirm_stated(&latest, Some(&("b".into(), 1)));
        assert!(latest.borrow().as_ref().is_some_and(|h| !h.current));
        confirm_stated(&latest, Some(&("a".into(), 1)));
        assert!(latest.borrow().as_ref().is_some_and(|h| h.current));
    }

    #[test]
    fn a_resent_revision_wakes_nobody_unless_it_was_stale() {
        let (latest, mut held) = watch::channel(None);
        assert!(deliver(&latest, revision("a", 1, "trace-1")).woke());
        held.borrow_and_update();
        // The server's re-send on a new connection carries a new trace context only.
        assert!(!deliver(&latest, revision("a", 1, "trace-2")).woke());
        assert!(!held.has_changed().unwrap());
        assert_eq!(
            held.borrow()
                .as_ref()
                .map(|h| h.revision.header.traceparent.clone()),
            Some("trace-1".to_owned()),
            "the revision being applied is kept as it is"
        );

        stream_ended(&latest);
        assert!(!held.has_changed().unwrap(), "a stream's end wakes nobody");
        assert!(held.borrow().as_ref().is_some_and(|h| !h.current));
        assert!(deliver(&latest, revision("a", 1, "trace-3")).woke());
        assert!(held.borrow_and_update().as_ref().is_some_and(|h| h.current));
    }

    #[test]
    fn a_new_generation_or_content_is_news() {
        let (latest, _held) = watch::channel(None);
        let a = revision("a", 1, "");
        assert!(deliver(&latest, a.clone()).woke());
        assert!(
            deliver(&latest, revision("a", 2, "")).woke(),
            "a re-sync of the same commit"
        );
        let mut changed = revision("a", 2, "");
        changed.files[0].1.push(b'y');
        assert!(deliver(&latest, changed).woke());
        assert!(deliver(&latest, revision("b", 2, "")).woke());
    }
}
