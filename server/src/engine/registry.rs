//! Agents managed at runtime: the admin API's create, update, delete and token rotation,
//! written to the store's registry, and every replica applying the registry's changes from
//! the change log to its catalog, index and evaluator.
//!
//! The config file seeds the catalog: its agents cannot be changed at runtime, and a runtime
//! agent can never take a file agent's name.

use std::sync::Arc;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use tracing::{info, warn};

use super::Engine;
use crate::catalog::{Catalog, CatalogChange, ref_key};
use crate::clock::now_ms;
use crate::config::{AgentDefinition, AgentSpec, TokenHash};
use crate::store::{RegisteredAgent, RegistryRecord, RegistryWritten, StoreError};

/// How long a token replaced by a rotation stays valid unless the request says otherwise:
/// time enough to roll the new one out to the agent.
pub const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(3600);
/// The longest grace period a rotation may give the old token.
pub const MAX_ROTATION_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Random bytes in a generated token: 256 bits, hex-encoded.
const TOKEN_BYTES: usize = 32;

/// Why a change of the registry was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot reach the store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
    #[error("no agent named {0:?} is configured")]
    NotFound(String),
    #[error("agent {0:?} exists already")]
    Exists(String),
    #[error(
        "agent {0:?} is defined in the server's config file, which only the file can change; \
         edit the file and restart the server"
    )]
    FileAgent(String),
    #[error("{0}")]
    Conflicting(String),
    #[error("agent {0:?} was changed by another request at the same time; try again")]
    Concurrent(String),
    #[error("cannot generate a token: the system's random source failed")]
    Random,
}

/// A created agent and its tokens, which the server shows this once.
#[derive(Debug)]
pub struct Created {
    pub spec: Arc<AgentSpec>,
    pub token: String,
    pub ci_token: Option<String>,
}

/// A rotated token, shown this once, and until when the old one is still accepted.
#[derive(Debug)]
pub struct Rotated {
    pub token: String,
    /// Unix ms; 0 when the replaced token was refused at once (or there was none).
    pub previous_valid_until_ms: i64,
}

/// `N` bytes from the system's random source.
fn random<const N: usize>() -> Result<[u8; N], RegistryError> {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| RegistryError::Random)?;
    Ok(bytes)
}

/// A new random token.
fn new_token() -> Result<String, RegistryError> {
    Ok(hex::encode(random::<TOKEN_BYTES>()?))
}

/// A new agent's incarnation: random and never 0, which stands for "not recorded".
fn new_incarnation() -> Result<u64, RegistryError> {
    Ok(u64::from_le_bytes(random()?).max(1))
}

/// Refuses an agent that would watch a ref other agents watch with another repository: the
/// gate orders a ref's commits by one history.
fn check_repository(catalog: &Catalog, spec: &AgentSpec) -> Result<(), RegistryError> {
    let key = ref_key(spec);
    let other = catalog
        .watchers(&key)
        .iter()
        .filter(|name| **name != spec.name)
        .find_map(|name| catalog.agent(name))
        .filter(|other| {
            other.source.as_ref().map(|s| &s.url) != spec.source.as_ref().map(|s| &s.url)
        });
    match other {
        Some(other) => Err(RegistryError::Conflicting(format!(
            "repository: agent {:?} watches {key} with another repository; agents of one ref \
             share its repository",
            other.name
        ))),
        None => Ok(()),
    }
}

/// Refuses a repository token file that no agent of the config file uses: the server sends
/// the file's content to the repository's host, so an admin call naming any file would let
/// it read the server's other secrets. The file's operator vets which files are tokens.
fn check_token_file(catalog: &Catalog, spec: &AgentSpec) -> Result<(), RegistryError> {
    let Some(file) = spec.source.as_ref().and_then(|s| s.token_file.as_ref()) else {
        return Ok(());
    };
    let vetted = catalog
        .agents()
        .filter(|agent| !catalog.is_runtime(&agent.name))
        .any(|agent| agent.source.as_ref().and_then(|s| s.token_file.as_ref()) == Some(file));
    if vetted {
        Ok(())
    } else {
        Err(RegistryError::Conflicting(format!(
            "repository_token_file: {} is not the token file of an agent in the server's config \
             file; a runtime agent may only use those",
            file.display()
        )))
    }
}

