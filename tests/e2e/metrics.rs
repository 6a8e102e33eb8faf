//! `/metrics` of the server and of the agent: valid OpenMetrics, whose numbers follow what
//! the test does.

use std::sync::Arc;

use anyhow::ensure;
use greenlight_agent::metrics::AgentMetrics;
use greenlight_e2e::exposition::{Exposition, Kind, scrape};
use greenlight_e2e::{
    GitRepo, Redis, SOON, TestServer, ZERO, eventually, git_agent_yaml, git_config_yaml,
    next_revision,
};
use greenlight_server::config::{Config, Overrides};

/// Every family the server serves, and its kind. One with labels is served once counted.
const SERVER_FAMILIES: [(&str, Kind); 19] = [
    ("greenlight_webhook_deliveries", Kind::Counter),
    ("greenlight_git_fetches", Kind::Counter),
    ("greenlight_manifest_reads", Kind::Counter),
    ("greenlight_gitlab_commit_statuses", Kind::Counter),
    ("greenlight_change_log_resyncs", Kind::Counter),
    ("greenlight_facts_position_raised", Kind::Counter),
    ("greenlight_fact_to_decision_seconds", Kind::Histogram),
    ("greenlight_decisions", Kind::Counter),
    ("greenlight_connected_agents", Kind::Gauge),
    ("greenlight_sync_stream_messages", Kind::Counter),
    ("greenlight_sync_stream_bytes", Kind::Counter),
    ("greenlight_stream_buffered_messages", Kind::Gauge),
    ("greenlight_stream_buffered_bytes", Kind::Gauge),
    ("greenlight_streams_closed", Kind::Counter),
    ("greenlight_git_fetch_duration_seconds", Kind::Histogram),
    ("greenlight_manifest_read_duration_seconds", Kind::Histogram),
    ("greenlight_store_errors", Kind::Counter),
    ("greenlight_change_log_lag_seconds", Kind::Gauge),
    (
        "greenlight_gitlab_commit_status_entries_lost",
        Kind::Counter,
    ),
];

/// Every family the agent serves, and its kind.
const AGENT_FAMILIES: [(&str, Kind); 7] = [
    ("greenlight_agent_applies", Kind::Counter),
    ("greenlight_agent_apply_duration_seconds", Kind::Histogram),
    ("greenlight_agent_objects", Kind::Counter),
    ("greenlight_agent_drift_corrections", Kind::Counter),
    ("greenlight_agent_health_wait_seconds", Kind::Histogram),
    ("greenlight_agent_reconnects", Kind::Counter),
    ("greenlight_agent_leader", Kind::Gauge),
];

/// The server's metrics, parsed strictly, serving only `SERVER_FAMILIES`.
async fn server_metrics(server: &TestServer) -> anyhow::Result<Exposition> {
    let metrics = scrape(server.http).await?;
    missing(&metrics, &SERVER_FAMILIES)?;
    Ok(metrics)
}

/// The families of `expected` that `metrics` lacks, after checking that it serves no other
/// family and each of these with its kind.
fn missing<'a>(metrics: &Exposition, expected: &[(&'a str, Kind)]) -> anyhow::Result<Vec<&'a str>> {
    for (name, family) in &metrics.families {
        let kind = expected.iter().find(|(n, _)| n == name).map(|(_, k)| *k);
        ensure!(
            kind.is_some(),
            "family {name} is not in the list (and the README's table)"
        );
        ensure!(
            kind == Some(family.kind),
            "family {name} is a {:?}",
            family.kind
        );
    }
    Ok(expected
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !metrics.families.contains_key(*name))
        .collect())
}

