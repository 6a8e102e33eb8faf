//! `greenlight-agent`: keeps one stream to the server.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use greenlight_agent::session::{self, Target};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "Greenlight agent: receives ready revisions from the server"
)]
struct Cli {
    /// Server gRPC address, `http://host:8150` or `https://host:8150`.
    #[arg(long, env = "GREENLIGHT_SERVER")]
    server: String,
    /// File holding this agent's bearer token.
    #[arg(long, env = "GREENLIGHT_TOKEN_FILE")]
    token_file: PathBuf,
    /// CA certificate (PEM) to trust for the server's TLS certificate.
    #[arg(long, env = "GREENLIGHT_CA_FILE")]
    ca_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("another TLS crypto provider is already installed"))?;
    let token = std::fs::read_to_string(&cli.token_file)
        .with_context(|| format!("cannot read token file {}", cli.token_file.display()))?
        .trim()
        .to_owned();
    anyhow::ensure!(
        !token.is_empty(),
        "token file {} is empty",
        cli.token_file.display()
    );
    let target = Target {
        server: cli.server,
        token,
        ca_file: cli.ca_file,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        // Applying to the cluster is not wired in yet: the agent only reports what is ready.
        session::run(target, shutdown, |_client, revision| async move {
            tracing::info!(
                sha = revision.sha(),
                "ready to sync (cluster apply not enabled in this build)"
            );
            None
        })
        .await;
    });
    Ok(())
}
