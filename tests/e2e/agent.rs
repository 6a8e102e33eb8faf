//! The agent end to end: server, agent, a git repository and the test API server.

use greenlight::v1::Phase;
use greenlight_e2e::kube_api::KubeApi;
use greenlight_e2e::*;
use serde_json::{Value, json};

const ZERO: &str = "0000000000000000000000000000000000000000";

struct World {
    _redis: Redis,
    _cache: tempfile::TempDir,
    repo: GitRepo,
    server: TestServer,
    kube: KubeApi,
}

async fn world(agent_extra: &str) -> anyhow::Result<World> {
    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let repo = GitRepo::new()?;
    let mut agent = git_agent_yaml("prod", &repo.url(), &[]);
    agent.push_str(agent_extra);
    let server =
        TestServer::start(&git_config_yaml(&redis.url(), cache.path(), "", &[agent])).await?;
    let kube = KubeApi::start().await?;
    // As in a real cluster, the agent's default namespace exists before it deploys there.
    kube.put_object(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}}));
    Ok(World {
        _redis: redis,
        _cache: cache,
        repo,
        server,
        kube,
    })
}

impl World {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_pipeline_applies_objects_and_reports_healthy() -> anyhow::Result<()> {
    let w = world("").await?;
    let manifests = format!("{}---\n{DEPLOYMENT}", configmap("settings", "one"));
    let x = w.repo.commit(&[("app.yaml", manifests.as_bytes())], &[])?;
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &x, 1).await?;
    w.server.reported("prod", &x, Phase::Healthy).await?;

    let settings = w
        .kube
        .get("v1", "ConfigMap", Some("apps"), "settings")
        .expect("configmap applied");
    assert_eq!(settings["data"]["value"], "one");
    assert_eq!(
        settings["metadata"]["labels"]["greenlight.dev/inventory"],
        "prod"
    );
    assert!(
        w.kube
            .get("apps/v1", "Deployment", Some("apps"), "web")
            .is_some()
    );

