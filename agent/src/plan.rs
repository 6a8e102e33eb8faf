//! What to apply in which order, and what to prune: pure decisions over resolved objects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use greenlight::v1::ApplySettings;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::manifest::{Manifest, Origin};

/// The label every applied object carries; its value is the agent's name. Objects that
/// existed before the agent first applied them carry it too, but are marked adopted in the
/// inventory and never pruned.
pub const INVENTORY_LABEL: &str = "greenlight.dev/inventory";

/// A kind as the cluster serves it: all a plan needs to know of it is its scope.
pub trait ServedKind {
    /// Whether its objects live in namespaces.
    fn namespaced(&self) -> bool;
}

/// One object ready to apply: where it goes, and the body to send.
pub struct Planned<R> {
    pub manifest: Manifest,
    pub key: ObjectKey,
    pub namespaced: bool,
    /// `None` until discovery serves its kind (custom resources of a CRD in this revision).
    pub resolved: Option<R>,
    /// The manifest with its namespace settled and the inventory label added.
    pub body: Value,
    /// `body_digest(&body)`, taken once: every reconcile compares it.
    pub digest: u64,
}

/// Prefix of the ConfigMap that holds an agent's inventory, in the agent's namespace.
pub const INVENTORY_PREFIX: &str = "greenlight-inventory-";
/// Prefix of the Lease agent replicas compete for, in the agent's namespace.
pub const LEASE_PREFIX: &str = "greenlight-agent-";
/// The annotation that lets an object whose deletion cascades be pruned.
pub const PRUNE_ANNOTATION: &str = "greenlight.dev/prune";
/// The value of [`PRUNE_ANNOTATION`] that allows it.
pub const PRUNE_ALLOW: &str = "allow";

/// The name of `agent`'s inventory ConfigMap.
pub fn inventory_name(agent: &str) -> String {
    format!("{INVENTORY_PREFIX}{agent}")
}

/// The name of `agent`'s Lease: from the agent's name, so that every replica of the agent
/// competes for the same one whatever token it holds (a rotation must not make two leaders).
pub fn lease_name(agent: &str) -> String {
    format!("{LEASE_PREFIX}{agent}")
}

/// Identity of an object for the inventory: the version may change, the object stays.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub group: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// An object the agent applied, as the inventory remembers it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InventoryEntry {
    pub key: ObjectKey,
    /// The `apiVersion` it was applied with, to address it when pruning.
    pub api_version: String,
    pub namespaced: bool,
    /// It existed before the agent first applied it: never pruned, only let go.
    #[serde(default)]
    pub adopted: bool,
    /// Left from a revision that no longer declared it (its prune was refused, failed or
    /// waits for finalizers): its deletion was counted against the prune limit then.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
}

/// Apply stages: what others depend on goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    Namespaces,
    Definitions,
    ClusterScoped,
    Namespaced,
}

impl Stage {
    /// The stage of an object of `kind` in `group`.
    pub fn of(group: &str, kind: &str, namespaced: bool) -> Self {
        match (group, kind) {
            ("", "Namespace") => Stage::Namespaces,
            ("apiextensions.k8s.io", "CustomResourceDefinition") => Stage::Definitions,
            _ if namespaced => Stage::Namespaced,
            _ => Stage::ClusterScoped,
        }
    }
}

/// Groups `items` by stage in apply order, keeping the manifests' order within a stage.
pub fn apply_stages<T>(items: Vec<T>, stage: impl Fn(&T) -> Stage) -> Vec<(Stage, Vec<T>)> {
    let mut stages: Vec<(Stage, Vec<T>)> = Vec::new();
    let mut items: Vec<(Stage, usize, T)> = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| (stage(&item), i, item))
        .collect();
    items.sort_by_key(|(stage, index, _)| (*stage, *index));
    for (stage, _, item) in items {
        match stages.last_mut() {
            Some((last, group)) if *last == stage => group.push(item),
            _ => stages.push((stage, vec![item])),
        }
    }
    stages
}

/// The API groups Kubernetes itself serves. Named one by one: a CRD may take any other
/// group under `k8s.io` (the API server only asks for an annotation, which anyone may write).
const KUBERNETES_GROUPS: &[&str] = &[
    "",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
    "apiregistration.k8s.io",
    "apps",
    "authentication.k8s.io",
    "authorization.k8s.io",
    "autoscaling",
    "batch",
    "certificates.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "events.k8s.io",
    "extensions",
    "flowcontrol.apiserver.k8s.io",
    "internal.apiserver.k8s.io",
    "networking.k8s.io",
    "node.k8s.io",
    "policy",
    "rbac.authorization.k8s.io",
    "resource.k8s.io",
    "scheduling.k8s.io",
    "storage.k8s.io",
    "storagemigration.k8s.io",
];

/// Whether Kubernetes itself serves `group`, rather than a CRD or an aggregated API.
pub fn is_kubernetes_group(group: &str) -> bool {
    KUBERNETES_GROUPS.contains(&group)
}

/// Where an agent may write: namespaces by name or glob, and cluster-scoped kinds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scope {
    /// Names, or globs with `*` (any run of characters) and `?` (one character).
    pub namespaces: Vec<String>,
    /// Kinds of cluster-scoped objects: `Namespace` or `ClusterRole` names a kind of
    /// Kubernetes' own groups, `ClusterIssuer.cert-manager.io` one of another group.
    pub cluster_kinds: Vec<String>,
}

impl Scope {
    /// The scope the server sent; without namespaces, only the default namespace, the least
    /// that lets a revision without namespaces be applied at all.
    pub fn of(settings: &ApplySettings) -> Self {
        let namespaces = if settings.scope_namespaces.is_empty() {
            vec![settings.default_namespace.clone()]
        } else {
            settings.scope_namespaces.clone()
        };
        Self {
            namespaces,
            cluster_kinds: settings.scope_cluster_kinds.clone(),
        }
    }

    /// Whether cluster-scoped `kind` of `group` is listed. A kind alone names it in
    /// Kubernetes' own groups only: any CRD may call its kind `Namespace`.
    fn has_cluster_kind(&self, group: &str, kind: &str) -> bool {
        self.cluster_kinds
            .iter()
            .any(|listed| match listed.split_once('.') {
                Some((listed_kind, listed_group)) => listed_kind == kind && listed_group == group,
                None => listed == kind && is_kubernetes_group(group),
            })
    }

