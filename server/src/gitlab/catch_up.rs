//! Catching up after missed webhooks: GitLab does not redeliver them, so the server reads
//! each watched branch's head and latest pipelines and feeds them into the same gate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::api::{ApiJob, ApiPipeline, GitLab, GitLabError, parse_gitlab_time};
use crate::engine::{Engine, EngineError};
use crate::gate::{Before, Pipeline, PipelineStatus, Push, Recorded, Sha};
use crate::ingest::{Fact, FactKind, Origin};
use crate::store::RefKey;
use crate::store::StoreError;

/// Why one catch-up round failed.
#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    #[error(transparent)]
    GitLab(#[from] GitLabError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot reach the store: {0}")]
    Store(#[from] StoreError),
}

/// Pipelines' statuses as their CI jobs give them, by project and pipeline id, with the
/// `updated_at` GitLab listed the pipeline with when its jobs were read: read again only once
/// the pipeline changed.
#[derive(Default)]
pub struct JobsRead(HashMap<(String, u64), (Option<String>, Option<CiStatus>)>);

/// A pipeline's status as its CI jobs give it, and when they last moved (Unix ms).
type CiStatus = (PipelineStatus, Option<i64>);

/// Pipelines remembered in [`JobsRead`]; past this the memory starts over.
const JOBS_READ_KEPT: usize = 4096;

impl JobsRead {
    /// The status `api`'s CI jobs give it and when they last moved; `None` when no job
    /// tells.
    async fn ci_status(
        &mut self,
        gitlab: &GitLab,
        project: &str,
        api: &ApiPipeline,
    ) -> Result<Option<CiStatus>, GitLabError> {
        let at = (project.to_owned(), api.id);
        if let Some((updated_at, read)) = self.0.get(&at)
            && *updated_at == api.updated_at
        {
            return Ok(*read);
        }
        let read = match gitlab.pipeline_jobs(project, api.id).await {
            Ok(jobs) => ApiJob::pipeline_status(&jobs).map(|status| {
                let activity = ApiJob::last_activity(&jobs);
                // A job retried in a finished pipeline waits unstarted at first: the
                // pipeline's own update says it runs again after it finished.
                let updated = api.updated_at.as_deref().and_then(parse_gitlab_time);
                let as_of = if status.is_final() {
                    activity
                } else {
                    activity.max(updated)
                };
                (status, as_of)
            }),
            // Past what a hook may list: no status can be told, and reading again would
            // only read as much again.
            Err(GitLabError::TooManyJobs(_)) => None,
            Err(error) => return Err(error),
        };
        if self.0.len() >= JOBS_READ_KEPT {
            self.0.clear();
        }
        self.0.insert(at, (api.updated_at.clone(), read));
        Ok(read)
    }
}

/// Reads `key`'s branch head and latest pipelines from GitLab and records them.
pub async fn catch_up_once(
    engine: &Arc<Engine>,
    gitlab: &GitLab,
    key: &RefKey,
    jobs_read: &mut JobsRead,
) -> Result<(), CatchUpError> {
    let fact = |kind| Fact {
        origin: Origin::GitLabApi,
        project_path: Some(key.project.clone()),
        project_id: key.project.parse().ok(),
        branch: key.branch.clone(),
        kind,
    };
    let known = engine.facts(key).await?;
    if let Some(head) = gitlab.branch_head(&key.project, &key.branch).await?
        && let Ok(after) = Sha::parse_full(&head)
    {
        let push = Push {
            before: Before::Unknown,
            after: Some(after),
            at_ms: crate::clock::now_ms(),
        };
        // Only a head the ref does not know yet is news. Recording the known head again each
        // round would fill the capped push history with it, pushing out the heads that order
        // the line, and wake every watching agent's evaluation for nothing.
        if known.clone().record_push(&push) == Recorded::Changed {
            engine
                .ingest()
                .record(fact(FactKind::Push(push)), None)
                .await?;
        }
    }
    let mut pipelines = gitlab.pipelines(&key.project, &key.branch).await?;
    pipelines.sort_by_key(|p| p.id);
    for api in pipelines {
        // As a webhook's: a full commit id, a status this version knows.
        let sha = Sha::parse_full(&api.sha);
        let (Ok(sha), Ok(listed)) = (sha, PipelineStatus::parse(&api.status)) else {
            continue;
        };
        let recorded = known
            .pipelines
            .get(&sha)
            .and_then(|runs| runs.iter().find(|run| run.id == api.id))
            .map(|run| run.status);
        let (status, as_of_ms) = match recorded {
            // Greenlight's statuses can hold a pipeline back or fail it, never make it green.
            Some(PipelineStatus::Success) if listed == PipelineStatus::Success => continue,
            // GitLab's status counts the commit statuses posted into the pipeline,
            // Greenlight's own among them, which go only to commits whose pipeline it
            // recorded: a deploy failing on staging must not fail the pipeline for prod, nor
            // one under way make it look unfinished (nor keep it looking so after its final
            // hook was lost). Its CI and trigger jobs alone say what it is, as a hook's jobs
            // do; read once per change of the pipeline.
            Some(recorded) => match jobs_read.ci_status(gitlab, &key.project, &api).await {
                Ok(Some((status, _))) if status == recorded => continue,
                Ok(Some(read)) => read,
                Ok(None) => continue,
                Err(error) => {
                    warn!(%error, %key, pipeline = api.id, "cannot read a pipeline's jobs; left for the next round");
                    continue;
                }
            },
            None => (
                listed,
                api.updated_at.as_deref().and_then(parse_gitlab_time),
            ),
        };
        let pipeline = Pipeline {
            id: api.id,
            status,
            source: api.source.unwrap_or_default(),
            as_of_ms,
            passed_stages: Vec::new(),
        };
        engine
            .ingest()
            .record(fact(FactKind::Pipeline { sha, pipeline }), None)
            .await?;
    }
    Ok(())
}

/// Catches up every watched ref at start and then every `interval`, until `shutdown`.
pub async fn run_catch_up(
    engine: Arc<Engine>,
    gitlab: GitLab,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut jobs_read = JobsRead::default();
    loop {
        let keys: Vec<RefKey> = engine.catalog().refs().cloned().collect();
        for key in &keys {
            match catch_up_once(&engine, &gitlab, key, &mut jobs_read).await {
                Ok(()) => info!(%key, "caught up with GitLab"),
                Err(error) => warn!(%error, %key, "cannot catch up with GitLab"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
