//! Closing the loop with GitLab: deploy results as commit statuses, and catching up on
//! pushes and pipelines whose webhooks were missed.

mod api;
mod catch_up;
mod confirm;
mod statuses;

pub use api::{
    ApiPipeline, CommitStatus, GitLab, GitLabError, MAX_DESCRIPTION, parse_gitlab_time, truncate,
};
pub use catch_up::{catch_up_once, run_catch_up};
pub use confirm::{Claim, Confirmation, Mismatch, PipelineConfirmer, compare};
pub use statuses::{CONTEXT_PREFIX, StatusPublisher, status_for};
