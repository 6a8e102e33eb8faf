//! Applying one revision: parse and validate everything, resolve kinds, optionally dry-run,
//! record the inventory, apply in stages with server-side apply, prune, wait for health.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use futures_util::StreamExt;
use greenlight::v1::{ApplySettings, ObjectResult, Phase, StatusReport, object_result::Action};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::assemble::ReadyRevision;
use crate::cluster::{Cluster, Resolved};
use crate::health::{Health, assess};
use crate::inventory::{INVENTORY_LABEL, Inventory, InventoryStore};
use crate::manifest::{self, Manifest};
use crate::plan::{InventoryEntry, ObjectKey, Stage, apply_stages, prune_plan};

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "greenlight";
/// Objects applied at once within one stage.
const APPLY_CONCURRENCY: usize = 8;
/// How often health is polled while waiting.
const HEALTH_POLL: Duration = Duration::from_secs(1);
/// How long custom resources may wait for their just-applied CRD to be served.
const CRD_ESTABLISH_ATTEMPTS: u32 = 20;

/// How applying a revision ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Healthy,
    Degraded(String),
    Failed(String),
    /// A newer revision arrived (or leadership was lost); stopped at a safe point.
    Stopped,
}

/// One object ready to apply.
struct Planned {
    manifest: Manifest,
    key: ObjectKey,
    namespaced: bool,
    /// `None` until discovery serves its kind (custom resources of a CRD in this revision).
    resolved: Option<Resolved>,
    body: Value,
}

/// Applies revisions to one cluster for one agent.
pub struct Worker {
    cluster: Cluster,
    namespace: String,
    reports: mpsc::Sender<StatusReport>,
    /// Last resourceVersion seen per object, to tell "unchanged" from "applied" for free.
    versions: HashMap<ObjectKey, String>,
}

impl Worker {
    /// A worker keeping its inventory in `namespace` and sending reports to `reports`.
    pub fn new(cluster: Cluster, namespace: &str, reports: mpsc::Sender<StatusReport>) -> Self {
        Self {
            cluster,
            namespace: namespace.to_owned(),
            reports,
            versions: HashMap::new(),
        }
    }

    async fn report(
        &self,
        revision: &ReadyRevision,
        phase: Phase,
        message: String,
        objects: Vec<ObjectResult>,
        done: usize,
        total: usize,
    ) {
        let report = StatusReport {
            revision: revision.sha().to_owned(),
            phase: phase.into(),
            message,
            objects,
            objects_done: u32::try_from(done).unwrap_or(u32::MAX),
            objects_total: u32::try_from(total).unwrap_or(u32::MAX),
            received_at_unix_ms: 0,
            generation: revision.generation(),
        };
        if self.reports.send(report).await.is_err() {
            warn!("report channel closed");
        }
    }

    async fn fail(
        &self,
        revision: &ReadyRevision,
        message: String,
        objects: Vec<ObjectResult>,
    ) -> Outcome {
        warn!(sha = revision.sha(), %message, "revision failed");
        let done = objects.len();
        self.report(
            revision,
            Phase::Failed,
            message.clone(),
            objects,
            done,
            done,
        )
        .await;
        Outcome::Failed(message)
    }

    /// Fails the revision naming every object whose write failed.
    async fn fail_listing(
        &self,
        revision: &ReadyRevision,
        what: &str,
        results: Vec<ObjectResult>,
    ) -> Outcome {
        let names: Vec<String> = results
            .iter()
            .filter(|r| r.action() == Action::Failed)
            .map(describe)
            .collect();
        self.fail(
            revision,
            format!("{what} for {}", names.join(", ")),
            results,
        )
        .await
    }

