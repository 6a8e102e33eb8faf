//! Agents managed at runtime through the admin API: created on one replica and connected on
//! another, their tokens rotated with a grace period, deleted with their streams ended; and
//! the config file's agents left alone.

use anyhow::{Context as _, bail, ensure};
use greenlight::v1::{
    AgentDefinition, CreateAgentRequest, DeleteAgentRequest, GetAgentRequest,
    RotateAgentTokenRequest, UpdateAgentRequest,
};
use greenlight_agent::client::{Client, ClientError, RevisionStream};
use greenlight_e2e::fake_gitlab::FakeGitLab;
use greenlight_e2e::{
    ADMIN_TOKEN, AgentDef, PROJECT, Redis, SOON, TestServer, config_yaml, eventually,
    next_revision, sha,
};
use greenlight_server::config::{Config, Overrides};
use serde_json::json;
use tonic::Code;

const NULL_SHA: &str = "0000000000000000000000000000000000000000";

/// How long a rotated-out token stays valid in these tests: long enough to be used once
/// right after the rotation, short enough to wait out.
const GRACE_SECONDS: u32 = 3;

/// A replica named `replica` with the file agent `prod`, on `redis` or the embedded store.
async fn server(redis: Option<&Redis>, replica: &str) -> anyhow::Result<TestServer> {
    let url = redis.map(Redis::url);
    let yaml = config_yaml(url.as_deref(), &[AgentDef::new("prod")]);
    let overrides = Overrides {
        replica_id: Some(replica.to_owned()),
        ..Overrides::default()
    };
    TestServer::start_with(Config::from_yaml(&yaml, &overrides)?).await
}

fn definition(name: &str) -> AgentDefinition {
    AgentDefinition {
        name: name.into(),
        project: PROJECT.into(),
        r#ref: "main".into(),
        ..AgentDefinition::default()
    }
}

/// The code of a refused call, failing if it was not refused.
fn refusal<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> anyhow::Result<tonic::Status> {
    match result {
        Ok(answer) => bail!("expected a refusal, got {answer:?}"),
        Err(status) => Ok(status),
    }
}

/// Opens a Sync stream on `server` with `token`: the server's refusal as an error.
async fn open(server: &TestServer, token: &str) -> Result<RevisionStream, ClientError> {
    Client::connect(&server.grpc_url(), token, None)
        .await?
        .sync(None)
        .await
}

/// The status a stream's refusal or end carries.
fn status_of(error: ClientError) -> anyhow::Result<tonic::Status> {
    match error {
        ClientError::Status(status) => Ok(status),
        other => bail!("expected a status from the server, got {other}"),
    }
}

/// Waits until `server` accepts `token` for a stream.
async fn accepted(server: &TestServer, token: &str) -> anyhow::Result<RevisionStream> {
    eventually("the token to be accepted", || async {
        match open(server, token).await {
            Ok(stream) => Ok(Some(stream)),
            Err(ClientError::Status(status)) if status.code() == Code::Unauthenticated => Ok(None),
            Err(other) => Err(other.into()),
        }
    })
    .await
}

/// Waits until `server` refuses `token`.
async fn refused(server: &TestServer, token: &str) -> anyhow::Result<tonic::Status> {
    eventually("the token to be refused", || async {
        match open(server, token).await {
            Ok(_) => Ok(None),
            Err(error) => {
                let status = status_of(error)?;
                ensure!(status.code() == Code::Unauthenticated, "{status:?}");
                Ok(Some(status))
            }
        }
    })
    .await
}

/// Waits for the end of `stream`, which must carry a status; the revision a new stream
/// starts with is read past.
async fn ended(stream: &mut RevisionStream) -> anyhow::Result<tonic::Status> {
    let deadline = tokio::time::Instant::now() + SOON * 3;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => bail!("the stream did not end"),
            Ok(Ok(Some(revision))) => ensure!(revision.sha() == sha(1), "{}", revision.sha()),
            Ok(Ok(None)) => bail!("the stream ended without a status"),
            Ok(Err(error)) => return status_of(error),
        }
    }
}

