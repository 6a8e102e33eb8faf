//! Manifests from git: the files of the gated commit, ordered by real ancestry.

use greenlight_e2e::*;

/// A server on its own Redis and mirror cache, serving agents of one repository.
pub(crate) struct Setup {
    _redis: Redis,
    _cache: tempfile::TempDir,
    pub(crate) server: TestServer,
}

/// Starts a server whose `agents` (name and paths) watch `repo`, with `git_extra` appended
/// to its git settings.
pub(crate) async fn setup(
    repo: &GitRepo,
    git_extra: &str,
    agents: &[(&str, &[&str])],
) -> anyhow::Result<Setup> {
    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let agents: Vec<String> = agents
        .iter()
        .map(|(name, paths)| git_agent_yaml(name, &repo.url(), paths))
        .collect();
    let server = TestServer::start(&git_config_yaml(
        &redis.url(),
        cache.path(),
        git_extra,
        &agents,
    ))
    .await?;
    Ok(Setup {
        _redis: redis,
        _cache: cache,
        server,
    })
}

/// Waits until GetAgent shows a sync error containing `needle`.
pub(crate) async fn wait_for_sync_error(
    server: &TestServer,
    agent: &str,
    needle: &str,
) -> anyhow::Result<String> {
    eventually(&format!("a sync error containing {needle:?}"), || async {
        let status = server.agent_status(agent).await?;
        Ok(status
            .sync_error
            .contains(needle)
            .then_some(status.sync_error))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_commit_delivers_exactly_its_matching_files() -> anyhow::Result<()> {
    let repo = GitRepo::new()?;
    let binary: Vec<u8> = (0..=255u8).collect();
    let x = repo.commit(
        &[
            ("deploy/app/deployment.yaml", b"kind: Deployment\n"),
            ("deploy/app/service.yml", b"kind: Service\n"),
            ("deploy/app/config.json", &binary),
            ("deploy/.hidden/secret.yaml", b"kind: Secret\n"),
            ("docs/readme.md", b"# not a manifest\n"),
            ("other/ignored.yaml", b"kind: ConfigMap\n"),
        ],
        &[],
    )?;
    let s = setup(&repo, "", &[("prod", &["deploy/**/*.{yaml,yml,json}"])]).await?;
    let mut stream = s.server.stream("prod").await?;
    s.server.push("main", ZERO, &x).await?;
    s.server.pipeline("main", &x, 1, "success", "push").await?;
    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.sha(), x);
    let paths: Vec<&str> = revision.files.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "deploy/app/config.json",
            "deploy/app/deployment.yaml",
            "deploy/app/service.yml"
        ]
    );
    assert_eq!(revision.files[0].1, binary, "byte for byte");
    assert_eq!(revision.files[1].1, b"kind: Deployment\n");
    let settings = revision.header.settings.clone().unwrap_or_default();
    assert_eq!(settings.default_namespace, "apps");
    assert!(settings.prune);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_gitlab_ci_file_is_not_delivered_with_the_default_paths() -> anyhow::Result<()> {
    let repo = GitRepo::new()?;
    let manifest = configmap("settings", "x");
    // Every GitLab project has one and it matches `*.yml`, yet it is no Kubernetes object:
    // delivered, it would make the agent refuse the whole revision.
    let x = repo.commit(
        &[
            (
                ".gitlab-ci.yml",
                b"stages: [test, deploy]\ntest:\n  script: [make test]\n",
            ),
            ("app.yaml", manifest.as_bytes()),
        ],
        &[],
    )?;
    let s = setup(&repo, "", &[("prod", &[])]).await?;
    let mut stream = s.server.stream("prod").await?;
    s.server.push("main", ZERO, &x).await?;
    s.server.pipeline("main", &x, 1, "success", "push").await?;
    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.sha(), x);
    let paths: Vec<&str> = revision.files.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["app.yaml"]);
    assert_eq!(revision.files[0].1, manifest.as_bytes());
    let status = s.server.agent_status("prod").await?;
    assert_eq!(status.sync_error, "", "no sync error");
    assert_eq!(status.desired.unwrap_or_default().sha, x);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_larger_than_one_message_arrive_complete() -> anyhow::Result<()> {
    let repo = GitRepo::new()?;
    let mut files: Vec<(String, Vec<u8>)> = (0..39)
        .map(|i| {
            (
                format!("m/{i:02}.yaml"),
                format!("# file {i}\n").repeat(5_700).into_bytes(),
            )
        })
        .collect();
    files.push(("m/big.yaml".into(), b"x: y\n".repeat(1024 * 1024 / 5 + 1)));
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_slice()))
        .collect();
    let x = repo.commit(&refs, &[])?;
    let total: usize = files.iter().map(|(_, c)| c.len()).sum();
    assert!(total > 3 * 1024 * 1024, "the set is {total} bytes");
    let s = setup(&repo, "", &[("prod", &[])]).await?;
    let mut stream = s.server.stream("prod").await?;
    s.server.push("main", ZERO, &x).await?;
    s.server.pipeline("main", &x, 1, "success", "push").await?;
    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.files.len(), 40);
    files.sort();
    let received: Vec<(String, Vec<u8>)> = revision.files.clone();
    assert_eq!(received, files);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_that_do_not_descend_from_the_deployed_one_are_never_chosen() -> anyhow::Result<()>
{
    let repo = GitRepo::new()?;
    let a = repo.commit(&[("a.yaml", b"a: 1\n")], &[])?;
    let b = repo.commit(&[("a.yaml", b"a: 2\n")], &[])?;
    let s = setup(&repo, "", &[("prod", &[])]).await?;
    let mut stream = s.server.stream("prod").await?;
    s.server.push("main", ZERO, &a).await?;
    s.server.push("main", &a, &b).await?;
    s.server.pipeline("main", &b, 2, "success", "push").await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), b);

    // Force push: main goes back to a, then a new line of history grows from it.
    repo.reset_hard(&a)?;
    let c = repo.commit(&[("a.yaml", b"a: 3\n")], &[])?;
    s.server.push("main", &b, &c).await?;
    // A late success of the old line's a arrives: it is an ancestor of b, never again chosen.
    s.server.pipeline("main", &a, 1, "success", "push").await?;
    no_revision(&mut stream, QUIET).await?;
    s.server.pipeline("main", &c, 3, "success", "push").await?;
    assert_eq!(
        next_revision(&mut stream, SOON).await?.sha(),
        c,
        "the new line is deployed once green"
    );

    // b is off the branch now: its retried pipeline cannot bring it back.
    s.server.pipeline("main", &b, 4, "success", "push").await?;
    no_revision(&mut stream, QUIET).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_agents_on_one_project_cost_one_fetch_and_one_read() -> anyhow::Result<()> {
    let repo = GitRepo::new()?;
    let x = repo.commit(&[("app.yaml", b"kind: ConfigMap\n")], &[])?;
    let names: Vec<String> = (0..60).map(|i| format!("agent-{i}")).collect();
    let agents: Vec<(&str, &[&str])> = names.iter().map(|n| (n.as_str(), &[][..])).collect();
    let s = setup(&repo, "", &agents).await?;
    let mut streams = Vec::new();
    for name in &names {
        streams.push(s.server.stream(name).await?);
    }
    let fetches_before = metric(&s.server, "greenlight_git_fetches_total").await?;
    s.server.push("main", ZERO, &x).await?;
    s.server.pipeline("main", &x, 1, "success", "push").await?;
    for stream in &mut streams {
        assert_eq!(next_revision(stream, SOON).await?.sha(), x);
    }
    assert_eq!(
        metric(&s.server, "greenlight_manifest_reads_total").await?,
        1.0
    );
    let fetches = metric(&s.server, "greenlight_git_fetches_total").await? - fetches_before;
    assert!(fetches <= 1.0, "{fetches} fetches for one push");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_visible_and_the_last_good_revision_stays() -> anyhow::Result<()> {
    let repo = GitRepo::new()?;
    let good = repo.commit(&[("app.yaml", b"kind: ConfigMap\n")], &[])?;
    let s = setup(
        &repo,
        ", max_file_bytes: 1KiB",
        &[("prod", &[]), ("narrow", &["nothing/**/*.yaml"])],
    )
    .await?;
    let mut stream = s.server.stream("prod").await?;
    s.server.push("main", ZERO, &good).await?;
    s.server
        .pipeline("main", &good, 1, "success", "push")
        .await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), good);
    let error = wait_for_sync_error(&s.server, "narrow", "matches the path globs").await?;
    assert!(error.contains("nothing/**/*.yaml"), "{error}");

    let big = repo.commit(&[("app.yaml", &[b'#'; 4096])], &[])?;
    s.server.push("main", &good, &big).await?;
    s.server
        .pipeline("main", &big, 2, "success", "push")
        .await?;
    let error = wait_for_sync_error(&s.server, "prod", "app.yaml").await?;
    assert!(error.contains("4096"), "{error}");
    no_revision(&mut stream, QUIET).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_repository_is_reported_not_fatal() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let agents = [git_agent_yaml(
        "prod",
        "file:///nonexistent/greenlight/repo",
        &[],
    )];
    let server =
        TestServer::start(&git_config_yaml(&redis.url(), cache.path(), "", &agents)).await?;
    server.push("main", ZERO, &sha(1)).await?;
    server
        .pipeline("main", &sha(1), 1, "success", "push")
        .await?;
    let error = wait_for_sync_error(&server, "prod", "cannot fetch").await?;
    assert!(error.contains("nonexistent"), "{error}");
    let status = server.agent_status("prod").await?;
    assert!(status.desired.is_none(), "nothing unverifiable is deployed");
    Ok(())
}

