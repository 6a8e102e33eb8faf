//! The agent, as its own process, applying to a real kube-apiserver (the test suite's control
//! plane): a first apply next to `kubectl apply --server-side` of the same files, an
//! unchanged re-apply, drift, Deployments rolled out by the real controllers, and the
//! agent's memory while it watches what it applied.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use greenlight::v1::{GetAgentHistoryRequest, Phase, TriggerSyncRequest};
use greenlight_e2e::control_plane::{AuditedRequest, ControlPlane};
use greenlight_e2e::{GitRepo, Redis, TestServer, agent_token, git_agent_yaml, git_config_yaml};

use crate::common::{
    Admin, SETTLE, push_and_settle, require_tool, send_green, wait_connected, wait_healthy,
};
use crate::stats::{breakdown, ms};

const AGENT: &str = "prod";

/// Options of `apply`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// ConfigMaps in the revision.
    #[arg(long, default_value_t = 1000)]
    objects: usize,
    /// Files they are spread over (YAML streams of `---`-separated documents).
    #[arg(long, default_value_t = 10)]
    files: usize,
    /// Objects changed behind the agent's back in the drift scenario.
    #[arg(long, default_value_t = 10)]
    drifted: usize,
    /// Deployments in the rollout scenario (0 skips it).
    #[arg(long, default_value_t = 100)]
    deployments: usize,
}

fn configmap(index: usize) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{index:05}\n  labels:\n    app: bench\ndata:\n  index: \"{index}\"\n  value: \"some configuration value of object {index}\"\n"
    )
}

fn deployment(index: usize) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web-{index:03}\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: web-{index:03}}}\n  template:\n    metadata:\n      labels: {{app: web-{index:03}}}\n    spec:\n      containers:\n        - {{name: web, image: nginx}}\n"
    )
}

/// `objects` spread over `files` files under `dir/`.
fn spread(dir: &str, objects: &[String], files: usize) -> Vec<(String, String)> {
    let per_file = objects.len().div_ceil(files.max(1)).max(1);
    objects
        .chunks(per_file)
        .enumerate()
        .map(|(n, chunk)| (format!("{dir}/part-{n:03}.yaml"), chunk.join("---\n")))
        .collect()
}

/// `verb resource` of each request, counted.
fn count_requests(requests: &[AuditedRequest]) -> (usize, usize, BTreeMap<String, usize>) {
    let mut by_target: BTreeMap<String, usize> = BTreeMap::new();
    let mut writes = 0;
    for request in requests {
        writes += usize::from(request.is_write());
        let dry = if request.uri.contains("dryRun=") {
            " (dry run)"
        } else {
            ""
        };
        let resource = if request.resource.is_empty() {
            "discovery"
        } else {
            &request.resource
        };
        *by_target
            .entry(format!("{} {resource}{dry}", request.verb))
            .or_default() += 1;
    }
    (requests.len(), writes, by_target)
}

/// The agent's requests, without its Lease renewals (which go on regardless).
fn agent_requests(
    plane: &ControlPlane,
    mark: u64,
    namespaces: &[&str],
) -> anyhow::Result<Vec<AuditedRequest>> {
    Ok(plane
        .agent_requests(mark, namespaces)?
        .into_iter()
        .filter(|r| r.resource != "leases")
        .collect())
}

fn print_requests(what: &str, requests: &[AuditedRequest]) {
    let (total, writes, targets) = count_requests(requests);
    println!(
        "  {what}: {total} requests to the API server, {writes} writes: {}",
        breakdown(&targets)
    );
}

/// The reports of `sha` at `generation`, oldest first, as (phase, ms after `since_ms`).
async fn phases(
    admin: &mut Admin,
    sha: &str,
    generation: u64,
    since_ms: i64,
) -> anyhow::Result<Vec<(Phase, i64)>> {
    let history = admin
        .get_agent_history(GetAgentHistoryRequest { name: AGENT.into() })
        .await
        .context("GetAgentHistory failed")?
        .into_inner();
    let mut reports: Vec<_> = history
        .reports
        .into_iter()
        .filter(|r| r.revision == sha && r.generation == generation)
        .collect();
    reports.reverse();
    let mut marks: Vec<(Phase, i64)> = Vec::new();
    for report in &reports {
        // The first Applying, then each outcome.
        if report.phase() == Phase::Applying && !marks.is_empty() {
            continue;
        }
        marks.push((report.phase(), report.received_at_unix_ms - since_ms));
    }
    Ok(marks)
}