impl Engine {
    /// Applies registry change `seq` to this replica: `record` is `name`'s new definition,
    /// none when it was deleted.
    pub(crate) fn apply_registry(&self, seq: u64, name: &str, record: Option<&RegistryRecord>) {
        let agent = match record.map(|record| record.decode(name)).transpose() {
            Ok(agent) => agent,
            Err(error) => {
                warn!(%error, agent = name, "ignoring a registry change this replica cannot read");
                return;
            }
        };
        for change in self.catalog.apply(seq, name, agent) {
            self.catalog_changed(change);
        }
    }

    /// Reads the whole registry and makes the catalog match it: at start, and after this
    /// replica missed log entries (`force`: the store may have lost its data).
    pub(super) async fn reload_registry(&self, force: bool) -> Result<(), StoreError> {
        let registry = self.store.registry().await?;
        let mut agents = Vec::with_capacity(registry.agents.len());
        for record in &registry.agents {
            match record.value.decode(record.value.name()) {
                Ok(agent) => agents.push(agent),
                Err(error) => warn!(%error, "ignoring a runtime agent this replica cannot read"),
            }
        }
        for change in self.catalog.reset(registry.seq, agents, force) {
            self.catalog_changed(change);
        }
        Ok(())
    }

    /// Brings the index and the evaluator in step with a changed catalog.
    fn catalog_changed(&self, change: CatalogChange) {
        match change {
            CatalogChange::Added(spec) => {
                info!(agent = spec.name, "agent created at runtime");
                self.index.add(&spec.name, spec.incarnation);
                self.evaluate_new(&spec);
            }
            CatalogChange::Updated { after, .. } => {
                info!(agent = after.name, "agent updated at runtime");
                self.evaluator.forget_agent(&after.name);
                self.evaluate_new(&after);
            }
            CatalogChange::Removed(spec) => {
                info!(agent = spec.name, "agent deleted at runtime");
                self.evaluator.forget_agent(&spec.name);
                self.index.remove(&spec.name);
            }
        }
    }

    /// Evaluates the ref of a new or changed agent: after fetching its repository, if it has
    /// one, so that the gate sees the commits.
    fn evaluate_new(&self, spec: &AgentSpec) {
        let key = ref_key(spec);
        if spec.source.is_some() {
            self.evaluator.fetch_then_reevaluate(key, None, None);
        } else {
            self.evaluator
                .enqueue(&key, crate::evaluate::Asked::default());
        }
    }

    /// The agent under `name` as the store has it now, for what must not act on an older
    /// view: this replica's catalog may not have heard of a runtime agent's creation or
    /// deletion yet. `None` when there is none.
    pub async fn agent_now(&self, name: &str) -> Result<Option<Arc<AgentSpec>>, StoreError> {
        let catalog = self.catalog();
        if !catalog.is_runtime(name)
            && let Some(file_agent) = catalog.agent_arc(name)
        {
            return Ok(Some(file_agent));
        }
        Ok(self
            .stored(name)
            .await?
            .map(|(_, agent)| Arc::new(agent.spec)))
    }

    /// Runtime agent `name` as the store's registry holds it, with its record's version.
    async fn stored(&self, name: &str) -> Result<Option<(u64, RegisteredAgent)>, StoreError> {
        let Some(stored) = self.store.registered(name).await? else {
            return Ok(None);
        };
        Ok(Some((stored.version, stored.value.decode(name)?)))
    }

    /// The runtime agent `name`, refusing a file agent and an unknown one.
    async fn runtime_record(&self, name: &str) -> Result<(u64, RegisteredAgent), RegistryError> {
        let catalog = self.catalog();
        if catalog.agent(name).is_some() && !catalog.is_runtime(name) {
            return Err(RegistryError::FileAgent(name.to_owned()));
        }
        self.stored(name)
            .await?
            .ok_or_else(|| RegistryError::NotFound(name.to_owned()))
    }

    /// Writes `agent` over version `expected` and applies the change here at once, so that
    /// this replica answers for it before the log brings it back.
    async fn put(&self, agent: &RegisteredAgent, expected: u64) -> Result<(), RegistryError> {
        let name = agent.spec.name.clone();
        let record = RegistryRecord::from(agent);
        match self
            .store
            .change_registered(&name, Some(&record), expected)
            .await?
        {
            RegistryWritten::Saved { seq } => {
                self.apply_registry(seq, &name, Some(&record));
                Ok(())
            }
            RegistryWritten::Conflict if expected == 0 => Err(RegistryError::Exists(name)),
            RegistryWritten::Conflict => Err(RegistryError::Concurrent(name)),
        }
    }

