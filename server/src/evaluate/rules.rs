//! The evaluator's rules, without I/O: what one agent's state becomes when its ref's facts
//! or an operator's request change it, and which conditional writes a store accepts. The
//! evaluator and the stores apply exactly these, and the property tests drive them through
//! arbitrary interleavings of two evaluators.

use crate::gate::{Context, GateError, Sha, Step};
use crate::store::{AgentState, Written, same_incarnation};

/// An operator's request about one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Trigger { sha: Option<Sha>, force_prune: bool },
    Pause { reason: String },
    Resume,
    Pin { sha: Sha, reason: String },
    Unpin,
}

/// The commit an operation is about, which the git lineage must cover.
pub fn subject(operation: &Operation) -> Option<&Sha> {
    match operation {
        Operation::Trigger { sha, .. } => sha.as_ref(),
        Operation::Pin { sha, .. } => Some(sha),
        _ => None,
    }
}

/// `read` after the gate ran against facts at `facts_position` (`cx`): `None` when that
/// changes nothing worth writing, or when `read` was decided from newer facts already.
pub fn advance(
    read: &AgentState,
    cx: &Context<'_>,
    facts_position: u64,
    traceparent: Option<&str>,
) -> Option<(AgentState, Step)> {
    if read.position > facts_position {
        return None;
    }
    let mut next = read.clone();
    let step = next.gate.advance(cx);
    // A move can repeat a decision already in the history (the gate left a commit and came
    // back to it) while a pin keeps the desired revision: it must be written all the same.
    let moved = next.gate.position != read.gate.position;
    if step.decisions.is_empty() && !step.desired_changed && !moved {
        return None;
    }
    next.position = facts_position;
    if step.desired_changed {
        next.traceparent = traceparent.map(str::to_owned);
    }
    Some((next, step))
}

/// `read` after `operation`, decided against facts at `facts_position` (`cx`).
pub fn operate(
    read: &AgentState,
    cx: &Context<'_>,
    facts_position: u64,
    operation: &Operation,
    traceparent: Option<&str>,
) -> Result<(AgentState, Step), GateError> {
    let mut next = read.clone();
    let now = cx.now_ms;
    let gate = &mut next.gate;
    let step = match operation {
        Operation::Trigger { sha, force_prune } => gate.trigger(cx, sha.as_ref(), *force_prune)?,
        Operation::Pause { reason } => gate.pause(reason.clone(), now),
        Operation::Resume => gate.resume(cx)?,
        Operation::Pin { sha, reason } => gate.pin(sha.clone(), reason.clone(), now)?,
        Operation::Unpin => gate.unpin(cx)?,
    };
    next.position = next.position.max(facts_position);
    if step.desired_changed {
        next.traceparent = traceparent.map(str::to_owned);
    }
    Ok((next, step))
}

/// An agent's record as a store holds it, for [`admit`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredVersion {
    /// 0 when nothing is stored.
    pub version: u64,
    /// The facts position the stored state was decided from.
    pub position: u64,
    /// The incarnation of the agent the record belongs to (0: not recorded).
    pub incarnation: u64,
}

/// Whether a store holding `stored` accepts a write for `incarnation` of the agent, made
/// from version `expected` with facts at `position`: the record must be that agent's (an
/// evaluation still running when its agent was deleted and another created under the name
/// must not write into the new one's), the version read must still be the stored one, and
/// the facts must be no older.
pub fn admit(stored: StoredVersion, incarnation: u64, expected: u64, position: u64) -> Written {
    if !same_incarnation(stored.incarnation, incarnation) {
        Written::Replaced
    } else if stored.version != expected {
        Written::Conflict
    } else if stored.position > position {
        Written::Stale
    } else {
        Written::Saved {
            version: stored.version + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(version: u64, position: u64, incarnation: u64) -> StoredVersion {
        StoredVersion {
            version,
            position,
            incarnation,
        }
    }

    #[test]
    fn a_write_is_admitted_only_over_the_version_it_read_of_its_own_agent() {
        assert_eq!(
            admit(stored(3, 10, 7), 7, 3, 10),
            Written::Saved { version: 4 }
        );
        assert_eq!(admit(stored(3, 10, 7), 7, 2, 12), Written::Conflict);
        assert_eq!(admit(stored(3, 10, 7), 7, 3, 9), Written::Stale);
        assert_eq!(
            admit(stored(0, 0, 0), 7, 0, 1),
            Written::Saved { version: 1 },
            "nothing stored: any agent's first write"
        );
    }

    #[test]
    fn a_write_for_an_agent_since_replaced_under_its_name_is_refused_whatever_it_read() {
        // The same version and older facts too: the agent's identity is checked first, so
        // that the writer does not read again and retry for an agent that is gone.
        assert_eq!(admit(stored(1, 5, 9), 7, 1, 5), Written::Replaced);
        assert_eq!(admit(stored(0, 0, 9), 7, 0, 5), Written::Replaced);
        assert_eq!(admit(stored(4, 8, 9), 7, 1, 5), Written::Replaced);
    }

    #[test]
    fn records_and_writers_without_an_incarnation_are_taken_as_the_same_agent() {
        // Agents of the config file, records written before incarnations were kept, and
        // records an earlier version wrote back during a rolling upgrade.
        assert_eq!(
            admit(stored(2, 5, 0), 7, 2, 5),
            Written::Saved { version: 3 }
        );
        assert_eq!(
            admit(stored(2, 5, 9), 0, 2, 5),
            Written::Saved { version: 3 }
        );
    }
}
