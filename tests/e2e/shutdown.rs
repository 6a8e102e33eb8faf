//! SIGTERM to an agent in the middle of an apply, against a real control plane: it stops at
//! a safe point, releases its Lease so that a standby takes over at once, and what it
//! reported reaches the server.

use std::time::Duration;

use anyhow::Context;
use greenlight::v1::Phase;
use greenlight_e2e::control_plane::TestCluster;
use greenlight_e2e::*;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;

/// Long enough that only a release, not an expiry, explains a takeover within it.
const LEASE: Duration = Duration::from_secs(30);

/// A Deployment whose pods fit on no node and whose rollout is given ten minutes: an apply
/// of it waits for health until stopped.
fn never_ready(name: &str) -> String {
    deployment_on(name, 1, "nowhere")
        .replace("progressDeadlineSeconds: 3", "progressDeadlineSeconds: 600")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_apply_releases_the_lease_to_a_standby_and_delivers_the_reports()
-> anyhow::Result<()> {
    let Some(cluster) = TestCluster::new().await? else {
        return Ok(());
    };
    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let repo = GitRepo::new()?;
    let agent = cluster.agent_entry(&format!(
        "{}    health_timeout: 10m\n",
        git_agent_yaml("prod", &repo.url(), &[])
    ));
    let server =
        TestServer::start(&git_config_yaml(&redis.url(), cache.path(), "", &[agent])).await?;
    let mut files: Vec<(String, String)> = (0..40)
        .map(|i| {
            (
                format!("cm-{i:02}.yaml"),
                configmap(&format!("cm-{i:02}"), "1"),
            )
        })
        .collect();
    files.push(("web.yaml".into(), never_ready("web")));
    let borrowed: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(path, content)| (path.as_str(), content.as_bytes()))
        .collect();
    let x = repo.commit(&borrowed, &[])?;

    let start = |identity: &str| {
        AgentProcess::start_with(
            &server,
            &agent_token("prod"),
            cluster.agent_kube.clone(),
            identity,
            LEASE,
            &cluster.home,
        )
    };
    let leader = start("replica-a");
    let leases: Api<Lease> = Api::namespaced(cluster.kube.clone(), &cluster.home);
    let lease = || async {
        let lease = leases
            .get_opt("greenlight-agent-prod")
            .await?
            .and_then(|l| l.spec)
            .unwrap_or_default();
        anyhow::Ok(lease)
    };
    server.release(ZERO, &x, 1).await?;
    // Every object written; now waiting for a Deployment that cannot become ready.
    let applied = server.reported("prod", &x, Phase::Applied).await?;
    assert_eq!(applied.objects_done, 41, "{applied:?}");
    let held = lease().await?;
    assert_eq!(held.holder_identity.as_deref(), Some("replica-a"));
    let _standby = start("replica-b");
    // The standby connects and learns the agent's name (the Lease's) from its revision;
    // it stays a standby while the leader renews.
    eventually("the standby's session", || async {
        Ok((server.agent_status("prod").await?.connected).then_some(()))
    })
    .await?;
    let renewed = lease().await?.renew_time.context("the leader renews")?.0;

    // SIGTERM to the leader, mid-apply.
    let metrics = leader.metrics.clone();
    leader.stop().await?;
    assert_eq!(
        metrics
            .applies
            .get_or_create(&vec![("result", "stopped")])
            .get(),
        1,
        "the apply was stopped, not finished"
    );
    let after = lease().await?;
    match after.holder_identity.as_deref() {
        None => assert_eq!(after.lease_duration_seconds, Some(1), "released: {after:?}"),
        Some("replica-b") => {}
        Some(other) => panic!("{other} holds the lease after the leader stopped"),
    }
    let taken = eventually("the standby leads", || async {
        let lease = lease().await?;
        Ok((lease.holder_identity.as_deref() == Some("replica-b")).then_some(lease))
    })
    .await?;
    let acquired = taken.acquire_time.context("acquireTime")?.0;
    let gap = acquired.duration_since(renewed);
    assert!(
        gap < k8s_openapi::jiff::SignedDuration::try_from(LEASE)?,
        "the standby acquired {gap:#} after the leader's last renewal: it waited for expiry"
    );

    // What the leader reported reached the server, and the standby carries on with the same
    // revision.
    let history = server.history("prod").await?;
    assert!(
        history
            .reports
            .iter()
            .any(|r| r.revision == x && r.phase() == Phase::Applied && r.objects_done == 41),
        "{:?}",
        history.reports
    );
    Ok(())
}
