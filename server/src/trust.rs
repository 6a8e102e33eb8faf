//! Who may state facts about which project, and which claims are too implausible to record.
//! Pure decisions: the HTTP and gRPC edges ask, and render the refusals.

use std::collections::BTreeMap;

use crate::config::{Secret, TokenHash};

/// Pipeline ids above this are refused: GitLab.com is near 10^10, and 2^53 − 1 is the
/// largest integer every JSON reader keeps exact. The highest id is a commit's verdict, so
/// an absurd id would otherwise win over every real retry.
pub const MAX_PIPELINE_ID: u64 = (1 << 53) - 1;
/// Pipeline times before 2000-01-01T00:00:00Z are refused: no CI result is that old.
pub const EARLIEST_TIME_MS: i64 = 946_684_800_000;
/// How far a pipeline time may lie ahead of the server clock (clock skew between GitLab and
/// us); a result "finished" later would win over every real update of that pipeline.
pub const MAX_FUTURE_MS: i64 = 5 * 60 * 1000;

/// Jobs one Pipeline Hook may list: GitLab's own pipelines stay far below.
pub const MAX_JOBS: usize = 5000;
/// Stages one pipeline may have passed, each at most [`MAX_STAGE_BYTES`] long: they are
/// stored with the pipeline, so their size is bounded with it.
pub const MAX_STAGES: usize = 256;
pub const MAX_STAGE_BYTES: usize = 255;

/// Refuses more jobs than [`MAX_JOBS`].
pub fn check_jobs(count: usize) -> Result<(), Implausible> {
    if count > MAX_JOBS {
        return Err(Implausible::TooManyJobs(count));
    }
    Ok(())
}

/// Refuses more stages than [`MAX_STAGES`] or a stage name over [`MAX_STAGE_BYTES`].
pub fn check_stages<'a>(stages: impl IntoIterator<Item = &'a str>) -> Result<(), Implausible> {
    let mut count = 0usize;
    for stage in stages {
        count += 1;
        if stage.len() > MAX_STAGE_BYTES {
            return Err(Implausible::StageTooLong(stage.len()));
        }
    }
    if count > MAX_STAGES {
        return Err(Implausible::TooManyStages(count));
    }
    Ok(())
}

/// Bytes a pipeline's source or a delivery id may have: both are stored, the id in a key.
pub const MAX_LABEL_BYTES: usize = 255;

/// Refuses `value` of `field` over [`MAX_LABEL_BYTES`].
pub fn check_label(field: &'static str, value: &str) -> Result<(), Implausible> {
    if value.len() > MAX_LABEL_BYTES {
        return Err(Implausible::TooLong {
            field,
            bytes: value.len(),
        });
    }
    Ok(())
}

/// A pipeline claim outside plausible bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Implausible {
    #[error("pipeline id must be at least 1")]
    ZeroId,
    #[error("{0} jobs, more than the {MAX_JOBS} a pipeline may list")]
    TooManyJobs(usize),
    #[error("{0} stages, more than the {MAX_STAGES} a pipeline may have")]
    TooManyStages(usize),
    #[error("a stage name of {0} bytes, more than {MAX_STAGE_BYTES}")]
    StageTooLong(usize),
    #[error("{field} of {bytes} bytes, more than {MAX_LABEL_BYTES}")]
    TooLong { field: &'static str, bytes: usize },
    #[error("pipeline id {0} is above {MAX_PIPELINE_ID}, far beyond any real pipeline")]
    IdTooLarge(u64),
    #[error("{field} {at} is before 2000-01-01")]
    TooEarly { field: &'static str, at: String },
    #[error(
        "{field} {at} is {ahead_s}s ahead of the server clock (at most {}s allowed)",
        MAX_FUTURE_MS / 1000
    )]
    InFuture {
        field: &'static str,
        at: String,
        ahead_s: i64,
    },
}

/// Refuses a pipeline id outside `1..=MAX_PIPELINE_ID`.
pub fn check_pipeline_id(id: u64) -> Result<(), Implausible> {
    match id {
        0 => Err(Implausible::ZeroId),
        id if id > MAX_PIPELINE_ID => Err(Implausible::IdTooLarge(id)),
        _ => Ok(()),
    }
}

/// Refuses a time `field` claims (Unix ms) before 2000 or more than `MAX_FUTURE_MS` after
/// `now_ms`.
pub fn check_time(field: &'static str, at_ms: i64, now_ms: i64) -> Result<(), Implausible> {
    let render = || crate::clock::rfc3339(at_ms).unwrap_or_else(|| format!("{at_ms} ms"));
    if at_ms < EARLIEST_TIME_MS {
        return Err(Implausible::TooEarly {
            field,
            at: render(),
        });
    }
    let ahead = at_ms.saturating_sub(now_ms);
    if ahead > MAX_FUTURE_MS {
        return Err(Implausible::InFuture {
            field,
            at: render(),
            ahead_s: ahead / 1000,
        });
    }
    Ok(())
}

