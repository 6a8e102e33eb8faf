//! The agent's life: stay connected, hand each ready revision over, reconnect on failure.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::assemble::ReadyRevision;
use crate::client::{Client, ClientError};

/// The longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Exponential backoff with full jitter, capped.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            next: initial,
            initial,
            max,
        }
    }

    /// The delay before the next attempt: uniformly between half and all of the current step.
    pub fn delay(&mut self) -> Duration {
        let step = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        let half = step / 2;
        half + Duration::from_millis(fastrand::u64(0..=half.as_millis() as u64))
    }

    /// Back to the first step after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// `base` spread uniformly over ±20%, so that replicas and agents started together do not
/// keep acting in lockstep.
pub fn jittered(base: Duration) -> Duration {
    let factor = 0.8 + 0.4 * fastrand::f64();
    Duration::try_from_secs_f64(base.as_secs_f64() * factor).unwrap_or(base)
}

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

/// Runs until `shutdown`: connects, streams, and publishes each ready revision on `latest`.
/// On every (re)connection it states `applied`, the revision the worker last applied.
pub async fn run(
    target: Target,
    shutdown: CancellationToken,
    applied: watch::Receiver<Option<(String, u64)>>,
    latest: watch::Sender<Option<ReadyRevision>>,
    metrics: std::sync::Arc<crate::metrics::AgentMetrics>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), MAX_BACKOFF);
    while !shutdown.is_cancelled() {
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
            info!(
                server = target.server,
                applied = stated.as_ref().map_or("nothing", |(sha, _)| sha.as_str()),
                "connected"
            );
            metrics.connected();
            backoff.reset();
            while let Some(revision) = stream.next().await? {
                info!(
                    sha = revision.sha(),
                    generation = revision.generation(),
                    files = revision.files.len(),
                    "revision ready"
                );
                latest.send_replace(Some(revision));
            }
            Ok::<_, ClientError>(())
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            result = attempt => result,
        };
        match result {
            Ok(()) => warn!("server ended the stream; reconnecting"),
            Err(error) => warn!(%error, "stream failed; reconnecting"),
        }
        let delay = backoff.delay();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let delays: Vec<Duration> = (0..10).map(|_| backoff.delay()).collect();
        assert!(delays[0] >= Duration::from_millis(500) && delays[0] <= Duration::from_secs(1));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(60)));
        assert!(delays[9] >= Duration::from_secs(30));
        backoff.reset();
        assert!(backoff.delay() <= Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_a_fifth_and_never_overflows() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(12),
                "{d:?}"
            );
        }
        assert!(jittered(Duration::MAX) >= Duration::MAX / 2);
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }
}
