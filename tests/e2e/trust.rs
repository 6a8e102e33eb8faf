//! Facts only from their own project: per-project webhook secrets, scoped ingest tokens,
//! plausibility bounds on pipeline claims, and reports only on revisions the server sent.

use std::time::Duration;

use anyhow::{Context, bail};
use greenlight::digest::sha256_hex;
use greenlight::v1::{
    Phase, PipelineStatus, RecordPipelineRequest, RecordPushRequest, StatusReport,
};
use greenlight_agent::client::ClientError;
use greenlight_e2e::*;
use serde_json::{Value, json};
use tonic::Code;

/// A second project, guarded by a secret of its own.
const PROD_PROJECT: &str = "group/prod-manifests";
const PROD_SECRET: &str = "prod-hook-secret";
/// An ingest token that may only speak for `PROJECT`.
const SCOPED_INGEST_TOKEN: &str = "ingest-token-app-only";

/// Agent `dev` on `PROJECT` (global secret) and agent `prod` on `PROD_PROJECT` (own secret),
/// both in pipeline mode; a scoped ingest token beside the unscoped one.
async fn server(redis: &Redis) -> anyhow::Result<TestServer> {
    server_with(redis, []).await
}

/// [`server`] with `extra` agents beside `dev` and `prod`.
async fn server_with<const N: usize>(
    redis: &Redis,
    extra: [AgentDef; N],
) -> anyhow::Result<TestServer> {
    let prod = AgentDef {
        project: PROD_PROJECT.into(),
        ..AgentDef::new("prod")
    };
    let mut agents = vec![AgentDef::new("dev"), prod];
    agents.extend(extra);
    let yaml = config_yaml(Some(&redis.url()), &agents)
        .replace(
            &format!("webhooks: {{ gitlab: {{ secret_token: \"{GITLAB_SECRET}\" }} }}\n"),
            &format!(
                "webhooks: {{ gitlab: {{ secret_token: \"{GITLAB_SECRET}\", projects: {{ \"{PROD_PROJECT}\": {{ secret_token: \"{PROD_SECRET}\" }} }} }} }}\n"
            ),
        )
        .replace(
            &format!("ingest: {{ token_sha256: \"{}\" }}\n", sha256_hex(INGEST_TOKEN.as_bytes())),
            &format!(
                "ingest:\n  token_sha256: \"{}\"\n  tokens: [{{ token_sha256: \"{}\", projects: [\"{PROJECT}\"] }}]\n",
                sha256_hex(INGEST_TOKEN.as_bytes()),
                sha256_hex(SCOPED_INGEST_TOKEN.as_bytes())
            ),
        );
    TestServer::start(&yaml).await
}

