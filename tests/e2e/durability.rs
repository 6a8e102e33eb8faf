//! What the server accepted survives its death: a `greenlight-server` process killed with
//! SIGKILL right after it answered, restarted on the same Redis.

use anyhow::Context;
use greenlight::v1::{Phase, StatusReport};
use greenlight_e2e::fake_gitlab::FakeGitLab;
use greenlight_e2e::process::ServerProcess;
use greenlight_e2e::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_accepted_before_a_sigkill_is_kept_and_becomes_its_commit_status()
-> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let gitlab = FakeGitLab::start().await?;
    let yaml = format!(
        "{}{}replica_id: replica-a\n",
        config_yaml(Some(&redis.url()), &[AgentDef::new("prod")]),
        gitlab.config(", status_takeover: 2s")
    );
    let mut server = ServerProcess::from_yaml(&yaml).await?;
    let x = sha(0xd1);
    // GitLab's API confirms the pipeline the hook claims.
    gitlab.put_pipeline(
        PROJECT,
        json!({ "id": 1, "sha": x, "ref": "main", "status": "success", "source": "push" }),
    );
    let agent = server.api.agent("prod").await?;
    let mut stream = agent.sync(None).await?;
    server.api.release(ZERO, &x, 1).await?;
    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.sha(), x);

    // GitLab is down when the report comes: the status cannot be posted before the kill.
    gitlab.fail_with(Some(500));
    let healthy = StatusReport {
        revision: x.clone(),
        generation: revision.header.revision.map_or(0, |r| r.generation),
        phase: Phase::Healthy.into(),
        message: "all objects healthy".into(),
        objects_done: 3,
        objects_total: 3,
        ..Default::default()
    };
    agent.report(healthy).await?;
    server.kill();
    let posted_before = gitlab
        .statuses_for(&x)
        .into_iter()
        .filter(|(state, _, _)| state == "success")
        .count();
    assert_eq!(posted_before, 0, "GitLab was down: nothing could be posted");

    gitlab.fail_with(None);
    server
        .restart()
        .await
        .with_context(|| format!("restart failed; log:\n{}", server.log()))?;
    let kept = server.api.reported("prod", &x, Phase::Healthy).await?;
    assert_eq!((kept.objects_done, kept.objects_total), (3, 3));
    let history = server.api.history("prod").await?;
    assert!(
        history
            .reports
            .iter()
            .any(|r| r.revision == x && r.phase() == Phase::Healthy),
        "{history:?}"
    );
    let (state, name, _) = eventually("the success status of the report", || async {
        Ok(gitlab
            .statuses_for(&x)
            .into_iter()
            .find(|(state, _, _)| state == "success"))
    })
    .await
    .with_context(|| format!("server log:\n{}", server.log()))?;
    assert_eq!(
        (state.as_str(), name.as_str()),
        ("success", "greenlight/prod")
    );
    Ok(())
}

