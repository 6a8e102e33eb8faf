//! The agent's life: stay connected, hand each ready revision over, reconnect on failure.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::assemble::{Ready, ReadyRevision};
use crate::client::{Client, ClientError};
use greenlight::backoff::Backoff;

/// The longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

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
    previews: crate::preview::Inbox,
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
            while let Some(ready) = stream.next_any().await? {
                match ready {
                    Ready::Revision(revision) => {
                        info!(
                            sha = revision.sha(),
                            generation = revision.generation(),
                            files = revision.files.len(),
                            "revision ready"
                        );
                        latest.send_replace(Some(revision));
                    }
                    Ready::Preview(preview) => {
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
