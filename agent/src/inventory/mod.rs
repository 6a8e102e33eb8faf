//! The record of what this agent applied: a ConfigMap in the agent's namespace, plus a label
//! on every applied object (as cli-utils and ApplySet do), so pruning never touches objects
//! the agent did not create.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::cluster::{ClusterError, bounded};
use crate::plan::{InventoryEntry, inventory_name};

pub mod record;

pub use crate::plan::INVENTORY_LABEL;

/// The annotation that records on an object itself that the agent adopted it (it existed
/// before the agent first applied it). The inventory says so too, but the inventory can be
/// lost, and an entry can be forgotten and come back; the object cannot lose it that way, so
/// an object carrying it is never pruned, only let go.
pub const ADOPTED_ANNOTATION: &str = "greenlight.dev/adopted";
/// The value of [`ADOPTED_ANNOTATION`] the agent writes.
pub const ADOPTED: &str = "true";

/// What the inventory holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub entries: Vec<InventoryEntry>,
    /// The revision whose apply completed last.
    pub revision: Option<String>,
}

/// Reads and writes one agent's inventory.
pub struct InventoryStore {
    api: Api<ConfigMap>,
    name: String,
    field_manager: String,
    /// The ConfigMap as this store last read or wrote it: each write is conditional on it,
    /// so that a replica that lost its Lease mid-revision cannot overwrite what the new
    /// leader recorded since.
    seen: std::sync::Mutex<Seen>,
}

/// What a store knows of its ConfigMap.
#[derive(Debug, Clone)]
enum Seen {
    /// Read, and there was none: made anew, which fails if someone made it meanwhile.
    Missing,
    /// Read or written at this `resourceVersion`; none when never read, which writes
    /// unconditionally.
    At(Option<String>),
}

impl InventoryStore {
    /// The inventory of `agent` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, agent: &str, field_manager: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: inventory_name(agent),
            field_manager: field_manager.to_owned(),
            seen: std::sync::Mutex::new(Seen::At(None)),
        }
    }

    fn remember(&self, seen: Seen) {
        // A plain value behind the lock: a poisoned lock holds it as well as a clean one.
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = seen;
    }

    fn seen(&self) -> Seen {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The stored inventory; empty when there is none yet.
    pub async fn load(&self) -> Result<Inventory, ClusterError> {
        let Some(map) = bounded(self.api.get_opt(&self.name)).await? else {
            self.remember(Seen::Missing);
            return Ok(Inventory::default());
        };
        self.remember(Seen::At(map.metadata.resource_version.clone()));
        let data = map.data.unwrap_or_default();
        let entries = match (data.get(record::OBJECTS_KEY), data.get(record::LEGACY_KEY)) {
            (Some(text), _) => record::decode(text)?,
            (None, Some(text)) => record::decode_legacy(text)?,
            (None, None) => Vec::new(),
        };
        Ok(Inventory {
            entries,
            revision: data.get("revision").cloned().filter(|r| !r.is_empty()),
        })
    }

    /// Replaces the stored inventory, unless it changed since this store read or wrote it
    /// (a conflict: [`ClusterError::is_conflict`]).
    pub async fn save(&self, inventory: &Inventory) -> Result<(), ClusterError> {
        let labels = json!({ "app.kubernetes.io/managed-by": "greenlight" });
        // A key this apply leaves out (the earlier format, once the inventory outgrows
        // it) goes: the field manager that wrote it no longer sets it. Encoded first: an
        // inventory too large to record makes no empty one either.
        let mut data: serde_json::Map<String, serde_json::Value> =
            record::data_for(&inventory.entries)?
                .into_iter()
                .map(|(key, text)| (key.to_owned(), text.into()))
                .collect();
        let version = match self.seen() {
            Seen::At(version) => version,
            Seen::Missing => {
                // None was read: made empty first, so that it is made once. Another
                // replica that read none too is refused (it already exists) rather than
                // overwriting it.
                let empty: ConfigMap = serde_json::from_value(
                    json!({ "metadata": { "name": self.name, "labels": labels } }),
                )?;
                let made = bounded(self.api.create(&PostParams::default(), &empty)).await?;
                self.remember(Seen::At(made.metadata.resource_version.clone()));
                made.metadata.resource_version
            }
        };
        data.insert(
            "revision".to_owned(),
            inventory.revision.clone().unwrap_or_default().into(),
        );
        let mut metadata = json!({ "name": self.name, "labels": labels });
        // An apply carrying a resourceVersion is refused when the object's differs.
        if let Some(version) = version {
            metadata["resourceVersion"] = json!(version);
        }
        let body = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata,
            "data": data,
        });
        let params = PatchParams::apply(&self.field_manager).force();
        let saved = bounded(self.api.patch(&self.name, &params, &Patch::Apply(body))).await?;
        self.remember(Seen::At(saved.metadata.resource_version));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{namespaced_entry, serve, status};

    /// An inventory too large to record is refused before anything is written: with none
    /// stored yet, none is made empty either.
    #[tokio::test]
    async fn an_inventory_too_large_to_record_writes_nothing() {
        let (kube, log) = serve(|_, _| Some((404, status(404, "not found")))).await;
        let store = InventoryStore::new(kube, "greenlight", "prod", "test");
        let read = store.load().await.expect("none stored reads as empty");
        assert!(read.entries.is_empty());
        let entries = (0..20_000)
            .map(|n| namespaced_entry("v1", "ConfigMap", &format!("{n:05}-{}", "x".repeat(60))))
            .collect();
        let refused = store
            .save(&Inventory {
                entries,
                revision: None,
            })
            .await
            .expect_err("too large");
        assert!(refused.message().contains("split"), "{}", refused.message());
        let log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert!(
            log.iter().all(|request| request.starts_with("GET")),
            "{log:?}"
        );
    }
}
