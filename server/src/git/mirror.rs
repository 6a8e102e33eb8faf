//! The bare mirror on disk: creating it, fetching into it, finding commits in it. Blocking.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gix::bstr::{BStr, ByteSlice};
use gix::credentials::helper::{Action, NextAction};
use gix::credentials::protocol::Outcome;
use gix::protocol::transport::client::blocking_io::http;
use gix::refs::transaction::{PreviousValue, RefEdit};
use gix::remote::Direction;
use gix::remote::fetch::{Status, Tags};
use greenlight::digest::sha256_hex;

use super::GitError;
use crate::gate::Sha;

/// Every branch, force-updated: the mirror follows force pushes like the server does.
const BRANCHES: &str = "+refs/heads/*:refs/heads/*";
/// GitLab's user name for token authentication over https.
const TOKEN_USER: &str = "oauth2";

/// Everything one fetch needs, owned so that it can move to a blocking thread.
pub(super) struct FetchJob {
    pub dir: PathBuf,
    pub url: String,
    pub token_file: Option<PathBuf>,
    pub timeout: Duration,
}

/// The mirror of `url`: named by a hash because urls hold characters paths cannot.
pub(super) fn mirror_dir(cache_dir: &Path, url: &str) -> PathBuf {
    let hash = sha256_hex(url.as_bytes());
    cache_dir.join(format!("{}.git", &hash[..32]))
}

/// The url as it may appear in messages and logs: a password in it is redacted.
pub fn display_url(url: &str) -> String {
    crate::redact::url(url)
}

/// Opens the mirror in `dir`, or `None` when it was never created.
pub(super) fn open(dir: &Path) -> Result<Option<gix::Repository>, GitError> {
    let exists = dir
        .try_exists()
        .map_err(|err| repository(format!("cannot access {}: {err}", dir.display())))?;
    if !exists {
        return Ok(None);
    }
    // Isolated: the mirror must not depend on the user's or the system's git configuration.
    let mut repo = gix::open_opts(dir, gix::open::Options::isolated()).map_err(|err| {
        repository(format!(
            "cannot open {}: {}; the next fetch clones it anew",
            dir.display(),
            describe(&err, &[])
        ))
    })?;
    repo.object_cache_size_if_unset(4 * 1024 * 1024);
    Ok(Some(repo))
}

/// Opens the mirror, creating an empty one first; it appears under its name only once
/// complete, so that a crash cannot leave a half-made mirror behind.
fn open_or_init(dir: &Path) -> Result<gix::Repository, GitError> {
    match open(dir) {
        Ok(Some(repo)) => return Ok(repo),
        Ok(None) => {}
        Err(err) => {
            // A mirror is only a cache: one that cannot be opened is cloned anew.
            tracing::warn!(dir = %dir.display(), error = %err, "discarding a broken mirror");
            std::fs::remove_dir_all(dir).map_err(|err| {
                repository(format!(
                    "cannot remove broken mirror {}: {err}",
                    dir.display()
                ))
            })?;
        }
    }
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(repository(format!(
            "{} is not a directory name",
            dir.display()
        )));
    };
    std::fs::create_dir_all(parent)
        .map_err(|err| repository(format!("cannot create {}: {err}", parent.display())))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let staging = parent.join(format!(
        ".{}.init-{}-{nanos}",
        name.to_string_lossy(),
        std::process::id()
    ));
    gix::ThreadSafeRepository::init_opts(
        &staging,
        gix::create::Kind::Bare,
        gix::create::Options::default(),
        gix::open::Options::isolated(),
    )
    .map_err(|err| {
        repository(format!(
            "cannot create a mirror in {}: {}",
            staging.display(),
            describe(&err, &[])
        ))
    })?;
    if let Err(err) = std::fs::rename(&staging, dir) {
        let _ = std::fs::remove_dir_all(&staging);
        // Another process sharing the cache directory may have won the race.
        if !dir.is_dir() {
            return Err(repository(format!(
                "cannot move a new mirror to {}: {err}",
                dir.display()
            )));
        }
    }
    open(dir)?.ok_or_else(|| repository(format!("mirror {} vanished", dir.display())))
}

