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

use super::api::{ApiCommitStatus, CommitStatus, GitLab, GitLabError};
use crate::catalog::ref_key;
use crate::config::AgentSpec;
use crate::engine::Engine;
use crate::gate::{Outcome, Sha};
use crate::metrics::Metrics;
use crate::store::{
    Broadcast, LogEntry, StatusClaim, StatusKey, StatusOrder, StoreError, same_incarnation,
};

const RETRY_INITIAL: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long one entry's statuses are retried before it is left for a later attempt.
const RETRY_FOR: Duration = Duration::from_secs(60);
/// Waits for another publisher's claim on a status of the same agent and commit.
const CLAIM_RETRY_INITIAL: Duration = Duration::from_millis(50);
const CLAIM_RETRY_MAX: Duration = Duration::from_secs(1);
/// Pause after the status feed itself failed (the store is down).
const FEED_RETRY: Duration = Duration::from_secs(1);
/// How long a stopping publisher may spend handing back what it did not finish.
const RELEASE_WITHIN: Duration = Duration::from_secs(3);
/// Every commit status Greenlight posts is named `greenlight/<agent>`: pipeline hooks that
/// carry them as jobs must not count them towards the verdict.
pub const CONTEXT_PREFIX: &str = "greenlight/";

/// A commit status a log entry means for one agent, on a commit of its project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeantStatus {
    pub agent: String,
    /// The incarnation of the agent the entry was written for.
    pub incarnation: u64,
    pub sha: String,
    pub order: StatusOrder,
    pub status: CommitStatus,
}

/// One status to post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusJob {
    pub project: String,
    pub meant: MeantStatus,
}

/// The statuses an event means for GitLab, if any.
pub fn status_for(message: &Broadcast, target_base: Option<&str>) -> Vec<MeantStatus> {
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
        Broadcast::AgentsChanged(changes) => changes
            .iter()
            .flat_map(|(written, change)| {
                let agent = &written.agent;
                // Statuses decided with a revision come before every report on it.
                let order = StatusOrder::decided(
                    change
                        .desired
                        .as_ref()
                        .map_or(0, |desired| desired.generation),
                );
                change.decisions.iter().filter_map(move |decision| {
                    let sha = decision.sha.as_ref()?.to_string();
                    let status = match decision.outcome {
                        Outcome::Deploy => CommitStatus {
                            pipeline_id: decision.pipeline_id,
                            ..status(agent, "pending", format!("deploying: {}", decision.reason))
                        },
                        Outcome::Skip if decision.superseded_by.is_some() => {
                            status(agent, "canceled", decision.reason.clone())
                        }
                        _ => return None,
                    };
                    Some(MeantStatus {
                        agent: agent.clone(),
                        incarnation: written.incarnation,
                        sha,
                        order,
                        status,
                    })
                })
            })
            .collect(),
        Broadcast::Report {
            agent,
            report,
            incarnation,
        } => {
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
            vec![MeantStatus {
                agent: agent.clone(),
                incarnation: *incarnation,
                order: StatusOrder::reported(report.generation, report.received_at_unix_ms, state),
                sha: report.revision,
                status: status(agent, state, description),
            }]
        }
        Broadcast::Connection { .. } | Broadcast::Fact { .. } | Broadcast::Registry { .. } => {
            Vec::new()
        }
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    /// Posted, already posted, or refused for good: done with the entry.
    Done,
    /// Another publisher holds the claim of one of its statuses and has not posted it yet:
    /// left unacknowledged, so that whoever takes the entry over finds it posted, or
    /// posts it if that publisher failed.
    Claimed,
    /// GitLab kept failing: left unacknowledged for a later attempt, by any replica.
    Deferred,
    Stopped,
}

impl Handled {
    /// Folds the statuses of one entry handled in turn: a status claimed elsewhere does not
    /// stop the others being posted, GitLab failing or a shutdown does.
    fn then(self, next: Handled) -> std::ops::ControlFlow<Handled, Handled> {
        use std::ops::ControlFlow::{Break, Continue};
        match (self, next) {
            (_, Handled::Deferred | Handled::Stopped) => Break(next),
            (Handled::Claimed, _) | (_, Handled::Claimed) => Continue(Handled::Claimed),
            _ => Continue(self),
        }
    }
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

