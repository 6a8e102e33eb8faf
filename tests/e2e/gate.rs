//! The gate end to end: webhooks in, revisions out to a connected agent.

use greenlight::v1::{
    GetAgentRequest, GetRefRequest, PauseSyncRequest, PinRevisionRequest, ResumeSyncRequest,
    TriggerSyncRequest, UnpinRevisionRequest,
};
use greenlight_e2e::*;

async fn setup(agents: &[AgentDef]) -> anyhow::Result<(Redis, TestServer)> {
    let redis = Redis::start().await?;
    let server = TestServer::start(&config_yaml(Some(&redis.url()), agents)).await?;
    Ok((redis, server))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_pipeline_holds_and_success_releases() -> anyhow::Result<()> {
    let (_redis, server) = setup(&[AgentDef::new("prod")]).await?;
    let mut stream = server.stream("prod").await?;
    assert_eq!(server.push("main", ZERO, &sha(1)).await?, 200);
    assert_eq!(
        server
            .pipeline("main", &sha(1), 100, "running", "push")
            .await?,
        200
    );
    no_revision(&mut stream, QUIET).await?;
    assert_eq!(
        server
            .pipeline("main", &sha(1), 100, "success", "push")
            .await?,
        200
    );
    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.sha(), sha(1));
    let header = revision.header.revision.clone().unwrap_or_default();
    assert_eq!(header.pipeline_id, Some(100));
    assert!(header.reason.contains("pipeline 100"), "{}", header.reason);
    assert_eq!(revision.header.project, PROJECT);
    assert_eq!(revision.header.r#ref, "main");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_green_commit_wins_and_older_success_changes_nothing() -> anyhow::Result<()> {
    let (_redis, server) = setup(&[AgentDef::new("prod")]).await?;
    let mut stream = server.stream("prod").await?;
    server.push("main", ZERO, &sha(2)).await?;
    server.push("main", &sha(2), &sha(3)).await?;
    server
        .pipeline("main", &sha(2), 200, "running", "push")
        .await?;
    server
        .pipeline("main", &sha(3), 201, "success", "push")
        .await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(3));
    assert_eq!(
        server
            .pipeline("main", &sha(2), 200, "success", "push")
            .await?,
        200
    );
    no_revision(&mut stream, QUIET).await?;
    let status = server.agent_status("prod").await?;
    assert_eq!(status.desired.unwrap_or_default().sha, sha(3));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pipeline_holds_until_a_retry_succeeds() -> anyhow::Result<()> {
    let (_redis, server) = setup(&[AgentDef::new("prod")]).await?;
    let mut stream = server.stream("prod").await?;
    server.push("main", ZERO, &sha(4)).await?;
    server
        .pipeline("main", &sha(4), 300, "failed", "push")
        .await?;
    no_revision(&mut stream, QUIET).await?;
    let status = server.agent_status("prod").await?;
    let reason = status.last_decision.unwrap_or_default().reason;
    assert!(reason.contains("pipeline 300 is failed"), "{reason}");
    server
        .pipeline("main", &sha(4), 301, "success", "push")
        .await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(4));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_request_pipeline_never_opens_the_gate() -> anyhow::Result<()> {
    let (_redis, server) = setup(&[AgentDef::new("prod")]).await?;
    let mut stream = server.stream("prod").await?;
    server.push("main", ZERO, &sha(5)).await?;
    assert_eq!(
        server
            .pipeline("main", &sha(5), 400, "success", "merge_request_event")
            .await?,
        200
    );
    no_revision(&mut stream, QUIET).await?;
    let commits = server
        .admin()
        .await?
        .get_ref(GetRefRequest {
            project: PROJECT.into(),
            r#ref: "main".into(),
        })
        .await?
        .into_inner()
        .commits;
    assert_eq!(
        commits[0].pipelines[0].source, "merge_request_event",
        "recorded, yet not counted"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_connecting_after_the_decision_gets_it_at_once_and_not_twice() -> anyhow::Result<()> {
    let (_redis, server) = setup(&[AgentDef::new("prod")]).await?;
    server.push("main", ZERO, &sha(6)).await?;
    server
        .pipeline("main", &sha(6), 500, "success", "push")
        .await?;
    let mut stream = server.stream("prod").await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(6));
    let mut already_applied = server.agent("prod").await?.sync(Some(&sha(6))).await?;
    no_revision(&mut already_applied, QUIET).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_only_receive_their_own_revisions() -> anyhow::Result<()> {
    let mut staging = AgentDef::new("staging");
    staging.branch = "staging".into();
    let (_redis, server) = setup(&[AgentDef::new("prod"), staging]).await?;
    let mut prod = server.stream("prod").await?;
    let mut staging = server.stream("staging").await?;
    server.push("staging", ZERO, &sha(7)).await?;
    server
        .pipeline("staging", &sha(7), 600, "success", "push")
        .await?;
    assert_eq!(next_revision(&mut staging, SOON).await?.sha(), sha(7));
    no_revision(&mut prod, QUIET).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_mode_deploys_every_head() -> anyhow::Result<()> {
    let (_redis, server) = setup(&[AgentDef::new("dev").mode("immediate")]).await?;
    let mut stream = server.stream("dev").await?;
    server.push("main", ZERO, &sha(8)).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(8));
    server.push("main", &sha(8), &sha(9)).await?;
    server
        .pipeline("main", &sha(9), 700, "failed", "push")
        .await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(9));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_mode_waits_for_a_trigger() -> anyhow::Result<()> {
    let (_redis, server) = setup(&[AgentDef::new("prod").mode("manual")]).await?;
    let mut stream = server.stream("prod").await?;
    server.push("main", ZERO, &sha(10)).await?;
    server
        .pipeline("main", &sha(10), 800, "success", "push")
        .await?;
    no_revision(&mut stream, QUIET).await?;
    let mut admin = server.admin().await?;
    admin
        .trigger_sync(TriggerSyncRequest {
            name: "prod".into(),
            sha: None,
            force_prune: false,
        })
        .await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(10));
    server.push("main", &sha(10), &sha(11)).await?;
    no_revision(&mut stream, QUIET).await?;
    admin
        .trigger_sync(TriggerSyncRequest {
            name: "prod".into(),
            sha: Some(sha(11)),
            force_prune: false,
        })
        .await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(11));
    let backwards = admin
        .trigger_sync(TriggerSyncRequest {
            name: "prod".into(),
            sha: Some(sha(10)),
            force_prune: false,
        })
        .await;
    assert_eq!(
        backwards.unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggering_an_abbreviated_sha_is_an_invalid_argument() -> anyhow::Result<()> {
    let (_redis, server) = setup(&[AgentDef::new("prod").mode("manual")]).await?;
    let mut stream = server.stream("prod").await?;
    let full = sha(30);
    server.push("main", ZERO, &full).await?;
    let mut admin = server.admin().await?;
    let trigger = |sha: &str| TriggerSyncRequest {
        name: "prod".into(),
        sha: Some(sha.into()),
        force_prune: false,
    };

    // Seven characters name this commit today, and maybe another one tomorrow.
    let short = &full[..7];
    let refused = admin
        .trigger_sync(trigger(short))
        .await
        .expect_err("an abbreviated SHA is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("full commit SHA") && refused.message().contains(short),
        "{}",
        refused.message()
    );
    no_revision(&mut stream, QUIET).await?;
    assert!(server.agent_status("prod").await?.desired.is_none());

    // The full SHA of the same commit deploys.
    let status = admin.trigger_sync(trigger(&full)).await?.into_inner();
    assert_eq!(status.desired.unwrap_or_default().sha, full);
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), full);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_and_resume_releases() -> anyhow::Result<()> {
    let (_redis, server) = setup(&[AgentDef::new("prod")]).await?;
    let mut stream = server.stream("prod").await?;
    let mut admin = server.admin().await?;
    server.push("main", ZERO, &sha(12)).await?;
    server
        .pipeline("main", &sha(12), 900, "success", "push")
        .await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(12));
    let paused = admin
        .pause_sync(PauseSyncRequest {
            name: "prod".into(),
            reason: "change freeze".into(),
        })
        .await?
        .into_inner();
    assert_eq!(paused.paused.unwrap_or_default().reason, "change freeze");
    server.push("main", &sha(12), &sha(13)).await?;
    server
        .pipeline("main", &sha(13), 901, "success", "push")
        .await?;
    no_revision(&mut stream, QUIET).await?;
    let missing_reason = admin
        .pause_sync(PauseSyncRequest {
            name: "prod".into(),
            reason: " ".into(),
        })
        .await;
    assert_eq!(
        missing_reason.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    admin
        .resume_sync(ResumeSyncRequest {
            name: "prod".into(),
        })
        .await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(13));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_holds_a_commit_and_unpin_returns_to_the_gate() -> anyhow::Result<()> {
    let (_redis, server) = setup(&[AgentDef::new("prod")]).await?;
    let mut stream = server.stream("prod").await?;
    let mut admin = server.admin().await?;
    server.push("main", ZERO, &sha(14)).await?;
    server
        .pipeline("main", &sha(14), 1000, "success", "push")
        .await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(14));
    server.push("main", &sha(14), &sha(15)).await?;
    server
        .pipeline("main", &sha(15), 1001, "success", "push")
        .await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(15));

    let pin = PinRevisionRequest {
        name: "prod".into(),
        sha: sha(14),
        reason: "bad release".into(),
    };
    let pinned = admin.pin_revision(pin).await?.into_inner();
    assert_eq!(pinned.pinned.unwrap_or_default().sha, sha(14));
    assert_eq!(
        next_revision(&mut stream, SOON).await?.sha(),
        sha(14),
        "a pin is a deliberate rollback"
    );
    server.push("main", &sha(15), &sha(16)).await?;
    server
        .pipeline("main", &sha(16), 1002, "success", "push")
        .await?;
    no_revision(&mut stream, QUIET).await?;

    admin
        .unpin_revision(UnpinRevisionRequest {
            name: "prod".into(),
        })
        .await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(16));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_and_ref_state_are_readable_by_operators() -> anyhow::Result<()> {
    let (_redis, server) = setup(&[AgentDef::new("prod")]).await?;
    server.push("main", ZERO, &sha(17)).await?;
    server
        .pipeline("main", &sha(17), 1100, "success", "push")
        .await?;
    let mut admin = server.admin().await?;
    let status = server.desired_becomes("prod", &sha(17)).await?;
    let desired = status.desired.unwrap_or_default();
    assert_eq!(
        (desired.sha.as_str(), desired.pipeline_id),
        (sha(17).as_str(), Some(1100))
    );
    assert!(!status.connected);
    let refs = admin
        .get_ref(GetRefRequest {
            project: PROJECT.into(),
            r#ref: "refs/heads/main".into(),
        })
        .await?
        .into_inner();
    assert_eq!(refs.head, sha(17));
    assert_eq!(refs.commits[0].pipelines[0].id, 1100);
    let missing = admin
        .get_agent(GetAgentRequest {
            name: "nope".into(),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_requested_while_the_agent_was_away_is_not_lost() -> anyhow::Result<()> {
    let (_redis, server) = setup(&[AgentDef::new("prod")]).await?;
    server.release(ZERO, &sha(18), 1200).await?;
    let first = next_revision(&mut server.stream("prod").await?, SOON).await?;
    let applied_generation = first.generation();

    // The agent is away when the operator asks for a re-sync.
    server
        .admin()
        .await?
        .trigger_sync(TriggerSyncRequest {
            name: "prod".into(),
            sha: None,
            force_prune: false,
        })
        .await?;

    let agent = server.agent("prod").await?;
    let mut back = agent
        .sync_from(Some((&sha(18), Some(applied_generation))))
        .await?;
    let resent = next_revision(&mut back, SOON).await?;
    assert_eq!(resent.sha(), sha(18));
    assert!(resent.generation() > applied_generation);

    let mut current = agent
        .sync_from(Some((&sha(18), Some(resent.generation()))))
        .await?;
    no_revision(&mut current, QUIET).await?;
    Ok(())
}
