//! Serving both listeners over TLS, with a certificate that follows its files: a renewed
//! certificate (cert-manager, a rotated Secret) is served from the next handshake on, without
//! a restart.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, error, info, warn};

/// Where the server's certificate chain and private key are read from (PEM).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Why a certificate cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no usable PEM private key: {message}")]
    Key { path: PathBuf, message: String },
    #[error("the key in {key} does not belong to the certificate in {cert}: {message}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// What identifies a version of the files without reading them: a rewrite changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    cert: (SystemTime, u64),
    key: (SystemTime, u64),
}

fn stamp(settings: &TlsSettings) -> io::Result<Stamp> {
    let of = |path: &Path| {
        // Follows symlinks: a Kubernetes Secret volume swaps a symlink to a new directory.
        let meta = std::fs::metadata(path)?;
        Ok::<_, io::Error>((meta.modified()?, meta.len()))
    };
    Ok(Stamp {
        cert: of(&settings.cert_file)?,
        key: of(&settings.key_file)?,
    })
}

/// Reads and checks the certificate chain and key.
pub fn load(settings: &TlsSettings) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(&settings.cert_file)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect::<Vec<_>>();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: settings.cert_file.clone(),
        });
    }
    let key_error = |message: String| TlsError::Key {
        path: settings.key_file.clone(),
        message,
    };
    let key = PrivateKeyDer::from_pem_slice(&read(&settings.key_file)?)
        .map_err(|e| key_error(e.to_string()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| key_error(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| TlsError::Mismatch {
        cert: settings.cert_file.clone(),
        key: settings.key_file.clone(),
        message: e.to_string(),
    })?;
    Ok(certified)
}

#[derive(Debug)]
struct Current {
    stamp: Option<Stamp>,
    key: Arc<CertifiedKey>,
}

/// Serves the certificate in the files, re-reading them on the first handshake after they
/// changed. A new pair that cannot be used is logged and the previous one kept, so a
/// half-written rotation never takes the server off the air.
#[derive(Debug)]
pub struct ReloadingCert {
    settings: TlsSettings,
    current: RwLock<Current>,
}

impl ReloadingCert {
    /// Loads the files now: a server must not start without a usable certificate.
    pub fn new(settings: TlsSettings) -> Result<Self, TlsError> {
        let stamp = stamp(&settings).ok();
        let key = Arc::new(load(&settings)?);
        Ok(Self {
            settings,
            current: RwLock::new(Current { stamp, key }),
        })
    }

    /// The certificate to present now, reloaded first if the files changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let now = stamp(&self.settings).ok();
        {
            let current = self.current.read().unwrap_or_else(|p| p.into_inner());
            if now.is_none() || current.stamp == now {
                return current.key.clone();
            }
        }
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.stamp != now {
            // Remembered even when loading fails: the next change of the files retries.
            current.stamp = now;
            match load(&self.settings) {
                Ok(key) => {
                    info!(cert = %self.settings.cert_file.display(), "TLS certificate reloaded");
                    current.key = Arc::new(key);
                }
                Err(error) => {
                    error!(%error, "cannot reload the TLS certificate; still serving the previous one");
                }
            }
        }
        current.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A TLS acceptor presenting `cert`, offering the ALPN `protocols` (gRPC needs `h2`).
pub fn acceptor(cert: Arc<ReloadingCert>, protocols: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(cert);
    config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A client that does not finish its handshake within this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight; beyond this, accepting waits, so slow clients cannot pile up.
const MAX_HANDSHAKES: usize = 1024;

type Handshake = (
    SocketAddr,
    Result<io::Result<TlsStream<TcpStream>>, tokio::time::error::Elapsed>,
);

/// Accepted connections after their TLS handshake. Handshakes run concurrently, so one
/// slow client delays nobody; they are owned here and end when this is dropped.
pub struct TlsIncoming {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Handshake>,
}

impl TlsIncoming {
    /// Accepts on `listener` through `acceptor`.
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> Self {
        Self {
            listener,
            acceptor,
            handshakes: JoinSet::new(),
        }
    }

    /// The next connection whose handshake succeeded. Cancel safe.
    pub async fn next(&mut self) -> (TlsStream<TcpStream>, SocketAddr) {
        loop {
            tokio::select! {
                accepted = self.listener.accept(), if self.handshakes.len() < MAX_HANDSHAKES => {
                    match accepted {
                        Ok((tcp, peer)) => {
                            // Without TCP_NODELAY, answers over a packet wait for delayed ACKs.
                            let _ = tcp.set_nodelay(true);
                            let acceptor = self.acceptor.clone();
                            self.handshakes.spawn(async move {
                                (peer, tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await)
                            });
                        }
                        Err(error) => accept_failed(error).await,
                    }
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    match done {
                        Ok((peer, Ok(Ok(stream)))) => return (stream, peer),
                        // Scanners and clients distrusting our CA end here; not worth a warning each.
                        Ok((peer, Ok(Err(error)))) => debug!(%peer, %error, "TLS handshake failed"),
                        Ok((peer, Err(_))) => debug!(%peer, "TLS handshake timed out"),
                        Err(error) => warn!(%error, "TLS handshake task failed"),
                    }
                }
            }
        }
    }

    /// The connections as the stream tonic serves from.
    pub fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = io::Result<TlsStream<TcpStream>>> + Send {
        futures_util::stream::unfold(self, |mut incoming| async move {
            let (stream, _) = incoming.next().await;
            Some((Ok(stream), incoming))
        })
    }
}

/// As axum does: per-connection errors are the client's, others (out of file descriptors)
/// need a pause before the next try.
async fn accept_failed(error: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        error.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    error!(%error, "cannot accept connections; retrying in 1s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

impl axum::serve::Listener for TlsIncoming {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.next().await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}
