//! Closing the loop with CI and people: commit statuses posted to GitLab, catching up after
//! missed webhooks, `greenlightctl wait` exit codes and CI tokens.

use std::path::Path;

use anyhow::{Context as _, ensure};

use greenlight::auth::Bearer;
use greenlight::digest::sha256_hex;
use greenlight::v1::admin_service_client::AdminServiceClient;
use greenlight::v1::{
    CommitInfo, GetAgentRequest, GetRefRequest, PauseSyncRequest, Phase, PipelineStatus,
    WatchRevisionRequest, decision,
};
use greenlight_e2e::control_plane::TestCluster;
use greenlight_e2e::fake_gitlab::FakeGitLab;
use greenlight_e2e::*;
use greenlight_server::store::ChangeLog;
use serde_json::json;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// What the server sends GitLab as `PRIVATE-TOKEN`.
/// The CI token of agent `prod`.
const CI_TOKEN: &str = "ci-token-prod";
/// Where statuses link to.
const TARGET_BASE: &str = "https://greenlight.example/";

/// The agent entry of `prod` (with the CI token) plus `extra` keys.
fn prod_agent(repository: &str, extra: &str) -> String {
    format!(
        "{}    ci_token_sha256: \"{}\"\n{extra}",
        git_agent_yaml("prod", repository, &[]),
        sha256_hex(CI_TOKEN.as_bytes())
    )
}

/// A server config with git, the given agents and a `gitlab:` section pointing at `gitlab`.
fn close_loop_yaml(
    redis_url: &str,
    cache: &Path,
    gitlab: &FakeGitLab,
    catch_up_interval: Option<&str>,
    agents: &[String],
) -> String {
    let mut yaml = git_config_yaml(redis_url, cache, "", agents);
    let interval = catch_up_interval
        .map(|i| format!(", catch_up_interval: {i}"))
        .unwrap_or_default();
    yaml.push_str(&gitlab.config(&format!(", status_target_url: \"{TARGET_BASE}\"{interval}")));
    yaml
}

struct World {
    redis: Redis,
    cache: tempfile::TempDir,
    repo: GitRepo,
    gitlab: FakeGitLab,
    server: TestServer,
    cluster: TestCluster,
}

/// A server with GitLab configured, agent `prod` (with `prod_extra`) and, when given, agent
/// `staging` on the same repository with `staging_extra`; `None` without a control plane.
async fn world(prod_extra: &str, staging_extra: Option<&str>) -> anyhow::Result<Option<World>> {
    world_with(prod_extra, staging_extra, None).await
}

/// The test's body runs only where a control plane is built (always in CI).
macro_rules! world {
    ($world:expr) => {
        match $world.await? {
            Some(w) => w,
            None => return Ok(()),
        }
    };
}

async fn world_with(
    prod_extra: &str,
    staging_extra: Option<&str>,
    catch_up_interval: Option<&str>,
) -> anyhow::Result<Option<World>> {
    let Some(cluster) = TestCluster::new().await? else {
        return Ok(None);
    };
    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let repo = GitRepo::new()?;
    let gitlab = FakeGitLab::start().await?;
    let mut agents = vec![cluster.agent_entry(&prod_agent(&repo.url(), prod_extra))];
    if let Some(extra) = staging_extra {
        agents.push(cluster.agent_entry(&format!(
            "{}{extra}",
            git_agent_yaml("staging", &repo.url(), &[])
        )));
    }
    let yaml = close_loop_yaml(
        &redis.url(),
        cache.path(),
        &gitlab,
        catch_up_interval,
        &agents,
    );
    let server = TestServer::start(&yaml).await?;
    Ok(Some(World {
        redis,
        cache,
        repo,
        gitlab,
        server,
        cluster,
    }))
}

/// Makes the fake GitLab hold pipeline `id` of `sha` on `main` in `status`, as the real one
/// does before it sends the hook: the server confirms gate-opening claims through the API.
fn gitlab_holds(gitlab: &FakeGitLab, sha: &str, id: u64, status: &str) {
    gitlab.put_pipeline(PROJECT, api_pipeline(sha, id, status));
}

impl World {
    /// Starts replica `identity` of agent `name`.
    fn agent(&self, name: &str, identity: &str) -> AgentProcess {
        AgentProcess::start_in(
            &self.server,
            name,
            self.cluster.agent_kube.clone(),
            identity,
            &self.cluster.home,
        )
    }

    /// A pipeline hook for `sha` on `main`, with GitLab's API agreeing.
    async fn pipeline(&self, sha: &str, id: u64, status: &str) -> anyhow::Result<u16> {
        gitlab_holds(&self.gitlab, sha, id, status);
        self.server.pipeline("main", sha, id, status, "push").await
    }

    /// Pushes `sha` after `before` and marks its pipeline green, with GitLab agreeing.
    async fn release(&self, before: &str, sha: &str, id: u64) -> anyhow::Result<()> {
        gitlab_holds(&self.gitlab, sha, id, "success");
        self.server.release(before, sha, id).await
    }

    /// Waits until GitLab has accepted at least `count` statuses on `sha`; returns them.
    async fn statuses(
        &self,
        sha: &str,
        count: usize,
    ) -> anyhow::Result<Vec<(String, String, String)>> {
        eventually(&format!("{count} statuses on {sha}"), || async {
            let statuses = self.gitlab.statuses_for(sha);
            Ok((statuses.len() >= count).then_some(statuses))
        })
        .await
    }
}

/// Runs greenlightctl in-process against `server` with `token`; returns its exit code.
async fn ctl(server: &TestServer, token: &str, args: &[&str]) -> i32 {
    greenlight::ctl::run(ctl_args(server, token, args)).await
}

/// Starts greenlightctl in the background, for commands that follow what happens next.
fn spawn_ctl(server: &TestServer, token: &str, args: &[&str]) -> tokio::task::JoinHandle<i32> {
    let args = ctl_args(server, token, args);
    tokio::spawn(async move { greenlight::ctl::run(args).await })
}

fn ctl_args(server: &TestServer, token: &str, args: &[&str]) -> Vec<String> {
    let mut all = vec![
        "greenlightctl".to_owned(),
        "--server".to_owned(),
        server.grpc_url(),
        "--token".to_owned(),
        token.to_owned(),
    ];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    all
}

/// An admin client that authenticates with `token` (such as a CI token).
async fn admin_as(
    server: &TestServer,
    token: &str,
) -> anyhow::Result<AdminServiceClient<InterceptedService<Channel, Bearer>>> {
    let channel = Channel::from_shared(server.grpc_url())?.connect().await?;
    Ok(AdminServiceClient::with_interceptor(
        channel,
        Bearer::new(token)?,
    ))
}

