//! `greenlightctl`: Greenlight for operators and CI jobs. The binary is a thin wrapper around
//! [`run`], so tests exercise the same code.

pub mod output;
pub mod registry;
pub mod wait;

use std::time::Duration;

use crate::v1::admin_service_client::AdminServiceClient;
use crate::v1::{
    GetAgentHistoryRequest, GetAgentRequest, GetPreviewRequest, ListAgentsRequest,
    PauseSyncRequest, PinRevisionRequest, ResumeSyncRequest, TriggerSyncRequest,
    UnpinRevisionRequest,
};
use anyhow::Context;
use clap::{Parser, Subcommand};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use self::output::Format;
use crate::auth::Bearer;
use crate::connect;

#[derive(Parser)]
#[command(
    version,
    about = "Operate Greenlight: status, trigger, pause, pin, wait, manage agents"
)]
struct Cli {
    /// Server gRPC address: http://host:8150 or https://host:8150.
    #[arg(
        long,
        env = "GREENLIGHT_SERVER",
        global = true,
        default_value = "http://127.0.0.1:8150"
    )]
    server: String,
    /// CA certificate (PEM) to trust for the server's TLS certificate.
    #[arg(long, env = "GREENLIGHT_CA_FILE", global = true)]
    ca_file: Option<std::path::PathBuf>,
    /// Allow a plaintext http:// server address that is not loopback (the token then
    /// crosses the network in the clear).
    #[arg(long, env = "GREENLIGHT_INSECURE", global = true)]
    insecure: bool,
    /// Admin token, or an agent's CI token (trigger, status and wait for that agent only).
    #[arg(long, env = "GREENLIGHT_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Format::Human)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lists the agents.
    Agents,
    /// Creates, updates, deletes an agent at runtime, or rotates its token (admin only).
    Agent {
        // Boxed: the definition's flags make it far larger than the other commands.
        #[command(subcommand)]
        command: Box<registry::AgentCommand>,
    },
    /// Shows an agent: desired and applied revision, health, last report, last decision.
    Status { agent: String },
    /// Shows an agent's recent reports and decisions.
    History { agent: String },
    /// Requests a sync: deploys SHA (or the head) in manual mode, re-syncs otherwise.
    Trigger {
        agent: String,
        #[arg(long)]
        sha: Option<String>,
        /// Lets this revision prune more objects than the agent's prune limit (admin only).
        #[arg(long)]
        force_prune: bool,
    },
    /// Holds the agent on what it has.
    Pause {
        agent: String,
        #[arg(long)]
        reason: String,
    },
    /// Releases a pause.
    Resume { agent: String },
    /// Holds the agent on SHA (a deliberate rollback) until unpinned.
    Pin {
        agent: String,
        sha: String,
        #[arg(long)]
        reason: String,
    },
    /// Returns the agent to the gate.
    Unpin { agent: String },
    /// Prints what the agent's preview of a merge request's head found: its newest, or of
    /// SHA. Exit code 1 when that revision would not apply cleanly.
    Preview {
        agent: String,
        #[arg(long)]
        sha: Option<String>,
    },
    /// Prints the URL of the agent's badge: the unguessable one for a private badge.
    BadgeUrl {
        agent: String,
        /// The server's public HTTP base URL, e.g. https://greenlight.example.com:8080.
        #[arg(long)]
        base: Option<String>,
    },
    /// Waits until the agent reports SHA (or a descendant) healthy. Exit codes: 0 healthy
    /// (or superseded), 1 failed or degraded, 3 superseded with --exact, 124 timeout.
    Wait {
        agent: String,
        #[arg(long)]
        sha: String,
        /// Give up after this long (30s, 10m, 1h).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Treat a deployment of a newer commit that includes SHA as a failure to wait for SHA.
        #[arg(long)]
        exact: bool,
    },
}

/// The admin client greenlightctl uses.
pub type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;

async fn connect(cli: &Cli) -> anyhow::Result<Admin> {
    let server = cli.server.as_str();
    let token = cli
        .token
        .as_deref()
        .context("no token: pass --token or set GREENLIGHT_TOKEN")?;
    connect::check_address(server, cli.insecure)?;
    let channel = connect::endpoint(server, cli.ca_file.as_deref())?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {server}: {}", connect::describe(&e)))?;
    Ok(AdminServiceClient::with_interceptor(
        channel,
        Bearer::new(token)?,
    ))
}

