//! TLS everywhere: both listeners over TLS with a test CA, a wrong CA refused with a clear
//! error, and a certificate rotated in place served without a restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use greenlight::v1::GetAgentRequest;
use greenlight_agent::client::Client;
use greenlight_e2e::*;
use greenlight_server::config::{Config, Overrides};
use greenlight_server::{Listeners, RunError, run};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A new P-256 key, unencrypted, as `openssl req` arguments.
const NEW_EC_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";

/// Runs `openssl` in `dir` with the words of `args`, then `last` (which may hold spaces).
fn openssl(dir: &Path, args: &str, last: &str) -> anyhow::Result<()> {
    let output = Command::new("openssl")
        .args(args.split_whitespace())
        .arg(last)
        .current_dir(dir)
        .output()
        .context("cannot run openssl")?;
    if !output.status.success() {
        bail!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A test CA in a directory of its own, issuing server certificates for 127.0.0.1.
struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    fn new(name: &str) -> anyhow::Result<Self> {
        let ca = Self {
            dir: tempfile::tempdir()?,
        };
        openssl(
            ca.dir.path(),
            &format!(
                "req -x509 {NEW_EC_KEY} -keyout ca.key -out ca.pem -days 2 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign -subj"
            ),
            &format!("/CN={name}"),
        )?;
        Ok(ca)
    }

    fn pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a certificate for 127.0.0.1 and localhost named `cn` with `serial`, written to
    /// `cert` and `key` (replacing what they hold).
    fn issue(&self, cn: &str, serial: u32, cert: &Path, key: &Path) -> anyhow::Result<()> {
        let dir = self.dir.path();
        std::fs::write(
            dir.join("ext.cnf"),
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )?;
        openssl(
            dir,
            &format!("req -new {NEW_EC_KEY} -keyout new.key -out new.csr -subj"),
            &format!("/CN={cn}"),
        )?;
        openssl(
            dir,
            "x509 -req -in new.csr -CA ca.pem -CAkey ca.key -days 2 -extfile ext.cnf -out new.pem -set_serial",
            &serial.to_string(),
        )?;
        // In place, as a renewal writes them.
        std::fs::write(cert, std::fs::read(dir.join("new.pem"))?)?;
        std::fs::write(key, std::fs::read(dir.join("new.key"))?)?;
        Ok(())
    }
}

/// A server with `tls:` pointing at `cert` and `key`, agent `prod` in pipeline mode.
struct TlsServer {
    grpc: SocketAddr,
    http: SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), RunError>>,
    _data_dir: tempfile::TempDir,
}

impl TlsServer {
    async fn start(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        install_crypto();
        let yaml = format!(
            "{}tls: {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
            config_yaml(None, &[AgentDef::new("prod")]),
            cert.display(),
            key.display()
        );
        let data_dir = tempfile::tempdir()?;
        let overrides = Overrides {
            data_dir: Some(data_dir.path().to_owned()),
            ..Overrides::default()
        };
        let config = Config::from_yaml(&yaml, &overrides)?;
        let grpc = TcpListener::bind("127.0.0.1:0").await?;
        let http = TcpListener::bind("127.0.0.1:0").await?;
        let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(run(config, Listeners { grpc, http }, shutdown.clone()));
        Ok(Self {
            grpc: grpc_addr,
            http: http_addr,
            shutdown,
            handle,
            _data_dir: data_dir,
        })
    }

    fn grpc_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.grpc.port())
    }

    fn http_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.http.port())
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle).await???;
        Ok(())
    }
}

/// An HTTPS client trusting only `ca`.
fn https(ca: &Path) -> anyhow::Result<reqwest::Client> {
    install_crypto();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca)?)?;
    Ok(reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(15))
        .build()?)
}

