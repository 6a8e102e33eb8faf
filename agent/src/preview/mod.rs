//! Previews: what a merge request's head would change in this cluster, found with a
//! server-side dry run (`dryRun=All`) of every object. Nothing is ever written: the only
//! requests are reads and dry runs, with the same kind resolution, scope and inventory as a
//! real apply ([`crate::plan`], [`crate::cluster`], [`crate::inventory`]).
//!
//! The field diff and the queue are pure ([`diff`], [`queue`]); this module does the I/O.

pub mod diff;
pub mod queue;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use greenlight::preview::{MAX_FIELDS, MAX_OBJECTS};
use greenlight::v1::preview::Outcome;
use greenlight::v1::preview_object::Change;
use greenlight::v1::{Preview, PreviewObject};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::assemble::ReadyPreview;
use crate::client::Client;
use crate::cluster::{Cluster, ObjectRef, Owner, Write, Written};
use crate::inventory::INVENTORY_LABEL;
use crate::manifest;
use crate::plan::{self, ObjectKey, Scope, cascades, prune_allowed, prune_set};
use crate::reconcile::{FIELD_MANAGER, OwnedByAnotherAgent, load_inventory, prunes_everything};
use crate::session::Target;
use queue::{PreviewQueue, merge_request_of};

/// Objects dry-run at once: as many as an apply writes at once.
const CONCURRENCY: usize = 8;
/// How long sending a result may take before the next attempt.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at sending one result.
const SEND_ATTEMPTS: u32 = 5;

/// Requests waiting, shared by the session (which adds) and the preview loop (which takes).
#[derive(Default, Clone)]
pub struct Inbox {
    queue: Arc<Mutex<PreviewQueue>>,
    arrived: Arc<Notify>,
}

impl Inbox {
    /// Queues `preview`, superseding a waiting or running one of the same merge request.
    pub fn push(&self, preview: ReadyPreview) {
        self.lock().push(preview);
        self.arrived.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PreviewQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn next(&self) -> ReadyPreview {
        loop {
            if let Some(preview) = self.lock().take() {
                return preview;
            }
            self.arrived.notified().await;
        }
    }
}

/// Runs previews one at a time while leading, until `shutdown`; sends each result to the
/// server. Runs beside the apply loop on a cluster connection of its own, so a preview never
/// waits for an apply nor an apply for a preview.
pub async fn preview_loop(
    kube: kube::Client,
    namespace: String,
    target: Target,
    inbox: Inbox,
    leading: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let mut previewer = Previewer::new(kube, &namespace);
    loop {
        let request = tokio::select! {
            _ = shutdown.cancelled() => return,
            request = inbox.next() => request,
        };
        if !*leading.borrow() {
            // Every replica is asked; the leader answers.
            continue;
        }
        let merge_request = merge_request_of(&request);
        let stop = {
            let inbox = inbox.clone();
            let leading = leading.clone();
            let shutdown = shutdown.clone();
            move || {
                inbox.lock().supersedes(&merge_request)
                    || !*leading.borrow()
                    || shutdown.is_cancelled()
            }
        };
        let span = info_span!(
            "preview",
            sha = request.revision.sha(),
            mr = request.merge_request_iid
        );
        let Some(preview) = previewer
            .preview(&request, &stop)
            .instrument(span.clone())
            .await
        else {
            info!(parent: &span, "preview superseded or stopped");
            continue;
        };
        send(&target, preview).instrument(span).await;
    }
}

/// Sends `preview`, retrying a few times: a lost result is asked for again on the next push.
async fn send(target: &Target, preview: Preview) {
    let mut backoff =
        greenlight::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    for _ in 0..SEND_ATTEMPTS {
        let attempt = async {
            let client =
                Client::connect(&target.server, &target.token, target.ca_file.as_deref()).await?;
            client.report_preview(preview.clone()).await
        };
        match tokio::time::timeout(SEND_TIMEOUT, attempt).await {
            Ok(Ok(())) => {
                info!(outcome = ?preview.outcome(), "preview sent");
                return;
            }
            Ok(Err(error)) => warn!(%error, "cannot send a preview; retrying"),
            Err(_) => warn!("sending a preview timed out; retrying"),
        }
        tokio::time::sleep(backoff.delay()).await;
    }
    warn!("preview not delivered");
}

/// Makes previews against one cluster.
pub struct Previewer {
    cluster: Cluster,
    namespace: String,
}

/// What the dry run said of one object.
enum Found {
    Create(String),
    Update(Vec<greenlight::v1::FieldChange>),
    Unchanged,
    Refused(String),
}

impl Previewer {
    /// A previewer reading the agent's inventory in `namespace`.
    pub fn new(kube: kube::Client, namespace: &str) -> Self {
        Self {
            cluster: Cluster::new(kube, FIELD_MANAGER),
            namespace: namespace.to_owned(),
        }
    }

