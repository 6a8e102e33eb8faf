//! Wiring of the agent: one stream to the server, leader election, the apply loop with drift
//! correction, and a reporter that does not slow applying down.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use greenlight::v1::{Phase, StatusReport};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::{Instrument, info, info_span, warn};

use crate::assemble::ReadyRevision;
use crate::client::{Client, ClientError};
use crate::cluster::Cluster;
use crate::lease::Elector;
use crate::metrics::AgentMetrics;
use crate::plan::lease_name;
use crate::reconcile::{FIELD_MANAGER, Outcome, Worker};
use crate::session::{self, Held, RevisionIdentity, Target};
use greenlight::backoff::{Backoff, jittered};

/// Retries of a failed revision back off between these bounds, as kas did.
const FAILURE_BACKOFF_MIN: Duration = Duration::from_secs(10);
const FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Drift is corrected at least daily, whatever the configured interval.
const MAX_RECONCILE_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// On shutdown, how long the apply loop may take to reach its next safe point, and the
/// Lease release may take, before the process exits anyway (the lease then just expires).
const STOP_GRACE: Duration = Duration::from_secs(10);
/// On shutdown, how long the reporter keeps delivering the reports it still holds (the
/// apply loop's last ones included) before the process exits.
const REPORT_FLUSH: Duration = Duration::from_secs(5);

/// How the agent runs.
pub struct Settings {
    pub target: Target,
    /// Where the inventory and the Lease live.
    pub namespace: String,
    /// This replica's name in the Lease.
    pub identity: String,
    /// How long leadership survives without renewal.
    pub lease_duration: Duration,
    /// What it counts, for `/metrics`.
    pub metrics: Arc<AgentMetrics>,
}

/// Runs the agent until `shutdown`.
pub async fn run(settings: Settings, kube: kube::Client, shutdown: CancellationToken) {
    let (latest_tx, latest_rx) = watch::channel(None::<Held>);
    let (applied_tx, applied_rx) = watch::channel(None::<(String, u64)>);
    let (leading_tx, leading_rx) = watch::channel(false);
    let (reports_tx, reports_rx) = mpsc::channel(64);

    let election = tokio::spawn(
        lead(
            kube.clone(),
            settings.namespace.clone(),
            settings.identity.clone(),
            settings.lease_duration,
            latest_rx.clone(),
            leading_tx,
            shutdown.clone(),
        )
        .instrument(info_span!("leader_election", identity = %settings.identity)),
    );
    let reporter = tokio::spawn(
        report(settings.target.clone(), reports_rx, shutdown.clone())
            .instrument(info_span!("reporter")),
    );
    {
        let mut leading = leading_rx.clone();
        let metrics = settings.metrics.clone();
        tokio::spawn(async move {
            while leading.changed().await.is_ok() {
                metrics.leader.set(i64::from(*leading.borrow()));
            }
        });
    }
    let previews = crate::preview::Inbox::default();
    let previewing = tokio::spawn(
        crate::preview::preview_loop(
            kube.clone(),
            settings.namespace.clone(),
            settings.target.clone(),
            previews.clone(),
            leading_rx.clone(),
            shutdown.clone(),
        )
        .instrument(info_span!("previews")),
    );
    let worker = Worker::new(
        Cluster::new(kube, FIELD_MANAGER),
        &settings.namespace,
        reports_tx,
        settings.metrics.clone(),
    );
    let applying = tokio::spawn(
        apply_loop(
            worker,
            latest_rx,
            leading_rx,
            applied_tx,
            settings.metrics.clone(),
            shutdown.clone(),
        )
        .instrument(info_span!("apply_loop")),
    );
    session::run(
        settings.target,
        shutdown,
        applied_rx,
        latest_tx,
        settings.metrics.clone(),
        previews,
    )
    .instrument(info_span!("session"))
    .await;
    // Previews never write: nothing to wait for beyond their next safe point.
    previewing.abort();
    // The Lease is released only once the apply loop stopped at a safe point: the replica
    // taking over must not overlap with a write of this one.
    if tokio::time::timeout(STOP_GRACE, applying).await.is_err() {
        warn!("apply loop did not stop in time; not releasing the lease");
        return;
    }
    let Ok(Ok(Some(mut elector))) = tokio::time::timeout(STOP_GRACE, election).await else {
        return;
    };
    match tokio::time::timeout(STOP_GRACE, elector.release()).await {
        Ok(Ok(true)) => info!(lease = elector.lease(), "lease released"),
        Ok(Ok(false)) => {}
        Ok(Err(error)) => warn!(%error, "cannot release the lease; it will expire"),
        Err(_) => warn!("releasing the lease timed out; it will expire"),
    }
    // After the Lease, so that the next holder is not kept waiting on the server.
    let _ = reporter.await;
}

