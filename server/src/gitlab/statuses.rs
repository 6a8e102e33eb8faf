//! Deploy results as GitLab commit statuses: one context per agent, derived from the change
//! log, so that GitLab's health never slows a sync and a decision gets its statuses even
//! when the replica that made it died.
//!
//! Every replica runs a publisher; the log's status feed hands each entry to one of them,
//! and an entry whose publisher died unacknowledged goes to another after
//! `gitlab.status_takeover`. Posting one entry is bounded well within that time, so a live
//! publisher's work is never taken over and posted twice.

use std::sync::Arc;
use std::time::Duration;

use greenlight::backoff::Backoff;
use greenlight::v1::{Phase, StatusReport};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use super::api::{CommitStatus, GitLab};
use crate::catalog::ref_key;
use crate::config::AgentSpec;
use crate::engine::Engine;
use crate::gate::{Outcome, Sha};
use crate::metrics::Metrics;
use crate::store::{Broadcast, LogEntry};

const RETRY_INITIAL: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long one entry's statuses are retried before it is left for a later attempt.
const RETRY_FOR: Duration = Duration::from_secs(60);
/// Pause after the status feed itself failed (the store is down).
const FEED_RETRY: Duration = Duration::from_secs(1);
/// Every commit status Greenlight posts is named `greenlight/<agent>`: pipeline hooks that
/// carry them as jobs must not count them towards the verdict.
pub const CONTEXT_PREFIX: &str = "greenlight/";

/// One status to post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusJob {
    pub agent: String,
    pub project: String,
    pub sha: String,
    pub status: CommitStatus,
}

/// The status an event means for GitLab, if any.
pub fn status_for(
    message: &Broadcast,
    target_base: Option<&str>,
) -> Vec<(String, String, CommitStatus)> {
    let status = |agent: &str, state: &'static str, description: String| CommitStatus {
        state,
        name: format!("{CONTEXT_PREFIX}{agent}"),
        description,
        // The agent's status page at its plain URL, which answers for public agents only: a
        // private agent's key is never posted to GitLab.
        target_url: target_base
            .map(|base| format!("{}/agents/{agent}", base.trim_end_matches('/'))),
        pipeline_id: None,
        git_ref: None,
    };
    match message {
        Broadcast::RefChanged { decisions, .. } => decisions
            .iter()
            .filter_map(|(agent, decision)| {
                let sha = decision.sha.as_ref()?.to_string();
                match decision.outcome {
                    Outcome::Deploy => Some((
                        agent.clone(),
                        sha,
                        CommitStatus {
                            pipeline_id: decision.pipeline_id,
                            ..status(agent, "pending", format!("deploying: {}", decision.reason))
                        },
                    )),
                    Outcome::Skip if decision.superseded_by.is_some() => Some((
                        agent.clone(),
                        sha,
                        status(agent, "canceled", decision.reason.clone()),
                    )),
                    _ => None,
                }
            })
            .collect(),
        Broadcast::Report { agent, report } => {
            let Ok(report) = StatusReport::decode(report.as_slice()) else {
                return Vec::new();
            };
            let (state, description) = match report.phase() {
                Phase::Applying => ("running", "applying".to_owned()),
                Phase::Healthy => ("success", "deployed and healthy".to_owned()),
                Phase::Failed => ("failed", format!("apply failed: {}", report.message)),
                Phase::Degraded => ("failed", format!("degraded: {}", report.message)),
                Phase::Applied | Phase::Unspecified => return Vec::new(),
            };
            vec![(
                agent.clone(),
                report.revision.clone(),
                status(agent, state, description),
            )]
        }
        Broadcast::Connection { .. } => Vec::new(),
    }
}

/// Turns the change log into commit statuses of the agents' projects.
pub struct StatusPublisher {
    engine: Arc<Engine>,
    gitlab: GitLab,
    target_base: Option<String>,
    metrics: Arc<Metrics>,
    takeover: Duration,
}

/// What became of one log entry's statuses.
enum Handled {
    /// Posted, already posted, or refused for good: done with the entry.
    Done,
    /// GitLab kept failing: left unacknowledged for a later attempt, by any replica.
    Deferred,
    Stopped,
}

