//! The Kubernetes side: discovery, server-side apply, reads and deletes, through kube.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions,
    PropagationPolicy,
};
use kube::core::{ApiResource, GroupVersion};
use kube::discovery::Scope;
use serde_json::Value;

use crate::impersonate::{InvalidUser, acting_as};
use crate::inventory::{ADOPTED, ADOPTED_ANNOTATION, INVENTORY_LABEL};
use crate::manifest::split_api_version;
use crate::plan::Terminating;
use tracing::warn;

/// Bound on every call to the API server: kube sets no read timeout, and one hung call must
/// not stall the apply loop forever.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at letting go of an object that keeps changing between its read and the write.
const LET_GO_ATTEMPTS: u32 = 3;
/// Bound on reading one group-version's kinds: the document is small, and a revision using
/// a broken group should fail soon rather than after kube's retries.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the kinds of one group-version are trusted before they are read again, so that
/// removed or changed kinds are noticed without a restart.
const DISCOVERY_TTL: Duration = Duration::from_secs(300);

/// Why a call to the API server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Api(#[from] kube::Error),
    #[error("cannot encode object: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("{0}")]
    Inventory(#[from] crate::inventory::record::RecordError),
    #[error("the API server did not answer within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("kind {0} is not served")]
    NotServed(String),
    /// A list that answered for several objects at once failed.
    #[error("{0}")]
    Listing(String),
    /// A write came back as another kind of write's result.
    #[error("the agent's write of {0} was answered as another kind of write")]
    MismatchedAnswer(String),
}

impl ClusterError {
    /// The API server's message, as users know it from kubectl.
    pub fn message(&self) -> String {
        match self {
            ClusterError::Api(kube::Error::Api(status)) => status.message.clone(),
            other => other.to_string(),
        }
    }

    /// Whether the API server said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClusterError::Api(kube::Error::Api(status)) if status.code == 404)
    }

    /// Whether the API server refused a write because the object changed since it was read.
    pub fn is_conflict(&self) -> bool {
        matches!(self, ClusterError::Api(kube::Error::Api(status)) if status.code == 409)
    }
}

/// Runs one API call under [`CALL_TIMEOUT`].
pub async fn bounded<T, E>(call: impl Future<Output = Result<T, E>>) -> Result<T, ClusterError>
where
    ClusterError: From<E>,
{
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ClusterError::Timeout(CALL_TIMEOUT)),
    }
}

/// `read`, a discovery read, within [`DISCOVERY_TIMEOUT`]: shorter than [`bounded`], since
/// kube retries a 503 (an unavailable aggregated API) for minutes and a revision using such
/// a group should fail soon. Its own error is left to the caller, which tells a group or
/// version not served from a failure.
async fn within_discovery_time<T>(
    read: impl Future<Output = kube::Result<T>>,
) -> Result<kube::Result<T>, ClusterError> {
    tokio::time::timeout(DISCOVERY_TIMEOUT, read)
        .await
        .map_err(|_| ClusterError::Timeout(DISCOVERY_TIMEOUT))
}

/// A kind the API server serves.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub resource: ApiResource,
    pub namespaced: bool,
}

/// Objects per page of a list.
const LIST_PAGE: u32 = 500;

/// Whose an existing object is, as its metadata says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    /// The agent its inventory label names, if it carries one.
    pub agent: Option<String>,
    /// It carries the adopted mark ([`ADOPTED_ANNOTATION`]): an agent found it, rather than
    /// made it.
    pub adopted: bool,
}

impl Owner {
    /// Whose the object of `meta` is.
    pub fn of(meta: &ObjectMeta) -> Self {
        Self {
            agent: meta
                .labels
                .as_ref()
                .and_then(|l| l.get(INVENTORY_LABEL))
                .cloned(),
            adopted: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(ADOPTED_ANNOTATION))
                .is_some_and(|v| v == ADOPTED),
        }
    }
}

