//! How the edges answer bad, unwanted and unrecordable input, on a real Redis.

use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use greenlight::v1::admin_service_client::AdminServiceClient;
use greenlight::v1::ingest_service_client::IngestServiceClient;
use greenlight::v1::{
    GetAgentRequest, GetRefRequest, PipelineStatus, RecordPipelineRequest, RecordPushRequest,
    RefStatus,
};
use greenlight_agent::client::{Bearer, Client, ClientError};
use greenlight_e2e::exposition::scrape;
use greenlight_e2e::{
    AgentDef, GITLAB_SECRET, INGEST_TOKEN, PROJECT, QUIET, Redis, SOON, TestServer, agent_token,
    config_yaml, eventually, install_crypto, next_revision, no_revision, pipeline_payload,
    push_payload, sha,
};
use greenlight_server::config::RedisSettings;
use greenlight_server::store::{FactStore, RedisStore, RefKey};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const NULL_SHA: &str = "0000000000000000000000000000000000000000";
const OTHER_PROJECT: &str = "other/proj";

/// A server for the agent `prod` on `PROJECT@main` in pipeline mode, on `redis`.
async fn server(redis: &Redis) -> anyhow::Result<TestServer> {
    TestServer::start(&config_yaml(Some(&redis.url()), &[AgentDef::new("prod")])).await
}

fn http() -> anyhow::Result<reqwest::Client> {
    install_crypto();
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?)
}

