//! An in-process emulation of the Kubernetes API server, served over real HTTP on loopback,
//! so that the agent's `kube::Client` code runs its production paths in tests.
//!
//! # What it emulates
//!
//! - **Discovery**: `GET /version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}`,
//!   `/apis/{group}/{version}`, and the aggregated discovery (`apidiscovery.k8s.io/v2`, or
//!   `v2beta1`) that `Discovery::run_aggregated` asks for with its `Accept` header on `/api`
//!   and `/apis`; `Discovery::run`, `discovery::group` and `pinned_kind` use the legacy
//!   documents. Subresource entries (`deployments/status`) are listed as the real server
//!   does. Built-in kinds: core `Namespace`, `ConfigMap`, `Secret`, `Service`,
//!   `ServiceAccount`, `Pod`, `PersistentVolumeClaim`; `apps/v1` `Deployment`,
//!   `StatefulSet`, `DaemonSet`, `ReplicaSet`; `batch/v1` `Job`, `CronJob`;
//!   `coordination.k8s.io/v1` `Lease`; `rbac.authorization.k8s.io/v1` roles and bindings;
//!   `networking.k8s.io/v1` `Ingress`, `NetworkPolicy`; `policy/v1` `PodDisruptionBudget`;
//!   `autoscaling/v2` `HorizontalPodAutoscaler`; `apiextensions.k8s.io/v1`
//!   `CustomResourceDefinition`.
//! - **Custom resources**: a stored CRD (validated: names, scope, one storage version,
//!   `metadata.name` = `plural.group`) serves its served versions at once, gets an
//!   `Established` status from manager `kube-apiserver`, and its objects are stored and
//!   listed like any other; deleting the CRD deletes them.
//! - **Reads**: GET of one object (and of its `/status`), LIST per namespace or across all,
//!   with `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a)`),
//!   `fieldSelector` on `metadata.name`/`metadata.namespace`, and `limit`/`continue`
//!   paging. Lists are `{kind: XList, apiVersion, metadata: {resourceVersion}, items}`;
//!   items of built-in kinds carry no `apiVersion`/`kind`, as in the real typed lists.
//! - **Server-side apply** (`application/apply-patch+yaml`; the body must be JSON):
//!   `fieldManager` required, `force`, `dryRun=All`, creates or updates, conflicts (409
//!   `Conflict` with the real message and `FieldManagerConflict` causes), forced ownership
//!   transfer, pruning of fields the manager owned and no longer applies (kept when another
//!   manager owns them), shared ownership of equal values, `metadata.resourceVersion` as a
//!   precondition, `metadata.managedFields` in the body rejected. An apply that changes
//!   nothing is not a write: the `resourceVersion` stays.
//! - **Field ownership** is kept per manager, operation (`Apply`/`Update`) and subresource,
//!   and shown in `metadata.managedFields` in the real `FieldsV1` format (`f:` fields,
//!   `k:{"name":…}` keyed items with `.`). Lists of built-in kinds whose items all have a
//!   distinct `name` (containers, env, volumes, ports…) are keyed on `name`; every other
//!   list, and every list of a custom resource, is atomic. Non-apply writes (create,
//!   replace, merge/JSON patch, [`KubeApi::put_object`]) give their manager the fields whose
//!   values they changed, as the real server does.
//! - **Metadata**: `uid` (random v4), `creationTimestamp` (RFC 3339), `generation` (1 on
//!   create, +1 when anything outside metadata and status changes; set for every kind),
//!   `resourceVersion` (one global counter, bumped by every write, including deletes).
//! - **Create** (POST, 201, 409 `AlreadyExists`, `generateName`), **replace** (PUT, 409
//!   `Conflict` on a stale `metadata.resourceVersion`, 404 when missing except for `Lease`,
//!   which PUT may create), **merge patch** and **JSON patch** (an Update by `fieldManager`
//!   or, like the real server, the user agent's product name).
//! - **Delete** with `propagationPolicy` (query or `DeleteOptions` body), `dryRun`, and
//!   `uid`/`resourceVersion` preconditions. Objects are removed at once; the response is a
//!   `Success` status, except where the real server would keep the object behind a finalizer
//!   for a while (`Foreground`, `Orphan`, a Namespace, a CRD): then it is the object with
//!   `deletionTimestamp` and that finalizer. Deleting a Namespace deletes its objects
//!   (`default`, `kube-system` and `kube-public` may not be deleted: 403). The
//!   request log shows a policy given in the body as `propagationPolicy=…` in `query`.
//! - **Validation and errors**: `Status` bodies (`NotFound`, `AlreadyExists`, `Conflict`,
//!   `BadRequest`, `Invalid`, `MethodNotAllowed`, `UnsupportedMediaType`) that
//!   `kube::Error::Api` parses; writes into a missing namespace get 404 `namespaces "x" not
//!   found`; unknown paths get 404 "the server could not find the requested resource"; a
//!   body whose `apiVersion`/`kind`/name does not match the URL gets 400; a missing name or
//!   an invalid one (DNS subdomain/label rules) gets 422; immutable fields get 422
//!   (`spec.selector` of apps workloads, `spec.template`/`spec.selector` of Jobs, the
//!   StatefulSet spec outside its mutable fields, data of `immutable` ConfigMaps/Secrets,
//!   `spec.group`/`spec.scope` of CRDs).
//! - **Server-side conversions**: Secret `stringData` is folded into base64 `data`;
//!   Namespaces get the `kubernetes.io/metadata.name` label and `status.phase: Active`.
//!   Status is ignored in writes to the main resource of kinds with a status subresource.
//! - **Controllers**: with auto rollout on (the default), each HTTP write that creates a
//!   Deployment/StatefulSet/DaemonSet/Job or moves its generation is followed by a separate
//!   status write (manager `kube-controller-manager`, subresource `status`, its own
//!   `resourceVersion`) that makes it rolled out or complete; the write's own response still
//!   shows the old status, as with a real controller. With it off, status stays as it is
//!   until [`KubeApi::set_status`]. [`KubeApi::put_object`] never triggers a rollout.
//!
//! # What it does not emulate
//!
//! - Watches (`?watch=true` gets 405 `MethodNotAllowed`, although discovery lists the
//!   verb), strategic merge patch (415), YAML request bodies, protobuf, HTTP/2, TLS and
//!   authentication/authorization (every request is allowed), admission webhooks.
//! - Defaulting (no `strategy`, `revisionHistoryLimit`, `clusterIP`, container defaults…):
//!   stored objects are exactly what was written. OpenAPI/CRD schema validation and
//!   unknown-field pruning; label and annotation syntax checks.
//! - Version conversion of custom resources: an object is served at any served version with
//!   only its `apiVersion` rewritten. Built-in kinds are served at one version each.
//! - Garbage collection and finalizers: `ownerReferences` are stored but dependents are not
//!   deleted, and finalizers never delay a delete. No ReplicaSets or Pods are created.
//! - Namespaces do not get the default ServiceAccount or the `kube-root-ca.crt` ConfigMap;
//!   only `default` and `kube-system` exist at start.
//! - Writes through the `status` subresource over HTTP (GET works); status is driven with
//!   [`KubeApi::set_status`] and auto rollout. Scale and other subresources.
//! - Associative lists keyed on anything but `name` (for example container ports keyed on
//!   `containerPort`+`protocol`), set-type lists, and `x-kubernetes-list-type` of CRD
//!   schemas; such lists are atomic here, which only changes conflict granularity.
//! - Reads always see the latest state: `resourceVersion`/`resourceVersionMatch` on GET and
//!   LIST are ignored, and `continue` tokens never expire.
//! - `metadata.generation` is set on every kind, including those (ConfigMap, Secret…) for
//!   which the real server leaves it out.

