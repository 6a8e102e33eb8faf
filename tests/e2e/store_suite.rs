//! One contract, three stores: every check runs against the in-memory store, the embedded
//! store on its file, and Redis.
//!
//! `memory::*`, `embedded::*` and `redis::*` are generated from the same list of async checks
//! that take a `&dyn Store`; the tests at the end cover what only one store can show
//! (conditional writes across connections, resuming the log after an outage, the layout; the
//! embedded store's file across a reopening).

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use greenlight_e2e::{Redis, SOON, eventually_within, sha};
use greenlight_server::config::RedisSettings;
use greenlight_server::gate::{
    Before, Decision, Outcome, Pipeline, PipelineStatus, Push, Revision, Sha,
};
use greenlight_server::metrics::LogMetrics;
use greenlight_server::store::{
    AgentRead, AgentState, AgentWrite, AgentWrites, Broadcast, DeployedChange, EmbeddedStore,
    FactRecord, Ingested, LogEntry, Notice, RedisStore, RefKey, RegistryWritten, Reported,
    StatusClaim, StatusKey, StatusOrder, Store, StoreError, SyncError, Written,
};
use greenlight_server::sync_errors::SyncErrors;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// How long a Redis follower may take to notice a restart and resume.
const RESUBSCRIBE: Duration = Duration::from_secs(15);

/// The agent name probes are published under; `next_message` skips them.
const PROBE_AGENT: &str = "__probe__";

macro_rules! suite {
    ($($check:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() -> anyhow::Result<()> {
                    let store = super::EmbeddedStore::new();
                    super::$check(&store).await
                }
            )*
        }

        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() -> anyhow::Result<()> {
                    let dir = tempfile::tempdir()?;
                    let store = super::EmbeddedStore::open(dir.path())?;
                    super::$check(&store).await
                }
            )*
        }

        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() -> anyhow::Result<()> {
                    let fixture = super::RedisFixture::start().await?;
                    super::$check(fixture.store.as_ref()).await
                }
            )*
        }
    };
}

suite!(
    nothing_recorded_reads_as_empty,
    facts_keep_pushes_in_order_and_bump_the_position,
    pipeline_updates_merge_by_the_gate_rule_in_any_order,
    repeated_delivery_is_duplicate_and_writes_nothing,
    delivery_ids_are_per_ref,
    facts_sent_at_once_each_get_a_position_of_their_own,
    facts_reach_followers_through_the_log,
    trimmed_pipelines_are_forgotten,
    agent_writes_bump_the_version_and_reach_followers,
    agent_writes_refuse_stale_versions_and_older_facts,
    agent_history_and_deployed_set_are_capped,
    agents_written_together_each_stand_on_their_own,
    the_status_feed_hands_each_entry_to_one_publisher_until_acknowledged,
    an_entry_a_publisher_never_acknowledged_goes_to_another,
    entries_on_several_shards_are_each_handed_out_before_the_takeover_time,
    a_dead_publishers_entry_behind_many_held_by_live_ones_is_taken_over,
    a_stopping_publisher_hands_back_what_it_took_for_another_to_take_at_once,
    reports_are_newest_first_and_trimmed,
    presence_follows_connect_and_disconnect,
    sync_errors_are_set_and_cleared,
    status_claims_go_to_the_first_claimant,
    shown_statuses_follow_their_order_not_their_arrival,
    a_new_agent_under_an_old_name_starts_without_its_statuses,
    a_write_for_a_deleted_agent_never_lands_in_the_one_created_under_its_name,
    a_report_of_a_deleted_agent_never_lands_in_the_one_created_under_its_name,
    a_record_is_given_to_another_agent_only_from_the_one_found,
    a_registry_write_repeated_is_answered_as_it_was_made,
    a_lease_has_one_holder_until_released_or_expired,
    a_position_is_raised_only_from_below,
    ping_answers,
);

/// A Redis server and a store on it; the store's subscriber stops with the fixture.
struct RedisFixture {
    redis: Redis,
    store: Arc<RedisStore>,
    shutdown: CancellationToken,
}

impl RedisFixture {
    async fn start() -> anyhow::Result<Self> {
        let redis = Redis::start().await?;
        let shutdown = CancellationToken::new();
        let store = Arc::new(redis_store(&redis, &shutdown)?);
        Ok(Self {
            redis,
            store,
            shutdown,
        })
    }
}

