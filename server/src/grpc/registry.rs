//! The admin API's runtime agent calls: requests turned into agent definitions, and the
//! registry's refusals into statuses.

use std::time::Duration;

use greenlight::v1;
use tonic::Status;

use crate::config::{AgentDefinition, HealthCheck};
use crate::engine::{DEFAULT_ROTATION_GRACE, Engine, RegistryError, Rotated};
use crate::gate::Mode;

impl From<RegistryError> for Status {
    fn from(error: RegistryError) -> Self {
        let message = error.to_string();
        match error {
            RegistryError::Store(_) => Status::unavailable(message),
            RegistryError::Invalid(_) => Status::invalid_argument(message),
            RegistryError::NotFound(_) => Status::not_found(message),
            RegistryError::Exists(_) => Status::already_exists(message),
            RegistryError::FileAgent(_) | RegistryError::Conflicting(_) => {
                Status::failed_precondition(message)
            }
            RegistryError::Concurrent(_) => Status::aborted(message),
            RegistryError::Random => Status::internal(message),
        }
    }
}

/// The definition a request carries, in the config file's terms.
pub fn definition(agent: Option<v1::AgentDefinition>) -> Result<AgentDefinition, Status> {
    let agent = agent.ok_or_else(|| Status::invalid_argument("agent is required"))?;
    let mode = match super::known("agent.mode", agent.mode)? {
        v1::GateMode::Unspecified | v1::GateMode::Pipeline => Mode::Pipeline,
        v1::GateMode::Immediate => Mode::Immediate,
        v1::GateMode::Manual => Mode::Manual,
    };
    let text = |value: String| Some(value).filter(|v| !v.trim().is_empty());
    let list = |values: Vec<String>| Some(values).filter(|v| !v.is_empty());
    Ok(AgentDefinition {
        // The file accepts a numeric id too; normalized the same way.
        project: agent.project.trim().trim_matches('/').to_owned(),
        name: agent.name,
        git_ref: agent.r#ref,
        mode,
        stages: agent.stages,
        repository: text(agent.repository),
        repository_token_file: text(agent.repository_token_file).map(Into::into),
        paths: agent.paths,
        default_namespace: text(agent.default_namespace),
        scope_namespaces: list(agent.scope_namespaces),
        scope_cluster_kinds: list(agent.scope_cluster_kinds),
        prune: agent.prune,
        prune_limit: agent.prune_limit,
        prune_propagation_policy: text(agent.prune_propagation_policy),
        dry_run_strategy: text(agent.dry_run_strategy),
        health_timeout: text(agent.health_timeout),
        reconcile_interval: text(agent.reconcile_interval),
        force_conflicts: agent.force_conflicts,
        health_checks: agent
            .health_checks
            .into_iter()
            .map(|c| HealthCheck {
                group: c.group,
                kind: c.kind,
                jsonpath: c.jsonpath,
                healthy: c.healthy_values,
                failed: c.failed_values,
            })
            .collect(),
        impersonate: text(agent.impersonate),
        badge: agent.badge_public.then(|| "public".to_owned()),
        preview: agent.preview,
    })
    .and_then(|definition| {
        if definition.project.is_empty() {
            return Err(Status::invalid_argument("project: must not be empty"));
        }
        Ok(definition)
    })
}

/// Rotates a token as `request` asks.
pub async fn rotate(
    engine: &Engine,
    request: v1::RotateAgentTokenRequest,
) -> Result<v1::RotateAgentTokenResponse, Status> {
    let grace = request
        .grace_seconds
        .map_or(DEFAULT_ROTATION_GRACE, |s| Duration::from_secs(s.into()));
    let Rotated {
        token,
        previous_valid_until_ms,
    } = engine
        .rotate_token(&request.name, grace, request.ci_token)
        .await?;
    Ok(v1::RotateAgentTokenResponse {
        token,
        previous_valid_until_unix_ms: previous_valid_until_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_fields_take_the_file_defaults() {
        let def = definition(Some(v1::AgentDefinition {
            name: "edge".into(),
            project: "/group/app/".into(),
            r#ref: "refs/heads/main".into(),
            mode: v1::GateMode::Manual.into(),
            badge_public: true,
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(def.project, "group/app");
        assert_eq!(def.mode, Mode::Manual);
        assert_eq!(def.repository, None);
        assert_eq!(def.scope_namespaces, None);
        assert_eq!(def.badge.as_deref(), Some("public"));
        let spec = def
            .validate(&|f| f.to_owned(), crate::config::TokenHash::of("t"), None)
            .unwrap();
        assert_eq!(spec.branch, "main");
        assert_eq!(spec.apply.scope_namespaces, ["default"]);
        assert!(definition(None).is_err());
        let error = definition(Some(v1::AgentDefinition {
            name: "edge".into(),
            ..Default::default()
        }))
        .unwrap_err();
        assert!(error.message().contains("project"), "{error:?}");
        let error = definition(Some(v1::AgentDefinition {
            name: "edge".into(),
            project: "group/app".into(),
            r#ref: "main".into(),
            mode: 99,
            ..Default::default()
        }))
        .unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        assert!(
            error.message().contains("agent.mode: unknown value 99"),
            "not read as the default mode: {error:?}"
        );
    }
}
