//! A real agent applying many objects to the emulated API server, then re-applying them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use greenlight::v1::{GetAgentHistoryRequest, Phase, TriggerSyncRequest};
use greenlight_e2e::kube_api::{KubeApi, RequestRecord};
use greenlight_e2e::{AgentProcess, GitRepo, Redis, TestServer, git_agent_yaml, git_config_yaml};
use serde_json::json;

use crate::common::{
    Admin, SETTLE, push_and_settle, require_tool, send_green, wait_connected, wait_healthy,
};
use crate::stats::{breakdown, ms};

const AGENT: &str = "prod";
const NAMESPACE: &str = "apps";

/// Options of `apply`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// ConfigMaps in the revision.
    #[arg(long, default_value_t = 1000)]
    objects: usize,
    /// Files they are spread over (YAML streams of `---`-separated documents).
    #[arg(long, default_value_t = 10)]
    files: usize,
}

fn configmap(index: usize) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{index:05}\n  labels:\n    app: bench\ndata:\n  index: \"{index}\"\n  value: \"some configuration value of object {index}\"\n"
    )
}

/// `METHOD resource` of a request: the resource (with its namespace) for object paths,
/// `discovery` for the API group documents.
fn classify(request: &RequestRecord) -> String {
    let segments: Vec<&str> = request.path.split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/... or /apis/group/version/...
    let rest = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[][..],
    };
    let what = match rest {
        [] => "discovery".to_owned(),
        ["namespaces", namespace, resource, ..] => format!("{resource} in {namespace}"),
        [resource, ..] => (*resource).to_owned(),
    };
    format!("{} {what}", request.method)
}

fn count_requests(
    requests: &[RequestRecord],
) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let mut by_method: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_target: BTreeMap<String, usize> = BTreeMap::new();
    for request in requests {
        *by_method.entry(request.method.clone()).or_default() += 1;
        *by_target.entry(classify(request)).or_default() += 1;
    }
    (by_method, by_target)
}

