//! Every resource a client can make the server hold is bounded: reports by size, rate and
//! per-object results; streams by count per token, and by what an unread one buffers; pipeline
//! claims by jobs and stages; git trees by the entries a read visits. The misbehaving client
//! gets a clear error, and the other clients keep working meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use anyhow::{Context, bail, ensure};
use greenlight::digest::sha256_hex;
use greenlight::report::{MAX_OBJECT_MESSAGE_BYTES, MAX_REPORT_OBJECTS};
use greenlight::v1::{
    ObjectResult, Phase, PipelineStatus, RecordPipelineRequest, StatusReport, WatchEventsRequest,
    WatchRevisionRequest, event, object_result::Action, revision_state::State,
};
use greenlight_agent::client::ClientError;
use greenlight_e2e::*;
use prost::Message;
use serde_json::{Value, json};
use tonic::Code;

/// The CI token of agent `name` in these tests.
fn ci_token(name: &str) -> String {
    format!("ci-token-{name}")
}

/// An agent entry on `project`'s `main` with a CI token.
fn agent_entry(name: &str, project: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    token_sha256: \"{}\"\n    project: \"{project}\"\n    ref: main\n    ci_token_sha256: \"{}\"\n{extra}",
        sha256_hex(agent_token(name).as_bytes()),
        sha256_hex(ci_token(name).as_bytes()),
    )
}

/// A server on `redis` with `sections` before the agents `noisy` and `quiet`, both on
/// `PROJECT@main` in pipeline mode.
async fn noisy_and_quiet(redis: &Redis, sections: &str) -> anyhow::Result<TestServer> {
    let yaml = format!(
        "{sections}{}{}{}",
        config_yaml(Some(&redis.url()), &[]),
        agent_entry("noisy", PROJECT, ""),
        agent_entry("quiet", PROJECT, ""),
    );
    TestServer::start(&yaml).await
}

/// `count` object results whose messages are `message_bytes` long.
fn objects(count: usize, message_bytes: usize) -> Vec<ObjectResult> {
    (0..count)
        .map(|i| ObjectResult {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: "apps".into(),
            name: format!("cm-{i}"),
            action: Action::Applied.into(),
            message: "m".repeat(message_bytes),
        })
        .collect()
}

/// The largest report an agent can get accepted: every object the server keeps, each with
/// a message three times longer than it keeps, the whole below the request limit.
fn largest_report(revision: &str) -> StatusReport {
    StatusReport {
        revision: revision.to_owned(),
        phase: Phase::Applied.into(),
        message: "applied".into(),
        objects: objects(MAX_REPORT_OBJECTS, 3 * MAX_OBJECT_MESSAGE_BYTES),
        ..Default::default()
    }
}

fn healthy(revision: &str) -> StatusReport {
    StatusReport {
        revision: revision.to_owned(),
        phase: Phase::Healthy.into(),
        message: "all good".into(),
        ..Default::default()
    }
}