/// Posts a GitLab webhook over `client`; returns the status code.
async fn hook(
    client: &reqwest::Client,
    server: &TlsServer,
    event: &str,
    body: &serde_json::Value,
) -> anyhow::Result<u16> {
    let response = client
        .post(server.http_url("/webhooks/gitlab"))
        .header("X-Gitlab-Event", event)
        .header("X-Gitlab-Token", GITLAB_SECRET)
        .json(body)
        .send()
        .await?;
    Ok(response.status().as_u16())
}

/// The leaf certificate (DER) `addr` presents in a handshake offering `alpn`, verified
/// against `ca`.
async fn presented(addr: SocketAddr, ca: &Path, alpn: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let stream = connector
        .connect(ServerName::try_from("127.0.0.1")?, tcp)
        .await?;
    let (_, session) = stream.get_ref();
    let leaf = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .context("no certificate presented")?;
    Ok(leaf.as_ref().to_vec())
}

fn der_of(pem: &Path) -> anyhow::Result<Vec<u8>> {
    Ok(CertificateDer::from_pem_file(pem)?.as_ref().to_vec())
}

/// greenlightctl `status prod` against `server` trusting `ca`; its exit code.
async fn ctl_status(server: &TlsServer, ca: &Path) -> i32 {
    greenlight::ctl::run([
        "greenlightctl".to_owned(),
        "--server".to_owned(),
        server.grpc_url(),
        "--ca-file".to_owned(),
        ca.display().to_string(),
        "--token".to_owned(),
        ADMIN_TOKEN.to_owned(),
        "status".to_owned(),
        "prod".to_owned(),
    ])
    .await
}

