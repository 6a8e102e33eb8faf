//! Confirming a webhook's pipeline claim through GitLab's API before it may open a gate:
//! a leaked webhook secret alone then cannot deploy a commit whose pipeline never passed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tracing::warn;

use super::api::{ApiJob, ApiPipeline, GitLab};
use crate::gate::{PipelineStatus, Sha};

/// Confirmations remembered; past this the memory starts over (redeliveries are recent).
const CACHE_ENTRIES: usize = 4096;

/// How long a webhook waits for GitLab's API to confirm its claim: within the 8 s the hook
/// has, after up to 4 s of preview requests. A slower API counts as unavailable, lest its
/// slowness fail the hook, which GitLab never redelivers.
const CONFIRM_BUDGET: Duration = Duration::from_millis(2500);

/// What a webhook claims about one pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim<'a> {
    pub id: u64,
    pub sha: &'a Sha,
    pub branch: &'a str,
    pub status: PipelineStatus,
}

/// How GitLab's answer contradicts a claim.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("GitLab has no pipeline {0}")]
    NotFound(u64),
    #[error("GitLab says pipeline {id} is for commit {actual}, not {claimed}")]
    Sha {
        id: u64,
        claimed: String,
        actual: String,
    },
    #[error("GitLab says pipeline {id} ran on ref {actual}, not {claimed}")]
    Ref {
        id: u64,
        claimed: String,
        actual: String,
    },
    #[error("GitLab says pipeline {id} is {actual}, not {claimed}")]
    Status {
        id: u64,
        claimed: PipelineStatus,
        actual: String,
    },
}

/// Whether GitLab's view of the pipeline (`None`: it has none) agrees with `claim`.
pub fn compare(claim: &Claim<'_>, api: Option<&ApiPipeline>) -> Result<(), Mismatch> {
    let id = claim.id;
    let api = api.ok_or(Mismatch::NotFound(id))?;
    if !api.sha.eq_ignore_ascii_case(claim.sha.as_str()) {
        return Err(Mismatch::Sha {
            id,
            claimed: claim.sha.to_string(),
            actual: api.sha.clone(),
        });
    }
    let api_branch = api
        .git_ref
        .strip_prefix("refs/heads/")
        .unwrap_or(&api.git_ref);
    if api_branch != claim.branch {
        return Err(Mismatch::Ref {
            id,
            claimed: claim.branch.to_owned(),
            actual: api.git_ref.clone(),
        });
    }
    if PipelineStatus::parse(&api.status).ok() != Some(claim.status) {
        return Err(Mismatch::Status {
            id,
            claimed: claim.status,
            actual: api.status.clone(),
        });
    }
    Ok(())
}

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    Confirmed,
    Contradicted(Mismatch),
    /// GitLab could not be asked. The claim came with the project's webhook secret, and
    /// catch-up reads the API again later: holding every deploy while GitLab's API is down
    /// would make its outage ours.
    Unavailable,
}

type CacheKey = (String, u64, Sha, String, PipelineStatus);

/// Asks GitLab about pipeline claims, remembering what it confirmed.
pub struct PipelineConfirmer {
    gitlab: GitLab,
    confirmed: Mutex<HashMap<CacheKey, ()>>,
}

impl PipelineConfirmer {
    /// Confirms claims through `gitlab`.
    pub fn new(gitlab: GitLab) -> Self {
        Self {
            gitlab,
            confirmed: Mutex::new(HashMap::new()),
        }
    }

    /// Checks `claim` about `project` (as the agents spell it; the API takes a path or an id).
    pub async fn confirm(&self, project: &str, claim: &Claim<'_>) -> Confirmation {
        self.confirm_within(project, claim, CONFIRM_BUDGET).await
    }

    /// [`Self::confirm`], taking GitLab for unavailable after `budget`.
    async fn confirm_within(
        &self,
        project: &str,
        claim: &Claim<'_>,
        budget: Duration,
    ) -> Confirmation {
        match tokio::time::timeout(budget, self.ask(project, claim)).await {
            Ok(confirmation) => confirmation,
            Err(_) => {
                warn!(
                    project,
                    pipeline = claim.id,
                    budget = ?budget,
                    "GitLab did not confirm a pipeline in time; taking it as unavailable"
                );
                Confirmation::Unavailable
            }
        }
    }

