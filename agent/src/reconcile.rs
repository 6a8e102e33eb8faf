//! Applying one revision: parse and validate everything, resolve kinds, optionally dry-run,
//! record the inventory, apply in stages with server-side apply, prune, wait for health.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use greenlight::v1::{ApplySettings, ObjectResult, Phase, StatusReport, object_result::Action};
use kube::api::DynamicObject;
use tokio::sync::mpsc;
use tracing::{Instrument, info, warn};

use crate::assemble::ReadyRevision;
use crate::cluster::{Cluster, ClusterError, Deleted, ObjectRef, Resolved, Write, Written};
use crate::drift::{DriftWatch, WatchTarget};
use crate::health_watch::{HealthWatch, Waited};
use crate::inventory::{INVENTORY_LABEL, Inventory, InventoryStore};
use crate::manifest;
use crate::metrics::AgentMetrics;
use crate::plan::{
    self, InventoryEntry, ObjectKey, PRUNE_ALLOW, PRUNE_ANNOTATION, Scope, Stage, Terminating,
    Version, apply_stages, cascades, prune_allowed, prune_set,
};
use greenlight::backoff::jittered;
use greenlight::telemetry;

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "greenlight";
/// New objects of one kind in one namespace from which one list beats a read each.
const LIST_INSTEAD_OF_READS: usize = 8;
/// Objects applied at once within one stage.
const APPLY_CONCURRENCY: usize = 8;
/// How long custom resources may wait for their just-applied CRD to be served.
const CRD_ESTABLISH_ATTEMPTS: u32 = 20;
const CRD_ESTABLISH_POLL: Duration = Duration::from_millis(500);

/// How applying a revision ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Healthy,
    Degraded(String),
    Failed(String),
    /// A newer revision arrived (or leadership was lost); stopped at a safe point.
    Stopped,
}

/// One object ready to apply, with its kind as discovery serves it.
type Planned = plan::Planned<Resolved>;

/// Whether an object exists (`Some`), and then which agent's label it carries.
type Ownership = Option<Option<String>>;

/// What pruning one inventory entry did.
enum Pruned {
    /// Deleted or let go (with a result), or nothing of ours was there (without).
    Done(Option<ObjectResult>),
    /// Deliberately not deleted, and still remembered so that it can be later.
    Kept(ObjectResult),
    /// Its deletion was accepted (now or before), but it stays until its finalizers are
    /// removed: still remembered, so that a later revision sees it gone.
    Terminating(ObjectResult, Terminating),
    /// Could not be pruned now; still remembered.
    Failed(ObjectResult),
}

/// What applying one object did.
struct ItemOutcome {
    key: ObjectKey,
    result: ObjectResult,
    /// The resourceVersion it was left at, when it was written.
    version: Option<String>,
    /// Set when the object is being deleted: it is there now, but will not be for long.
    terminating: Option<Terminating>,
}

/// Applies revisions to one cluster for one agent.
pub struct Worker {
    cluster: Cluster,
    namespace: String,
    reports: mpsc::Sender<StatusReport>,
    /// Last resourceVersion seen per object, to tell "unchanged" from "applied" for free.
    versions: HashMap<ObjectKey, String>,
    /// Watches of the inventory: drift wakes the apply loop, and untouched objects are not
    /// written again.
    drift: DriftWatch,
    metrics: Arc<AgentMetrics>,
}

impl Worker {
    /// A worker keeping its inventory in `namespace` and sending reports to `reports`.
    pub fn new(
        cluster: Cluster,
        namespace: &str,
        reports: mpsc::Sender<StatusReport>,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        Self {
            metrics,
            drift: DriftWatch::new(cluster.client().clone(), FIELD_MANAGER),
            cluster,
            namespace: namespace.to_owned(),
            reports,
            versions: HashMap::new(),
        }
    }

    /// Resolves when an applied object was changed by someone else.
    pub async fn drifted(&self) {
        self.drift.drifted().await;
    }

    /// The watch that sees changes to `key`, once its kind is served.
    fn watch_target(&self, api_version: &str, key: &ObjectKey) -> Option<WatchTarget> {
        let resolved = self.cluster.resolve(api_version, &key.kind)?;
        Some(WatchTarget {
            group: resolved.resource.group,
            version: resolved.resource.version,
            kind: resolved.resource.kind,
            plural: resolved.resource.plural,
            namespace: if resolved.namespaced {
                key.namespace.clone()
            } else {
                None
            },
        })
    }