/// How old a lock file in a mirror must be to be taken for one a killed process left: git
/// holds its locks for the moment of a reference update, never for seconds.
pub(super) const STALE_LOCK_AGE: Duration = Duration::from_secs(30);

/// Fetches every branch into the mirror and deletes the branches the remote no longer has.
///
/// A process killed while it updated the mirror's references leaves their lock files
/// behind, and every later fetch would fail on them: after a failed fetch the stale ones
/// are removed, so that the retry goes through.
pub(super) fn fetch(job: &FetchJob, interrupt: &AtomicBool) -> Result<(), GitError> {
    let fetched = fetch_into_mirror(job, interrupt);
    if fetched.is_err() {
        for lock in remove_stale_locks(&job.dir, STALE_LOCK_AGE) {
            tracing::warn!(lock = %lock.display(), "removed a lock file a killed process left");
        }
    }
    fetched
}

/// Removes the lock files (`*.lock`) at the top of mirror `dir` and under its `refs` that
/// are older than `age`; returns the ones removed.
pub(super) fn remove_stale_locks(dir: &Path, age: Duration) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    // The top level (HEAD, config, packed-refs) and every reference: objects hold no locks.
    let mut pending = vec![(dir.to_owned(), false), (dir.join("refs"), true)];
    while let Some((current, recurse)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() && recurse => pending.push((path, true)),
                Ok(kind)
                    if kind.is_file()
                        && path.extension().is_some_and(|ext| ext == "lock")
                        && older_than(&path, age) =>
                {
                    match std::fs::remove_file(&path) {
                        Ok(()) => removed.push(path),
                        // Every fetch of this mirror fails until it is gone: say which and why.
                        Err(error) => tracing::warn!(
                            lock = %path.display(),
                            %error,
                            "cannot remove a stale lock file; remove it by hand"
                        ),
                    }
                }
                _ => {}
            }
        }
    }
    removed
}

/// Whether `path` was last changed more than `age` ago.
pub(super) fn older_than(path: &Path, age: Duration) -> bool {
    path.symlink_metadata()
        .and_then(|m| m.modified())
        .is_ok_and(|modified| modified.elapsed().is_ok_and(|elapsed| elapsed > age))
}

fn fetch_into_mirror(job: &FetchJob, interrupt: &AtomicBool) -> Result<(), GitError> {
    let shown = display_url(&job.url);
    let url = gix::url::parse(job.url.as_str()).map_err(|err| GitError::Unreachable {
        url: shown.clone(),
        message: format!("not a git url: {}", describe(&err, &[])),
    })?;
    let https = url.scheme == gix::url::Scheme::Https;
    let token = match &job.token_file {
        Some(path) if https => Some(read_token(path, &shown)?),
        Some(path) => {
            let token_file = path.display();
            tracing::warn!(url = %shown, %token_file, "the token is only sent over https");
            None
        }
        None => None,
    };
    let repo = open_or_init(&job.dir)?;
    let has_token = token.is_some();
    let mut secrets: Vec<String> = token.iter().cloned().collect();
    secrets.extend(url.password().map(str::to_owned));
    let unreachable = |context: &str, err: gix::Error| {
        if interrupt.load(Ordering::SeqCst) {
            return GitError::Timeout {
                url: shown.clone(),
                after: job.timeout,
            };
        }
        GitError::Unreachable {
            url: shown.clone(),
            message: format!("{context}: {}", explain(&err, &secrets, has_token)),
        }
    };

    let remote = repo
        .remote_at_without_url_rewrite(url.clone())
        .map_err(|err| unreachable("invalid remote", err))?
        .with_fetch_tags(Tags::None)
        .with_refspecs([BRANCHES], Direction::Fetch)
        .map_err(|err| unreachable("invalid refspec", err))?;
    let mut connection = remote
        .connect(Direction::Fetch)
        .map_err(|err| unreachable("cannot connect", err))?
        .with_credentials(move |action| credentials(action, token.as_deref()));
    if https {
        connection = connection.with_transport_options(Box::new(http_options(&repo, &url, job)?));
    }
    let outcome = connection
        .prepare_fetch(gix::progress::Discard, Default::default())
        .map_err(|err| unreachable("cannot list branches", err))?
        .receive(gix::progress::Discard, interrupt)
        .map_err(|err| unreachable("cannot fetch objects", err))?;
    // gix leaves the new pack's `.keep` when no branch moved, for the caller to delete; a
    // kept pack would never be repacked.
    if let Status::Change {
        write_pack_bundle, ..
    } = &outcome.status
        && let Some(keep) = &write_pack_bundle.keep_path
        && let Err(err) = std::fs::remove_file(keep)
    {
        tracing::debug!(keep = %keep.display(), error = %err, "cannot delete a pack's .keep");
    }
    prune(&repo, &outcome.ref_map.remote_refs)
}