/// The status a call failed with.
fn status_of<T: std::fmt::Debug>(result: Result<T, ClientError>) -> anyhow::Result<tonic::Status> {
    match result {
        Err(ClientError::Status(status)) => Ok(status),
        other => bail!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_sending_too_much_is_refused_while_another_keeps_working() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = noisy_and_quiet(&redis, "").await?;
    let noisy = server.agent("noisy").await?;
    let quiet = server.agent("quiet").await?;
    let mut noisy_stream = noisy.sync(None).await?;
    let mut quiet_stream = quiet.sync(None).await?;
    let first = sha(0x81);
    server.release(ZERO, &first, 1).await?;
    assert_eq!(next_revision(&mut noisy_stream, SOON).await?.sha(), first);
    assert_eq!(next_revision(&mut quiet_stream, SOON).await?.sha(), first);

    // Beyond the request limit: not even decoded.
    let oversized = StatusReport {
        objects: objects(3 * MAX_REPORT_OBJECTS, 3 * MAX_OBJECT_MESSAGE_BYTES),
        ..largest_report(&first)
    };
    ensure!(oversized.encoded_len() > greenlight::report::MAX_REPORT_REQUEST_BYTES);
    let status = status_of(noisy.report(oversized).await)?;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("too large"),
        "{}",
        status.message()
    );

    // The largest report the server accepts: kept, cut to the per-object bounds.
    noisy.report(largest_report(&first)).await?;
    let kept = server.last_report("noisy").await?.context("stored")?;
    assert_eq!(kept.objects.len(), MAX_REPORT_OBJECTS);
    for object in &kept.objects {
        assert!(
            object.message.len() <= MAX_OBJECT_MESSAGE_BYTES,
            "{} bytes kept of an object's message",
            object.message.len()
        );
    }

    // Reports many at once, as a looping agent would send them: the rate cap refuses what
    // is beyond its burst.
    let mut sending = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let noisy = noisy.clone();
        let report = StatusReport {
            revision: first.clone(),
            phase: Phase::Applying.into(),
            message: "again".into(),
            ..Default::default()
        };
        sending.spawn(async move { noisy.report(report).await });
    }
    let (mut accepted, mut refusals) = (0, Vec::new());
    while let Some(sent) = sending.join_next().await {
        match sent? {
            Ok(()) => accepted += 1,
            Err(error) => refusals.push(status_of::<()>(Err(error))?),
        }
    }
    let refused = refusals
        .first()
        .context("200 reports at once were all accepted")?;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("agent noisy sends more than 10 status reports a second"),
        "{}",
        refused.message()
    );
    assert!(accepted >= 1, "the burst lets some through");
    let history = server.history("noisy").await?;
    assert!(history.reports.len() <= 50, "{}", history.reports.len());

    // The other agent of the same ref noticed none of it: it reports, and gets the next
    // revision.
    quiet.report(healthy(&first)).await?;
    server.reported("quiet", &first, Phase::Healthy).await?;
    let second = sha(0x82);
    server.release(&first, &second, 2).await?;
    assert_eq!(next_revision(&mut quiet_stream, SOON).await?.sha(), second);
    quiet.report(healthy(&second)).await?;
    server.reported("quiet", &second, Phase::Healthy).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revision_watches_are_capped_per_ci_token_and_the_others_keep_watching()
-> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let yaml = format!(
        "{}{}{}",
        config_yaml(Some(&redis.url()), &[]),
        agent_entry("prod", PROJECT, ""),
        agent_entry("staging", PROJECT, ""),
    );
    let server = TestServer::start(&yaml).await?;
    let x = sha(0x91);
    assert_eq!(server.push("main", ZERO, &x).await?, 200);
    let watch = |name: &str| WatchRevisionRequest {
        name: name.into(),
        sha: x.clone(),
    };

    // One connection, as `greenlightctl wait` jobs of one pipeline would not share, but a
    // client could.
    let prod_ci = server.admin_as(&ci_token("prod")).await?;
    let mut watches = Vec::new();
    for _ in 0..16 {
        let mut stream = prod_ci
            .clone()
            .watch_revision(watch("prod"))
            .await?
            .into_inner();
        let first = stream.message().await?.context("a first state")?;
        assert_eq!(first.state(), State::Waiting, "{first:?}");
        watches.push(stream);
    }
    let refused = prod_ci
        .clone()
        .watch_revision(watch("prod"))
        .await
        .expect_err("a seventeenth watch");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("the CI token of agent prod already has 16 revision watches open"),
        "{}",
        refused.message()
    );

    // Other tokens are other callers.
    let mut staging = server
        .admin_as(&ci_token("staging"))
        .await?
        .watch_revision(watch("staging"))
        .await?
        .into_inner();
    assert!(staging.message().await?.is_some());
    let mut admin = server
        .admin()
        .await?
        .watch_revision(watch("prod"))
        .await?
        .into_inner();
    assert!(admin.message().await?.is_some());

    // The open watches keep following the commit.
    let client = server.agent("prod").await?;
    let mut stream = client.sync(None).await?;
    assert_eq!(
        server.pipeline("main", &x, 1, "success", "push").await?,
        200
    );
    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.sha(), x);
    client
        .report(StatusReport {
            revision: x.clone(),
            generation: revision.header.revision.map_or(0, |r| r.generation),
            phase: Phase::Applying.into(),
            ..Default::default()
        })
        .await?;
    for watch in watches.iter_mut().chain([&mut admin]) {
        let state = loop {
            let state = tokio::time::timeout(SOON, watch.message())
                .await
                .context("no state within SOON")??
                .context("the watch ended")?;
            if state.state() != State::Waiting {
                break state;
            }
        };
        assert_eq!(state.state(), State::Applying, "{state:?}");
    }

    // A closed watch frees its slot.
    drop(watches.pop());
    eventually("the slot freed", || {
        let mut prod_ci = prod_ci.clone();
        let request = watch("prod");
        async move { Ok(prod_ci.watch_revision(request).await.ok()) }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_watches_are_capped_per_token_and_the_others_keep_watching() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = noisy_and_quiet(&redis, "").await?;
    let admin = server.admin().await?;
    let all = || WatchEventsRequest {
        agent: String::new(),
    };
    let mut watches = Vec::new();
    for _ in 0..64 {
        watches.push(admin.clone().watch_events(all()).await?.into_inner());
    }
    let refused = admin
        .clone()
        .watch_events(all())
        .await
        .expect_err("a sixty-fifth watch");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("the admin token already has 64 event watches open"),
        "{}",
        refused.message()
    );
    // A CI token may not watch events at all: its refusal says so, not that a cap is hit.
    let denied = server
        .admin_as(&ci_token("quiet"))
        .await?
        .watch_events(all())
        .await
        .expect_err("a CI token's event watch");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // Every open watch still gets what happens.
    let x = sha(0xa1);
    server.release(ZERO, &x, 1).await?;
    for watch in &mut watches {
        let event = tokio::time::timeout(SOON, watch.message())
            .await
            .context("no event within SOON")??
            .context("the watch ended")?;
        assert!(
            matches!(event.event, Some(event::Event::Decision(_))),
            "{event:?}"
        );
    }
    drop(watches.pop());
    eventually("the slot freed", || {
        let mut admin = admin.clone();
        async move { Ok(admin.watch_events(all()).await.ok()) }
    })
    .await?;
    Ok(())
}