    /// Creates an agent from `definition`, with a CI token too if `ci_token`; answers its
    /// tokens, which are stored only as hashes.
    pub async fn create_agent(
        &self,
        definition: AgentDefinition,
        ci_token: bool,
    ) -> Result<Created, RegistryError> {
        let name = definition.name.clone();
        let catalog = self.catalog();
        if catalog.agent(&name).is_some() {
            return Err(if catalog.is_runtime(&name) {
                RegistryError::Exists(name)
            } else {
                RegistryError::FileAgent(name)
            });
        }
        let token = new_token()?;
        let ci = ci_token.then(new_token).transpose()?;
        let mut spec = definition
            .validate(
                &|field| field.to_owned(),
                TokenHash::of(&token),
                ci.as_deref().map(TokenHash::of),
            )
            .map_err(|error| RegistryError::Invalid(error.to_string()))?;
        spec.incarnation = new_incarnation()?;
        check_repository(&catalog, &spec)?;
        check_token_file(&catalog, &spec)?;
        let now = now_ms();
        let agent = RegisteredAgent {
            spec,
            previous_token: None,
            previous_ci_token: None,
            created_ms: now,
            updated_ms: now,
        };
        self.put(&agent, 0).await?;
        Ok(Created {
            spec: Arc::new(agent.spec),
            token,
            ci_token: ci,
        })
    }

    /// Replaces the definition of runtime agent `definition.name`; its tokens stay. Its
    /// project and ref cannot change: its gate state belongs to that ref.
    pub async fn update_agent(
        &self,
        definition: AgentDefinition,
    ) -> Result<Arc<AgentSpec>, RegistryError> {
        let name = definition.name.clone();
        let (version, mut agent) = self.runtime_record(&name).await?;
        let mut spec = definition
            .validate(
                &|field| field.to_owned(),
                agent.spec.token.clone(),
                agent.spec.ci_token.clone(),
            )
            .map_err(|error| RegistryError::Invalid(error.to_string()))?;
        // The same agent, changed: what was written for it still is its own.
        spec.incarnation = agent.spec.incarnation;
        if spec.project != agent.spec.project || spec.branch != agent.spec.branch {
            return Err(RegistryError::Invalid(format!(
                "project and ref of agent {name:?} cannot change (they are {}); delete it and \
                 create it again to watch another ref",
                ref_key(&agent.spec)
            )));
        }
        check_repository(&self.catalog(), &spec)?;
        check_token_file(&self.catalog(), &spec)?;
        agent.spec = spec;
        agent.updated_ms = now_ms();
        self.put(&agent, version).await?;
        Ok(Arc::new(agent.spec))
    }

    /// Deletes runtime agent `name` and what is stored about it; its streams end and its
    /// tokens are refused on every replica.
    pub async fn delete_agent(&self, name: &str) -> Result<(), RegistryError> {
        let (version, _) = self.runtime_record(name).await?;
        match self.store.change_registered(name, None, version).await? {
            RegistryWritten::Saved { seq } => {
                self.apply_registry(seq, name, None);
                Ok(())
            }
            RegistryWritten::Conflict => Err(RegistryError::Concurrent(name.to_owned())),
        }
    }

    /// Gives runtime agent `name` a new bearer token (its CI token with `ci`), keeping the
    /// old one valid for `grace`.
    pub async fn rotate_token(
        &self,
        name: &str,
        grace: Duration,
        ci: bool,
    ) -> Result<Rotated, RegistryError> {
        if grace > MAX_ROTATION_GRACE {
            return Err(RegistryError::Invalid(format!(
                "grace_seconds: at most {} (7 days)",
                MAX_ROTATION_GRACE.as_secs()
            )));
        }
        let (version, mut agent) = self.runtime_record(name).await?;
        let token = new_token()?;
        let now = now_ms();
        let until = now.saturating_add(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX));
        let keep =
            |old: Option<TokenHash>| old.filter(|_| !grace.is_zero()).map(|old| (old, until));
        if ci {
            agent.previous_ci_token = keep(agent.spec.ci_token.replace(TokenHash::of(&token)));
        } else {
            let old = std::mem::replace(&mut agent.spec.token, TokenHash::of(&token));
            agent.previous_token = keep(Some(old));
        }
        let previous_valid_until_ms = if ci {
            agent
                .previous_ci_token
                .as_ref()
                .map_or(0, |(_, until)| *until)
        } else {
            agent.previous_token.as_ref().map_or(0, |(_, until)| *until)
        };
        agent.updated_ms = now;
        self.put(&agent, version).await?;
        Ok(Rotated {
            token,
            previous_valid_until_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_distinct() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_eq!(a.len(), 2 * TOKEN_BYTES);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
