//! Fact ingest: a push or pipeline update from a webhook, the ingest API or GitLab's own API
//! becomes one small record in the store, in one round trip. The answer never waits for a
//! gate: the ref's evaluator, on whichever replica holds it, hears of the fact through the
//! change log.

use std::sync::Arc;

use tracing::{Instrument, warn};

use crate::catalog::LiveCatalog;
use crate::clock::now_ms;
use crate::evaluate::{Asked, Evaluator};
use crate::gate::{Pipeline, PipelineStatus, Push, Rejected, Sha};
use crate::gitlab::{Claim, Confirmation, PipelineConfirmer};
use crate::store::{FactRecord, Ingested, RefKey, Store, StoreError};

/// Where a fact came from, which decides whether it is checked with GitLab first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A GitLab webhook: its pipeline claims are confirmed through the API when one is set.
    GitLabHook,
    /// The ingest API, for CI systems GitLab knows nothing about.
    Ingest,
    /// Read from GitLab's API itself (catch-up).
    GitLabApi,
}

/// A fact about a ref, from a webhook or the ingest API.
#[derive(Debug, Clone)]
pub struct Fact {
    pub origin: Origin,
    pub project_path: Option<String>,
    pub project_id: Option<u64>,
    pub branch: String,
    pub kind: FactKind,
}

/// What happened on the ref.
#[derive(Debug, Clone)]
pub enum FactKind {
    Push(Push),
    Pipeline { sha: Sha, pipeline: Pipeline },
}

/// What recording a fact did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recording {
    Recorded,
    /// Nothing new: a stale update.
    Unchanged,
    /// The same delivery was recorded before.
    Duplicate,
    /// Not about anything an agent watches.
    Ignored(String),
    /// GitLab's API contradicts the claim: kept as a rejected fact, nothing else changed.
    Contradicted(String),
}

/// Records facts.
pub struct Ingest {
    store: Arc<dyn Store>,
    catalog: Arc<LiveCatalog>,
    /// Confirms webhook pipeline claims with GitLab, when `gitlab.url` is set.
    confirmer: Option<PipelineConfirmer>,
    evaluator: Arc<Evaluator>,
}

impl Ingest {
    /// Records into `store` the facts about refs of `catalog`.
    pub fn new(
        store: Arc<dyn Store>,
        catalog: Arc<LiveCatalog>,
        confirmer: Option<PipelineConfirmer>,
        evaluator: Arc<Evaluator>,
    ) -> Self {
        Self {
            store,
            catalog,
            confirmer,
            evaluator,
        }
    }

    /// Records `fact` for every watched ref it is about, refusing a redelivery of `delivery`.
    pub async fn record(
        &self,
        fact: Fact,
        delivery: Option<&str>,
    ) -> Result<Recording, StoreError> {
        let keys = self.catalog.load().refs_for(
            fact.project_path.as_deref(),
            fact.project_id,
            &fact.branch,
        );
        if keys.is_empty() {
            let project = fact
                .project_path
                .clone()
                .or(fact.project_id.map(|id| id.to_string()))
                .unwrap_or_default();
            return Ok(Recording::Ignored(format!(
                "no agent watches {project}@{}",
                fact.branch
            )));
        }
        // The evaluation, on whichever replica, and the deploy it leads to join this trace.
        let trace = greenlight::telemetry::traceparent(&tracing::Span::current());
        if let Some(rejected) = self.contradiction(&fact, &keys).await? {
            let reason = rejected.reason.clone();
            let record = FactRecord::Rejected(rejected);
            for key in &keys {
                self.store
                    .record_fact(key, &record, delivery, trace.as_deref())
                    .await?;
            }
            return Ok(Recording::Contradicted(reason));
        }
        let record = match fact.kind {
            FactKind::Push(push) => FactRecord::Push(push),
            FactKind::Pipeline { sha, pipeline } => FactRecord::Pipeline { sha, pipeline },
        };
        let mut outcome = Recording::Unchanged;
        for key in &keys {
            let ingested = self
                .store
                .record_fact(key, &record, delivery, trace.as_deref())
                .instrument(tracing::info_span!("record_fact", %key))
                .await?;
            if let Ingested::Recorded { position } = ingested {
                // The change log brings it to the evaluator too; this spares the round trip
                // when the evaluator is here.
                let asked = Asked::by_fact(trace.clone(), now_ms(), position);
                self.evaluator.enqueue(key, asked);
            }
            outcome = match (ingested, outcome) {
                (Ingested::Recorded { .. }, _) | (_, Recording::Recorded) => Recording::Recorded,
                (Ingested::Duplicate, _) => Recording::Duplicate,
                (Ingested::Unchanged, previous) => previous,
            };
        }
        Ok(outcome)
    }

    /// The rejection of `fact`, if it is a webhook's pipeline claim that could open a gate
    /// and GitLab's API contradicts it.
    async fn contradiction(
        &self,
        fact: &Fact,
        keys: &[RefKey],
    ) -> Result<Option<Rejected>, StoreError> {
        let (Some(confirmer), Origin::GitLabHook, FactKind::Pipeline { sha, pipeline }) =
            (&self.confirmer, fact.origin, &fact.kind)
        else {
            return Ok(None);
        };
        let may_open = pipeline.counts_for_branch()
            && (pipeline.status == PipelineStatus::Success || !pipeline.passed_stages.is_empty());
        let Some(key) = keys.first().filter(|_| may_open) else {
            return Ok(None);
        };
        // A redelivery, or a hook that one of our own statuses caused, claims nothing new.
        let known = self
            .store
            .pipeline(key, sha, pipeline.id)
            .await?
            .is_some_and(|p| {
                p.status == pipeline.status
                    && pipeline
                        .passed_stages
                        .iter()
                        .all(|stage| p.passed_stages.contains(stage))
            });
        if known {
            return Ok(None);
        }
        let claim = Claim {
            id: pipeline.id,
            sha,
            branch: &fact.branch,
            status: pipeline.status,
        };
        let Confirmation::Contradicted(mismatch) = confirmer.confirm(&key.project, &claim).await
        else {
            return Ok(None);
        };
        warn!(%key, pipeline = pipeline.id, %mismatch, "pipeline claim rejected");
        Ok(Some(Rejected {
            sha: sha.clone(),
            pipeline_id: pipeline.id,
            reason: mismatch.to_string(),
            at_ms: now_ms(),
        }))
    }
}
