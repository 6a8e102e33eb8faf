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
    /// The server's config, to start another replica (or the next version of it).
    server_config: String,
    kube: KubeApi,
}

async fn world(agent_extra: &str) -> anyhow::Result<World> {
    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let repo = GitRepo::new()?;
    let mut agent = git_agent_yaml("prod", &repo.url(), &[]);
    agent.push_str(agent_extra);
    let server_config = git_config_yaml(&redis.url(), cache.path(), "", &[agent]);
    let server = TestServer::start(&server_config).await?;
    let kube = KubeApi::start().await?;
    // As in a real cluster, the agent's default namespace exists before it deploys there.
    kube.put_object(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}}));
    Ok(World {
        _redis: redis,
        _cache: cache,
        repo,
        server,
        server_config,
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
    // Forgotten rather than remembered: the inventory stays as large as the revision.
    assert_eq!(inventory_names(&w.kube)?, ["a"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_prune_on_later_deletes_only_what_is_removed_from_then_on() -> anyhow::Result<()> {
    let w = world("    prune: false\n").await?;
    let files: Vec<(String, String)> = (0..5)
        .map(|i| (format!("old-{i}.yaml"), configmap(&format!("old-{i}"), "1")))
        .chain([("a.yaml".to_owned(), configmap("a", "1"))])
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_bytes()))
        .collect();
    let first = w.repo.commit(&refs, &[])?;
    let agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    let removed: Vec<String> = (0..5).map(|i| format!("old-{i}.yaml")).collect();
    let removed: Vec<&str> = removed.iter().map(String::as_str).collect();
    let second = w.repo.commit(&[], &removed)?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    assert_eq!(inventory_names(&w.kube)?, ["a"]);
    agent.stop().await?;

    // The operator turns prune on: the same agent on a server with the new config.
    let config = w.server_config.replace(
        "    prune: false\n",
        "    prune: true\n    prune_limit: 2\n",
    );
    let server = TestServer::start(&config).await?;
    let _agent = AgentProcess::start(&server, "prod", w.kube.client(), "replica-a");
    let third = w.repo.commit(
        &[
            ("a.yaml", configmap("a", "3").as_bytes()),
            ("b.yaml", configmap("b", "3").as_bytes()),
        ],
        &[],
    )?;
    server.release(&second, &third, 3).await?;
    server.reported("prod", &third, Phase::Healthy).await?;
    for i in 0..5 {
        let name = format!("old-{i}");
        assert!(
            w.kube.get("v1", "ConfigMap", Some("apps"), &name).is_some(),
            "{name} left git while prune was off: not deleted now"
        );
    }
    let fourth = w.repo.commit(&[], &["b.yaml"])?;
    server.release(&third, &fourth, 4).await?;
    server.reported("prod", &fourth, Phase::Healthy).await?;
    assert!(w.kube.get("v1", "ConfigMap", Some("apps"), "b").is_none());
    assert!(w.kube.get("v1", "ConfigMap", Some("apps"), "a").is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_and_its_custom_resource_ship_together() -> anyhow::Result<()> {
    let w = world("    scope: { cluster_kinds: [CustomResourceDefinition] }\n").await?;
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
    let patches = patches_of(&w.kube, "/configmaps/a");
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
    let w =
        world("    dry_run_strategy: server\n    scope: { namespaces: [apps, nowhere] }\n").await?;
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
    let w = world(
        "    dry_run_strategy: server\n    scope: { namespaces: [apps, 'team*'], cluster_kinds: [Namespace] }\n",
    )
    .await?;
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

/// Writes the agent sent to the API server, other than competing for its Lease and dry runs.
fn writes(kube: &KubeApi) -> Vec<String> {
    kube.requests()
        .into_iter()
        .filter(|r| r.method != "GET" && !r.path.contains("/leases") && !r.query.contains("dryRun"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

/// How many server-side applies reached the object whose path ends with `suffix`.
fn patches_of(kube: &KubeApi, suffix: &str) -> usize {
    kube.requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with(suffix))
        .count()
}

/// The names in the agent's inventory.
fn inventory_names(kube: &KubeApi) -> anyhow::Result<Vec<String>> {
    let Some(inventory) = kube.get(
        "v1",
        "ConfigMap",
        Some(AGENT_NAMESPACE),
        "greenlight-inventory-prod",
    ) else {
        return Ok(Vec::new());
    };
    let entries: Value =
        serde_json::from_str(inventory["data"]["entries"].as_str().unwrap_or("[]"))?;
    Ok(entries
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["key"]["name"].as_str().map(str::to_owned))
        .collect())
}

fn namespace(name: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  annotations: {{{annotations}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_outside_the_scope_fails_before_any_write() -> anyhow::Result<()> {
    // The default scope: the default namespace `apps`, no cluster-scoped kinds.
    let w = world("").await?;
    let system = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: coredns\n  namespace: kube-system\ndata: {Corefile: evil}\n";
    let binding = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: root\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}\nsubjects: [{kind: User, name: mallory}]\n";
    let x = w.repo.commit(
        &[
            ("a.yaml", configmap("first", "1").as_bytes()),
            ("system.yaml", system.as_bytes()),
            ("binding.yaml", binding.as_bytes()),
        ],
        &[],
    )?;
    w.kube.reset_requests();
    let agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &x, 1).await?;
    let failed = w.server.reported("prod", &x, Phase::Failed).await?;
    assert!(
        failed.message.contains(
            "ConfigMap kube-system/coredns: namespace kube-system is not in the agent's scope"
        ),
        "{}",
        failed.message
    );
    assert!(
        failed.message.contains(
            "ClusterRoleBinding root: cluster-scoped kind ClusterRoleBinding is not in the agent's scope"
        ),
        "{}",
        failed.message
    );
    assert_eq!(writes(&w.kube), Vec::<String>::new(), "nothing written");
    assert!(
        w.kube
            .get("v1", "ConfigMap", Some("apps"), "first")
            .is_none()
    );
    drop(agent);

    // Within the scope, the same agent applies.
    let y = w.repo.commit(&[], &["system.yaml", "binding.yaml"])?;
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(&x, &y, 2).await?;
    w.server.reported("prod", &y, Phase::Healthy).await?;
    assert!(
        w.kube
            .get("v1", "ConfigMap", Some("apps"), "first")
            .is_some()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_cannot_write_the_agents_inventory_or_lease() -> anyhow::Result<()> {
    // Even a scope that includes the agent's own namespace.
    let w = world(&format!(
        "    scope: {{ namespaces: [apps, {AGENT_NAMESPACE}] }}\n"
    ))
    .await?;
    let first = w
        .repo
        .commit(&[("a.yaml", configmap("a", "1").as_bytes())], &[])?;
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    let before = w
        .kube
        .get(
            "v1",
            "ConfigMap",
            Some(AGENT_NAMESPACE),
            "greenlight-inventory-prod",
        )
        .expect("inventory");

    // A forged inventory: `a` flipped to adopted (never pruned), and a foreign object the
    // next prune would delete.
    let forged = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: greenlight-inventory-prod\n  namespace: {AGENT_NAMESPACE}\ndata:\n  revision: ''\n  entries: '[{{\"key\":{{\"group\":\"\",\"kind\":\"ConfigMap\",\"namespace\":\"apps\",\"name\":\"a\"}},\"api_version\":\"v1\",\"namespaced\":true,\"adopted\":true}},{{\"key\":{{\"group\":\"\",\"kind\":\"ConfigMap\",\"namespace\":\"apps\",\"name\":\"precious\"}},\"api_version\":\"v1\",\"namespaced\":true}}]'\n"
    );
    let lease = format!(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: greenlight-agent-prod\n  namespace: {AGENT_NAMESPACE}\nspec: {{holderIdentity: mallory, leaseDurationSeconds: 100000}}\n"
    );
    w.kube.reset_requests();
    let second = w.repo.commit(
        &[
            ("a.yaml", configmap("a", "2").as_bytes()),
            ("forged.yaml", forged.as_bytes()),
            ("lease.yaml", lease.as_bytes()),
        ],
        &[],
    )?;
    w.server.release(&first, &second, 2).await?;
    let failed = w.server.reported("prod", &second, Phase::Failed).await?;
    for name in [
        format!("ConfigMap {AGENT_NAMESPACE}/greenlight-inventory-prod"),
        format!("Lease {AGENT_NAMESPACE}/greenlight-agent-prod"),
    ] {
        assert!(
            failed
                .message
                .contains(&format!("{name}: it is the agent's own inventory or Lease")),
            "{}",
            failed.message
        );
    }
    assert_eq!(writes(&w.kube), Vec::<String>::new(), "nothing written");
    let after = w
        .kube
        .get(
            "v1",
            "ConfigMap",
            Some(AGENT_NAMESPACE),
            "greenlight-inventory-prod",
        )
        .expect("inventory");
    assert_eq!(before["data"], after["data"], "inventory untouched");
    assert_eq!(
        w.kube.get("v1", "ConfigMap", Some("apps"), "a").expect("a")["data"]["value"],
        "1"
    );
    let leases = w.kube.list("coordination.k8s.io/v1", "Lease");
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0]["spec"]["holderIdentity"], "replica-a");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_namespace_is_kept_unless_annotated() -> anyhow::Result<()> {
    let w =
        world("    scope: { namespaces: [apps, 'team-*'], cluster_kinds: [Namespace] }\n").await?;
    let first = w.repo.commit(
        &[
            ("kept.yaml", namespace("team-kept", "").as_bytes()),
            (
                "allowed.yaml",
                namespace("team-allowed", "greenlight.dev/prune: allow").as_bytes(),
            ),
            ("a.yaml", configmap("a", "1").as_bytes()),
        ],
        &[],
    )?;
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;

    let second = w.repo.commit(&[], &["kept.yaml", "allowed.yaml"])?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    assert!(
        w.kube.get("v1", "Namespace", None, "team-kept").is_some(),
        "its deletion would cascade"
    );
    assert!(
        w.kube
            .get("v1", "Namespace", None, "team-allowed")
            .is_none(),
        "annotated: pruned"
    );
    let history = w.server.history("prod").await?;
    let applied = history
        .reports
        .iter()
        .find(|r| r.revision == second && r.phase() == Phase::Applied)
        .expect("applied report");
    assert!(
        applied
            .message
            .contains("kept Namespace team-kept (its deletion would cascade)"),
        "{}",
        applied.message
    );
    let action = |name: &str| {
        applied
            .objects
            .iter()
            .find(|o| o.name == name)
            .map(|o| (o.action(), o.message.clone()))
    };
    let (kept, why) = action("team-kept").expect("kept is reported");
    assert_eq!(kept, greenlight::v1::object_result::Action::Unchanged);
    assert!(why.contains("greenlight.dev/prune: allow"), "{why}");
    assert_eq!(
        action("team-allowed").map(|(a, _)| a),
        Some(greenlight::v1::object_result::Action::Pruned)
    );
    // Still remembered: annotating it later lets the next revision prune it.
    assert!(inventory_names(&w.kube)?.contains(&"team-kept".to_owned()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_beyond_the_limit_waits_for_force_prune() -> anyhow::Result<()> {
    let ci_hash = greenlight::digest::sha256_hex(b"ci-prod");
    let w = world(&format!(
        "    prune_limit: 2\n    ci_token_sha256: \"{ci_hash}\"\n"
    ))
    .await?;
    let first = w.repo.commit(
        &[
            ("keep.yaml", configmap("keep", "1").as_bytes()),
            ("b.yaml", configmap("b", "1").as_bytes()),
            ("c.yaml", configmap("c", "1").as_bytes()),
            ("d.yaml", configmap("d", "1").as_bytes()),
        ],
        &[],
    )?;
    let _agent = AgentProcess::start(&w.server, "prod", w.kube.client(), "replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;

    w.kube.reset_requests();
    let second = w.repo.commit(
        &[("keep.yaml", configmap("keep", "2").as_bytes())],
        &["b.yaml", "c.yaml", "d.yaml"],
    )?;
    w.server.release(&first, &second, 2).await?;
    let failed = w.server.reported("prod", &second, Phase::Failed).await?;
    assert!(
        failed
            .message
            .contains("would prune 3 objects, more than the prune limit of 2"),
        "{}",
        failed.message
    );
    assert_eq!(writes(&w.kube), Vec::<String>::new(), "nothing written");
    for name in ["b", "c", "d"] {
        assert!(w.kube.get("v1", "ConfigMap", Some("apps"), name).is_some());
    }

    // A CI token may trigger, but not lift the limit.
    let ci = w
        .server
        .admin_as("ci-prod")
        .await?
        .trigger_sync(greenlight::v1::TriggerSyncRequest {
            name: "prod".into(),
            sha: None,
            force_prune: true,
        })
        .await;
    assert_eq!(
        ci.map(|_| ()).map_err(|s| s.code()),
        Err(tonic::Code::PermissionDenied)
    );
    w.server
        .admin()
        .await?
        .trigger_sync(greenlight::v1::TriggerSyncRequest {
            name: "prod".into(),
            sha: None,
            force_prune: true,
        })
        .await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    for name in ["b", "c", "d"] {
        assert!(
            w.kube.get("v1", "ConfigMap", Some("apps"), name).is_none(),
            "{name} pruned"
        );
    }
    assert_eq!(
        w.kube
            .get("v1", "ConfigMap", Some("apps"), "keep")
            .expect("keep")["data"]["value"],
        "2"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_competes_for_the_same_lease_and_shutdown_hands_over_at_once()
-> anyhow::Result<()> {
    let w = world("").await?;
    // Mid-rotation, two server replicas know the agent by different tokens.
    let rotated = "rotated-token-prod";
    let config = w.server_config.replace(
        &greenlight::digest::sha256_hex(agent_token("prod").as_bytes()),
        &greenlight::digest::sha256_hex(rotated.as_bytes()),
    );
    assert_ne!(config, w.server_config);
    let other = TestServer::start(&config).await?;
    // Long enough that only a release, not an expiry, explains a quick takeover.
    let lease = std::time::Duration::from_secs(30);
    let first = w
        .repo
        .commit(&[("a.yaml", configmap("a", "1").as_bytes())], &[])?;
    let old = AgentProcess::start_with(
        &w.server,
        &agent_token("prod"),
        w.kube.client(),
        "replica-a",
        lease,
    );
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    let _new = AgentProcess::start_with(&other, rotated, w.kube.client(), "replica-b", lease);
    // The new agent receives the revision too, and with it its name.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;

    w.kube.reset_requests();
    let second = w
        .repo
        .commit(&[("a.yaml", configmap("a", "2").as_bytes())], &[])?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    let patches = patches_of(&w.kube, "/configmaps/a");
    assert_eq!(patches, 1, "one leader applied");
    let leases = w.kube.list("coordination.k8s.io/v1", "Lease");
    assert_eq!(leases.len(), 1, "one Lease for the agent: {leases:?}");
    assert_eq!(leases[0]["metadata"]["name"], "greenlight-agent-prod");
    assert_eq!(leases[0]["spec"]["holderIdentity"], "replica-a");

    // SIGTERM: the old agent releases the Lease, the new one takes over well before it
    // could have expired.
    let stopped = std::time::Instant::now();
    old.stop().await?;
    let released = w.kube.list("coordination.k8s.io/v1", "Lease");
    assert!(
        released[0]["spec"]["holderIdentity"].is_null()
            || released[0]["spec"]["holderIdentity"] == "replica-b",
        "{released:?}"
    );
    eventually("the new agent leads", || async {
        let leases = w.kube.list("coordination.k8s.io/v1", "Lease");
        Ok((leases[0]["spec"]["holderIdentity"] == "replica-b").then_some(()))
    })
    .await?;
    assert!(stopped.elapsed() < lease, "{:?}", stopped.elapsed());
    let third = w
        .repo
        .commit(&[("a.yaml", configmap("a", "3").as_bytes())], &[])?;
    other.release(&second, &third, 3).await?;
    other.reported("prod", &third, Phase::Healthy).await?;
    assert_eq!(
        w.kube.get("v1", "ConfigMap", Some("apps"), "a").expect("a")["data"]["value"],
        "3"
    );
    Ok(())
}
