//! One contract, two stores: every check runs against the in-memory store and against Redis.
//!
//! `memory::*` and `redis::*` are generated from the same list of async checks that take a
//! `&dyn Store`; the Redis-only tests at the end cover what only a shared store can show
//! (compare-and-set across connections, re-subscription after an outage).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use greenlight_e2e::{Redis, SOON, sha};
use greenlight_server::config::RedisSettings;
use greenlight_server::gate::{AgentGate, Decision, Outcome, Pipeline, PipelineStatus, Push, Sha};
use greenlight_server::store::{
    Broadcast, LogEntry, MemoryStore, Notice, RedisStore, RefDoc, RefKey, SaveOutcome, Store,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// How long a Redis subscriber may take to notice a restart and subscribe again.
const RESUBSCRIBE: Duration = Duration::from_secs(15);

/// The agent name probes are published under; `next_message` skips them.
const PROBE_AGENT: &str = "__probe__";

macro_rules! suite {
    ($($check:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() -> anyhow::Result<()> {
                    let store = super::MemoryStore::new();
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
    missing_key_loads_as_version_zero_and_default_doc,
    save_with_expected_version_bumps_it,
    save_with_stale_version_conflicts_and_writes_nothing,
    repeated_delivery_is_duplicate_and_writes_nothing,
    delivery_ids_are_per_project,
    save_publishes_ref_changed,
    failed_saves_publish_nothing,
    appends_reach_every_subscriber,
    pushed_reports_are_appended_to_the_log,
    the_status_feed_hands_each_entry_to_one_publisher_until_acknowledged,
    an_entry_a_publisher_never_acknowledged_goes_to_another,
    reports_are_newest_first_and_trimmed,
    presence_follows_connect_and_disconnect,
    disconnect_from_another_replica_keeps_presence,
    sync_errors_are_set_and_cleared,
    status_claims_go_to_the_first_claimant,
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
    let settings = RedisSettings {
        url: redis.url(),
        key_prefix: "gl-suite".to_owned(),
    };
    Ok(RedisStore::connect(
        &settings,
        shutdown.clone(),
        Default::default(),
    )?)
}

fn key(project: &str, branch: &str) -> RefKey {
    RefKey {
        project: project.to_owned(),
        branch: branch.to_owned(),
    }
}

fn commit(n: u32) -> Sha {
    Sha::parse(&sha(n)).expect("sha() makes valid commit ids")
}

/// A document with `pushes` heads (commits 1..=pushes) and a green pipeline on the last.
fn doc_with(pushes: u32) -> RefDoc {
    let mut doc = RefDoc::default();
    for n in 1..=pushes {
        doc.refs.record_push(&Push {
            before: None,
            after: Some(commit(n)),
            at_ms: i64::from(n),
        });
    }
    if pushes > 0 {
        let pipeline = Pipeline {
            id: u64::from(pushes),
            status: PipelineStatus::Success,
            source: "push".to_owned(),
            as_of_ms: Some(1_000),
            passed_stages: Vec::new(),
        };
        doc.refs.record_pipeline(&commit(pushes), pipeline);
    }
    doc.agents.insert("prod".to_owned(), AgentGate::default());
    doc
}

fn changed(key: &RefKey, note: &str) -> Broadcast {
    let decision = Decision {
        outcome: Outcome::Hold,
        sha: Some(commit(1)),
        pipeline_id: Some(7),
        reason: note.to_owned(),
        at_ms: 1_234,
        superseded_by: None,
    };
    Broadcast::RefChanged {
        key: key.clone(),
        version: 1,
        decisions: vec![("prod".to_owned(), decision)],
        traceparent: None,
    }
}

fn probe(n: u64) -> Broadcast {
    Broadcast::Report {
        agent: PROBE_AGENT.to_owned(),
        report: n.to_be_bytes().to_vec(),
    }
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
    let mut n = 0;
    loop {
        n += 1;
        // The store may still be reconnecting; a failed probe is simply retried.
        let _ = store.append(&probe(n)).await;
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

async fn missing_key_loads_as_version_zero_and_default_doc(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let loaded = store.load(&key("group/none", "main")).await?;
    assert_eq!(loaded.version, 0);
    assert_eq!(loaded.value, RefDoc::default());
    Ok(())
}

async fn save_with_expected_version_bumps_it(store: &dyn Store) -> anyhow::Result<()> {
    let k = key("group/app", "main");
    let first = doc_with(1);
    assert_eq!(
        store.save(&k, 0, &first, None, &changed(&k, "one")).await?,
        SaveOutcome::Saved { version: 1 }
    );
    let loaded = store.load(&k).await?;
    assert_eq!(loaded.version, 1);
    assert_eq!(loaded.value, first, "the document reads back as written");

    let second = doc_with(2);
    assert_eq!(
        store
            .save(&k, 1, &second, None, &changed(&k, "two"))
            .await?,
        SaveOutcome::Saved { version: 2 }
    );
    let loaded = store.load(&k).await?;
    assert_eq!(loaded.version, 2);
    assert_eq!(loaded.value, second);

    // Other refs, of the same project or not, have versions of their own.
    let other = key("group/app", "staging");
    assert_eq!(store.load(&other).await?.version, 0);
    assert_eq!(
        store
            .save(&other, 0, &first, None, &changed(&other, "x"))
            .await?,
        SaveOutcome::Saved { version: 1 }
    );
    assert_eq!(store.load(&k).await?.version, 2);
    Ok(())
}

async fn save_with_stale_version_conflicts_and_writes_nothing(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let k = key("group/app", "main");
    let notice = changed(&k, "n");
    assert_eq!(
        store.save(&k, 5, &doc_with(1), None, &notice).await?,
        SaveOutcome::Conflict,
        "absent key is version 0"
    );
    let loaded = store.load(&k).await?;
    assert_eq!(
        (loaded.version, loaded.value),
        (0, RefDoc::default()),
        "a conflict writes nothing"
    );

    assert_eq!(
        store.save(&k, 0, &doc_with(1), None, &notice).await?,
        SaveOutcome::Saved { version: 1 }
    );
    assert_eq!(
        store.save(&k, 1, &doc_with(2), None, &notice).await?,
        SaveOutcome::Saved { version: 2 }
    );
    for stale in [0, 1, 3] {
        assert_eq!(
            store
                .save(
                    &k,
                    stale,
                    &doc_with(3),
                    Some(&format!("stale-{stale}")),
                    &notice
                )
                .await?,
            SaveOutcome::Conflict,
            "expected version {stale} while the stored one is 2"
        );
    }
    let loaded = store.load(&k).await?;
    assert_eq!(loaded.version, 2);
    assert_eq!(loaded.value, doc_with(2), "conflicting saves write nothing");
    // A conflicting save does not remember its delivery: the retry must be able to succeed.
    for stale in [0, 1, 3] {
        assert!(!store.seen_delivery(&k, &format!("stale-{stale}")).await?);
    }
    assert_eq!(
        store
            .save(&k, 2, &doc_with(3), Some("stale-1"), &notice)
            .await?,
        SaveOutcome::Saved { version: 3 }
    );
    Ok(())
}

async fn repeated_delivery_is_duplicate_and_writes_nothing(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let k = key("group/app", "main");
    let notice = changed(&k, "n");
    assert!(!store.seen_delivery(&k, "delivery-1").await?);
    assert_eq!(
        store
            .save(&k, 0, &doc_with(1), Some("delivery-1"), &notice)
            .await?,
        SaveOutcome::Saved { version: 1 }
    );
    assert!(store.seen_delivery(&k, "delivery-1").await?);
    assert!(!store.seen_delivery(&k, "delivery-2").await?);

    // With the right version the same delivery still writes nothing.
    assert_eq!(
        store
            .save(&k, 1, &doc_with(2), Some("delivery-1"), &notice)
            .await?,
        SaveOutcome::Duplicate
    );
    // A stale version does not hide that it is a duplicate.
    assert_eq!(
        store
            .save(&k, 0, &doc_with(2), Some("delivery-1"), &notice)
            .await?,
        SaveOutcome::Duplicate
    );
    let loaded = store.load(&k).await?;
    assert_eq!(loaded.version, 1);
    assert_eq!(loaded.value, doc_with(1), "a duplicate writes nothing");

    // Another delivery, or none, is saved as usual.
    assert_eq!(
        store
            .save(&k, 1, &doc_with(2), Some("delivery-2"), &notice)
            .await?,
        SaveOutcome::Saved { version: 2 }
    );
    assert_eq!(
        store.save(&k, 2, &doc_with(3), None, &notice).await?,
        SaveOutcome::Saved { version: 3 }
    );
    assert_eq!(
        store.save(&k, 3, &doc_with(4), None, &notice).await?,
        SaveOutcome::Saved { version: 4 }
    );
    Ok(())
}

async fn delivery_ids_are_per_project(store: &dyn Store) -> anyhow::Result<()> {
    let app = key("group/app", "main");
    let other = key("group/other", "main");
    let notice = changed(&app, "n");
    assert_eq!(
        store
            .save(&app, 0, &doc_with(1), Some("shared-id"), &notice)
            .await?,
        SaveOutcome::Saved { version: 1 }
    );
    assert!(
        !store.seen_delivery(&other, "shared-id").await?,
        "another project has not seen it"
    );
    assert_eq!(
        store
            .save(&other, 0, &doc_with(2), Some("shared-id"), &notice)
            .await?,
        SaveOutcome::Saved { version: 1 },
        "the same delivery id in another project is independent"
    );
    assert_eq!(store.load(&other).await?.value, doc_with(2));
    assert_eq!(store.load(&app).await?.value, doc_with(1));
    // Both are remembered, each for its own project.
    assert_eq!(
        store
            .save(&app, 1, &doc_with(3), Some("shared-id"), &notice)
            .await?,
        SaveOutcome::Duplicate
    );
    assert_eq!(
        store
            .save(&other, 1, &doc_with(3), Some("shared-id"), &notice)
            .await?,
        SaveOutcome::Duplicate
    );
    // The trait remembers deliveries per project: another branch of the same project sees it.
    let staging = key("group/app", "staging");
    assert!(store.seen_delivery(&staging, "shared-id").await?);
    Ok(())
}

async fn save_publishes_ref_changed(store: &dyn Store) -> anyhow::Result<()> {
    let mut rx = subscribed(store).await?;
    let k = key("group/app", "main");
    let notice = changed(&k, "published");
    assert_eq!(
        store.save(&k, 0, &doc_with(1), Some("d"), &notice).await?,
        SaveOutcome::Saved { version: 1 }
    );
    assert_eq!(
        next_message(&mut rx).await?,
        notice,
        "subscribers hear the save's notice as given"
    );
    Ok(())
}

async fn failed_saves_publish_nothing(store: &dyn Store) -> anyhow::Result<()> {
    let mut rx = subscribed(store).await?;
    let k = key("group/app", "main");
    assert_eq!(
        store
            .save(&k, 0, &doc_with(1), Some("d1"), &changed(&k, "first"))
            .await?,
        SaveOutcome::Saved { version: 1 }
    );
    assert_eq!(
        store
            .save(&k, 0, &doc_with(2), None, &changed(&k, "conflict"))
            .await?,
        SaveOutcome::Conflict
    );
    assert_eq!(
        store
            .save(&k, 1, &doc_with(2), Some("d1"), &changed(&k, "duplicate"))
            .await?,
        SaveOutcome::Duplicate
    );
    assert_eq!(
        store
            .save(&k, 1, &doc_with(2), Some("d2"), &changed(&k, "second"))
            .await?,
        SaveOutcome::Saved { version: 2 }
    );
    // Notices arrive in order, so a notice of a failed save would show up between these two.
    assert_eq!(next_message(&mut rx).await?, changed(&k, "first"));
    assert_eq!(
        next_message(&mut rx).await?,
        changed(&k, "second"),
        "a conflict or duplicate announced nothing"
    );
    Ok(())
}

async fn appends_reach_every_subscriber(store: &dyn Store) -> anyhow::Result<()> {
    let mut first = subscribed(store).await?;
    let mut second = store.subscribe();
    let connection = Broadcast::Connection {
        agent: "prod".to_owned(),
        connected: true,
        replica: "replica-1".to_owned(),
    };
    let report = Broadcast::Report {
        agent: "prod".to_owned(),
        report: vec![0, 1, 2, 255],
    };
    store.append(&connection).await?;
    store.append(&report).await?;
    for rx in [&mut first, &mut second] {
        assert_eq!(next_message(rx).await?, connection);
        assert_eq!(next_message(rx).await?, report);
    }
    Ok(())
}

async fn pushed_reports_are_appended_to_the_log(store: &dyn Store) -> anyhow::Result<()> {
    let mut rx = subscribed(store).await?;
    let report = Broadcast::Report {
        agent: "prod".to_owned(),
        report: vec![9, 9],
    };
    store.push_report("prod", &[9, 9], 10, &report).await?;
    assert_eq!(next_message(&mut rx).await?, report);
    assert_eq!(store.reports("prod", 1).await?, vec![vec![9, 9]]);
    Ok(())
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
    store
        .save(&k, 0, &doc_with(1), None, &changed(&k, "one"))
        .await?;
    store
        .save(&k, 1, &doc_with(2), None, &changed(&k, "two"))
        .await?;
    let first = next_status_entry(store, "replica-a", long)
        .await?
        .context("the first entry")?;
    assert_eq!(first.message, changed(&k, "one"));
    // Taken by replica-a and not acknowledged yet: replica-b gets the next one, not this.
    let second = next_status_entry(store, "replica-b", long)
        .await?
        .context("the second entry")?;
    assert_eq!(second.message, changed(&k, "two"));
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

async fn an_entry_a_publisher_never_acknowledged_goes_to_another(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let takeover = Duration::from_millis(300);
    let k = key("group/app", "main");
    store
        .save(&k, 0, &doc_with(1), None, &changed(&k, "orphan"))
        .await?;
    let taken = next_status_entry(store, "replica-dead", takeover)
        .await?
        .context("the entry")?;
    assert_eq!(taken.message, changed(&k, "orphan"));
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

async fn reports_are_newest_first_and_trimmed(store: &dyn Store) -> anyhow::Result<()> {
    assert!(
        store.reports("prod", 10).await?.is_empty(),
        "no reports yet"
    );
    for n in 1..=5u8 {
        store.push_report("prod", &[n], 3, &probe(0)).await?;
    }
    store.push_report("staging", b"other", 3, &probe(0)).await?;
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
    store.push_report("prod", &[6], 1, &probe(0)).await?;
    assert_eq!(
        store.reports("prod", 10).await?,
        vec![vec![6]],
        "a smaller `keep` trims older ones"
    );
    Ok(())
}

async fn presence_follows_connect_and_disconnect(store: &dyn Store) -> anyhow::Result<()> {
    assert_eq!(store.presence("prod").await?, None);
    store.set_presence("replica-a", "prod", true).await?;
    assert_eq!(store.presence("prod").await?.as_deref(), Some("replica-a"));
    assert_eq!(
        store.presence("staging").await?,
        None,
        "presence is per agent"
    );
    store.refresh_presence("replica-a").await?;
    assert_eq!(
        store.presence("prod").await?.as_deref(),
        Some("replica-a"),
        "a refresh keeps it"
    );
    store.set_presence("replica-a", "prod", false).await?;
    assert_eq!(store.presence("prod").await?, None);
    // Disconnecting twice, or an agent never connected, is harmless.
    store.set_presence("replica-a", "prod", false).await?;
    store.set_presence("replica-a", "nobody", false).await?;
    assert_eq!(store.presence("prod").await?, None);
    Ok(())
}

async fn disconnect_from_another_replica_keeps_presence(store: &dyn Store) -> anyhow::Result<()> {
    store.set_presence("replica-a", "prod", true).await?;
    store.set_presence("replica-b", "prod", false).await?;
    assert_eq!(
        store.presence("prod").await?.as_deref(),
        Some("replica-a"),
        "only the replica that holds the agent can remove it"
    );
    store.set_presence("replica-a", "prod", false).await?;
    assert_eq!(store.presence("prod").await?, None);
    Ok(())
}

async fn sync_errors_are_set_and_cleared(store: &dyn Store) -> anyhow::Result<()> {
    assert_eq!(store.sync_error("prod").await?, None);
    store
        .set_sync_error("prod", Some("repository unreachable"))
        .await?;
    assert_eq!(
        store.sync_error("prod").await?.as_deref(),
        Some("repository unreachable")
    );
    assert_eq!(
        store.sync_error("staging").await?,
        None,
        "sync errors are per agent"
    );
    store
        .set_sync_error("prod", Some("manifest invalid"))
        .await?;
    assert_eq!(
        store.sync_error("prod").await?.as_deref(),
        Some("manifest invalid"),
        "the newest wins"
    );
    store.set_sync_error("prod", None).await?;
    assert_eq!(store.sync_error("prod").await?, None);
    store.set_sync_error("prod", None).await?;
    Ok(())
}

async fn status_claims_go_to_the_first_claimant(store: &dyn Store) -> anyhow::Result<()> {
    let commit = sha(1);
    assert!(
        store.claim_status("prod", &commit, "success").await?,
        "the first claim wins"
    );
    assert!(
        !store.claim_status("prod", &commit, "success").await?,
        "a second claim loses"
    );
    assert!(
        store.claim_status("prod", &commit, "failed").await?,
        "claims are per state"
    );
    assert!(
        store.claim_status("prod", &sha(2), "success").await?,
        "claims are per commit"
    );
    assert!(
        store.claim_status("staging", &commit, "success").await?,
        "claims are per agent"
    );
    Ok(())
}

async fn ping_answers(store: &dyn Store) -> anyhow::Result<()> {
    store.ping().await?;
    ensure!(!store.describe().is_empty());
    Ok(())
}

/// Replicas on separate connections update one document concurrently; compare-and-set must
/// lose no update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_concurrent_savers_lose_no_update() -> anyhow::Result<()> {
    const TASKS: u32 = 8;
    const ROUNDS: u32 = 20;
    let fixture = RedisFixture::start().await?;
    // Two store instances, as two replicas would have.
    let second: Arc<dyn Store> = Arc::new(redis_store(&fixture.redis, &fixture.shutdown)?);
    let first: Arc<dyn Store> = fixture.store.clone();
    let k = key("group/app", "main");
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let store = if task % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        let k = k.clone();
        tasks.spawn(async move {
            let mut conflicts = 0u32;
            for round in 0..ROUNDS {
                let n = 1 + task * ROUNDS + round;
                loop {
                    let loaded = store.load(&k).await?;
                    let mut doc = loaded.value;
                    doc.refs.record_push(&Push {
                        before: None,
                        after: Some(commit(n)),
                        at_ms: i64::from(n),
                    });
                    match store
                        .save(&k, loaded.version, &doc, None, &changed(&k, "count"))
                        .await?
                    {
                        SaveOutcome::Saved { version } => {
                            ensure!(
                                version == loaded.version + 1,
                                "saved at {version} after reading {}",
                                loaded.version
                            );
                            break;
                        }
                        SaveOutcome::Conflict => conflicts += 1,
                        SaveOutcome::Duplicate => {
                            bail!("no delivery was given, yet the save was a duplicate")
                        }
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
    let total = TASKS * ROUNDS;
    let loaded = first.load(&k).await?;
    assert_eq!(
        loaded.version,
        u64::from(total),
        "one version per successful save"
    );
    assert_eq!(
        loaded.value.refs.next_seq,
        u64::from(total),
        "every increment survived ({conflicts} conflicts retried)"
    );
    let mut seen: Vec<String> = loaded
        .value
        .refs
        .heads
        .iter()
        .map(|h| h.sha.to_string())
        .collect();
    seen.sort();
    let mut expected: Vec<String> = (1..=total).map(sha).collect();
    expected.sort();
    assert_eq!(seen, expected, "every task's commits are there, once each");
    Ok(())
}

/// A Redis restart (the append-only file keeps the data) costs a follower nothing but the
/// wait: it resumes the change log from the last entry it read, with no re-read of
/// everything, and what is appended after the restart reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_resumes_the_log_without_resync_and_keeps_data() -> anyhow::Result<()> {
    let mut fixture = RedisFixture::start().await?;
    let store: Arc<dyn Store> = fixture.store.clone();
    let k = key("group/app", "main");
    assert_eq!(
        store
            .save(&k, 0, &doc_with(2), Some("before"), &changed(&k, "n"))
            .await?,
        SaveOutcome::Saved { version: 1 }
    );
    let mut rx = subscribed(store.as_ref()).await?;

    fixture.redis.restart().await?;
    let (doc, after) = (doc_with(3), changed(&k, "after"));
    let saved = retry(|| store.save(&k, 1, &doc, Some("after"), &after)).await?;
    assert_eq!(saved, SaveOutcome::Saved { version: 2 });
    let deadline = tokio::time::Instant::now() + RESUBSCRIBE;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv())
            .await
            .context("the entry appended after the restart never arrived")?
        {
            Ok(Notice::Resync) => bail!("a restart that lost nothing must not cost a re-read"),
            Ok(Notice::Message(message)) if message == changed(&k, "after") => break,
            Ok(Notice::Message(_)) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => bail!("the follower lagged"),
            Err(broadcast::error::RecvError::Closed) => bail!("notices closed"),
        }
    }
    // What was saved before the restart is still there (append-only file), delivery included.
    let loaded = retry(|| store.load(&k)).await?;
    assert_eq!(loaded.version, 2);
    assert_eq!(
        store
            .save(&k, 2, &doc_with(4), Some("before"), &changed(&k, "n"))
            .await?,
        SaveOutcome::Duplicate
    );
    Ok(())
}

/// A Redis that lost its data (here: emptied under a live follower) cannot be resumed from:
/// followers are told to re-read everything, then follow the new log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_lost_its_entries_makes_followers_re_read_everything() -> anyhow::Result<()> {
    let fixture = RedisFixture::start().await?;
    let store: Arc<dyn Store> = fixture.store.clone();
    let k = key("group/app", "main");
    store
        .save(&k, 0, &doc_with(2), None, &changed(&k, "n"))
        .await?;
    let mut rx = subscribed(store.as_ref()).await?;
    let port = fixture
        .redis
        .url()
        .rsplit(':')
        .next()
        .context("the test Redis URL has a port")?
        .to_owned();
    let flushed = std::process::Command::new("redis-cli")
        .args(["-p", &port, "FLUSHALL"])
        .output()
        .context("redis-cli")?;
    ensure!(flushed.status.success(), "FLUSHALL failed: {flushed:?}");
    let resync = tokio::time::timeout(RESUBSCRIBE, async {
        loop {
            match rx.recv().await {
                Ok(Notice::Resync) => return Ok(()),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => bail!("notices closed"),
            }
        }
    })
    .await;
    resync.context("no Notice::Resync after the log lost its entries")??;
    // Following the new log.
    wait_until_receiving(store.as_ref(), &mut rx, SOON).await?;
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
