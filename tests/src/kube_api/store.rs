//! The object store and the write semantics of the real API server: server-side apply with
//! field ownership, updates, creates, deletes, resource versions and generations, plus the
//! controllers' reactions (workload rollouts, CRD establishment).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use super::RequestRecord;
use super::fields::{
    FieldSet, Path, Seg, display, field_set, merge_applied, prune_emptied, remove_at, strip_nulls,
    value_at,
};
use super::resources::{Resource, builtins, crd_problem, crd_resource};

/// A failure answered as a `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Value,
}

fn details(resource: &Resource, name: &str) -> Value {
    let mut details = Map::new();
    details.insert("name".into(), name.into());
    if !resource.group.is_empty() {
        details.insert("group".into(), resource.group.clone().into());
    }
    details.insert("kind".into(), resource.plural.clone().into());
    Value::Object(details)
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: Value::Null,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub(crate) fn not_found(resource: &Resource, name: &str) -> Self {
        Self {
            details: details(resource, name),
            ..Self::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", resource.qualified()),
            )
        }
    }

    pub(crate) fn namespace_not_found(namespace: &str) -> Self {
        Self {
            details: json!({"name": namespace, "kind": "namespaces"}),
            ..Self::new(
                404,
                "NotFound",
                format!("namespaces \"{namespace}\" not found"),
            )
        }
    }

    pub(crate) fn unknown_resource() -> Self {
        Self {
            details: json!({}),
            ..Self::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )
        }
    }

    pub(crate) fn method_not_allowed() -> Self {
        Self {
            details: json!({}),
            ..Self::new(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        }
    }

    fn already_exists(resource: &Resource, name: &str) -> Self {
        Self {
            details: details(resource, name),
            ..Self::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", resource.qualified()),
            )
        }
    }

    fn modified(resource: &Resource, name: &str) -> Self {
        Self {
            details: details(resource, name),
            ..Self::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                     please apply your changes to the latest version and try again",
                    resource.qualified()
                ),
            )
        }
    }

    /// A 422 `Invalid` naming one field, as `field.ErrorList` errors read.
    pub(crate) fn invalid(resource: &Resource, name: &str, field: &str, detail: &str) -> Self {
        let cause_reason = if detail.starts_with("Required value") {
            "FieldValueRequired"
        } else if detail.starts_with("Forbidden") {
            "FieldValueForbidden"
        } else if detail.starts_with("Unsupported value") {
            "FieldValueNotSupported"
        } else {
            "FieldValueInvalid"
        };
        let mut details = Map::new();
        details.insert("name".into(), name.into());
        if !resource.group.is_empty() {
            details.insert("group".into(), resource.group.clone().into());
        }
        details.insert("kind".into(), resource.kind.clone().into());
        details.insert(
            "causes".into(),
            json!([{"reason": cause_reason, "message": detail, "field": field}]),
        );
        Self {
            details: Value::Object(details),
            ..Self::new(
                422,
                "Invalid",
                format!(
                    "{} \"{name}\" is invalid: {field}: {detail}",
                    resource.qualified_kind()
                ),
            )
        }
    }

    /// The `Status` body.
    pub(crate) fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if !self.details.is_null()
            && let Value::Object(map) = &mut status
        {
            map.insert("details".into(), self.details.clone());
        }
        status
    }
}

/// Where an object lives: its resource (group and plural), namespace ("" when cluster
/// scoped) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub(crate) fn new(resource: &Resource, namespace: Option<&str>, name: &str) -> Self {
        Self {
            group: resource.group.clone(),
            plural: resource.plural.clone(),
            namespace: if resource.namespaced {
                namespace.unwrap_or("default").to_owned()
            } else {
                String::new()
            },
            name: name.to_owned(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operation {
    Apply,
    Update,
}

/// One `managedFields` entry, with its field set kept as paths.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Manager {
    pub manager: String,
    pub operation: Operation,
    pub subresource: Option<String>,
    pub api_version: String,
    pub time: String,
    pub fields: FieldSet,
}

impl Manager {
    fn is(&self, actor: &Actor) -> bool {
        self.manager == actor.manager
            && self.operation == actor.operation
            && self.subresource.as_deref() == actor.subresource
    }

    /// As the real server names a manager in conflict messages.
    fn printed(&self) -> String {
        let mut out = Value::String(self.manager.clone()).to_string();
        if let Some(subresource) = &self.subresource {
            out.push_str(&format!(" with subresource \"{subresource}\""));
        }
        if self.operation == Operation::Update {
            out.push_str(&format!(" using {} at {}", self.api_version, self.time));
        }
        out
    }

    fn entry(&self) -> Value {
        let mut entry = json!({
            "manager": self.manager,
            "operation": match self.operation {
                Operation::Apply => "Apply",
                Operation::Update => "Update",
            },
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": super::fields::fields_v1(&self.fields),
        });
        if let (Some(subresource), Value::Object(map)) = (&self.subresource, &mut entry) {
            map.insert("subresource".into(), subresource.clone().into());
        }
        entry
    }
}

/// Who writes: a field manager with its operation and subresource.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Actor<'a> {
    pub manager: &'a str,
    pub operation: Operation,
    pub subresource: Option<&'a str>,
}

impl<'a> Actor<'a> {
    pub(crate) fn update(manager: &'a str) -> Self {
        Self {
            manager,
            operation: Operation::Update,
            subresource: None,
        }
    }

