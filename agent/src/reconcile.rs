//! Applying one revision: parse and validate everything, resolve kinds, optionally dry-run,
//! record the inventory, apply in stages with server-side apply, prune, wait for health.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use greenlight::v1::{ApplySettings, ObjectResult, Phase, StatusReport, object_result::Action};
use kube::api::DynamicObject;
use tokio::sync::mpsc;
use tracing::{Instrument, info, warn};

use crate::assemble::ReadyRevision;
use crate::cluster::{
    Cluster, ClusterError, Deleted, LetGo, ObjectRef, Owner, Resolved, Write, Written,
};
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

/// The field manager of every write, the same for every agent.
///
/// Not one per agent (`greenlight-<agent>`), deliberately. The name is documented, and what
/// users and their tooling see in `managedFields`. And every object applied so far is owned by
/// it: applying under a new name would leave `greenlight` owning each field, so that a field
/// removed from git would never be removed, unless every object's `managedFields` were
/// rewritten to hand its fields over (as kubectl does when moving from client-side apply), a
/// write to each object with its own races against replicas still on the old name. What a
/// manager per agent would prevent, two agents applying one object, is refused instead: an
/// agent reads an object's inventory label before its first write of it in a process, and
/// again whenever its watch loses sight of it, and refuses one another agent labelled
/// (`judge`); it lets go of an object only while the label names it. Two agents creating one
/// new object at the same moment can both write it once; the one whose label was overwritten
/// then loses sight of it, reads it, and refuses it from then on.
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

/// Whether an object exists (`Some`), and then whose it is.
type Ownership = Option<Owner>;

/// An object this agent must not write: another agent's label is on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{key} belongs to agent {owner} (it carries {INVENTORY_LABEL}={owner}), and an agent \
     never writes another agent's objects: remove it from the manifests of one of the two \
     agents, or remove that label if agent {owner} no longer manages it"
)]
pub struct OwnedByAnotherAgent {
    /// The object.
    pub key: ObjectKey,
    /// The agent its label names.
    pub owner: String,
}

/// Why whose the objects of a revision are could not be settled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// Reading some of them failed, as listed.
    #[error("cannot tell whether objects already exist: {}", .0.join(", "))]
    Unreadable(Vec<String>),
    /// Another agent's label is on some.
    #[error("refusing to write what other agents manage: {}", list(.0))]
    OwnedByOthers(Vec<OwnedByAnotherAgent>),
}

/// `refusals`, one after the other.
fn list(refusals: &[OwnedByAnotherAgent]) -> String {
    let reasons: Vec<String> = refusals.iter().map(ToString::to_string).collect();
    reasons.join("; ")
}

/// What pruning one inventory entry did.
enum Pruned {
    /// Deleted (with a result), or nothing of ours was there (without).
    Done(Option<ObjectResult>),
    /// Not deleted but let go, since the agent adopted it: forgotten, its label removed.
    LetGo(ObjectResult),
    /// Deliberately not deleted, and still remembered so that it can be later.
    Kept(ObjectResult, KeptBecause),
    /// Its deletion was accepted (now or before), but it stays until its finalizers are
    /// removed: still remembered, so that a later revision sees it gone.
    Terminating(ObjectResult, Terminating),
    /// Could not be pruned now; still remembered.
    Failed(ObjectResult),
}

/// Why a prune kept an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeptBecause {
    /// Deleting it would delete what depends on it, and it is not annotated to allow that.
    Cascades,
    /// It was deleted and created again between the read and the delete.
    CreatedAgain,
}

impl KeptBecause {
    /// As the revision's message names it.
    fn says(self) -> &'static str {
        match self {
            Self::Cascades => "its deletion would cascade",
            Self::CreatedAgain => "created again while being pruned",
        }
    }
}

/// What applying one object did.
struct ItemOutcome {
    key: ObjectKey,
    result: ObjectResult,
    /// The resourceVersion it was left at, when it was written.
    version: Option<String>,
    /// Set when the object is being deleted: it is there now, but will not be for long.
    terminating: Option<Terminating>,
    /// Whether it holds what was applied: written now, or known unchanged since.
    holds: bool,
}

/// Applies revisions to one cluster for one agent.
pub struct Worker {
    cluster: Cluster,
    namespace: String,
    reports: mpsc::Sender<StatusReport>,
    /// Last resourceVersion seen per object, to tell "unchanged" from "applied" for free.
    versions: HashMap<ObjectKey, String>,
    /// Objects of the inventory read in this process and found this agent's (or nobody's):
    /// read again only once the watch loses sight of them, as another agent's label would
    /// make it.
    confirmed: HashSet<ObjectKey>,
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
            confirmed: HashSet::new(),
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
        let message = if error.is_conflict() {
            "cannot write the inventory: another replica of this agent changed it since this \
             one read it (this one lost its Lease, or the other did); it is read again at the \
             next attempt"
                .to_owned()
        } else {
            format!("cannot write the inventory: {}", error.message())
        };
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

