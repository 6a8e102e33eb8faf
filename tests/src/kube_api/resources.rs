//! The resource catalog (built-in kinds plus those that stored CRDs add) and the discovery
//! documents made from it.

use std::cmp::Ordering;

use serde_json::{Value, json};

/// One REST resource: a kind under a group at the versions it is served at.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Resource {
    pub group: String,
    /// Served versions, most preferred first.
    pub versions: Vec<String>,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    /// Whether a `status` subresource exists, which makes the main resource ignore status.
    pub status: bool,
    /// Built-in kinds have associative (keyed) lists; custom resources' lists are atomic.
    pub builtin: bool,
}

impl Resource {
    /// `apps/v1`, or `v1` for the core group.
    pub(crate) fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    /// The preferred version's `apiVersion`.
    pub(crate) fn preferred_api_version(&self) -> String {
        self.api_version(self.versions.first().map_or("v1", String::as_str))
    }

    /// `deployments.apps`, or `configmaps` for the core group, as error messages name it.
    pub(crate) fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// `Deployment.apps`, or `ConfigMap`, as validation errors name it.
    pub(crate) fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    pub(crate) fn is(&self, group: &str, kind: &str) -> bool {
        self.group == group && self.kind == kind
    }
}

pub(crate) const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

struct Builtin {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    status: bool,
}

const fn builtin(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    status: bool,
) -> Builtin {
    Builtin {
        group,
        version,
        plural,
        kind,
        namespaced,
        short_names,
        status,
    }
}

const BUILTINS: &[Builtin] = &[
    builtin("", "v1", "configmaps", "ConfigMap", true, &["cm"], false),
    builtin("", "v1", "namespaces", "Namespace", false, &["ns"], true),
    builtin(
        "",
        "v1",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        true,
        &["pvc"],
        true,
    ),
    builtin("", "v1", "pods", "Pod", true, &["po"], true),
    builtin("", "v1", "secrets", "Secret", true, &[], false),
    builtin(
        "",
        "v1",
        "serviceaccounts",
        "ServiceAccount",
        true,
        &["sa"],
        false,
    ),
    builtin("", "v1", "services", "Service", true, &["svc"], true),
    builtin(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
        &["crd", "crds"],
        true,
    ),
    builtin("apps", "v1", "daemonsets", "DaemonSet", true, &["ds"], true),
    builtin(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        true,
        &["deploy"],
        true,
    ),
    builtin(
        "apps",
        "v1",
        "replicasets",
        "ReplicaSet",
        true,
        &["rs"],
        true,
    ),
    builtin(
        "apps",
        "v1",
        "statefulsets",
        "StatefulSet",
        true,
        &["sts"],
        true,
    ),
    builtin(
        "autoscaling",
        "v2",
        "horizontalpodautoscalers",
        "HorizontalPodAutoscaler",
        true,
        &["hpa"],
        true,
    ),
    builtin("batch", "v1", "cronjobs", "CronJob", true, &["cj"], true),
    builtin("batch", "v1", "jobs", "Job", true, &[], true),
    builtin(
        "coordination.k8s.io",
        "v1",
        "leases",
        "Lease",
        true,
        &[],
        false,
    ),
    builtin(
        "networking.k8s.io",
        "v1",
        "ingresses",
        "Ingress",
        true,
        &["ing"],
        true,
    ),
    builtin(
        "networking.k8s.io",
        "v1",
        "networkpolicies",
        "NetworkPolicy",
        true,
        &["netpol"],
        false,
    ),
    builtin(
        "policy",
        "v1",
        "poddisruptionbudgets",
        "PodDisruptionBudget",
        true,
        &["pdb"],
        true,
    ),
    builtin(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
        &[],
        false,
    ),
    builtin(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterroles",
        "ClusterRole",
        false,
        &[],
        false,
    ),
    builtin(
        "rbac.authorization.k8s.io",
        "v1",
        "rolebindings",
        "RoleBinding",
        true,
        &[],
        false,
    ),
    builtin(
        "rbac.authorization.k8s.io",
        "v1",
        "roles",
        "Role",
        true,
        &[],
        false,
    ),
];

