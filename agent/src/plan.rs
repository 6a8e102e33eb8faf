//! What to apply in which order, and what to prune: pure decisions over resolved objects.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

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
