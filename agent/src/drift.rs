//! Drift by watch: metadata watches on the kinds and namespaces of the inventory, filtered by
//! the inventory label, notice within moments when someone else changed or deleted what the
//! agent applied (the fields its manager owns, as `managedFields` say), and let a reconcile
//! skip the objects nobody touched that way.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::core::{ApiResource, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::inventory::INVENTORY_LABEL;
use crate::plan::{ObjectKey, Version, drifted_from, needs_apply};

/// Seconds one watch request lasts; below the agent's client read timeout.
const WATCH_TIMEOUT_SECS: u32 = 45;

/// What the agent last applied to one object, and what the watch last saw of it.
#[derive(Debug, Default)]
struct Tracked {
    /// The version our last apply returned, and the digest of the body it sent.
    applied: Option<(Version, u64)>,
    /// The version the watch saw last; `None` when it saw the object deleted or has not
    /// seen it yet.
    observed: Option<Version>,
    /// An apply of ours is in flight: what the watch sees meanwhile is likely its result.
    applying: bool,
    /// The watch saw the object while the apply was in flight.
    seen_while_applying: bool,
}

/// One watch: a kind, in one namespace or (cluster-scoped) none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WatchTarget {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub namespace: Option<String>,
}

struct Running {
    task: JoinHandle<()>,
    synced: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Default)]
struct Shared {
    objects: Mutex<HashMap<ObjectKey, Tracked>>,
    drifted: Notify,
}

impl Shared {
    fn objects(&self) -> MutexGuard<'_, HashMap<ObjectKey, Tracked>> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The watches of one agent's inventory.
pub struct DriftWatch {
    client: kube::Client,
    /// The field manager of the agent's applies, whose owned fields are the object's state.
    manager: String,
    /// Whom `client` acts as, when not the agent itself.
    user: Option<String>,
    selector: Option<String>,
    shared: Arc<Shared>,
    watches: HashMap<WatchTarget, Running>,
}

impl DriftWatch {
    /// Watches nothing yet (`watch` says what), for applies by field manager `manager`.
    pub fn new(client: kube::Client, manager: &str) -> Self {
        Self {
            client,
            manager: manager.to_owned(),
            user: None,
            selector: None,
            shared: Arc::default(),
            watches: HashMap::new(),
        }
    }

    /// Watches as `user` through `client` from now on, restarting the watches if that is
    /// someone else than before: the user's RBAC decides what may be watched.
    pub fn act_as(&mut self, client: &kube::Client, user: Option<&str>) {
        if self.user.as_deref() != user {
            self.stop();
            self.client = client.clone();
            self.user = user.map(str::to_owned);
        }
    }

    /// Resolves when a watched object changed in a way the agent did not cause.
    pub async fn drifted(&self) {
        self.shared.drifted.notified().await;
    }

    /// Records that an apply to `key` starts, so that the watch event it causes is not
    /// taken for someone else's change.
    pub fn applying(&self, key: &ObjectKey) {
        record_applying(&self.shared, key);
    }

    /// Records how the apply to `key` ended: at a version, with a body of that digest, or
    /// failed.
    pub fn applied(&self, key: &ObjectKey, outcome: Option<(&Version, u64)>) {
        record_applied(&self.shared, key, outcome);
    }

    /// Forgets `key` before the agent deletes it or lets it go, which the watch would
    /// otherwise see as drift.
    pub fn forget(&self, key: &ObjectKey) {
        self.shared.objects().remove(key);
    }

    /// Whether the watch lost sight of `key` after the agent applied it: deleted, or no
    /// longer carrying this agent's label (which is what the watch filters by), so possibly
    /// another agent's by now.
    pub fn vanished(&self, key: &ObjectKey) -> bool {
        self.shared
            .objects()
            .get(key)
            .is_some_and(|t| t.applied.is_some() && t.observed.is_none())
    }

