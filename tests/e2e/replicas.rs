//! Several replicas on one Redis: webhooks on one, agents on another.

use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use greenlight::v1::GetAgentRequest;
use greenlight_e2e::fake_gitlab::FakeGitLab;
use greenlight_e2e::process::ServerProcess;
use greenlight_e2e::{
    AgentDef, Redis, SOON, TestServer, config_yaml, eventually, eventually_within, metric,
    next_revision, sha,
};
use greenlight_server::config::{Config, Overrides};

/// How long a replica may take to notice a Redis restart and resume the change log: its
/// follower backs off while Redis is down.
const RECOVER: Duration = Duration::from_secs(20);

/// How long a commit status another replica took may stay unposted before a survivor takes
/// it over, in these tests.
const TAKEOVER: &str = "1s";

const RESYNCS: &str = "greenlight_change_log_resyncs_total";

const NULL_SHA: &str = "0000000000000000000000000000000000000000";

/// A replica named `replica` on `redis` with the agent `prod` on `PROJECT@main`.
async fn replica(redis: &Redis, replica: &str) -> anyhow::Result<TestServer> {
    let yaml = config_yaml(Some(&redis.url()), &[AgentDef::new("prod")]);
    let overrides = Overrides {
        replica_id: Some(replica.to_owned()),
        ..Overrides::default()
    };
    TestServer::start_with(Config::from_yaml(&yaml, &overrides)?).await
}