/// The whole life of a runtime agent, with its changes made on `a` and its streams on `b`
/// (the same server for the embedded store).
async fn lifecycle(a: &TestServer, b: &TestServer) -> anyhow::Result<()> {
    let mut admin = a.admin().await?;

    // Created on A: its tokens are answered once.
    let created = admin
        .create_agent(CreateAgentRequest {
            agent: Some(definition("edge-1")),
            ci_token: true,
        })
        .await?
        .into_inner();
    let status = created.agent.context("the created agent's status")?;
    assert!(status.runtime, "{status:?}");
    assert_eq!(
        (status.project.as_str(), status.r#ref.as_str()),
        (PROJECT, "main")
    );
    assert_eq!(created.token.len(), 64);
    assert!(!created.ci_token.is_empty());
    assert_ne!(created.token, created.ci_token);
    let again = refusal(
        admin
            .create_agent(CreateAgentRequest {
                agent: Some(definition("edge-1")),
                ci_token: false,
            })
            .await,
    )?;
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    let invalid = refusal(
        admin
            .create_agent(CreateAgentRequest {
                agent: Some(AgentDefinition {
                    health_timeout: "soon".into(),
                    ..definition("edge-2")
                }),
                ci_token: false,
            })
            .await,
    )?;
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    assert!(invalid.message().contains("health_timeout"), "{invalid:?}");
    // The stores' keys join project and branch with a control character.
    let joined = refusal(
        admin
            .create_agent(CreateAgentRequest {
                agent: Some(AgentDefinition {
                    project: "group\u{1f}app".into(),
                    ..definition("edge-2")
                }),
                ci_token: false,
            })
            .await,
    )?;
    assert_eq!(joined.code(), Code::InvalidArgument, "{joined:?}");
    assert!(
        joined.message().contains("control characters"),
        "{joined:?}"
    );
    // Any file the server can read would be sent to the repository's host as its token.
    let exfiltrate = refusal(
        admin
            .create_agent(CreateAgentRequest {
                agent: Some(AgentDefinition {
                    r#ref: "elsewhere".into(),
                    repository: "https://attacker.invalid/x.git".into(),
                    repository_token_file: "/etc/greenlight/gitlab-token".into(),
                    ..definition("edge-2")
                }),
                ci_token: false,
            })
            .await,
    )?;
    assert_eq!(
        exfiltrate.code(),
        Code::FailedPrecondition,
        "{exfiltrate:?}"
    );
    assert!(
        exfiltrate.message().contains("repository_token_file"),
        "{exfiltrate:?}"
    );

    // Connected through B, it receives what the gate lets through.
    let mut stream = accepted(b, &created.token).await?;
    a.release(NULL_SHA, &sha(1), 1).await?;
    let revision = next_revision(&mut stream, SOON).await?;
    assert_eq!(revision.sha(), sha(1));
    let on_b = eventually("B to show the runtime agent", || async {
        let status = b.agent_status("edge-1").await?;
        Ok(status.connected.then_some(status))
    })
    .await?;
    assert!(on_b.runtime);
    assert_eq!(on_b.desired.map(|d| d.sha), Some(sha(1)));
    // Its CI token is a CI token: status yes, pause no.
    let ci_token = created.ci_token.clone();
    let seen = eventually("B to accept the CI token", || {
        let ci_token = ci_token.clone();
        async move {
            let mut ci = b.admin_as(&ci_token).await?;
            Ok(ci
                .get_agent(GetAgentRequest {
                    name: "edge-1".into(),
                })
                .await
                .ok())
        }
    })
    .await?;
    assert_eq!(seen.into_inner().name, "edge-1");

    // An update changes what it runs with; its project and ref stay.
    let updated = admin
        .update_agent(UpdateAgentRequest {
            agent: Some(AgentDefinition {
                default_namespace: "apps".into(),
                ..definition("edge-1")
            }),
        })
        .await?
        .into_inner();
    assert!(updated.runtime);
    let moved = refusal(
        admin
            .update_agent(UpdateAgentRequest {
                agent: Some(AgentDefinition {
                    r#ref: "other".into(),
                    ..definition("edge-1")
                }),
            })
            .await,
    )?;
    assert_eq!(moved.code(), Code::InvalidArgument, "{moved:?}");
    // Streams get the revision again with the new settings.
    let resent = next_revision(&mut stream, SOON).await?;
    assert_eq!(resent.sha(), sha(1));
    assert_eq!(
        resent
            .header
            .settings
            .as_ref()
            .map(|s| s.default_namespace.as_str()),
        Some("apps")
    );

    // Rotated: the new token works at once, the old one for the grace period only.
    let old = created.token;
    let rotated = admin
        .rotate_agent_token(RotateAgentTokenRequest {
            name: "edge-1".into(),
            grace_seconds: Some(GRACE_SECONDS),
            ci_token: false,
        })
        .await?
        .into_inner();
    assert_ne!(rotated.token, old);
    assert!(rotated.previous_valid_until_unix_ms > 0);
    let mut fresh = open(a, &rotated.token)
        .await
        .context("the new token on the replica that rotated it")?;
    let mut within_grace = open(a, &old)
        .await
        .context("the old token within its grace period")?;
    let mut fresh_b = accepted(b, &rotated.token).await?;
    for server in [a, b] {
        // Refused as unknown, or, right at the end of the grace period, as no longer valid.
        let status = refused(server, &old).await?;
        assert!(status.message().contains("token"), "{status:?}");
    }
    // Streams opened with the old token end when its grace period does.
    for stream in [&mut stream, &mut within_grace] {
        let status = ended(stream).await?;
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("rotated"), "{status:?}");
    }

    // Deleted: its streams end with a clear status and every replica refuses it.
    admin
        .delete_agent(DeleteAgentRequest {
            name: "edge-1".into(),
        })
        .await?;
    for stream in [&mut fresh, &mut fresh_b] {
        let status = ended(stream).await?;
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert!(
            status.message().contains("edge-1 was deleted"),
            "{status:?}"
        );
    }
    for server in [a, b] {
        refused(server, &rotated.token).await?;
        let gone = eventually("the agent to be gone", || async {
            let answer = server
                .admin()
                .await?
                .get_agent(GetAgentRequest {
                    name: "edge-1".into(),
                })
                .await;
            Ok(answer.err().filter(|s| s.code() == Code::NotFound))
        })
        .await?;
        assert_eq!(gone.code(), Code::NotFound);
    }
    let twice = refusal(
        admin
            .delete_agent(DeleteAgentRequest {
                name: "edge-1".into(),
            })
            .await,
    )?;
    assert_eq!(twice.code(), Code::NotFound, "{twice:?}");
    Ok(())
}

