//! The HTTP side: routes Kubernetes REST paths onto the store and answers in the real
//! server's formats.

use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::RequestRecord;
use super::fields::{json_patch, merge_patch};
use super::resources::{
    Resource, aggregated, api_group_doc, api_group_list, api_resource_list, api_versions,
    version_info,
};
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{ApiError, DeleteOptions, State};

/// The state every handler and every `KubeApi` handle share.
pub(crate) struct Shared {
    state: Mutex<State>,
}

impl Shared {
    pub(crate) fn new(address: String) -> Self {
        Self {
            state: Mutex::new(State::new(address)),
        }
    }

    /// The state, even after a panic elsewhere poisoned the lock: a failed test must not
    /// turn every later request into a second panic.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

const JSON: &str = "application/json";

struct Reply {
    code: u16,
    content_type: String,
    body: Value,
}

impl Reply {
    fn json(code: u16, body: Value) -> Self {
        Self {
            code,
            content_type: JSON.into(),
            body,
        }
    }
}

impl From<ApiError> for Reply {
    fn from(error: ApiError) -> Self {
        Self::json(error.code, error.to_status())
    }
}

/// Percent-decodes one `application/x-www-form-urlencoded` component.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        index += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Self {
        Self(
            raw.split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (decode(key), decode(value))
                })
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        self.get(name).is_some_and(|v| v == "true" || v == "1")
    }

    fn dry_run(&self) -> Result<bool, ApiError> {
        match self.get("dryRun") {
            None => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "dryRun: Unsupported value: \"{other}\": supported values: \"All\""
            ))),
        }
    }
}

/// Which aggregated discovery version the `Accept` header asks for, if any.
fn aggregated_version(headers: &HeaderMap) -> Option<&'static str> {
    let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
    for media in accept.split(',') {
        let params: Vec<&str> = media.split(';').map(str::trim).collect();
        if params.first() != Some(&"application/json")
            || !params.contains(&"g=apidiscovery.k8s.io")
            || !params.contains(&"as=APIGroupDiscoveryList")
        {
            continue;
        }
        if params.contains(&"v=v2") {
            return Some("v2");
        }
        if params.contains(&"v=v2beta1") {
            return Some("v2beta1");
        }
    }
    None
}

