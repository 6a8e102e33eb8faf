//! Two replicas on a real Redis Cluster of three masters: the gate works across them, and
//! moving the slots that hold the state while webhooks arrive loses nothing.

use anyhow::{Context as _, ensure};
use greenlight::v1::{GetRefRequest, PauseSyncRequest, PinRevisionRequest, ResumeSyncRequest};
use greenlight_e2e::cluster::RedisCluster;
use greenlight_e2e::{AgentDef, PROJECT, SOON, TestServer, config_yaml, next_revision, sha};
use greenlight_server::config::{Config, Overrides, RedisSettings};
use greenlight_server::store::{ChangeLog as _, FactStore as _, RedisStore, RefKey};

use crate::store_suite::{guarded_store, key, push_of};

const NULL_SHA: &str = "0000000000000000000000000000000000000000";

/// A replica named `replica` on the cluster `seeds`, with the agent `prod` on main.
async fn replica(seeds: &[String], replica: &str) -> anyhow::Result<TestServer> {
    let yaml = config_yaml(None, &[AgentDef::new("prod")]);
    let nodes: Vec<String> = seeds.iter().map(|seed| format!("\"{seed}\"")).collect();
    let yaml = format!(
        "{yaml}redis: {{ cluster_nodes: [{}], key_prefix: \"gl-cluster\" }}\n",
        nodes.join(", ")
    );
    let overrides = Overrides {
        replica_id: Some(replica.to_owned()),
        ..Overrides::default()
    };
    TestServer::start_with(Config::from_yaml(&yaml, &overrides)?).await
}

/// Posts the push of commit `n` (after `n - 1`) and its green pipeline to `server`.
async fn release(server: &TestServer, n: u32) -> anyhow::Result<()> {
    let before = if n == 1 {
        NULL_SHA.to_owned()
    } else {
        sha(n - 1)
    };
    let pushed = server.push("main", &before, &sha(n)).await?;
    ensure!(pushed == 200, "push of commit {n} answered {pushed}");
    let piped = server
        .pipeline("main", &sha(n), u64::from(n), "success", "push")
        .await?;
    ensure!(piped == 200, "pipeline of commit {n} answered {piped}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_a_redis_cluster_gate_deploy_and_survive_a_resharding() -> anyhow::Result<()> {
    let cluster = RedisCluster::start(3).await?;
    let seeds = cluster.seeds();
    let a = replica(&seeds, "replica-a").await?;
    let b = replica(&seeds, "replica-b").await?;
    let mut stream = b.stream("prod").await?;

    // The e2e flow: facts through A reach the agent on B.
    release(&a, 1).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(1));
    release(&a, 2).await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(2));

    // Operators act on either replica.
    let mut admin_a = a.admin().await?;
    let mut admin_b = b.admin().await?;
    admin_a
        .pause_sync(PauseSyncRequest {
            name: "prod".into(),
            reason: "freeze".into(),
        })
        .await?;
    let held = b.agent_status("prod").await?;
    ensure!(held.paused.is_some(), "B sees the pause: {held:?}");
    release(&b, 3).await?;
    admin_b
        .pin_revision(PinRevisionRequest {
            name: "prod".into(),
            sha: sha(1),
            reason: "roll back".into(),
        })
        .await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), sha(1));

    // Move every slot of the node holding the ref's keys to another node, while webhooks
    // keep arriving on both replicas: every one answered 200 must be recorded.
    let key = format!("gl-cluster:{{gl{}}}:x", ref_shard());
    let owner = cluster.owner_of(&key)?;
    let target = (owner + 1) % 3;
    let moving = tokio::task::spawn_blocking(move || {
        cluster.move_all_slots(owner, target)?;
        anyhow::Ok(cluster)
    });
    // Paced, and at most as many as a ref keeps heads, so that every one can be checked.
    let mut n = 4;
    while (!moving.is_finished() && n < 200) || n < 8 {
        let server = if n % 2 == 0 { &a } else { &b };
        release(server, n)
            .await
            .with_context(|| format!("commit {n} during the resharding"))?;
        n += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let cluster = moving.await??;
    ensure!(
        cluster.owner_of(&key)? == target,
        "the ref's slot moved to node {target}"
    );
    let newest = n - 1;

    // Nothing was lost: every commit and pipeline is on the ref, and the agent, unpinned
    // and resumed, receives the newest green commit.
    let facts = a
        .admin()
        .await?
        .get_ref(GetRefRequest {
            project: PROJECT.into(),
            r#ref: "main".into(),
        })
        .await?
        .into_inner();
    for m in 1..=newest {
        let commit = facts.commits.iter().find(|c| c.sha == sha(m));
        ensure!(
            commit.is_some_and(|c| c.pipelines.iter().any(|p| p.id == u64::from(m))),
            "commit {m} and its pipeline are recorded: {commit:?}"
        );
    }
    admin_a
        .unpin_revision(greenlight::v1::UnpinRevisionRequest {
            name: "prod".into(),
        })
        .await?;
    admin_b
        .resume_sync(ResumeSyncRequest {
            name: "prod".into(),
        })
        .await?;
    loop {
        let revision = next_revision(&mut stream, SOON).await?;
        if revision.sha() == sha(newest) {
            break;
        }
    }
    Ok(())
}

