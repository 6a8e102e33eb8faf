//! The agents, indexed the ways requests find them: those of the config file, which seed
//! it, and those created at runtime through the admin API.
//!
//! A [`Catalog`] is an immutable snapshot, so lookups take no lock; [`LiveCatalog`] swaps
//! in a new snapshot for each registry change every replica reads from the change log.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use ring::hmac;
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tracing::warn;

use crate::config::{AgentSpec, Secret, TokenHash};
use crate::git::RepoSource;
use crate::store::{RefKey, RegisteredAgent, same_incarnation};

/// Hex characters of a badge key: 128 bits, beyond guessing.
const BADGE_KEY_CHARS: usize = 32;

/// Who a token authenticates as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub agent: String,
    /// For a token a rotation replaced: accepted until then (Unix ms), refused after.
    pub until_ms: Option<i64>,
}

impl Grant {
    fn valid_at(&self, now_ms: i64) -> bool {
        self.until_ms.is_none_or(|until| now_ms < until)
    }
}

/// The agents by name, by token, by the ref they watch, and by badge key.
#[derive(Default, Clone)]
pub struct Catalog {
    agents: BTreeMap<String, Arc<AgentSpec>>,
    /// Agents created at runtime; the others come from the config file.
    runtime: BTreeSet<String>,
    /// The number of the last registry change this snapshot reflects.
    registry_seq: u64,
    /// Derives each private badge's key; without it private badges are not served.
    badge_secret: Option<hmac::Key>,
    by_token: HashMap<[u8; 32], Grant>,
    by_ci_token: HashMap<[u8; 32], Grant>,
    by_ref: BTreeMap<RefKey, Vec<String>>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("agents", &self.agents)
            .field("runtime", &self.runtime)
            .field("badge_secret", &self.badge_secret.as_ref().map(|_| "…"))
            .finish_non_exhaustive()
    }
}

