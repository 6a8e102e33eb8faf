//! `greenlightctl agent …`: agents managed at runtime through the admin API.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use super::Admin;
use super::output::{self, Format};
use crate::health_check::HealthQuery;
use crate::v1::{
    AgentDefinition, CreateAgentRequest, DeleteAgentRequest, GateMode, HealthCheck,
    RotateAgentTokenRequest, UpdateAgentRequest,
};

/// Runtime agent commands (admin token only).
#[derive(Subcommand)]
pub enum AgentCommand {
    /// Creates an agent and prints its token, which is shown only this once.
    Create {
        #[command(flatten)]
        definition: Definition,
        /// Also make a CI token for the agent (trigger, status and wait only).
        #[arg(long)]
        ci_token: bool,
    },
    /// Replaces a runtime agent's definition (its tokens, project and ref stay): settings
    /// left out, health checks too, take their defaults again.
    Update {
        #[command(flatten)]
        definition: Definition,
    },
    /// Deletes a runtime agent: its streams end and its tokens are refused.
    Delete { name: String },
    /// Gives a runtime agent a new token, printed only this once; the old one stays valid
    /// for the grace period.
    RotateToken {
        name: String,
        /// How long the old token stays valid (0s refuses it at once; at most 7 days).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        grace: Duration,
        /// Rotate the CI token instead of the agent's bearer token.
        #[arg(long)]
        ci: bool,
    },
}

/// How an agent's desired revision advances.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Mode {
    Pipeline,
    Immediate,
    Manual,
}

/// An agent's definition, as an entry of the server's `agents:` writes it.
#[derive(Args)]
pub struct Definition {
    /// 1-40 lowercase letters, digits or '-'.
    name: String,
    /// GitLab project: path (group/app) or numeric id.
    #[arg(long)]
    project: String,
    /// Branch to follow.
    #[arg(long = "ref")]
    git_ref: String,
    #[arg(long, value_enum, default_value_t = Mode::Pipeline)]
    mode: Mode,
    /// Pipeline mode: a stage whose success opens the gate (repeat for more).
    #[arg(long = "stage")]
    stages: Vec<String>,
    /// Git repository of the manifests.
    #[arg(long)]
    repository: Option<String>,
    /// File on every server replica holding the repository's token.
    #[arg(long)]
    repository_token_file: Option<String>,
    /// Glob selecting manifest files (repeat for more).
    #[arg(long = "path")]
    paths: Vec<String>,
    #[arg(long)]
    default_namespace: Option<String>,
    /// Namespace (or glob) the agent may write to (repeat for more).
    #[arg(long = "scope-namespace")]
    scope_namespaces: Vec<String>,
    /// Cluster-scoped kind the agent may write: ClusterRole, or ClusterIssuer.cert-manager.io
    /// for a kind outside Kubernetes' own groups (repeat for more).
    #[arg(long = "scope-cluster-kind")]
    scope_cluster_kinds: Vec<String>,
    /// Whether objects removed from the manifests are deleted.
    #[arg(long)]
    prune: Option<bool>,
    #[arg(long)]
    prune_limit: Option<u32>,
    /// How long a revision may take to become healthy (90s, 5m).
    #[arg(long)]
    health_timeout: Option<String>,
    /// How often the agent re-applies to correct drift (5m).
    #[arg(long)]
    reconcile_interval: Option<String>,
    /// Service account the agent acts as: name or namespace/name.
    #[arg(long)]
    impersonate: Option<String>,
    /// Serve the agent's badge without its key.
    #[arg(long)]
    badge_public: bool,
    /// Merge requests into its branch get a preview from it.
    #[arg(long)]
    preview: bool,
    /// Take over fields another field manager owns when applying.
    #[arg(long)]
    force_conflicts: Option<bool>,
    /// How pruned objects' dependents go: orphan, background or foreground.
    #[arg(long)]
    prune_propagation_policy: Option<String>,
    /// How a revision is checked before it is applied: none or server.
    #[arg(long)]
    dry_run_strategy: Option<String>,
    /// Health of a kind that follows no status convention, as an entry of `health_checks`
    /// in the config file, in JSON (repeat for more kinds):
    /// '{"group": "example.io", "kind": "Widget", "jsonpath": "$.status.phase",
    /// "healthy": ["Ready"], "failed": ["Broken"]}'
    #[arg(long = "health-check", value_parser = parse_health_check)]
    health_checks: Vec<HealthCheck>,
}

/// What a `--health-check` flag holds.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthCheckFlag {
    #[serde(default)]
    group: String,
    kind: String,
    jsonpath: String,
    #[serde(default)]
    healthy: Vec<String>,
    #[serde(default)]
    failed: Vec<String>,
}