/// The agent's name as the server sent it with the newest revision.
fn agent_name(latest: &watch::Receiver<Option<Held>>) -> Option<String> {
    latest
        .borrow()
        .as_ref()
        .map(|held| held.revision.header.agent.clone())
        .filter(|name| !name.is_empty())
}

/// Competes for the Lease of the agent's name until `shutdown`; returns the elector, to be
/// released once applying stopped.
///
/// The name comes with each revision from the server, the same name that names the
/// inventory: every replica of one agent competes for one Lease whatever token it holds, so
/// a token rotation cannot make two leaders. Nothing is applied before a revision arrives,
/// so there is nothing to lead before either.
async fn lead(
    kube: kube::Client,
    namespace: String,
    identity: String,
    duration: Duration,
    mut latest: watch::Receiver<Option<Held>>,
    leading: watch::Sender<bool>,
    shutdown: CancellationToken,
) -> Option<Elector> {
    let mut current: Option<Elector> = None;
    loop {
        let name = agent_name(&latest);
        if let Some(name) = &name {
            let lease = lease_name(name);
            if current.as_ref().is_none_or(|e| e.lease() != lease) {
                // Renamed in the server config: the old Lease belongs to a name that no
                // longer exists; stop leading under it.
                leading.send_replace(false);
                info!(%lease, "competing for the lease");
                current = Some(Elector::new(
                    kube.clone(),
                    &namespace,
                    &lease,
                    &identity,
                    duration,
                ));
            }
        }
        let renamed = async {
            loop {
                if latest.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if agent_name(&latest) != name {
                    return;
                }
            }
        };
        let stopped = match current.as_mut() {
            Some(elector) => tokio::select! {
                _ = elector.run(&leading, &shutdown) => true,
                _ = renamed => false,
            },
            None => tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = renamed => false,
            },
        };
        if stopped {
            return current;
        }
    }
}

/// The revision the apply loop may apply now, with its identity: one the connected stream
/// delivered, or the one this replica already applied (or tried to) since it last gained the
/// lease.
///
/// Why: a revision held from a stream that has ended may have been superseded, and another
/// replica may have applied the newer one meanwhile; applying the old one on gaining the lease
/// would roll the cluster back and prune what the newer one added. A leader that merely lost
/// its stream keeps correcting drift toward what it already applied, which no other replica
/// can have changed while it kept the lease. Generations are not compared with the
/// inventory's, which records only a SHA: such a check would also have to let through a
/// server that lost its state, whose generations start from 1 again, rather than wedge.
fn applicable(
    held: Option<&Held>,
    this_term: Option<&RevisionIdentity>,
) -> Option<(ReadyRevision, RevisionIdentity)> {
    held.filter(|held| held.current || this_term == Some(&held.identity))
        .map(|held| (held.revision.clone(), held.identity.clone()))
}

/// Resolves once `latest` holds a revision other than `identity`; a re-send of the same one,
/// or it becoming current again on a new stream, is no reason to apply it again.
async fn superseded(
    latest: &mut watch::Receiver<Option<Held>>,
    identity: &RevisionIdentity,
) -> Result<(), watch::error::RecvError> {
    loop {
        latest.changed().await?;
        if latest
            .borrow_and_update()
            .as_ref()
            .map(|held| &held.identity)
            != Some(identity)
        {
            return Ok(());
        }
    }
}