/// `GetRef` of `PROJECT@main`.
async fn main_ref(server: &TestServer) -> anyhow::Result<greenlight::v1::RefStatus> {
    let request = greenlight::v1::GetRefRequest {
        project: PROJECT.into(),
        r#ref: "main".into(),
    };
    Ok(server.admin().await?.get_ref(request).await?.into_inner())
}

/// Claims `prod`'s status `state` on `sha` for `lease` as the publisher `replica` of another
/// server on `redis`, which never finishes it.
async fn claimed_elsewhere(
    redis: &Redis,
    replica: &str,
    sha: &str,
    state: &str,
    lease: std::time::Duration,
) -> anyhow::Result<greenlight_server::store::StatusClaim> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let store = greenlight_server::store::RedisStore::connect(
        &greenlight_server::config::RedisSettings::single(redis.url(), "gl-test"),
        shutdown.clone(),
        Default::default(),
    )?;
    let status = greenlight_server::store::StatusKey {
        agent: "prod",
        sha,
        state,
        order: greenlight_server::store::StatusOrder::default(),
    };
    let claimed = store.begin_status(&status, replica, lease).await;
    shutdown.cancel();
    Ok(claimed?)
}

fn states(statuses: &[(String, String, String)]) -> Vec<&str> {
    statuses
        .iter()
        .map(|(state, _, _)| state.as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_deploy_posts_pending_running_success_on_its_commit_only() -> anyhow::Result<()> {
    let w = world!(world("", None));
    let x = w.repo.commit(
        &[("app.yaml", configmap("settings", "one").as_bytes())],
        &[],
    )?;
    let _agent = w.agent("prod", "replica-a");
    w.release(ZERO, &x, 1).await?;
    w.server.reported("prod", &x, Phase::Healthy).await?;

    let statuses = w.statuses(&x, 3).await?;
    assert_eq!(
        states(&statuses),
        ["pending", "running", "success"],
        "{statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|(_, name, _)| name == "greenlight/prod"),
        "{statuses:?}"
    );
    assert!(statuses[0].2.starts_with("deploying"), "{}", statuses[0].2);
    assert_eq!(statuses[2].2, "deployed and healthy");

    // Nothing more arrives, and nothing on any other commit.
    tokio::time::sleep(QUIET).await;
    let all = w.gitlab.statuses();
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.iter().all(|s| s.sha == x), "{all:?}");
    for status in &all {
        assert_eq!(status.project, PROJECT);
        assert_eq!(
            status.target_url.as_deref(),
            Some("https://greenlight.example/agents/prod")
        );
    }
    let posts = w.gitlab.status_attempts(&x);
    assert_eq!(posts.len(), 3, "{posts:?}");
    for post in &posts {
        assert_eq!(
            post.path,
            format!("/api/v4/projects/group%2Fapp-manifests/statuses/{x}")
        );
        assert_eq!(post.private_token.as_deref(), Some(FakeGitLab::API_TOKEN));
        assert_eq!(post.answered, 201);
    }
    Ok(())
}

/// A publisher that died (or lost Redis) after GitLab took its status but before recording
/// it leaves the claim unfinished: whoever takes the status over looks at GitLab first, so
/// a posted status is never posted again and one that never arrived is still posted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_whose_post_went_unrecorded_is_looked_up_before_posting_again()
-> anyhow::Result<()> {
    let w = world!(world("", None));
    let x = w.repo.commit(
        &[("app.yaml", configmap("settings", "one").as_bytes())],
        &[],
    )?;
    // Another replica claimed `pending` and `success` and died: its `pending` reached
    // GitLab, its `success` did not.
    let lease = std::time::Duration::from_millis(1);
    for state in ["pending", "success"] {
        claimed_elsewhere(&w.redis, "replica-dead", &x, state, lease).await?;
    }
    install_crypto();
    let answered = reqwest::Client::new()
        .post(format!(
            "{}/api/v4/projects/group%2Fapp-manifests/statuses/{x}",
            w.gitlab.url()
        ))
        .header("PRIVATE-TOKEN", FakeGitLab::API_TOKEN)
        .form(&[("state", "pending"), ("name", "greenlight/prod")])
        .send()
        .await?
        .status();
    assert_eq!(answered.as_u16(), 201);

    let _agent = w.agent("prod", "replica-a");
    w.release(ZERO, &x, 1).await?;
    w.server.reported("prod", &x, Phase::Healthy).await?;
    let statuses = w.statuses(&x, 3).await?;
    tokio::time::sleep(QUIET).await;
    let statuses_now = w.gitlab.statuses_for(&x);
    assert_eq!(
        states(&statuses_now),
        ["pending", "running", "success"],
        "the dead replica's pending, not again, then ours: {statuses:?}"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", w.server.http))
        .await?
        .text()
        .await?;
    assert!(
        metrics.lines().any(|line| line
            .starts_with("greenlight_gitlab_commit_statuses_total{outcome=\"already_posted\"} 1")),
        "the lookup found it: {:?}",
        metrics
            .lines()
            .filter(|line| line.starts_with("greenlight_gitlab_commit_statuses_total"))
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// A gateway in front of GitLab that answers 502 though GitLab took the status: the retry
/// looks first, so the status is not posted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_whose_answer_a_gateway_lost_is_looked_up_not_posted_again() -> anyhow::Result<()>
{
    let w = world!(world("", None));
    let x = w.repo.commit(
        &[("app.yaml", configmap("settings", "one").as_bytes())],
        &[],
    )?;
    w.gitlab.lose_answers_to_posts(502, 1);
    let _agent = w.agent("prod", "replica-a");
    w.release(ZERO, &x, 1).await?;
    w.server.reported("prod", &x, Phase::Healthy).await?;
    w.statuses(&x, 3).await?;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        states(&w.gitlab.statuses_for(&x)),
        ["pending", "running", "success"],
        "each once"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_commit_skipped_for_a_newer_one_is_canceled_as_superseded() -> anyhow::Result<()> {
    let w = world!(world("", None));
    let b = w
        .repo
        .commit(&[("app.yaml", configmap("settings", "b").as_bytes())], &[])?;
    let c = w
        .repo
        .commit(&[("app.yaml", configmap("settings", "c").as_bytes())], &[])?;
    assert_eq!(w.server.push("main", ZERO, &b).await?, 200);
    assert_eq!(w.server.push("main", &b, &c).await?, 200);
    assert_eq!(w.pipeline(&c, 2, "success").await?, 200);
    let on_c = w.statuses(&c, 1).await?;
    assert_eq!(states(&on_c), ["pending"], "{on_c:?}");
    // B turns green only after C, its descendant, was chosen: B is never deployed.
    assert_eq!(w.pipeline(&b, 1, "success").await?, 200);

    let result = eventually("a canceled status on B", || async {
        Ok(w.gitlab
            .statuses_for(&b)
            .into_iter()
            .find(|(state, _, _)| state == "canceled"))
    })
    .await;
    if let Err(error) = result {
        let history = w.server.history("prod").await?;
        let about_b: Vec<String> = history
            .decisions
            .iter()
            .filter(|d| d.sha == b)
            .map(|d| format!("{:?}: {}", d.outcome(), d.reason))
            .collect();
        anyhow::bail!(
            "{error}: statuses on B {:?}; decisions about B {about_b:?}",
            w.gitlab.statuses_for(&b)
        );
    }
    let (_, name, description) = result?;
    assert_eq!(name, "greenlight/prod");
    assert_eq!(description, format!("superseded by {}", &c[..8]));
    assert!(
        w.gitlab
            .statuses_for(&b)
            .iter()
            .all(|(state, _, _)| state != "pending"),
        "B was never deployed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_gitlab_never_delays_a_sync_and_statuses_arrive_after_it_recovers()
-> anyhow::Result<()> {
    let w = world!(world("", None));
    let x = w.repo.commit(
        &[("app.yaml", configmap("settings", "one").as_bytes())],
        &[],
    )?;
    w.gitlab.fail_with(Some(500));
    let _agent = w.agent("prod", "replica-a");
    w.release(ZERO, &x, 1).await?;
    // GitLab is still failing: the deploy went ahead regardless.
    w.server.reported("prod", &x, Phase::Healthy).await?;
    assert!(w.gitlab.statuses_for(&x).is_empty());
    // A post answered 500 may have reached GitLab: each retry reads the statuses first.
    eventually("status posts retried while GitLab fails", || async {
        let attempts = w.gitlab.status_requests(&x);
        assert!(attempts.iter().all(|r| r.answered == 500), "{attempts:?}");
        Ok((attempts.len() >= 2).then_some(()))
    })
    .await?;

    w.gitlab.fail_with(None);
    let statuses = w.statuses(&x, 3).await?;
    assert_eq!(
        states(&statuses),
        ["pending", "running", "success"],
        "{statuses:?}"
    );
    tokio::time::sleep(QUIET).await;
    let statuses = w.gitlab.statuses_for(&x);
    assert_eq!(
        states(&statuses),
        ["pending", "running", "success"],
        "each once: {statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|(_, name, _)| name == "greenlight/prod")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_finished_while_the_server_was_down_is_caught_up_without_a_webhook()
-> anyhow::Result<()> {
    let World {
        redis,
        cache,
        repo,
        gitlab,
        server,
        cluster: _cluster,
    } = world!(world_with("", None, Some("1s")));
    let a = repo.commit(&[("app.yaml", configmap("settings", "a").as_bytes())], &[])?;
    let mut stream = server.stream("prod").await?;
    assert_eq!(server.push("main", ZERO, &a).await?, 200);
    gitlab_holds(&gitlab, &a, 1, "success");
    assert_eq!(
        server.pipeline("main", &a, 1, "success", "push").await?,
        200
    );
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), a);
    drop(stream);
    server.stop().await?;

    // While nobody listened: B was pushed and its pipeline passed.
    let b = repo.commit(&[("app.yaml", configmap("settings", "b").as_bytes())], &[])?;
    gitlab.set_branch_head(PROJECT, "main", &b);
    gitlab.set_pipelines(
        PROJECT,
        vec![
            json!({"id": 2, "sha": b, "ref": "main", "status": "success", "source": "push", "updated_at": "2026-11-26T10:05:00.000Z"}),
            json!({"id": 1, "sha": a, "ref": "main", "status": "success", "source": "push", "updated_at": "2026-11-26T10:01:00.000Z"}),
        ],
    );
    let before_restart = gitlab.requests().len();

    let agents = [prod_agent(&repo.url(), "")];
    let yaml = close_loop_yaml(&redis.url(), cache.path(), &gitlab, Some("1s"), &agents);
    let server = TestServer::start(&yaml).await?;
    let mut stream = server.agent("prod").await?.sync(Some(&a)).await?;
    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.sha(), b, "caught up with B without a webhook");

    let reads: Vec<_> = gitlab.requests()[before_restart..]
        .iter()
        .filter(|r| r.method == "GET")
        .cloned()
        .collect();
    let branch = reads
        .iter()
        .find(|r| r.path.ends_with("/repository/branches/main"))
        .expect("the branch head was read");
    assert_eq!(branch.project.as_deref(), Some(PROJECT));
    assert_eq!(branch.private_token.as_deref(), Some(FakeGitLab::API_TOKEN));
    let pipelines = reads
        .iter()
        .find(|r| r.path.ends_with("/pipelines"))
        .expect("the pipelines were read");
    assert_eq!(pipelines.query_param("ref"), Some("main"));
    assert_eq!(pipelines.project.as_deref(), Some(PROJECT));

    // The caught-up decision is reported to GitLab too.
    let on_b = eventually("a pending status on B", || async {
        Ok(gitlab
            .statuses_for(&b)
            .into_iter()
            .find(|(state, _, _)| state == "pending"))
    })
    .await?;
    assert_eq!(on_b.1, "greenlight/prod");
    server.stop().await?;
    Ok(())
}

/// A server on Redis with GitLab's API faked and read every second, and agent `prod` on a
/// repository of its own, whose stream the test reads itself (no cluster).
struct CatchingUp {
    redis: Redis,
    _cache: tempfile::TempDir,
    repo: GitRepo,
    gitlab: FakeGitLab,
    server: TestServer,
}

impl CatchingUp {
    async fn start() -> anyhow::Result<Self> {
        let redis = Redis::start().await?;
        let cache = tempfile::tempdir()?;
        let repo = GitRepo::new()?;
        let gitlab = FakeGitLab::start().await?;
        let agents = [git_agent_yaml("prod", &repo.url(), &[])];
        let yaml = close_loop_yaml(&redis.url(), cache.path(), &gitlab, Some("1s"), &agents);
        let server = TestServer::start(&yaml).await?;
        Ok(Self {
            redis,
            _cache: cache,
            repo,
            gitlab,
            server,
        })
    }

    /// Pushes `sha` as the first commit of `main` and turns its pipeline 1 green, with
    /// GitLab's API agreeing.
    async fn release_first(&self, sha: &str) -> anyhow::Result<()> {
        ensure!(self.server.push("main", ZERO, sha).await? == 200);
        gitlab_holds(&self.gitlab, sha, 1, "success");
        let answered = self
            .server
            .pipeline("main", sha, 1, "success", "push")
            .await?;
        ensure!(answered == 200, "the pipeline hook answered {answered}");
        Ok(())
    }

    /// A new commit on `main`.
    fn commit(&self, value: &str) -> anyhow::Result<String> {
        self.repo.commit(
            &[("app.yaml", configmap("settings", value).as_bytes())],
            &[],
        )
    }

    /// Rounds of catch-up begun so far: each reads the pipelines once.
    fn rounds(&self) -> usize {
        self.gitlab
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/pipelines"))
            .count()
    }

    /// Waits until `n` more rounds than now have read GitLab: what the round before them
    /// read is recorded by then.
    async fn rounds_pass(&self, n: usize) -> anyhow::Result<()> {
        let from = self.rounds();
        eventually("rounds of catch-up", || async {
            Ok((self.rounds() >= from + n).then_some(()))
        })
        .await
    }

    /// The ref's heads newest first, once its head is `head`.
    async fn heads_once_head_is(&self, head: &str) -> anyhow::Result<Vec<String>> {
        let commits = self.commits_once_head_is(head).await?;
        Ok(commits.into_iter().map(|commit| commit.sha).collect())
    }

    /// `GetRef`'s commits, once its head is `head`.
    async fn commits_once_head_is(&self, head: &str) -> anyhow::Result<Vec<CommitInfo>> {
        let admin = self.server.admin().await?;
        eventually("the ref's head", || {
            let mut admin = admin.clone();
            async move {
                let request = GetRefRequest {
                    project: PROJECT.into(),
                    r#ref: "main".into(),
                };
                let status = admin.get_ref(request).await?.into_inner();
                Ok((status.head == head).then_some(status.commits))
            }
        })
        .await
    }

    /// GitLab's branch at `head`, with `pipelines` (sha, id, status) listed by its API.
    fn gitlab_at(&self, head: &str, pipelines: &[(&str, u64, &str)]) {
        let listed = pipelines
            .iter()
            .map(|(sha, id, status)| api_pipeline(sha, *id, status))
            .collect();
        self.gitlab.set_pipelines(PROJECT, listed);
        self.gitlab.set_branch_head(PROJECT, "main", head);
    }

    /// `first` green, read by catch-up, then its hook: the agent's stream, sent `first`.
    async fn deployed_first(
        &self,
        first: &str,
    ) -> anyhow::Result<greenlight_agent::client::RevisionStream> {
        self.gitlab_at(first, &[(first, 1, "success")]);
        // The hook comes after a round read the head: it then only tells where it came from.
        self.rounds_pass(2).await?;
        let mut stream = self.server.stream("prod").await?;
        assert_eq!(self.server.push("main", ZERO, first).await?, 200);
        assert_eq!(next_revision(&mut stream, SOON).await?.sha(), first);
        Ok(stream)
    }

    /// Pipeline `id` of `sha` succeeded: GitLab holds it and sends its hook.
    async fn green(&self, sha: &str, id: u64) -> anyhow::Result<()> {
        gitlab_holds(&self.gitlab, sha, id, "success");
        let answered = self
            .server
            .pipeline("main", sha, id, "success", "push")
            .await?;
        anyhow::ensure!(answered == 200, "pipeline hook answered {answered}");
        Ok(())
    }

    /// The commits `prod` was told to deploy, newest first.
    async fn deployed(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .server
            .history("prod")
            .await?
            .decisions
            .into_iter()
            .filter(|d| d.outcome() == decision::Outcome::Deploy)
            .map(|d| d.sha)
            .collect())
    }
}

/// A pipeline of `sha` on `main` as GitLab's API lists it.
fn api_pipeline(sha: &str, id: u64, status: &str) -> serde_json::Value {
    json!({"id": id, "sha": sha, "ref": "main", "status": status, "source": "push"})
}

/// A server restarted while GitLab moved on reads the new head from the API, which does not
/// say what the push came from; the push's hook, late, must still put that head in its
/// place, and each later round must not record the known head again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_read_from_gitlab_takes_its_place_when_its_late_push_arrives_and_is_read_once()
-> anyhow::Result<()> {
    let w = CatchingUp::start().await?;
    let (a, b, c) = (w.commit("a")?, w.commit("b")?, w.commit("c")?);
    let mut stream = w.deployed_first(&a).await?;

    // GitLab moved on to C; the hooks of B and C are late.
    w.gitlab_at(&c, &[(&c, 3, "success"), (&a, 1, "success")]);
    assert_eq!(
        next_revision(&mut stream, SOON).await?.sha(),
        c,
        "caught up with C"
    );
    assert_eq!(w.server.push("main", &a, &b).await?, 200);
    assert_eq!(w.server.push("main", &b, &c).await?, 200);
    let heads = eventually("all three heads", || async {
        let heads = w.heads_once_head_is(&c).await?;
        Ok((heads.len() == 3).then_some(heads))
    })
    .await?;
    assert_eq!(heads, [c.as_str(), &b, &a], "newest first");

    // Rounds of catch-up after the heads are known record nothing more.
    w.rounds_pass(3).await?;
    let keys = w
        .redis
        .cli(&["--scan", "--pattern", "*:ref:*:main:pushes"])?;
    let key = keys.trim();
    assert!(
        !key.is_empty() && !key.contains('\n'),
        "one push list: {keys:?}"
    );
    let pushes = w.redis.cli(&["LRANGE", key, "0", "-1"])?;
    let pushes: Vec<&str> = pushes
        .lines()
        .map(|push| push.rsplit_once('|').map_or(push, |(moved, _at)| moved))
        .collect();
    let expected = [
        format!("?|{a}"),
        format!("|{a}"),
        format!("?|{c}"),
        format!("{a}|{b}"),
        format!("{b}|{c}"),
    ];
    assert_eq!(pushes, expected);
    assert_eq!(
        w.deployed().await?,
        [c, a],
        "never moved back to B, newest first"
    );
    w.server.stop().await?;
    Ok(())
}

/// Push order can be wrong for good: here D was read from GitLab while its pipeline ran,
/// then the late hook of C, pushed on top of a B never heard of, went above D and was
/// deployed. The branch's history, not push order, says D is the newest: once D is green
/// it is deployed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_head_by_history_is_deployed_though_push_order_puts_it_below()
-> anyhow::Result<()> {
    let w = CatchingUp::start().await?;
    let (a, b, c, d) = (
        w.commit("a")?,
        w.commit("b")?,
        w.commit("c")?,
        w.commit("d")?,
    );
    let mut stream = w.deployed_first(&a).await?;

    // GitLab is at D, whose pipeline runs.
    w.gitlab_at(&d, &[(&d, 4, "running"), (&a, 1, "success")]);
    w.heads_once_head_is(&d).await?;
    // C's hook comes late, from a B the server never heard of, and C is green.
    assert_eq!(w.server.push("main", &b, &c).await?, 200);
    w.green(&c, 3).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), c);
    // The admin API lists the heads as the gate walks them, by history, with their places in
    // push order, where C's late hook went above D.
    let commits = w.commits_once_head_is(&d).await?;
    let listed: Vec<(&str, u64)> = commits.iter().map(|c| (c.sha.as_str(), c.seq)).collect();
    assert_eq!(listed, [(d.as_str(), 1), (&c, 2), (&a, 0)]);
    assert!(commits.iter().all(|commit| commit.on_branch));

    // D turns green: GitLab's hook.
    w.green(&d, 4).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), d);
    assert_eq!(w.deployed().await?, [d, c, a], "newest first");
    w.server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_exits_0_when_healthy_or_superseded_3_with_exact_and_124_on_timeout()
-> anyhow::Result<()> {
    let w = world!(world("", None));
    let _agent = w.agent("prod", "replica-a");

    // Healthy: 0, the wait started before the push.
    let a = w
        .repo
        .commit(&[("app.yaml", configmap("settings", "a").as_bytes())], &[])?;
    let waiting = spawn_ctl(
        &w.server,
        ADMIN_TOKEN,
        &["wait", "prod", "--sha", &a, "--timeout", "30s"],
    );
    w.release(ZERO, &a, 1).await?;
    assert_eq!(waiting.await?, 0, "healthy");
    w.server.reported("prod", &a, Phase::Healthy).await?;

    // Superseded: B is waited for while C, its descendant, is deployed healthy.
    let b = w
        .repo
        .commit(&[("app.yaml", configmap("settings", "b").as_bytes())], &[])?;
    let c = w
        .repo
        .commit(&[("app.yaml", configmap("settings", "c").as_bytes())], &[])?;
    assert_eq!(w.server.push("main", &a, &b).await?, 200);
    assert_eq!(w.server.push("main", &b, &c).await?, 200);
    assert_eq!(w.pipeline(&c, 3, "success").await?, 200);
    w.server.reported("prod", &c, Phase::Healthy).await?;
    let wait_b = ["wait", "prod", "--sha", &b, "--timeout", "20s"];
    assert_eq!(ctl(&w.server, ADMIN_TOKEN, &wait_b).await, 0, "superseded");
    let exact = [&wait_b[..], &["--exact"]].concat();
    assert_eq!(
        ctl(&w.server, ADMIN_TOKEN, &exact).await,
        3,
        "superseded with --exact"
    );

    // Timeout: D's pipeline never finishes.
    let d = w
        .repo
        .commit(&[("app.yaml", configmap("settings", "d").as_bytes())], &[])?;
    assert_eq!(w.server.push("main", &c, &d).await?, 200);
    assert_eq!(w.pipeline(&d, 4, "running").await?, 200);
    let wait_d = ["wait", "prod", "--sha", &d, "--timeout", "2s"];
    assert_eq!(ctl(&w.server, ADMIN_TOKEN, &wait_d).await, 124, "timeout");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ci_token_may_read_and_wait_for_its_own_agent_only() -> anyhow::Result<()> {
    let w = world!(world("", Some("")));
    let _agent = w.agent("prod", "replica-a");
    let a = w
        .repo
        .commit(&[("app.yaml", configmap("settings", "a").as_bytes())], &[])?;
    w.release(ZERO, &a, 1).await?;
    w.server.reported("prod", &a, Phase::Healthy).await?;

    // Its own agent: status and wait.
    assert_eq!(
        ctl(&w.server, CI_TOKEN, &["status", "prod"]).await,
        0,
        "the CI token of prod reads the status of prod"
    );
    let wait_a = ["wait", "prod", "--sha", &a, "--timeout", "20s"];
    assert_eq!(
        ctl(&w.server, CI_TOKEN, &wait_a).await,
        0,
        "the CI token of prod waits for prod"
    );
    let mut ci = admin_as(&w.server, CI_TOKEN).await?;
    let own = ci
        .get_agent(GetAgentRequest {
            name: "prod".into(),
        })
        .await?
        .into_inner();
    assert_eq!(own.applied_revision, a);

    // Another agent, or an operator's command: refused.
    let wait_staging = ["wait", "staging", "--sha", &a, "--timeout", "5s"];
    assert_eq!(
        ctl(&w.server, CI_TOKEN, &wait_staging).await,
        2,
        "wait on another agent"
    );
    assert_eq!(
        ctl(&w.server, CI_TOKEN, &["status", "staging"]).await,
        2,
        "status of another agent"
    );
    assert_eq!(
        ctl(&w.server, CI_TOKEN, &["pause", "prod", "--reason", "ci"]).await,
        2,
        "pause"
    );
    let refused = ci
        .get_agent(GetAgentRequest {
            name: "staging".into(),
        })
        .await
        .expect_err("status of another agent");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = ci
        .watch_revision(WatchRevisionRequest {
            name: "staging".into(),
            sha: a.clone(),
        })
        .await
        .expect_err("wait on another agent");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = ci
        .pause_sync(PauseSyncRequest {
            name: "prod".into(),
            reason: "ci".into(),
        })
        .await
        .expect_err("pause");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let status = w.server.agent_status("prod").await?;
    assert!(status.paused.is_none(), "the refused pause changed nothing");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_exits_1_when_the_commit_is_degraded() -> anyhow::Result<()> {
    let w = world!(world("    health_timeout: 2s\n", None));
    let never = deployment_on("web", 1, "nowhere");
    let x = w.repo.commit(&[("web.yaml", never.as_bytes())], &[])?;
    let _agent = w.agent("prod", "replica-a");
    let waiting = spawn_ctl(
        &w.server,
        ADMIN_TOKEN,
        &["wait", "prod", "--sha", &x, "--timeout", "30s"],
    );
    w.release(ZERO, &x, 1).await?;
    assert_eq!(waiting.await?, 1, "degraded");
    w.server.reported("prod", &x, Phase::Degraded).await?;
    let statuses = w.statuses(&x, 3).await?;
    assert_eq!(
        states(&statuses),
        ["pending", "running", "failed"],
        "{statuses:?}"
    );
    assert!(statuses[2].2.starts_with("degraded:"), "{}", statuses[2].2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_gitlab_api_never_stops_webhook_deploys() -> anyhow::Result<()> {
    let w = world!(world_with("", None, Some("1s")));
    let gets = || {
        w.gitlab
            .requests()
            .iter()
            .filter(|r| r.method == "GET")
            .count()
    };
    w.gitlab.fail_with(Some(500));
    let before = gets();
    // Catch-up keeps failing in the background (rounds a second apart); deploys from
    // webhooks go on.
    eventually("two failed catch-up rounds", || async {
        Ok((gets() >= before + 2).then_some(()))
    })
    .await?;
    let x = w
        .repo
        .commit(&[("a.yaml", configmap("a", "1").as_bytes())], &[])?;
    let mut stream = w.server.stream("prod").await?;
    w.release(ZERO, &x, 1).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), x);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greenlights_own_statuses_never_promote_a_commit() -> anyhow::Result<()> {
    let w = world!(world("", Some("    gate: { mode: immediate }\n")));
    let hook_url = format!("http://{}/webhooks/gitlab", w.server.http);
    w.gitlab.set_webhook(&hook_url, GITLAB_SECRET);
    let x = w.repo.commit(
        &[("app.yaml", configmap("settings", "untested").as_bytes())],
        &[],
    )?;
    let mut prod = w.server.stream("prod").await?;
    let _staging = w.agent("staging", "replica-s");

    // Staging deploys the untested commit at once and reports it healthy; its statuses
    // (posted without a pipeline, as none opened its gate) make GitLab create an external
    // pipeline that succeeds, and every change of it reaches the server as a Pipeline Hook.
    assert_eq!(w.server.push("main", ZERO, &x).await?, 200);
    w.server.reported("staging", &x, Phase::Healthy).await?;
    let hooks = eventually("a green external pipeline announced", || async {
        let hooks = w.gitlab.hooks();
        let green = hooks.iter().any(|h| {
            h.body["object_attributes"]["status"] == "success"
                && h.body["object_attributes"]["source"] == "external"
        });
        Ok(green.then_some(hooks))
    })
    .await?;
    let external = w.gitlab.pipelines_for(PROJECT, &x);
    assert_eq!(external.len(), 1, "{external:?}");
    assert_eq!(external[0]["source"], "external");
    assert_eq!(external[0]["status"], "success");
    for hook in &hooks {
        assert_eq!(
            (hook.answered, hook.outcome.as_str()),
            (200, "ignored"),
            "{hook:?}"
        );
    }

    // Prod, gated on pipelines, is not promoted by it.
    no_revision(&mut prod, QUIET).await?;
    let status = w.server.agent_status("prod").await?;
    assert_eq!(status.desired, None, "{status:?}");

    // The commit's real pipeline promotes it, and prod's statuses join that pipeline.
    w.gitlab.put_pipeline(
        PROJECT,
        json!({
            "id": 200_000, "sha": x, "ref": "main", "status": "success", "source": "push",
            "builds": [{ "name": "test", "stage": "test", "status": "success" }],
        }),
    );
    assert_eq!(
        w.server
            .pipeline("main", &x, 200_000, "success", "push")
            .await?,
        200
    );
    let revision = next_revision(&mut prod, SOON).await?;
    assert_eq!(revision.sha(), x);
    let posted = eventually("prod's pending status", || async {
        Ok(w.gitlab
            .status_attempts(&x)
            .into_iter()
            .find(|r| r.form_field("name") == Some("greenlight/prod")))
    })
    .await?;
    assert_eq!(posted.form_field("pipeline_id"), Some("200000"));
    assert_eq!(posted.form_field("ref"), Some("main"));
    let staging_posts: Vec<_> = w
        .gitlab
        .status_attempts(&x)
        .into_iter()
        .filter(|r| r.form_field("name") == Some("greenlight/staging"))
        .collect();
    assert!(
        staging_posts
            .iter()
            .all(|r| r.form_field("pipeline_id").is_none() && r.form_field("ref") == Some("main")),
        "{staging_posts:?}"
    );
    // That status turned the real pipeline running on GitLab; the verdict ignores it.
    eventually("the hook of prod's status on pipeline 200000", || async {
        Ok(w.gitlab
            .hooks()
            .into_iter()
            .find(|h| h.body["object_attributes"]["id"] == 200_000))
    })
    .await?;
    let reference = main_ref(&w.server).await?;
    let commit = reference
        .commits
        .iter()
        .find(|c| c.sha == x)
        .ok_or_else(|| anyhow::anyhow!("commit missing: {reference:?}"))?;
    assert!(
        commit
            .pipelines
            .iter()
            .all(|p| p.id == 200_000 && p.status() == greenlight::v1::PipelineStatus::Success),
        "{commit:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_gitlab_contradicts_does_not_open_the_gate() -> anyhow::Result<()> {
    let w = world!(world("", None));
    let x = w
        .repo
        .commit(&[("app.yaml", configmap("settings", "x").as_bytes())], &[])?;
    let mut stream = w.server.stream("prod").await?;
    let mut events = w
        .server
        .admin()
        .await?
        .watch_events(greenlight::v1::WatchEventsRequest {
            agent: "prod".into(),
        })
        .await?
        .into_inner();
    assert_eq!(w.server.push("main", ZERO, &x).await?, 200);

    // The hook says green; GitLab's API says pipeline 5 failed, and knows no pipeline 6.
    gitlab_holds(&w.gitlab, &x, 5, "failed");
    for (id, reason) in [
        (5, "GitLab says pipeline 5 is failed, not success"),
        (6, "GitLab has no pipeline 6"),
    ] {
        let claim = pipeline_payload(PROJECT, "main", &x, id, "success", "push");
        let (status, body) = w.server.hook("Pipeline Hook", &claim, None).await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["outcome"], "contradicted", "{body}");
        assert_eq!(body["message"], reason, "{body}");
    }
    no_revision(&mut stream, QUIET).await?;
    assert_eq!(w.server.agent_status("prod").await?.desired, None);

    // The rejections are on the ref and in the events stream.
    let reference = main_ref(&w.server).await?;
    let rejected: Vec<(u64, &str)> = reference
        .rejected
        .iter()
        .map(|r| (r.pipeline_id, r.reason.as_str()))
        .collect();
    assert_eq!(
        rejected,
        [
            (6, "GitLab has no pipeline 6"),
            (5, "GitLab says pipeline 5 is failed, not success")
        ]
    );
    assert!(reference.rejected.iter().all(|r| r.sha == x));
    let commit = reference.commits.iter().find(|c| c.sha == x);
    assert!(
        commit.is_some_and(|c| c.pipelines.is_empty()),
        "nothing recorded: {commit:?}"
    );
    let wanted = "pipeline 5 rejected: GitLab says pipeline 5 is failed, not success";
    loop {
        let event = tokio::time::timeout(SOON, events.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("events stream ended before the rejection"))?;
        if let Some(greenlight::v1::event::Event::Decision(decision)) = event.event
            && decision.reason == wanted
        {
            assert_eq!(decision.pipeline_id, Some(5));
            break;
        }
    }

    // A pipeline GitLab confirms opens the gate; its redelivery is not asked about again.
    assert_eq!(w.pipeline(&x, 7, "success").await?, 200);
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), x);
    let asked = || {
        w.gitlab
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with("/pipelines/7"))
            .count()
    };
    assert_eq!(asked(), 1);
    let (status, body) = w
        .server
        .hook(
            "Pipeline Hook",
            &pipeline_payload(PROJECT, "main", &x, 7, "success", "push"),
            Some("redelivery-of-7"),
        )
        .await?;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("unchanged")));
    assert_eq!(asked(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_running_on_gitlab_only_because_of_our_status_is_confirmed() -> anyhow::Result<()>
{
    let w = world!(world("", Some("    gate: { mode: immediate }\n")));
    let x = w
        .repo
        .commit(&[("app.yaml", configmap("settings", "x").as_bytes())], &[])?;
    let mut prod = w.server.stream("prod").await?;
    let test_job = |status: &str| json!({ "name": "test", "stage": "test", "status": status });
    w.gitlab.put_pipeline(
        PROJECT,
        json!({ "id": 300_000, "sha": x, "ref": "main", "status": "running", "source": "push",
                "builds": [test_job("running")] }),
    );
    // Staging deploys at once; its pending status joins the running pipeline.
    assert_eq!(w.server.push("main", ZERO, &x).await?, 200);
    eventually("staging's status on the pipeline", || async {
        let pipelines = w.gitlab.pipelines_for(PROJECT, &x);
        let joined = pipelines.first().is_some_and(|p| {
            p["builds"]
                .as_array()
                .is_some_and(|b| b.iter().any(|j| j["name"] == "greenlight/staging"))
        });
        Ok(joined.then_some(()))
    })
    .await?;

    // The tests pass; GitLab still calls the pipeline running, for staging's status alone.
    let mut pipeline = w.gitlab.pipelines_for(PROJECT, &x).remove(0);
    if let Some(test) = pipeline["builds"]
        .as_array_mut()
        .and_then(|builds| builds.iter_mut().find(|b| b["name"] == "test"))
    {
        *test = test_job("success");
    }
    w.gitlab.put_pipeline(PROJECT, pipeline.clone());
    let mut hook = pipeline_payload(PROJECT, "main", &x, 300_000, "running", "push");
    hook["builds"] = pipeline["builds"].clone();
    let (status, body) = w.server.hook("Pipeline Hook", &hook, None).await?;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("recorded")),
        "{body}"
    );
    assert_eq!(next_revision(&mut prod, SOON).await?.sha(), x);
    assert!(main_ref(&w.server).await?.rejected.is_empty());
    Ok(())
}

/// GitLab shows a commit's newest state: health that flips back (healthy, degraded, healthy)
/// ends on `success`, however the reports' statuses reach the publishers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_health_flips_back_shows_its_newest_state() -> anyhow::Result<()> {
    let w = CatchingUp::start().await?;
    let a = w.commit("a")?;
    let agent = w.server.agent("prod").await?;
    let mut stream = agent.sync(None).await?;
    w.release_first(&a).await?;
    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.sha(), a);
    let mut expected = vec!["pending"];
    for (phase, state) in [
        (Phase::Applying, "running"),
        (Phase::Healthy, "success"),
        (Phase::Degraded, "failed"),
        (Phase::Healthy, "success"),
    ] {
        agent
            .report(greenlight::v1::StatusReport {
                revision: a.clone(),
                phase: phase.into(),
                generation: revision.generation(),
                ..Default::default()
            })
            .await?;
        expected.push(state);
        // Health is looked at seconds apart: each report is received after the last one's
        // status was posted.
        eventually(&format!("{expected:?} on GitLab"), || async {
            Ok((states(&w.gitlab.statuses_for(&a)) == expected).then_some(()))
        })
        .await
        .with_context(|| format!("posted: {:?}", w.gitlab.statuses_for(&a)))?;
    }
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        states(&w.gitlab.statuses_for(&a)),
        ["pending", "running", "success", "failed", "success"],
        "each state once more for each flip, nothing after"
    );
    w.server.stop().await?;
    Ok(())
}

