//! `greenlight-server`: see the README for configuration.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use greenlight::telemetry::{self, LogFormat, TelemetrySettings};
use greenlight_server::config::{Config, Overrides};
use greenlight_server::{Listeners, run};
use tokio_util::sync::CancellationToken;

/// jemalloc rather than glibc's allocator: a fan-out to 10,000 agents took 15 % less CPU and
/// ingest ran 6-15 % faster with it, at the same memory per idle agent (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Greenlight server: syncs a commit to clusters only after its pipeline ran green"
)]
struct Cli {
    /// Configuration file (YAML).
    #[arg(long, env = "GREENLIGHT_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address (agents, operators, ingest); overrides listen.grpc.
    #[arg(long, env = "GREENLIGHT_GRPC_LISTEN")]
    grpc_listen: Option<String>,
    /// HTTP listen address (webhooks, probes, metrics); overrides listen.http.
    #[arg(long, env = "GREENLIGHT_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// Redis URL; overrides redis.url. Without one the embedded store is used.
    #[arg(long, env = "GREENLIGHT_REDIS_URL")]
    redis_url: Option<String>,
    /// Prefix of every Redis key; overrides redis.key_prefix.
    #[arg(long, env = "GREENLIGHT_REDIS_KEY_PREFIX")]
    redis_key_prefix: Option<String>,
    /// This replica's name in presence records; overrides replica_id.
    #[arg(long, env = "GREENLIGHT_REPLICA_ID")]
    replica_id: Option<String>,
    /// Directory of the embedded store (used without Redis); overrides data_dir.
    #[arg(long, env = "GREENLIGHT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Log lines as `text` or `json`; which lines is set by RUST_LOG (default `info`).
    #[arg(long, env = "GREENLIGHT_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Prints the SHA-256 of a token read from stdin, for `token_sha256` keys.
    HashToken,
    /// Validates the configuration and exits.
    CheckConfig,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::HashToken) = cli.command {
        let mut token = String::new();
        std::io::stdin()
            .read_to_string(&mut token)
            .context("cannot read the token from stdin")?;
        let token = token.trim_end_matches(['\n', '\r']);
        anyhow::ensure!(!token.is_empty(), "no token on stdin");
        println!("{}", greenlight::digest::sha256_hex(token.as_bytes()));
        return Ok(());
    }
    let overrides = Overrides {
        grpc_listen: cli.grpc_listen,
        http_listen: cli.http_listen,
        redis_url: cli.redis_url,
        redis_key_prefix: cli.redis_key_prefix,
        replica_id: cli.replica_id,
        data_dir: cli.data_dir,
    };
    let config = Config::load(cli.config.as_deref(), &overrides)?;
    if let Some(Command::CheckConfig) = cli.command {
        println!("configuration is valid: {} agent(s)", config.agents.len());
        return Ok(());
    }
    greenlight::tls::install_ring();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let telemetry = telemetry::init_on(
        &runtime,
        &TelemetrySettings {
            service: "greenlight-server",
            log_format: cli.log_format,
            otlp_endpoint: telemetry::endpoint_from(config.otlp_endpoint.clone()),
        },
    )?;
    let served = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        let listeners = Listeners::bind(&config).await?;
        run(config, listeners, shutdown).await?;
        anyhow::Ok(())
    });
    // Flushes the spans of the last moments while the runtime still runs.
    drop(telemetry);
    served
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
    shutdown.cancel();
}
