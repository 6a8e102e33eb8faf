//! Upkeep of the mirrors on a schedule: gix writes one pack per fetch and cannot repack, so
//! `git repack` folds each mirror's packs into one, and while the cache is above
//! `git.max_cache_bytes` the least recently used mirrors that no agent needs are deleted.
//!
//! Why this is safe next to the rest of the git layer:
//! - A fetch and upkeep never touch the same mirror at the same time: upkeep holds the
//!   mirror's fetch slot, and a fetch that arrives meanwhile makes it stop at once (the git
//!   process group is killed), so a fetch waits moments, never for a repack.
//! - Readers (lineage, manifest reads) do not take the slot and may read during a repack:
//!   `git repack -d` moves the new pack in place before it deletes the old ones, and gix, like
//!   git, lists the packs again when one it knew has vanished.
//! - Nothing is pruned (`--keep-unreachable`): a pinned commit may have left every branch,
//!   and no fetch would bring it back.
//! - A killed repack leaves the old packs in place; its temporary files are removed later.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use greenlight::backoff::{Backoff, jittered};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Mirrors, RepoSource, RepoState, mirror};

/// The first pass waits this long after start (or one interval, if shorter): the fetches
/// that warm the mirrors at start come first.
const FIRST_PASS_AFTER: Duration = Duration::from_secs(300);
/// The first retry after a failed or interrupted pass; doubles up to the interval.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// A repack taking longer is killed and retried.
pub(super) const REPACK_TIMEOUT: Duration = Duration::from_secs(600);
/// Temporary files and directories this old belong to no running git or gix.
const LEFTOVER_AFTER: Duration = Duration::from_secs(3600);
/// Where a mirror's last use is kept across restarts, as the file's modification time.
const LAST_USED_FILE: &str = "greenlight-last-used";
/// How much of git's standard error a failure message quotes.
const STDERR_LIMIT: u64 = 4096;

/// What upkeep needs to know of one mirror's use: when this process last fetched or read
/// it, and whether a fetch waits for its slot.
#[derive(Default)]
pub(super) struct Activity {
    /// Milliseconds since the epoch; 0 when this process never used the mirror.
    last_used_ms: AtomicU64,
    fetches_waiting: AtomicUsize,
    fetch_arrived: Notify,
}

impl Activity {
    pub(super) fn used(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, crate::clock::millis);
        self.last_used_ms.fetch_max(now, Ordering::Relaxed);
    }

    fn last_used(&self) -> Option<SystemTime> {
        match self.last_used_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => UNIX_EPOCH.checked_add(Duration::from_millis(ms)),
        }
    }

    /// Announces a fetch waiting for the mirror's slot until the guard is dropped: a repack
    /// holding the slot stops for it.
    pub(super) fn fetch_waiting(&self) -> FetchWaiting<'_> {
        self.fetches_waiting.fetch_add(1, Ordering::SeqCst);
        self.fetch_arrived.notify_waiters();
        FetchWaiting(self)
    }
}

pub(super) struct FetchWaiting<'a>(&'a Activity);