/// Runs greenlightctl with command-line `args` (the first is the program name) and returns
/// the process exit code: 2 for usage and connection errors, otherwise the command's own.
pub async fn run<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() { 2 } else { 0 };
        }
    };
    crate::tls::install_ring();
    match execute(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            2
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<i32> {
    let mut admin = connect(&cli).await?;
    let format = cli.output;
    match cli.command {
        Command::Agents => {
            let agents = admin
                .list_agents(ListAgentsRequest {})
                .await?
                .into_inner()
                .agents;
            output::agents(format, &agents);
        }
        Command::Agent { command } => registry::execute(&mut admin, format, *command).await?,
        Command::Status { agent } => {
            let status = admin
                .get_agent(GetAgentRequest { name: agent })
                .await?
                .into_inner();
            output::status(format, &status);
        }
        Command::Preview { agent, sha } => {
            let preview = admin
                .get_preview(GetPreviewRequest { name: agent, sha })
                .await?
                .into_inner();
            output::preview(format, &preview);
            if preview.outcome() != crate::v1::preview::Outcome::Clean {
                return Ok(1);
            }
        }
        Command::History { agent } => {
            let history = admin
                .get_agent_history(GetAgentHistoryRequest { name: agent })
                .await?
                .into_inner();
            output::history(format, &history);
        }
        Command::Trigger {
            agent,
            sha,
            force_prune,
        } => {
            let status = admin
                .trigger_sync(TriggerSyncRequest {
                    name: agent,
                    sha,
                    force_prune,
                })
                .await?
                .into_inner();
            output::status(format, &status);
        }
        Command::Pause { agent, reason } => {
            let status = admin
                .pause_sync(PauseSyncRequest {
                    name: agent,
                    reason,
                })
                .await?
                .into_inner();
            output::status(format, &status);
        }
        Command::Resume { agent } => {
            let status = admin
                .resume_sync(ResumeSyncRequest { name: agent })
                .await?
                .into_inner();
            output::status(format, &status);
        }
        Command::Pin { agent, sha, reason } => {
            let status = admin
                .pin_revision(PinRevisionRequest {
                    name: agent,
                    sha,
                    reason,
                })
                .await?
                .into_inner();
            output::status(format, &status);
        }
        Command::Unpin { agent } => {
            let status = admin
                .unpin_revision(UnpinRevisionRequest { name: agent })
                .await?
                .into_inner();
            output::status(format, &status);
        }
        Command::BadgeUrl { agent, base } => {
            let status = admin
                .get_agent(GetAgentRequest {
                    name: agent.clone(),
                })
                .await?
                .into_inner();
            anyhow::ensure!(
                !status.badge_path.is_empty(),
                "the badge of {agent:?} is private and the server has no badges.secret_file to derive its URL from"
            );
            let base = base.as_deref().unwrap_or_default().trim_end_matches('/');
            output::badge_url(format, &format!("{base}{}", status.badge_path));
        }
        Command::Wait {
            agent,
            sha,
            timeout,
            exact,
        } => {
            return wait::wait(&mut admin, format, &agent, &sha, timeout, exact).await;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::run;

    #[tokio::test]
    async fn missing_token_unreachable_server_and_bad_usage_exit_2() {
        assert_eq!(
            run(["greenlightctl", "--server", "http://127.0.0.1:1", "agents"]).await,
            2,
            "no token"
        );
        let unreachable = [
            "greenlightctl",
            "--server",
            "http://127.0.0.1:1",
            "--token",
            "t",
            "agents",
        ];
        assert_eq!(run(unreachable).await, 2);
        assert_eq!(
            run([
                "greenlightctl",
                "--server",
                "not a url",
                "--token",
                "t",
                "agents"
            ])
            .await,
            2
        );
        assert_eq!(
            run(["greenlightctl", "wait", "prod"]).await,
            2,
            "--sha is required"
        );
        assert_eq!(run(["greenlightctl", "--help"]).await, 0);
        let remote_plaintext = [
            "greenlightctl",
            "--server",
            "http://greenlight.invalid:8150",
            "--token",
            "t",
            "agents",
        ];
        assert_eq!(run(remote_plaintext).await, 2, "refused before dialing");
    }
}