/// The shard of the test's ref, as the server computes it.
fn ref_shard() -> u16 {
    greenlight_server::store::RefKey {
        project: PROJECT.into(),
        branch: "main".into(),
    }
    .shard()
}

/// Merge request previews live in the cluster too: what one replica records, another reads,
/// and an announcement made on one reaches the other (so the replica holding the agent's
/// stream is asked, wherever the hook arrived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_on_a_redis_cluster_are_shared_by_every_replica() -> anyhow::Result<()> {
    use greenlight::v1::Preview;
    use greenlight_server::config::RedisSettings;
    use greenlight_server::preview::PreviewStore;
    use greenlight_server::preview::store::{Announcement, PreviewRequest, RedisPreviews};

    let cluster = RedisCluster::start(3).await?;
    let settings = RedisSettings {
        url: String::new(),
        cluster_nodes: cluster.seeds(),
        key_prefix: "gl-previews".into(),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let a = RedisPreviews::connect(&settings, shutdown.clone())?;
    let b = RedisPreviews::connect(&settings, shutdown.clone())?;
    let mut heard = b.announcements();

    let request = PreviewRequest {
        id: "prod-7-head".into(),
        agent: "prod".into(),
        project: PROJECT.into(),
        merge_request_iid: 7,
        sha: sha(7),
        at_ms: 1,
    };
    assert!(a.request(&request).await?, "a new head");
    assert!(!b.request(&request).await?, "asked already, on any replica");
    assert_eq!(
        b.requested("prod", PROJECT, 7).await?.as_deref(),
        Some(sha(7).as_str())
    );
    // The follower reads the stream from its start: the announcement arrives even if it
    // was made before the follower connected.
    a.announce(&Announcement::Requested(request.clone()))
        .await?;
    let got = tokio::time::timeout(SOON, async {
        loop {
            if let Ok(Announcement::Requested(got)) = heard.recv().await {
                break got;
            }
        }
    })
    .await
    .context("b never heard a's announcement")?;
    assert_eq!(got, request);

    // Previews of agents whose keys land on different masters.
    let owner = |agent: &str| cluster.owner_of(&format!("gl-previews:preview:{{{agent}}}:latest"));
    let prod_owner = owner("prod")?;
    let mut other = None;
    for name in ["staging", "qa", "edge", "dev", "eu", "us", "canary", "lab"] {
        if owner(name)? != prod_owner {
            other = Some(name);
            break;
        }
    }
    let other = other.context("no agent name whose keys land on another master")?;
    for (agent, n) in [("prod", 1), (other, 2), ("prod", 3)] {
        a.save(&Preview {
            agent: agent.into(),
            sha: sha(n),
            ..Preview::default()
        })
        .await?;
    }
    let latest: Vec<String> = b
        .latest("prod", 5)
        .await?
        .into_iter()
        .map(|p| p.sha)
        .collect();
    assert_eq!(latest, [sha(3), sha(1)], "newest first");
    assert_eq!(b.load(other, None).await?.map(|p| p.sha), Some(sha(2)));
    b.set_note("prod", PROJECT, 7, 42).await?;
    assert_eq!(a.note("prod", PROJECT, 7).await?, Some(42));
    Ok(())
}

