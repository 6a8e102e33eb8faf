//! Mirrors against real repositories made with the `git` CLI in temporary directories.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use greenlight::digest::ContentDigest;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::gate::Lineage;

/// A working repository standing in for GitLab.
struct Upstream {
    dir: tempfile::TempDir,
}

impl Upstream {
    fn new() -> Self {
        let upstream = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        upstream.git(&["init", "--quiet", "--initial-branch=main"]);
        upstream
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn git(&self, args: &[&str]) -> String {
        let output = Command::new("git")
            .current_dir(self.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .args([
                "-c",
                "user.name=Test",
                "-c",
                "user.email=test@example.com",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    /// Runs git with `input` on its standard input; returns its output.
    fn git_with_input(&self, args: &[&str], input: &[u8]) -> String {
        use std::io::Write;
        let mut child = Command::new("git")
            .current_dir(self.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "git {args:?}");
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    fn write(&self, path: &str, content: &[u8]) {
        let full = self.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, content).unwrap();
    }

    /// Commits the working tree as it is and returns the new commit.
    fn commit(&self, message: &str) -> Sha {
        self.git(&["add", "--all"]);
        self.git(&["commit", "--quiet", "--allow-empty", "-m", message]);
        self.head()
    }

    fn commit_file(&self, path: &str, content: &[u8]) -> Sha {
        self.write(path, content);
        self.commit(&format!("write {path}"))
    }

    fn head(&self) -> Sha {
        Sha::parse(&self.git(&["rev-parse", "HEAD"])).unwrap()
    }

    fn file_url(&self) -> RepoSource {
        RepoSource {
            url: format!("file://{}", self.path().display()),
            token_file: None,
        }
    }

    fn plain_path(&self) -> RepoSource {
        RepoSource {
            url: self.path().display().to_string(),
            token_file: None,
        }
    }
}

struct Fixture {
    cache: tempfile::TempDir,
    mirrors: Mirrors,
}

fn mirrors() -> Fixture {
    mirrors_with(Limits::default(), Duration::from_secs(30))
}

fn mirrors_with(limits: Limits, fetch_timeout: Duration) -> Fixture {
    let cache = tempfile::tempdir().unwrap();
    let mirrors = Mirrors::new(GitSettings {
        cache_dir: cache.path().join("mirrors"),
        fetch_timeout,
        limits,
        maintenance_interval: None,
        max_cache_bytes: None,
    });
    Fixture { cache, mirrors }
}

fn strings(patterns: &[&str]) -> Vec<String> {
    patterns.iter().map(|p| (*p).to_owned()).collect()
}

fn unknown_sha() -> Sha {
    Sha::parse(&"ab".repeat(20)).unwrap()
}

#[tokio::test]
async fn clone_then_fetch_picks_up_new_commits() {
    let upstream = Upstream::new();
    let first = upstream.commit_file("a.yaml", b"a: 1\n");
    let Fixture { cache, mirrors } = mirrors();
    let source = upstream.file_url();

    assert!(!mirrors.has_commit(&source, &first).await);
    mirrors.fetch(&source).await.unwrap();
    assert!(mirrors.has_commit(&source, &first).await);
    let dirs: Vec<PathBuf> = std::fs::read_dir(cache.path().join("mirrors"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        dirs.len(),
        1,
        "one mirror and no staging leftovers: {dirs:?}"
    );

    let second = upstream.commit_file("a.yaml", b"a: 2\n");
    assert!(!mirrors.has_commit(&source, &second).await);
    mirrors.fetch(&source).await.unwrap();
    assert!(mirrors.has_commit(&source, &second).await);
    // Abbreviations work as well as full names.
    assert!(
        mirrors
            .has_commit(&source, &Sha::parse(second.short()).unwrap())
            .await
    );
    assert_eq!(mirrors.stats().fetches, 2);
}

#[tokio::test]
async fn a_broken_mirror_is_cloned_anew() {
    let upstream = Upstream::new();
    let commit = upstream.commit_file("a.yaml", b"a: 1\n");
    let Fixture { cache, mirrors } = mirrors();
    let source = upstream.file_url();
    mirrors.fetch(&source).await.unwrap();
    let mirror = std::fs::read_dir(cache.path().join("mirrors"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(mirror.join("config"), "[broken").unwrap();

    assert!(!mirrors.has_commit(&source, &commit).await);
    let err = mirrors
        .lineage(&source, "main", std::slice::from_ref(&commit), &[])
        .await;
    assert!(matches!(err, Err(GitError::Repository { .. })), "{err:?}");
    mirrors.ensure_commit(&source, &commit).await.unwrap();
    assert!(mirrors.has_commit(&source, &commit).await);
}

/// A server killed while it updated a mirror's branch leaves the branch's lock file, and
/// every fetch after the restart failed on it for good: a lock older than any git holds is
/// removed after the fetch it failed, and the retry goes through. A fresh one is left alone.
#[tokio::test]
async fn a_lock_file_a_killed_process_left_fails_one_fetch_and_is_then_removed() {
    let upstream = Upstream::new();
    upstream.commit_file("a.yaml", b"a: 1\n");
    let Fixture { mirrors, .. } = mirrors();
    let source = upstream.file_url();
    mirrors.fetch(&source).await.unwrap();
    let lock = mirror_of(&mirrors, &source).join("refs/heads/main.lock");
    let second = upstream.commit_file("a.yaml", b"a: 2\n");

    std::fs::write(&lock, b"").unwrap();
    let fresh = mirrors.fetch(&source).await;
    assert!(fresh.is_err(), "a held lock fails the fetch: {fresh:?}");
    assert!(lock.exists(), "a lock as young as a live one is kept");

    let long_ago = std::time::SystemTime::now() - 2 * mirror::STALE_LOCK_AGE;
    std::fs::File::options()
        .write(true)
        .open(&lock)
        .unwrap()
        .set_modified(long_ago)
        .unwrap();
    let failed = mirrors.fetch(&source).await;
    assert!(failed.is_err(), "{failed:?}");
    assert!(
        !lock.exists(),
        "a stale lock is removed after the fetch it failed"
    );
    mirrors.fetch(&source).await.unwrap();
    assert!(mirrors.has_commit(&source, &second).await);
}

#[tokio::test]
async fn plain_paths_work_like_file_urls() {
    let upstream = Upstream::new();
    let commit = upstream.commit_file("a.yaml", b"a: 1\n");
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    mirrors
        .ensure_commit(&upstream.plain_path(), &commit)
        .await
        .unwrap();
    assert!(mirrors.has_commit(&upstream.plain_path(), &commit).await);
}

#[tokio::test]
async fn a_token_is_only_read_for_https() {
    let upstream = Upstream::new();
    let commit = upstream.commit_file("a.yaml", b"a: 1\n");
    let Fixture { cache, mirrors } = mirrors();
    let source = RepoSource {
        token_file: Some(cache.path().join("no-such-token")),
        ..upstream.file_url()
    };
    mirrors.ensure_commit(&source, &commit).await.unwrap();
}

#[tokio::test]
async fn ensure_commit_fetches_a_commit_pushed_after_the_clone() {
    let upstream = Upstream::new();
    upstream.commit_file("a.yaml", b"a: 1\n");
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let source = upstream.file_url();
    mirrors.fetch(&source).await.unwrap();

    let pushed = upstream.commit_file("b.yaml", b"b: 1\n");
    assert!(!mirrors.has_commit(&source, &pushed).await);
    mirrors.ensure_commit(&source, &pushed).await.unwrap();
    assert!(mirrors.has_commit(&source, &pushed).await);
    assert_eq!(mirrors.stats().fetches, 2);

    // Present already: no fetch.
    mirrors.ensure_commit(&source, &pushed).await.unwrap();
    assert_eq!(mirrors.stats().fetches, 2);

    let missing = mirrors.ensure_commit(&source, &unknown_sha()).await;
    assert_eq!(missing, Err(GitError::CommitMissing { sha: unknown_sha() }));
    assert!(missing.unwrap_err().retryable());
    assert_eq!(mirrors.stats().fetches, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_fetches_coalesce() {
    let upstream = Upstream::new();
    let commit = upstream.commit_file("a.yaml", b"a: 1\n");
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let source = upstream.file_url();

    let callers: Vec<_> = (0..20)
        .map(|_| {
            let mirrors = mirrors.clone();
            let source = source.clone();
            tokio::spawn(async move { mirrors.fetch(&source).await })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap().unwrap();
    }
    let fetches = mirrors.stats().fetches;
    assert!(
        (1..=2).contains(&fetches),
        "{fetches} fetches for 20 callers"
    );
    assert!(mirrors.has_commit(&source, &commit).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fetch_that_finished_after_a_read_serves_instead_of_another() {
    let upstream = Upstream::new();
    upstream.commit_file("a.yaml", b"a: 1\n");
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let source = upstream.file_url();
    mirrors.fetch(&source).await.unwrap();
    let read_at = mirrors.fetched(&source);

    // Nothing was fetched since the read: the commit pushed since is fetched.
    let second = upstream.commit_file("b.yaml", b"b: 1\n");
    mirrors
        .fetch_unless_fetched_since(&source, read_at)
        .await
        .unwrap();
    assert_eq!(mirrors.stats().fetches, 2);
    assert!(mirrors.has_commit(&source, &second).await);

    // Another reader that read before that fetch finished takes it: no third fetch.
    mirrors
        .fetch_unless_fetched_since(&source, read_at)
        .await
        .unwrap();
    assert_eq!(
        mirrors.stats().fetches,
        2,
        "served by the fetch since the read"
    );

    // A fetch running when a reader finds the mirror behind serves it too.
    let read_at = mirrors.fetched(&source);
    let third = upstream.commit_file("c.yaml", b"c: 1\n");
    let running = {
        let mirrors = mirrors.clone();
        let source = source.clone();
        tokio::spawn(async move { mirrors.fetch(&source).await })
    };
    while mirrors.stats().fetches < 3 {
        tokio::task::yield_now().await;
    }
    mirrors
        .fetch_unless_fetched_since(&source, read_at)
        .await
        .unwrap();
    running.await.unwrap().unwrap();
    assert_eq!(mirrors.stats().fetches, 3, "one fetch for both");
    assert!(mirrors.has_commit(&source, &third).await);
}

#[tokio::test]
async fn lineage_of_a_linear_history() {
    let upstream = Upstream::new();
    let a = upstream.commit_file("f.yaml", b"1");
    let b = upstream.commit_file("f.yaml", b"2");
    let c = upstream.commit_file("f.yaml", b"3");
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let source = upstream.file_url();
    mirrors.fetch(&source).await.unwrap();

    let absent = unknown_sha();
    let candidates = [a.clone(), b.clone(), c.clone(), absent.clone()];
    let anchors = [a.clone(), b.clone(), absent.clone()];
    let lineage = mirrors
        .lineage(&source, "main", &candidates, &anchors)
        .await
        .unwrap();
    for sha in [&a, &b, &c] {
        assert!(lineage.on_branch(sha), "{sha} is on main");
    }
    assert!(!lineage.on_branch(&absent));
    assert!(lineage.descends_from(&c, &a));
    assert!(lineage.descends_from(&c, &b));
    assert!(lineage.descends_from(&b, &a));
    assert!(lineage.descends_from(&a, &a));
    assert!(!lineage.descends_from(&a, &b));
    assert!(!lineage.descends_from(&b, &c));
    assert!(!lineage.descends_from(&absent, &absent));
    assert!(!lineage.descends_from(&c, &absent));
    // Generations stand each commit above its history; a commit not fetched has none.
    let generation = |sha: &Sha| lineage.generation(sha);
    assert!(generation(&a).is_some());
    assert!(generation(&c) > generation(&b) && generation(&b) > generation(&a));
    assert_eq!(generation(&absent), None);

    // Abbreviated names answer under the names they were asked with.
    let short = Sha::parse(a.short()).unwrap();
    let lineage = mirrors
        .lineage(
            &source,
            "main",
            std::slice::from_ref(&c),
            std::slice::from_ref(&short),
        )
        .await
        .unwrap();
    assert!(lineage.on_branch(&short));
    assert!(lineage.descends_from(&c, &short));

    let lineage = mirrors
        .lineage(&source, "no-such-branch", &candidates, &anchors)
        .await
        .unwrap();
    assert!(!lineage.on_branch(&c));
    assert!(
        lineage.descends_from(&c, &a),
        "ancestry does not need the branch"
    );
}

#[tokio::test]
async fn lineage_after_a_force_push() {
    let upstream = Upstream::new();
    let a = upstream.commit_file("f.yaml", b"1");
    let b = upstream.commit_file("f.yaml", b"2");
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let source = upstream.file_url();
    mirrors.fetch(&source).await.unwrap();

    upstream.git(&["reset", "--quiet", "--hard", a.as_str()]);
    let c = upstream.commit_file("f.yaml", b"3");
    mirrors.fetch(&source).await.unwrap();

    let lineage = mirrors
        .lineage(
            &source,
            "main",
            &[b.clone(), c.clone()],
            &[a.clone(), b.clone()],
        )
        .await
        .unwrap();
    assert!(
        !lineage.on_branch(&b),
        "the force-pushed commit left the branch"
    );
    assert!(lineage.on_branch(&c));
    assert!(lineage.on_branch(&a));
    assert!(!lineage.descends_from(&c, &b));
    assert!(lineage.descends_from(&c, &a));
    assert!(lineage.descends_from(&b, &a));
}

#[tokio::test]
async fn lineage_agrees_with_git_across_merges() {
    let upstream = Upstream::new();
    let mut commits = vec![upstream.commit_file("f.yaml", b"a")];
    upstream.git(&["checkout", "--quiet", "-b", "feature"]);
    commits.push(upstream.commit_file("g.yaml", b"c"));
    commits.push(upstream.commit_file("g.yaml", b"d"));
    upstream.git(&["checkout", "--quiet", "main"]);
    commits.push(upstream.commit_file("f.yaml", b"b"));
    upstream.git(&["merge", "--quiet", "--no-ff", "-m", "merge", "feature"]);
    commits.push(upstream.head());
    commits.push(upstream.commit_file("f.yaml", b"e"));
    upstream.git(&["checkout", "--quiet", "feature"]);
    commits.push(upstream.commit_file("g.yaml", b"f"));
    upstream.git(&["checkout", "--quiet", "--orphan", "unrelated"]);
    commits.push(upstream.commit_file("h.yaml", b"x"));
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let source = upstream.file_url();
    mirrors.fetch(&source).await.unwrap();

    let (candidates, anchors) = commits.split_at(4);
    let lineage = mirrors
        .lineage(&source, "main", candidates, anchors)
        .await
        .unwrap();
    let is_ancestor = |ancestor: &str, descendant: &str| {
        Command::new("git")
            .current_dir(upstream.path())
            .args(["merge-base", "--is-ancestor", ancestor, descendant])
            .status()
            .unwrap()
            .success()
    };
    for x in &commits {
        assert_eq!(
            lineage.on_branch(x),
            is_ancestor(x.as_str(), "main"),
            "{x} on main"
        );
        assert!(lineage.knows(x));
        for y in &commits {
            let expected = is_ancestor(y.as_str(), x.as_str());
            assert_eq!(
                lineage.descends_from(x, y),
                expected,
                "{x} descends from {y}"
            );
        }
    }
}

#[tokio::test]
async fn deleted_branches_leave_the_mirror() {
    let upstream = Upstream::new();
    let a = upstream.commit_file("f.yaml", b"1");
    upstream.git(&["branch", "feature"]);
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let source = upstream.file_url();
    mirrors.fetch(&source).await.unwrap();
    let on_feature = |lineage: GitLineage| lineage.on_branch(&a);
    let lineage = mirrors
        .lineage(&source, "feature", std::slice::from_ref(&a), &[])
        .await;
    assert!(on_feature(lineage.unwrap()));

    upstream.git(&["branch", "--delete", "feature"]);
    mirrors.fetch(&source).await.unwrap();
    let lineage = mirrors
        .lineage(&source, "feature", std::slice::from_ref(&a), &[])
        .await;
    assert!(!on_feature(lineage.unwrap()));
    let lineage = mirrors
        .lineage(&source, "main", std::slice::from_ref(&a), &[])
        .await;
    assert!(on_feature(lineage.unwrap()));
}

#[tokio::test]
async fn lineage_of_a_mirror_never_fetched_is_empty() {
    let upstream = Upstream::new();
    let a = upstream.commit_file("f.yaml", b"1");
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let lineage = mirrors
        .lineage(
            &upstream.file_url(),
            "main",
            std::slice::from_ref(&a),
            std::slice::from_ref(&a),
        )
        .await
        .unwrap();
    assert!(!lineage.on_branch(&a));
    assert!(!lineage.descends_from(&a, &a));
    assert_eq!(mirrors.stats().fetches, 0);
}

/// A commit with manifests, files that are not, and everything that must be skipped.
fn manifest_repo() -> (Upstream, Sha, Vec<u8>) {
    let upstream = Upstream::new();
    let binary: Vec<u8> = (0..=255u8).chain([0, 0, 0xff, b'\n', b'\r']).collect();
    upstream.write("app.yaml", b"kind: Deployment\n");
    upstream.write("bin.yaml", &binary);
    upstream.write("config/map.yml", b"kind: ConfigMap\n");
    upstream.write("config/deep/crd.json", b"{\"kind\": \"CRD\"}");
    upstream.write("config/README.md", b"# not a manifest\n");
    upstream.write(".hidden/secret.yaml", b"kind: Secret\n");
    upstream.write("config/.tooling/tool.yaml", b"kind: Tool\n");
    upstream.write("config/.lint.yaml", b"rules: {}\n");
    upstream.write("empty.yaml", b"");
    upstream.write("run.yaml", b"kind: Job\n");
    std::fs::set_permissions(
        upstream.path().join("run.yaml"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("app.yaml", upstream.path().join("link.yaml")).unwrap();
    let submodule = upstream.commit("base");
    let gitlink = format!("160000,{submodule},module.yaml");
    upstream.git(&["update-index", "--add", "--cacheinfo", &gitlink]);
    upstream.git(&["commit", "--quiet", "-m", "add a submodule"]);
    let commit = upstream.head();
    (upstream, commit, binary)
}

#[tokio::test]
async fn manifests_are_the_matching_files_byte_for_byte() {
    let (upstream, commit, binary) = manifest_repo();
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let source = upstream.file_url();

    let set = mirrors.manifests(&source, &commit, &[]).await.unwrap();
    let paths: Vec<&str> = set.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "app.yaml",
            "bin.yaml",
            "config/deep/crd.json",
            "config/map.yml",
            "empty.yaml",
            "run.yaml",
        ]
    );
    let content = |path: &str| {
        set.files
            .iter()
            .find(|f| f.path == path)
            .map(|f| f.content.to_vec())
            .unwrap()
    };
    assert_eq!(content("bin.yaml"), binary);
    assert_eq!(content("app.yaml"), b"kind: Deployment\n");
    assert_eq!(content("config/deep/crd.json"), b"{\"kind\": \"CRD\"}");
    assert_eq!(content("empty.yaml"), b"");

    let mut digest = ContentDigest::new();
    for file in &set.files {
        digest.add_file(&file.path, &file.content);
    }
    assert_eq!(set.content_sha256, digest.finish());
    let total: usize = set.files.iter().map(|f| f.content.len()).sum();
    assert_eq!(set.total_bytes, total as u64);
    // The commit was fetched on demand.
    assert_eq!(
        mirrors.stats(),
        GitStats {
            fetches: 1,
            reads: 1
        }
    );
}

#[tokio::test]
async fn a_root_gitlab_ci_file_is_no_manifest_with_the_default_paths() {
    let upstream = Upstream::new();
    upstream.write(
        ".gitlab-ci.yml",
        b"stages: [test, deploy]\ntest:\n  script: [make test]\n",
    );
    upstream.write(
        "deploy/app.yaml",
        b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: app}\n",
    );
    let commit = upstream.commit("a typical repository");
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let set = mirrors
        .manifests(&upstream.file_url(), &commit, &[])
        .await
        .unwrap();
    let paths: Vec<&str> = set.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["deploy/app.yaml"]);
    // Named explicitly, a dot-file stays skipped like a dot-directory.
    let named = mirrors
        .manifests(&upstream.file_url(), &commit, &strings(&[".gitlab-ci.yml"]))
        .await;
    assert_eq!(
        named,
        Err(GitError::NoMatch {
            patterns: strings(&[".gitlab-ci.yml"])
        })
    );
}

#[tokio::test]
async fn manifests_follow_the_globs() {
    let (upstream, commit, _) = manifest_repo();
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let source = upstream.file_url();
    let paths = |set: Arc<ManifestSet>| -> Vec<String> {
        set.files.iter().map(|f| f.path.clone()).collect()
    };

    let shallow = mirrors
        .manifests(&source, &commit, &strings(&["config/*"]))
        .await
        .unwrap();
    assert_eq!(paths(shallow), ["config/README.md", "config/map.yml"]);
    let deep = mirrors
        .manifests(&source, &commit, &strings(&["config/**/*.{json,yml}"]))
        .await
        .unwrap();
    assert_eq!(paths(deep), ["config/deep/crd.json", "config/map.yml"]);
    let several = mirrors
        .manifests(&source, &commit, &strings(&["*.yaml", "**/*.md"]))
        .await
        .unwrap();
    assert_eq!(
        paths(several),
        [
            "app.yaml",
            "bin.yaml",
            "config/README.md",
            "empty.yaml",
            "run.yaml"
        ]
    );
    // Dot-directories stay skipped even when named.
    let hidden = mirrors
        .manifests(&source, &commit, &strings(&[".hidden/*.yaml"]))
        .await;
    assert_eq!(
        hidden,
        Err(GitError::NoMatch {
            patterns: strings(&[".hidden/*.yaml"])
        })
    );
}

#[tokio::test]
async fn no_match_is_an_error_that_is_not_cached() {
    let (upstream, commit, _) = manifest_repo();
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let source = upstream.file_url();
    let patterns = strings(&["nothing/**/*.yaml"]);

    let err = mirrors
        .manifests(&source, &commit, &patterns)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        GitError::NoMatch {
            patterns: patterns.clone()
        }
    );
    assert!(!err.retryable());
    assert!(
        mirrors
            .manifests(&source, &commit, &patterns)
            .await
            .is_err()
    );
    assert_eq!(mirrors.stats().reads, 2, "a failed read is tried again");
}

#[tokio::test]
async fn limits_are_enforced() {
    let upstream = Upstream::new();
    upstream.write("a.yaml", &[b'a'; 100]);
    upstream.write("b.yaml", &[b'b'; 60]);
    upstream.write("c/d.yaml", &[b'd'; 60]);
    let commit = upstream.commit("three files");
    let source = upstream.file_url();
    let check = |limits: Limits| {
        let source = source.clone();
        let commit = commit.clone();
        async move {
            let Fixture {
                cache: _cache,
                mirrors,
            } = mirrors_with(limits, Duration::from_secs(30));
            mirrors.manifests(&source, &commit, &[]).await
        }
    };
    let roomy = Limits {
        max_file_bytes: 100,
        max_total_bytes: 220,
        max_files: 3,
        max_tree_entries: 100,
    };
    assert_eq!(check(roomy).await.unwrap().files.len(), 3);

    let err = check(Limits {
        max_file_bytes: 99,
        ..roomy
    })
    .await
    .unwrap_err();
    assert_eq!(
        err,
        GitError::FileTooLarge {
            path: "a.yaml".into(),
            bytes: 100,
            limit: 99
        }
    );
    assert!(!err.retryable());
    let err = check(Limits {
        max_total_bytes: 219,
        ..roomy
    })
    .await
    .unwrap_err();
    assert_eq!(
        err,
        GitError::TotalTooLarge {
            bytes: 220,
            limit: 219
        }
    );
    let err = check(Limits {
        max_files: 2,
        ..roomy
    })
    .await
    .unwrap_err();
    assert_eq!(err, GitError::TooManyFiles { limit: 2 });
    let err = check(Limits {
        max_tree_entries: 2,
        ..roomy
    })
    .await
    .unwrap_err();
    assert_eq!(err, GitError::TreeTooLarge { limit: 2 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_that_lists_one_subtree_over_and_over_is_refused_not_walked() {
    // Eight levels of directories, each listing the same ten-entry subtree ten times: a few
    // hundred bytes of objects that name 10^8 paths.
    let upstream = Upstream::new();
    let blob = upstream.git_with_input(&["hash-object", "-w", "--stdin"], b"kind: ConfigMap\n");
    let mut tree = upstream.git_with_input(
        &["mktree"],
        (0..10)
            .map(|i| format!("100644 blob {blob}\tf{i}.yaml\n"))
            .collect::<String>()
            .as_bytes(),
    );
    for _ in 0..8 {
        tree = upstream.git_with_input(
            &["mktree"],
            (0..10)
                .map(|i| format!("040000 tree {tree}\td{i}\n"))
                .collect::<String>()
                .as_bytes(),
        );
    }
    let commit = upstream.git(&["commit-tree", &tree, "-m", "bomb"]);
    upstream.git(&["update-ref", "refs/heads/main", &commit]);
    // Without the entry bound only max_files would stop the walk, and no file limit is
    // set here: the walk must stop at the entries' limit.
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors_with(
        Limits {
            max_files: usize::MAX,
            max_tree_entries: 10_000,
            ..Limits::default()
        },
        Duration::from_secs(30),
    );
    let err = mirrors
        .manifests(&upstream.file_url(), &Sha::parse(&commit).unwrap(), &[])
        .await
        .unwrap_err();
    assert_eq!(err, GitError::TreeTooLarge { limit: 10_000 });
    assert!(err.to_string().contains("git.max_tree_entries"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reads_of_one_commit_share_one_read() {
    let (upstream, commit, _) = manifest_repo();
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let source = upstream.file_url();

    let callers: Vec<_> = (0..100)
        .map(|_| {
            let mirrors = mirrors.clone();
            let source = source.clone();
            let commit = commit.clone();
            tokio::spawn(async move { mirrors.manifests(&source, &commit, &[]).await })
        })
        .collect();
    let mut sets = Vec::new();
    for caller in callers {
        sets.push(caller.await.unwrap().unwrap());
    }
    assert!(sets.iter().all(|set| Arc::ptr_eq(set, &sets[0])));
    assert_eq!(
        mirrors.stats(),
        GitStats {
            fetches: 1,
            reads: 1
        }
    );

    // Later callers hit the cache, also with the same globs in another order.
    let defaults = strings(&["**/*.{yaml,yml,json}"]);
    let again = mirrors
        .manifests(&source, &commit, &defaults)
        .await
        .unwrap();
    assert!(Arc::ptr_eq(&again, &sets[0]));
    assert_eq!(mirrors.stats().reads, 1);
    let two = strings(&["*.yaml", "config/*"]);
    let reversed = strings(&["config/*", "*.yaml"]);
    let first = mirrors.manifests(&source, &commit, &two).await.unwrap();
    let second = mirrors
        .manifests(&source, &commit, &reversed)
        .await
        .unwrap();
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(mirrors.stats().reads, 2);
}

#[tokio::test]
async fn the_cache_keeps_only_recent_sets() {
    let upstream = Upstream::new();
    let commits: Vec<Sha> = (0..10)
        .map(|n| upstream.commit_file("a.yaml", format!("n: {n}\n").as_bytes()))
        .collect();
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let source = upstream.file_url();
    for commit in &commits {
        mirrors.manifests(&source, commit, &[]).await.unwrap();
    }
    assert_eq!(lock(&mirrors.inner.manifests).len(), 8);
    mirrors.manifests(&source, &commits[9], &[]).await.unwrap();
    assert_eq!(mirrors.stats().reads, 10);
    mirrors.manifests(&source, &commits[0], &[]).await.unwrap();
    assert_eq!(mirrors.stats().reads, 11, "the oldest set was evicted");
}

#[tokio::test]
async fn an_unreachable_repository_is_retryable() {
    let gone = tempfile::tempdir().unwrap();
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    for url in [
        gone.path().join("nothing-here").display().to_string(),
        format!("file://{}/nothing-here", gone.path().display()),
    ] {
        let source = RepoSource {
            url: url.clone(),
            token_file: None,
        };
        let err = mirrors.fetch(&source).await.unwrap_err();
        assert!(
            matches!(&err, GitError::Unreachable { url: shown, .. } if *shown == url),
            "{err:?}"
        );
        assert!(err.retryable());
        let err = mirrors.ensure_commit(&source, &unknown_sha()).await;
        assert!(matches!(err, Err(GitError::Unreachable { .. })), "{err:?}");
        let err = mirrors.manifests(&source, &unknown_sha(), &[]).await;
        assert!(matches!(err, Err(GitError::Unreachable { .. })), "{err:?}");
    }
}

#[tokio::test]
async fn an_invalid_glob_fails_before_any_git_work() {
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let source = RepoSource {
        url: "/nonexistent".into(),
        token_file: None,
    };
    let err = mirrors
        .manifests(&source, &unknown_sha(), &strings(&["*.yaml", "a/{b"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, GitError::InvalidGlob { pattern, .. } if pattern == "a/{b"),
        "{err:?}"
    );
    assert!(!err.retryable());
    assert_eq!(mirrors.stats(), GitStats::default());
}

#[tokio::test]
async fn a_stalled_fetch_times_out() {
    // A git daemon that accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let connection = listener.accept().unwrap();
        let _ = released.recv();
        // Closing the listener also resets connections still waiting to be accepted.
        drop((connection, listener));
    });
    let timeout = Duration::from_millis(300);
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors_with(Limits::default(), timeout);
    let source = RepoSource {
        url: format!("git://127.0.0.1:{port}/repo.git"),
        token_file: None,
    };
    let started = std::time::Instant::now();
    let err = mirrors.fetch(&source).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        err,
        GitError::Timeout {
            url: source.url.clone(),
            after: timeout
        }
    );
    assert!(err.retryable());
    // Whether it waits for the stalled fetch or starts its own, the next caller times out too.
    assert!(matches!(
        mirrors.fetch(&source).await,
        Err(GitError::Timeout { .. })
    ));
    release.send(()).unwrap();
    server.join().unwrap();
}

#[test]
fn errors_read_well() {
    let err = GitError::FileTooLarge {
        path: "big.yaml".into(),
        bytes: 6,
        limit: 5,
    };
    assert_eq!(
        err.to_string(),
        "big.yaml has 6 bytes, more than the limit of 5 bytes per file"
    );
    assert_eq!(Limits::default().max_file_bytes, 5 * 1024 * 1024);
    assert_eq!(Limits::default().max_total_bytes, 20 * 1024 * 1024);
    assert_eq!(Limits::default().max_files, 1000);
}

/// Mirrors of the cache directory `cache`, deleting unneeded ones above `max_cache_bytes`.
fn capped_mirrors(cache: &Path, max_cache_bytes: u64) -> Mirrors {
    Mirrors::new(GitSettings {
        cache_dir: cache.join("mirrors"),
        fetch_timeout: Duration::from_secs(30),
        limits: Limits::default(),
        maintenance_interval: Some(Duration::from_secs(3600)),
        max_cache_bytes: Some(max_cache_bytes),
    })
}

fn mirror_of(mirrors: &Mirrors, source: &RepoSource) -> PathBuf {
    mirror::mirror_dir(&mirrors.inner.settings.cache_dir, &source.url)
}

/// The packs of a mirror, as `git` counts them.
fn packs(mirror: &Path) -> usize {
    std::fs::read_dir(mirror.join("objects/pack"))
        .unwrap()
        .filter(|e| {
            let path = e.as_ref().unwrap().path();
            path.extension().is_some_and(|ext| ext == "pack")
        })
        .count()
}

#[tokio::test]
async fn upkeep_folds_the_packs_of_many_fetches_into_one_and_keeps_every_commit() {
    let upstream = Upstream::new();
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let source = upstream.file_url();
    let mut commits = Vec::new();
    for n in 0..5 {
        commits.push(upstream.commit_file("a.yaml", format!("n: {n}\n").as_bytes()));
        mirrors.fetch(&source).await.unwrap();
    }
    // A force push leaves a fetched commit on no branch; a pin may still name it.
    upstream.git(&["reset", "--quiet", "--hard", commits[3].as_str()]);
    let replaced = commits.pop().unwrap();
    commits.push(upstream.commit_file("a.yaml", b"n: 5\n"));
    mirrors.fetch(&source).await.unwrap();
    let mirror = mirror_of(&mirrors, &source);
    assert_eq!(packs(&mirror), 6, "gix writes one pack per fetch");

    let stop = CancellationToken::new();
    let report = mirrors.upkeep_once(&mirrors.needed([]), &stop).await;
    assert_eq!(
        report.mirrors,
        [(mirror.clone(), upkeep::MirrorUpkeep::Repacked { packs: 6 })]
    );
    assert_eq!(packs(&mirror), 1);
    assert!(
        !std::fs::read_dir(mirror.join("objects/pack"))
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".keep")),
        "nothing keeps a pack out of the next repack"
    );

    for (n, commit) in commits.iter().enumerate() {
        let set = mirrors.manifests(&source, commit, &[]).await.unwrap();
        let expected = if n == 4 {
            "n: 5\n".to_owned()
        } else {
            format!("n: {n}\n")
        };
        assert_eq!(
            set.files[0].content.as_ref(),
            expected.as_bytes(),
            "{commit}"
        );
    }
    let unreachable = mirrors.manifests(&source, &replaced, &[]).await.unwrap();
    assert_eq!(unreachable.files[0].content.as_ref(), b"n: 4\n");
    let lineage = mirrors
        .lineage(&source, "main", &commits, std::slice::from_ref(&commits[0]))
        .await
        .unwrap();
    assert!(commits.iter().all(|c| lineage.on_branch(c)));
    assert!(lineage.descends_from(&commits[4], &commits[0]));
    assert_eq!(
        mirrors.stats().fetches,
        6,
        "every read was answered without a fetch"
    );

    let again = mirrors.upkeep_once(&mirrors.needed([]), &stop).await;
    assert_eq!(
        again.mirrors,
        [(mirror.clone(), upkeep::MirrorUpkeep::Compact)]
    );
    assert_eq!(again.cache_bytes, upkeep::disk_bytes(&mirror));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upkeep_waits_while_a_fetch_holds_the_mirror() {
    let upstream = Upstream::new();
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    let source = upstream.file_url();
    for n in 0..3 {
        upstream.commit_file("a.yaml", format!("n: {n}\n").as_bytes());
        mirrors.fetch(&source).await.unwrap();
    }
    let mirror = mirror_of(&mirrors, &source);
    assert_eq!(packs(&mirror), 3);

    // What a running fetch holds.
    let fetching = mirrors.repo(&source).slot.clone().lock_owned().await;
    let upkeep = tokio::spawn({
        let mirrors = mirrors.clone();
        async move {
            let stop = CancellationToken::new();
            mirrors.upkeep_once(&mirrors.needed([]), &stop).await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!upkeep.is_finished(), "upkeep waits for the fetch");
    assert_eq!(packs(&mirror), 3);
    drop(fetching);
    let report = tokio::time::timeout(Duration::from_secs(30), upkeep)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        report.mirrors,
        [(mirror.clone(), upkeep::MirrorUpkeep::Repacked { packs: 3 })]
    );
    assert_eq!(packs(&mirror), 1);
}

/// A stand-in for a long repack that writes its pid and that of a child of its own, as git
/// repack has pack-objects.
fn slow_repack(pids: &Path) -> impl FnOnce() -> tokio::process::Command + use<> {
    let script = format!(
        "sleep 60 & echo $$ $! > {}.tmp; mv {0}.tmp {0}; wait",
        pids.display()
    );
    move || {
        let mut command = tokio::process::Command::new("sh");
        command.args(["-c", &script]);
        command
    }
}

async fn written_pids(path: &Path) -> Vec<u32> {
    for _ in 0..200 {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text
                .split_whitespace()
                .map(|p| p.parse().unwrap())
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the command never started");
}

/// Whether `pid` still runs; a zombie nobody reaped yet does not.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

/// Whether every one of `pids` ends within moments: a kill is delivered asynchronously.
async fn all_end(pids: &[u32]) -> bool {
    for _ in 0..100 {
        if !pids.iter().any(|pid| running(*pid)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_stops_a_repack_of_its_mirror_and_never_runs_beside_it() {
    let upstream = Upstream::new();
    let Fixture { cache, mirrors } = mirrors();
    let source = upstream.file_url();
    for n in 0..2 {
        upstream.commit_file("a.yaml", format!("n: {n}\n").as_bytes());
        mirrors.fetch(&source).await.unwrap();
    }
    let pids = cache.path().join("pids");
    let repo = mirrors.repo(&source);
    let stop = CancellationToken::new();
    let repack = tokio::spawn({
        let command = slow_repack(&pids);
        let stop = stop.clone();
        async move { upkeep::maintain(&repo, command, Duration::from_secs(60), &stop).await }
    });
    let started = written_pids(&pids).await;
    assert!(started.iter().all(|pid| running(*pid)));

    let pushed = upstream.commit_file("a.yaml", b"n: 2\n");
    let asked = std::time::Instant::now();
    mirrors.fetch(&source).await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    assert!(mirrors.has_commit(&source, &pushed).await);
    assert_eq!(repack.await.unwrap(), upkeep::MirrorUpkeep::Interrupted);
    // The slot was given up only once the repack and its child were killed.
    assert!(all_end(&started).await, "{started:?}");
}

#[tokio::test]
async fn a_repack_that_overruns_is_killed_and_frees_the_mirror() {
    let upstream = Upstream::new();
    let Fixture { cache, mirrors } = mirrors();
    let source = upstream.file_url();
    for n in 0..2 {
        upstream.commit_file("a.yaml", format!("n: {n}\n").as_bytes());
        mirrors.fetch(&source).await.unwrap();
    }
    let pids = cache.path().join("pids");
    let repo = mirrors.repo(&source);
    let outcome = upkeep::maintain(
        &repo,
        slow_repack(&pids),
        Duration::from_millis(300),
        &CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(&outcome, upkeep::MirrorUpkeep::Failed { message } if message.contains("did not finish")),
        "{outcome:?}"
    );
    let started = written_pids(&pids).await;
    assert!(all_end(&started).await, "{started:?}");
    let slot = repo.slot.try_lock();
    assert!(slot.is_ok(), "the mirror is free again");
}

#[tokio::test]
async fn the_cache_cap_deletes_unneeded_mirrors_least_recently_used_first_never_a_needed_one() {
    let (needed, older, newer) = (Upstream::new(), Upstream::new(), Upstream::new());
    let commits: Vec<Sha> = [&needed, &older, &newer]
        .iter()
        .map(|u| u.commit_file("a.yaml", b"a: 1\n"))
        .collect();
    let cache = tempfile::tempdir().unwrap();
    let (needed, older, newer) = (needed.file_url(), older.file_url(), newer.file_url());

    // Used in this order: the older unneeded mirror is the least recently used.
    let mirrors = capped_mirrors(cache.path(), u64::MAX);
    for source in [&older, &newer, &needed] {
        mirrors.fetch(source).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dirs: Vec<PathBuf> = [&needed, &older, &newer]
        .iter()
        .map(|s| mirror_of(&mirrors, s))
        .collect();
    let total: u64 = dirs.iter().map(|d| upkeep::disk_bytes(d)).sum();
    let stop = CancellationToken::new();
    let report = mirrors
        .upkeep_once(&mirrors.needed([needed.clone()]), &stop)
        .await;
    assert_eq!(report.cache_bytes, total);
    assert!(
        dirs.iter().all(|d| d.is_dir()),
        "under the cap nothing goes"
    );

    // One byte too many: deleting the least recently used unneeded mirror is enough. A new
    // process knows the order from what the last pass wrote down.
    let mirrors = capped_mirrors(cache.path(), total - 1);
    let report = mirrors
        .upkeep_once(&mirrors.needed([needed.clone()]), &stop)
        .await;
    let removed: Vec<&PathBuf> = report
        .mirrors
        .iter()
        .filter(|(_, outcome)| matches!(outcome, upkeep::MirrorUpkeep::Removed { .. }))
        .map(|(dir, _)| dir)
        .collect();
    assert_eq!(removed, [&dirs[1]]);
    assert!(!dirs[1].exists());
    assert!(dirs[0].is_dir() && dirs[2].is_dir());
    assert!(report.over_cap.is_empty());

    // A cap nothing fits under: every unneeded mirror goes, the needed one stays and is named.
    let mirrors = capped_mirrors(cache.path(), 1);
    let report = mirrors
        .upkeep_once(&mirrors.needed([needed.clone()]), &stop)
        .await;
    assert!(!dirs[2].exists());
    assert!(dirs[0].is_dir());
    assert_eq!(report.over_cap, [display_url(&needed.url)]);
    assert_eq!(report.cache_bytes, upkeep::disk_bytes(&dirs[0]));
    let leftovers: Vec<_> = std::fs::read_dir(cache.path().join("mirrors"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");

    // The next fetch of a deleted mirror clones it anew.
    assert!(!mirrors.has_commit(&older, &commits[1]).await);
    let set = mirrors.manifests(&older, &commits[1], &[]).await.unwrap();
    assert_eq!(set.files[0].content.as_ref(), b"a: 1\n");
    assert!(dirs[1].is_dir());
}

#[tokio::test]
async fn upkeep_that_is_off_returns_at_once() {
    let Fixture {
        cache: _cache,
        mirrors,
    } = mirrors();
    tokio::time::timeout(
        Duration::from_secs(5),
        mirrors.upkeep(Vec::new, CancellationToken::new()),
    )
    .await
    .unwrap();
}
