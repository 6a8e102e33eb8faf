//! The git layer: one bare mirror per repository, fetched on demand, answering the gate's
//! ancestry questions and reading the manifest files of a commit.
//!
//! Many agents deploy the same commit of the same repository, so a fetch asked for while
//! another one runs waits for it instead of starting a second one, and a manifest read is
//! shared by everyone who asks for the same (repository, commit, globs), like GitLab's kas.
//! All gix work is blocking and runs on tokio's blocking pool.
//! gix cannot repack: `upkeep` folds each mirror's packs into one with the git CLI and caps
//! the cache's size, on a schedule.
//!
//! Over https a token is offered as GitLab expects (user `oauth2`, the token as password)
//! when the server asks for credentials; it is kept in memory only, never in the mirror's
//! config, and blanked out of error messages.

mod lineage;
mod manifests;
mod mirror;
#[cfg(test)]
mod tests;
mod upkeep;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::gate::Sha;

pub use lineage::GitLineage;
pub use manifests::{ManifestFile, ManifestSet, Patterns};
pub use mirror::display_url;

use manifests::{ManifestCache, ManifestKey};
use mirror::FetchJob;

/// Caps on what one manifest read may return, as kas enforced them (per file, total, count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_file_bytes: u64,
    pub max_total_bytes: u64,
    pub max_files: usize,
    /// Tree entries (files and directories) a read may visit: a crafted tree of a few KB,
    /// whose directories list the same subtree again and again, expands to billions.
    pub max_tree_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_file_bytes: 5 * 1024 * 1024,
            max_total_bytes: 20 * 1024 * 1024,
            max_files: 1000,
            max_tree_entries: 200_000,
        }
    }
}

/// Where mirrors live, how long a fetch may take, what a manifest read may return, and how
/// the mirrors are kept up.
#[derive(Debug, Clone)]
pub struct GitSettings {
    pub cache_dir: PathBuf,
    pub fetch_timeout: Duration,
    pub limits: Limits,
    /// How often mirrors are repacked and the cache cap enforced; `None` for never.
    pub maintenance_interval: Option<Duration>,
    /// Above this many bytes, mirrors no agent needs are deleted, least recently used first.
    pub max_cache_bytes: Option<u64>,
}

/// A repository to mirror: `https://…`, `file:///…` or a local path, with an optional token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RepoSource {
    pub url: String,
    /// A file holding a GitLab token, sent as the password of user `oauth2` over https only;
    /// re-read on every fetch so that a rotated token is picked up without a restart.
    pub token_file: Option<PathBuf>,
}

/// Why a git operation failed, worded so that the user can act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GitError {
    #[error("cannot fetch {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("fetching {url} did not finish within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("commit {sha} is not in the history of any branch, even after a fetch")]
    CommitMissing { sha: Sha },
    #[error(
        "no file of the commit matches the path globs {patterns:?} (dot-directories are skipped)"
    )]
    NoMatch { patterns: Vec<String> },
    #[error("{path} has {bytes} bytes, more than the limit of {limit} bytes per file")]
    FileTooLarge {
        path: String,
        bytes: u64,
        limit: u64,
    },
    #[error("the matching files have {bytes} bytes in total, more than the limit of {limit} bytes")]
    TotalTooLarge { bytes: u64, limit: u64 },
    #[error("more than {limit} files match the path globs (git.max_files)")]
    TooManyFiles { limit: usize },
    #[error(
        "the commit's tree has more than {limit} entries outside dot-directories \
         (git.max_tree_entries); narrow the repository or raise the limit"
    )]
    TreeTooLarge { limit: usize },
    #[error("invalid path glob {pattern:?}: {message}")]
    InvalidGlob { pattern: String, message: String },
    #[error("local git mirror: {message}")]
    Repository { message: String },
}

impl GitError {
    /// Whether trying again later may succeed without anyone changing the repository or config.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. }
                | Self::Timeout { .. }
                | Self::CommitMissing { .. }
                | Self::Repository { .. }
        )
    }
}

/// Work actually done (cache hits and coalesced callers excluded), for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GitStats {
    pub fetches: u64,
    pub reads: u64,
}

/// Told how long each fetch and each manifest read actually performed took (coalesced
/// callers and cache hits excluded), as they end: how metrics time git.
pub trait GitTimer: Send + Sync {
    fn fetched(&self, took: Duration);
    fn read(&self, took: Duration);
}