/// A fact whose script a stalled cluster answers only after the caller stopped waiting runs
/// once: the client does not send it again when its node is slow to answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_a_stalled_cluster_answers_late_runs_once() -> anyhow::Result<()> {
    let cluster = RedisCluster::start(3).await?;
    let (store, _stop) = store_on(&cluster)?;
    let key = key(PROJECT, "main");
    store.record_fact(&key, &push_of(1), None, None).await?;

    // The clock starts before the nodes are paused one after another, so that the pause
    // of every node outlasts the caller's wait however slow the pausing is.
    let stall = std::time::Duration::from_secs(6);
    let started = std::time::Instant::now();
    cluster.pause_writes(stall)?;
    let answered = tokio::time::timeout(stall, store.record_fact(&key, &push_of(2), None, None))
        .await
        .context("no answer, not even an error, within the stall")?;
    ensure!(
        answered.is_err() && started.elapsed() < stall,
        "the caller stops waiting before the stall ends: {answered:?} after {:?}",
        started.elapsed()
    );
    tokio::time::sleep(stall).await;
    let facts = store.facts(&key).await?;
    assert_eq!(
        (facts.position, facts.pushes.len()),
        (2, 2),
        "the second push recorded once, after the stall"
    );
    Ok(())
}

/// A store of its own on `cluster`; it stops with the guard.
fn store_on(cluster: &RedisCluster) -> anyhow::Result<(RedisStore, tokio_util::sync::DropGuard)> {
    let settings = RedisSettings {
        url: String::new(),
        cluster_nodes: cluster.seeds(),
        key_prefix: "gl-store".into(),
    };
    guarded_store(&settings, Default::default())
}

/// On a cluster the status feed reads the shards one by one: a shard with entries waiting
/// does not keep another's from the publishers until it is drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_shard_does_not_hold_the_other_shards_statuses_back() -> anyhow::Result<()> {
    let cluster = RedisCluster::start(3).await?;
    let (store, _stop) = store_on(&cluster)?;
    let mut keys: Vec<RefKey> = (0..32).map(|n| key(PROJECT, &format!("b{n}"))).collect();
    keys.sort_by_key(RefKey::shard);
    keys.dedup_by_key(|key| key.shard());
    let (busy, quiet) = match keys.as_slice() {
        [first, .., last] => (first, last),
        _ => anyhow::bail!("the refs must span shards"),
    };
    for n in 1..=5 {
        store.record_fact(busy, &push_of(n), None, None).await?;
    }
    store.record_fact(quiet, &push_of(6), None, None).await?;
    let quiet_shard = format!("{}/", quiet.shard());
    let long = std::time::Duration::from_secs(3600);
    let mut taken = Vec::new();
    for _ in 0..2 {
        let entry = store
            .next_for_statuses("replica-a", long)
            .await?
            .context("an entry waits")?;
        store.ack_statuses(&entry.id).await?;
        taken.push(entry.id);
    }
    assert!(
        taken.iter().any(|id| id.starts_with(&quiet_shard)),
        "the quiet shard's entry among the first two: {taken:?}"
    );
    Ok(())
}

/// A stopping publisher's hand-back, on a cluster: each shard's pending entries are asked
/// for and claimed on the node that holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_publisher_hands_back_its_entries_on_a_cluster() -> anyhow::Result<()> {
    let cluster = RedisCluster::start(3).await?;
    let (store, _stop) = store_on(&cluster)?;
    crate::store_suite::a_stopping_publisher_hands_back_what_it_took_for_another_to_take_at_once(
        &store,
    )
    .await
}

/// An agent's state claimed by a new agent of its name, on a cluster: the registry and the
/// agent's state live on different nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_agents_write_or_report_never_lands_in_the_new_one_on_a_cluster()
-> anyhow::Result<()> {
    let cluster = RedisCluster::start(3).await?;
    let (store, _stop) = store_on(&cluster)?;
    crate::store_suite::a_write_for_a_deleted_agent_never_lands_in_the_one_created_under_its_name(
        &store,
    )
    .await?;
    crate::store_suite::a_report_of_a_deleted_agent_never_lands_in_the_one_created_under_its_name(
        &store,
    )
    .await
}

/// A dead replica's status entries handed to a live publisher at once, on a cluster: the
/// replicas' marks and each shard's consumers live on different nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_replicas_status_entries_go_to_a_live_publisher_on_a_cluster() -> anyhow::Result<()>
{
    let cluster = RedisCluster::start(3).await?;
    let (store, _stop) = store_on(&cluster)?;
    let cluster = &cluster;
    let a_minute_ago_in = |key: &'static str| {
        move |replica: &str| {
            crate::store_suite::a_minute_ago_in(key, replica, |args| cluster.cli(args))
        }
    };
    crate::store_suite::a_silent_replicas_status_entries_go_to_a_live_publisher_at_once(
        &store,
        a_minute_ago_in("gl-store:alive"),
        a_minute_ago_in("gl-store:replicas"),
    )
    .await
}