/// One `--health-check`: a JSON object with the keys of a `health_checks` entry of the
/// config file, its JSONPath parsed here so that a typo is told before anything is sent.
fn parse_health_check(text: &str) -> Result<HealthCheck, String> {
    let example = "a JSON object such as {\"kind\": \"Widget\", \"jsonpath\": \
                   \"$.status.phase\", \"healthy\": [\"Ready\"]}";
    // An object only: serde would also take the fields in order from a list.
    let value = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .filter(serde_json::Value::is_object)
        .ok_or_else(|| format!("expected {example}"))?;
    let flag: HealthCheckFlag =
        serde_json::from_value(value).map_err(|error| format!("{error}, in {example}"))?;
    if flag.kind.trim().is_empty() {
        return Err("kind must name a kind".to_owned());
    }
    HealthQuery::parse(&flag.jsonpath, &flag.healthy, &flag.failed)
        .map_err(|error| error.to_string())?;
    Ok(HealthCheck {
        group: flag.group,
        kind: flag.kind,
        jsonpath: flag.jsonpath,
        healthy_values: flag.healthy,
        failed_values: flag.failed,
    })
}

impl Definition {
    fn into_proto(self) -> AgentDefinition {
        let mode = match self.mode {
            Mode::Pipeline => GateMode::Pipeline,
            Mode::Immediate => GateMode::Immediate,
            Mode::Manual => GateMode::Manual,
        };
        AgentDefinition {
            name: self.name,
            project: self.project,
            r#ref: self.git_ref,
            mode: mode.into(),
            stages: self.stages,
            repository: self.repository.unwrap_or_default(),
            repository_token_file: self.repository_token_file.unwrap_or_default(),
            paths: self.paths,
            default_namespace: self.default_namespace.unwrap_or_default(),
            scope_namespaces: self.scope_namespaces,
            scope_cluster_kinds: self.scope_cluster_kinds,
            prune: self.prune,
            prune_limit: self.prune_limit,
            health_timeout: self.health_timeout.unwrap_or_default(),
            reconcile_interval: self.reconcile_interval.unwrap_or_default(),
            impersonate: self.impersonate.unwrap_or_default(),
            badge_public: self.badge_public,
            preview: self.preview,
            force_conflicts: self.force_conflicts,
            prune_propagation_policy: self.prune_propagation_policy.unwrap_or_default(),
            dry_run_strategy: self.dry_run_strategy.unwrap_or_default(),
            health_checks: self.health_checks,
        }
    }
}

/// Prints a token shown this once.
fn token(format: Format, name: &str, token: &str, ci_token: &str) {
    match format {
        Format::Json => println!(
            "{}",
            json!({"name": name, "token": token, "ci_token": Some(ci_token).filter(|t| !t.is_empty())})
        ),
        Format::Human => {
            println!("agent {name}");
            if !token.is_empty() {
                println!("token: {token}");
            }
            if !ci_token.is_empty() {
                println!("ci token: {ci_token}");
            }
            eprintln!("these tokens are shown only now: the server keeps only their SHA-256");
        }
    }
}

