//! How clients (the agent, greenlightctl) reach the server: the address, the CA they trust,
//! and the refusal to send tokens in plaintext across a network.

use std::error::Error as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Uri};

/// Why a server address cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("invalid server address {0:?}: expected http://host:port or https://host:port")]
    Invalid(String),
    #[error(
        "refusing plaintext http:// to {0:?}, which is not loopback: tokens would cross the network in the clear; use https:// (with --ca-file for a private CA), or pass --insecure to accept that"
    )]
    Plaintext(String),
    #[error("--ca-file is only used with an https:// server address, not {0:?}")]
    CaWithoutTls(String),
    // The cause is in the message rather than a source, so that it is printed once.
    #[error("cannot read CA file {path}: {error}")]
    CaFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid TLS settings: {}", describe(.0))]
    Tls(tonic::transport::Error),
}

/// Whether `host` (as a URI spells it, IPv6 in brackets) is this machine.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks `server`: http or https, and plaintext only to loopback unless `insecure`.
pub fn check_address(server: &str, insecure: bool) -> Result<(), AddressError> {
    let invalid = || AddressError::Invalid(server.to_owned());
    let uri: Uri = server.parse().map_err(|_| invalid())?;
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(invalid)?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if insecure || is_loopback(host) => Ok(()),
        Some("http") => Err(AddressError::Plaintext(server.to_owned())),
        _ => Err(invalid()),
    }
}

/// The endpoint for `server`, trusting the CA certificates in `ca_file` (PEM) besides the
/// built-in roots for https.
pub fn endpoint(server: &str, ca_file: Option<&Path>) -> Result<Endpoint, AddressError> {
    let mut endpoint = Endpoint::from_shared(server.to_owned())
        .map_err(|_| AddressError::Invalid(server.to_owned()))?
        .connect_timeout(Duration::from_secs(10));
    if server.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|error| AddressError::CaFile {
                path: path.to_owned(),
                error,
            })?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).map_err(AddressError::Tls)?;
    } else if ca_file.is_some() {
        return Err(AddressError::CaWithoutTls(server.to_owned()));
    }
    Ok(endpoint)
}

/// A connection failure with its causes, which tonic's own message ("transport error")
/// leaves out, and a hint when the server's certificate was not trusted.
pub fn describe(error: &tonic::transport::Error) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = cause.source();
    }
    let mut text = parts.join(": ");
    if text.contains("invalid peer certificate") {
        text.push_str(
            " (the server's certificate is not signed by a trusted CA, or not for this host name: check --ca-file and the address)",
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_refused_beyond_loopback_unless_insecure() {
        for loopback in [
            "http://127.0.0.1:8150",
            "http://127.3.4.5:1",
            "http://localhost:8150",
            "http://[::1]:8150",
        ] {
            assert!(check_address(loopback, false).is_ok(), "{loopback}");
        }
        for remote in [
            "http://greenlight.example.com:8150",
            "http://10.0.0.1:8150",
            "http://[2001:db8::1]:8150",
            "http://localhost.example.com",
        ] {
            let err = check_address(remote, false).unwrap_err();
            assert!(matches!(err, AddressError::Plaintext(_)), "{remote}: {err}");
            assert!(err.to_string().contains("--insecure"), "{err}");
            assert!(check_address(remote, true).is_ok(), "{remote}");
        }
        assert!(check_address("https://greenlight.example.com:8150", false).is_ok());
        for bad in ["not a url", "grpc://host:1", "http://", "/path"] {
            assert!(
                matches!(check_address(bad, true), Err(AddressError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_ca_file_needs_https() {
        let err = endpoint("http://127.0.0.1:1", Some(Path::new("/ca.pem"))).unwrap_err();
        assert!(matches!(err, AddressError::CaWithoutTls(_)), "{err}");
        crate::tls::install_ring();
        let err = endpoint("https://127.0.0.1:1", Some(Path::new("/no/such/ca.pem"))).unwrap_err();
        assert!(err.to_string().contains("/no/such/ca.pem"), "{err}");
    }
}
