//! Deploy results as GitLab commit statuses: one context per agent, posted from a bounded
//! queue with retries so that GitLab's health never slows a sync.

use std::sync::Arc;
use std::time::Duration;

use greenlight::backoff::Backoff;
use greenlight::v1::{Phase, StatusReport};
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use super::api::{CommitStatus, GitLab};
use crate::catalog::ref_key;
use crate::config::AgentSpec;
use crate::engine::Engine;
use crate::gate::{Outcome, Sha};
use crate::metrics::Metrics;
use crate::store::Broadcast;

/// Statuses waiting to be posted; past this, new ones are dropped and counted.
const QUEUE: usize = 1024;
const RETRY_INITIAL: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long one status is retried before the queue moves on.
const RETRY_FOR: Duration = Duration::from_secs(30 * 60);
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
                    Outcome::Skip if decision.reason.starts_with("superseded by") => Some((
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

/// Turns every replica's events into commit statuses of the agents' projects.
pub struct StatusPublisher {
    engine: Arc<Engine>,
    gitlab: GitLab,
    target_base: Option<String>,
    metrics: Arc<Metrics>,
    events: broadcast::Receiver<Broadcast>,
}

impl StatusPublisher {
    /// Posts to `gitlab`, linking to `target_base` when set; hears every event from now on.
    pub fn new(
        engine: Arc<Engine>,
        gitlab: GitLab,
        target_base: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let events = engine.events();
        Self {
            engine,
            gitlab,
            target_base,
            metrics,
            events,
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(
            post_all(
                self.engine.clone(),
                self.gitlab.clone(),
                rx,
                self.metrics.clone(),
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("post_statuses")),
        );
        let mut events = self.events;
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                message = events.recv() => message,
            };
            let message = match message {
                Ok(message) => message,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    warn!(missed, "commit status events missed");
                    self.metrics.gitlab_status("dropped", missed);
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            for (agent, sha, mut status) in status_for(&message, self.target_base.as_deref()) {
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
                if tx.try_send(job).is_err() {
                    warn!("commit status queue full; dropping a status");
                    self.metrics.gitlab_status("dropped", 1);
                }
            }
        }
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

/// Posts jobs in order, each retried with backoff until it succeeds or cannot.
async fn post_all(
    engine: Arc<Engine>,
    gitlab: GitLab,
    mut jobs: mpsc::Receiver<StatusJob>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    while let Some(job) = tokio::select! {
        _ = shutdown.cancelled() => None,
        job = jobs.recv() => job,
    } {
        // Every replica sees every event: skip what another replica (or this one before a
        // restart) already posted. Two replicas racing may both post, which GitLab takes as
        // the same state twice; marking only after success means a failure is never
        // recorded as posted.
        let (agent, sha, state) = (&job.agent, &job.sha, job.status.state);
        match engine.store().status_posted(agent, sha, state).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(error) => warn!(%error, "cannot tell whether a commit status was posted; posting"),
        }
        let deadline = tokio::time::Instant::now() + RETRY_FOR;
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        loop {
            match gitlab.post_status(&job.project, sha, &job.status).await {
                Ok(()) => {
                    debug!(agent, sha, state, "commit status posted");
                    metrics.gitlab_status("posted", 1);
                    if let Err(error) = engine.store().claim_status(agent, sha, state).await {
                        warn!(%error, agent, state, "cannot record a posted commit status");
                    }
                    break;
                }
                Err(error) if error.retryable() && tokio::time::Instant::now() < deadline => {
                    let delay = backoff.delay();
                    warn!(%error, agent, state, retry_in = ?delay, "cannot post commit status");
                    metrics.gitlab_status("retried", 1);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(error) => {
                    warn!(%error, agent, state, "giving up on a commit status");
                    metrics.gitlab_status("failed", 1);
                    break;
                }
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
                    decision(Outcome::Skip, "superseded by 1234abcd"),
                ),
                (
                    "prod".into(),
                    decision(Outcome::Skip, "pipeline 8 is running"),
                ),
            ],
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