impl Catalog {
    /// Indexes the config file's `agents`; private badge keys are derived from `badge_secret`.
    pub fn new(agents: &[AgentSpec], badge_secret: Option<&Secret>) -> Self {
        let mut catalog = Catalog {
            badge_secret: badge_secret
                .map(|secret| hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes())),
            ..Catalog::default()
        };
        for agent in agents {
            catalog.insert(Arc::new(agent.clone()), None, None);
        }
        catalog
    }

    fn insert(
        &mut self,
        agent: Arc<AgentSpec>,
        previous_token: Option<&(TokenHash, i64)>,
        previous_ci_token: Option<&(TokenHash, i64)>,
    ) {
        let name = &agent.name;
        let grant = |until_ms| Grant {
            agent: name.clone(),
            until_ms,
        };
        self.by_token.insert(*agent.token.as_bytes(), grant(None));
        if let Some((hash, until)) = previous_token {
            self.by_token.insert(*hash.as_bytes(), grant(Some(*until)));
        }
        if let Some(ci) = &agent.ci_token {
            self.by_ci_token.insert(*ci.as_bytes(), grant(None));
        }
        if let Some((hash, until)) = previous_ci_token {
            self.by_ci_token
                .insert(*hash.as_bytes(), grant(Some(*until)));
        }
        self.by_ref
            .entry(ref_key(&agent))
            .or_default()
            .push(name.clone());
        self.agents.insert(name.clone(), agent);
    }

    fn remove(&mut self, name: &str) -> Option<Arc<AgentSpec>> {
        let agent = self.agents.remove(name)?;
        self.runtime.remove(name);
        self.by_token.retain(|_, grant| grant.agent != name);
        self.by_ci_token.retain(|_, grant| grant.agent != name);
        let key = ref_key(&agent);
        if let Some(watchers) = self.by_ref.get_mut(&key) {
            watchers.retain(|watcher| watcher != name);
            if watchers.is_empty() {
                self.by_ref.remove(&key);
            }
        }
        Some(agent)
    }

    /// Whether `name` was created at runtime (and may be changed at runtime).
    pub fn is_runtime(&self, name: &str) -> bool {
        self.runtime.contains(name)
    }

    /// The number of the last registry change this snapshot reflects.
    pub fn registry_seq(&self) -> u64 {
        self.registry_seq
    }

    /// The agent named `name`.
    pub fn agent(&self, name: &str) -> Option<&AgentSpec> {
        self.agents.get(name).map(Arc::as_ref)
    }

    /// The agent named `name`, shared.
    pub fn agent_arc(&self, name: &str) -> Option<Arc<AgentSpec>> {
        self.agents.get(name).cloned()
    }

    /// Every agent, by name.
    pub fn agents(&self) -> impl Iterator<Item = &AgentSpec> {
        self.agents.values().map(Arc::as_ref)
    }

    /// The agent whose bearer token is `token`.
    pub fn agent_by_token(&self, token: &str) -> Option<&AgentSpec> {
        // Looking up the token's hash reveals nothing about the token through timing.
        let grant = self.token_grant(&TokenHash::of(token), crate::clock::now_ms())?;
        self.agent(&grant.agent)
    }

    /// Who the bearer token hashing to `hash` authenticates as at `now_ms`, if anyone.
    pub fn token_grant(&self, hash: &TokenHash, now_ms: i64) -> Option<&Grant> {
        self.by_token
            .get(hash.as_bytes())
            .filter(|grant| grant.valid_at(now_ms))
    }

    /// The agent whose CI token is `token`.
    pub fn agent_by_ci_token(&self, token: &str) -> Option<&AgentSpec> {
        let grant = self
            .by_ci_token
            .get(TokenHash::of(token).as_bytes())
            .filter(|grant| grant.valid_at(crate::clock::now_ms()))?;
        self.agent(&grant.agent)
    }

    /// The key in the private badge URL of `name`: an HMAC of the name, so that it needs no
    /// storage, is the same on every replica, and changes for all agents with the secret.
    fn badge_key(&self, name: &str) -> Option<String> {
        let secret = self.badge_secret.as_ref()?;
        let tag = hmac::sign(secret, format!("greenlight badge v1\0{name}").as_bytes());
        let mut key = hex::encode(tag.as_ref());
        key.truncate(BADGE_KEY_CHARS);
        Some(key)
    }

    /// Where the badge of `name` is served on the HTTP listener: `/badges/<agent>.svg` when
    /// public, `/badges/<agent>/<key>.svg` when private; none for a private badge without a
    /// `badges.secret_file`, or an unknown agent.
    pub fn badge_path(&self, name: &str) -> Option<String> {
        let agent = self.agents.get(name)?;
        if agent.badge_public {
            return Some(format!("/badges/{name}.svg"));
        }
        Some(format!("/badges/{name}/{}.svg", self.badge_key(name)?))
    }

    /// Whether the badge of `name` may be shown to a request presenting `key` (or none).
    pub fn badge_visible(&self, name: &str, key: Option<&str>) -> bool {
        let Some(agent) = self.agents.get(name) else {
            return false;
        };
        match (key, self.badge_key(name)) {
            (Some(given), Some(expected)) => {
                bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
            }
            (Some(_), None) => false,
            (None, _) => agent.badge_public,
        }
    }

    /// Every watched ref.
    pub fn refs(&self) -> impl Iterator<Item = &RefKey> {
        self.by_ref.keys()
    }

    /// The agents watching `key`.
    pub fn watchers(&self, key: &RefKey) -> &[String] {
        self.by_ref.get(key).map(Vec::as_slice).unwrap_or_default()
    }

    /// The repository of the agents watching `key`, if they have one.
    ///
    /// The config and the registry let agents watch one ref only with one repository or all
    /// without, so the first watcher answers: a ref of 10,000 agents without a repository
    /// was a scan of all of them on every evaluation.
    pub fn source(&self, key: &RefKey) -> Option<&RepoSource> {
        self.watchers(key)
            .iter()
            .find_map(|name| self.agents.get(name))
            .and_then(|agent| agent.source.as_ref())
    }

    /// Whether some agent watches `project` (as the agents spell it: a path or an id).
    pub fn watches_project(&self, project: &str) -> bool {
        let first = RefKey {
            project: project.to_owned(),
            branch: String::new(),
        };
        self.by_ref
            .range(first..)
            .next()
            .is_some_and(|(key, _)| key.project == project)
    }

    /// The watched refs an event about project (`path`, `id`) and `branch` touches: the config
    /// may name a project by path or by id.
    pub fn refs_for(&self, path: Option<&str>, id: Option<u64>, branch: &str) -> Vec<RefKey> {
        let id = id.map(|id| id.to_string());
        self.by_ref
            .keys()
            .filter(|key| key.branch == branch)
            .filter(|key| Some(key.project.as_str()) == path || Some(&key.project) == id.as_ref())
            .cloned()
            .collect()
    }
}

