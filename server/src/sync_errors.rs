//! Why agents' desired revisions cannot be delivered, as streams, fetches and manifest
//! reads note it: the latest note per agent wins, and notes are stored in batches.
//!
//! A stream clears its agent's error after every delivery. Stored one at a time, those
//! clears cost a store round trip per agent and revision, a tenth of the server's work in
//! a fan-out; noted here, the clears of a fan-out are stored together while the first
//! batch is in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::store::{Store, StoreError, SyncError};
use greenlight::backoff::Backoff;

/// Noted errors by agent; `None` clears.
type Notes = HashMap<String, Option<SyncError>>;

/// Stores noted sync errors: see the module documentation.
pub struct SyncErrors {
    store: Arc<dyn Store>,
    /// Noted and not yet being stored.
    pending: Mutex<Notes>,
    /// Being stored now: still what a read answers until the store has it. Shared with the
    /// call storing it rather than copied: a fan-out notes every agent it reached.
    storing: Mutex<Arc<Notes>>,
    noted: Notify,
}

impl SyncErrors {
    /// Notes to be stored in `store`.
    pub fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            store,
            pending: Mutex::default(),
            storing: Mutex::default(),
            noted: Notify::new(),
        })
    }

    /// Notes why `agent`'s desired revision cannot be delivered, or that it can (`None`).
    pub fn note(&self, agent: &str, error: Option<SyncError>) {
        lock(&self.pending).insert(agent.to_owned(), error);
        self.noted.notify_one();
    }

    /// The error of `agent`: the one noted last on this replica, else the stored one.
    pub async fn get(&self, agent: &str) -> Result<Option<SyncError>, StoreError> {
        if let Some(noted) = lock(&self.pending).get(agent) {
            return Ok(noted.clone());
        }
        if let Some(noted) = lock(&self.storing).get(agent) {
            return Ok(noted.clone());
        }
        self.store.sync_error(agent).await
    }

    /// Stores what is noted until `shutdown`, then what is left.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut failures = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.noted.notified() => {}
            }
            while let Err(error) = self.store_noted().await {
                let delay = failures.delay();
                warn!(%error, retry_in = ?delay, "cannot store sync errors; keeping them");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            failures.reset();
        }
        if let Err(error) = self.store_noted().await {
            warn!(%error, "cannot store sync errors on the way out; they are noted again by the next attempt");
        }
    }

    /// Stores every pending note; on failure they stay pending unless noted again meanwhile.
    async fn store_noted(&self) -> Result<(), StoreError> {
        let batch = {
            let mut pending = lock(&self.pending);
            let batch = Arc::new(std::mem::take(&mut *pending));
            // Handed over under the pending lock: a read finds each note in one of the two
            // maps, never in neither while the store still holds the older value.
            *lock(&self.storing) = batch.clone();
            batch
        };
        if batch.is_empty() {
            return Ok(());
        }
        let notes: Vec<(&str, Option<&SyncError>)> = batch
            .iter()
            .map(|(agent, error)| (agent.as_str(), error.as_ref()))
            .collect();
        let stored = self.store.set_sync_errors(&notes).await;
        let mut pending = lock(&self.pending);
        if stored.is_err() {
            for (agent, error) in batch.iter() {
                pending
                    .entry(agent.clone())
                    .or_insert_with(|| error.clone());
            }
        }
        // Cleared under the pending lock: a read sees a note in one of the two maps, or
        // the store holding it.
        *lock(&self.storing) = Arc::default();
        stored
    }
}

fn lock<T>(notes: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each change is one statement: the notes stay consistent under a poisoned lock.
    notes
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EmbeddedStore;

    fn fetch_failed(message: &str) -> Option<SyncError> {
        Some(SyncError::Fetch {
            message: message.to_owned(),
        })
    }

    #[tokio::test]
    async fn the_latest_note_wins_and_reads_see_it_before_it_is_stored() {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new());
        let errors = SyncErrors::new(store.clone());
        errors.note("prod", fetch_failed("first"));
        errors.note("prod", fetch_failed("second"));
        errors.note("staging", fetch_failed("broken"));
        errors.note("staging", None);
        assert_eq!(errors.get("prod").await.unwrap(), fetch_failed("second"));
        assert_eq!(
            store.sync_error("prod").await.unwrap(),
            None,
            "not stored yet"
        );

        let shutdown = CancellationToken::new();
        let running = tokio::spawn(errors.clone().run(shutdown.clone()));
        tokio::time::timeout(Duration::from_secs(5), async {
            while store.sync_error("prod").await.unwrap().is_none() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("stored");
        assert_eq!(
            store.sync_error("prod").await.unwrap(),
            fetch_failed("second")
        );
        assert_eq!(store.sync_error("staging").await.unwrap(), None);

        // What is noted as the server stops is stored on the way out.
        errors.note("prod", None);
        shutdown.cancel();
        running.await.unwrap();
        assert_eq!(store.sync_error("prod").await.unwrap(), None);
    }
}