    fn has_namespace(&self, namespace: &str) -> bool {
        self.namespaces
            .iter()
            .any(|pattern| glob_matches(pattern, namespace))
    }

    /// Why the agent may not write `key`; `None` when it may. A Namespace needs its kind in
    /// `cluster_kinds` and its name in `namespaces`: creating or relabelling `kube-system` is a
    /// write to it.
    pub fn refusal(&self, key: &ObjectKey) -> Option<String> {
        match &key.namespace {
            Some(ns) if !self.has_namespace(ns) => {
                Some(format!("namespace {ns} is not in the agent's scope"))
            }
            Some(_) => None,
            None if !self.has_cluster_kind(&key.group, &key.kind) => {
                Some(if is_kubernetes_group(&key.group) {
                    format!(
                        "cluster-scoped kind {} is not in the agent's scope",
                        key.kind
                    )
                } else {
                    format!(
                        "cluster-scoped kind {kind}.{group} is not in the agent's scope (a \
                         kind of a group other than Kubernetes' own is listed with its group: \
                         {kind}.{group})",
                        kind = key.kind,
                        group = key.group
                    )
                })
            }
            None if key.group.is_empty() && key.kind == "Namespace" => (!self
                .has_namespace(&key.name))
            .then(|| format!("namespace {} is not in the agent's scope", key.name)),
            None => None,
        }
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters and `?` one.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // Iterative matching with backtracking to the last `*`: linear in practice, never
    // exponential.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Whether `key` is one of the agent's own records in `agent_namespace`: the inventory that
/// decides what is pruned, or the Lease that decides who applies. A revision that wrote them
/// could make the next prune delete what the agent never created.
pub fn is_agent_record(key: &ObjectKey, agent_namespace: &str) -> bool {
    key.namespace.as_deref() == Some(agent_namespace)
        && match (key.group.as_str(), key.kind.as_str()) {
            ("", "ConfigMap") => key.name.starts_with(INVENTORY_PREFIX),
            ("coordination.k8s.io", "Lease") => key.name.starts_with(LEASE_PREFIX),
            _ => false,
        }
}

/// Objects of `keys` a revision may not write, each named with the reason, checked before the
/// first write.
pub fn refusals<'a>(
    keys: impl IntoIterator<Item = &'a ObjectKey>,
    scope: &Scope,
    agent_namespace: &str,
) -> Vec<String> {
    keys.into_iter()
        .filter_map(|key| {
            if is_agent_record(key, agent_namespace) {
                return Some(format!("{key}: it is the agent's own inventory or Lease"));
            }
            scope.refusal(key).map(|why| format!("{key}: {why}"))
        })
        .collect()
}

/// Whether deleting an object of this kind deletes others with it: a Namespace takes all it
/// holds, a CRD every resource of its kind, an APIService the API it serves.
pub fn cascades(group: &str, kind: &str) -> bool {
    matches!(
        (group, kind),
        ("", "Namespace")
            | ("apiextensions.k8s.io", "CustomResourceDefinition")
            | ("apiregistration.k8s.io", "APIService")
    )
}

/// Whether an object with `annotations` may be pruned although its deletion cascades.
pub fn prune_allowed(annotations: Option<&BTreeMap<String, String>>) -> bool {
    annotations
        .and_then(|a| a.get(PRUNE_ANNOTATION))
        .is_some_and(|v| v == PRUNE_ALLOW)
}

/// What pruning would do, decided before the first write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneSet {
    /// Deleted (or, when adopted, let go), in prune order.
    pub candidates: Vec<InventoryEntry>,
    /// Outside the agent's scope now: never touched, still remembered.
    pub out_of_scope: Vec<InventoryEntry>,
}

/// Why a prune is refused before anything was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "revision would prune {count} objects, more than the prune limit of {limit}; nothing was \
     changed (an operator can allow it with `greenlightctl trigger --force-prune`)"
)]
pub struct PruneLimitExceeded {
    pub count: usize,
    pub limit: u32,
}

/// Splits what `inventory` holds beyond `desired` by scope, and refuses deleting more than
/// `limit` objects unless `force`: a mass deletion is likelier a broken merge or a wrong path
/// than an intent. Adopted objects are only let go, so they do not count, and neither do
/// objects kept from an earlier prune, already counted then: counted again, 30 CRDs kept
/// for want of their prune annotation would refuse every later revision.
pub fn prune_set(
    inventory: &[InventoryEntry],
    desired: &BTreeSet<ObjectKey>,
    scope: &Scope,
    limit: Option<u32>,
    force: bool,
) -> Result<PruneSet, PruneLimitExceeded> {
    let (out_of_scope, candidates): (Vec<_>, Vec<_>) = prune_plan(inventory, desired)
        .into_iter()
        .partition(|e| scope.refusal(&e.key).is_some());
    let count = candidates.iter().filter(|e| !e.adopted && !e.kept).count();
    if let Some(limit) = limit
        && !force
        && count > usize::try_from(limit).unwrap_or(usize::MAX)
    {
        return Err(PruneLimitExceeded { count, limit });
    }
    Ok(PruneSet {
        candidates,
        out_of_scope,
    })
}

/// Inventory entries that are no longer desired, in prune order: the reverse of apply order,
/// so namespaced objects go before their namespace and custom resources before their CRD.
pub fn prune_plan(
    inventory: &[InventoryEntry],
    desired: &BTreeSet<ObjectKey>,
) -> Vec<InventoryEntry> {
    let mut gone: Vec<InventoryEntry> = inventory
        .iter()
        .filter(|entry| !desired.contains(&entry.key))
        .cloned()
        .collect();
    gone.sort_by(|a, b| {
        let stage = |e: &InventoryEntry| Stage::of(&e.key.group, &e.key.kind, e.namespaced);
        stage(b).cmp(&stage(a)).then_with(|| a.key.cmp(&b.key))
    });
    gone.dedup_by(|a, b| a.key == b.key);
    gone
}

/// One version of an object, as an apply returned it or the watch saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub resource_version: String,
    /// Set by the API server for kinds whose spec and status are apart: it moves only when
    /// the spec does, so a controller writing status is not drift.
    pub generation: Option<i64>,
    /// A digest of what the agent's field manager owns by apply, from `managedFields`; `None`
    /// when the object carries no `managedFields` at all.
    pub owned: Option<u64>,
    /// It has a deletionTimestamp: there now, gone once its finalizers are removed.
    pub being_deleted: bool,
}

