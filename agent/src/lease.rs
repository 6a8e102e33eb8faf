//! Leader election over a `coordination.k8s.io` Lease: only the holder applies.
//!
//! As in client-go: every round is bounded in time; a leader that has not renewed within the
//! renew deadline steps down, which is before anyone else may take over; and another
//! holder's lease expires a lease duration after this replica *saw* its record last change,
//! by the local monotonic clock, so clock skew between nodes cannot make two leaders.
//!
//! A standby looks at the Lease at least once per retry period (a third of the lease
//! duration) and again at the moment the holder's lease would expire, so it takes over at
//! most one lease duration plus one retry period after the holder's last renewal.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use greenlight::backoff::jittered;

/// How long a lease is valid without renewal, as kas used.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);

/// The lease record as this replica saw it; any change means its holder is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// `spec.holderIdentity`, `None` when empty.
    pub holder: Option<String>,
    /// `spec.renewTime` as written, compared for change only.
    pub renew_time: Option<String>,
    /// `metadata.resourceVersion`.
    pub resource_version: Option<String>,
}

/// Remembers when the lease record was first seen as it is now, by the local clock.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<(Record, Instant)>,
}

impl Observer {
    /// Notes `record` seen at `now`; returns since when it has been seen unchanged.
    pub fn observe(&mut self, record: Record, now: Instant) -> Instant {
        match &self.last {
            Some((seen, since)) if *seen == record => *since,
            _ => {
                self.last = Some((record, now));
                now
            }
        }
    }
}

/// What one round found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// This replica holds the lease.
    Leading,
    /// Another replica holds it until `expires` by the local clock; `None` when that is not
    /// known (a compare-and-swap lost to another replica's write).
    Following { expires: Option<Instant> },
}

impl Round {
    /// The round a compare-and-swap write ended: leading when it won.
    fn of(won: bool) -> Self {
        if won {
            Round::Leading
        } else {
            Round::Following { expires: None }
        }
    }
}

/// The time between the starts of two rounds: jittered, so that replicas started together
/// do not keep colliding, but under nine tenths of `retry`, the rest absorbing the calls' own
/// time, so that a standby sees a renewal within one retry period: that bounds a takeover.
pub fn round_period(retry: Duration) -> Duration {
    jittered(retry * 3 / 4)
}

/// When the round after one that started at `started` starts: `period` later, however long
/// the calls took, so that a standby sees a renewal at most a period after it happened; at
/// `expires`, another holder's expiry, if that comes first, so that it takes over the moment
/// it may; and no later than a leader's renew `deadline`, so that it steps down in time.
pub fn next_round(
    started: Instant,
    period: Duration,
    expires: Option<Instant>,
    deadline: Option<Instant>,
) -> Instant {
    let regular = started.checked_add(period).unwrap_or(started);
    [expires, deadline]
        .into_iter()
        .flatten()
        .fold(regular, Instant::min)
}