/// The project a delivery claims to be about, as GitLab names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed<'a> {
    pub path: Option<&'a str>,
    pub id: Option<u64>,
}

/// Why a webhook delivery is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookRefused {
    #[error("X-Gitlab-Token does not match the secret of project {0}")]
    ProjectSecret(String),
    #[error("X-Gitlab-Token does not match the configured secret")]
    GlobalSecret,
    #[error(
        "project {0} has no webhook secret of its own and no global secret_token is configured"
    )]
    NoSecretFor(String),
    #[error("X-Gitlab-Token matches no configured secret")]
    NoMatch,
    #[error(
        "X-Gitlab-Token is the secret of another project named in the body; it does not speak for {0}"
    )]
    NotTheirs(String),
}

/// GitLab webhook secrets: one per project, and a global one for the projects without.
#[derive(Debug, Clone, Default)]
pub struct WebhookSecrets {
    pub global: Option<Secret>,
    /// By project as the agents' `project` spells it: a path or a numeric id.
    pub projects: BTreeMap<String, Secret>,
}

impl WebhookSecrets {
    /// Whether any secret is configured, that is whether webhooks are enabled.
    pub fn enabled(&self) -> bool {
        self.global.is_some() || !self.projects.is_empty()
    }

    /// Whether some project has a secret of its own, so that which secret applies depends
    /// on the project a body names.
    pub fn by_project(&self) -> bool {
        !self.projects.is_empty()
    }

    /// Whether `token` may deliver an event about `claimed` (`None`: the body names no
    /// project, and is refused later as malformed if the token is good for anything);
    /// `watched` says whether agents watch a project, by path or id.
    ///
    /// Every per-project secret the claim matches, by path or by id, must match: a sender
    /// holding project B's secret cannot name B's id with another project's path. Nor with
    /// the path of a watched project that has no secret of its own: that part of the claim
    /// needs the global secret too.
    pub fn check(
        &self,
        claimed: Option<Claimed<'_>>,
        token: &str,
        watched: impl Fn(&str) -> bool,
    ) -> Result<(), HookRefused> {
        let Some(claimed) = claimed else {
            let any = self.global.iter().chain(self.projects.values());
            // Each secret is compared, so the answer time does not tell which one matched.
            let matched = any.fold(false, |found, secret| secret.matches(token) | found);
            return if matched {
                Ok(())
            } else {
                Err(HookRefused::NoMatch)
            };
        };
        let id = claimed.id.map(|id| id.to_string());
        let own: Vec<(&String, &Secret)> = self
            .projects
            .iter()
            .filter(|(key, _)| Some(key.as_str()) == claimed.path || Some(*key) == id.as_ref())
            .collect();
        if !own.is_empty() {
            if let Some((project, _)) = own.iter().find(|(_, secret)| !secret.matches(token)) {
                return Err(HookRefused::ProjectSecret((*project).clone()));
            }
            // A part naming no watched project leads to no fact, so a hook's numeric id may
            // stay unconfigured next to the path its secret is keyed by.
            let uncovered = [claimed.path, id.as_deref()]
                .into_iter()
                .flatten()
                .filter(|part| !self.projects.contains_key(*part) && watched(part));
            for part in uncovered {
                match &self.global {
                    Some(secret) if secret.matches(token) => {}
                    Some(_) => return Err(HookRefused::NotTheirs(part.to_owned())),
                    None => return Err(HookRefused::NoSecretFor(part.to_owned())),
                }
            }
            return Ok(());
        }
        match &self.global {
            Some(secret) if secret.matches(token) => Ok(()),
            Some(_) => Err(HookRefused::GlobalSecret),
            None => Err(HookRefused::NoSecretFor(
                claimed.path.map(str::to_owned).or(id).unwrap_or_default(),
            )),
        }
    }
}

/// One ingest token and the projects it may state facts about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestToken {
    pub hash: TokenHash,
    /// `None`: every project (the unscoped `ingest.token_sha256`).
    pub projects: Option<Vec<String>>,
}

/// Why an ingest request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestRefused {
    #[error("the ingest API is disabled: no ingest.token_sha256 or ingest.tokens is configured")]
    Disabled,
    #[error("invalid ingest token")]
    UnknownToken,
    #[error("this ingest token may not record facts about project {project}; it is scoped to {}", allowed.join(", "))]
    OutOfScope {
        project: String,
        allowed: Vec<String>,
    },
}