impl Drop for FetchWaiting<'_> {
    fn drop(&mut self) {
        self.0.fetches_waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What one pass did to one mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum MirrorUpkeep {
    /// At most one pack: nothing to repack.
    Compact,
    /// Its `packs` packs became one.
    Repacked {
        packs: usize,
    },
    /// A fetch of the mirror or shutdown came first; the repack is tried again later.
    Interrupted,
    /// `git` is not on `PATH`: mirrors are not repacked at all.
    NoGit,
    Failed {
        message: String,
    },
    /// Deleted to bring the cache under `git.max_cache_bytes`.
    Removed {
        bytes: u64,
    },
}

/// What one pass did, mirror by mirror, and what the cache holds after it.
#[derive(Debug, Default)]
pub(super) struct UpkeepReport {
    pub mirrors: Vec<(PathBuf, MirrorUpkeep)>,
    /// The bytes of all mirrors after the pass.
    pub cache_bytes: u64,
    /// When the cache stays above `git.max_cache_bytes`: the mirrors left, which agents
    /// need (or which could not be deleted).
    pub over_cap: Vec<String>,
}

impl UpkeepReport {
    /// Whether some work is left that a retry soon may do.
    fn unfinished(&self) -> bool {
        self.mirrors.iter().any(|(_, outcome)| {
            matches!(
                outcome,
                MirrorUpkeep::Interrupted | MirrorUpkeep::Failed { .. }
            )
        })
    }
}

/// The mirrors configured agents need, which the cache cap never deletes, by their names in
/// logs (the display url).
#[derive(Debug, Default, Clone)]
pub(super) struct Needed(HashMap<PathBuf, String>);

impl Mirrors {
    /// Upkeep every `git.maintenance_interval` until `shutdown`; returns at once when it is
    /// off. `needed` answers, at each pass, the repositories of the agents (which change at
    /// runtime): their mirrors are never deleted.
    pub fn upkeep(
        &self,
        needed: impl Fn() -> Vec<RepoSource> + Send + 'static,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let mirrors = self.clone();
        let interval = self.inner.settings.maintenance_interval;
        async move {
            let Some(interval) = interval else {
                debug!("git mirror upkeep is off");
                return;
            };
            mirrors.upkeep_every(interval, needed, &shutdown).await;
        }
        .instrument(info_span!("git_upkeep"))
    }

    pub(super) fn needed(&self, sources: impl IntoIterator<Item = RepoSource>) -> Needed {
        let cache_dir = &self.inner.settings.cache_dir;
        Needed(
            sources
                .into_iter()
                .map(|source| {
                    let dir = mirror::mirror_dir(cache_dir, &source.url);
                    (dir, mirror::display_url(&source.url))
                })
                .collect(),
        )
    }

    async fn upkeep_every(
        &self,
        interval: Duration,
        needed: impl Fn() -> Vec<RepoSource>,
        shutdown: &CancellationToken,
    ) {
        let mut backoff = Backoff::new(RETRY_AFTER.min(interval), interval);
        let mut wait = jittered(FIRST_PASS_AFTER.min(interval));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let needed = self.needed(needed());
            let report = self.upkeep_once(&needed, shutdown).await;
            if shutdown.is_cancelled() {
                return;
            }
            wait = if report.unfinished() {
                backoff.delay()
            } else {
                backoff.reset();
                jittered(interval)
            };
            log(&report, &needed, wait);
        }
    }

    /// One pass: repacks every mirror with more than one pack, then enforces the cache cap.
    pub(super) async fn upkeep_once(
        &self,
        needed: &Needed,
        stop: &CancellationToken,
    ) -> UpkeepReport {
        let cache_dir = self.inner.settings.cache_dir.clone();
        let dirs = match off_thread(move || mirror_dirs(&cache_dir)).await {
            Ok(dirs) => dirs,
            Err(err) => {
                let cache_dir = self.inner.settings.cache_dir.display();
                warn!(%cache_dir, error = %err, "cannot list the git mirrors");
                return UpkeepReport::default();
            }
        };
        let mut report = UpkeepReport::default();
        let git = find_program("git");
        let nice = find_program("nice");
        for dir in &dirs {
            if stop.is_cancelled() {
                return report;
            }
            let repo = self.repo_at(dir.clone());
            let outcome = match &git {
                None => MirrorUpkeep::NoGit,
                Some(git) => {
                    let command = || repack_command(git, nice.as_deref(), dir);
                    maintain(&repo, command, REPACK_TIMEOUT, stop).await
                }
            };
            report.mirrors.push((dir.clone(), outcome));
        }
        self.enforce_cap(dirs, needed, stop, &mut report).await;
        report
    }

    /// Deletes mirrors no agent needs, least recently used first, while the cache is above
    /// `git.max_cache_bytes`.
    async fn enforce_cap(
        &self,
        dirs: Vec<PathBuf>,
        needed: &Needed,
        stop: &CancellationToken,
        report: &mut UpkeepReport,
    ) {
        let remembered: Vec<Option<SystemTime>> = dirs
            .iter()
            .map(|dir| self.repo_at(dir.clone()).activity.last_used())
            .collect();
        let measured = off_thread(move || {
            Ok(dirs
                .into_iter()
                .zip(remembered)
                .map(|(dir, used)| {
                    let last_used = remember_use(&dir, used);
                    let bytes = disk_bytes(&dir);
                    (dir, bytes, last_used)
                })
                .collect::<Vec<_>>())
        })
        .await
        .unwrap_or_default();
        let mut total: u64 = measured.iter().map(|(_, bytes, _)| bytes).sum();
        report.cache_bytes = total;
        let Some(cap) = self.inner.settings.max_cache_bytes else {
            return;
        };
        if total <= cap {
            return;
        }
        let mut candidates: Vec<&(PathBuf, u64, SystemTime)> = measured
            .iter()
            .filter(|(dir, _, _)| !needed.0.contains_key(dir))
            .collect();
        candidates.sort_by(|a, b| (a.2, &a.0).cmp(&(b.2, &b.0)));
        let mut removed = Vec::new();
        for (dir, bytes, _) in candidates {
            if total <= cap || stop.is_cancelled() {
                break;
            }
            let repo = self.repo_at(dir.clone());
            let _slot = tokio::select! {
                slot = repo.slot.lock() => slot,
                () = stop.cancelled() => break,
            };
            let doomed = dir.clone();
            let outcome = match off_thread(move || remove_mirror(&doomed)).await {
                Ok(()) => {
                    total = total.saturating_sub(*bytes);
                    removed.push(dir.clone());
                    MirrorUpkeep::Removed { bytes: *bytes }
                }
                Err(err) => MirrorUpkeep::Failed {
                    message: format!("cannot delete: {err}"),
                },
            };
            report.mirrors.push((dir.clone(), outcome));
        }
        report.cache_bytes = total;
        if total > cap {
            report.over_cap = measured
                .iter()
                .filter(|(dir, _, _)| !removed.contains(dir))
                .map(|(dir, _, _)| needed.name(dir))
                .collect();
        }
    }
}