/// A resource request path, split up.
struct Target {
    group: String,
    version: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_target(group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let target =
        |namespace: Option<&str>, plural: &str, name: Option<&str>, sub: Option<&str>| Target {
            group: group.to_owned(),
            version: version.to_owned(),
            namespace: namespace.map(str::to_owned),
            plural: plural.to_owned(),
            name: name.map(str::to_owned),
            subresource: sub.map(str::to_owned),
        };
    let namespace_itself = group.is_empty() && rest.first() == Some(&"namespaces");
    match rest {
        [plural] => Some(target(None, plural, None, None)),
        [plural, name] => Some(target(None, plural, Some(name), None)),
        ["namespaces", name, sub @ ("status" | "finalize")] if namespace_itself => {
            Some(target(None, "namespaces", Some(name), Some(sub)))
        }
        ["namespaces", namespace, plural] => Some(target(Some(namespace), plural, None, None)),
        ["namespaces", namespace, plural, name] => {
            Some(target(Some(namespace), plural, Some(name), None))
        }
        ["namespaces", namespace, plural, name, sub] => {
            Some(target(Some(namespace), plural, Some(name), Some(sub)))
        }
        [plural, name, sub] => Some(target(None, plural, Some(name), Some(sub))),
        _ => None,
    }
}

/// The one handler: every request is recorded and answered under the state lock, which is
/// never held across an await.
pub(crate) async fn handle(
    AxumState(shared): AxumState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reply = {
        let mut state = shared.lock();
        dispatch(&mut state, &method, &uri, &headers, &body)
    };
    let code = StatusCode::from_u16(reply.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let bytes = match &reply.body {
        Value::String(text) if reply.content_type.starts_with("text/") => text.clone().into_bytes(),
        body => body.to_string().into_bytes(),
    };
    (code, [(header::CONTENT_TYPE, reply.content_type)], bytes).into_response()
}

fn dispatch(
    state: &mut State,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Reply {
    let path = uri.path();
    let raw_query = uri.query().unwrap_or_default();
    let query = Query::parse(raw_query);
    let mut recorded_query = raw_query.to_owned();
    let delete_body: Option<Value> = if *method == Method::DELETE && !body.is_empty() {
        serde_json::from_slice(body).ok()
    } else {
        None
    };
    // The log shows the policy whether it came in the query or in the DeleteOptions body.
    if query.get("propagationPolicy").is_none()
        && let Some(policy) = delete_body
            .as_ref()
            .and_then(|b| b.get("propagationPolicy"))
            .and_then(Value::as_str)
    {
        if !recorded_query.is_empty() {
            recorded_query.push('&');
        }
        recorded_query.push_str("propagationPolicy=");
        recorded_query.push_str(policy);
    }
    state.requests.push(RequestRecord {
        method: method.as_str().to_owned(),
        path: path.to_owned(),
        query: recorded_query,
    });
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let catalog = state.catalog();
    let get_only = |reply: Option<Value>| -> Reply {
        if *method != Method::GET {
            return ApiError::method_not_allowed().into();
        }
        match reply {
            Some(body) => Reply::json(200, body),
            None => ApiError::unknown_resource().into(),
        }
    };
    let aggregated_version = aggregated_version(headers);
    let discovery = |core: bool, legacy: Value| -> Reply {
        if *method != Method::GET {
            return ApiError::method_not_allowed().into();
        }
        match aggregated_version {
            Some(version) => Reply {
                code: 200,
                content_type: format!(
                    "application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList"
                ),
                body: aggregated(&catalog, core, version),
            },
            None => Reply::json(200, legacy),
        }
    };
    match segments.as_slice() {
        ["version"] => get_only(Some(version_info())),
        ["healthz" | "livez" | "readyz"] => Reply {
            code: 200,
            content_type: "text/plain; charset=utf-8".into(),
            body: Value::String("ok".into()),
        },
        ["api"] => discovery(true, api_versions(&state.address)),
        ["apis"] => discovery(false, api_group_list(&catalog)),
        ["api", version] => get_only(api_resource_list(&catalog, "", version)),
        ["apis", group] => get_only(api_group_doc(&catalog, group)),
        ["apis", group, version] => get_only(api_resource_list(&catalog, group, version)),
        ["api", version, rest @ ..] => resource_request(
            state,
            method,
            "",
            version,
            rest,
            &query,
            headers,
            body,
            delete_body,
        ),
        ["apis", group, version, rest @ ..] => resource_request(
            state,
            method,
            group,
            version,
            rest,
            &query,
            headers,
            body,
            delete_body,
        ),
        _ => ApiError::unknown_resource().into(),
    }
}

/// The manager of a non-apply write: `fieldManager`, else the user agent's product name as
/// the real server derives it.
fn update_manager(query: &Query, headers: &HeaderMap) -> String {
    if let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()) {
        return manager.to_owned();
    }
    headers
        .get(header::USER_AGENT)
        .and_then(|agent| agent.to_str().ok())
        .and_then(|agent| agent.split('/').next())
        .filter(|agent| !agent.is_empty())
        .unwrap_or("unknown")
        .to_owned()
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body of the request was not valid JSON (this emulation does not read YAML): {error}"
        ))
    })
}

#[allow(clippy::too_many_arguments)]
fn resource_request(
    state: &mut State,
    method: &Method,
    group: &str,
    version: &str,
    rest: &[&str],
    query: &Query,
    headers: &HeaderMap,
    body: &[u8],
    delete_body: Option<Value>,
) -> Reply {
    let result = (|| -> Result<Reply, ApiError> {
        let target = parse_target(group, version, rest).ok_or_else(ApiError::unknown_resource)?;
        let resource = state
            .resource(&target.group, &target.version, &target.plural)
            .ok_or_else(ApiError::unknown_resource)?;
        // Scope mismatches have no route in the real server either.
        let scoped_wrong = match (&target.namespace, &target.name) {
            (Some(_), _) => !resource.namespaced,
            (None, Some(_)) => resource.namespaced,
            (None, None) => false,
        };
        if scoped_wrong {
            return Err(ApiError::unknown_resource());
        }
        let namespace = target.namespace.as_deref();
        let version = target.version.as_str();
        match (&target.name, &target.subresource) {
            (None, _) => collection(
                state,
                method,
                &resource,
                version,
                namespace,
                query,
                headers,
                body,
                delete_body,
            ),
            (Some(name), None) => object(
                state,
                method,
                &resource,
                version,
                namespace,
                name,
                query,
                headers,
                body,
                delete_body,
            ),
            (Some(name), Some(sub)) if sub == "status" && resource.status => {
                if *method != Method::GET {
                    return Err(ApiError::method_not_allowed());
                }
                Ok(Reply::json(
                    200,
                    state.get(&resource, version, namespace, name)?,
                ))
            }
            (Some(_), Some(_)) => Err(ApiError::unknown_resource()),
        }
    })();
    result.unwrap_or_else(Reply::from)
}