/// What an event watch may buffer, as the server's admin API sets it.
const EVENT_WATCH_BYTES: i64 = 1024 * 1024;
/// One message past the budget still passes alone: at most a report request's worth.
const LARGEST_EVENT: i64 = greenlight::report::MAX_REPORT_REQUEST_BYTES as i64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_is_dropped_and_its_buffer_stays_bounded() -> anyhow::Result<()>
{
    let redis = Redis::start().await?;
    let server = noisy_and_quiet(&redis, "streams: { stall_timeout: 2s }\n").await?;
    let noisy = server.agent("noisy").await?;
    let quiet = server.agent("quiet").await?;
    let mut noisy_stream = noisy.sync(None).await?;
    let mut quiet_stream = quiet.sync(None).await?;
    let first = sha(0xb1);
    server.release(ZERO, &first, 1).await?;
    assert_eq!(next_revision(&mut noisy_stream, SOON).await?.sha(), first);
    assert_eq!(next_revision(&mut quiet_stream, SOON).await?.sha(), first);

    // A watcher on a connection of its own that never reads, and one that reads.
    let mut stalled = server
        .admin()
        .await?
        .watch_events(WatchEventsRequest::default())
        .await?
        .into_inner();
    let mut reading = server
        .admin()
        .await?
        .watch_events(WatchEventsRequest {
            agent: "quiet".into(),
        })
        .await?
        .into_inner();

    // The server's own gauge of what its streams hold unread, sampled all along.
    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicI64::new(0));
    let sampler = tokio::spawn({
        let (done, most) = (done.clone(), most.clone());
        let http = server.http;
        async move {
            while !done.load(Ordering::Relaxed) {
                let metrics = exposition::scrape(http).await?;
                let held = metrics
                    .value("greenlight_stream_buffered_bytes", &[])
                    .unwrap_or(0.0);
                most.fetch_max(held as i64, Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            anyhow::Ok(())
        }
    });

    // The largest reports at the capped rate: each an event of hundreds of KB for every
    // watcher, far more together than the watcher's buffer may hold.
    let mut published = 0usize;
    let mut refused = 0;
    let stalled_closed = || async {
        anyhow::Ok(
            exposition::scrape(server.http)
                .await?
                .count("greenlight_streams_closed_total", &[("reason", "stalled")]),
        )
    };
    while stalled_closed().await? < 1.0 {
        match noisy.report(largest_report(&first)).await {
            Ok(()) => {
                let kept = server.last_report("noisy").await?.context("stored")?;
                published += kept.encoded_len();
            }
            Err(ClientError::Status(status)) if status.code() == Code::ResourceExhausted => {
                refused += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(error) => return Err(error.into()),
        }
        ensure!(refused < 1000, "the stalled watcher was never dropped");
    }
    done.store(true, Ordering::Relaxed);
    sampler.await??;
    let most = most.load(Ordering::Relaxed);
    eprintln!("streams held at most {most} bytes unread; {published} bytes of events published");
    // The two agents' sync streams are read and hold nothing by now; allow for them anyway.
    let bound = EVENT_WATCH_BYTES + LARGEST_EVENT + 2 * (16 * 129 * 1024);
    assert!(
        most <= bound,
        "streams held {most} bytes unread, more than the {bound} bound"
    );
    assert!(
        published as i64 > EVENT_WATCH_BYTES,
        "only {published} bytes of events were published: the buffer was never tested"
    );

    // The reader meanwhile got the quiet agent's report, which is still served.
    quiet.report(healthy(&first)).await?;
    let event = tokio::time::timeout(SOON, reading.message())
        .await
        .context("no event within SOON")??
        .context("the reading watch ended")?;
    assert_eq!(event.agent, "quiet");

    // What the stalled watcher did not read is dropped as it is closed, before it reads.
    eventually("the buffers emptied", || async {
        Ok((metric(&server, "greenlight_stream_buffered_bytes").await? == 0.0).then_some(()))
    })
    .await?;
    // Reading at last, it gets what was already on its way before the stall: what its own
    // HTTP/2 window took in (2 MiB for a hyper client), which its connection holds, not the
    // server; then why the stream ended.
    // Counted in bytes: how many events that is depends on how many small ones (a
    // connection, a decision) were among the large reports.
    let mut in_flight = 0usize;
    let status = loop {
        match stalled.message().await {
            Ok(Some(event)) => in_flight += event.encoded_len(),
            Ok(None) => bail!("the stalled watch ended without a status"),
            Err(status) => break status,
        }
    };
    eprintln!("{in_flight} bytes of events reached the stalled watcher after its stall");
    let window = 2 * 1024 * 1024 + LARGEST_EVENT as usize;
    assert!(
        in_flight <= window,
        "{in_flight} bytes of events were still delivered, more than the client's window"
    );
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("read nothing for 2s"),
        "{}",
        status.message()
    );
    assert_eq!(stalled_closed().await?, 1.0);
    Ok(())
}

/// A pipeline hook for `sha` whose `builds` are `builds`.
fn pipeline_with_builds(sha: &str, id: u64, builds: Vec<Value>) -> Value {
    let mut hook = pipeline_payload(PROJECT, "main", sha, id, "success", "push");
    hook["builds"] = Value::Array(builds);
    hook
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_claims_with_too_many_jobs_or_stages_are_refused() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = noisy_and_quiet(&redis, "").await?;
    let mut stream = server.stream("quiet").await?;
    let x = sha(0xc1);
    assert_eq!(server.push("main", ZERO, &x).await?, 200);
    let job = |stage: &str| json!({ "name": "test", "stage": stage, "status": "success" });

    let too_many_jobs = pipeline_with_builds(&x, 1, vec![job("test"); 5001]);
    let (status, body) = server.hook("Pipeline Hook", &too_many_jobs, None).await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.to_string()
            .contains("builds: 5001 jobs, more than the 5000"),
        "{body}"
    );
    let stages: Vec<Value> = (0..257).map(|i| job(&format!("stage-{i}"))).collect();
    let (status, body) = server
        .hook("Pipeline Hook", &pipeline_with_builds(&x, 1, stages), None)
        .await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.to_string().contains("257 stages, more than the 256"),
        "{body}"
    );

    let mut ingest = server.ingest_as(INGEST_TOKEN).await?;
    let request = RecordPipelineRequest {
        project: PROJECT.into(),
        r#ref: "main".into(),
        sha: x.clone(),
        pipeline_id: 1,
        status: PipelineStatus::Success.into(),
        source: "push".into(),
        delivery_id: String::new(),
        finished_at_unix_ms: None,
        passed_stages: (0..257).map(|i| format!("stage-{i}")).collect(),
    };
    let refused = ingest
        .record_pipeline(request.clone())
        .await
        .expect_err("257 stages");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("passed_stages: 257 stages"),
        "{}",
        refused.message()
    );
    let long_stage = RecordPipelineRequest {
        passed_stages: vec!["s".repeat(256)],
        ..request.clone()
    };
    let refused = ingest
        .record_pipeline(long_stage)
        .await
        .expect_err("a long stage");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    // None of them was recorded: nothing was deployed, and the ref lists no pipeline.
    no_revision(&mut stream, QUIET).await?;
    let commits = server
        .admin()
        .await?
        .get_ref(greenlight::v1::GetRefRequest {
            project: PROJECT.into(),
            r#ref: "main".into(),
        })
        .await?
        .into_inner()
        .commits;
    assert!(
        commits.iter().all(|c| c.pipelines.is_empty()),
        "{commits:?}"
    );
    // A plausible claim right after is recorded and deploys.
    let within = RecordPipelineRequest {
        passed_stages: (0..256).map(|i| format!("stage-{i}")).collect(),
        ..request
    };
    ingest.record_pipeline(within).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), x);
    Ok(())
}