    /// Applies `revision`; `stop` is polled at safe points between objects.
    pub async fn reconcile(
        &mut self,
        revision: &ReadyRevision,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Outcome {
        let settings = revision.header.settings.clone().unwrap_or_default();
        let agent = revision.header.agent.clone();
        info!(
            sha = revision.sha(),
            files = revision.files.len(),
            "applying"
        );
        self.report(
            revision,
            Phase::Applying,
            "validating manifests".into(),
            Vec::new(),
            0,
            0,
        )
        .await;

        let manifests = match manifest::parse(&revision.files) {
            Ok(manifests) => manifests,
            Err(error) => {
                return self
                    .fail(
                        revision,
                        format!("invalid manifests, nothing was applied: {error}"),
                        Vec::new(),
                    )
                    .await;
            }
        };
        if let Err(error) = self.cluster.refresh_discovery().await {
            return self
                .fail(
                    revision,
                    format!("API discovery failed: {error}"),
                    Vec::new(),
                )
                .await;
        }
        let mut planned = match self.plan(manifests, &settings, &agent) {
            Ok(planned) => planned,
            Err(message) => return self.fail(revision, message, Vec::new()).await,
        };
        let total = planned.len();

        if settings.dry_run_strategy == "server" {
            for item in planned.iter().filter(|p| p.resolved.is_some()) {
                if let Err(error) = self.apply_one(item, &settings, true).await {
                    let message = format!(
                        "server dry run rejected {}: {}; nothing was applied",
                        item.key,
                        error.message()
                    );
                    return self
                        .fail(
                            revision,
                            message,
                            vec![result(item, Action::Failed, error.message())],
                        )
                        .await;
                }
            }
        }

        let inventory = InventoryStore::new(
            self.cluster.client().clone(),
            &self.namespace,
            &agent,
            FIELD_MANAGER,
        );
        let previous = match inventory.load().await {
            Ok(previous) => previous,
            Err(error) => {
                return self
                    .fail(
                        revision,
                        format!("cannot read the inventory: {}", error.message()),
                        Vec::new(),
                    )
                    .await;
            }
        };
        let desired: Vec<InventoryEntry> = planned
            .iter()
            .map(|p| InventoryEntry {
                key: p.key.clone(),
                api_version: p.manifest.api_version.clone(),
                namespaced: p.namespaced,
            })
            .collect();
        // Recorded before the first write: a crash mid-apply leaves nothing the next prune
        // would not know about.
        let mut union: Vec<InventoryEntry> = previous.entries.clone();
        union.extend(desired.iter().cloned());
        union.sort();
        union.dedup_by(|a, b| a.key == b.key);
        let pending = Inventory {
            entries: union.clone(),
            revision: previous.revision.clone(),
        };
        if let Err(error) = inventory.save(&pending).await {
            return self
                .fail(
                    revision,
                    format!("cannot write the inventory: {}", error.message()),
                    Vec::new(),
                )
                .await;
        }

        let mut results = Vec::with_capacity(total);
        let mut failed = false;
        let items = std::mem::take(&mut planned);
        for (stage, mut group) in apply_stages(items, |p| {
            Stage::of(&p.key.group, &p.key.kind, p.namespaced)
        }) {
            if stop() {
                return Outcome::Stopped;
            }
            if group.iter().any(|p| p.resolved.is_none())
                && let Err(message) = self.await_custom_kinds(&mut group).await
            {
                return self.fail(revision, message, results).await;
            }
            let pending: Vec<_> = group
                .iter()
                .map(|item| self.apply_item(item, &settings, stop))
                .collect();
            let outcomes: Vec<(ObjectKey, ObjectResult, Option<String>)> =
                futures_util::stream::iter(pending)
                    .buffer_unordered(APPLY_CONCURRENCY)
                    .collect()
                    .await;
            for (key, object, version) in outcomes {
                failed |= object.action() == Action::Failed;
                results.push(object);
                if let Some(version) = version {
                    self.versions.insert(key, version);
                }
            }
            if stop() {
                return Outcome::Stopped;
            }
            let done = results.len();
            self.report(
                revision,
                Phase::Applying,
                format!("applied {done} of {total} objects ({stage:?})"),
                Vec::new(),
                done,
                total,
            )
            .await;
            if failed {
                return self.fail_listing(revision, "apply failed", results).await;
            }
            if stage == Stage::Definitions {
                // Custom resources of the CRDs just applied need fresh discovery.
                let _ = self.cluster.refresh_discovery().await;
            }
        }

        let desired_keys: BTreeSet<ObjectKey> = desired.iter().map(|e| e.key.clone()).collect();
        let mut kept = Vec::new();
        if settings.prune {
            for entry in prune_plan(&union, &desired_keys) {
                if stop() {
                    return Outcome::Stopped;
                }
                match self.prune_one(&entry, &agent, &settings).await {
                    Ok(Some(object)) => results.push(object),
                    Ok(None) => {}
                    Err(object) => {
                        // Still ours and still there: keep remembering it.
                        kept.push(entry.clone());
                        failed = true;
                        results.push(object);
                    }
                }
            }
        } else {
            kept = union
                .iter()
                .filter(|e| !desired_keys.contains(&e.key))
                .cloned()
                .collect();
        }
        let mut entries = desired.clone();
        entries.extend(kept);
        let done_inventory = Inventory {
            entries,
            revision: Some(revision.sha().to_owned()),
        };
        if let Err(error) = inventory.save(&done_inventory).await {
            return self
                .fail(
                    revision,
                    format!("cannot write the inventory: {}", error.message()),
                    results,
                )
                .await;
        }
        if failed {
            return self.fail_listing(revision, "prune failed", results).await;
        }
        let applied = results
            .iter()
            .filter(|r| r.action() == Action::Applied)
            .count();
        let pruned = results
            .iter()
            .filter(|r| r.action() == Action::Pruned)
            .count();
        self.report(
            revision,
            Phase::Applied,
            format!("{total} objects ({applied} changed), {pruned} pruned"),
            results.clone(),
            total,
            total,
        )
        .await;

        self.await_health(revision, &desired, &settings, stop).await
    }

    fn plan(
        &self,
        manifests: Vec<Manifest>,
        settings: &ApplySettings,
        agent: &str,
    ) -> Result<Vec<Planned>, String> {
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
            let namespaced =
                m.body.pointer("/spec/scope").and_then(Value::as_str) != Some("Cluster");
            defined.insert((group.to_owned(), kind.to_owned()), namespaced);
        }
        let mut unknown = Vec::new();
        let mut planned = Vec::with_capacity(manifests.len());
        for manifest in manifests {
            let resolved = self.cluster.resolve(&manifest.api_version, &manifest.kind);
            let namespaced = match (
                &resolved,
                defined.get(&(manifest.group().to_owned(), manifest.kind.clone())),
            ) {
                (Some(r), _) => r.namespaced,
                (None, Some(namespaced)) => *namespaced,
                (None, None) => {
                    unknown.push(format!(
                        "{} ({}) in {} document {}",
                        manifest.kind,
                        manifest.api_version,
                        manifest.origin.file,
                        manifest.origin.document
                    ));
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
                body,
            });
        }
        if !unknown.is_empty() {
            return Err(format!(
                "unknown kind: {}; nothing was applied",
                unknown.join(", ")
            ));
        }
        Ok(planned)
    }

