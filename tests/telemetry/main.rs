//! One trace from webhook to applied object: the server and the agent export their spans
//! over OTLP/gRPC to a collector this test runs, and every step of a deploy shows up in one
//! trace, parent-linked across the store's log, the revision stream and the report.
//!
//! A test binary of its own: the log subscriber is process-wide, and no other test should
//! export spans or depend on how logs are set up.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use anyhow::ensure;
use greenlight::telemetry::{self, LogFormat, TelemetrySettings};
use greenlight_e2e::control_plane::TestCluster;
use greenlight_e2e::fake_gitlab::FakeGitLab;
use greenlight_e2e::{
    AgentProcess, GitRepo, PROJECT, Redis, TestServer, configmap, eventually, git_agent_yaml,
    git_config_yaml,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use serde_json::json;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Collected {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

/// An OTLP trace collector on loopback that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Collected>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Collected {
                        service: service.clone(),
                        name: span.name,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent_span_id: span.parent_span_id,
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start() -> anyhow::Result<(Self, String)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let collector = Self::default();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Ok((collector, url))
    }

    fn spans(&self) -> Vec<Collected> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

const NULL_SHA: &str = "0000000000000000000000000000000000000000";

/// The steps of a deploy, in the order they happen, each a span name.
const STEPS: &[&str] = &[
    "webhook",            // webhook received
    "record_fact",        // fact recorded
    "evaluate_gate",      // gate evaluated
    "read_manifests",     // manifests read
    "send_revision",      // revision sent
    "apply",              // agent apply…
    "apply_stage",        // …with a span per ordering stage
    "health_wait",        // health wait
    "report_status",      // status reported
    "post_commit_status", // commit status posted
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_webhook_to_the_applied_objects_and_the_commit_status()
-> anyhow::Result<()> {
    let (collector, endpoint) = Collector::start().await?;
    let telemetry = telemetry::init(&TelemetrySettings {
        service: "greenlight",
        log_format: LogFormat::Text,
        otlp_endpoint: Some(endpoint),
    })?;
    let Some(cluster) = TestCluster::new().await? else {
        return Ok(());
    };
    let redis = Redis::start().await?;
    let cache = tempfile::tempdir()?;
    let repo = GitRepo::new()?;
    let gitlab = FakeGitLab::start().await?;
    let agents = [cluster.agent_entry(&git_agent_yaml("prod", &repo.url(), &[]))];
    let mut yaml = git_config_yaml(&redis.url(), cache.path(), "", &agents);
    yaml.push_str(&gitlab.config(""));
    let server = TestServer::start(&yaml).await?;
    let agent = AgentProcess::start_in(
        &server,
        "prod",
        cluster.agent_kube.clone(),
        "replica-1",
        &cluster.home,
    );

    let sha = repo.commit(&[("app.yaml", configmap("traced", "1").as_bytes())], &[])?;
    gitlab.put_pipeline(
        PROJECT,
        json!({ "id": 7, "sha": sha, "ref": "main", "status": "success", "source": "push" }),
    );
    server.release(NULL_SHA, &sha, 7).await?;
    eventually("the success commit status", || async {
        Ok(gitlab
            .statuses_for(&sha)
            .iter()
            .any(|(state, _, _)| state == "success")
            .then_some(()))
    })
    .await?;

    // Every finished span is exported by now or at the flush; the collector may still be
    // taking the last batch in.
    telemetry.flush();
    let trace = eventually("one trace holding every step", || async {
        telemetry.flush();
        let spans = collector.spans();
        let root = spans
            .iter()
            .find(|s| s.name == "webhook" && has_all_steps(&spans, &s.trace_id));
        Ok(root.map(|root| {
            spans
                .iter()
                .filter(|s| s.trace_id == root.trace_id)
                .cloned()
                .collect::<Vec<_>>()
        }))
    })
    .await?;

    let names: HashSet<&str> = trace.iter().map(|s| s.name.as_str()).collect();
    for step in STEPS {
        ensure!(names.contains(step), "the trace lacks `{step}`: {names:?}");
    }
    // Parent-linked: one root (the webhook), every other span's parent is in the trace.
    let ids: HashSet<&[u8]> = trace.iter().map(|s| s.span_id.as_slice()).collect();
    let roots: Vec<&str> = trace
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(roots, ["webhook"], "one root");
    for span in &trace {
        ensure!(
            span.parent_span_id.is_empty() || ids.contains(span.parent_span_id.as_slice()),
            "`{}` has a parent outside the trace",
            span.name
        );
    }
    // The agent's apply hangs below the server's revision send, and the report below the
    // apply: the context crossed the stream both ways, not an in-process shortcut.
    let by_id: HashMap<&[u8], &Collected> =
        trace.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    let parent = |name: &str| {
        trace
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| by_id.get(s.parent_span_id.as_slice()))
            .map(|p| p.name.clone())
    };
    assert_eq!(parent("apply").as_deref(), Some("send_revision"));
    assert_eq!(parent("report_status").as_deref(), Some("apply"));
    assert_eq!(parent("apply_stage").as_deref(), Some("apply"));
    ensure!(
        trace.iter().all(|s| s.service.contains("greenlight")),
        "spans carry the service name"
    );
    agent.stop().await?;
    drop(telemetry);
    Ok(())
}

fn has_all_steps(spans: &[Collected], trace_id: &[u8]) -> bool {
    let names: HashSet<&str> = spans
        .iter()
        .filter(|s| s.trace_id == trace_id)
        .map(|s| s.name.as_str())
        .collect();
    STEPS.iter().all(|step| names.contains(step))
}