/// The README's first command, the example config on the embedded store: what it answered
/// (facts, decisions, a pause, a pin, a runtime agent) is all there after `kill -9`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_commands_embedded_store_keeps_what_it_answered_across_a_sigkill()
-> anyhow::Result<()> {
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/greenlight.yaml"),
    )?;
    assert!(
        !example.lines().any(|line| line.starts_with("redis:")),
        "the example runs on the embedded store"
    );
    let mut server = ServerProcess::from_yaml(&example).await?;
    let (x, y) = (sha(0xe1), sha(0xe2));
    let hook = async |server: &ServerProcess, event: &str, body: serde_json::Value| {
        let headers = [
            ("X-Gitlab-Event", event),
            ("X-Gitlab-Token", "example-webhook-secret"),
            ("Content-Type", "application/json"),
        ];
        server
            .api
            .raw_hook(&headers, body.to_string().into_bytes())
            .await
    };
    let push = |before: &str, after: &str| push_payload(PROJECT, "main", before, after);
    let green = |sha: &str, id| pipeline_payload(PROJECT, "main", sha, id, "success", "push");
    assert_eq!(hook(&server, "Push Hook", push(ZERO, &x)).await?, 200);
    assert_eq!(hook(&server, "Pipeline Hook", green(&x, 1)).await?, 200);

    let mut admin = server.api.admin_as("example-admin-token").await?;
    let get = |name: &str| greenlight::v1::GetAgentRequest { name: name.into() };
    eventually("prod-eu desires x", || {
        let mut admin = admin.clone();
        let x = x.clone();
        async move {
            let status = admin.get_agent(get("prod-eu")).await?.into_inner();
            Ok(status.desired.filter(|d| d.sha == x))
        }
    })
    .await?;
    admin
        .pin_revision(greenlight::v1::PinRevisionRequest {
            name: "prod-eu".into(),
            sha: x.clone(),
            reason: "hold x while we look".into(),
        })
        .await?;
    admin
        .pause_sync(greenlight::v1::PauseSyncRequest {
            name: "dev".into(),
            reason: "change freeze".into(),
        })
        .await?;
    let created = admin
        .create_agent(greenlight::v1::CreateAgentRequest {
            agent: Some(greenlight::v1::AgentDefinition {
                name: "edge".into(),
                project: PROJECT.into(),
                r#ref: "main".into(),
                ..Default::default()
            }),
            ci_token: false,
        })
        .await?
        .into_inner();
    // The last facts are answered right before the kill.
    assert_eq!(hook(&server, "Push Hook", push(&x, &y)).await?, 200);
    assert_eq!(hook(&server, "Pipeline Hook", green(&y, 2)).await?, 200);
    server.kill();

    server
        .restart()
        .await
        .with_context(|| format!("restart failed; log:\n{}", server.log()))?;
    let mut admin = server.api.admin_as("example-admin-token").await?;
    let prod = admin.get_agent(get("prod-eu")).await?.into_inner();
    assert_eq!(
        prod.desired.as_ref().map(|d| d.sha.as_str()),
        Some(x.as_str())
    );
    let pinned = prod.pinned.context("prod-eu is still pinned")?;
    assert_eq!(
        (pinned.sha.as_str(), pinned.reason.as_str()),
        (x.as_str(), "hold x while we look")
    );
    let dev = admin.get_agent(get("dev")).await?.into_inner();
    let paused = dev.paused.context("dev is still paused")?;
    assert_eq!(paused.reason, "change freeze");
    // y's green pipeline, answered just before the kill, is known and opens the gate of the
    // agent that is neither paused nor pinned.
    let main = admin
        .get_ref(greenlight::v1::GetRefRequest {
            project: PROJECT.into(),
            r#ref: "main".into(),
        })
        .await?
        .into_inner();
    assert_eq!(main.head, y);
    let edge = eventually("the runtime agent desires y", || {
        let mut admin = admin.clone();
        let y = y.clone();
        async move {
            let status = admin.get_agent(get("edge")).await?.into_inner();
            Ok(status
                .desired
                .as_ref()
                .is_some_and(|d| d.sha == y)
                .then_some(status))
        }
    })
    .await?;
    assert!(edge.runtime, "{edge:?}");
    // The runtime agent's token, shown once before the kill, still lets it in.
    let agent =
        greenlight_agent::client::Client::connect(&server.api.grpc_url(), &created.token, None)
            .await?;
    let mut stream = agent.sync(None).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), y);
    Ok(())
}

