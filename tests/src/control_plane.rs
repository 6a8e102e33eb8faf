//! A real Kubernetes control plane for the tests: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok (which plays the kubelet of one fake
//! node), built by `scripts/k8s-tools` from the Go modules pinned in `tests/k8s-tools`.
//!
//! One control plane serves every test of a test process: it starts on first use, each test
//! works in namespaces of its own, and the processes die with the test process (they are
//! started with a parent-death signal from a thread that lives as long as the process).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::ApiResource;
use serde_json::{Value, json};

use crate::free_port;

/// The directory holding the binaries `scripts/k8s-tools` built.
pub const BIN_DIR_ENV: &str = "GREENLIGHT_K8S_BIN_DIR";

/// The user the tests (and `kubectl`) act as.
const ADMIN_USER: &str = "greenlight-test-admin";
/// The user the agent acts as, so that the audit log tells its requests from the tests' own.
pub const AGENT_USER: &str = "greenlight-test-agent";

/// The name of the one (fake) node, managed by kwok.
pub const NODE: &str = "kwok-node-0";

/// A running control plane.
pub struct ControlPlane {
    dir: PathBuf,
    bin_dir: PathBuf,
    admin_kubeconfig: PathBuf,
    agent_kubeconfig: PathBuf,
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
static NAMESPACES: AtomicU32 = AtomicU32::new(0);

impl ControlPlane {
    /// The control plane of this test process, started on first use. `None` (after saying
    /// so on stderr) when the binaries are not built and this is not CI, where their absence
    /// is an error.
    pub async fn shared() -> anyhow::Result<Option<&'static ControlPlane>> {
        let Some(bin_dir) = std::env::var_os(BIN_DIR_ENV).map(PathBuf::from) else {
            if std::env::var_os("CI").is_some() {
                bail!(
                    "{BIN_DIR_ENV} is not set: scripts/test builds the control plane and sets it"
                );
            }
            let _ = writeln!(
                std::io::stderr(),
                "control plane: skipped: set {BIN_DIR_ENV} to the directory scripts/k8s-tools prints (scripts/test does)"
            );
            return Ok(None);
        };
        let shared = tokio::task::spawn_blocking(move || {
            SHARED.get_or_init(|| {
                // The processes get SIGKILL when the thread that started them ends, so they
                // are started from one that never does.
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let _ = tx.send(Self::start(&bin_dir).map_err(|e| format!("{e:#}")));
                    loop {
                        std::thread::park();
                    }
                });
                rx.recv()
                    .unwrap_or_else(|_| Err("the control plane's thread died".to_owned()))
            })
        })
        .await?;
        match shared {
            Ok(plane) => Ok(Some(plane)),
            Err(e) => bail!("the control plane did not start: {e}"),
        }
    }

    fn start(bin_dir: &Path) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("greenlight-k8s-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs"))?;
        register_cleanup(&dir);

        let etcd_client = free_port()?;
        let etcd_peer = free_port()?;
        spawn(
            bin_dir,
            &dir,
            "etcd",
            &[
                "--name=test",
                &format!("--data-dir={}", dir.join("etcd").display()),
                &format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
                &format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
                &format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                &format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                &format!("--initial-cluster=test=http://127.0.0.1:{etcd_peer}"),
                // Test data: durability costs time and buys nothing.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )?;

        let admin_token = random_token()?;
        let agent_token = random_token()?;
        std::fs::write(
            dir.join("tokens.csv"),
            format!(
                "{admin_token},{ADMIN_USER},1,system:masters\n{agent_token},{AGENT_USER},2,system:masters\n"
            ),
        )?;
        let (private, public) = service_account_key()?;
        std::fs::write(dir.join("sa.key"), private)?;
        std::fs::write(dir.join("sa.pub"), public)?;
        // Every request at Metadata level: the tests read the agent's requests from it.
        std::fs::write(
            dir.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n  - level: Metadata\n",
        )?;
        let apiserver = free_port()?;
        let cert_dir = dir.join("certs");
        let mut apiserver_process = spawn(
            bin_dir,
            &dir,
            "kube-apiserver",
            &[
                &format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                // The `kubernetes` Service's endpoints may not be loopback, and nothing here
                // reaches the apiserver through that Service.
                "--endpoint-reconciler-type=none",
                &format!("--secure-port={apiserver}"),
                &format!("--cert-dir={}", cert_dir.display()),
                &format!("--token-auth-file={}", dir.join("tokens.csv").display()),
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                &format!(
                    "--service-account-key-file={}",
                    dir.join("sa.pub").display()
                ),
                &format!(
                    "--service-account-signing-key-file={}",
                    dir.join("sa.key").display()
                ),
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                // No kubelet mounts tokens here; the admission would only hold pods back
                // until the controller-manager made each namespace's default account.
                "--disable-admission-plugins=ServiceAccount",
                &format!(
                    "--audit-policy-file={}",
                    dir.join("audit-policy.yaml").display()
                ),
                &format!("--audit-log-path={}", dir.join("audit.log").display()),
                "--audit-log-mode=blocking",
            ],
        )?;
        let server = format!("https://127.0.0.1:{apiserver}");
        let ca = cert_dir.join("apiserver.crt");
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ca.exists() {
            if Instant::now() > deadline || apiserver_process.try_wait()?.is_some() {
                bail!(
                    "kube-apiserver wrote no certificate: {}",
                    log_tail(&dir, "kube-apiserver")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        let agent_kubeconfig = dir.join("agent.kubeconfig");
        write_kubeconfig(&admin_kubeconfig, &server, &ca, ADMIN_USER, &admin_token)?;
        write_kubeconfig(&agent_kubeconfig, &server, &ca, AGENT_USER, &agent_token)?;
        let plane = Self {
            dir,
            bin_dir: bin_dir.to_owned(),
            admin_kubeconfig,
            agent_kubeconfig,
        };
        plane.wait_ready(deadline, &mut apiserver_process)?;

        let kubeconfig = format!("--kubeconfig={}", plane.admin_kubeconfig.display());
        spawn(
            bin_dir,
            &plane.dir,
            "kube-controller-manager",
            &[
                &kubeconfig,
                "--leader-elect=false",
                "--secure-port=0",
                "--controllers=*",
                "--concurrent-deployment-syncs=10",
                "--concurrent-replicaset-syncs=10",
            ],
        )?;
        spawn(
            bin_dir,
            &plane.dir,
            "kube-scheduler",
            &[&kubeconfig, "--leader-elect=false", "--secure-port=0"],
        )?;
        std::fs::write(
            plane.dir.join("node.yaml"),
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\n  annotations: {{kwok.x-k8s.io/node: fake}}\n  labels: {{type: kwok, kubernetes.io/hostname: {NODE}}}\nstatus:\n  allocatable: {{cpu: '64', memory: 256Gi, pods: '1000'}}\n  capacity: {{cpu: '64', memory: 256Gi, pods: '1000'}}\n"
            ),
        )?;
        plane.kubectl_ok(&[
            "apply",
            "-f",
            &plane.dir.join("node.yaml").to_string_lossy(),
        ])?;
        spawn(
            bin_dir,
            &plane.dir,
            "kwok",
            &[
                &kubeconfig,
                "--manage-all-nodes=true",
                // Without a node lease kwok only posts node status every 10 to 20 minutes, so
                // about a minute after start the node controller marks the node NotReady and
                // every pod unready: rollouts late in a test process would never finish.
                "--node-lease-duration-seconds=40",
                &format!(
                    "--config={}",
                    plane.bin_dir.join("kwok-stages.yaml").display()
                ),
            ],
        )?;
        Ok(plane)
    }

    fn wait_ready(&self, deadline: Instant, apiserver: &mut Child) -> anyhow::Result<()> {
        loop {
            let ready = self
                .kubectl(&["get", "--raw", "/readyz"])
                .is_ok_and(|o| o.status.success());
            // The bootstrap namespaces exist once the apiserver's own controllers ran.
            if ready
                && self
                    .kubectl(&["get", "namespace", "default"])
                    .is_ok_and(|o| o.status.success())
            {
                return Ok(());
            }
            if Instant::now() > deadline || apiserver.try_wait()?.is_some() {
                bail!(
                    "kube-apiserver did not become ready: {}",
                    log_tail(&self.dir, "kube-apiserver")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A client acting as the tests' admin.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        client_from(&self.admin_kubeconfig).await
    }

    /// A client acting as the agent, whose requests the audit log names.
    pub async fn agent_client(&self) -> anyhow::Result<kube::Client> {
        client_from(&self.agent_kubeconfig).await
    }

    /// A client presenting `token` (a service account's, say) instead of the admin's.
    pub async fn client_with_token(&self, token: &str) -> anyhow::Result<kube::Client> {
        let kubeconfig = Kubeconfig::read_from(&self.admin_kubeconfig)?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        config.auth_info.token = Some(token.to_owned().into());
        Ok(kube::Client::try_from(config)?)
    }

    /// The admin kubeconfig, for tests that hand it to other programs.
    pub fn kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The agent's kubeconfig, for an agent run as its own process.
    pub fn agent_kubeconfig(&self) -> &Path {
        &self.agent_kubeconfig
    }

    /// The directory of the control plane's binaries.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Runs `kubectl` as the admin.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new(self.bin_dir.join("kubectl"))
            .arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
            .args(args)
            .output()
            .context("cannot run kubectl")
    }

    /// Runs `kubectl`, failing with its stderr unless it succeeded; returns its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.kubectl(args)?;
        if !output.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Creates a namespace no other test uses, named after `prefix`.
    pub async fn namespace(&self, client: &kube::Client, prefix: &str) -> anyhow::Result<String> {
        let name = format!(
            "{prefix}-{:x}-{}",
            std::process::id(),
            NAMESPACES.fetch_add(1, Ordering::Relaxed)
        );
        create_namespace(client, &name).await?;
        Ok(name)
    }

    /// A mark in the audit log: `agent_requests` returns what came after it.
    pub fn audit_mark(&self) -> u64 {
        std::fs::metadata(self.dir.join("audit.log")).map_or(0, |m| m.len())
    }

    /// The agent's requests since `mark` that touched any of `namespaces` (or cluster-scoped
    /// objects, for a `None`), oldest first.
    pub fn agent_requests(
        &self,
        mark: u64,
        namespaces: &[&str],
    ) -> anyhow::Result<Vec<AuditedRequest>> {
        use std::io::{Seek, SeekFrom};
        let mut file = std::fs::File::open(self.dir.join("audit.log"))?;
        file.seek(SeekFrom::Start(mark))?;
        let mut requests = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line?;
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if event["user"]["username"] != AGENT_USER || event["stage"] != "ResponseComplete" {
                continue;
            }
            let namespace = event["objectRef"]["namespace"].as_str();
            if namespace.is_some_and(|n| !namespaces.contains(&n)) {
                continue;
            }
            requests.push(AuditedRequest {
                verb: event["verb"].as_str().unwrap_or_default().to_owned(),
                uri: event["requestURI"].as_str().unwrap_or_default().to_owned(),
                resource: event["objectRef"]["resource"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                name: event["objectRef"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                namespace: namespace.map(str::to_owned),
                code: event["responseStatus"]["code"]
                    .as_u64()
                    .and_then(|c| u16::try_from(c).ok()),
                completed: event["stageTimestamp"]
                    .as_str()
                    .and_then(|t| t.parse().ok()),
            });
        }
        Ok(requests)
    }
}

/// One test's place on the shared control plane: clients, and namespaces of its own.
pub struct TestCluster {
    pub plane: &'static ControlPlane,
    /// The tests' own client, acting as an administrator.
    pub kube: kube::Client,
    /// The agent's client: the audit log tells its requests by its user.
    pub agent_kube: kube::Client,
    /// The agents' default namespace.
    pub apps: String,
    /// Where the agents keep their inventory and Lease.
    pub home: String,
}

impl TestCluster {
    /// Fresh namespaces on the shared control plane; `None` when it is not built.
    pub async fn new() -> anyhow::Result<Option<Self>> {
        let Some(plane) = ControlPlane::shared().await? else {
            return Ok(None);
        };
        let kube = plane.client().await?;
        let apps = plane.namespace(&kube, "apps").await?;
        let home = plane.namespace(&kube, "home").await?;
        Ok(Some(Self {
            plane,
            agent_kube: plane.agent_client().await?,
            kube,
            apps,
            home,
        }))
    }

    /// `yaml` (an agent entry) deploying into this test's default namespace.
    pub fn agent_entry(&self, yaml: &str) -> String {
        yaml.replace(
            "default_namespace: apps",
            &format!("default_namespace: {}", self.apps),
        )
    }
}

/// One request of the agent, as the API server's audit log recorded it.
#[derive(Debug, Clone)]
pub struct AuditedRequest {
    pub verb: String,
    pub uri: String,
    pub resource: String,
    pub name: String,
    pub namespace: Option<String>,
    /// The HTTP status the API server answered with.
    pub code: Option<u16>,
    /// When the API server completed it, by its clock (the same host's as the tests').
    pub completed: Option<k8s_openapi::jiff::Timestamp>,
}

impl AuditedRequest {
    /// Whether it changed anything: not a read, and not a dry run.
    pub fn is_write(&self) -> bool {
        !matches!(self.verb.as_str(), "get" | "list" | "watch") && !self.uri.contains("dryRun=")
    }
}

/// The Namespaces API of `client`'s cluster.
pub fn namespaces(client: &kube::Client) -> Api<DynamicObject> {
    Api::all_with(
        client.clone(),
        &ApiResource::erase::<k8s_openapi::api::core::v1::Namespace>(&()),
    )
}

/// Creates (or keeps) namespace `name`, applied by the tests' field manager.
pub async fn create_namespace(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    namespaces(client)
        .patch(
            name,
            &PatchParams::apply("greenlight-e2e"),
            &Patch::Apply(&body),
        )
        .await?;
    Ok(())
}

/// A client from the kubeconfig at `path`.
pub async fn client_from(path: &Path) -> anyhow::Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    user: &str,
    token: &str,
) -> anyhow::Result<()> {
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
        "current-context": "test",
    });
    // JSON is YAML, and both kube-rs and kubectl read it.
    std::fs::write(path, serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

/// Starts `name` from `bin_dir` with its output in `dir/logs`, killed when the starting
/// thread ends.
fn spawn(bin_dir: &Path, dir: &Path, name: &str, args: &[&str]) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join("logs").join(format!("{name}.log")))?;
    let mut command = Command::new(bin_dir.join(name));
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
        .spawn()
        .with_context(|| format!("cannot start {}", bin_dir.join(name).display()))
}

fn log_tail(dir: &Path, name: &str) -> String {
    let text =
        std::fs::read_to_string(dir.join("logs").join(format!("{name}.log"))).unwrap_or_default();
    // klog's errors and fatals say why; the warnings around them rarely do.
    let mut lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with('E') || l.starts_with('F'))
        .collect();
    if lines.is_empty() {
        lines = text.lines().collect();
    }
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness for a token"))?;
    Ok(hex::encode(bytes))
}

/// A fresh P-256 key pair in PEM (PKCS#8 and SubjectPublicKeyInfo): the apiserver signs
/// service-account tokens with the one and verifies them with the other.
fn service_account_key() -> anyhow::Result<(String, String)> {
    use ring::signature::KeyPair;
    let random = ring::rand::SystemRandom::new();
    let algorithm = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(algorithm, &random)
        .map_err(|_| anyhow::anyhow!("cannot generate a P-256 key"))?;
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(algorithm, pkcs8.as_ref(), &random)
        .map_err(|_| anyhow::anyhow!("cannot read back the P-256 key"))?;
    // The DER of SubjectPublicKeyInfo for id-ecPublicKey on prime256v1, up to the point.
    let mut spki = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200")?;
    spki.extend_from_slice(pair.public_key().as_ref());
    Ok((pem("PRIVATE KEY", pkcs8.as_ref()), pem("PUBLIC KEY", &spki)))
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

/// Removes the control plane's directory when the test process exits; its processes die
/// with the thread that started them.
fn register_cleanup(dir: &Path) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    extern "C" fn cleanup() {
        if let Some(dir) = DIR.get() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    if DIR.set(dir.to_owned()).is_ok() {
        // SAFETY: registers a function without arguments that only removes a directory.
        unsafe {
            libc::atexit(cleanup);
        }
    }
}
