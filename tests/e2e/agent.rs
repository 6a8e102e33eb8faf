//! The agent end to end against a real control plane: the server, an agent, a git repository,
//! and kube-apiserver with its controllers and a kwok node (tests/src/control_plane.rs). Each
//! test deploys into namespaces of its own, so they share one control plane in parallel.

use anyhow::Context;
use greenlight::v1::Phase;
use greenlight::v1::object_result::Action;
use greenlight_e2e::control_plane::{ControlPlane, TestCluster};
use greenlight_e2e::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::{Value, json};

/// How long the agents' Lease lasts without renewal in the leader election tests.
const LEASE: std::time::Duration = std::time::Duration::from_secs(3);

struct World {
    _redis: Redis,
    _cache: tempfile::TempDir,
    repo: GitRepo,
    server: TestServer,
    /// The server's config, to start another replica (or the next version of it).
    server_config: String,
    plane: &'static ControlPlane,
    /// The tests' own client, acting as an administrator.
    kube: kube::Client,
    /// The agent's client: the audit log tells its requests by its user.
    agent_kube: kube::Client,
    /// The agent's default namespace.
    apps: String,
    /// Where the agent keeps its inventory and Lease.
    home: String,
}

/// A world whose agent `prod` has the extra settings `agent_extra`, in which `APPS` stands for
/// its default namespace and `HOME` for its own; `None` when no control plane is built.
async fn world(agent_extra: &str) -> anyhow::Result<Option<World>> {
    install_crypto();
    let Some(TestCluster {
        plane,
        kube,
        agent_kube,
        apps,
        home,
    }) = TestCluster::new().await?
    else {
        return Ok(None);
    };
    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let repo = GitRepo::new()?;
    let mut agent = git_agent_yaml("prod", &repo.url(), &[]).replace(
        "default_namespace: apps",
        &format!("default_namespace: {apps}"),
    );
    agent.push_str(&agent_extra.replace("APPS", &apps).replace("HOME", &home));
    let server_config = git_config_yaml(&redis.url(), cache.path(), "", &[agent]);
    let server = TestServer::start(&server_config).await?;
    Ok(Some(World {
        _redis: redis,
        _cache: cache,
        repo,
        server,
        server_config,
        plane,
        agent_kube,
        kube,
        apps,
        home,
    }))
}

/// The test's body runs only where a control plane is built (always in CI).
macro_rules! world {
    ($extra:expr) => {
        match world($extra).await? {
            Some(w) => w,
            None => return Ok(()),
        }
    };
}

impl World {
    /// Starts replica `identity` of agent `prod`.
    fn agent(&self, identity: &str) -> AgentProcess {
        AgentProcess::start_in(
            &self.server,
            "prod",
            self.agent_kube.clone(),
            identity,
            &self.home,
        )
    }