/// Answers gix's credential requests from the token alone: never a helper, never a prompt.
fn credentials(action: Action, token: Option<&str>) -> gix::Result<Option<Outcome>> {
    match (action, token) {
        (Action::Get(context), Some(token)) => Ok(Some(Outcome {
            identity: gix::sec::identity::Account {
                username: TOKEN_USER.into(),
                password: token.into(),
                oauth_refresh_token: None,
            },
            next: NextAction::from(context),
        })),
        // Nothing is stored or erased anywhere: the token file is the only source.
        _ => Ok(None),
    }
}

fn read_token(path: &Path, url: &str) -> Result<String, GitError> {
    let unreadable = |message: String| GitError::Unreachable {
        url: url.to_owned(),
        message,
    };
    let raw = std::fs::read_to_string(path)
        .map_err(|err| unreadable(format!("cannot read token file {}: {err}", path.display())))?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(unreadable(format!(
            "token file {} is empty",
            path.display()
        )));
    }
    Ok(token.to_owned())
}

/// The repository's http settings, with reqwest's per-read timeout tied to ours so that a
/// stalled connection ends the blocking fetch instead of outliving the interrupt.
fn http_options(
    repo: &gix::Repository,
    url: &gix::Url,
    job: &FetchJob,
) -> Result<http::Options, GitError> {
    let configured = repo
        .transport_options(url.to_bstring().as_bstr(), None)
        .map_err(|err| repository(format!("http settings: {}", describe(&err, &[]))))?;
    let mut options = configured
        .and_then(|any| any.downcast::<http::Options>().ok())
        .map(|boxed| *boxed)
        .unwrap_or_default();
    let timeout = job.timeout;
    let backend = http::reqwest::Options {
        configure_client: Some(Box::new(move |client| Ok(client.timeout(timeout)))),
        configure_request: None,
    };
    options.backend = Some(std::sync::Arc::new(std::sync::Mutex::new(backend)));
    Ok(options)
}

/// Deletes local branches that the remote did not advertise: a deleted branch must not keep
/// looking like a branch to the gate.
fn prune(
    repo: &gix::Repository,
    advertised: &[gix::protocol::handshake::Ref],
) -> Result<(), GitError> {
    let advertised: HashSet<&BStr> = advertised.iter().map(|r| r.unpack().0).collect();
    let failed = |err: gix::Error| repository(format!("pruning branches: {}", describe(&err, &[])));
    let mut edits = Vec::new();
    for reference in repo
        .references()
        .map_err(failed)?
        .local_branches()
        .map_err(failed)?
    {
        let reference = reference.map_err(failed)?;
        if !advertised.contains(reference.name().as_bstr()) {
            edits.push(RefEdit::delete(
                reference.inner.name.clone(),
                PreviousValue::MustExistAndMatch(reference.inner.target.clone()),
            ));
        }
    }
    if !edits.is_empty() {
        repo.edit_references(edits).map_err(failed)?;
    }
    Ok(())
}