    /// Watches what `entries` hold, and only that.
    fn watch_inventory(&mut self, agent: &str, entries: &[InventoryEntry]) {
        let targets = entries
            .iter()
            .filter_map(|e| self.watch_target(&e.api_version, &e.key))
            .collect();
        let keys = entries.iter().map(|e| e.key.clone()).collect();
        self.drift.watch(agent, targets, &keys);
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
        let mut report = StatusReport {
            revision: revision.sha().to_owned(),
            phase: phase.into(),
            message,
            objects,
            objects_done: u32::try_from(done).unwrap_or(u32::MAX),
            objects_total: u32::try_from(total).unwrap_or(u32::MAX),
            received_at_unix_ms: 0,
            generation: revision.generation(),
            traceparent: telemetry::traceparent(&tracing::Span::current()).unwrap_or_default(),
        };
        self.metrics.reported(&report);
        greenlight::report::bound(&mut report);
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

    /// Fails the revision because the inventory could not be written.
    async fn inventory_failed(
        &self,
        revision: &ReadyRevision,
        error: &crate::cluster::ClusterError,
        results: Vec<ObjectResult>,
    ) -> Outcome {
        let message = format!("cannot write the inventory: {}", error.message());
        self.fail(revision, message, results).await
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

    /// Applies `revision`; `stop` is polled at safe points between objects. The work joins
    /// the trace of the decision that chose the revision.
    pub async fn reconcile(
        &mut self,
        revision: &ReadyRevision,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Outcome {
        let span = tracing::info_span!(
            "apply",
            sha = revision.sha(),
            generation = revision.generation(),
            trace_id = tracing::field::Empty,
        );
        telemetry::adopt(&span, Some(revision.header.traceparent.as_str()));
        self.reconcile_traced(revision, stop).instrument(span).await
    }

    async fn reconcile_traced(
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

        let impersonate = Some(settings.impersonate.as_str()).filter(|u| !u.is_empty());
        if let Err(error) = self.cluster.act_as(impersonate) {
            return self
                .fail(
                    revision,
                    format!("{error}; nothing was applied"),
                    Vec::new(),
                )
                .await;
        }
        self.drift.act_as(self.cluster.acting(), impersonate);

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
        // Only the group-versions this revision uses: a broken unrelated group is no concern.
        let discovery_failures = self
            .cluster
            .discover(
                manifests
                    .iter()
                    .map(|m| (m.api_version.as_str(), m.kind.as_str())),
            )
            .await;
        let mut planned = match plan::plan_objects(
            manifests,
            &settings,
            &agent,
            &self.namespace,
            &discovery_failures,
            |api_version, kind| self.cluster.resolve(api_version, kind),
        ) {
            Ok(planned) => planned,
            Err(message) => return self.fail(revision, message, Vec::new()).await,
        };
        let total = planned.len();

        let (inventory, previous) =
            match load_inventory(&self.cluster, &self.namespace, &agent).await {
                Ok(loaded) => loaded,
                Err(message) => return self.fail(revision, message, Vec::new()).await,
            };
        if let Some(applied) = prunes_everything(planned.len(), &settings, &previous) {
            let message = format!(
                "revision has no objects; refusing to prune {applied} objects applied before (an \
                 empty revision usually means a missing repository or paths that match no \
                 manifests); nothing was changed"
            );
            return self.fail(revision, message, Vec::new()).await;
        }
        // What prune would delete is known before the first write, so a mass deletion is
        // refused before anything changed.
        let scope = Scope::of(&settings);
        let desired_keys: BTreeSet<ObjectKey> = planned.iter().map(|p| p.key.clone()).collect();
        let force_prune = revision
            .header
            .revision
            .as_ref()
            .is_some_and(|r| r.force_prune);
        let prune = if settings.prune {
            match prune_set(
                &previous.entries,
                &desired_keys,
                &scope,
                settings.prune_limit,
                force_prune,
            ) {
                Ok(set) => Some(set),
                Err(refused) => {
                    return self.fail(revision, refused.to_string(), Vec::new()).await;
                }
            }
        } else {
            None
        };

        let mut dry_run_note = None;
        if settings.dry_run_strategy == "server" {
            match self.dry_run(&planned, &settings).await {
                Ok(note) => {
                    self.report(
                        revision,
                        Phase::Applying,
                        note.clone()
                            .unwrap_or_else(|| "server dry run passed".to_owned()),
                        Vec::new(),
                        0,
                        total,
                    )
                    .await;
                    dry_run_note = note;
                }
                Err((message, objects)) => return self.fail(revision, message, objects).await,
            }
        }

        // Objects the agent has not applied before may have been there already: those are
        // adopted, and never pruned.
        let known: HashMap<ObjectKey, bool> = previous
            .entries
            .iter()
            .map(|e| (e.key.clone(), e.adopted))
            .collect();
        let fresh: Vec<&Planned> = planned
            .iter()
            .filter(|p| p.resolved.is_some() && !known.contains_key(&p.key))
            .collect();
        let adopted = match self.preexisting(&fresh, &agent).await {
            Ok(adopted) => adopted,
            Err(message) => {
                return self
                    .fail(
                        revision,
                        format!("{message}; nothing was applied"),
                        Vec::new(),
                    )
                    .await;
            }
        };
        let mut desired: Vec<InventoryEntry> = planned
            .iter()
            .map(|p| InventoryEntry {
                key: p.key.clone(),
                api_version: p.manifest.api_version.clone(),
                namespaced: p.namespaced,
                adopted: known.get(&p.key).copied().unwrap_or(false) || adopted.contains(&p.key),
            })
            .collect();
        // Recorded before the first write: a crash mid-apply leaves nothing the next prune
        // would not know about.
        let pending = Inventory {
            entries: merge(&desired, &previous.entries),
            revision: previous.revision.clone(),
        };
        // A reconcile that changes nothing writes nothing, the inventory included: what is
        // stored is written again only when it changes.
        let mut stored = previous.clone();
        if pending != stored {
            if let Err(error) = inventory.save(&pending).await {
                return self.inventory_failed(revision, &error, Vec::new()).await;
            }
            stored = pending;
        }

        let mut results = Vec::with_capacity(total);
        let mut failed = false;
        // Applied, but being deleted: named in the outcome rather than called healthy.
        let mut doomed: Vec<String> = Vec::new();
        let mut doomed_objects: Vec<ObjectResult> = Vec::new();
        let items = std::mem::take(&mut planned);
        for (stage, mut group) in apply_stages(items, |p| {
            Stage::of(&p.key.group, &p.key.kind, p.namespaced)
        }) {
            if stop() {
                return Outcome::Stopped;
            }
            let late: BTreeSet<ObjectKey> = group
                .iter()
                .filter(|p| p.resolved.is_none())
                .map(|p| p.key.clone())
                .collect();
            if !late.is_empty() {
                match self.await_custom_kinds(&mut group, stop).await {
                    Ok(()) => {}
                    Err(None) => return Outcome::Stopped,
                    Err(Some(message)) => return self.fail(revision, message, results).await,
                }
                // Their kinds are served now, so whether they already existed can be told.
                let fresh: Vec<&Planned> = group
                    .iter()
                    .filter(|p| late.contains(&p.key) && !known.contains_key(&p.key))
                    .collect();
                match self.preexisting(&fresh, &agent).await {
                    Ok(adopted) if adopted.is_empty() => {}
                    Ok(adopted) => {
                        for entry in desired.iter_mut().filter(|e| adopted.contains(&e.key)) {
                            entry.adopted = true;
                        }
                        let pending = Inventory {
                            entries: merge(&desired, &previous.entries),
                            revision: previous.revision.clone(),
                        };
                        if let Err(error) = inventory.save(&pending).await {
                            return self.inventory_failed(revision, &error, results).await;
                        }
                        stored = pending;
                    }
                    Err(message) => return self.fail(revision, message, results).await,
                }
            }
            let stage_span =
                tracing::info_span!("apply_stage", stage = ?stage, objects = group.len());
            let pending: Vec<_> = group
                .iter()
                .map(|item| self.apply_item(item, &settings, stop))
                .collect();
            let outcomes: Vec<ItemOutcome> = futures_util::stream::iter(pending)
                .buffer_unordered(APPLY_CONCURRENCY)
                .collect()
                .instrument(stage_span.clone())
                .await;
            for outcome in outcomes {
                if outcome.result.action() == Action::Failed {
                    failed = true;
                    // One span per failed object, so a trace names what went wrong.
                    tracing::info_span!(parent: &stage_span, "object_failed", object = %outcome.key)
                        .in_scope(|| warn!(error = outcome.result.message, "apply failed"));
                }
                if let Some(terminating) = outcome.terminating {
                    doomed.push(format!("{} ({})", outcome.key, terminating.waiting_for()));
                    doomed_objects.push(outcome.result.clone());
                }
                results.push(outcome.result);
                if let Some(version) = outcome.version {
                    self.versions.insert(outcome.key, version);
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
        }

        let mut kept = Vec::new();
        let mut kept_names = Vec::new();
        let mut terminating_names = Vec::new();
        let mut let_go = 0;
        if let Some(prune) = prune {
            for entry in prune.out_of_scope {
                info!(object = %entry.key, "not pruning: outside the agent's scope");
                kept_names.push(format!("{} (outside the agent's scope)", entry.key));
                results.push(entry_result(
                    &entry,
                    Action::Unchanged,
                    "not pruned: outside the agent's scope".into(),
                ));
                kept.push(entry);
            }
            let gone = prune.candidates;
            let discovery_failures = if gone.is_empty() {
                BTreeMap::new()
            } else {
                self.cluster
                    .discover(
                        gone.iter()
                            .map(|e| (e.api_version.as_str(), e.key.kind.as_str())),
                    )
                    .await
            };
            for entry in gone {
                if stop() {
                    return Outcome::Stopped;
                }
                match self
                    .prune_one(&entry, &agent, &settings, &discovery_failures)
                    .await
                {
                    Pruned::Done(Some(object)) => {
                        let_go += usize::from(entry.adopted);
                        results.push(object);
                    }
                    Pruned::Done(None) => {}
                    Pruned::Kept(object) => {
                        kept_names.push(format!("{} (its deletion would cascade)", entry.key));
                        kept.push(entry.clone());
                        results.push(object);
                    }
                    Pruned::Terminating(object, terminating) => {
                        terminating_names.push(format!(
                            "{} ({})",
                            entry.key,
                            terminating.waiting_for()
                        ));
                        kept.push(entry.clone());
                        results.push(object);
                    }
                    Pruned::Failed(object) => {
                        // Still ours and still there: keep remembering it.
                        kept.push(entry.clone());
                        failed = true;
                        results.push(object);
                    }
                }
            }
        }
        // Without prune, what left the manifests is forgotten rather than remembered (`kept`
        // stays empty): the inventory stays as large as the revision, and turning prune on
        // later deletes only what is removed from then on.
        let mut entries = desired.clone();
        entries.extend(kept);
        let done_inventory = Inventory {
            entries,
            revision: Some(revision.sha().to_owned()),
        };
        if done_inventory != stored
            && let Err(error) = inventory.save(&done_inventory).await
        {
            return self.inventory_failed(revision, &error, results).await;
        }
        self.watch_inventory(&agent, &done_inventory.entries);
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
        let mut message = format!("{total} objects ({applied} changed), {pruned} pruned");
        let newly_adopted = desired
            .iter()
            .filter(|e| e.adopted && !known.contains_key(&e.key))
            .count();
        if newly_adopted > 0 {
            message.push_str(&format!(
                "; {newly_adopted} adopted (they existed before; never pruned)"
            ));
        }
        if let_go > 0 {
            message.push_str(&format!(
                "; {let_go} not pruned: existed before the agent adopted them"
            ));
        }
        if !kept_names.is_empty() {
            message.push_str(&format!("; kept {}", kept_names.join(", ")));
        }
        if !terminating_names.is_empty() {
            message.push_str(&format!(
                "; still terminating: {}",
                terminating_names.join(", ")
            ));
        }
        if !doomed.is_empty() {
            message.push_str(&format!("; being deleted: {}", doomed.join(", ")));
        }
        if let Some(note) = dry_run_note {
            message.push_str("; ");
            message.push_str(&note);
        }
        self.report(
            revision,
            Phase::Applied,
            message,
            results.clone(),
            total,
            total,
        )
        .await;

        if !doomed.is_empty() {
            // The API server took the apply, but the object goes once its finalizers are
            // removed: that is no healthy state. Its deletion wakes the drift watch, which
            // applies it again then.
            let message = format!(
                "being deleted, applied again once gone: {}",
                doomed.join(", ")
            );
            warn!(sha = revision.sha(), %message, "revision degraded");
            self.report(
                revision,
                Phase::Degraded,
                message.clone(),
                doomed_objects,
                total,
                total,
            )
            .await;
            return Outcome::Degraded(message);
        }
        self.await_health(revision, &desired, &settings, stop).await
    }

    /// Server-side dry run of everything that can be dry-run; on success, a note on what was
    /// skipped.
    ///
    /// Objects in a namespace this revision creates are skipped: the API server refuses
    /// them until the namespace exists, and creating it first would be a write before the
    /// dry run passed. Custom resources of CRDs in this revision cannot be dry-run either.
    async fn dry_run(
        &self,
        planned: &[Planned],
        settings: &ApplySettings,
    ) -> Result<Option<String>, (String, Vec<ObjectResult>)> {
        let created = namespaces_created(&self.cluster, planned).await;
        let in_created = |p: &Planned| {
            p.namespaced
                && p.key
                    .namespace
                    .as_ref()
                    .is_some_and(|ns| created.contains(ns))
        };
        let checks: Vec<_> = planned
            .iter()
            .filter(|p| p.resolved.is_some() && !in_created(p))
            .map(|item| async move { (item, self.apply_one(item, settings, true).await) })
            .collect();
        let rejected: Vec<(&Planned, ClusterError)> = futures_util::stream::iter(checks)
            .buffered(APPLY_CONCURRENCY)
            .filter_map(|(item, outcome)| async move { outcome.err().map(|e| (item, e)) })
            .collect()
            .await;
        if !rejected.is_empty() {
            let names: Vec<String> = rejected
                .iter()
                .map(|(item, error)| format!("{}: {}", item.key, error.message()))
                .collect();
            let objects = rejected
                .iter()
                .map(|(item, error)| result(item, Action::Failed, error.message()))
                .collect();
            return Err((
                format!(
                    "server dry run rejected {}; nothing was applied",
                    names.join(", ")
                ),
                objects,
            ));
        }
        let skipped = planned.iter().filter(|p| in_created(p)).count();
        Ok((skipped > 0).then(|| {
            let names: Vec<&str> = created.iter().map(String::as_str).collect();
            format!(
                "server dry run skipped for {skipped} objects in namespaces this revision \
                 creates ({})",
                names.join(", ")
            )
        }))
    }

    /// Which of `items` already exist without this agent's label: those are adopted.
    async fn preexisting(
        &self,
        items: &[&Planned],
        agent: &str,
    ) -> Result<BTreeSet<ObjectKey>, String> {
        // Many new objects of one kind in one namespace (a first apply) cost one list; a few
        // cost a read each, which is cheaper than listing a namespace full of others.
        let mut groups: BTreeMap<(String, Option<String>), Vec<&Planned>> = BTreeMap::new();
        for item in items {
            if let Some(resolved) = &item.resolved {
                let kind = format!(
                    "{}/{}",
                    resolved.resource.api_version, resolved.resource.plural
                );
                groups
                    .entry((kind, item.key.namespace.clone()))
                    .or_default()
                    .push(item);
            }
        }
        let reads: Vec<_> = groups
            .into_values()
            .map(|group| async move {
                let mut found: Vec<(&ObjectKey, Result<Ownership, ClusterError>)> = Vec::new();
                let first = group[0];
                let Some(resolved) = first.resolved.as_ref() else {
                    return found;
                };
                if group.len() >= LIST_INSTEAD_OF_READS {
                    match self
                        .cluster
                        .names_with_label(resolved, first.key.namespace.as_deref(), INVENTORY_LABEL)
                        .await
                    {
                        Ok(names) => {
                            for item in group {
                                found.push((&item.key, Ok(names.get(&item.key.name).cloned())));
                            }
                        }
                        Err(error) => {
                            let error = error.message();
                            for item in group {
                                found.push((&item.key, Err(ClusterError::Listing(error.clone()))));
                            }
                        }
                    }
                    return found;
                }
                for item in group {
                    let read = self
                        .cluster
                        .get(resolved, item.key.namespace.as_deref(), &item.key.name)
                        .await
                        .map(|o| o.map(|o| label(&o).map(str::to_owned)));
                    found.push((&item.key, read));
                }
                found
            })
            .collect();
        let found: Vec<_> = futures_util::stream::iter(reads)
            .buffer_unordered(APPLY_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flatten()
            .collect();
        let mut adopted = BTreeSet::new();
        let mut errors = Vec::new();
        for (key, found) in found {
            match found {
                Ok(Some(owner)) if owner.as_deref() != Some(agent) => {
                    info!(object = %key, "adopting an object that existed before");
                    adopted.insert(key.clone());
                }
                Ok(_) => {}
                Err(error) => errors.push(format!("{key}: {}", error.message())),
            }
        }
        if errors.is_empty() {
            Ok(adopted)
        } else {
            errors.sort();
            Err(format!(
                "cannot tell whether objects already exist: {}",
                errors.join(", ")
            ))
        }
    }

    /// Waits until the kinds of `group` that were not served are (their CRDs were just
    /// applied); `Err(None)` when `stop` said so first.
    async fn await_custom_kinds(
        &self,
        group: &mut [Planned],
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<(), Option<String>> {
        let mut failures = BTreeMap::new();
        for _ in 0..CRD_ESTABLISH_ATTEMPTS {
            failures = self
                .cluster
                .discover(
                    group
                        .iter()
                        .filter(|p| p.resolved.is_none())
                        .map(|p| (p.manifest.api_version.as_str(), p.manifest.kind.as_str())),
                )
                .await;
            for item in group.iter_mut().filter(|p| p.resolved.is_none()) {
                item.resolved = self
                    .cluster
                    .resolve(&item.manifest.api_version, &item.manifest.kind);
            }
            if group.iter().all(|p| p.resolved.is_some()) {
                return Ok(());
            }
            if stop() {
                return Err(None);
            }
            tokio::time::sleep(jittered(CRD_ESTABLISH_POLL)).await;
        }
        let missing: Vec<String> = group
            .iter()
            .filter(|p| p.resolved.is_none())
            .map(|p| {
                let api_version = &p.manifest.api_version;
                match failures.get(api_version) {
                    Some(why) => format!("{} ({api_version}: {why})", p.manifest.kind),
                    None => format!("{} ({api_version})", p.manifest.kind),
                }
            })
            .collect();
        Err(Some(format!(
            "kinds still not served after applying their CRDs: {}",
            missing.join(", ")
        )))
    }

    /// Applies one object at a safe point: not at all once `stop` says so.
    async fn apply_item(
        &self,
        item: &Planned,
        settings: &ApplySettings,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> ItemOutcome {
        let outcome = |result, version, terminating| ItemOutcome {
            key: item.key.clone(),
            result,
            version,
            terminating,
        };
        if stop() {
            let skipped = result(item, Action::Unchanged, "stopped before applying".into());
            return outcome(skipped, None, None);
        }
        let target = self.watch_target(&item.manifest.api_version, &item.key);
        if target
            .as_ref()
            .is_some_and(|t| self.drift.unchanged(t, &item.key, item.digest))
        {
            return outcome(result(item, Action::Unchanged, String::new()), None, None);
        }
        self.drift.applying(&item.key);
        let applied = self.apply_one(item, settings, false).await.map(|object| {
            (
                Version::of(&object.metadata, FIELD_MANAGER),
                Terminating::of(&object.metadata),
            )
        });
        self.drift.applied(
            &item.key,
            applied
                .as_ref()
                .ok()
                .map(|(version, _)| (version, item.digest)),
        );
        match applied {
            Ok((version, terminating)) => {
                let changed = self.versions.get(&item.key) != Some(&version.resource_version);
                let action = if changed {
                    Action::Applied
                } else {
                    Action::Unchanged
                };
                let message = terminating
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                outcome(
                    result(item, action, message),
                    Some(version.resource_version),
                    terminating,
                )
            }
            Err(error) => outcome(result(item, Action::Failed, error.message()), None, None),
        }
    }

    async fn apply_one(
        &self,
        item: &Planned,
        settings: &ApplySettings,
        dry_run: bool,
    ) -> Result<Box<DynamicObject>, ClusterError> {
        let resolved = item
            .resolved
            .as_ref()
            .ok_or_else(|| ClusterError::NotServed(item.key.kind.clone()))?;
        let write = Write::Apply {
            object: ObjectRef {
                resolved,
                namespace: item.key.namespace.as_deref(),
                name: &item.key.name,
            },
            body: &item.body,
            force: settings.force_conflicts,
            dry_run,
        };
        let Written::Object(object) = self.cluster.perform(write).await? else {
            return Err(ClusterError::MismatchedAnswer(item.key.to_string()));
        };
        Ok(object)
    }

    /// Deletes `entry` if it still carries this agent's label; `Ok(None)` when there was
    /// nothing of ours to delete. An adopted object is only let go: its label is removed
    /// so that it is not mistaken for the agent's own later.
    async fn prune_one(
        &self,
        entry: &InventoryEntry,
        agent: &str,
        settings: &ApplySettings,
        discovery_failures: &BTreeMap<String, String>,
    ) -> Pruned {
        let as_result = |action: Action, message: String| entry_result(entry, action, message);
        let Some(resolved) = self.cluster.resolve(&entry.api_version, &entry.key.kind) else {
            return match discovery_failures.get(&entry.api_version) {
                // It may well still exist: remember it until its kind can be resolved.
                Some(why) => Pruned::Failed(as_result(
                    Action::Failed,
                    format!("API discovery of {} failed: {why}", entry.api_version),
                )),
                // The kind is gone, and with it every object of it.
                None => Pruned::Done(None),
            };
        };
        let namespace = entry.key.namespace.as_deref();
        let object = ObjectRef {
            resolved: &resolved,
            namespace,
            name: &entry.key.name,
        };
        if entry.adopted {
            self.drift.forget(&entry.key);
            let write = Write::LetGo {
                object,
                label: INVENTORY_LABEL,
            };
            return match self.cluster.perform(write).await {
                Ok(Written::Existed(true)) => {
                    info!(object = %entry.key, "not pruning: it existed before the agent adopted it");
                    Pruned::Done(Some(as_result(
                        Action::Unchanged,
                        "not pruned: existed before the agent adopted it".into(),
                    )))
                }
                Ok(_) => Pruned::Done(None),
                Err(error) => Pruned::Failed(as_result(Action::Failed, error.message())),
            };
        }
        let current = match self
            .cluster
            .get(&resolved, namespace, &entry.key.name)
            .await
        {
            Ok(Some(current)) => current,
            Ok(None) => return Pruned::Done(None),
            Err(error) => return Pruned::Failed(as_result(Action::Failed, error.message())),
        };
        if label(&current) != Some(agent) {
            info!(object = %entry.key, "not pruning: it no longer carries this agent's label");
            return Pruned::Done(None);
        }
        if let Some(terminating) = Terminating::of(&current.metadata) {
            // Deleted already: another delete would change nothing, yet be a write on every
            // reconcile until the finalizers are gone.
            self.drift.forget(&entry.key);
            info!(object = %entry.key, %terminating, "not pruning again: its deletion is underway");
            return Pruned::Terminating(
                as_result(Action::Unchanged, terminating.to_string()),
                terminating,
            );
        }
        if cascades(&entry.key.group, &entry.key.kind)
            && !prune_allowed(current.metadata.annotations.as_ref())
        {
            info!(object = %entry.key, "not pruning: its deletion would cascade");
            return Pruned::Kept(as_result(
                Action::Unchanged,
                format!(
                    "not pruned: deleting a {} deletes what depends on it; annotate it \
                     {PRUNE_ANNOTATION}: {PRUNE_ALLOW} to allow it",
                    entry.key.kind
                ),
            ));
        }
        self.drift.forget(&entry.key);
        let write = Write::Delete {
            object,
            propagation: &settings.prune_propagation_policy,
        };
        match self.cluster.perform(write).await {
            Ok(Written::Deleted(Deleted::Terminating(terminating))) => {
                info!(object = %entry.key, %terminating, "pruned; it stays until its finalizers are removed");
                Pruned::Terminating(
                    as_result(Action::Pruned, terminating.to_string()),
                    terminating,
                )
            }
            Ok(_) => Pruned::Done(Some(as_result(Action::Pruned, String::new()))),
            Err(error) => Pruned::Failed(as_result(Action::Failed, error.message())),
        }
    }

    async fn await_health(
        &self,
        revision: &ReadyRevision,
        desired: &[InventoryEntry],
        settings: &ApplySettings,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Outcome {
        let watch = HealthWatch::new(&self.cluster, desired, settings);
        let started = std::time::Instant::now();
        let waited = watch
            .wait(stop)
            .instrument(tracing::info_span!("health_wait", objects = desired.len()))
            .await;
        self.metrics
            .health_wait
            .observe(started.elapsed().as_secs_f64());
        match waited {
            Waited::Healthy => {
                self.report(
                    revision,
                    Phase::Healthy,
                    "all objects healthy".into(),
                    Vec::new(),
                    desired.len(),
                    desired.len(),
                )
                .await;
                Outcome::Healthy
            }
            Waited::Unhealthy { message, objects } => {
                self.report(
                    revision,
                    Phase::Degraded,
                    message.clone(),
                    objects,
                    desired.len(),
                    desired.len(),
                )
                .await;
                Outcome::Degraded(message)
            }
            Waited::Stopped => Outcome::Stopped,
        }
    }
}

/// `desired`, then what `previous` remembers beyond it.
fn merge(desired: &[InventoryEntry], previous: &[InventoryEntry]) -> Vec<InventoryEntry> {
    let keys: BTreeSet<&ObjectKey> = desired.iter().map(|e| &e.key).collect();
    let mut union = desired.to_vec();
    union.extend(previous.iter().filter(|e| !keys.contains(&e.key)).cloned());
    union
}

/// The value of this agent's inventory label on `object`.
fn label(object: &DynamicObject) -> Option<&str> {
    object
        .metadata
        .labels
        .as_ref()?
        .get(INVENTORY_LABEL)
        .map(String::as_str)
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

fn entry_result(entry: &InventoryEntry, action: Action, message: String) -> ObjectResult {
    ObjectResult {
        api_version: entry.api_version.clone(),
        kind: entry.key.kind.clone(),
        namespace: entry.key.namespace.clone().unwrap_or_default(),
        name: entry.key.name.clone(),
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

/// The Namespaces of `planned` that do not exist yet: a dry run cannot place anything in
/// them, since the API server needs the namespace first.
/// The agent's inventory store and what it last recorded, or why it cannot be read.
pub(crate) async fn load_inventory(
    cluster: &Cluster,
    namespace: &str,
    agent: &str,
) -> Result<(InventoryStore, Inventory), String> {
    let store = InventoryStore::new(cluster.client().clone(), namespace, agent, FIELD_MANAGER);
    match store.load().await {
        Ok(previous) => Ok((store, previous)),
        Err(error) => Err(format!("cannot read the inventory: {}", error.message())),
    }
}

/// How many applied objects a revision of `objects` objects would prune all of: an empty
/// revision with prune on. No repository, or paths that match only empty files, look exactly
/// like "delete everything": far likelier a mistake than an intent.
pub(crate) fn prunes_everything(
    objects: usize,
    settings: &ApplySettings,
    previous: &Inventory,
) -> Option<usize> {
    (objects == 0 && settings.prune && !previous.entries.is_empty())
        .then_some(previous.entries.len())
}

pub(crate) async fn namespaces_created(cluster: &Cluster, planned: &[Planned]) -> BTreeSet<String> {
    let mut created = BTreeSet::new();
    for item in planned
        .iter()
        .filter(|p| p.key.group.is_empty() && p.key.kind == "Namespace")
    {
        let exists = match &item.resolved {
            Some(resolved) => matches!(
                cluster.get(resolved, None, &item.key.name).await,
                Ok(Some(_))
            ),
            None => false,
        };
        if !exists {
            created.insert(item.key.name.clone());
        }
    }
    created
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inventory_keeps_what_it_remembered_beyond_the_desired() {
        let entry = |name: &str, adopted: bool| InventoryEntry {
            key: ObjectKey {
                group: String::new(),
                kind: "ConfigMap".into(),
                namespace: Some("apps".into()),
                name: name.into(),
            },
            api_version: "v1".into(),
            namespaced: true,
            adopted,
        };
        let union = merge(
            &[entry("a", true), entry("b", false)],
            &[entry("a", false), entry("c", true)],
        );
        assert_eq!(
            union,
            [entry("a", true), entry("b", false), entry("c", true)]
        );
    }
}
