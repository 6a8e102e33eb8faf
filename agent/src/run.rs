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
use crate::session::{self, Target};
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
    let (latest_tx, latest_rx) = watch::channel(None::<ReadyRevision>);
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
fn agent_name(latest: &watch::Receiver<Option<ReadyRevision>>) -> Option<String> {
    latest
        .borrow()
        .as_ref()
        .map(|r| r.header.agent.clone())
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
    mut latest: watch::Receiver<Option<ReadyRevision>>,
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

/// Applies the newest revision while leading; re-applies it when a watched object drifts
/// and every reconcile interval; retries failures with backoff.
pub async fn apply_loop(
    mut worker: Worker,
    mut latest: watch::Receiver<Option<ReadyRevision>>,
    mut leading: watch::Receiver<bool>,
    applied: watch::Sender<Option<(String, u64)>>,
    metrics: Arc<AgentMetrics>,
    shutdown: CancellationToken,
) {
    let mut failures = Backoff::new(FAILURE_BACKOFF_MIN, FAILURE_BACKOFF_MAX);
    loop {
        if !*leading.borrow_and_update() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = leading.changed() => if changed.is_err() { return },
            }
            continue;
        }
        let Some(revision) = latest.borrow_and_update().clone() else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = latest.changed() => if changed.is_err() { return },
                changed = leading.changed() => if changed.is_err() { return },
            }
            continue;
        };
        let stop = {
            let latest = latest.clone();
            let leading = leading.clone();
            let shutdown = shutdown.clone();
            move || {
                latest.has_changed().unwrap_or(true)
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
            changed = latest.changed() => if changed.is_err() { return },
            changed = leading.changed() => if changed.is_err() { return },
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
    use greenlight::v1::{ReportStatusRequest, ReportStatusResponse, SyncEvent, SyncRequest};
    use std::sync::Mutex;

    /// An agent service that takes its time over every report, so that reports queue up.
    #[derive(Clone, Default)]
    struct SlowServer {
        received: Arc<Mutex<Vec<(String, Phase)>>>,
    }

    #[tonic::async_trait]
    impl AgentService for SlowServer {
        type SyncStream = std::pin::Pin<
            Box<dyn futures_util::Stream<Item = Result<SyncEvent, tonic::Status>> + Send>,
        >;

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
}