/// The commit `sha` names in the mirror, if there is exactly one.
pub(super) fn resolve_commit(
    repo: &gix::Repository,
    sha: &Sha,
) -> Result<Option<gix::ObjectId>, GitError> {
    let failed = |err: gix::Error| repository(format!("looking up {sha}: {}", describe(&err, &[])));
    let is_commit = |id: gix::ObjectId| -> Result<bool, GitError> {
        let header = repo.try_find_header(id).map_err(failed)?;
        Ok(header.is_some_and(|h| h.kind() == gix::objs::Kind::Commit))
    };
    if sha.is_full() {
        // A SHA-256 name cannot exist in this SHA-1 mirror.
        let Ok(id) = gix::ObjectId::from_hex(sha.as_str().as_bytes()) else {
            return Ok(None);
        };
        return Ok(is_commit(id)?.then_some(id));
    }
    let Ok(prefix) = gix::hash::Prefix::from_hex(sha.as_str()) else {
        return Ok(None);
    };
    let mut matches = HashSet::new();
    repo.objects
        .lookup_prefix(prefix, Some(&mut matches))
        .map_err(failed)?;
    let mut commits = Vec::new();
    for id in matches {
        if is_commit(id)? {
            commits.push(id);
        }
    }
    // An abbreviation that names two commits names neither.
    Ok(match commits.as_slice() {
        [id] => Some(*id),
        _ => None,
    })
}

/// A gix error as one line, saying what to do when the server refused access.
fn explain(err: &gix::Error, secrets: &[String], has_token: bool) -> String {
    let denied = err.is_unauthenticated() || err.is_permission_denied();
    match (denied, has_token) {
        (true, false) => "the server asks for credentials; configure a token file".to_owned(),
        (true, true) => format!(
            "{} (access denied: the token in the token file may not read the repository)",
            describe(err, secrets)
        ),
        (false, _) => describe(err, secrets),
    }
}

/// A gix error with all its causes on one line, with `secrets` blanked out because gix
/// messages may quote urls verbatim.
pub(super) fn describe(err: &gix::Error, secrets: &[String]) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.iter_errors() {
        let text = cause.to_string();
        if !text.is_empty() && !parts.iter().any(|known| known.contains(&text)) {
            parts.push(text);
        }
    }
    let mut line = parts.join(": ");
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        line = line.replace(secret.as_str(), "***");
    }
    line
}

fn repository(message: String) -> GitError {
    GitError::Repository { message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_offered_as_gitlab_expects_and_never_stored() {
        let context = gix::credentials::protocol::Context {
            url: Some("https://gitlab.example.com/group/project.git".into()),
            ..Default::default()
        };
        let outcome = credentials(Action::Get(context), Some("glpat-secret"))
            .unwrap()
            .unwrap();
        assert_eq!(outcome.identity.username, "oauth2");
        assert_eq!(outcome.identity.password, "glpat-secret");
        assert!(
            credentials(outcome.next.store(), Some("glpat-secret"))
                .unwrap()
                .is_none()
        );
        let anonymous = credentials(Action::get_for_url("https://example.com/x.git"), None);
        assert!(anonymous.unwrap().is_none());
    }

    #[test]
    fn tokens_are_read_trimmed_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  glpat-secret\n").unwrap();
        assert_eq!(read_token(&path, "u").unwrap(), "glpat-secret");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            read_token(&path, "u"),
            Err(GitError::Unreachable { .. })
        ));
        let missing = read_token(&dir.path().join("missing"), "u").unwrap_err();
        assert!(missing.to_string().contains("cannot read token file"));

        let shown = display_url("https://user:hunter2@gitlab.example.com/g/p.git");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(display_url("/srv/repo"), "/srv/repo");
        let err = gix::Error::from_error(std::io::Error::other("denied for glpat-secret"));
        let line = describe(&err, &["glpat-secret".to_owned()]);
        assert_eq!(line, "denied for ***");
    }

    #[test]
    fn mirrors_are_named_by_url() {
        let a = mirror_dir(Path::new("/cache"), "https://example.com/a.git");
        let b = mirror_dir(Path::new("/cache"), "https://example.com/b.git");
        assert_ne!(a, b);
        assert!(a.starts_with("/cache"));
        assert_eq!(
            a,
            mirror_dir(Path::new("/cache"), "https://example.com/a.git")
        );
    }
}