impl Version {
    /// The version `meta` describes, with what `manager` owns by apply.
    pub fn of(meta: &ObjectMeta, manager: &str) -> Self {
        Self {
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            generation: meta.generation,
            owned: owned_fields(meta, manager),
            being_deleted: meta.deletion_timestamp.is_some(),
        }
    }

    /// Whether `self` and `other` are the same desired state: the same generation where the
    /// kind has one, else the same resourceVersion.
    pub fn same_spec(&self, other: &Version) -> bool {
        match (self.generation, other.generation) {
            (Some(a), Some(b)) => a == b,
            _ => self.resource_version == other.resource_version,
        }
    }

    /// Whether nobody changed what the agent applied between `self` and `other`: the fields
    /// its manager owns are the same set at the same API version. Another manager taking one
    /// of them (an update, a forced apply) or removing one changes that set; labels or fields
    /// someone else adds, and status, do not, since re-applying would not touch them. Where
    /// the API server keeps no managed fields, [`Version::same_spec`] decides.
    pub fn same_applied_state(&self, other: &Version) -> bool {
        match (self.owned, other.owned) {
            (Some(a), Some(b)) => a == b,
            _ => self.same_spec(other),
        }
    }
}

/// A digest of the entry of `manager`'s applies in `meta`'s `managedFields` (its API version
/// and field set), or of its absence; `None` when there are no managed fields at all. The
/// entry's time is left out: it changes only when the manager itself writes.
pub fn owned_fields(meta: &ObjectMeta, manager: &str) -> Option<u64> {
    let entries = meta.managed_fields.as_deref().filter(|e| !e.is_empty())?;
    let ours = entries.iter().find(|e| {
        e.manager.as_deref() == Some(manager)
            && e.operation.as_deref() == Some("Apply")
            && e.subresource.as_deref().unwrap_or_default().is_empty()
    });
    let mut hasher = DefaultHasher::new();
    match ours {
        Some(entry) => {
            entry.api_version.hash(&mut hasher);
            entry
                .fields_v1
                .as_ref()
                .map(|f| f.0.to_string())
                .hash(&mut hasher);
        }
        // Every manager's fields taken over, or the entry reset: distinct from any entry.
        None => "no entry".hash(&mut hasher),
    }
    Some(hasher.finish())
}

/// A digest of the body an apply sends, to tell a changed desired state from an unchanged one.
pub fn body_digest(body: &Value) -> u64 {
    let mut hasher = DefaultHasher::new();
    body.to_string().hash(&mut hasher);
    hasher.finish()
}

/// The diff of one object: whether applying a body of digest `desired` again could change
/// anything, given what the last apply left (`applied`: its version and body digest) and what
/// the watch saw since (`observed`). Unchanged only when the body is the same and nobody
/// changed what the agent applied; so a reconcile re-applies what others edited, labels it
/// set too, but not because a controller wrote status or someone added a label of their own.
/// An object being deleted is applied again, so that every reconcile's outcome says so.
pub fn needs_apply(
    applied: Option<&(Version, u64)>,
    observed: Option<&Version>,
    desired: u64,
) -> bool {
    match (applied, observed) {
        (_, Some(observed)) if observed.being_deleted => true,
        (Some((applied, digest)), Some(observed)) => {
            !applied.same_applied_state(observed) || *digest != desired
        }
        _ => true,
    }
}

/// Whether what the watch saw is someone else's change to what the agent applied (see
/// [`Version::same_applied_state`]), or a deletion. Status written by a controller, or a
/// label another manager adds, is not.
pub fn drifted_from(applied: Option<&(Version, u64)>, observed: Option<&Version>) -> bool {
    match (applied, observed) {
        (Some((applied, _)), Some(observed)) => !applied.same_applied_state(observed),
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// An object whose deletion the API server accepted, but which stays until its finalizers are
/// removed (or, without any, its grace period ends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminating {
    /// What it waits for, as its `metadata.finalizers` name them.
    pub finalizers: Vec<String>,
}

impl Terminating {
    /// `Some` when `meta` says its object is being deleted.
    pub fn of(meta: &ObjectMeta) -> Option<Self> {
        meta.deletion_timestamp.as_ref()?;
        Some(Self {
            finalizers: meta.finalizers.clone().unwrap_or_default(),
        })
    }

    /// What the deletion waits for, in words.
    pub fn waiting_for(&self) -> String {
        match self.finalizers.as_slice() {
            [] => "waiting for its grace period".to_owned(),
            [one] => format!("waiting for finalizer {one}"),
            many => format!("waiting for finalizers {}", many.join(", ")),
        }
    }
}

impl std::fmt::Display for Terminating {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "terminating, {}", self.waiting_for())
    }
}

/// A manifest whose kind the cluster does not serve, and no CRD of the revision defines.
pub struct Unresolved {
    pub manifest: Manifest,
    /// `Kind (apiVersion) in file document n`.
    pub what: String,
    /// Why discovery of its group-version failed, when it did.
    pub discovery_failure: Option<String>,
}

/// Two manifests of one revision that resolve to the same object: applying both would have
/// each reconcile write one body over the other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{key} is defined twice, in {first} and in {second}{why}; keep one of them",
    why = alike_because(.key, .namespaces)
)]
pub struct DuplicateObject {
    /// The object both resolve to.
    pub key: ObjectKey,
    /// Where it is defined first.
    pub first: Origin,
    /// Where it is defined again.
    pub second: Origin,
    /// `metadata.namespace` as each wrote it, first then second.
    pub namespaces: (Option<String>, Option<String>),
}

/// Why two manifests whose `metadata.namespace` reads `namespaces` name the object `key`: empty
/// when they are written alike, since then the reader sees it at once.
fn alike_because(key: &ObjectKey, namespaces: &(Option<String>, Option<String>)) -> String {
    if namespaces.0 == namespaces.1 {
        return String::new();
    }
    match &key.namespace {
        Some(default) => format!(
            " (without metadata.namespace an object goes to the default namespace {default})"
        ),
        None => format!(
            " ({} is cluster-scoped, so metadata.namespace is ignored)",
            key.kind
        ),
    }
}