/// Posts a webhook with `token`; returns status and JSON body.
async fn hook_with(
    server: &TestServer,
    token: &str,
    event: &str,
    body: &Value,
) -> anyhow::Result<(u16, Value)> {
    install_crypto();
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?
        .post(format!("http://{}/webhooks/gitlab", server.http))
        .header("X-Gitlab-Event", event)
        .header("X-Gitlab-Token", token)
        .json(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

fn message(body: &Value) -> &str {
    body["message"].as_str().unwrap_or("")
}

async fn desired(server: &TestServer, agent: &str) -> anyhow::Result<Option<String>> {
    Ok(server.agent_status(agent).await?.desired.map(|d| d.sha))
}

fn refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
) -> anyhow::Result<tonic::Status> {
    match result {
        Err(status) if status.code() == code => Ok(status),
        other => bail!("expected {code:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_cross_project_hook_is_401_and_the_legitimate_one_still_works() -> anyhow::Result<()>
{
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    let (red, green) = (sha(0xbad), sha(0x600d));

    // Whoever holds the global secret (for dev's project) names prod's project.
    let forged_push = push_payload(PROD_PROJECT, "main", ZERO, &red);
    let (status, body) = hook_with(&server, GITLAB_SECRET, "Push Hook", &forged_push).await?;
    assert_eq!(status, 401, "{body}");
    assert!(message(&body).contains(PROD_PROJECT), "{body}");
    // The review's forgery, also naming dev's numeric id next to prod's path.
    let mut forged = pipeline_payload(PROD_PROJECT, "main", &red, 9_000, "success", "push");
    forged["object_attributes"]["finished_at"] = "2026-11-26 10:00:00 UTC".into();
    let (status, body) = hook_with(&server, GITLAB_SECRET, "Pipeline Hook", &forged).await?;
    assert_eq!(status, 401, "{body}");
    assert!(message(&body).contains(PROD_PROJECT), "{body}");
    // A guessed secret matches nothing, and is refused before the body is parsed: the answer
    // names no project.
    let (status, body) = hook_with(&server, "guess", "Pipeline Hook", &forged).await?;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        message(&body),
        "X-Gitlab-Token matches no configured secret",
        "{body}"
    );
    assert_eq!(desired(&server, "prod").await?, None);

    // Prod's own secret works for prod…
    let push = push_payload(PROD_PROJECT, "main", ZERO, &green);
    let (status, body) = hook_with(&server, PROD_SECRET, "Push Hook", &push).await?;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("recorded")));
    let run = pipeline_payload(PROD_PROJECT, "main", &green, 7, "success", "push");
    let (status, body) = hook_with(&server, PROD_SECRET, "Pipeline Hook", &run).await?;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("recorded")));
    server.desired_becomes("prod", &green).await?;
    // …also for an event Greenlight does not use, and for a body that is not its event:
    // both are read for the project alone, which picks the secret.
    let job = json!({ "object_kind": "build", "project": { "path_with_namespace": PROD_PROJECT } });
    let (status, body) = hook_with(&server, PROD_SECRET, "Job Hook", &job).await?;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("ignored")));
    let (status, body) = hook_with(&server, PROD_SECRET, "Pipeline Hook", &job).await?;
    assert_eq!((status, body["outcome"].as_str()), (400, Some("rejected")));
    let (status, _) = hook_with(&server, GITLAB_SECRET, "Job Hook", &job).await?;
    assert_eq!(status, 401);
    // …and not for the projects the global secret guards.
    let dev_push = push_payload(PROJECT, "main", ZERO, &green);
    let (status, body) = hook_with(&server, PROD_SECRET, "Push Hook", &dev_push).await?;
    assert_eq!(status, 401, "{body}");
    server.release(ZERO, &green, 8).await?;
    server.desired_becomes("dev", &green).await?;
    Ok(())
}