mod fields;
mod http;
mod resources;
mod selectors;
mod store;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use serde_json::Value;
use tokio::sync::watch;

use self::http::Shared;
use self::store::Key;

/// One request the emulated server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// The HTTP method, as `GET` or `PATCH`.
    pub method: String,
    /// The URL path, as `/apis/apps/v1/namespaces/default/deployments/web`.
    pub path: String,
    /// The raw (still percent-encoded) query string, plus `propagationPolicy=…` when a
    /// DELETE carried the policy in its body.
    pub query: String,
}

struct Inner {
    shared: Arc<Shared>,
    url: String,
    // Dropping the last handle drops this sender, which ends the server.
    shutdown: watch::Sender<bool>,
}

/// A running emulated API server; clones share it, and it stops when the last one drops.
#[derive(Clone)]
pub struct KubeApi {
    inner: Arc<Inner>,
}

/// The largest request body the real API server accepts.
const MAX_BODY: usize = 3 * 1024 * 1024;

impl KubeApi {
    /// Starts a server on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let shared = Arc::new(Shared::new(address.clone()));
        let (shutdown, mut stopped) = watch::channel(false);
        let app = Router::new()
            .fallback(http::handle)
            .with_state(shared.clone())
            .layer(DefaultBodyLimit::max(MAX_BODY));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                })
                .await;
        });
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                url: format!("http://{address}"),
                shutdown,
            }),
        })
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.inner.url.clone()
    }

    /// A `kube::Client` for this server, without auth, default namespace `default`; call it
    /// inside a Tokio runtime (the client spawns its request buffer there).
    pub fn client(&self) -> kube::Client {
        let uri = self
            .inner
            .url
            .parse()
            .expect("the server URL is a valid URI");
        kube::Client::try_from(kube::Config::new(uri))
            .expect("a kube client for a plain-HTTP loopback URL builds")
    }

    /// The stored object of `kind` at `api_version`, as served at that version; `namespace`
    /// is `None` for cluster-scoped kinds (for a namespaced kind, `None` means `default`).
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let state = self.inner.shared.lock();
        let (resource, version) = state.resource_of_kind(api_version, kind)?;
        state.get(&resource, &version, namespace, name).ok()
    }

    /// Every stored object of `kind` at `api_version`, across namespaces, by namespace and
    /// name.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let state = self.inner.shared.lock();
        let Some((resource, version)) = state.resource_of_kind(api_version, kind) else {
            return Vec::new();
        };
        state
            .select(&resource, None, &Default::default(), &Default::default())
            .into_iter()
            .map(|(_, stored)| store::State::present(&resource, &version, &stored.object))
            .collect()
    }

    /// Creates or replaces an object as another actor would with an update (manager
    /// `test`): ownership, `resourceVersion` and `generation` move as on the real server. A
    /// `status` in `object` is stored as given; without one the current status stays. It
    /// does not trigger an auto rollout. Panics when the kind is unknown, the name missing,
    /// or the namespace (default `default`) does not exist.
    pub fn put_object(&self, object: Value) {
        let result = self.inner.shared.lock().put(object, "test");
        if let Err(error) = result {
            panic!("put_object: {error}");
        }
    }

    /// Replaces the status of an object (namespace "" for cluster-scoped kinds) through the
    /// status subresource, as manager `test`. Panics when there is no such object.
    pub fn set_status(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        status: Value,
    ) {
        let written = {
            let mut state = self.inner.shared.lock();
            match state.resource_of_kind(api_version, kind) {
                Some((resource, _)) => {
                    let namespace = (!namespace.is_empty()).then_some(namespace);
                    let key = Key::new(&resource, namespace, name);
                    state.write_status(&resource, &key, status, "test")
                }
                None => false,
            }
        };
        assert!(
            written,
            "set_status: no {kind} {namespace}/{name} at {api_version}"
        );
    }

    /// Whether writes roll workloads out at once (the default) or leave them as they are.
    pub fn set_auto_rollout(&self, enabled: bool) {
        self.inner.shared.lock().auto_rollout = enabled;
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.inner.shared.lock().requests.clone()
    }

    /// Forgets the requests received so far.
    pub fn reset_requests(&self) {
        self.inner.shared.lock().requests.clear();
    }

    /// Stops serving; connections are refused from then on.
    pub fn stop(&self) {
        let _ = self.inner.shutdown.send(true);
    }
}

#[cfg(test)]
mod tests;
