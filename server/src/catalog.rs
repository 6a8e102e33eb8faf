//! The configured agents, indexed the ways requests find them.

use std::collections::{BTreeMap, HashMap};

use ring::hmac;
use subtle::ConstantTimeEq;

use crate::config::{AgentSpec, Secret, TokenHash};
use crate::git::RepoSource;
use crate::store::RefKey;

/// Hex characters of a badge key: 128 bits, beyond guessing.
const BADGE_KEY_CHARS: usize = 32;

/// Configured agents by name, by token, by the ref they watch, and by badge key.
#[derive(Default)]
pub struct Catalog {
    agents: BTreeMap<String, AgentSpec>,
    /// Derives each private badge's key; without it private badges are not served.
    badge_secret: Option<hmac::Key>,
    by_token: HashMap<[u8; 32], String>,
    by_ci_token: HashMap<[u8; 32], String>,
    by_ref: BTreeMap<RefKey, Vec<String>>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("agents", &self.agents)
            .field("badge_secret", &self.badge_secret.as_ref().map(|_| "…"))
            .finish_non_exhaustive()
    }
}

impl Catalog {
    /// Indexes `agents`; private badge keys are derived from `badge_secret`.
    pub fn new(agents: &[AgentSpec], badge_secret: Option<&Secret>) -> Self {
        let mut catalog = Catalog {
            badge_secret: badge_secret
                .map(|secret| hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes())),
            ..Catalog::default()
        };
        for agent in agents {
            catalog
                .by_token
                .insert(*agent.token.as_bytes(), agent.name.clone());
            if let Some(ci) = &agent.ci_token {
                catalog
                    .by_ci_token
                    .insert(*ci.as_bytes(), agent.name.clone());
            }
            catalog
                .by_ref
                .entry(ref_key(agent))
                .or_default()
                .push(agent.name.clone());
            catalog.agents.insert(agent.name.clone(), agent.clone());
        }
        catalog
    }

    /// The agent named `name`.
    pub fn agent(&self, name: &str) -> Option<&AgentSpec> {
        self.agents.get(name)
    }

    /// Every agent, by name.
    pub fn agents(&self) -> impl Iterator<Item = &AgentSpec> {
        self.agents.values()
    }

    /// The agent whose bearer token is `token`.
    pub fn agent_by_token(&self, token: &str) -> Option<&AgentSpec> {
        // Looking up the token's hash reveals nothing about the token through timing.
        let name = self.by_token.get(TokenHash::of(token).as_bytes())?;
        self.agents.get(name)
    }

    /// The agent whose CI token is `token`.
    pub fn agent_by_ci_token(&self, token: &str) -> Option<&AgentSpec> {
        let name = self.by_ci_token.get(TokenHash::of(token).as_bytes())?;
        self.agents.get(name)
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

    /// The repository of the agents watching `key`, if they have one (config validation
    /// ensures they share it).
    pub fn source(&self, key: &RefKey) -> Option<&RepoSource> {
        self.watchers(key)
            .iter()
            .find_map(|name| self.agents.get(name)?.source.as_ref())
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

/// The ref an agent watches.
pub fn ref_key(agent: &AgentSpec) -> RefKey {
    RefKey {
        project: agent.project.clone(),
        branch: agent.branch.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    fn agents() -> Vec<AgentSpec> {
        let hash = |n: u8| hex::encode([n; 32]);
        let yaml = format!(
            "agents:\n  - {{name: prod, token_sha256: {}, project: x, ref: main}}\n  - {{name: docs, token_sha256: {}, project: x, ref: main, badge: public}}\n",
            hash(1),
            hash(2)
        );
        Config::from_yaml(&yaml, &Overrides::default())
            .unwrap()
            .agents
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
}