impl StatusPublisher {
    /// Posts to `gitlab`, linking to `target_base` when set; takes over statuses of a
    /// publisher that did not finish them within `takeover`.
    pub fn new(
        engine: Arc<Engine>,
        gitlab: GitLab,
        target_base: Option<String>,
        metrics: Arc<Metrics>,
        takeover: Duration,
    ) -> Self {
        Self {
            engine,
            gitlab,
            target_base,
            metrics,
            takeover,
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let consumer = self.engine.replica().to_owned();
        let mut feed_failures = Backoff::new(FEED_RETRY, RETRY_MAX);
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = self.engine.store().next_for_statuses(&consumer, self.takeover) => next,
            };
            let entry = match next {
                Ok(Some(entry)) => entry,
                Ok(None) => continue,
                Err(error) => {
                    let delay = feed_failures.delay();
                    warn!(%error, retry_in = ?delay, "cannot read the status feed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            };
            feed_failures.reset();
            match self.handle(&entry, &shutdown).await {
                Handled::Done => {
                    if let Err(error) = self.engine.store().ack_statuses(&entry.id).await {
                        // Unacknowledged, it is taken over later and found already posted.
                        warn!(%error, id = entry.id, "cannot acknowledge a status entry");
                    }
                }
                Handled::Deferred => self.metrics.gitlab_status("deferred", 1),
                Handled::Stopped => return,
            }
        }
    }

    /// Posts the statuses `entry` means, each once.
    async fn handle(&self, entry: &LogEntry, shutdown: &CancellationToken) -> Handled {
        // Joins the trace of the decision or report the entry records.
        let span = tracing::info_span!("commit_statuses", trace_id = tracing::field::Empty);
        greenlight::telemetry::adopt(&span, trace_of(&entry.message).as_deref());
        // Bounded well within the takeover time: past it another replica would post too.
        let deadline = tokio::time::Instant::now() + RETRY_FOR.min(self.takeover / 2);
        for (agent, sha, mut status) in status_for(&entry.message, self.target_base.as_deref()) {
            let Some(spec) = self.engine.catalog().agent(&agent) else {
                continue;
            };
            status.git_ref = Some(spec.branch.clone());
            if status.pipeline_id.is_none() {
                status.pipeline_id = pipeline_of(&self.engine, spec, &sha).await;
            }
            let job = StatusJob {
                project: spec.project.clone(),
                agent,
                sha,
                status,
            };
            let posting = tracing::info_span!(
                parent: &span,
                "post_commit_status",
                agent = job.agent,
                sha = job.sha,
                state = job.status.state
            );
            match post(
                &self.engine,
                &self.gitlab,
                &job,
                &self.metrics,
                deadline,
                shutdown,
            )
            .instrument(posting)
            .await
            {
                Handled::Done => {}
                other => return other,
            }
        }
        Handled::Done
    }
}

/// The W3C trace context a log entry carries: its decision's, or its report's.
fn trace_of(message: &Broadcast) -> Option<String> {
    match message {
        Broadcast::RefChanged { traceparent, .. } => traceparent.clone(),
        Broadcast::Report { report, .. } => StatusReport::decode(report.as_slice())
            .ok()
            .map(|report| report.traceparent)
            .filter(|trace| !trace.is_empty()),
        Broadcast::Connection { .. } => None,
    }
}

/// The pipeline a status on `sha` of `agent` belongs to: the one that let the agent's
/// revision through, else the commit's verdict on the ref. `None` (an untested commit
/// deployed in immediate or manual mode, or an unreadable store) posts without one, and
/// GitLab makes an `external` pipeline, which the gate ignores.
async fn pipeline_of(engine: &Engine, agent: &AgentSpec, sha: &str) -> Option<u64> {
    let sha = Sha::parse(sha).ok()?;
    let doc = engine.load(&ref_key(agent)).await.ok()?.value;
    let opened = doc.agents.get(&agent.name).and_then(|gate| {
        [&gate.desired, &gate.position]
            .into_iter()
            .flatten()
            .find(|revision| revision.sha == sha)
            .and_then(|revision| revision.pipeline_id)
    });
    opened.or_else(|| doc.refs.verdict(&sha).map(|p| p.id))
}

/// Posts `job` unless it was posted before, retrying with backoff until `deadline`.
async fn post(
    engine: &Engine,
    gitlab: &GitLab,
    job: &StatusJob,
    metrics: &Metrics,
    deadline: tokio::time::Instant,
    shutdown: &CancellationToken,
) -> Handled {
    // A publisher that died after posting but before acknowledging leaves an entry that is
    // taken over: skip what it already posted. Marking only after success means a failure is
    // never recorded as posted.
    let (agent, sha, state) = (&job.agent, &job.sha, job.status.state);
    match engine.store().status_posted(agent, sha, state).await {
        Ok(true) => return Handled::Done,
        Ok(false) => {}
        Err(error) => warn!(%error, "cannot tell whether a commit status was posted; posting"),
    }
    let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
    loop {
        match gitlab.post_status(&job.project, sha, &job.status).await {
            Ok(()) => {
                debug!(agent, sha, state, "commit status posted");
                metrics.gitlab_status("posted", 1);
                if let Err(error) = engine.store().claim_status(agent, sha, state).await {
                    warn!(%error, agent, state, "cannot record a posted commit status");
                }
                return Handled::Done;
            }
            Err(error) if error.retryable() => {
                let delay = backoff.delay();
                if tokio::time::Instant::now() + delay >= deadline {
                    warn!(%error, agent, state, "cannot post commit status; leaving it for later");
                    return Handled::Deferred;
                }
                warn!(%error, agent, state, retry_in = ?delay, "cannot post commit status");
                metrics.gitlab_status("retried", 1);
                tokio::select! {
                    _ = shutdown.cancelled() => return Handled::Stopped,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(error) => {
                warn!(%error, agent, state, "giving up on a commit status");
                metrics.gitlab_status("failed", 1);
                return Handled::Done;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::Decision;
    use crate::store::RefKey;

    fn decision(outcome: Outcome, reason: &str) -> Decision {
        Decision {
            outcome,
            sha: Sha::parse(&"a".repeat(40)).ok(),
            pipeline_id: None,
            reason: reason.into(),
            at_ms: 0,
            superseded_by: None,
        }
    }

    #[test]
    fn decisions_become_pending_and_superseded_commits_canceled() {
        let key = RefKey {
            project: "g/a".into(),
            branch: "main".into(),
        };
        let message = Broadcast::RefChanged {
            key,
            version: 1,
            decisions: vec![
                (
                    "prod".into(),
                    Decision {
                        pipeline_id: Some(7),
                        ..decision(Outcome::Deploy, "pipeline 7 succeeded")
                    },
                ),
                (
                    "prod".into(),
                    Decision {
                        superseded_by: Sha::parse(&"1234abcd".repeat(5)).ok(),
                        ..decision(Outcome::Skip, "superseded by 1234abcd")
                    },
                ),
                (
                    "prod".into(),
                    decision(Outcome::Skip, "pipeline 8 is running"),
                ),
            ],
            traceparent: None,
        };
        let statuses = status_for(&message, Some("https://gl.example/"));
        let states: Vec<&str> = statuses.iter().map(|(_, _, s)| s.state).collect();
        assert_eq!(states, ["pending", "canceled"]);
        assert_eq!(statuses[0].2.name, "greenlight/prod");
        assert_eq!(
            statuses[0].2.pipeline_id,
            Some(7),
            "joins the gate's pipeline"
        );
        assert_eq!(statuses[1].2.description, "superseded by 1234abcd");
        assert_eq!(
            statuses[0].2.target_url.as_deref(),
            Some("https://gl.example/agents/prod")
        );
    }

    #[test]
    fn reports_become_running_success_and_failed() {
        let report = |phase: Phase, message: &str| Broadcast::Report {
            agent: "prod".into(),
            report: StatusReport {
                revision: "b".repeat(40),
                phase: phase.into(),
                message: message.into(),
                ..Default::default()
            }
            .encode_to_vec(),
        };
        let state = |m: &Broadcast| {
            status_for(m, None)
                .first()
                .map(|(_, _, s)| (s.state, s.description.clone()))
        };
        assert_eq!(
            state(&report(Phase::Applying, "")).map(|s| s.0),
            Some("running")
        );
        assert_eq!(
            state(&report(Phase::Healthy, "")).map(|s| s.0),
            Some("success")
        );
        assert_eq!(
            state(&report(Phase::Degraded, "Deployment web")),
            Some(("failed", "degraded: Deployment web".into()))
        );
        assert_eq!(state(&report(Phase::Applied, "")), None);
    }
}