/// Whether a compare-and-swap write of the Lease won: a conflict (409) means another
/// replica wrote first, which is an answer, not an error.
fn won(written: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match written {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

/// Whether a holder whose record has been unchanged since `since` lost its lease of
/// `duration` at `now`; a duration too large to add never expires.
pub fn expired(since: Instant, duration: Duration, now: Instant) -> bool {
    since.checked_add(duration).is_some_and(|end| now >= end)
}

/// Whether a leader whose last successful renewal was sent at `renewed` still leads at
/// `now`, given `renew_deadline`.
pub fn still_leading(renewed: Option<Instant>, renew_deadline: Duration, now: Instant) -> bool {
    renewed.is_some_and(|sent| now.saturating_duration_since(sent) < renew_deadline)
}

/// Competes for one Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    observer: Observer,
    /// When the last successful renewal was sent; kept across runs so that a restarted run
    /// still steps down in time.
    renewed: Option<Instant>,
}

impl Elector {
    /// Competes for the Lease `name` in `namespace` as `identity`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            observer: Observer::default(),
            renewed: None,
        }
    }

    /// The name of the Lease competed for.
    pub fn lease(&self) -> &str {
        &self.name
    }

    /// Gives the lease up if this replica holds it, so that another takes over at once
    /// rather than after the lease duration; `true` when it was released.
    pub async fn release(&mut self) -> Result<bool, kube::Error> {
        self.renewed = None;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        // As client-go's ReleaseOnCancel: no holder, and the shortest valid duration for
        // readers that only look at the times.
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        won(self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await)
    }

    /// One round at `now`: acquires or renews the lease.
    pub async fn try_acquire(&mut self, now: Instant) -> Result<Round, kube::Error> {
        // Wall-clock times are written for people reading the Lease; decisions never use
        // them.
        let wall = Timestamp::now();
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(wall)),
                    renew_time: Some(MicroTime(wall)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return won(self.api.create(&PostParams::default(), &lease).await).map(Round::of);
        };
        let resource_version = lease.metadata.resource_version.clone();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        let record = Record {
            holder: holder.clone(),
            renew_time: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            resource_version,
        };
        let since = self.observer.observe(record, now);
        if !mine && holder.is_some() {
            // The holder's own promise, when it made one; ours otherwise.
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .filter(|s| *s > 0)
                .map_or(self.duration, Duration::from_secs);
            if !expired(since, duration, now) {
                return Ok(Round::Following {
                    expires: since.checked_add(duration),
                });
            }
        }
        if !mine {
            spec.acquire_time = Some(MicroTime(wall));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(MicroTime(wall));
        spec.lease_duration_seconds = Some(seconds);
        // The resourceVersion we read makes this a compare-and-swap: two replicas cannot
        // both win the same round.
        won(self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await)
        .map(Round::of)
    }

    /// Keeps competing until `shutdown`, publishing whether this replica leads; the lease
    /// is not released (see [`Elector::release`]).
    pub async fn run(&mut self, leading: &watch::Sender<bool>, shutdown: &CancellationToken) {
        // Three rounds per lease period and a renew deadline of two thirds of it, as
        // client-go's defaults (10s of 15s).
        let retry = self.duration / 3;
        let renew_deadline = self.duration * 2 / 3;
        loop {
            let renewed = self.renewed;
            let started = Instant::now();
            // A leader's round may not outlast its renew deadline: it must step down in time.
            let budget = match renewed {
                Some(sent) => retry.min(
                    sent.checked_add(renew_deadline)
                        .map_or(retry, |end| end.saturating_duration_since(started)),
                ),
                None => retry,
            };
            let round = tokio::select! {
                _ = shutdown.cancelled() => {
                    leading.send_replace(false);
                    return;
                }
                round = tokio::time::timeout(budget, self.try_acquire(started)) => round,
            };
            let (failed, expires) = match round {
                Ok(Ok(Round::Leading)) => {
                    self.renewed = Some(started);
                    (false, None)
                }
                Ok(Ok(Round::Following { expires })) => {
                    self.renewed = None;
                    (false, expires)
                }
                Ok(Err(error)) => {
                    warn!(%error, "cannot reach the lease");
                    (true, None)
                }
                Err(_) => {
                    warn!(timeout = ?budget, "lease round timed out");
                    (true, None)
                }
            };
            let lead = still_leading(self.renewed, renew_deadline, Instant::now());
            if !lead {
                self.renewed = None;
            }
            leading.send_if_modified(|current| {
                if *current != lead {
                    info!(lease = self.name, leading = lead, "leadership changed");
                    *current = lead;
                    true
                } else {
                    false
                }
            });
            // A leader whose renewal failed retries sooner, while it still leads.
            let period = if lead && failed {
                jittered(retry / 4)
            } else {
                round_period(retry)
            };
            let deadline = self
                .renewed
                .and_then(|sent| sent.checked_add(renew_deadline));
            let next = next_round(started, period, expires, deadline);
            tokio::select! {
                _ = shutdown.cancelled() => {
                    leading.send_replace(false);
                    return;
                }
                _ = tokio::time::sleep_until(next.into()) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{serve, status};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn record(holder: &str, renewed: &str, version: &str) -> Record {
        Record {
            holder: Some(holder.into()),
            renew_time: Some(renewed.into()),
            resource_version: Some(version.into()),
        }
    }

    #[test]
    fn another_holder_expires_a_lease_duration_after_its_record_last_changed_here() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        let lease = Duration::from_secs(15);
        let mut observer = Observer::default();
        // Its renewTime may be far in the past or future by our clock: only change counts.
        let since = observer.observe(record("b", "1970-01-01T00:00:00Z", "7"), start);
        assert_eq!(since, start);
        let later = start + 14 * second;
        assert_eq!(
            observer.observe(record("b", "1970-01-01T00:00:00Z", "7"), later),
            start
        );
        assert!(!expired(start, lease, later));
        assert!(expired(start, lease, start + lease));
        // A renewal restarts the count.
        let renewed = observer.observe(record("b", "1970-01-01T00:00:10Z", "8"), later);
        assert_eq!(renewed, later);
        assert!(!expired(renewed, lease, start + lease));
        // Absurd durations never expire instead of overflowing.
        assert!(!expired(start, Duration::MAX, start + lease));
    }

    #[test]
    fn a_leader_steps_down_once_its_last_renewal_is_older_than_the_deadline() {
        let sent = Instant::now();
        let deadline = Duration::from_secs(10);
        assert!(!still_leading(None, deadline, sent));
        assert!(still_leading(
            Some(sent),
            deadline,
            sent + Duration::from_secs(9)
        ));
        assert!(!still_leading(Some(sent), deadline, sent + deadline));
        assert!(still_leading(Some(sent), deadline, sent));
    }

    #[test]
    fn rounds_keep_their_pace_and_a_standby_looks_again_at_the_holders_expiry() {
        let started = Instant::now();
        let second = Duration::from_secs(1);
        // A period after the round started, however long the round took.
        assert_eq!(next_round(started, second, None, None), started + second);
        // Another holder's lease ends before the next regular round: look exactly then.
        let expires = started + second / 4;
        assert_eq!(next_round(started, second, Some(expires), None), expires);
        assert_eq!(
            next_round(started, second, Some(started + 5 * second), None),
            started + second
        );
        // A leader renews before its deadline, whatever the jitter drew.
        let deadline = started + second / 2;
        assert_eq!(next_round(started, second, None, Some(deadline)), deadline);
        // Already past: at once.
        assert_eq!(next_round(started, second, Some(started), None), started);
    }

    #[test]
    fn the_standby_period_never_exceeds_the_retry_period() {
        let retry = Duration::from_secs(5);
        for _ in 0..1000 {
            let period = round_period(retry);
            assert!(
                period <= retry * 9 / 10 && period >= retry / 2,
                "{period:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_leader_whose_api_server_hangs_steps_down_within_the_renew_deadline() {
        let created = Arc::new(AtomicBool::new(false));
        let flag = created.clone();
        let (client, log) = serve(move |method, _| {
            if flag.load(Ordering::SeqCst) {
                return None;
            }
            match method {
                "GET" => Some((404, status(404, "leases \"l\" not found"))),
                _ => {
                    flag.store(true, Ordering::SeqCst);
                    Some((
                        201,
                        serde_json::json!({"apiVersion": "coordination.k8s.io/v1",
                            "kind": "Lease", "metadata": {"name": "l", "resourceVersion": "1"},
                            "spec": {"holderIdentity": "a"}})
                        .to_string(),
                    ))
                }
            }
        })
        .await;
        let duration = Duration::from_millis(900);
        let mut elector = Elector::new(client, "ns", "l", "a", duration);
        let (tx, mut rx) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move { elector.run(&tx, &stop).await });
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|l| *l))
            .await
            .unwrap_or_else(|_| panic!("never led: {:?}", log.lock().unwrap()))
            .unwrap();
        let leading_since = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|l| !*l))
            .await
            .expect("steps down although every call hangs")
            .unwrap();
        // Well before the lease (900ms) could expire for anyone else.
        assert!(
            leading_since.elapsed() < duration,
            "{:?}",
            leading_since.elapsed()
        );
        shutdown.cancel();
    }
}