impl Drop for RedisFixture {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn redis_store(redis: &Redis, shutdown: &CancellationToken) -> anyhow::Result<RedisStore> {
    let settings = RedisSettings::single(redis.url(), "gl-suite".to_owned());
    Ok(RedisStore::connect(
        &settings,
        shutdown.clone(),
        Default::default(),
    )?)
}

pub(crate) fn key(project: &str, branch: &str) -> RefKey {
    RefKey {
        project: project.to_owned(),
        branch: branch.to_owned(),
    }
}

fn commit(n: u32) -> Sha {
    Sha::parse(&sha(n)).expect("sha() makes valid commit ids")
}

pub(crate) fn push_of(n: u32) -> FactRecord {
    FactRecord::Push(Push {
        before: Before::Created,
        after: Some(commit(n)),
        at_ms: i64::from(n),
    })
}

fn pipeline(id: u64, status: PipelineStatus, as_of_ms: Option<i64>, stages: &[&str]) -> Pipeline {
    Pipeline {
        id,
        status,
        source: "push".into(),
        as_of_ms,
        passed_stages: stages.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn decision(n: u32, reason: &str) -> Decision {
    Decision {
        outcome: Outcome::Deploy,
        sha: Some(commit(n)),
        pipeline_id: Some(u64::from(n)),
        reason: reason.to_owned(),
        at_ms: i64::from(n),
        superseded_by: None,
    }
}

/// `state` with `desired` at commit `n`, decided from facts at `position`.
fn deployed_at(mut state: AgentState, n: u32, position: u64) -> AgentState {
    let revision = Revision {
        sha: commit(n),
        pipeline_id: Some(u64::from(n)),
        reason: format!("pipeline {n} succeeded"),
        decided_at_ms: i64::from(n),
        generation: state.gate.generation + 1,
        force_prune: false,
    };
    state.gate.generation += 1;
    state.gate.position = Some(revision.clone());
    state.gate.desired = Some(revision);
    state.gate.deployed.push_back(commit(n));
    state.gate.decisions.push_back(decision(n, "deploy"));
    state.position = position;
    state
}

/// Writes `next` over `previous`, read at `expected`, with the newest decision of `next`
/// as the one this write made.
async fn write(
    store: &dyn Store,
    agent: &str,
    expected: u64,
    previous: &AgentState,
    next: &AgentState,
) -> anyhow::Result<Written> {
    write_for(store, (agent, 0), expected, previous, next).await
}

/// [`write`] for `incarnation` of the agent.
async fn write_for(
    store: &dyn Store,
    (agent, incarnation): (&str, u64),
    expected: u64,
    previous: &AgentState,
    next: &AgentState,
) -> anyhow::Result<Written> {
    let decisions: Vec<Decision> = next.gate.decisions.back().cloned().into_iter().collect();
    Ok(store
        .write_agent(&AgentWrite {
            incarnation,
            agent,
            expected,
            state: next,
            decisions: &decisions,
            deployed: &DeployedChange::between(&previous.gate.deployed, &next.gate.deployed),
        })
        .await?)
}

fn is_probe(message: &Broadcast) -> bool {
    matches!(message, Broadcast::Report { agent, .. } if agent == PROBE_AGENT)
}

/// Subscribes and waits until the subscription demonstrably receives: a Redis store relays
/// messages only once its background subscriber has connected.
async fn subscribed(store: &dyn Store) -> anyhow::Result<broadcast::Receiver<Notice>> {
    let mut rx = store.subscribe();
    wait_until_receiving(store, &mut rx, SOON).await?;
    Ok(rx)
}

/// Publishes probes until one comes back on `rx`, then drains whatever is queued.
async fn wait_until_receiving(
    store: &dyn Store,
    rx: &mut broadcast::Receiver<Notice>,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    let mut n: u64 = 0;
    loop {
        n += 1;
        // The store may still be reconnecting; a failed probe is simply retried.
        let _ = store.push_report(PROBE_AGENT, 0, &n.to_be_bytes(), 1).await;
        let round = tokio::time::Instant::now() + Duration::from_millis(200);
        loop {
            match tokio::time::timeout_at(round, rx.recv()).await {
                Err(_) => break,
                Ok(Ok(Notice::Message(message))) if is_probe(&message) => {
                    while rx.try_recv().is_ok() {}
                    return Ok(());
                }
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) => bail!("notices closed"),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the subscription received nothing within {within:?}");
        }
    }
}

/// The next message on `rx` that is not a probe or a resync.
/// Takes messages until each of `agents` was heard written.
///
/// Shards are followed independently, so a write may be heard after anything published later
/// on another shard, the subscription's probe included: a test that must hear nothing more
/// first waits for what it wrote before.
/// Reads the log until every one of `agents` was heard written; returns every agent heard
/// meanwhile, others included.
async fn until_heard(
    rx: &mut broadcast::Receiver<Notice>,
    agents: &[&str],
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let mut left: std::collections::BTreeSet<&str> = agents.iter().copied().collect();
    let mut heard = std::collections::BTreeSet::new();
    while !left.is_empty() {
        if let Broadcast::AgentsChanged(changes) = next_message(rx).await? {
            for (agent, _) in changes.iter() {
                left.remove(agent.agent.as_str());
                heard.insert(agent.agent.clone());
            }
        }
    }
    Ok(heard)
}

async fn next_message(rx: &mut broadcast::Receiver<Notice>) -> anyhow::Result<Broadcast> {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let notice = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .context("no message within SOON")?
            .context("notices broke")?;
        if let Notice::Message(message) = notice
            && !is_probe(&message)
        {
            return Ok(message);
        }
    }
}

async fn nothing_recorded_reads_as_empty(store: &dyn Store) -> anyhow::Result<()> {
    let facts = store.facts(&key("group/none", "main")).await?;
    assert_eq!(facts, Default::default());
    let agent = store.agent("nobody").await?;
    assert_eq!(agent.version, 0);
    assert_eq!(agent.value, AgentState::default());
    assert_eq!(store.agents(&["a".into(), "b".into()]).await?.len(), 2);
    Ok(())
}

async fn facts_keep_pushes_in_order_and_bump_the_position(store: &dyn Store) -> anyhow::Result<()> {
    let k = key("group/app", "main");
    for n in [1, 3, 2] {
        let ingested = store.record_fact(&k, &push_of(n), None, None).await?;
        ensure!(
            matches!(ingested, Ingested::Recorded { .. }),
            "{ingested:?}"
        );
    }
    let facts = store.facts(&k).await?;
    assert_eq!(facts.position, 3);
    let order: Vec<Sha> = facts
        .pushes
        .iter()
        .filter_map(|p| p.after.clone())
        .collect();
    assert_eq!(order, [commit(1), commit(3), commit(2)], "as recorded");
    let heads: Vec<Sha> = facts
        .ref_state()
        .current_heads()
        .map(|h| h.sha.clone())
        .collect();
    assert_eq!(heads, [commit(2), commit(3), commit(1)], "newest first");
    assert_eq!(
        store.facts(&key("group/app", "other")).await?.position,
        0,
        "facts are per ref"
    );
    Ok(())
}

/// Every order of the same updates leaves what the gate's own merge rule leaves: the store
/// (a Lua script on Redis) and the gate agree.
async fn pipeline_updates_merge_by_the_gate_rule_in_any_order(
    store: &dyn Store,
) -> anyhow::Result<()> {
    use PipelineStatus as S;
    let updates = [
        pipeline(7, S::Running, Some(10), &["build"]),
        pipeline(7, S::Running, Some(20), &[]),
        pipeline(7, S::Failed, Some(30), &[]),
        pipeline(7, S::Running, Some(40), &["build", "test"]),
        pipeline(7, S::Success, Some(50), &[]),
        pipeline(7, S::Running, Some(45), &[]),
        pipeline(7, S::Success, None, &[]),
    ];
    let mut rng = fastrand::Rng::with_seed(7);
    for round in 0..40u32 {
        let k = key("group/app", &format!("merge-{round}"));
        let mut order: Vec<Pipeline> = updates.to_vec();
        rng.shuffle(&mut order);
        let mut expected: Option<Pipeline> = None;
        for update in &order {
            let merged = Pipeline::merged(expected.as_ref(), update.clone());
            let ingested = store
                .record_fact(
                    &k,
                    &FactRecord::Pipeline {
                        sha: commit(1),
                        pipeline: update.clone(),
                    },
                    None,
                    None,
                )
                .await?;
            assert_eq!(
                matches!(ingested, Ingested::Recorded { .. }),
                merged.is_some(),
                "round {round}: {update:?} after {expected:?}"
            );
            if merged.is_some() {
                expected = merged;
            }
        }
        let stored = store.pipeline(&k, &commit(1), 7).await?;
        assert_eq!(stored, expected, "round {round}: order {order:?}");
    }
    Ok(())
}

async fn repeated_delivery_is_duplicate_and_writes_nothing(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let k = key("group/app", "main");
    assert_eq!(
        store
            .record_fact(&k, &push_of(1), Some("d-1"), None)
            .await?,
        Ingested::Recorded { position: 1 }
    );
    assert_eq!(
        store
            .record_fact(&k, &push_of(2), Some("d-1"), None)
            .await?,
        Ingested::Duplicate
    );
    let facts = store.facts(&k).await?;
    assert_eq!(facts.position, 1);
    assert_eq!(facts.pushes.len(), 1, "the redelivery wrote nothing");
    // A stale update is remembered as delivered too.
    let stale = FactRecord::Pipeline {
        sha: commit(1),
        pipeline: pipeline(3, PipelineStatus::Success, Some(5), &[]),
    };
    store.record_fact(&k, &stale, Some("d-2"), None).await?;
    let late = FactRecord::Pipeline {
        sha: commit(1),
        pipeline: pipeline(3, PipelineStatus::Running, Some(1), &[]),
    };
    assert_eq!(
        store.record_fact(&k, &late, Some("d-3"), None).await?,
        Ingested::Unchanged
    );
    assert_eq!(
        store.record_fact(&k, &late, Some("d-3"), None).await?,
        Ingested::Duplicate
    );
    Ok(())
}

async fn delivery_ids_are_per_ref(store: &dyn Store) -> anyhow::Result<()> {
    let main = key("group/app", "main");
    let other = key("group/other", "main");
    store
        .record_fact(&main, &push_of(1), Some("d"), None)
        .await?;
    assert!(matches!(
        store
            .record_fact(&other, &push_of(1), Some("d"), None)
            .await?,
        Ingested::Recorded { .. }
    ));
    Ok(())
}

/// Facts of several refs sent at once, every delivery twice: each is recorded once, at a
/// position of its own, and each redelivery is refused.
async fn facts_sent_at_once_each_get_a_position_of_their_own(
    store: &dyn Store,
) -> anyhow::Result<()> {
    const PER_REF: u32 = 30;
    // Two refs that share a shard (and so a change log), and two others.
    let mut refs = vec![key("group/a", "main")];
    let shared = (0..)
        .map(|n| key(&format!("group/b{n}"), "main"))
        .find(|k| k.shard() == refs[0].shard())
        .context("some ref shares the first one's shard")?;
    refs.extend([shared, key("group/c", "main"), key("group/d", "release")]);
    let mut sends = Vec::new();
    for (r, k) in refs.iter().enumerate() {
        for n in 0..PER_REF {
            let fact = push_of(1000 * u32::try_from(r)? + n);
            for _ in 0..2 {
                sends.push((k, fact.clone(), format!("d-{n}")));
            }
        }
    }
    let answers = futures_util::future::join_all(
        sends
            .iter()
            .map(|(k, fact, delivery)| store.record_fact(k, fact, Some(delivery), None)),
    )
    .await;
    for k in &refs {
        let mut positions = Vec::new();
        let mut duplicates = 0;
        for ((to, _, _), answer) in sends.iter().zip(&answers) {
            if to != &k {
                continue;
            }
            match answer {
                Ok(Ingested::Recorded { position }) => positions.push(*position),
                Ok(Ingested::Duplicate) => duplicates += 1,
                other => bail!("a fact about {k} answered {other:?}"),
            }
        }
        positions.sort_unstable();
        assert_eq!(
            positions,
            (1..=u64::from(PER_REF)).collect::<Vec<_>>(),
            "each fact of {k} has a position of its own"
        );
        assert_eq!(duplicates, PER_REF, "each redelivery to {k} is refused");
        let facts = store.facts(k).await?;
        assert_eq!(facts.position, u64::from(PER_REF));
        assert_eq!(facts.pushes.len(), usize::try_from(PER_REF)?);
    }
    Ok(())
}

async fn facts_reach_followers_through_the_log(store: &dyn Store) -> anyhow::Result<()> {
    let mut rx = subscribed(store).await?;
    let k = key("group/app", "main");
    store
        .record_fact(&k, &push_of(1), Some("x"), Some("00-trace-01"))
        .await?;
    match next_message(&mut rx).await? {
        Broadcast::Fact {
            key,
            position,
            rejected,
            traceparent,
            at_ms,
        } => {
            assert_eq!((key, position, rejected), (k.clone(), 1, None));
            assert_eq!(traceparent.as_deref(), Some("00-trace-01"));
            ensure!(at_ms > 0, "stamped with when it was recorded");
        }
        other => bail!("expected the fact, got {other:?}"),
    }
    // Refused and unchanged facts are not news.
    store.record_fact(&k, &push_of(9), Some("x"), None).await?;
    store.record_fact(&k, &push_of(2), None, None).await?;
    ensure!(
        matches!(
            next_message(&mut rx).await?,
            Broadcast::Fact { position: 2, .. }
        ),
        "the next fact"
    );
    Ok(())
}

async fn trimmed_pipelines_are_forgotten(store: &dyn Store) -> anyhow::Result<()> {
    let k = key("group/app", "main");
    for id in 1..=3 {
        let fact = FactRecord::Pipeline {
            sha: commit(1),
            pipeline: pipeline(id, PipelineStatus::Success, None, &["test"]),
        };
        store.record_fact(&k, &fact, None, None).await?;
    }
    store
        .forget_pipelines(&k, &[(commit(1), 1), (commit(1), 2)])
        .await?;
    let facts = store.facts(&k).await?;
    let ids: Vec<u64> = facts.pipelines.iter().map(|(_, p)| p.id).collect();
    assert_eq!(ids, [3]);
    assert_eq!(facts.pipelines[0].1.passed_stages, ["test"]);
    Ok(())
}

async fn agent_writes_bump_the_version_and_reach_followers(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let mut rx = subscribed(store).await?;
    let empty = AgentState::default();
    let first = deployed_at(empty.clone(), 1, 4);
    assert_eq!(
        write(store, "prod", 0, &empty, &first).await?,
        Written::Saved { version: 1 }
    );
    let read = store.agent("prod").await?;
    assert_eq!(read.version, 1);
    assert_eq!(read.value, first);
    match next_message(&mut rx).await? {
        Broadcast::AgentsChanged(changes) => {
            let written: Vec<_> = changes.iter().collect();
            let [(agent, change)] = written.as_slice() else {
                bail!("expected one agent's change, got {changes:?}");
            };
            assert_eq!((agent.agent.as_str(), agent.version), ("prod", 1));
            assert_eq!(change.desired, first.gate.desired);
            assert_eq!(change.decisions, [decision(1, "deploy")]);
        }
        other => bail!("expected the agent's change, got {other:?}"),
    }
    let second = deployed_at(first.clone(), 2, 5);
    assert_eq!(
        write(store, "prod", 1, &first, &second).await?,
        Written::Saved { version: 2 }
    );
    let both = store.agents(&["prod".into(), "staging".into()]).await?;
    assert_eq!(both[0].value, second);
    assert_eq!(both[1].version, 0, "states are per agent");
    Ok(())
}

async fn agent_writes_refuse_stale_versions_and_older_facts(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let empty = AgentState::default();
    let newer = deployed_at(empty.clone(), 2, 10);
    let mut rx = subscribed(store).await?;
    write(store, "prod", 0, &empty, &newer).await?;
    until_heard(&mut rx, &["prod"]).await?;
    let rival = deployed_at(empty.clone(), 1, 12);
    assert_eq!(
        write(store, "prod", 0, &empty, &rival).await?,
        Written::Conflict,
        "written from a version that is gone"
    );
    let older = deployed_at(newer.clone(), 1, 9);
    assert_eq!(
        write(store, "prod", 1, &newer, &older).await?,
        Written::Stale,
        "decided from facts older than the stored state's"
    );
    assert_eq!(store.agent("prod").await?.value, newer, "nothing written");
    assert_eq!(
        store.push_report(PROBE_AGENT, 0, b"end", 1).await?,
        Reported::Kept
    );
    let message = next_message(&mut rx).await;
    ensure!(message.is_err(), "refused writes reach nobody: {message:?}");
    Ok(())
}

async fn agent_history_and_deployed_set_are_capped(store: &dyn Store) -> anyhow::Result<()> {
    let mut state = AgentState::default();
    let mut version = 0;
    for n in 1..=300u32 {
        let next = deployed_at(state.clone(), n, u64::from(n));
        let mut capped = next.clone();
        while capped.gate.decisions.len() > greenlight_server::gate::DECISION_HISTORY {
            capped.gate.decisions.pop_front();
        }
        while capped.gate.deployed.len() > greenlight_server::gate::DEPLOYED_HISTORY {
            capped.gate.deployed.pop_front();
        }
        match write(store, "prod", version, &state, &capped).await? {
            Written::Saved { version: v } => version = v,
            other => bail!("write {n}: {other:?}"),
        }
        state = capped;
    }
    let read = store.agent("prod").await?.value;
    assert_eq!(
        read.gate.decisions.len(),
        greenlight_server::gate::DECISION_HISTORY
    );
    assert_eq!(
        read.gate.deployed.len(),
        greenlight_server::gate::DEPLOYED_HISTORY
    );
    // Compared piecewise: a failure of the whole would print 300 commits.
    assert_eq!(
        read.gate.decisions.front(),
        state.gate.decisions.front(),
        "oldest kept"
    );
    assert_eq!(
        read.gate.deployed.front(),
        state.gate.deployed.front(),
        "oldest kept"
    );
    ensure!(read == state, "the capped state reads back as written");
    // A rewrite of the deployed set (commits gone from the branch) replaces it.
    let mut rewritten = state.clone();
    rewritten.gate.deployed.retain(|sha| *sha != commit(299));
    write(store, "prod", version, &state, &rewritten).await?;
    ensure!(
        store.agent("prod").await?.value.gate.deployed == rewritten.gate.deployed,
        "the deployed set was replaced"
    );
    Ok(())
}

/// A fan-out's writes in one call: each agent's write is conditional on its own version and
/// facts, agents decided alike share one change, and followers hear every agent written, in
/// far fewer log entries than agents.
async fn agents_written_together_each_stand_on_their_own(store: &dyn Store) -> anyhow::Result<()> {
    let empty = AgentState::default();
    let mut rx = subscribed(store).await?;
    // "moved" was written since it was read; "ahead" was decided from newer facts.
    write(store, "moved", 0, &empty, &deployed_at(empty.clone(), 1, 5)).await?;
    let ahead = deployed_at(empty.clone(), 1, 20);
    write(store, "ahead", 0, &empty, &ahead).await?;
    until_heard(&mut rx, &["moved", "ahead"]).await?;

    let fleet_state = deployed_at(empty.clone(), 3, 10);
    let edge_state = deployed_at(empty.clone(), 4, 10);
    let fleet_decisions = [decision(3, "deploy")];
    let edge_decisions = [decision(4, "deploy")];
    let fleet_deployed = DeployedChange::between(&empty.gate.deployed, &fleet_state.gate.deployed);
    let edge_deployed = DeployedChange::between(&empty.gate.deployed, &edge_state.gate.deployed);
    let fleet: Vec<String> = (0..300).map(|n| format!("fleet-{n}")).collect();
    let edges: Vec<String> = (0..5).map(|n| format!("edge-{n}")).collect();
    let mut writes = AgentWrites::default();
    for agent in &fleet {
        writes.push(AgentWrite {
            incarnation: 0,
            agent,
            expected: 0,
            state: &fleet_state,
            decisions: &fleet_decisions,
            deployed: &fleet_deployed,
        });
    }
    for (agent, expected) in [("moved", 0), ("ahead", 1)] {
        writes.push(AgentWrite {
            incarnation: 0,
            agent,
            expected,
            state: &fleet_state,
            decisions: &fleet_decisions,
            deployed: &fleet_deployed,
        });
    }
    for agent in &edges {
        writes.push(AgentWrite {
            incarnation: 0,
            agent,
            expected: 0,
            state: &edge_state,
            decisions: &edge_decisions,
            deployed: &edge_deployed,
        });
    }
    assert_eq!(
        writes.changes().len(),
        2,
        "agents decided alike share a change"
    );

    let mut told = vec![None; writes.agents().len()];
    let written = store
        .write_agents_telling(&writes, &mut |step| {
            for &(at, outcome) in step {
                assert!(told[at].is_none(), "write {at} told twice");
                told[at] = Some(outcome);
            }
            ControlFlow::Continue(())
        })
        .await?;
    let mut expected = vec![Written::Saved { version: 1 }; fleet.len()];
    expected.extend([Written::Conflict, Written::Stale]);
    expected.extend(vec![Written::Saved { version: 1 }; edges.len()]);
    assert_eq!(
        written, expected,
        "each write judged on its own, answered in order"
    );
    let told: Vec<Written> = told.into_iter().flatten().collect();
    assert_eq!(told, written, "every write told once, as answered");

    let fleet_read = store.agents(&fleet).await?;
    ensure!(
        fleet_read
            .iter()
            .all(|read| read.version == 1 && read.value == fleet_state),
        "every agent of the fleet holds the shared state"
    );
    assert_eq!(store.agent("edge-4").await?.value, edge_state);
    assert_eq!(
        store.agent("ahead").await?.value,
        ahead,
        "not moved backwards"
    );
    assert_eq!(store.agent("moved").await?.version, 1, "not overwritten");

    // Followers hear each agent written once, with its own change.
    let mut heard = std::collections::BTreeMap::new();
    let mut entries = 0;
    while heard.len() < fleet.len() + edges.len() {
        let Broadcast::AgentsChanged(changes) = next_message(&mut rx).await? else {
            continue;
        };
        entries += 1;
        for (agent, change) in changes.iter() {
            let desired = change.desired.as_ref().map(|revision| revision.sha.clone());
            ensure!(
                heard
                    .insert(agent.agent.clone(), (agent.version, desired))
                    .is_none(),
                "{} heard twice",
                agent.agent
            );
        }
    }
    ensure!(
        !heard.contains_key("moved") && !heard.contains_key("ahead"),
        "refused writes reach nobody"
    );
    ensure!(
        fleet
            .iter()
            .all(|agent| heard.get(agent) == Some(&(1, Some(commit(3))))),
        "the fleet hears commit 3 at version 1"
    );
    ensure!(
        edges
            .iter()
            .all(|agent| heard.get(agent) == Some(&(1, Some(commit(4))))),
        "the edges hear commit 4 at version 1"
    );
    // One entry per step of agents sharing a shard, not one per agent.
    ensure!(
        entries <= 2 * usize::from(greenlight_server::store::SHARDS),
        "{entries} log entries for {} agents",
        heard.len()
    );
    Ok(())
}

/// The ids of the next `n` entries `consumer` takes, none acknowledged.
async fn take_entries(
    store: &dyn Store,
    consumer: &str,
    n: usize,
    reclaim_after: Duration,
) -> anyhow::Result<HashSet<String>> {
    let mut taken = HashSet::new();
    for _ in 0..n {
        let entry = next_status_entry(store, consumer, reclaim_after)
            .await?
            .with_context(|| format!("entry {} of {n} for {consumer}", taken.len() + 1))?;
        taken.insert(entry.id);
    }
    Ok(taken)
}

/// Takes entries from the status feed until one that is not a probe, or none is left.
async fn next_status_entry(
    store: &dyn Store,
    consumer: &str,
    reclaim_after: Duration,
) -> anyhow::Result<Option<LogEntry>> {
    loop {
        match store.next_for_statuses(consumer, reclaim_after).await? {
            Some(entry) if is_probe(&entry.message) => store.ack_statuses(&entry.id).await?,
            other => return Ok(other),
        }
    }
}

async fn the_status_feed_hands_each_entry_to_one_publisher_until_acknowledged(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let long = Duration::from_secs(3600);
    let k = key("group/app", "main");
    store.record_fact(&k, &push_of(1), None, None).await?;
    store.record_fact(&k, &push_of(2), None, None).await?;
    let first = next_status_entry(store, "replica-a", long)
        .await?
        .context("the first entry")?;
    ensure!(matches!(first.message, Broadcast::Fact { position: 1, .. }));
    // Taken by replica-a and not acknowledged yet: replica-b gets the next one, not this.
    let second = next_status_entry(store, "replica-b", long)
        .await?
        .context("the second entry")?;
    ensure!(matches!(
        second.message,
        Broadcast::Fact { position: 2, .. }
    ));
    assert!(
        next_status_entry(store, "replica-c", long).await?.is_none(),
        "both are taken"
    );
    store.ack_statuses(&first.id).await?;
    store.ack_statuses(&second.id).await?;
    assert!(
        next_status_entry(store, "replica-a", Duration::ZERO)
            .await?
            .is_none()
    );
    Ok(())
}

/// Entries waiting on several shards at once (one read finds them all) each reach the
/// publisher that asks, none of them only after the takeover time.
async fn entries_on_several_shards_are_each_handed_out_before_the_takeover_time(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let long = Duration::from_secs(3600);
    let keys: Vec<RefKey> = (0..8).map(|n| key("group/app", &format!("b{n}"))).collect();
    let shards: HashSet<u16> = keys.iter().map(RefKey::shard).collect();
    ensure!(shards.len() > 1, "the refs must span shards: {shards:?}");
    for (n, k) in (1..).zip(&keys) {
        store.record_fact(k, &push_of(n), None, None).await?;
    }
    let mut handed = HashSet::new();
    while let Some(entry) = next_status_entry(store, "replica-a", long).await? {
        ensure!(matches!(entry.message, Broadcast::Fact { .. }));
        ensure!(
            handed.insert(entry.id.clone()),
            "{} handed out twice",
            entry.id
        );
    }
    assert_eq!(
        handed.len(),
        keys.len(),
        "every entry, before the takeover time"
    );
    Ok(())
}

/// An entry a dead publisher took is taken over after the takeover time even when more
/// entries than one look at the pending ones covers, held by live publishers, come first.
async fn a_dead_publishers_entry_behind_many_held_by_live_ones_is_taken_over(
    store: &dyn Store,
) -> anyhow::Result<()> {
    // Long enough for twelve takes in a row to stay well within it on a loaded machine.
    let takeover = Duration::from_secs(3);
    let k = key("group/app", "main");
    for n in 1..=12 {
        store.record_fact(&k, &push_of(n), None, None).await?;
    }
    let taken = take_entries(store, "replica-dead", 12, takeover).await?;
    tokio::time::sleep(takeover).await;
    // A live replica takes over eleven of them and is still posting them.
    let live = take_entries(store, "replica-live", 11, takeover).await?;
    ensure!(
        live.len() == 11 && live.is_subset(&taken),
        "{live:?} of {taken:?}"
    );
    let last = next_status_entry(store, "replica-other", takeover)
        .await?
        .context("the dead publisher's last entry, at once")?;
    assert!(
        taken.contains(&last.id) && !live.contains(&last.id),
        "{}",
        last.id
    );
    Ok(())
}

/// A publisher whose replica stops hands back the entry it was posting and those its read
/// took along: another takes them within seconds, not after the takeover time (an hour).
pub(crate) async fn a_stopping_publisher_hands_back_what_it_took_for_another_to_take_at_once(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let long = Duration::from_secs(3600);
    let keys: Vec<RefKey> = (0..4).map(|n| key("group/app", &format!("s{n}"))).collect();
    for (n, k) in (1..).zip(&keys) {
        store.record_fact(k, &push_of(n), None, None).await?;
    }
    let in_hand = next_status_entry(store, "replica-stopping", long)
        .await?
        .context("the entry it was posting")?;
    store.release_statuses("replica-stopping", long).await?;
    let mut others = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while others.len() < keys.len() && tokio::time::Instant::now() < deadline {
        if let Some(entry) = next_status_entry(store, "replica-staying", long).await? {
            ensure!(matches!(entry.message, Broadcast::Fact { .. }));
            store.ack_statuses(&entry.id).await?;
            ensure!(others.insert(entry.id.clone()), "{} twice", entry.id);
        }
    }
    assert!(
        others.contains(&in_hand.id),
        "the entry it was posting, taken over: {others:?}"
    );
    assert_eq!(others.len(), keys.len(), "every entry: {others:?}");
    Ok(())
}

async fn an_entry_a_publisher_never_acknowledged_goes_to_another(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let takeover = Duration::from_millis(300);
    let k = key("group/app", "main");
    store.record_fact(&k, &push_of(1), None, None).await?;
    let taken = next_status_entry(store, "replica-dead", takeover)
        .await?
        .context("the entry")?;
    ensure!(matches!(taken.message, Broadcast::Fact { position: 1, .. }));
    // Asked at once, within the takeover time: the entry stays with its publisher.
    assert!(
        next_status_entry(store, "replica-alive", takeover)
            .await?
            .is_none(),
        "not taken over while its publisher may still be posting it"
    );
    tokio::time::sleep(takeover).await;
    let again = next_status_entry(store, "replica-alive", takeover)
        .await?
        .context("taken over after the takeover time")?;
    assert_eq!(again.message, taken.message);
    assert_eq!(again.id, taken.id);
    store.ack_statuses(&again.id).await?;
    tokio::time::sleep(takeover).await;
    assert!(
        next_status_entry(store, "replica-other", takeover)
            .await?
            .is_none(),
        "acknowledged, it is never handed out again"
    );
    Ok(())
}

/// A publisher whose replica stopped marking itself alive is dead: what it took goes to
/// another publisher at once, long before the takeover time (an hour), while what a live
/// one holds stays with it, and so does what one of a version that marked itself only in
/// its presence refresh holds. `silence` makes a replica's last mark a minute old, as if it
/// had died then; `refreshed_long_ago` gives a replica only a presence refresh a minute
/// old, as that version left it between refreshes.
pub(crate) async fn a_silent_replicas_status_entries_go_to_a_live_publisher_at_once(
    store: &dyn Store,
    silence: impl Fn(&str) -> anyhow::Result<()>,
    refreshed_long_ago: impl Fn(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let long = Duration::from_secs(3600);
    let k = key("group/app", "main");
    for n in 1..=3 {
        store.record_fact(&k, &push_of(n), None, None).await?;
    }
    for replica in ["replica-dying", "replica-busy", "replica-taking"] {
        store.mark_alive(replica).await?;
    }
    refreshed_long_ago("replica-earlier-version")?;
    let dying = next_status_entry(store, "replica-dying", long)
        .await?
        .context("an entry for the replica about to die")?;
    let busy = next_status_entry(store, "replica-busy", long)
        .await?
        .context("an entry for the replica that stays")?;
    let earlier = next_status_entry(store, "replica-earlier-version", long)
        .await?
        .context("an entry for the replica of an earlier version")?;
    ensure!(dying.id != busy.id && busy.id != earlier.id && dying.id != earlier.id);
    silence("replica-dying")?;
    // Within the few seconds between two looks for such entries (this store serves all
    // three publishers, so the busy one's look may just have been made).
    let taken = eventually_within(
        "the dead replica's entry, handed over",
        Duration::from_secs(20),
        || next_status_entry(store, "replica-taking", long),
    )
    .await?;
    assert_eq!(taken.id, dying.id);
    assert!(
        next_status_entry(store, "replica-taking", long)
            .await?
            .is_none(),
        "what a live replica, or one of an earlier version, holds stays with it"
    );
    Ok(())
}

/// Sets `replica`'s score in the sorted set `key` to a minute ago, with `cli`.
pub(crate) fn a_minute_ago_in(
    key: &str,
    replica: &str,
    cli: impl Fn(&[&str]) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let then = now
        .saturating_sub(Duration::from_secs(60))
        .as_millis()
        .to_string();
    cli(&["ZADD", key, &then, replica])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_silent_replicas_status_entries_go_to_a_live_publisher_at_once()
-> anyhow::Result<()> {
    let fixture = RedisFixture::start().await?;
    let redis = &fixture.redis;
    a_silent_replicas_status_entries_go_to_a_live_publisher_at_once(
        fixture.store.as_ref(),
        |replica| a_minute_ago_in("gl-suite:alive", replica, |args| redis.cli(args)),
        |replica| a_minute_ago_in("gl-suite:replicas", replica, |args| redis.cli(args)),
    )
    .await
}

/// A status publisher that holds nothing and whose replica shows no sign of life leaves the
/// group once silent long enough (every start of a replica names a new one), shard by
/// shard; where it holds an entry it stays, and so does the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_silent_publishers_leave_the_group_only_where_they_hold_nothing() -> anyhow::Result<()>
{
    let redis = Redis::start().await?;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let store =
        redis_store(&redis, &shutdown)?.forget_silent_consumers_after(Duration::from_millis(500));
    let store: &dyn Store = &store;
    let long = Duration::from_secs(3600);
    let k = key("group/app", "main");
    for n in 1..=2 {
        store.record_fact(&k, &push_of(n), None, None).await?;
    }
    let done = next_status_entry(store, "replica-gone", long)
        .await?
        .context("an entry for the replica that finishes it")?;
    store.ack_statuses(&done.id).await?;
    next_status_entry(store, "replica-holding", long)
        .await?
        .context("an entry for the replica that holds it")?;
    let logs: Vec<String> = (0..16)
        .map(|shard| format!("gl-suite:{{gl{shard}}}:log"))
        .collect();
    let consumers = |log: &str| -> anyhow::Result<Vec<(String, u64)>> {
        let listed = redis.cli(&["XINFO", "CONSUMERS", log, "statuses"])?;
        let lines: Vec<&str> = listed.lines().collect();
        let mut found = Vec::new();
        for (at, line) in lines.iter().enumerate() {
            if *line == "name"
                && let (Some(name), Some(&"pending"), Some(pending)) =
                    (lines.get(at + 1), lines.get(at + 2), lines.get(at + 3))
            {
                found.push((name.to_string(), pending.parse()?));
            }
        }
        Ok(found)
    };
    let holding_log = logs
        .iter()
        .find(|log| {
            consumers(log).is_ok_and(|found| found.contains(&("replica-holding".into(), 1)))
        })
        .context("the shard where replica-holding holds its entry")?
        .clone();
    eventually_within(
        "replica-gone out of every shard's group",
        Duration::from_secs(20),
        || async {
            // The look another publisher makes every few seconds.
            ensure!(
                next_status_entry(store, "replica-taking", long)
                    .await?
                    .is_none()
            );
            for log in &logs {
                let found = consumers(log)?;
                let left = |replica: &str| found.iter().any(|(name, _)| name == replica);
                if left("replica-gone") || (*log != holding_log && left("replica-holding")) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
    .await?;
    assert!(
        consumers(&holding_log)?.contains(&("replica-holding".into(), 1)),
        "where it holds an entry, it stays with it"
    );
    Ok(())
}

async fn reports_are_newest_first_and_trimmed(store: &dyn Store) -> anyhow::Result<()> {
    assert!(
        store.reports("prod", 10).await?.is_empty(),
        "no reports yet"
    );
    for n in 1..=5u8 {
        assert_eq!(store.push_report("prod", 0, &[n], 3).await?, Reported::Kept);
    }
    assert_eq!(
        store.push_report("staging", 0, b"other", 3).await?,
        Reported::Kept
    );
    assert_eq!(
        store.reports("prod", 10).await?,
        vec![vec![5], vec![4], vec![3]],
        "newest first, at most `keep`"
    );
    assert_eq!(
        store.reports("prod", 2).await?,
        vec![vec![5], vec![4]],
        "at most `limit`"
    );
    assert!(store.reports("prod", 0).await?.is_empty());
    assert_eq!(
        store.reports("staging", 10).await?,
        vec![b"other".to_vec()],
        "reports are per agent"
    );
    assert!(store.reports("nobody", 10).await?.is_empty());
    assert_eq!(store.push_report("prod", 0, &[6], 1).await?, Reported::Kept);
    assert_eq!(
        store.reports("prod", 10).await?,
        vec![vec![6]],
        "a smaller `keep` trims older ones"
    );
    Ok(())
}

async fn presence_follows_connect_and_disconnect(store: &dyn Store) -> anyhow::Result<()> {
    let mut rx = subscribed(store).await?;
    assert!(store.all_presence().await?.is_empty());
    store.set_presence("replica-a", "prod", true).await?;
    store.set_presence("replica-a", "staging", true).await?;
    let mut all = store.all_presence().await?;
    all.sort();
    assert_eq!(
        all,
        [
            ("prod".to_owned(), "replica-a".to_owned()),
            ("staging".to_owned(), "replica-a".to_owned())
        ]
    );
    assert_eq!(
        next_message(&mut rx).await?,
        Broadcast::Connection {
            agent: "prod".into(),
            connected: true,
            replica: "replica-a".into()
        },
        "every replica hears of it"
    );
    store.refresh_presence("replica-a").await?;
    store.set_presence("replica-a", "prod", false).await?;
    store.set_presence("replica-a", "prod", false).await?;
    assert_eq!(
        store.all_presence().await?,
        [("staging".to_owned(), "replica-a".to_owned())]
    );
    Ok(())
}

async fn sync_errors_are_set_and_cleared(store: &dyn Store) -> anyhow::Result<()> {
    assert_eq!(store.sync_error("prod").await?, None);
    let fetch = SyncError::Fetch {
        message: "repository unreachable".into(),
    };
    store.set_sync_errors(&[("prod", Some(&fetch))]).await?;
    assert_eq!(store.sync_error("prod").await?, Some(fetch.clone()));
    assert_eq!(store.sync_error("staging").await?, None, "per agent");
    let manifests = SyncError::Manifests {
        message: "manifest invalid".into(),
    };
    store.set_sync_errors(&[("prod", Some(&manifests))]).await?;
    assert_eq!(
        store.sync_error("prod").await?,
        Some(manifests),
        "the newest wins"
    );
    store.set_sync_errors(&[("prod", None)]).await?;
    assert_eq!(store.sync_error("prod").await?, None);
    store.set_sync_errors(&[("prod", None)]).await?;
    // Many agents at once, over every shard: set and cleared in one call each.
    let fleet: Vec<String> = (0..100).map(|n| format!("fleet-{n}")).collect();
    let all_failed: Vec<(&str, Option<&SyncError>)> = fleet
        .iter()
        .map(|agent| (agent.as_str(), Some(&fetch)))
        .collect();
    store.set_sync_errors(&all_failed).await?;
    for agent in &fleet {
        assert_eq!(
            store.sync_error(agent).await?,
            Some(fetch.clone()),
            "{agent}"
        );
    }
    let half_cleared: Vec<(&str, Option<&SyncError>)> = fleet
        .iter()
        .step_by(2)
        .map(|agent| (agent.as_str(), None))
        .collect();
    store.set_sync_errors(&half_cleared).await?;
    for (n, agent) in fleet.iter().enumerate() {
        let expected = (n % 2 == 1).then(|| fetch.clone());
        assert_eq!(store.sync_error(agent).await?, expected, "{agent}");
    }
    // One call that sets some and clears the others, shards mixed.
    let swapped: Vec<(&str, Option<&SyncError>)> = fleet
        .iter()
        .enumerate()
        .map(|(n, agent)| (agent.as_str(), (n % 2 == 0).then_some(&fetch)))
        .collect();
    store.set_sync_errors(&swapped).await?;
    for (n, agent) in fleet.iter().enumerate() {
        let expected = (n % 2 == 0).then(|| fetch.clone());
        assert_eq!(store.sync_error(agent).await?, expected, "{agent}");
    }
    Ok(())
}

async fn a_lease_has_one_holder_until_released_or_expired(store: &dyn Store) -> anyhow::Result<()> {
    let ttl = Duration::from_millis(400);
    assert!(store.hold_lease(3, "replica-a", ttl).await?);
    assert!(!store.hold_lease(3, "replica-b", ttl).await?, "held by a");
    assert!(store.hold_lease(4, "replica-b", ttl).await?, "per shard");
    assert!(store.hold_lease(3, "replica-a", ttl).await?, "a renews");
    store.release_lease(3, "replica-b").await?;
    assert!(
        !store.hold_lease(3, "replica-b", ttl).await?,
        "only a may release"
    );
    store.release_lease(3, "replica-a").await?;
    assert!(store.hold_lease(3, "replica-b", ttl).await?, "released");
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert!(
        store.hold_lease(3, "replica-a", ttl).await?,
        "b stopped renewing: its lease expired"
    );
    Ok(())
}

async fn status_claims_go_to_the_first_claimant(store: &dyn Store) -> anyhow::Result<()> {
    let (commit, other_commit) = (sha(1), sha(2));
    let lease = Duration::from_millis(400);
    let status = |agent, sha, state, generation| StatusKey {
        agent,
        sha,
        state,
        order: StatusOrder::decided(generation),
    };
    let success = status("prod", commit.as_str(), "success", 1);
    assert_eq!(
        store.begin_status(&success, "replica-a", lease).await?,
        StatusClaim::Mine,
        "the first claim wins"
    );
    for same_commit in [success, status("prod", commit.as_str(), "failed", 2)] {
        assert_eq!(
            store.begin_status(&same_commit, "replica-b", lease).await?,
            StatusClaim::InFlight,
            "a second publisher waits for the first: {same_commit:?}"
        );
    }
    assert_eq!(
        store.begin_status(&success, "replica-a", lease).await?,
        StatusClaim::Retaken,
        "its holder may go on, but not as if it had never tried"
    );
    for other in [
        status("prod", other_commit.as_str(), "success", 1),
        status("staging", commit.as_str(), "success", 1),
    ] {
        assert_eq!(
            store.begin_status(&other, "replica-b", lease).await?,
            StatusClaim::Mine,
            "claims are per agent and commit: {other:?}"
        );
    }
    // A failed post releases the claim at once, and the next claimant is told to look at
    // GitLab before posting; a posted one is remembered.
    store.finish_status(&success, "replica-a", false).await?;
    assert_eq!(
        store.begin_status(&success, "replica-b", lease).await?,
        StatusClaim::Retaken
    );
    store.finish_status(&success, "replica-b", true).await?;
    assert_eq!(
        store.begin_status(&success, "replica-a", lease).await?,
        StatusClaim::Posted
    );
    // A publisher that died holding a claim holds it only until its lease ends, and may
    // have posted before it died.
    let dead = status("prod", commit.as_str(), "running", 3);
    store.begin_status(&dead, "replica-dead", lease).await?;
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    assert_eq!(
        store.begin_status(&dead, "replica-a", lease).await?,
        StatusClaim::Retaken
    );
    store.finish_status(&dead, "replica-a", true).await?;
    assert_eq!(
        store.begin_status(&dead, "replica-b", lease).await?,
        StatusClaim::Posted
    );
    // A publisher whose lease ended while another took the claim over leaves the taken
    // mark to the other, whose post may yet fail.
    let slow = status("prod", other_commit.as_str(), "failed", 2);
    store.begin_status(&slow, "replica-slow", lease).await?;
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    assert_eq!(
        store.begin_status(&slow, "replica-a", lease).await?,
        StatusClaim::Retaken
    );
    store.finish_status(&slow, "replica-slow", true).await?;
    store.finish_status(&slow, "replica-a", false).await?;
    assert_eq!(
        store
            .begin_status(
                &status("prod", other_commit.as_str(), "success", 3),
                "replica-b",
                lease
            )
            .await?,
        StatusClaim::Retaken
    );
    Ok(())
}

/// Posts `status` as a publisher would, when its claim lets it: what the claim was.
async fn post_in_order(store: &dyn Store, status: &StatusKey<'_>) -> anyhow::Result<StatusClaim> {
    let claim = store
        .begin_status(status, "replica-a", Duration::from_secs(30))
        .await?;
    if matches!(claim, StatusClaim::Mine | StatusClaim::Retaken) {
        store.finish_status(status, "replica-a", true).await?;
    }
    Ok(claim)
}

async fn shown_statuses_follow_their_order_not_their_arrival(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let commit = sha(1);
    let reported = |generation, at_ms, state| StatusKey {
        agent: "prod",
        sha: commit.as_str(),
        state,
        order: StatusOrder::reported(generation, at_ms, state),
    };
    let decided = |generation, state| StatusKey {
        agent: "prod",
        sha: commit.as_str(),
        state,
        order: StatusOrder::decided(generation),
    };
    use StatusClaim::{Mine, Posted, Superseded};
    let steps = [
        // Read after the reports on its revision, a decision would hide them.
        (reported(1, 1_000, "running"), Mine, "the first status"),
        (
            reported(1, 1_000, "success"),
            Mine,
            "healthy in the same ms",
        ),
        (
            decided(1, "pending"),
            Superseded,
            "decided before the reports",
        ),
        (reported(1, 2_000, "failed"), Mine, "health flipped"),
        (reported(1, 3_000, "success"), Mine, "and flipped back"),
        (reported(1, 2_500, "failed"), Superseded, "read late"),
        (reported(1, 4_000, "success"), Posted, "stated again"),
        (
            reported(1, 3_500, "failed"),
            Superseded,
            "older than a restatement",
        ),
        (decided(2, "pending"), Mine, "deployed again"),
        (reported(2, 5_000, "success"), Mine, "healthy again"),
        (decided(2, "pending"), Superseded, "its decision read again"),
    ];
    for (status, expected, why) in steps {
        assert_eq!(post_in_order(store, &status).await?, expected, "{why}");
    }
    // A post whose outcome was never recorded may have reached GitLab: the state shown is
    // no longer known, and the next status in it is claimed to be looked up.
    let lease = Duration::from_secs(30);
    let unrecorded = reported(2, 6_000, "failed");
    assert_eq!(
        store.begin_status(&unrecorded, "replica-b", lease).await?,
        Mine
    );
    store.finish_status(&unrecorded, "replica-b", false).await?;
    assert_eq!(
        post_in_order(store, &reported(2, 7_000, "success")).await?,
        StatusClaim::Retaken,
        "success was shown, but the failed post may have landed"
    );
    assert_eq!(
        post_in_order(store, &reported(2, 8_000, "success")).await?,
        Posted,
        "known again once posted"
    );
    Ok(())
}

async fn a_new_agent_under_an_old_name_starts_without_its_statuses(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let commit = sha(1);
    let status = |generation| StatusKey {
        agent: "edge",
        sha: commit.as_str(),
        state: "success",
        order: StatusOrder::reported(generation, 1_000, "success"),
    };
    let record = registry_record("edge", 1)?;
    let RegistryWritten::Saved { seq } = store.change_registered("edge", Some(&record), 0).await?
    else {
        bail!("a new agent is saved");
    };
    assert_eq!(post_in_order(store, &status(7)).await?, StatusClaim::Mine);
    assert_eq!(
        post_in_order(store, &status(1)).await?,
        StatusClaim::Superseded
    );
    store.change_registered("edge", None, seq).await?;
    store.change_registered("edge", Some(&record), 0).await?;
    assert_eq!(
        post_in_order(store, &status(1)).await?,
        StatusClaim::Mine,
        "its generations start again, and so do its statuses"
    );
    Ok(())
}

/// A report the deleted agent sent while it was deleted and another was created under its
/// name (it was authenticated before) is dropped, not shown as the new agent's.
pub(crate) async fn a_report_of_a_deleted_agent_never_lands_in_the_one_created_under_its_name(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let RegistryWritten::Saved { seq } = store
        .change_registered("core", Some(&runtime_record("core", 1, 11)?), 0)
        .await?
    else {
        bail!("the first agent is saved");
    };
    assert_eq!(
        store.push_report("core", 11, b"old", 5).await?,
        Reported::Kept
    );
    store.change_registered("core", None, seq).await?;
    let RegistryWritten::Saved { .. } = store
        .change_registered("core", Some(&runtime_record("core", 1, 22)?), 0)
        .await?
    else {
        bail!("the new agent is saved");
    };
    assert_eq!(
        store.push_report("core", 11, b"late", 5).await?,
        Reported::Replaced
    );
    assert!(store.reports("core", 5).await?.is_empty(), "nothing kept");
    assert_eq!(
        store.push_report("core", 22, b"new", 5).await?,
        Reported::Kept
    );
    // A replica of a version that did not record incarnations.
    assert_eq!(
        store.push_report("core", 0, b"unmarked", 5).await?,
        Reported::Kept
    );
    assert_eq!(
        store.reports("core", 5).await?,
        [b"unmarked".to_vec(), b"new".to_vec()]
    );
    Ok(())
}

/// An evaluation still running when its agent was deleted writes what it decided for that
/// agent: whether that lands before the new agent of the same name is created or after its
/// first write (over the very version it read), the new agent never sees it.
pub(crate) async fn a_write_for_a_deleted_agent_never_lands_in_the_one_created_under_its_name(
    store: &dyn Store,
) -> anyhow::Result<()> {
    use greenlight_server::store::RegistryWritten;
    let (old, new) = (("edge", 11), ("edge", 22));
    let RegistryWritten::Saved { seq } = store
        .change_registered("edge", Some(&runtime_record("edge", 1, old.1)?), 0)
        .await?
    else {
        bail!("the first agent is saved");
    };
    let empty = AgentState::default();
    let old_state = deployed_at(empty.clone(), 1, 1);
    let first = store.agent("edge").await?.version;
    assert_eq!(
        write_for(store, old, first, &empty, &old_state).await?,
        Written::Saved { version: first + 1 }
    );
    store.change_registered("edge", None, seq).await?;
    // The deleted agent's evaluation, deciding from its first read, writes before the new
    // agent exists and so finds nothing stored.
    let late = deployed_at(empty.clone(), 2, 2);
    assert_eq!(
        write_for(store, old, 0, &empty, &late).await?,
        Written::Saved { version: 1 }
    );
    let RegistryWritten::Saved { .. } = store
        .change_registered("edge", Some(&runtime_record("edge", 1, new.1)?), 0)
        .await?
    else {
        bail!("the new agent is saved");
    };
    let born = store.agent("edge").await?;
    assert_eq!(
        (&born.value, born.incarnation),
        (&empty, new.1),
        "the new agent starts with nothing decided"
    );
    // Its version goes on past the record it replaced (the deleted agent's write in the
    // gap), so that no state read of the deleted agent has it.
    let at = born.version;
    assert_eq!(at, 2);
    for expected in [0, 1, at] {
        assert_eq!(
            write_for(store, old, expected, &empty, &late).await?,
            Written::Replaced,
            "the deleted agent's write over version {expected}"
        );
    }
    let new_state = deployed_at(empty.clone(), 3, 1);
    assert_eq!(
        write_for(store, new, at, &empty, &new_state).await?,
        Written::Saved { version: at + 1 }
    );
    assert_eq!(
        write_for(store, old, at + 1, &old_state, &late).await?,
        Written::Replaced,
        "over the new agent's own version"
    );
    let read = store.agent("edge").await?;
    assert_eq!((read.version, &read.value), (at + 1, &new_state));
    assert_eq!(
        write_for(
            store,
            new,
            at + 1,
            &new_state,
            &deployed_at(new_state.clone(), 4, 3)
        )
        .await?,
        Written::Saved { version: at + 2 },
        "the new agent goes on"
    );
    Ok(())
}

/// A record left holding another agent's state is given to the agent registered, empty
/// and at a later version, only from the incarnation the giver found in it: one that was
/// given meanwhile, or written by yet another agent, is left alone.
async fn a_record_is_given_to_another_agent_only_from_the_one_found(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let empty = AgentState::default();
    let left = deployed_at(empty.clone(), 1, 1);
    write_for(store, ("edge", 11), 0, &empty, &left).await?;
    assert!(!store.give_agent("edge", 22, 33).await?, "not 22's to give");
    let kept = store.agent("edge").await?;
    assert_eq!((kept.incarnation, &kept.value), (11, &left));

    assert!(store.give_agent("edge", 11, 33).await?);
    let given = store.agent("edge").await?;
    assert_eq!((given.incarnation, &given.value), (33, &empty));
    assert!(given.version > kept.version, "{given:?} after {kept:?}");
    assert!(store.give_agent("edge", 11, 33).await?, "33's already");
    assert_eq!(store.agent("edge").await?, given, "and left as it is");
    Ok(())
}

async fn a_position_is_raised_only_from_below(store: &dyn Store) -> anyhow::Result<()> {
    let k = key("group/app", "main");
    assert_eq!(
        store.raise_position(&k, 5).await?,
        5,
        "a ref never recorded"
    );
    store.record_fact(&k, &push_of(1), None, None).await?;
    assert_eq!(
        store.facts(&k).await?.position,
        6,
        "facts count on from there"
    );
    assert_eq!(store.raise_position(&k, 3).await?, 6, "never lowered");
    assert_eq!(store.raise_position(&k, 9).await?, 9);
    let facts = store.facts(&k).await?;
    assert_eq!(
        (facts.position, facts.pushes.len()),
        (9, 1),
        "the facts kept"
    );
    Ok(())
}

async fn ping_answers(store: &dyn Store) -> anyhow::Result<()> {
    store.ping().await?;
    ensure!(!store.describe().is_empty());
    Ok(())
}

/// Writers on separate connections update one agent concurrently, each retrying on a
/// conflict: the conditional write loses no update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_concurrent_writers_lose_no_update() -> anyhow::Result<()> {
    const TASKS: u32 = 8;
    const ROUNDS: u32 = 20;
    let fixture = RedisFixture::start().await?;
    // Two store instances, as two replicas would have.
    let second: Arc<dyn Store> = Arc::new(redis_store(&fixture.redis, &fixture.shutdown)?);
    let first: Arc<dyn Store> = fixture.store.clone();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let store = if task % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        tasks.spawn(async move {
            let mut conflicts = 0u32;
            for round in 0..ROUNDS {
                loop {
                    let read = store.agent("prod").await?;
                    let mut next = read.value.clone();
                    next.gate.generation += 1;
                    next.gate
                        .decisions
                        .push_back(decision(task * ROUNDS + round, "count"));
                    while next.gate.decisions.len() > 50 {
                        next.gate.decisions.pop_front();
                    }
                    match write(store.as_ref(), "prod", read.version, &read.value, &next).await? {
                        Written::Saved { version } => {
                            ensure!(version == read.version + 1);
                            break;
                        }
                        Written::Conflict => conflicts += 1,
                        Written::Stale => bail!("no write used older facts"),
                        Written::Withheld => bail!("a single write was withheld"),
                        Written::Replaced => bail!("an agent never replaced was replaced"),
                    }
                }
            }
            anyhow::Ok(conflicts)
        });
    }
    let mut conflicts = 0;
    while let Some(result) = tasks.join_next().await {
        conflicts += result??;
    }
    let read = first.agent("prod").await?;
    let total = u64::from(TASKS * ROUNDS);
    assert_eq!(read.version, total, "one version per successful write");
    assert_eq!(
        read.value.gate.generation, total,
        "every increment survived ({conflicts} conflicts retried)"
    );
    Ok(())
}

/// A step of a fan-out that Redis refuses midway (here: one agent's decision list replaced by
/// a string) writes none of its agents, so that no agent is changed without the log entry
/// that tells the replicas; every other step runs whole, what it wrote is heard, and the
/// retry once the key is mended writes every agent exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_redis_refuses_midway_writes_none_of_its_agents() -> anyhow::Result<()> {
    let fixture = RedisFixture::start().await?;
    let store: &dyn Store = fixture.store.as_ref();
    let empty = AgentState::default();
    let before = deployed_at(empty.clone(), 1, 5);
    write(store, "victim", 0, &empty, &before).await?;
    let list = only_key(&fixture.redis, "*:agent:victim:decisions")?;
    // SET replaces a key of any type.
    fixture.redis.cli(&["SET", &list, "not a list"])?;
    let mut rx = subscribed(store).await?;

    let after = deployed_at(before.clone(), 2, 10);
    let decisions = [decision(2, "deploy")];
    let deployed = DeployedChange::between(&before.gate.deployed, &after.gate.deployed);
    let fleet: Vec<String> = (0..200).map(|n| format!("fleet-{n}")).collect();
    let victim_shard = greenlight_server::store::agent_shard("victim");
    let (neighbours, others): (Vec<&String>, Vec<&String>) = fleet
        .iter()
        .partition(|agent| greenlight_server::store::agent_shard(agent) == victim_shard);
    ensure!(
        !neighbours.is_empty() && !others.is_empty(),
        "the fleet spans the victim's shard and others"
    );
    let batch = |fleet_version: u64| {
        let mut writes = AgentWrites::default();
        for agent in &fleet {
            writes.push(AgentWrite {
                incarnation: 0,
                agent,
                expected: fleet_version,
                state: &after,
                decisions: &decisions,
                deployed: &deployed,
            });
        }
        writes.push(AgentWrite {
            incarnation: 0,
            agent: "victim",
            expected: 1,
            state: &after,
            decisions: &decisions,
            deployed: &deployed,
        });
        writes
    };
    let writes = batch(0);
    let mut told = Vec::new();
    let refused = store
        .write_agents_telling(&writes, &mut |step| {
            for &(at, outcome) in step {
                told.push((writes.agents()[at].agent.to_owned(), outcome));
            }
            ControlFlow::Continue(())
        })
        .await;
    let Err(error) = refused else {
        bail!("a step with a broken key was accepted: {refused:?}");
    };
    ensure!(
        error.to_string().contains("WRONGTYPE"),
        "the error names the cause: {error}"
    );

    let versions = |agents: &[&String]| {
        let agents: Vec<String> = agents.iter().map(|agent| (*agent).clone()).collect();
        async move {
            let read = store.agents(&agents).await?;
            anyhow::Ok(read.iter().map(|read| read.version).collect::<Vec<_>>())
        }
    };
    ensure!(
        versions(&neighbours).await?.iter().all(|&v| v == 0),
        "no agent of the refused step was written"
    );
    // The other steps stand on their own: every one runs, whatever became of the refused
    // one, so one broken agent holds back no other shard.
    let other_versions = versions(&others).await?;
    ensure!(
        other_versions.iter().all(|&v| v == 1),
        "every other agent written once: {other_versions:?}"
    );
    let written_before: std::collections::BTreeSet<&String> = others
        .iter()
        .zip(&other_versions)
        .filter(|(_, version)| **version == 1)
        .map(|(agent, _)| *agent)
        .collect();
    // What the other steps wrote was told as it was written, despite the error at the end.
    let told_saved: std::collections::BTreeSet<&String> = told
        .iter()
        .map(|(agent, outcome)| {
            ensure!(
                *outcome == Written::Saved { version: 1 },
                "{agent} told {outcome:?}"
            );
            Ok(agent)
        })
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        told.len() == told_saved.len() && told_saved == written_before,
        "told exactly the agents the other steps wrote: {} told, {} written",
        told.len(),
        written_before.len()
    );
    // Every agent written is heard, and nothing else.
    let written_names: Vec<&str> = written_before.iter().map(|agent| agent.as_str()).collect();
    let heard = until_heard(&mut rx, &written_names).await?;
    ensure!(
        heard.iter().all(|agent| written_before.contains(agent)),
        "only written agents are heard: {heard:?}"
    );
    assert_eq!(
        store.push_report(PROBE_AGENT, 0, b"end", 1).await?,
        Reported::Kept
    );
    let late = next_message(&mut rx).await;
    ensure!(late.is_err(), "only written agents are heard: {late:?}");

    fixture.redis.cli(&["DEL", &list])?;
    assert_eq!(
        store.agent("victim").await?.version,
        1,
        "the victim not written"
    );
    let written = store.write_agents(&batch(0)).await?;
    for (agent, written) in fleet
        .iter()
        .chain(["victim".to_owned()].iter())
        .zip(written)
    {
        let fine = if written_before.contains(agent) {
            written == Written::Conflict
        } else if agent == "victim" {
            written == Written::Saved { version: 2 }
        } else {
            written == Written::Saved { version: 1 }
        };
        ensure!(fine, "{agent}: {written:?}");
    }
    let fleet_refs: Vec<&String> = fleet.iter().collect();
    ensure!(
        versions(&fleet_refs).await?.iter().all(|&v| v == 1),
        "after the retry every agent of the fleet is written once"
    );
    Ok(())
}

/// A fact Redis refuses midway (here: the ref's push list replaced by a string) leaves
/// nothing behind, not even its delivery marked as seen, so the same delivery sent again
/// once the key is mended is recorded rather than refused as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fact_redis_refuses_midway_leaves_its_delivery_unseen() -> anyhow::Result<()> {
    let fixture = RedisFixture::start().await?;
    let store: &dyn Store = fixture.store.as_ref();
    let k = key("group/app", "main");
    store
        .record_fact(&k, &push_of(1), Some("first"), None)
        .await?;
    let pushes = only_key(&fixture.redis, "*:pushes")?;
    fixture.redis.cli(&["SET", &pushes, "not a list"])?;

    let refused = store
        .record_fact(&k, &push_of(2), Some("second"), None)
        .await;
    ensure!(
        matches!(&refused, Err(error) if error.to_string().contains("WRONGTYPE")),
        "a fact on a broken key fails with Redis's reason: {refused:?}"
    );
    fixture.redis.cli(&["DEL", &pushes])?;
    assert_eq!(
        store.facts(&k).await?.position,
        1,
        "the refused fact moved nothing"
    );
    assert_eq!(
        store
            .record_fact(&k, &push_of(2), Some("second"), None)
            .await?,
        Ingested::Recorded { position: 2 },
        "the same delivery again is recorded"
    );
    Ok(())
}

/// A registry change whose log entry Redis refuses changes nothing: a registry changed
/// without its entry would go unseen by the other replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_change_redis_refuses_midway_changes_nothing() -> anyhow::Result<()> {
    use greenlight_server::store::{RegistryStore as _, RegistryWritten};
    let fixture = RedisFixture::start().await?;
    // The registry's entries go to shard 0's log.
    let log = "gl-suite:{gl0}:log";
    fixture.redis.cli(&["SET", log, "not a stream"])?;
    let refused = fixture.store.change_registered("ghost", None, 0).await;
    ensure!(
        matches!(&refused, Err(error) if error.to_string().contains("WRONGTYPE")),
        "a change on a broken log fails with Redis's reason: {refused:?}"
    );
    fixture.redis.cli(&["DEL", log])?;
    assert_eq!(
        fixture.store.registry().await?.seq,
        0,
        "nothing was changed"
    );
    assert_eq!(
        fixture.store.change_registered("ghost", None, 0).await?,
        RegistryWritten::Saved { seq: 1 }
    );
    Ok(())
}

/// A runtime agent's record, as `CreateAgent` makes one; `token` sets its token's hash.
fn registry_record(
    name: &str,
    token: u8,
) -> anyhow::Result<greenlight_server::store::RegistryRecord> {
    runtime_record(name, token, 0)
}

/// [`registry_record`] of an agent of `incarnation`.
fn runtime_record(
    name: &str,
    token: u8,
    incarnation: u64,
) -> anyhow::Result<greenlight_server::store::RegistryRecord> {
    use greenlight_server::config::{Config, Overrides};
    use greenlight_server::store::RegisteredAgent;
    let yaml = format!(
        "agents:\n  - name: {name}\n    token_sha256: {}\n    project: group/app\n    ref: main\n",
        hex_of(token)
    );
    let mut spec = Config::from_yaml(&yaml, &Overrides::default())?
        .agents
        .pop()
        .context("one agent")?;
    spec.incarnation = incarnation;
    Ok((&RegisteredAgent {
        spec,
        previous_token: None,
        previous_ci_token: None,
        created_ms: 1,
        updated_ms: 1,
    })
        .into())
}

/// 64 hex digits of `byte`.
fn hex_of(byte: u8) -> String {
    format!("{byte:02x}").repeat(32)
}

/// A registry write made twice (its answer lost, the write sent again) is answered as it
/// was made, not as a conflict with itself; another write over the same version still is one.
async fn a_registry_write_repeated_is_answered_as_it_was_made(
    store: &dyn Store,
) -> anyhow::Result<()> {
    use greenlight_server::store::RegistryWritten;
    let created = registry_record("edge", 1)?;
    let RegistryWritten::Saved { seq } = store.change_registered("edge", Some(&created), 0).await?
    else {
        bail!("created");
    };
    assert_eq!(
        store.change_registered("edge", Some(&created), 0).await?,
        RegistryWritten::Saved { seq },
        "the same write, again"
    );
    assert_eq!(
        store
            .change_registered("edge", Some(&registry_record("edge", 2)?), 0)
            .await?,
        RegistryWritten::Conflict,
        "another agent of the same name"
    );
    assert_eq!(store.registry().await?.seq, seq, "written once");
    Ok(())
}

/// A deletion drops its agent's state after the registry's change, in another slot: a
/// creation under the name that came in between has claimed the state for the new agent,
/// and it stays. Without one, the deleted agent's state goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_deletion_drops_only_its_own_agents_state() -> anyhow::Result<()> {
    let fixture = RedisFixture::start().await?;
    let store: &dyn Store = fixture.store.as_ref();
    let state_key = |agent: &str| {
        format!(
            "gl-suite:{{gl{}}}:agent:{agent}:state",
            greenlight_server::store::agent_shard(agent)
        )
    };
    for (agent, claimed_meanwhile) in [("edge", true), ("core", false)] {
        let RegistryWritten::Saved { seq } = store
            .change_registered(agent, Some(&runtime_record(agent, 1, 11)?), 0)
            .await?
        else {
            bail!("{agent} is saved");
        };
        let empty = AgentState::default();
        let first = store.agent(agent).await?.version;
        let decided = deployed_at(empty.clone(), 1, 1);
        write_for(store, (agent, 11), first, &empty, &decided).await?;
        if claimed_meanwhile {
            fixture.redis.cli(&["HSET", &state_key(agent), "i", "22"])?;
        }
        store.change_registered(agent, None, seq).await?;
        let left = store.agent(agent).await?;
        if claimed_meanwhile {
            assert_eq!(left.incarnation, 22, "{agent}: the new agent's claim stays");
        } else {
            assert_eq!(left, AgentRead::default(), "{agent}: its state goes");
        }
    }
    Ok(())
}