/// The built-in resources, in a fixed order.
pub(crate) fn builtins() -> Vec<Resource> {
    BUILTINS
        .iter()
        .map(|b| Resource {
            group: b.group.into(),
            versions: vec![b.version.into()],
            plural: b.plural.into(),
            singular: b.kind.to_lowercase(),
            kind: b.kind.into(),
            list_kind: format!("{}List", b.kind),
            namespaced: b.namespaced,
            short_names: b.short_names.iter().map(|s| (*s).to_owned()).collect(),
            status: b.status,
            builtin: true,
        })
        .collect()
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

/// Why a CRD is invalid, as `(field, detail)`, or `None` when it is acceptable.
pub(crate) fn crd_problem(crd: &Value) -> Option<(&'static str, String)> {
    let required = [
        ("spec.group", "/spec/group"),
        ("spec.names.plural", "/spec/names/plural"),
        ("spec.names.kind", "/spec/names/kind"),
        ("spec.scope", "/spec/scope"),
    ];
    for (field, pointer) in required {
        if str_at(crd, pointer).is_none_or(str::is_empty) {
            return Some((field, "Required value".into()));
        }
    }
    let scope = str_at(crd, "/spec/scope").unwrap_or_default();
    if scope != "Namespaced" && scope != "Cluster" {
        return Some((
            "spec.scope",
            format!(
                "Unsupported value: \"{scope}\": supported values: \"Cluster\", \"Namespaced\""
            ),
        ));
    }
    let versions = crd.pointer("/spec/versions").and_then(Value::as_array);
    let Some(versions) = versions.filter(|v| !v.is_empty()) else {
        return Some((
            "spec.versions",
            "Invalid value: must have exactly one version marked as storage version".into(),
        ));
    };
    let storage = versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .count();
    if storage != 1 {
        return Some((
            "spec.versions",
            "Invalid value: must have exactly one version marked as storage version".into(),
        ));
    }
    let expected = format!(
        "{}.{}",
        str_at(crd, "/spec/names/plural").unwrap_or_default(),
        str_at(crd, "/spec/group").unwrap_or_default()
    );
    if str_at(crd, "/metadata/name") != Some(expected.as_str()) {
        return Some((
            "metadata.name",
            format!("Invalid value: must be spec.names.plural+\".\"+spec.group (\"{expected}\")"),
        ));
    }
    None
}

/// The resource a stored CRD serves, if it serves any version.
pub(crate) fn crd_resource(crd: &Value) -> Option<Resource> {
    let group = str_at(crd, "/spec/group")?;
    let plural = str_at(crd, "/spec/names/plural")?;
    let kind = str_at(crd, "/spec/names/kind")?;
    let mut versions = Vec::new();
    let mut status = false;
    for version in crd.pointer("/spec/versions")?.as_array()? {
        if version.get("served").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let Some(name) = version.get("name").and_then(Value::as_str) else {
            continue;
        };
        versions.push(name.to_owned());
        status |= version.pointer("/subresources/status").is_some();
    }
    if versions.is_empty() {
        return None;
    }
    versions.sort_by(|a, b| compare_versions(a, b));
    let short_names = crd
        .pointer("/spec/names/shortNames")
        .and_then(Value::as_array)
        .map(|names| {
            names
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Some(Resource {
        group: group.into(),
        versions,
        plural: plural.into(),
        singular: str_at(crd, "/spec/names/singular")
            .map_or_else(|| kind.to_lowercase(), str::to_owned),
        kind: kind.into(),
        list_kind: str_at(crd, "/spec/names/listKind")
            .map_or_else(|| format!("{kind}List"), str::to_owned),
        namespaced: str_at(crd, "/spec/scope") == Some("Namespaced"),
        short_names,
        status,
        builtin: false,
    })
}

/// `(stability, major, minor)` of a Kubernetes-style version (`v2`, `v1beta1`), stability 3
/// for GA, 2 beta, 1 alpha; `None` for versions that do not follow the pattern.
fn parse_version(version: &str) -> Option<(u8, u64, u64)> {
    let rest = version.strip_prefix('v')?;
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let major = rest[..digits].parse().ok()?;
    let rest = &rest[digits..];
    if rest.is_empty() {
        return Some((3, major, 0));
    }
    let (stability, minor) = if let Some(minor) = rest.strip_prefix("beta") {
        (2, minor)
    } else if let Some(minor) = rest.strip_prefix("alpha") {
        (1, minor)
    } else {
        return None;
    };
    Some((stability, major, minor.parse().ok()?))
}

/// Orders versions as the real server prefers them: GA before beta before alpha, higher
/// numbers first, other strings last and alphabetically.
pub(crate) fn compare_versions(a: &str, b: &str) -> Ordering {
    match (parse_version(a), parse_version(b)) {
        (Some(a), Some(b)) => b.cmp(&a),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

/// The groups (other than core) in discovery order, each with its versions, preferred first.
pub(crate) fn groups(catalog: &[Resource]) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for resource in catalog.iter().filter(|r| !r.group.is_empty()) {
        let index = match groups.iter().position(|(name, _)| *name == resource.group) {
            Some(index) => index,
            None => {
                groups.push((resource.group.clone(), Vec::new()));
                groups.len() - 1
            }
        };
        for version in &resource.versions {
            if !groups[index].1.contains(version) {
                groups[index].1.push(version.clone());
            }
        }
    }
    for (_, versions) in &mut groups {
        versions.sort_by(|a, b| compare_versions(a, b));
    }
    groups
}

fn group_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    }
}

/// `GET /version`.
pub(crate) fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "emulationMajor": "1",
        "emulationMinor": "33",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "32",
        "gitVersion": "v1.33.0",
        "gitCommit": "60a317eadfcb839692a5551a2ab6f3f8d4f4ff0b",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T13:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

/// `GET /api`.
pub(crate) fn api_versions(address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}]
    })
}