/// The reports of `sha` at `generation`, oldest first, as (phase, ms after `since_ms`).
async fn phases(
    admin: &mut Admin,
    sha: &str,
    generation: u64,
    since_ms: i64,
) -> anyhow::Result<String> {
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
    // First Applying, last Applying (the last stage), Applied, Healthy.
    let mut marks: Vec<(String, i64)> = Vec::new();
    for report in &reports {
        let label = match report.phase() {
            Phase::Applying if marks.is_empty() => "applying".to_owned(),
            Phase::Applying => continue,
            other => format!("{other:?}").to_lowercase(),
        };
        marks.push((label, report.received_at_unix_ms - since_ms));
    }
    Ok(marks
        .iter()
        .map(|(label, at)| format!("{label} +{at} ms"))
        .collect::<Vec<_>>()
        .join(", "))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.objects == 0 || args.files == 0 {
        bail!("--objects and --files must be at least 1");
    }
    let redis_version = require_tool("redis-server", "for the apply scenario")?;
    let git_version = require_tool("git", "for the apply scenario")?;
    println!("redis: {redis_version}\ngit: {git_version}");

    let repo = GitRepo::new().context("cannot create the git repository")?;
    let per_file = args.objects.div_ceil(args.files);
    let files: Vec<(String, String)> = (0..args.objects)
        .collect::<Vec<_>>()
        .chunks(per_file)
        .enumerate()
        .map(|(n, chunk)| {
            let text = chunk
                .iter()
                .map(|&i| configmap(i))
                .collect::<Vec<_>>()
                .join("---\n");
            (format!("config/part-{n:03}.yaml"), text)
        })
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_bytes()))
        .collect();
    let commit = repo.commit(&refs, &[]).context("cannot commit the files")?;

    let redis = Redis::start().await.context("cannot start redis-server")?;
    let cache = tempfile::tempdir().context("cannot create the mirror cache directory")?;
    let server = TestServer::start(&git_config_yaml(
        &redis.url(),
        cache.path(),
        "",
        &[git_agent_yaml(AGENT, &repo.url(), &[])],
    ))
    .await
    .context("cannot start the server")?;
    let kube = KubeApi::start()
        .await
        .context("cannot start the emulated API server")?;
    kube.put_object(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
    );
    let agent = AgentProcess::start(&server, AGENT, kube.client(), "bench");
    let mut admin = server
        .admin()
        .await
        .context("cannot connect the admin client")?;
    wait_connected(&mut admin, AGENT, Duration::from_secs(30)).await?;
    let lease_deadline = Instant::now() + Duration::from_secs(30);
    while kube.list("coordination.k8s.io/v1", "Lease").is_empty() {
        if Instant::now() > lease_deadline {
            bail!("the agent took no Lease within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let waited = push_and_settle(&server, cache.path(), &commit).await?;

    // First apply: everything is created.
    kube.reset_requests();
    let green = send_green(&server, &commit, 1).await?;
    let (sent, sent_ms) = (green.at, green.at_unix_ms);
    let healthy = wait_healthy(&mut admin, AGENT, &commit, 0, Duration::from_secs(100)).await?;
    let first_time = sent.elapsed();
    let first_requests = kube.requests();
    let first_phases = phases(&mut admin, &commit, healthy.generation, sent_ms).await?;
    let applied = kube
        .list("v1", "ConfigMap")
        .iter()
        .filter(|o| o["metadata"]["namespace"] == NAMESPACE)
        .count();
    if applied != args.objects {
        bail!(
            "{applied} ConfigMaps in {NAMESPACE} after the apply, expected {}",
            args.objects
        );
    }

    // Re-apply of the same revision under a new generation: nothing changes.
    kube.reset_requests();
    let trigger_ms = greenlight_server::clock::now_ms();
    let triggered = Instant::now();
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
    if generation <= healthy.generation {
        bail!(
            "TriggerSync did not move the generation ({generation}, was {})",
            healthy.generation
        );
    }
    let again = wait_healthy(
        &mut admin,
        AGENT,
        &commit,
        generation,
        Duration::from_secs(100),
    )
    .await?;
    let second_time = triggered.elapsed();
    let second_requests = kube.requests();
    let second_phases = phases(&mut admin, &commit, again.generation, trigger_ms).await?;

    agent.kill();
    server.stop().await.context("cannot stop the server")?;
    kube.stop();
    drop(redis);

    println!(
        "scenario: apply, {} ConfigMaps in {} files, one agent (AgentProcess) against the emulated API server, store redis",
        args.objects,
        files.len()
    );
    println!(
        "waited {} ms after the push webhook for its fetch (incl. {} ms settling); not timed",
        ms(waited),
        ms(SETTLE)
    );
    let (methods, targets) = count_requests(&first_requests);
    println!("first apply (creates every object):");
    println!(
        "  pipeline webhook -> Healthy report received by the server: {} ms (its receive timestamp, ms resolution)",
        healthy.received_at_unix_ms - sent_ms
    );
    println!(
        "  pipeline webhook -> Healthy report seen by polling GetAgent: {} ms",
        ms(first_time)
    );
    println!("  reports as the server received them: {first_phases}");
    println!(
        "  {} requests to the API server: {}",
        first_requests.len(),
        breakdown(&methods)
    );
    println!("  by target: {}", breakdown(&targets));
    let (methods, targets) = count_requests(&second_requests);
    println!("re-apply without change (TriggerSync without sha, generation {generation}):");
    println!(
        "  TriggerSync -> Healthy report received by the server: {} ms",
        again.received_at_unix_ms - trigger_ms
    );
    println!(
        "  TriggerSync -> Healthy report seen by polling GetAgent: {} ms",
        ms(second_time)
    );
    println!("  reports as the server received them: {second_phases}");
    println!(
        "  {} requests to the API server: {}",
        second_requests.len(),
        breakdown(&methods)
    );
    println!("  by target: {}", breakdown(&targets));
    println!("  (the agent's Lease requests in the same period are counted too)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(method: &str, path: &str) -> RequestRecord {
        RequestRecord {
            method: method.into(),
            path: path.into(),
            query: String::new(),
        }
    }

    #[test]
    fn requests_are_classified_by_resource() {
        assert_eq!(
            classify(&record("PATCH", "/api/v1/namespaces/apps/configmaps/cm-1")),
            "PATCH configmaps in apps"
        );
        assert_eq!(
            classify(&record(
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/default/leases/x"
            )),
            "PUT leases in default"
        );
        assert_eq!(classify(&record("GET", "/apis/apps/v1")), "GET discovery");
        assert_eq!(classify(&record("GET", "/api")), "GET discovery");
        assert_eq!(classify(&record("GET", "/apis")), "GET discovery");
        assert_eq!(classify(&record("GET", "/version")), "GET discovery");
        assert_eq!(
            classify(&record("GET", "/api/v1/namespaces")),
            "GET namespaces"
        );
    }
}