    /// What applying `request` would do; `None` when `stop` said so first.
    pub async fn preview(
        &mut self,
        request: &ReadyPreview,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Option<Preview> {
        let started = Instant::now();
        let revision = &request.revision;
        let mut preview = Preview {
            id: request.id.clone(),
            agent: revision.header.agent.clone(),
            sha: revision.sha().to_owned(),
            project: revision.header.project.clone(),
            merge_request_iid: request.merge_request_iid,
            outcome: Outcome::Clean.into(),
            ..Preview::default()
        };
        let mut reasons = Vec::new();
        let dry_run = self
            .examine(request, &mut preview, &mut reasons, stop)
            .await?;
        preview.dry_run_ms = u64::try_from(dry_run.as_millis()).unwrap_or(u64::MAX);
        if let Some(reason) = reasons.into_iter().next() {
            if preview.outcome() == Outcome::Clean {
                preview.outcome = Outcome::Refused.into();
            }
            preview.reason = reason;
        }
        if preview.objects.len() > MAX_OBJECTS {
            preview.objects.truncate(MAX_OBJECTS);
            preview.truncated = true;
        }
        preview.agent_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Some(preview)
    }

    /// Fills `preview`; returns how long the dry-run requests took, `None` when stopped.
    async fn examine(
        &mut self,
        request: &ReadyPreview,
        preview: &mut Preview,
        reasons: &mut Vec<String>,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Option<Duration> {
        let revision = &request.revision;
        let settings = revision.header.settings.clone().unwrap_or_default();
        let agent = revision.header.agent.clone();
        let impersonate = Some(settings.impersonate.as_str()).filter(|u| !u.is_empty());
        if let Err(error) = self.cluster.act_as(impersonate) {
            reasons.push(error.to_string());
            return Some(Duration::ZERO);
        }
        let manifests = match manifest::parse(&revision.files) {
            Ok(manifests) => manifests,
            Err(error) => {
                reasons.push(format!("invalid manifests: {error}"));
                return Some(Duration::ZERO);
            }
        };
        let discovery_failures = self
            .cluster
            .discover(
                manifests
                    .iter()
                    .map(|m| (m.api_version.as_str(), m.kind.as_str())),
            )
            .await;
        let (planned, unresolved) = plan::plan_each(
            manifests,
            &settings,
            &agent,
            &discovery_failures,
            |api_version, kind| self.cluster.resolve(api_version, kind),
        );
        for u in unresolved {
            let why = match &u.discovery_failure {
                Some(why) => format!("API discovery failed: {why}"),
                None => "unknown kind: the cluster does not serve it".to_owned(),
            };
            reasons.push(format!("{}: {why}", u.what));
            let (group, _) = crate::manifest::split_api_version(&u.manifest.api_version);
            let key = ObjectKey {
                group: group.to_owned(),
                kind: u.manifest.kind.clone(),
                namespace: u.manifest.namespace.clone(),
                name: u.manifest.name.clone(),
            };
            preview
                .objects
                .push(object(&u.manifest.api_version, &key, Change::Refused, why));
        }
        // Two manifests of one object would be refused at apply: neither is dry-run.
        let duplicates = plan::duplicates(&planned);
        let mut planned = planned;
        for duplicate in &duplicates {
            let Some(api_version) = planned
                .iter()
                .find(|p| p.key == duplicate.key)
                .map(|p| p.manifest.api_version.clone())
            else {
                continue;
            };
            let reason = duplicate.to_string();
            let why = reason
                .strip_prefix(&format!("{} is ", duplicate.key))
                .unwrap_or(&reason)
                .to_owned();
            preview
                .objects
                .push(object(&api_version, &duplicate.key, Change::Refused, why));
            reasons.push(reason);
            planned.retain(|p| p.key != duplicate.key);
        }
        let scope = Scope::of(&settings);
        let desired_keys: BTreeSet<ObjectKey> = planned.iter().map(|p| p.key.clone()).collect();
        let (allowed, refused): (Vec<_>, Vec<_>) = planned
            .into_iter()
            .partition(|p| plan::refusals([&p.key], &scope, &self.namespace).is_empty());
        for item in &refused {
            let why = if plan::is_agent_record(&item.key, &self.namespace) {
                "it is the agent's own inventory or Lease".to_owned()
            } else {
                scope.refusal(&item.key).unwrap_or_default()
            };
            reasons.push(format!("{}: {why}", item.key));
            preview.objects.push(object(
                &item.manifest.api_version,
                &item.key,
                Change::Refused,
                why,
            ));
        }

        let previous = match load_inventory(&self.cluster, &self.namespace, &agent).await {
            Ok((_, previous)) => previous,
            Err(message) => {
                preview.outcome = Outcome::Error.into();
                reasons.insert(0, message);
                return Some(Duration::ZERO);
            }
        };
        if let Some(applied) = prunes_everything(desired_keys.len(), &settings, &previous) {
            reasons.insert(
                0,
                format!(
                    "revision has no objects; it would be refused rather than prune {applied} objects"
                ),
            );
        }

        // Namespaces this revision creates: what goes into them cannot be dry-run before.
        let created = crate::reconcile::namespaces_created(&self.cluster, &allowed).await;

        let dry_run_started = Instant::now();
        let checks: Vec<_> = allowed
            .iter()
            .map(|item| {
                let cluster = &self.cluster;
                let created = &created;
                let force = settings.force_conflicts;
                let agent = &agent;
                async move {
                    if stop() {
                        return (item, None);
                    }
                    let Some(resolved) = &item.resolved else {
                        return (
                            item,
                            Some(Found::Create(
                                "its kind comes with a CRD of this revision: not dry-run".into(),
                            )),
                        );
                    };
                    if item
                        .key
                        .namespace
                        .as_ref()
                        .is_some_and(|ns| created.contains(ns))
                    {
                        return (
                            item,
                            Some(Found::Create(
                                "in a namespace this revision creates: not dry-run".into(),
                            )),
                        );
                    }
                    let namespace = item.key.namespace.as_deref();
                    let live = match cluster.get(resolved, namespace, &item.key.name).await {
                        Ok(live) => live,
                        Err(error) => return (item, Some(Found::Refused(error.message()))),
                    };
                    // As the apply would: another agent's object refuses the revision.
                    if let Some(owner) = live
                        .as_ref()
                        .and_then(|live| Owner::of(&live.metadata).agent)
                        .filter(|owner| owner != agent)
                    {
                        let refusal = OwnedByAnotherAgent {
                            key: item.key.clone(),
                            owner,
                        };
                        return (item, Some(Found::Refused(refusal.to_string())));
                    }
                    let write = Write::Apply {
                        object: ObjectRef {
                            resolved,
                            namespace,
                            name: &item.key.name,
                        },
                        body: &item.body,
                        force,
                        dry_run: true,
                    };
                    let found = match cluster.perform(write).await {
                        Err(error) => Found::Refused(error.message()),
                        Ok(Written::Object(after)) => match live {
                            None => Found::Create(String::new()),
                            Some(live) => {
                                let (Ok(live), Ok(after)) =
                                    (serde_json::to_value(live), serde_json::to_value(after))
                                else {
                                    return (
                                        item,
                                        Some(Found::Refused("cannot read the answer".into())),
                                    );
                                };
                                let mut truncated = false;
                                let fields =
                                    diff::field_changes(&live, &after, &item.body, &mut truncated);
                                if fields.is_empty() {
                                    Found::Unchanged
                                } else {
                                    Found::Update(fields)
                                }
                            }
                        },
                        Ok(_) => Found::Refused("the dry run was answered as another write".into()),
                    };
                    (item, Some(found))
                }
            })
            .collect();
        let found: Vec<_> = futures_util::stream::iter(checks)
            .buffered(CONCURRENCY)
            .collect()
            .await;
        let dry_run = dry_run_started.elapsed();
        for (item, found) in found {
            let api_version = &item.manifest.api_version;
            match found? {
                Found::Create(note) => {
                    preview
                        .objects
                        .push(object(api_version, &item.key, Change::Create, note));
                }
                Found::Update(fields) => {
                    let mut o = object(api_version, &item.key, Change::Update, String::new());
                    if fields.len() >= MAX_FIELDS {
                        preview.truncated = true;
                    }
                    o.fields = fields;
                    preview.objects.push(o);
                }
                Found::Unchanged => preview.unchanged += 1,
                Found::Refused(why) => {
                    reasons.push(format!("{}: {why}", item.key));
                    preview
                        .objects
                        .push(object(api_version, &item.key, Change::Refused, why));
                }
            }
        }
        if stop() {
            return None;
        }

        if settings.prune {
            let candidates = match prune_set(
                &previous.entries,
                &desired_keys,
                &scope,
                settings.prune_limit,
                false,
            ) {
                Ok(set) => set.candidates,
                Err(refused) => {
                    reasons.insert(0, refused.to_string());
                    plan::prune_plan(&previous.entries, &desired_keys)
                }
            };
            let kinds: BTreeMap<String, String> = self
                .cluster
                .discover(
                    candidates
                        .iter()
                        .map(|e| (e.api_version.as_str(), e.key.kind.as_str())),
                )
                .await;
            for entry in candidates {
                let Some(resolved) = self.cluster.resolve(&entry.api_version, &entry.key.kind)
                else {
                    if let Some(why) = kinds.get(&entry.api_version) {
                        reasons.push(format!(
                            "{}: cannot tell whether to prune it: {why}",
                            entry.key
                        ));
                    }
                    continue;
                };
                let live = match self
                    .cluster
                    .get(&resolved, entry.key.namespace.as_deref(), &entry.key.name)
                    .await
                {
                    Ok(Some(live)) => live,
                    // Already gone: nothing to prune.
                    Ok(None) => continue,
                    Err(error) => {
                        reasons.push(format!("{}: {}", entry.key, error.message()));
                        continue;
                    }
                };
                let labels = live.metadata.labels.as_ref();
                if labels
                    .and_then(|l| l.get(INVENTORY_LABEL))
                    .map(String::as_str)
                    != Some(agent.as_str())
                {
                    continue;
                }
                let note = if entry.adopted {
                    "existed before the agent adopted it: only its label would be removed"
                } else if cascades(&entry.key.group, &entry.key.kind)
                    && !prune_allowed(live.metadata.annotations.as_ref())
                {
                    // Kept, as the apply would keep it.
                    preview.unchanged += 1;
                    continue;
                } else {
                    ""
                };
                preview.objects.push(object(
                    &entry.api_version,
                    &entry.key,
                    Change::Prune,
                    note.to_owned(),
                ));
            }
        }
        Some(dry_run)
    }
}

fn object(api_version: &str, key: &ObjectKey, change: Change, message: String) -> PreviewObject {
    PreviewObject {
        api_version: api_version.to_owned(),
        kind: key.kind.clone(),
        namespace: key.namespace.clone().unwrap_or_default(),
        name: key.name.clone(),
        change: change.into(),
        message,
        fields: Vec::new(),
    }
}