/// One object of a kind the cluster serves.
#[derive(Debug, Clone, Copy)]
pub struct ObjectRef<'a> {
    pub resolved: &'a Resolved,
    pub namespace: Option<&'a str>,
    pub name: &'a str,
}

/// A change to one object.
#[derive(Debug, Clone, Copy)]
pub enum Write<'a> {
    /// Server-side apply of `body` as the agent's field manager.
    Apply {
        object: ObjectRef<'a>,
        body: &'a Value,
        /// Take fields other managers own.
        force: bool,
        dry_run: bool,
    },
    /// Remove the inventory label and the adopted mark, letting go of an object `agent`
    /// adopted; only while the label names `agent`.
    LetGo {
        object: ObjectRef<'a>,
        agent: &'a str,
    },
    /// Add the adopted mark ([`ADOPTED_ANNOTATION`]) to an object the agent adopted.
    MarkAdopted { object: ObjectRef<'a> },
    /// Delete, with `propagation` (`orphan`, `background` or `foreground`), only the
    /// object whose UID is `uid`: the one judged to be pruned, not one created again under
    /// its name since.
    Delete {
        object: ObjectRef<'a>,
        propagation: &'a str,
        uid: &'a str,
    },
}

/// What a write did.
#[derive(Debug)]
pub enum Written {
    /// The object as stored after an apply (or as it would be, on a dry run) or a mark.
    Object(Box<DynamicObject>),
    /// What letting go did.
    LetGo(LetGo),
    /// What a delete did.
    Deleted(Deleted),
}

/// What letting go of an object did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LetGo {
    /// The label and the mark were removed.
    Released,
    /// There was no such object.
    Absent,
    /// Untouched: its label does not name the agent (another agent's, or none).
    NotOurs(Option<String>),
}

/// What a delete did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    /// There was nothing to delete.
    Absent,
    /// The object is gone.
    Gone,
    /// Accepted, but the object stays until its finalizers are removed.
    Terminating(Terminating),
    /// Not deleted: the object under the name is another than the one judged (its UID
    /// differs), created again since.
    Replaced,
}

impl crate::plan::ServedKind for Resolved {
    fn namespaced(&self) -> bool {
        self.namespaced
    }
}

/// The kinds one group-version serves, as last read.
struct Served {
    read_at: Instant,
    kinds: HashMap<String, Resolved>,
}

/// A connection to one cluster with the kinds discovered so far.
pub struct Cluster {
    client: kube::Client,
    /// What objects are read and written with: the agent's own client, or one acting as the
    /// user a revision's settings name.
    acting: kube::Client,
    acting_as: Option<String>,
    /// Per `apiVersion`: discovery is per group-version, so that one broken group (an
    /// unavailable aggregated APIService) cannot fail revisions that do not use it.
    served: RwLock<HashMap<String, Served>>,
    field_manager: String,
}

impl Cluster {
    /// Wraps `client`; applies as `field_manager`.
    pub fn new(client: kube::Client, field_manager: &str) -> Self {
        Self {
            acting: client.clone(),
            acting_as: None,
            client,
            served: RwLock::new(HashMap::new()),
            field_manager: field_manager.to_owned(),
        }
    }

    /// The agent's own client, for its inventory and Lease.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// The client objects are read and written with.
    pub fn acting(&self) -> &kube::Client {
        &self.acting
    }

    /// Reads and writes objects as `user` from now on (the agent itself for `None`).
    pub fn act_as(&mut self, user: Option<&str>) -> Result<(), InvalidUser> {
        if self.acting_as.as_deref() == user {
            return Ok(());
        }
        self.acting = match user {
            Some(user) => acting_as(&self.client, user)?,
            None => self.client.clone(),
        };
        self.acting_as = user.map(str::to_owned);
        Ok(())
    }