    /// Whether the watch of `target` runs and is in sync: only then does it see an object
    /// of it deleted, or given another agent's label.
    pub fn sees(&self, target: &WatchTarget) -> bool {
        self.watches
            .get(target)
            .is_some_and(|w| w.synced.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Whether a body of `digest` is what was last applied to `key`, and the watch (in sync)
    /// has seen nobody change the object since: applying it again would change nothing.
    pub fn unchanged(&self, target: &WatchTarget, key: &ObjectKey, digest: u64) -> bool {
        if !self.sees(target) {
            return false;
        }
        let objects = self.shared.objects();
        objects
            .get(key)
            .is_some_and(|t| !needs_apply(t.applied.as_ref(), t.observed.as_ref(), digest))
    }

    /// Watches exactly `targets` for agent `agent`'s objects, starting and stopping watches as
    /// needed; forgets objects no longer in `keys`.
    pub fn watch(
        &mut self,
        agent: &str,
        targets: BTreeSet<WatchTarget>,
        keys: &BTreeSet<ObjectKey>,
    ) {
        let selector = format!("{INVENTORY_LABEL}={agent}");
        if self.selector.as_deref() != Some(selector.as_str()) {
            self.stop();
            self.selector = Some(selector.clone());
        }
        self.watches.retain(|target, running| {
            let keep = targets.contains(target);
            if !keep {
                running.task.abort();
            }
            keep
        });
        for target in targets {
            if self.watches.contains_key(&target) {
                continue;
            }
            let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let task = tokio::spawn(run_watch(
                self.client.clone(),
                self.manager.clone(),
                target.clone(),
                selector.clone(),
                self.shared.clone(),
                synced.clone(),
            ));
            self.watches.insert(target, Running { task, synced });
        }
        self.shared.objects().retain(|key, _| keys.contains(key));
    }

    /// Stops every watch.
    pub fn stop(&mut self) {
        for (_, running) in self.watches.drain() {
            running.task.abort();
        }
    }
}

impl Drop for DriftWatch {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn run_watch(
    client: kube::Client,
    manager: String,
    target: WatchTarget,
    selector: String,
    shared: Arc<Shared>,
    synced: Arc<std::sync::atomic::AtomicBool>,
) {
    let resource = ApiResource {
        group: target.group.clone(),
        version: target.version.clone(),
        api_version: if target.group.is_empty() {
            target.version.clone()
        } else {
            format!("{}/{}", target.group, target.version)
        },
        kind: target.kind.clone(),
        plural: target.plural.clone(),
    };
    // Metadata only: versions and managedFields say what changed, without the contents.
    let api: Api<PartialObjectMeta<DynamicObject>> = match &target.namespace {
        Some(namespace) => Api::namespaced_with(client, namespace, &resource),
        None => Api::all_with(client, &resource),
    };
    let key_of = |meta: &kube::core::ObjectMeta| ObjectKey {
        group: target.group.clone(),
        kind: target.kind.clone(),
        namespace: meta.namespace.clone(),
        name: meta.name.clone().unwrap_or_default(),
    };
    // The API server ends each watch after this, well before the agent's client would give
    // up on a quiet connection (its read timeout is a minute); the watcher then resumes from
    // the last resourceVersion without listing again.
    let config = watcher::Config::default()
        .labels(&selector)
        .timeout(WATCH_TIMEOUT_SECS);
    let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    // Objects listed during a (re)list: those missing from it were deleted meanwhile.
    let mut listing: BTreeSet<ObjectKey> = BTreeSet::new();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                synced.store(false, std::sync::atomic::Ordering::Release);
                warn!(kind = %target.kind, namespace = ?target.namespace, %error, "drift watch failed; retrying");
                continue;
            }
        };
        match event {
            Event::Init => listing.clear(),
            Event::InitApply(object) => {
                let key = key_of(&object.metadata);
                observe(&shared, &key, Some(Version::of(&object.metadata, &manager)));
                listing.insert(key);
            }
            Event::InitDone => {
                let gone: Vec<ObjectKey> = shared
                    .objects()
                    .keys()
                    .filter(|k| {
                        k.group == target.group
                            && k.kind == target.kind
                            && k.namespace == target.namespace
                            && !listing.contains(*k)
                    })
                    .cloned()
                    .collect();
                for key in gone {
                    observe(&shared, &key, None);
                }
                synced.store(true, std::sync::atomic::Ordering::Release);
                debug!(kind = %target.kind, namespace = ?target.namespace, "drift watch in sync");
            }
            Event::Apply(object) => {
                observe(
                    &shared,
                    &key_of(&object.metadata),
                    Some(Version::of(&object.metadata, &manager)),
                );
            }
            Event::Delete(object) => observe(&shared, &key_of(&object.metadata), None),
        }
    }
}

/// See [`DriftWatch::applying`].
fn record_applying(shared: &Shared, key: &ObjectKey) {
    let mut objects = shared.objects();
    let tracked = objects.entry(key.clone()).or_default();
    tracked.applying = true;
    tracked.seen_while_applying = false;
}

/// See [`DriftWatch::applied`].
fn record_applied(shared: &Shared, key: &ObjectKey, outcome: Option<(&Version, u64)>) {
    let drifted = {
        let mut objects = shared.objects();
        let tracked = objects.entry(key.clone()).or_default();
        tracked.applying = false;
        let seen = std::mem::take(&mut tracked.seen_while_applying);
        let Some((version, digest)) = outcome else {
            return;
        };
        tracked.applied = Some((version.clone(), digest));
        if !seen || tracked.observed.as_ref() == Some(version) {
            // The watch reports this version too, sooner or later; nobody else's change can
            // be told from ours until it does.
            tracked.observed = Some(version.clone());
            false
        } else {
            // Seen during the apply, and not its result: someone else's change right after
            // it (a deletion, a field taken over) that nothing else would bring back, or
            // what came before it, which costs one apply that changes nothing.
            drifted_from(tracked.applied.as_ref(), tracked.observed.as_ref())
        }
    };
    if drifted {
        info!(object = %key, "changed while being applied; applying again");
        shared.drifted.notify_one();
    }
}

/// Records what the watch saw of `key`, and wakes the apply loop when it is not what the
/// agent last applied.
fn observe(shared: &Shared, key: &ObjectKey, version: Option<Version>) {
    let drifted = {
        let mut objects = shared.objects();
        // Kept even before the apply that made it is recorded, which may come second.
        let tracked = objects.entry(key.clone()).or_default();
        tracked.observed = version;
        if tracked.applying {
            tracked.seen_while_applying = true;
            return;
        }
        drifted_from(tracked.applied.as_ref(), tracked.observed.as_ref())
    };
    if drifted {
        info!(object = %key, "changed by someone else; re-applying");
        shared.drifted.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            group: "apps".into(),
            kind: "Deployment".into(),
            namespace: Some("apps".into()),
            name: name.into(),
        }
    }

