//! The server's configuration: the YAML file, validated into typed settings.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use std::time::Duration;

use crate::gate::Mode;
use crate::git::{GitSettings, Limits, RepoSource};
use crate::tls::TlsSettings;
use crate::trust::{IngestToken, WebhookSecrets};

/// Webhook request bodies larger than this are refused unless configured otherwise.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long a server stream may stay full before its reader counts as no longer reading.
pub const DEFAULT_STREAM_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the embedded store keeps its file unless told otherwise: beside where the server
/// was started, as the README's first command expects.
pub const DEFAULT_DATA_DIR: &str = "./greenlight-data";

/// Why a configuration cannot be used; names the key and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The SHA-256 of a bearer token; the server never keeps tokens themselves.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Parses 64 hex characters.
    pub fn parse_hex(hex_digest: &str) -> Option<Self> {
        let bytes = hex::decode(hex_digest.trim()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    /// The hash of `token`.
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// The digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `token` hashes to this, compared in constant time.
    pub fn matches(&self, token: &str) -> bool {
        Self::of(token).0.ct_eq(&self.0).into()
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({}…)", &hex::encode(self.0)[..8])
    }
}

/// A shared secret compared in constant time, never printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for sending it where it belongs.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time equality with what a client sent. The digests are compared, not the
    /// values: comparing bytes of unequal length returns early, which would tell the secret's
    /// length to whoever measures the answer time.
    pub fn matches(&self, candidate: &str) -> bool {
        let expected: [u8; 32] = Sha256::digest(self.0.as_bytes()).into();
        let given: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        expected.ct_eq(&given).into()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// Redis connection settings.
#[derive(Clone)]
pub struct RedisSettings {
    /// A single Redis server; empty when `cluster_nodes` is given.
    pub url: String,
    /// Seed nodes of a Redis Cluster; empty for a single server.
    pub cluster_nodes: Vec<String>,
    pub key_prefix: String,
}

impl RedisSettings {
    /// A single Redis server at `url`, under `key_prefix`.
    pub fn single(url: impl Into<String>, key_prefix: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            cluster_nodes: Vec::new(),
            key_prefix: key_prefix.into(),
        }
    }
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry the Redis password.
        f.debug_struct("RedisSettings")
            .field("url", &crate::redact::url(&self.url))
            .field(
                "cluster_nodes",
                &self
                    .cluster_nodes
                    .iter()
                    .map(|node| crate::redact::url(node))
                    .collect::<Vec<_>>(),
            )
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// One agent as the operator configured it.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub name: String,
    pub token: TokenHash,
    /// `path_with_namespace` or numeric project id, as written in the config.
    pub project: String,
    /// Branch name without `refs/heads/`.
    pub branch: String,
    pub mode: Mode,
    /// Pipeline mode: stages whose success opens the gate before the pipeline ends.
    pub required_stages: Vec<String>,
    /// Where its manifests live; without one, revisions carry no files.
    pub source: Option<RepoSource>,
    /// Globs selecting manifest files; empty means the default.
    pub paths: Vec<String>,
    pub apply: ApplySettings,
    /// CI jobs' token: may only trigger, read status of and wait for this agent.
    pub ci_token: Option<TokenHash>,
    /// Whether `GET /badges/<agent>.svg` answers without the agent's badge key.
    pub badge_public: bool,
    /// Whether merge requests into its branch get a preview from it: a note and a commit
    /// status `greenlight/<agent>/preview`.
    pub preview: bool,
    /// Which life of its name this agent is: a runtime agent deleted and created again
    /// under the same name gets a new one, so that what was written for the earlier one
    /// is told apart. 0 for an agent of the config file.
    pub incarnation: u64,
}

/// Talking back to GitLab.
#[derive(Debug, Clone)]
pub struct GitLabSettings {
    pub url: String,
    pub token: Secret,
    /// Base URL statuses link to (the badge of the agent); none when unset.
    pub status_target_url: Option<String>,
    pub catch_up_interval: Duration,
    /// How long a commit status another replica took may go unposted before this one takes
    /// it over (that replica died).
    pub status_takeover: Duration,
}

/// Objects a revision may prune unless an operator forces it.
pub const DEFAULT_PRUNE_LIMIT: u32 = 25;

/// How the agent applies a revision, managed centrally and sent with each revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplySettings {
    pub default_namespace: String,
    /// Namespaces (names or `*`/`?` globs) the agent may write to; the config default is
    /// the default namespace only.
    pub scope_namespaces: Vec<String>,
    /// Cluster-scoped kinds the agent may write; none by default.
    pub scope_cluster_kinds: Vec<String>,
    /// A revision pruning more objects than this is refused unless forced.
    pub prune_limit: u32,
    pub prune: bool,
    pub prune_propagation_policy: String,
    pub dry_run_strategy: String,
    pub health_timeout: Duration,
    pub reconcile_interval: Duration,
    pub force_conflicts: bool,
    /// How to judge kinds that follow no status convention.
    pub health_checks: Vec<HealthCheck>,
    /// The service account the agent acts as for the revision's objects, as its username
    /// (`system:serviceaccount:<namespace>:<name>`).
    pub impersonate: Option<String>,
}

/// The health of one kind by a JSONPath query and the values it should select.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// API group; empty (the default) for the core group.
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub jsonpath: String,
    pub healthy: Vec<String>,
    #[serde(default)]
    pub failed: Vec<String>,
}

