//! Fans each agent's desired revision out to its streams on this replica: one watch channel
//! per agent, written when a ref document changes, read by every `Sync` stream.

use std::collections::HashMap;

use tokio::sync::watch;

use crate::gate::Revision;

/// What streams of one agent see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Version of the ref document it was read from; older reads never overwrite newer ones.
    pub version: u64,
    pub revision: Option<Revision>,
    /// W3C trace context of the decision that chose `revision`, when it was traced.
    pub traceparent: Option<String>,
}

/// One watch channel per configured agent.
pub struct Hub {
    agents: HashMap<String, watch::Sender<Desired>>,
}

impl Hub {
    /// Channels for `names`.
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let agents = names
            .into_iter()
            .map(|name| (name.to_owned(), watch::channel(Desired::default()).0))
            .collect();
        Self { agents }
    }

    /// Streams of `agent` follow this receiver.
    pub fn subscribe(&self, agent: &str) -> Option<watch::Receiver<Desired>> {
        self.agents.get(agent).map(watch::Sender::subscribe)
    }

    /// The current desired revision of `agent` on this replica.
    pub fn current(&self, agent: &str) -> Option<Desired> {
        self.agents.get(agent).map(|tx| tx.borrow().clone())
    }

    /// Publishes `revision` read at `version`. With `force` the version check is skipped:
    /// after a store outage versions may have restarted.
    pub fn offer(
        &self,
        agent: &str,
        version: u64,
        revision: Option<&Revision>,
        traceparent: Option<&str>,
        force: bool,
    ) {
        let Some(tx) = self.agents.get(agent) else {
            return;
        };
        tx.send_if_modified(|current| {
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
        let hub = Hub::new(["a"]);
        let mut rx = hub.subscribe("a").unwrap();
        hub.offer("a", 2, Some(&revision(2, 2)), None, false);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().revision, Some(revision(2, 2)));
        hub.offer("a", 1, Some(&revision(1, 1)), None, false);
        assert!(!rx.has_changed().unwrap());
        hub.offer("a", 3, Some(&revision(2, 2)), None, false);
        assert!(
            !rx.has_changed().unwrap(),
            "same revision at a newer version is no news"
        );
        hub.offer("a", 1, Some(&revision(1, 1)), None, true);
        assert!(rx.has_changed().unwrap());
    }

    #[test]
    fn unknown_agents_are_ignored() {
        let hub = Hub::new(["a"]);
        hub.offer("b", 1, None, None, false);
        assert!(hub.subscribe("b").is_none());
    }
}
