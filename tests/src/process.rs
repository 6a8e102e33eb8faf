//! The server and the agent as OS processes of their own, built from this workspace, so that
//! a test can SIGKILL them: nothing of theirs survives, no stopping step runs, and every
//! connection they held is closed by the kernel.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail, ensure};

/// The directory of `greenlight-server` and `greenlight-agent`, built (once per test process)
/// with the profile of the running test binary into its target directory: integration tests
/// get `CARGO_BIN_EXE_*` only for their own package's binaries. A no-op when up to date.
pub async fn binaries() -> anyhow::Result<PathBuf> {
    tokio::task::spawn_blocking(built_binaries).await?
}

/// Names a directory whose `greenlight-server` and `greenlight-agent` are used as they are,
/// instead of building the workspace's: how a benchmark compares two builds in one sitting.
pub const PREBUILT_BIN_DIR: &str = "GREENLIGHT_PREBUILT_BIN_DIR";

/// `binaries`, for a test that does not run on an async runtime.
pub fn built_binaries() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(PREBUILT_BIN_DIR) {
        let dir = PathBuf::from(dir);
        ensure!(
            dir.join("greenlight-server").is_file(),
            "{PREBUILT_BIN_DIR} names {}, which holds no greenlight-server",
            dir.display()
        );
        // Said every time, so that a variable left set never passes for a fresh build.
        eprintln!(
            "running the binaries of {} ({PREBUILT_BIN_DIR}), not this workspace's",
            dir.display()
        );
        return Ok(dir);
    }
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|error| format!("{error:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // <target>/<profile>/deps/e2e-<hash> for a test, <target>/<profile>/<bin> for a bench.
    let mut profile_dir = exe.parent().context("no directory")?.to_owned();
    if profile_dir.file_name().is_some_and(|name| name == "deps") {
        profile_dir = profile_dir
            .parent()
            .context("no profile directory")?
            .to_owned();
    }
    let target_dir = profile_dir.parent().context("no target directory")?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(name) => name.to_owned(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    // What cargo set for this test binary is not the environment of a plain `cargo build`:
    // build scripts that watch a variable (ring's watches CARGO_MANIFEST_DIR) would rebuild
    // half the dependency tree here, and again at the next `cargo build` outside.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || matches!(
                name.as_ref(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "LD_LIBRARY_PATH"
            )
        {
            command.env_remove(name.as_ref());
        }
    }
    let output = command
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args(["build", "--quiet", "--profile", &profile, "--target-dir"])
        .arg(target_dir)
        .args(["-p", "greenlight-server", "--bin", "greenlight-server"])
        .args(["-p", "greenlight-agent", "--bin", "greenlight-agent"])
        .output()
        .context("cannot run cargo")?;
    ensure!(
        output.status.success(),
        "cargo build of the binaries failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(profile_dir)
}

/// A program that can be started, SIGKILLed and started again with the same arguments; its
/// stdout and stderr are appended to one log file across restarts.
pub struct Process {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: Option<PathBuf>,
    log: PathBuf,
    file_size_limit: Option<u64>,
    child: Option<Child>,
    /// How many times it was started.
    pub starts: u32,
}

impl Process {
    /// A process of `program` with `args`, logging to `log`; not started yet.
    pub fn new(program: PathBuf, args: Vec<String>, log: PathBuf) -> Self {
        Self {
            program,
            args,
            env: Vec::new(),
            dir: None,
            log,
            file_size_limit: None,
            child: None,
            starts: 0,
        }
    }

    /// Sets an environment variable for every start.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.set_env(name, value);
        self
    }

    /// `env`, on a process already made.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.push((name.to_owned(), value.to_owned()));
    }

    /// Runs it in `dir` (a relative path it uses, such as the embedded store's default, is
    /// then its own).
    pub fn in_dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_owned());
        self
    }

    /// From its next start on, a file it writes cannot grow past `bytes` (`RLIMIT_FSIZE`): a
    /// write beyond fails with `EFBIG`, as on a full disk; `None` lifts the limit.
    pub fn limit_file_size(&mut self, bytes: Option<u64>) {
        self.file_size_limit = bytes;
    }

    /// Gives `flag` the value `value` for every later start, in place of the one it had.
    pub fn set_flag(&mut self, flag: &str, value: &str) {
        match self.args.iter().position(|arg| arg == flag) {
            Some(at) if at + 1 < self.args.len() => self.args[at + 1] = value.to_owned(),
            _ => self.args.extend([flag.to_owned(), value.to_owned()]),
        }
    }

    /// Starts it (again).
    pub fn start(&mut self) -> anyhow::Result<()> {
        ensure!(
            self.child.is_none(),
            "{} is running",
            self.program.display()
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            // Every commit status posted, so that a duplicate can be traced to its replica.
            .env("RUST_LOG", "info,greenlight_server::gitlab::statuses=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (name, value) in &self.env {
            command.env(name, value);
        }
        if let Some(dir) = &self.dir {
            command.current_dir(dir);
        }
        if let Some(bytes) = self.file_size_limit {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            // SAFETY: between fork and exec this calls only `sigaction` and `setrlimit`,
            // both async-signal-safe, on values prepared before the fork.
            unsafe {
                command.pre_exec(move || {
                    // Ignored, SIGXFSZ no longer kills the process: the write returns EFBIG.
                    let mut ignore: libc::sigaction = std::mem::zeroed();
                    ignore.sa_sigaction = libc::SIG_IGN;
                    if libc::sigaction(libc::SIGXFSZ, &ignore, std::ptr::null_mut()) != 0
                        || libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", self.program.display()))?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// SIGKILLs it and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `deadline` for it to exit; SIGKILLs it after that.
    pub async fn terminate(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: `kill` takes plain integers; the child is ours and not reaped yet.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let until = tokio::time::Instant::now() + deadline;
        while child.try_wait()?.is_none() {
            if tokio::time::Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not stop within {deadline:?} of SIGTERM",
                    self.program.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails if it exited on its own.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            // The log's end in the error itself: a test's temporary directory, and the log
            // with it, is gone by the time anyone reads the failure.
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            bail!(
                "{} exited with {status}; the end of {}:\n{tail}",
                self.program.display(),
                self.log.display()
            );
        }
        Ok(())
    }

    /// Where its output goes.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `greenlight-server` process on fixed loopback ports, so that a restart listens where
/// the first start did.
pub struct ServerProcess {
    pub process: Process,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Clients and helpers for the running process.
    pub api: crate::TestServer,
    client: reqwest::Client,
    /// Its configuration, log and working directory, when it made them itself.
    _dir: Option<tempfile::TempDir>,
}

impl ServerProcess {
    /// Starts `greenlight-server --config <config>` from `binaries` with `replica` as its
    /// replica id, on fresh loopback ports, and waits until it is ready.
    pub async fn start(
        binaries: &Path,
        config: &Path,
        replica: &str,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let process = Self::process(binaries, config, Some(replica), log)?;
        Self::started(process, None).await
    }

    /// Starts the server of this build with config text `yaml` (flags override its `listen`
    /// section) in a directory of its own, which holds the config, the log and, with the
    /// defaults, the embedded store; waits until it is ready.
    pub async fn from_yaml(yaml: &str) -> anyhow::Result<Self> {
        Self::from_yaml_with(yaml, |_| {}).await
    }

    /// `from_yaml`, with `configure` applied to the process before its first start.
    pub async fn from_yaml_with(
        yaml: &str,
        configure: impl FnOnce(&mut Process),
    ) -> anyhow::Result<Self> {
        let binaries = binaries().await?;
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, yaml)?;
        let (process, grpc, http) =
            Self::process(&binaries, &config, None, dir.path().join("server.log"))?;
        let mut process = process.in_dir(dir.path());
        configure(&mut process);
        Self::started((process, grpc, http), Some(dir)).await
    }

    fn process(
        binaries: &Path,
        config: &Path,
        replica: Option<&str>,
        log: PathBuf,
    ) -> anyhow::Result<(Process, SocketAddr, SocketAddr)> {
        let grpc = SocketAddr::from(([127, 0, 0, 1], crate::free_port()?));
        let http = SocketAddr::from(([127, 0, 0, 1], crate::free_port()?));
        let mut args = vec![
            "--config".to_owned(),
            config.display().to_string(),
            "--grpc-listen".to_owned(),
            grpc.to_string(),
            "--http-listen".to_owned(),
            http.to_string(),
        ];
        if let Some(replica) = replica {
            args.extend(["--replica-id".to_owned(), replica.to_owned()]);
        }
        let process = Process::new(binaries.join("greenlight-server"), args, log);
        Ok((process, grpc, http))
    }

    async fn started(
        (process, grpc, http): (Process, SocketAddr, SocketAddr),
        dir: Option<tempfile::TempDir>,
    ) -> anyhow::Result<Self> {
        crate::install_crypto();
        let mut server = Self {
            process,
            grpc,
            http,
            api: crate::TestServer::attach_later(grpc, http)?,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            _dir: dir,
        };
        let mut attempts = 0;
        loop {
            let logged_before = server.log().len();
            let Err(error) = server.restart().await else {
                return Ok(server);
            };
            attempts += 1;
            // Another process may bind a port between its probe and the server's bind: the
            // server then exits at once, and fresh ports are all it needs.
            let port_taken = server
                .log()
                .get(logged_before..)
                .is_some_and(|logged| logged.contains("cannot bind"));
            if !port_taken || attempts == 5 {
                return Err(error);
            }
            server.listen_on_fresh_ports()?;
        }
    }

    fn listen_on_fresh_ports(&mut self) -> anyhow::Result<()> {
        self.grpc = SocketAddr::from(([127, 0, 0, 1], crate::free_port()?));
        self.http = SocketAddr::from(([127, 0, 0, 1], crate::free_port()?));
        self.process
            .set_flag("--grpc-listen", &self.grpc.to_string());
        self.process
            .set_flag("--http-listen", &self.http.to_string());
        self.api = crate::TestServer::attach_later(self.grpc, self.http)?;
        Ok(())
    }

    /// SIGKILLs it.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same ports and waits until it is ready (its store answers).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        self.process.start()?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            self.process.check_alive()?;
            if let Ok(response) = self
                .client
                .get(format!("http://{}/readyz", self.http))
                .send()
                .await
                && response.status().is_success()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "greenlight-server on {} was not ready within 60 s; see {}",
                    self.http,
                    self.process.log().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What it logged, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.process.log()).unwrap_or_default()
    }

    /// The resident set size of the process in bytes, from `/proc`.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_bytes_of(self.process.pid().context("not running")?)
    }

    /// The gRPC URL agents and operators dial.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The webhook endpoint.
    pub fn webhook_url(&self) -> String {
        format!("http://{}/webhooks/gitlab", self.http)
    }
}

/// A `greenlight-agent` process.
pub struct AgentProcessOs {
    pub process: Process,
}

impl AgentProcessOs {
    /// Starts agent `identity` with the token in `token_file`, dialing `server`, with the
    /// cluster of `kubeconfig`, keeping its Lease and inventory in `namespace`.
    pub fn start(
        binaries: &Path,
        server: &str,
        token_file: &Path,
        kubeconfig: &Path,
        namespace: &str,
        identity: &str,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let args = vec![
            "--server".to_owned(),
            server.to_owned(),
            "--token-file".to_owned(),
            token_file.display().to_string(),
            "--namespace".to_owned(),
            namespace.to_owned(),
            "--identity".to_owned(),
            identity.to_owned(),
            "--metrics-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
        ];
        let mut process = Process::new(binaries.join("greenlight-agent"), args, log)
            .env("KUBECONFIG", &kubeconfig.display().to_string());
        process.start()?;
        Ok(Self { process })
    }

    /// SIGKILLs it.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again with the same identity, as the kubelet restarts a killed container
    /// in the same Pod.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        self.process.start()
    }
}

/// Resident set size of process `pid` in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes_of(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")?;
    Ok(kib * 1024)
}
