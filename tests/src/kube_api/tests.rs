//! The emulation driven through the real `kube::Client`.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::discovery::{self, Discovery, Scope};
use serde_json::{Value, json};

use super::KubeApi;

fn api_error(error: kube::Error) -> kube::core::Status {
    match error {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn deployment(name: &str, replicas: i64, image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": image}]}
            }
        }
    })
}

fn dynamic(value: Value) -> DynamicObject {
    serde_json::from_value(value).unwrap()
}

fn deployments(api: &KubeApi) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment"));
    Api::namespaced_with(api.client(), "default", &ar)
}

fn config_maps(api: &KubeApi, namespace: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "ConfigMap"));
    Api::namespaced_with(api.client(), namespace, &ar)
}

fn config_map(name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
}

fn rv(object: &DynamicObject) -> String {
    object.metadata.resource_version.clone().unwrap()
}

fn widget_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
            "versions": [
                {"name": "v1beta1", "served": true, "storage": false, "schema": {"openAPIV3Schema": {"type": "object"}}},
                {"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                 "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}
            ]
        }
    })
}

async fn apply_crd(api: &KubeApi) {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
    ));
    let crds: Api<DynamicObject> = Api::all_with(api.client(), &ar);
    crds.patch(
        "widgets.example.com",
        &PatchParams::apply("greenlight").force(),
        &Patch::Apply(dynamic(widget_crd())),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_finds_builtins_and_crds() {
    let api = KubeApi::start().await.unwrap();
    let client = api.client();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.minor, "33");

    let found = Discovery::new(client.clone()).run().await.unwrap();
    let (ar, caps) = found
        .resolve_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment"))
        .unwrap();
    assert_eq!(ar.plural, "deployments");
    assert_eq!(caps.scope, Scope::Namespaced);
    assert!(
        caps.subresources
            .iter()
            .any(|(sub, _)| sub.plural == "status")
    );
    let (namespaces, caps) = found
        .resolve_gvk(&GroupVersionKind::gvk("", "v1", "Namespace"))
        .unwrap();
    assert_eq!(
        (namespaces.plural.as_str(), caps.scope),
        ("namespaces", Scope::Cluster)
    );
    let widget = GroupVersionKind::gvk("example.com", "v1", "Widget");
    assert!(found.resolve_gvk(&widget).is_none());
    assert!(discovery::pinned_kind(&client, &widget).await.is_err());

    apply_crd(&api).await;
    let crd = api
        .get(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            None,
            "widgets.example.com",
        )
        .unwrap();
    assert_eq!(crd["status"]["conditions"][1]["type"], "Established");
    assert_eq!(crd["status"]["storedVersions"], json!(["v1"]));

    let found = Discovery::new(client.clone()).run().await.unwrap();
    let (ar, caps) = found.resolve_gvk(&widget).unwrap();
    assert_eq!(
        (ar.plural.as_str(), caps.scope.clone()),
        ("widgets", Scope::Namespaced)
    );
    let group = found.get("example.com").unwrap();
    assert_eq!(group.preferred_version_or_latest(), "v1");
    assert!(group.versions().any(|v| v == "v1beta1"));

    let aggregated = Discovery::new(client.clone())
        .run_aggregated()
        .await
        .unwrap();
    assert!(aggregated.resolve_gvk(&widget).is_some());
    let (pods, _) = aggregated
        .resolve_gvk(&GroupVersionKind::gvk("", "v1", "Pod"))
        .unwrap();
    assert_eq!(pods.plural, "pods");
    let (pinned, _) = discovery::pinned_kind(&client, &widget).await.unwrap();
    assert_eq!(pinned.plural, "widgets");

    // Custom objects are stored and served; deleting the CRD takes them and the kind away.
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let object = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 3}, "status": {"ignored": true}});
    let stored = widgets
        .patch(
            "w",
            &PatchParams::apply("greenlight"),
            &Patch::Apply(dynamic(object)),
        )
        .await
        .unwrap();
    assert_eq!(stored.data["spec"]["size"], 3);
    assert!(
        stored.data.get("status").is_none(),
        "status is a subresource"
    );
    let listed = widgets.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].types.as_ref().unwrap().kind, "Widget");
    let beta = ApiResource::from_gvk(&GroupVersionKind::gvk("example.com", "v1beta1", "Widget"));
    let old: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &beta);
    assert_eq!(
        old.get("w").await.unwrap().types.unwrap().api_version,
        "example.com/v1beta1"
    );

    let crds: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
        )),
    );
    crds.delete("widgets.example.com", &DeleteParams::default())
        .await
        .unwrap();
    assert!(api.list("example.com/v1", "Widget").is_empty());
    let status = api_error(widgets.get("w").await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    let found = Discovery::new(client).run().await.unwrap();
    assert!(found.resolve_gvk(&widget).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_creates_then_unchanged_reapply_keeps_resource_version() {
    let api = KubeApi::start().await.unwrap();
    let cms = config_maps(&api, "default");
    let params = PatchParams::apply("greenlight").force();
    let created = cms
        .patch(
            "settings",
            &params,
            &Patch::Apply(dynamic(config_map("settings", json!({"a": "1"})))),
        )
        .await
        .unwrap();
    let meta = &created.metadata;
    assert_eq!(meta.uid.as_ref().unwrap().len(), 36);
    assert_eq!(meta.generation, Some(1));
    assert!(meta.creation_timestamp.is_some());
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    let managed = meta.managed_fields.as_ref().unwrap();
    assert_eq!(managed.len(), 1);
    assert_eq!(managed[0].manager.as_deref(), Some("greenlight"));
    assert_eq!(managed[0].operation.as_deref(), Some("Apply"));
    assert_eq!(managed[0].fields_type.as_deref(), Some("FieldsV1"));
    assert_eq!(
        serde_json::to_value(managed[0].fields_v1.as_ref().unwrap()).unwrap(),
        json!({"f:data": {"f:a": {}}})
    );

    let again = cms
        .patch(
            "settings",
            &params,
            &Patch::Apply(dynamic(config_map("settings", json!({"a": "1"})))),
        )
        .await
        .unwrap();
    assert_eq!(rv(&again), rv(&created));
    assert_eq!(again.metadata.uid, created.metadata.uid);

    let changed = cms
        .patch(
            "settings",
            &params,
            &Patch::Apply(dynamic(config_map("settings", json!({"a": "2"})))),
        )
        .await
        .unwrap();
    assert!(rv(&changed).parse::<u64>().unwrap() > rv(&created).parse::<u64>().unwrap());
    assert_eq!(changed.metadata.generation, Some(2));
    assert_eq!(changed.metadata.uid, created.metadata.uid);

    // A label is metadata: a new resourceVersion, the same generation.
    let mut labelled = config_map("settings", json!({"a": "2"}));
    labelled["metadata"]["labels"] = json!({"team": "x"});
    let labelled = cms
        .patch("settings", &params, &Patch::Apply(dynamic(labelled)))
        .await
        .unwrap();
    assert_ne!(rv(&labelled), rv(&changed));
    assert_eq!(labelled.metadata.generation, Some(2));
    assert_eq!(
        api.get("v1", "ConfigMap", Some("default"), "settings")
            .unwrap()["metadata"]["labels"]["team"],
        "x"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_force_and_pruning() {
    let api = KubeApi::start().await.unwrap();
    let deploys = deployments(&api);
    let ours = PatchParams::apply("greenlight");
    deploys
        .patch(
            "web",
            &ours,
            &Patch::Apply(dynamic(deployment("web", 2, "web:1"))),
        )
        .await
        .unwrap();

    // Another applier setting a different replica count conflicts with us.
    let theirs = PatchParams::apply("other");
    let mut scaled = deployment("web", 5, "web:1");
    scaled["spec"]["template"]["spec"]["containers"][0]["image"] = json!("web:2");
    let status = api_error(
        deploys
            .patch("web", &theirs, &Patch::Apply(dynamic(scaled.clone())))
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        status.message,
        "Apply failed with 2 conflicts: conflicts with \"greenlight\":\n- .spec.replicas\n- .spec.template.spec.containers[name=\"app\"].image"
    );
    // Equal values are shared, not conflicting.
    let shared = deploys
        .patch(
            "web",
            &theirs,
            &Patch::Apply(dynamic(json!({
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                "spec": {"replicas": 2}
            }))),
        )
        .await
        .unwrap();
    let appliers: Vec<&str> = shared
        .metadata
        .managed_fields
        .as_ref()
        .unwrap()
        .iter()
        .filter(|m| m.operation.as_deref() == Some("Apply"))
        .filter_map(|m| m.manager.as_deref())
        .collect();
    assert_eq!(appliers, ["greenlight", "other"]);

    // An Update manager (kubectl scale, an HPA…) changing replicas makes our apply conflict.
    let mut live = api
        .get("apps/v1", "Deployment", Some("default"), "web")
        .unwrap();
    live["spec"]["replicas"] = json!(7);
    api.put_object(live);
    let status = api_error(
        deploys
            .patch(
                "web",
                &ours,
                &Patch::Apply(dynamic(deployment("web", 2, "web:1"))),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 409);
    assert!(
        status
            .message
            .starts_with("Apply failed with 1 conflict: conflict with \"test\" using apps/v1 at "),
        "{}",
        status.message
    );
    assert!(
        status.message.ends_with(": .spec.replicas"),
        "{}",
        status.message
    );

    // Force takes the field back.
    let forced = deploys
        .patch(
            "web",
            &ours.clone().force(),
            &Patch::Apply(dynamic(deployment("web", 2, "web:1"))),
        )
        .await
        .unwrap();
    assert_eq!(forced.data["spec"]["replicas"], 2);
    let managers: Vec<String> = forced
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .map(|m| m.manager.unwrap())
        .collect();
    assert!(!managers.contains(&"test".to_owned()), "{managers:?}");

    // Omitting a field we alone own removes it; one "other" co-owns stays.
    deploys
        .patch(
            "web",
            &theirs,
            &Patch::Apply(dynamic(json!({
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                "spec": {"replicas": 2}
            }))),
        )
        .await
        .unwrap();
    let mut slim = deployment("web", 2, "web:1");
    slim["metadata"].as_object_mut().unwrap().remove("labels");
    slim["spec"].as_object_mut().unwrap().remove("replicas");
    let pruned = deploys
        .patch(
            "web",
            &ours.clone().force(),
            &Patch::Apply(dynamic(slim.clone())),
        )
        .await
        .unwrap();
    assert!(pruned.metadata.labels.is_none());
    assert_eq!(pruned.data["spec"]["replicas"], 2, "still owned by other");

    // Once "other" lets go too, the field goes.
    deploys
        .patch("web", &theirs, &Patch::Apply(dynamic(json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "annotations": {"x": "y"}}
        }))))
        .await
        .unwrap();
    let live = api
        .get("apps/v1", "Deployment", Some("default"), "web")
        .unwrap();
    assert!(live["spec"].get("replicas").is_none(), "{live}");
    assert_eq!(live["metadata"]["annotations"]["x"], "y");

    // A container dropped from the applied list is removed from the live list.
    let mut two = slim.clone();
    two["spec"]["template"]["spec"]["containers"] =
        json!([{"name": "app", "image": "web:1"}, {"name": "sidecar", "image": "proxy:1"}]);
    deploys
        .patch("web", &ours, &Patch::Apply(dynamic(two)))
        .await
        .unwrap();
    let one = deploys
        .patch("web", &ours, &Patch::Apply(dynamic(slim)))
        .await
        .unwrap();
    assert_eq!(
        one.data["spec"]["template"]["spec"]["containers"],
        json!([{"name": "app", "image": "web:1"}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_validation_and_missing_namespace() {
    let api = KubeApi::start().await.unwrap();
    let cms = config_maps(&api, "default");
    let before = api.requests().len();
    let dry = cms
        .patch(
            "preview",
            &PatchParams::apply("greenlight").dry_run(),
            &Patch::Apply(dynamic(config_map("preview", json!({"a": "1"})))),
        )
        .await
        .unwrap();
    assert_eq!(dry.data["data"]["a"], "1");
    assert!(
        api.get("v1", "ConfigMap", Some("default"), "preview")
            .is_none()
    );
    let requests = api.requests();
    assert!(
        requests[before..]
            .iter()
            .any(|r| r.method == "PATCH" && r.query.contains("dryRun=All"))
    );

    let missing = config_maps(&api, "nowhere");
    let status = api_error(
        missing
            .patch(
                "x",
                &PatchParams::apply("greenlight"),
                &Patch::Apply(dynamic(config_map("x", json!({})))),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    assert_eq!(status.message, "namespaces \"nowhere\" not found");
    assert!(
        missing
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // Applying without a field manager is a bad request.
    let client = api.client();
    let request = axum::http::Request::patch("/api/v1/namespaces/default/configmaps/x")
        .header("Content-Type", "application/apply-patch+yaml")
        .body(serde_json::to_vec(&config_map("x", json!({}))).unwrap())
        .unwrap();
    let status = api_error(client.request::<Value>(request).await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (400, "BadRequest"));

    let nameless = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}});
    let status = api_error(
        cms.patch(
            "x",
            &PatchParams::apply("g"),
            &Patch::Apply(dynamic(nameless)),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    let kindless = json!({"apiVersion": "v1", "metadata": {"name": "x"}});
    let status = api_error(
        cms.patch("x", &PatchParams::apply("g"), &Patch::Apply(kindless))
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 400);
    let status = api_error(
        cms.patch(
            "Bad_Name",
            &PatchParams::apply("g"),
            &Patch::Apply(dynamic(config_map("Bad_Name", json!({})))),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(status.code, 422);

    // Unknown kinds are 404s.
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("example.com", "v1", "Gadget"));
    let gadgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let status = api_error(gadgets.get("g").await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
    let status = api_error(cms.get("absent").await.unwrap_err());
    assert_eq!(status.message, "configmaps \"absent\" not found");

    // Namespaces come and go with their contents.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let names: Vec<String> = namespaces
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|ns| ns.metadata.name.unwrap())
        .collect();
    assert_eq!(names, ["default", "kube-system"]);
    let ns: Namespace = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}}),
    )
    .unwrap();
    let created = namespaces
        .patch(
            "apps",
            &PatchParams::apply("greenlight"),
            &Patch::Apply(&ns),
        )
        .await
        .unwrap();
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Active"));
    let apps = config_maps(&api, "apps");
    apps.patch(
        "c",
        &PatchParams::apply("g"),
        &Patch::Apply(dynamic(config_map("c", json!({})))),
    )
    .await
    .unwrap();
    let deleted = namespaces
        .delete("apps", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        deleted.left().is_some(),
        "a namespace delete answers with the namespace"
    );
    assert!(api.get("v1", "ConfigMap", Some("apps"), "c").is_none());
    assert!(api.get("v1", "Namespace", None, "apps").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_selector_lists_and_deletes() {
    let api = KubeApi::start().await.unwrap();
    let client = api.client();
    let typed: Api<ConfigMap> = Api::default_namespaced(client.clone());
    for (name, tier) in [("a", "front"), ("b", "back"), ("c", "front")] {
        let mut cm = config_map(name, json!({}));
        cm["metadata"]["labels"] = json!({"app": "shop", "tier": tier});
        api.put_object(cm);
    }
    api.put_object(config_map("plain", json!({})));
    let mut other = config_map("elsewhere", json!({}));
    other["metadata"]["namespace"] = json!("kube-system");
    other["metadata"]["labels"] = json!({"app": "shop", "tier": "front"});
    api.put_object(other);

    let names = |list: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        list.items
            .into_iter()
            .map(|cm| cm.metadata.name.unwrap())
            .collect()
    };
    let list = typed
        .list(&ListParams::default().labels("app=shop,tier=front"))
        .await
        .unwrap();
    assert!(list.metadata.resource_version.is_some());
    assert_eq!(names(list), ["a", "c"]);
    assert_eq!(
        names(
            typed
                .list(&ListParams::default().labels("tier!=front"))
                .await
                .unwrap()
        ),
        ["b", "plain"]
    );
    assert_eq!(
        names(
            typed
                .list(&ListParams::default().labels("app"))
                .await
                .unwrap()
        ),
        ["a", "b", "c"]
    );
    assert_eq!(
        names(
            typed
                .list(&ListParams::default().labels("!app"))
                .await
                .unwrap()
        ),
        ["plain"]
    );
    assert_eq!(
        names(
            typed
                .list(&ListParams::default().labels("tier in (back,x)"))
                .await
                .unwrap()
        ),
        ["b"]
    );
    let all: Api<ConfigMap> = Api::all(client.clone());
    assert_eq!(
        names(
            all.list(&ListParams::default().labels("tier=front"))
                .await
                .unwrap()
        ),
        ["a", "c", "elsewhere"]
    );
    let paged = typed.list(&ListParams::default().limit(2)).await.unwrap();
    let token = paged.metadata.continue_.clone().unwrap();
    assert_eq!(names(paged), ["a", "b"]);
    assert_eq!(
        names(
            typed
                .list(&ListParams::default().limit(2).continue_token(&token))
                .await
                .unwrap()
        ),
        ["c", "plain"]
    );
    let status = api_error(
        typed
            .list(&ListParams::default().labels("a in b"))
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 400);

    // The raw list names its kind; built-in items carry no type of their own.
    let raw: Value = client
        .request(
            axum::http::Request::get(
                "/api/v1/namespaces/default/configmaps?labelSelector=tier%3Dback",
            )
            .body(vec![])
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        (raw["kind"].as_str(), raw["apiVersion"].as_str()),
        (Some("ConfigMapList"), Some("v1"))
    );
    assert!(raw["items"][0].get("kind").is_none());

    api.reset_requests();
    let answer = typed
        .delete("a", &DeleteParams::foreground())
        .await
        .unwrap();
    assert!(answer.left().unwrap().metadata.deletion_timestamp.is_some());
    let answer = typed
        .delete("b", &DeleteParams::background())
        .await
        .unwrap();
    assert!(answer.right().unwrap().is_success());
    typed.delete("c", &DeleteParams::orphan()).await.unwrap();
    let requests = api.requests();
    let policies: Vec<&str> = requests
        .iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| r.query.as_str())
        .collect();
    assert_eq!(
        policies,
        [
            "propagationPolicy=Foreground",
            "propagationPolicy=Background",
            "propagationPolicy=Orphan"
        ]
    );
    assert_eq!(requests[0].path, "/api/v1/namespaces/default/configmaps/a");
    assert!(api.get("v1", "ConfigMap", Some("default"), "a").is_none());
    let status = api_error(
        typed
            .delete("a", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_create_and_stale_replace() {
    let api = KubeApi::start().await.unwrap();
    let leases: Api<Lease> = Api::namespaced(api.client(), "kube-system");
    let lease: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "greenlight-agent"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15, "renewTime": "2026-01-01T00:00:00.000000Z"}
    }))
    .unwrap();
    assert_eq!(
        api_error(leases.get("greenlight-agent").await.unwrap_err()).code,
        404
    );
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let status = api_error(
        leases
            .create(&PostParams::default(), &lease)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status.code, status.reason.as_str()),
        (409, "AlreadyExists")
    );
    assert_eq!(
        status.message,
        "leases.coordination.k8s.io \"greenlight-agent\" already exists"
    );

    let mut renewed = created.clone();
    renewed.spec.as_mut().unwrap().holder_identity = Some("a".into());
    renewed.spec.as_mut().unwrap().lease_duration_seconds = Some(20);
    let renewed = leases
        .replace("greenlight-agent", &PostParams::default(), &renewed)
        .await
        .unwrap();
    assert_ne!(
        renewed.metadata.resource_version,
        created.metadata.resource_version
    );

    // A competitor still holding the old resourceVersion loses.
    let mut stale = created;
    stale.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let status = api_error(
        leases
            .replace("greenlight-agent", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    assert!(
        status.message.contains("the object has been modified"),
        "{}",
        status.message
    );
    assert_eq!(
        leases
            .get("greenlight-agent")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("a")
    );

    // Merge and JSON patches are Updates by the named manager.
    let patched = leases
        .patch(
            "greenlight-agent",
            &PatchParams {
                field_manager: Some("mover".into()),
                ..Default::default()
            },
            &Patch::Merge(json!({"spec": {"holderIdentity": "c"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.spec.unwrap().holder_identity.as_deref(), Some("c"));
    assert!(patched.metadata.managed_fields.unwrap().iter().any(|m| {
        m.manager.as_deref() == Some("mover") && m.operation.as_deref() == Some("Update")
    }));
    let request = axum::http::Request::patch(
        "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/greenlight-agent",
    )
    .header("Content-Type", "application/json-patch+json")
    .body(
        serde_json::to_vec(
            &json!([{"op": "replace", "path": "/spec/holderIdentity", "value": "d"}]),
        )
        .unwrap(),
    )
    .unwrap();
    let patched: Lease = api.client().request(request).await.unwrap();
    assert_eq!(patched.spec.unwrap().holder_identity.as_deref(), Some("d"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_follow_auto_rollout_and_set_status() {
    let api = KubeApi::start().await.unwrap();
    let typed: Api<Deployment> = Api::default_namespaced(api.client());
    let web: Deployment = serde_json::from_value(deployment("web", 3, "web:1")).unwrap();
    let params = PatchParams::apply("greenlight").force();
    let applied = typed
        .patch("web", &params, &Patch::Apply(&web))
        .await
        .unwrap();
    assert_eq!(applied.metadata.generation, Some(1));
    let live = typed.get("web").await.unwrap();
    let status = live.status.unwrap();
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        (
            status.replicas,
            status.updated_replicas,
            status.available_replicas,
            status.ready_replicas
        ),
        (Some(3), Some(3), Some(3), Some(3))
    );
    assert!(live.metadata.managed_fields.unwrap().iter().any(|m| {
        m.manager.as_deref() == Some("kube-controller-manager")
            && m.subresource.as_deref() == Some("status")
    }));

    api.set_auto_rollout(false);
    let v2: Deployment = serde_json::from_value(deployment("web", 3, "web:2")).unwrap();
    let applied = typed
        .patch("web", &params, &Patch::Apply(&v2))
        .await
        .unwrap();
    assert_eq!(applied.metadata.generation, Some(2));
    for _ in 0..3 {
        let live = typed.get("web").await.unwrap();
        assert_eq!(
            live.status.unwrap().observed_generation,
            Some(1),
            "stuck until set_status"
        );
    }
    // Re-applying the same spec is not a change and does not move anything.
    let again = typed
        .patch("web", &params, &Patch::Apply(&v2))
        .await
        .unwrap();
    assert_eq!(
        again.metadata.resource_version,
        typed.get("web").await.unwrap().metadata.resource_version
    );

    api.set_status(
        "apps/v1",
        "Deployment",
        "default",
        "web",
        json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "readyReplicas": 3, "availableReplicas": 3}),
    );
    let live = typed.get("web").await.unwrap();
    assert_eq!(live.status.unwrap().observed_generation, Some(2));
    assert_eq!(live.metadata.generation, Some(2));

    // Selectors are immutable, as on the real server.
    let mut moved = deployment("web", 3, "web:2");
    moved["spec"]["selector"] = json!({"matchLabels": {"app": "other"}});
    let status = api_error(
        typed
            .patch("web", &params, &Patch::Apply(&moved))
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));

    // Jobs complete at once with auto rollout on.
    api.set_auto_rollout(true);
    let job_api: Api<k8s_openapi::api::batch::v1::Job> = Api::default_namespaced(api.client());
    let job = json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "migrate"},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "m", "image": "m:1"}]}}}
    });
    job_api
        .patch("migrate", &params, &Patch::Apply(&job))
        .await
        .unwrap();
    let job = job_api.get("migrate").await.unwrap();
    let status = job.status.unwrap();
    assert_eq!(status.succeeded, Some(1));
    assert!(
        status
            .conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "Complete" && c.status == "True")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_refuses_connections() {
    let api = KubeApi::start().await.unwrap();
    let url = api.url();
    assert!(url.starts_with("http://127.0.0.1:"));
    let response = reqwest::get(format!("{url}/api")).await.unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["versions"], json!(["v1"]));
    api.stop();
    let mut refused = false;
    for _ in 0..50 {
        if reqwest::get(format!("{url}/version")).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_collections_and_protected_namespaces() {
    let api = KubeApi::start().await.unwrap();
    let client = api.client();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::default_namespaced(client.clone());
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "token", "labels": {"app": "x"}},
        "stringData": {"password": "hello"}
    });
    let params = PatchParams::apply("greenlight").force();
    let stored = secrets
        .patch("token", &params, &Patch::Apply(&secret))
        .await
        .unwrap();
    assert_eq!(stored.data.unwrap()["password"].0, b"hello");
    assert!(stored.string_data.is_none());
    let again = secrets
        .patch("token", &params, &Patch::Apply(&secret))
        .await
        .unwrap();
    assert_eq!(
        again.metadata.resource_version,
        stored.metadata.resource_version
    );

    let cms = config_maps(&api, "default");
    for name in ["a", "b"] {
        let mut cm = config_map(name, json!({}));
        cm["metadata"]["labels"] = json!({"app": "x"});
        api.put_object(cm);
    }
    api.put_object(config_map("keep", json!({})));
    let deleted = cms
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("app=x"),
        )
        .await
        .unwrap();
    assert_eq!(deleted.left().unwrap().items.len(), 2);
    let left: Vec<String> = api
        .list("v1", "ConfigMap")
        .iter()
        .map(|cm| cm["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left, ["keep"]);

    let namespaces: Api<Namespace> = Api::all(client);
    let status = api_error(
        namespaces
            .delete("default", &DeleteParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
}