    async fn await_custom_kinds(&self, group: &mut [Planned]) -> Result<(), String> {
        for _ in 0..CRD_ESTABLISH_ATTEMPTS {
            let _ = self.cluster.refresh_discovery().await;
            for item in group.iter_mut().filter(|p| p.resolved.is_none()) {
                item.resolved = self
                    .cluster
                    .resolve(&item.manifest.api_version, &item.manifest.kind);
            }
            if group.iter().all(|p| p.resolved.is_some()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let missing: Vec<String> = group
            .iter()
            .filter(|p| p.resolved.is_none())
            .map(|p| format!("{} ({})", p.manifest.kind, p.manifest.api_version))
            .collect();
        Err(format!(
            "kinds still not served after applying their CRDs: {}",
            missing.join(", ")
        ))
    }

    /// Applies one object at a safe point: not at all once `stop` says so.
    async fn apply_item(
        &self,
        item: &Planned,
        settings: &ApplySettings,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> (ObjectKey, ObjectResult, Option<String>) {
        if stop() {
            let skipped = result(item, Action::Unchanged, "stopped before applying".into());
            return (item.key.clone(), skipped, None);
        }
        match self.apply_one(item, settings, false).await {
            Ok(version) => {
                let changed = self.versions.get(&item.key) != Some(&version);
                let action = if changed {
                    Action::Applied
                } else {
                    Action::Unchanged
                };
                (
                    item.key.clone(),
                    result(item, action, String::new()),
                    Some(version),
                )
            }
            Err(error) => (
                item.key.clone(),
                result(item, Action::Failed, error.message()),
                None,
            ),
        }
    }

    async fn apply_one(
        &self,
        item: &Planned,
        settings: &ApplySettings,
        dry_run: bool,
    ) -> Result<String, crate::cluster::ClusterError> {
        let resolved = item.resolved.as_ref().ok_or_else(|| {
            crate::cluster::ClusterError::Encode(serde::de::Error::custom(format!(
                "kind {} is not served",
                item.key.kind
            )))
        })?;
        let object = self
            .cluster
            .apply(
                resolved,
                item.key.namespace.as_deref(),
                &item.key.name,
                &item.body,
                settings.force_conflicts,
                dry_run,
            )
            .await?;
        Ok(object.metadata.resource_version.unwrap_or_default())
    }

    /// Deletes `entry` if it still carries this agent's label; `Ok(None)` when there was
    /// nothing of ours to delete.
    async fn prune_one(
        &self,
        entry: &InventoryEntry,
        agent: &str,
        settings: &ApplySettings,
    ) -> Result<Option<ObjectResult>, ObjectResult> {
        let as_result = |action: Action, message: String| ObjectResult {
            api_version: entry.api_version.clone(),
            kind: entry.key.kind.clone(),
            namespace: entry.key.namespace.clone().unwrap_or_default(),
            name: entry.key.name.clone(),
            action: action.into(),
            message,
        };
        let Some(resolved) = self.cluster.resolve(&entry.api_version, &entry.key.kind) else {
            return Ok(None);
        };
        let namespace = entry.key.namespace.as_deref();
        let current = match self
            .cluster
            .get(&resolved, namespace, &entry.key.name)
            .await
        {
            Ok(Some(current)) => current,
            Ok(None) => return Ok(None),
            Err(error) => return Err(as_result(Action::Failed, error.message())),
        };
        let ours = current
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(INVENTORY_LABEL))
            .map(String::as_str)
            == Some(agent);
        if !ours {
            info!(object = %entry.key, "not pruning: it no longer carries this agent's label");
            return Ok(None);
        }
        match self
            .cluster
            .delete(
                &resolved,
                namespace,
                &entry.key.name,
                &settings.prune_propagation_policy,
            )
            .await
        {
            Ok(_) => Ok(Some(as_result(Action::Pruned, String::new()))),
            Err(error) => Err(as_result(Action::Failed, error.message())),
        }
    }

    async fn await_health(
        &self,
        revision: &ReadyRevision,
        desired: &[InventoryEntry],
        settings: &ApplySettings,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Outcome {
        let timeout = Duration::from_secs(settings.health_timeout_seconds.max(1));
        let deadline = tokio::time::Instant::now() + timeout;
        let watched: Vec<&InventoryEntry> =
            desired.iter().filter(|e| needs_rollout(&e.key)).collect();
        loop {
            let mut unhealthy: Vec<(String, String)> = Vec::new();
            let mut failed: Vec<(String, String)> = Vec::new();
            for entry in &watched {
                let Some(resolved) = self.cluster.resolve(&entry.api_version, &entry.key.kind)
                else {
                    continue;
                };
                let state = match self
                    .cluster
                    .get(&resolved, entry.key.namespace.as_deref(), &entry.key.name)
                    .await
                {
                    Ok(Some(object)) => match serde_json::to_value(&object) {
                        Ok(value) => assess(&entry.key.group, &entry.key.kind, &value),
                        Err(error) => Health::Progressing(error.to_string()),
                    },
                    Ok(None) => Health::Progressing("does not exist".into()),
                    Err(error) => Health::Progressing(error.message()),
                };
                match state {
                    Health::Healthy => {}
                    Health::Progressing(why) => unhealthy.push((entry.key.to_string(), why)),
                    Health::Failed(why) => failed.push((entry.key.to_string(), why)),
                }
            }
            if unhealthy.is_empty() && failed.is_empty() {
                self.report(
                    revision,
                    Phase::Healthy,
                    "all objects healthy".into(),
                    Vec::new(),
                    desired.len(),
                    desired.len(),
                )
                .await;
                return Outcome::Healthy;
            }
            let timed_out = tokio::time::Instant::now() >= deadline;
            if !failed.is_empty() || timed_out {
                let mut all = failed;
                all.extend(unhealthy);
                let objects: Vec<ObjectResult> = watched
                    .iter()
                    .filter_map(|entry| {
                        let name = entry.key.to_string();
                        let (_, why) = all.iter().find(|(n, _)| *n == name)?;
                        Some(ObjectResult {
                            api_version: entry.api_version.clone(),
                            kind: entry.key.kind.clone(),
                            namespace: entry.key.namespace.clone().unwrap_or_default(),
                            name: entry.key.name.clone(),
                            action: Action::NotHealthy.into(),
                            message: why.clone(),
                        })
                    })
                    .collect();
                let list: Vec<String> = all
                    .iter()
                    .map(|(name, why)| format!("{name}: {why}"))
                    .collect();
                let message = format!(
                    "not healthy after {}s: {}",
                    timeout.as_secs(),
                    list.join("; ")
                );
                self.report(
                    revision,
                    Phase::Degraded,
                    message.clone(),
                    objects,
                    desired.len(),
                    desired.len(),
                )
                .await;
                return Outcome::Degraded(message);
            }
            if stop() {
                return Outcome::Stopped;
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }
}

fn needs_rollout(key: &ObjectKey) -> bool {
    matches!(
        (key.group.as_str(), key.kind.as_str()),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet") | ("batch", "Job")
    )
}

fn result(item: &Planned, action: Action, message: String) -> ObjectResult {
    ObjectResult {
        api_version: item.manifest.api_version.clone(),
        kind: item.key.kind.clone(),
        namespace: item.key.namespace.clone().unwrap_or_default(),
        name: item.key.name.clone(),
        action: action.into(),
        message,
    }
}

fn describe(result: &ObjectResult) -> String {
    let name = if result.namespace.is_empty() {
        result.name.clone()
    } else {
        format!("{}/{}", result.namespace, result.name)
    };
    format!("{} {name}: {}", result.kind, result.message)
}
