//! The agent against a real cluster: the one `GREENLIGHT_TEST_KUBECONFIG` names, else the
//! suite's own control plane (in CI, always one of the two).

use greenlight::v1::Phase;
use greenlight_e2e::control_plane;
use greenlight_e2e::*;
use kube::api::{Api, DeleteParams};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_applies_and_prunes_on_a_real_cluster() -> anyhow::Result<()> {
    install_crypto();
    // The cluster named by GREENLIGHT_TEST_KUBECONFIG, else the suite's own control plane.
    let path = match std::env::var_os("GREENLIGHT_TEST_KUBECONFIG") {
        Some(path) => std::path::PathBuf::from(path),
        None => match greenlight_e2e::control_plane::ControlPlane::shared().await? {
            Some(plane) => plane.kubeconfig().to_owned(),
            None => {
                // Written to the handle, not through eprintln!, so the harness does not swallow it.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "real_cluster: skipped: set GREENLIGHT_TEST_KUBECONFIG to a kubeconfig, or build the control plane"
                );
                return Ok(());
            }
        },
    };
    let client = control_plane::client_from(&path).await?;
    let namespace = format!("greenlight-e2e-{:08x}", std::process::id());
    control_plane::create_namespace(&client, &namespace).await?;
    let result = scenario(client.clone(), &namespace).await;
    control_plane::namespaces(&client)
        .delete(&namespace, &DeleteParams::background())
        .await?;
    result
}

async fn scenario(client: kube::Client, namespace: &str) -> anyhow::Result<()> {
    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let repo = GitRepo::new()?;
    let mut agent = git_agent_yaml("real", &repo.url(), &[]);
    agent = agent.replace(
        "default_namespace: apps",
        &format!("default_namespace: {namespace}"),
    );
    let server =
        TestServer::start(&git_config_yaml(&redis.url(), cache.path(), "", &[agent])).await?;
    let settings = greenlight_agent::run::Settings {
        target: greenlight_agent::session::Target {
            server: server.grpc_url(),
            token: agent_token("real"),
            ca_file: None,
        },
        namespace: namespace.to_owned(),
        identity: "real-cluster-test".to_owned(),
        lease_duration: std::time::Duration::from_secs(15),
        metrics: std::sync::Arc::default(),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(greenlight_agent::run::run(
        settings,
        client.clone(),
        shutdown.clone(),
    ));

    let configmap = |name: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  from: greenlight\n"
        )
    };
    let first = repo.commit(
        &[
            ("a.yaml", configmap("greenlight-a").as_bytes()),
            ("b.yaml", configmap("greenlight-b").as_bytes()),
        ],
        &[],
    )?;
    server.push("main", ZERO, &first).await?;
    server
        .pipeline("main", &first, 1, "success", "push")
        .await?;
    let healthy = |sha: String| {
        let server = &server;
        async move {
            eventually("a healthy report", || async {
                let status = server.agent_status("real").await?;
                Ok(status
                    .last_report
                    .filter(|r| r.revision == sha && r.phase() == Phase::Healthy))
            })
            .await
        }
    };
    healthy(first.clone()).await?;
    let configmaps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client, namespace);
    assert!(configmaps.get_opt("greenlight-b").await?.is_some());

    let second = repo.commit(&[], &["b.yaml"])?;
    server.push("main", &first, &second).await?;
    server
        .pipeline("main", &second, 2, "success", "push")
        .await?;
    healthy(second).await?;
    assert!(
        configmaps.get_opt("greenlight-b").await?.is_none(),
        "pruned"
    );
    assert!(configmaps.get_opt("greenlight-a").await?.is_some());

    shutdown.cancel();
    let _ = running.await;
    Ok(())
}
