//! What a long-lived server stream may cost: how many one caller may hold open, and how long
//! a reader may stop reading. Each stream costs a task, a buffer and a watch on this replica,
//! so a misbehaving or compromised client gets a clear refusal instead of this replica's
//! memory.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_stream::Stream;
use tonic::Status;
use tracing::warn;

use crate::metrics::StreamBuffer;

/// What every server stream of this replica shares: when a reader counts as stalled, and
/// the gauges of what the streams hold unread.
#[derive(Clone)]
pub struct StreamSettings {
    /// How long a stream may stay full before its reader is dropped.
    pub stall: Duration,
    /// Where buffered messages and closed streams are counted.
    pub buffer: StreamBuffer,
}

/// One message waiting for its reader.
struct Held<T> {
    item: T,
    /// Its share of the stream's byte budget.
    cost: usize,
    _charge: Charge,
}

/// A held message on the gauges; dropping it, read or not, takes it off.
struct Charge {
    bytes: usize,
    buffer: StreamBuffer,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.buffer.release(self.bytes);
    }
}

/// What the two sides of a stream share.
struct Queue<T> {
    held: VecDeque<Held<T>>,
    /// The sum of the held messages' costs.
    cost: usize,
    /// Set once the stream ends: its final status, sent after what is held.
    last_word: Option<Status>,
    finished: bool,
    reader_gone: bool,
    reader: Option<Waker>,
}

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    /// The reader took something, or left.
    room: Notify,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Queue<T>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending side of a server stream. It holds at most a number of messages and of bytes
/// unread; a reader that leaves it full for the stall time is told so by a final status,
/// what it held is dropped at once, and the stream ends, rather than holding this replica's
/// task and buffer for as long as its connection lives. The final status needs no room in
/// the buffer, so a full buffer can never keep it from being delivered.
pub struct Outbox<T> {
    shared: Arc<Shared<T>>,
    messages: usize,
    budget: usize,
    settings: StreamSettings,
}

/// The reading side of an [`Outbox`], as tonic sends it. It keeps its caller's stream slot
/// until the connection lets go of it, so that streams closed on a reader that still does
/// not read go on counting against its cap.
pub struct OutboxStream<T> {
    shared: Arc<Shared<T>>,
    _slot: Option<Slot>,
}

impl<T> OutboxStream<T> {
    /// Holds `slot` for as long as this stream lives.
    pub fn holding(mut self, slot: Slot) -> Self {
        self._slot = Some(slot);
        self
    }
}

impl<T> Stream for OutboxStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut queue = self.shared.lock();
        if let Some(Held { item, cost, .. }) = queue.held.pop_front() {
            queue.cost -= cost;
            if queue.held.is_empty() {
                // A sync stream is idle nearly all its life: an emptied buffer gives its
                // slots back rather than keep them for the next revision.
                queue.held = VecDeque::new();
            }
            drop(queue);
            self.shared.room.notify_one();
            return Poll::Ready(Some(Ok(item)));
        }
        if queue.finished {
            return Poll::Ready(queue.last_word.take().map(Err));
        }
        queue.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<T> Drop for OutboxStream<T> {
    fn drop(&mut self) {
        let mut queue = self.shared.lock();
        queue.reader_gone = true;
        queue.held.clear();
        queue.cost = 0;
        drop(queue);
        self.shared.room.notify_one();
    }
}

impl<T: prost::Message + Send + 'static> Outbox<T> {
    /// An outbox holding up to `messages` unread messages of up to `bytes` together (one
    /// larger message still passes alone), and the stream its reader gets.
    pub fn new(
        messages: usize,
        bytes: usize,
        settings: &StreamSettings,
    ) -> (Self, OutboxStream<T>) {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                held: VecDeque::new(),
                cost: 0,
                last_word: None,
                finished: false,
                reader_gone: false,
                reader: None,
            }),
            room: Notify::new(),
        });
        let outbox = Self {
            shared: shared.clone(),
            messages: messages.max(1),
            budget: bytes.max(1),
            settings: settings.clone(),
        };
        (
            outbox,
            OutboxStream {
                shared,
                _slot: None,
            },
        )
    }

    /// Sends `item`: `false` when the reader is gone, or stalled (and was told so).
    pub async fn send(&mut self, item: T) -> bool {
        let bytes = item.encoded_len();
        let cost = bytes.min(self.budget);
        let mut item = Some(item);
        let queued = tokio::time::timeout(self.settings.stall, async {
            loop {
                {
                    let mut queue = self.shared.lock();
                    if queue.reader_gone || queue.finished {
                        return false;
                    }
                    if queue.held.len() < self.messages && queue.cost + cost <= self.budget {
                        if let Some(item) = item.take() {
                            self.settings.buffer.hold(bytes);
                            queue.held.push_back(Held {
                                item,
                                cost,
                                _charge: Charge {
                                    bytes,
                                    buffer: self.settings.buffer.clone(),
                                },
                            });
                            queue.cost += cost;
                        }
                        if let Some(reader) = queue.reader.take() {
                            reader.wake();
                        }
                        return true;
                    }
                }
                // One sender: a wake-up that came before this wait is kept for it.
                self.shared.room.notified().await;
            }
        })
        .await;
        match queued {
            Ok(sent) => sent,
            Err(_) => {
                let stall = self.settings.stall;
                warn!(after = ?stall, "the reader stopped reading its stream; closing it");
                self.settings.buffer.closed("stalled");
                // What it did not read would only wait for a reader that does not read.
                {
                    let mut queue = self.shared.lock();
                    queue.held.clear();
                    queue.cost = 0;
                }
                self.finish(Status::resource_exhausted(format!(
                    "this stream was closed because its reader read nothing for {}s; \
                     what it had not read was dropped: reconnect and keep reading",
                    stall.as_secs_f64()
                )));
                false
            }
        }
    }

    /// Ends the stream with `status` after what is buffered.
    pub fn finish(&mut self, status: Status) {
        let mut queue = self.shared.lock();
        if !queue.finished {
            queue.finished = true;
            queue.last_word = Some(status);
        }
        if let Some(reader) = queue.reader.take() {
            reader.wake();
        }
    }

    /// Resolves when the reader has gone; at once once the stream is finished.
    pub async fn closed(&self) {
        loop {
            {
                let queue = self.shared.lock();
                if queue.reader_gone || queue.finished {
                    return;
                }
            }
            self.shared.room.notified().await;
        }
    }
}