    fn status(manager: &'a str) -> Self {
        Self {
            manager,
            operation: Operation::Update,
            subresource: Some("status"),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Stored {
    pub object: Value,
    pub managers: Vec<Manager>,
}

/// What a write did.
pub(crate) struct Written {
    pub object: Value,
    pub created: bool,
    /// Created, or its generation moved: what controllers react to.
    pub spec_changed: bool,
}

/// Options of a delete, from the query and the `DeleteOptions` body.
#[derive(Default, Debug)]
pub(crate) struct DeleteOptions {
    pub propagation: Option<String>,
    pub dry_run: bool,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// The whole emulated cluster.
pub(crate) struct State {
    pub objects: BTreeMap<Key, Stored>,
    pub resource_version: u64,
    pub auto_rollout: bool,
    pub requests: Vec<RequestRecord>,
    pub address: String,
}

const SYSTEM_METADATA: [&str; 10] = [
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// The part of an object that field managers can own: no type, no system metadata, and no
/// status unless `with_status`.
fn owned_view(object: &Value, with_status: bool) -> Value {
    let mut view = object.clone();
    if let Value::Object(map) = &mut view {
        map.remove("apiVersion");
        map.remove("kind");
        if !with_status {
            map.remove("status");
        }
        let empty = match map.get_mut("metadata") {
            Some(Value::Object(metadata)) => {
                for key in SYSTEM_METADATA {
                    metadata.remove(key);
                }
                metadata.is_empty()
            }
            Some(_) => true,
            None => false,
        };
        if empty {
            map.remove("metadata");
        }
    }
    view
}

/// The object without what the server maintains itself, to tell whether a write changes it.
fn content(object: &Value) -> Value {
    let mut content = object.clone();
    if let Some(Value::Object(metadata)) = content.get_mut("metadata") {
        metadata.remove("managedFields");
        metadata.remove("resourceVersion");
        metadata.remove("generation");
    }
    content
}

/// What `metadata.generation` tracks: everything but metadata (and status when it is a
/// subresource).
fn spec_part(object: &Value, resource: &Resource) -> Value {
    let mut part = object.clone();
    if let Value::Object(map) = &mut part {
        map.remove("metadata");
        map.remove("apiVersion");
        map.remove("kind");
        if resource.status {
            map.remove("status");
        }
    }
    part
}

fn seconds_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Now as RFC 3339 in UTC, at second precision like `metav1.Time`.
pub(crate) fn now() -> String {
    rfc3339(seconds_now())
}

fn rfc3339(seconds: u64) -> String {
    let days = i64::try_from(seconds / 86_400).unwrap_or(0);
    let rest = seconds % 86_400;
    // Civil-from-days (Howard Hinnant), to avoid a date crate for one format.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// A random version-4 UUID; `RandomState` gives fresh random keys without a rand crate.
pub(crate) fn new_uid() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let mut bytes = [0u8; 16];
    for (half, chunk) in bytes.chunks_mut(8).enumerate() {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(count);
        hasher.write_u128(nanos);
        hasher.write_usize(half);
        chunk.copy_from_slice(&hasher.finish().to_le_bytes());
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// Why `name` is not a valid name for `resource`, as the real validation words it.
fn name_problem(resource: &Resource, name: &str) -> Option<String> {
    if resource.group == "rbac.authorization.k8s.io" {
        // RBAC names are path segments: `system:controller:x` is fine.
        return (name == "." || name == ".." || name.contains('/') || name.contains('%'))
            .then(|| format!("Invalid value: \"{name}\": may not contain '/' or '%' and may not be '.' or '..'"));
    }
    if resource.is("", "Namespace") || resource.is("", "Service") {
        return (!is_dns_label(name)).then(|| {
            format!(
                "Invalid value: \"{name}\": a lowercase RFC 1123 label must consist of lower case \
                 alphanumeric characters or '-', and must start and end with an alphanumeric character"
            )
        });
    }
    (!is_dns_subdomain(name)).then(|| {
        format!(
            "Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case \
             alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        )
    })
}

fn metadata_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object
        .get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.is_object() {
        *object = Value::Object(Map::new());
    }
    let Value::Object(map) = object else {
        unreachable!("just made an object")
    };
    let metadata = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !metadata.is_object() {
        *metadata = Value::Object(Map::new());
    }
    match metadata {
        Value::Object(metadata) => metadata,
        _ => unreachable!("just made an object"),
    }
}

fn set_type(object: &mut Value, api_version: &str, kind: &str) {
    if let Value::Object(map) = object {
        map.insert("apiVersion".into(), api_version.into());
        map.insert("kind".into(), kind.into());
    }
}

/// Checks a request body's type and name against the URL; returns the name to use.
fn check_body(
    resource: &Resource,
    version: &str,
    namespace: Option<&str>,
    url_name: Option<&str>,
    body: &Value,
) -> Result<String, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request must be a JSON object",
        ));
    }
    let expected = resource.api_version(version);
    match body.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            return Err(ApiError::bad_request(format!(
                "Object 'apiVersion' is missing in '{body}'"
            )));
        }
        Some(found) if found != expected => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({found}) does not match the expected API version ({expected})"
            )));
        }
        Some(_) => {}
    }
    match body.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            return Err(ApiError::bad_request(format!(
                "Object 'Kind' is missing in '{body}'"
            )));
        }
        Some(found) if found != resource.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({found}) does not match the expected kind ({})",
                resource.kind
            )));
        }
        Some(_) => {}
    }
    if resource.namespaced
        && let (Some(found), Some(expected)) = (metadata_str(body, "namespace"), namespace)
        && !found.is_empty()
        && found != expected
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let name = metadata_str(body, "name").unwrap_or_default();
    if let Some(url_name) = url_name
        && name != url_name
    {
        if name.is_empty() && url_name.is_empty() {
            return Err(ApiError::invalid(
                resource,
                name,
                "metadata.name",
                "Required value: name is required",
            ));
        }
        return Err(ApiError::bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({url_name})"
        )));
    }
    Ok(name.to_owned())
}

fn immutable(value: Option<&Value>) -> String {
    format!(
        "Invalid value: {}: field is immutable",
        value.unwrap_or(&Value::Null)
    )
}