impl Needed {
    fn name(&self, dir: &Path) -> String {
        self.0
            .get(dir)
            .cloned()
            .unwrap_or_else(|| dir.display().to_string())
    }
}

fn log(report: &UpkeepReport, needed: &Needed, retry_in: Duration) {
    let mut repacked = 0;
    let mut removed = 0;
    let mut no_git = false;
    for (dir, outcome) in &report.mirrors {
        let mirror = needed.name(dir);
        match outcome {
            MirrorUpkeep::Compact => {}
            MirrorUpkeep::Repacked { packs } => {
                repacked += 1;
                debug!(%mirror, packs, "repacked a git mirror");
            }
            MirrorUpkeep::Interrupted => {
                debug!(%mirror, ?retry_in, "a fetch came first; repacking later");
            }
            MirrorUpkeep::NoGit => no_git = true,
            MirrorUpkeep::Failed { message } => {
                warn!(%mirror, error = %message, ?retry_in, "git mirror upkeep failed");
            }
            MirrorUpkeep::Removed { bytes } => {
                removed += 1;
                info!(%mirror, bytes, "deleted a git mirror no agent needs (git.max_cache_bytes)");
            }
        }
    }
    if no_git {
        warn!("git is not on PATH: the git mirrors are not repacked and keep one pack per fetch");
    }
    if !report.over_cap.is_empty() {
        warn!(
            cache_bytes = report.cache_bytes,
            mirrors = ?report.over_cap,
            "the git cache stays above git.max_cache_bytes: every mirror left is needed by an agent"
        );
    }
    if repacked + removed > 0 {
        info!(
            repacked,
            removed,
            cache_bytes = report.cache_bytes,
            "git mirrors maintained"
        );
    }
}

/// Repacks one mirror with `command` while holding its fetch slot, unless it has at most
/// one pack. A fetch wanting the slot, `stop`, or `timeout` kill the command.
pub(super) async fn maintain(
    repo: &RepoState,
    command: impl FnOnce() -> Command,
    timeout: Duration,
    stop: &CancellationToken,
) -> MirrorUpkeep {
    let _slot = tokio::select! {
        slot = repo.slot.lock() => slot,
        () = stop.cancelled() => return MirrorUpkeep::Interrupted,
    };
    // Registered before looking at the count, so that a fetch arriving in between is seen.
    let fetch_arrived = repo.activity.fetch_arrived.notified();
    tokio::pin!(fetch_arrived);
    fetch_arrived.as_mut().enable();
    if repo.activity.fetches_waiting.load(Ordering::SeqCst) > 0 {
        return MirrorUpkeep::Interrupted;
    }
    let dir = repo.dir.clone();
    let packs = match off_thread(move || prepare(&dir)).await {
        Ok(packs) => packs,
        Err(err) => {
            return MirrorUpkeep::Failed {
                message: format!("cannot list packs: {err}"),
            };
        }
    };
    if packs <= 1 {
        return MirrorUpkeep::Compact;
    }
    let mut command = command();
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group, so that a kill reaches the pack-objects git starts as well.
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            return MirrorUpkeep::Failed {
                message: format!("cannot run git: {err}"),
            };
        }
    };
    let stderr = child.stderr.take();
    let ended = {
        let finished = async { (child.wait().await, read_limited(stderr).await) };
        tokio::select! {
            (status, stderr) = finished => Ok((status, stderr)),
            () = &mut fetch_arrived => Err(MirrorUpkeep::Interrupted),
            () = stop.cancelled() => Err(MirrorUpkeep::Interrupted),
            () = tokio::time::sleep(timeout) => Err(MirrorUpkeep::Failed {
                message: format!("git repack did not finish within {timeout:?}"),
            }),
        }
    };
    match ended {
        Ok((Ok(status), _)) if status.success() => MirrorUpkeep::Repacked { packs },
        Ok((status, stderr)) => MirrorUpkeep::Failed {
            message: failure(status, &stderr),
        },
        Err(outcome) => {
            kill(&mut child).await;
            outcome
        }
    }
}

/// Runs blocking file work off the async threads.
async fn off_thread<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(err.to_string()),
        Err(err) => Err(format!("task failed: {err}")),
    }
}