/// Waits until both listeners complete a handshake.
async fn ready(server: &TlsServer, ca: &Path) -> anyhow::Result<()> {
    eventually("TLS listeners", || async {
        let grpc = presented(server.grpc, ca, b"h2").await;
        let http = presented(server.http, ca, b"http/1.1").await;
        Ok((grpc.is_ok() && http.is_ok()).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_test_ca_serves_the_agent_greenlightctl_and_webhooks() -> anyhow::Result<()> {
    let ca = TestCa::new("Greenlight Test CA")?;
    let files = tempfile::tempdir()?;
    let (cert, key) = (files.path().join("tls.crt"), files.path().join("tls.key"));
    ca.issue("greenlight.test", 1, &cert, &key)?;
    let server = TlsServer::start(&cert, &key).await?;
    ready(&server, &ca.pem()).await?;

    // The agent's stream, over TLS with --ca-file.
    let agent = Client::connect(&server.grpc_url(), &agent_token("prod"), Some(&ca.pem())).await?;
    let mut stream = agent.sync(None).await?;

    // Webhooks over https move the gate; the agent hears of it.
    let client = https(&ca.pem())?;
    let x = sha(1);
    let push = push_payload(PROJECT, "main", ZERO, &x);
    assert_eq!(hook(&client, &server, "Push Hook", &push).await?, 200);
    let green = pipeline_payload(PROJECT, "main", &x, 1, "success", "push");
    assert_eq!(hook(&client, &server, "Pipeline Hook", &green).await?, 200);
    assert_eq!(next_revision(&mut stream, SOON).await?.sha(), x);
    let healthz = client.get(server.http_url("/healthz")).send().await?;
    assert_eq!(healthz.status().as_u16(), 200);

    // greenlightctl with --ca-file.
    assert_eq!(ctl_status(&server, &ca.pem()).await, 0);

    // Plaintext to a TLS listener gets nowhere.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?
        .get(format!("http://{}/healthz", server.http))
        .send()
        .await;
    assert!(
        plain.map_or(true, |r| !r.status().is_success()),
        "plaintext answered"
    );
    let plain_grpc = Client::connect(&format!("http://{}", server.grpc), "t", None).await;
    let refused = match plain_grpc {
        Err(_) => true,
        Ok(client) => client.sync(None).await.is_err(),
    };
    assert!(refused, "plaintext gRPC was served");
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_fails_with_a_clear_error() -> anyhow::Result<()> {
    let ca = TestCa::new("Greenlight Test CA")?;
    let other = TestCa::new("Someone Else's CA")?;
    let files = tempfile::tempdir()?;
    let (cert, key) = (files.path().join("tls.crt"), files.path().join("tls.key"));
    ca.issue("greenlight.test", 1, &cert, &key)?;
    let server = TlsServer::start(&cert, &key).await?;
    ready(&server, &ca.pem()).await?;

    let error =
        match Client::connect(&server.grpc_url(), &agent_token("prod"), Some(&other.pem())).await {
            Ok(client) => match client.sync(None).await {
                Ok(_) => bail!("the agent trusted a certificate of another CA"),
                Err(error) => error.to_string(),
            },
            Err(error) => error.to_string(),
        };
    assert!(
        error.contains("invalid peer certificate") && error.contains("UnknownIssuer"),
        "{error}"
    );
    assert!(
        error.contains("--ca-file"),
        "the message says what to check: {error}"
    );
    assert_eq!(ctl_status(&server, &other.pem()).await, 2);
    let webhook = https(&other.pem())?
        .get(server.http_url("/healthz"))
        .send()
        .await;
    assert!(webhook.is_err(), "HTTPS trusted another CA");

    // The right CA still works.
    assert_eq!(ctl_status(&server, &ca.pem()).await, 0);
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_without_a_restart() -> anyhow::Result<()> {
    let ca = TestCa::new("Greenlight Test CA")?;
    let files = tempfile::tempdir()?;
    let (cert, key) = (files.path().join("tls.crt"), files.path().join("tls.key"));
    ca.issue("first.greenlight.test", 1001, &cert, &key)?;
    let first = der_of(&cert)?;
    let server = TlsServer::start(&cert, &key).await?;
    ready(&server, &ca.pem()).await?;
    assert_eq!(presented(server.grpc, &ca.pem(), b"h2").await?, first);
    assert_eq!(presented(server.http, &ca.pem(), b"http/1.1").await?, first);
    let agent = Client::connect(&server.grpc_url(), &agent_token("prod"), Some(&ca.pem())).await?;

    // Renewed in place: the next handshakes on both listeners present the new one.
    ca.issue("second.greenlight.test", 1002, &cert, &key)?;
    let second = der_of(&cert)?;
    assert_ne!(first, second);
    assert_eq!(presented(server.grpc, &ca.pem(), b"h2").await?, second);
    assert_eq!(
        presented(server.http, &ca.pem(), b"http/1.1").await?,
        second
    );
    assert_eq!(ctl_status(&server, &ca.pem()).await, 0);
    // A connection made before the rotation keeps working.
    agent.sync(None).await?;

    // A broken renewal (a key that is not the certificate's) keeps the last good one.
    let stray = tempfile::tempdir()?;
    ca.issue(
        "third.greenlight.test",
        1003,
        &stray.path().join("c"),
        &stray.path().join("k"),
    )?;
    std::fs::copy(stray.path().join("c"), &cert)?;
    assert_eq!(presented(server.grpc, &ca.pem(), b"h2").await?, second);
    std::fs::write(&cert, "not a certificate")?;
    assert_eq!(
        presented(server.http, &ca.pem(), b"http/1.1").await?,
        second
    );
    assert_eq!(ctl_status(&server, &ca.pem()).await, 0);

    // Fixed: served again.
    std::fs::copy(stray.path().join("c"), &cert)?;
    std::fs::copy(stray.path().join("k"), &key)?;
    let third = der_of(&cert)?;
    assert_eq!(presented(server.grpc, &ca.pem(), b"h2").await?, third);
    let admin = greenlight::connect::endpoint(&server.grpc_url(), Some(&ca.pem()))?
        .connect()
        .await?;
    let mut admin = greenlight::v1::admin_service_client::AdminServiceClient::with_interceptor(
        admin,
        greenlight::auth::Bearer::new(ADMIN_TOKEN)?,
    );
    admin
        .get_agent(GetAgentRequest {
            name: "prod".into(),
        })
        .await?;
    server.stop().await
}