/// Polls `GetAgent(prod)` on `server` until `check` holds, for up to SOON.
async fn wait_for_agent(
    server: &TestServer,
    what: &str,
    check: impl Fn(&greenlight::v1::AgentStatus) -> bool,
) -> anyhow::Result<greenlight::v1::AgentStatus> {
    let mut admin = server.admin().await?;
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let status = admin
            .get_agent(GetAgentRequest {
                name: "prod".into(),
            })
            .await?
            .into_inner();
        if check(&status) {
            return Ok(status);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{what}: not within {SOON:?}; last status {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Posts a push and a successful pipeline for commit `n`, expecting both recorded.
async fn deploy(server: &TestServer, before: &str, n: u32) -> anyhow::Result<()> {
    let commit = sha(n);
    assert_eq!(
        server.push("main", before, &commit).await?,
        200,
        "push of {commit}"
    );
    assert_eq!(
        server
            .pipeline("main", &commit, u64::from(n), "success", "push")
            .await?,
        200,
        "pipeline of {commit}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_on_one_replica_reach_an_agent_on_another() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let a = replica(&redis, "replica-a").await?;
    let b = replica(&redis, "replica-b").await?;
    let mut stream = b.stream("prod").await?;

    deploy(&a, NULL_SHA, 1).await?;
    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.sha(), sha(1));

    deploy(&a, &sha(1), 2).await?;
    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.sha(), sha(2), "every later decision follows");

    // Both replicas agree on the desired revision.
    for server in [&a, &b] {
        let status = wait_for_agent(server, "desired is commit 2", |s| {
            s.desired.as_ref().is_some_and(|d| d.sha == sha(2))
        })
        .await?;
        assert_eq!(status.desired.map(|d| d.sha), Some(sha(2)));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_on_another_replica_is_visible() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let a = replica(&redis, "replica-a").await?;
    let b = replica(&redis, "replica-b").await?;

    let before = a
        .admin()
        .await?
        .get_agent(GetAgentRequest {
            name: "prod".into(),
        })
        .await?
        .into_inner();
    assert!(!before.connected, "nobody is connected yet: {before:?}");
    assert!(before.replica.is_empty());

    let stream = b.stream("prod").await?;
    let status = wait_for_agent(&a, "A sees the agent connected", |s| s.connected).await?;
    assert!(
        !status.replica.is_empty(),
        "a connected agent names its replica"
    );
    assert_eq!(
        status.replica, "replica-b",
        "the agent is connected to B, not A"
    );
    let on_b = wait_for_agent(&b, "B sees the agent connected", |s| s.connected).await?;
    assert_eq!(on_b.replica, "replica-b");

    drop(stream);
    let status = wait_for_agent(&a, "A sees the agent gone", |s| !s.connected).await?;
    assert!(status.replica.is_empty(), "{status:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_replica_ends_agent_streams_cleanly() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let a = replica(&redis, "replica-a").await?;
    let b = replica(&redis, "replica-b").await?;
    let mut stream = b.stream("prod").await?;
    deploy(&a, NULL_SHA, 1).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(1));

    // What SIGTERM does; the agent keeps reading meanwhile, as a real one would.
    let stopping = tokio::spawn(b.stop());
    let ended = tokio::time::timeout(SOON, stream.next())
        .await
        .context("the stream stayed open after stop")?;
    match ended {
        Ok(None) | Err(_) => {}
        Ok(Some(revision)) => bail!(
            "expected the stream to end, got revision {}",
            revision.sha()
        ),
    }
    tokio::time::timeout(SOON, stopping)
        .await
        .context("stop did not return")???;

    // The other replica still serves: the agent reconnects there and gets its revision.
    let mut again = a.stream("prod").await?;
    assert_eq!(next_revision(&mut again, SOON).await?.sha(), sha(1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_after_a_redis_outage_reach_other_replicas() -> anyhow::Result<()> {
    let mut redis = Redis::start().await?;
    let a = replica(&redis, "replica-a").await?;
    let b = replica(&redis, "replica-b").await?;
    let mut stream = b.stream("prod").await?;
    deploy(&a, NULL_SHA, 1).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(1));
    let resyncs_before = metric(&b, RESYNCS).await?;

    redis.kill();
    let status = a.push("main", &sha(1), &sha(2)).await?;
    assert_eq!(status, 503, "nothing can be recorded while Redis is down");
    redis.restart().await?;

    // Replica A's connection comes back on its own; GitLab would redeliver until it does.
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let status = a.push("main", &sha(1), &sha(2)).await?;
        if status == 200 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "push still answered {status} long after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        a.pipeline("main", &sha(2), 2, "success", "push").await?,
        200
    );

    let revision = next_revision(&mut stream, RECOVER)
        .await
        .context("B did not pick up A's decision after the outage")?;
    assert_eq!(revision.sha(), sha(2));
    // B resumed the change log where it stopped: the outage cost it no re-read of everything.
    assert_eq!(
        metric(&b, RESYNCS).await?,
        resyncs_before,
        "no re-read after the outage"
    );
    Ok(())
}

/// A replica on `redis` that posts commit statuses to `gitlab`, taking over those of a
/// replica that died after `takeover`.
async fn posting_replica(
    redis: &Redis,
    gitlab: &FakeGitLab,
    replica: &str,
    takeover: &str,
) -> anyhow::Result<TestServer> {
    let mut yaml = config_yaml(Some(&redis.url()), &[AgentDef::new("prod")]);
    yaml.push_str(&gitlab.config(&format!(", status_takeover: {takeover}")));
    let overrides = Overrides {
        replica_id: Some(replica.to_owned()),
        ..Overrides::default()
    };
    TestServer::start_with(Config::from_yaml(&yaml, &overrides)?).await
}

/// Replica A, which decided to deploy commit 1 and keeps trying to post its status: GitLab
/// is down.
async fn failing_to_post_commit_1(
    redis: &Redis,
    gitlab: &FakeGitLab,
    takeover: &str,
) -> anyhow::Result<TestServer> {
    let a = posting_replica(redis, gitlab, "replica-a", takeover).await?;
    gitlab.fail_with(Some(503));
    deploy(&a, NULL_SHA, 1).await?;
    eventually("replica A trying to post the status", || async {
        Ok((!gitlab.status_attempts(&sha(1)).is_empty()).then_some(()))
    })
    .await?;
    Ok(a)
}

/// [`failing_to_post_commit_1`] as a process of its own, named `replica-a`, so that killing
/// it is a real SIGKILL: no step of its shutdown runs.
async fn process_failing_to_post_commit_1(
    redis: &Redis,
    gitlab: &FakeGitLab,
    takeover: &str,
) -> anyhow::Result<ServerProcess> {
    let yaml = format!(
        "{}{}replica_id: replica-a\n",
        config_yaml(Some(&redis.url()), &[AgentDef::new("prod")]),
        gitlab.config(&format!(", status_takeover: {takeover}"))
    );
    let a = ServerProcess::from_yaml(&yaml).await?;
    gitlab.fail_with(Some(503));
    a.api.release(NULL_SHA, &sha(1), 1).await?;
    eventually("replica A trying to post the status", || async {
        Ok((!gitlab.status_attempts(&sha(1)).is_empty()).then_some(()))
    })
    .await?;
    Ok(a)
}

/// A replica dies (as by SIGKILL) right after its decision, while GitLab still refuses the
/// commit status: a surviving replica takes the status over and posts it, once per state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_commit_status_is_posted_once_by_a_survivor() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let gitlab = FakeGitLab::start().await?;
    let commit = sha(1);

    let a = failing_to_post_commit_1(&redis, &gitlab, TAKEOVER).await?;
    a.kill();
    gitlab.fail_with(None);

    let b = posting_replica(&redis, &gitlab, "replica-b", TAKEOVER).await?;
    let posted = eventually("the survivor posting the dead replica's status", || async {
        let statuses = gitlab.statuses_for(&commit);
        Ok((!statuses.is_empty()).then_some(statuses))
    })
    .await?;
    assert_eq!(posted[0].0, "pending");
    assert_eq!(posted[0].1, "greenlight/prod");

    // The agent reports on B: its result is posted too, and nothing is posted twice, even
    // after several takeover periods.
    let agent = b.agent("prod").await?;
    agent
        .report(greenlight::v1::StatusReport {
            revision: commit.clone(),
            phase: greenlight::v1::Phase::Healthy.into(),
            ..Default::default()
        })
        .await?;
    eventually("the success status", || async {
        Ok(gitlab
            .statuses_for(&commit)
            .iter()
            .any(|(state, _, _)| state == "success")
            .then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let states: Vec<String> = gitlab
        .statuses_for(&commit)
        .into_iter()
        .map(|(state, _, _)| state)
        .collect();
    assert_eq!(states, ["pending", "success"], "each state exactly once");
    Ok(())
}

/// A replica stopped (SIGTERM) while GitLab refuses the commit status it is posting hands
/// the status back: another replica posts it within seconds, not after the takeover time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_replicas_commit_status_is_posted_by_another_at_once() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let gitlab = FakeGitLab::start().await?;
    let commit = sha(1);
    // Ten minutes: only a hand-back explains a post within the test's wait.
    let takeover = "10m";

    let a = failing_to_post_commit_1(&redis, &gitlab, takeover).await?;
    let b = posting_replica(&redis, &gitlab, "replica-b", takeover).await?;
    a.stop().await?;
    gitlab.fail_with(None);

    let posted = eventually("replica B posting the status A handed back", || async {
        let statuses = gitlab.statuses_for(&commit);
        Ok((!statuses.is_empty()).then_some(statuses))
    })
    .await?;
    assert_eq!(posted[0].0, "pending");
    assert_eq!(posted[0].1, "greenlight/prod");
    drop(b);
    Ok(())
}

/// A replica killed with SIGKILL while GitLab refuses the commit status it is posting
/// hands nothing back, but it stops marking itself alive: a surviving replica posts the
/// status about half a minute later, long before the takeover time (ten minutes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_commit_status_is_posted_once_it_falls_silent() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let gitlab = FakeGitLab::start().await?;
    let commit = sha(1);
    let takeover = "10m";
    let mut a = process_failing_to_post_commit_1(&redis, &gitlab, takeover).await?;
    let b = posting_replica(&redis, &gitlab, "replica-b", takeover).await?;
    a.kill();
    gitlab.fail_with(None);

    // Silent for 30 s, then the survivor's next look (every 5 s) finds it dead.
    let posted = eventually_within(
        "the killed replica's status, posted",
        Duration::from_secs(90),
        || async {
            let statuses = gitlab.statuses_for(&commit);
            Ok((!statuses.is_empty()).then_some(statuses))
        },
    )
    .await?;
    assert_eq!(posted[0].0, "pending");
    assert_eq!(posted[0].1, "greenlight/prod");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(gitlab.statuses_for(&commit).len(), 1, "posted once");
    drop(b);
    Ok(())
}

/// A replica killed while GitLab refuses a commit status and started again under its name
/// (a container restarted in its pod, which the others see alive all along) posts the
/// status at once, not after the takeover time (ten minutes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_under_its_name_posts_what_it_held_at_once() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let gitlab = FakeGitLab::start().await?;
    let commit = sha(1);
    let mut a = process_failing_to_post_commit_1(&redis, &gitlab, "10m").await?;
    a.kill();
    gitlab.fail_with(None);
    a.restart()
        .await
        .with_context(|| format!("restart failed; log:\n{}", a.log()))?;
    let posted = eventually("the status taken before the restart, posted", || async {
        let statuses = gitlab.statuses_for(&commit);
        Ok((!statuses.is_empty()).then_some(statuses))
    })
    .await?;
    assert_eq!(posted[0].0, "pending");
    Ok(())
}
