//! The registry of agents created at runtime: one versioned record per agent, the agent's
//! resolved definition and the hashes of its tokens (never the tokens themselves).
//!
//! Every change bumps one registry-wide sequence number and is appended to the change log
//! in the same atomic step, carrying the record itself: each replica applies the changes in
//! log order without reading the store, and a replica re-reading the whole registry (after
//! missed entries) knows, by the sequence number, which later entries it has seen already.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{Result, StoreError, Versioned, is_zero};
use crate::clock::millis;
use crate::config::{AgentSpec, ApplySettings, HealthCheck, TokenHash};
use crate::gate::Mode;
use crate::git::RepoSource;

/// The registry as read at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    /// The sequence number of the last change: log entries up to it are reflected here.
    pub seq: u64,
    /// Each record's version is the sequence number of its last change.
    pub agents: Vec<Versioned<RegistryRecord>>,
}

/// What a conditional change of the registry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryWritten {
    /// Done, as change number `seq` (the record's new version).
    Saved { seq: u64 },
    /// The record's version was not the one expected: someone else changed it first.
    Conflict,
}

/// The agents created at runtime.
#[async_trait]
pub trait RegistryStore: Send + Sync {
    /// Every registered agent, and the sequence number the registry was read at.
    async fn registry(&self) -> Result<Registry>;

    /// The record of `name`, if registered.
    async fn registered(&self, name: &str) -> Result<Option<Versioned<RegistryRecord>>>;

    /// Writes `record` (or deletes `name` when `None`, with its stored state, decisions and
    /// reports) if the stored record's version is `expected` (0: none stored), and appends
    /// the change to the log in the same atomic step. A write whose record is already stored
    /// under another version (the same write, repeated) is answered as saved at that version.
    async fn change_registered(
        &self,
        name: &str,
        record: Option<&RegistryRecord>,
        expected: u64,
    ) -> Result<RegistryWritten>;
}

/// A runtime agent as stored: versioned, converted to and from [`RegisteredAgent`] here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "v")]
pub enum RegistryRecord {
    #[serde(rename = "1")]
    V1(RegistryRecordV1),
}

/// Version 1 of a runtime agent's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryRecordV1 {
    pub name: String,
    pub project: String,
    pub branch: String,
    pub mode: Mode,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_token_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    pub apply: ApplyV1,
    #[serde(default)]
    pub badge_public: bool,
    #[serde(default)]
    pub preview: bool,
    /// Hex SHA-256 of the bearer token.
    pub token_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_token_sha256: Option<String>,
    /// The bearer token a rotation replaced, and until when (Unix ms) it is still accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_token: Option<(String, i64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_ci_token: Option<(String, i64)>,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// [`AgentSpec::incarnation`]; 0 in records of versions that did not keep one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub incarnation: u64,
}

/// Version 1 of an agent's apply settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyV1 {
    pub default_namespace: String,
    pub scope_namespaces: Vec<String>,
    #[serde(default)]
    pub scope_cluster_kinds: Vec<String>,
    pub prune_limit: u32,
    pub prune: bool,
    pub prune_propagation_policy: String,
    pub dry_run_strategy: String,
    pub health_timeout_ms: u64,
    pub reconcile_interval_ms: u64,
    pub force_conflicts: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health_checks: Vec<HealthCheckV1>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impersonate: Option<String>,
}

/// Version 1 of a health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheckV1 {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub jsonpath: String,
    pub healthy: Vec<String>,
    #[serde(default)]
    pub failed: Vec<String>,
}

