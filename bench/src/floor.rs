//! The ceiling next to which `state` puts its latency and memory figures: a bare tonic server
//! that speaks the agents' `Sync` protocol with none of Greenlight's work behind it. No store,
//! no gate, no index, no task of its own per stream: each stream's body reads the latest
//! revision from one watch channel, and an `IngestService.RecordPipeline` call replaces it.
//! It runs as a child process (`greenlight-bench floor-server`), so that its RSS and CPU time
//! are its own, and the same benchmark clients read from it as from `greenlight-server`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::Stream;
use greenlight::digest::ContentDigest;
use greenlight::v1::agent_service_server::{AgentService, AgentServiceServer};
use greenlight::v1::ingest_service_client::IngestServiceClient;
use greenlight::v1::ingest_service_server::{IngestService, IngestServiceServer};
use greenlight::v1::{self, sync_event::Event};
use prost::bytes::Bytes;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use greenlight_e2e::process::rss_bytes_of;
use greenlight_server::grpc::file_chunks;
// The keepalive `greenlight-server` sets, so that each connection carries the same timers.
use greenlight_server::run::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

use crate::process::cpu_time_of;

/// What every stream is sent: the events of the latest revision, shared.
type Latest = Arc<[v1::SyncEvent]>;

/// What the floor server sends with each revision: `files` ConfigMaps adding up to `bytes`
/// (none when `files` is 0), as `state` commits them.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct Manifests {
    #[arg(long, default_value_t = 0)]
    files: usize,
    #[arg(long, default_value_t = 0)]
    bytes: u64,
}

impl Manifests {
    /// The manifest set of `round`, as path and content.
    fn of_round(self, round: u32) -> Vec<(String, Bytes)> {
        if self.files == 0 {
            return Vec::new();
        }
        crate::state::manifest_files(self.files, self.bytes, round)
            .into_iter()
            .map(|(path, content)| (path, Bytes::from(content)))
            .collect()
    }
}

/// The events announcing `sha` (pipeline `pipeline_id`) with `files`, as `greenlight-server`
/// sends a revision: a header, each file in chunks, and the trailer with their digest.
fn revision_events(sha: &str, pipeline_id: u64, files: &[(String, Bytes)]) -> Latest {
    let total_bytes = files.iter().map(|(_, content)| content.len() as u64).sum();
    let header = v1::RevisionHeader {
        revision: Some(v1::Revision {
            sha: sha.to_owned(),
            pipeline_id: Some(pipeline_id),
            reason: format!("pipeline {pipeline_id} succeeded"),
            decided_at_unix_ms: 1_764_979_200_000,
            generation: pipeline_id,
            force_prune: false,
        }),
        project: greenlight_e2e::PROJECT.to_owned(),
        r#ref: crate::common::BRANCH.to_owned(),
        file_count: u32::try_from(files.len()).unwrap_or(u32::MAX),
        total_bytes,
        settings: Some(v1::ApplySettings {
            default_namespace: "default".to_owned(),
            prune: true,
            prune_propagation_policy: "background".to_owned(),
            ..Default::default()
        }),
        agent: "agent-00000".to_owned(),
        traceparent: String::new(),
    };
    let mut digest = ContentDigest::new();
    let mut events = vec![v1::SyncEvent {
        event: Some(Event::Header(header)),
    }];
    for (path, content) in files {
        digest.add_file(path, content);
        events.extend(file_chunks(path, content).map(|chunk| v1::SyncEvent {
            event: Some(Event::Chunk(chunk)),
        }));
    }
    events.push(v1::SyncEvent {
        event: Some(Event::Trailer(v1::RevisionTrailer {
            content_sha256: digest.finish(),
        })),
    });
    Arc::from(events)
}

struct Floor {
    latest: watch::Sender<Latest>,
    manifests: Manifests,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::SyncEvent, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Floor {
    type SyncStream = EventStream;

    async fn sync(
        &self,
        _request: Request<v1::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let mut latest = self.latest.subscribe();
        // The current revision first, as a new agent is sent it.
        latest.mark_changed();
        let events = futures_util::stream::unfold(
            (latest, None::<(Latest, usize)>),
            |(mut latest, pending)| async move {
                let (events, next) = match pending {
                    Some(pending) => pending,
                    None => {
                        latest.changed().await.ok()?;
                        (latest.borrow_and_update().clone(), 0)
                    }
                };
                let event = events.get(next)?.clone();
                let pending = (next + 1 < events.len()).then_some((events, next + 1));
                Some((Ok(event), (latest, pending)))
            },
        );
        Ok(Response::new(Box::pin(events)))
    }

    async fn report_status(
        &self,
        _request: Request<v1::ReportStatusRequest>,
    ) -> Result<Response<v1::ReportStatusResponse>, Status> {
        Ok(Response::new(v1::ReportStatusResponse {}))
    }

    async fn report_preview(
        &self,
        _request: Request<v1::ReportPreviewRequest>,
    ) -> Result<Response<v1::ReportPreviewResponse>, Status> {
        Err(Status::unimplemented("the floor server takes no previews"))
    }
}

#[tonic::async_trait]
impl IngestService for Floor {
    async fn record_push(
        &self,
        _request: Request<v1::RecordPushRequest>,
    ) -> Result<Response<v1::RecordResponse>, Status> {
        Ok(Response::new(v1::RecordResponse {
            outcome: "ignored: the floor server sends on pipelines only".to_owned(),
        }))
    }