/// A commit of a few KB whose tree names 10^10 paths: ten levels of directories, each
/// listing the same subtree ten times, over ten files.
fn tree_bomb(repo: &GitRepo) -> anyhow::Result<String> {
    let with_input = |args: &[&str], input: String| -> anyhow::Result<String> {
        use std::io::Write;
        let mut child = std::process::Command::new("git")
            .args(args)
            .current_dir(repo_dir(repo)?)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("git's stdin")?
            .write_all(input.as_bytes())?;
        let output = child.wait_with_output()?;
        ensure!(output.status.success(), "git {args:?} failed");
        Ok(String::from_utf8(output.stdout)?.trim().to_owned())
    };
    let blob = with_input(&["hash-object", "-w", "--stdin"], configmap("bomb", "x"))?;
    let mut tree = with_input(
        &["mktree"],
        (0..10)
            .map(|i| format!("100644 blob {blob}\tf{i}.yaml\n"))
            .collect(),
    )?;
    for _ in 0..10 {
        tree = with_input(
            &["mktree"],
            (0..10)
                .map(|i| format!("040000 tree {tree}\td{i}\n"))
                .collect(),
        )?;
    }
    let commit = repo.git(&["commit-tree", &tree, "-m", "bomb"])?;
    repo.git(&["update-ref", "refs/heads/main", &commit])?;
    Ok(commit)
}

