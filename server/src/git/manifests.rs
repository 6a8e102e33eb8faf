//! The manifest files of a commit: which paths match, the limits kas enforced, and a small
//! cache in which each read happens once however many agents ask for it.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use gix::bstr::ByteSlice;
use gix::objs::tree::EntryKind;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use greenlight::digest::ContentDigest;
use tokio::sync::OnceCell;

use super::mirror::describe;
use super::{GitError, Limits};
use crate::gate::Sha;

/// kas's default: every YAML and JSON file of the repository.
pub const DEFAULT_PATTERNS: &[&str] = &["**/*.{yaml,yml,json}"];
/// Sets kept after their read: a deploy wave asks for one or two commits per repository.
const CACHED_SETS: usize = 8;

/// One manifest file of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    /// The path in the repository, `/`-separated, without a leading `/`.
    pub path: String,
    pub content: Bytes,
}

/// The manifest files of a commit, sorted by path, with the checksum a revision trailer carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestSet {
    pub files: Vec<ManifestFile>,
    pub total_bytes: u64,
    /// [`ContentDigest`] over `files` in order.
    pub content_sha256: String,
}

/// Path globs, compiled once per request.
pub struct Patterns {
    given: Vec<String>,
    set: GlobSet,
}

impl Patterns {
    /// Compiles `patterns`, or the default when there are none.
    pub fn compile(patterns: &[String]) -> Result<Self, GitError> {
        let given = given_or_default(patterns);
        let mut set = GlobSetBuilder::new();
        for pattern in &given {
            // Like kas: `*` stays within one directory, `**` crosses them.
            let glob = GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|err| GitError::InvalidGlob {
                    pattern: pattern.clone(),
                    message: err.kind().to_string(),
                })?;
            set.add(glob);
        }
        let set = set.build().map_err(|err| GitError::InvalidGlob {
            pattern: err.glob().unwrap_or_default().to_owned(),
            message: err.kind().to_string(),
        })?;
        Ok(Self { given, set })
    }

    /// Whether `path` (`/`-separated, relative to the repository's root) matches a glob.
    pub fn matches(&self, path: &str) -> bool {
        self.set.is_match(path)
    }

    /// The globs of `patterns` (the default when there are none) in a canonical order, so
    /// that the same set in another order shares a read; without compiling them: a glob set
    /// is a regex, and building one for every agent a revision went to cost a fan-out more
    /// than its single read.
    pub(super) fn key_of(patterns: &[String]) -> Vec<String> {
        let mut key = given_or_default(patterns);
        key.sort();
        key.dedup();
        key
    }
}

fn given_or_default(patterns: &[String]) -> Vec<String> {
    if patterns.is_empty() {
        DEFAULT_PATTERNS.iter().map(|p| (*p).to_owned()).collect()
    } else {
        patterns.to_vec()
    }
}

/// Reads the files of `commit` that match `patterns`, checking every limit before reading
/// any content so that an oversized commit costs no memory.
pub(super) fn read(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    patterns: &Patterns,
    limits: Limits,
) -> Result<ManifestSet, GitError> {
    let failed = |err: gix::Error| GitError::Repository {
        message: format!("reading commit {commit}: {}", describe(&err, &[])),
    };
    let root = repo
        .find_commit(commit)
        .and_then(|c| c.tree_id())
        .map_err(failed)?
        .detach();
    // Both bounds stop the walk at once: neither a huge tree nor a crafted one (directories
    // listing the same subtree over and over) costs more than the limits allow.
    let mut matching: Vec<(String, gix::ObjectId)> = Vec::new();
    let mut visited = 0usize;
    let mut directories = vec![(String::new(), root)];
    while let Some((dir, id)) = directories.pop() {
        let tree = repo.find_tree(id).map_err(failed)?;
        for entry in tree.iter() {
            visited += 1;
            if visited > limits.max_tree_entries {
                return Err(GitError::TreeTooLarge {
                    limit: limits.max_tree_entries,
                });
            }
            let entry = entry.map_err(failed)?;
            let Ok(name) = entry.filename().to_str() else {
                let name = entry.filename();
                tracing::warn!(%commit, dir, %name, "skipping a path that is not UTF-8");
                continue;
            };
            let path = if dir.is_empty() {
                name.to_owned()
            } else {
                format!("{dir}/{name}")
            };
            match entry.mode().kind() {
                EntryKind::Tree if !name.starts_with('.') => {
                    directories.push((path, entry.object_id()));
                }
                EntryKind::Blob | EntryKind::BlobExecutable
                    if !name.starts_with('.') && patterns.matches(&path) =>
                {
                    if matching.len() == limits.max_files {
                        return Err(GitError::TooManyFiles {
                            limit: limits.max_files,
                        });
                    }
                    matching.push((path, entry.object_id()));
                }
                // Dot-directories and dot-files hold tooling (a root `.gitlab-ci.yml`
                // matches the default globs but is no manifest), symlinks could point
                // anywhere, and submodules are other repositories.
                _ => {}
            }
        }
    }

    if matching.is_empty() {
        return Err(GitError::NoMatch {
            patterns: patterns.given.clone(),
        });
    }
    matching.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut total_bytes = 0u64;
    for (path, id) in &matching {
        let bytes = repo.find_header(*id).map_err(failed)?.size();
        if bytes > limits.max_file_bytes {
            return Err(GitError::FileTooLarge {
                path: path.clone(),
                bytes,
                limit: limits.max_file_bytes,
            });
        }
        total_bytes += bytes;
    }
    if total_bytes > limits.max_total_bytes {
        return Err(GitError::TotalTooLarge {
            bytes: total_bytes,
            limit: limits.max_total_bytes,
        });
    }

    let mut digest = ContentDigest::new();
    let mut files = Vec::with_capacity(matching.len());
    for (path, id) in matching {
        let content = repo.find_blob(id).map_err(failed)?.take_data();
        digest.add_file(&path, &content);
        files.push(ManifestFile {
            path,
            content: Bytes::from(content),
        });
    }
    Ok(ManifestSet {
        total_bytes: files.iter().map(|f| f.content.len() as u64).sum(),
        files,
        content_sha256: digest.finish(),
    })
}

