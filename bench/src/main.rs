//! `greenlight-bench <scenario>`: Greenlight's speed, measured over loopback with a real
//! redis-server, real gRPC and HTTP, and printed as a short plain-text report.
//!
//! The server, agents' streams and clients run in this one process, on one Tokio runtime
//! with a worker thread per CPU, as the end-to-end tests do; redis-server, git, the
//! Kubernetes control plane and (in `apply`) greenlight-agent are child processes. See README.md for what each scenario measures.

mod apply;
mod common;
mod floor;
mod latency;
mod manifests;
mod memory;
mod preview;
mod process;
mod replay;
mod state;
mod stats;
mod throughput;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "greenlight-bench",
    about = "Greenlight benchmarks: latency, webhook throughput, manifest delivery and apply time"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Pipeline webhook to revision received, on every one of many streaming agents.
    Latency(latency::Args),
    /// Pipeline Hook deliveries per second on Redis and on the embedded store.
    Throughput(throughput::Args),
    /// A large manifest set from git streamed to many agents.
    Manifests(manifests::Args),
    /// The agent applying to a real kube-apiserver, next to kubectl: first apply, unchanged
    /// re-apply, drift, Deployments, memory.
    Apply(apply::Args),
    /// Server RSS under the worst client its limits allow, next to a quiet server.
    Memory(memory::Args),
    /// A merge request preview of many changed objects: MR pipeline hook to note posted,
    /// the agent's share apart from its dry-run requests.
    Preview(preview::Args),
    /// The state model at scale: RSS per idle agent, idle Redis load, latency and fan-out
    /// with thousands of agents on one ref, one or two server processes.
    State(state::Args),
    /// Rebuilding a ref's heads from its stored pushes, in order and delivered out of order.
    Replay(replay::Args),
    /// The bare gRPC server `state` measures its ceiling with (started by `state` itself).
    #[command(hide = true)]
    FloorServer(floor::Manifests),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The whole chain on one line, without a backtrace even under RUST_BACKTRACE=1.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    greenlight_e2e::install_crypto();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the Tokio runtime")?;
    // The floor server's first line says where it listens, for the `state` that started it.
    if !matches!(cli.scenario, Scenario::FloorServer(_)) {
        println!("{}", common::machine());
    }
    let started = std::time::Instant::now();
    runtime.block_on(async {
        match cli.scenario {
            Scenario::Latency(args) => latency::run(args).await,
            Scenario::Throughput(args) => throughput::run(args).await,
            Scenario::Manifests(args) => manifests::run(args).await,
            Scenario::Apply(args) => apply::run(args).await,
            Scenario::Memory(args) => memory::run(args).await,
            Scenario::Preview(args) => preview::run(args).await,
            Scenario::State(args) => state::run(args).await,
            Scenario::Replay(args) => replay::run(args).await,
            Scenario::FloorServer(manifests) => floor::serve(manifests).await,
        }
    })?;
    println!("total run time: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