/// A project's own secret speaks for that project only: a body naming prod's path (whose
/// secret it holds) and, as its id, a watched project guarded by the global secret is
/// refused, and nothing reaches that project's agent. The global secret alone does not do
/// either, and it still speaks for that project on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projects_secret_does_not_speak_for_another_project_named_by_id() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let by_id = AgentDef {
        project: "4242".into(),
        ..AgentDef::new("by-id")
    };
    let server = server_with(&redis, [by_id]).await?;
    let red = sha(0xbad);
    let mut forged = push_payload(PROD_PROJECT, "main", ZERO, &red);
    forged["project"]["id"] = json!(4242);
    forged["project_id"] = json!(4242);
    let (status, body) = hook_with(&server, PROD_SECRET, "Push Hook", &forged).await?;
    assert_eq!(status, 401, "{body}");
    assert!(message(&body).contains("4242"), "{body}");
    let (status, body) = hook_with(&server, GITLAB_SECRET, "Push Hook", &forged).await?;
    assert_eq!(status, 401, "{body}");
    assert!(message(&body).contains(PROD_PROJECT), "{body}");

    let green = sha(0x600d);
    let mut own = push_payload("group/unwatched", "main", ZERO, &green);
    own["project"]["id"] = json!(4242);
    own["project_id"] = json!(4242);
    let (status, body) = hook_with(&server, GITLAB_SECRET, "Push Hook", &own).await?;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("recorded")),
        "{body}"
    );
    let mut run = pipeline_payload("group/unwatched", "main", &green, 7, "success", "push");
    run["project"]["id"] = json!(4242);
    let (status, body) = hook_with(&server, GITLAB_SECRET, "Pipeline Hook", &run).await?;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("recorded")),
        "{body}"
    );
    server.desired_becomes("by-id", &green).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_bounds_pipeline_ids_and_times_are_refused() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    let x = sha(1);
    assert_eq!(server.push("main", ZERO, &x).await?, 200);

    let green = |id: u64, finished_at: &str| {
        let mut body = pipeline_payload(PROJECT, "main", &x, id, "success", "push");
        body["object_attributes"]["finished_at"] = finished_at.into();
        body
    };
    let cases = [
        (
            green(9_000_000_000_000_000_000, "2026-11-26 10:00:00 UTC"),
            "object_attributes.id",
        ),
        (green(0, "2026-11-26 10:00:00 UTC"), "object_attributes.id"),
        (
            green(7, "2100-01-01 00:00:00 UTC"),
            "object_attributes.finished_at 2100-01-01T00:00:00Z is",
        ),
        (
            green(7, "1999-12-31 23:59:59 UTC"),
            "object_attributes.finished_at 1999-12-31T23:59:59Z is before 2000-01-01",
        ),
    ];
    for (body, problem) in &cases {
        let (status, answer) = server.hook("Pipeline Hook", body, None).await?;
        assert_eq!(status, 400, "{answer}");
        assert!(message(&answer).contains(problem), "{problem}: {answer}");
    }
    assert_eq!(desired(&server, "dev").await?, None, "nothing was recorded");

    let mut client = server.ingest_as(INGEST_TOKEN).await?;
    let far_future = RecordPipelineRequest {
        project: PROJECT.into(),
        r#ref: "main".into(),
        sha: x.clone(),
        pipeline_id: 7,
        status: PipelineStatus::Success.into(),
        source: "push".into(),
        delivery_id: String::new(),
        finished_at_unix_ms: Some(4_102_444_800_000),
        passed_stages: Vec::new(),
    };
    let status = refused(
        client.record_pipeline(far_future.clone()).await,
        Code::InvalidArgument,
    )?;
    assert!(
        status.message().contains("finished_at_unix_ms"),
        "{}",
        status.message()
    );
    let huge = RecordPipelineRequest {
        pipeline_id: u64::MAX,
        finished_at_unix_ms: None,
        ..far_future.clone()
    };
    refused(client.record_pipeline(huge).await, Code::InvalidArgument)?;
    assert_eq!(desired(&server, "dev").await?, None);

    // A plausible result still opens the gate.
    let (status, _) = server
        .hook("Pipeline Hook", &green(7, "2026-11-26 10:00:00 UTC"), None)
        .await?;
    assert_eq!(status, 200);
    server.desired_becomes("dev", &x).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_ingest_token_is_refused_for_other_projects() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    let x = sha(3);
    let push = |project: &str| RecordPushRequest {
        project: project.into(),
        r#ref: "main".into(),
        before: String::new(),
        after: x.clone(),
        delivery_id: String::new(),
    };
    let pipeline = |project: &str| RecordPipelineRequest {
        project: project.into(),
        r#ref: "main".into(),
        sha: x.clone(),
        pipeline_id: 11,
        status: PipelineStatus::Success.into(),
        source: "push".into(),
        delivery_id: String::new(),
        finished_at_unix_ms: None,
        passed_stages: Vec::new(),
    };
    let mut scoped = server.ingest_as(SCOPED_INGEST_TOKEN).await?;
    let status = refused(
        scoped.record_push(push(PROD_PROJECT)).await,
        Code::PermissionDenied,
    )?;
    assert!(
        status.message().contains(PROD_PROJECT),
        "{}",
        status.message()
    );
    assert!(status.message().contains(PROJECT), "{}", status.message());
    refused(
        scoped.record_pipeline(pipeline(PROD_PROJECT)).await,
        Code::PermissionDenied,
    )?;
    // Slashes around the project do not slip past the scope.
    refused(
        scoped
            .record_pipeline(pipeline(&format!("/{PROD_PROJECT}/")))
            .await,
        Code::PermissionDenied,
    )?;
    assert_eq!(desired(&server, "prod").await?, None);

    // Its own project works, and so does the unscoped token everywhere.
    scoped.record_push(push(PROJECT)).await?;
    let outcome = scoped.record_pipeline(pipeline(PROJECT)).await?;
    assert_eq!(outcome.into_inner().outcome, "recorded");
    server.desired_becomes("dev", &x).await?;
    let mut unscoped = server.ingest_as(INGEST_TOKEN).await?;
    unscoped.record_push(push(PROD_PROJECT)).await?;
    unscoped.record_pipeline(pipeline(PROD_PROJECT)).await?;
    server.desired_becomes("prod", &x).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_on_a_revision_never_sent_is_refused() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    let (untested, green) = (sha(0x51), sha(0x52));
    let report = |revision: &str| StatusReport {
        revision: revision.to_owned(),
        phase: Phase::Healthy.into(),
        message: "all good".into(),
        ..Default::default()
    };
    let client = server.agent("dev").await?;
    let mut stream = server.stream("dev").await?;
    assert_eq!(server.push("main", ZERO, &untested).await?, 200);
    for never_sent in [&untested, &green] {
        match client.report(report(never_sent)).await {
            Err(ClientError::Status(status)) if status.code() == Code::FailedPrecondition => {
                assert!(
                    status.message().contains(never_sent.as_str()),
                    "{}",
                    status.message()
                );
            }
            other => bail!("a report on {never_sent} must be refused, got {other:?}"),
        }
    }
    assert_eq!(server.last_report("dev").await?, None);

    // The revision the server sends is reportable.
    server.release(&untested, &green, 3).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), green);
    client.report(report(&green)).await?;
    let last = server.last_report("dev").await?;
    assert_eq!(last.map(|r| r.revision), Some(green));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_is_bounded_and_an_oversized_one_refused() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    let client = server.agent("dev").await?;
    let mut stream = server.stream("dev").await?;
    let green = sha(0x61);
    server.release(ZERO, &green, 1).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), green);
    let objects = |count: usize, message: &str| -> Vec<greenlight::v1::ObjectResult> {
        (0..count)
            .map(|i| greenlight::v1::ObjectResult {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                namespace: "apps".into(),
                name: format!("cm-{i}"),
                action: greenlight::v1::object_result::Action::Applied.into(),
                message: message.to_owned(),
            })
            .collect()
    };
    // An agent of another version sending more than this one would: kept, but cut.
    client
        .report(StatusReport {
            revision: green.clone(),
            phase: Phase::Applied.into(),
            message: "applied".into(),
            objects: objects(3000, "ok"),
            ..Default::default()
        })
        .await?;
    let last = server.last_report("dev").await?.expect("stored");
    assert_eq!(last.objects.len(), greenlight::report::MAX_REPORT_OBJECTS);
    assert!(
        last.message.contains("2000 more objects not listed"),
        "{}",
        last.message
    );

    // Beyond the request limit the server does not even decode it.
    let huge = client
        .report(StatusReport {
            revision: green.clone(),
            phase: Phase::Applied.into(),
            objects: objects(5000, &"x".repeat(1024)),
            ..Default::default()
        })
        .await;
    match huge {
        Err(ClientError::Status(status)) => {
            assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        }
        other => bail!("an oversized report must be refused, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_caller_are_capped_and_a_closed_one_frees_its_slot() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    let client = server.agent("dev").await?;
    let mut open = Vec::new();
    for _ in 0..8 {
        open.push(client.sync(None).await?);
    }
    match client.sync(None).await {
        Err(ClientError::Status(status)) => {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(
                status
                    .message()
                    .contains("agent dev already has 8 sync streams open"),
                "{}",
                status.message()
            );
        }
        Err(other) => bail!("a ninth stream must be refused, got {other:?}"),
        Ok(_) => bail!("a ninth stream must be refused"),
    }
    drop(open.pop());
    eventually("the slot freed", || async {
        Ok(client.sync(None).await.ok())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_flooding_reports_is_slowed_down() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    let client = server.agent("dev").await?;
    let mut stream = server.stream("dev").await?;
    let green = sha(0x71);
    server.release(ZERO, &green, 1).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), green);
    let report = StatusReport {
        revision: green.clone(),
        phase: Phase::Applying.into(),
        message: "again".into(),
        ..Default::default()
    };
    let mut refused = None;
    for _ in 0..200 {
        if let Err(ClientError::Status(status)) = client.report(report.clone()).await {
            refused = Some(status);
            break;
        }
    }
    let status = refused.context("200 reports at once were all accepted")?;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("status reports a second"),
        "{}",
        status.message()
    );
    Ok(())
}

