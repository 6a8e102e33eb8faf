//! What a long-lived server stream may cost: how many one caller may hold open, and how long
//! a reader may stop reading. Each stream costs a task, a buffer and a watch on this replica,
//! so a misbehaving or compromised client gets a clear refusal instead of this replica's
//! memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::warn;

/// How long a stream may stay full before its reader counts as no longer reading.
pub const STALLED_READER: Duration = Duration::from_secs(60);

/// The sending side of a server stream. A reader that stops reading for the stall time is
/// told so by a final status and the stream ends, rather than holding this replica's task
/// and buffer for as long as its connection lives. The final status has a slot of its own,
/// reserved up front, so a full buffer can never keep it from being delivered.
pub struct Outbox<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    last_word: Option<mpsc::OwnedPermit<Result<T, Status>>>,
    stall: Duration,
}

impl<T: Send + 'static> Outbox<T> {
    /// An outbox holding up to `buffer` unread messages, and the stream its reader gets.
    pub fn new(buffer: usize, stall: Duration) -> (Self, ReceiverStream<Result<T, Status>>) {
        let (tx, rx) = mpsc::channel(buffer.max(1) + 1);
        // A fresh channel has room: the reservation cannot fail.
        let last_word = tx.clone().try_reserve_owned().ok();
        let outbox = Self {
            tx,
            last_word,
            stall,
        };
        (outbox, ReceiverStream::new(rx))
    }

    /// Sends `item`: `false` when the reader is gone, or stalled (and was told so).
    pub async fn send(&mut self, item: T) -> bool {
        match self.tx.send_timeout(Ok(item), self.stall).await {
            Ok(()) => true,
            Err(SendTimeoutError::Timeout(_)) => {
                warn!(after = ?self.stall, "the reader stopped reading its stream; closing it");
                self.finish(Status::resource_exhausted(format!(
                    "this stream was closed because its reader read nothing for {}s; \
                     reconnect and keep reading",
                    self.stall.as_secs_f64()
                )));
                false
            }
            Err(SendTimeoutError::Closed(_)) => false,
        }
    }

    /// Ends the stream with `status` after what is buffered.
    pub fn finish(&mut self, status: Status) {
        if let Some(permit) = self.last_word.take() {
            permit.send(Err(status));
        }
        // Dropping the sender as well lets the reader see the end right after the status.
        let (closed, _) = mpsc::channel(1);
        self.tx = closed;
    }

    /// Resolves when the reader has gone.
    pub async fn closed(&self) {
        match &self.last_word {
            // `tx` was swapped for a dead channel once finished: there is nobody to wait for.
            None => {}
            Some(_) => self.tx.closed().await,
        }
    }
}

/// Open streams by caller.
#[derive(Clone, Default)]
pub struct StreamSlots {
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open stream; dropping it frees its slot.
pub struct Slot {
    open: Arc<Mutex<HashMap<String, usize>>>,
    caller: String,
}

impl StreamSlots {
    /// A slot for `caller`, unless it holds `max` already; `what` names the streams for the
    /// refusal.
    pub fn acquire(&self, caller: &str, max: usize, what: &str) -> Result<Slot, Status> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(caller.to_owned()).or_default();
        if *count >= max {
            return Err(Status::resource_exhausted(format!(
                "{caller} already has {max} {what} open on this replica, the most allowed; close one first"
            )));
        }
        *count += 1;
        Ok(Slot {
            open: self.open.clone(),
            caller: caller.to_owned(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.caller) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn a_reader_that_stops_reading_gets_a_clear_status_after_what_was_buffered() {
        let (mut outbox, mut stream) = Outbox::new(2, Duration::from_millis(50));
        assert!(outbox.send(1).await);
        assert!(outbox.send(2).await);
        assert!(
            !outbox.send(3).await,
            "the buffer stayed full past the stall time"
        );
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        assert_eq!(stream.next().await.unwrap().unwrap(), 2);
        let status = stream.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("read nothing for 0.05s"),
            "{status}"
        );
        assert!(stream.next().await.is_none(), "the stream ends");
    }

    #[tokio::test]
    async fn a_finished_stream_carries_its_status_even_when_full() {
        let (mut outbox, mut stream) = Outbox::new(1, Duration::from_secs(60));
        assert!(outbox.send(1).await);
        outbox.finish(Status::data_loss("fell behind"));
        outbox.closed().await;
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        assert_eq!(
            stream.next().await.unwrap().unwrap_err().code(),
            tonic::Code::DataLoss
        );
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_reader_that_left_is_noticed() {
        let (mut outbox, stream) = Outbox::new(4, Duration::from_secs(60));
        drop(stream);
        outbox.closed().await;
        assert!(!outbox.send(1).await);
    }

    #[test]
    fn a_caller_gets_at_most_max_slots_and_a_closed_one_frees_its_slot() {
        let slots = StreamSlots::default();
        let first = slots.acquire("agent prod", 2, "streams").unwrap();
        let _second = slots.acquire("agent prod", 2, "streams").unwrap();
        let refused = slots.acquire("agent prod", 2, "streams").err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("agent prod already has 2 streams open")
        );
        assert!(
            slots.acquire("agent staging", 2, "streams").is_ok(),
            "per caller"
        );
        drop(first);
        assert!(slots.acquire("agent prod", 2, "streams").is_ok());
    }
}