/// The real server's immutability rules that a GitOps agent runs into.
fn check_update(resource: &Resource, name: &str, old: &Value, new: &Value) -> Result<(), ApiError> {
    let changed = |pointer: &str| old.pointer(pointer) != new.pointer(pointer);
    if resource.group == "apps" && changed("/spec/selector") {
        let value = new.pointer("/spec/selector");
        return Err(ApiError::invalid(
            resource,
            name,
            "spec.selector",
            &immutable(value),
        ));
    }
    if resource.is("batch", "Job") {
        for (field, pointer) in [
            ("spec.selector", "/spec/selector"),
            ("spec.template", "/spec/template"),
        ] {
            if changed(pointer) {
                let value = new.pointer(pointer);
                return Err(ApiError::invalid(resource, name, field, &immutable(value)));
            }
        }
    }
    if resource.is("apiextensions.k8s.io", "CustomResourceDefinition") {
        for (field, pointer) in [("spec.group", "/spec/group"), ("spec.scope", "/spec/scope")] {
            if changed(pointer) {
                let value = new.pointer(pointer);
                return Err(ApiError::invalid(resource, name, field, &immutable(value)));
            }
        }
    }
    if resource.is("apps", "StatefulSet") {
        let mutable = [
            "replicas",
            "ordinals",
            "template",
            "updateStrategy",
            "persistentVolumeClaimRetentionPolicy",
            "minReadySeconds",
        ];
        let rest = |object: &Value| {
            let mut spec = object.get("spec").cloned().unwrap_or(Value::Null);
            if let Value::Object(map) = &mut spec {
                for key in mutable {
                    map.remove(key);
                }
            }
            spec
        };
        if rest(old) != rest(new) {
            return Err(ApiError::invalid(
                resource,
                name,
                "spec",
                "Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', \
                 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and \
                 'minReadySeconds' are forbidden",
            ));
        }
    }
    if (resource.is("", "ConfigMap") || resource.is("", "Secret"))
        && old.get("immutable").and_then(Value::as_bool) == Some(true)
    {
        if changed("/immutable") {
            return Err(ApiError::invalid(
                resource,
                name,
                "immutable",
                "Forbidden: field is immutable when `immutable` is set",
            ));
        }
        if changed("/data") || changed("/binaryData") {
            return Err(ApiError::invalid(
                resource,
                name,
                "data",
                "Forbidden: field is immutable when `immutable` is set",
            ));
        }
    }
    Ok(())
}

/// Server-side apply of `applied` (already reduced to its owned view) by `manager` over
/// `live`; returns the merged object and the new managers, or the conflicts.
fn server_side_apply(
    live: &Value,
    applied: &Value,
    managers: &[Manager],
    actor: &Actor<'_>,
    api_version: &str,
    force: bool,
    keyed: bool,
) -> Result<(Value, Vec<Manager>), ApiError> {
    let live_view = owned_view(live, true);
    let applied_fields = field_set(applied, keyed);
    let mut conflicts: Vec<(usize, Path)> = Vec::new();
    for path in &applied_fields {
        // Owning a keyed item as such cannot conflict: only its fields hold values.
        if matches!(path.last(), Some(Seg::Item(_)))
            || value_at(applied, path) == value_at(&live_view, path)
        {
            continue;
        }
        for (index, manager) in managers.iter().enumerate() {
            if !manager.is(actor) && manager.fields.contains(path) {
                conflicts.push((index, path.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflict_error(managers, &conflicts));
    }
    let mut managers = managers.to_vec();
    for (index, path) in &conflicts {
        managers[*index].fields.remove(path);
    }
    let previous = managers
        .iter()
        .find(|m| m.is(actor))
        .map(|m| m.fields.clone())
        .unwrap_or_default();
    let others: Vec<&Path> = managers
        .iter()
        .filter(|m| !m.is(actor))
        .flat_map(|m| m.fields.iter())
        .collect();
    let mut object = live.clone();
    let mut removed = Vec::new();
    // Reverse order visits fields before the keyed items that contain them.
    let dropped: Vec<&Path> = previous.difference(&applied_fields).collect();
    for path in dropped.into_iter().rev() {
        let is_item_key = path.len() >= 2
            && path.last() == Some(&Seg::Field("name".into()))
            && matches!(path[path.len() - 2], Seg::Item(_));
        if is_item_key || others.iter().any(|owned| owned.starts_with(path)) {
            continue;
        }
        if remove_at(&mut object, path) {
            removed.push(path.clone());
        }
    }
    merge_applied(&mut object, applied, keyed);
    match managers.iter_mut().find(|m| m.is(actor)) {
        Some(entry) => {
            entry.fields = applied_fields;
            entry.api_version = api_version.to_owned();
        }
        None => managers.push(Manager {
            manager: actor.manager.to_owned(),
            operation: Operation::Apply,
            subresource: None,
            api_version: api_version.to_owned(),
            time: String::new(),
            fields: applied_fields,
        }),
    }
    let owned: FieldSet = managers
        .iter()
        .flat_map(|m| m.fields.iter().cloned())
        .collect();
    for path in &removed {
        prune_emptied(&mut object, path, &owned);
    }
    managers.retain(|m| !m.fields.is_empty());
    Ok((object, managers))
}

fn conflict_error(managers: &[Manager], conflicts: &[(usize, Path)]) -> ApiError {
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|(index, path)| {
            json!({
                "type": "FieldManagerConflict",
                "message": format!("conflict with {}", managers[*index].printed()),
                "field": display(path),
            })
        })
        .collect();
    let message = if let [(index, path)] = conflicts {
        format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            managers[*index].printed(),
            display(path)
        )
    } else {
        let mut by_manager: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (index, path) in conflicts {
            by_manager
                .entry(managers[*index].printed())
                .or_default()
                .push(display(path));
        }
        let mut lines = Vec::new();
        for (manager, paths) in by_manager {
            lines.push(format!("conflicts with {manager}:"));
            lines.extend(paths.into_iter().map(|path| format!("- {path}")));
        }
        format!(
            "Apply failed with {} conflicts: {}",
            conflicts.len(),
            lines.join("\n")
        )
    };
    ApiError {
        details: json!({"causes": causes}),
        ..ApiError::new(409, "Conflict", message)
    }
}

/// Ownership after a non-apply write by `actor`: it takes the fields whose values it
/// changed; fields that no longer exist leave every manager.
fn update_ownership(
    old: Option<&Value>,
    new: &Value,
    managers: &[Manager],
    actor: &Actor<'_>,
    api_version: &str,
    keyed: bool,
) -> Vec<Manager> {
    let old_view = old.map_or_else(|| Value::Object(Map::new()), |o| owned_view(o, true));
    let new_view = owned_view(new, true);
    let changed: FieldSet = field_set(&new_view, keyed)
        .into_iter()
        .filter(|path| match path.last() {
            Some(Seg::Item(_)) => value_at(&old_view, path).is_none(),
            _ => value_at(&old_view, path) != value_at(&new_view, path),
        })
        .collect();
    let mut managers = managers.to_vec();
    for manager in &mut managers {
        manager
            .fields
            .retain(|path| value_at(&new_view, path).is_some());
        if !manager.is(actor) {
            manager.fields.retain(|path| !changed.contains(path));
        }
    }
    if !changed.is_empty() {
        match managers.iter_mut().find(|m| m.is(actor)) {
            Some(entry) => {
                entry.fields.extend(changed);
                entry.api_version = api_version.to_owned();
            }
            None => managers.push(Manager {
                manager: actor.manager.to_owned(),
                operation: actor.operation,
                subresource: actor.subresource.map(str::to_owned),
                api_version: api_version.to_owned(),
                time: String::new(),
                fields: changed,
            }),
        }
    }
    managers.retain(|m| !m.fields.is_empty());
    managers
}

fn same_ownership(a: &[Manager], b: &[Manager]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(a, b)| {
            a.manager == b.manager
                && a.operation == b.operation
                && a.subresource == b.subresource
                && a.api_version == b.api_version
                && a.fields == b.fields
        })
}