fn sample(metrics: &Exposition, name: &str) -> f64 {
    metrics.count(name, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_serves_valid_openmetrics_that_follow_webhooks_streams_and_store_errors()
-> anyhow::Result<()> {
    let mut redis = Redis::start().await?;
    let repo = GitRepo::new()?;
    let x = repo.commit(&[("app.yaml", b"kind: ConfigMap\n")], &[])?;
    let cache = tempfile::tempdir()?;
    let yaml = git_config_yaml(
        &redis.url(),
        cache.path(),
        "",
        &[git_agent_yaml("prod", &repo.url(), &[])],
    );
    let server = TestServer::start_with(Config::from_yaml(&yaml, &Overrides::default())?).await?;

    let before = server_metrics(&server).await?;
    // Those with labels have counted nothing yet.
    assert_eq!(
        missing(&before, &SERVER_FAMILIES)?,
        [
            "greenlight_webhook_deliveries",
            "greenlight_gitlab_commit_statuses",
            "greenlight_decisions",
            "greenlight_store_errors"
        ]
    );
    assert_eq!(sample(&before, "greenlight_connected_agents"), 0.0);
    let decided_before = sample(&before, "greenlight_fact_to_decision_seconds_count");

    // A push and its green pipeline: two webhooks recorded, and decided on a moment later
    // (one sample per evaluation that saved decisions: the two facts may share one).
    server.release(ZERO, &x, 1).await?;
    let after = eventually("the facts to be decided", || async {
        let now = server_metrics(&server).await?;
        let decided = sample(&now, "greenlight_fact_to_decision_seconds_count") - decided_before;
        let deployed = now.count("greenlight_decisions_total", &[("outcome", "deploy")]);
        Ok((decided >= 1.0 && deployed >= 1.0).then_some(now))
    })
    .await?;
    for event in ["push", "pipeline"] {
        let labels = [("event", event), ("outcome", "recorded")];
        assert_eq!(
            after.count("greenlight_webhook_deliveries_total", &labels),
            1.0,
            "{event}"
        );
    }
    assert!(sample(&after, "greenlight_fact_to_decision_seconds_sum") > 0.0);

    // An agent's stream: connected while open, and sent the revision with its files.
    let mut stream = server.stream("prod").await?;
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), x);
    let open = server_metrics(&server).await?;
    assert_eq!(sample(&open, "greenlight_connected_agents"), 1.0);
    let messages = sample(&open, "greenlight_sync_stream_messages_total");
    assert!(messages >= 3.0, "header, chunk and trailer: {messages}");
    let bytes = sample(&open, "greenlight_sync_stream_bytes_total");
    assert!(bytes > "kind: ConfigMap\n".len() as f64, "{bytes} bytes");
    for histogram in [
        "greenlight_git_fetch_duration_seconds_count",
        "greenlight_manifest_read_duration_seconds_count",
    ] {
        assert!(sample(&open, histogram) >= 1.0, "{histogram}");
    }
    // The follower relayed the entries of those saves: its lag is a time, not an error.
    let lag = sample(&open, "greenlight_change_log_lag_seconds");
    assert!((0.0..60.0).contains(&lag), "lag {lag}");
    drop(stream);
    eventually("the agent counted gone", || async {
        let metrics = server_metrics(&server).await?;
        Ok((sample(&metrics, "greenlight_connected_agents") == 0.0).then_some(()))
    })
    .await?;

    // Without Redis a webhook cannot be recorded: the store's failure is counted.
    redis.kill();
    let y = repo.commit(&[("app.yaml", b"kind: Secret\n")], &[])?;
    let refused = server.push("main", &x, &y).await?;
    ensure!(refused == 503, "a push without a store answered {refused}");
    let down = eventually("a failed recording counted", || async {
        let metrics = server_metrics(&server).await?;
        let labels = [("operation", "record_fact")];
        let failed = metrics.count("greenlight_store_errors_total", &labels);
        Ok((failed >= 1.0).then_some(metrics))
    })
    .await?;
    assert_eq!(
        down.count(
            "greenlight_webhook_deliveries_total",
            &[("event", "push"), ("outcome", "failed")]
        ),
        1.0
    );
    // No GitLab is configured, so no commit status was posted; all else was counted.
    assert_eq!(
        missing(&down, &SERVER_FAMILIES)?,
        ["greenlight_gitlab_commit_statuses"]
    );
    server.stop().await?;
    Ok(())
}

#[tokio::test]
async fn the_agent_serves_valid_openmetrics_with_every_family_from_the_start() -> anyhow::Result<()>
{
    let metrics = Arc::new(AgentMetrics::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(greenlight_agent::metrics::serve(
        listener,
        metrics.clone(),
        stop.clone(),
    ));
    let fresh = scrape(address).await?;
    assert_eq!(
        missing(&fresh, &AGENT_FAMILIES)?,
        ["greenlight_agent_applies", "greenlight_agent_objects"]
    );
    metrics.applied("failed", 0.02);
    metrics.object("failed");
    let counted = scrape(address).await?;
    assert!(missing(&counted, &AGENT_FAMILIES)?.is_empty());
    assert_eq!(
        counted.count("greenlight_agent_applies_total", &[("result", "failed")]),
        1.0
    );
    assert_eq!(
        counted.count(
            "greenlight_agent_apply_duration_seconds_bucket",
            &[("le", "0.025")]
        ),
        1.0
    );
    stop.cancel();
    Ok(())
}