/// Every object that more than one of `planned` resolves to, each later definition paired
/// with the first one.
pub fn duplicates<R>(planned: &[Planned<R>]) -> Vec<DuplicateObject> {
    let mut first_of: HashMap<&ObjectKey, &Manifest> = HashMap::with_capacity(planned.len());
    let mut found = Vec::new();
    for p in planned {
        match first_of.get(&p.key) {
            Some(first) => found.push(DuplicateObject {
                key: p.key.clone(),
                first: first.origin.clone(),
                second: p.manifest.origin.clone(),
                namespaces: (first.namespace.clone(), p.manifest.namespace.clone()),
            }),
            None => {
                first_of.insert(&p.key, &p.manifest);
            }
        }
    }
    found
}

/// Resolves every manifest (kinds whose CRD ships in the same revision included), settles
/// its namespace, labels it, and refuses the whole revision, naming every culprit, for an
/// unknown kind, a failed discovery, two manifests of the same object or an object outside
/// the agent's scope.
pub fn plan_objects<R: ServedKind>(
    manifests: Vec<Manifest>,
    settings: &ApplySettings,
    agent: &str,
    agent_namespace: &str,
    discovery_failures: &BTreeMap<String, String>,
    resolve: impl Fn(&str, &str) -> Option<R>,
) -> Result<Vec<Planned<R>>, String> {
    let (planned, unresolved) = plan_each(manifests, settings, agent, discovery_failures, resolve);
    let mut unknown = Vec::new();
    let mut undiscovered = Vec::new();
    for u in unresolved {
        match u.discovery_failure {
            Some(why) => undiscovered.push(format!("{}: {why}", u.what)),
            None => unknown.push(u.what),
        }
    }
    let mut problems = Vec::new();
    if !unknown.is_empty() {
        problems.push(format!("unknown kind: {}", unknown.join(", ")));
    }
    if !undiscovered.is_empty() {
        problems.push(format!(
            "API discovery failed for {}",
            undiscovered.join(", ")
        ));
    }
    problems.extend(duplicates(&planned).iter().map(ToString::to_string));
    let refused = refusals(
        planned.iter().map(|p| &p.key),
        &Scope::of(settings),
        agent_namespace,
    );
    if !refused.is_empty() {
        problems.push(format!("not allowed: {}", refused.join(", ")));
    }
    if !problems.is_empty() {
        return Err(format!("{}; nothing was applied", problems.join("; ")));
    }
    Ok(planned)
}