    /// Makes sure every `(apiVersion, kind)` in `wanted` can be resolved if the cluster serves
    /// it: reads each group-version not read yet, read too long ago, or not serving a wanted
    /// kind (its CRD may have been applied since). Returns the group-versions whose discovery
    /// failed, with why; the others resolve regardless.
    pub async fn discover<'a>(
        &self,
        wanted: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> BTreeMap<String, String> {
        let mut kinds: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (api_version, kind) in wanted {
            kinds.entry(api_version).or_default().insert(kind);
        }
        let stale: Vec<&str> = {
            let served = self.served.read().unwrap_or_else(|p| p.into_inner());
            kinds
                .iter()
                .filter(|(api_version, kinds)| match served.get(**api_version) {
                    Some(s) => {
                        s.read_at.elapsed() >= DISCOVERY_TTL
                            || kinds.iter().any(|k| !s.kinds.contains_key(*k))
                    }
                    None => true,
                })
                .map(|(api_version, _)| *api_version)
                .collect()
        };
        let reads = stale.iter().map(|api_version| async move {
            (*api_version, self.read_group_version(api_version).await)
        });
        let mut failed = BTreeMap::new();
        for (api_version, read) in futures_util::future::join_all(reads).await {
            let mut served = self.served.write().unwrap_or_else(|p| p.into_inner());
            match read {
                Ok(kinds) => {
                    served.insert(
                        api_version.to_owned(),
                        Served {
                            read_at: Instant::now(),
                            kinds,
                        },
                    );
                }
                Err(error) => {
                    // What was read before still holds: keep resolving from it.
                    warn!(api_version, error = %error.message(), "API discovery failed");
                    failed.insert(api_version.to_owned(), error.message());
                }
            }
        }
        failed
    }

    /// Reads the discovery of `api_version` again, whatever was read before, for `kind`;
    /// returns the group-version's failure, if its read failed.
    pub async fn rediscover(&self, api_version: &str, kind: &str) -> BTreeMap<String, String> {
        self.served
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(api_version);
        self.discover([(api_version, kind)]).await
    }

    async fn read_group_version(
        &self,
        api_version: &str,
    ) -> Result<HashMap<String, Resolved>, ClusterError> {
        let (group, version) = split_api_version(api_version);
        let gv = GroupVersion::gv(group, version);
        let read = within_discovery_time(kube::discovery::pinned_group(&self.client, &gv))
            .await?
            .map_err(ClusterError::from);
        let group = match read {
            Ok(group) => group,
            // The group-version is not served (yet): no kinds, not an error.
            Err(error) if error.is_not_found() => return Ok(HashMap::new()),
            Err(error) => return Err(error),
        };
        Ok(group
            .versioned_resources(version)
            .into_iter()
            .map(|(resource, caps)| {
                let namespaced = caps.scope == Scope::Namespaced;
                (
                    resource.kind.clone(),
                    Resolved {
                        resource,
                        namespaced,
                    },
                )
            })
            .collect())
    }

    /// `kind` of `group` in any version the cluster serves now, for an object recorded
    /// under a version it no longer serves (a removed beta API, a CRD version turned off):
    /// the object is still there, reachable through another version. `None` when no
    /// version of the group serves the kind.
    pub async fn resolve_in_served_version(
        &self,
        group: &str,
        kind: &str,
    ) -> Result<Option<Resolved>, ClusterError> {
        let read = within_discovery_time(kube::discovery::group(&self.client, group)).await?;
        let group = match read {
            Ok(group) => group,
            Err(kube::Error::Discovery(kube::error::DiscoveryError::MissingApiGroup(_))) => {
                return Ok(None);
            }
            Err(error) => return Err(ClusterError::from(error)),
        };
        // The preferred version first, as clients address a kind by default.
        let preferred = group.preferred_version_or_latest().to_owned();
        let versions = std::iter::once(preferred.clone()).chain(
            group
                .versions()
                .filter(|version| **version != preferred)
                .map(str::to_owned),
        );
        for version in versions {
            let found = group
                .versioned_resources(&version)
                .into_iter()
                .find(|(resource, _)| resource.kind == kind);
            if let Some((resource, caps)) = found {
                return Ok(Some(Resolved {
                    resource,
                    namespaced: caps.scope == Scope::Namespaced,
                }));
            }
        }
        Ok(None)
    }

