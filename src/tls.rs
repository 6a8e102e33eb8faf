//! The process-wide TLS crypto provider: ring, for every crate that speaks TLS (tonic,
//! kube, reqwest, gix over https).

/// Installs ring as the process-wide rustls provider unless one is installed already.
/// Safe to call from anywhere, any number of times.
pub fn install_ring() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another caller installing ring too is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
