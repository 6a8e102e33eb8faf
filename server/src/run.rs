//! Wiring: builds the store, the engine and both listeners, and runs until shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use greenlight::backoff::Backoff;
use greenlight::v1::admin_service_server::AdminServiceServer;
use greenlight::v1::agent_service_server::AgentServiceServer;
use greenlight::v1::ingest_service_server::IngestServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::catalog::{Catalog, LiveCatalog};
use crate::config::Config;
use crate::engine::Engine;
use crate::git::Mirrors;
use crate::gitlab::{GitLab, PipelineConfirmer, StatusPublisher, run_catch_up};
use crate::grpc::{AdminApi, AgentApi, IngestApi};
use crate::http::{HttpState, router};
use crate::metrics::{CountedStore, Metrics};
use crate::store::{EmbeddedStore, RedisStore, Store, StoreError};
use crate::tls::{ReloadingCert, TlsIncoming, acceptor};

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot bind {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up the store: {0}")]
    Store(#[from] StoreError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("cannot start the HTTP listener's runtime: {0}")]
    HttpRuntime(#[source] std::io::Error),
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("invalid gitlab settings: {0}")]
    GitLab(crate::gitlab::GitLabError),
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot set up the preview store: {0}")]
    Previews(#[from] crate::preview::PreviewStoreError),
}

/// The sockets the server serves on; tests bind port 0 and read the addresses back.
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
}

impl Listeners {
    /// Binds the addresses in `config`.
    pub async fn bind(config: &Config) -> Result<Self, RunError> {
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .map_err(|source| RunError::Bind {
                what: "gRPC",
                addr: config.grpc_addr,
                source,
            })?;
        let http = TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| RunError::Bind {
                what: "HTTP",
                addr: config.http_addr,
                source,
            })?;
        Ok(Self { grpc, http })
    }
}

/// Threads of the runtime that serves the HTTP listener (webhooks, probes, metrics, pages).
const HTTP_THREADS: usize = 2;

/// The runtime of the HTTP listener, apart from the one that evaluates and streams: tokio
/// has no priorities, so on a shared runtime a webhook's answer would wait behind the tasks
/// of an evaluation that wakes thousands of agents' streams. Stopped in the background when
/// dropped, which an async context allows.
struct HttpRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl HttpRuntime {
    fn start() -> Result<Self, RunError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(HTTP_THREADS)
            .thread_name("greenlight-http")
            .enable_all()
            .build()
            .map_err(RunError::HttpRuntime)?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }
}