fn label_matches(object: &Value, selector: &super::selectors::LabelSelector) -> bool {
    let labels = object
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object);
    selector.matches(|key| labels.and_then(|l| l.get(key)).and_then(Value::as_str))
}

impl State {
    pub(crate) fn new(address: String) -> Self {
        let mut state = Self {
            objects: BTreeMap::new(),
            resource_version: 0,
            auto_rollout: true,
            requests: Vec::new(),
            address,
        };
        for name in ["default", "kube-system"] {
            let namespace =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            // Both the object and the catalog entry are known to be valid.
            let _ = state.put(namespace, "kube-apiserver");
        }
        state
    }

    /// Built-in resources followed by those of stored CRDs.
    pub(crate) fn catalog(&self) -> Vec<Resource> {
        let mut catalog = builtins();
        for (key, stored) in &self.objects {
            if key.group == "apiextensions.k8s.io"
                && key.plural == "customresourcedefinitions"
                && let Some(resource) = crd_resource(&stored.object)
                && !catalog
                    .iter()
                    .any(|r| r.group == resource.group && r.plural == resource.plural)
            {
                catalog.push(resource);
            }
        }
        catalog
    }

    /// The resource served at `group`/`version` under `plural`.
    pub(crate) fn resource(&self, group: &str, version: &str, plural: &str) -> Option<Resource> {
        self.catalog().into_iter().find(|r| {
            r.group == group && r.plural == plural && r.versions.iter().any(|v| v == version)
        })
    }