/// Every runtime change to the file agent `prod` is refused, and says why.
async fn file_agents_are_left_alone(server: &TestServer) -> anyhow::Result<()> {
    let mut admin = server.admin().await?;
    let refusals = [
        refusal(
            admin
                .update_agent(UpdateAgentRequest {
                    agent: Some(definition("prod")),
                })
                .await,
        )?,
        refusal(
            admin
                .delete_agent(DeleteAgentRequest {
                    name: "prod".into(),
                })
                .await,
        )?,
        refusal(
            admin
                .rotate_agent_token(RotateAgentTokenRequest {
                    name: "prod".into(),
                    grace_seconds: None,
                    ci_token: false,
                })
                .await,
        )?,
        refusal(
            admin
                .create_agent(CreateAgentRequest {
                    agent: Some(definition("prod")),
                    ci_token: false,
                })
                .await,
        )?,
    ];
    for status in refusals {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("config file"), "{status:?}");
    }
    // It still works.
    server.stream("prod").await?;
    assert!(!server.agent_status("prod").await?.runtime);
    // And only the admin token manages agents.
    let mut agent = server
        .admin_as(&greenlight_e2e::agent_token("prod"))
        .await?;
    let status = refusal(
        agent
            .delete_agent(DeleteAgentRequest {
                name: "prod".into(),
            })
            .await,
    )?;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_agents_across_two_replicas_on_redis() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let a = server(Some(&redis), "replica-a").await?;
    let b = server(Some(&redis), "replica-b").await?;
    lifecycle(&a, &b).await?;
    file_agents_are_left_alone(&a).await?;
    file_agents_are_left_alone(&b).await?;

    // A replica started later reads the registry from the store.
    let mut admin = a.admin().await?;
    let created = admin
        .create_agent(CreateAgentRequest {
            agent: Some(definition("edge-3")),
            ci_token: false,
        })
        .await?
        .into_inner();
    // Redis holds the token's hash, never the token.
    let stored = redis.cli(&["hgetall", "gl-test:{gl0}:registry"])?;
    assert!(stored.contains("r:edge-3"), "{stored}");
    assert!(!stored.contains(&created.token), "{stored}");
    let hash = greenlight::digest::sha256_hex(created.token.as_bytes());
    assert!(stored.contains(&hash), "{stored}");
    let c = server(Some(&redis), "replica-c").await?;
    let mut stream = open(&c, &created.token)
        .await
        .context("a new replica knows runtime agents at once")?;
    // A new agent starts from the newest green commit of its ref.
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(1));
    a.release(&sha(1), &sha(7), 7).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(7));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_agents_on_the_embedded_store() -> anyhow::Result<()> {
    let server = server(None, "single").await?;
    lifecycle(&server, &server).await?;
    file_agents_are_left_alone(&server).await?;

    // greenlightctl has the same commands.
    let ctl = |args: &[&str]| {
        let mut all = vec![
            "greenlightctl".to_owned(),
            "--server".to_owned(),
            server.grpc_url(),
            "--token".to_owned(),
            ADMIN_TOKEN.to_owned(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        greenlight::ctl::run(all)
    };
    let create = [
        "agent",
        "create",
        "edge-9",
        "--project",
        PROJECT,
        "--ref",
        "main",
        "--mode",
        "manual",
        "--ci-token",
    ];
    assert_eq!(ctl(&create).await, 0);
    let status = server.agent_status("edge-9").await?;
    assert!(status.runtime);
    assert_eq!(status.mode(), greenlight::v1::GateMode::Manual);
    let update = [
        "agent",
        "update",
        "edge-9",
        "--project",
        PROJECT,
        "--ref",
        "main",
        "--default-namespace",
        "apps",
    ];
    assert_eq!(ctl(&update).await, 0);
    assert_eq!(
        server.agent_status("edge-9").await?.mode(),
        greenlight::v1::GateMode::Pipeline,
        "an update replaces the whole definition"
    );
    assert_eq!(
        ctl(&["agent", "rotate-token", "edge-9", "--grace", "0s"]).await,
        0
    );
    assert_eq!(
        ctl(&["agent", "rotate-token", "edge-9", "--ci", "-o", "json"]).await,
        0
    );
    assert_eq!(ctl(&["agent", "delete", "prod"]).await, 2, "a file agent");
    assert_eq!(ctl(&["agent", "delete", "edge-9"]).await, 0);
    assert_eq!(ctl(&["agent", "delete", "edge-9"]).await, 2, "gone already");

    // Health checks have a flag: refused here when they could never work, sent with the
    // agent's revisions when they can.
    let with_check = |check: &'static str| {
        [
            "agent",
            "create",
            "edge-10",
            "--project",
            PROJECT,
            "--ref",
            "main",
            "--health-check",
            check,
        ]
    };
    assert_eq!(
        ctl(&with_check(
            r#"{"kind": "Widget", "jsonpath": "$.status["}"#
        ))
        .await,
        2,
        "no healthy value, and a JSONPath that does not parse"
    );
    assert!(server.agent_status("edge-10").await.is_err(), "not created");
    let check = r#"{"group": "example.io", "kind": "Widget", "jsonpath": "$.status.phase", "healthy": ["Ready"]}"#;
    assert_eq!(ctl(&with_check(check)).await, 0);
    let token = server
        .admin()
        .await?
        .rotate_agent_token(RotateAgentTokenRequest {
            name: "edge-10".into(),
            grace_seconds: Some(0),
            ci_token: false,
        })
        .await?
        .into_inner()
        .token;
    let mut stream = accepted(&server, &token).await?;
    let revision = next_revision(&mut stream, SOON).await?;
    let checks = revision
        .header
        .settings
        .map(|settings| settings.health_checks)
        .unwrap_or_default();
    assert_eq!(
        checks
            .iter()
            .map(|c| (c.group.as_str(), c.kind.as_str(), c.healthy_values.clone()))
            .collect::<Vec<_>>(),
        [("example.io", "Widget", vec!["Ready".to_owned()])]
    );
    Ok(())
}

/// A replica named `replica` on the Redis Cluster `seeds`, with the file agent `prod`.
async fn cluster_server(seeds: &[String], replica: &str) -> anyhow::Result<TestServer> {
    let yaml = config_yaml(None, &[AgentDef::new("prod")]);
    let nodes: Vec<String> = seeds.iter().map(|seed| format!("\"{seed}\"")).collect();
    let yaml = format!(
        "{yaml}redis: {{ cluster_nodes: [{}], key_prefix: \"gl-registry\" }}\n",
        nodes.join(", ")
    );
    let overrides = Overrides {
        replica_id: Some(replica.to_owned()),
        ..Overrides::default()
    };
    TestServer::start_with(Config::from_yaml(&yaml, &overrides)?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_agents_across_two_replicas_on_a_redis_cluster() -> anyhow::Result<()> {
    let cluster = greenlight_e2e::cluster::RedisCluster::start(3).await?;
    let seeds = cluster.seeds();
    let a = cluster_server(&seeds, "replica-a").await?;
    let b = cluster_server(&seeds, "replica-b").await?;
    lifecycle(&a, &b).await?;
    file_agents_are_left_alone(&b).await?;
    Ok(())
}

/// The change log's last entry on `log` about `agent` and `sha`, as Redis holds it: the
/// one that told it to run `sha` once its pipeline passed.
fn entry_that_sent(redis: &Redis, log: &str, agent: &str, sha: &str) -> anyhow::Result<String> {
    let entries = redis.cli(&["xrange", log, "-", "+"])?;
    entries
        .lines()
        .rev()
        .find(|line| {
            line.contains("\"agents_changed\"")
                && line.contains(&format!("\"{agent}\""))
                && line.contains(sha)
        })
        .map(str::to_owned)
        .with_context(|| format!("no entry on {log} sent {agent} {sha}: {entries}"))
}

/// The log's shards are read in any order, so a replica may read a deleted agent's last
/// entries after the registry change that created another agent under its name: those
/// entries are the old agent's, not the new one's. Replayed here onto the log after the
/// new agent was created, as such a replica reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_created_again_under_its_name_gets_nothing_of_the_old_one() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let gitlab = FakeGitLab::start().await?;
    let yaml = config_yaml(Some(&redis.url()), &[AgentDef::new("prod")]) + &gitlab.config("");
    let server = TestServer::start_with(Config::from_yaml(&yaml, &Overrides::default())?).await?;
    let mut admin = server.admin().await?;
    let status_of_edge = |sha: &str| -> Vec<String> {
        gitlab
            .statuses_for(sha)
            .into_iter()
            .filter(|(_, name, _)| name == "greenlight/edge-7")
            .map(|(state, ..)| state)
            .collect()
    };

    // The first edge-7 is told to run commits 1 to 3 of main in turn, and their statuses
    // say so.
    admin
        .create_agent(CreateAgentRequest {
            agent: Some(definition("edge-7")),
            ci_token: false,
        })
        .await?;
    let mut before = NULL_SHA.to_owned();
    for n in 1..=3 {
        gitlab.put_pipeline(
            PROJECT,
            json!({"id": n, "sha": sha(n), "ref": "main", "status": "success", "source": "push"}),
        );
        server.release(&before, &sha(n), n.into()).await?;
        server.desired_becomes("edge-7", &sha(n)).await?;
        before = sha(n);
    }
    eventually("commit 3's status for edge-7", || async {
        Ok((status_of_edge(&sha(3)) == ["pending"]).then_some(()))
    })
    .await?;
    let log = format!(
        "gl-test:{{gl{}}}:log",
        greenlight_server::store::agent_shard("edge-7")
    );
    let old_entry = entry_that_sent(&redis, &log, "edge-7", &sha(3))?;

    // Deleted, and created again to watch another branch, where nothing was pushed yet.
    admin
        .delete_agent(DeleteAgentRequest {
            name: "edge-7".into(),
        })
        .await?;
    let created = admin
        .create_agent(CreateAgentRequest {
            agent: Some(AgentDefinition {
                r#ref: "other".into(),
                ..definition("edge-7")
            }),
            ci_token: false,
        })
        .await?
        .into_inner();
    let mut stream = accepted(&server, &created.token).await?;
    redis.cli(&["xadd", &log, "*", "m", &old_entry])?;

    // The first revision the new agent gets is its own branch's, and it gets it: the old
    // agent's versions, ahead of the new one's, hold nothing back.
    gitlab.put_pipeline(
        PROJECT,
        json!({"id": 5, "sha": sha(5), "ref": "other", "status": "success", "source": "push"}),
    );
    let pushed = server.push("other", NULL_SHA, &sha(5)).await?;
    let green = server
        .pipeline("other", &sha(5), 5, "success", "push")
        .await?;
    assert_eq!((pushed, green), (200, 200));
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(5));
    assert_eq!(
        server.agent_status("edge-7").await?.desired.map(|d| d.sha),
        Some(sha(5))
    );
    // Its status comes after the replayed entry's on the same shard: by then the old
    // agent's commit got no second status under the new agent's name.
    eventually("commit 5's status for edge-7", || async {
        Ok((status_of_edge(&sha(5)) == ["pending"]).then_some(()))
    })
    .await?;
    assert_eq!(status_of_edge(&sha(3)), ["pending"]);
    Ok(())
}

/// An agent's stored state that belongs to an agent deleted since (a write of the old
/// agent's that landed where its successor's claim could not stop it, or a record a
/// replica of an earlier version left) would refuse every write for the agent registered
/// under the name. Its revision is not sent to the agent meanwhile; the evaluator gives the
/// record to the agent, empty, and the agent is sent its next revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_left_by_a_deleted_agent_is_given_to_the_agent_registered() -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let server = server(Some(&redis), "replica-a").await?;
    let mut admin = server.admin().await?;
    let mut create = async |agent| -> anyhow::Result<String> {
        let created = admin
            .create_agent(CreateAgentRequest {
                agent: Some(agent),
                ci_token: false,
            })
            .await?;
        Ok(created.into_inner().token)
    };
    let token = create(definition("edge-8")).await?;
    let mut stream = accepted(&server, &token).await?;
    let mut before = NULL_SHA.to_owned();
    for n in 1..=3 {
        server.release(&before, &sha(n), n.into()).await?;
        let sent = next_revision(&mut stream, SOON)
            .await
            .context("its commits")?;
        assert_eq!(sent.sha(), sha(n));
        before = sha(n);
    }
    // Another agent, told to run commit 5 of another branch: the state left in edge-8's
    // record is one like it.
    create(AgentDefinition {
        r#ref: "other".into(),
        ..definition("edge-9")
    })
    .await?;
    let pushed = server.push("other", NULL_SHA, &sha(5)).await?;
    let green = server
        .pipeline("other", &sha(5), 5, "success", "push")
        .await?;
    assert_eq!((pushed, green), (200, 200));
    server.desired_becomes("edge-9", &sha(5)).await?;
    let state = |agent: &str| {
        format!(
            "gl-test:{{gl{}}}:agent:{agent}:state",
            greenlight_server::store::agent_shard(agent)
        )
    };
    let left = redis.cli(&["HGET", &state("edge-9"), "core"])?;
    redis.cli(&[
        "HSET",
        &state("edge-8"),
        "core",
        left.trim_end(),
        "i",
        "12345",
    ])?;

    // A stream opened now is sent edge-8's own revision, not the one left in its record.
    drop(stream);
    let mut stream = accepted(&server, &token).await?;
    let first = next_revision(&mut stream, SOON)
        .await
        .context("on connecting")?;
    assert_eq!(first.sha(), sha(3));
    server.release(&sha(3), &sha(4), 4).await?;
    let next = next_revision(&mut stream, SOON).await.context("commit 4")?;
    assert_eq!(next.sha(), sha(4));
    Ok(())
}
