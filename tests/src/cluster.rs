//! A Redis Cluster of masters on loopback, made the way operators make one:
//! `redis-server --cluster-enabled yes` on each node, joined with `redis-cli --cluster create`.

use std::net::TcpListener as StdListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};

/// One node: a master owning a share of the slots.
struct Node {
    port: u16,
    /// Its data, removed with it.
    _dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running Redis Cluster; its nodes stop when it is dropped.
pub struct RedisCluster {
    nodes: Vec<Node>,
}

impl RedisCluster {
    /// Starts `masters` nodes and joins them, every slot covered, no replicas.
    pub async fn start(masters: usize) -> anyhow::Result<Self> {
        let mut nodes = Vec::with_capacity(masters);
        for _ in 0..masters {
            nodes.push(spawn_node()?);
        }
        for node in &nodes {
            wait_until_answering(node.port).await?;
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .context("redis-cli --cluster create")?;
        ensure!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = Self { nodes };
        cluster.wait_until_ok().await?;
        Ok(cluster)
    }

    /// The seed URLs servers connect to.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| format!("redis://127.0.0.1:{}", node.port))
            .collect()
    }

    /// Runs `redis-cli -c` with `args` on the cluster, following its redirections.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        cli(self.nodes[0].port, &all)
    }

    /// The index of the node that owns `key`'s slot now.
    pub fn owner_of(&self, key: &str) -> anyhow::Result<usize> {
        let slot: u16 = cli(self.nodes[0].port, &["CLUSTER", "KEYSLOT", key])?
            .trim()
            .parse()
            .context("CLUSTER KEYSLOT")?;
        for (index, node) in self.nodes.iter().enumerate() {
            let id = self.id(index)?;
            let nodes = cli(node.port, &["CLUSTER", "NODES"])?;
            let mine = nodes.lines().find(|line| line.starts_with(&id));
            let owns = mine.is_some_and(|line| {
                line.split_whitespace().skip(8).any(|range| {
                    let (start, end) = range.split_once('-').unwrap_or((range, range));
                    matches!((start.parse::<u16>(), end.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
                })
            });
            if owns {
                return Ok(index);
            }
        }
        bail!("no node owns the slot {slot} of {key}")
    }

    /// Moves every slot of node `from` to node `to`, keys included, while the cluster
    /// serves: what an operator's `redis-cli --cluster reshard` does. Blocks until done.
    pub fn move_all_slots(&self, from: usize, to: usize) -> anyhow::Result<()> {
        let (from_id, to_id) = (self.id(from)?, self.id(to)?);
        let owned = self.slots_of(from)?;
        let moved = Command::new("redis-cli")
            .args(["--cluster", "reshard"])
            .arg(format!("127.0.0.1:{}", self.nodes[from].port))
            .args(["--cluster-from", &from_id, "--cluster-to", &to_id])
            .args(["--cluster-slots", &owned.to_string(), "--cluster-yes"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .context("redis-cli --cluster reshard")?;
        ensure!(
            moved.status.success(),
            "resharding failed: {}",
            String::from_utf8_lossy(&moved.stderr)
        );
        Ok(())
    }

    /// Makes every node hold back write commands and scripts for `pause`, answering them
    /// after it: a cluster that stalls (a fork, a slow disk).
    pub fn pause_writes(&self, pause: std::time::Duration) -> anyhow::Result<()> {
        let millis = pause.as_millis().to_string();
        for node in &self.nodes {
            cli(node.port, &["CLIENT", "PAUSE", &millis, "WRITE"])?;
        }
        Ok(())
    }

    /// How many slots node `index` owns.
    fn slots_of(&self, index: usize) -> anyhow::Result<usize> {
        let id = self.id(index)?;
        let nodes = cli(self.nodes[index].port, &["CLUSTER", "NODES"])?;
        let line = nodes
            .lines()
            .find(|line| line.starts_with(&id))
            .context("the node lists itself")?;
        Ok(line
            .split_whitespace()
            .skip(8)
            .filter_map(|range| {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                Some(end.parse::<usize>().ok()? - start.parse::<usize>().ok()? + 1)
            })
            .sum())
    }

    fn id(&self, index: usize) -> anyhow::Result<String> {
        Ok(cli(self.nodes[index].port, &["CLUSTER", "MYID"])?
            .trim()
            .to_owned())
    }

    async fn wait_until_ok(&self) -> anyhow::Result<()> {
        for _ in 0..200 {
            let ok = self.nodes.iter().all(|node| {
                cli(node.port, &["CLUSTER", "INFO"])
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            });
            if ok {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the cluster did not reach cluster_state:ok")
    }
}

fn cli(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .context("redis-cli")?;
    ensure!(out.status.success(), "redis-cli {args:?} failed");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A node on a free port whose cluster bus port (+10000) is free too.
fn spawn_node() -> anyhow::Result<Node> {
    for _ in 0..50 {
        let port = crate::free_port()?;
        let bus_free = port < 55_000 && StdListener::bind(("127.0.0.1", port + 10_000)).is_ok();
        if !bus_free {
            continue;
        }
        let dir = tempfile::tempdir()?;
        let child = start_server(port, dir.path())?;
        return Ok(Node {
            port,
            _dir: dir,
            child: Some(child),
        });
    }
    bail!("no port pair free for a cluster node")
}

fn start_server(port: u16, dir: &Path) -> anyhow::Result<Child> {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ])
        .args(["--cluster-node-timeout", "5000"])
        .args(["--appendonly", "yes", "--appendfsync", "everysec"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start redis-server: is it installed? (scripts/test installs it)")
}

async fn wait_until_answering(port: u16) -> anyhow::Result<()> {
    for _ in 0..200 {
        if cli(port, &["PING"]).is_ok_and(|answer| answer.trim() == "PONG") {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("cluster node on port {port} did not start")
}