/// A full disk under the embedded store: the change that cannot be written is refused with
/// 503 and a message naming the file, every later one too, `/readyz` fails, and once the
/// disk has room again every webhook answered 200 before is there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_what_it_cannot_write_and_loses_nothing_answered() -> anyhow::Result<()>
{
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/greenlight.yaml"),
    )?;
    // A fresh store file is 72 KiB; the webhooks below must grow it past the limit.
    const DISK: u64 = 384 * 1024;
    let mut server =
        ServerProcess::from_yaml_with(&example, |process| process.limit_file_size(Some(DISK)))
            .await?;
    let client = reqwest::Client::new();
    let webhooks = server.webhook_url();
    let send = async |before: &str, after: &str| -> anyhow::Result<(u16, String)> {
        let response = client
            .post(&webhooks)
            .header("X-Gitlab-Event", "Push Hook")
            .header("X-Gitlab-Token", "example-webhook-secret")
            .header("Content-Type", "application/json")
            .body(push_payload(PROJECT, "main", before, after).to_string())
            .send()
            .await?;
        Ok((response.status().as_u16(), response.text().await?))
    };

    let mut head = ZERO.to_owned();
    let mut accepted = 0u32;
    let refusal = loop {
        anyhow::ensure!(
            accepted < 50_000,
            "the store never filled its {DISK}-byte disk"
        );
        let next = sha(0x0100_0000 + accepted);
        let (status, body) = send(&head, &next).await?;
        match status {
            200 => {
                head = next;
                accepted += 1;
            }
            _ => break (status, body),
        }
    };
    assert!(accepted > 10, "only {accepted} webhooks fit: raise DISK");
    assert_eq!(refusal.0, 503, "{refusal:?}");
    assert!(
        refusal.1.contains("greenlight.redb") && refusal.1.contains("restarted"),
        "the refusal says which file and what to do: {refusal:?}"
    );
    // Nothing more is taken, though a small record might still fit.
    let (status, _) = send(&head, &sha(0x0200_0000)).await?;
    assert_eq!(status, 503);
    let ready = client
        .get(format!("http://{}/readyz", server.http))
        .send()
        .await?;
    assert_eq!(ready.status().as_u16(), 503);
    assert!(
        ready.text().await?.contains("greenlight.redb"),
        "/readyz names the file"
    );

    // The disk has room again.
    server.kill();
    server.process.limit_file_size(None);
    server
        .restart()
        .await
        .with_context(|| format!("restart failed; log:\n{}", server.log()))?;
    let mut admin = server.api.admin_as("example-admin-token").await?;
    let main = admin
        .get_ref(greenlight::v1::GetRefRequest {
            project: PROJECT.into(),
            r#ref: "main".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        main.head, head,
        "the last of {accepted} pushes answered 200 is the head"
    );
    // And it takes changes again.
    assert_eq!(send(&head, &sha(0x0300_0000)).await?.0, 200);
    Ok(())
}

/// One agent whose stored state cannot be decoded (a bad restore, a hand edit) stops only
/// itself: the other agent of its ref still deploys, the server starts and is ready, and
/// `GetAgent` says which record is corrupt instead of asking to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_agent_record_stops_only_that_agent() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let key = format!(
        "gl-test:{{gl{}}}:agent:broken:state",
        greenlight_server::store::agent_shard("broken")
    );
    redis.cli(&["HSET", &key, "v", "1", "p", "0", "core", "{not json"])?;
    let yaml = config_yaml(
        Some(&redis.url()),
        &[AgentDef::new("broken"), AgentDef::new("healthy")],
    );
    let server = TestServer::start(&yaml).await?;
    let x = sha(0xc1);
    server.release(ZERO, &x, 1).await?;
    server.desired_becomes("healthy", &x).await?;
    let error = server
        .agent_status("broken")
        .await
        .expect_err("a corrupt record cannot be shown");
    let status = error
        .downcast_ref::<tonic::Status>()
        .context("a gRPC status")?;
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    assert!(
        status.message().contains(&key) && status.message().contains("corrupt"),
        "names the record: {status:?}"
    );
    Ok(())
}