fn api_group(name: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": group_version(name, v), "version": v}))
        .collect();
    json!({
        "name": name,
        "versions": versions,
        "preferredVersion": versions.first().cloned().unwrap_or(Value::Null)
    })
}

/// `GET /apis`.
pub(crate) fn api_group_list(catalog: &[Resource]) -> Value {
    let groups: Vec<Value> = groups(catalog)
        .iter()
        .map(|(name, versions)| api_group(name, versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /apis/{group}`, if the group is served.
pub(crate) fn api_group_doc(catalog: &[Resource], group: &str) -> Option<Value> {
    let (name, versions) = groups(catalog)
        .into_iter()
        .find(|(name, _)| name == group)?;
    let mut doc = api_group(&name, &versions);
    if let Value::Object(map) = &mut doc {
        map.insert("kind".into(), "APIGroup".into());
        map.insert("apiVersion".into(), "v1".into());
    }
    Some(doc)
}

/// `GET /api/{version}` or `GET /apis/{group}/{version}`, if served.
pub(crate) fn api_resource_list(catalog: &[Resource], group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in catalog
        .iter()
        .filter(|r| r.group == group && r.versions.iter().any(|v| v == version))
    {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": VERBS,
        });
        if !r.short_names.is_empty()
            && let Value::Object(map) = &mut entry
        {
            map.insert("shortNames".into(), json!(r.short_names));
        }
        resources.push(entry);
        if r.status {
            resources.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version(group, version),
        "resources": resources
    }))
}

fn discovery_group(catalog: &[Resource], group: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|version| {
            let resources: Vec<Value> = catalog
                .iter()
                .filter(|r| r.group == group && r.versions.contains(version))
                .map(|r| {
                    let kind = json!({"group": group, "version": version, "kind": r.kind});
                    let subresources = if r.status {
                        json!([{"subresource": "status", "responseKind": kind, "verbs": ["get", "patch", "update"]}])
                    } else {
                        json!([])
                    };
                    json!({
                        "resource": r.plural,
                        "responseKind": kind,
                        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                        "singularResource": r.singular,
                        "verbs": VERBS,
                        "shortNames": r.short_names,
                        "subresources": subresources
                    })
                })
                .collect();
            json!({"version": version, "resources": resources, "freshness": "Current"})
        })
        .collect();
    json!({"metadata": {"name": group, "creationTimestamp": null}, "versions": versions})
}

/// Aggregated discovery (`apidiscovery.k8s.io/{version}` `APIGroupDiscoveryList`) of the core
/// group (`GET /api`) or of every other group (`GET /apis`).
pub(crate) fn aggregated(catalog: &[Resource], core: bool, version: &str) -> Value {
    let items: Vec<Value> = if core {
        vec![discovery_group(catalog, "", &["v1".to_owned()])]
    } else {
        groups(catalog)
            .iter()
            .map(|(name, versions)| discovery_group(catalog, name, versions))
            .collect()
    };
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{version}"),
        "metadata": {},
        "items": items
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_like_kubernetes() {
        let mut versions = vec![
            "v1alpha1", "foo", "v2", "v1beta2", "v1", "v10beta1", "v1beta1",
        ];
        versions.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(
            versions,
            [
                "v2", "v1", "v10beta1", "v1beta2", "v1beta1", "v1alpha1", "foo"
            ]
        );
    }
}