/// Posts `body` to the webhook endpoint with exactly `headers`; returns status and JSON body.
async fn post(
    server: &TestServer,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> anyhow::Result<(u16, Value)> {
    let mut request = http()?
        .post(format!("http://{}/webhooks/gitlab", server.http))
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

/// Posts a webhook with the right secret and an explicit delivery id.
async fn delivered(
    server: &TestServer,
    event: &str,
    body: &Value,
    delivery: &str,
) -> anyhow::Result<(u16, Value)> {
    server.hook(event, body, Some(delivery)).await
}

async fn readyz(server: &TestServer) -> anyhow::Result<u16> {
    Ok(http()?
        .get(format!("http://{}/readyz", server.http))
        .send()
        .await?
        .status()
        .as_u16())
}

fn outcome(body: &Value) -> &str {
    body["outcome"].as_str().unwrap_or("")
}

fn message(body: &Value) -> &str {
    body["message"].as_str().unwrap_or("")
}

fn push(after: u32) -> Value {
    push_payload(PROJECT, "main", NULL_SHA, &sha(after))
}

fn green(n: u32) -> Value {
    pipeline_payload(PROJECT, "main", &sha(n), u64::from(n), "success", "push")
}

async fn get_ref(server: &TestServer, project: &str) -> Result<RefStatus, tonic::Status> {
    let mut admin = server
        .admin()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    Ok(admin
        .get_ref(GetRefRequest {
            project: project.into(),
            r#ref: "main".into(),
        })
        .await?
        .into_inner())
}

async fn desired_sha(server: &TestServer) -> anyhow::Result<Option<String>> {
    let status = server.agent_status("prod").await?;
    Ok(status.desired.map(|d| d.sha))
}

/// Nothing about `PROJECT@main` has been recorded and the agent has no desired revision.
async fn assert_nothing_recorded(server: &TestServer) -> anyhow::Result<()> {
    let watched = get_ref(server, PROJECT).await?;
    assert!(
        watched.commits.is_empty(),
        "nothing may be recorded: {watched:?}"
    );
    assert_eq!(watched.head, "");
    assert_eq!(desired_sha(server).await?, None);
    Ok(())
}

async fn ingest(
    server: &TestServer,
    token: &str,
) -> anyhow::Result<IngestServiceClient<InterceptedService<Channel, Bearer>>> {
    let channel = Channel::from_shared(server.grpc_url())?.connect().await?;
    Ok(IngestServiceClient::with_interceptor(
        channel,
        Bearer::new(token)?,
    ))
}

fn expect_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    what: &str,
) -> anyhow::Result<tonic::Status> {
    match result {
        Err(status) if status.code() == code => Ok(status),
        Err(status) => bail!(
            "{what}: expected {code:?}, got {:?}: {}",
            status.code(),
            status.message()
        ),
        Ok(value) => bail!("{what}: expected {code:?}, got success {value:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_gitlab_token_is_401() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    let body = serde_json::to_vec(&push(1))?;
    let json = ("Content-Type", "application/json");
    let event = ("X-Gitlab-Event", "Push Hook");

    let (status, answer) = post(
        &server,
        &[json, event, ("X-Gitlab-Token", "not-the-secret")],
        body.clone(),
    )
    .await?;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = post(&server, &[json, event], body.clone()).await?;
    assert_eq!(status, 401, "{answer}");
    assert!(message(&answer).contains("X-Gitlab-Token"), "{answer}");
    let (status, _) = post(
        &server,
        &[json, event, ("X-Gitlab-Token", "")],
        body.clone(),
    )
    .await?;
    assert_eq!(status, 401);
    // The secret of another hook with the right prefix is still wrong.
    let longer = format!("{GITLAB_SECRET}x");
    let (status, _) = post(&server, &[json, event, ("X-Gitlab-Token", &longer)], body).await?;
    assert_eq!(status, 401);

    assert_nothing_recorded(&server).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_agent_token_is_unauthenticated() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    for token in ["not-a-token", "admin-token", &agent_token("staging")] {
        let client = Client::connect(&server.grpc_url(), token, None).await?;
        match client.sync(None).await {
            Err(ClientError::Status(status)) => {
                assert_eq!(
                    status.code(),
                    Code::Unauthenticated,
                    "{token}: {}",
                    status.message()
                )
            }
            Err(other) => bail!("{token}: expected Unauthenticated, got {other}"),
            Ok(_) => bail!("{token}: a stream opened with a bad agent token"),
        }
    }
    // The right token still works.
    server.stream("prod").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_token_is_unauthenticated() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    let channel = Channel::from_shared(server.grpc_url())?.connect().await?;
    for token in ["not-the-admin-token", INGEST_TOKEN, &agent_token("prod")] {
        let mut admin = AdminServiceClient::with_interceptor(channel.clone(), Bearer::new(token)?);
        let result = admin
            .get_agent(GetAgentRequest {
                name: "prod".into(),
            })
            .await;
        expect_code(result, Code::Unauthenticated, token)?;
    }
    let mut anonymous = AdminServiceClient::new(channel);
    let result = anonymous
        .get_agent(GetAgentRequest {
            name: "prod".into(),
        })
        .await;
    expect_code(result, Code::Unauthenticated, "no token")?;
    // The right token still works.
    server
        .admin()
        .await?
        .get_agent(GetAgentRequest {
            name: "prod".into(),
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_400_and_name_the_problem() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    // Posts `body` as `event` with the right secret, expects a 400 whose message holds each
    // of `named`, and returns the answer.
    let refused = async |event: &str, body: Vec<u8>, named: &[&str]| -> anyhow::Result<Value> {
        let headers = [
            ("Content-Type", "application/json"),
            ("X-Gitlab-Token", GITLAB_SECRET),
            ("X-Gitlab-Event", event),
        ];
        let (status, answer) = post(&server, &headers, body).await?;
        assert_eq!(status, 400, "{answer}");
        for part in named {
            assert!(message(&answer).contains(part), "names {part:?}: {answer}");
        }
        Ok(answer)
    };

    let truncated = br#"{"object_kind":"push","ref":"refs/heads/main","after":"#.to_vec();
    let answer = refused("Push Hook", truncated, &["Push Hook", "EOF"]).await?;
    assert_eq!(outcome(&answer), "rejected");

    let not_json = b"not json at all".to_vec();
    refused("Pipeline Hook", not_json, &["Pipeline Hook"]).await?;

    // serde would read an array's elements as the hook's fields in order.
    let as_array = json!(["refs/heads/main", null, sha(1), { "id": 1 }, null]);
    let as_array = serde_json::to_vec(&as_array)?;
    refused("Push Hook", as_array, &["not a JSON object"]).await?;

    let mut bad_sha = push(1);
    bad_sha["after"] = json!("not-a-sha");
    let bad_sha = serde_json::to_vec(&bad_sha)?;
    refused("Push Hook", bad_sha, &["after", "not-a-sha"]).await?;

    let mut no_attributes = green(1);
    no_attributes
        .as_object_mut()
        .context("an object")?
        .remove("object_attributes");
    let no_attributes = serde_json::to_vec(&no_attributes)?;
    refused("Pipeline Hook", no_attributes, &["object_attributes"]).await?;

    // A status a later GitLab may add is no malformed hook: refusing it would count towards
    // GitLab disabling the hook. It is ignored, and named.
    let mut new_status = green(1);
    new_status["object_attributes"]["status"] = json!("exploded");
    let headers = [
        ("Content-Type", "application/json"),
        ("X-Gitlab-Token", GITLAB_SECRET),
        ("X-Gitlab-Event", "Pipeline Hook"),
    ];
    let (status, answer) = post(&server, &headers, serde_json::to_vec(&new_status)?).await?;
    assert_eq!((status, outcome(&answer)), (200, "ignored"), "{answer}");
    assert!(message(&answer).contains("exploded"), "{answer}");

    let mut short_sha = push(1);
    short_sha["after"] = json!("abc1234");
    let short_sha = serde_json::to_vec(&short_sha)?;
    refused("Push Hook", short_sha, &["after", "full commit SHA"]).await?;

    // A delivery id is kept in a key: one of kilobytes is no GitLab delivery.
    let (status, answer) = server
        .hook("Pipeline Hook", &green(1), Some(&"d".repeat(300)))
        .await?;
    assert_eq!(status, 400, "{answer}");
    assert!(
        message(&answer).contains("delivery id of 300 bytes"),
        "{answer}"
    );

    assert_nothing_recorded(&server).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_project_is_acknowledged_and_nothing_is_stored() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    let mut stream = server.stream("prod").await?;

    let mut other_push = push_payload(OTHER_PROJECT, "main", NULL_SHA, &sha(1));
    other_push["project_id"] = json!(4242);
    other_push["project"]["id"] = json!(4242);
    let (status, answer) = server
        .hook("Push Hook", &other_push, Some("other-push"))
        .await?;
    assert!((200..300).contains(&status), "{status} {answer}");
    assert_eq!(outcome(&answer), "ignored", "{answer}");
    assert!(
        message(&answer).contains(OTHER_PROJECT),
        "says which project: {answer}"
    );

    let mut other_pipeline = pipeline_payload(OTHER_PROJECT, "main", &sha(1), 1, "success", "push");
    other_pipeline["project"]["id"] = json!(4242);
    let (status, answer) = server
        .hook("Pipeline Hook", &other_pipeline, Some("other-pipeline"))
        .await?;
    assert!((200..300).contains(&status), "{status} {answer}");
    assert_eq!(outcome(&answer), "ignored", "{answer}");

    let missing = get_ref(&server, OTHER_PROJECT).await;
    expect_code(missing, Code::NotFound, "GetRef of an unwatched project")?;
    assert_nothing_recorded(&server).await?;
    no_revision(&mut stream, QUIET).await?;

    // Nor is anything in Redis under any name of that project.
    let shutdown = CancellationToken::new();
    let settings = RedisSettings::single(redis.url(), "gl-test");
    let store = RedisStore::connect(&settings, shutdown.clone(), Default::default())?;
    for project in [OTHER_PROJECT, "4242"] {
        let key = RefKey {
            project: project.into(),
            branch: "main".into(),
        };
        assert_eq!(
            store.facts(&key).await?,
            Default::default(),
            "{project} has no facts"
        );
        let keys = redis.cli(&["--scan", "--pattern", &format!("*{project}*")])?;
        assert!(
            keys.is_empty(),
            "nothing under {project}'s name, no delivery marker either: {keys}"
        );
    }
    shutdown.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_the_limit_is_413() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    let mut payload = push(1);
    payload["padding"] = json!("x".repeat(2 * 1024 * 1024));
    let headers = [
        ("Content-Type", "application/json"),
        ("X-Gitlab-Token", GITLAB_SECRET),
        ("X-Gitlab-Event", "Push Hook"),
    ];
    let (status, _) = post(&server, &headers, serde_json::to_vec(&payload)?).await?;
    assert_eq!(status, 413);
    assert_nothing_recorded(&server).await?;

    // The same event at a normal size is taken.
    let (status, answer) = server.hook("Push Hook", &push(1), None).await?;
    assert_eq!((status, outcome(&answer)), (200, "recorded"), "{answer}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_answers_503_and_the_redelivery_succeeds() -> anyhow::Result<()> {
    let mut redis = Redis::start().await?;
    let server = server(&redis).await?;
    let mut stream = server.stream("prod").await?;

    let (status, answer) = delivered(&server, "Push Hook", &push(1), "push-1").await?;
    assert_eq!((status, outcome(&answer)), (200, "recorded"), "{answer}");
    let running = pipeline_payload(PROJECT, "main", &sha(1), 1, "running", "push");
    let (status, answer) =
        delivered(&server, "Pipeline Hook", &running, "pipeline-1-running").await?;
    assert_eq!((status, outcome(&answer)), (200, "recorded"), "{answer}");
    assert_eq!(readyz(&server).await?, 200);

    redis.kill();
    let (status, answer) =
        delivered(&server, "Pipeline Hook", &green(1), "pipeline-1-success").await?;
    assert_eq!(
        status, 503,
        "an event that cannot be recorded must be redelivered: {answer}"
    );
    assert_eq!(
        readyz(&server).await?,
        503,
        "not ready while the store is down"
    );
    no_revision(&mut stream, QUIET).await?;

    redis.restart().await?;
    // GitLab redelivers the same event; the client may need a moment to reconnect.
    let deadline = tokio::time::Instant::now() + SOON;
    let answer = loop {
        let (status, answer) =
            delivered(&server, "Pipeline Hook", &green(1), "pipeline-1-success").await?;
        if (200..300).contains(&status) {
            break answer;
        }
        ensure!(
            status == 503,
            "unexpected {status} while Redis comes back: {answer}"
        );
        ensure!(
            tokio::time::Instant::now() < deadline,
            "still {status} long after Redis came back: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        outcome(&answer),
        "recorded",
        "the failed delivery left no trace: {answer}"
    );
    assert_eq!(readyz(&server).await?, 200);

    // Everything accepted before the outage survived it.
    let watched = get_ref(&server, PROJECT).await?;
    assert_eq!(watched.head, sha(1), "{watched:?}");
    assert_eq!(watched.commits.len(), 1, "{watched:?}");
    let pipelines = &watched.commits[0].pipelines;
    assert_eq!(pipelines.len(), 1, "{watched:?}");
    assert_eq!(
        (pipelines[0].id, pipelines[0].status()),
        (1, PipelineStatus::Success)
    );

    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.sha(), sha(1));
    assert_eq!(
        revision
            .header
            .revision
            .as_ref()
            .and_then(|r| r.pipeline_id),
        Some(1)
    );
    assert_eq!(desired_sha(&server).await?, Some(sha(1)));

    let (status, answer) =
        delivered(&server, "Pipeline Hook", &green(1), "pipeline-1-success").await?;
    assert_eq!((status, outcome(&answer)), (200, "duplicate"), "{answer}");
    Ok(())
}

/// GitLab does not redeliver a 503, so a connection that sat idle while Redis restarted must
/// not cost the first webhook after Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_webhook_after_redis_came_back_is_recorded() -> anyhow::Result<()> {
    let mut redis = Redis::start().await?;
    let server = server(&redis).await?;
    let mut stream = server.stream("prod").await?;
    let (status, answer) = delivered(&server, "Push Hook", &push(1), "push-1").await?;
    assert_eq!((status, outcome(&answer)), (200, "recorded"), "{answer}");

    redis.kill();
    // Long enough for every reconnection attempt made while Redis is down to give up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.restart().await?;

    let (status, answer) =
        delivered(&server, "Pipeline Hook", &green(1), "pipeline-1-success").await?;
    assert_eq!((status, outcome(&answer)), (200, "recorded"), "{answer}");
    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.sha(), sha(1));
    Ok(())
}

/// Runs `redis-cli` against `redis` with `args`, failing unless it answers OK.
fn redis_ok(redis: &Redis, args: &[&str]) -> anyhow::Result<()> {
    let answer = redis.cli(args)?;
    ensure!(answer.trim() == "OK", "redis-cli {args:?}: {answer}");
    Ok(())
}

/// Facts recorded while their evaluation cannot read them back are decided once the store
/// answers again, with no new webhook: the evaluation is retried, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_that_met_a_store_error_is_retried_until_it_decides() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    let mut stream = server.stream("prod").await?;

    // Recording a fact runs a script; reading a ref's facts back needs HGETALL, which Redis
    // now refuses to the server's user.
    redis_ok(&redis, &["ACL", "SETUSER", "default", "-hgetall"])?;
    let (status, answer) = delivered(&server, "Push Hook", &push(1), "push-1").await?;
    assert_eq!((status, outcome(&answer)), (200, "recorded"), "{answer}");
    let (status, answer) =
        delivered(&server, "Pipeline Hook", &green(1), "pipeline-1-success").await?;
    assert_eq!((status, outcome(&answer)), (200, "recorded"), "{answer}");
    eventually("the evaluation to meet the refusal twice", || async {
        let metrics = scrape(server.http).await?;
        let failed_reads =
            metrics.count("greenlight_store_errors_total", &[("operation", "facts")]);
        Ok((failed_reads >= 2.0).then_some(()))
    })
    .await?;
    no_revision(&mut stream, QUIET).await?;

    redis_ok(&redis, &["ACL", "SETUSER", "default", "+hgetall"])?;
    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.sha(), sha(1));
    assert_eq!(desired_sha(&server).await?, Some(sha(1)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_is_acknowledged_as_duplicate() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    let mut stream = server.stream("prod").await?;

    let (status, answer) = delivered(&server, "Push Hook", &push(1), "uuid-push-1").await?;
    assert_eq!((status, outcome(&answer)), (200, "recorded"), "{answer}");
    let (status, answer) =
        delivered(&server, "Pipeline Hook", &green(1), "uuid-pipeline-1").await?;
    assert_eq!((status, outcome(&answer)), (200, "recorded"), "{answer}");
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(1));
    let before = get_ref(&server, PROJECT).await?;

    let (push_status, push_answer) =
        delivered(&server, "Push Hook", &push(1), "uuid-push-1").await?;
    let (pipeline_status, pipeline_answer) =
        delivered(&server, "Pipeline Hook", &green(1), "uuid-pipeline-1").await?;
    // Redeliveries change nothing and send nothing.
    no_revision(&mut stream, QUIET).await?;
    assert_eq!(get_ref(&server, PROJECT).await?, before);
    assert_eq!(push_status, 200, "{push_answer}");
    assert_eq!(pipeline_status, 200, "{pipeline_answer}");
    assert_eq!(
        outcome(&push_answer),
        "duplicate",
        "redelivered push: {push_answer}"
    );
    assert_eq!(
        outcome(&pipeline_answer),
        "duplicate",
        "redelivered pipeline: {pipeline_answer}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_and_other_events_are_ignored() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;

    let mut tag_push = push(1);
    tag_push["ref"] = json!("refs/tags/v1.0.0");
    tag_push["object_kind"] = json!("tag_push");
    let (status, answer) = server.hook("Tag Push Hook", &tag_push, None).await?;
    assert_eq!(
        (status, outcome(&answer)),
        (200, "ignored"),
        "tag push event: {answer}"
    );
    // A tag ref in a push hook is not a branch either.
    let (status, answer) = server.hook("Push Hook", &tag_push, None).await?;
    assert_eq!(
        (status, outcome(&answer)),
        (200, "ignored"),
        "tag ref in a push hook: {answer}"
    );

    let mut tag_pipeline = green(1);
    tag_pipeline["object_attributes"]["tag"] = json!(true);
    tag_pipeline["object_attributes"]["ref"] = json!("v1.0.0");
    let (status, answer) = server.hook("Pipeline Hook", &tag_pipeline, None).await?;
    assert_eq!(
        (status, outcome(&answer)),
        (200, "ignored"),
        "tag pipeline: {answer}"
    );

    let job = json!({
        "object_kind": "build",
        "ref": "main",
        "tag": false,
        "sha": sha(1),
        "build_id": 1,
        "build_status": "success",
        "project_id": 42,
        "project": { "id": 42, "path_with_namespace": PROJECT }
    });
    let (status, answer) = server.hook("Job Hook", &job, None).await?;
    assert_eq!(
        (status, outcome(&answer)),
        (200, "ignored"),
        "job hook: {answer}"
    );

    assert_nothing_recorded(&server).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_api_records_and_deploys() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    let mut stream = server.stream("prod").await?;
    let mut client = ingest(&server, INGEST_TOKEN).await?;

    let push = RecordPushRequest {
        project: PROJECT.into(),
        r#ref: "main".into(),
        before: String::new(),
        after: sha(1),
        delivery_id: "ci-push-1".into(),
    };
    assert_eq!(
        client.record_push(push.clone()).await?.into_inner().outcome,
        "recorded"
    );
    no_revision(&mut stream, QUIET).await?;

    let pipeline = RecordPipelineRequest {
        project: PROJECT.into(),
        r#ref: "refs/heads/main".into(),
        sha: sha(1),
        pipeline_id: 5,
        status: PipelineStatus::Success.into(),
        source: "push".into(),
        delivery_id: "ci-pipeline-5".into(),
        finished_at_unix_ms: Some(1_700_000_000_000),
        passed_stages: Vec::new(),
    };
    assert_eq!(
        client
            .record_pipeline(pipeline.clone())
            .await?
            .into_inner()
            .outcome,
        "recorded"
    );
    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.sha(), sha(1));
    assert_eq!(
        revision
            .header
            .revision
            .as_ref()
            .and_then(|r| r.pipeline_id),
        Some(5)
    );

    // The same facts through the webhook endpoint are already known.
    let watched = get_ref(&server, PROJECT).await?;
    assert_eq!(watched.head, sha(1));
    assert_eq!(
        watched.commits[0].pipelines[0].status(),
        PipelineStatus::Success
    );

    // An unwatched project is acknowledged and ignored.
    let other = RecordPushRequest {
        project: OTHER_PROJECT.into(),
        delivery_id: "ci-other".into(),
        ..push
    };
    let outcome = client.record_push(other).await?.into_inner().outcome;
    assert!(outcome.starts_with("ignored"), "{outcome}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_api_rejects_bad_tokens_and_invalid_input() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(&redis).await?;
    let push = RecordPushRequest {
        project: PROJECT.into(),
        r#ref: "main".into(),
        before: String::new(),
        after: sha(1),
        delivery_id: String::new(),
    };
    let pipeline = RecordPipelineRequest {
        project: PROJECT.into(),
        r#ref: "main".into(),
        sha: sha(1),
        pipeline_id: 5,
        status: PipelineStatus::Success.into(),
        source: "push".into(),
        delivery_id: String::new(),
        finished_at_unix_ms: None,
        passed_stages: Vec::new(),
    };

    for token in ["not-the-ingest-token", "admin-token", &agent_token("prod")] {
        let mut client = ingest(&server, token).await?;
        expect_code(
            client.record_push(push.clone()).await,
            Code::Unauthenticated,
            token,
        )?;
        expect_code(
            client.record_pipeline(pipeline.clone()).await,
            Code::Unauthenticated,
            token,
        )?;
    }
    let channel = Channel::from_shared(server.grpc_url())?.connect().await?;
    let mut anonymous = IngestServiceClient::new(channel);
    expect_code(
        anonymous.record_push(push.clone()).await,
        Code::Unauthenticated,
        "no token",
    )?;

    let mut client = ingest(&server, INGEST_TOKEN).await?;
    // An abbreviation could name another commit once the repository grows.
    for bad in [
        "not-a-sha",
        "abc",
        "g".repeat(40).as_str(),
        "abc1234",
        &"a".repeat(41),
    ] {
        let request = RecordPushRequest {
            after: bad.into(),
            ..push.clone()
        };
        let status = expect_code(
            client.record_push(request).await,
            Code::InvalidArgument,
            bad,
        )?;
        assert!(
            status.message().contains("after"),
            "names the field: {}",
            status.message()
        );
        let request = RecordPipelineRequest {
            sha: bad.into(),
            ..pipeline.clone()
        };
        let status = expect_code(
            client.record_pipeline(request).await,
            Code::InvalidArgument,
            bad,
        )?;
        assert!(
            status.message().contains("sha"),
            "names the field: {}",
            status.message()
        );
    }
    // Both are stored, the delivery id in a key: a few hundred bytes at most.
    let long = "x".repeat(256);
    for (request, field) in [
        (
            RecordPipelineRequest {
                source: long.clone(),
                ..pipeline.clone()
            },
            "source of 256 bytes",
        ),
        (
            RecordPipelineRequest {
                delivery_id: long.clone(),
                ..pipeline.clone()
            },
            "delivery_id of 256 bytes",
        ),
    ] {
        let status = expect_code(
            client.record_pipeline(request).await,
            Code::InvalidArgument,
            field,
        )?;
        assert!(status.message().contains(field), "{}", status.message());
    }
    let request = RecordPipelineRequest {
        status: 42,
        ..pipeline.clone()
    };
    let status = expect_code(
        client.record_pipeline(request).await,
        Code::InvalidArgument,
        "an unknown status",
    )?;
    assert!(
        status.message().contains("status: unknown value 42"),
        "{}",
        status.message()
    );
    let request = RecordPushRequest {
        before: "zz".into(),
        ..push.clone()
    };
    expect_code(
        client.record_push(request).await,
        Code::InvalidArgument,
        "invalid before",
    )?;

    assert_nothing_recorded(&server).await
}