/// Whether `agent` watches `key`.
pub fn watches(agent: &AgentSpec, key: &RefKey) -> bool {
    agent.project == key.project && agent.branch == key.branch
}

/// The ref an agent watches.
pub fn ref_key(agent: &AgentSpec) -> RefKey {
    RefKey {
        project: agent.project.clone(),
        branch: agent.branch.clone(),
    }
}

/// How a registry change changed the catalog.
#[derive(Debug, Clone)]
pub enum CatalogChange {
    Added(Arc<AgentSpec>),
    Updated {
        before: Arc<AgentSpec>,
        after: Arc<AgentSpec>,
    },
    Removed(Arc<AgentSpec>),
}

/// The catalog as it changes at runtime: readers take the current snapshot without a lock;
/// registry changes, applied in log order, swap in a new one.
pub struct LiveCatalog {
    current: ArcSwap<Catalog>,
    /// Serialises writers, so that no change is lost between a load and a store.
    writer: Mutex<()>,
    /// Bumped by every change: streams re-check their agent and token.
    changed: watch::Sender<u64>,
}

impl LiveCatalog {
    /// Starts from `catalog`: the config file's agents.
    pub fn new(catalog: Catalog) -> Self {
        Self {
            current: ArcSwap::from_pointee(catalog),
            writer: Mutex::new(()),
            changed: watch::channel(0).0,
        }
    }

    /// The catalog now.
    pub fn load(&self) -> Arc<Catalog> {
        self.current.load_full()
    }

    /// Hears of every change from now on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Applies registry change `seq`: `agent` registered or updated, or `name` deleted
    /// (`None`). Changes the snapshot already reflects are ignored, and so is a runtime
    /// agent under the name of a config file agent (the file wins).
    pub fn apply(
        &self,
        seq: u64,
        name: &str,
        agent: Option<RegisteredAgent>,
    ) -> Vec<CatalogChange> {
        let _writer = self.lock_writer();
        let current = self.current.load_full();
        if seq <= current.registry_seq {
            return Vec::new();
        }
        let mut next = Catalog::clone(&current);
        next.registry_seq = seq;
        let change = apply_one(&mut next, name, agent);
        self.current.store(Arc::new(next));
        self.changed.send_modify(|n| *n += 1);
        change
    }