    /// The resource of `kind` at `api_version`, with the version split off.
    pub(crate) fn resource_of_kind(
        &self,
        api_version: &str,
        kind: &str,
    ) -> Option<(Resource, String)> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let resource = self.catalog().into_iter().find(|r| {
            r.group == group && r.kind == kind && r.versions.iter().any(|v| v == version)
        })?;
        Some((resource, version.to_owned()))
    }

    fn namespace_exists(&self, namespace: &str) -> bool {
        self.objects.contains_key(&Key {
            group: String::new(),
            plural: "namespaces".into(),
            namespace: String::new(),
            name: namespace.into(),
        })
    }

    fn check_namespace(
        &self,
        resource: &Resource,
        namespace: Option<&str>,
    ) -> Result<(), ApiError> {
        match namespace {
            Some(namespace) if resource.namespaced && !self.namespace_exists(namespace) => {
                Err(ApiError::namespace_not_found(namespace))
            }
            _ => Ok(()),
        }
    }

    /// The stored object as served at `version`.
    pub(crate) fn present(resource: &Resource, version: &str, object: &Value) -> Value {
        let mut object = object.clone();
        set_type(&mut object, &resource.api_version(version), &resource.kind);
        object
    }

    pub(crate) fn get(
        &self,
        resource: &Resource,
        version: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.objects
            .get(&Key::new(resource, namespace, name))
            .map(|stored| Self::present(resource, version, &stored.object))
            .ok_or_else(|| ApiError::not_found(resource, name))
    }

    /// The objects of `resource`, in one namespace or all, that match the selectors, in
    /// namespace and name order.
    pub(crate) fn select(
        &self,
        resource: &Resource,
        namespace: Option<&str>,
        labels: &super::selectors::LabelSelector,
        fields: &super::selectors::FieldSelector,
    ) -> Vec<(&Key, &Stored)> {
        self.objects
            .iter()
            .filter(|(key, _)| key.group == resource.group && key.plural == resource.plural)
            .filter(|(key, _)| {
                namespace.is_none_or(|ns| !resource.namespaced || key.namespace == ns)
            })
            .filter(|(key, stored)| {
                label_matches(&stored.object, labels) && fields.matches(&key.name, &key.namespace)
            })
            .collect()
    }

    fn next_resource_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    /// Stores `object` (already merged) as the result of a write by `actor`, unless nothing
    /// changed; maintains uid, timestamps, generation, resourceVersion and managedFields.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &mut self,
        resource: &Resource,
        key: Key,
        mut object: Value,
        mut managers: Vec<Manager>,
        actor: &Actor<'_>,
        dry_run: bool,
    ) -> Written {
        normalize(resource, &key, &mut object);
        let old = self.objects.get(&key);
        if let Some(old) = old
            && content(&old.object) == content(&object)
            && same_ownership(&old.managers, &managers)
        {
            return Written {
                object: old.object.clone(),
                created: false,
                spec_changed: false,
            };
        }
        let time = now();
        for manager in &mut managers {
            let previous = old.and_then(|old| {
                old.managers.iter().find(|m| {
                    m.manager == manager.manager
                        && m.operation == manager.operation
                        && m.subresource == manager.subresource
                })
            });
            manager.time = match previous {
                Some(previous)
                    if !(manager.manager == actor.manager
                        && manager.operation == actor.operation
                        && manager.subresource.as_deref() == actor.subresource)
                        && previous.fields == manager.fields =>
                {
                    previous.time.clone()
                }
                _ => time.clone(),
            };
        }
        let (generation, spec_changed) = match old {
            None => (1, true),
            Some(old) => {
                let previous = old
                    .object
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(1);
                if spec_part(&old.object, resource) == spec_part(&object, resource) {
                    (previous, false)
                } else {
                    (previous + 1, true)
                }
            }
        };
        let created = old.is_none();
        let uid = old
            .and_then(|old| metadata_str(&old.object, "uid"))
            .map_or_else(new_uid, str::to_owned);
        let created_at = old
            .and_then(|old| metadata_str(&old.object, "creationTimestamp"))
            .map_or_else(|| time.clone(), str::to_owned);
        let old_version = old
            .and_then(|old| metadata_str(&old.object, "resourceVersion"))
            .map(str::to_owned);
        let version = if dry_run {
            old_version
        } else {
            Some(self.next_resource_version())
        };
        let metadata = metadata_mut(&mut object);
        metadata.insert("uid".into(), uid.into());
        metadata.insert("creationTimestamp".into(), created_at.into());
        metadata.insert("generation".into(), generation.into());
        match version {
            Some(version) => metadata.insert("resourceVersion".into(), version.into()),
            None => metadata.remove("resourceVersion"),
        };
        if managers.is_empty() {
            metadata.remove("managedFields");
        } else {
            metadata.insert(
                "managedFields".into(),
                Value::Array(managers.iter().map(Manager::entry).collect()),
            );
        }
        if !dry_run {
            self.objects.insert(
                key,
                Stored {
                    object: object.clone(),
                    managers,
                },
            );
        }
        Written {
            object,
            created,
            spec_changed,
        }
    }

    /// `PATCH` with `application/apply-patch+yaml`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply(
        &mut self,
        resource: &Resource,
        version: &str,
        namespace: Option<&str>,
        name: &str,
        body: Value,
        manager: &str,
        force: bool,
        dry_run: bool,
    ) -> Result<Written, ApiError> {
        if body.is_object() && metadata_str(&body, "name").is_none_or(str::is_empty) {
            return Err(ApiError::invalid(
                resource,
                name,
                "metadata.name",
                "Required value: name is required",
            ));
        }
        check_body(resource, version, namespace, Some(name), &body)?;
        if body
            .pointer("/metadata/managedFields")
            .is_some_and(|fields| {
                !fields.is_null() && fields.as_array().is_none_or(|f| !f.is_empty())
            })
        {
            return Err(ApiError::bad_request("metadata.managedFields must be nil"));
        }
        if let Some(problem) = name_problem(resource, name) {
            return Err(ApiError::invalid(resource, name, "metadata.name", &problem));
        }
        self.check_namespace(resource, namespace)?;
        let key = Key::new(resource, namespace, name);
        let existing = self.objects.get(&key).cloned();
        if let Some(expected) = metadata_str(&body, "resourceVersion").filter(|rv| !rv.is_empty())
            && existing
                .as_ref()
                .and_then(|e| metadata_str(&e.object, "resourceVersion"))
                != Some(expected)
        {
            return Err(ApiError::modified(resource, name));
        }
        let api_version = resource.api_version(version);
        let mut applied = owned_view(&body, !resource.status);
        strip_nulls(&mut applied);
        let live = existing.as_ref().map_or_else(
            || {
                let mut skeleton = json!({"metadata": {"name": name}});
                if resource.namespaced {
                    metadata_mut(&mut skeleton)
                        .insert("namespace".into(), key.namespace.clone().into());
                }
                skeleton
            },
            |e| e.object.clone(),
        );
        let managers = existing.as_ref().map_or(&[][..], |e| e.managers.as_slice());
        let actor = Actor {
            manager,
            operation: Operation::Apply,
            subresource: None,
        };
        let (mut object, managers) = server_side_apply(
            &live,
            &applied,
            managers,
            &actor,
            &api_version,
            force,
            resource.builtin,
        )?;
        set_type(&mut object, &api_version, &resource.kind);
        self.validate(
            resource,
            name,
            existing.as_ref().map(|e| &e.object),
            &object,
        )?;
        let written = self.commit(resource, key.clone(), object, managers, &actor, dry_run);
        if !dry_run && written.spec_changed {
            self.react(resource, &key, true);
        }
        Ok(written)
    }

    fn validate(
        &self,
        resource: &Resource,
        name: &str,
        old: Option<&Value>,
        new: &Value,
    ) -> Result<(), ApiError> {
        if resource.is("apiextensions.k8s.io", "CustomResourceDefinition")
            && let Some((field, detail)) = crd_problem(new)
        {
            return Err(ApiError::invalid(resource, name, field, &detail));
        }
        match old {
            Some(old) => check_update(resource, name, old, new),
            None => Ok(()),
        }
    }

    /// `POST` to a collection.
    pub(crate) fn create(
        &mut self,
        resource: &Resource,
        version: &str,
        namespace: Option<&str>,
        mut body: Value,
        manager: &str,
        dry_run: bool,
    ) -> Result<Written, ApiError> {
        check_body(resource, version, namespace, None, &body)?;
        let mut name = metadata_str(&body, "name").unwrap_or_default().to_owned();
        if name.is_empty()
            && let Some(prefix) = metadata_str(&body, "generateName").filter(|p| !p.is_empty())
        {
            name = format!("{prefix}{}", &new_uid().replace('-', "")[..5]);
        }
        if name.is_empty() {
            return Err(ApiError::invalid(
                resource,
                "",
                "metadata.name",
                "Required value: name or generateName is required",
            ));
        }
        if let Some(problem) = name_problem(resource, &name) {
            return Err(ApiError::invalid(
                resource,
                &name,
                "metadata.name",
                &problem,
            ));
        }
        self.check_namespace(resource, namespace)?;
        let key = Key::new(resource, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(resource, &name));
        }
        let metadata = metadata_mut(&mut body);
        for field in SYSTEM_METADATA {
            metadata.remove(field);
        }
        metadata.insert("name".into(), name.clone().into());
        if resource.namespaced {
            metadata.insert("namespace".into(), key.namespace.clone().into());
        }
        if resource.status
            && let Value::Object(map) = &mut body
        {
            map.remove("status");
        }
        self.write_update(resource, version, key, None, body, manager, dry_run)
    }

    /// `PUT` to an object.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn replace(
        &mut self,
        resource: &Resource,
        version: &str,
        namespace: Option<&str>,
        name: &str,
        body: Value,
        manager: &str,
        dry_run: bool,
    ) -> Result<Written, ApiError> {
        check_body(resource, version, namespace, Some(name), &body)?;
        self.check_namespace(resource, namespace)?;
        let key = Key::new(resource, namespace, name);
        let expected = metadata_str(&body, "resourceVersion")
            .filter(|rv| !rv.is_empty())
            .map(str::to_owned);
        let Some(existing) = self.objects.get(&key).cloned() else {
            // Leases are among the few kinds whose update may create (AllowCreateOnUpdate).
            if resource.is("coordination.k8s.io", "Lease") && expected.is_none() {
                return self.create(resource, version, namespace, body, manager, dry_run);
            }
            return Err(ApiError::not_found(resource, name));
        };
        if let Some(expected) = expected
            && metadata_str(&existing.object, "resourceVersion") != Some(expected.as_str())
        {
            return Err(ApiError::modified(resource, name));
        }
        self.write_update(
            resource,
            version,
            key,
            Some(existing),
            body,
            manager,
            dry_run,
        )
    }

    /// A merge or JSON patch: `patch` turns the live object into the new one.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn patch(
        &mut self,
        resource: &Resource,
        version: &str,
        namespace: Option<&str>,
        name: &str,
        patch: impl FnOnce(&mut Value) -> Result<(), String>,
        manager: &str,
        dry_run: bool,
    ) -> Result<Written, ApiError> {
        let key = Key::new(resource, namespace, name);
        let Some(existing) = self.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(resource, name));
        };
        let mut object = Self::present(resource, version, &existing.object);
        patch(&mut object).map_err(|error| ApiError::new(422, "Invalid", error))?;
        if let Some(found) = metadata_str(&object, "resourceVersion")
            && metadata_str(&existing.object, "resourceVersion") != Some(found)
        {
            return Err(ApiError::modified(resource, name));
        }
        check_body(resource, version, namespace, Some(name), &object)?;
        self.write_update(
            resource,
            version,
            key,
            Some(existing),
            object,
            manager,
            dry_run,
        )
    }

    /// A non-apply write of a whole new object by `manager`.
    #[allow(clippy::too_many_arguments)]
    fn write_update(
        &mut self,
        resource: &Resource,
        version: &str,
        key: Key,
        existing: Option<Stored>,
        mut object: Value,
        manager: &str,
        dry_run: bool,
    ) -> Result<Written, ApiError> {
        let api_version = resource.api_version(version);
        set_type(&mut object, &api_version, &resource.kind);
        if let Some(existing) = &existing
            && resource.status
            && let Value::Object(map) = &mut object
        {
            match existing.object.get("status") {
                Some(status) => map.insert("status".into(), status.clone()),
                None => map.remove("status"),
            };
        }
        let metadata = metadata_mut(&mut object);
        metadata.insert("name".into(), key.name.clone().into());
        if resource.namespaced {
            metadata.insert("namespace".into(), key.namespace.clone().into());
        } else {
            metadata.remove("namespace");
        }
        self.validate(
            resource,
            &key.name,
            existing.as_ref().map(|e| &e.object),
            &object,
        )?;
        let actor = Actor::update(manager);
        let managers = update_ownership(
            existing.as_ref().map(|e| &e.object),
            &object,
            existing.as_ref().map_or(&[][..], |e| e.managers.as_slice()),
            &actor,
            &api_version,
            resource.builtin,
        );
        let written = self.commit(resource, key.clone(), object, managers, &actor, dry_run);
        if !dry_run && written.spec_changed {
            self.react(resource, &key, true);
        }
        Ok(written)
    }

    /// Stores an object as another actor would by an update (`put_object`); no rollout.
    pub(crate) fn put(&mut self, mut object: Value, manager: &str) -> Result<Value, String> {
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .ok_or("the object has no apiVersion")?
            .to_owned();
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .ok_or("the object has no kind")?
            .to_owned();
        let (resource, _) = self
            .resource_of_kind(&api_version, &kind)
            .ok_or_else(|| format!("no resource serves {kind} at {api_version}"))?;
        let name = metadata_str(&object, "name")
            .filter(|n| !n.is_empty())
            .ok_or("the object has no metadata.name")?
            .to_owned();
        let namespace = metadata_str(&object, "namespace").map(str::to_owned);
        let key = Key::new(&resource, namespace.as_deref(), &name);
        if resource.namespaced && !self.namespace_exists(&key.namespace) {
            return Err(format!("namespace {:?} does not exist", key.namespace));
        }
        let existing = self.objects.get(&key).cloned();
        // A status the caller leaves out stays as it is; one it gives is stored as given.
        if let (Some(existing), Value::Object(map)) = (&existing, &mut object)
            && !map.contains_key("status")
            && let Some(status) = existing.object.get("status")
        {
            map.insert("status".into(), status.clone());
        }
        let metadata = metadata_mut(&mut object);
        for field in SYSTEM_METADATA {
            if field != "name" && field != "namespace" {
                metadata.remove(field);
            }
        }
        if resource.namespaced {
            metadata.insert("namespace".into(), key.namespace.clone().into());
        }
        let actor = Actor::update(manager);
        let managers = update_ownership(
            existing.as_ref().map(|e| &e.object),
            &object,
            existing.as_ref().map_or(&[][..], |e| e.managers.as_slice()),
            &actor,
            &api_version,
            resource.builtin,
        );
        let written = self.commit(&resource, key.clone(), object, managers, &actor, false);
        if written.spec_changed {
            self.react(&resource, &key, false);
        }
        Ok(written.object)
    }

    /// Replaces the status of a stored object as `manager` through the status subresource.
    pub(crate) fn write_status(
        &mut self,
        resource: &Resource,
        key: &Key,
        status: Value,
        manager: &str,
    ) -> bool {
        let Some(existing) = self.objects.get(key).cloned() else {
            return false;
        };
        let mut object = existing.object.clone();
        if let Value::Object(map) = &mut object {
            map.insert("status".into(), status);
        }
        let api_version = existing
            .object
            .get("apiVersion")
            .and_then(Value::as_str)
            .map_or_else(|| resource.preferred_api_version(), str::to_owned);
        let actor = Actor::status(manager);
        let managers = update_ownership(
            Some(&existing.object),
            &object,
            &existing.managers,
            &actor,
            &api_version,
            resource.builtin,
        );
        self.commit(resource, key.clone(), object, managers, &actor, false);
        true
    }

    /// What controllers do after a write that created an object or moved its generation:
    /// CRDs become established; workloads roll out when `rollout` and auto rollout is on.
    fn react(&mut self, resource: &Resource, key: &Key, rollout: bool) {
        let Some(stored) = self.objects.get(key) else {
            return;
        };
        let object = &stored.object;
        let generation = object
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        if resource.is("apiextensions.k8s.io", "CustomResourceDefinition") {
            let storage: Vec<Value> = object
                .pointer("/spec/versions")
                .and_then(Value::as_array)
                .map(|versions| {
                    versions
                        .iter()
                        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                        .filter_map(|v| v.get("name").cloned())
                        .collect()
                })
                .unwrap_or_default();
            let mut accepted = object.pointer("/spec/names").cloned().unwrap_or(json!({}));
            if let Value::Object(names) = &mut accepted {
                if !names.contains_key("singular")
                    && let Some(kind) = names.get("kind").and_then(Value::as_str)
                {
                    let singular = kind.to_lowercase();
                    names.insert("singular".into(), singular.into());
                }
                if !names.contains_key("listKind")
                    && let Some(kind) = names.get("kind").and_then(Value::as_str)
                {
                    let list_kind = format!("{kind}List");
                    names.insert("listKind".into(), list_kind.into());
                }
            }
            let time = now();
            let status = json!({
                "acceptedNames": accepted,
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "lastTransitionTime": time, "reason": "NoConflicts", "message": "no conflicts found"},
                    {"type": "Established", "status": "True", "lastTransitionTime": time, "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"}
                ],
                "storedVersions": storage
            });
            if object.pointer("/status/acceptedNames") != Some(&status["acceptedNames"])
                || object.pointer("/status/storedVersions") != Some(&status["storedVersions"])
            {
                self.write_status(resource, key, status, "kube-apiserver");
            }
            return;
        }
        if !rollout || !self.auto_rollout {
            return;
        }
        let replicas = object
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let time = now();
        let status = if resource.is("apps", "Deployment") {
            json!({
                "observedGeneration": generation,
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
                "conditions": [
                    {"type": "Available", "status": "True", "lastUpdateTime": time, "lastTransitionTime": time,
                     "reason": "MinimumReplicasAvailable", "message": "Deployment has minimum availability."},
                    {"type": "Progressing", "status": "True", "lastUpdateTime": time, "lastTransitionTime": time,
                     "reason": "NewReplicaSetAvailable", "message": format!("ReplicaSet \"{}\" has successfully progressed.", key.name)}
                ]
            })
        } else if resource.is("apps", "StatefulSet") {
            let revision = format!("{}-{generation}", key.name);
            json!({
                "observedGeneration": generation,
                "replicas": replicas,
                "readyReplicas": replicas,
                "currentReplicas": replicas,
                "updatedReplicas": replicas,
                "availableReplicas": replicas,
                "currentRevision": revision,
                "updateRevision": revision,
                "collisionCount": 0
            })
        } else if resource.is("apps", "DaemonSet") {
            json!({
                "observedGeneration": generation,
                "currentNumberScheduled": 1,
                "desiredNumberScheduled": 1,
                "numberMisscheduled": 0,
                "numberReady": 1,
                "updatedNumberScheduled": 1,
                "numberAvailable": 1
            })
        } else if resource.is("batch", "Job") {
            if object.pointer("/status/succeeded").is_some() {
                return;
            }
            json!({
                "startTime": time,
                "completionTime": time,
                "succeeded": 1,
                "ready": 0,
                "terminating": 0,
                "uncountedTerminatedPods": {},
                "conditions": [
                    {"type": "SuccessCriteriaMet", "status": "True", "lastProbeTime": time, "lastTransitionTime": time,
                     "reason": "CompletionsReached", "message": "Reached expected number of succeeded pods"},
                    {"type": "Complete", "status": "True", "lastProbeTime": time, "lastTransitionTime": time,
                     "reason": "CompletionsReached", "message": "Reached expected number of succeeded pods"}
                ]
            })
        } else {
            return;
        };
        self.write_status(resource, key, status, "kube-controller-manager");
    }

    /// `DELETE` of one object; the response body is the object (for kinds the real server
    /// keeps behind a finalizer for a while) or a `Success` status.
    pub(crate) fn delete(
        &mut self,
        resource: &Resource,
        version: &str,
        namespace: Option<&str>,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<Value, ApiError> {
        if let Some(policy) = &options.propagation
            && !["Orphan", "Background", "Foreground"].contains(&policy.as_str())
        {
            return Err(ApiError::invalid(
                resource,
                name,
                "propagationPolicy",
                &format!(
                    "Unsupported value: \"{policy}\": supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\""
                ),
            ));
        }
        let key = Key::new(resource, namespace, name);
        let Some(stored) = self.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(resource, name));
        };
        if resource.is("", "Namespace") && ["default", "kube-system", "kube-public"].contains(&name)
        {
            return Err(ApiError {
                details: details(resource, name),
                ..ApiError::new(
                    403,
                    "Forbidden",
                    format!(
                        "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
                    ),
                )
            });
        }
        let uid = metadata_str(&stored.object, "uid")
            .unwrap_or_default()
            .to_owned();
        if let Some(expected) = &options.uid
            && *expected != uid
        {
            return Err(ApiError {
                details: details(resource, name),
                ..ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {expected}, UID in object meta: {uid}",
                        resource.qualified()
                    ),
                )
            });
        }
        if let Some(expected) = &options.resource_version
            && metadata_str(&stored.object, "resourceVersion") != Some(expected.as_str())
        {
            return Err(ApiError::modified(resource, name));
        }
        let mut last = Self::present(resource, version, &stored.object);
        let finalizer = match options.propagation.as_deref() {
            Some("Foreground") => Some("foregroundDeletion"),
            Some("Orphan") => Some("orphan"),
            _ => None,
        };
        let is_namespace = resource.is("", "Namespace");
        let is_crd = resource.is("apiextensions.k8s.io", "CustomResourceDefinition");
        if !options.dry_run {
            let version = self.next_resource_version();
            self.objects.remove(&key);
            if is_namespace {
                self.objects.retain(|k, _| k.namespace != name);
            }
            if is_crd && let Some(served) = crd_resource(&stored.object) {
                self.objects
                    .retain(|k, _| !(k.group == served.group && k.plural == served.plural));
            }
            metadata_mut(&mut last).insert("resourceVersion".into(), version.into());
        }
        if finalizer.is_none() && !is_namespace && !is_crd {
            let mut status_details = details(resource, name);
            if let Value::Object(map) = &mut status_details {
                map.insert("uid".into(), uid.into());
            }
            return Ok(json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": status_details
            }));
        }
        let metadata = metadata_mut(&mut last);
        metadata.insert("deletionTimestamp".into(), now().into());
        metadata.insert("deletionGracePeriodSeconds".into(), 0.into());
        let mut finalizers: Vec<Value> = metadata
            .get("finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(finalizer) = finalizer {
            finalizers.push(finalizer.into());
        }
        if is_crd {
            finalizers.push("customresourcecleanup.apiextensions.k8s.io".into());
        }
        if !finalizers.is_empty() {
            metadata.insert("finalizers".into(), finalizers.into());
        }
        if is_namespace && let Value::Object(map) = &mut last {
            map.insert("spec".into(), json!({"finalizers": ["kubernetes"]}));
            map.insert("status".into(), json!({"phase": "Terminating"}));
        }
        Ok(last)
    }
}

/// What the real server does to every write of some kinds regardless of who writes.
fn normalize(resource: &Resource, key: &Key, object: &mut Value) {
    if resource.is("", "Secret")
        && let Value::Object(map) = object
        && let Some(Value::Object(string_data)) = map.remove("stringData")
    {
        let data = map
            .entry("data")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(data) = data {
            for (k, v) in string_data {
                let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                data.insert(k, base64(text.as_bytes()).into());
            }
        }
    }
    if resource.is("", "Namespace") {
        let metadata = metadata_mut(object);
        let labels = metadata
            .entry("labels")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(labels) = labels {
            labels.insert(
                "kubernetes.io/metadata.name".into(),
                key.name.clone().into(),
            );
        }
        if let Value::Object(map) = object
            && !map.contains_key("status")
        {
            map.insert("status".into(), json!({"phase": "Active"}));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dates_and_uids() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
        let (a, b) = (new_uid(), new_uid());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_eq!(base64(b"hello"), "aGVsbG8=");
        assert_eq!(base64(b"hi!"), "aGkh");
        assert_eq!(base64(b"h"), "aA==");
    }
}