/// Applies the newest revision while leading; re-applies it when a watched object drifts
/// and every reconcile interval; retries failures with backoff. On gaining the lease it
/// applies only a revision the connected stream delivered (see [`applicable`]).
pub async fn apply_loop(
    mut worker: Worker,
    mut latest: watch::Receiver<Option<Held>>,
    mut leading: watch::Receiver<bool>,
    applied: watch::Sender<Option<(String, u64)>>,
    metrics: Arc<AgentMetrics>,
    shutdown: CancellationToken,
) {
    let mut failures = Backoff::new(FAILURE_BACKOFF_MIN, FAILURE_BACKOFF_MAX);
    // The revision applied (or tried) since this replica last gained the lease. Every change
    // of `leading` ends the term: only real changes are published, so a change that still
    // reads "leading" was a loss and a gain this loop did not see in between.
    let mut this_term: Option<RevisionIdentity> = None;
    // Ends the term: what it applied is no longer stated on connecting, since stated, it
    // would keep the server from sending its current revision (which another leader may
    // have applied since) and mark the stale one current again.
    let end_term = |this_term: &mut Option<RevisionIdentity>| {
        *this_term = None;
        applied.send_replace(None);
    };
    loop {
        if leading.has_changed().unwrap_or(true) {
            end_term(&mut this_term);
        }
        if !*leading.borrow_and_update() {
            end_term(&mut this_term);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = leading.changed() => if changed.is_err() { return },
            }
            continue;
        }
        let Some((revision, identity)) =
            applicable(latest.borrow_and_update().as_ref(), this_term.as_ref())
        else {
            if latest.borrow().is_some() {
                info!("leading; waiting for the server's current revision");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = latest.changed() => if changed.is_err() { return },
                changed = leading.changed() => {
                    if changed.is_err() { return }
                    end_term(&mut this_term);
                }
            }
            continue;
        };
        this_term = Some(identity.clone());
        let stop = {
            let latest = latest.clone();
            let leading = leading.clone();
            let shutdown = shutdown.clone();
            let identity = identity.clone();
            // Any change of the lease ends the term, even a loss and a gain between two safe
            // points: someone else may have led in between.
            move || {
                latest.borrow().as_ref().map(|held| &held.identity) != Some(&identity)
                    || leading.has_changed().unwrap_or(true)
                    || !*leading.borrow()
                    || shutdown.is_cancelled()
            }
        };
        let started = Instant::now();
        let outcome = worker
            .reconcile(&revision, &stop)
            .instrument(info_span!("revision", sha = revision.sha()))
            .await;
        let result = match &outcome {
            Outcome::Healthy => "healthy",
            Outcome::Degraded(_) => "degraded",
            Outcome::Failed(_) => "failed",
            Outcome::Stopped => "stopped",
        };
        metrics.applied(result, started.elapsed().as_secs_f64());
        let wait = match &outcome {
            Outcome::Stopped => continue,
            Outcome::Healthy | Outcome::Degraded(_) => {
                failures.reset();
                applied.send_replace(Some((revision.sha().to_owned(), revision.generation())));
                let interval = revision
                    .header
                    .settings
                    .as_ref()
                    .map_or(300, |s| s.reconcile_interval_seconds);
                // Agents sharing an API server should not all re-apply at the same moment.
                jittered(Duration::from_secs(
                    interval.clamp(1, MAX_RECONCILE_INTERVAL.as_secs()),
                ))
            }
            Outcome::Failed(_) => failures.delay(),
        };
        info!(sha = revision.sha(), ?outcome, next_in = ?wait, "reconciled");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = worker.drifted(), if !matches!(outcome, Outcome::Failed(_)) => {
                metrics.drift_corrections.inc();
            }
            changed = superseded(&mut latest, &identity) => if changed.is_err() { return },
            changed = leading.changed() => {
                if changed.is_err() { return }
                end_term(&mut this_term);
            }
        }
    }
}

/// The most reports kept undelivered; only reached if the server stays away through many
/// revisions, since coalescing bounds what one revision queues.
const MAX_QUEUED_REPORTS: usize = 1000;
/// How long one delivery attempt may take before it counts as failed.
const REPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `phase` is an outcome rather than progress.
fn is_final(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Applied | Phase::Healthy | Phase::Degraded | Phase::Failed
    )
}

/// Whether `newer`, queued after `older`, makes `older` not worth delivering: progress is only
/// worth its newest state, and a repeated outcome of the same revision (a drift-correcting
/// re-apply) only its newest instance. Outcomes of other revisions are always kept.
pub fn supersedes(newer: &StatusReport, older: &StatusReport) -> bool {
    if !is_final(older.phase()) {
        return true;
    }
    newer.revision == older.revision && newer.phase == older.phase
}

