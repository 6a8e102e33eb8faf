//! The agent's life: stay connected, hand each ready revision over, reconnect on failure.

use std::future::Future;
use std::time::Duration;

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
        self.next = (self.next * 2).min(self.max);
        let half = step / 2;
        half + Duration::from_millis(fastrand::u64(0..=half.as_millis() as u64))
    }

    /// Back to the first step after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Where the agent connects.
#[derive(Debug, Clone)]
pub struct Target {
    pub server: String,
    pub token: String,
    pub ca_file: Option<std::path::PathBuf>,
}

/// Runs until `shutdown`: connects, streams, and calls `handle` with each ready revision;
/// `handle` returns the SHA it applied, which is stated on the next reconnection.
pub async fn run<F, Fut>(target: Target, shutdown: CancellationToken, mut handle: F)
where
    F: FnMut(Client, ReadyRevision) -> Fut,
    Fut: Future<Output = Option<String>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(500), MAX_BACKOFF);
    let mut applied: Option<String> = None;
    while !shutdown.is_cancelled() {
        let attempt = async {
            let client =
                Client::connect(&target.server, &target.token, target.ca_file.as_deref()).await?;
            let mut stream = client.sync(applied.as_deref()).await?;
            info!(server = target.server, "connected");
            backoff.reset();
            while let Some(revision) = stream.next().await? {
                info!(
                    sha = revision.sha(),
                    generation = revision.generation(),
                    files = revision.files.len(),
                    "revision ready"
                );
                if let Some(sha) = handle(client.clone(), revision).await {
                    applied = Some(sha);
                }
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
}