/// Times nothing.
struct Untimed;

impl GitTimer for Untimed {
    fn fetched(&self, _: Duration) {}
    fn read(&self, _: Duration) {}
}

/// The mirrors of all repositories; cheap to clone, all clones share mirrors and caches.
#[derive(Clone)]
pub struct Mirrors {
    inner: Arc<Inner>,
}

struct Inner {
    settings: GitSettings,
    /// By mirror directory, which upkeep knows even for mirrors of earlier runs.
    repos: Mutex<HashMap<PathBuf, Arc<RepoState>>>,
    manifests: Mutex<ManifestCache>,
    fetches: AtomicU64,
    reads: AtomicU64,
    timer: Arc<dyn GitTimer>,
}

/// One mirror and the fetch that may be running into it.
struct RepoState {
    dir: PathBuf,
    /// Fetches started so far; a caller remembers it to recognise a fetch that began later.
    started: AtomicU64,
    /// The `started` count of the last fetch that finished: a reader of the mirror remembers
    /// it to recognise a fetch that finished after its read.
    finished: AtomicU64,
    /// Held for as long as a fetch writes into the mirror, by the fetch task itself.
    slot: Arc<tokio::sync::Mutex<FetchSlot>>,
    /// Commit generations for lineage, which never change once computed.
    generations: Arc<Mutex<lineage::Generations>>,
    /// Last use, and fetches waiting for the slot, for upkeep.
    activity: upkeep::Activity,
}

#[derive(Default)]
struct FetchSlot {
    /// The `started` count of the last fetch that finished, and how it ended.
    finished: u64,
    outcome: Option<Result<(), GitError>>,
}

impl Mirrors {
    /// Mirrors kept under `settings.cache_dir`, which is created on the first fetch.
    pub fn new(settings: GitSettings) -> Self {
        Self::with_timer(settings, Arc::new(Untimed))
    }

    /// Mirrors as [`Mirrors::new`] makes them, telling `timer` how long their work took.
    pub fn with_timer(settings: GitSettings, timer: Arc<dyn GitTimer>) -> Self {
        // gix fetches over https with reqwest, which needs the process-wide provider.
        greenlight::tls::install_ring();
        Self {
            inner: Arc::new(Inner {
                settings,
                repos: Mutex::new(HashMap::new()),
                manifests: Mutex::new(ManifestCache::default()),
                fetches: AtomicU64::new(0),
                reads: AtomicU64::new(0),
                timer,
            }),
        }
    }

    /// Fetches every branch into the mirror, cloning it first when absent.
    ///
    /// One fetch per repository at a time: a caller arriving while one runs waits for it and
    /// takes its outcome only if that fetch started after the call, since an earlier one may
    /// have missed what the caller is after. After `fetch_timeout` gix is interrupted and the
    /// caller gets [`GitError::Timeout`].
    pub async fn fetch(&self, source: &RepoSource) -> Result<(), GitError> {
        let asked = self.repo(source).started.load(Ordering::SeqCst);
        self.fetch_unless_fetched_since(source, asked).await
    }

    /// The mark of the last fetch into `source`'s mirror that finished, for
    /// [`Self::fetch_unless_fetched_since`].
    pub fn fetched(&self, source: &RepoSource) -> u64 {
        self.repo(source).finished.load(Ordering::SeqCst)
    }

    /// Fetches as [`Self::fetch`] does, unless a fetch finished after the mirror's
    /// [`Self::fetched`] mark was `seen` (one running now is waited for): what the caller
    /// read from the mirror before may be stale, but the mirror is newer than that read, so
    /// the caller looks again before anything is fetched again.
    ///
    /// An evaluation that finds the mirror behind while the fetch another evaluation asked
    /// for is running takes that fetch's outcome instead of fetching a second time.
    /// [`Self::fetch`] is this with the count of fetches started when it is called: any
    /// fetch that finishes with a later mark started after the call.
    pub async fn fetch_unless_fetched_since(
        &self,
        source: &RepoSource,
        seen: u64,
    ) -> Result<(), GitError> {
        let repo = self.repo(source);
        let timeout = self.inner.settings.fetch_timeout;
        let timed_out = || GitError::Timeout {
            url: mirror::display_url(&source.url),
            after: timeout,
        };
        // A repack holding the slot gives it up as soon as it hears of a waiting fetch.
        let waiting = repo.activity.fetch_waiting();
        let slot = tokio::time::timeout(timeout, repo.slot.clone().lock_owned())
            .await
            .map_err(|_| timed_out())?;
        drop(waiting);
        if slot.finished > seen
            && let Some(outcome) = &slot.outcome
        {
            return outcome.clone();
        }
        let generation = repo.started.fetch_add(1, Ordering::SeqCst) + 1;
        let job = FetchJob {
            dir: repo.dir.clone(),
            url: source.url.clone(),
            token_file: source.token_file.clone(),
            timeout,
        };
        let (report, outcome) = oneshot::channel();
        // The fetch is a task of its own so that a caller that goes away neither cancels it
        // halfway nor leaves the mirror locked without a deadline.
        let inner = self.inner.clone();
        tokio::spawn(run_fetch(inner, repo, job, slot, generation, report));
        outcome.await.unwrap_or_else(|_| {
            Err(GitError::Repository {
                message: "the fetch task ended without a result".into(),
            })
        })
    }

