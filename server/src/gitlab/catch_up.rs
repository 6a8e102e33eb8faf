//! Catching up after missed webhooks: GitLab does not redeliver them, so the server reads
//! each watched branch's head and latest pipelines and feeds them into the same gate.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::api::{GitLab, GitLabError, parse_gitlab_time};
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

/// Reads `key`'s branch head and latest pipelines from GitLab and records them.
pub async fn catch_up_once(
    engine: &Arc<Engine>,
    gitlab: &GitLab,
    key: &RefKey,
) -> Result<(), CatchUpError> {
    let fact = |kind| Fact {
        origin: Origin::GitLabApi,
        project_path: Some(key.project.clone()),
        project_id: key.project.parse().ok(),
        branch: key.branch.clone(),
        kind,
    };
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
        let mut known = engine.facts(key).await?;
        if known.record_push(&push) == Recorded::Changed {
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
        let (Ok(sha), Ok(status)) = (sha, PipelineStatus::parse(&api.status)) else {
            continue;
        };
        let as_of_ms = api.updated_at.as_deref().and_then(parse_gitlab_time);
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
    loop {
        let keys: Vec<RefKey> = engine.catalog().refs().cloned().collect();
        for key in &keys {
            match catch_up_once(&engine, &gitlab, key).await {
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