/// A thousand new agents all deployed to commit 1 together: more than one store step.
struct FanOut {
    fleet: Vec<String>,
    next: AgentState,
    decisions: [Decision; 1],
    deployed: DeployedChange,
}

impl FanOut {
    fn new() -> Self {
        let empty = AgentState::default();
        let next = deployed_at(empty.clone(), 1, 1);
        let deployed = DeployedChange::between(&empty.gate.deployed, &next.gate.deployed);
        Self {
            fleet: (0..1000).map(|n| format!("fleet-{n}")).collect(),
            next,
            decisions: [decision(1, "deploy")],
            deployed,
        }
    }

    fn writes(&self) -> AgentWrites<'_> {
        let mut writes = AgentWrites::default();
        for agent in &self.fleet {
            writes.push(AgentWrite {
                incarnation: 0,
                agent,
                expected: 0,
                state: &self.next,
                decisions: &self.decisions,
                deployed: &self.deployed,
            });
        }
        writes
    }
}

/// A fan-out larger than one step tells the first agents written while later steps are
/// still to be written, so that the evaluator can send to them meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_tells_its_first_agents_before_its_last_step_is_written() -> anyhow::Result<()> {
    let fixture = RedisFixture::start().await?;
    let store: &dyn Store = fixture.store.as_ref();
    let fan_out = FanOut::new();
    let (fleet, writes) = (&fan_out.fleet, fan_out.writes());
    let stored = || -> anyhow::Result<usize> {
        let keys = fixture
            .redis
            .cli(&["--scan", "--pattern", "*:agent:*:state"])?;
        Ok(keys.lines().filter(|key| !key.is_empty()).count())
    };
    let mut stored_at_first_tell = None;
    let mut told = 0;
    let written = store
        .write_agents_telling(&writes, &mut |step| {
            assert!(
                step.iter()
                    .all(|(_, o)| *o == Written::Saved { version: 1 }),
                "every new agent is saved: {step:?}"
            );
            told += step.len();
            if stored_at_first_tell.is_none() {
                stored_at_first_tell = Some(stored());
            }
            ControlFlow::Continue(())
        })
        .await?;
    ensure!(
        written.iter().all(|w| *w == Written::Saved { version: 1 }),
        "every agent written"
    );
    assert_eq!(told, fleet.len(), "every agent told");
    assert_eq!(stored()?, fleet.len());
    let first = stored_at_first_tell.context("nothing told")??;
    ensure!(
        first > 0 && first < fleet.len(),
        "{first} of {} agents were stored when the first was told",
        fleet.len()
    );
    Ok(())
}