    /// Runs until `shutdown`, then hands back what it took and did not finish.
    pub async fn run(self, shutdown: CancellationToken) {
        let consumer = self.engine.replica().to_owned();
        // What the store holds as taken under this replica's name was taken by a process
        // before this one (a container restarted in its pod keeps its name, and the
        // others see it alive): handed back, it is taken at once rather than after the
        // takeover time.
        if let Err(error) = self
            .engine
            .store()
            .release_statuses(&consumer, self.takeover)
            .await
        {
            warn!(%error, "cannot hand back status entries taken before a restart; they wait for the takeover time");
        }
        self.publish(&consumer, &shutdown).await;
        // Left with this replica, the entries would wait out the takeover time (minutes)
        // before another replica posted their statuses.
        let released = tokio::time::timeout(
            RELEASE_WITHIN,
            self.engine
                .store()
                .release_statuses(&consumer, self.takeover),
        )
        .await;
        match released {
            Ok(Ok(())) => debug!("status entries not finished handed back"),
            Ok(Err(error)) => warn!(
                %error,
                "cannot hand back unfinished status entries; they wait for the takeover time"
            ),
            Err(_) => warn!(
                "handing back unfinished status entries took too long; the rest wait for the \
                 takeover time"
            ),
        }
    }

    /// Posts what the log means for GitLab as `consumer` until `shutdown`.
    async fn publish(&self, consumer: &str, shutdown: &CancellationToken) {
        let mut feed_failures = Backoff::new(FEED_RETRY, RETRY_MAX);
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = self.engine.store().next_for_statuses(consumer, self.takeover) => next,
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
            match self.handle(&entry, shutdown).await {
                Handled::Done => {
                    if let Err(error) = self.engine.store().ack_statuses(&entry.id).await {
                        // Unacknowledged, it is taken over later and found already posted.
                        warn!(%error, id = entry.id, "cannot acknowledge a status entry");
                    }
                }
                Handled::Claimed => debug!(
                    id = entry.id,
                    "a status of the entry is claimed by another publisher; leaving it for later"
                ),
                Handled::Deferred => self.metrics.gitlab_status("deferred", 1),
                Handled::Stopped => return,
            }
        }
    }

    /// The agent `meant` is for, unless it was deleted since. This replica's catalog is
    /// asked first; when it has no agent of that incarnation under the name (it has not
    /// read the registry change that created it, or the entry is of an agent deleted
    /// since), the store says which it is.
    async fn agent_of(&self, meant: &MeantStatus) -> Result<Option<Arc<AgentSpec>>, StoreError> {
        let fits = |spec: &AgentSpec| same_incarnation(meant.incarnation, spec.incarnation);
        if let Some(spec) = self.engine.catalog().agent_arc(&meant.agent)
            && fits(&spec)
        {
            return Ok(Some(spec));
        }
        Ok(self
            .engine
            .agent_now(&meant.agent)
            .await?
            .filter(|spec| fits(spec)))
    }

    /// Posts the statuses `entry` means, each once.
    async fn handle(&self, entry: &LogEntry, shutdown: &CancellationToken) -> Handled {
        // Joins the trace of the decision or report the entry records.
        let span = tracing::info_span!("commit_statuses", trace_id = tracing::field::Empty);
        greenlight::telemetry::adopt(&span, trace_of(&entry.message).as_deref());
        let mut handled = Handled::Done;
        for mut meant in status_for(&entry.message, self.target_base.as_deref()) {
            // Each status's attempts are bounded well within the takeover time, so that its
            // claim outlives them. An entry naming many agents may take longer than that as
            // a whole: a replica taking it over meanwhile skips the statuses claimed here.
            let deadline = tokio::time::Instant::now() + RETRY_FOR.min(self.takeover / 2);
            let spec = match self.agent_of(&meant).await {
                Ok(Some(spec)) => spec,
                Ok(None) => {
                    debug!(
                        agent = meant.agent,
                        sha = meant.sha,
                        "no status for an agent deleted since (or created again under its name)"
                    );
                    continue;
                }
                // A record this version cannot read names no agent it could post for, as
                // the catalog skips it too; retrying would hold the entry's other statuses.
                Err(error @ StoreError::Corrupt { .. }) => {
                    warn!(%error, agent = meant.agent, "no status for an agent whose record cannot be read");
                    continue;
                }
                Err(error) => {
                    warn!(%error, agent = meant.agent, "cannot read the agent of a status; later");
                    return Handled::Deferred;
                }
            };
            meant.status.git_ref = Some(spec.branch.clone());
            if meant.status.pipeline_id.is_none() {
                meant.status.pipeline_id = pipeline_of(&self.engine, &spec, &meant.sha).await;
            }
            let job = StatusJob {
                project: spec.project.clone(),
                meant,
            };
            let posting = tracing::info_span!(
                parent: &span,
                "post_commit_status",
                agent = job.meant.agent,
                sha = job.meant.sha,
                state = job.meant.status.state
            );
            let posted = post(
                &self.engine,
                &self.gitlab,
                &job,
                &self.metrics,
                deadline,
                shutdown,
            )
            .instrument(posting)
            .await;
            handled = match handled.then(posted) {
                std::ops::ControlFlow::Continue(so_far) => so_far,
                std::ops::ControlFlow::Break(last) => return last,
            };
        }
        handled
    }
}