    fn version(resource_version: &str, generation: Option<i64>) -> Version {
        Version {
            resource_version: resource_version.into(),
            generation,
            owned: None,
            being_deleted: false,
        }
    }

    fn drifted(shared: &Shared) -> bool {
        // A stored permit means the apply loop would wake.
        let waker = futures_util::task::noop_waker();
        let mut context = std::task::Context::from_waker(&waker);
        let notified = shared.drifted.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().poll(&mut context).is_ready()
    }

    #[test]
    fn a_controller_writing_status_is_not_drift_but_a_new_generation_is() {
        let shared = Shared::default();
        let web = key("web");
        shared.objects().entry(web.clone()).or_default().applied =
            Some((version("10", Some(1)), 0));
        observe(&shared, &web, Some(version("11", Some(1))));
        assert!(!drifted(&shared), "status only");
        observe(&shared, &web, Some(version("12", Some(2))));
        assert!(drifted(&shared), "someone changed the spec");
    }

    #[test]
    fn without_generations_any_new_version_or_a_deletion_is_drift() {
        let shared = Shared::default();
        let settings = key("settings");
        shared
            .objects()
            .entry(settings.clone())
            .or_default()
            .applied = Some((version("10", None), 0));
        observe(&shared, &settings, Some(version("10", None)));
        assert!(!drifted(&shared), "our own write");
        observe(&shared, &settings, Some(version("11", None)));
        assert!(drifted(&shared));
        observe(&shared, &settings, None);
        assert!(drifted(&shared), "deleted");
    }