    async fn ask(&self, project: &str, claim: &Claim<'_>) -> Confirmation {
        let key: CacheKey = (
            project.to_owned(),
            claim.id,
            claim.sha.clone(),
            claim.branch.to_owned(),
            claim.status,
        );
        if self.lock().contains_key(&key) {
            return Confirmation::Confirmed;
        }
        let api = match self.gitlab.pipeline(project, claim.id).await {
            Ok(api) => api,
            Err(error) => {
                warn!(%error, project, pipeline = claim.id, "cannot confirm a pipeline with GitLab");
                return Confirmation::Unavailable;
            }
        };
        let mut verdict = compare(claim, api.as_ref());
        // Our own statuses join the pipeline and change its status on GitLab, while the hook's
        // status was recomputed without them: then the CI jobs, which exclude every commit
        // status, must give the claimed status.
        if let Err(Mismatch::Status { .. }) = verdict {
            match self.gitlab.pipeline_jobs(project, claim.id).await {
                Ok(jobs) => {
                    if ApiJob::pipeline_status(&jobs) == Some(claim.status) {
                        verdict = Ok(());
                    }
                }
                Err(error) => {
                    warn!(%error, project, pipeline = claim.id, "cannot read a pipeline's jobs");
                    return Confirmation::Unavailable;
                }
            }
        }
        match verdict {
            Ok(()) => {
                let mut cache = self.lock();
                if cache.len() >= CACHE_ENTRIES {
                    cache.clear();
                }
                cache.insert(key, ());
                Confirmation::Confirmed
            }
            Err(mismatch) => Confirmation::Contradicted(mismatch),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, ()>> {
        // A set of confirmations stays valid under a poisoned lock.
        self.confirmed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Json;
    use axum::extract::Path;
    use axum::routing::get;
    use serde_json::json;

    use super::*;

    fn api(sha: &str, git_ref: &str, status: &str) -> ApiPipeline {
        ApiPipeline {
            id: 7,
            sha: sha.into(),
            git_ref: git_ref.into(),
            status: status.into(),
            source: Some("push".into()),
            updated_at: None,
        }
    }

    #[test]
    fn a_claim_must_agree_with_gitlab_on_sha_ref_and_status() {
        let sha = Sha::parse(&"a".repeat(40)).unwrap();
        let claim = Claim {
            id: 7,
            sha: &sha,
            branch: "main",
            status: PipelineStatus::Success,
        };
        let a = "a".repeat(40);
        assert_eq!(compare(&claim, Some(&api(&a, "main", "success"))), Ok(()));
        assert_eq!(
            compare(
                &claim,
                Some(&api(&a.to_uppercase(), "refs/heads/main", "success"))
            ),
            Ok(())
        );
        assert_eq!(compare(&claim, None), Err(Mismatch::NotFound(7)));
        let b = "b".repeat(40);
        assert!(matches!(
            compare(&claim, Some(&api(&b, "main", "success"))),
            Err(Mismatch::Sha { .. })
        ));
        assert!(matches!(
            compare(&claim, Some(&api(&a, "feature", "success"))),
            Err(Mismatch::Ref { .. })
        ));
        let failed = compare(&claim, Some(&api(&a, "main", "failed"))).unwrap_err();
        assert_eq!(
            failed.to_string(),
            "GitLab says pipeline 7 is failed, not success"
        );
    }

    /// A GitLab whose every pipeline is a success of `sha` on main, made of one successful CI job,
    /// counting the pipeline reads it answers.
    async fn counting_gitlab(
        sha: String,
    ) -> (GitLab, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let app = axum::Router::new()
            .route(
                "/api/v4/projects/{project}/pipelines/{id}",
                get(move |Path((_, id)): Path<(String, u64)>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let sha = sha.clone();
                    async move {
                        Json(json!({ "id": id, "sha": sha, "ref": "main", "status": "success" }))
                    }
                }),
            )
            .route(
                "/api/v4/projects/{project}/pipelines/{id}/jobs",
                get(|| async { Json(json!([{ "status": "success", "allow_failure": false }])) }),
            )
            .route(
                "/api/v4/projects/{project}/pipelines/{id}/bridges",
                get(|| async { Json(json!([])) }),
            );
        let (gitlab, server) = crate::gitlab::api::serving(app).await;
        (gitlab, asked, server)
    }

    #[tokio::test]
    async fn a_gitlab_slower_than_the_budget_counts_as_unavailable() {
        let app = axum::Router::new().route(
            "/api/v4/projects/{project}/pipelines/{id}",
            // It would confirm the claim, too late.
            get(|| async {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                Json(json!({ "id": 7, "sha": "a".repeat(40), "ref": "main", "status": "success" }))
            }),
        );
        let (gitlab, server) = crate::gitlab::api::serving(app).await;
        let sha = Sha::parse(&"a".repeat(40)).unwrap();
        let claim = Claim {
            id: 7,
            sha: &sha,
            branch: "main",
            status: PipelineStatus::Success,
        };
        let confirmer = PipelineConfirmer::new(gitlab);
        let within = |budget| confirmer.confirm_within("42", &claim, budget);
        assert_eq!(
            within(std::time::Duration::from_millis(200)).await,
            Confirmation::Unavailable
        );
        assert_eq!(
            within(std::time::Duration::from_secs(10)).await,
            Confirmation::Confirmed
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_confirmation_is_served_from_the_cache() {
        let sha = Sha::parse(&"a".repeat(40)).unwrap();
        let (gitlab, asked, server) = counting_gitlab(sha.to_string()).await;
        let confirmer = PipelineConfirmer::new(gitlab);
        let claim = |id, status| Claim {
            id,
            sha: &sha,
            branch: "main",
            status,
        };
        let success = claim(7, PipelineStatus::Success);
        assert_eq!(
            confirmer.confirm("42", &success).await,
            Confirmation::Confirmed
        );
        assert_eq!(
            confirmer.confirm("42", &success).await,
            Confirmation::Confirmed
        );
        assert_eq!(
            asked.load(Ordering::SeqCst),
            1,
            "the second answer came from the cache"
        );

        // Another pipeline, or another project's, is asked about.
        let other = claim(8, PipelineStatus::Success);
        assert_eq!(
            confirmer.confirm("42", &other).await,
            Confirmation::Confirmed
        );
        assert_eq!(
            confirmer.confirm("43", &success).await,
            Confirmation::Confirmed
        );
        assert_eq!(asked.load(Ordering::SeqCst), 3);

        // A claim GitLab contradicts is never remembered: each repetition is asked again.
        let failed = claim(7, PipelineStatus::Failed);
        for _ in 0..2 {
            assert!(matches!(
                confirmer.confirm("42", &failed).await,
                Confirmation::Contradicted(Mismatch::Status { .. })
            ));
        }
        assert_eq!(asked.load(Ordering::SeqCst), 5);
        server.abort();
    }
}