/// A writer that stops a fan-out after its first step (a newer fact came meanwhile) has the
/// steps not yet started withheld: those agents are neither written nor heard of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_stopped_after_its_first_step_withholds_the_rest() -> anyhow::Result<()> {
    let fixture = RedisFixture::start().await?;
    let store: &dyn Store = fixture.store.as_ref();
    let mut rx = subscribed(store).await?;
    let fan_out = FanOut::new();
    let (fleet, writes) = (&fan_out.fleet, fan_out.writes());
    let mut told = std::collections::BTreeSet::new();
    let written = store
        .write_agents_telling(&writes, &mut |step| {
            told.extend(step.iter().map(|(at, _)| *at));
            ControlFlow::Break(())
        })
        .await?;
    let saved: Vec<&String> = fleet
        .iter()
        .zip(&written)
        .filter(|(_, w)| **w == Written::Saved { version: 1 })
        .map(|(agent, _)| agent)
        .collect();
    let withheld = written.iter().filter(|w| **w == Written::Withheld).count();
    ensure!(
        !saved.is_empty() && withheld > 0 && saved.len() + withheld == fleet.len(),
        "{} saved and {withheld} withheld of {}",
        saved.len(),
        fleet.len()
    );
    // The steps under way when it stopped were finished and told, like the first.
    let saved_at: std::collections::BTreeSet<usize> = written
        .iter()
        .enumerate()
        .filter(|(_, w)| **w != Written::Withheld)
        .map(|(at, _)| at)
        .collect();
    assert_eq!(told, saved_at, "every write made was told, and only those");
    let versions: Vec<u64> = store
        .agents(fleet)
        .await?
        .iter()
        .map(|read| read.version)
        .collect();
    for ((agent, outcome), version) in fleet.iter().zip(&written).zip(versions) {
        let expected = if *outcome == Written::Withheld { 0 } else { 1 };
        ensure!(
            version == expected,
            "{agent} ({outcome:?}) at version {version}"
        );
    }
    let saved_names: Vec<&str> = saved.iter().map(|agent| agent.as_str()).collect();
    let heard = until_heard(&mut rx, &saved_names).await?;
    ensure!(
        heard
            .iter()
            .all(|agent| saved_names.contains(&agent.as_str())),
        "only written agents are heard: {heard:?}"
    );
    assert_eq!(
        store.push_report(PROBE_AGENT, 0, b"end", 1).await?,
        Reported::Kept
    );
    let late = next_message(&mut rx).await;
    ensure!(late.is_err(), "only written agents are heard: {late:?}");
    Ok(())
}