/// Resolves and labels every manifest it can, as [`plan_objects`] does, and returns the
/// others apart instead of refusing the revision: a preview names each culprit on its own.
/// Scope is not checked here.
pub fn plan_each<R: ServedKind>(
    manifests: Vec<Manifest>,
    settings: &ApplySettings,
    agent: &str,
    discovery_failures: &BTreeMap<String, String>,
    resolve: impl Fn(&str, &str) -> Option<R>,
) -> (Vec<Planned<R>>, Vec<Unresolved>) {
    // Kinds whose CRD ships in this same revision: not served yet, but they will be.
    let mut defined: HashMap<(String, String), bool> = HashMap::new();
    for m in manifests
        .iter()
        .filter(|m| m.group() == "apiextensions.k8s.io" && m.kind == "CustomResourceDefinition")
    {
        let group = m
            .body
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kind = m
            .body
            .pointer("/spec/names/kind")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let namespaced = m.body.pointer("/spec/scope").and_then(Value::as_str) != Some("Cluster");
        defined.insert((group.to_owned(), kind.to_owned()), namespaced);
    }
    let mut unresolved = Vec::new();
    let mut planned = Vec::with_capacity(manifests.len());
    for manifest in manifests {
        let resolved = resolve(&manifest.api_version, &manifest.kind);
        let namespaced = match (
            &resolved,
            defined.get(&(manifest.group().to_owned(), manifest.kind.clone())),
        ) {
            (Some(r), _) => r.namespaced(),
            (None, Some(namespaced)) => *namespaced,
            (None, None) => {
                let what = format!(
                    "{} ({}) in {} document {}",
                    manifest.kind,
                    manifest.api_version,
                    manifest.origin.file,
                    manifest.origin.document
                );
                let discovery_failure = discovery_failures.get(&manifest.api_version).cloned();
                unresolved.push(Unresolved {
                    manifest,
                    what,
                    discovery_failure,
                });
                continue;
            }
        };
        let namespace = match (namespaced, &manifest.namespace) {
            (true, Some(ns)) => Some(ns.clone()),
            (true, None) => Some(settings.default_namespace.clone()),
            (false, _) => None,
        };
        let mut body = manifest.body.clone();
        if let Some(metadata) = body.get_mut("metadata").and_then(Value::as_object_mut) {
            if let Some(ns) = &namespace {
                metadata.insert("namespace".into(), Value::String(ns.clone()));
            } else {
                metadata.remove("namespace");
            }
            let labels = metadata
                .entry("labels")
                .or_insert_with(|| Value::Object(Default::default()));
            // `labels:` with nothing under it (as templates often leave it) is no labels to
            // the API server: without ours the object would be neither watched nor pruned.
            if labels.is_null() {
                *labels = Value::Object(Default::default());
            }
            if let Some(labels) = labels.as_object_mut() {
                labels.insert(INVENTORY_LABEL.into(), Value::String(agent.to_owned()));
            }
        }
        let key = ObjectKey {
            group: manifest.group().to_owned(),
            kind: manifest.kind.clone(),
            namespace,
            name: manifest.name.clone(),
        };
        planned.push(Planned {
            manifest,
            key,
            namespaced,
            resolved,
            digest: body_digest(&body),
            body,
        });
    }
    (planned, unresolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(group: &str, kind: &str, namespace: Option<&str>, name: &str) -> InventoryEntry {
        InventoryEntry {
            key: ObjectKey {
                group: group.into(),
                kind: kind.into(),
                namespace: namespace.map(Into::into),
                name: name.into(),
            },
            api_version: "v1".into(),
            namespaced: namespace.is_some(),
            adopted: false,
            kept: false,
        }
    }

    #[test]
    fn namespaces_then_crds_then_cluster_then_namespaced() {
        let items = vec![
            ("apps", "Deployment", true),
            ("", "Namespace", false),
            ("rbac.authorization.k8s.io", "ClusterRole", false),
            ("apiextensions.k8s.io", "CustomResourceDefinition", false),
            ("", "ConfigMap", true),
        ];
        let stages = apply_stages(items, |(g, k, n)| Stage::of(g, k, *n));
        let order: Vec<Vec<&str>> = stages
            .iter()
            .map(|(_, group)| group.iter().map(|i| i.1).collect())
            .collect();
        assert_eq!(
            order,
            vec![
                vec!["Namespace"],
                vec!["CustomResourceDefinition"],
                vec!["ClusterRole"],
                vec!["Deployment", "ConfigMap"]
            ]
        );
    }

    #[test]
    fn prune_goes_in_reverse_and_keeps_what_is_desired() {
        let inventory = vec![
            entry("", "Namespace", None, "team"),
            entry("", "ConfigMap", Some("team"), "old"),
            entry("", "ConfigMap", Some("team"), "kept"),
            entry(
                "apiextensions.k8s.io",
                "CustomResourceDefinition",
                None,
                "widgets.example.com",
            ),
        ];
        let desired: BTreeSet<ObjectKey> = [inventory[2].key.clone()].into();
        let plan = prune_plan(&inventory, &desired);
        let plan: Vec<&str> = plan.iter().map(|e| e.key.name.as_str()).collect();
        assert_eq!(plan, ["old", "widgets.example.com", "team"]);
    }

    fn scope(namespaces: &[&str], kinds: &[&str]) -> Scope {
        Scope {
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
            cluster_kinds: kinds.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn globs_match_names() {
        assert!(glob_matches("apps", "apps"));
        assert!(!glob_matches("apps", "apps2"));
        assert!(glob_matches("team-*", "team-a"));
        assert!(glob_matches("team-*", "team-"));
        assert!(!glob_matches("team-*", "kube-system"));
        assert!(glob_matches("*-prod", "web-prod"));
        assert!(glob_matches("a?c", "abc"));
        assert!(!glob_matches("a?c", "ac"));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("*a*b", "xxaxxb"));
        assert!(!glob_matches("*a*b", "xxaxxbc"));
    }

    /// A kind served by the test cluster: its scope only.
    struct Served(bool);

    impl ServedKind for Served {
        fn namespaced(&self) -> bool {
            self.0
        }
    }

    /// What a cluster serving ConfigMaps, Namespaces and ClusterRoles resolves.
    fn served(api_version: &str, kind: &str) -> Option<Served> {
        match (api_version, kind) {
            ("v1", "ConfigMap") => Some(Served(true)),
            ("v1", "Namespace") | ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                Some(Served(false))
            }
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => Some(Served(false)),
            _ => None,
        }
    }

    fn manifests(yaml: &str) -> Vec<crate::manifest::Manifest> {
        crate::manifest::parse(&[("app.yaml".to_owned(), yaml.as_bytes().to_vec())]).unwrap()
    }

    fn plan_of(yaml: &str, settings: &ApplySettings) -> Result<Vec<Planned<Served>>, String> {
        plan_objects(
            manifests(yaml),
            settings,
            "prod",
            "greenlight",
            &BTreeMap::new(),
            served,
        )
    }

    fn seen(resource_version: &str, generation: Option<i64>) -> Version {
        Version {
            resource_version: resource_version.into(),
            generation,
            owned: None,
            being_deleted: false,
        }
    }

    /// Metadata at `resource_version` with these `managedFields`, as the API server sends it.
    fn meta(resource_version: &str, managed: Value) -> ObjectMeta {
        serde_json::from_value(serde_json::json!({
            "name": "settings",
            "resourceVersion": resource_version,
            "managedFields": managed,
        }))
        .unwrap()
    }

    fn entry_of(manager: &str, operation: &str, fields: Value) -> Value {
        serde_json::json!({"manager": manager, "operation": operation, "apiVersion": "v1",
            "fieldsType": "FieldsV1", "fieldsV1": fields, "time": "2025-01-01T00:00:00Z"})
    }

    #[test]
    fn only_a_change_to_what_the_agent_owns_is_drift() {
        let ours = serde_json::json!({"f:data": {"f:value": {}},
            "f:metadata": {"f:labels": {"f:greenlight.dev/inventory": {}}}});
        let applied = Version::of(
            &meta(
                "10",
                Value::from(vec![entry_of("greenlight", "Apply", ours.clone())]),
            ),
            "greenlight",
        );
        let applied = Some((applied, 7));

        // kubectl label adds a label of its own: a new version, but our fields are as we left them.
        let labelled = Version::of(
            &meta(
                "11",
                Value::from(vec![
                    entry_of("greenlight", "Apply", ours.clone()),
                    entry_of(
                        "kubectl-label",
                        "Update",
                        serde_json::json!({"f:metadata": {"f:labels": {"f:team": {}}}}),
                    ),
                ]),
            ),
            "greenlight",
        );
        assert!(!drifted_from(applied.as_ref(), Some(&labelled)));
        assert!(
            !needs_apply(applied.as_ref(), Some(&labelled), 7),
            "nothing to write"
        );
        assert!(
            needs_apply(applied.as_ref(), Some(&labelled), 8),
            "a new revision still is"
        );

        // Our own entry's time moves only when we write: the set is what counts.
        let mut later = entry_of("greenlight", "Apply", ours.clone());
        later["time"] = "2025-06-01T00:00:00Z".into();
        let retimed = Version::of(&meta("12", Value::from(vec![later])), "greenlight");
        assert!(!drifted_from(applied.as_ref(), Some(&retimed)));

        // kubectl edits a field we own: it moves to kubectl, out of our entry.
        let edited = Version::of(
            &meta(
                "13",
                Value::from(vec![
                    entry_of(
                        "greenlight",
                        "Apply",
                        serde_json::json!({"f:metadata": {"f:labels": {"f:greenlight.dev/inventory": {}}}}),
                    ),
                    entry_of(
                        "kubectl-patch",
                        "Update",
                        serde_json::json!({"f:data": {"f:value": {}}}),
                    ),
                ]),
            ),
            "greenlight",
        );
        assert!(drifted_from(applied.as_ref(), Some(&edited)));
        assert!(needs_apply(applied.as_ref(), Some(&edited), 7));

        // Everything taken over: our entry is gone.
        let taken = Version::of(
            &meta(
                "14",
                Value::from(vec![entry_of("someone-else", "Apply", ours.clone())]),
            ),
            "greenlight",
        );
        assert!(drifted_from(applied.as_ref(), Some(&taken)));

        // An update by the same manager name is not our apply.
        let updated = Version::of(
            &meta(
                "15",
                Value::from(vec![entry_of("greenlight", "Update", ours)]),
            ),
            "greenlight",
        );
        assert!(drifted_from(applied.as_ref(), Some(&updated)));

        // Being deleted: applied again (and found terminating) rather than skipped.
        let deleting = Version {
            being_deleted: true,
            ..applied.as_ref().unwrap().0.clone()
        };
        assert!(!drifted_from(applied.as_ref(), Some(&deleting)));
        assert!(needs_apply(applied.as_ref(), Some(&deleting), 7));

        // Without managedFields at all, versions decide as before.
        let bare = Version::of(&meta("16", Value::Null), "greenlight");
        assert_eq!(bare.owned, None);
        assert!(drifted_from(applied.as_ref(), Some(&bare)));
    }

    #[test]
    fn a_deletion_timestamp_makes_an_object_terminating_naming_what_it_waits_for() {
        let of = |value: Value| Terminating::of(&serde_json::from_value(value).unwrap());
        assert_eq!(
            of(serde_json::json!({"name": "a", "finalizers": ["example.com/hold"]})),
            None
        );
        let held = of(
            serde_json::json!({"name": "a", "deletionTimestamp": "2025-01-01T00:00:00Z",
            "finalizers": ["example.com/hold"]}),
        )
        .unwrap();
        assert_eq!(
            held.to_string(),
            "terminating, waiting for finalizer example.com/hold"
        );
        let two = of(
            serde_json::json!({"name": "a", "deletionTimestamp": "2025-01-01T00:00:00Z",
            "finalizers": ["a.example.com/x", "b.example.com/y"]}),
        )
        .unwrap();
        assert_eq!(
            two.waiting_for(),
            "waiting for finalizers a.example.com/x, b.example.com/y"
        );
        let pod = of(serde_json::json!({"name": "a", "deletionTimestamp": "2025-01-01T00:00:00Z"}))
            .unwrap();
        assert_eq!(pod.waiting_for(), "waiting for its grace period");
    }

    #[test]
    fn an_object_needs_an_apply_unless_its_body_and_version_are_what_the_last_apply_left() {
        let body = serde_json::json!({"data": {"value": "1"}});
        let applied = (seen("10", None), body_digest(&body));
        let (body, changed) = (
            body_digest(&body),
            body_digest(&serde_json::json!({"data": {"value": "2"}})),
        );
        assert!(!needs_apply(Some(&applied), Some(&seen("10", None)), body));
        assert!(
            needs_apply(Some(&applied), Some(&seen("11", None)), body),
            "edited"
        );
        assert!(
            needs_apply(Some(&applied), Some(&seen("10", None)), changed),
            "new revision"
        );
        assert!(
            needs_apply(None, Some(&seen("10", None)), body),
            "never applied here"
        );
        assert!(
            needs_apply(Some(&applied), None, body),
            "gone, or not yet seen"
        );
    }

    #[test]
    fn drift_is_a_new_spec_or_a_deletion_never_a_status_write() {
        let applied = (seen("10", Some(1)), 0);
        assert!(
            !drifted_from(Some(&applied), Some(&seen("11", Some(1)))),
            "status"
        );
        assert!(
            drifted_from(Some(&applied), Some(&seen("12", Some(2)))),
            "spec"
        );
        assert!(drifted_from(Some(&applied), None), "deleted");
        let configmap = (seen("10", None), 0);
        assert!(drifted_from(Some(&configmap), Some(&seen("11", None))));
        assert!(!drifted_from(None, Some(&seen("11", None))), "not ours yet");
    }

    #[test]
    fn a_plan_settles_namespaces_and_labels_every_object() {
        let settings = ApplySettings {
            default_namespace: "apps".into(),
            scope_cluster_kinds: vec!["Namespace".into()],
            scope_namespaces: vec!["apps".into(), "team".into()],
            ..ApplySettings::default()
        };
        let planned = plan_of(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b, namespace: team}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: team, namespace: ignored}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n  labels:\n",
            &settings,
        )
        .unwrap();
        let placed: Vec<(&str, Option<&str>)> = planned
            .iter()
            .map(|p| (p.key.name.as_str(), p.key.namespace.as_deref()))
            .collect();
        assert_eq!(
            placed,
            [
                ("a", Some("apps")),
                ("b", Some("team")),
                ("team", None),
                ("c", Some("apps"))
            ]
        );
        assert_eq!(planned[0].body["metadata"]["namespace"], "apps");
        assert!(
            planned[2].body["metadata"].get("namespace").is_none(),
            "cluster-scoped"
        );
        for p in &planned {
            assert_eq!(p.body["metadata"]["labels"][INVENTORY_LABEL], "prod");
        }
    }

    /// The plan of `files`, each `(name, yaml)`, for an agent whose default namespace is `apps`
    /// and which may write Namespaces.
    fn plan_of_files(files: &[(&str, &str)]) -> Result<Vec<Planned<Served>>, String> {
        let settings = ApplySettings {
            default_namespace: "apps".into(),
            scope_cluster_kinds: vec!["Namespace".into()],
            scope_namespaces: vec!["apps".into(), "team".into()],
            ..ApplySettings::default()
        };
        let files: Vec<(String, Vec<u8>)> = files
            .iter()
            .map(|(name, yaml)| ((*name).to_owned(), yaml.as_bytes().to_vec()))
            .collect();
        let manifests = crate::manifest::parse(&files).map_err(|e| e.to_string())?;
        plan_objects(
            manifests,
            &settings,
            "prod",
            "greenlight",
            &BTreeMap::new(),
            served,
        )
    }

    #[test]
    fn an_object_written_with_and_without_the_default_namespace_is_a_duplicate() {
        let refused = plan_of_files(&[
            ("a.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {v: a}\n"),
            (
                "b.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other, namespace: team}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: apps}\ndata: {v: b}\n",
            ),
        ])
        .err()
        .unwrap_or_default();
        assert_eq!(
            refused,
            "ConfigMap apps/x is defined twice, in a.yaml document 0 and in b.yaml document 1 \
             (without metadata.namespace an object goes to the default namespace apps); keep \
             one of them; nothing was applied"
        );
        // The same name in another namespace is another object.
        assert!(
            plan_of_files(&[(
                "a.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: team}\n",
            )])
            .is_ok()
        );
    }

    #[test]
    fn a_cluster_scoped_object_with_different_stray_namespaces_is_a_duplicate() {
        let refused = plan_of_files(&[(
            "ns.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: team, namespace: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: team, namespace: b}\n",
        )])
        .err()
        .unwrap_or_default();
        assert_eq!(
            refused,
            "Namespace team is defined twice, in ns.yaml document 0 and in ns.yaml document 1 \
             (Namespace is cluster-scoped, so metadata.namespace is ignored); keep one of them; \
             Namespace team is defined twice, in ns.yaml document 0 and in ns.yaml document 2 \
             (Namespace is cluster-scoped, so metadata.namespace is ignored); keep one of them; \
             nothing was applied"
        );
    }

    #[test]
    fn a_kind_whose_crd_ships_alongside_is_planned_unresolved_with_the_crds_scope() {
        let settings = ApplySettings {
            default_namespace: "apps".into(),
            scope_cluster_kinds: vec!["CustomResourceDefinition".into()],
            ..ApplySettings::default()
        };
        let planned = plan_of(
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: widgets.example.com}\nspec: {group: example.com, scope: Namespaced, names: {kind: Widget, plural: widgets}}\n---\napiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n",
            &settings,
        )
        .unwrap();
        assert!(planned[1].resolved.is_none());
        assert!(planned[1].namespaced);
        assert_eq!(planned[1].key.namespace.as_deref(), Some("apps"));
    }

    #[test]
    fn one_refusal_names_every_unknown_kind_and_every_object_outside_the_scope() {
        let settings = ApplySettings {
            default_namespace: "apps".into(),
            ..ApplySettings::default()
        };
        let refused = plan_of(
            "apiVersion: example.com/v1\nkind: Gadget\nmetadata: {name: g}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: kube-system}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: r}\n",
            &settings,
        )
        .err()
        .unwrap_or_default();
        assert!(
            refused.contains("unknown kind: Gadget (example.com/v1) in app.yaml document 0"),
            "{refused}"
        );
        assert!(refused.contains("ConfigMap kube-system/c"), "{refused}");
        assert!(refused.contains("ClusterRole r"), "{refused}");
        assert!(refused.ends_with("nothing was applied"), "{refused}");
    }

    #[test]
    fn the_default_scope_is_the_default_namespace_and_no_cluster_kinds() {
        let settings = ApplySettings {
            default_namespace: "apps".into(),
            ..ApplySettings::default()
        };
        let scope = Scope::of(&settings);
        assert_eq!(scope, self::scope(&["apps"], &[]));
        assert!(
            scope
                .refusal(&entry("", "ConfigMap", Some("apps"), "a").key)
                .is_none()
        );
        assert!(
            scope
                .refusal(&entry("", "ConfigMap", Some("kube-system"), "a").key)
                .is_some()
        );
        let role = entry("rbac.authorization.k8s.io", "ClusterRole", None, "admin");
        assert!(scope.refusal(&role.key).is_some());
    }

    #[test]
    fn objects_outside_the_scope_or_the_agents_records_are_refused_by_name() {
        let scope = scope(&["apps", "team-*"], &["Namespace", "ClusterRole"]);
        let keys: Vec<ObjectKey> = [
            entry("", "ConfigMap", Some("apps"), "fine"),
            entry("", "ConfigMap", Some("team-a"), "fine"),
            entry("", "Namespace", None, "team-b"),
            entry("rbac.authorization.k8s.io", "ClusterRole", None, "reader"),
            entry("", "Secret", Some("kube-system"), "bootstrap"),
            entry("", "Namespace", None, "kube-system"),
            entry(
                "rbac.authorization.k8s.io",
                "ClusterRoleBinding",
                None,
                "root",
            ),
            entry(
                "",
                "ConfigMap",
                Some("greenlight"),
                "greenlight-inventory-prod",
            ),
            entry(
                "coordination.k8s.io",
                "Lease",
                Some("greenlight"),
                "greenlight-agent-prod",
            ),
            // The same names elsewhere are ordinary objects.
            entry("", "ConfigMap", Some("apps"), "greenlight-inventory-prod"),
        ]
        .into_iter()
        .map(|e| e.key)
        .collect();
        let refused = refusals(&keys, &scope, "greenlight");
        assert_eq!(
            refused,
            [
                "Secret kube-system/bootstrap: namespace kube-system is not in the agent's scope",
                "Namespace kube-system: namespace kube-system is not in the agent's scope",
                "ClusterRoleBinding root: cluster-scoped kind ClusterRoleBinding is not in the agent's scope",
                "ConfigMap greenlight/greenlight-inventory-prod: it is the agent's own inventory or Lease",
                "Lease greenlight/greenlight-agent-prod: it is the agent's own inventory or Lease",
            ]
        );
        // Even a scope that includes the agent's namespace never lets a revision write them.
        let wide = self::scope(&["*"], &[]);
        assert_eq!(refusals(&keys[7..9], &wide, "greenlight").len(), 2);
    }

    #[test]
    fn a_kind_alone_names_it_in_kubernetes_groups_and_others_need_their_group() {
        let scope = scope(
            &["apps"],
            &["Namespace", "ClusterRole", "ClusterIssuer.cert-manager.io"],
        );
        let refusal = |group: &str, kind: &str| scope.refusal(&entry(group, kind, None, "x").key);
        assert_eq!(refusal("rbac.authorization.k8s.io", "ClusterRole"), None);
        assert_eq!(refusal("cert-manager.io", "ClusterIssuer"), None);
        // A CRD that calls its kind Namespace or ClusterRole gets no pass from the listing.
        assert_eq!(
            refusal("evil.example.com", "ClusterRole").as_deref(),
            Some(
                "cluster-scoped kind ClusterRole.evil.example.com is not in the agent's scope (a \
                 kind of a group other than Kubernetes' own is listed with its group: \
                 ClusterRole.evil.example.com)"
            )
        );
        assert!(refusal("evil.example.com", "Namespace").is_some());
        assert!(
            refusal("other.io", "ClusterIssuer").is_some(),
            "another group"
        );
        assert!(
            refusal("", "ClusterIssuer").is_some(),
            "the group was named"
        );
        assert!(is_kubernetes_group(""));
        assert!(is_kubernetes_group("apiextensions.k8s.io"));
        assert!(!is_kubernetes_group("cluster.x-k8s.io"));
        // A CRD may take a group under k8s.io with an annotation anyone can write.
        assert!(!is_kubernetes_group("evil.k8s.io"));
        assert!(refusal("evil.k8s.io", "ClusterRole").is_some());
        assert!(!is_kubernetes_group("gateway.networking.k8s.io"));
    }

    #[test]
    fn cascading_kinds_are_pruned_only_when_annotated() {
        assert!(cascades("", "Namespace"));
        assert!(cascades("apiextensions.k8s.io", "CustomResourceDefinition"));
        assert!(cascades("apiregistration.k8s.io", "APIService"));
        assert!(!cascades("", "ConfigMap"));
        assert!(!cascades("example.com", "Namespace"));
        let annotated = |value: &str| BTreeMap::from([(PRUNE_ANNOTATION.to_owned(), value.into())]);
        assert!(prune_allowed(Some(&annotated("allow"))));
        assert!(!prune_allowed(Some(&annotated("yes"))));
        assert!(!prune_allowed(Some(&BTreeMap::new())));
        assert!(!prune_allowed(None));
    }

    #[test]
    fn a_prune_beyond_the_limit_is_refused_unless_forced() {
        let inventory: Vec<InventoryEntry> = (0..5)
            .map(|i| entry("", "ConfigMap", Some("apps"), &format!("cm{i}")))
            .chain([entry("", "ConfigMap", Some("old"), "elsewhere")])
            .collect();
        let desired = BTreeSet::new();
        let scope = scope(&["apps"], &[]);
        let err = prune_set(&inventory, &desired, &scope, Some(4), false).unwrap_err();
        assert_eq!(err, PruneLimitExceeded { count: 5, limit: 4 });
        assert!(err.to_string().contains("--force-prune"), "{err}");
        let forced = prune_set(&inventory, &desired, &scope, Some(4), true).unwrap();
        assert_eq!(forced.candidates.len(), 5);
        assert_eq!(forced.out_of_scope, [inventory[5].clone()], "never touched");
        assert!(prune_set(&inventory, &desired, &scope, Some(5), false).is_ok());
        assert!(prune_set(&inventory, &desired, &scope, None, false).is_ok());
        // Adopted objects are only let go: they do not count.
        let mut adopted = inventory.clone();
        adopted[0].adopted = true;
        assert!(prune_set(&adopted, &desired, &scope, Some(4), false).is_ok());
        // Nor do objects an earlier prune kept, counted then; they are still pruned.
        let mut kept = inventory.clone();
        for entry in &mut kept[..3] {
            entry.kept = true;
        }
        let pruned = prune_set(&kept, &desired, &scope, Some(2), false).unwrap();
        assert_eq!(pruned.candidates.len(), 5);
        let err = prune_set(&kept, &desired, &scope, Some(1), false).unwrap_err();
        assert_eq!(err, PruneLimitExceeded { count: 2, limit: 1 });
    }

    #[test]
    fn inventories_written_before_adoption_existed_still_load() {
        let old = r#"{"key":{"group":"","kind":"ConfigMap","namespace":"a","name":"b"},"api_version":"v1","namespaced":true}"#;
        let entry: InventoryEntry = serde_json::from_str(old).unwrap();
        assert!(!entry.adopted);
    }

    fn arb_entry() -> impl Strategy<Value = InventoryEntry> {
        let kinds = prop::sample::select(vec![
            ("", "Namespace", false),
            ("apiextensions.k8s.io", "CustomResourceDefinition", false),
            ("rbac.authorization.k8s.io", "ClusterRole", false),
            ("", "ConfigMap", true),
            ("apps", "Deployment", true),
        ]);
        (kinds, 0..4u8, 0..6u8).prop_map(|((group, kind, namespaced), ns, name)| {
            let namespace = namespaced.then(|| format!("ns{ns}"));
            entry(group, kind, namespace.as_deref(), &format!("o{name}"))
        })
    }

    proptest! {
        #[test]
        fn apply_stages_are_ordered_and_lose_nothing(items in prop::collection::vec(arb_entry(), 0..40)) {
            let stage = |e: &InventoryEntry| Stage::of(&e.key.group, &e.key.kind, e.namespaced);
            let stages = apply_stages(items.clone(), stage);
            let flat: Vec<InventoryEntry> = stages.iter().flat_map(|(_, g)| g.clone()).collect();
            let mut sorted_in = items.clone();
            sorted_in.sort();
            let mut sorted_out = flat.clone();
            sorted_out.sort();
            prop_assert_eq!(sorted_in, sorted_out);
            prop_assert!(stages.windows(2).all(|w| w[0].0 < w[1].0));
            prop_assert!(stages.iter().all(|(s, g)| g.iter().all(|e| stage(e) == *s)));
        }

        #[test]
        fn prune_plan_is_exactly_the_undesired_in_reverse_stage_order(
            inventory in prop::collection::vec(arb_entry(), 0..40),
            desired in prop::collection::vec(arb_entry(), 0..40),
        ) {
            let desired_keys: BTreeSet<ObjectKey> = desired.iter().map(|e| e.key.clone()).collect();
            let plan = prune_plan(&inventory, &desired_keys);
            let stage = |e: &InventoryEntry| Stage::of(&e.key.group, &e.key.kind, e.namespaced);
            prop_assert!(plan.iter().all(|e| !desired_keys.contains(&e.key)));
            let expected: BTreeSet<ObjectKey> =
                inventory.iter().map(|e| e.key.clone()).filter(|k| !desired_keys.contains(k)).collect();
            let planned: BTreeSet<ObjectKey> = plan.iter().map(|e| e.key.clone()).collect();
            prop_assert_eq!(planned.len(), plan.len(), "each object pruned once");
            prop_assert_eq!(expected, planned);
            prop_assert!(plan.windows(2).all(|w| stage(&w[0]) >= stage(&w[1])));
        }
    }
}