fn describe(marks: &[(Phase, i64)]) -> String {
    marks
        .iter()
        .map(|(phase, at)| format!("{} +{at} ms", format!("{phase:?}").to_lowercase()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The resident set of process `pid`, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("cannot read the agent's /proc status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc status")
}

/// `greenlight-agent`, built next to this binary (`cargo build --release -p greenlight-agent`).
fn agent_binary() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe().context("cannot locate this binary")?;
    let path = exe
        .parent()
        .context("this binary has no directory")?
        .join("greenlight-agent");
    if !path.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release -p greenlight-agent`",
            path.display()
        );
    }
    Ok(path)
}

struct AgentChild(Child);

impl Drop for AgentChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(
    plane: &ControlPlane,
    server: &TestServer,
    home: &str,
    dir: &Path,
) -> anyhow::Result<AgentChild> {
    let token_file = dir.join("agent-token");
    std::fs::write(&token_file, agent_token(AGENT))?;
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let child = Command::new(agent_binary()?)
        .args([
            "--server",
            &server.grpc_url(),
            "--namespace",
            home,
            "--identity",
            "bench",
        ])
        .arg("--token-file")
        .arg(&token_file)
        .env("KUBECONFIG", plane.agent_kubeconfig())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start greenlight-agent")?;
    Ok(AgentChild(child))
}

fn commit_files(
    repo: &GitRepo,
    files: &[(String, String)],
    removed: &[&str],
) -> anyhow::Result<String> {
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_bytes()))
        .collect();
    repo.commit(&refs, removed)
        .context("cannot commit the files")
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.objects == 0 || args.files == 0 {
        bail!("--objects and --files must be at least 1");
    }
    if args.drifted > args.objects {
        bail!("--drifted cannot exceed --objects");
    }
    let redis_version = require_tool("redis-server", "for the apply scenario")?;
    let git_version = require_tool("git", "for the apply scenario")?;
    greenlight_e2e::install_crypto();
    let plane = ControlPlane::shared().await?.with_context(|| {
        format!(
            "no control plane: set {} to the directory scripts/k8s-tools prints",
            greenlight_e2e::control_plane::BIN_DIR_ENV
        )
    })?;
    let kubectl_version = plane.kubectl_ok(&["version", "-o", "json"])?;
    let server_version: serde_json::Value = serde_json::from_str(&kubectl_version)?;
    println!(
        "redis: {redis_version}\ngit: {git_version}\nkube-apiserver: {} (with etcd, controller-manager, scheduler, kwok; one fake node)",
        server_version["serverVersion"]["gitVersion"]
            .as_str()
            .unwrap_or("?")
    );
    let kube = plane.client().await?;
    let apps = plane.namespace(&kube, "bench-apps").await?;
    let home = plane.namespace(&kube, "bench-agent").await?;
    let ceiling = plane.namespace(&kube, "bench-kubectl").await?;

    let objects: Vec<String> = (0..args.objects).map(configmap).collect();
    let files = spread("config", &objects, args.files);
    let repo = GitRepo::new().context("cannot create the git repository")?;
    let commit = commit_files(&repo, &files, &[])?;

    // The ceiling: kubectl applies the same files, server-side, to the same apiserver.
    let work = tempfile::tempdir()?;
    let kubectl_dir = work.path().join("kubectl");
    for (path, text) in &files {
        let file = kubectl_dir.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(file, text)?;
    }
    let kubectl_apply = || -> anyhow::Result<Duration> {
        let started = Instant::now();
        plane.kubectl_ok(&[
            "apply",
            "--server-side",
            "--field-manager=bench-kubectl",
            "-n",
            &ceiling,
            "-R",
            "-f",
            &kubectl_dir.to_string_lossy(),
        ])?;
        Ok(started.elapsed())
    };
    let kubectl_time = kubectl_apply()?;
    let kubectl_again = kubectl_apply()?;

    let redis = Redis::start().await.context("cannot start redis-server")?;
    let cache = tempfile::tempdir().context("cannot create the mirror cache directory")?;
    let agent_yaml = git_agent_yaml(AGENT, &repo.url(), &[]).replace(
        "default_namespace: apps",
        &format!("default_namespace: {apps}"),
    ) + "    prune_limit: 10000\n";
    let server = TestServer::start(&git_config_yaml(
        &redis.url(),
        cache.path(),
        "",
        &[agent_yaml],
    ))
    .await
    .context("cannot start the server")?;
    let agent = start_agent(plane, &server, &home, work.path())?;
    let mut admin = server
        .admin()
        .await
        .context("cannot connect the admin client")?;
    wait_connected(&mut admin, AGENT, Duration::from_secs(30)).await?;
    let waited = push_and_settle(&server, cache.path(), &commit).await?;

    // First apply: everything is created.
    let mark = plane.audit_mark();
    let green = send_green(&server, &commit, 1).await?;
    let healthy = wait_healthy(&mut admin, AGENT, &commit, 0, Duration::from_secs(300)).await?;
    let first_ms = healthy.received_at_unix_ms - green.at_unix_ms;
    let first_phases = phases(&mut admin, &commit, healthy.generation, green.at_unix_ms).await?;
    let first_requests = agent_requests(plane, mark, &[&apps, &home])?;
    // Metadata watches of what it applied are open now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_watching = rss_kib(agent.0.id())?;

    // Re-apply of the same revision under a new generation: nothing changes.
    let mark = plane.audit_mark();
    let trigger_ms = greenlight_server::clock::now_ms();
    let status = admin
        .trigger_sync(TriggerSyncRequest {
            name: AGENT.into(),
            sha: None,
            force_prune: false,
        })
        .await
        .context("TriggerSync failed")?
        .into_inner();
    let generation = status.desired.map_or(0, |d| d.generation);
    let again = wait_healthy(
        &mut admin,
        AGENT,
        &commit,
        generation,
        Duration::from_secs(300),
    )
    .await?;
    let again_ms = again.received_at_unix_ms - trigger_ms;
    let again_requests = agent_requests(plane, mark, &[&apps, &home])?;

    // Drift: someone edits a field the agent owns on some objects.
    let mark = plane.audit_mark();
    let step = (args.objects / args.drifted.max(1)).max(1);
    let drifted: Vec<String> = (0..args.drifted)
        .map(|i| format!("cm-{:05}", i * step))
        .collect();
    let drift_started = Instant::now();
    for name in &drifted {
        plane.kubectl_ok(&[
            "patch",
            "configmap",
            name,
            "-n",
            &apps,
            "--type=merge",
            "-p",
            r#"{"data":{"value":"edited by hand"}}"#,
        ])?;
    }
    let edited = drift_started.elapsed();
    let configmaps: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(kube.clone(), &apps);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut restored = 0;
        for name in &drifted {
            let cm = configmaps.get(name).await?;
            let value = cm.data.as_ref().and_then(|d| d.get("value"));
            restored += usize::from(value.is_some_and(|v| v != "edited by hand"));
        }
        if restored == drifted.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{restored} of {} drifted objects restored within 120 s",
                drifted.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drift_time = drift_started.elapsed();
    // Let any straggling writes land before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let drift_requests = agent_requests(plane, mark, &[&apps, &home])?;

    // Deployments: the agent's apply, then the controllers' rollout.
    let mut rollout = None;
    if args.deployments > 0 {
        let workloads: Vec<String> = (0..args.deployments).map(deployment).collect();
        let mut all = files.clone();
        all.extend(spread("workloads", &workloads, args.files));
        let with_deployments = commit_files(&repo, &all, &[])?;
        push_and_settle(&server, cache.path(), &with_deployments).await?;
        let green = send_green(&server, &with_deployments, 2).await?;
        let healthy = wait_healthy(
            &mut admin,
            AGENT,
            &with_deployments,
            0,
            Duration::from_secs(600),
        )
        .await?;
        let marks = phases(
            &mut admin,
            &with_deployments,
            healthy.generation,
            green.at_unix_ms,
        )
        .await?;
        rollout = Some((healthy.received_at_unix_ms - green.at_unix_ms, marks));
    }
    let rss_end = rss_kib(agent.0.id())?;

    drop(agent);
    server.stop().await.context("cannot stop the server")?;
    drop(redis);

    println!(
        "scenario: apply, {} ConfigMaps in {} files, greenlight-agent (its own process) against kube-apiserver, store redis",
        args.objects,
        files.len()
    );
    println!(
        "waited {} ms after the push webhook for its fetch (incl. {} ms settling); not timed",
        ms(waited),
        ms(SETTLE)
    );
    let applied_at = first_phases
        .iter()
        .find(|(p, _)| *p == Phase::Applied)
        .map_or(0, |(_, at)| *at);
    println!("first apply (creates every object):");
    println!(
        "  pipeline webhook -> Healthy: {first_ms} ms (server receive timestamps); kubectl apply --server-side of the same files: {} ms ({:.2}x)",
        ms(kubectl_time),
        first_ms as f64 / kubectl_time.as_millis().max(1) as f64
    );
    println!(
        "  reports: {} (applied at +{applied_at} ms)",
        describe(&first_phases)
    );
    print_requests("agent", &first_requests);
    println!("re-apply without change (TriggerSync, generation {generation}):");
    println!(
        "  TriggerSync -> Healthy: {again_ms} ms; kubectl apply --server-side again: {} ms",
        ms(kubectl_again)
    );
    print_requests("agent", &again_requests);
    println!(
        "drift: {} objects edited with kubectl patch ({} ms for the edits):",
        drifted.len(),
        ms(edited)
    );
    println!("  first edit -> all restored: {} ms", ms(drift_time));
    print_requests("agent", &drift_requests);
    println!(
        "agent RSS: {rss_watching} KiB holding {} objects under watch; {rss_end} KiB at the end",
        args.objects
    );
    if let Some((total, marks)) = rollout {
        let applied = marks
            .iter()
            .find(|(p, _)| *p == Phase::Applied)
            .map_or(0, |(_, at)| *at);
        println!(
            "rollout: {} Deployments (1 replica each) added to the revision: webhook -> Healthy {total} ms = agent's apply {applied} ms + controllers' rollout (scheduler, controller-manager, kwok) {} ms",
            args.deployments,
            total - applied
        );
        println!("  reports: {}", describe(&marks));
    }
    Ok(())
}