/// Runs one runtime agent command.
pub async fn execute(
    admin: &mut Admin,
    format: Format,
    command: AgentCommand,
) -> anyhow::Result<()> {
    match command {
        AgentCommand::Create {
            definition,
            ci_token,
        } => {
            let created = admin
                .create_agent(CreateAgentRequest {
                    agent: Some(definition.into_proto()),
                    ci_token,
                })
                .await?
                .into_inner();
            let name = created
                .agent
                .as_ref()
                .map(|a| a.name.as_str())
                .unwrap_or_default();
            token(format, name, &created.token, &created.ci_token);
        }
        AgentCommand::Update { definition } => {
            let status = admin
                .update_agent(UpdateAgentRequest {
                    agent: Some(definition.into_proto()),
                })
                .await?
                .into_inner();
            output::status(format, &status);
        }
        AgentCommand::Delete { name } => {
            admin
                .delete_agent(DeleteAgentRequest { name: name.clone() })
                .await?;
            match format {
                Format::Json => println!("{}", json!({"deleted": name})),
                Format::Human => println!("agent {name} deleted"),
            }
        }
        AgentCommand::RotateToken { name, grace, ci } => {
            let grace_seconds = u32::try_from(grace.as_secs())
                .map_err(|_| anyhow::anyhow!("--grace is too long"))?;
            let rotated = admin
                .rotate_agent_token(RotateAgentTokenRequest {
                    name: name.clone(),
                    grace_seconds: Some(grace_seconds),
                    ci_token: ci,
                })
                .await?
                .into_inner();
            let (bearer, ci_token) = if ci {
                ("", rotated.token.as_str())
            } else {
                (rotated.token.as_str(), "")
            };
            match format {
                Format::Json => println!(
                    "{}",
                    json!({
                        "name": name,
                        "token": Some(bearer).filter(|t| !t.is_empty()),
                        "ci_token": Some(ci_token).filter(|t| !t.is_empty()),
                        "previous_valid_until_unix_ms": rotated.previous_valid_until_unix_ms,
                    })
                ),
                Format::Human => {
                    token(format, &name, bearer, ci_token);
                    if rotated.previous_valid_until_unix_ms > 0 {
                        println!(
                            "the old token is accepted for {} more",
                            humantime::format_duration(grace)
                        );
                    } else {
                        println!("the old token is refused from now on");
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        definition: Definition,
    }

    #[test]
    fn every_setting_has_a_flag() {
        let flags = Flags::try_parse_from([
            "agent",
            "edge",
            "--project",
            "group/app",
            "--ref",
            "main",
            "--preview",
            "--force-conflicts",
            "true",
            "--prune-propagation-policy",
            "foreground",
            "--dry-run-strategy",
            "server",
            "--health-check",
            r#"{"group": "example.io", "kind": "Widget", "jsonpath": "$.status.phase", "healthy": ["Ready"], "failed": ["Broken"]}"#,
            "--health-check",
            r#"{"kind": "Gadget", "jsonpath": "$.status.conditions[?@.type == 'Synced'].status", "healthy": ["True"]}"#,
        ])
        .unwrap();
        let definition = flags.definition.into_proto();
        assert!(definition.preview);
        assert_eq!(definition.force_conflicts, Some(true));
        assert_eq!(definition.prune_propagation_policy, "foreground");
        assert_eq!(definition.dry_run_strategy, "server");
        assert_eq!(definition.mode(), GateMode::Pipeline);
        assert_eq!(
            definition.health_checks,
            [
                HealthCheck {
                    group: "example.io".into(),
                    kind: "Widget".into(),
                    jsonpath: "$.status.phase".into(),
                    healthy_values: vec!["Ready".into()],
                    failed_values: vec!["Broken".into()],
                },
                HealthCheck {
                    group: String::new(),
                    kind: "Gadget".into(),
                    jsonpath: "$.status.conditions[?@.type == 'Synced'].status".into(),
                    healthy_values: vec!["True".into()],
                    failed_values: Vec::new(),
                },
            ]
        );
    }

    #[test]
    fn a_health_check_flag_that_cannot_work_says_why() {
        let refused = |text: &str| parse_health_check(text).unwrap_err();
        assert!(refused("Widget").contains("JSON object"));
        assert!(refused(r#"["Widget"]"#).contains("JSON object"));
        assert!(
            refused(r#"{"jsonpath": "$.a", "healthy": ["x"]}"#).contains("missing field `kind`")
        );
        assert!(refused(r#"{"kind": " ", "jsonpath": "$.a", "healthy": ["x"]}"#).contains("kind"));
        assert!(refused(r#"{"kind": "W", "healthy": ["x"]}"#).contains("missing field `jsonpath`"));
        assert!(refused(r#"{"kind": "W", "jsonpath": "$.a"}"#).contains("no healthy values"));
        assert!(refused(r#"{"kind": "W", "jsonpath": "$[", "healthy": ["x"]}"#).contains("$["));
        assert!(
            refused(r#"{"kind": 7, "jsonpath": "$.a", "healthy": ["x"]}"#)
                .contains("expected a string")
        );
        assert!(
            refused(r#"{"kind": "W", "jsonpath": "$.a", "healthy": "x"}"#)
                .contains("expected a sequence")
        );
        assert!(
            refused(r#"{"kind": "W", "jsonpath": "$.a", "healthy": [1]}"#)
                .contains("expected a string")
        );
        let unknown =
            refused(r#"{"kind": "W", "jsonpath": "$.a", "healthy": ["x"], "healthy_values": []}"#);
        assert!(
            unknown.contains("unknown field `healthy_values`, expected one of `group`, `kind`"),
            "{unknown}"
        );
    }

    proptest::proptest! {
        /// Whatever is typed after the flag gets an answer, never a panic, and what is
        /// accepted names a kind and a value that makes it healthy.
        #[test]
        fn any_health_check_flag_is_parsed_or_refused(text in "\\PC{0,80}") {
            if let Ok(check) = parse_health_check(&text) {
                proptest::prop_assert!(!check.kind.trim().is_empty());
                proptest::prop_assert!(!check.healthy_values.is_empty());
            }
        }

        #[test]
        fn a_check_written_as_json_reads_back_as_written(
            group in "[a-z.]{0,12}",
            kind in "[A-Z][a-zA-Z]{0,11}",
            field in "[a-z]{1,10}",
            healthy in proptest::collection::vec("\\PC{0,8}", 1..4),
            failed in proptest::collection::vec("\\PC{0,8}", 0..3),
        ) {
            let jsonpath = format!("$.status.{field}");
            let text = json!({
                "group": group, "kind": kind, "jsonpath": jsonpath,
                "healthy": healthy, "failed": failed,
            })
            .to_string();
            let check = parse_health_check(&text).unwrap();
            proptest::prop_assert_eq!(check, HealthCheck {
                group, kind, jsonpath, healthy_values: healthy, failed_values: failed,
            });
        }
    }
}