/// Asking a merge request pipeline's previews of every agent with previews takes as long as
/// there are agents to ask, and runtime agents may be created meanwhile. What the token
/// speaks for is decided again before the hook's fact is recorded: a project's own secret
/// that spoke for the hook when it came does not speak for the project id an agent created
/// meanwhile watches, and nothing is recorded for that agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_is_checked_again_against_agents_created_while_its_previews_were_asked()
-> anyhow::Result<()> {
    const PREVIEWING: usize = 800;
    let mut yaml = config_yaml(None, &[]).replace(
        &format!("webhooks: {{ gitlab: {{ secret_token: \"{GITLAB_SECRET}\" }} }}\n"),
        &format!(
            "webhooks: {{ gitlab: {{ secret_token: \"{GITLAB_SECRET}\", projects: {{ \"{PROJECT}\": {{ secret_token: \"{PROD_SECRET}\" }} }} }} }}\n"
        ),
    );
    for n in 0..PREVIEWING {
        let name = format!("pv-{n}");
        let token = sha256_hex(agent_token(&name).as_bytes());
        yaml.push_str(&format!(
            "  - {{ name: {name}, token_sha256: \"{token}\", project: \"{PROJECT}\", ref: main, preview: true }}\n"
        ));
    }
    let server = TestServer::start(&yaml).await?;
    let mut first = server.stream("pv-0").await?;

    // A merge request pipeline into main, naming the project by its path (whose own secret
    // the sender holds) and by an id no agent watches yet.
    let head = sha(0x77);
    let mut body = pipeline_payload(PROJECT, "main", &head, 7, "success", "merge_request_event");
    body["merge_request"]["target_branch"] = json!("main");
    let hook = hook_with(&server, PROD_SECRET, "Pipeline Hook", &body);
    let create_meanwhile = async {
        // The first agent asked shows the token passed the first check; hundreds remain.
        let asked = tokio::time::timeout(Duration::from_secs(30), first.next_any())
            .await
            .context("no preview request reached pv-0")??;
        assert!(
            matches!(asked, Some(greenlight_agent::assemble::Ready::Preview(_))),
            "{asked:?}"
        );
        let mut admin = server.admin().await?;
        admin
            .create_agent(greenlight::v1::CreateAgentRequest {
                agent: Some(greenlight::v1::AgentDefinition {
                    name: "by-id".into(),
                    project: PROJECT_ID.to_string(),
                    r#ref: "main".into(),
                    ..Default::default()
                }),
                ci_token: false,
            })
            .await?;
        anyhow::Ok(())
    };
    let ((status, answer), ()) = tokio::try_join!(hook, create_meanwhile)?;
    assert_eq!(status, 401, "{answer}");
    assert!(
        message(&answer).contains(&PROJECT_ID.to_string()),
        "names the project it does not speak for: {answer}"
    );
    let by_id = server.agent_status("by-id").await?;
    assert!(by_id.desired.is_none(), "{by_id:?}");
    Ok(())
}