/// The one key of `redis` that matches `pattern`.
fn only_key(redis: &Redis, pattern: &str) -> anyhow::Result<String> {
    let found = redis.cli(&["--scan", "--pattern", pattern])?;
    let keys: Vec<&str> = found.lines().filter(|key| !key.is_empty()).collect();
    match keys.as_slice() {
        [key] => Ok((*key).to_owned()),
        other => bail!("{} keys match {pattern}: {other:?}", other.len()),
    }
}

/// A Redis restart (the append-only file keeps the data) costs a follower nothing but the
/// wait: it resumes the change log from the last entry it read, with no re-read of
/// everything, and what is appended after the restart reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_written_while_redis_is_down_fail_with_its_error_and_go_through_after()
-> anyhow::Result<()> {
    let mut fixture = RedisFixture::start().await?;
    let store: Arc<dyn Store> = fixture.store.clone();
    let empty = AgentState::default();
    let next = deployed_at(empty.clone(), 1, 3);
    let decisions = [decision(1, "deploy")];
    let deployed = DeployedChange::between(&empty.gate.deployed, &next.gate.deployed);
    let fleet: Vec<String> = (0..40).map(|n| format!("fleet-{n}")).collect();
    let writes = AgentWrites::of(fleet.iter().map(|agent| AgentWrite {
        incarnation: 0,
        agent,
        expected: 0,
        state: &next,
        decisions: &decisions,
        deployed: &deployed,
    }));

    fixture.redis.kill();
    match store.write_agents(&writes).await {
        Err(StoreError::Redis(_)) => {}
        other => bail!("expected Redis's error, got {other:?}"),
    }
    fixture.redis.restart().await?;
    // Nothing was written: the same writes, from the same versions, go through.
    let written = retry(|| store.write_agents(&writes)).await?;
    ensure!(
        written.iter().all(|w| *w == Written::Saved { version: 1 }),
        "{written:?}"
    );
    assert_eq!(store.agent("fleet-39").await?.value, next);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_errors_noted_while_redis_is_down_are_stored_once_it_is_back() -> anyhow::Result<()> {
    let mut fixture = RedisFixture::start().await?;
    let store: Arc<dyn Store> = fixture.store.clone();
    let errors = SyncErrors::new(store.clone());
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(errors.clone().run(shutdown.clone()));
    let failed = SyncError::Manifests {
        message: "manifest invalid".into(),
    };

    fixture.redis.kill();
    errors.note("prod", Some(failed.clone()));
    errors.note("staging", Some(failed.clone()));
    errors.note("staging", None);
    // The store cannot take them: they are kept, and this replica answers with them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(errors.get("prod").await?, Some(failed.clone()));
    assert_eq!(errors.get("staging").await?, None);

    fixture.redis.restart().await?;
    let deadline = tokio::time::Instant::now() + RESUBSCRIBE;
    while retry(|| store.sync_error("prod")).await? != Some(failed.clone()) {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the kept note never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.sync_error("staging").await?, None);
    shutdown.cancel();
    running.await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_resumes_the_log_without_resync_and_keeps_data() -> anyhow::Result<()> {
    let mut fixture = RedisFixture::start().await?;
    let store: Arc<dyn Store> = fixture.store.clone();
    let k = key("group/app", "main");
    assert_eq!(
        store
            .record_fact(&k, &push_of(1), Some("before"), None)
            .await?,
        Ingested::Recorded { position: 1 }
    );
    let mut rx = subscribed(store.as_ref()).await?;

    fixture.redis.restart().await?;
    let fact = push_of(2);
    let recorded = retry(|| store.record_fact(&k, &fact, Some("after"), None)).await?;
    assert_eq!(recorded, Ingested::Recorded { position: 2 });
    let deadline = tokio::time::Instant::now() + RESUBSCRIBE;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv())
            .await
            .context("the entry appended after the restart never arrived")?
        {
            Ok(Notice::Resync) => bail!("a restart that lost nothing must not cost a re-read"),
            Ok(Notice::Message(Broadcast::Fact { position: 2, .. })) => break,
            Ok(Notice::Message(_)) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => bail!("the follower lagged"),
            Err(broadcast::error::RecvError::Closed) => bail!("notices closed"),
        }
    }
    // What was recorded before the restart is still there (append-only file), delivery
    // marker included.
    assert_eq!(retry(|| store.facts(&k)).await?.position, 2);
    assert_eq!(
        store
            .record_fact(&k, &push_of(3), Some("before"), None)
            .await?,
        Ingested::Duplicate
    );
    Ok(())
}

