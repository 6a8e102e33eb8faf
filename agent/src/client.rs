//! The gRPC connection to the server.

use std::path::Path;
use std::time::Duration;

pub use greenlight::auth::Bearer;
use greenlight::v1::agent_service_client::AgentServiceClient;
use greenlight::v1::{
    Preview, ReportPreviewRequest, ReportStatusRequest, StatusReport, SyncRequest,
};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::assemble::{AssembleError, Assembler, Ready, ReadyRevision};

/// Why talking to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Address(#[from] greenlight::connect::AddressError),
    #[error(transparent)]
    Token(#[from] greenlight::auth::InvalidToken),
    #[error("cannot connect: {}", greenlight::connect::describe(.0))]
    Connect(#[from] tonic::transport::Error),
    #[error("server said: {0}")]
    Status(#[from] Status),
    #[error("the stream broke the protocol: {0}")]
    Protocol(#[from] AssembleError),
}

/// A connected agent client.
#[derive(Clone)]
pub struct Client {
    inner: AgentServiceClient<InterceptedService<Channel, Bearer>>,
}

/// HTTP/2 keepalive: a dead server is noticed within a minute.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

impl Client {
    /// Connects to `server` (`http://` or `https://`), trusting `ca_file` for TLS if given.
    /// Whether plaintext is acceptable is decided at start ([`greenlight::connect::check_address`]).
    pub async fn connect(
        server: &str,
        token: &str,
        ca_file: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let channel = greenlight::connect::endpoint(server, ca_file)?
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect()
            .await?;
        Ok(Self {
            inner: AgentServiceClient::with_interceptor(channel, Bearer::new(token)?),
        })
    }

    /// Opens the stream of ready revisions, stating what the agent already applied.
    pub async fn sync(&self, applied: Option<&str>) -> Result<RevisionStream, ClientError> {
        self.sync_from(applied.map(|sha| (sha, None))).await
    }

    /// Opens the stream of ready revisions, stating what the agent applied and, if known,
    /// which generation of it, so that a re-sync requested meanwhile is not lost.
    pub async fn sync_from(
        &self,
        applied: Option<(&str, Option<u64>)>,
    ) -> Result<RevisionStream, ClientError> {
        let request = SyncRequest {
            applied_revision: applied.map(|(sha, _)| sha.to_owned()),
            agent_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            applied_generation: applied.and_then(|(_, generation)| generation),
        };
        let events = self.inner.clone().sync(request).await?.into_inner();
        Ok(RevisionStream {
            events,
            assembler: Assembler::new(),
        })
    }

    /// Reports progress or a result for a revision.
    pub async fn report(&self, report: StatusReport) -> Result<(), ClientError> {
        let traceparent = report.traceparent.clone();
        let mut request = tonic::Request::new(ReportStatusRequest {
            report: Some(report),
        });
        // W3C propagation: the server records the report in the apply's trace.
        if !traceparent.is_empty()
            && let Ok(value) = traceparent.parse()
        {
            request
                .metadata_mut()
                .insert(greenlight::telemetry::TRACEPARENT, value);
        }
        self.inner.clone().report_status(request).await?;
        Ok(())
    }

    /// Sends what a preview found.
    pub async fn report_preview(&self, preview: Preview) -> Result<(), ClientError> {
        self.inner
            .clone()
            .report_preview(ReportPreviewRequest {
                preview: Some(preview),
            })
            .await?;
        Ok(())
    }
}

/// Ready revisions as the server sends them.
pub struct RevisionStream {
    events: Streaming<greenlight::v1::SyncEvent>,
    assembler: Assembler,
}

impl RevisionStream {
    /// The next complete revision; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<ReadyRevision>, ClientError> {
        while let Some(event) = self.events.message().await? {
            if let Some(revision) = self.assembler.push(event)? {
                return Ok(Some(revision));
            }
        }
        Ok(None)
    }

    /// The next complete revision or preview request; `None` when the server ended the
    /// stream.
    pub async fn next_any(&mut self) -> Result<Option<Ready>, ClientError> {
        while let Some(event) = self.events.message().await? {
            if let Some(ready) = self.assembler.push_any(event)? {
                return Ok(Some(ready));
            }
        }
        Ok(None)
    }
}