/// A fetch error is shown while the repository cannot be fetched, and cleared by the first
/// fetch that succeeds: the revision then goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_error_is_cleared_once_the_repository_answers() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let links = tempfile::tempdir()?;
    // The configured path exists only once the repository is linked there.
    let path = links.path().join("repo");
    let agents = [git_agent_yaml(
        "prod",
        &format!("file://{}", path.display()),
        &[],
    )];
    let server =
        TestServer::start(&git_config_yaml(&redis.url(), cache.path(), "", &agents)).await?;
    let repo = GitRepo::new()?;
    let first = repo.commit(&[("app.yaml", b"v: 1\n")], &[])?;
    server.push("main", ZERO, &first).await?;
    server
        .pipeline("main", &first, 1, "success", "push")
        .await?;
    wait_for_sync_error(&server, "prod", "cannot fetch").await?;

    let target = repo.url();
    std::os::unix::fs::symlink(target.strip_prefix("file://").unwrap_or(&target), &path)?;
    let second = repo.commit(&[("app.yaml", b"v: 2\n")], &[])?;
    let mut stream = server.stream("prod").await?;
    server.push("main", &first, &second).await?;
    server
        .pipeline("main", &second, 2, "success", "push")
        .await?;
    // `first` may go out on its own once it can be read, before `second` is decided.
    let mut delivered = next_revision(&mut stream, SOON).await?.sha().to_owned();
    if delivered == first {
        delivered = next_revision(&mut stream, SOON).await?.sha().to_owned();
    }
    assert_eq!(delivered, second);
    let status = eventually("the fetch error cleared", || async {
        let status = server.agent_status("prod").await?;
        Ok(status.sync_error.is_empty().then_some(status))
    })
    .await?;
    assert_eq!(status.desired.map(|d| d.sha), Some(second));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_not_yet_fetched_is_fetched_then_deployed() -> anyhow::Result<()> {
    let repo = GitRepo::new()?;
    let first = repo.commit(&[("app.yaml", b"v: 1\n")], &[])?;
    let s = setup(&repo, "", &[("prod", &[])]).await?;
    let mut stream = s.server.stream("prod").await?;
    s.server.push("main", ZERO, &first).await?;
    s.server
        .pipeline("main", &first, 1, "success", "push")
        .await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), first);

    // The pipeline result arrives before the push webhook: the mirror has never seen it.
    let second = repo.commit(&[("app.yaml", b"v: 2\n")], &[])?;
    s.server
        .pipeline("main", &second, 2, "success", "push")
        .await?;
    s.server.push("main", &first, &second).await?;
    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.sha(), second);
    assert_eq!(revision.files[0].1, b"v: 2\n");
    Ok(())
}
