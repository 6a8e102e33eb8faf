//! A keyed work queue that coalesces: one pending job per key however fast jobs come,
//! holding only the newest value, and never handing out a key that a worker still holds.
//!
//! The evaluator uses it so that a burst of facts about a ref costs one evaluation, and
//! manifest preparation so that only an agent's newest desired commit is read.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::Notify;

/// Keys waiting for a worker, oldest request first, each with its newest value.
pub struct Coalescing<K, V> {
    pending: Mutex<Pending<K, V>>,
    ready: Notify,
}

struct Pending<K, V> {
    order: VecDeque<K>,
    newest: HashMap<K, V>,
    /// Keys a worker holds: a newer job for one waits until it is done.
    busy: HashSet<K>,
}

impl<K, V> Default for Coalescing<K, V> {
    fn default() -> Self {
        Self {
            pending: Mutex::new(Pending {
                order: VecDeque::new(),
                newest: HashMap::new(),
                busy: HashSet::new(),
            }),
            ready: Notify::new(),
        }
    }
}

impl<K: Hash + Eq + Clone, V> Coalescing<K, V> {
    /// Asks for `key` to be worked on with `value`, replacing any older value of that key
    /// that no worker has taken yet.
    pub fn push(&self, key: K, value: V) {
        self.push_merging(&key, value, |pending, value| *pending = value);
    }

    /// Asks for `key` to be worked on with `value`, merged by `merge` into the value of a
    /// request of that key that no worker has taken yet.
    pub fn push_merging(&self, key: &K, value: V, merge: impl FnOnce(&mut V, V)) {
        {
            let mut pending = self.lock();
            match pending.newest.get_mut(key) {
                Some(held) => merge(held, value),
                None => {
                    pending.newest.insert(key.clone(), value);
                    pending.order.push_back(key.clone());
                }
            }
        }
        self.ready.notify_one();
    }

    /// The next job, waiting for one. The key is held until [`Coalescing::done`].
    pub async fn next(&self) -> (K, V) {
        loop {
            // Registered as a waiter before looking, so that a push between the look and
            // the wait wakes this worker, and two pushes wake two workers: an unregistered
            // waiter would leave them one stored permit between them. A wake-up this worker
            // receives but does not wait for passes on to another when it returns a job.
            let notified = self.ready.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if let Some(job) = self.take() {
                return job;
            }
            notified.await;
        }
    }

    /// Releases `key`: a job pushed for it meanwhile can now be taken.
    pub fn done(&self, key: &K) {
        let waiting = {
            let mut pending = self.lock();
            pending.busy.remove(key);
            pending.newest.contains_key(key)
        };
        if waiting {
            self.ready.notify_one();
        }
    }

    /// What `read` makes of the value queued for `key`, if one is queued (not taken).
    pub fn peek<R>(&self, key: &K, read: impl FnOnce(&V) -> R) -> Option<R> {
        self.lock().newest.get(key).map(read)
    }

    /// How many keys wait for a worker.
    pub fn len(&self) -> usize {
        self.lock().newest.len()
    }

    /// Whether no key waits for a worker.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take(&self) -> Option<(K, V)> {
        let mut pending = self.lock();
        let at = pending
            .order
            .iter()
            .position(|key| !pending.busy.contains(key))?;
        let key = pending.order.remove(at)?;
        let value = pending.newest.remove(&key)?;
        pending.busy.insert(key.clone());
        Some((key, value))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending<K, V>> {
        // Every critical section leaves the collections consistent before it can panic.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::Sha;

    fn sha(n: u64) -> Sha {
        Sha::parse(&format!("{n:040x}")).unwrap()
    }

    #[tokio::test]
    async fn a_flood_of_decisions_holds_one_job_per_agent_and_keeps_the_newest() {
        let queue = Coalescing::<&str, Sha>::default();
        for n in 1..=10_000 {
            queue.push(["a", "b", "c"][(n % 3) as usize], sha(n));
        }
        assert_eq!(queue.len(), 3, "bounded by the number of agents");
        let mut taken = vec![queue.next().await, queue.next().await, queue.next().await];
        for (key, _) in &taken {
            queue.done(key);
        }
        taken.sort();
        assert_eq!(
            taken,
            vec![("a", sha(9_999)), ("b", sha(10_000)), ("c", sha(9_998)),]
        );
        assert!(queue.is_empty());
    }

    #[tokio::test]
    async fn agents_are_served_in_the_order_they_first_asked() {
        let queue = Coalescing::<&str, Sha>::default();
        queue.push("b", sha(1));
        queue.push("a", sha(2));
        queue.push("b", sha(3));
        assert_eq!(queue.next().await, ("b", sha(3)));
        assert_eq!(queue.next().await, ("a", sha(2)));
    }

    #[tokio::test]
    async fn a_waiting_worker_wakes_for_a_later_push() {
        let queue = std::sync::Arc::new(Coalescing::<&str, Sha>::default());
        let worker = tokio::spawn({
            let queue = queue.clone();
            async move { queue.next().await }
        });
        tokio::task::yield_now().await;
        queue.push("a", sha(1));
        let job = tokio::time::timeout(std::time::Duration::from_secs(5), worker)
            .await
            .expect("the worker woke")
            .expect("the worker did not panic");
        assert_eq!(job, ("a", sha(1)));
    }

    #[tokio::test]
    async fn a_key_held_by_a_worker_is_not_handed_to_another_until_done() {
        let queue = Coalescing::<&str, u32>::default();
        queue.push("r", 1);
        assert_eq!(queue.next().await, ("r", 1));
        for n in 2..=50 {
            queue.push("r", n);
        }
        queue.push("s", 1);
        assert_eq!(queue.next().await, ("s", 1), "r is busy");
        assert!(queue.take().is_none());
        queue.done(&"r");
        assert_eq!(queue.next().await, ("r", 50), "the burst is one job");
    }
}