/// A status the previous version marked posted (per agent, commit and state) is not posted
/// again after the upgrade, so an entry left unacknowledged across it does not set a
/// `success` back to `pending`; and where it posted several states, GitLab is read first,
/// since only GitLab knows which it posted last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_the_previous_version_posted_are_not_posted_again_nor_hide_later_ones()
-> anyhow::Result<()> {
    let fixture = RedisFixture::start().await?;
    let (once, flipped) = (sha(1), sha(2));
    let tag = greenlight_server::store::agent_shard("prod");
    let posted_before = |commit: &str, state: &str| -> anyhow::Result<()> {
        let key = format!("gl-suite:{{gl{tag}}}:agent:prod:status:{commit}:{state}");
        fixture.redis.cli(&["SET", &key, "posted", "EX", "60"])?;
        Ok(())
    };
    posted_before(&once, "pending")?;
    posted_before(&flipped, "success")?;
    posted_before(&flipped, "failed")?;
    let status = |commit, state, at_ms| StatusKey {
        agent: "prod",
        sha: commit,
        state,
        order: StatusOrder::reported(1, at_ms, state),
    };
    let lease = Duration::from_secs(30);
    let store: &dyn Store = fixture.store.as_ref();
    let claims = [
        (status(&once, "pending", 1), StatusClaim::Posted),
        (status(&once, "running", 2), StatusClaim::Mine),
        (status(&flipped, "success", 1), StatusClaim::Retaken),
    ];
    for (claimed, expected) in claims {
        assert_eq!(
            store.begin_status(&claimed, "r", lease).await?,
            expected,
            "{claimed:?}"
        );
    }
    Ok(())
}