    /// Whether the mirror has commit `sha` now, without fetching; abbreviations must be unique.
    pub async fn has_commit(&self, source: &RepoSource, sha: &Sha) -> bool {
        let dir = self.repo(source).dir.clone();
        let sha = sha.clone();
        let found = blocking(move || match mirror::open(&dir)? {
            Some(repo) => mirror::resolve_commit(&repo, &sha).map(|id| id.is_some()),
            None => Ok(false),
        })
        .await;
        found.unwrap_or_else(|err| {
            let url = mirror::display_url(&source.url);
            tracing::warn!(%url, error = %err, "cannot look up a commit");
            false
        })
    }

    /// Makes sure the mirror has commit `sha`, fetching once when it does not.
    pub async fn ensure_commit(&self, source: &RepoSource, sha: &Sha) -> Result<(), GitError> {
        if self.has_commit(source, sha).await {
            return Ok(());
        }
        self.fetch(source).await?;
        if self.has_commit(source, sha).await {
            Ok(())
        } else {
            Err(GitError::CommitMissing { sha: sha.clone() })
        }
    }

    /// Ancestry of `candidates` and `anchors` as the mirror has it now, without fetching.
    ///
    /// The branch is the mirror's `refs/heads/<branch>`: a commit is on it when it is the tip
    /// or an ancestor of the tip. `descends_from` holds between any two asked-about commits.
    /// Commits the mirror lacks are on no branch and descend from nothing.
    pub async fn lineage(
        &self,
        source: &RepoSource,
        branch: &str,
        candidates: &[Sha],
        anchors: &[Sha],
    ) -> Result<GitLineage, GitError> {
        let repo = self.repo(source);
        let branch = branch.to_owned();
        let candidates = candidates.to_vec();
        let anchors = anchors.to_vec();
        blocking(move || match mirror::open(&repo.dir)? {
            Some(git) => {
                let mut generations = lock(&repo.generations);
                lineage::compute(git, &branch, &candidates, &anchors, &mut generations)
            }
            None => Ok(GitLineage::default()),
        })
        .await
    }

    /// The files of commit `sha` whose paths match `patterns` (default `**/*.{yaml,yml,json}`).
    ///
    /// `*` stays within a directory, `**` crosses directories, braces offer alternatives.
    /// Files under a directory whose name starts with `.` are skipped, and so are symlinks and
    /// submodules. The commit is fetched when needed. Concurrent callers share one read, the
    /// most recent sets stay cached, and a failed read is forgotten so that the next caller
    /// tries again.
    pub async fn manifests(
        &self,
        source: &RepoSource,
        sha: &Sha,
        patterns: &[String],
    ) -> Result<Arc<ManifestSet>, GitError> {
        let key = ManifestKey {
            url: source.url.clone(),
            sha: sha.clone(),
            patterns: Patterns::key_of(patterns),
        };
        let cell = lock(&self.inner.manifests).cell(&key);
        let outcome = cell
            .get_or_init(|| async {
                // Compiled by the one read: the callers that share it never compile.
                let patterns = Arc::new(Patterns::compile(patterns)?);
                self.read_manifests(source, sha, patterns).await
            })
            .await
            .clone();
        if outcome.is_err() {
            lock(&self.inner.manifests).forget_failed(&key, &cell);
        }
        outcome
    }