/// Reports not delivered yet, oldest first, coalesced so that a long outage neither loses an
/// outcome nor grows the queue without bound.
#[derive(Debug, Default)]
pub struct ReportQueue {
    pending: VecDeque<StatusReport>,
}

impl ReportQueue {
    /// Queues `report`, dropping what it supersedes.
    pub fn push(&mut self, report: StatusReport) {
        self.pending.retain(|older| !supersedes(&report, older));
        self.pending.push_back(report);
        while self.pending.len() > MAX_QUEUED_REPORTS {
            if let Some(dropped) = self.pending.pop_front() {
                warn!(
                    sha = dropped.revision,
                    phase = ?dropped.phase(),
                    "too many undelivered reports; dropping the oldest"
                );
            }
        }
    }

    /// Puts back a report whose delivery failed, unless something queued since supersedes it.
    pub fn retry(&mut self, report: StatusReport) {
        if !self.pending.iter().any(|newer| supersedes(newer, &report)) {
            self.pending.push_front(report);
        }
    }

    /// The oldest report, taken out for delivery.
    pub fn pop(&mut self) -> Option<StatusReport> {
        self.pending.pop_front()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// How many reports wait.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// The queued reports, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &StatusReport> {
        self.pending.iter()
    }
}

/// Why one delivery attempt failed.
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("no answer within {}s", .0.as_secs())]
    Timeout(Duration),
}

impl DeliveryError {
    /// Whether the server refused this very report, so that sending it again cannot help.
    fn is_permanent(&self) -> bool {
        matches!(
            self,
            DeliveryError::Client(ClientError::Status(status)) if matches!(
                status.code(),
                Code::InvalidArgument
                    | Code::NotFound
                    | Code::AlreadyExists
                    | Code::FailedPrecondition
                    | Code::OutOfRange
                    | Code::Unimplemented
            )
        )
    }
}

async fn deliver(
    target: &Target,
    client: &mut Option<Client>,
    report: StatusReport,
) -> Result<(), DeliveryError> {
    let connected = match client.take() {
        Some(connected) => connected,
        None => tokio::time::timeout(
            REPORT_TIMEOUT,
            Client::connect(&target.server, &target.token, target.ca_file.as_deref()),
        )
        .await
        .map_err(|_| DeliveryError::Timeout(REPORT_TIMEOUT))??,
    };
    tokio::time::timeout(REPORT_TIMEOUT, connected.report(report))
        .await
        .map_err(|_| DeliveryError::Timeout(REPORT_TIMEOUT))??;
    // Only a connection that just worked is kept for the next report.
    *client = Some(connected);
    Ok(())
}