fn failure(status: std::io::Result<ExitStatus>, stderr: &str) -> String {
    let status = match status {
        Ok(status) => status.to_string(),
        Err(err) => format!("cannot wait for it: {err}"),
    };
    let stderr = stderr.trim();
    if stderr.is_empty() {
        format!("git repack failed ({status})")
    } else {
        format!("git repack failed ({status}): {stderr}")
    }
}

/// Reads up to [`STDERR_LIMIT`] bytes and discards the rest, so that git never blocks on a
/// full pipe.
async fn read_limited(stream: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut stream) = stream else {
        return String::new();
    };
    let mut kept = Vec::new();
    let _ = (&mut stream)
        .take(STDERR_LIMIT)
        .read_to_end(&mut kept)
        .await;
    let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
    String::from_utf8_lossy(&kept).into_owned()
}

/// Kills the command's whole process group, then the command itself, and reaps it.
async fn kill(child: &mut Child) {
    if let Some(pid) = child.id() {
        // std cannot signal a process group; kill(1) can.
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{pid}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }
    let _ = child.kill().await;
}

/// `git repack` folding every pack into one and keeping unreachable objects, with one thread
/// and the lowest CPU priority, isolated from the user's and the system's git configuration.
fn repack_command(git: &Path, nice: Option<&Path>, dir: &Path) -> Command {
    let mut command = match nice {
        Some(nice) => {
            let mut command = Command::new(nice);
            command.args([OsStr::new("-n"), OsStr::new("19"), git.as_os_str()]);
            command
        }
        None => Command::new(git),
    };
    command
        .arg("--git-dir")
        .arg(dir)
        .args(["-c", "pack.threads=1", "-c", "repack.writeBitmaps=false"])
        .args(["repack", "-a", "-d", "-l", "-q", "--keep-unreachable"])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env_remove("GIT_DIR")
        .env_remove("GIT_OBJECT_DIRECTORY")
        .env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES");
    command
}

/// An executable named `name` in a directory of `PATH`.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The mirrors under `cache_dir`, after deleting what interrupted deletions and creations
/// left behind.
fn mirror_dirs(cache_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(cache_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let abandoned = name.starts_with('.')
            && (name.contains(".removing-")
                || (name.contains(".init-") && mirror::older_than(&path, LEFTOVER_AFTER)));
        if abandoned {
            if let Err(err) = std::fs::remove_dir_all(&path) {
                warn!(dir = %path.display(), error = %err, "cannot delete a leftover directory");
            }
        } else if !name.starts_with('.') && name.ends_with(".git") {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Counts the mirror's packs after deleting stale `.keep` files (upkeep holds the slot, so
/// no fetch of this process is writing one) and temporary files of killed git runs.
fn prepare(dir: &Path) -> std::io::Result<usize> {
    let packs_dir = dir.join("objects").join("pack");
    let entries = match std::fs::read_dir(&packs_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(err),
    };
    let mut packs = 0;
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let git_temporary = name.starts_with("tmp_") || name.starts_with(".tmp-");
        if name.ends_with(".keep") || (git_temporary && mirror::older_than(&path, LEFTOVER_AFTER)) {
            std::fs::remove_file(&path)?;
        } else if name.ends_with(".pack") && path.with_extension("idx").is_file() {
            packs += 1;
        }
    }
    Ok(packs)
}

/// The mirror's last use: what this process remembers, written down for the next one, or
/// else what an earlier process wrote down or the last change of a branch.
fn remember_use(dir: &Path, remembered: Option<SystemTime>) -> SystemTime {
    let marker = dir.join(LAST_USED_FILE);
    let modified = |path: &Path| path.metadata().and_then(|m| m.modified()).ok();
    let written = modified(&marker);
    if let Some(used) = remembered
        && written.is_none_or(|written| written < used)
    {
        let stored = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&marker)
            .and_then(|file| file.set_modified(used));
        if let Err(err) = stored {
            debug!(dir = %dir.display(), error = %err, "cannot record a mirror's last use");
        }
    }
    [
        remembered,
        written,
        modified(&dir.join("refs").join("heads")),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(UNIX_EPOCH)
}

/// The bytes of all files under `dir`; what cannot be read counts nothing.
pub(super) fn disk_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => pending.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Deletes a mirror: first renamed out of the way, so that a reader sees the whole mirror or
/// none, and a crash leaves a leftover that the next pass deletes, not a broken mirror.
fn remove_mirror(dir: &Path) -> std::io::Result<()> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(std::io::Error::other("not a mirror directory"));
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let doomed = parent.join(format!(
        ".{}.removing-{}-{nanos}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::rename(dir, &doomed)?;
    std::fs::remove_dir_all(&doomed)
}