/// A runtime agent as the server uses it.
#[derive(Debug, Clone)]
pub struct RegisteredAgent {
    pub spec: AgentSpec,
    /// The bearer token a rotation replaced, accepted until the time (Unix ms).
    pub previous_token: Option<(TokenHash, i64)>,
    pub previous_ci_token: Option<(TokenHash, i64)>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

impl From<&RegisteredAgent> for RegistryRecord {
    fn from(agent: &RegisteredAgent) -> Self {
        let spec = &agent.spec;
        let apply = &spec.apply;
        let hex = |hash: &TokenHash| hex::encode(hash.as_bytes());
        RegistryRecord::V1(RegistryRecordV1 {
            name: spec.name.clone(),
            project: spec.project.clone(),
            branch: spec.branch.clone(),
            mode: spec.mode,
            stages: spec.required_stages.clone(),
            repository: spec.source.as_ref().map(|s| s.url.clone()),
            repository_token_file: spec.source.as_ref().and_then(|s| s.token_file.clone()),
            paths: spec.paths.clone(),
            apply: ApplyV1 {
                default_namespace: apply.default_namespace.clone(),
                scope_namespaces: apply.scope_namespaces.clone(),
                scope_cluster_kinds: apply.scope_cluster_kinds.clone(),
                prune_limit: apply.prune_limit,
                prune: apply.prune,
                prune_propagation_policy: apply.prune_propagation_policy.clone(),
                dry_run_strategy: apply.dry_run_strategy.clone(),
                health_timeout_ms: millis(apply.health_timeout),
                reconcile_interval_ms: millis(apply.reconcile_interval),
                force_conflicts: apply.force_conflicts,
                health_checks: apply
                    .health_checks
                    .iter()
                    .map(|c| HealthCheckV1 {
                        group: c.group.clone(),
                        kind: c.kind.clone(),
                        jsonpath: c.jsonpath.clone(),
                        healthy: c.healthy.clone(),
                        failed: c.failed.clone(),
                    })
                    .collect(),
                impersonate: apply.impersonate.clone(),
            },
            badge_public: spec.badge_public,
            preview: spec.preview,
            token_sha256: hex(&spec.token),
            ci_token_sha256: spec.ci_token.as_ref().map(hex),
            previous_token: agent
                .previous_token
                .as_ref()
                .map(|(hash, until)| (hex(hash), *until)),
            previous_ci_token: agent
                .previous_ci_token
                .as_ref()
                .map(|(hash, until)| (hex(hash), *until)),
            created_ms: agent.created_ms,
            updated_ms: agent.updated_ms,
            incarnation: spec.incarnation,
        })
    }
}

impl RegistryRecord {
    /// The agent's name.
    pub fn name(&self) -> &str {
        let RegistryRecord::V1(record) = self;
        &record.name
    }

    /// The agent's [`AgentSpec::incarnation`].
    pub fn incarnation(&self) -> u64 {
        let RegistryRecord::V1(record) = self;
        record.incarnation
    }

    /// The agent this record describes; `key` names the record in errors.
    pub fn decode(&self, key: &str) -> Result<RegisteredAgent> {
        let RegistryRecord::V1(r) = self;
        let hash = |field: &str, hex: &str| {
            TokenHash::parse_hex(hex).ok_or_else(|| StoreError::Corrupt {
                key: key.to_owned(),
                reason: format!("{field} is not a SHA-256 digest"),
            })
        };
        let previous = |field: &str, held: &Option<(String, i64)>| {
            held.as_ref()
                .map(|(hex, until)| Ok::<_, StoreError>((hash(field, hex)?, *until)))
                .transpose()
        };
        let apply = &r.apply;
        Ok(RegisteredAgent {
            spec: AgentSpec {
                name: r.name.clone(),
                token: hash("token_sha256", &r.token_sha256)?,
                project: r.project.clone(),
                branch: r.branch.clone(),
                mode: r.mode,
                required_stages: r.stages.clone(),
                source: r.repository.as_ref().map(|url| RepoSource {
                    url: url.clone(),
                    token_file: r.repository_token_file.clone(),
                }),
                paths: r.paths.clone(),
                apply: ApplySettings {
                    default_namespace: apply.default_namespace.clone(),
                    scope_namespaces: apply.scope_namespaces.clone(),
                    scope_cluster_kinds: apply.scope_cluster_kinds.clone(),
                    prune_limit: apply.prune_limit,
                    prune: apply.prune,
                    prune_propagation_policy: apply.prune_propagation_policy.clone(),
                    dry_run_strategy: apply.dry_run_strategy.clone(),
                    health_timeout: Duration::from_millis(apply.health_timeout_ms),
                    reconcile_interval: Duration::from_millis(apply.reconcile_interval_ms),
                    force_conflicts: apply.force_conflicts,
                    health_checks: apply
                        .health_checks
                        .iter()
                        .map(|c| HealthCheck {
                            group: c.group.clone(),
                            kind: c.kind.clone(),
                            jsonpath: c.jsonpath.clone(),
                            healthy: c.healthy.clone(),
                            failed: c.failed.clone(),
                        })
                        .collect(),
                    impersonate: apply.impersonate.clone(),
                },
                ci_token: r
                    .ci_token_sha256
                    .as_deref()
                    .map(|hex| hash("ci_token_sha256", hex))
                    .transpose()?,
                badge_public: r.badge_public,
                preview: r.preview,
                incarnation: r.incarnation,
            },
            previous_token: previous("previous_token", &r.previous_token)?,
            previous_ci_token: previous("previous_ci_token", &r.previous_ci_token)?,
            created_ms: r.created_ms,
            updated_ms: r.updated_ms,
        })
    }