/// Webhooks sent by eight senders at once while the embedded store is SIGKILLed: every one
/// answered 200 is there after the restart, pushes and pipelines alike, and the facts go on
/// from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_answered_before_a_sigkill_mid_stream_are_all_kept() -> anyhow::Result<()> {
    let yaml = config_yaml(None, &[AgentDef::new("prod")]);
    let mut server = ServerProcess::from_yaml(&yaml).await?;
    let url = format!("http://{}/webhooks/gitlab", server.http);
    let client = reqwest::Client::new();
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, u64)>::new()));
    let senders: Vec<_> = (0..8u32)
        .map(|sender| {
            let (url, client, answered) = (url.clone(), client.clone(), answered.clone());
            tokio::spawn(async move {
                // Fewer than the 256 heads a ref keeps, so GetRef lists every one.
                for n in 0..30u32 {
                    let id = u64::from(sender * 100 + n + 1);
                    let commit = sha(0x5e00_0000 + sender * 100 + n);
                    let events = [
                        ("Push Hook", push_payload(PROJECT, "main", ZERO, &commit)),
                        (
                            "Pipeline Hook",
                            pipeline_payload(PROJECT, "main", &commit, id, "running", "push"),
                        ),
                    ];
                    for (event, body) in events {
                        let sent = client
                            .post(&url)
                            .header("X-Gitlab-Event", event)
                            .header("X-Gitlab-Token", GITLAB_SECRET)
                            .json(&body)
                            .send()
                            .await;
                        match sent {
                            Ok(response) if response.status() == 200 => {
                                let pipeline = if event == "Push Hook" { 0 } else { id };
                                let mut answered = answered.lock().expect("not poisoned");
                                answered.push((commit.clone(), pipeline));
                            }
                            // Killed: what was not answered 200 may be lost.
                            _ => return,
                        }
                    }
                }
            })
        })
        .collect();
    eventually("webhooks answered before the kill", || {
        let answered = answered.clone();
        async move { Ok((answered.lock().expect("not poisoned").len() >= 120).then_some(())) }
    })
    .await?;
    server.kill();
    for sender in senders {
        sender.await?;
    }
    let answered = answered.lock().expect("not poisoned").clone();
    assert!(answered.len() < 480, "the kill came mid-stream");

    server
        .restart()
        .await
        .with_context(|| format!("restart failed; log:\n{}", server.log()))?;
    let mut admin = server.api.admin().await?;
    let request = || greenlight::v1::GetRefRequest {
        project: PROJECT.into(),
        r#ref: "main".into(),
    };
    let kept = admin.get_ref(request()).await?.into_inner();
    for (commit, pipeline) in &answered {
        let listed = kept.commits.iter().find(|c| &c.sha == commit);
        let listed = listed.with_context(|| format!("push of {commit} answered 200, then lost"))?;
        if *pipeline != 0 {
            assert!(
                listed.pipelines.iter().any(|p| p.id == *pipeline),
                "pipeline {pipeline} of {commit} answered 200, then lost"
            );
        }
    }
    // And the store goes on from there.
    let next = sha(0x5eff_0001);
    assert_eq!(server.api.push("main", ZERO, &next).await?, 200);
    let after = admin.get_ref(request()).await?.into_inner();
    assert_eq!(after.head, next);
    assert_eq!(after.commits.len(), kept.commits.len() + 1);
    Ok(())
}

/// A ref whose newest facts were lost while its agents' decisions were kept (a Redis Cluster
/// failover to a replica that had not received them) goes on from the agents' position: the
/// next release is deployed and an operator can pause, where every decision was refused as
/// older than the agents' until as many facts came again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ref_that_lost_its_newest_facts_goes_on_from_its_agents_position() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let yaml = config_yaml(Some(&redis.url()), &[AgentDef::new("prod")]);
    let server = TestServer::start(&yaml).await?;
    let mut head = ZERO.to_owned();
    for n in 1..=4 {
        let next = sha(0xe0 + n);
        server.release(&head, &next, u64::from(n)).await?;
        server.desired_becomes("prod", &next).await?;
        head = next;
    }
    let key = greenlight_server::store::RefKey {
        project: PROJECT.to_owned(),
        branch: "main".to_owned(),
    };
    let meta = format!("gl-test:{{gl{}}}:ref:{PROJECT}:main:meta", key.shard());
    // Eight facts were recorded; the ref now remembers one.
    assert_eq!(redis.cli(&["HGET", &meta, "position"])?.trim(), "8");
    redis.cli(&["HSET", &meta, "position", "1"])?;

    let after = sha(0xef);
    server.release(&head, &after, 9).await?;
    server.desired_becomes("prod", &after).await?;
    assert_eq!(
        metric(&server, "greenlight_facts_position_raised_total").await?,
        1.0
    );
    server
        .admin()
        .await?
        .pause_sync(greenlight::v1::PauseSyncRequest {
            name: "prod".into(),
            reason: "freeze".into(),
        })
        .await?;
    assert!(server.agent_status("prod").await?.paused.is_some());
    Ok(())
}
