//! Test support: a bare HTTP/1.1 server standing in for the Kubernetes API server, for the
//! few behaviours a real control plane cannot be made to show on demand (a broken group, a
//! hung call); and what scripted Greenlight servers share.

use std::sync::{Arc, Mutex};

use greenlight::v1::SyncEvent;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The stream a scripted server's `Sync` answers with.
pub type SyncEvents =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<SyncEvent, tonic::Status>> + Send>>;

/// Answers each request from `route(method, path)`; `None` never answers, as a hung API
/// server would. Returns a client for it (without kube's retries of 503s, which would only
/// repeat the same answer) and the log of `METHOD path` lines.
pub async fn serve(
    route: impl Fn(&str, &str) -> Option<(u16, String)> + Send + Sync + 'static,
) -> (kube::Client, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let route = Arc::new(route);
    let seen = log.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let route = route.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                let head_end = loop {
                    if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        break end + 4;
                    }
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&request[..head_end]).into_owned();
                let length: usize = head
                    .lines()
                    .filter_map(|line| line.split_once(':'))
                    .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, value)| value.trim().parse().ok())
                    .unwrap_or(0);
                // Read the whole body: closing with unread bytes would reset the connection.
                while request.len() < head_end + length {
                    match socket.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let mut words = head.split(' ');
                let method = words.next().unwrap_or("").to_owned();
                let path = words.next().unwrap_or("/");
                let path = path.split('?').next().unwrap_or(path).to_owned();
                seen.lock().unwrap().push(format!("{method} {path}"));
                let Some((code, body)) = route(&method, &path) else {
                    std::future::pending::<()>().await;
                    return;
                };
                let response = format!(
                    "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    let mut config = kube::Config::new(format!("http://{address}").parse().unwrap());
    config.default_retry = false;
    (kube::Client::try_from(config).unwrap(), log)
}

/// A `Status` body as the API server sends with errors.
pub fn status(code: u16, message: &str) -> String {
    let reason = match code {
        404 => "NotFound",
        409 => "Conflict",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    };
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code})
    .to_string()
}

/// An `APIResourceList` of `(plural, kind, namespaced)`.
pub fn resources(group_version: &str, kinds: &[(&str, &str, bool)]) -> String {
    let resources: Vec<Value> = kinds
        .iter()
        .map(|(plural, kind, namespaced)| {
            serde_json::json!({"name": plural, "singularName": "", "namespaced": namespaced,
                "kind": kind, "verbs": ["get", "list", "patch", "delete"]})
        })
        .collect();
    serde_json::json!({"kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": group_version, "resources": resources})
    .to_string()
}

/// The inventory entry of Deployment `name` of namespace `apps`.
pub fn deployment_entry(name: &str) -> crate::plan::InventoryEntry {
    namespaced_entry("apps/v1", "Deployment", name)
}

/// The inventory entry of `kind` `name` of namespace `apps`, applied as `api_version`.
pub fn namespaced_entry(api_version: &str, kind: &str, name: &str) -> crate::plan::InventoryEntry {
    let (group, _) = crate::manifest::split_api_version(api_version);
    crate::plan::InventoryEntry {
        key: crate::plan::ObjectKey {
            group: group.into(),
            kind: kind.into(),
            namespace: Some("apps".into()),
            name: name.into(),
        },
        api_version: api_version.into(),
        namespaced: true,
        adopted: false,
        kept: false,
    }
}

/// A worker of agent `prod`'s home namespace `greenlight` on the API server `kube`, and the
/// receiver of its reports.
pub fn worker_for(
    kube: kube::Client,
) -> (
    crate::reconcile::Worker,
    tokio::sync::mpsc::Receiver<greenlight::v1::StatusReport>,
) {
    let (reports, received) = tokio::sync::mpsc::channel(64);
    let worker = crate::reconcile::Worker::new(
        crate::cluster::Cluster::new(kube, crate::reconcile::FIELD_MANAGER),
        "greenlight",
        reports,
        Arc::new(crate::metrics::AgentMetrics::default()),
    );
    (worker, received)
}
