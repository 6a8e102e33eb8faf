//! The configured agents, indexed the ways requests find them.

use std::collections::{BTreeMap, HashMap};

use crate::config::{AgentSpec, TokenHash};
use crate::git::RepoSource;
use crate::store::RefKey;

/// Configured agents by name, by token and by the ref they watch.
#[derive(Debug, Default)]
pub struct Catalog {
    agents: BTreeMap<String, AgentSpec>,
    by_token: HashMap<[u8; 32], String>,
    by_ci_token: HashMap<[u8; 32], String>,
    by_ref: BTreeMap<RefKey, Vec<String>>,
}

impl Catalog {
    /// Indexes `agents`.
    pub fn new(agents: &[AgentSpec]) -> Self {
        let mut catalog = Catalog::default();
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
