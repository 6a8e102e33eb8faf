//! A merge request preview of many changed objects: from the merge request pipeline hook to
//! the note on the fake GitLab, with the agent (its own process) previewing against the
//! test suite's real kube-apiserver. Split into the agent's share as it reports it (from
//! taking the request to the preview made: its reads and dry runs, and its own work, diff
//! and inventory included) and the rest: the server's (hook, manifests, stream, note) and
//! the transport (the request on the Sync stream, the result's `ReportPreview` call).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use greenlight::v1::GetPreviewRequest;
use greenlight::v1::preview::Outcome;
use greenlight_e2e::control_plane::ControlPlane;
use greenlight_e2e::fake_gitlab::FakeGitLab;
use greenlight_e2e::{
    GitRepo, PROJECT, PROJECT_ID, Redis, TestServer, git_agent_yaml, git_config_yaml,
};
use serde_json::json;

use crate::apply::{agent_requests, count_requests, start_agent};
use crate::common::{Admin, ZERO, require_tool, wait_connected, wait_healthy};
use crate::stats::{Summary, breakdown};

const AGENT: &str = "prod";
const MR: u64 = 1;

/// Options of `preview`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// ConfigMaps the merge request changes.
    #[arg(long, default_value_t = 100)]
    objects: usize,
    /// Measured previews (after one unmeasured warm-up).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

fn configmap(index: usize, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{index:05}\n  labels: {{app: bench}}\ndata:\n  value: \"{value}\"\n  other: \"unchanged\"\n"
    )
}

fn manifests(objects: usize, value: &str) -> String {
    (0..objects)
        .map(|i| configmap(i, value))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The note on the merge request that names `sha`, with when the fake last received it.
async fn note_for(gitlab: &FakeGitLab, sha: &str, within: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(note) = gitlab
            .notes(PROJECT, MR)
            .into_iter()
            .find(|n| n.body.contains(&sha[..8]))
        {
            return Ok(note.updated_at);
        }
        if Instant::now() > deadline {
            bail!("no note for {sha} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn pipeline_hook(server: &TestServer, sha: &str, id: u64) -> anyhow::Result<Instant> {
    let body = json!({
        "object_kind": "pipeline",
        "object_attributes": {
            "id": id, "ref": format!("refs/merge-requests/{MR}/head"), "tag": false,
            "sha": sha, "source": "merge_request_event", "status": "running",
        },
        "merge_request": { "iid": MR, "target_branch": "main", "source_branch": "feature" },
        "project": { "id": PROJECT_ID, "path_with_namespace": PROJECT },
        "builds": [],
    });
    let sent = Instant::now();
    let (status, answer) = server.hook("Pipeline Hook", &body, None).await?;
    if status != 200 {
        bail!("the pipeline hook answered {status}: {answer}");
    }
    Ok(sent)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.objects == 0 || args.runs == 0 {
        bail!("--objects and --runs must be at least 1");
    }
    let redis_version = require_tool("redis-server", "for the preview scenario")?;
    let git_version = require_tool("git", "for the preview scenario")?;
    let plane = ControlPlane::shared().await?.with_context(|| {
        format!(
            "no control plane: set {} to the directory scripts/k8s-tools prints",
            greenlight_e2e::control_plane::BIN_DIR_ENV
        )
    })?;
    println!("redis: {redis_version}\ngit: {git_version}");
    let kube = plane.client().await?;
    let apps = plane.namespace(&kube, "bench-preview").await?;
    let home = plane.namespace(&kube, "bench-preview-agent").await?;

    // The base on main, and every head on a branch of its own, committed up front so that
    // one fetch (in the warm-up) brings them all: the measured runs read from the mirror.
    let repo = GitRepo::new()?;
    let base = repo.commit(
        &[("config.yaml", manifests(args.objects, "base").as_bytes())],
        &[],
    )?;
    let mut heads = Vec::new();
    for run in 0..=args.runs {
        repo.git(&["checkout", "-q", "-b", &format!("feature-{run}"), &base])?;
        let value = format!("run-{run}");
        heads.push(repo.commit(
            &[("config.yaml", manifests(args.objects, &value).as_bytes())],
            &[],
        )?);
        repo.git(&["checkout", "-q", "main"])?;
    }

    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let work = tempfile::tempdir()?;
    let gitlab = FakeGitLab::start().await?;
    let agent_yaml = git_agent_yaml(AGENT, &repo.url(), &[]).replace(
        "default_namespace: apps",
        &format!("default_namespace: {apps}"),
    ) + "    preview: true\n    prune_limit: 10000\n";
    let mut yaml = git_config_yaml(&redis.url(), cache.path(), "", &[agent_yaml]);
    yaml.push_str(&gitlab.config(""));
    let server = TestServer::start(&yaml).await?;
    let _agent = start_agent(plane, &server, &home, work.path())?;
    let mut admin: Admin = server.admin().await?;
    wait_connected(&mut admin, AGENT, Duration::from_secs(30)).await?;
    gitlab.put_pipeline(
        PROJECT,
        json!({ "id": 1, "sha": base, "ref": "main", "status": "success", "source": "push" }),
    );
    server.release(ZERO, &base, 1).await?;
    wait_healthy(&mut admin, AGENT, &base, 0, Duration::from_secs(300)).await?;

    let mut totals = Vec::new();
    let mut agents = Vec::new();
    let mut dry_runs = Vec::new();
    let mut own = Vec::new();
    let mut servers = Vec::new();
    let mut requests = Vec::new();
    for (run, head) in heads.iter().enumerate() {
        let mark = plane.audit_mark();
        let sent = pipeline_hook(&server, head, 1000 + run as u64).await?;
        let posted = note_for(&gitlab, head, Duration::from_secs(300)).await?;
        let preview = admin
            .get_preview(GetPreviewRequest {
                name: AGENT.into(),
                sha: Some(head.clone()),
            })
            .await?
            .into_inner();
        if preview.outcome() != Outcome::Clean || preview.objects.len() != args.objects {
            bail!(
                "run {run}: {:?} with {} objects: {}",
                preview.outcome(),
                preview.objects.len(),
                preview.reason
            );
        }
        if run == 0 {
            // Warm-up: the fetch of every head, and the agent's first discovery.
            continue;
        }
        let total = posted.saturating_duration_since(sent);
        let agent = Duration::from_millis(preview.agent_ms);
        let dry_run = Duration::from_millis(preview.dry_run_ms);
        totals.push(total);
        agents.push(agent);
        dry_runs.push(dry_run);
        own.push(agent.saturating_sub(dry_run));
        servers.push(total.saturating_sub(agent));
        requests = agent_requests(plane, mark, &[&apps, &home])?;
    }
    let (count, writes, by_target) = count_requests(&requests);
    println!(
        "\npreview of a merge request changing {} ConfigMaps, {} runs after a warm-up",
        args.objects, args.runs
    );
    let line = |what: &str, samples: &mut Vec<Duration>| {
        if let Some(summary) = Summary::of(samples) {
            println!("  {what:<44} {}", summary.line());
        }
    };
    line("MR pipeline hook -> note posted", &mut totals);
    line("  server and transport (the rest)", &mut servers);
    line("  agent, request taken -> preview made", &mut agents);
    line("    of which reads and dry runs (wall)", &mut dry_runs);
    line("    of which the agent's own work", &mut own);
    println!(
        "  agent requests per preview: {count} ({writes} writes): {}",
        breakdown(&by_target)
    );
    Ok(())
}