impl Drop for HttpRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// How long stopping waits for background work (a fetch, a commit status post) to end.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// HTTP/2 pings keep idle streams alive through proxies and reveal dead agents within a minute.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves until `shutdown` fires, then stops accepting, ends streams and returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::default());
    let store: Arc<dyn Store> = match &config.redis {
        Some(settings) => {
            let redis = RedisStore::connect(settings, shutdown.clone(), metrics.log())?;
            match redis.check_layout().await {
                Err(error @ StoreError::OldLayout { .. }) => return Err(error.into()),
                Err(error) => {
                    // Redis may come later: check then, and stop rather than serve on data
                    // this version would misread.
                    warn!(%error, "cannot check the store's layout yet; will retry");
                    let redis = Arc::new(redis);
                    tokio::spawn(check_layout_later(redis.clone(), shutdown.clone()));
                    redis
                }
                Ok(()) => Arc::new(redis),
            }
        }
        None => {
            let data_dir = config.data_dir.clone();
            let mut embedded = tokio::task::spawn_blocking(move || EmbeddedStore::open(&data_dir))
                .await
                .map_err(|error| StoreError::Embedded(format!("cannot open: {error}")))??;
            if config.gitlab.is_none() {
                // No status publisher runs to take the change log's entries.
                embedded = embedded.without_status_feed();
            }
            info!(
                "no redis configured: using the embedded store (a single replica; run several on Redis)"
            );
            Arc::new(embedded)
        }
    };
    let store: Arc<dyn Store> = Arc::new(CountedStore::new(store, metrics.clone()));
    info!(
        store = store.describe(),
        replica = config.replica_id,
        agents = config.agents.len(),
        "starting"
    );
    // Every background task, so that stopping waits for them instead of cutting them off.
    let tasks = TaskTracker::new();
    let catalog = Arc::new(LiveCatalog::new(Catalog::new(
        &config.agents,
        config.badge_secret.as_ref(),
    )));
    let mirrors = Mirrors::with_timer(config.git.clone(), metrics.clone());
    let agents = catalog.clone();
    tasks.spawn(mirrors.upkeep(
        move || {
            agents
                .load()
                .agents()
                .filter_map(|a| a.source.clone())
                .collect()
        },
        shutdown.clone(),
    ));
    let gitlab = config
        .gitlab
        .as_ref()
        .map(|settings| GitLab::new(&settings.url, settings.token.clone()))
        .transpose()
        .map_err(RunError::GitLab)?;
    let confirmer = gitlab.clone().map(PipelineConfirmer::new);
    let preview_store: Arc<dyn crate::preview::PreviewStore> = match &config.redis {
        Some(settings) => Arc::new(crate::preview::store::RedisPreviews::connect(
            settings,
            shutdown.clone(),
        )?),
        None => {
            let data_dir = config.data_dir.clone();
            let previews = tokio::task::spawn_blocking(move || {
                crate::preview::store::MemoryPreviews::open(&data_dir)
            })
            .await
            .map_err(|error| StoreError::Embedded(format!("cannot open previews: {error}")))?
            .map_err(|error| StoreError::Embedded(error.to_string()))?;
            Arc::new(previews)
        }
    };
    let previews = crate::preview::Previews::new(
        catalog.clone(),
        preview_store,
        gitlab.clone(),
        config
            .gitlab
            .as_ref()
            .and_then(|g| g.status_target_url.clone()),
        tasks.clone(),
    );
    tasks.spawn(
        previews
            .clone()
            .run(shutdown.clone())
            .instrument(info_span!("previews")),
    );
    let engine = Engine::new(
        store,
        catalog,
        mirrors,
        config.replica_id.clone(),
        confirmer,
        tasks.clone(),
        metrics.clone(),
    );
    tasks.spawn(
        engine
            .clone()
            .follow(shutdown.clone())
            .instrument(info_span!("follow")),
    );
    if let (Some(settings), Some(gitlab)) = (&config.gitlab, gitlab) {
        let publisher = StatusPublisher::new(
            engine.clone(),
            gitlab.clone(),
            settings.status_target_url.clone(),
            metrics.clone(),
            settings.status_takeover,
        );
        tasks.spawn(
            publisher
                .run(shutdown.clone())
                .instrument(info_span!("commit_statuses")),
        );
        tasks.spawn(
            run_catch_up(
                engine.clone(),
                gitlab,
                settings.catch_up_interval,
                shutdown.clone(),
            )
            .instrument(info_span!("catch_up")),
        );
    }
    if let Err(error) = engine.reconcile_all(true).await {
        warn!(%error, "cannot evaluate agents at start; they will be once the store answers");
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServiceServer<AgentApi>>().await;
    health.set_serving::<AdminServiceServer<AdminApi>>().await;
    health.set_serving::<IngestServiceServer<IngestApi>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(greenlight::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let grpc_addr = listeners.grpc.local_addr().ok();
    // One certificate for both listeners, reloaded when its files change.
    let tls = match config.tls.clone() {
        Some(settings) => {
            let cert = Arc::new(ReloadingCert::new(settings)?);
            // axum here speaks HTTP/1.1 only.
            Some((
                acceptor(cert.clone(), &[b"h2"])?,
                acceptor(cert, &[b"http/1.1"])?,
            ))
        }
        None => None,
    };
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            AgentServiceServer::new(AgentApi::new(
                engine.clone(),
                previews.clone(),
                shutdown.clone(),
                config.stream_stall_timeout,
            ))
            .max_decoding_message_size(greenlight::report::MAX_REPORT_REQUEST_BYTES),
        )
        .add_service(AdminServiceServer::new(AdminApi::new(
            engine.clone(),
            previews.clone(),
            config.admin_token.clone(),
            shutdown.clone(),
            config.stream_stall_timeout,
        )))
        .add_service(
            IngestServiceServer::new(IngestApi::new(engine.clone(), config.ingest_tokens.clone()))
                .max_decoding_message_size(crate::grpc::MAX_INGEST_REQUEST_BYTES),
        );
    let grpc = async {
        match &tls {
            Some((grpc_tls, _)) => {
                let incoming = TlsIncoming::new(listeners.grpc, grpc_tls.clone());
                grpc.serve_with_incoming_shutdown(
                    incoming.into_stream(),
                    shutdown.clone().cancelled_owned(),
                )
                .await?;
            }
            None => {
                grpc.serve_with_incoming_shutdown(
                    // Without TCP_NODELAY, answers over a packet wait for delayed ACKs (~40 ms).
                    TcpIncoming::from(listeners.grpc).with_nodelay(Some(true)),
                    shutdown.clone().cancelled_owned(),
                )
                .await?;
            }
        }
        Ok::<_, RunError>(())
    };

    let http_addr = listeners.http.local_addr().ok();
    let engine_for_exit = engine.clone();
    let state = HttpState {
        engine,
        previews,
        webhook_secrets: config.webhook_secrets.clone(),
        metrics,
        gitlab_url: config.gitlab.as_ref().map(|gitlab| gitlab.url.clone()),
    };
    let app = router(state, config.max_body_bytes);
    let http_runtime = HttpRuntime::start()?;
    // The listener moves to the HTTP runtime's reactor, so that its connections are polled
    // there too.
    let http_listener = listeners.http.into_std().map_err(RunError::Http)?;
    let http_tls = tls.as_ref().map(|(_, http_tls)| http_tls.clone());
    let stopped = shutdown.clone().cancelled_owned();
    let serve_http = async move {
        let listener = TcpListener::from_std(http_listener)?;
        match http_tls {
            Some(http_tls) => {
                let incoming = TlsIncoming::new(listener, http_tls);
                axum::serve(incoming, app)
                    .with_graceful_shutdown(stopped)
                    .await
            }
            None => {
                let plain = listener.tap_io(|stream| {
                    let _ = stream.set_nodelay(true);
                });
                axum::serve(plain, app)
                    .with_graceful_shutdown(stopped)
                    .await
            }
        }
    };
    let served_http = http_runtime.handle.spawn(serve_http);
    let http = async {
        match served_http.await {
            Ok(result) => result.map_err(RunError::Http),
            Err(join) => Err(RunError::Http(std::io::Error::other(join))),
        }
    };
    info!(grpc = ?grpc_addr, http = ?http_addr, tls = tls.is_some(), "listening");

    let (grpc, http) = tokio::join!(grpc, http);
    shutdown.cancel();
    engine_for_exit.withdraw_presence().await;
    tasks.close();
    if tokio::time::timeout(DRAIN_DEADLINE, tasks.wait())
        .await
        .is_err()
    {
        warn!(
            still_running = tasks.len(),
            "background tasks did not stop in time; leaving them"
        );
    }
    drop(http_runtime);
    grpc?;
    http?;
    info!("stopped");
    Ok(())
}

/// Checks the store's layout once Redis answers; stops the server if it holds data of
/// another layout.
async fn check_layout_later(redis: Arc<RedisStore>, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.delay()) => {}
        }
        match redis.check_layout().await {
            Ok(()) => return,
            Err(error @ StoreError::OldLayout { .. }) => {
                error!(%error, "stopping");
                shutdown.cancel();
                return;
            }
            Err(error) => debug!(%error, "cannot check the store's layout yet"),
        }
    }
}