    let inventory = w
        .kube
        .get(
            "v1",
            "ConfigMap",
            Some(AGENT_NAMESPACE),
            "greenlight-inventory-prod",
        )
        .expect("inventory");
    let entries: Value =
        serde_json::from_str(inventory["data"]["entries"].as_str().unwrap_or("[]"))?;
    let names: Vec<&str> = entries
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["key"]["name"].as_str())
        .collect();
    assert!(
        names.contains(&"settings") && names.contains(&"web"),
        "{names:?}"
    );
    assert_eq!(inventory["data"]["revision"], x.as_str());

    let history = w.server.history("prod").await?;
    let phases: Vec<Phase> = history.reports.iter().map(|r| r.phase()).collect();
    assert!(
        phases.contains(&Phase::Applied) && phases.contains(&Phase::Healthy),
        "{phases:?}"
    );
    let applied = history
        .reports
        .iter()
        .find(|r| r.phase() == Phase::Applied)
        .cloned()
        .unwrap_or_default();
    assert_eq!(applied.objects.len(), 2, "per-object results");
    let status = w.server.agent_status("prod").await?;
    assert_eq!(status.applied_revision, x);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_files_are_pruned_but_foreign_objects_are_not() -> anyhow::Result<()> {
    let w = world("").await?;
    let first = w.repo.commit(
        &[
            ("keep.yaml", configmap("keep", "1").as_bytes()),
            ("gone.yaml", configmap("gone", "1").as_bytes()),
        ],
        &[],
    )?;
    // Same kind and name as ours, in another namespace, made by someone else.
    w.kube.put_object(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gone", "namespace": "default"}, "data": {"owner": "someone else"}}));
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    assert!(
        w.kube
            .get("v1", "ConfigMap", Some("apps"), "gone")
            .is_some()
    );

    let second = w.repo.commit(&[], &["gone.yaml"])?;
    w.server.release(&first, &second, 2).await?;
    let applied = eventually("applied report with a prune", || async {
        let history = w.server.history("prod").await?;
        Ok(history
            .reports
            .into_iter()
            .find(|r| r.revision == second && r.phase() == Phase::Applied))
    })
    .await?;
    assert!(
        applied.objects.iter().any(
            |o| o.name == "gone" && o.action() == greenlight::v1::object_result::Action::Pruned
        )
    );
    assert!(
        w.kube
            .get("v1", "ConfigMap", Some("apps"), "gone")
            .is_none(),
        "pruned"
    );
    assert!(
        w.kube
            .get("v1", "ConfigMap", Some("apps"), "keep")
            .is_some()
    );
    let foreign = w
        .kube
        .get("v1", "ConfigMap", Some("default"), "gone")
        .expect("foreign object untouched");
    assert_eq!(foreign["data"]["owner"], "someone else");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_false_deletes_nothing() -> anyhow::Result<()> {
    let w = world("    prune: false\n").await?;
    let first = w.repo.commit(
        &[
            ("a.yaml", configmap("a", "1").as_bytes()),
            ("b.yaml", configmap("b", "1").as_bytes()),
        ],
        &[],
    )?;
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    let second = w.repo.commit(&[], &["b.yaml"])?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    assert!(w.kube.get("v1", "ConfigMap", Some("apps"), "b").is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_and_its_custom_resource_ship_together() -> anyhow::Result<()> {
    let w = world("").await?;
    let crd = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.example.com\nspec:\n  group: example.com\n  scope: Namespaced\n  names: {plural: widgets, singular: widget, kind: Widget}\n  versions:\n    - name: v1\n      served: true\n      storage: true\n      schema:\n        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}\n";
    let widget =
        "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: gizmo\nspec:\n  size: 3\n";
    let x = w.repo.commit(
        &[
            ("crd.yaml", crd.as_bytes()),
            ("widget.yaml", widget.as_bytes()),
        ],
        &[],
    )?;
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &x, 1).await?;
    w.server.reported("prod", &x, Phase::Healthy).await?;
    assert!(
        w.kube
            .get(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                None,
                "widgets.example.com"
            )
            .is_some()
    );
    let gizmo = w
        .kube
        .get("example.com/v1", "Widget", Some("apps"), "gizmo")
        .expect("custom resource applied");
    assert_eq!(gizmo["spec"]["size"], 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_document_writes_nothing_and_names_file_and_document() -> anyhow::Result<()> {
    let w = world("").await?;
    let bad = format!(
        "{}---\nkind: ConfigMap\nmetadata: {{name: broken}}\n",
        configmap("fine", "1")
    );
    let x = w.repo.commit(
        &[
            ("a.yaml", configmap("first", "1").as_bytes()),
            ("z.yaml", bad.as_bytes()),
        ],
        &[],
    )?;
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &x, 1).await?;
    let failed = w.server.reported("prod", &x, Phase::Failed).await?;
    assert!(
        failed.message.contains("z.yaml document 1"),
        "{}",
        failed.message
    );
    assert!(failed.message.contains("apiVersion"), "{}", failed.message);
    assert!(
        w.kube
            .get("v1", "ConfigMap", Some("apps"), "first")
            .is_none(),
        "nothing written"
    );
    assert!(
        w.kube
            .get("v1", "ConfigMap", Some("apps"), "fine")
            .is_none(),
        "nothing written"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_that_never_becomes_available_is_degraded() -> anyhow::Result<()> {
    let w = world("    health_timeout: 2s\n").await?;
    w.kube.set_auto_rollout(false);
    let x = w.repo.commit(&[("web.yaml", DEPLOYMENT.as_bytes())], &[])?;
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &x, 1).await?;
    let degraded = w.server.reported("prod", &x, Phase::Degraded).await?;
    assert!(
        degraded.message.contains("Deployment apps/web"),
        "{}",
        degraded.message
    );
    assert!(degraded.objects.iter().any(|o| o.name == "web"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_revision_converges_after_restart() -> anyhow::Result<()> {
    let w = world("").await?;
    let files: Vec<(String, String)> = (0..200)
        .map(|i| {
            (
                format!("cm/{i:03}.yaml"),
                configmap(&format!("cm-{i:03}"), "v1"),
            )
        })
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_bytes()))
        .collect();
    let x = w.repo.commit(&refs, &[])?;
    let agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &x, 1).await?;
    let count = || {
        w.kube
            .list("v1", "ConfigMap")
            .iter()
            .filter(|o| {
                o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("cm-"))
            })
            .count()
    };
    eventually("the first objects applied", || async {
        Ok((count() > 0).then_some(()))
    })
    .await?;
    agent.kill();
    let _restarted = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.reported("prod", &x, Phase::Healthy).await?;
    assert_eq!(count(), 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_applies_and_another_takes_over() -> anyhow::Result<()> {
    let w = world("").await?;
    let first = w
        .repo
        .commit(&[("a.yaml", configmap("a", "1").as_bytes())], &[])?;
    let leader = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    let _standby = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-b");

    w.kube.reset_requests();
    let second = w
        .repo
        .commit(&[("a.yaml", configmap("a", "2").as_bytes())], &[])?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    let patches = w
        .kube
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/configmaps/a"))
        .count();
    assert_eq!(patches, 1, "one replica applied");

    leader.kill();
    let third = w
        .repo
        .commit(&[("a.yaml", configmap("a", "3").as_bytes())], &[])?;
    w.server.release(&second, &third, 3).await?;
    w.server.reported("prod", &third, Phase::Healthy).await?;
    assert_eq!(
        w.kube.get("v1", "ConfigMap", Some("apps"), "a").expect("a")["data"]["value"],
        "3"
    );
    let lease = w.kube.list("coordination.k8s.io/v1", "Lease");
    assert_eq!(lease[0]["spec"]["holderIdentity"], "replica-b");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_corrected_by_the_next_reconcile() -> anyhow::Result<()> {
    let w = world("    reconcile_interval: 1s\n").await?;
    let x = w
        .repo
        .commit(&[("a.yaml", configmap("a", "desired").as_bytes())], &[])?;
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &x, 1).await?;
    w.server.reported("prod", &x, Phase::Healthy).await?;
    let mut changed = w.kube.get("v1", "ConfigMap", Some("apps"), "a").expect("a");
    changed["data"]["value"] = json!("edited by hand");
    w.kube.put_object(changed);
    eventually("drift corrected", || async {
        let value = w
            .kube
            .get("v1", "ConfigMap", Some("apps"), "a")
            .map(|o| o["data"]["value"].clone());
        Ok((value == Some(json!("desired"))).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_dry_run_rejection_writes_nothing() -> anyhow::Result<()> {
    let w = world("    dry_run_strategy: server\n").await?;
    // The second object's namespace does not exist: the API server refuses it, even in a dry run.
    let stray = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: stray\n  namespace: nowhere\ndata: {a: b}\n";
    let x = w.repo.commit(
        &[
            ("a.yaml", configmap("first", "1").as_bytes()),
            ("b.yaml", stray.as_bytes()),
        ],
        &[],
    )?;
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &x, 1).await?;
    let failed = w.server.reported("prod", &x, Phase::Failed).await?;
    assert!(failed.message.contains("dry run"), "{}", failed.message);
    assert!(failed.message.contains("nowhere"), "{}", failed.message);
    assert!(
        w.kube
            .get("v1", "ConfigMap", Some("apps"), "first")
            .is_none(),
        "nothing written"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_dry_run_passes_for_objects_in_a_namespace_the_revision_creates()
-> anyhow::Result<()> {
    let w = world("    dry_run_strategy: server\n").await?;
    let namespace = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team\n";
    let inside = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: inside\n  namespace: team\ndata: {a: b}\n";
    let x = w.repo.commit(
        &[
            ("ns.yaml", namespace.as_bytes()),
            ("inside.yaml", inside.as_bytes()),
            ("a.yaml", configmap("first", "1").as_bytes()),
        ],
        &[],
    )?;
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &x, 1).await?;
    w.server.reported("prod", &x, Phase::Healthy).await?;
    assert!(
        w.kube
            .get("v1", "ConfigMap", Some("team"), "inside")
            .is_some()
    );
    assert!(
        w.kube
            .get("v1", "ConfigMap", Some("apps"), "first")
            .is_some()
    );
    let history = w.server.history("prod").await?;
    let applied = history
        .reports
        .iter()
        .find(|r| r.revision == x && r.phase() == Phase::Applied)
        .expect("applied report");
    assert!(
        applied.message.contains("dry run skipped for 1 objects")
            && applied.message.contains("team"),
        "{}",
        applied.message
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_that_existed_before_are_adopted_and_never_pruned() -> anyhow::Result<()> {
    let w = world("").await?;
    // Made by someone else, before the agent ever applied anything of that name.
    w.kube
        .put_object(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "legacy", "namespace": "apps"}, "data": {"value": "old"}}));
    let first = w.repo.commit(
        &[
            ("legacy.yaml", configmap("legacy", "1").as_bytes()),
            ("keep.yaml", configmap("keep", "1").as_bytes()),
        ],
        &[],
    )?;
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    let legacy = w
        .kube
        .get("v1", "ConfigMap", Some("apps"), "legacy")
        .expect("legacy");
    assert_eq!(
        legacy["data"]["value"], "1",
        "applied like any other object"
    );

    let second = w.repo.commit(&[], &["legacy.yaml"])?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    let legacy = w
        .kube
        .get("v1", "ConfigMap", Some("apps"), "legacy")
        .expect("an adopted object is never pruned");
    assert!(
        legacy["metadata"]["labels"]["greenlight.dev/inventory"].is_null(),
        "let go: {legacy}"
    );
    let history = w.server.history("prod").await?;
    let applied = history
        .reports
        .iter()
        .find(|r| r.revision == second && r.phase() == Phase::Applied)
        .expect("applied report");
    assert!(
        applied.objects.iter().any(|o| o.name == "legacy"
            && o.message == "not pruned: existed before the agent adopted it"),
        "{applied:?}"
    );

    // Applied again later, it is judged afresh: still not the agent's to delete.
    let third = w
        .repo
        .commit(&[("legacy.yaml", configmap("legacy", "3").as_bytes())], &[])?;
    w.server.release(&second, &third, 3).await?;
    w.server.reported("prod", &third, Phase::Healthy).await?;
    let fourth = w.repo.commit(&[], &["legacy.yaml"])?;
    w.server.release(&third, &fourth, 4).await?;
    w.server.reported("prod", &fourth, Phase::Healthy).await?;
    assert!(
        w.kube
            .get("v1", "ConfigMap", Some("apps"), "legacy")
            .is_some()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_revision_prunes_nothing_and_fails() -> anyhow::Result<()> {
    let w = world("").await?;
    let first = w
        .repo
        .commit(&[("a.yaml", configmap("a", "1").as_bytes())], &[])?;
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;

    let second = w
        .repo
        .commit(&[("a.yaml", b"# nothing here any more\n")], &[])?;
    w.server.release(&first, &second, 2).await?;
    let failed = w.server.reported("prod", &second, Phase::Failed).await?;
    assert!(
        failed
            .message
            .contains("revision has no objects; refusing to prune 1 objects"),
        "{}",
        failed.message
    );
    assert!(w.kube.get("v1", "ConfigMap", Some("apps"), "a").is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kind_writes_nothing_and_names_the_kind() -> anyhow::Result<()> {
    let w = world("").await?;
    let gadget = "apiVersion: example.com/v1\nkind: Gadget\nmetadata:\n  name: g\n";
    let x = w.repo.commit(
        &[
            ("a.yaml", configmap("first", "1").as_bytes()),
            ("gadget.yaml", gadget.as_bytes()),
        ],
        &[],
    )?;
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &x, 1).await?;
    let failed = w.server.reported("prod", &x, Phase::Failed).await?;
    assert!(
        failed
            .message
            .contains("unknown kind: Gadget (example.com/v1)"),
        "{}",
        failed.message
    );
    assert!(
        w.kube
            .get("v1", "ConfigMap", Some("apps"), "first")
            .is_none(),
        "nothing written"
    );
    Ok(())
}
