//! The gate: which commit each agent should run, and why. Pure logic over recorded facts:
//! no I/O, no clock, no async, so every rule is testable as data.

mod decide;
mod model;
#[cfg(test)]
mod tests;

pub use decide::{
    AgentGate, Context, DECISION_HISTORY, DEPLOYED_HISTORY, Decision, GateError, Hold, Mode,
    Outcome, Pin, Revision, Step,
};
pub use model::{
    Before, EXTERNAL_SOURCE, InvalidSha, Lineage, MAX_HEADS, MAX_REJECTED, MERGE_REQUEST_SOURCE,
    NotFullSha, Pipeline, PipelineStatus, Push, PushOrder, Recorded, RefState, Rejected, Sha,
    UnknownStatus, aggregate_jobs, aggregate_named_jobs,
};