    async fn record_pipeline(
        &self,
        request: Request<v1::RecordPipelineRequest>,
    ) -> Result<Response<v1::RecordResponse>, Status> {
        let request = request.into_inner();
        // The pipeline id is the fan-out's round.
        let round = u32::try_from(request.pipeline_id).unwrap_or(u32::MAX);
        let files = self.manifests.of_round(round);
        self.latest
            .send_replace(revision_events(&request.sha, request.pipeline_id, &files));
        Ok(Response::new(v1::RecordResponse {
            outcome: "recorded".to_owned(),
        }))
    }
}

/// `greenlight-bench floor-server`: serves on a free loopback port, prints `listening on
/// <address>` and runs until killed.
pub async fn serve(manifests: Manifests) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind a loopback port")?;
    let address = listener.local_addr()?;
    let first = revision_events(&greenlight_e2e::sha(1), 1, &manifests.of_round(0));
    let (latest, _) = watch::channel(first);
    let floor = Arc::new(Floor { latest, manifests });
    println!("listening on {address}");
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(AgentServiceServer::from_arc(floor.clone()))
        .add_service(IngestServiceServer::from_arc(floor))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .context("the floor server failed")
}

/// A floor server child process, killed when dropped.
pub struct FloorProcess {
    child: tokio::process::Child,
    pid: u32,
    address: SocketAddr,
    ingest: IngestServiceClient<Channel>,
}

impl FloorProcess {
    /// Starts `greenlight-bench floor-server` from this very binary, sending `files` files
    /// of `bytes` in all with each revision, and connects to it.
    pub async fn start(files: usize, bytes: u64) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this benchmark's binary")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("floor-server")
            .args(["--files", &files.to_string(), "--bytes", &bytes.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the floor server")?;
        let pid = child.id().context("the floor server exited at once")?;
        let stdout = child
            .stdout
            .take()
            .context("no stdout of the floor server")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("the floor server did not say where it listens within 30 s")??
            .context("the floor server exited before listening")?;
        let Some(address) = line.strip_prefix("listening on ") else {
            bail!("the floor server said {line:?} instead of where it listens");
        };
        let address: SocketAddr = address
            .parse()
            .with_context(|| format!("the floor server said {line:?}"))?;
        let ingest = IngestServiceClient::connect(format!("http://{address}"))
            .await
            .context("cannot connect to the floor server")?;
        Ok(Self {
            child,
            pid,
            address,
            ingest,
        })
    }

    /// The URL the agents' streams dial.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        Ok(rss_bytes_of(self.pid)? / 1024)
    }

    /// CPU time used so far.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        cpu_time_of(self.pid)
    }

    /// Publishes `sha` as pipeline `id`'s success: when it was sent and how long the answer
    /// took.
    pub async fn green(&self, sha: &str, id: u64) -> anyhow::Result<(Instant, Duration)> {
        // A clone shares the connection.
        let mut ingest = self.ingest.clone();
        let at = Instant::now();
        ingest
            .record_pipeline(v1::RecordPipelineRequest {
                sha: sha.to_owned(),
                pipeline_id: id,
                ..Default::default()
            })
            .await
            .context("the floor server refused a pipeline")?;
        Ok((at, at.elapsed()))
    }

    /// Kills the process and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.child
            .kill()
            .await
            .context("cannot stop the floor server")
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use greenlight_agent::assemble::Assembler;

    use super::*;

    /// What a stream of `floor` yields until the agent's assembler completes a revision.
    async fn next_revision(stream: &mut EventStream) -> (String, usize) {
        let mut assembler = Assembler::new();
        loop {
            let event = stream
                .next()
                .await
                .expect("the stream ended")
                .expect("an error");
            if let Some(revision) = assembler.push(event).expect("the agent refused it") {
                return (revision.sha().to_owned(), revision.files.len());
            }
        }
    }

    #[tokio::test]
    async fn a_stream_gets_the_current_revision_then_each_published_one_with_its_files_as_an_agent_reads_them()
     {
        let manifests = Manifests {
            files: 3,
            bytes: 3000,
        };
        let (latest, _) = watch::channel(revision_events(
            &greenlight_e2e::sha(1),
            1,
            &manifests.of_round(0),
        ));
        let floor = Floor { latest, manifests };
        let mut stream = floor
            .sync(Request::new(v1::SyncRequest::default()))
            .await
            .expect("sync")
            .into_inner();
        assert_eq!(
            next_revision(&mut stream).await,
            (greenlight_e2e::sha(1), 3)
        );

        for round in 2..4 {
            let answer = floor
                .record_pipeline(Request::new(v1::RecordPipelineRequest {
                    sha: greenlight_e2e::sha(round),
                    pipeline_id: u64::from(round),
                    ..Default::default()
                }))
                .await
                .expect("record_pipeline")
                .into_inner();
            assert_eq!(answer.outcome, "recorded");
            assert_eq!(
                next_revision(&mut stream).await,
                (greenlight_e2e::sha(round), 3)
            );
        }
    }
}
