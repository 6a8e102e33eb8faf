//! A TCP proxy on loopback that spreads connections over several upstreams, as a Kubernetes
//! Service spreads them over replicas, and that can drop every connection it carries, as a
//! broken network or a restarted load balancer would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Default)]
struct Inner {
    /// The task copying each open connection, by connection number.
    open: HashMap<u64, JoinHandle<()>>,
    /// Connections dropped by `cut_all` so far.
    cut: u64,
}

/// A proxy listening on `127.0.0.1`; stops (and drops what it carries) when dropped.
pub struct TcpProxy {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy to `upstreams`: each new connection goes to the next one in turn that
    /// accepts it, so a dead upstream is skipped.
    pub async fn start(upstreams: Vec<SocketAddr>) -> anyhow::Result<Self> {
        anyhow::ensure!(!upstreams.is_empty(), "a proxy needs an upstream");
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner: Arc<Mutex<Inner>> = Arc::default();
        let accept = tokio::spawn(accept_loop(listener, upstreams, inner.clone()));
        Ok(Self {
            addr,
            inner,
            accept,
        })
    }

    /// The `http://` URL clients dial.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection open now, both ways at once; returns how many.
    pub fn cut_all(&self) -> usize {
        let mut inner = self.lock();
        let open: Vec<JoinHandle<()>> = inner
            .open
            .drain()
            .map(|(_, task)| task)
            .filter(|task| !task.is_finished())
            .collect();
        for task in &open {
            task.abort();
        }
        inner.cut += open.len() as u64;
        open.len()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        let mut inner = self.lock();
        inner.open.retain(|_, task| !task.is_finished());
        inner.open.len()
    }

    /// Connections dropped by `cut_all` so far.
    pub fn cut(&self) -> u64 {
        self.lock().cut
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

async fn accept_loop(listener: TcpListener, upstreams: Vec<SocketAddr>, inner: Arc<Mutex<Inner>>) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut turn = 0usize;
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            continue;
        };
        turn = turn.wrapping_add(1);
        let upstreams = upstreams.clone();
        let number = NEXT.fetch_add(1, Ordering::Relaxed);
        let registry = inner.clone();
        let task = tokio::spawn(async move {
            let mut server = None;
            for i in 0..upstreams.len() {
                let upstream = upstreams[(turn + i) % upstreams.len()];
                if let Ok(stream) = TcpStream::connect(upstream).await {
                    server = Some(stream);
                    break;
                }
            }
            // No upstream answers: closing the client's connection is what a Service with no
            // ready endpoint does.
            if let Some(mut server) = server {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
            registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .open
                .remove(&number);
        });
        let mut registry = inner.lock().unwrap_or_else(|e| e.into_inner());
        if !task.is_finished() {
            registry.open.insert(number, task);
        }
    }
}