/// What identifies one read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct ManifestKey {
    pub url: String,
    pub sha: Sha,
    pub patterns: Vec<String>,
}

/// The outcome of one read, shared by everyone who asked while it ran.
pub(super) type Slot = Arc<OnceCell<Result<Arc<ManifestSet>, GitError>>>;

/// The most recently used reads, finished or running.
#[derive(Default)]
pub(super) struct ManifestCache {
    clock: u64,
    slots: HashMap<ManifestKey, (u64, Slot)>,
}

impl ManifestCache {
    /// The slot for `key`, made when absent; evicts the least recently used finished read.
    pub(super) fn cell(&mut self, key: &ManifestKey) -> Slot {
        self.clock += 1;
        if let Some((used, slot)) = self.slots.get_mut(key) {
            *used = self.clock;
            return slot.clone();
        }
        if self.slots.len() >= CACHED_SETS {
            // A running read is evicted only if all are running; its waiters still share it.
            let victim = self
                .slots
                .iter()
                .min_by_key(|(_, (used, slot))| (!slot.initialized(), *used))
                .map(|(key, _)| key.clone());
            if let Some(victim) = victim {
                self.slots.remove(&victim);
            }
        }
        let slot = Slot::default();
        self.slots.insert(key.clone(), (self.clock, slot.clone()));
        slot
    }

    /// Drops a failed read so that the next caller tries again, unless `key` has been
    /// read anew meanwhile.
    pub(super) fn forget_failed(&mut self, key: &ManifestKey, failed: &Slot) {
        if self
            .slots
            .get(key)
            .is_some_and(|(_, slot)| Arc::ptr_eq(slot, failed))
        {
            self.slots.remove(key);
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn compile(patterns: &[&str]) -> Patterns {
        let patterns: Vec<String> = patterns.iter().map(|p| (*p).to_owned()).collect();
        Patterns::compile(&patterns).unwrap()
    }

    /// A path segment without glob syntax.
    fn segment() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_-][a-zA-Z0-9_.-]{0,10}"
    }

    fn dirs() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(segment(), 0..4)
    }

    proptest! {
        #[test]
        fn arbitrary_globs_and_paths_never_panic(
            patterns in prop::collection::vec("([*?{}\\[\\]!,/\\\\^-]|\\*\\*|[a-z.]|\\PC){0,16}", 0..4),
            paths in prop::collection::vec("\\PC{0,32}|([*/.a-z]){0,16}", 0..8),
        ) {
            // The same globs in another order share a read.
            let reversed: Vec<String> = patterns.iter().rev().cloned().collect();
            prop_assert_eq!(Patterns::key_of(&patterns), Patterns::key_of(&reversed));
            if let Ok(patterns) = Patterns::compile(&patterns) {
                for path in &paths {
                    let _ = patterns.matches(path);
                }
            }
        }

        #[test]
        fn the_default_globs_select_yaml_and_json_files_at_any_depth(
            dirs in dirs(),
            stem in segment(),
            extension in prop::sample::select(vec!["yaml", "yml", "json", "txt", "yaml.bak", "md", ""]),
        ) {
            let path = [dirs, vec![format!("{stem}.{extension}")]].concat().join("/");
            let manifest = ["yaml", "yml", "json"].contains(&extension);
            prop_assert_eq!(compile(&[]).matches(&path), manifest, "{}", path);
        }

        #[test]
        fn a_star_stays_within_its_directory_and_two_cross_them(
            dir in segment(),
            subdirs in prop::collection::vec(segment(), 1..3),
            stem in segment(),
        ) {
            let direct = format!("{dir}/{stem}.yaml");
            let nested = format!("{dir}/{}/{stem}.yaml", subdirs.join("/"));
            let one = compile(&[&format!("{dir}/*.yaml")]);
            prop_assert!(one.matches(&direct), "{}", direct);
            prop_assert!(!one.matches(&nested), "{}", nested);
            let any_depth = compile(&[&format!("{dir}/**/*.yaml")]);
            prop_assert!(any_depth.matches(&direct), "{}", direct);
            prop_assert!(any_depth.matches(&nested), "{}", nested);
        }

        #[test]
        fn a_literal_path_matches_itself_only(
            path in prop::collection::vec(segment(), 1..4).prop_map(|s| s.join("/")),
            other in prop::collection::vec(segment(), 1..4).prop_map(|s| s.join("/")),
        ) {
            let patterns = compile(&[&path]);
            prop_assert!(patterns.matches(&path));
            prop_assert_eq!(patterns.matches(&other), other == path);
        }
    }
}