    /// Replaces every runtime agent with `agents`, the registry as read at change `seq`:
    /// at start, and after this replica missed log entries. A read older than the changes
    /// applied already is ignored, unless `force` (the store may have lost its data, and
    /// its change numbers started again).
    pub fn reset(&self, seq: u64, agents: Vec<RegisteredAgent>, force: bool) -> Vec<CatalogChange> {
        let _writer = self.lock_writer();
        let current = self.current.load_full();
        if seq < current.registry_seq && !force {
            return Vec::new();
        }
        let mut next = Catalog::clone(&current);
        next.registry_seq = seq;
        let mut changes = Vec::new();
        let keep: BTreeSet<String> = agents.iter().map(|a| a.spec.name.clone()).collect();
        let gone: Vec<String> = next
            .runtime
            .iter()
            .filter(|name| !keep.contains(*name))
            .cloned()
            .collect();
        for name in gone {
            changes.extend(apply_one(&mut next, &name, None));
        }
        for agent in agents {
            let name = agent.spec.name.clone();
            let unchanged = next.agents.get(&name).is_some_and(|held| {
                next.runtime.contains(&name) && same_agent(held, &agent, &next)
            });
            if !unchanged {
                changes.extend(apply_one(&mut next, &name, Some(agent)));
            }
        }
        self.current.store(Arc::new(next));
        self.changed.send_modify(|n| *n += 1);
        changes
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, ()> {
        // Guards no data: a poisoned lock is as good as a clean one.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether `held` (with its grants in `catalog`) is what `agent` describes.
fn same_agent(held: &AgentSpec, agent: &RegisteredAgent, catalog: &Catalog) -> bool {
    let grant_until = |map: &HashMap<[u8; 32], Grant>, previous: &Option<(TokenHash, i64)>| {
        previous.as_ref().is_none_or(|(hash, until)| {
            map.get(hash.as_bytes())
                .is_some_and(|grant| grant.until_ms == Some(*until))
        })
    };
    let spec = &agent.spec;
    held.incarnation == spec.incarnation
        && held.token == spec.token
        && held.ci_token == spec.ci_token
        && held.project == spec.project
        && held.branch == spec.branch
        && held.mode == spec.mode
        && held.required_stages == spec.required_stages
        && held.source == spec.source
        && held.paths == spec.paths
        && held.apply == spec.apply
        && held.badge_public == spec.badge_public
        && grant_until(&catalog.by_token, &agent.previous_token)
        && grant_until(&catalog.by_ci_token, &agent.previous_ci_token)
}

/// Applies `name`'s new definition (none: deleted) to `catalog`. An agent created again
/// under its name since (a read of the whole registry skips the changes between) is the
/// old one removed and a new one added, never an update: nothing of the old one is its.
fn apply_one(
    catalog: &mut Catalog,
    name: &str,
    agent: Option<RegisteredAgent>,
) -> Vec<CatalogChange> {
    if catalog.agents.contains_key(name) && !catalog.runtime.contains(name) {
        warn!(
            agent = name,
            "the config file defines this agent; its runtime definition is ignored"
        );
        return Vec::new();
    }
    let before = catalog.remove(name);
    let Some(agent) = agent else {
        return before.map(CatalogChange::Removed).into_iter().collect();
    };
    let after = Arc::new(agent.spec);
    catalog.insert(
        after.clone(),
        agent.previous_token.as_ref(),
        agent.previous_ci_token.as_ref(),
    );
    catalog.runtime.insert(name.to_owned());
    match before {
        Some(before) if same_incarnation(before.incarnation, after.incarnation) => {
            vec![CatalogChange::Updated { before, after }]
        }
        Some(before) => vec![CatalogChange::Removed(before), CatalogChange::Added(after)],
        None => vec![CatalogChange::Added(after)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    /// The agents of a config file listing `entries` (each an agent's fields but its
    /// token), each with a token of its own.
    fn agents_of(entries: &[&str]) -> Vec<AgentSpec> {
        let mut yaml = String::from("agents:\n");
        for (n, entry) in (1u8..).zip(entries) {
            let token = hex::encode([n; 32]);
            yaml.push_str(&format!("  - {{{entry}, token_sha256: {token}}}\n"));
        }
        Config::from_yaml(&yaml, &Overrides::default())
            .map(|config| config.agents)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    fn agents() -> Vec<AgentSpec> {
        agents_of(&[
            "name: prod, project: x, ref: main",
            "name: docs, project: x, ref: main, badge: public",
        ])
    }

    #[test]
    fn a_project_is_watched_when_some_agent_names_it_exactly() {
        let agents = agents_of(&[
            "name: a, project: g/prod, ref: main",
            "name: b, project: \"42\", ref: main",
        ]);
        let catalog = Catalog::new(&agents, None);
        assert!(catalog.watches_project("g/prod"));
        assert!(catalog.watches_project("42"));
        for other in ["g/pro", "g/prod-x", "g", "4", "420", ""] {
            assert!(!catalog.watches_project(other), "{other}");
        }
    }

    #[test]
    fn a_refs_repository_is_its_watchers() {
        let agents = agents_of(&[
            "name: a, project: g/app, ref: main, repository: 'file:///tmp/r'",
            "name: b, project: g/app, ref: main, repository: 'file:///tmp/r'",
            "name: c, project: g/app, ref: dev",
        ]);
        let catalog = Catalog::new(&agents, None);
        let key = |branch: &str| RefKey {
            project: "g/app".into(),
            branch: branch.into(),
        };
        assert_eq!(
            catalog.source(&key("main")).map(|s| s.url.as_str()),
            Some("file:///tmp/r")
        );
        assert!(catalog.source(&key("dev")).is_none());
        assert!(catalog.source(&key("unwatched")).is_none());
    }

    #[test]
    fn private_badges_need_their_key_and_public_ones_nothing() {
        let secret = Secret::new("0123456789abcdef0123456789abcdef");
        let catalog = Catalog::new(&agents(), Some(&secret));
        let path = catalog.badge_path("prod").unwrap();
        let key = path
            .strip_prefix("/badges/prod/")
            .and_then(|rest| rest.strip_suffix(".svg"))
            .unwrap();
        assert_eq!(key.len(), BADGE_KEY_CHARS);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(catalog.badge_visible("prod", Some(key)));
        assert!(!catalog.badge_visible("prod", None));
        assert!(!catalog.badge_visible("prod", Some(&key[1..])));
        assert!(!catalog.badge_visible("nobody", Some(key)));
        // Keys are per agent.
        let docs_key = catalog.badge_key("docs").unwrap();
        assert_ne!(docs_key, key);
        assert!(!catalog.badge_visible("prod", Some(&docs_key)));
        assert_eq!(catalog.badge_path("docs").unwrap(), "/badges/docs.svg");
        assert!(catalog.badge_visible("docs", None));
        assert!(catalog.badge_visible("docs", Some(&docs_key)));
        // Another secret, other keys: rotating the secret revokes every URL.
        let other = Catalog::new(
            &agents(),
            Some(&Secret::new("another secret of enough bytes")),
        );
        assert!(!other.badge_visible("prod", Some(key)));
    }

    #[test]
    fn without_a_secret_private_badges_are_never_served() {
        let catalog = Catalog::new(&agents(), None);
        assert_eq!(catalog.badge_path("prod"), None);
        assert!(!catalog.badge_visible("prod", None));
        assert!(!catalog.badge_visible("prod", Some("")));
        assert!(catalog.badge_visible("docs", None));
        assert_eq!(catalog.badge_path("nobody"), None);
    }

    fn runtime(name: &str, token: &str, project: &str) -> RegisteredAgent {
        let yaml = format!(
            "agents:\n  - {{name: {name}, token_sha256: {}, project: {project}, ref: main}}\n",
            hex::encode(TokenHash::of(token).as_bytes())
        );
        RegisteredAgent {
            spec: Config::from_yaml(&yaml, &Overrides::default())
                .unwrap()
                .agents
                .remove(0),
            previous_token: None,
            previous_ci_token: None,
            created_ms: 0,
            updated_ms: 0,
        }
    }

    #[test]
    fn registry_changes_swap_in_a_new_snapshot_in_order() {
        let live = LiveCatalog::new(Catalog::new(&agents(), None));
        let changes = live.subscribe();
        let before = live.load();
        assert!(matches!(
            live.apply(1, "edge", Some(runtime("edge", "t1", "x")))
                .as_slice(),
            [CatalogChange::Added(_)]
        ));
        assert!(changes.has_changed().unwrap());
        assert!(before.agent("edge").is_none(), "a snapshot never changes");
        let now = live.load();
        assert!(now.is_runtime("edge") && !now.is_runtime("prod"));
        assert_eq!(now.agent_by_token("t1").unwrap().name, "edge");
        assert_eq!(
            now.watchers(&RefKey {
                project: "x".into(),
                branch: "main".into()
            }),
            ["prod", "docs", "edge"]
        );
        // An old entry heard again (after a reload saw it) changes nothing.
        assert!(live.apply(1, "edge", None).is_empty());
        assert!(live.load().agent("edge").is_some());
        // Moved to another project: the ref index follows.
        assert!(matches!(
            live.apply(2, "edge", Some(runtime("edge", "t1", "other")))
                .as_slice(),
            [CatalogChange::Updated { .. }]
        ));
        let now = live.load();
        assert_eq!(
            now.watchers(&RefKey {
                project: "x".into(),
                branch: "main".into()
            }),
            ["prod", "docs"]
        );
        assert_eq!(
            now.watchers(&RefKey {
                project: "other".into(),
                branch: "main".into()
            }),
            ["edge"]
        );
        assert!(matches!(
            live.apply(3, "edge", None).as_slice(),
            [CatalogChange::Removed(_)]
        ));
        let now = live.load();
        assert!(now.agent("edge").is_none() && now.agent_by_token("t1").is_none());
        assert!(now.refs().all(|key| key.project == "x"));
        assert_eq!(now.registry_seq(), 3);
    }

    #[test]
    fn a_runtime_agent_never_replaces_a_file_agent() {
        let live = LiveCatalog::new(Catalog::new(&agents(), None));
        assert!(
            live.apply(1, "prod", Some(runtime("prod", "t1", "other")))
                .is_empty()
        );
        assert!(live.apply(2, "prod", None).is_empty());
        let now = live.load();
        assert_eq!(now.agent("prod").unwrap().project, "x");
        assert!(now.agent_by_token("t1").is_none());
        assert!(!now.is_runtime("prod"));
    }

    #[test]
    fn a_rotated_out_token_is_accepted_until_its_time() {
        let live = LiveCatalog::new(Catalog::new(&agents(), None));
        let mut agent = runtime("edge", "new", "x");
        let until = crate::clock::now_ms() + 60_000;
        agent.previous_token = Some((TokenHash::of("old"), until));
        live.apply(1, "edge", Some(agent));
        let now = live.load();
        assert_eq!(now.agent_by_token("new").unwrap().name, "edge");
        assert_eq!(now.agent_by_token("old").unwrap().name, "edge");
        let old = TokenHash::of("old");
        assert_eq!(
            now.token_grant(&old, until - 1).unwrap().until_ms,
            Some(until)
        );
        assert!(now.token_grant(&old, until).is_none());
        assert_eq!(
            now.token_grant(&TokenHash::of("new"), i64::MAX)
                .unwrap()
                .until_ms,
            None
        );
    }

    #[test]
    fn a_reload_makes_the_runtime_agents_exactly_the_registry() {
        let live = LiveCatalog::new(Catalog::new(&agents(), None));
        live.apply(1, "a", Some(runtime("a", "ta", "x")));
        live.apply(2, "b", Some(runtime("b", "tb", "x")));
        assert!(live.reset(1, Vec::new(), false).is_empty(), "an older read");
        let changes = live.reset(
            7,
            vec![
                runtime("b", "tb", "x"),
                runtime("c", "tc", "x"),
                runtime("prod", "tp", "x"),
            ],
            false,
        );
        assert_eq!(
            described(&changes),
            ["-a/0", "+c/0"],
            "b is unchanged, prod is the file's"
        );
        let now = live.load();
        assert_eq!(now.registry_seq(), 7);
        assert!(now.agent_by_token("ta").is_none());
        assert!(now.agent_by_token("tp").is_none());
        assert!(
            live.apply(7, "d", Some(runtime("d", "td", "x"))).is_empty(),
            "seen by the reload"
        );
        // The store lost its data: its numbers start again.
        let changes = live.reset(0, Vec::new(), true);
        assert_eq!(changes.len(), 2);
        assert_eq!(live.load().registry_seq(), 0);
        assert_eq!(live.apply(1, "d", Some(runtime("d", "td", "x"))).len(), 1);
    }

    fn described(changes: &[CatalogChange]) -> Vec<String> {
        changes
            .iter()
            .map(|change| match change {
                CatalogChange::Added(spec) => format!("+{}/{}", spec.name, spec.incarnation),
                CatalogChange::Updated { after, .. } => {
                    format!("~{}/{}", after.name, after.incarnation)
                }
                CatalogChange::Removed(spec) => format!("-{}/{}", spec.name, spec.incarnation),
            })
            .collect()
    }

    #[test]
    fn an_agent_created_again_under_its_name_replaces_the_old_one_never_updates_it() {
        let life = |incarnation, token| {
            let mut agent = runtime("edge", token, "x");
            agent.spec.incarnation = incarnation;
            agent
        };
        let live = LiveCatalog::new(Catalog::new(&agents(), None));
        live.apply(1, "edge", Some(life(11, "t1")));
        assert_eq!(
            described(&live.apply(2, "edge", Some(life(11, "t2")))),
            ["~edge/11"],
            "a change of the same agent"
        );
        // Deleted and created again while this replica was away: a read of the whole
        // registry finds another agent under the name, even with the same definition.
        assert_eq!(
            described(&live.reset(5, vec![life(12, "t2")], false)),
            ["-edge/11", "+edge/12"]
        );
        assert_eq!(live.load().agent("edge").unwrap().incarnation, 12);
        assert_eq!(
            described(&live.apply(6, "edge", Some(life(13, "t3")))),
            ["-edge/12", "+edge/13"]
        );
        // Written back by a replica of a version that drops the field, mid-upgrade: the
        // same agent, changed.
        assert_eq!(
            described(&live.apply(7, "edge", Some(life(0, "t4")))),
            ["~edge/0"]
        );
    }
}