/// The W3C trace context a log entry carries: its decision's, or its report's.
fn trace_of(message: &Broadcast) -> Option<String> {
    match message {
        // Agents written together were decided by one evaluation, in one trace.
        Broadcast::AgentsChanged(changes) => changes
            .changes
            .iter()
            .find_map(|change| change.traceparent.clone()),
        Broadcast::Report { report, .. } => StatusReport::decode(report.as_slice())
            .ok()
            .map(|report| report.traceparent)
            .filter(|trace| !trace.is_empty()),
        Broadcast::Connection { .. } | Broadcast::Fact { .. } | Broadcast::Registry { .. } => None,
    }
}

/// The pipeline a status on `sha` of `agent` belongs to: the one that let the agent's
/// revision through, else the commit's verdict on the ref. `None` (an untested commit
/// deployed in immediate or manual mode, or an unreadable store) posts without one, and
/// GitLab makes an `external` pipeline, which the gate ignores.
async fn pipeline_of(engine: &Engine, agent: &AgentSpec, sha: &str) -> Option<u64> {
    let sha = Sha::parse(sha).ok()?;
    let gate = engine.gate_of(&agent.name).await.ok()?;
    let opened = [&gate.desired, &gate.position]
        .into_iter()
        .flatten()
        .find(|revision| revision.sha == sha)
        .and_then(|revision| revision.pipeline_id);
    if opened.is_some() {
        return opened;
    }
    let refs = engine.facts(&ref_key(agent)).await.ok()?;
    refs.verdict(&sha).map(|p| p.id)
}