    /// The record as stored.
    pub fn encode(&self) -> String {
        // Serialising plain data into a string cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Decodes a stored record of `key`.
    pub fn parse(key: &str, text: &[u8]) -> Result<Self> {
        serde_json::from_slice(text).map_err(|error| StoreError::Corrupt {
            key: key.to_owned(),
            reason: error.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    fn spec() -> AgentSpec {
        let yaml = format!(
            "agents:\n  - name: edge-1\n    token_sha256: {}\n    ci_token_sha256: {}\n    project: group/app\n    ref: main\n    gate: {{mode: pipeline, stages: [test]}}\n    repository: https://gitlab.example/group/app.git\n    repository_token_file: /run/token\n    paths: ['deploy/**']\n    default_namespace: apps\n    scope: {{namespaces: [apps, 'team-*'], cluster_kinds: [Namespace]}}\n    prune_limit: 7\n    health_timeout: 90s\n    health_checks: [{{group: example.io, kind: Widget, jsonpath: '$.status.phase', healthy: [Ready], failed: [Broken]}}]\n    impersonate: deployer\n    badge: public\n",
            hex::encode([1; 32]),
            hex::encode([2; 32]),
        );
        Config::from_yaml(&yaml, &Overrides::default())
            .unwrap()
            .agents
            .remove(0)
    }

    #[test]
    fn records_round_trip_every_setting_and_token_hash() {
        let agent = RegisteredAgent {
            spec: AgentSpec {
                incarnation: 0x1234_5678_9abc,
                ..spec()
            },
            previous_token: Some((TokenHash::of("old"), 1_700_000_000_000)),
            previous_ci_token: None,
            created_ms: 5,
            updated_ms: 6,
        };
        let record = RegistryRecord::from(&agent);
        let text = record.encode();
        assert!(text.starts_with("{\"v\":\"1\""), "{text}");
        assert!(!text.contains("\"old\""), "only hashes are stored");
        let parsed = RegistryRecord::parse("k", text.as_bytes()).unwrap();
        assert_eq!(parsed, record);
        let back = parsed.decode("k").unwrap();
        let (spec, original) = (&back.spec, &agent.spec);
        assert_eq!(spec.name, original.name);
        assert_eq!(spec.project, original.project);
        assert_eq!(spec.branch, original.branch);
        assert_eq!(spec.mode, original.mode);
        assert_eq!(spec.required_stages, original.required_stages);
        assert_eq!(spec.source, original.source);
        assert_eq!(spec.paths, original.paths);
        assert_eq!(spec.apply, original.apply);
        assert_eq!(spec.token, original.token);
        assert_eq!(spec.ci_token, original.ci_token);
        assert!(spec.badge_public);
        assert_eq!(back.previous_token, agent.previous_token);
        assert_eq!((back.created_ms, back.updated_ms), (5, 6));
        assert_eq!(spec.incarnation, 0x1234_5678_9abc);
        assert_eq!(parsed.name(), "edge-1");
        // A record of a version that kept no incarnation: 0, which every entry of the log
        // fits, as that version took them.
        let older = text.replace(",\"incarnation\":20015998343868", "");
        assert_ne!(older, text);
        let older = RegistryRecord::parse("k", older.as_bytes()).unwrap();
        assert_eq!(older.decode("k").unwrap().spec.incarnation, 0);
    }

    #[test]
    fn corrupt_records_are_clear_errors() {
        assert!(RegistryRecord::parse("k", b"{\"v\":\"9\"}").is_err());
        assert!(RegistryRecord::parse("k", b"not json").is_err());
        let mut record = RegistryRecord::from(&RegisteredAgent {
            spec: spec(),
            previous_token: None,
            previous_ci_token: None,
            created_ms: 0,
            updated_ms: 0,
        });
        let RegistryRecord::V1(inner) = &mut record;
        inner.token_sha256 = "zz".into();
        let error = record.decode("reg").unwrap_err().to_string();
        assert!(
            error.contains("reg") && error.contains("token_sha256"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn changes_are_conditional_numbered_and_logged_with_their_record() {
        use crate::store::{
            AgentStore, AgentWrite, Broadcast, ChangeLog, DeployedChange, EmbeddedStore, Notice,
            Written,
        };
        let store = EmbeddedStore::new();
        let mut log = store.subscribe();
        let record = RegistryRecord::from(&RegisteredAgent {
            spec: spec(),
            previous_token: None,
            previous_ci_token: None,
            created_ms: 1,
            updated_ms: 1,
        });
        // State left by an earlier agent of the same name is not inherited.
        let state = crate::store::AgentState::default();
        let write = AgentWrite {
            incarnation: 0,
            agent: "edge-1",
            expected: 0,
            state: &state,
            decisions: &[],
            deployed: &DeployedChange::Unchanged,
        };
        assert!(matches!(
            store.write_agent(&write).await.unwrap(),
            Written::Saved { .. }
        ));
        let created = store
            .change_registered("edge-1", Some(&record), 0)
            .await
            .unwrap();
        assert_eq!(created, RegistryWritten::Saved { seq: 1 });
        // Empty, its version going on past the state it replaced.
        let born = store.agent("edge-1").await.unwrap();
        assert_eq!((born.version, born.value), (2, state.clone()));
        assert_eq!(
            store
                .change_registered("edge-1", Some(&record), 0)
                .await
                .unwrap(),
            RegistryWritten::Saved { seq: 1 },
            "the same write, repeated"
        );
        let another = RegistryRecord::from(&RegisteredAgent {
            spec: spec(),
            previous_token: None,
            previous_ci_token: None,
            created_ms: 2,
            updated_ms: 2,
        });
        assert_eq!(
            store
                .change_registered("edge-1", Some(&another), 0)
                .await
                .unwrap(),
            RegistryWritten::Conflict,
            "exists already"
        );
        assert_eq!(
            store.change_registered("edge-1", None, 7).await.unwrap(),
            RegistryWritten::Conflict,
            "not the version read"
        );
        let held = store.registered("edge-1").await.unwrap().unwrap();
        assert_eq!((held.version, &held.value), (1, &record));
        assert_eq!(
            store.change_registered("edge-1", None, 1).await.unwrap(),
            RegistryWritten::Saved { seq: 2 }
        );
        let registry = store.registry().await.unwrap();
        assert_eq!((registry.seq, registry.agents.len()), (2, 0));
        let mut heard = Vec::new();
        while let Ok(Notice::Message(message)) = log.try_recv() {
            if let Broadcast::Registry { agent, seq, record } = message {
                heard.push((agent, seq, record.is_some()));
            }
        }
        assert_eq!(
            heard,
            [
                ("edge-1".to_owned(), 1, true),
                ("edge-1".to_owned(), 2, false)
            ]
        );
    }
}