impl Default for ApplySettings {
    fn default() -> Self {
        Self {
            default_namespace: "default".to_owned(),
            scope_namespaces: vec!["default".to_owned()],
            scope_cluster_kinds: Vec::new(),
            prune_limit: DEFAULT_PRUNE_LIMIT,
            prune: true,
            prune_propagation_policy: "background".to_owned(),
            dry_run_strategy: "none".to_owned(),
            health_timeout: Duration::from_secs(300),
            reconcile_interval: Duration::from_secs(300),
            force_conflicts: true,
            health_checks: Vec::new(),
            impersonate: None,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub redis: Option<RedisSettings>,
    /// Where the embedded store keeps its file when no Redis is configured.
    pub data_dir: PathBuf,
    pub webhook_secrets: WebhookSecrets,
    pub max_body_bytes: usize,
    pub admin_token: Option<TokenHash>,
    /// Ingest tokens; the unscoped `ingest.token_sha256` has no project list.
    pub ingest_tokens: Vec<IngestToken>,
    pub agents: Vec<AgentSpec>,
    /// This replica's name in presence records.
    pub replica_id: String,
    pub git: GitSettings,
    pub gitlab: Option<GitLabSettings>,
    /// Both listeners serve TLS with this certificate when set.
    pub tls: Option<TlsSettings>,
    /// Private badge URLs are derived from this; without it they are not served.
    pub badge_secret: Option<Secret>,
    /// Where spans are exported (OTLP/gRPC); none exports nothing.
    pub otlp_endpoint: Option<String>,
    /// A server stream whose reader leaves it full this long is ended.
    pub stream_stall_timeout: Duration,
}

/// Values from flags or environment that win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub grpc_listen: Option<String>,
    pub http_listen: Option<String>,
    pub redis_url: Option<String>,
    pub redis_key_prefix: Option<String>,
    pub replica_id: Option<String>,
    pub data_dir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    listen: ListenFile,
    redis: Option<RedisFile>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    webhooks: WebhooksFile,
    admin: Option<TokenFile>,
    ingest: Option<IngestFile>,
    #[serde(default)]
    agents: Vec<AgentFile>,
    replica_id: Option<String>,
    #[serde(default)]
    git: GitFile,
    gitlab: Option<GitLabFile>,
    tls: Option<TlsFile>,
    badges: Option<BadgesFile>,
    telemetry: Option<TelemetryFile>,
    #[serde(default)]
    streams: StreamsFile,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StreamsFile {
    stall_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TelemetryFile {
    otlp_endpoint: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BadgesFile {
    secret_file: PathBuf,
}

/// Shorter badge secrets could be guessed from a key and the agent name offline.
const MIN_BADGE_SECRET_BYTES: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GitLabFile {
    url: String,
    token_file: PathBuf,
    status_target_url: Option<String>,
    catch_up_interval: Option<String>,
    status_takeover: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GitFile {
    cache_dir: Option<PathBuf>,
    fetch_timeout: Option<String>,
    max_file_bytes: Option<ByteSize>,
    max_total_bytes: Option<ByteSize>,
    max_files: Option<usize>,
    max_tree_entries: Option<usize>,
    maintenance_interval: Option<Interval>,
    max_cache_bytes: Option<ByteSize>,
}

/// How often mirrors are kept up when not the default.
const DEFAULT_MAINTENANCE_INTERVAL: Duration = Duration::from_secs(6 * 3600);

/// A duration that may be switched off: `6h`, or `off`/`0` (YAML may read those as a boolean
/// or a number).
struct Interval(String);

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Interval;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as 6h, or off")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Interval, E> {
                Ok(Interval(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Interval, E> {
                Ok(Interval(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Interval, E> {
                Ok(Interval(if v { "on" } else { "off" }.to_owned()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `None` for `off`, `0` or a zero duration.
fn parse_interval(
    key: &str,
    value: Option<&Interval>,
    default: Duration,
) -> Result<Option<Duration>, ConfigError> {
    let Some(Interval(text)) = value else {
        return Ok(Some(default));
    };
    let text = text.trim();
    if text == "off" || humantime::parse_duration(text).is_ok_and(|d| d.is_zero()) || text == "0" {
        return Ok(None);
    }
    parse_duration(key, Some(text), default)
        .map(Some)
        .map_err(|_| {
            invalid(
                key,
                format!("{text:?} is not a duration such as 30m or 6h (at most 30 days), or off"),
            )
        })
}

/// A size written as a number of bytes or with a unit: `5MiB`, `512KiB`, `1GiB`.
struct ByteSize(String);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size such as 1048576, 512KiB or 5MiB")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                Ok(ByteSize(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

fn parse_size(key: &str, value: &ByteSize) -> Result<u64, ConfigError> {
    let text = value.0.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1000 * 1000,
        "GB" => 1000 * 1000 * 1000,
        other => {
            return Err(invalid(
                key,
                format!("unknown size unit {other:?}; use B, KiB, MiB or GiB"),
            ));
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .filter(|n| *n > 0)
        .ok_or_else(|| invalid(key, format!("{text:?} is not a positive size")))
}

/// Longer durations are mistakes, and would overflow deadline arithmetic.
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

fn parse_duration(
    key: &str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text)
            .ok()
            .filter(|d| !d.is_zero() && *d <= MAX_DURATION)
            .ok_or_else(|| {
                invalid(
                    key,
                    format!("{text:?} is not a duration such as 30s, 5m or 1h (at most 30 days)"),
                )
            }),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ListenFile {
    grpc: Option<String>,
    http: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedisFile {
    url: Option<String>,
    #[serde(default)]
    cluster_nodes: Vec<String>,
    key_prefix: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct WebhooksFile {
    gitlab: Option<GitLabHookFile>,
    max_body_bytes: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GitLabHookFile {
    secret_token: Option<String>,
    secret_token_file: Option<PathBuf>,
    #[serde(default)]
    projects: BTreeMap<ProjectFile, SecretFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretFile {
    secret_token: Option<String>,
    secret_token_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestFile {
    token_sha256: Option<String>,
    #[serde(default)]
    tokens: Vec<ScopedTokenFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopedTokenFile {
    token_sha256: String,
    projects: Vec<ProjectFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    token_sha256: String,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum ProjectFile {
    Path(String),
    Id(u64),
}

impl ProjectFile {
    /// The project as the catalog keys it: an id as digits, a path without outer slashes.
    fn normalized(self, key: &str) -> Result<String, ConfigError> {
        match self {
            ProjectFile::Id(id) => Ok(id.to_string()),
            ProjectFile::Path(path) if path.trim().trim_matches('/').is_empty() => {
                Err(invalid(key, "must not be empty"))
            }
            ProjectFile::Path(path) => Ok(path.trim().trim_matches('/').to_owned()),
        }
    }
}

impl<'de> Deserialize<'de> for ProjectFile {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ProjectFile;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a project path like group/app or a numeric project id")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ProjectFile, E> {
                Ok(ProjectFile::Path(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ProjectFile, E> {
                Ok(ProjectFile::Id(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ProjectFile, E> {
                u64::try_from(v)
                    .map(ProjectFile::Id)
                    .map_err(|_| E::custom("a project id is a positive number"))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    name: String,
    token_sha256: String,
    project: ProjectFile,
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(default)]
    gate: GateFile,
    repository: Option<String>,
    repository_token_file: Option<PathBuf>,
    #[serde(default)]
    paths: Vec<String>,
    default_namespace: Option<String>,
    scope: Option<ScopeFile>,
    prune: Option<bool>,
    prune_limit: Option<u32>,
    prune_propagation_policy: Option<String>,
    dry_run_strategy: Option<String>,
    health_timeout: Option<String>,
    reconcile_interval: Option<String>,
    force_conflicts: Option<bool>,
    #[serde(default)]
    health_checks: Vec<HealthCheck>,
    impersonate: Option<String>,
    ci_token_sha256: Option<String>,
    badge: Option<String>,
    #[serde(default)]
    preview: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ScopeFile {
    namespaces: Option<Vec<String>>,
    cluster_kinds: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GateFile {
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    stages: Vec<String>,
}

/// One agent as an entry of the config file's `agents:` writes it, without its tokens: what
/// the file's agents and the agents created at runtime are both validated from.
#[derive(Debug, Clone, Default)]
pub struct AgentDefinition {
    pub name: String,
    /// Normalized: a path without outer slashes, or a numeric id as digits.
    pub project: String,
    /// `ref`: a branch, with or without `refs/heads/`.
    pub git_ref: String,
    pub mode: Mode,
    pub stages: Vec<String>,
    pub repository: Option<String>,
    pub repository_token_file: Option<PathBuf>,
    pub paths: Vec<String>,
    pub default_namespace: Option<String>,
    pub scope_namespaces: Option<Vec<String>>,
    pub scope_cluster_kinds: Option<Vec<String>>,
    pub prune: Option<bool>,
    pub prune_limit: Option<u32>,
    pub prune_propagation_policy: Option<String>,
    pub dry_run_strategy: Option<String>,
    pub health_timeout: Option<String>,
    pub reconcile_interval: Option<String>,
    pub force_conflicts: Option<bool>,
    pub health_checks: Vec<HealthCheck>,
    pub impersonate: Option<String>,
    /// `public` or `private` (the default).
    pub badge: Option<String>,
    /// Whether merge requests into its branch get a preview from it.
    pub preview: bool,
}

impl AgentFile {
    /// The definition, and the token hashes as written.
    fn split(
        self,
        key: &dyn Fn(&str) -> String,
    ) -> Result<(AgentDefinition, TokenHash, Option<TokenHash>), ConfigError> {
        let token = token_hash(&key("token_sha256"), &self.token_sha256)?;
        let ci_token = self
            .ci_token_sha256
            .as_deref()
            .map(|h| token_hash(&key("ci_token_sha256"), h))
            .transpose()?;
        let scope = self.scope.unwrap_or_default();
        let definition = AgentDefinition {
            project: self.project.normalized(&key("project"))?,
            name: self.name,
            git_ref: self.git_ref,
            mode: self.gate.mode,
            stages: self.gate.stages,
            repository: self.repository,
            repository_token_file: self.repository_token_file,
            paths: self.paths,
            default_namespace: self.default_namespace,
            scope_namespaces: scope.namespaces,
            scope_cluster_kinds: scope.cluster_kinds,
            prune: self.prune,
            prune_limit: self.prune_limit,
            prune_propagation_policy: self.prune_propagation_policy,
            dry_run_strategy: self.dry_run_strategy,
            health_timeout: self.health_timeout,
            reconcile_interval: self.reconcile_interval,
            force_conflicts: self.force_conflicts,
            health_checks: self.health_checks,
            impersonate: self.impersonate,
            badge: self.badge,
            preview: self.preview,
        };
        Ok((definition, token, ci_token))
    }
}

impl AgentDefinition {
    /// Checks the definition and resolves its defaults; errors name the key as `key` spells
    /// it (`agents[3].paths[0]` for the file).
    pub fn validate(
        self,
        key: &dyn Fn(&str) -> String,
        token: TokenHash,
        ci_token: Option<TokenHash>,
    ) -> Result<AgentSpec, ConfigError> {
        // The name becomes part of Kubernetes object names (inventory) and label values.
        let bytes = self.name.as_bytes();
        let name_ok = !bytes.is_empty()
            && bytes.len() <= 40
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
            && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
            && bytes.last().is_some_and(u8::is_ascii_alphanumeric);
        if !name_ok {
            return Err(invalid(
                key("name"),
                format!(
                    "{:?} must be 1-40 lowercase letters, digits or '-', starting and ending with a letter or digit (it names Kubernetes objects)",
                    self.name
                ),
            ));
        }
        let project = self.project;
        // The stores join a project and branch with a control character into one key.
        if project.chars().any(char::is_control) {
            return Err(invalid(
                key("project"),
                format!("{project:?} must not hold control characters"),
            ));
        }
        let branch = self
            .git_ref
            .strip_prefix("refs/heads/")
            .unwrap_or(&self.git_ref)
            .to_owned();
        // Git refuses control characters in ref names; the stores' keys rely on it.
        if branch.is_empty() || branch.starts_with("refs/") || branch.chars().any(char::is_control)
        {
            return Err(invalid(
                key("ref"),
                format!("{:?} must be a branch name", self.git_ref),
            ));
        }
        let source = match (self.repository, self.repository_token_file) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(invalid(key("repository_token_file"), "needs `repository`"));
            }
            (Some(url), token_file) => {
                let url = url.trim().to_owned();
                if url.is_empty() {
                    return Err(invalid(key("repository"), "must not be empty"));
                }
                if token_file.is_some() && !url.starts_with("https://") {
                    return Err(invalid(
                        key("repository_token_file"),
                        "is only used with https:// repositories",
                    ));
                }
                Some(RepoSource { url, token_file })
            }
        };
        for (n, pattern) in self.paths.iter().enumerate() {
            if let Err(e) = globset::Glob::new(pattern) {
                return Err(invalid(
                    key(&format!("paths[{n}]")),
                    format!("{pattern:?} is not a valid glob: {e}"),
                ));
            }
        }
        if !self.stages.is_empty() && self.mode != Mode::Pipeline {
            return Err(invalid(key("gate.stages"), "only applies to pipeline mode"));
        }
        if self.stages.iter().any(|stage| stage.trim().is_empty()) {
            return Err(invalid(key("gate.stages"), "stage names must not be empty"));
        }
        // A stage no pipeline can report as passed would hold the gate shut for good.
        crate::trust::check_stages(self.stages.iter().map(String::as_str))
            .map_err(|e| invalid(key("gate.stages"), e.to_string()))?;
        let defaults = ApplySettings::default();
        let one_of = |field: &str, value: Option<String>, allowed: &[&str], default: String| {
            let value = value.unwrap_or(default);
            if allowed.contains(&value.as_str()) {
                Ok(value)
            } else {
                Err(invalid(
                    key(field),
                    format!("{value:?} must be one of {}", allowed.join(", ")),
                ))
            }
        };
        let default_namespace = self.default_namespace.unwrap_or(defaults.default_namespace);
        let scope_namespaces = match self.scope_namespaces {
            Some(patterns) if patterns.is_empty() => {
                return Err(invalid(
                    key("scope.namespaces"),
                    "must name at least one namespace; leave it out for the default namespace only",
                ));
            }
            Some(patterns) => patterns,
            // The least that lets manifests without a namespace be applied at all.
            None => vec![default_namespace.clone()],
        };
        for (n, pattern) in scope_namespaces.iter().enumerate() {
            let valid = !pattern.is_empty()
                && pattern.len() <= 63
                && pattern.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'*' | b'?')
                });
            if !valid {
                return Err(invalid(
                    key(&format!("scope.namespaces[{n}]")),
                    format!("{pattern:?} must be a namespace name, or a glob of one with * and ?"),
                ));
            }
        }
        let scope_cluster_kinds = self.scope_cluster_kinds.unwrap_or_default();
        for (n, listed) in scope_cluster_kinds.iter().enumerate() {
            if !is_cluster_kind(listed) {
                return Err(invalid(
                    key(&format!("scope.cluster_kinds[{n}]")),
                    format!(
                        "{listed:?} must be a kind such as Namespace or ClusterRole, or a kind \
                         and its group such as ClusterIssuer.cert-manager.io"
                    ),
                ));
            }
        }
        let prune_limit = match self.prune_limit {
            Some(0) => {
                return Err(invalid(
                    key("prune_limit"),
                    "must be greater than 0; use prune: false to never prune",
                ));
            }
            Some(limit) => limit,
            None => defaults.prune_limit,
        };
        let impersonate = self
            .impersonate
            .as_deref()
            .map(|sa| service_account_user(&key("impersonate"), sa, &default_namespace))
            .transpose()?;
        let apply = ApplySettings {
            default_namespace,
            scope_namespaces,
            scope_cluster_kinds,
            prune_limit,
            prune: self.prune.unwrap_or(defaults.prune),
            prune_propagation_policy: one_of(
                "prune_propagation_policy",
                self.prune_propagation_policy,
                &["orphan", "background", "foreground"],
                defaults.prune_propagation_policy,
            )?,
            dry_run_strategy: one_of(
                "dry_run_strategy",
                self.dry_run_strategy,
                &["none", "server"],
                defaults.dry_run_strategy,
            )?,
            health_timeout: parse_duration(
                &key("health_timeout"),
                self.health_timeout.as_deref(),
                defaults.health_timeout,
            )?,
            reconcile_interval: parse_duration(
                &key("reconcile_interval"),
                self.reconcile_interval.as_deref(),
                defaults.reconcile_interval,
            )?,
            force_conflicts: self.force_conflicts.unwrap_or(defaults.force_conflicts),
            health_checks: checked_health_checks(&key("health_checks"), self.health_checks)?,
            impersonate,
        };
        Ok(AgentSpec {
            token,
            name: self.name,
            project,
            branch,
            mode: self.mode,
            required_stages: self.stages,
            source,
            paths: self.paths,
            apply,
            ci_token,
            preview: self.preview,
            incarnation: 0,
            badge_public: match self.badge.as_deref() {
                None | Some("private") => false,
                Some("public") => true,
                Some(other) => {
                    return Err(invalid(
                        key("badge"),
                        format!("{other:?} must be public or private"),
                    ));
                }
            },
        })
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`, then applies `overrides`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let file = match path {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                parse_file(&text).map_err(|message| ConfigError::Parse {
                    path: path.to_owned(),
                    message,
                })?
            }
        };
        Self::validate(file, overrides)
    }

    /// Parses and validates YAML text, for tests and embedders.
    pub fn from_yaml(text: &str, overrides: &Overrides) -> Result<Self, ConfigError> {
        let file = parse_file(text).map_err(|message| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            message,
        })?;
        Self::validate(file, overrides)
    }

    fn validate(file: FileConfig, overrides: &Overrides) -> Result<Self, ConfigError> {
        let grpc_addr = socket_addr(
            "listen.grpc",
            overrides
                .grpc_listen
                .as_deref()
                .or(file.listen.grpc.as_deref())
                .unwrap_or("0.0.0.0:8150"),
        )?;
        let http_addr = socket_addr(
            "listen.http",
            overrides
                .http_listen
                .as_deref()
                .or(file.listen.http.as_deref())
                .unwrap_or("0.0.0.0:8080"),
        )?;
        let redis_url = overrides
            .redis_url
            .clone()
            .or_else(|| file.redis.as_ref().and_then(|r| r.url.clone()))
            .filter(|url| !url.trim().is_empty());
        let cluster_nodes: Vec<String> = file
            .redis
            .as_ref()
            .map(|r| r.cluster_nodes.clone())
            .unwrap_or_default();
        if redis_url.is_some() && !cluster_nodes.is_empty() {
            return Err(invalid(
                "redis.cluster_nodes",
                "set either redis.url (one server) or redis.cluster_nodes (a Redis Cluster), not both",
            ));
        }
        for node in &cluster_nodes {
            if !(node.starts_with("redis://") || node.starts_with("rediss://")) {
                return Err(invalid(
                    "redis.cluster_nodes",
                    format!(
                        "{:?} must start with redis:// or rediss://",
                        crate::redact::url(node)
                    ),
                ));
            }
        }
        let redis_target = match redis_url {
            Some(url) => Some((url, Vec::new())),
            None if !cluster_nodes.is_empty() => Some((String::new(), cluster_nodes)),
            None => None,
        };
        let redis = match redis_target {
            None => None,
            Some((url, cluster_nodes)) => {
                if cluster_nodes.is_empty()
                    && !(url.starts_with("redis://")
                        || url.starts_with("rediss://")
                        || url.starts_with("unix://"))
                {
                    return Err(invalid(
                        "redis.url",
                        format!(
                            "{:?} must start with redis://, rediss:// or unix://",
                            crate::redact::url(&url)
                        ),
                    ));
                }
                let key_prefix = overrides
                    .redis_key_prefix
                    .clone()
                    .or_else(|| file.redis.as_ref().and_then(|r| r.key_prefix.clone()))
                    .unwrap_or_else(|| "greenlight".to_owned());
                if key_prefix.is_empty() || key_prefix.contains(['{', '}', ' ']) {
                    return Err(invalid(
                        "redis.key_prefix",
                        "must be non-empty, without braces or spaces",
                    ));
                }
                Some(RedisSettings {
                    url,
                    cluster_nodes,
                    key_prefix,
                })
            }
        };
        let hooks = match file.webhooks.gitlab {
            None => None,
            Some(hook) => {
                let global =
                    read_secret("webhooks.gitlab", hook.secret_token, hook.secret_token_file)?;
                let mut projects = BTreeMap::new();
                for (project, secret) in hook.projects {
                    let project = project.normalized("webhooks.gitlab.projects")?;
                    let key = format!("webhooks.gitlab.projects.{project:?}");
                    let secret = read_secret(&key, secret.secret_token, secret.secret_token_file)?
                        .ok_or_else(|| invalid(&key, "needs secret_token or secret_token_file"))?;
                    // Spellings of one project (`group/app`, `/group/app/`) would each
                    // replace the other's secret.
                    if projects.insert(project, secret).is_some() {
                        return Err(invalid(
                            &key,
                            "is listed twice (keys are compared without surrounding slashes)",
                        ));
                    }
                }
                if global.is_none() && projects.is_empty() {
                    return Err(invalid(
                        "webhooks.gitlab",
                        "needs secret_token, secret_token_file or projects",
                    ));
                }
                Some((global, projects))
            }
        };
        let max_body_bytes = file
            .webhooks
            .max_body_bytes
            .unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            return Err(invalid("webhooks.max_body_bytes", "must be greater than 0"));
        }
        let admin_token = file
            .admin
            .map(|t| token_hash("admin.token_sha256", &t.token_sha256))
            .transpose()?;
        let mut ingest_tokens = Vec::new();
        if let Some(ingest) = file.ingest {
            if let Some(hash) = ingest.token_sha256 {
                ingest_tokens.push(IngestToken {
                    hash: token_hash("ingest.token_sha256", &hash)?,
                    projects: None,
                });
            }
            for (i, scoped) in ingest.tokens.into_iter().enumerate() {
                let key = |field: &str| format!("ingest.tokens[{i}].{field}");
                if scoped.projects.is_empty() {
                    return Err(invalid(
                        key("projects"),
                        "must name at least one project; use ingest.token_sha256 for all",
                    ));
                }
                let projects = scoped
                    .projects
                    .into_iter()
                    .enumerate()
                    .map(|(n, p)| p.normalized(&key(&format!("projects[{n}]"))))
                    .collect::<Result<Vec<_>, _>>()?;
                ingest_tokens.push(IngestToken {
                    hash: token_hash(&key("token_sha256"), &scoped.token_sha256)?,
                    projects: Some(projects),
                });
            }
        }

        let mut names = BTreeSet::new();
        let mut agents = Vec::with_capacity(file.agents.len());
        for (i, agent) in file.agents.into_iter().enumerate() {
            let key = |field: &str| format!("agents[{i}].{field}");
            if names.contains(&agent.name) {
                return Err(invalid(
                    key("name"),
                    format!("agent {:?} is configured twice", agent.name),
                ));
            }
            names.insert(agent.name.clone());
            let (definition, token, ci_token) = agent.split(&key)?;
            agents.push(definition.validate(&key, token, ci_token)?);
        }
        // A token must name one principal: a reused hash would let one agent act as another,
        // or a CI job as an admin.
        let mut principals: Vec<(String, &TokenHash)> = Vec::new();
        principals.extend(
            admin_token
                .as_ref()
                .map(|t| ("admin.token_sha256".to_owned(), t)),
        );
        let mut scoped = 0;
        for token in &ingest_tokens {
            let key = match token.projects {
                None => "ingest.token_sha256".to_owned(),
                Some(_) => {
                    scoped += 1;
                    format!("ingest.tokens[{}].token_sha256", scoped - 1)
                }
            };
            principals.push((key, &token.hash));
        }
        for (i, agent) in agents.iter().enumerate() {
            principals.push((format!("agents[{i}].token_sha256"), &agent.token));
            principals.extend(
                agent
                    .ci_token
                    .as_ref()
                    .map(|t| (format!("agents[{i}].ci_token_sha256"), t)),
            );
        }
        for (n, (key, hash)) in principals.iter().enumerate() {
            if let Some((first, _)) = principals[..n].iter().find(|(_, other)| other == hash) {
                return Err(invalid(
                    key.clone(),
                    format!("reuses the token of {first}; every principal needs its own token"),
                ));
            }
        }
        // A delivery is matched to agents by the project as the agents spell it; a secret
        // keyed otherwise (a path where agents use the id) would leave their project guarded
        // by the global secret only.
        let webhook_secrets = match hooks {
            None => WebhookSecrets::default(),
            Some((global, projects)) => {
                if let Some(unknown) = projects
                    .keys()
                    .find(|p| !agents.iter().any(|a| &a.project == *p))
                {
                    return Err(invalid(
                        format!("webhooks.gitlab.projects.{unknown:?}"),
                        "no agent watches this project; spell it exactly as the agents' `project`",
                    ));
                }
                WebhookSecrets { global, projects }
            }
        };
        // One repository per watched ref: the gate orders its commits by that history.
        for (i, agent) in agents.iter().enumerate() {
            let other = agents[..i]
                .iter()
                .find(|a| a.project == agent.project && a.branch == agent.branch);
            if let Some(other) = other
                && other.source.as_ref().map(|s| &s.url) != agent.source.as_ref().map(|s| &s.url)
            {
                return Err(invalid(
                    format!("agents[{i}].repository"),
                    format!(
                        "agent {:?} watches the same project and ref with another repository",
                        other.name
                    ),
                ));
            }
        }
        let limits = Limits::default();
        let git = GitSettings {
            cache_dir: file
                .git
                .cache_dir
                .unwrap_or_else(|| std::env::temp_dir().join("greenlight-git")),
            fetch_timeout: parse_duration(
                "git.fetch_timeout",
                file.git.fetch_timeout.as_deref(),
                Duration::from_secs(60),
            )?,
            limits: Limits {
                max_file_bytes: file
                    .git
                    .max_file_bytes
                    .as_ref()
                    .map(|v| parse_size("git.max_file_bytes", v))
                    .transpose()?
                    .unwrap_or(limits.max_file_bytes),
                max_total_bytes: file
                    .git
                    .max_total_bytes
                    .as_ref()
                    .map(|v| parse_size("git.max_total_bytes", v))
                    .transpose()?
                    .unwrap_or(limits.max_total_bytes),
                max_files: match file.git.max_files {
                    Some(0) => return Err(invalid("git.max_files", "must be greater than 0")),
                    Some(n) => n,
                    None => limits.max_files,
                },
                max_tree_entries: match file.git.max_tree_entries {
                    Some(0) => {
                        return Err(invalid("git.max_tree_entries", "must be greater than 0"));
                    }
                    Some(n) => n,
                    None => limits.max_tree_entries,
                },
            },
            maintenance_interval: parse_interval(
                "git.maintenance_interval",
                file.git.maintenance_interval.as_ref(),
                DEFAULT_MAINTENANCE_INTERVAL,
            )?,
            max_cache_bytes: file
                .git
                .max_cache_bytes
                .as_ref()
                .map(|v| parse_size("git.max_cache_bytes", v))
                .transpose()?,
        };
        let gitlab = match file.gitlab {
            None => None,
            Some(gitlab) => {
                if !(gitlab.url.starts_with("https://") || gitlab.url.starts_with("http://")) {
                    return Err(invalid(
                        "gitlab.url",
                        format!("{:?} must be an http(s) URL", gitlab.url),
                    ));
                }
                let token = std::fs::read_to_string(&gitlab.token_file).map_err(|e| {
                    invalid(
                        "gitlab.token_file",
                        format!("cannot read {}: {e}", gitlab.token_file.display()),
                    )
                })?;
                Some(GitLabSettings {
                    url: gitlab.url,
                    token: non_empty_secret("gitlab.token_file", token.trim().to_owned())?,
                    status_target_url: gitlab.status_target_url,
                    catch_up_interval: parse_duration(
                        "gitlab.catch_up_interval",
                        gitlab.catch_up_interval.as_deref(),
                        Duration::from_secs(300),
                    )?,
                    status_takeover: parse_duration(
                        "gitlab.status_takeover",
                        gitlab.status_takeover.as_deref(),
                        Duration::from_secs(300),
                    )?,
                })
            }
        };
        let tls = match file.tls {
            None => None,
            Some(tls) => {
                let settings = TlsSettings {
                    cert_file: tls.cert_file,
                    key_file: tls.key_file,
                };
                // Checked now so that check-config and a bad deploy fail before serving.
                crate::tls::load(&settings).map_err(|e| invalid("tls", e.to_string()))?;
                Some(settings)
            }
        };
        let badge_secret = match file.badges {
            None => None,
            Some(badges) => {
                let key = "badges.secret_file";
                let path = &badges.secret_file;
                let secret = std::fs::read_to_string(path)
                    .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
                let secret = secret.trim();
                if secret.len() < MIN_BADGE_SECRET_BYTES {
                    return Err(invalid(
                        key,
                        format!(
                            "{} holds {} bytes; use at least {MIN_BADGE_SECRET_BYTES} (openssl rand -hex 32)",
                            path.display(),
                            secret.len()
                        ),
                    ));
                }
                Some(Secret::new(secret))
            }
        };
        let stream_stall_timeout = parse_duration(
            "streams.stall_timeout",
            file.streams.stall_timeout.as_deref(),
            DEFAULT_STREAM_STALL_TIMEOUT,
        )?;
        let replica_id = overrides
            .replica_id
            .clone()
            .or(file.replica_id)
            .unwrap_or_else(default_replica_id);
        let data_dir = overrides
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        Ok(Config {
            grpc_addr,
            http_addr,
            redis,
            data_dir,
            webhook_secrets,
            max_body_bytes,
            admin_token,
            ingest_tokens,
            agents,
            replica_id,
            git,
            gitlab,
            tls,
            badge_secret,
            otlp_endpoint: file.telemetry.and_then(|t| t.otlp_endpoint),
            stream_stall_timeout,
        })
    }
}

fn parse_file(text: &str) -> Result<FileConfig, String> {
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_saphyr::from_str(text).map_err(|e| e.to_string())
}

/// The username of the service account `value` names, `<name>` (in `namespace`) or
/// `<namespace>/<name>`, each part a DNS label.
fn service_account_user(key: &str, value: &str, namespace: &str) -> Result<String, ConfigError> {
    let (namespace, name) = value.split_once('/').unwrap_or((namespace, value));
    let label = |part: &str| {
        !part.is_empty()
            && part.len() <= 253
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && !part.starts_with(['-', '.'])
            && !part.ends_with(['-', '.'])
    };
    if !label(namespace) || !label(name) {
        return Err(invalid(
            key,
            format!(
                "{value:?} is not a service account: give <name> (in the agent's default namespace) or <namespace>/<name>"
            ),
        ));
    }
    Ok(format!("system:serviceaccount:{namespace}:{name}"))
}

/// Whether `listed` is an entry of `scope.cluster_kinds`: a kind (`ClusterRole`), or a kind
/// and its API group (`ClusterIssuer.cert-manager.io`).
fn is_cluster_kind(listed: &str) -> bool {
    let (kind, group) = match listed.split_once('.') {
        Some((kind, group)) => (kind, Some(group)),
        None => (listed, None),
    };
    let kind_ok = kind.bytes().next().is_some_and(|b| b.is_ascii_uppercase())
        && kind.bytes().all(|b| b.is_ascii_alphanumeric());
    let group_ok = group.is_none_or(|group| {
        group.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
    });
    kind_ok && group_ok
}

/// `checks` once each query parses and no kind has two: a typo is an error at start, not
/// a revision that can never become healthy.
fn checked_health_checks(
    key: &str,
    checks: Vec<HealthCheck>,
) -> Result<Vec<HealthCheck>, ConfigError> {
    let mut seen = std::collections::BTreeSet::new();
    for (i, check) in checks.iter().enumerate() {
        let at = format!("{key}[{i}]");
        if check.kind.trim().is_empty() {
            return Err(invalid(format!("{at}.kind"), "must name a kind"));
        }
        if !seen.insert((check.group.as_str(), check.kind.as_str())) {
            return Err(invalid(
                format!("{at}.kind"),
                format!(
                    "a second check for {} in group {:?}",
                    check.kind, check.group
                ),
            ));
        }
        greenlight::health_check::HealthQuery::parse(
            &check.jsonpath,
            &check.healthy,
            &check.failed,
        )
        .map_err(|e| invalid(format!("{at}.jsonpath"), e.to_string()))?;
    }
    Ok(checks)
}

fn socket_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| invalid(key, format!("{value:?} is not a host:port socket address")))
}

fn token_hash(key: &str, value: &str) -> Result<TokenHash, ConfigError> {
    TokenHash::parse_hex(value).ok_or_else(|| {
        invalid(key, "must be the 64 hex characters of a SHA-256 (greenlight-server hash-token < token-file)")
    })
}

/// The secret set as `secret_token` or read from `secret_token_file` under `key`.
fn read_secret(
    key: &str,
    token: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    match (token, file) {
        (Some(_), Some(_)) => Err(invalid(
            key,
            "set secret_token or secret_token_file, not both",
        )),
        (Some(token), None) => Ok(Some(non_empty_secret(
            &format!("{key}.secret_token"),
            token,
        )?)),
        (None, Some(path)) => {
            let key = format!("{key}.secret_token_file");
            let token = std::fs::read_to_string(&path)
                .map_err(|e| invalid(&key, format!("cannot read {}: {e}", path.display())))?;
            Ok(Some(non_empty_secret(&key, token.trim().to_owned())?))
        }
        (None, None) => Ok(None),
    }
}

fn non_empty_secret(key: &str, value: String) -> Result<Secret, ConfigError> {
    if value.is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    Ok(Secret::new(value))
}

fn default_replica_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "greenlight".to_owned());
    format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn minimal_agent_config_is_valid() {
        let yaml = format!(
            "agents:\n  - name: prod-eu\n    token_sha256: {HASH}\n    project: group/app\n    ref: refs/heads/main\n"
        );
        let config = Config::from_yaml(&yaml, &Overrides::default()).unwrap();
        assert_eq!(config.agents[0].branch, "main");
        assert_eq!(config.agents[0].mode, Mode::Pipeline);
        assert!(config.redis.is_none());
        assert!(config.agents[0].token.matches("test"));
        assert!(!config.agents[0].token.matches("tesT"));
    }

    #[test]
    fn numeric_project_ids_are_accepted() {
        let yaml =
            format!("agents:\n  - {{name: a, token_sha256: {HASH}, project: 42, ref: main}}\n");
        assert_eq!(
            Config::from_yaml(&yaml, &Overrides::default())
                .unwrap()
                .agents[0]
                .project,
            "42"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let yaml = "agents:\n  - {name: a, token_sha256: nothex, project: x, ref: main}\n";
        let err = Config::from_yaml(yaml, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("agents[0].token_sha256"), "{err}");

        let err = Config::from_yaml("listen: {grpc: nowhere}", &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen.grpc"), "{err}");

        let err = Config::from_yaml("agentz: []", &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("agentz"), "{err}");

        let yaml = format!(
            "agents:\n  - {{name: a, token_sha256: {HASH}, project: x, ref: main, gate: {{mode: yolo}}}}\n"
        );
        let err = Config::from_yaml(&yaml, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("yolo"), "{err}");
    }

    /// The stores join a project and branch with a control character into one key, so
    /// neither may hold one; git refuses them in ref names anyway.
    #[test]
    fn control_characters_in_a_project_or_branch_are_refused() {
        for (project, git_ref, key, why) in [
            (
                "\"group\\u001fapp\"",
                "main",
                "agents[0].project",
                "control characters",
            ),
            (
                "group/app",
                "\"ma\\u001fin\"",
                "agents[0].ref",
                "a branch name",
            ),
        ] {
            let yaml = format!(
                "agents:\n  - {{name: a, token_sha256: {HASH}, project: {project}, ref: {git_ref}}}\n"
            );
            let err = Config::from_yaml(&yaml, &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(why), "{err}");
        }
    }

    #[test]
    fn duplicate_agent_names_are_refused() {
        let yaml = format!(
            "agents:\n  - {{name: a, token_sha256: {HASH}, project: x, ref: main}}\n  - {{name: a, token_sha256: {HASH}, project: other, ref: main}}\n"
        );
        let err = Config::from_yaml(&yaml, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("agents[1].name"), "{err}");
    }

    #[test]
    fn the_stream_stall_timeout_defaults_to_a_minute_and_may_be_set() {
        let agents =
            format!("agents:\n  - {{name: a, token_sha256: {HASH}, project: x, ref: main}}\n");
        let config = Config::from_yaml(&agents, &Overrides::default()).unwrap();
        assert_eq!(config.stream_stall_timeout, DEFAULT_STREAM_STALL_TIMEOUT);
        let yaml = format!("streams: {{stall_timeout: 2s}}\n{agents}");
        let config = Config::from_yaml(&yaml, &Overrides::default()).unwrap();
        assert_eq!(config.stream_stall_timeout, Duration::from_secs(2));
    }

    #[test]
    fn git_and_apply_settings_parse_with_units() {
        let yaml = format!(
            "git: {{max_file_bytes: 5MiB, max_total_bytes: 20971520, fetch_timeout: 30s}}\nagents:\n  - {{name: a, token_sha256: {HASH}, project: x, ref: main, repository: 'file:///tmp/r', paths: ['deploy/**/*.yaml'], prune: false, health_timeout: 2m, prune_propagation_policy: foreground}}\n"
        );
        let config = Config::from_yaml(&yaml, &Overrides::default()).unwrap();
        assert_eq!(config.git.limits.max_file_bytes, 5 * 1024 * 1024);
        assert_eq!(config.git.limits.max_total_bytes, 20 * 1024 * 1024);
        assert_eq!(config.git.fetch_timeout, Duration::from_secs(30));
        let agent = &config.agents[0];
        assert_eq!(agent.source.as_ref().unwrap().url, "file:///tmp/r");
        assert!(!agent.apply.prune);
        assert_eq!(agent.apply.health_timeout, Duration::from_secs(120));
        assert_eq!(agent.apply.prune_propagation_policy, "foreground");
    }

    #[test]
    fn health_checks_are_parsed_at_load_and_errors_name_the_check() {
        let agent = |checks: &str| {
            format!(
                "agents:\n  - {{name: a, token_sha256: {HASH}, project: x, ref: main, health_checks: [{checks}]}}\n"
            )
        };
        let config = Config::from_yaml(
            &agent("{group: example.com, kind: Widget, jsonpath: '$.status.phase', healthy: [Ready], failed: [Failed]}"),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.agents[0].apply.health_checks[0].kind, "Widget");
        let err = Config::from_yaml(
            &agent("{kind: Widget, jsonpath: '$.status[', healthy: [Ready]}"),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("agents[0].health_checks[0].jsonpath"), "{err}");
        let err = Config::from_yaml(
            &agent("{kind: Widget, jsonpath: '$.a', healthy: [x]}, {kind: Widget, jsonpath: '$.b', healthy: [y]}"),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("a second check for Widget"), "{err}");
    }

    #[test]
    fn impersonate_names_a_service_account_in_the_default_or_a_given_namespace() {
        let agent = |value: &str| {
            format!(
                "agents:\n  - {{name: a, token_sha256: {HASH}, project: x, ref: main, default_namespace: apps, impersonate: '{value}'}}\n"
            )
        };
        let parse = |value: &str| Config::from_yaml(&agent(value), &Overrides::default());
        assert_eq!(
            parse("deployer").unwrap().agents[0]
                .apply
                .impersonate
                .as_deref(),
            Some("system:serviceaccount:apps:deployer")
        );
        assert_eq!(
            parse("team/deployer").unwrap().agents[0]
                .apply
                .impersonate
                .as_deref(),
            Some("system:serviceaccount:team:deployer")
        );
        for bad in ["", "a/b/c", "Deployer", "team/", "system:admin"] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("agents[0].impersonate"), "{bad}: {err}");
        }
    }

    #[test]
    fn git_upkeep_settings_default_parse_and_switch_off() {
        let parse = |yaml: &str| Config::from_yaml(yaml, &Overrides::default());
        let defaults = parse("{}").unwrap().git;
        assert_eq!(
            defaults.maintenance_interval,
            Some(Duration::from_secs(6 * 3600))
        );
        assert_eq!(defaults.max_cache_bytes, None);
        let git = parse("git: {maintenance_interval: 30m, max_cache_bytes: 2GiB}")
            .unwrap()
            .git;
        assert_eq!(git.maintenance_interval, Some(Duration::from_secs(1800)));
        assert_eq!(git.max_cache_bytes, Some(2 << 30));
        for off in ["off", "'off'", "0", "0s"] {
            let yaml = format!("git: {{maintenance_interval: {off}}}");
            assert_eq!(
                parse(&yaml).unwrap().git.maintenance_interval,
                None,
                "{off}"
            );
        }
        for (yaml, key) in [
            (
                "git: {maintenance_interval: often}",
                "git.maintenance_interval",
            ),
            (
                "git: {maintenance_interval: on}",
                "git.maintenance_interval",
            ),
            (
                "git: {maintenance_interval: 60d}",
                "git.maintenance_interval",
            ),
            ("git: {max_cache_bytes: 0}", "git.max_cache_bytes"),
            ("git: {max_cache_bytes: 1TB}", "git.max_cache_bytes"),
        ] {
            let err = parse(yaml).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }

    #[test]
    fn bad_git_and_apply_settings_name_the_key() {
        let cases = [
            ("git: {max_file_bytes: 5XB}", "git.max_file_bytes"),
            ("git: {fetch_timeout: soon}", "git.fetch_timeout"),
            ("streams: {stall_timeout: 0s}", "streams.stall_timeout"),
            ("streams: {stall_timeout: soon}", "streams.stall_timeout"),
        ];
        for (yaml, key) in cases {
            let err = Config::from_yaml(yaml, &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err}");
        }
        let agent = |extra: &str| {
            format!(
                "agents:\n  - {{name: a, token_sha256: {HASH}, project: x, ref: main, {extra}}}\n"
            )
        };
        let cases = [
            ("dry_run_strategy: client", "agents[0].dry_run_strategy"),
            ("paths: ['a/[']", "agents[0].paths[0]"),
            (
                "repository: 'file:///r', repository_token_file: /t",
                "agents[0].repository_token_file",
            ),
            ("reconcile_interval: 0s", "agents[0].reconcile_interval"),
        ];
        for (extra, key) in cases {
            let err = Config::from_yaml(&agent(extra), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn tokens_and_names_are_checked() {
        const OTHER: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";
        let two = format!(
            "agents:\n  - {{name: a, token_sha256: {HASH}, project: x, ref: main}}\n  - {{name: b, token_sha256: {HASH}, project: x, ref: main}}\n"
        );
        let err = Config::from_yaml(&two, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("agents[1].token_sha256") && err.contains("agents[0].token_sha256"),
            "{err}"
        );
        let ci_is_admin = format!(
            "admin: {{token_sha256: {OTHER}}}\nagents:\n  - {{name: a, token_sha256: {HASH}, ci_token_sha256: {OTHER}, project: x, ref: main}}\n"
        );
        let err = Config::from_yaml(&ci_is_admin, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("agents[0].ci_token_sha256"), "{err}");
        let bad_name = format!(
            "agents:\n  - {{name: Prod_EU, token_sha256: {HASH}, project: x, ref: main}}\n"
        );
        let err = Config::from_yaml(&bad_name, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("agents[0].name"), "{err}");
        let forever = format!(
            "agents:\n  - {{name: a, token_sha256: {HASH}, project: x, ref: main, health_timeout: 300000000000y}}\n"
        );
        let err = Config::from_yaml(&forever, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("agents[0].health_timeout"), "{err}");
    }

    #[test]
    fn secrets_match_only_themselves_whatever_the_length() {
        let secret = Secret::new("webhook-secret");
        assert!(secret.matches("webhook-secret"));
        for wrong in [
            "",
            "w",
            "webhook-secreT",
            "webhook-secret ",
            "webhook-secret-longer",
        ] {
            assert!(!secret.matches(wrong), "{wrong:?}");
        }
        assert!(!Secret::new("a").matches(""));
    }

    #[test]
    fn scope_defaults_to_the_default_namespace_and_no_cluster_kinds() {
        let yaml = format!(
            "agents:\n  - {{name: a, token_sha256: {HASH}, project: x, ref: main, default_namespace: apps}}\n"
        );
        let apply = &Config::from_yaml(&yaml, &Overrides::default())
            .unwrap()
            .agents[0]
            .apply;
        assert_eq!(apply.scope_namespaces, ["apps"]);
        assert!(apply.scope_cluster_kinds.is_empty());
        assert_eq!(apply.prune_limit, DEFAULT_PRUNE_LIMIT);

        let yaml = format!(
            "agents:\n  - {{name: a, token_sha256: {HASH}, project: x, ref: main, prune_limit: 3, scope: {{namespaces: [apps, 'team-*'], cluster_kinds: [Namespace, ClusterRole, ClusterIssuer.cert-manager.io]}}}}\n"
        );
        let apply = &Config::from_yaml(&yaml, &Overrides::default())
            .unwrap()
            .agents[0]
            .apply;
        assert_eq!(apply.scope_namespaces, ["apps", "team-*"]);
        assert_eq!(
            apply.scope_cluster_kinds,
            ["Namespace", "ClusterRole", "ClusterIssuer.cert-manager.io"]
        );
        assert_eq!(apply.prune_limit, 3);

        let agent = |extra: &str| {
            format!(
                "agents:\n  - {{name: a, token_sha256: {HASH}, project: x, ref: main, {extra}}}\n"
            )
        };
        let cases = [
            ("scope: {namespaces: []}", "agents[0].scope.namespaces"),
            (
                "scope: {namespaces: [Apps]}",
                "agents[0].scope.namespaces[0]",
            ),
            (
                "scope: {namespaces: ['[a]']}",
                "agents[0].scope.namespaces[0]",
            ),
            (
                "scope: {cluster_kinds: [namespace]}",
                "agents[0].scope.cluster_kinds[0]",
            ),
            (
                "scope: {cluster_kinds: [ClusterIssuer.Cert-Manager.io]}",
                "agents[0].scope.cluster_kinds[0]",
            ),
            (
                "scope: {cluster_kinds: [ClusterIssuer.]}",
                "agents[0].scope.cluster_kinds[0]",
            ),
            (
                "scope: {cluster_kinds: ['ClusterIssuer.a..b']}",
                "agents[0].scope.cluster_kinds[0]",
            ),
            ("scope: {kinds: [Namespace]}", "kinds"),
            ("prune_limit: 0", "agents[0].prune_limit"),
            (
                &format!("gate: {{stages: [{}]}}", "s".repeat(256)),
                "agents[0].gate.stages",
            ),
        ];
        for (extra, key) in cases {
            let err = Config::from_yaml(&agent(extra), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn webhook_secrets_per_project_and_scoped_ingest_tokens() {
        const OTHER: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";
        let agents = format!(
            "agents:\n  - {{name: a, token_sha256: {HASH}, project: g/prod, ref: main}}\n  - {{name: b, token_sha256: {OTHER}, project: 42, ref: main}}\n"
        );
        let yaml = format!(
            "webhooks: {{gitlab: {{projects: {{g/prod: {{secret_token: p}}, 42: {{secret_token: b}}}}}}}}\ningest: {{tokens: [{{token_sha256: {HASH}0, projects: [g/prod]}}]}}\n{agents}"
        );
        // The hash above is one character too long on purpose: the key is named.
        let err = Config::from_yaml(&yaml, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("ingest.tokens[0].token_sha256"), "{err}");
        let third = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";
        let yaml = yaml.replace(&format!("{HASH}0"), third);
        let config = Config::from_yaml(&yaml, &Overrides::default()).unwrap();
        assert!(config.webhook_secrets.global.is_none());
        assert!(config.webhook_secrets.projects["g/prod"].matches("p"));
        assert!(config.webhook_secrets.projects["42"].matches("b"));
        assert_eq!(
            config.ingest_tokens[0].projects.as_deref(),
            Some(&["g/prod".to_owned()][..])
        );

        let cases = [
            (
                "webhooks: {gitlab: {projects: {g/nobody: {secret_token: x}}}}",
                "webhooks.gitlab.projects.\"g/nobody\"",
            ),
            (
                "webhooks: {gitlab: {projects: {g/prod: {}}}}",
                "webhooks.gitlab.projects.\"g/prod\"",
            ),
            ("webhooks: {gitlab: {}}", "webhooks.gitlab"),
            (
                "webhooks: {gitlab: {projects: {g/prod: {secret_token: p}, /g/prod/: {secret_token: q}}}}",
                "is listed twice",
            ),
            (
                "webhooks: {gitlab: {projects: {g/prod: {secret_token: ''}}}}",
                "webhooks.gitlab.projects.\"g/prod\".secret_token",
            ),
            (
                "ingest: {tokens: [{token_sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae, projects: []}]}",
                "ingest.tokens[0].projects",
            ),
            (
                &format!("ingest: {{token_sha256: {HASH}}}"),
                "ingest.token_sha256",
            ),
        ];
        for (extra, key) in cases {
            let err = Config::from_yaml(&format!("{extra}\n{agents}"), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn badge_and_tls_files_are_checked_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "tiny\n").unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "0123456789abcdef0123\n").unwrap();
        let badges = |path: &Path| format!("badges: {{secret_file: '{}'}}", path.display());
        let err = Config::from_yaml(&badges(&short), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("badges.secret_file") && err.contains("16"),
            "{err}"
        );
        let err = Config::from_yaml(&badges(&dir.path().join("none")), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("badges.secret_file"), "{err}");
        let config = Config::from_yaml(&badges(&good), &Overrides::default()).unwrap();
        assert!(
            config
                .badge_secret
                .is_some_and(|s| s.matches("0123456789abcdef0123"))
        );

        let tls = format!(
            "tls: {{cert_file: '{}', key_file: '{}'}}",
            good.display(),
            good.display()
        );
        let err = Config::from_yaml(&tls, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tls") && err.contains("no PEM certificate"),
            "{err}"
        );
    }

    #[test]
    fn redis_cluster_seeds_are_checked_and_exclusive_with_a_url() {
        let both = "redis: {url: 'redis://one:6379', cluster_nodes: ['redis://a:7000']}";
        let err = Config::from_yaml(both, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("redis.cluster_nodes") && err.contains("not both"),
            "{err}"
        );
        let bad = "redis: {cluster_nodes: ['http://:hunter2@a:7000']}";
        let err = Config::from_yaml(bad, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("must start with redis://") && !err.contains("hunter2"),
            "{err}"
        );
        let seeds = "redis: {cluster_nodes: ['redis://a:7000', 'redis://b:7001']}";
        let redis = Config::from_yaml(seeds, &Overrides::default())
            .unwrap()
            .redis
            .unwrap();
        assert_eq!(redis.cluster_nodes, ["redis://a:7000", "redis://b:7001"]);
        assert!(redis.url.is_empty());
        assert_eq!(redis.key_prefix, "greenlight");
    }

    #[test]
    fn redis_passwords_never_show() {
        let err = Config::from_yaml(
            "redis: {url: 'http://:hunter2@redis/?password=hunter2'}",
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("redis.url") && !err.contains("hunter2"),
            "{err}"
        );
        let config = Config::from_yaml(
            "redis: {url: 'redis://redis:6379/?password=hunter2'}",
            &Overrides::default(),
        )
        .unwrap();
        let shown = format!("{config:?}");
        assert!(
            shown.contains("redis:6379") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn overrides_win_over_the_file() {
        let overrides = Overrides {
            redis_url: Some("redis://127.0.0.1:1".into()),
            ..Default::default()
        };
        let config = Config::from_yaml("redis: {url: redis://elsewhere:6379}", &overrides).unwrap();
        assert_eq!(config.redis.unwrap().url, "redis://127.0.0.1:1");
    }

    use proptest::prelude::*;

    /// A project as the file names it.
    #[derive(Debug, Clone)]
    enum Project {
        Path(String),
        Id(u64),
    }

    /// One agent as a generator writes it into the file.
    #[derive(Debug, Clone)]
    struct GeneratedAgent {
        name: String,
        token: [u8; 32],
        project: Project,
        branch: String,
        full_ref: bool,
        mode: Mode,
        stages: Vec<String>,
        paths: Vec<String>,
        prune: Option<bool>,
        health_timeout_secs: Option<u64>,
    }

    fn agent_name() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?"
    }

    fn generated_agent() -> impl Strategy<Value = GeneratedAgent> {
        (
            (
                agent_name(),
                any::<[u8; 32]>(),
                prop_oneof![
                    "[a-z0-9_.-]{1,10}(/[a-z0-9_.-]{1,10}){1,2}".prop_map(Project::Path),
                    any::<u64>().prop_map(Project::Id),
                ],
                "[a-z0-9][a-z0-9._-]{0,20}",
                any::<bool>(),
            ),
            (
                prop::sample::select(vec![Mode::Pipeline, Mode::Immediate, Mode::Manual]),
                prop::collection::vec("[a-z][a-z0-9 _-]{0,10}[a-z0-9]", 0..3),
                prop::collection::vec(
                    prop::sample::select(vec!["deploy/**/*.yaml", "*.json", "k8s/{a,b}/*.yml"]),
                    0..3,
                ),
                prop::option::of(any::<bool>()),
                prop::option::of(1u64..=86_400),
            ),
        )
            .prop_map(
                |(
                    (name, token, project, branch, full_ref),
                    (mode, stages, paths, prune, health),
                )| {
                    GeneratedAgent {
                        name,
                        token,
                        project,
                        branch,
                        full_ref,
                        mode,
                        stages: if mode == Mode::Pipeline {
                            stages
                        } else {
                            Vec::new()
                        },
                        paths: paths.into_iter().map(str::to_owned).collect(),
                        prune,
                        health_timeout_secs: health,
                    }
                },
            )
    }

    fn yaml_of(agents: &[GeneratedAgent]) -> String {
        let mut yaml = String::from("agents:\n");
        for agent in agents {
            let project = match &agent.project {
                Project::Path(path) => format!("{path:?}"),
                Project::Id(id) => id.to_string(),
            };
            let git_ref = if agent.full_ref {
                format!("refs/heads/{}", agent.branch)
            } else {
                agent.branch.clone()
            };
            yaml += &format!(
                "  - name: {:?}\n    token_sha256: {}\n    project: {project}\n    ref: {git_ref:?}\n    gate:\n      mode: {}\n      stages: {:?}\n    paths: {:?}\n",
                agent.name,
                hex::encode(agent.token),
                agent.mode.as_str(),
                agent.stages,
                agent.paths,
            );
            if let Some(prune) = agent.prune {
                yaml += &format!("    prune: {prune}\n");
            }
            if let Some(secs) = agent.health_timeout_secs {
                yaml += &format!("    health_timeout: {secs}s\n");
            }
        }
        yaml
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics_the_config_parser(text in "\\PC{0,256}") {
            let _ = Config::from_yaml(&text, &Overrides::default());
        }

        #[test]
        fn arbitrary_config_like_yaml_never_panics_the_config_parser(
            text in "([-:{}\\[\\],&*!|>'\" \n]|agents|name|token_sha256|project|ref|gate|mode|stages|paths|listen|grpc|git|max_files|max_file_bytes|fetch_timeout|webhooks|redis|url|[a-z0-9]{1,4}|  ){0,64}",
        ) {
            let _ = Config::from_yaml(&text, &Overrides::default());
        }

        #[test]
        fn generated_agents_parse_back_to_what_was_written(
            agents in prop::collection::vec(generated_agent(), 1..5)
                .prop_filter("names and tokens are unique", |agents| {
                    let names: BTreeSet<_> = agents.iter().map(|a| &a.name).collect();
                    let tokens: BTreeSet<_> = agents.iter().map(|a| a.token).collect();
                    names.len() == agents.len() && tokens.len() == agents.len()
                }),
        ) {
            let yaml = yaml_of(&agents);
            let config = match Config::from_yaml(&yaml, &Overrides::default()) {
                Ok(config) => config,
                Err(err) => panic!("{err}\n{yaml}"),
            };
            prop_assert_eq!(config.agents.len(), agents.len());
            for (spec, agent) in config.agents.iter().zip(&agents) {
                prop_assert_eq!(&spec.name, &agent.name);
                prop_assert_eq!(spec.token.as_bytes(), &agent.token);
                let project = match &agent.project {
                    Project::Path(path) => path.trim_matches('/').to_owned(),
                    Project::Id(id) => id.to_string(),
                };
                prop_assert_eq!(&spec.project, &project);
                prop_assert_eq!(&spec.branch, &agent.branch);
                prop_assert_eq!(spec.mode, agent.mode);
                prop_assert_eq!(&spec.required_stages, &agent.stages);
                prop_assert_eq!(&spec.paths, &agent.paths);
                prop_assert_eq!(spec.apply.prune, agent.prune.unwrap_or(ApplySettings::default().prune));
                let health = agent
                    .health_timeout_secs
                    .map_or(ApplySettings::default().health_timeout, Duration::from_secs);
                prop_assert_eq!(spec.apply.health_timeout, health);
            }
        }
    }
}