        // Whose each object is, before the first write. One the agent has not applied before
        // may have been there already (adopted: never pruned) or be another agent's (refused).
        // One it applied is read once per process, and again once the watch lost sight of it:
        // in between, only the agent's own writes touched its label.
        let known: HashMap<ObjectKey, bool> = previous
            .entries
            .iter()
            .map(|e| (e.key.clone(), e.adopted))
            .collect();
        self.confirmed.retain(|key| !self.drift.vanished(key));
        let unconfirmed: Vec<&Planned> = planned
            .iter()
            .filter(|p| p.resolved.is_some() && !self.is_confirmed(&known, p))
            .collect();
        let adopted = match self.claim(&unconfirmed, &known, &agent).await {
            Ok(adopted) => adopted,
            Err(error) => {
                return self
                    .fail(
                        revision,
                        format!("{error}; nothing was applied"),
                        Vec::new(),
                    )
                    .await;
            }
        };
        // Confirmed once applied: an object that failed or was never reached may be labelled
        // by another agent before the next attempt.
        let mut claimed: HashSet<ObjectKey> = unconfirmed.iter().map(|p| p.key.clone()).collect();
        let mut desired: Vec<InventoryEntry> = planned
            .iter()
            .map(|p| InventoryEntry {
                key: p.key.clone(),
                api_version: p.manifest.api_version.clone(),
                namespaced: p.namespaced,
                adopted: known.get(&p.key).copied().unwrap_or(false) || adopted.contains(&p.key),
                kept: false,
            })
            .collect();
        let mut adopted_keys: BTreeSet<ObjectKey> = desired
            .iter()
            .filter(|e| e.adopted)
            .map(|e| e.key.clone())
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
                // Their kinds are served now, so whose they are can be told.
                let unconfirmed: Vec<&Planned> = group
                    .iter()
                    .filter(|p| late.contains(&p.key) && !self.is_confirmed(&known, p))
                    .collect();
                let adopted = match self.claim(&unconfirmed, &known, &agent).await {
                    Ok(adopted) => adopted,
                    Err(error) => return self.fail(revision, error.to_string(), results).await,
                };
                claimed.extend(unconfirmed.iter().map(|p| p.key.clone()));
                let mut newly_adopted = false;
                for entry in desired
                    .iter_mut()
                    .filter(|e| !e.adopted && adopted.contains(&e.key))
                {
                    entry.adopted = true;
                    adopted_keys.insert(entry.key.clone());
                    newly_adopted = true;
                }
                if newly_adopted {
                    let pending = Inventory {
                        entries: merge(&desired, &previous.entries),
                        revision: previous.revision.clone(),
                    };
                    if let Err(error) = inventory.save(&pending).await {
                        return self.inventory_failed(revision, &error, results).await;
                    }
                    stored = pending;
                }
            }
            let stage_span =
                tracing::info_span!("apply_stage", stage = ?stage, objects = group.len());
            let pending: Vec<_> = group
                .iter()
                .map(|item| {
                    let adopted = adopted_keys.contains(&item.key);
                    self.apply_item(item, adopted, &settings, stop)
                })
                .collect();
            let outcomes: Vec<ItemOutcome> = futures_util::stream::iter(pending)
                .buffer_unordered(APPLY_CONCURRENCY)
                .collect()
                .instrument(stage_span.clone())
                .await;
            for outcome in outcomes {
                if !outcome.holds {
                    self.confirmed.remove(&outcome.key);
                } else if claimed.remove(&outcome.key) {
                    self.confirmed.insert(outcome.key.clone());
                }
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
        let pruning = prune.is_some();
        let gone = match prune {
            Some(prune) => {
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
                prune.candidates
            }
            // Without prune, what left the manifests is forgotten rather than remembered: the
            // inventory stays as large as the revision, and turning prune on later deletes only
            // what is removed from then on. What the agent made keeps its label, so that it is
            // known for the agent's own should it come back. An adopted object is let go
            // first: with the label left on it, it would pass for the agent's own when it came
            // back, and be deleted once removed again with prune on. Outside the scope it is
            // not touched, but remembered, to be let go once it is back in.
            None => {
                let (outside, inside): (Vec<_>, Vec<_>) =
                    plan::prune_plan(&previous.entries, &desired_keys)
                        .into_iter()
                        .filter(|e| e.adopted)
                        .partition(|e| scope.refusal(&e.key).is_some());
                kept.extend(outside);
                inside
            }
        };
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
        let mut looked_up = PruneLookups::default();
        for entry in gone {
            if stop() {
                return Outcome::Stopped;
            }
            let pruned = if pruning {
                self.prune_one(
                    &entry,
                    &agent,
                    &settings,
                    &discovery_failures,
                    &mut looked_up,
                )
                .await
            } else {
                self.let_go_of(&entry, &agent, &discovery_failures, &mut looked_up)
                    .await
            };
            match pruned {
                Pruned::Done(Some(object)) => results.push(object),
                Pruned::Done(None) => {}
                Pruned::LetGo(object) => {
                    let_go += 1;
                    results.push(object);
                }
                Pruned::Kept(object, because) => {
                    kept_names.push(format!("{} ({})", entry.key, because.says()));
                    kept.push(counted(&entry));
                    results.push(object);
                }
                Pruned::Terminating(object, terminating) => {
                    terminating_names.push(format!(
                        "{} ({})",
                        entry.key,
                        terminating.waiting_for()
                    ));
                    kept.push(counted(&entry));
                    results.push(object);
                }
                Pruned::Failed(object) => {
                    // Still ours and still there: keep remembering it.
                    kept.push(counted(&entry));
                    failed = true;
                    results.push(object);
                }
            }
        }
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
        let remembered: HashSet<&ObjectKey> =
            done_inventory.entries.iter().map(|e| &e.key).collect();
        self.confirmed.retain(|key| remembered.contains(key));
        if failed {
            let what = if pruning {
                "prune failed"
            } else {
                "letting go of adopted objects failed"
            };
            return self.fail_listing(revision, what, results).await;
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

    /// Whether `item` is in the inventory and was found this agent's by a read in this
    /// process, since when its watch, running and in sync, has not lost sight of it. Without
    /// a watch that sees it (not started yet, failing, or not allowed to list), nothing would
    /// tell that it was deleted and made again by another agent: it is read again.
    fn is_confirmed(&self, known: &HashMap<ObjectKey, bool>, item: &Planned) -> bool {
        known.contains_key(&item.key)
            && self.confirmed.contains(&item.key)
            && self
                .watch_target(&item.manifest.api_version, &item.key)
                .is_some_and(|target| self.drift.sees(&target))
    }

    /// Reads whose each of `items` is: refuses the revision if another agent's label is on
    /// any, and returns those that are adopted (see [`judge`]). `known` is what the
    /// inventory says of the objects in it: whether adopted.
    async fn claim(
        &self,
        items: &[&Planned],
        known: &HashMap<ObjectKey, bool>,
        agent: &str,
    ) -> Result<BTreeSet<ObjectKey>, ClaimError> {
        // Many objects of one kind in one namespace (a first apply, or a restart) cost one
        // list; a few cost a read each, which is cheaper than listing a namespace full of
        // others.
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
                        .owners(resolved, first.key.namespace.as_deref())
                        .await
                    {
                        Ok(owners) => {
                            for item in group {
                                found.push((&item.key, Ok(owners.get(&item.key.name).cloned())));
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
                        .owner(resolved, item.key.namespace.as_deref(), &item.key.name)
                        .await;
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
        let mut unreadable = Vec::new();
        let mut refused = Vec::new();
        for (key, found) in found {
            let owner = match found {
                Ok(owner) => owner,
                Err(error) => {
                    unreadable.push(format!("{key}: {}", error.message()));
                    continue;
                }
            };
            match judge(key, owner.as_ref(), agent, known.get(key).copied()) {
                Ok(true) => {
                    if !known.get(key).copied().unwrap_or(false) {
                        info!(object = %key, "adopting an object that existed before");
                    }
                    adopted.insert(key.clone());
                }
                Ok(false) => {}
                Err(refusal) => refused.push(refusal),
            }
        }
        if !unreadable.is_empty() {
            unreadable.sort();
            return Err(ClaimError::Unreadable(unreadable));
        }
        if !refused.is_empty() {
            refused.sort_by(|a, b| a.key.cmp(&b.key));
            return Err(ClaimError::OwnedByOthers(refused));
        }
        Ok(adopted)
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

    /// Applies one object at a safe point: not at all once `stop` says so. An `adopted` one
    /// also gets the adopted mark, if it lacks it.
    async fn apply_item(
        &self,
        item: &Planned,
        adopted: bool,
        settings: &ApplySettings,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> ItemOutcome {
        let outcome = |result, version, terminating: Option<Terminating>, holds| ItemOutcome {
            key: item.key.clone(),
            result,
            version,
            holds: holds && terminating.is_none(),
            terminating,
        };
        if stop() {
            let skipped = result(item, Action::Unchanged, "stopped before applying".into());
            return outcome(skipped, None, None, false);
        }
        let target = self.watch_target(&item.manifest.api_version, &item.key);
        if target
            .as_ref()
            .is_some_and(|t| self.drift.unchanged(t, &item.key, item.digest))
        {
            let unchanged = result(item, Action::Unchanged, String::new());
            return outcome(unchanged, None, None, true);
        }
        self.drift.applying(&item.key);
        let applied = match self.apply_one(item, settings, false).await {
            Ok(object) if adopted && !Owner::of(&object.metadata).adopted => {
                self.mark_adopted(item).await
            }
            applied => applied,
        }
        .map(|object| {
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
                    true,
                )
            }
            Err(error) => outcome(
                result(item, Action::Failed, error.message()),
                None,
                None,
                false,
            ),
        }
    }

    /// Marks an adopted object as such on the object itself, once applied: the mark is not
    /// part of the applied body, so that a preview's dry run, which knows nothing of
    /// adoption, does not see the agent's applies remove it. Written as an update of its own,
    /// an apply never removes it either.
    async fn mark_adopted(&self, item: &Planned) -> Result<Box<DynamicObject>, ClusterError> {
        let resolved = item
            .resolved
            .as_ref()
            .ok_or_else(|| ClusterError::NotServed(item.key.kind.clone()))?;
        let write = Write::MarkAdopted {
            object: ObjectRef {
                resolved,
                namespace: item.key.namespace.as_deref(),
                name: &item.key.name,
            },
        };
        let Written::Object(object) = self.cluster.perform(write).await? else {
            return Err(ClusterError::MismatchedAnswer(item.key.to_string()));
        };
        Ok(object)
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

    /// How to address the object of inventory `entry`: through the version it was applied
    /// with, or, when the cluster no longer serves that version, through one it serves the
    /// kind in now. `Err` holds what pruning it comes to when it cannot be addressed.
    async fn resolve_entry(
        &self,
        entry: &InventoryEntry,
        discovery_failures: &BTreeMap<String, String>,
        looked_up: &mut PruneLookups,
    ) -> Result<Resolved, Pruned> {
        if let Some(resolved) = self.cluster.resolve(&entry.api_version, &entry.key.kind) {
            return Ok(resolved);
        }
        if discovery_failures.contains_key(&entry.api_version) || entry.key.group.is_empty() {
            return Err(unresolved(entry, discovery_failures));
        }
        match looked_up
            .served_version(&self.cluster, &entry.key.group, &entry.key.kind)
            .await
        {
            Ok(Some(resolved)) => {
                info!(
                    object = %entry.key,
                    served = %resolved.resource.api_version,
                    "its apiVersion is no longer served; addressing it through one that is"
                );
                Ok(resolved)
            }
            Ok(None) => Err(unresolved(entry, discovery_failures)),
            Err(error) => Err(Pruned::Failed(entry_result(
                entry,
                Action::Failed,
                format!(
                    "{} is no longer served, and API discovery of group {} failed: {error}",
                    entry.api_version, entry.key.group,
                ),
            ))),
        }
    }

    /// Deletes `entry` if it still carries this agent's label; `Pruned::Done(None)` when
    /// there was nothing of ours to delete. An adopted object, as the inventory or the object
    /// itself says, is only let go.
    async fn prune_one(
        &self,
        entry: &InventoryEntry,
        agent: &str,
        settings: &ApplySettings,
        discovery_failures: &BTreeMap<String, String>,
        looked_up: &mut PruneLookups,
    ) -> Pruned {
        let as_result = |action: Action, message: String| entry_result(entry, action, message);
        let namespace = entry.key.namespace.as_deref();
        let mut resolved = match self
            .resolve_entry(entry, discovery_failures, looked_up)
            .await
        {
            Ok(resolved) => resolved,
            Err(pruned) => return pruned,
        };
        if entry.adopted {
            let object = ObjectRef {
                resolved: &resolved,
                namespace,
                name: &entry.key.name,
            };
            return self.let_go(entry, object, agent).await;
        }
        let mut read = self
            .cluster
            .get(&resolved, namespace, &entry.key.name)
            .await;
        // A version the cluster stopped serving answers 404 (a bare "page not found"), while
        // discovery read before may still list it: look again before taking the object as
        // gone or the read as failed. Once per group-version and prune: someone deleting
        // many objects of one kind by hand costs one discovery read, not one each.
        let missing = match &read {
            Ok(found) => found.is_none(),
            Err(error) => error.is_not_found(),
        };
        if missing && !entry.key.group.is_empty() {
            let failures = looked_up
                .failures(&self.cluster, &entry.api_version, &entry.key.kind)
                .await;
            match self.resolve_entry(entry, &failures, looked_up).await {
                Ok(now) if now.resource.api_version != resolved.resource.api_version => {
                    resolved = now;
                    read = self
                        .cluster
                        .get(&resolved, namespace, &entry.key.name)
                        .await;
                }
                Ok(_) => {}
                Err(pruned) => return pruned,
            }
        }
        let current = match read {
            Ok(Some(current)) => current,
            Ok(None) => return Pruned::Done(None),
            Err(error) => return Pruned::Failed(as_result(Action::Failed, error.message())),
        };
        let object = ObjectRef {
            resolved: &resolved,
            namespace,
            name: &entry.key.name,
        };
        let owner = Owner::of(&current.metadata);
        if owner.agent.as_deref() != Some(agent) {
            info!(object = %entry.key, "not pruning: it no longer carries this agent's label");
            return Pruned::Done(None);
        }
        if owner.adopted {
            // The inventory lost the mark (it was rebuilt, or the entry forgotten and added
            // again), the object kept it.
            return self.let_go(entry, object, agent).await;
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
            return Pruned::Kept(
                as_result(
                    Action::Unchanged,
                    format!(
                        "not pruned: deleting a {} deletes what depends on it; annotate it \
                         {PRUNE_ANNOTATION}: {PRUNE_ALLOW} to allow it",
                        entry.key.kind
                    ),
                ),
                KeptBecause::Cascades,
            );
        }
        let Some(uid) = current.metadata.uid.as_deref() else {
            return Pruned::Failed(as_result(
                Action::Failed,
                "not pruned: the API server answered it without a UID".to_owned(),
            ));
        };
        self.drift.forget(&entry.key);
        let write = Write::Delete {
            object,
            propagation: &settings.prune_propagation_policy,
            uid,
        };
        match self.cluster.perform(write).await {
            Ok(Written::Deleted(Deleted::Replaced)) => {
                info!(object = %entry.key, "not pruned: it was created again while being pruned");
                Pruned::Kept(
                    as_result(
                        Action::Unchanged,
                        "not pruned: it was deleted and created again while being pruned; it \
                         is looked at again next time"
                            .to_owned(),
                    ),
                    KeptBecause::CreatedAgain,
                )
            }
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

    /// Lets go of adopted `entry` without pruning (prune is off).
    async fn let_go_of(
        &self,
        entry: &InventoryEntry,
        agent: &str,
        discovery_failures: &BTreeMap<String, String>,
        looked_up: &mut PruneLookups,
    ) -> Pruned {
        let resolved = match self
            .resolve_entry(entry, discovery_failures, looked_up)
            .await
        {
            Ok(resolved) => resolved,
            Err(pruned) => return pruned,
        };
        let object = ObjectRef {
            resolved: &resolved,
            namespace: entry.key.namespace.as_deref(),
            name: &entry.key.name,
        };
        self.let_go(entry, object, agent).await
    }

    /// Removes this agent's label and adopted mark from `object`, if the label is still this
    /// agent's: another agent's object is not this agent's to let go of.
    async fn let_go(&self, entry: &InventoryEntry, object: ObjectRef<'_>, agent: &str) -> Pruned {
        self.drift.forget(&entry.key);
        match self.cluster.perform(Write::LetGo { object, agent }).await {
            Ok(Written::LetGo(LetGo::Released)) => {
                info!(object = %entry.key, "not pruning: it existed before the agent adopted it");
                Pruned::LetGo(entry_result(
                    entry,
                    Action::Unchanged,
                    "not pruned: existed before the agent adopted it".into(),
                ))
            }
            Ok(Written::LetGo(LetGo::Absent)) => Pruned::Done(None),
            Ok(Written::LetGo(LetGo::NotOurs(owner))) => {
                info!(object = %entry.key, ?owner, "not letting go: it no longer carries this agent's label");
                Pruned::Done(None)
            }
            Ok(_) => Pruned::Failed(entry_result(
                entry,
                Action::Failed,
                ClusterError::MismatchedAnswer(entry.key.to_string()).to_string(),
            )),
            Err(error) => Pruned::Failed(entry_result(entry, Action::Failed, error.message())),
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

/// Whether this agent may apply an object that `owner` describes (`None`: it does not
/// exist), and if so whether it is adopted; `known` is what the inventory says of it
/// (`None`: not in it, so never applied, or forgotten since). An object another agent's
/// label names is refused. One without this agent's label is adopted, even when the
/// inventory lists it as the agent's: the inventory is written before the objects, so an
/// entry may be of an apply that failed or never ran, and someone else may have created the
/// object since. With this agent's label and the adopted mark, it was adopted before and
/// stays so, whatever the inventory lost.
fn judge(
    key: &ObjectKey,
    owner: Option<&Owner>,
    agent: &str,
    known: Option<bool>,
) -> Result<bool, OwnedByAnotherAgent> {
    let recorded = known.unwrap_or(false);
    let Some(owner) = owner else {
        return Ok(recorded);
    };
    match owner.agent.as_deref() {
        Some(other) if other != agent => Err(OwnedByAnotherAgent {
            key: key.clone(),
            owner: other.to_owned(),
        }),
        None => Ok(true),
        Some(_) => Ok(recorded || owner.adopted),
    }
}

/// `desired`, then what `previous` remembers beyond it.
fn merge(desired: &[InventoryEntry], previous: &[InventoryEntry]) -> Vec<InventoryEntry> {
    let keys: BTreeSet<&ObjectKey> = desired.iter().map(|e| &e.key).collect();
    let mut union = desired.to_vec();
    union.extend(previous.iter().filter(|e| !keys.contains(&e.key)).cloned());
    union
}

/// `entry`, kept after its prune was refused, failed or waits for finalizers: its deletion
/// was counted against the prune limit this once.
fn counted(entry: &InventoryEntry) -> InventoryEntry {
    InventoryEntry {
        kept: true,
        ..entry.clone()
    }
}

/// What pruning (or letting go of) `entry` did when its kind cannot be resolved in any
/// version.
fn unresolved(entry: &InventoryEntry, discovery_failures: &BTreeMap<String, String>) -> Pruned {
    match discovery_failures.get(&entry.api_version) {
        // It may well still exist: remember it until its kind can be resolved.
        Some(why) => Pruned::Failed(entry_result(
            entry,
            Action::Failed,
            format!("API discovery of {} failed: {why}", entry.api_version),
        )),
        // The kind is gone, and with it every object of it.
        None => Pruned::Done(None),
    }
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

/// What one prune learned of the cluster's APIs: many inventory entries of one kind cost
/// one discovery read each way, not one each.
#[derive(Default)]
struct PruneLookups {
    /// Group-versions whose discovery was read again, with what failed of it.
    rediscovered: HashMap<String, BTreeMap<String, String>>,
    /// Kinds of a group found in a version the cluster serves now, or why the group's
    /// discovery failed.
    served: HashMap<(String, String), Result<Option<Resolved>, String>>,
}

impl PruneLookups {
    /// Discovery of `api_version` read again, at most once per prune.
    async fn failures(
        &mut self,
        cluster: &Cluster,
        api_version: &str,
        kind: &str,
    ) -> BTreeMap<String, String> {
        if let Some(failures) = self.rediscovered.get(api_version) {
            return failures.clone();
        }
        let failures = cluster.rediscover(api_version, kind).await;
        self.rediscovered
            .insert(api_version.to_owned(), failures.clone());
        failures
    }

    /// [`Cluster::resolve_in_served_version`], at most once per group, kind and prune.
    async fn served_version(
        &mut self,
        cluster: &Cluster,
        group: &str,
        kind: &str,
    ) -> Result<Option<Resolved>, String> {
        let key = (group.to_owned(), kind.to_owned());
        if let Some(found) = self.served.get(&key) {
            return found.clone();
        }
        let found = cluster
            .resolve_in_served_version(group, kind)
            .await
            .map_err(|error| error.message());
        self.served.insert(key, found.clone());
        found
    }
}

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

/// The Namespaces of `planned` that do not exist yet: a dry run cannot place anything in
/// them, since the API server needs the namespace first.
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
    use std::sync::Mutex;

    use crate::inventory::{ADOPTED, ADOPTED_ANNOTATION};
    use crate::testing::{resources, serve, status};
    use serde_json::{Value, json};

    const INVENTORIES: &str = "/api/v1/namespaces/greenlight/configmaps";
    const INVENTORY: &str = "/api/v1/namespaces/greenlight/configmaps/greenlight-inventory-prod";
    const OBJECTS: &str = "/api/v1/namespaces/apps/configmaps/";

    fn configmap_key(name: &str) -> ObjectKey {
        ObjectKey {
            group: String::new(),
            kind: "ConfigMap".into(),
            namespace: Some("apps".into()),
            name: name.into(),
        }
    }

    fn inventory_entry(name: &str, adopted: bool) -> InventoryEntry {
        InventoryEntry {
            key: configmap_key(name),
            api_version: "v1".into(),
            namespaced: true,
            adopted,
            kept: false,
        }
    }

    /// Agent `prod`'s inventory ConfigMap holding `entries`, as the API server answers it.
    fn stored_inventory(entries: &[InventoryEntry]) -> String {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "greenlight-inventory-prod", "namespace": "greenlight",
                "resourceVersion": "3"},
            "data": {"objects": crate::inventory::record::encode(entries).unwrap(),
                "revision": "previous"}})
        .to_string()
    }

    /// ConfigMap `name` of namespace `apps` with `metadata` beyond its name.
    fn live(name: &str, metadata: Value) -> Value {
        let mut object = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "apps", "resourceVersion": "7"}});
        if let (Some(meta), Some(extra)) =
            (object["metadata"].as_object_mut(), metadata.as_object())
        {
            meta.extend(extra.clone());
        }
        object
    }

    /// A worker of agent `prod` on a stand-in API server holding the inventory `entries` (none
    /// without) and the ConfigMaps `objects` of namespace `apps`. It takes every write and
    /// answers it with the object as it was (or, new, with the agent's label). Returns the
    /// worker, the log of its requests, and its reports.
    async fn worker_on(
        entries: Option<Vec<InventoryEntry>>,
        objects: Vec<Value>,
    ) -> (
        Worker,
        Arc<Mutex<Vec<String>>>,
        mpsc::Receiver<StatusReport>,
    ) {
        let inventory = entries.map(|entries| {
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "greenlight-inventory-prod", "namespace": "greenlight"},
                "data": {"entries": serde_json::to_string(&entries).unwrap_or_default(),
                    "revision": "previous"}})
            .to_string()
        });
        let objects: HashMap<String, String> = objects
            .into_iter()
            .map(|o| {
                (
                    o["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    o.to_string(),
                )
            })
            .collect();
        let (kube, log) = serve(move |method, path| {
            if path == "/api/v1" {
                return Some((200, resources("v1", &[("configmaps", "ConfigMap", true)])));
            }
            if path == INVENTORIES && method == "POST" {
                return Some((
                    200,
                    live("greenlight-inventory-prod", json!({})).to_string(),
                ));
            }
            if path == INVENTORY {
                return Some(match (method, &inventory) {
                    ("GET", None) => (404, status(404, "not found")),
                    (_, Some(stored)) => (200, stored.clone()),
                    (_, None) => (
                        200,
                        live("greenlight-inventory-prod", json!({})).to_string(),
                    ),
                });
            }
            let Some(name) = path.strip_prefix(OBJECTS) else {
                return Some((404, status(404, "not found")));
            };
            Some(match (method, objects.get(name)) {
                ("GET", None) => (404, status(404, "not found")),
                ("DELETE", _) => (
                    200,
                    json!({"kind": "Status", "apiVersion": "v1",
                    "metadata": {}, "status": "Success"})
                    .to_string(),
                ),
                (_, Some(object)) => (200, object.clone()),
                (_, None) => (
                    200,
                    live(name, json!({"labels": {INVENTORY_LABEL: "prod"}})).to_string(),
                ),
            })
        })
        .await;
        let (worker, received) = crate::testing::worker_for(kube);
        (worker, log, received)
    }

    /// A revision of agent `prod` of a ConfigMap in `apps` for each of `names`.
    fn revision_of(names: &[&str], prune: bool) -> ReadyRevision {
        let mut revision = crate::session::tests::revision("abc", 1, "");
        revision.files = names
            .iter()
            .map(|name| {
                let yaml = format!(
                    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata: {{value: one}}\n"
                );
                (format!("{name}.yaml"), yaml.into_bytes())
            })
            .collect();
        revision.header.file_count = u32::try_from(names.len()).unwrap_or(u32::MAX);
        revision.header.settings = Some(ApplySettings {
            default_namespace: "apps".into(),
            prune,
            prune_propagation_policy: "background".into(),
            force_conflicts: true,
            ..ApplySettings::default()
        });
        revision
    }

    fn requests(log: &Mutex<Vec<String>>, method: &str, name: &str) -> usize {
        let line = format!("{method} {OBJECTS}{name}");
        log.lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|l| **l == line)
            .count()
    }

    async fn reconcile(worker: &mut Worker, revision: &ReadyRevision) -> Outcome {
        worker.reconcile(revision, &|| false).await
    }

    /// An object deleted and created again between the prune's read and its delete is kept,
    /// and the revision's message says so (not that its deletion would cascade).
    #[tokio::test]
    async fn an_object_created_again_while_being_pruned_is_kept_and_named_so() {
        let inventory =
            stored_inventory(&[inventory_entry("keep", false), inventory_entry("x", false)]);
        let (kube, log) = serve(move |method, path| {
            if path == "/api/v1" {
                return Some((200, resources("v1", &[("configmaps", "ConfigMap", true)])));
            }
            if path == INVENTORY {
                return Some((200, inventory.clone()));
            }
            let name = path.strip_prefix(OBJECTS)?;
            Some(match method {
                // The UID the delete carries no longer matches: a new object by that name.
                "DELETE" => (409, status(409, "Precondition failed: UID in precondition")),
                _ => (
                    200,
                    live(
                        name,
                        json!({"labels": {INVENTORY_LABEL: "prod"}, "uid": "u-1"}),
                    )
                    .to_string(),
                ),
            })
        })
        .await;
        let (mut worker, mut reports) = crate::testing::worker_for(kube);
        let outcome = reconcile(&mut worker, &revision_of(&["keep"], true)).await;
        assert_eq!(outcome, Outcome::Healthy);
        assert_eq!(requests(&log, "DELETE", "x"), 1);
        let message = last_message(&mut reports, Phase::Applied);
        assert!(
            message.contains("ConfigMap apps/x (created again while being pruned)"),
            "{message}"
        );
        assert!(!message.contains("cascade"), "{message}");
    }

    /// The message of the last report of `phase` among those sent so far; empty if none.
    fn last_message(
        reports: &mut tokio::sync::mpsc::Receiver<StatusReport>,
        phase: Phase,
    ) -> String {
        let mut last = String::new();
        while let Ok(report) = reports.try_recv() {
            if report.phase() == phase {
                last = report.message;
            }
        }
        last
    }

    /// Reconciles a revision of ConfigMap `keep` over an inventory of `inventory`, against
    /// an API server that answers `route` (method, path) first, and the revision's ConfigMap
    /// and the inventory besides: the outcome, the requests made, and the message of the
    /// failure reported, if any.
    async fn reconcile_keep(
        inventory: &[InventoryEntry],
        route: impl Fn(&str, &str) -> Option<(u16, String)> + Send + Sync + 'static,
    ) -> (Outcome, Vec<String>, String) {
        let inventory = stored_inventory(inventory);
        let (kube, log) = serve(move |method, path| {
            Some(match (path, route(method, path)) {
                (_, Some(answer)) => answer,
                ("/api/v1", None) => (200, resources("v1", &[("configmaps", "ConfigMap", true)])),
                (INVENTORY, None) => (200, inventory.clone()),
                (_, None) => (
                    200,
                    live("keep", json!({"labels": {INVENTORY_LABEL: "prod"}})).to_string(),
                ),
            })
        })
        .await;
        let (mut worker, mut reports) = crate::testing::worker_for(kube);
        let outcome = reconcile(&mut worker, &revision_of(&["keep"], true)).await;
        let failed = last_message(&mut reports, Phase::Failed);
        let log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (outcome, log, failed)
    }

    /// The requests [`reconcile_keep`] makes, which must end healthy.
    async fn requests_of_prune(
        inventory: &[InventoryEntry],
        route: impl Fn(&str) -> Option<(u16, String)> + Send + Sync + 'static,
    ) -> Vec<String> {
        let (outcome, log, _) = reconcile_keep(inventory, move |_, path| route(path)).await;
        assert_eq!(outcome, Outcome::Healthy);
        log
    }

    /// Objects recorded under a version of their group the cluster no longer serves cost
    /// one read of the group's discovery for the prune, not one each.
    #[tokio::test]
    async fn gadgets_of_a_version_no_longer_served_cost_one_group_discovery_not_one_each() {
        let gadgets: Vec<InventoryEntry> =
            ["a", "b", "c"].into_iter().map(gadget_of_v1beta1).collect();
        let log = requests_of_prune(&gadgets, |path| match path {
            "/apis" => Some((
                200,
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
                    "name": "example.com",
                    "versions": [{"groupVersion": "example.com/v1", "version": "v1"}],
                    "preferredVersion": {"groupVersion": "example.com/v1", "version": "v1"}
                }]})
                .to_string(),
            )),
            "/apis/example.com/v1" => Some((
                200,
                resources("example.com/v1", &[("gadgets", "Gadget", true)]),
            )),
            // v1beta1 is no longer served, and the gadgets were deleted by hand.
            _ if path.starts_with("/apis/example.com/") => Some((404, status(404, "not found"))),
            _ => None,
        })
        .await;
        let reads = |line: &str| log.iter().filter(|l| *l == line).count();
        assert_eq!(reads("GET /apis"), 1, "{log:?}");
        for name in ["a", "b", "c"] {
            let path = format!("GET /apis/example.com/v1/namespaces/apps/gadgets/{name}");
            assert_eq!(
                reads(&path),
                1,
                "each read through the version served: {log:?}"
            );
        }
    }

    /// The inventory entry of Gadget `name` of namespace `apps`, applied as
    /// `example.com/v1beta1`.
    fn gadget_of_v1beta1(name: &str) -> InventoryEntry {
        crate::testing::namespaced_entry("example.com/v1beta1", "Gadget", name)
    }

    /// An inventory another replica of the agent wrote since this one read it is not
    /// overwritten, and the revision's failure says why.
    #[tokio::test]
    async fn an_inventory_written_by_another_replica_meanwhile_fails_the_revision_saying_so() {
        let (outcome, _, message) =
            reconcile_keep(&[inventory_entry("keep", false)], |method, path| {
                // The apply carries the resourceVersion read, no longer the stored one.
                (method != "GET" && path == INVENTORY)
                    .then(|| (409, status(409, "the object has been modified")))
            })
            .await;
        assert!(matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
        assert!(
            message.contains("another replica of this agent changed it since this one read it"),
            "{message}"
        );
    }

    /// An object recorded under a version its group no longer serves, whose group's
    /// discovery then fails, is kept and named, with the failure.
    #[tokio::test]
    async fn a_failed_group_discovery_at_prune_is_named_with_the_object() {
        let (outcome, _, message) =
            reconcile_keep(&[gadget_of_v1beta1("g")], |_, path| match path {
                "/apis/example.com/v1beta1" => Some((404, status(404, "not found"))),
                "/apis" => Some((503, status(503, "the aggregated API is unavailable"))),
                _ => None,
            })
            .await;
        assert!(matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
        assert!(
            message.contains(
                "example.com/v1beta1 is no longer served, and API discovery of group \
                 example.com failed"
            ),
            "{message}"
        );
        assert!(message.contains("Gadget apps/g"), "{message}");
    }

    /// Objects of one group-version that someone else deleted cost one discovery read again
    /// for the prune, not one each.
    #[tokio::test]
    async fn deployments_deleted_by_hand_cost_one_discovery_read_again_not_one_each() {
        let deployments: Vec<InventoryEntry> = ["a", "b", "c"]
            .into_iter()
            .map(crate::testing::deployment_entry)
            .collect();
        let log = requests_of_prune(&deployments, |path| match path {
            "/apis/apps/v1" => Some((
                200,
                resources("apps/v1", &[("deployments", "Deployment", true)]),
            )),
            // Deleted by someone else; the revision's ConfigMap is taken as written.
            _ if path.starts_with("/apis/apps/v1/") => Some((404, status(404, "not found"))),
            _ => None,
        })
        .await;
        let reads = |line: &str| log.iter().filter(|l| *l == line).count();
        assert_eq!(
            reads("GET /apis/apps/v1"),
            2,
            "the discovery before the prune and one again: {log:?}"
        );
        for name in ["a", "b", "c"] {
            let path = format!("GET /apis/apps/v1/namespaces/apps/deployments/{name}");
            assert_eq!(reads(&path), 1, "{log:?}");
        }
    }

    #[tokio::test]
    async fn an_object_marked_adopted_is_let_go_though_the_inventory_forgot_it() {
        // Adopted, forgotten (prune was off) and added again: the inventory no longer knows,
        // the object does.
        let (mut worker, log, _reports) = worker_on(
            Some(vec![
                inventory_entry("keep", false),
                inventory_entry("x", false),
            ]),
            vec![
                live("keep", json!({"labels": {INVENTORY_LABEL: "prod"}})),
                live(
                    "x",
                    json!({"labels": {INVENTORY_LABEL: "prod"},
                        "annotations": {ADOPTED_ANNOTATION: ADOPTED}}),
                ),
            ],
        )
        .await;
        let outcome = reconcile(&mut worker, &revision_of(&["keep"], true)).await;
        assert_eq!(outcome, Outcome::Healthy);
        assert_eq!(requests(&log, "DELETE", "x"), 0, "never deleted");
        assert_eq!(requests(&log, "PATCH", "x"), 1, "let go");
    }

    #[tokio::test]
    async fn a_new_object_with_the_agents_label_and_the_adopted_mark_stays_adopted() {
        // The inventory was deleted: every object is new to it, and carries the agent's label.
        let (mut worker, log, mut reports) = worker_on(
            None,
            vec![
                live("made", json!({"labels": {INVENTORY_LABEL: "prod"}})),
                live(
                    "found",
                    json!({"labels": {INVENTORY_LABEL: "prod"},
                        "annotations": {ADOPTED_ANNOTATION: ADOPTED}}),
                ),
            ],
        )
        .await;
        let outcome = reconcile(&mut worker, &revision_of(&["made", "found"], true)).await;
        assert_eq!(outcome, Outcome::Healthy);
        assert_eq!(
            requests(&log, "GET", "found"),
            1,
            "read before the first write"
        );
        let applied = last_message(&mut reports, Phase::Applied);
        assert!(
            applied.contains("; 1 adopted (they existed before; never pruned)"),
            "only `found`: {applied}"
        );
    }

    #[tokio::test]
    async fn an_adopted_object_gets_the_adopted_mark_once_applied() {
        let (mut worker, log, _reports) =
            worker_on(None, vec![live("found", json!({"labels": {"team": "a"}}))]).await;
        let outcome = reconcile(&mut worker, &revision_of(&["found"], true)).await;
        assert_eq!(outcome, Outcome::Healthy);
        assert_eq!(requests(&log, "PATCH", "found"), 2, "applied, then marked");
    }

    #[tokio::test]
    async fn without_prune_an_adopted_object_leaving_the_manifests_is_let_go() {
        let (mut worker, log, _reports) = worker_on(
            Some(vec![
                inventory_entry("keep", false),
                inventory_entry("found", true),
                inventory_entry("made", false),
            ]),
            vec![
                live("keep", json!({"labels": {INVENTORY_LABEL: "prod"}})),
                live("found", json!({"labels": {INVENTORY_LABEL: "prod"}})),
                live("made", json!({"labels": {INVENTORY_LABEL: "prod"}})),
            ],
        )
        .await;
        let outcome = reconcile(&mut worker, &revision_of(&["keep"], false)).await;
        assert_eq!(outcome, Outcome::Healthy);
        assert_eq!(requests(&log, "PATCH", "found"), 1, "its label removed");
        assert_eq!(
            requests(&log, "PATCH", "made"),
            0,
            "the agent's own keeps it"
        );
        assert_eq!(
            requests(&log, "DELETE", "found") + requests(&log, "DELETE", "made"),
            0
        );
    }

    #[tokio::test]
    async fn another_agents_object_is_refused_before_any_write() {
        let (mut worker, log, _reports) = worker_on(
            None,
            vec![
                live("mine", json!({})),
                live("theirs", json!({"labels": {INVENTORY_LABEL: "staging"}})),
            ],
        )
        .await;
        let Outcome::Failed(message) =
            reconcile(&mut worker, &revision_of(&["mine", "theirs"], true)).await
        else {
            panic!("refused");
        };
        assert!(
            message.contains("ConfigMap apps/theirs belongs to agent staging")
                && message.ends_with("nothing was applied"),
            "{message}"
        );
        let writes: Vec<String> = log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|l| !l.starts_with("GET"))
            .cloned()
            .collect();
        assert_eq!(writes, Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_known_object_another_agent_labelled_is_refused_after_a_restart() {
        // Both agents applied it before they refused each other's objects.
        let (mut worker, log, _reports) = worker_on(
            Some(vec![inventory_entry("shared", false)]),
            vec![live(
                "shared",
                json!({"labels": {INVENTORY_LABEL: "staging"}}),
            )],
        )
        .await;
        let outcome = reconcile(&mut worker, &revision_of(&["shared"], true)).await;
        assert!(
            matches!(&outcome, Outcome::Failed(m) if m.contains("belongs to agent staging")),
            "{outcome:?}"
        );
        assert_eq!(requests(&log, "PATCH", "shared"), 0);
    }

    /// An object whose apply failed is not confirmed as the agent's: another agent may
    /// label it before the next attempt, which must read it again and refuse it.
    #[tokio::test]
    async fn an_object_whose_apply_failed_is_read_again_before_the_next_attempt() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let patches = Arc::new(AtomicUsize::new(0));
        let patched = patches.clone();
        // The inventory lists it, as it is saved before the first write.
        let inventory = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "greenlight-inventory-prod", "namespace": "greenlight"},
            "data": {"entries": serde_json::to_string(&[inventory_entry("x", false)])
                .unwrap_or_default(), "revision": "previous"}})
        .to_string();
        let (kube, log) = serve(move |method, path| {
            if path == "/api/v1" {
                return Some((200, resources("v1", &[("configmaps", "ConfigMap", true)])));
            }
            if path == INVENTORY {
                return Some((200, inventory.clone()));
            }
            let name = path.strip_prefix(OBJECTS)?;
            Some(match method {
                // Not there until the failed apply; then agent staging made it.
                "GET" if patched.load(Ordering::SeqCst) == 0 => (404, status(404, "not found")),
                "GET" => (
                    200,
                    live(name, json!({"labels": {INVENTORY_LABEL: "staging"}})).to_string(),
                ),
                "PATCH" => {
                    patched.fetch_add(1, Ordering::SeqCst);
                    (500, status(500, "admission webhook unreachable"))
                }
                _ => (404, status(404, "not found")),
            })
        })
        .await;
        let (mut worker, _received) = crate::testing::worker_for(kube);
        let revision = revision_of(&["x"], true);
        assert!(matches!(
            reconcile(&mut worker, &revision).await,
            Outcome::Failed(_)
        ));
        let writes = patches.load(Ordering::SeqCst);
        assert!(writes >= 1, "the apply was tried");
        let Outcome::Failed(message) = reconcile(&mut worker, &revision).await else {
            panic!("refused");
        };
        assert!(message.contains("belongs to agent staging"), "{message}");
        assert_eq!(requests(&log, "GET", "x"), 2, "read again");
        assert_eq!(patches.load(Ordering::SeqCst), writes, "not written again");
    }

    /// Whose an object is stays confirmed only while a watch in sync would see it deleted or
    /// relabelled (the e2e `reconciling_an_unchanged_revision_without_drift_writes_nothing`
    /// shows it not read again then); this API server serves no watch, so it is read again.
    #[tokio::test]
    async fn an_object_is_read_again_while_no_watch_sees_it() {
        let (mut worker, log, _reports) = worker_on(
            Some(vec![inventory_entry("settings", false)]),
            vec![live(
                "settings",
                json!({"labels": {INVENTORY_LABEL: "prod"}}),
            )],
        )
        .await;
        let revision = revision_of(&["settings"], true);
        assert_eq!(reconcile(&mut worker, &revision).await, Outcome::Healthy);
        assert_eq!(reconcile(&mut worker, &revision).await, Outcome::Healthy);
        assert_eq!(
            requests(&log, "GET", "settings"),
            2,
            "no watch saw it meanwhile"
        );
        assert_eq!(requests(&log, "PATCH", "settings"), 2);
    }

    #[test]
    fn whose_an_object_is_decides_adoption_and_refusal() {
        let key = configmap_key("x");
        let owner = |agent: Option<&str>, adopted: bool| Owner {
            agent: agent.map(str::to_owned),
            adopted,
        };
        let judged =
            |found: Option<Owner>, known: Option<bool>| judge(&key, found.as_ref(), "prod", known);
        assert_eq!(judged(None, None), Ok(false), "to be created");
        assert_eq!(judged(None, Some(true)), Ok(true), "once adopted, always");
        assert_eq!(
            judged(Some(owner(None, false)), None),
            Ok(true),
            "found there"
        );
        assert_eq!(
            judged(Some(owner(Some("prod"), false)), None),
            Ok(false),
            "made by it"
        );
        assert_eq!(
            judged(Some(owner(Some("prod"), true)), None),
            Ok(true),
            "adopted, as the object says"
        );
        assert_eq!(
            judged(Some(owner(Some("prod"), true)), Some(false)),
            Ok(true)
        );
        assert_eq!(
            judged(Some(owner(None, false)), Some(false)),
            Ok(true),
            "listed before an apply that never happened, and made by someone else since (or \
             its label removed): never the agent's to delete"
        );
        assert_eq!(
            judged(Some(owner(Some("staging"), false)), None),
            Err(OwnedByAnotherAgent {
                key: key.clone(),
                owner: "staging".into()
            })
        );
        assert!(judged(Some(owner(Some("staging"), true)), Some(true)).is_err());
    }

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
            kept: false,
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