    /// The served kind for `api_version` and `kind`, as discovered so far.
    pub fn resolve(&self, api_version: &str, kind: &str) -> Option<Resolved> {
        let served = self.served.read().unwrap_or_else(|p| p.into_inner());
        served.get(api_version)?.kinds.get(kind).cloned()
    }

    fn api(&self, resolved: &Resolved, namespace: Option<&str>) -> Api<DynamicObject> {
        match (resolved.namespaced, namespace) {
            (true, Some(ns)) => Api::namespaced_with(self.acting.clone(), ns, &resolved.resource),
            _ => Api::all_with(self.acting.clone(), &resolved.resource),
        }
    }

    /// Performs `write`: every change the agent makes to the objects of a revision passes
    /// through here, as a value, so what it may do to a cluster is read in one place.
    pub async fn perform(&self, write: Write<'_>) -> Result<Written, ClusterError> {
        match write {
            Write::Apply {
                object:
                    ObjectRef {
                        resolved,
                        namespace,
                        name,
                    },
                body,
                force,
                dry_run,
            } => self
                .apply(resolved, namespace, name, body, force, dry_run)
                .await
                .map(|object| Written::Object(Box::new(object))),
            Write::LetGo {
                object:
                    ObjectRef {
                        resolved,
                        namespace,
                        name,
                    },
                agent,
            } => self
                .let_go(resolved, namespace, name, agent)
                .await
                .map(Written::LetGo),
            Write::MarkAdopted {
                object:
                    ObjectRef {
                        resolved,
                        namespace,
                        name,
                    },
            } => self
                .mark_adopted(resolved, namespace, name)
                .await
                .map(|object| Written::Object(Box::new(object))),
            Write::Delete {
                object:
                    ObjectRef {
                        resolved,
                        namespace,
                        name,
                    },
                propagation,
                uid,
            } => self
                .delete(resolved, namespace, name, &delete_params(propagation, uid))
                .await
                .map(Written::Deleted),
        }
    }

    /// Server-side applies `body`; returns the object as stored (or as it would be, on dry run).
    async fn apply(
        &self,
        resolved: &Resolved,
        namespace: Option<&str>,
        name: &str,
        body: &Value,
        force: bool,
        dry_run: bool,
    ) -> Result<DynamicObject, ClusterError> {
        let mut params = PatchParams::apply(&self.field_manager);
        if force {
            params = params.force();
        }
        if dry_run {
            params = params.dry_run();
        }
        bounded(
            self.api(resolved, namespace)
                .patch(name, &params, &Patch::Apply(body)),
        )
        .await
    }

