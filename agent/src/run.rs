//! Wiring of the agent: one stream to the server, leader election, the apply loop with drift
//! correction, and a reporter that does not slow applying down.

use std::time::Duration;

use greenlight::digest::sha256_hex;
use greenlight::v1::StatusReport;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::assemble::ReadyRevision;
use crate::client::Client;
use crate::cluster::Cluster;
use crate::lease::Elector;
use crate::reconcile::{FIELD_MANAGER, Outcome, Worker};
use crate::session::{self, Backoff, Target};

/// Retries of a failed revision back off between these bounds, as kas did.
const FAILURE_BACKOFF_MIN: Duration = Duration::from_secs(10);
const FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How the agent runs.
pub struct Settings {
    pub target: Target,
    /// Where the inventory and the Lease live.
    pub namespace: String,
    /// This replica's name in the Lease.
    pub identity: String,
    /// How long leadership survives without renewal.
    pub lease_duration: Duration,
}

/// Runs the agent until `shutdown`.
pub async fn run(settings: Settings, kube: kube::Client, shutdown: CancellationToken) {
    let (latest_tx, latest_rx) = watch::channel(None::<ReadyRevision>);
    let (applied_tx, applied_rx) = watch::channel(None::<String>);
    let (leading_tx, leading_rx) = watch::channel(false);
    let (reports_tx, reports_rx) = mpsc::channel(64);

    // One Lease per agent identity (its token), so agents sharing a namespace do not contend.
    let lease = format!(
        "greenlight-agent-{}",
        &sha256_hex(settings.target.token.as_bytes())[..12]
    );
    let elector = Elector::new(
        kube.clone(),
        &settings.namespace,
        &lease,
        &settings.identity,
        settings.lease_duration,
    );
    tokio::spawn(
        elector
            .run(leading_tx, shutdown.clone())
            .instrument(info_span!("leader_election")),
    );
    tokio::spawn(
        report(settings.target.clone(), reports_rx, shutdown.clone())
            .instrument(info_span!("reporter")),
    );
    let worker = Worker::new(
        Cluster::new(kube, FIELD_MANAGER),
        &settings.namespace,
        reports_tx,
    );
    tokio::spawn(
        apply_loop(worker, latest_rx, leading_rx, applied_tx, shutdown.clone())
            .instrument(info_span!("apply_loop")),
    );
    session::run(settings.target, shutdown, applied_rx, latest_tx)
        .instrument(info_span!("session"))
        .await;
}

/// Applies the newest revision while leading; re-applies it every reconcile interval to
/// correct drift; retries failures with backoff.
pub async fn apply_loop(
    mut worker: Worker,
    mut latest: watch::Receiver<Option<ReadyRevision>>,
    mut leading: watch::Receiver<bool>,
    applied: watch::Sender<Option<String>>,
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
        let outcome = worker.reconcile(&revision, &stop).await;
        let wait = match &outcome {
            Outcome::Stopped => continue,
            Outcome::Healthy | Outcome::Degraded(_) => {
                failures.reset();
                applied.send_replace(Some(revision.sha().to_owned()));
                let interval = revision
                    .header
                    .settings
                    .as_ref()
                    .map_or(300, |s| s.reconcile_interval_seconds);
                Duration::from_secs(interval.max(1))
            }
            Outcome::Failed(_) => failures.delay(),
        };
        info!(sha = revision.sha(), ?outcome, next_in = ?wait, "reconciled");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            changed = latest.changed() => if changed.is_err() { return },
            changed = leading.changed() => if changed.is_err() { return },
        }
    }
}

/// Sends reports to the server with retries, in order, without blocking the apply loop.
async fn report(
    target: Target,
    mut reports: mpsc::Receiver<StatusReport>,
    shutdown: CancellationToken,
) {
    let mut client: Option<Client> = None;
    while let Some(report) = tokio::select! {
        _ = shutdown.cancelled() => None,
        report = reports.recv() => report,
    } {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        for attempt in 0..8 {
            let connected = match client.clone() {
                Some(client) => Ok(client),
                None => {
                    Client::connect(&target.server, &target.token, target.ca_file.as_deref()).await
                }
            };
            match connected {
                Ok(connected) => match connected.report(report.clone()).await {
                    Ok(()) => {
                        client = Some(connected);
                        break;
                    }
                    Err(error) => {
                        warn!(%error, attempt, "cannot send report");
                        client = None;
                    }
                },
                Err(error) => warn!(%error, attempt, "cannot connect to send report"),
            }
            tokio::time::sleep(backoff.delay()).await;
        }
    }
}
