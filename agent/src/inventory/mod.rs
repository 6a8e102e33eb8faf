//! The record of what this agent applied: a ConfigMap in the agent's namespace, plus a label
//! on every applied object (as cli-utils and ApplySet do), so pruning never touches objects
//! the agent did not create.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
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
    /// The ConfigMap's `resourceVersion` as this store last read or wrote it: each write
    /// is conditional on it, so that a replica that lost its Lease mid-revision cannot
    /// overwrite what the new leader recorded since.
    read_at: std::sync::Mutex<Option<String>>,
}

impl InventoryStore {
    /// The inventory of `agent` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, agent: &str, field_manager: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: inventory_name(agent),
            field_manager: field_manager.to_owned(),
            read_at: std::sync::Mutex::new(None),
        }
    }

    fn remember(&self, map: &ConfigMap) {
        // A plain value behind the lock: a poisoned lock holds it as well as a clean one.
        *self.read_at.lock().unwrap_or_else(|p| p.into_inner()) =
            map.metadata.resource_version.clone();
    }

    fn read_at(&self) -> Option<String> {
        self.read_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The stored inventory; empty when there is none yet.
    pub async fn load(&self) -> Result<Inventory, ClusterError> {
        let Some(map) = bounded(self.api.get_opt(&self.name)).await? else {
            return Ok(Inventory::default());
        };
        self.remember(&map);
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
        let mut metadata = json!({
            "name": self.name,
            "labels": { "app.kubernetes.io/managed-by": "greenlight" },
        });
        // An apply carrying a resourceVersion is refused when the object's differs. The
        // first inventory, made where none was read, has none to carry.
        if let Some(version) = self.read_at() {
            metadata["resourceVersion"] = json!(version);
        }
        let body = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata,
            // The format before this one, under its own key, goes with this apply: the
            // field manager that wrote it no longer sets it.
            "data": {
                record::OBJECTS_KEY: record::encode(&inventory.entries)?,
                "revision": inventory.revision.clone().unwrap_or_default(),
            },
        });
        let params = PatchParams::apply(&self.field_manager).force();
        let saved = bounded(self.api.patch(&self.name, &params, &Patch::Apply(body))).await?;
        self.remember(&saved);
        Ok(())
    }
}