/// A status of an agent on a commit another publisher is posting (an entry of another shard
/// of the log, read at the same time) is posted once that publisher's claim ends, not after
/// the takeover time (5 minutes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_waits_for_another_publishers_claim_on_its_commit_not_for_takeover()
-> anyhow::Result<()> {
    let w = CatchingUp::start().await?;
    let a = w.commit("a")?;
    // Another replica claims prod's statuses on A for 3 s, and never finishes.
    let lease = std::time::Duration::from_secs(3);
    assert_eq!(
        claimed_elsewhere(&w.redis, "replica-other", &a, "running", lease).await?,
        greenlight_server::store::StatusClaim::Mine
    );

    w.release_first(&a).await?;
    let posted = eventually("the pending status on A", || async {
        let statuses = w.gitlab.statuses_for(&a);
        Ok((!statuses.is_empty()).then_some(statuses))
    })
    .await?;
    assert_eq!(states(&posted), ["pending"]);
    w.server.stop().await?;
    Ok(())
}

/// A report is kept as about the revision the server sent: its SHA spelled as every other
/// record of the commit, and a generation no higher than the agent's (a report sent before
/// the agent was created anew), or the revision's when it sets none, so that its commit
/// status is ordered among the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_is_kept_with_the_revisions_spelling_and_generation() -> anyhow::Result<()> {
    let w = CatchingUp::start().await?;
    let a = w.commit("a")?;
    let agent = w.server.agent("prod").await?;
    let mut stream = agent.sync(None).await?;
    w.release_first(&a).await?;
    let generation = next_revision(&mut stream, SOON).await?.generation();
    for (phase, sent) in [(Phase::Healthy, 999), (Phase::Degraded, 0)] {
        agent
            .report(greenlight::v1::StatusReport {
                revision: a.to_uppercase(),
                phase: phase.into(),
                generation: sent,
                ..Default::default()
            })
            .await?;
        let kept = w.server.reported("prod", &a, phase).await?;
        assert_eq!(kept.generation, generation, "sent {sent}");
    }
    w.server.stop().await?;
    Ok(())
}

