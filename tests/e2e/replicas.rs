//! Several replicas on one Redis: webhooks on one, agents on another.

use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use greenlight::v1::GetAgentRequest;
use greenlight_e2e::{AgentDef, Redis, SOON, TestServer, config_yaml, next_revision, sha};
use greenlight_server::config::{Config, Overrides};

/// How long a replica may take to notice a Redis restart, re-subscribe and re-read: the
/// subscriber backs off while Redis is down.
const RECOVER: Duration = Duration::from_secs(20);

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
    Ok(())
}
