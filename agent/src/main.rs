//! `greenlight-agent`: applies what the server says is ready.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use greenlight::telemetry::{self, LogFormat, TelemetrySettings};
use greenlight_agent::lease::LEASE_DURATION;
use greenlight_agent::metrics::AgentMetrics;
use greenlight_agent::run::{self, Settings};
use greenlight_agent::session::Target;
use tokio_util::sync::CancellationToken;

/// Longer than any single API call the agent makes should take.
const KUBE_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

#[derive(Parser)]
#[command(
    version,
    about = "Greenlight agent: applies revisions whose pipeline ran green"
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
    /// Allow a plaintext http:// server address that is not loopback (the token then
    /// crosses the network in the clear).
    #[arg(long, env = "GREENLIGHT_INSECURE")]
    insecure: bool,
    /// Namespace of the inventory and the Lease; defaults to POD_NAMESPACE, then the
    /// service account's namespace.
    #[arg(long, env = "GREENLIGHT_NAMESPACE")]
    namespace: Option<String>,
    /// This replica's name in the Lease; defaults to POD_NAME, then the host name.
    #[arg(long, env = "GREENLIGHT_IDENTITY")]
    identity: Option<String>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`.
    #[arg(
        long,
        env = "GREENLIGHT_METRICS_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    metrics_listen: String,
    /// Log lines as `text` or `json`; which lines is set by RUST_LOG (default `info`).
    #[arg(long, env = "GREENLIGHT_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// OTLP/gRPC endpoint spans are exported to (`http://collector:4317`); defaults to
    /// OTEL_EXPORTER_OTLP_ENDPOINT; none exports nothing.
    #[arg(long, env = "GREENLIGHT_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let telemetry = telemetry::init_on(
        &runtime,
        &TelemetrySettings {
            service: "greenlight-agent",
            log_format: cli.log_format,
            otlp_endpoint: telemetry::endpoint_from(cli.otlp_endpoint.clone()),
        },
    )?;
    let result = agent_main(cli, &runtime);
    // Flushes the spans of the last moments while the runtime still runs.
    drop(telemetry);
    result
}

fn agent_main(cli: Cli, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    greenlight::tls::install_ring();
    // A refused address is a configuration error: exit now rather than retry forever.
    greenlight::connect::check_address(&cli.server, cli.insecure)?;
    if let Some(ca) = &cli.ca_file {
        greenlight::connect::endpoint(&cli.server, Some(ca))?;
    }
    let token = std::fs::read_to_string(&cli.token_file)
        .with_context(|| format!("cannot read token file {}", cli.token_file.display()))?
        .trim()
        .to_owned();
    anyhow::ensure!(
        !token.is_empty(),
        "token file {} is empty",
        cli.token_file.display()
    );
    let namespace = cli
        .namespace
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .or_else(|| {
            std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|ns| !ns.is_empty())
        .context("no namespace: pass --namespace or set POD_NAMESPACE")?;
    let identity = cli
        .identity
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("greenlight-agent-{}", std::process::id()));
    let settings = Settings {
        target: Target {
            server: cli.server,
            token,
            ca_file: cli.ca_file,
        },
        namespace,
        identity,
        lease_duration: LEASE_DURATION,
        metrics: Arc::new(AgentMetrics::default()),
    };
    let metrics_listener = std::net::TcpListener::bind(&cli.metrics_listen)
        .with_context(|| format!("cannot listen on --metrics-listen {}", cli.metrics_listen))?;
    metrics_listener.set_nonblocking(true)?;
    runtime.block_on(async {
        let mut config = kube::Config::infer().await.context(
            "cannot reach the cluster: no in-cluster service account and no usable KUBECONFIG",
        )?;
        // kube sets no read timeout; no answer within this means the call is lost. The drift
        // watches ask the API server to end each watch sooner (drift.rs).
        config.read_timeout.get_or_insert(KUBE_READ_TIMEOUT);
        let kube = kube::Client::try_from(config).context("cannot build the Kubernetes client")?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            stop.cancel();
        });
        let metrics = settings.metrics.clone();
        let listener = tokio::net::TcpListener::from_std(metrics_listener)?;
        let serving = shutdown.clone();
        tokio::spawn(async move {
            if let Err(error) = greenlight_agent::metrics::serve(listener, metrics, serving).await {
                tracing::error!(%error, "metrics and probes stopped");
            }
        });
        run::run(settings, kube, shutdown).await;
        Ok(())
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