/// A Redis that lost its data (here: emptied under a live follower) cannot be resumed from:
/// followers are told to re-read everything, then follow the new log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_lost_its_entries_makes_followers_re_read_everything() -> anyhow::Result<()> {
    let fixture = RedisFixture::start().await?;
    let store: Arc<dyn Store> = fixture.store.clone();
    let k = key("group/app", "main");
    store.record_fact(&k, &push_of(1), None, None).await?;
    let mut rx = subscribed(store.as_ref()).await?;
    fixture.redis.cli(&["FLUSHALL"])?;
    resynced(&mut rx)
        .await
        .context("no Notice::Resync after the log lost its entries")?;
    // Following the new log.
    wait_until_receiving(store.as_ref(), &mut rx, SOON).await?;
    Ok(())
}

/// A Redis restarted without its data that takes a write before the follower is back: the
/// new log has newer ids and has trimmed nothing, yet what the follower read last is gone,
/// and it re-reads everything rather than follow the new log as if nothing was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_lost_its_entries_and_took_new_ones_makes_followers_re_read_everything()
-> anyhow::Result<()> {
    let mut fixture = RedisFixture::start().await?;
    let store: Arc<dyn Store> = fixture.store.clone();
    let k = key("group/app", "main");
    store.record_fact(&k, &push_of(1), None, None).await?;
    store.record_fact(&k, &push_of(2), None, None).await?;
    let mut rx = subscribed(store.as_ref()).await?;
    wait_until_receiving(store.as_ref(), &mut rx, SOON).await?;
    // Down long enough for the follower's reconnection to back off past the write below.
    fixture.redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fixture.redis.restart_empty().await?;
    let fact = push_of(3);
    let recorded = retry(|| store.record_fact(&k, &fact, None, None)).await?;
    assert_eq!(
        recorded,
        Ingested::Recorded { position: 1 },
        "the data is gone"
    );
    resynced(&mut rx)
        .await
        .context("no Notice::Resync after Redis came back empty and took a write")?;
    Ok(())
}