impl<T> Drop for Outbox<T> {
    /// The sender gone, the reader gets what is held, then the end of the stream.
    fn drop(&mut self) {
        let mut queue = self.shared.lock();
        queue.finished = true;
        if let Some(reader) = queue.reader.take() {
            reader.wake();
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

    fn settings(stall: Duration) -> StreamSettings {
        StreamSettings {
            stall,
            buffer: StreamBuffer::default(),
        }
    }

    #[tokio::test]
    async fn a_reader_that_stops_reading_gets_a_clear_status_and_its_buffer_is_dropped() {
        let settings = settings(Duration::from_millis(50));
        let (mut outbox, mut stream) = Outbox::<u32>::new(2, 1024, &settings);
        assert!(outbox.send(1).await);
        assert!(outbox.send(2).await);
        assert_eq!(settings.buffer.held().0, 2);
        assert!(
            !outbox.send(3).await,
            "the buffer stayed full past the stall time"
        );
        assert_eq!(settings.buffer.held(), (0, 0), "dropped at once");
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
        let (mut outbox, mut stream) =
            Outbox::<u32>::new(1, 1024, &settings(Duration::from_secs(60)));
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
    async fn a_stream_whose_sender_is_gone_ends_after_what_it_holds() {
        let (mut outbox, mut stream) =
            Outbox::<u32>::new(4, 1024, &settings(Duration::from_secs(60)));
        assert!(outbox.send(1).await);
        let reader = tokio::spawn(async move {
            let first = stream.next().await.unwrap().unwrap();
            (first, stream.next().await.is_none())
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(outbox);
        assert_eq!(reader.await.unwrap(), (1, true));
    }

    #[tokio::test]
    async fn an_emptied_stream_holds_no_buffer_until_the_next_message() {
        let (mut outbox, mut stream) =
            Outbox::<u32>::new(4, 1024, &settings(Duration::from_secs(60)));
        let capacity = |stream: &OutboxStream<u32>| stream.shared.lock().held.capacity();
        assert!(outbox.send(1).await);
        assert!(outbox.send(2).await);
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        assert!(capacity(&stream) > 0, "kept while a message waits");
        assert_eq!(stream.next().await.unwrap().unwrap(), 2);
        assert_eq!(capacity(&stream), 0);
        assert!(outbox.send(3).await);
        assert_eq!(stream.next().await.unwrap().unwrap(), 3);
    }

    #[tokio::test]
    async fn a_reader_that_left_is_noticed() {
        let (mut outbox, stream) = Outbox::<u32>::new(4, 1024, &settings(Duration::from_secs(60)));
        drop(stream);
        outbox.closed().await;
        assert!(!outbox.send(1).await);
    }

    #[tokio::test]
    async fn bytes_are_bounded_as_well_as_messages_and_counted_until_read() {
        let settings = settings(Duration::from_millis(200));
        let (mut outbox, mut stream) = Outbox::<String>::new(100, 1000, &settings);
        let text = "x".repeat(400); // 403 bytes encoded
        assert!(outbox.send(text.clone()).await);
        assert!(outbox.send(text.clone()).await);
        assert_eq!(settings.buffer.held(), (2, 806));
        // A third would pass the byte budget: it waits until the reader takes one.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let first = stream.next().await.unwrap().unwrap();
            (first, stream)
        });
        assert!(outbox.send(text.clone()).await);
        let (first, stream) = reader.await.unwrap();
        assert_eq!(first, text);
        assert_eq!(settings.buffer.held(), (2, 806), "one taken, one more held");
        drop(stream);
        assert_eq!(settings.buffer.held(), (0, 0), "dropped unread, given back");
        assert!(!outbox.send(text.clone()).await, "the reader left");

        // One message above the whole budget still passes, alone.
        let (mut outbox, mut stream) = Outbox::<String>::new(100, 10, &settings);
        assert!(outbox.send(text.clone()).await);
        assert!(!outbox.send(text.clone()).await);
        assert_eq!(settings.buffer.closed_for("stalled"), 1);
        assert_eq!(
            stream.next().await.unwrap().unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
    }

    #[tokio::test]
    async fn a_slot_is_held_until_the_reader_lets_go_of_the_stream() {
        let slots = StreamSlots::default();
        let (mut outbox, stream) =
            Outbox::<u32>::new(1, 1024, &settings(Duration::from_millis(10)));
        let stream = stream.holding(slots.acquire("ci", 1, "watches").unwrap());
        assert!(outbox.send(1).await);
        assert!(!outbox.send(2).await, "stalled");
        drop(outbox);
        assert!(
            slots.acquire("ci", 1, "watches").is_err(),
            "a stalled stream its reader still holds keeps counting"
        );
        drop(stream);
        assert!(slots.acquire("ci", 1, "watches").is_ok());
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