/// Catch-up takes from GitLab's API only what a webhook may bring: a head or a pipeline on
/// an abbreviated SHA, which could name another commit once the repository grows, is left
/// out, and a full one is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_reads_only_full_commit_shas() -> anyhow::Result<()> {
    let w = CatchingUp::start().await?;
    let a = w.commit("a")?;
    let pipeline = |sha: &str| json!({"id": 1, "sha": sha, "ref": "main", "status": "success", "source": "push", "updated_at": "2026-11-26T10:01:00.000Z"});
    w.gitlab.set_branch_head(PROJECT, "main", &a[..7]);
    w.gitlab.set_pipelines(PROJECT, vec![pipeline(&a[..7])]);
    w.rounds_pass(2).await?;
    let refs = main_ref(&w.server).await?;
    assert!(refs.head.is_empty() && refs.commits.is_empty(), "{refs:?}");

    w.gitlab.set_branch_head(PROJECT, "main", &a);
    w.gitlab.set_pipelines(PROJECT, vec![pipeline(&a)]);
    assert_eq!(w.heads_once_head_is(&a).await?, [a]);
    w.server.stop().await?;
    Ok(())
}

/// GitLab's pipeline status counts the commit statuses posted into the pipeline, the
/// server's own among them: catch-up must not record a green pipeline as failed because a
/// deploy failed on one cluster, nor as running while a deploy is under way, while it still
/// records what the CI jobs themselves changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_reads_a_pipeline_by_its_ci_jobs_not_the_deploy_statuses_posted_into_it()
-> anyhow::Result<()> {
    let w = CatchingUp::start().await?;
    let (a, b, c) = (w.commit("a")?, w.commit("b")?, w.commit("c")?);
    let (d, e) = (w.commit("d")?, w.commit("e")?);
    let mut stream = w.deployed_first(&a).await?;
    assert_eq!(w.server.push("main", &a, &b).await?, 200);
    w.green(&b, 2).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), b);
    for (before, sha, id) in [(&b, &c, 3), (&c, &d, 4), (&d, &e, 5)] {
        assert_eq!(w.server.push("main", before, sha).await?, 200);
        assert_eq!(
            w.server
                .pipeline("main", sha, id, "running", "push")
                .await?,
            200
        );
    }

    let job = |name: &str, stage: &str, status: &str, at: &str| {
        json!({"name": name, "stage": stage, "status": status, "allow_failure": false,
            "started_at": "2026-11-26T10:00:00.000Z", "finished_at": at})
    };
    let listed = |sha: &str, id: u64, status: &str, builds: Vec<serde_json::Value>| {
        json!({"id": id, "sha": sha, "ref": "main", "status": status, "source": "push",
            "updated_at": "2026-11-26T10:30:00.000Z", "builds": builds})
    };
    let mut downstream_failed = listed(
        &d,
        4,
        "failed",
        vec![job("test", "test", "success", "2026-11-26T10:22:00.000Z")],
    );
    downstream_failed["bridges"] = json!([job(
        "trigger-e2e",
        "test",
        "failed",
        "2026-11-26T10:25:00.000Z"
    )]);
    w.gitlab.set_pipelines(
        PROJECT,
        vec![
            // Green since its hook said it ran (that hook was lost), and held as running on
            // GitLab by a deploy's status: recorded green.
            listed(
                &e,
                5,
                "running",
                vec![
                    job("test", "test", "success", "2026-11-26T10:24:00.000Z"),
                    job(
                        "greenlight/staging",
                        "external",
                        "pending",
                        "2026-11-26T10:28:00.000Z",
                    ),
                ],
            ),
            // Failed by its trigger job, which the jobs list leaves out: recorded failed.
            downstream_failed,
            // Its CI job failed since the hook said it ran: recorded.
            listed(
                &c,
                3,
                "failed",
                vec![job("test", "test", "failed", "2026-11-26T10:20:00.000Z")],
            ),
            // Green, then a deploy under way.
            listed(
                &b,
                2,
                "running",
                vec![
                    job("test", "test", "success", "2026-11-26T10:05:00.000Z"),
                    job(
                        "greenlight/prod",
                        "external",
                        "running",
                        "2026-11-26T10:29:00.000Z",
                    ),
                ],
            ),
            // Green, then a deploy that failed.
            listed(
                &a,
                1,
                "failed",
                vec![
                    job("test", "test", "success", "2026-11-26T10:01:00.000Z"),
                    job(
                        "greenlight/staging",
                        "external",
                        "failed",
                        "2026-11-26T10:29:00.000Z",
                    ),
                ],
            ),
        ],
    );
    w.gitlab.set_branch_head(PROJECT, "main", &e);
    let status_of = |commits: &[CommitInfo], sha: &str| {
        commits
            .iter()
            .find(|commit| commit.sha == sha)
            .and_then(|commit| commit.pipelines.first())
            .map(|pipeline| pipeline.status())
    };
    let commits = eventually("c, d and e caught up by their jobs", || async {
        let commits = w.commits_once_head_is(&e).await?;
        let caught_up = [
            status_of(&commits, &c),
            status_of(&commits, &d),
            status_of(&commits, &e),
        ] == [
            Some(PipelineStatus::Failed),
            Some(PipelineStatus::Failed),
            Some(PipelineStatus::Success),
        ];
        Ok(caught_up.then_some(commits))
    })
    .await?;
    assert_eq!(status_of(&commits, &b), Some(PipelineStatus::Success));
    assert_eq!(status_of(&commits, &a), Some(PipelineStatus::Success));
    let job_reads = || {
        w.gitlab
            .requests()
            .iter()
            .filter(|request| request.path.ends_with("/jobs"))
            .count()
    };
    // Later rounds read a pipeline's jobs again only once it changed, and record nothing.
    w.rounds_pass(1).await?;
    let read = job_reads();
    w.rounds_pass(3).await?;
    let commits = w.commits_once_head_is(&e).await?;
    assert_eq!(status_of(&commits, &b), Some(PipelineStatus::Success));
    assert_eq!(status_of(&commits, &a), Some(PipelineStatus::Success));
    assert_eq!(job_reads(), read, "no pipeline changed");
    w.server.stop().await?;
    Ok(())
}