    #[test]
    fn what_the_watch_sees_during_our_own_apply_is_not_drift() {
        let shared = Shared::default();
        let web = key("web");
        {
            let mut objects = shared.objects();
            let tracked = objects.entry(web.clone()).or_default();
            tracked.applied = Some((version("10", Some(1)), 0));
            tracked.applying = true;
        }
        observe(&shared, &web, Some(version("11", Some(2))));
        assert!(!drifted(&shared));
    }

    #[test]
    fn a_change_seen_during_our_apply_that_is_not_its_result_is_drift_once_it_ends() {
        let shared = Shared::default();
        let web = key("web");
        let applying = || record_applying(&shared, &web);
        let ours = version("10", Some(1));
        // The watch brings the apply's own result first: nothing to correct.
        applying();
        observe(&shared, &web, Some(ours.clone()));
        record_applied(&shared, &web, Some((&ours, 0)));
        assert!(!drifted(&shared));
        // Deleted right after the apply, before it was recorded: corrected.
        applying();
        observe(&shared, &web, None);
        record_applied(&shared, &web, Some((&ours, 0)));
        assert!(drifted(&shared), "deleted meanwhile");
        assert!(
            shared.objects()[&web].observed.is_none(),
            "still seen as gone"
        );
        // Nothing seen meanwhile: the apply's result stands for what the watch will bring.
        applying();
        record_applied(&shared, &web, Some((&ours, 0)));
        assert!(!drifted(&shared));
        assert_eq!(shared.objects()[&web].observed, Some(ours));
    }

    #[test]
    fn a_label_another_manager_adds_is_not_drift_but_taking_our_field_is() {
        let shared = Shared::default();
        let settings = key("settings");
        let applied = |owned: u64| Version {
            resource_version: "10".into(),
            generation: None,
            owned: Some(owned),
            being_deleted: false,
        };
        shared
            .objects()
            .entry(settings.clone())
            .or_default()
            .applied = Some((applied(1), 0));
        let seen = |resource_version: &str, owned: u64| Version {
            resource_version: resource_version.into(),
            generation: None,
            owned: Some(owned),
            being_deleted: false,
        };
        observe(&shared, &settings, Some(seen("11", 1)));
        assert!(!drifted(&shared), "what we own is as we left it");
        observe(&shared, &settings, Some(seen("12", 2)));
        assert!(drifted(&shared), "one of our fields changed hands");
    }

    #[tokio::test]
    async fn an_object_the_watch_stops_seeing_after_our_apply_has_vanished() {
        let watch = DriftWatch::new(unreachable_client(), "greenlight");
        let web = key("web");
        assert!(!watch.vanished(&web), "never applied");
        watch.applying(&web);
        watch.applied(&web, Some((&version("10", Some(1)), 0)));
        assert!(!watch.vanished(&web), "our own apply");
        observe(&watch.shared, &web, Some(version("11", Some(1))));
        assert!(!watch.vanished(&web), "still carrying our label");
        // Relabelled by someone else, or deleted: the filtered watch says deleted either way.
        observe(&watch.shared, &web, None);
        assert!(watch.vanished(&web));
        watch.applied(&web, Some((&version("12", Some(1)), 0)));
        assert!(!watch.vanished(&web), "applied again");
    }

    /// A client for a `DriftWatch` that starts no watch in the test.
    fn unreachable_client() -> kube::Client {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("a valid URI"));
        kube::Client::try_from(config).expect("a client")
    }

    #[test]
    fn an_untracked_object_is_never_drift() {
        let shared = Shared::default();
        observe(&shared, &key("new"), Some(version("1", None)));
        assert!(!drifted(&shared));
    }
}
