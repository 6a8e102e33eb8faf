//! The Kubernetes side: discovery, server-side apply, reads and deletes, through kube.

use std::sync::RwLock;

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PropagationPolicy};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::{Discovery, Scope};
use serde_json::Value;

/// Why a call to the API server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Api(#[from] kube::Error),
    #[error("cannot encode object: {0}")]
    Encode(#[from] serde_json::Error),
}

impl ClusterError {
    /// The API server's message, as users know it from kubectl.
    pub fn message(&self) -> String {
        match self {
            ClusterError::Api(kube::Error::Api(status)) => status.message.clone(),
            other => other.to_string(),
        }
    }

    /// Whether the API server said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClusterError::Api(kube::Error::Api(status)) if status.code == 404)
    }
}

/// A kind the API server serves.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub resource: ApiResource,
    pub namespaced: bool,
}

/// A connection to one cluster with its discovered kinds.
pub struct Cluster {
    client: kube::Client,
    discovery: RwLock<Option<Discovery>>,
    field_manager: String,
}

impl Cluster {
    /// Wraps `client`; applies as `field_manager`.
    pub fn new(client: kube::Client, field_manager: &str) -> Self {
        Self {
            client,
            discovery: RwLock::new(None),
            field_manager: field_manager.to_owned(),
        }
    }

    /// The kube client.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// Re-reads which kinds the cluster serves: after CRDs were applied, their kinds appear.
    pub async fn refresh_discovery(&self) -> Result<(), ClusterError> {
        let discovery = Discovery::new(self.client.clone()).run().await?;
        *self.discovery.write().unwrap_or_else(|p| p.into_inner()) = Some(discovery);
        Ok(())
    }

    /// The served kind for `api_version` and `kind`, if the cluster serves it.
    pub fn resolve(&self, api_version: &str, kind: &str) -> Option<Resolved> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let guard = self.discovery.read().unwrap_or_else(|p| p.into_inner());
        let (resource, caps) = guard.as_ref()?.resolve_gvk(&gvk)?;
        Some(Resolved {
            resource,
            namespaced: caps.scope == Scope::Namespaced,
        })
    }

    fn api(&self, resolved: &Resolved, namespace: Option<&str>) -> Api<DynamicObject> {
        match (resolved.namespaced, namespace) {
            (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, &resolved.resource),
            _ => Api::all_with(self.client.clone(), &resolved.resource),
        }
    }

    /// Server-side applies `body`; returns the object as stored (or as it would be, on dry run).
    pub async fn apply(
        &self,
        resolved: &Resolved,
        namespace: Option<&str>,
        name: &str,
        body: &Value,
        force: bool,
        dry_run: bool,
    ) -> Result<DynamicObject, ClusterError> {
        let mut params = PatchParams::apply(&self.field_manager);
        if force {
            params = params.force();
        }
        if dry_run {
            params = params.dry_run();
        }
        Ok(self
            .api(resolved, namespace)
            .patch(name, &params, &Patch::Apply(body))
            .await?)
    }

    /// The object, if it exists.
    pub async fn get(
        &self,
        resolved: &Resolved,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<DynamicObject>, ClusterError> {
        Ok(self.api(resolved, namespace).get_opt(name).await?)
    }

    /// Deletes the object with `policy` (orphan, background or foreground); `false` if it
    /// was already gone.
    pub async fn delete(
        &self,
        resolved: &Resolved,
        namespace: Option<&str>,
        name: &str,
        policy: &str,
    ) -> Result<bool, ClusterError> {
        let propagation_policy = Some(match policy {
            "orphan" => PropagationPolicy::Orphan,
            "foreground" => PropagationPolicy::Foreground,
            _ => PropagationPolicy::Background,
        });
        let params = DeleteParams {
            propagation_policy,
            ..DeleteParams::default()
        };
        match self.api(resolved, namespace).delete(name, &params).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(error) => Err(error.into()),
        }
    }
}
