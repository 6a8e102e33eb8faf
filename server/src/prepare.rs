//! Manifest preparation: each newly decided revision is read once at once, so that a broken
//! revision shows on its agent even while the agent is offline, and the shared read is warm
//! when the agent's streams ask for it.
//!
//! Only an agent's newest desired commit is worth reading, so jobs coalesce per agent: the
//! queue never holds more than one job per agent however fast decisions come, and a fixed
//! number of workers bounds the reads in flight.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::gate::Sha;

/// How many revisions are read at the same time. Reads of one commit are shared by the
/// mirror, so this bounds distinct reads, not agents.
pub const PREPARE_WORKERS: usize = 4;

/// Agents waiting for their newest desired commit to be read, oldest request first.
#[derive(Default)]
pub struct PrepareQueue {
    pending: Mutex<Pending>,
    ready: Notify,
}

#[derive(Default)]
struct Pending {
    order: VecDeque<String>,
    newest: HashMap<String, Sha>,
}

impl PrepareQueue {
    /// Asks for `sha` to be read for `agent`, replacing any older request of that agent that
    /// no worker has taken yet.
    pub fn push(&self, agent: &str, sha: Sha) {
        {
            let mut pending = self.lock();
            if pending.newest.insert(agent.to_owned(), sha).is_none() {
                pending.order.push_back(agent.to_owned());
            }
        }
        self.ready.notify_one();
    }

    /// The next job, waiting for one.
    pub async fn next(&self) -> (String, Sha) {
        loop {
            // Registered before looking, so a push between the look and the wait still
            // wakes this worker (notify_one keeps a permit when nobody waits).
            let notified = self.ready.notified();
            if let Some(job) = self.take() {
                return job;
            }
            notified.await;
        }
    }

    /// How many agents wait for a read.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    /// Whether no agent waits for a read.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take(&self) -> Option<(String, Sha)> {
        let mut pending = self.lock();
        while let Some(agent) = pending.order.pop_front() {
            if let Some(sha) = pending.newest.remove(&agent) {
                return Some((agent, sha));
            }
        }
        None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Every critical section leaves both collections consistent before it can panic.
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(n: u64) -> Sha {
        Sha::parse(&format!("{n:040x}")).unwrap()
    }

    #[tokio::test]
    async fn a_flood_of_decisions_holds_one_job_per_agent_and_keeps_the_newest() {
        let queue = PrepareQueue::default();
        for n in 1..=10_000 {
            queue.push(["a", "b", "c"][(n % 3) as usize], sha(n));
        }
        assert_eq!(queue.len(), 3, "bounded by the number of agents");
        let mut taken = vec![queue.next().await, queue.next().await, queue.next().await];
        taken.sort();
        assert_eq!(
            taken,
            vec![
                ("a".to_owned(), sha(9_999)),
                ("b".to_owned(), sha(10_000)),
                ("c".to_owned(), sha(9_998)),
            ]
        );
        assert!(queue.is_empty());
    }

    #[tokio::test]
    async fn agents_are_served_in_the_order_they_first_asked() {
        let queue = PrepareQueue::default();
        queue.push("b", sha(1));
        queue.push("a", sha(2));
        queue.push("b", sha(3));
        assert_eq!(queue.next().await, ("b".to_owned(), sha(3)));
        assert_eq!(queue.next().await, ("a".to_owned(), sha(2)));
    }

    #[tokio::test]
    async fn a_waiting_worker_wakes_for_a_later_push() {
        let queue = std::sync::Arc::new(PrepareQueue::default());
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
        assert_eq!(job, ("a".to_owned(), sha(1)));
    }
}