    async fn api(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
    ) -> anyhow::Result<Api<DynamicObject>> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (resource, _) = kube::discovery::pinned_kind(&self.kube, &gvk).await?;
        Ok(match namespace {
            Some(namespace) => Api::namespaced_with(self.kube.clone(), namespace, &resource),
            None => Api::all_with(self.kube.clone(), &resource),
        })
    }

    /// The object as the API server has it, or `None`.
    async fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> anyhow::Result<Option<Value>> {
        let object = self
            .api(api_version, kind, namespace)
            .await?
            .get_opt(name)
            .await?;
        Ok(object.map(serde_json::to_value).transpose()?)
    }

    /// ConfigMap `name` of the default namespace.
    async fn configmap(&self, name: &str) -> anyhow::Result<Option<Value>> {
        let apps = self.apps.clone();
        self.get("v1", "ConfigMap", Some(&apps), name).await
    }

    /// The `value` of ConfigMap `name` of the default namespace.
    async fn value(&self, name: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .configmap(name)
            .await?
            .and_then(|o| o["data"]["value"].as_str().map(str::to_owned)))
    }

    /// Applies `object` as another field manager would, taking what it sets.
    async fn put(&self, object: Value) -> anyhow::Result<()> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default().to_owned();
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let namespace = object["metadata"]["namespace"].as_str().map(str::to_owned);
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.api(&api_version, &kind, namespace.as_deref())
            .await?
            .patch(
                &name,
                &PatchParams::apply("someone-else").force(),
                &Patch::Apply(&object),
            )
            .await?;
        Ok(())
    }

    /// The ConfigMaps of the default namespace whose names start with `prefix`.
    async fn count_configmaps(&self, prefix: &str) -> anyhow::Result<usize> {
        let list = self
            .api("v1", "ConfigMap", Some(&self.apps.clone()))
            .await?
            .list_metadata(&ListParams::default())
            .await?;
        Ok(list
            .items
            .iter()
            .filter(|o| {
                o.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .count())
    }

    /// The agent's Leases.
    async fn leases(&self) -> anyhow::Result<Vec<Value>> {
        let list = self
            .api("coordination.k8s.io/v1", "Lease", Some(&self.home.clone()))
            .await?
            .list(&ListParams::default())
            .await?;
        Ok(list
            .items
            .into_iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()?)
    }

    /// The holder of the agent's Lease.
    async fn holder(&self) -> anyhow::Result<Value> {
        let leases = self.leases().await?;
        Ok(leases
            .first()
            .map(|l| l["spec"]["holderIdentity"].clone())
            .unwrap_or(Value::Null))
    }

    /// The agent's inventory ConfigMap.
    async fn inventory(&self) -> anyhow::Result<Option<Value>> {
        let home = self.home.clone();
        self.get("v1", "ConfigMap", Some(&home), "greenlight-inventory-prod")
            .await
    }

    /// The names in the agent's inventory.
    async fn inventory_names(&self) -> anyhow::Result<Vec<String>> {
        let Some(inventory) = self.inventory().await? else {
            return Ok(Vec::new());
        };
        let Some(objects) = inventory["data"]["objects"].as_str() else {
            return Ok(Vec::new());
        };
        Ok(greenlight_agent::inventory::record::decode(objects)?
            .into_iter()
            .map(|entry| entry.key.name)
            .collect())
    }

    /// A mark in the API server's audit log.
    fn mark(&self) -> u64 {
        self.plane.audit_mark()
    }

    /// The agent's writes since `mark` in its namespaces, and to the cluster-scoped objects
    /// named in `cluster`, other than competing for its Lease and dry runs.
    fn writes(&self, mark: u64, cluster: &[&str]) -> anyhow::Result<Vec<String>> {
        Ok(self
            .plane
            .agent_requests(mark, &[&self.apps, &self.home])?
            .into_iter()
            .filter(|r| r.is_write() && r.resource != "leases")
            .filter(|r| r.namespace.is_some() || cluster.contains(&r.name.as_str()))
            .map(|r| format!("{} {}", r.verb, r.uri))
            .collect())
    }

    /// The first Applied report of `sha` the server's history keeps.
    async fn applied(&self, sha: &str) -> anyhow::Result<greenlight::v1::StatusReport> {
        eventually(&format!("an applied report for {sha}"), || async {
            Ok(self
                .server
                .history("prod")
                .await?
                .reports
                .into_iter()
                .find(|r| r.revision == sha && r.phase() == Phase::Applied))
        })
        .await
    }

    /// How many Healthy reports of `sha` the server's history keeps: one per reconcile.
    async fn healthy_reports(&self, sha: &str) -> anyhow::Result<usize> {
        Ok(self
            .server
            .history("prod")
            .await?
            .reports
            .iter()
            .filter(|r| r.revision == sha && r.phase() == Phase::Healthy)
            .count())
    }

    /// How many server-side applies (not dry runs) reached ConfigMap `name` since `mark`.
    fn patches_of(&self, mark: u64, name: &str) -> anyhow::Result<usize> {
        Ok(self
            .plane
            .agent_requests(mark, &[&self.apps])?
            .iter()
            .filter(|r| r.is_write() && r.resource == "configmaps" && r.name == name)
            .count())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_pipeline_applies_objects_and_reports_healthy() -> anyhow::Result<()> {
    let w = world!("");
    let manifests = format!("{}---\n{DEPLOYMENT}", configmap("settings", "one"));
    let x = w.repo.commit(&[("app.yaml", manifests.as_bytes())], &[])?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &x, 1).await?;
    // The Deployment's pods are scheduled onto the kwok node and become Ready there.
    w.server.reported("prod", &x, Phase::Healthy).await?;

    // As kubectl shows it: what the revision declared, owned by the manager `greenlight`.
    let shown: Value = serde_json::from_str(&w.plane.kubectl_ok(&[
        "get",
        "configmap",
        "settings",
        "-n",
        &w.apps,
        "-o",
        "json",
        "--show-managed-fields",
    ])?)?;
    assert_eq!(shown["data"], json!({"value": "one"}));
    assert_eq!(
        shown["metadata"]["labels"]["greenlight.dev/inventory"],
        "prod"
    );
    let managers: Vec<(&str, &str)> = shown["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| Some((m["manager"].as_str()?, m["operation"].as_str()?)))
        .collect();
    assert_eq!(managers, [("greenlight", "Apply")]);
    let web = w
        .get("apps/v1", "Deployment", Some(&w.apps), "web")
        .await?
        .expect("deployment applied");
    assert_eq!(web["spec"]["replicas"], 2);
    assert_eq!(web["status"]["availableReplicas"], 2, "rolled out: {web}");

    let inventory = w.inventory().await?.expect("inventory");
    let names = w.inventory_names().await?;
    assert!(
        names.contains(&"settings".to_owned()) && names.contains(&"web".to_owned()),
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
async fn a_field_another_manager_owns_is_refused_without_force_and_taken_with_it()
-> anyhow::Result<()> {
    let w = world!("    force_conflicts: false\n");
    w.put(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "shared", "namespace": w.apps}, "data": {"value": "theirs"}}))
        .await?;
    let x = w.repo.commit(
        &[("shared.yaml", configmap("shared", "ours").as_bytes())],
        &[],
    )?;
    let agent = w.agent("replica-a");
    w.server.release(ZERO, &x, 1).await?;
    let failed = w.server.reported("prod", &x, Phase::Failed).await?;
    assert!(
        failed.message.contains("conflict") && failed.message.contains("someone-else"),
        "the API server's reason: {}",
        failed.message
    );
    assert_eq!(w.value("shared").await?.as_deref(), Some("theirs"));
    agent.stop().await?;

    // With force (the default), the same revision takes the field.
    let config = w.server_config.replace("    force_conflicts: false\n", "");
    let server = TestServer::start(&config).await?;
    let _agent =
        AgentProcess::start_in(&server, "prod", w.agent_kube.clone(), "replica-a", &w.home);
    server.release(ZERO, &x, 1).await?;
    server.reported("prod", &x, Phase::Healthy).await?;
    assert_eq!(w.value("shared").await?.as_deref(), Some("ours"));
    let shared = w.configmap("shared").await?.expect("shared");
    let owner = shared["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["fieldsV1"]["f:data"]["f:value"].is_object())
        .map(|m| m["manager"].clone());
    assert_eq!(owner, Some(json!("greenlight")), "{shared}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_files_are_pruned_but_foreign_objects_are_not() -> anyhow::Result<()> {
    let w = world!("");
    let other = w.plane.namespace(&w.kube, "other").await?;
    let first = w.repo.commit(
        &[
            ("keep.yaml", configmap("keep", "1").as_bytes()),
            ("gone.yaml", configmap("gone", "1").as_bytes()),
        ],
        &[],
    )?;
    // Same kind and name as ours, in another namespace, made by someone else.
    w.put(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gone", "namespace": other}, "data": {"owner": "someone else"}})).await?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    assert!(w.configmap("gone").await?.is_some());

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
    w.server.reported("prod", &second, Phase::Healthy).await?;
    assert!(w.configmap("gone").await?.is_none(), "pruned");
    assert!(w.configmap("keep").await?.is_some());
    let foreign = w
        .get("v1", "ConfigMap", Some(&other), "gone")
        .await?
        .expect("foreign object untouched");
    assert_eq!(foreign["data"]["owner"], "someone else");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_false_deletes_nothing() -> anyhow::Result<()> {
    let w = world!("    prune: false\n");
    let first = w.repo.commit(
        &[
            ("a.yaml", configmap("a", "1").as_bytes()),
            ("b.yaml", configmap("b", "1").as_bytes()),
        ],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    let second = w.repo.commit(&[], &["b.yaml"])?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    assert!(w.configmap("b").await?.is_some());
    // Forgotten rather than remembered: the inventory stays as large as the revision.
    assert_eq!(w.inventory_names().await?, ["a"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_prune_on_later_deletes_only_what_is_removed_from_then_on() -> anyhow::Result<()> {
    let w = world!("    prune: false\n");
    let files: Vec<(String, String)> = (0..5)
        .map(|i| (format!("old-{i}.yaml"), configmap(&format!("old-{i}"), "1")))
        .chain([("a.yaml".to_owned(), configmap("a", "1"))])
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_bytes()))
        .collect();
    let first = w.repo.commit(&refs, &[])?;
    let agent = w.agent("replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    let removed: Vec<String> = (0..5).map(|i| format!("old-{i}.yaml")).collect();
    let removed: Vec<&str> = removed.iter().map(String::as_str).collect();
    let second = w.repo.commit(&[], &removed)?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    assert_eq!(w.inventory_names().await?, ["a"]);
    agent.stop().await?;

    // The operator turns prune on: the same agent on a server with the new config.
    let config = w.server_config.replace(
        "    prune: false\n",
        "    prune: true\n    prune_limit: 2\n",
    );
    let server = TestServer::start(&config).await?;
    let _agent =
        AgentProcess::start_in(&server, "prod", w.agent_kube.clone(), "replica-a", &w.home);
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
            w.configmap(&name).await?.is_some(),
            "{name} left git while prune was off: not deleted now"
        );
    }
    let fourth = w.repo.commit(&[], &["b.yaml"])?;
    server.release(&third, &fourth, 4).await?;
    server.reported("prod", &fourth, Phase::Healthy).await?;
    assert!(w.configmap("b").await?.is_none());
    assert!(w.configmap("a").await?.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_and_its_custom_resources_ship_together() -> anyhow::Result<()> {
    let w = world!("    scope: { cluster_kinds: [CustomResourceDefinition] }\n");
    // A group of this test's own: discovery of a group nobody served a moment ago is what a
    // real API server makes the agent wait for.
    let group = format!("{}.example.com", w.apps);
    let crd = format!(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.{group}\nspec:\n  group: {group}\n  scope: Namespaced\n  names: {{plural: widgets, singular: widget, kind: Widget}}\n  versions:\n    - name: v1\n      served: true\n      storage: true\n      schema:\n        openAPIV3Schema:\n          type: object\n          properties:\n            spec: {{type: object, properties: {{size: {{type: integer}}}}}}\n"
    );
    let widget = |name: &str, size: u32| {
        format!(
            "apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: {name}\nspec:\n  size: {size}\n"
        )
    };
    let x = w.repo.commit(
        &[
            ("crd.yaml", crd.as_bytes()),
            ("widget.yaml", widget("gizmo", 3).as_bytes()),
            ("widget-2.yaml", widget("doohickey", 5).as_bytes()),
        ],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &x, 1).await?;
    w.server.reported("prod", &x, Phase::Healthy).await?;
    assert!(
        w.get(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            None,
            &format!("widgets.{group}")
        )
        .await?
        .is_some()
    );
    for (name, size) in [("gizmo", 3), ("doohickey", 5)] {
        let object = w
            .get(&format!("{group}/v1"), "Widget", Some(&w.apps), name)
            .await?
            .expect("custom resource applied");
        assert_eq!(object["spec"]["size"], size);
    }
    Ok(())
}

/// An object applied under a version its CRD later stops serving is still pruned, through
/// a version served now, though discovery read before still lists the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_whose_version_is_no_longer_served_is_pruned_through_one_that_is()
-> anyhow::Result<()> {
    let w = world!("");
    let group = format!("{}.example.com", w.apps);
    let crd = |v1_served: bool| {
        let version = |name: &str, served: bool, storage: bool| {
            json!({"name": name, "served": served, "storage": storage, "schema": {
                "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}})
        };
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("gadgets.{group}")},
            "spec": {"group": group, "scope": "Namespaced",
                "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
                "versions": [version("v1", v1_served, false), version("v2", true, true)]}})
    };
    // Made by the cluster's operator, not by the agent.
    w.put(crd(true)).await?;
    let gadget = format!(
        "apiVersion: {group}/v1\nkind: Gadget\nmetadata:\n  name: gizmo\nspec:\n  size: 3\n"
    );
    let first = w.repo.commit(
        &[
            ("gadget.yaml", gadget.as_bytes()),
            ("keep.yaml", configmap("keep", "1").as_bytes()),
        ],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    eventually("the gadget kind served", || async {
        Ok(w.api(&format!("{group}/v1"), "Gadget", Some(&w.apps))
            .await
            .ok()
            .map(|_| ()))
    })
    .await?;
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;

    w.put(crd(false)).await?;
    // Only once v1 is gone from discovery does the prune have to find another version.
    eventually("the gadget kind no longer served at v1", || async {
        Ok(w.api(&format!("{group}/v1"), "Gadget", Some(&w.apps))
            .await
            .is_err()
            .then_some(()))
    })
    .await?;
    let second = w.repo.commit(&[], &["gadget.yaml"])?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    assert!(
        w.get(&format!("{group}/v2"), "Gadget", Some(&w.apps), "gizmo")
            .await?
            .is_none(),
        "pruned, not forgotten"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_document_writes_nothing_and_names_file_and_document() -> anyhow::Result<()> {
    let w = world!("");
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
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &x, 1).await?;
    let failed = w.server.reported("prod", &x, Phase::Failed).await?;
    assert!(
        failed.message.contains("z.yaml document 1"),
        "{}",
        failed.message
    );
    assert!(failed.message.contains("apiVersion"), "{}", failed.message);
    assert!(w.configmap("first").await?.is_none(), "nothing written");
    assert!(w.configmap("fine").await?.is_none(), "nothing written");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_whose_pods_never_schedule_is_degraded() -> anyhow::Result<()> {
    let w = world!("    health_timeout: 60s\n");
    let x = w.repo.commit(
        &[("web.yaml", deployment_on("web", 1, "nowhere").as_bytes())],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &x, 1).await?;
    // The controller-manager gives up after the progress deadline, well before the timeout.
    let degraded = w.server.reported("prod", &x, Phase::Degraded).await?;
    assert!(
        degraded
            .message
            .contains(&format!("Deployment {}/web", w.apps)),
        "{}",
        degraded.message
    );
    assert!(
        degraded.message.contains("progress deadline exceeded"),
        "{}",
        degraded.message
    );
    assert!(degraded.objects.iter().any(|o| o.name == "web"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_become_healthy_through_the_real_controllers() -> anyhow::Result<()> {
    let w = world!("");
    let statefulset = "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: db\nspec:\n  replicas: 2\n  serviceName: db\n  selector:\n    matchLabels: {app: db}\n  template:\n    metadata:\n      labels: {app: db}\n    spec:\n      containers:\n        - {name: db, image: postgres}\n";
    let daemonset = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: agent\nspec:\n  selector:\n    matchLabels: {app: node-agent}\n  template:\n    metadata:\n      labels: {app: node-agent}\n    spec:\n      containers:\n        - {name: agent, image: busybox}\n";
    let job = "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: migrate\nspec:\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n        - {name: migrate, image: busybox}\n";
    let x = w.repo.commit(
        &[
            ("web.yaml", DEPLOYMENT.as_bytes()),
            ("db.yaml", statefulset.as_bytes()),
            ("ds.yaml", daemonset.as_bytes()),
            ("job.yaml", job.as_bytes()),
        ],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &x, 1).await?;
    w.server.reported("prod", &x, Phase::Healthy).await?;
    let db = w
        .get("apps/v1", "StatefulSet", Some(&w.apps), "db")
        .await?
        .expect("statefulset");
    assert_eq!(db["status"]["readyReplicas"], 2, "{db}");
    let ds = w
        .get("apps/v1", "DaemonSet", Some(&w.apps), "agent")
        .await?
        .expect("daemonset");
    assert_eq!(ds["status"]["numberAvailable"], 1, "one node: {ds}");
    let migrate = w
        .get("batch/v1", "Job", Some(&w.apps), "migrate")
        .await?
        .expect("job");
    assert_eq!(migrate["status"]["succeeded"], 1, "{migrate}");
    Ok(())
}

/// A CRD of `kind` in `group` without a status subresource: the status is part of the object,
/// so a revision can carry what an operator would have reported, and no race with one
/// decides a test.
fn crd_with_status_in_the_object(group: &str, kind: &str, plural: &str) -> String {
    format!(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: {plural}.{group}\nspec:\n  group: {group}\n  scope: Namespaced\n  names: {{plural: {plural}, singular: {}, kind: {kind}}}\n  versions:\n    - name: v1\n      served: true\n      storage: true\n      schema:\n        openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}\n",
        kind.to_lowercase()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_resource_reporting_ready_false_is_degraded() -> anyhow::Result<()> {
    let w = world!(
        "    health_timeout: 3s\n    scope: { cluster_kinds: [CustomResourceDefinition] }\n"
    );
    let group = format!("{}.example.com", w.apps);
    let crd = crd_with_status_in_the_object(&group, "Database", "databases");
    // Every change of an object without a status subresource is a new generation.
    let database = |ready: &str, generation: u32| {
        format!(
            "apiVersion: {group}/v1\nkind: Database\nmetadata:\n  name: orders\nspec:\n  size: 1\nstatus:\n  observedGeneration: {generation}\n  conditions:\n    - {{type: Ready, status: '{ready}', reason: BackendDown, message: primary unreachable}}\n"
        )
    };
    let first = w.repo.commit(
        &[
            ("crd.yaml", crd.as_bytes()),
            ("db.yaml", database("True", 1).as_bytes()),
        ],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;

    let second = w
        .repo
        .commit(&[("db.yaml", database("False", 2).as_bytes())], &[])?;
    w.server.release(&first, &second, 2).await?;
    let degraded = w.server.reported("prod", &second, Phase::Degraded).await?;
    assert!(
        degraded
            .message
            .contains(&format!("Database {}/orders", w.apps))
            && degraded.message.contains("Ready: primary unreachable"),
        "{}",
        degraded.message
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_revision_converges_after_restart() -> anyhow::Result<()> {
    let w = world!("");
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
    let agent = w.agent("replica-a");
    w.server.release(ZERO, &x, 1).await?;
    eventually("the first objects applied", || async {
        Ok((w.count_configmaps("cm-").await? > 0).then_some(()))
    })
    .await?;
    agent.kill();
    let _restarted = w.agent("replica-a");
    w.server.reported("prod", &x, Phase::Healthy).await?;
    assert_eq!(w.count_configmaps("cm-").await?, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_applies_and_another_takes_over() -> anyhow::Result<()> {
    let w = world!("");
    let replica = |identity: &str| {
        AgentProcess::start_with(
            &w.server,
            &agent_token("prod"),
            w.agent_kube.clone(),
            identity,
            LEASE,
            &w.home,
        )
    };
    // Every write of the Lease from here on is in the audit log.
    let start = w.mark();
    let first = w
        .repo
        .commit(&[("a.yaml", configmap("a", "1").as_bytes())], &[])?;
    let leader = replica("replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    let _standby = replica("replica-b");
    assert_eq!(w.holder().await?, "replica-a");

    let mark = w.mark();
    let second = w
        .repo
        .commit(&[("a.yaml", configmap("a", "2").as_bytes())], &[])?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    assert_eq!(w.patches_of(mark, "a")?, 1, "one replica applied");

    // As SIGKILL would: the Lease is not released, so the standby waits for it to expire.
    leader.kill();
    assert_eq!(w.holder().await?, "replica-a", "not released");
    eventually("the standby leads", || async {
        Ok((w.holder().await? == "replica-b").then_some(()))
    })
    .await?;
    let third = w
        .repo
        .commit(&[("a.yaml", configmap("a", "3").as_bytes())], &[])?;
    w.server.release(&second, &third, 3).await?;
    w.server.reported("prod", &third, Phase::Healthy).await?;
    assert_eq!(w.value("a").await?.as_deref(), Some("3"));
    let leases = w.leases().await?;
    assert_eq!(leases.len(), 1);

    // The handover as the API server saw it: from the holder's last renewal (the last write
    // of the Lease completed before the standby took over, since a standby only reads it; the
    // create, when the holder had no time to renew) to the acquireTime the standby wrote.
    let acquired: Timestamp = leases[0]["spec"]["acquireTime"]
        .as_str()
        .context("the standby wrote its acquireTime")?
        .parse()?;
    let lease_writes: Vec<_> = w
        .plane
        .agent_requests(start, &[&w.home])?
        .into_iter()
        .filter(|r| r.resource == "leases" && r.is_write())
        .collect();
    let renewed = lease_writes
        .iter()
        .filter(|r| r.code.is_some_and(|code| (200..300).contains(&code)))
        .filter_map(|r| r.completed)
        .filter(|completed| *completed < acquired)
        .max()
        .with_context(|| format!("no renewal before {acquired} in {lease_writes:#?}"))?;
    let handover = acquired.duration_since(renewed);
    // The bound the README states: one lease duration plus one retry period (a third of it).
    let bound = SignedDuration::try_from(LEASE + LEASE / 3)?;
    assert!(
        handover <= bound,
        "took over {handover:?} after the last renewal, more than {bound:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_in_a_managed_field_is_corrected_by_watch_and_unmanaged_fields_are_left_alone()
-> anyhow::Result<()> {
    // The default reconcile interval (5 min): only the watch can explain a quick correction.
    let w = world!("");
    let files: Vec<(String, String)> = (0..20)
        .map(|i| {
            (
                format!("cm-{i}.yaml"),
                configmap(&format!("cm-{i}"), "desired"),
            )
        })
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_bytes()))
        .collect();
    let x = w.repo.commit(&refs, &[])?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &x, 1).await?;
    w.server.reported("prod", &x, Phase::Healthy).await?;
    let mark = w.mark();
    // kubectl edits the field the revision sets on three objects, and adds one it does not.
    for name in ["cm-3", "cm-7", "cm-11"] {
        w.plane.kubectl_ok(&[
            "patch",
            "configmap",
            name,
            "-n",
            &w.apps,
            "--type=merge",
            "-p",
            r#"{"data":{"value":"edited by hand","extra":"added by hand"}}"#,
        ])?;
    }
    let edited = std::time::Instant::now();
    eventually("drift corrected", || async {
        let mut all = true;
        for name in ["cm-3", "cm-7", "cm-11"] {
            all &= w.value(name).await?.as_deref() == Some("desired");
        }
        Ok(all.then_some(()))
    })
    .await?;
    assert!(
        edited.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        edited.elapsed()
    );
    let cm = w.configmap("cm-3").await?.expect("cm-3");
    assert_eq!(
        cm["data"]["extra"], "added by hand",
        "not the agent's field"
    );
    // Exactly the drifted objects were written, once each.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let mut writes = w.writes(mark, &[])?;
    writes.sort();
    assert_eq!(writes.len(), 3, "{writes:#?}");
    for name in ["cm-3", "cm-7", "cm-11"] {
        assert_eq!(w.patches_of(mark, name)?, 1, "{name}: {writes:#?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_another_manager_adds_is_left_alone_without_a_write() -> anyhow::Result<()> {
    // The default reconcile interval (5 min): only the watch can wake the agent.
    let w = world!("");
    let files: Vec<(String, String)> = (0..6)
        .map(|i| {
            (
                format!("cm-{i}.yaml"),
                configmap(&format!("cm-{i}"), "desired"),
            )
        })
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_bytes()))
        .collect();
    let x = w.repo.commit(&refs, &[])?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &x, 1).await?;
    w.server.reported("prod", &x, Phase::Healthy).await?;
    let edit = |name: &str| {
        w.plane.kubectl_ok(&[
            "patch",
            "configmap",
            name,
            "-n",
            &w.apps,
            "--type=merge",
            "-p",
            r#"{"data":{"value":"edited by hand"}}"#,
        ])
    };
    let corrected = |name: &'static str, reconciles: usize| {
        let w = &w;
        let x = &x;
        async move {
            eventually(&format!("{name} corrected"), || async {
                let done = w.value(name).await?.as_deref() == Some("desired")
                    && w.healthy_reports(x).await? >= reconciles;
                Ok(done.then_some(()))
            })
            .await
        }
    };
    // A first correction, completed, shows the watches running and in sync.
    edit("cm-0")?;
    corrected("cm-0", 2).await?;

    let mark = w.mark();
    // kubectl adds a label of its own to one object, and changes nothing the agent applied.
    w.plane
        .kubectl_ok(&["label", "configmap", "cm-1", "-n", &w.apps, "team=payments"])?;
    // Then it edits a field the revision sets on another. One watch sees both changes, in
    // order, so once this one is corrected the label has been seen too.
    edit("cm-2")?;
    corrected("cm-2", 3).await?;
    let writes = w.writes(mark, &[])?;
    assert_eq!(w.patches_of(mark, "cm-1")?, 0, "{writes:#?}");
    assert_eq!(w.patches_of(mark, "cm-2")?, 1, "{writes:#?}");
    assert_eq!(writes.len(), 1, "only the correction: {writes:#?}");
    let cm1 = w.configmap("cm-1").await?.expect("cm-1");
    assert_eq!(cm1["metadata"]["labels"]["team"], "payments", "{cm1}");
    let owner = cm1["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["fieldsV1"]["f:metadata"]["f:labels"]["f:team"].is_object())
        .map(|m| m["manager"].clone());
    assert_eq!(owner, Some(json!("kubectl-label")), "{cm1}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciling_an_unchanged_revision_without_drift_writes_nothing() -> anyhow::Result<()> {
    let w = world!("    reconcile_interval: 1s\n");
    let manifests = format!("{}---\n{DEPLOYMENT}", configmap("settings", "one"));
    let x = w.repo.commit(&[("app.yaml", manifests.as_bytes())], &[])?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &x, 1).await?;
    w.server.reported("prod", &x, Phase::Healthy).await?;
    // The agent's watches start after its first apply, and until they have listed what it
    // applied it cannot know that nothing changed, so it applies again: give them time,
    // generously on a loaded machine. The Deployment's controllers go on writing its status
    // meanwhile; none of that is drift of what the agent applied.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mark = w.mark();
    // Several reconcile intervals.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let reconciles = w
        .server
        .history("prod")
        .await?
        .reports
        .iter()
        .filter(|r| r.revision == x && r.phase() == Phase::Healthy)
        .count();
    assert!(reconciles >= 3, "it did reconcile: {reconciles}");
    assert_eq!(w.writes(mark, &[])?, Vec::<String>::new());
    // Nor does it read again whose the ConfigMap is: its watch, in sync, would have seen it
    // deleted or given to another agent.
    let claims: Vec<String> = w
        .plane
        .agent_requests(mark, &[&w.apps])?
        .into_iter()
        .filter(|r| r.resource == "configmaps" && (r.verb == "get" || r.verb == "list"))
        .map(|r| format!("{} {}", r.verb, r.uri))
        .collect();
    assert_eq!(claims, Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_dry_run_rejection_writes_nothing() -> anyhow::Result<()> {
    let w = world!("    dry_run_strategy: server\n    scope: { namespaces: [APPS, nowhere] }\n");
    // The second object's namespace does not exist: the API server refuses it, even in a dry run.
    let stray = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: stray\n  namespace: nowhere\ndata: {a: b}\n";
    let x = w.repo.commit(
        &[
            ("a.yaml", configmap("first", "1").as_bytes()),
            ("b.yaml", stray.as_bytes()),
        ],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &x, 1).await?;
    let failed = w.server.reported("prod", &x, Phase::Failed).await?;
    assert!(failed.message.contains("dry run"), "{}", failed.message);
    assert!(failed.message.contains("nowhere"), "{}", failed.message);
    assert!(w.configmap("first").await?.is_none(), "nothing written");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_dry_run_passes_for_objects_in_a_namespace_the_revision_creates()
-> anyhow::Result<()> {
    let w = world!(
        "    dry_run_strategy: server\n    scope: { namespaces: [APPS, 'APPS-team*'], cluster_kinds: [Namespace] }\n"
    );
    let team = format!("{}-team", w.apps);
    let namespace = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {team}\n");
    let inside = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: inside\n  namespace: {team}\ndata: {{a: b}}\n"
    );
    let x = w.repo.commit(
        &[
            ("ns.yaml", namespace.as_bytes()),
            ("inside.yaml", inside.as_bytes()),
            ("a.yaml", configmap("first", "1").as_bytes()),
        ],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &x, 1).await?;
    w.server.reported("prod", &x, Phase::Healthy).await?;
    assert!(
        w.get("v1", "ConfigMap", Some(&team), "inside")
            .await?
            .is_some()
    );
    assert!(w.configmap("first").await?.is_some());
    let history = w.server.history("prod").await?;
    let applied = history
        .reports
        .iter()
        .find(|r| r.revision == x && r.phase() == Phase::Applied)
        .expect("applied report");
    assert!(
        applied.message.contains("dry run skipped for 1 objects")
            && applied.message.contains(&team),
        "{}",
        applied.message
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_that_existed_before_are_adopted_and_never_pruned() -> anyhow::Result<()> {
    let w = world!("");
    // Made by someone else, before the agent ever applied anything of that name.
    w.put(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "legacy", "namespace": w.apps}, "data": {"value": "old"}}))
        .await?;
    let first = w.repo.commit(
        &[
            ("legacy.yaml", configmap("legacy", "1").as_bytes()),
            ("keep.yaml", configmap("keep", "1").as_bytes()),
        ],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    assert_eq!(
        w.value("legacy").await?.as_deref(),
        Some("1"),
        "applied like any other object"
    );

    let second = w.repo.commit(&[], &["legacy.yaml"])?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    let legacy = w
        .configmap("legacy")
        .await?
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
    assert!(w.configmap("legacy").await?.is_some());
    Ok(())
}

/// The inventory lists an object before it is applied. When that apply fails and someone
/// else creates the object before the next attempt, the agent adopts it like any object
/// that existed before, and never prunes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_made_by_someone_else_after_its_apply_failed_is_adopted() -> anyhow::Result<()> {
    let w = world!("");
    let refused = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: late}\ndata: {\"no spaces in keys\": x}\n";
    let first = w.repo.commit(
        &[
            ("late.yaml", refused.as_bytes()),
            ("keep.yaml", configmap("keep", "1").as_bytes()),
        ],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Failed).await?;
    w.put(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "late", "namespace": w.apps}, "data": {"value": "theirs"}}))
        .await?;

    let second = w
        .repo
        .commit(&[("late.yaml", configmap("late", "2").as_bytes())], &[])?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    assert_eq!(w.value("late").await?.as_deref(), Some("2"));
    let third = w.repo.commit(&[], &["late.yaml"])?;
    w.server.release(&second, &third, 3).await?;
    w.server.reported("prod", &third, Phase::Healthy).await?;
    let late = w
        .configmap("late")
        .await?
        .context("someone else's object is never pruned")?;
    assert!(
        late["metadata"]["labels"]["greenlight.dev/inventory"].is_null(),
        "let go: {late}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_revision_prunes_nothing_and_fails() -> anyhow::Result<()> {
    let w = world!("");
    let first = w
        .repo
        .commit(&[("a.yaml", configmap("a", "1").as_bytes())], &[])?;
    let _agent = w.agent("replica-a");
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
    assert!(w.configmap("a").await?.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kind_writes_nothing_and_names_the_kind() -> anyhow::Result<()> {
    let w = world!("");
    let gadget = "apiVersion: nobody.example.com/v1\nkind: Gadget\nmetadata:\n  name: g\n";
    let x = w.repo.commit(
        &[
            ("a.yaml", configmap("first", "1").as_bytes()),
            ("gadget.yaml", gadget.as_bytes()),
        ],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &x, 1).await?;
    let failed = w.server.reported("prod", &x, Phase::Failed).await?;
    assert!(
        failed
            .message
            .contains("unknown kind: Gadget (nobody.example.com/v1)"),
        "{}",
        failed.message
    );
    assert!(w.configmap("first").await?.is_none(), "nothing written");
    Ok(())
}

fn namespace(name: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  annotations: {{{annotations}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_outside_the_scope_fails_before_any_write() -> anyhow::Result<()> {
    // The default scope: the agent's default namespace, no cluster-scoped kinds.
    let w = world!("");
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
    let mark = w.mark();
    let agent = w.agent("replica-a");
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
    assert_eq!(
        w.writes(mark, &["root"])?,
        Vec::<String>::new(),
        "nothing written"
    );
    assert!(
        w.plane
            .agent_requests(mark, &["kube-system"])?
            .iter()
            .all(|r| r.namespace.as_deref() != Some("kube-system")),
        "not even read"
    );
    assert!(w.configmap("first").await?.is_none());
    drop(agent);

    // Within the scope, the same agent applies.
    let y = w.repo.commit(&[], &["system.yaml", "binding.yaml"])?;
    let _agent = w.agent("replica-a");
    w.server.release(&x, &y, 2).await?;
    w.server.reported("prod", &y, Phase::Healthy).await?;
    assert!(w.configmap("first").await?.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_cannot_write_the_agents_inventory_or_lease() -> anyhow::Result<()> {
    // Even a scope that includes the agent's own namespace.
    let w = world!("    scope: { namespaces: [APPS, HOME] }\n");
    let first = w
        .repo
        .commit(&[("a.yaml", configmap("a", "1").as_bytes())], &[])?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    let before = w.inventory().await?.expect("inventory");

    // A forged inventory: `a` flipped to adopted (never pruned), and a foreign object the
    // next prune would delete.
    let apps = &w.apps;
    let home = &w.home;
    let forged = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: greenlight-inventory-prod\n  namespace: {home}\ndata:\n  revision: ''\n  entries: '[{{\"key\":{{\"group\":\"\",\"kind\":\"ConfigMap\",\"namespace\":\"{apps}\",\"name\":\"a\"}},\"api_version\":\"v1\",\"namespaced\":true,\"adopted\":true}},{{\"key\":{{\"group\":\"\",\"kind\":\"ConfigMap\",\"namespace\":\"{apps}\",\"name\":\"precious\"}},\"api_version\":\"v1\",\"namespaced\":true}}]'\n"
    );
    let lease = format!(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: greenlight-agent-prod\n  namespace: {home}\nspec: {{holderIdentity: mallory, leaseDurationSeconds: 100000}}\n"
    );
    let mark = w.mark();
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
        format!("ConfigMap {home}/greenlight-inventory-prod"),
        format!("Lease {home}/greenlight-agent-prod"),
    ] {
        assert!(
            failed
                .message
                .contains(&format!("{name}: it is the agent's own inventory or Lease")),
            "{}",
            failed.message
        );
    }
    assert_eq!(
        w.writes(mark, &[])?,
        Vec::<String>::new(),
        "nothing written"
    );
    let after = w.inventory().await?.expect("inventory");
    assert_eq!(before["data"], after["data"], "inventory untouched");
    assert_eq!(w.value("a").await?.as_deref(), Some("1"));
    assert_eq!(w.leases().await?.len(), 1);
    assert_eq!(w.holder().await?, "replica-a");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_namespace_is_kept_unless_annotated_and_then_terminated() -> anyhow::Result<()> {
    let w = world!(
        "    scope: { namespaces: [APPS, 'APPS-team-*'], cluster_kinds: [Namespace] }\n    prune_limit: 2\n"
    );
    let kept_name = format!("{}-team-kept", w.apps);
    let allowed_name = format!("{}-team-allowed", w.apps);
    let first = w.repo.commit(
        &[
            ("kept.yaml", namespace(&kept_name, "").as_bytes()),
            (
                "allowed.yaml",
                namespace(&allowed_name, "greenlight.dev/prune: allow").as_bytes(),
            ),
            ("a.yaml", configmap("a", "1").as_bytes()),
            ("b.yaml", configmap("b", "1").as_bytes()),
            ("c.yaml", configmap("c", "1").as_bytes()),
        ],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    // Something of someone else's inside: the namespace's termination deletes it too.
    w.put(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "inside", "namespace": allowed_name}, "data": {"a": "b"}}))
        .await?;

    let second = w.repo.commit(&[], &["kept.yaml", "allowed.yaml"])?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    assert!(
        w.get("v1", "Namespace", None, &kept_name).await?.is_some(),
        "its deletion would cascade"
    );
    // The namespace controller empties it, then it is gone.
    eventually("the annotated namespace terminated", || async {
        Ok(w.get("v1", "Namespace", None, &allowed_name)
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    assert!(
        w.get("v1", "ConfigMap", Some(&allowed_name), "inside")
            .await?
            .is_none()
    );
    let history = w.server.history("prod").await?;
    let applied = history
        .reports
        .iter()
        .find(|r| r.revision == second && r.phase() == Phase::Applied)
        .expect("applied report");
    assert!(
        applied.message.contains(&format!(
            "kept Namespace {kept_name} (its deletion would cascade)"
        )),
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
    let (kept, why) = action(&kept_name).expect("kept is reported");
    assert_eq!(kept, greenlight::v1::object_result::Action::Unchanged);
    assert!(why.contains("greenlight.dev/prune: allow"), "{why}");
    assert_eq!(
        action(&allowed_name).map(|(a, _)| a),
        Some(greenlight::v1::object_result::Action::Pruned)
    );
    // Still remembered: annotating it later lets the next revision prune it.
    assert!(w.inventory_names().await?.contains(&kept_name));

    // Its deletion was counted against the prune limit once: counted again, it would make
    // this revision's two prunes three, over the limit of two.
    let third = w.repo.commit(&[], &["a.yaml", "b.yaml"])?;
    w.server.release(&second, &third, 3).await?;
    w.server.reported("prod", &third, Phase::Healthy).await?;
    for name in ["a", "b"] {
        assert!(w.configmap(name).await?.is_none(), "{name} pruned");
    }
    assert!(w.get("v1", "Namespace", None, &kept_name).await?.is_some());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_held_by_a_finalizer_is_reported_terminating_until_it_is_gone()
-> anyhow::Result<()> {
    let w = world!("");
    // A controller of someone else's holds the object, or lets it go.
    let hold = |finalizers: &str| {
        w.plane.kubectl_ok(&[
            "patch",
            "configmap",
            "held",
            "-n",
            &w.apps,
            "--type=merge",
            "-p",
            &format!(r#"{{"metadata":{{"finalizers":{finalizers}}}}}"#),
        ])
    };
    let waiting = format!(
        "ConfigMap {}/held (waiting for finalizer example.com/hold)",
        w.apps
    );
    let first = w.repo.commit(
        &[
            ("keep.yaml", configmap("keep", "1").as_bytes()),
            ("held.yaml", configmap("held", "1").as_bytes()),
        ],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    hold(r#"["example.com/hold"]"#)?;

    // Removed from git: the delete is accepted, and the revision completes naming what the
    // object waits for, rather than waiting with it or failing.
    let second = w.repo.commit(&[], &["held.yaml"])?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    let applied = w.applied(&second).await?;
    assert!(
        applied
            .message
            .contains(&format!("still terminating: {waiting}")),
        "{}",
        applied.message
    );
    let held = applied
        .objects
        .iter()
        .find(|o| o.name == "held")
        .expect("held is reported");
    assert_eq!(held.action(), Action::Pruned);
    assert_eq!(
        held.message,
        "terminating, waiting for finalizer example.com/hold"
    );
    let object = w.configmap("held").await?.expect("there until let go");
    assert!(
        object["metadata"]["deletionTimestamp"].is_string(),
        "{object}"
    );
    assert!(
        w.inventory_names().await?.contains(&"held".to_owned()),
        "remembered while it terminates"
    );

    // Back in git while it terminates: applied, but not called healthy.
    let third = w
        .repo
        .commit(&[("held.yaml", configmap("held", "3").as_bytes())], &[])?;
    w.server.release(&second, &third, 3).await?;
    let degraded = w.server.reported("prod", &third, Phase::Degraded).await?;
    assert!(degraded.message.contains(&waiting), "{}", degraded.message);
    assert!(degraded.objects.iter().any(|o| o.name == "held"));
    // Let go, it is gone; the watch sees that and the agent applies it afresh.
    hold("null")?;
    w.server.reported("prod", &third, Phase::Healthy).await?;
    let object = w.configmap("held").await?.expect("applied again");
    assert!(
        object["metadata"]["deletionTimestamp"].is_null(),
        "{object}"
    );
    assert_eq!(object["data"]["value"], "3");

    // Pruned while held once more: deleted once, however often it is reconciled meanwhile.
    hold(r#"["example.com/hold"]"#)?;
    let mark = w.mark();
    let fourth = w.repo.commit(&[], &["held.yaml"])?;
    w.server.release(&third, &fourth, 4).await?;
    w.server.reported("prod", &fourth, Phase::Healthy).await?;
    let fifth = w
        .repo
        .commit(&[("keep.yaml", configmap("keep", "5").as_bytes())], &[])?;
    w.server.release(&fourth, &fifth, 5).await?;
    w.server.reported("prod", &fifth, Phase::Healthy).await?;
    let applied = w.applied(&fifth).await?;
    assert!(
        applied
            .message
            .contains(&format!("still terminating: {waiting}")),
        "{}",
        applied.message
    );
    let deletes: Vec<String> = w
        .writes(mark, &[])?
        .into_iter()
        .filter(|w| w.starts_with("delete "))
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:#?}");

    // Let go, it is gone, and the next revision's inventory no longer lists it.
    hold("null")?;
    assert!(w.configmap("held").await?.is_none());
    let sixth = w
        .repo
        .commit(&[("keep.yaml", configmap("keep", "6").as_bytes())], &[])?;
    w.server.release(&fifth, &sixth, 6).await?;
    w.server.reported("prod", &sixth, Phase::Healthy).await?;
    assert_eq!(w.inventory_names().await?, ["keep"]);
    let applied = w.applied(&sixth).await?;
    assert!(
        !applied.message.contains("terminating"),
        "{}",
        applied.message
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_beyond_the_limit_waits_for_force_prune() -> anyhow::Result<()> {
    let ci_hash = greenlight::digest::sha256_hex(b"ci-prod");
    let w = world!(&format!(
        "    prune_limit: 2\n    ci_token_sha256: \"{ci_hash}\"\n"
    ));
    let first = w.repo.commit(
        &[
            ("keep.yaml", configmap("keep", "1").as_bytes()),
            ("b.yaml", configmap("b", "1").as_bytes()),
            ("c.yaml", configmap("c", "1").as_bytes()),
            ("d.yaml", configmap("d", "1").as_bytes()),
        ],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;

    let mark = w.mark();
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
    assert_eq!(
        w.writes(mark, &[])?,
        Vec::<String>::new(),
        "nothing written"
    );
    for name in ["b", "c", "d"] {
        assert!(w.configmap(name).await?.is_some());
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
        assert!(w.configmap(name).await?.is_none(), "{name} pruned");
    }
    assert_eq!(w.value("keep").await?.as_deref(), Some("2"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_competes_for_the_same_lease_and_shutdown_hands_over_at_once()
-> anyhow::Result<()> {
    let w = world!("");
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
        w.agent_kube.clone(),
        "replica-a",
        lease,
        &w.home,
    );
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    let _new = AgentProcess::start_with(
        &other,
        rotated,
        w.agent_kube.clone(),
        "replica-b",
        lease,
        &w.home,
    );
    // The new agent receives the revision too, and with it its name.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;

    let mark = w.mark();
    let second = w
        .repo
        .commit(&[("a.yaml", configmap("a", "2").as_bytes())], &[])?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    assert_eq!(w.patches_of(mark, "a")?, 1, "one leader applied");
    let leases = w.leases().await?;
    assert_eq!(leases.len(), 1, "one Lease for the agent: {leases:?}");
    assert_eq!(leases[0]["metadata"]["name"], "greenlight-agent-prod");
    assert_eq!(leases[0]["spec"]["holderIdentity"], "replica-a");

    // SIGTERM: the old agent releases the Lease, the new one takes over well before it
    // could have expired.
    let stopped = std::time::Instant::now();
    old.stop().await?;
    let released = w.holder().await?;
    assert!(
        released.is_null() || released == "replica-b",
        "{released:?}"
    );
    eventually("the new agent leads", || async {
        Ok((w.holder().await? == "replica-b").then_some(()))
    })
    .await?;
    assert!(stopped.elapsed() < lease, "{:?}", stopped.elapsed());
    let third = w
        .repo
        .commit(&[("a.yaml", configmap("a", "3").as_bytes())], &[])?;
    other.release(&second, &third, 3).await?;
    other.reported("prod", &third, Phase::Healthy).await?;
    assert_eq!(w.value("a").await?.as_deref(), Some("3"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_rbac_is_enough_and_no_more() -> anyhow::Result<()> {
    let Some(plane) = ControlPlane::shared().await? else {
        return Ok(());
    };
    install_crypto();
    // deploy/agent.yaml as an operator applies it: namespaces `greenlight` and `apps`, the
    // service account, its Roles, and the agent's Deployment (which kwok runs).
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.yaml");
    plane.kubectl_ok(&["apply", "--server-side", "-f", manifest])?;
    let token = plane.kubectl_ok(&["create", "token", "greenlight-agent", "-n", "greenlight"])?;
    // The agent the example's names are for: its records are `greenlight-inventory-prod-eu`
    // and `greenlight-agent-prod-eu`.
    let name = "prod-eu";
    let as_agent = plane.client_with_token(token.trim()).await?;
    let admin = plane.client().await?;
    let other = plane.namespace(&admin, "other").await?;

    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let repo = GitRepo::new()?;
    // The agent's own scope allows `other`; its RBAC does not.
    let agent = format!(
        "{}    scope: {{ namespaces: [apps, {other}] }}\n",
        git_agent_yaml(name, &repo.url(), &[])
    );
    let server =
        TestServer::start(&git_config_yaml(&redis.url(), cache.path(), "", &[agent])).await?;
    let _agent = AgentProcess::start_in(&server, name, as_agent.clone(), "replica-a", "greenlight");
    let manifests = format!("{}---\n{DEPLOYMENT}", configmap("settings", "one"));
    let x = repo.commit(&[("app.yaml", manifests.as_bytes())], &[])?;
    server.release(ZERO, &x, 1).await?;
    server.reported(name, &x, Phase::Healthy).await?;

    // The drift watches list and watch under these rights too.
    plane.kubectl_ok(&[
        "patch",
        "configmap",
        "settings",
        "-n",
        "apps",
        "--type=merge",
        "-p",
        r#"{"data":{"value":"edited by hand"}}"#,
    ])?;
    let configmaps: Api<ConfigMap> = Api::namespaced(admin.clone(), "apps");
    eventually("drift corrected", || async {
        let value = configmaps
            .get("settings")
            .await?
            .data
            .and_then(|d| d.get("value").cloned());
        Ok((value.as_deref() == Some("one")).then_some(()))
    })
    .await?;

    // Within the agent's scope but not its RBAC: the API server refuses, naming the user.
    let stray = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: stray\n  namespace: {other}\ndata: {{a: b}}\n"
    );
    let y = repo.commit(&[("stray.yaml", stray.as_bytes())], &[])?;
    server.release(&x, &y, 2).await?;
    let failed = server.reported(name, &y, Phase::Failed).await?;
    assert!(
        failed.message.contains("forbidden")
            && failed
                .message
                .contains("system:serviceaccount:greenlight:greenlight-agent"),
        "{}",
        failed.message
    );

    // In its own namespace, its inventory and Lease by name, and nothing else there.
    let own: Api<ConfigMap> = Api::namespaced(as_agent.clone(), "greenlight");
    assert!(
        own.get_opt("greenlight-inventory-prod-eu").await?.is_some(),
        "it reads its inventory"
    );
    let theirs: Api<ConfigMap> = Api::namespaced(admin.clone(), "greenlight");
    let stored = theirs
        .patch(
            "someone-elses",
            &PatchParams::apply("greenlight-e2e").force(),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "someone-elses"}, "data": {"value": "theirs"}})),
        )
        .await?;
    let mut replaced = stored.clone();
    replaced.data = Some([("value".to_owned(), "the agent's".to_owned())].into());
    let forbidden = |what: &str, answer: Result<(), kube::Error>| match answer {
        Err(kube::Error::Api(status)) if status.code == 403 => Ok(()),
        other => Err(anyhow::anyhow!("{what}: not forbidden: {other:?}")),
    };
    forbidden(
        "update",
        own.replace("someone-elses", &PostParams::default(), &replaced)
            .await
            .map(drop),
    )?;
    forbidden(
        "apply",
        own.patch(
            "someone-elses",
            &PatchParams::apply("greenlight").force(),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "someone-elses"}, "data": {"value": "the agent's"}})),
        )
        .await
        .map(drop),
    )?;
    forbidden("get", own.get("someone-elses").await.map(drop))?;
    forbidden(
        "delete",
        own.delete("someone-elses", &DeleteParams::default())
            .await
            .map(drop),
    )?;
    assert_eq!(
        theirs.get("someone-elses").await?.data,
        stored.data,
        "untouched"
    );
    // Likewise a Lease of someone else's: its own is the only one it may renew.
    let leases: Api<Lease> = Api::namespaced(admin, "greenlight");
    let other_lease = leases
        .patch(
            "someone-elses",
            &PatchParams::apply("greenlight-e2e").force(),
            &Patch::Apply(
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "someone-elses"}, "spec": {"holderIdentity": "them"}}),
            ),
        )
        .await?;
    let mut taken = other_lease.clone();
    if let Some(spec) = taken.spec.as_mut() {
        spec.holder_identity = Some("replica-a".into());
    }
    let agent_leases: Api<Lease> = Api::namespaced(as_agent, "greenlight");
    forbidden(
        "lease update",
        agent_leases
            .replace("someone-elses", &PostParams::default(), &taken)
            .await
            .map(drop),
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_judges_a_kind_that_follows_no_convention() -> anyhow::Result<()> {
    let w = world!(
        "    health_timeout: 3s\n    scope: { cluster_kinds: [CustomResourceDefinition] }\n    health_checks:\n      - { group: APPS.example.com, kind: Bucket, jsonpath: '$.status.phase', healthy: [Ready], failed: [Lost] }\n"
    );
    let group = format!("{}.example.com", w.apps);
    let crd = crd_with_status_in_the_object(&group, "Bucket", "buckets");
    // As with the Ready=False test: the revision carries the status its controller would set.
    let bucket = |phase: &str| {
        format!(
            "apiVersion: {group}/v1\nkind: Bucket\nmetadata:\n  name: logs\nstatus:\n  phase: {phase}\n"
        )
    };
    let first = w.repo.commit(
        &[
            ("crd.yaml", crd.as_bytes()),
            ("bucket.yaml", bucket("Ready").as_bytes()),
        ],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;

    // Without the check the conventions would call it healthy: it has no conditions.
    let second = w
        .repo
        .commit(&[("bucket.yaml", bucket("Provisioning").as_bytes())], &[])?;
    w.server.release(&first, &second, 2).await?;
    let degraded = w.server.reported("prod", &second, Phase::Degraded).await?;
    assert!(
        degraded.message.contains(&format!(
            "Bucket {}/logs: its health check selects Provisioning",
            w.apps
        )),
        "{}",
        degraded.message
    );

    let third = w
        .repo
        .commit(&[("bucket.yaml", bucket("Lost").as_bytes())], &[])?;
    w.server.release(&second, &third, 3).await?;
    let failed = w.server.reported("prod", &third, Phase::Degraded).await?;
    assert!(
        failed.message.contains("selects Lost"),
        "{}",
        failed.message
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impersonated_service_account_lets_rbac_enforce_what_a_revision_writes()
-> anyhow::Result<()> {
    let w = world!("    impersonate: deployer\n    scope: { namespaces: [APPS, 'APPS-other'] }\n");
    let other = format!("{}-other", w.apps);
    w.plane.kubectl_ok(&["create", "namespace", &other])?;
    // The service account may manage ConfigMaps in the default namespace, and nothing else:
    // not even the agent's inventory, which the agent keeps as itself.
    w.plane
        .kubectl_ok(&["create", "serviceaccount", "deployer", "-n", &w.apps])?;
    w.plane.kubectl_ok(&[
        "create",
        "role",
        "deployer",
        "--verb=get,list,watch,create,patch,delete",
        "--resource=configmaps",
        "-n",
        &w.apps,
    ])?;
    w.plane.kubectl_ok(&[
        "create",
        "rolebinding",
        "deployer",
        "--role=deployer",
        &format!("--serviceaccount={}:deployer", w.apps),
        "-n",
        &w.apps,
    ])?;
    let first = w
        .repo
        .commit(&[("a.yaml", configmap("a", "1").as_bytes())], &[])?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    assert_eq!(w.value("a").await?.as_deref(), Some("1"));
    assert!(w.inventory().await?.is_some(), "kept by the agent itself");

    // Inside the agent's scope, outside the service account's rights: refused by the API
    // server, which names whom the agent acted as.
    let stray = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: stray\n  namespace: {other}\ndata: {{a: b}}\n"
    );
    let second = w.repo.commit(&[("stray.yaml", stray.as_bytes())], &[])?;
    w.server.release(&first, &second, 2).await?;
    let failed = w.server.reported("prod", &second, Phase::Failed).await?;
    assert!(
        failed.message.contains("forbidden")
            && failed
                .message
                .contains(&format!("system:serviceaccount:{}:deployer", w.apps)),
        "{}",
        failed.message
    );
    assert!(
        w.get("v1", "ConfigMap", Some(&other), "stray")
            .await?
            .is_none()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_counts_applies_drift_and_leadership_and_serves_its_probes() -> anyhow::Result<()>
{
    let w = world!("");
    let agent = w.agent("replica-a");
    // As the agent binary serves them on --metrics-listen.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(greenlight_agent::metrics::serve(
        listener,
        agent.metrics.clone(),
        stop.clone(),
    ));
    let get = |path: &'static str| async move {
        let response = reqwest::get(format!("http://{address}{path}")).await?;
        Ok::<_, anyhow::Error>(response.status().as_u16())
    };
    assert_eq!(get("/healthz").await?, 200);
    eventually("ready once connected", || async {
        Ok((get("/readyz").await? == 200).then_some(()))
    })
    .await?;

    let x = w
        .repo
        .commit(&[("a.yaml", configmap("a", "desired").as_bytes())], &[])?;
    w.server.release(ZERO, &x, 1).await?;
    w.server.reported("prod", &x, Phase::Healthy).await?;
    w.plane.kubectl_ok(&[
        "patch",
        "configmap",
        "a",
        "-n",
        &w.apps,
        "--type=merge",
        "-p",
        r#"{"data":{"value":"edited by hand"}}"#,
    ])?;
    const OBJECTS: &str = "greenlight_agent_objects_total";
    const APPLIES: &str = "greenlight_agent_applies_total";
    // Every scrape is read whole, strictly: a line Prometheus would refuse fails the test.
    let metrics = eventually("a drift correction counted", || async {
        let metrics = exposition::scrape(address).await?;
        let corrections = metrics.count("greenlight_agent_drift_corrections_total", &[]);
        Ok((corrections == 1.0).then_some(metrics))
    })
    .await?;
    assert!(metrics.count(APPLIES, &[("result", "healthy")]) >= 1.0);
    assert!(metrics.count(OBJECTS, &[("action", "applied")]) >= 1.0);
    assert_eq!(metrics.count("greenlight_agent_leader", &[]), 1.0);
    assert!(metrics.count("greenlight_agent_apply_duration_seconds_count", &[]) >= 1.0);
    assert!(metrics.count("greenlight_agent_health_wait_seconds_count", &[]) >= 1.0);
    assert_eq!(metrics.count(OBJECTS, &[("action", "failed")]), 0.0);

    // The API server refuses one object of the next revision (a ConfigMap key may not hold
    // a space): the apply fails, and the refused object is counted as failed.
    let refused =
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: refused}\ndata: {\"not a key\": x}\n";
    let y = w.repo.commit(&[("b.yaml", refused.as_bytes())], &[])?;
    w.server.release(&x, &y, 2).await?;
    let failed = w.server.reported("prod", &y, Phase::Failed).await?;
    assert!(
        failed
            .objects
            .iter()
            .any(|o| o.name == "refused" && o.action() == Action::Failed),
        "{failed:?}"
    );
    // The apply is counted as it returns, just after its report: wait for both. (A failed
    // revision is retried after 10 s at the earliest, each time failing on one object.)
    eventually("the failed apply counted", || async {
        let metrics = exposition::scrape(address).await?;
        let objects = metrics.count(OBJECTS, &[("action", "failed")]);
        let applies = metrics.count(APPLIES, &[("result", "failed")]);
        Ok((applies >= 1.0 && objects >= applies).then_some(()))
    })
    .await?;
    stop.cancel();
    Ok(())
}

// Adoption and other agents' objects: an adopted object stays adopted however the inventory
// forgets it, and an agent neither adopts nor lets go of what another agent's label names.

/// The labels and annotations of ConfigMap `name` of the default namespace.
async fn marks(w: &World, name: &str) -> anyhow::Result<(Value, Value)> {
    let object = w.configmap(name).await?.context("the ConfigMap exists")?;
    Ok((
        object["metadata"]["labels"].clone(),
        object["metadata"]["annotations"].clone(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_object_survives_being_forgotten_and_the_inventory_being_deleted()
-> anyhow::Result<()> {
    let w = world!("    prune: false\n");
    w.put(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "handmade", "namespace": w.apps}, "data": {"value": "by hand"}}))
        .await?;
    let first = w.repo.commit(
        &[
            ("handmade.yaml", configmap("handmade", "1").as_bytes()),
            ("keep.yaml", configmap("keep", "1").as_bytes()),
        ],
        &[],
    )?;
    let agent = w.agent("replica-a");
    w.server.release(ZERO, &first, 1).await?;
    w.server.reported("prod", &first, Phase::Healthy).await?;
    let (labels, annotations) = marks(&w, "handmade").await?;
    assert_eq!(labels["greenlight.dev/inventory"], "prod");
    assert_eq!(
        annotations["greenlight.dev/adopted"], "true",
        "marked on the object"
    );
    assert!(marks(&w, "keep").await?.1["greenlight.dev/adopted"].is_null());

    // Removed from git with prune off: forgotten, and let go.
    let second = w.repo.commit(&[], &["handmade.yaml"])?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    let (labels, annotations) = marks(&w, "handmade").await?;
    assert!(
        labels["greenlight.dev/inventory"].is_null(),
        "let go: {labels}"
    );
    assert!(
        annotations["greenlight.dev/adopted"].is_null(),
        "{annotations}"
    );
    let handmade = w.configmap("handmade").await?.context("kept")?;
    let managers = handmade["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !managers
            .iter()
            .any(|m| m["manager"] == "greenlight" && m["operation"] == "Apply"),
        "its applies' ownership is let go too: {managers:?}"
    );
    assert_eq!(
        w.value("handmade").await?.as_deref(),
        Some("1"),
        "the fields stay"
    );

    // Added back: adopted again, as it existed before.
    let third = w.repo.commit(
        &[("handmade.yaml", configmap("handmade", "3").as_bytes())],
        &[],
    )?;
    w.server.release(&second, &third, 3).await?;
    w.server.reported("prod", &third, Phase::Healthy).await?;
    assert_eq!(
        marks(&w, "handmade").await?.1["greenlight.dev/adopted"],
        "true"
    );
    agent.stop().await?;

    // The inventory is lost, and prune is turned on: the object itself says it was adopted.
    let inventories: Api<ConfigMap> = Api::namespaced(w.kube.clone(), &w.home);
    inventories
        .delete("greenlight-inventory-prod", &DeleteParams::default())
        .await?;
    let config = w.server_config.replace("    prune: false\n", "");
    let server = TestServer::start(&config).await?;
    let _agent =
        AgentProcess::start_in(&server, "prod", w.agent_kube.clone(), "replica-a", &w.home);
    let fourth = w
        .repo
        .commit(&[("keep.yaml", configmap("keep", "4").as_bytes())], &[])?;
    server.release(&third, &fourth, 4).await?;
    server.reported("prod", &fourth, Phase::Healthy).await?;
    // Both removed, with prune on; one other object, since a revision of none is refused.
    let fifth = w.repo.commit(
        &[("other.yaml", configmap("other", "5").as_bytes())],
        &["handmade.yaml", "keep.yaml"],
    )?;
    server.release(&fourth, &fifth, 5).await?;
    let applied = server.reported("prod", &fifth, Phase::Healthy).await?;
    assert!(
        w.configmap("keep").await?.is_none(),
        "the agent's own is pruned"
    );
    let (labels, _) = marks(&w, "handmade").await?;
    assert!(
        labels["greenlight.dev/inventory"].is_null(),
        "adopted: let go, never deleted ({applied:?})"
    );
    assert_eq!(w.value("handmade").await?.as_deref(), Some("3"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_agents_object_is_refused_and_never_let_go() -> anyhow::Result<()> {
    let w = world!("");
    w.put(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "theirs", "namespace": w.apps,
            "labels": {"greenlight.dev/inventory": "staging"}},
        "data": {"value": "staging's"}}))
        .await?;
    let first = w.repo.commit(
        &[
            ("theirs.yaml", configmap("theirs", "prod's").as_bytes()),
            ("mine.yaml", configmap("mine", "1").as_bytes()),
        ],
        &[],
    )?;
    let _agent = w.agent("replica-a");
    w.server.release(ZERO, &first, 1).await?;
    let failed = w.server.reported("prod", &first, Phase::Failed).await?;
    let refusal = format!("ConfigMap {}/theirs belongs to agent staging", w.apps);
    assert!(
        failed.message.contains(&refusal) && failed.message.ends_with("nothing was applied"),
        "{}",
        failed.message
    );
    assert!(w.configmap("mine").await?.is_none(), "nothing written");
    assert_eq!(w.value("theirs").await?.as_deref(), Some("staging's"));

    // A hand-made object is adopted; then another agent takes it over before it leaves git.
    w.put(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "found", "namespace": w.apps}, "data": {"value": "by hand"}}))
        .await?;
    let second = w.repo.commit(
        &[("found.yaml", configmap("found", "2").as_bytes())],
        &["theirs.yaml"],
    )?;
    w.server.release(&first, &second, 2).await?;
    w.server.reported("prod", &second, Phase::Healthy).await?;
    assert_eq!(
        marks(&w, "found").await?.1["greenlight.dev/adopted"],
        "true"
    );
    w.plane.kubectl_ok(&[
        "label",
        "configmap",
        "found",
        "-n",
        &w.apps,
        "--overwrite",
        "greenlight.dev/inventory=staging",
    ])?;
    let third = w.repo.commit(&[], &["found.yaml"])?;
    w.server.release(&second, &third, 3).await?;
    w.server.reported("prod", &third, Phase::Healthy).await?;
    let (labels, _) = marks(&w, "found").await?;
    assert_eq!(
        labels["greenlight.dev/inventory"], "staging",
        "not ours to let go"
    );
    assert_eq!(w.value("theirs").await?.as_deref(), Some("staging's"));
    Ok(())
}

/// A prune deletes only the object it judged: one deleted and created again under the same
/// name since (by another tool) is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_deletes_only_the_object_it_judged_not_one_created_again() -> anyhow::Result<()> {
    use greenlight_agent::cluster::{Cluster, Deleted, ObjectRef, Write, Written};

    install_crypto();
    let Some(test) = TestCluster::new().await? else {
        return Ok(());
    };
    let configmaps: Api<ConfigMap> = Api::namespaced(test.kube.clone(), &test.apps);
    let create = || async {
        let created = configmaps
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({ "metadata": { "name": "judged" } }))?,
            )
            .await?;
        created.metadata.uid.context("a created object has a UID")
    };
    let judged = create().await?;
    configmaps
        .delete("judged", &DeleteParams::default())
        .await?;
    let again = create().await?;

    let cluster = Cluster::new(test.kube.clone(), "greenlight-test");
    cluster.discover([("v1", "ConfigMap")]).await;
    let resolved = cluster
        .resolve("v1", "ConfigMap")
        .context("ConfigMaps are served")?;
    let delete = |uid| Write::Delete {
        object: ObjectRef {
            resolved: &resolved,
            namespace: Some(&test.apps),
            name: "judged",
        },
        propagation: "background",
        uid,
    };
    assert!(matches!(
        cluster.perform(delete(&judged)).await?,
        Written::Deleted(Deleted::Replaced)
    ));
    let kept = configmaps.get_opt("judged").await?;
    assert_eq!(kept.and_then(|cm| cm.metadata.uid), Some(again.clone()));
    assert!(matches!(
        cluster.perform(delete(&again)).await?,
        Written::Deleted(Deleted::Gone | Deleted::Terminating(_))
    ));
    Ok(())
}

/// Two replicas of one agent, each with what it read of the inventory: once one wrote it,
/// the other's write from its older read is refused by the API server rather than undoing
/// it (a replica that lost its Lease mid-revision cannot overwrite the new leader's record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_changed_since_it_was_read_is_never_overwritten() -> anyhow::Result<()> {
    use greenlight_agent::inventory::{Inventory, InventoryStore};
    use greenlight_agent::plan::{InventoryEntry, ObjectKey};

    let Some(cluster) = TestCluster::new().await? else {
        return Ok(());
    };
    let store = || {
        InventoryStore::new(
            cluster.agent_kube.clone(),
            &cluster.home,
            "prod",
            "greenlight",
        )
    };
    let of = |names: &[&str], revision: &str| Inventory {
        entries: names
            .iter()
            .map(|name| InventoryEntry {
                key: ObjectKey {
                    group: String::new(),
                    kind: "ConfigMap".into(),
                    namespace: Some(cluster.apps.clone()),
                    name: (*name).to_owned(),
                },
                api_version: "v1".into(),
                namespaced: true,
                adopted: false,
                kept: false,
            })
            .collect(),
        revision: Some(revision.to_owned()),
    };
    // Neither found one: the first to write makes it, the other is refused.
    let (first, second) = (store(), store());
    assert_eq!(first.load().await?, Inventory::default());
    assert_eq!(second.load().await?, Inventory::default());
    first.save(&of(&["a"], "r1")).await?;
    let refused = second
        .save(&of(&["x"], "r0"))
        .await
        .expect_err("made by the other meanwhile");
    assert!(refused.is_conflict(), "{refused}");
    let (old_leader, new_leader) = (store(), store());
    assert_eq!(old_leader.load().await?, of(&["a"], "r1"));
    assert_eq!(new_leader.load().await?, of(&["a"], "r1"));

    new_leader.save(&of(&["a", "b"], "r2")).await?;
    new_leader.save(&of(&["b"], "r2")).await?;
    let refused = old_leader
        .save(&of(&["a", "stale"], "r1"))
        .await
        .expect_err("a write from before the new leader's");
    assert!(refused.is_conflict(), "{refused}");
    assert_eq!(
        store().load().await?,
        of(&["b"], "r2"),
        "the new leader's record"
    );

    // Read again, it writes.
    assert_eq!(old_leader.load().await?, of(&["b"], "r2"));
    old_leader.save(&of(&["c"], "r3")).await?;
    assert_eq!(store().load().await?, of(&["c"], "r3"));
    Ok(())
}

/// An inventory written by the agent before its compact format is read, and written back
/// in both formats while both fit (an agent rolled back still reads it), then in the compact
/// one alone: nothing the agent recorded is lost across the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_in_the_earlier_format_is_read_and_written_back_in_the_compact_one()
-> anyhow::Result<()> {
    use greenlight_agent::inventory::InventoryStore;
    use greenlight_agent::reconcile::FIELD_MANAGER;

    let Some(cluster) = TestCluster::new().await? else {
        return Ok(());
    };
    let configmaps: Api<ConfigMap> = Api::namespaced(cluster.agent_kube.clone(), &cluster.home);
    let legacy = json!([
        {"key": {"group": "", "kind": "ConfigMap", "namespace": cluster.apps, "name": "a"},
         "api_version": "v1", "namespaced": true},
        {"key": {"group": "", "kind": "Namespace", "namespace": null, "name": "team"},
         "api_version": "v1", "namespaced": false, "adopted": true},
    ]);
    // As the earlier agent applied it, with the same field manager.
    configmaps
        .patch(
            "greenlight-inventory-prod",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "greenlight-inventory-prod"},
                "data": {"entries": legacy.to_string(), "revision": "r1"},
            })),
        )
        .await?;
    let store = InventoryStore::new(
        cluster.agent_kube.clone(),
        &cluster.home,
        "prod",
        FIELD_MANAGER,
    );
    let read = store.load().await?;
    let names: Vec<(&str, bool)> = read
        .entries
        .iter()
        .map(|e| (e.key.name.as_str(), e.adopted))
        .collect();
    assert_eq!(names, [("a", false), ("team", true)]);
    assert_eq!(read.revision.as_deref(), Some("r1"));

    store.save(&read).await?;
    let data = || async {
        Ok::<_, anyhow::Error>(
            configmaps
                .get("greenlight-inventory-prod")
                .await?
                .data
                .unwrap_or_default(),
        )
    };
    let written = data().await?;
    let objects = written.get("objects").context("the compact record")?;
    assert_eq!(
        greenlight_agent::inventory::record::decode(objects)?,
        read.entries
    );
    let legacy = written.get("entries").context("the earlier format, too")?;
    assert_eq!(
        greenlight_agent::inventory::record::decode_legacy(legacy)?,
        read.entries
    );
    assert_eq!(store.load().await?, read);

    // Grown past what both formats fit in: the compact record alone, the earlier one gone.
    let mut grown = read.clone();
    grown.entries = (0..8_000)
        .map(|n| {
            let mut entry = read.entries[0].clone();
            entry.key.name = format!("{n:05}-{}", "x".repeat(40));
            entry
        })
        .collect();
    store.save(&grown).await?;
    let written = data().await?;
    assert!(!written.contains_key("entries"), "{:?}", written.keys());
    assert_eq!(store.load().await?, grown);
    Ok(())
}