/// Posts `job` unless it was posted before or another publisher is posting it, retrying
/// with backoff until `deadline`.
async fn post(
    engine: &Engine,
    gitlab: &GitLab,
    job: &StatusJob,
    metrics: &Metrics,
    deadline: tokio::time::Instant,
    shutdown: &CancellationToken,
) -> Handled {
    // Several log entries can mean the same status (an agent reports `applying` more than
    // once; a commit is superseded again), and they may reach two publishers at once: the
    // claim lets one post it. It lasts as long as this attempt may, so that a publisher
    // that dies mid-post leaves the status to whoever takes its entry over.
    let meant = &job.meant;
    let (agent, sha, state) = (&meant.agent, &meant.sha, meant.status.state);
    let status = StatusKey {
        agent,
        sha,
        state,
        order: meant.order,
    };
    let holder = engine.replica();
    let mut waiting = Backoff::new(CLAIM_RETRY_INITIAL, CLAIM_RETRY_MAX);
    let retaken = loop {
        let lease = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_secs(1));
        match engine.store().begin_status(&status, holder, lease).await {
            Ok(StatusClaim::Mine) => break false,
            Ok(StatusClaim::Retaken) => break true,
            Ok(StatusClaim::Posted) => return Handled::Done,
            Ok(StatusClaim::Superseded) => {
                debug!(
                    agent,
                    sha, state, "a later commit status is shown; not posting this one"
                );
                metrics.gitlab_status("superseded", 1);
                return Handled::Done;
            }
            // Another publisher posts a status of the agent on the commit: mostly the one
            // just before this, from another shard of the log read at the same time, done
            // within its lease. Past this attempt's deadline, only once it is posted is the
            // entry done.
            Ok(StatusClaim::InFlight) => {
                let delay = waiting.delay();
                if tokio::time::Instant::now() + delay >= deadline {
                    return Handled::Claimed;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Handled::Stopped,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(error) => {
                warn!(%error, agent, state, "cannot claim a commit status; leaving it for later");
                return Handled::Deferred;
            }
        }
    };
    let handled = post_claimed(gitlab, job, retaken, metrics, deadline, shutdown).await;
    let posted = matches!(handled, Posted::Yes);
    if let Err(error) = engine.store().finish_status(&status, holder, posted).await {
        // Posted but not recorded: the claim expires, and whoever retakes it finds the
        // status on GitLab.
        warn!(%error, agent, state, "cannot record a commit status");
    }
    match handled {
        Posted::Yes | Posted::Refused => Handled::Done,
        Posted::Later => Handled::Deferred,
        Posted::Stopped => Handled::Stopped,
    }
}

/// Whether GitLab already shows `job`'s status on the commit: the newest status of its name
/// stands for it.
async fn already_posted(gitlab: &GitLab, job: &StatusJob) -> Result<bool, GitLabError> {
    let status = &job.meant.status;
    let listed = gitlab
        .commit_statuses(&job.project, &job.meant.sha, &status.name)
        .await?;
    Ok(shows(&listed, status))
}

/// Whether the newest of `listed` named as `status` stands for it.
fn shows(listed: &[ApiCommitStatus], status: &CommitStatus) -> bool {
    listed
        .iter()
        .filter(|listed| listed.name == status.name)
        // The last of equals: a list without ids is in the order GitLab created them.
        .max_by_key(|listed| listed.id)
        .is_some_and(|newest| covers(&newest.status, status.state))
}

/// Whether a status GitLab lists in state `listed` stands for posting `state`: the same
/// state, or (GitLab moves one status of a name along pending, running, then a final state
/// in place) a later one than a `pending` or `running` still to post.
fn covers(listed: &str, state: &str) -> bool {
    let stage = StatusOrder::stage_of;
    listed == state || (stage(state) < 2 && stage(listed) > stage(state))
}

/// What became of one post.
enum Posted {
    Yes,
    /// Refused for good (a 4xx): done with it, not recorded as posted.
    Refused,
    /// GitLab kept failing until the deadline.
    Later,
    Stopped,
}

/// Posts a claimed status, retrying with backoff until `deadline`. When an earlier attempt
/// may have reached GitLab (`look_first`: a claim retaken, or a post whose answer was lost)
/// GitLab's list is read first, since posting again would show the state twice.
async fn post_claimed(
    gitlab: &GitLab,
    job: &StatusJob,
    mut look_first: bool,
    metrics: &Metrics,
    deadline: tokio::time::Instant,
    shutdown: &CancellationToken,
) -> Posted {
    let (agent, sha, state) = (&job.meant.agent, &job.meant.sha, job.meant.status.state);
    let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
    loop {
        // Within the claim's lease: a post landing after it could cover a later status
        // another publisher posted meanwhile.
        let attempt = tokio::time::timeout_at(deadline, async {
            if look_first {
                if already_posted(gitlab, job).await? {
                    return Ok(true);
                }
                look_first = false;
            }
            let status = &job.meant.status;
            gitlab.post_status(&job.project, sha, status).await?;
            Ok::<_, GitLabError>(false)
        })
        .await;
        let attempt = match attempt {
            Ok(Ok(true)) => {
                debug!(agent, sha, state, "commit status found already posted");
                metrics.gitlab_status("already_posted", 1);
                return Posted::Yes;
            }
            Ok(Ok(false)) => Ok(()),
            Ok(Err(error)) => Err(error),
            Err(_) => {
                warn!(
                    agent,
                    state, "cannot post commit status in time; leaving it for later"
                );
                return Posted::Later;
            }
        };
        match attempt {
            Ok(()) => {
                debug!(agent, sha, state, "commit status posted");
                metrics.gitlab_status("posted", 1);
                return Posted::Yes;
            }
            Err(error) if error.retryable() => {
                // No answer, or a server error, which a gateway in front of GitLab also
                // answers when the answer was lost: GitLab may have taken it.
                look_first |= matches!(
                    error,
                    GitLabError::Transport(_) | GitLabError::Status { status: 500.., .. }
                );
                let delay = backoff.delay();
                if tokio::time::Instant::now() + delay >= deadline {
                    warn!(%error, agent, state, "cannot post commit status; leaving it for later");
                    return Posted::Later;
                }
                warn!(%error, agent, state, retry_in = ?delay, "cannot post commit status");
                metrics.gitlab_status("retried", 1);
                tokio::select! {
                    _ = shutdown.cancelled() => return Posted::Stopped,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(error) => {
                warn!(%error, agent, state, "giving up on a commit status");
                metrics.gitlab_status("failed", 1);
                return Posted::Refused;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::Decision;
    use crate::store::{AgentChanges, ChangedAgent, DecidedChange};

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

    /// The statuses of one entry, each handled as `each` says, folded as `handle` does: what
    /// the entry comes to, and how many statuses were tried.
    fn settle(each: &[Handled]) -> (Handled, usize) {
        let mut handled = Handled::Done;
        for (tried, next) in each.iter().enumerate() {
            match handled.then(*next) {
                std::ops::ControlFlow::Continue(so_far) => handled = so_far,
                std::ops::ControlFlow::Break(last) => return (last, tried + 1),
            }
        }
        (handled, each.len())
    }

    #[test]
    fn an_entry_with_a_status_claimed_elsewhere_is_left_for_later_once_the_others_are_tried() {
        use Handled::{Claimed, Deferred, Done, Stopped};
        assert_eq!(settle(&[]), (Done, 0));
        assert_eq!(settle(&[Done, Done]), (Done, 2));
        // Acknowledged, the entry would be lost if the publisher holding the claim failed.
        assert_eq!(settle(&[Done, Claimed, Done]), (Claimed, 3));
        assert_eq!(settle(&[Claimed, Done]), (Claimed, 2));
        assert_eq!(settle(&[Claimed, Deferred, Done]), (Deferred, 2));
        assert_eq!(settle(&[Done, Stopped, Claimed]), (Stopped, 2));
    }

    #[test]
    fn a_listed_status_covers_its_own_state_and_earlier_steps_only() {
        assert!(covers("success", "success"));
        assert!(covers("running", "pending"), "moved on in place");
        assert!(covers("failed", "running"));
        assert!(!covers("pending", "running"), "not there yet");
        assert!(
            !covers("failed", "success"),
            "another outcome is not this one"
        );
        assert!(!covers("canceled", "failed"));
    }

    #[test]
    fn only_the_newest_status_of_the_name_counts_as_shown() {
        let listed = |statuses: &[(u64, &str, &str)]| -> Vec<ApiCommitStatus> {
            statuses
                .iter()
                .map(|(id, name, status)| ApiCommitStatus {
                    id: *id,
                    name: (*name).into(),
                    status: (*status).into(),
                })
                .collect()
        };
        let success = CommitStatus {
            state: "success",
            name: "greenlight/prod".into(),
            description: String::new(),
            target_url: None,
            pipeline_id: None,
            git_ref: None,
        };
        let flipped = listed(&[
            (3, "greenlight/prod", "failed"),
            (2, "greenlight/prod", "success"),
            (4, "greenlight/staging", "success"),
        ]);
        assert!(!shows(&flipped, &success), "an older success is not shown");
        let back = listed(&[
            (3, "greenlight/prod", "failed"),
            (5, "greenlight/prod", "success"),
        ]);
        assert!(shows(&back, &success));
        let without_ids = listed(&[
            (0, "greenlight/prod", "success"),
            (0, "greenlight/prod", "failed"),
        ]);
        assert!(
            !shows(&without_ids, &success),
            "the last listed is the newest"
        );
        assert!(!shows(&[], &success));
    }

    #[test]
    fn decisions_become_pending_and_superseded_commits_canceled_for_each_agent_written() {
        let change = DecidedChange {
            desired: None,
            decisions: vec![
                Decision {
                    pipeline_id: Some(7),
                    ..decision(Outcome::Deploy, "pipeline 7 succeeded")
                },
                Decision {
                    superseded_by: Sha::parse(&"1234abcd".repeat(5)).ok(),
                    ..decision(Outcome::Skip, "superseded by 1234abcd")
                },
                decision(Outcome::Skip, "pipeline 8 is running"),
            ],
            traceparent: None,
        };
        let mut changes = AgentChanges::one("prod".into(), 1, change);
        // Decided alike, written in the same step.
        changes.agents.push(ChangedAgent {
            incarnation: 0,
            agent: "prod-eu".into(),
            version: 4,
            change: 0,
        });
        let statuses = status_for(
            &Broadcast::AgentsChanged(changes),
            Some("https://gl.example/"),
        );
        let posted: Vec<(&str, &str)> = statuses
            .iter()
            .map(|meant| (meant.agent.as_str(), meant.status.state))
            .collect();
        assert_eq!(
            posted,
            [
                ("prod", "pending"),
                ("prod", "canceled"),
                ("prod-eu", "pending"),
                ("prod-eu", "canceled")
            ]
        );
        assert_eq!(statuses[0].status.name, "greenlight/prod");
        assert_eq!(statuses[2].status.name, "greenlight/prod-eu");
        assert_eq!(
            statuses[0].status.pipeline_id,
            Some(7),
            "joins the gate's pipeline"
        );
        assert_eq!(statuses[1].status.description, "superseded by 1234abcd");
        assert_eq!(
            statuses[0].status.target_url.as_deref(),
            Some("https://gl.example/agents/prod")
        );
    }

    #[test]
    fn reports_become_running_success_and_failed() {
        let report = |phase: Phase, message: &str| Broadcast::Report {
            incarnation: 0,
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
                .map(|meant| (meant.status.state, meant.status.description.clone()))
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
