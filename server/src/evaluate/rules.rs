//! The evaluator's rules, without I/O: what one agent's state becomes when its ref's facts
//! or an operator's request change it, and which conditional writes a store accepts. The
//! evaluator and the stores apply exactly these, and the property tests drive them through
//! arbitrary interleavings of two evaluators.

use crate::gate::{Context, GateError, Sha, Step};
use crate::store::{AgentState, Written};

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

/// Whether a store holding an agent's state at `stored_version`, decided from facts at
/// `stored_position`, accepts a write made from `expected` with facts at `position`: the
/// version read must still be the stored one, and the facts must be no older.
pub fn admit(stored_version: u64, stored_position: u64, expected: u64, position: u64) -> Written {
    if stored_version != expected {
        Written::Conflict
    } else if stored_position > position {
        Written::Stale
    } else {
        Written::Saved {
            version: stored_version + 1,
        }
    }
}