    /// Fetches and tree reads actually performed (coalesced callers and cache hits excluded).
    pub fn stats(&self) -> GitStats {
        GitStats {
            fetches: self.inner.fetches.load(Ordering::Relaxed),
            reads: self.inner.reads.load(Ordering::Relaxed),
        }
    }

    async fn read_manifests(
        &self,
        source: &RepoSource,
        sha: &Sha,
        patterns: Arc<Patterns>,
    ) -> Result<Arc<ManifestSet>, GitError> {
        self.ensure_commit(source, sha).await?;
        let dir = self.repo(source).dir.clone();
        let sha = sha.clone();
        let limits = self.inner.settings.limits;
        let inner = self.inner.clone();
        let started = Instant::now();
        let read = blocking(move || {
            inner.reads.fetch_add(1, Ordering::Relaxed);
            let repo = mirror::open(&dir)?.ok_or_else(|| GitError::Repository {
                message: format!("mirror {} vanished", dir.display()),
            })?;
            let commit = mirror::resolve_commit(&repo, &sha)?
                .ok_or_else(|| GitError::CommitMissing { sha: sha.clone() })?;
            manifests::read(&repo, commit, &patterns, limits).map(Arc::new)
        })
        .await;
        self.inner.timer.read(started.elapsed());
        read
    }

    /// The mirror of `source`, marked as used now.
    fn repo(&self, source: &RepoSource) -> Arc<RepoState> {
        let repo = self.repo_at(mirror::mirror_dir(
            &self.inner.settings.cache_dir,
            &source.url,
        ));
        repo.activity.used();
        repo
    }

    fn repo_at(&self, dir: PathBuf) -> Arc<RepoState> {
        let mut repos = lock(&self.inner.repos);
        repos
            .entry(dir)
            .or_insert_with_key(|dir| {
                Arc::new(RepoState {
                    dir: dir.clone(),
                    started: AtomicU64::new(0),
                    finished: AtomicU64::new(0),
                    slot: Arc::new(tokio::sync::Mutex::new(FetchSlot::default())),
                    generations: Arc::default(),
                    activity: upkeep::Activity::default(),
                })
            })
            .clone()
    }
}

/// Runs one fetch while owning the mirror's slot, reporting to the caller as soon as the
/// outcome is known but keeping the slot until gix stopped writing (or gave up on it).
async fn run_fetch(
    inner: Arc<Inner>,
    repo: Arc<RepoState>,
    job: FetchJob,
    mut slot: tokio::sync::OwnedMutexGuard<FetchSlot>,
    generation: u64,
    report: oneshot::Sender<Result<(), GitError>>,
) {
    let interrupt = Arc::new(AtomicBool::new(false));
    let url = mirror::display_url(&job.url);
    let after = job.timeout;
    inner.fetches.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let mut work = tokio::task::spawn_blocking({
        let interrupt = interrupt.clone();
        move || mirror::fetch(&job, &interrupt)
    });
    let outcome = match tokio::time::timeout(after, &mut work).await {
        Ok(joined) => joined.unwrap_or_else(|err| Err(panicked(err))),
        Err(_) => {
            inner.timer.fetched(started.elapsed());
            interrupt.store(true, Ordering::SeqCst);
            let timed_out = GitError::Timeout {
                url: url.clone(),
                after,
            };
            let _ = report.send(Err(timed_out.clone()));
            // The next fetch must not write into the mirror before gix noticed the interrupt,
            // but a fetch stuck in a read that never returns must not lock it for good either.
            if tokio::time::timeout(after, work).await.is_err() {
                tracing::warn!(%url, "an interrupted fetch is still running; unlocking the mirror");
            }
            slot.finished = generation;
            slot.outcome = Some(Err(timed_out));
            repo.finished.store(generation, Ordering::SeqCst);
            return;
        }
    };
    inner.timer.fetched(started.elapsed());
    if let Err(err) = &outcome {
        tracing::warn!(%url, error = %err, "fetch failed");
    }
    slot.finished = generation;
    slot.outcome = Some(outcome.clone());
    repo.finished.store(generation, Ordering::SeqCst);
    drop(slot);
    let _ = report.send(outcome);
}

/// Runs blocking gix work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, GitError> + Send + 'static,
) -> Result<T, GitError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|err| Err(panicked(err)))
}

fn panicked(err: tokio::task::JoinError) -> GitError {
    GitError::Repository {
        message: format!("git task failed: {err}"),
    }
}

/// A poisoned lock only means another caller panicked; the maps stay consistent.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