/// Entries trimmed from the log while a follower was away, past the one it read last: it
/// re-reads everything. Redis does not count trimming in the stream's newest deleted id, so
/// only the entry last read being gone tells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_trimmed_unread_while_a_follower_was_away_make_it_re_read_everything()
-> anyhow::Result<()> {
    let mut fixture = RedisFixture::start().await?;
    let store: Arc<dyn Store> = fixture.store.clone();
    let k = key("group/app", "main");
    store.record_fact(&k, &push_of(1), None, None).await?;
    let mut rx = subscribed(store.as_ref()).await?;
    wait_until_receiving(store.as_ref(), &mut rx, SOON).await?;
    // Down long enough for the follower's reconnection to back off past what follows.
    fixture.redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fixture.redis.restart().await?;
    for n in 2..=6 {
        let fact = push_of(n);
        retry(|| store.record_fact(&k, &fact, None, None)).await?;
    }
    for log in fixture
        .redis
        .cli(&["--raw", "KEYS", "gl-suite:*:log"])?
        .lines()
    {
        fixture.redis.cli(&["XTRIM", log, "MAXLEN", "2"])?;
    }
    resynced(&mut rx)
        .await
        .context("no Notice::Resync after entries were trimmed unread")?;
    Ok(())
}

/// Entries trimmed from the log before any status publisher read them, and before it looked
/// again, are counted once each, and the publishers read on from the oldest entry kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_entries_trimmed_unread_are_counted_once() -> anyhow::Result<()> {
    let (redis, owned, metrics, _stop) = loss_counting_store().await?;
    let store: &dyn Store = &owned;
    // Losses are looked for every half of this at most, before a read.
    let lease = Duration::from_millis(200);
    let k = key("group/app", "main");
    store.record_fact(&k, &push_of(1), None, None).await?;
    let first = store
        .next_for_statuses("replica-a", lease)
        .await?
        .context("the first entry")?;
    store.ack_statuses(&first.id).await?;
    for n in 2..=6 {
        store.record_fact(&k, &push_of(n), None, None).await?;
    }
    let (shard, _) = first.id.split_once('/').context("a shard/id entry id")?;
    let log = format!("gl-lost:{{gl{shard}}}:log");
    assert_eq!(
        redis.cli(&["XLEN", &log])?.trim(),
        "6",
        "one ref's entries share a shard"
    );
    // Keep the newest two of the five unread: three are lost.
    redis.cli(&["XTRIM", &log, "MAXLEN", "2"])?;
    tokio::time::sleep(lease).await;
    let next = store
        .next_for_statuses("replica-a", lease)
        .await?
        .context("an entry kept")?;
    assert_eq!(metrics.status_entries_lost.get(), 3);
    store.ack_statuses(&next.id).await?;
    tokio::time::sleep(lease).await;
    let last = store
        .next_for_statuses("replica-a", lease)
        .await?
        .context("the newest entry")?;
    store.ack_statuses(&last.id).await?;
    assert_eq!(metrics.status_entries_lost.get(), 3, "counted once");
    Ok(())
}

/// Entries a publisher took and never acknowledged, trimmed before a takeover met them, are
/// counted once each as lost; the entries after them are handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_entries_trimmed_while_pending_are_counted_once() -> anyhow::Result<()> {
    let (redis, owned, metrics, _stop) = loss_counting_store().await?;
    let store: &dyn Store = &owned;
    let takeover = Duration::from_millis(200);
    let k = key("group/app", "main");
    let mut shard = String::new();
    for n in 1..=3 {
        store.record_fact(&k, &push_of(n), None, None).await?;
        let taken = next_status_entry(store, "replica-dead", takeover)
            .await?
            .context("taken, never acknowledged")?;
        shard = taken
            .id
            .split_once('/')
            .context("a shard/id entry id")?
            .0
            .to_owned();
    }
    for n in 4..=5 {
        store.record_fact(&k, &push_of(n), None, None).await?;
    }
    let log = format!("gl-lost:{{gl{shard}}}:log");
    redis.cli(&["XTRIM", &log, "MAXLEN", "2"])?;
    tokio::time::sleep(takeover).await;
    let mut kept = Vec::new();
    while let Some(entry) = next_status_entry(store, "replica-b", takeover).await? {
        store.ack_statuses(&entry.id).await?;
        kept.push(entry.message);
    }
    assert!(
        matches!(
            kept.as_slice(),
            [
                Broadcast::Fact { position: 4, .. },
                Broadcast::Fact { position: 5, .. }
            ]
        ),
        "{kept:?}"
    );
    assert_eq!(metrics.status_entries_lost.get(), 3);
    tokio::time::sleep(takeover).await;
    assert!(
        next_status_entry(store, "replica-b", takeover)
            .await?
            .is_none()
    );
    assert_eq!(metrics.status_entries_lost.get(), 3, "counted once");
    Ok(())
}

/// A Redis store under the prefix `gl-lost` with its log metrics, for counting lost status
/// entries; it stops with the guard.
async fn loss_counting_store()
-> anyhow::Result<(Redis, RedisStore, LogMetrics, tokio_util::sync::DropGuard)> {
    let redis = Redis::start().await?;
    let settings = RedisSettings::single(redis.url(), "gl-lost".to_owned());
    let metrics = LogMetrics::default();
    let (store, stop) = guarded_store(&settings, metrics.clone())?;
    Ok((redis, store, metrics, stop))
}

/// A Redis store of `settings` counting into `metrics`; it stops with the guard.
pub(crate) fn guarded_store(
    settings: &RedisSettings,
    metrics: LogMetrics,
) -> anyhow::Result<(RedisStore, tokio_util::sync::DropGuard)> {
    let shutdown = CancellationToken::new();
    let store = RedisStore::connect(settings, shutdown.clone(), metrics)?;
    Ok((store, shutdown.drop_guard()))
}

/// Waits up to RESUBSCRIBE for a `Notice::Resync`, skipping any other notice.
async fn resynced(rx: &mut broadcast::Receiver<Notice>) -> anyhow::Result<()> {
    tokio::time::timeout(RESUBSCRIBE, async {
        loop {
            match rx.recv().await {
                Ok(Notice::Resync) => return Ok(()),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => bail!("notices closed"),
            }
        }
    })
    .await
    .context("timed out")?
}

/// A prefix holding the previous layout (one change log stream, no layout marker) is refused
/// with a message that says what to do; an empty prefix is claimed for this layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_of_the_previous_layout_is_refused() -> anyhow::Result<()> {
    let fixture = RedisFixture::start().await?;
    fixture.store.check_layout().await?;
    fixture
        .store
        .check_layout()
        .await
        .context("its own layout passes")?;
    fixture.redis.cli(&["XADD", "gl-old:log", "*", "m", "{}"])?;
    let settings = RedisSettings::single(fixture.redis.url(), "gl-old".to_owned());
    let store = RedisStore::connect(&settings, fixture.shutdown.clone(), Default::default())?;
    match store.check_layout().await {
        Err(error @ StoreError::OldLayout { .. }) => {
            let message = error.to_string();
            ensure!(message.contains("gl-old"), "{message}");
            ensure!(message.contains("key_prefix"), "says what to do: {message}");
        }
        other => bail!("the old layout was not refused: {other:?}"),
    }
    Ok(())
}

/// Retries `op` until it succeeds, for up to SOON: the connection may still be coming back.
async fn retry<T, F, Fut>(mut op: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = greenlight_server::store::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(error) if tokio::time::Instant::now() >= deadline => return Err(error.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Everything the embedded store answered is in its file: reopened on the same directory, it
/// holds the same facts, delivery marks, agents, reports, sync errors, status claims and
/// unacknowledged change log entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_reopened_holds_all_it_answered() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let k = key("group/app", "main");
    let first = deployed_at(AgentState::default(), 1, 2);
    let error = SyncError::Manifests {
        message: "app.yaml: not YAML".into(),
    };
    let posted = StatusKey {
        agent: "prod",
        sha: "a1",
        state: "success",
        order: StatusOrder::reported(1, 1_000, "success"),
    };
    // On another commit: an unfinished claim leaves the state shown on its own unknown.
    let unsure = StatusKey {
        sha: "a2",
        state: "failed",
        order: StatusOrder::reported(1, 2_000, "failed"),
        ..posted
    };
    let lease = Duration::from_secs(60);
    let unacknowledged = {
        let owned = EmbeddedStore::open(dir.path())?;
        let store: &dyn Store = &owned;
        store
            .record_fact(&k, &push_of(1), Some("delivery-1"), None)
            .await?;
        let green = FactRecord::Pipeline {
            sha: commit(1),
            pipeline: pipeline(5, PipelineStatus::Success, Some(10), &["test"]),
        };
        store.record_fact(&k, &green, None, None).await?;
        write(store, "prod", 0, &AgentState::default(), &first).await?;
        assert_eq!(
            store.push_report("prod", 0, b"older", 10).await?,
            Reported::Kept
        );
        assert_eq!(
            store.push_report("prod", 0, b"newer", 10).await?,
            Reported::Kept
        );
        store.set_sync_errors(&[("staging", Some(&error))]).await?;
        store.begin_status(&posted, "replica-a", lease).await?;
        store.finish_status(&posted, "replica-a", true).await?;
        store.begin_status(&unsure, "replica-a", lease).await?;
        // Acknowledge the first entry of the log only.
        let entry = store
            .next_for_statuses("replica-a", lease)
            .await?
            .context("an entry")?;
        store.ack_statuses(&entry.id).await?;
        let mut left = Vec::new();
        while let Some(entry) = store
            .next_for_statuses("replica-a", lease)
            .await?
            .filter(|e| !left.iter().any(|l: &LogEntry| l.id == e.id))
        {
            left.push(entry);
            if left.len() > 20 {
                break;
            }
        }
        left
    };

    let owned = EmbeddedStore::open(dir.path())?;
    let store: &dyn Store = &owned;
    let facts = store.facts(&k).await?;
    assert_eq!(facts.position, 2);
    assert_eq!(facts.pushes.len(), 1);
    assert_eq!(
        store.pipeline(&k, &commit(1), 5).await?.map(|p| p.status),
        Some(PipelineStatus::Success)
    );
    assert_eq!(
        store
            .record_fact(&k, &push_of(1), Some("delivery-1"), None)
            .await?,
        Ingested::Duplicate,
        "the delivery is still known"
    );
    let prod = store.agent("prod").await?;
    assert_eq!((prod.version, &prod.value), (1, &first));
    assert_eq!(
        store.reports("prod", 10).await?,
        [b"newer".to_vec(), b"older".to_vec()]
    );
    assert_eq!(store.sync_error("staging").await?, Some(error));
    assert_eq!(
        store.begin_status(&posted, "replica-b", lease).await?,
        StatusClaim::Posted
    );
    assert_eq!(
        store.begin_status(&unsure, "replica-b", lease).await?,
        StatusClaim::Retaken,
        "its post was never recorded: look first"
    );
    // The entries left unacknowledged are handed out again, the acknowledged one is not.
    let mut again = Vec::new();
    while let Some(entry) = store.next_for_statuses("replica-b", lease).await? {
        if again.iter().any(|e: &LogEntry| e.id == entry.id) {
            break;
        }
        again.push(entry);
        if again.len() > 20 {
            break;
        }
    }
    let ids = |entries: &[LogEntry]| entries.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    ensure!(!unacknowledged.is_empty());
    assert_eq!(ids(&again), ids(&unacknowledged));
    // And the agent's next write goes on from the version on file.
    let second = deployed_at(first.clone(), 2, 3);
    assert_eq!(
        write(store, "prod", 1, &first, &second).await?,
        Written::Saved { version: 2 }
    );
    Ok(())
}

/// A directory is one server's: a second store on it is refused, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_refuses_a_directory_another_holds() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let _first = EmbeddedStore::open(dir.path())?;
    let refused = EmbeddedStore::open(dir.path())
        .err()
        .context("a second store opened the same file")?;
    assert!(
        matches!(refused, StoreError::Embedded(_)) && refused.to_string().contains("in use"),
        "{refused}"
    );
    Ok(())
}
