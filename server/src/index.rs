//! The replica's index: what every agent should run, and where every agent is connected,
//! held in memory and fed from the change log. A change reaches the streams of its agent on
//! any replica through one watch channel per agent, without a store read per agent; looking
//! up presence costs nothing; and an idle replica asks the store for nothing per agent.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use tokio::sync::watch;

use crate::gate::Revision;
use crate::store::same_incarnation;

/// What streams of one agent see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Version of the agent's state it was read from; older reads never overwrite newer ones.
    pub version: u64,
    pub revision: Option<Revision>,
    /// W3C trace context of the decision that chose `revision`, when it was traced.
    pub traceparent: Option<String>,
}

/// The channel of one agent.
struct Channel {
    /// The incarnation of the agent under the name it is for.
    incarnation: u64,
    tx: watch::Sender<Desired>,
}

impl Channel {
    fn new(incarnation: u64) -> Self {
        Self {
            incarnation,
            tx: watch::channel(Desired::default()).0,
        }
    }
}

/// One watch channel per agent, and every agent's replica.
pub struct Index {
    /// Written only when an agent is created or deleted at runtime.
    agents: RwLock<HashMap<String, Channel>>,
    presence: Mutex<HashMap<String, String>>,
}

impl Index {
    /// An empty index of `agents`, each a name and its incarnation.
    pub fn new<'a>(agents: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        let agents = agents
            .into_iter()
            .map(|(name, incarnation)| (name.to_owned(), Channel::new(incarnation)))
            .collect();
        Self {
            agents: RwLock::new(agents),
            presence: Mutex::new(HashMap::new()),
        }
    }

    /// Adds a channel for incarnation `incarnation` of `agent`, created at runtime; an
    /// existing one of the same incarnation is kept, one of another is closed.
    pub fn add(&self, agent: &str, incarnation: u64) {
        let mut agents = self.write_agents();
        match agents.get(agent) {
            Some(held) if held.incarnation == incarnation => {}
            _ => {
                agents.insert(agent.to_owned(), Channel::new(incarnation));
            }
        }
    }

    /// Drops the channel of `agent`, deleted at runtime: its streams see it closed.
    pub fn remove(&self, agent: &str) {
        self.write_agents().remove(agent);
        self.lock_presence().remove(agent);
    }

    /// Streams of `agent` follow this receiver.
    pub fn subscribe(&self, agent: &str) -> Option<watch::Receiver<Desired>> {
        self.read_agents()
            .get(agent)
            .map(|held| held.tx.subscribe())
    }

    /// Whether a stream of `agent` on this replica follows its channel: that stream reads
    /// each new desired revision's manifests itself.
    pub fn streamed_here(&self, agent: &str) -> bool {
        self.read_agents()
            .get(agent)
            .is_some_and(|held| held.tx.receiver_count() > 0)
    }

    /// The current desired revision of `agent` on this replica.
    pub fn current(&self, agent: &str) -> Option<Desired> {
        self.read_agents()
            .get(agent)
            .map(|held| held.tx.borrow().clone())
    }

    fn read_agents(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Channel>> {
        // Each change is one insert or remove: the map stays consistent under a poisoned lock.
        self.agents.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_agents(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Channel>> {
        self.agents.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes `revision` of state `version`, written for `incarnation` of `agent` (0:
    /// whichever holds the name, as a read of the store does). With `force` the version
    /// check is skipped: after the store lost its data, versions start again.
    pub fn offer(
        &self,
        agent: &str,
        incarnation: u64,
        version: u64,
        revision: Option<&Revision>,
        traceparent: Option<&str>,
        force: bool,
    ) {
        let agents = self.read_agents();
        let Some(held) = agents.get(agent) else {
            return;
        };
        // A deleted agent's state, read from the log after another was created in its
        // place: its versions are not the new one's, and neither is its revision.
        if !same_incarnation(incarnation, held.incarnation) {
            return;
        }
        held.tx.send_if_modified(|current| {
            if !force && version < current.version {
                return false;
            }
            current.version = version;
            if current.revision.as_ref() == revision {
                return false;
            }
            current.revision = revision.cloned();
            current.traceparent = traceparent.map(str::to_owned);
            true
        });
    }

    /// Records that `agent` connected to (or left) `replica`.
    pub fn set_presence(&self, agent: &str, replica: &str, connected: bool) {
        let mut presence = self.lock_presence();
        if connected {
            presence.insert(agent.to_owned(), replica.to_owned());
        } else if presence.get(agent).is_some_and(|r| r == replica) {
            presence.remove(agent);
        }
    }

    /// Replaces every presence record, after the change log lost entries.
    pub fn reset_presence(&self, pairs: impl IntoIterator<Item = (String, String)>) {
        *self.lock_presence() = pairs.into_iter().collect();
    }

    /// The replica `agent` is connected to, as this replica last heard.
    pub fn presence(&self, agent: &str) -> Option<String> {
        self.lock_presence().get(agent).cloned()
    }

    fn lock_presence(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        // Each change is one statement: the map stays consistent under a poisoned lock.
        self.presence.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::Sha;

    fn revision(n: u8, generation: u64) -> Revision {
        Revision {
            sha: Sha::parse(&format!("{n:040x}")).unwrap(),
            pipeline_id: None,
            reason: String::new(),
            decided_at_ms: 0,
            generation,
            force_prune: false,
        }
    }

    #[test]
    fn streams_see_new_revisions_but_not_stale_reads() {
        let index = Index::new([("a", 0)]);
        let mut rx = index.subscribe("a").unwrap();
        index.offer("a", 0, 2, Some(&revision(2, 2)), None, false);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().revision, Some(revision(2, 2)));
        index.offer("a", 0, 1, Some(&revision(1, 1)), None, false);
        assert!(!rx.has_changed().unwrap());
        index.offer("a", 0, 3, Some(&revision(2, 2)), None, false);
        assert!(
            !rx.has_changed().unwrap(),
            "same revision at a newer version is no news"
        );
        index.offer("a", 0, 1, Some(&revision(1, 1)), None, true);
        assert!(rx.has_changed().unwrap());
    }

    #[test]
    fn unknown_agents_are_ignored() {
        let index = Index::new([("a", 0)]);
        index.offer("b", 0, 1, None, None, false);
        assert!(index.subscribe("b").is_none());
    }

    #[test]
    fn agents_added_at_runtime_get_a_channel_and_deleted_ones_close_theirs() {
        let index = Index::new([("a", 0)]);
        index.add("b", 0);
        let mut rx = index.subscribe("b").unwrap();
        index.offer("b", 0, 1, Some(&revision(1, 1)), None, false);
        assert_eq!(rx.borrow_and_update().revision, Some(revision(1, 1)));
        index.add("b", 0);
        assert_eq!(
            index.current("b").unwrap().revision,
            Some(revision(1, 1)),
            "adding again keeps the channel"
        );
        index.set_presence("b", "r1", true);
        index.remove("b");
        assert!(
            rx.has_changed().is_err(),
            "its streams see the channel closed"
        );
        assert!(index.subscribe("b").is_none());
        assert_eq!(index.presence("b"), None);
    }

    #[test]
    fn presence_follows_the_last_word_of_each_replica() {
        let index = Index::new([("a", 0)]);
        index.set_presence("a", "r1", true);
        index.set_presence("a", "r2", true);
        index.set_presence("a", "r1", false);
        assert_eq!(
            index.presence("a").as_deref(),
            Some("r2"),
            "r1 leaving does not remove r2"
        );
        index.reset_presence([]);
        assert_eq!(index.presence("a"), None);
    }

    #[test]
    fn a_deleted_agents_state_never_reaches_the_agent_created_in_its_place() {
        let index = Index::new([]);
        index.add("edge", 7);
        let old = index.subscribe("edge").unwrap();
        index.offer("edge", 7, 40, Some(&revision(1, 3)), None, false);
        assert!(old.has_changed().unwrap());
        index.remove("edge");
        index.add("edge", 8);
        let mut new = index.subscribe("edge").unwrap();
        assert!(old.has_changed().is_err(), "the old agent's streams end");
        // Read late from another shard of the log: its version is far ahead of the new
        // agent's, and its revision is of another agent's ref.
        index.offer("edge", 7, 41, Some(&revision(2, 4)), None, false);
        assert!(!new.has_changed().unwrap());
        index.offer("edge", 8, 1, Some(&revision(3, 1)), None, false);
        assert_eq!(new.borrow_and_update().revision, Some(revision(3, 1)));
        // A read of the store, and an entry of a version that did not record the
        // incarnation, are taken as the agent's under the name now.
        index.offer("edge", 0, 2, Some(&revision(4, 2)), None, false);
        assert_eq!(new.borrow_and_update().revision, Some(revision(4, 2)));
        // Adding the same incarnation again keeps the channel; another replaces it.
        index.add("edge", 8);
        assert!(!new.has_changed().unwrap());
        index.add("edge", 9);
        assert!(new.has_changed().is_err());
        // A channel of an agent whose record lost its incarnation (written back by an
        // earlier version) takes every entry, as that version did.
        let index = Index::new([("file", 0)]);
        let mut file = index.subscribe("file").unwrap();
        index.offer("file", 7, 1, Some(&revision(5, 1)), None, false);
        assert_eq!(file.borrow_and_update().revision, Some(revision(5, 1)));
    }
}