fn delete_options(query: &Query, body: Option<&Value>) -> Result<DeleteOptions, ApiError> {
    let from_body = |field: &str| body.and_then(|b| b.get(field));
    let dry_run = query.dry_run()?
        || from_body("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|values| values.iter().any(|v| v == "All"));
    Ok(DeleteOptions {
        propagation: query
            .get("propagationPolicy")
            .map(str::to_owned)
            .or_else(|| {
                from_body("propagationPolicy")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            }),
        dry_run,
        uid: body
            .and_then(|b| b.pointer("/preconditions/uid"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        resource_version: body
            .and_then(|b| b.pointer("/preconditions/resourceVersion"))
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

#[allow(clippy::too_many_arguments)]
fn collection(
    state: &mut State,
    method: &Method,
    resource: &Resource,
    version: &str,
    namespace: Option<&str>,
    query: &Query,
    headers: &HeaderMap,
    body: &[u8],
    delete_body: Option<Value>,
) -> Result<Reply, ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    match *method {
        Method::GET => {
            if query.flag("watch") {
                return Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "watch is not supported by this Kubernetes API emulation",
                ));
            }
            let limit = match query.get("limit") {
                Some(limit) => Some(limit.parse::<usize>().map_err(|_| {
                    ApiError::bad_request(format!("limit: Invalid value: \"{limit}\""))
                })?),
                None => None,
            }
            .filter(|limit| *limit > 0);
            // The token is the last key served, `namespace/name`; names cannot hold a '/'.
            let after = query
                .get("continue")
                .filter(|c| !c.is_empty())
                .map(|token| token.split_once('/').unwrap_or(("", token)));
            let selected = state.select(resource, namespace, &labels, &fields);
            let selected: Vec<_> = selected
                .into_iter()
                .filter(|(key, _)| {
                    after.is_none_or(|after| (key.namespace.as_str(), key.name.as_str()) > after)
                })
                .collect();
            let page_len = limit.unwrap_or(selected.len()).min(selected.len());
            let remaining = selected.len() - page_len;
            let items: Vec<Value> = selected[..page_len]
                .iter()
                .map(|(_, stored)| {
                    let mut item = State::present(resource, version, &stored.object);
                    // Typed lists of built-in kinds carry no per-item apiVersion and kind.
                    if resource.builtin
                        && let Value::Object(map) = &mut item
                    {
                        map.remove("apiVersion");
                        map.remove("kind");
                    }
                    item
                })
                .collect();
            let mut metadata = json!({"resourceVersion": state.resource_version.to_string()});
            if remaining > 0
                && let (Value::Object(map), Some((key, _))) =
                    (&mut metadata, selected[..page_len].last())
            {
                map.insert("continue".into(), continue_token(key).into());
                map.insert("remainingItemCount".into(), remaining.into());
            }
            Ok(Reply::json(
                200,
                json!({
                    "kind": resource.list_kind,
                    "apiVersion": resource.api_version(version),
                    "metadata": metadata,
                    "items": items
                }),
            ))
        }
        Method::POST => {
            if resource.namespaced && namespace.is_none() {
                return Err(ApiError::method_not_allowed());
            }
            let dry_run = query.dry_run()?;
            let manager = update_manager(query, headers);
            let written = state.create(
                resource,
                version,
                namespace,
                parse_body(body)?,
                &manager,
                dry_run,
            )?;
            Ok(Reply::json(
                201,
                State::present(resource, version, &written.object),
            ))
        }
        Method::DELETE => {
            if resource.namespaced && namespace.is_none() {
                return Err(ApiError::method_not_allowed());
            }
            let options = delete_options(query, delete_body.as_ref())?;
            let names: Vec<(String, Value)> = state
                .select(resource, namespace, &labels, &fields)
                .into_iter()
                .map(|(key, stored)| {
                    (
                        key.name.clone(),
                        State::present(resource, version, &stored.object),
                    )
                })
                .collect();
            let mut items = Vec::new();
            for (name, object) in names {
                state.delete(resource, version, namespace, &name, &options)?;
                items.push(object);
            }
            Ok(Reply::json(
                200,
                json!({
                    "kind": resource.list_kind,
                    "apiVersion": resource.api_version(version),
                    "metadata": {"resourceVersion": state.resource_version.to_string()},
                    "items": items
                }),
            ))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

fn continue_token(key: &super::store::Key) -> String {
    format!("{}/{}", key.namespace, key.name)
}

#[allow(clippy::too_many_arguments)]
fn object(
    state: &mut State,
    method: &Method,
    resource: &Resource,
    version: &str,
    namespace: Option<&str>,
    name: &str,
    query: &Query,
    headers: &HeaderMap,
    body: &[u8],
    delete_body: Option<Value>,
) -> Result<Reply, ApiError> {
    match *method {
        Method::GET => Ok(Reply::json(
            200,
            state.get(resource, version, namespace, name)?,
        )),
        Method::PUT => {
            let dry_run = query.dry_run()?;
            let manager = update_manager(query, headers);
            let written = state.replace(
                resource,
                version,
                namespace,
                name,
                parse_body(body)?,
                &manager,
                dry_run,
            )?;
            let code = if written.created { 201 } else { 200 };
            Ok(Reply::json(
                code,
                State::present(resource, version, &written.object),
            ))
        }
        Method::DELETE => {
            let options = delete_options(query, delete_body.as_ref())?;
            Ok(Reply::json(
                200,
                state.delete(resource, version, namespace, name, &options)?,
            ))
        }
        Method::PATCH => patch(
            state, resource, version, namespace, name, query, headers, body,
        ),
        _ => Err(ApiError::method_not_allowed()),
    }
}

#[allow(clippy::too_many_arguments)]
fn patch(
    state: &mut State,
    resource: &Resource,
    version: &str,
    namespace: Option<&str>,
    name: &str,
    query: &Query,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media = content_type.split(';').next().unwrap_or_default().trim();
    let dry_run = query.dry_run()?;
    let force = query.get("force");
    if force.is_some() && media != "application/apply-patch+yaml" {
        return Err(ApiError::bad_request(
            "force: Forbidden: may not be specified for non-apply patch",
        ));
    }
    let written = match media {
        "application/apply-patch+yaml" => {
            let manager = query
                .get("fieldManager")
                .filter(|m| !m.is_empty())
                .ok_or_else(|| {
                    ApiError::bad_request("PATCH: fieldManager is required for apply requests")
                })?
                .to_owned();
            let force = match force {
                None | Some("false") => false,
                Some("true") => true,
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "force: Invalid value: \"{other}\": must be true or false"
                    )));
                }
            };
            let body = parse_body(body)?;
            state.apply(
                resource, version, namespace, name, body, &manager, force, dry_run,
            )?
        }
        "application/merge-patch+json" => {
            let patch_body = parse_body(body)?;
            let manager = update_manager(query, headers);
            state.patch(
                resource,
                version,
                namespace,
                name,
                |object| {
                    merge_patch(object, &patch_body);
                    Ok(())
                },
                &manager,
                dry_run,
            )?
        }
        "application/json-patch+json" => {
            let patch_body = parse_body(body)?;
            let manager = update_manager(query, headers);
            state.patch(
                resource,
                version,
                namespace,
                name,
                |object| json_patch(object, &patch_body),
                &manager,
                dry_run,
            )?
        }
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: \
                     application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml \
                     (this emulation does not implement {other:?})"
                ),
            ));
        }
    };
    let code = if written.created { 201 } else { 200 };
    Ok(Reply::json(
        code,
        State::present(resource, version, &written.object),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries_and_targets() {
        let query = Query::parse("labelSelector=app%3Dweb%2Ctier%21%3Dx&fieldManager=a+b&x");
        assert_eq!(query.get("labelSelector"), Some("app=web,tier!=x"));
        assert_eq!(query.get("fieldManager"), Some("a b"));
        assert_eq!(query.get("x"), Some(""));
        assert_eq!(decode("%zz%4"), "%zz%4");
        let target = parse_target("", "v1", &["namespaces", "a", "status"]).unwrap();
        assert_eq!(
            (target.plural.as_str(), target.name.as_deref()),
            ("namespaces", Some("a"))
        );
        let target = parse_target("apps", "v1", &["namespaces", "a", "deployments"]).unwrap();
        assert_eq!(target.namespace.as_deref(), Some("a"));
        assert!(target.name.is_none());
    }
}