impl IngestRefused {
    /// Whether the caller is unknown (rather than known but not allowed).
    pub fn unauthenticated(&self) -> bool {
        !matches!(self, Self::OutOfScope { .. })
    }
}

/// Admits `token` to record facts about `project` (as the agents' `project` spells it).
pub fn authorize_ingest(
    tokens: &[IngestToken],
    token: &str,
    project: &str,
) -> Result<(), IngestRefused> {
    if tokens.is_empty() {
        return Err(IngestRefused::Disabled);
    }
    let known = tokens
        .iter()
        .find(|t| t.hash.matches(token))
        .ok_or(IngestRefused::UnknownToken)?;
    match &known.projects {
        None => Ok(()),
        Some(allowed) if allowed.iter().any(|p| p == project) => Ok(()),
        Some(allowed) => Err(IngestRefused::OutOfScope {
            project: project.to_owned(),
            allowed: allowed.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_and_stages_are_bounded() {
        assert!(check_jobs(MAX_JOBS).is_ok());
        assert_eq!(
            check_jobs(MAX_JOBS + 1),
            Err(Implausible::TooManyJobs(MAX_JOBS + 1))
        );
        let names: Vec<String> = (0..=MAX_STAGES).map(|i| format!("s{i}")).collect();
        assert_eq!(
            check_stages(names.iter().map(String::as_str)),
            Err(Implausible::TooManyStages(MAX_STAGES + 1))
        );
        assert!(check_stages(names[..MAX_STAGES].iter().map(String::as_str)).is_ok());
        let long = "x".repeat(MAX_STAGE_BYTES + 1);
        assert_eq!(
            check_stages([long.as_str()]),
            Err(Implausible::StageTooLong(MAX_STAGE_BYTES + 1))
        );
    }

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn ids_must_be_positive_and_sane() {
        assert_eq!(check_pipeline_id(0), Err(Implausible::ZeroId));
        assert!(check_pipeline_id(1).is_ok());
        assert!(check_pipeline_id(MAX_PIPELINE_ID).is_ok());
        assert_eq!(
            check_pipeline_id(9_000_000_000_000_000_000),
            Err(Implausible::IdTooLarge(9_000_000_000_000_000_000))
        );
    }

    #[test]
    fn times_must_lie_between_2000_and_a_little_after_now() {
        assert!(check_time("finished_at", NOW, NOW).is_ok());
        assert!(check_time("finished_at", NOW + MAX_FUTURE_MS, NOW).is_ok());
        assert!(check_time("finished_at", EARLIEST_TIME_MS, NOW).is_ok());
        let err = check_time("finished_at", NOW + MAX_FUTURE_MS + 1000, NOW).unwrap_err();
        assert!(
            matches!(err, Implausible::InFuture { ahead_s: 301, .. }),
            "{err}"
        );
        // 2100-01-01, the forged result of the review.
        let err = check_time("finished_at", 4_102_444_800_000, NOW).unwrap_err();
        assert!(err.to_string().contains("2100-01-01T00:00:00Z"), "{err}");
        let err = check_time("finished_at", 0, NOW).unwrap_err();
        assert!(err.to_string().contains("before 2000"), "{err}");
        assert!(check_time("x", i64::MIN, NOW).is_err());
        assert!(check_time("x", i64::MAX, NOW).is_err());
    }

    fn secrets(global: Option<&str>, projects: &[(&str, &str)]) -> WebhookSecrets {
        WebhookSecrets {
            global: global.map(Secret::new),
            projects: projects
                .iter()
                .map(|(p, s)| ((*p).to_owned(), Secret::new(*s)))
                .collect(),
        }
    }

    fn claim(path: Option<&'static str>, id: Option<u64>) -> Option<Claimed<'static>> {
        Some(Claimed { path, id })
    }

    #[test]
    fn a_project_with_its_own_secret_accepts_only_that_secret() {
        let s = secrets(Some("global"), &[("g/prod", "prod-secret")]);
        assert!(
            s.check(claim(Some("g/prod"), Some(1)), "prod-secret", |_| false)
                .is_ok()
        );
        assert_eq!(
            s.check(claim(Some("g/prod"), Some(1)), "global", |_| false),
            Err(HookRefused::ProjectSecret("g/prod".into()))
        );
        // Other projects use the global secret, and only it.
        assert!(
            s.check(claim(Some("g/other"), Some(2)), "global", |_| false)
                .is_ok()
        );
        assert_eq!(
            s.check(claim(Some("g/other"), Some(2)), "prod-secret", |_| false),
            Err(HookRefused::GlobalSecret)
        );
    }

    #[test]
    fn every_secret_the_claim_names_must_match() {
        let s = secrets(None, &[("g/prod", "prod-secret"), ("7", "b-secret")]);
        // B's secret, B's id, prod's path: refused.
        assert_eq!(
            s.check(claim(Some("g/prod"), Some(7)), "b-secret", |_| false),
            Err(HookRefused::ProjectSecret("g/prod".into()))
        );
        assert!(
            s.check(claim(Some("g/b"), Some(7)), "b-secret", |_| false)
                .is_ok()
        );
        assert!(s.check(claim(None, Some(7)), "b-secret", |_| false).is_ok());
        assert_eq!(
            s.check(claim(Some("g/none"), Some(9)), "b-secret", |_| false),
            Err(HookRefused::NoSecretFor("g/none".into()))
        );
    }

    /// A project's own secret speaks for it alone: a body that names its id next to the
    /// path of a watched project guarded by the global secret needs that secret too. A part
    /// of the claim no agent watches changes nothing.
    #[test]
    fn a_projects_secret_does_not_speak_for_a_watched_project_without_one() {
        let s = secrets(Some("global"), &[("7", "prod-secret")]);
        let watched = |project: &str| project == "g/dev";
        assert_eq!(
            s.check(claim(Some("g/dev"), Some(7)), "prod-secret", watched),
            Err(HookRefused::NotTheirs("g/dev".into()))
        );
        assert_eq!(
            s.check(claim(Some("g/dev"), Some(7)), "global", watched),
            Err(HookRefused::ProjectSecret("7".into()))
        );
        assert!(
            s.check(claim(Some("g/prod"), Some(7)), "prod-secret", watched)
                .is_ok()
        );
        // The other way round: the path has a secret, the id names a watched project.
        let s = secrets(Some("global"), &[("g/prod", "prod-secret")]);
        let watched = |project: &str| project == "42";
        assert_eq!(
            s.check(claim(Some("g/prod"), Some(42)), "prod-secret", watched),
            Err(HookRefused::NotTheirs("42".into()))
        );
        // Without a global secret nothing speaks for the unguarded project.
        let s = secrets(None, &[("g/prod", "prod-secret")]);
        assert_eq!(
            s.check(claim(Some("g/prod"), Some(42)), "prod-secret", watched),
            Err(HookRefused::NoSecretFor("42".into()))
        );
        // One token that is both secrets speaks for both.
        let s = secrets(Some("shared"), &[("g/prod", "shared")]);
        assert!(
            s.check(claim(Some("g/prod"), Some(42)), "shared", watched)
                .is_ok()
        );
        let keyed_by_path = secrets(None, &[("g/prod", "prod-secret")]);
        let watched = |project: &str| project == "g/prod";
        assert!(
            keyed_by_path
                .check(claim(Some("g/prod"), Some(42)), "prod-secret", watched)
                .is_ok(),
            "the hook's id, which no agent names, needs no secret"
        );
    }

    #[test]
    fn a_body_without_a_project_needs_some_valid_secret() {
        let s = secrets(None, &[("g/prod", "prod-secret")]);
        assert!(s.check(None, "prod-secret", |_| false).is_ok());
        assert_eq!(s.check(None, "guess", |_| false), Err(HookRefused::NoMatch));
        assert!(!WebhookSecrets::default().enabled());
        assert!(s.enabled());
    }

    #[test]
    fn ingest_tokens_may_be_scoped_to_projects() {
        let tokens = [
            IngestToken {
                hash: TokenHash::of("all"),
                projects: None,
            },
            IngestToken {
                hash: TokenHash::of("scoped"),
                projects: Some(vec!["g/app".into(), "42".into()]),
            },
        ];
        assert!(authorize_ingest(&tokens, "all", "g/prod").is_ok());
        assert!(authorize_ingest(&tokens, "scoped", "g/app").is_ok());
        assert!(authorize_ingest(&tokens, "scoped", "42").is_ok());
        let err = authorize_ingest(&tokens, "scoped", "g/prod").unwrap_err();
        assert!(!err.unauthenticated());
        assert!(err.to_string().contains("g/prod"), "{err}");
        assert_eq!(
            authorize_ingest(&tokens, "nope", "g/app"),
            Err(IngestRefused::UnknownToken)
        );
        assert_eq!(
            authorize_ingest(&[], "all", "g/app"),
            Err(IngestRefused::Disabled)
        );
    }
}