/// The working directory of `repo`, from git itself.
fn repo_dir(repo: &GitRepo) -> anyhow::Result<String> {
    repo.git(&["rev-parse", "--show-toplevel"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_naming_ten_billion_paths_is_refused_and_other_agents_keep_deploying()
-> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let (bombed, fine) = (GitRepo::new()?, GitRepo::new()?);
    let bomb = tree_bomb(&bombed)?;
    let good = fine.commit(&[("app.yaml", configmap("app", "v1").as_bytes())], &[])?;
    const OTHER: &str = "group/other-manifests";
    let agents = [
        // A glob no file matches: only the bound on entries visited stops the walk.
        git_agent_yaml("bombed", &bombed.url(), &["**/*.json"]),
        git_agent_yaml("fine", &fine.url(), &[]).replace(PROJECT, OTHER),
    ];
    let server =
        TestServer::start(&git_config_yaml(&redis.url(), cache.path(), "", &agents)).await?;
    let mut fine_stream = server.stream("fine").await?;
    let mut bombed_stream = server.stream("bombed").await?;
    server.release(ZERO, &bomb, 1).await?;
    let other = |hook: Value| {
        let mut hook = hook;
        hook["project"]["path_with_namespace"] = OTHER.into();
        hook["project"]["id"] = 43.into();
        hook
    };
    let (status, _) = server
        .hook(
            "Push Hook",
            &other(push_payload(OTHER, "main", ZERO, &good)),
            None,
        )
        .await?;
    assert_eq!(status, 200);
    let (status, _) = server
        .hook(
            "Pipeline Hook",
            &other(pipeline_payload(OTHER, "main", &good, 2, "success", "push")),
            None,
        )
        .await?;
    assert_eq!(status, 200);
    assert_eq!(next_revision(&mut fine_stream, SOON).await?.sha(), good);

    let error = eventually("the bombed agent's sync error", || async {
        let status = server.agent_status("bombed").await?;
        Ok(status
            .sync_error
            .contains("git.max_tree_entries")
            .then_some(status.sync_error))
    })
    .await?;
    assert!(error.contains("200000"), "{error}");
    no_revision(&mut bombed_stream, QUIET).await?;
    Ok(())
}