    /// The object, if it exists.
    pub async fn get(
        &self,
        resolved: &Resolved,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<DynamicObject>, ClusterError> {
        bounded(self.api(resolved, namespace).get_opt(name)).await
    }

    /// Whose the object is, if it exists: its metadata alone, so that reading a Secret's
    /// owner does not fetch its data.
    pub async fn owner(
        &self,
        resolved: &Resolved,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<Owner>, ClusterError> {
        let found = bounded(self.api(resolved, namespace).get_metadata_opt(name)).await?;
        Ok(found.map(|object| Owner::of(&object.metadata)))
    }

    /// The name of every object of `resolved` in `namespace`, each with whose it is: one
    /// paginated metadata list rather than a read per object.
    pub async fn owners(
        &self,
        resolved: &Resolved,
        namespace: Option<&str>,
    ) -> Result<HashMap<String, Owner>, ClusterError> {
        let api = self.api(resolved, namespace);
        let mut names = HashMap::new();
        let mut params = ListParams::default().limit(LIST_PAGE);
        loop {
            let page = bounded(api.list_metadata(&params)).await?;
            for object in page.items {
                let owner = Owner::of(&object.metadata);
                names.insert(object.metadata.name.unwrap_or_default(), owner);
            }
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => params = params.continue_token(&token),
                _ => return Ok(names),
            }
        }
    }

    /// A merge patch's parameters: written as the agent's field manager, which such a write
    /// records as an update of its own, apart from what the agent's applies own.
    fn update_params(&self) -> PatchParams {
        PatchParams {
            field_manager: Some(self.field_manager.clone()),
            ..PatchParams::default()
        }
    }

    /// Adds the adopted mark with a merge patch; returns the object as stored.
    async fn mark_adopted(
        &self,
        resolved: &Resolved,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<DynamicObject, ClusterError> {
        let patch = serde_json::json!({
            "metadata": { "annotations": { ADOPTED_ANNOTATION: ADOPTED } }
        });
        bounded(self.api(resolved, namespace).patch(
            name,
            &self.update_params(),
            &Patch::Merge(&patch),
        ))
        .await
    }

    /// Removes the inventory label and the adopted mark, if the label names `agent`.
    async fn let_go(
        &self,
        resolved: &Resolved,
        namespace: Option<&str>,
        name: &str,
        agent: &str,
    ) -> Result<LetGo, ClusterError> {
        let api = self.api(resolved, namespace);
        let mut attempt = 1;
        loop {
            let Some(current) = bounded(api.get_metadata_opt(name)).await? else {
                return Ok(LetGo::Absent);
            };
            let owner = Owner::of(&current.metadata);
            if owner.agent.as_deref() != Some(agent) {
                return Ok(LetGo::NotOurs(owner.agent));
            }
            // The version read is a precondition of the patch: another agent that labelled
            // the object in between keeps its label, and the patch fails with a conflict.
            let mut patch = serde_json::json!({ "metadata": {
                "resourceVersion": current.metadata.resource_version,
                "labels": { INVENTORY_LABEL: null },
                "annotations": { ADOPTED_ANNOTATION: null },
            } });
            // Its applies' ownership goes too: every agent applies as the same manager, so
            // an agent that adopts the object later would otherwise remove, at its first
            // apply, every field only this one declared.
            let managed = current.metadata.managed_fields.unwrap_or_default();
            let kept: Vec<_> = managed
                .iter()
                .filter(|entry| {
                    entry.manager.as_deref() != Some(self.field_manager.as_str())
                        || entry.operation.as_deref() != Some("Apply")
                })
                .collect();
            if kept.len() != managed.len() {
                // An empty list leaves managedFields as they are; one empty entry clears them.
                patch["metadata"]["managedFields"] = if kept.is_empty() {
                    serde_json::json!([{}])
                } else {
                    serde_json::to_value(&kept)?
                };
            }
            match bounded(api.patch(name, &self.update_params(), &Patch::Merge(&patch))).await {
                Ok(_) => return Ok(LetGo::Released),
                Err(error) if error.is_not_found() => return Ok(LetGo::Absent),
                Err(error) if error.is_conflict() && attempt < LET_GO_ATTEMPTS => attempt += 1,
                Err(error) => return Err(error),
            }
        }
    }

    /// Deletes the object as `params` say.
    async fn delete(
        &self,
        resolved: &Resolved,
        namespace: Option<&str>,
        name: &str,
        params: &DeleteParams,
    ) -> Result<Deleted, ClusterError> {
        match bounded(self.api(resolved, namespace).delete(name, params)).await {
            // The API server answers with the object when it stays for now (finalizers, a
            // foreground deletion), with a Status or the last state when it is gone.
            Ok(answer) => Ok(answer
                .left()
                .and_then(|object| Terminating::of(&object.metadata))
                .map_or(Deleted::Gone, Deleted::Terminating)),
            Err(error) if error.is_not_found() => Ok(Deleted::Absent),
            // Only a precondition makes a delete conflict.
            Err(error) if error.is_conflict() => Ok(Deleted::Replaced),
            Err(error) => Err(error),
        }
    }
}

/// A delete with propagation `policy` (orphan, background or foreground) of the object
/// whose UID is `uid` only.
fn delete_params(policy: &str, uid: &str) -> DeleteParams {
    let propagation_policy = Some(match policy {
        "orphan" => PropagationPolicy::Orphan,
        "foreground" => PropagationPolicy::Foreground,
        _ => PropagationPolicy::Background,
    });
    DeleteParams {
        propagation_policy,
        preconditions: Some(Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{resources, serve, status};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A ConfigMap `x` of namespace `apps` whose inventory label is `agent`.
    fn labelled(agent: &str) -> String {
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "x", "namespace": "apps", "resourceVersion": "7",
                "labels": {INVENTORY_LABEL: agent}}})
        .to_string()
    }

    /// Lets go of ConfigMap `apps/x` for agent `prod` on a stand-in API server answering
    /// reads of it with `object` and its patches in turn with `patches`; returns what letting
    /// go did and the requests made.
    async fn let_go_of_x(object: String, patches: Vec<(u16, String)>) -> (LetGo, Vec<String>) {
        let patches = std::sync::Mutex::new(patches.into_iter());
        let (client, log) = serve(move |method, path| {
            Some(match (method, path) {
                ("GET", "/api/v1") => (200, resources("v1", &[("configmaps", "ConfigMap", true)])),
                ("GET", "/api/v1/namespaces/apps/configmaps/x") => (200, object.clone()),
                ("PATCH", "/api/v1/namespaces/apps/configmaps/x") => patches
                    .lock()
                    .unwrap()
                    .next()
                    .unwrap_or((500, status(500, "unexpected patch"))),
                _ => (404, status(404, "not found")),
            })
        })
        .await;
        let cluster = Cluster::new(client, "test");
        cluster.discover([("v1", "ConfigMap")]).await;
        let resolved = cluster.resolve("v1", "ConfigMap").expect("served");
        let object = ObjectRef {
            resolved: &resolved,
            namespace: Some("apps"),
            name: "x",
        };
        let written = cluster
            .perform(Write::LetGo {
                object,
                agent: "prod",
            })
            .await
            .expect("let go");
        let Written::LetGo(let_go) = written else {
            panic!("answered as another write: {written:?}");
        };
        let log = log.lock().unwrap().clone();
        (let_go, log)
    }

    /// A kind looked for in the versions a group serves now: a group the cluster no longer
    /// has means no version, a discovery that fails is an error the prune reports.
    #[tokio::test]
    async fn a_kind_is_looked_for_in_a_group_that_is_gone_or_cannot_be_read() {
        let (gone, _) = serve(|_, path| {
            (path == "/apis").then(|| {
                (
                    200,
                    r#"{"kind": "APIGroupList", "apiVersion": "v1", "groups": []}"#.to_owned(),
                )
            })
        })
        .await;
        let cluster = Cluster::new(gone, "test");
        let found = cluster
            .resolve_in_served_version("example.com", "Gadget")
            .await;
        assert!(matches!(found, Ok(None)), "{found:?}");

        let (broken, _) = serve(|_, _| Some((500, status(500, "etcd is down")))).await;
        let cluster = Cluster::new(broken, "test");
        let found = cluster
            .resolve_in_served_version("example.com", "Gadget")
            .await;
        let error = found.expect_err("a discovery that fails is an error");
        assert!(
            error.message().contains("etcd is down"),
            "{}",
            error.message()
        );
    }

    #[tokio::test]
    async fn letting_go_leaves_another_agents_label_alone() {
        let (let_go, log) = let_go_of_x(labelled("staging"), Vec::new()).await;
        assert_eq!(let_go, LetGo::NotOurs(Some("staging".into())));
        assert!(!log.iter().any(|r| r.starts_with("PATCH")), "{log:?}");
    }

    #[tokio::test]
    async fn letting_go_removes_the_agents_own_label_reading_again_after_a_conflict() {
        let conflict = (409, status(409, "the object has been modified"));
        let (let_go, log) =
            let_go_of_x(labelled("prod"), vec![conflict, (200, labelled("prod"))]).await;
        assert_eq!(let_go, LetGo::Released);
        let patches = log.iter().filter(|r| r.starts_with("PATCH")).count();
        assert_eq!(patches, 2, "{log:?}");
    }

    #[test]
    fn an_objects_owner_is_its_label_and_its_adopted_mark() {
        let meta = |labels: &[(&str, &str)], annotations: &[(&str, &str)]| ObjectMeta {
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        };
        assert_eq!(Owner::of(&ObjectMeta::default()), Owner::default());
        assert_eq!(
            Owner::of(&meta(
                &[(INVENTORY_LABEL, "prod")],
                &[(ADOPTED_ANNOTATION, ADOPTED)]
            )),
            Owner {
                agent: Some("prod".into()),
                adopted: true
            }
        );
        assert!(!Owner::of(&meta(&[], &[(ADOPTED_ANNOTATION, "false")])).adopted);
    }

    #[tokio::test]
    async fn a_broken_group_fails_only_the_kinds_it_serves_and_new_kinds_are_found() {
        let crd_applied = Arc::new(AtomicBool::new(false));
        let applied = crd_applied.clone();
        let (client, log) = serve(move |_, path| {
            Some(match path {
                "/api/v1" => (
                    200,
                    resources(
                        "v1",
                        &[
                            ("configmaps", "ConfigMap", true),
                            ("namespaces", "Namespace", false),
                        ],
                    ),
                ),
                "/apis/metrics.k8s.io/v1beta1" => (503, status(503, "service unavailable")),
                "/apis/example.com/v1" if applied.load(Ordering::SeqCst) => (
                    200,
                    resources("example.com/v1", &[("widgets", "Widget", true)]),
                ),
                _ => (
                    404,
                    status(404, "the server could not find the requested resource"),
                ),
            })
        })
        .await;
        let cluster = Cluster::new(client, "test");
        let failed = cluster
            .discover([
                ("v1", "ConfigMap"),
                ("metrics.k8s.io/v1beta1", "PodMetrics"),
                ("example.com/v1", "Widget"),
            ])
            .await;
        assert_eq!(
            failed.keys().collect::<Vec<_>>(),
            ["metrics.k8s.io/v1beta1"]
        );
        assert!(
            failed["metrics.k8s.io/v1beta1"].contains("service unavailable"),
            "{failed:?} {:?}",
            log.lock().unwrap()
        );
        let configmap = cluster
            .resolve("v1", "ConfigMap")
            .expect("ConfigMap resolves");
        assert!(configmap.namespaced);
        assert_eq!(configmap.resource.plural, "configmaps");
        assert!(!cluster.resolve("v1", "Namespace").unwrap().namespaced);
        assert!(cluster.resolve("example.com/v1", "Widget").is_none());
        assert!(
            cluster
                .resolve("metrics.k8s.io/v1beta1", "PodMetrics")
                .is_none()
        );

        // Cached: known kinds are not read again; a missing kind re-reads its group-version.
        crd_applied.store(true, Ordering::SeqCst);
        let failed = cluster
            .discover([
                ("v1", "ConfigMap"),
                ("v1", "Namespace"),
                ("example.com/v1", "Widget"),
            ])
            .await;
        assert!(failed.is_empty(), "{failed:?}");
        assert!(cluster.resolve("example.com/v1", "Widget").is_some());
        let log = log.lock().unwrap().clone();
        assert_eq!(
            log.iter().filter(|p| *p == "GET /api/v1").count(),
            1,
            "{log:?}"
        );
        assert_eq!(
            log.iter()
                .filter(|p| *p == "GET /apis/example.com/v1")
                .count(),
            2,
            "{log:?}"
        );
        assert!(
            !log.iter().any(|p| p == "GET /apis" || p == "GET /api"),
            "no full discovery: {log:?}"
        );
    }
}