/// Sends reports to the server in order, retrying until each is delivered or superseded,
/// without ever blocking the apply loop. Stopping does not drop what it holds: after
/// `shutdown` it goes on until every report is delivered and the apply loop is gone (it
/// sends its last reports as it stops), for at most [`REPORT_FLUSH`].
async fn report(
    target: Target,
    mut reports: mpsc::Receiver<StatusReport>,
    shutdown: CancellationToken,
) {
    let mut client: Option<Client> = None;
    let mut queue = ReportQueue::default();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let flushed = async {
        shutdown.cancelled().await;
        tokio::time::sleep(REPORT_FLUSH).await;
    };
    tokio::pin!(flushed);
    loop {
        while queue.is_empty() {
            tokio::select! {
                // Everything delivered; the apply loop outlived the grace period.
                () = &mut flushed => return,
                report = reports.recv() => match report {
                    Some(report) => queue.push(report),
                    None => return,
                },
            }
        }
        while let Ok(report) = reports.try_recv() {
            queue.push(report);
        }
        let Some(report) = queue.pop() else {
            continue;
        };
        let delivered = {
            let send = deliver(&target, &mut client, report.clone());
            tokio::pin!(send);
            // Reports keep arriving while one is in flight: queue them, so the worker never
            // waits on the server.
            loop {
                tokio::select! {
                    () = &mut flushed => {
                        warn!(left = queue.len() + 1, "reports not delivered before the agent stopped");
                        return;
                    }
                    delivered = &mut send => break delivered,
                    Some(newer) = reports.recv() => queue.push(newer),
                }
            }
        };
        let error = match delivered {
            Ok(()) => {
                backoff.reset();
                continue;
            }
            Err(error) => error,
        };
        if error.is_permanent() {
            warn!(%error, sha = report.revision, phase = ?report.phase(), "server refused report; dropping it");
            continue;
        }
        warn!(%error, sha = report.revision, phase = ?report.phase(), "cannot send report; will retry");
        queue.retry(report);
        let pause = tokio::time::sleep(backoff.delay());
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut flushed => {
                    warn!(left = queue.len(), "reports not delivered before the agent stopped");
                    return;
                }
                _ = &mut pause => break,
                Some(newer) = reports.recv() => queue.push(newer),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use greenlight::v1::agent_service_server::{AgentService, AgentServiceServer};
    use greenlight::v1::{ReportStatusRequest, ReportStatusResponse, SyncRequest};
    use std::sync::Mutex;

    /// An agent service that takes its time over every report, so that reports queue up.
    #[derive(Clone, Default)]
    struct SlowServer {
        received: Arc<Mutex<Vec<(String, Phase)>>>,
    }

    #[tonic::async_trait]
    impl AgentService for SlowServer {
        type SyncStream = crate::testing::SyncEvents;

        async fn sync(
            &self,
            _: tonic::Request<SyncRequest>,
        ) -> Result<tonic::Response<Self::SyncStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("reports only"))
        }

        async fn report_status(
            &self,
            request: tonic::Request<ReportStatusRequest>,
        ) -> Result<tonic::Response<ReportStatusResponse>, tonic::Status> {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if let Some(report) = request.into_inner().report {
                let phase = report.phase();
                self.received
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((report.revision, phase));
            }
            Ok(tonic::Response::new(ReportStatusResponse {}))
        }

        async fn report_preview(
            &self,
            _: tonic::Request<greenlight::v1::ReportPreviewRequest>,
        ) -> Result<tonic::Response<greenlight::v1::ReportPreviewResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("reports only"))
        }
    }

    #[tokio::test]
    async fn reports_held_when_the_agent_stops_are_still_delivered() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = SlowServer::default();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(server.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let (tx, rx) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let target = Target {
            server: format!("http://{addr}"),
            token: "token".into(),
            ca_file: None,
        };
        let reporter = tokio::spawn(super::report(target, rx, shutdown.clone()));
        tx.send(report("a", Phase::Applying)).await.unwrap();
        tx.send(report("a", Phase::Applied)).await.unwrap();
        tx.send(report("a", Phase::Healthy)).await.unwrap();
        // Stopped as by SIGTERM with the reports in flight and queued; the apply loop sends
        // its last one as it stops, then goes.
        shutdown.cancel();
        tx.send(report("b", Phase::Applying)).await.unwrap();
        drop(tx);
        tokio::time::timeout(REPORT_FLUSH + Duration::from_secs(5), reporter)
            .await
            .expect("the reporter stops once everything is delivered")
            .unwrap();
        let received = server.received.lock().unwrap().clone();
        assert!(
            received.contains(&("a".to_owned(), Phase::Healthy)),
            "the outcome reached the server: {received:?}"
        );
        assert_eq!(received.last(), Some(&("b".to_owned(), Phase::Applying)));
    }

    fn report(revision: &str, phase: Phase) -> StatusReport {
        StatusReport {
            revision: revision.into(),
            phase: phase.into(),
            ..StatusReport::default()
        }
    }

    fn queued(queue: &ReportQueue) -> Vec<(String, Phase)> {
        queue
            .iter()
            .map(|r| (r.revision.clone(), r.phase()))
            .collect()
    }

    #[test]
    fn progress_coalesces_but_outcomes_survive() {
        let mut queue = ReportQueue::default();
        queue.push(report("a", Phase::Applying));
        queue.push(report("a", Phase::Applying));
        queue.push(report("a", Phase::Applied));
        queue.push(report("a", Phase::Healthy));
        queue.push(report("b", Phase::Applying));
        queue.push(report("b", Phase::Failed));
        queue.push(report("c", Phase::Applying));
        assert_eq!(
            queued(&queue),
            [
                ("a".into(), Phase::Applied),
                ("a".into(), Phase::Healthy),
                ("b".into(), Phase::Failed),
                ("c".into(), Phase::Applying),
            ]
        );
    }

    #[test]
    fn repeated_reconciles_of_one_revision_stay_bounded() {
        let mut queue = ReportQueue::default();
        for _ in 0..100 {
            for phase in [Phase::Applying, Phase::Applied, Phase::Healthy] {
                queue.push(report("a", phase));
            }
        }
        assert_eq!(
            queued(&queue),
            [("a".into(), Phase::Applied), ("a".into(), Phase::Healthy)]
        );
        queue.push(report("a", Phase::Degraded));
        assert_eq!(queue.iter().count(), 3, "a different outcome is kept");
    }

    #[test]
    fn a_failed_delivery_goes_back_first_unless_superseded() {
        let mut queue = ReportQueue::default();
        queue.push(report("a", Phase::Applied));
        queue.push(report("a", Phase::Healthy));
        let first = queue.pop().unwrap();
        queue.retry(first);
        assert_eq!(queue.pop().unwrap().phase(), Phase::Applied);

        let progress = report("a", Phase::Applying);
        queue.push(report("b", Phase::Applying));
        queue.retry(progress);
        assert_eq!(
            queued(&queue),
            [("a".into(), Phase::Healthy), ("b".into(), Phase::Applying)]
        );
    }

    #[test]
    fn only_refusals_of_the_report_itself_are_permanent() {
        let refused = DeliveryError::Client(ClientError::Status(tonic::Status::invalid_argument(
            "report.phase is required",
        )));
        assert!(refused.is_permanent());
        let down = DeliveryError::Client(ClientError::Status(tonic::Status::unavailable("down")));
        assert!(!down.is_permanent());
        assert!(!DeliveryError::Timeout(REPORT_TIMEOUT).is_permanent());
    }

    /// A worker and its reports, on a stand-in API server that serves Deployments, has no
    /// object (nor inventory), and takes every write.
    async fn worker() -> (Worker, mpsc::Receiver<StatusReport>) {
        let (kube, _) = crate::testing::serve(|method, path| {
            Some(match (method, path) {
                ("GET", "/apis/apps/v1") => (
                    200,
                    crate::testing::resources("apps/v1", &[("deployments", "Deployment", true)]),
                ),
                ("PATCH" | "POST", _) => (
                    200,
                    r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"written"}}"#
                        .to_owned(),
                ),
                _ => (404, crate::testing::status(404, "not found")),
            })
        })
        .await;
        crate::testing::worker_for(kube)
    }

    /// A revision of no objects, healthy once applied and re-applied every second.
    fn empty_revision(sha: &str, generation: u64) -> ReadyRevision {
        let mut revision = session::tests::revision(sha, generation, "");
        revision.files.clear();
        revision.header.file_count = 0;
        revision.header.total_bytes = 0;
        revision.header.settings = Some(greenlight::v1::ApplySettings {
            reconcile_interval_seconds: 1,
            ..Default::default()
        });
        revision
    }

    /// A revision of one Deployment, which the stand-in API server never shows after taking
    /// it: its health wait lasts a minute.
    fn revision_waiting_for_health(sha: &str, generation: u64) -> ReadyRevision {
        let mut revision = empty_revision(sha, generation);
        let manifest = b"apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: app\n".to_vec();
        revision.header.file_count = 1;
        revision.header.total_bytes = manifest.len() as u64;
        revision.files = vec![("app.yaml".to_owned(), manifest)];
        revision.header.settings = Some(greenlight::v1::ApplySettings {
            default_namespace: "apps".into(),
            health_timeout_seconds: 60,
            reconcile_interval_seconds: 1,
            ..Default::default()
        });
        revision
    }

    /// Waits (for at most 10 s) for a report of `phase`.
    async fn reported(reports: &mut mpsc::Receiver<StatusReport>, phase: Phase) -> StatusReport {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), reports.recv()).await {
                Ok(Some(report)) if report.phase() == phase => return report,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => panic!("no {phase:?} report"),
            }
        }
    }

    /// The SHA of the next revision the worker starts applying within `within`, if any: every
    /// apply opens with an Applying report saying it validates the manifests.
    async fn next_applied(
        reports: &mut mpsc::Receiver<StatusReport>,
        within: Duration,
    ) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, reports.recv()).await {
                Ok(Some(report)) if report.phase() == Phase::Applying => {
                    if report.message == "validating manifests" {
                        return Some(report.revision);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The apply loop over channels the test drives.
    struct Loop {
        latest: watch::Sender<Option<Held>>,
        leading: watch::Sender<bool>,
        /// What the session would state as applied on connecting.
        applied: watch::Receiver<Option<(String, u64)>>,
        reports: mpsc::Receiver<StatusReport>,
        shutdown: CancellationToken,
    }

    impl Loop {
        async fn start(held: Option<Held>) -> Self {
            let (worker, reports) = worker().await;
            let (latest, latest_rx) = watch::channel(held);
            let (leading, leading_rx) = watch::channel(false);
            let (applied, applied_rx) = watch::channel(None);
            let shutdown = CancellationToken::new();
            tokio::spawn(apply_loop(
                worker,
                latest_rx,
                leading_rx,
                applied,
                Arc::new(AgentMetrics::default()),
                shutdown.clone(),
            ));
            Self {
                latest,
                leading,
                applied: applied_rx,
                reports,
                shutdown,
            }
        }

        /// A loop leading that has applied revision `a`, delivered on its stream.
        async fn leading_with_a_applied() -> Self {
            let mut applying = Self::start(None).await;
            applying.leading.send_replace(true);
            session::deliver(&applying.latest, empty_revision("a", 1));
            assert_eq!(
                applying.next_applied(Duration::from_secs(5)).await,
                Some("a".to_owned())
            );
            applying
        }

        /// Whether, `within`, it states something applied (`stated`) or nothing.
        async fn states(&mut self, stated: bool, within: Duration) -> bool {
            tokio::time::timeout(within, self.applied.wait_for(|a| a.is_some() == stated))
                .await
                .is_ok_and(|seen| seen.is_ok())
        }

        /// Its stream ends, then it loses and regains the Lease before the loop looks:
        /// whoever led in between may have applied a newer revision.
        fn loses_its_stream_and_term(&self) {
            self.stream_ends();
            self.leading.send_replace(false);
            self.leading.send_replace(true);
        }

        /// What the session does when the stream ends.
        fn stream_ends(&self) {
            self.latest.send_if_modified(|held| {
                if let Some(held) = held {
                    held.current = false;
                }
                false
            });
        }

        async fn next_applied(&mut self, within: Duration) -> Option<String> {
            next_applied(&mut self.reports, within).await
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    fn held(revision: ReadyRevision, current: bool) -> Held {
        Held {
            identity: RevisionIdentity::of(&revision),
            revision,
            current,
        }
    }

    #[test]
    fn a_stale_revision_is_applicable_only_within_the_term_that_applied_it() {
        let a = empty_revision("a", 1);
        let a_identity = RevisionIdentity::of(&a);
        let b_identity = RevisionIdentity::of(&empty_revision("b", 2));
        let stale = held(a.clone(), false);
        assert!(applicable(Some(&stale), None).is_none());
        assert!(applicable(Some(&stale), Some(&b_identity)).is_none());
        assert!(applicable(Some(&stale), Some(&a_identity)).is_some());
        assert!(applicable(Some(&held(a, true)), None).is_some());
        assert!(applicable(None, Some(&a_identity)).is_none());
    }

    #[tokio::test]
    async fn a_new_leader_does_not_apply_a_revision_its_ended_stream_left() {
        let mut applying = Loop::start(Some(held(empty_revision("a", 1), false))).await;
        applying.leading.send_replace(true);
        assert_eq!(applying.next_applied(Duration::from_secs(2)).await, None);
        session::deliver(&applying.latest, empty_revision("b", 2));
        assert_eq!(
            applying.next_applied(Duration::from_secs(5)).await,
            Some("b".to_owned())
        );
    }

    #[tokio::test]
    async fn a_leader_keeps_correcting_toward_its_revision_while_disconnected() {
        let mut applying = Loop::leading_with_a_applied().await;
        applying.stream_ends();
        assert_eq!(
            applying.next_applied(Duration::from_secs(5)).await,
            Some("a".to_owned()),
            "re-applied after its interval, though its stream ended"
        );
    }

    /// Lost and regained between two looks of the loop: the new term states nothing as
    /// applied, so the server sends its current revision rather than confirm the old one.
    #[tokio::test]
    async fn a_regained_lease_states_nothing_applied() {
        let mut applying = Loop::leading_with_a_applied().await;
        let stated = applying.states(true, Duration::from_secs(5)).await;
        assert!(stated, "a leader states what it applied");
        applying.loses_its_stream_and_term();
        let cleared = applying.states(false, Duration::from_secs(3)).await;
        assert!(cleared, "the new term states nothing applied");
    }

    #[tokio::test]
    async fn a_regained_lease_needs_a_current_revision_again() {
        let mut applying = Loop::leading_with_a_applied().await;
        applying.loses_its_stream_and_term();
        assert_eq!(applying.next_applied(Duration::from_secs(3)).await, None);
        // The server sends it again on the new stream: it is still the current one.
        session::deliver(&applying.latest, empty_revision("a", 1));
        assert_eq!(
            applying.next_applied(Duration::from_secs(5)).await,
            Some("a".to_owned())
        );
    }

    #[tokio::test]
    async fn an_apply_waiting_for_health_goes_on_when_its_revision_is_sent_again() {
        let mut applying = Loop::start(None).await;
        applying.leading.send_replace(true);
        session::deliver(&applying.latest, revision_waiting_for_health("a", 1));
        let applied = reported(&mut applying.reports, Phase::Applied).await;
        assert_eq!(applied.revision, "a", "{applied:?}");
        // Reconnected: the server sends the revision in progress again.
        applying.stream_ends();
        session::deliver(&applying.latest, revision_waiting_for_health("a", 1));
        assert_eq!(
            applying.next_applied(Duration::from_secs(3)).await,
            None,
            "the apply and its health deadline started over"
        );
    }

    #[tokio::test]
    async fn a_standby_taking_over_applies_the_current_revision_not_its_broken_streams() {
        use session::tests::{
            Scripted, ScriptedServer, events, held_until, revision, spawn_session,
        };
        // The standby received A, then lost its stream; meanwhile B was decided and applied by
        // the leader, and the server sends B once the standby is back.
        let server = ScriptedServer::new([
            Scripted::SendThenEnd(events(&revision("a", 1, ""))),
            Scripted::Refuse,
            Scripted::Refuse,
            Scripted::SendThenHold(events(&revision("b", 2, ""))),
        ]);
        let target = server.start().await;
        let (worker, mut reports) = worker().await;
        let (latest, latest_rx) = watch::channel(None);
        let (leading, leading_rx) = watch::channel(false);
        let (applied, _) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let session = spawn_session(target, latest, None, shutdown.clone());
        tokio::spawn(apply_loop(
            worker,
            latest_rx.clone(),
            leading_rx,
            applied,
            Arc::new(AgentMetrics::default()),
            shutdown.clone(),
        ));
        held_until(&latest_rx, |h| h.revision.sha() == "a" && !h.current).await;
        leading.send_replace(true);
        assert_eq!(
            next_applied(&mut reports, Duration::from_secs(10)).await,
            Some("b".to_owned())
        );
        shutdown.cancel();
        session.await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_revision_resent_on_reconnect_keeps_its_backoff() {
        use session::tests::{Scripted, ScriptedServer, events, revision, spawn_session};
        let a = revision("a", 1, "");
        // The stream breaks after the revision failed, while its failure backoff runs.
        let server = ScriptedServer::new([
            Scripted::SendThenEndAfter(events(&a), Duration::from_millis(500)),
            Scripted::SendThenHold(events(&a)),
        ]);
        let target = server.clone().start().await;
        let (worker, mut reports) = worker().await;
        let (latest, latest_rx) = watch::channel(None);
        // Kept to the end: the apply loop stops once no one can change its leadership.
        let (_leading, leading_rx) = watch::channel(true);
        let (applied, _) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let session = spawn_session(target, latest, None, shutdown.clone());
        tokio::spawn(apply_loop(
            worker,
            latest_rx,
            leading_rx,
            applied,
            Arc::new(AgentMetrics::default()),
            shutdown.clone(),
        ));
        assert_eq!(
            next_applied(&mut reports, Duration::from_secs(10)).await,
            Some("a".to_owned())
        );
        // The reconnection and the re-send take at most about a second; the failure backoff
        // holds the retry back for at least 5 s.
        assert_eq!(
            next_applied(&mut reports, Duration::from_secs(3)).await,
            None,
            "re-applied at once"
        );
        assert_eq!(server.calls(), 2, "the revision was sent again");
        shutdown.cancel();
        session.await.unwrap();
    }
}
