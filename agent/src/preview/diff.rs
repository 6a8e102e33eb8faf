//! The readable field diff of a preview: what a server-side dry run says an object would
//! become, compared with what it is now. Pure: no I/O.
//!
//! Left out: what only the API server keeps (`managedFields`, `resourceVersion`,
//! `generation`, `uid`, timestamps, `status`), and fields the revision does not set that
//! changed anyway (server defaults). A field the revision stops setting is shown removed. A
//! Secret's values never appear: its `data` is compared key by key and only the key names
//! are shown.

use greenlight::preview::MAX_FIELDS;
use greenlight::v1::FieldChange;
use serde_json::Value;

/// The longest value shown, in characters; longer ones are cut with `…`.
pub const MAX_VALUE_CHARS: usize = 200;

/// Metadata the API server keeps for itself.
const SERVER_METADATA: [&str; 7] = [
    "managedFields",
    "resourceVersion",
    "generation",
    "uid",
    "selfLink",
    "creationTimestamp",
    "deletionTimestamp",
];

/// One step into a JSON document.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    /// An element of a list of named objects (containers, ports, env), by its name.
    Named(String),
    Index(usize),
}

/// The fields that would change, from `live` (the object now) to `after` (the dry run's
/// answer), given `desired` (the body the agent would apply). `truncated` is set when fields
/// were left out.
pub fn field_changes(
    live: &Value,
    after: &Value,
    desired: &Value,
    truncated: &mut bool,
) -> Vec<FieldChange> {
    let secret = is_secret(desired);
    let mut out = Vec::new();
    let mut path = Vec::new();
    walk(
        &strip(live),
        &strip(after),
        &mut path,
        &mut |path, before, after| {
            if secret && is_secret_value(path) {
                return;
            }
            // A field only the server set (a default) is noise; a removal is the revision's.
            if after.is_some() && !sets(desired, path) {
                return;
            }
            out.push(FieldChange {
                path: render_path(path),
                before: before.map(|v| show(v, desired, path)),
                after: after.map(|v| show(v, desired, path)),
                redacted: false,
            });
        },
    );
    if secret {
        out.extend(secret_changes(live, after));
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    if out.len() > MAX_FIELDS {
        out.truncate(MAX_FIELDS);
        *truncated = true;
    }
    out
}

/// Whether `object` is a core Secret.
pub fn is_secret(object: &Value) -> bool {
    object.get("kind").and_then(Value::as_str) == Some("Secret")
        && object.get("apiVersion").and_then(Value::as_str) == Some("v1")
}

/// A path under a Secret that holds values: its data, and an annotation that may copy them.
fn is_secret_value(path: &[Step]) -> bool {
    match path {
        [Step::Key(first), ..] if first == "data" || first == "stringData" => true,
        [Step::Key(m), Step::Key(a), ..] if m == "metadata" && a == "annotations" => true,
        _ => false,
    }
}

/// A Secret's keys that would be added, removed or changed, without their values.
fn secret_changes(live: &Value, after: &Value) -> Vec<FieldChange> {
    let data = |v: &Value| v.get("data").and_then(Value::as_object).cloned();
    let (before, now) = (
        data(live).unwrap_or_default(),
        data(after).unwrap_or_default(),
    );
    let mut keys: Vec<&String> = before.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| before.get(*k) != now.get(*k))
        .map(|k| FieldChange {
            path: render_path(&[Step::Key("data".into()), Step::Key(k.clone())]),
            before: before.get(k).map(|_| String::new()),
            after: now.get(k).map(|_| String::new()),
            redacted: true,
        })
        .collect()
}

/// `object` without what the API server keeps for itself.
fn strip(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(map) = object.as_object_mut() {
        map.remove("status");
        if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            for key in SERVER_METADATA {
                meta.remove(key);
            }
        }
    }
    object
}

/// A timestamp field, whose change says nothing about the revision.
fn is_timestamp(key: &str) -> bool {
    key.ends_with("Timestamp") || key.ends_with("Time") || key == "time"
}

/// Receives each difference: its path, the value before and the value after.
type Emit<'a> = dyn FnMut(&[Step], Option<&Value>, Option<&Value>) + 'a;

/// Calls `emit(path, before, after)` for every leaf-most difference.
fn walk(before: &Value, after: &Value, path: &mut Vec<Step>, emit: &mut Emit<'_>) {
    if before == after {
        return;
    }
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                if is_timestamp(key) {
                    continue;
                }
                path.push(Step::Key(key.clone()));
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => walk(x, y, path, emit),
                    (x, y) => emit(path, x, y),
                }
                path.pop();
            }
        }
        (Value::Array(a), Value::Array(b)) => match (named(a), named(b)) {
            (Some(x), Some(y)) => {
                let mut names: Vec<&str> = x.iter().chain(y.iter()).map(|(n, _)| *n).collect();
                names.sort_unstable();
                names.dedup();
                for name in names {
                    fn find<'v>(list: &[(&str, &'v Value)], name: &str) -> Option<&'v Value> {
                        list.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
                    }
                    path.push(Step::Named(name.to_owned()));
                    match (find(&x, name), find(&y, name)) {
                        (Some(p), Some(q)) => walk(p, q, path, emit),
                        (p, q) => emit(path, p, q),
                    }
                    path.pop();
                }
            }
            _ if a.len() == b.len() => {
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    path.push(Step::Index(i));
                    walk(x, y, path, emit);
                    path.pop();
                }
            }
            _ => emit(path, Some(before), Some(after)),
        },
        _ => emit(path, Some(before), Some(after)),
    }
}

/// The elements of `list` by name, when every one is an object with a unique `name`.
fn named(list: &[Value]) -> Option<Vec<(&str, &Value)>> {
    let named: Vec<(&str, &Value)> = list
        .iter()
        .map(|v| Some((v.get("name")?.as_str()?, v)))
        .collect::<Option<_>>()?;
    let mut names: Vec<&str> = named.iter().map(|(n, _)| *n).collect();
    names.sort_unstable();
    names.dedup();
    (names.len() == named.len() && !named.is_empty()).then_some(named)
}

/// What `path` leads to in `value`.
fn at<'a>(value: &'a Value, path: &[Step]) -> Option<&'a Value> {
    let mut here = value;
    for step in path {
        here = match step {
            Step::Key(key) => here.get(key)?,
            Step::Index(i) => here.get(i)?,
            Step::Named(name) => here
                .as_array()?
                .iter()
                .find(|v| v.get("name").and_then(Value::as_str) == Some(name))?,
        };
    }
    Some(here)
}

/// Whether the revision's body sets the field at `path` (or something under it).
fn sets(desired: &Value, path: &[Step]) -> bool {
    at(desired, path).is_some()
}

/// `value` as compact JSON, cut to [`MAX_VALUE_CHARS`]. An object the revision adds shows
/// only what the revision sets, not the defaults the API server fills in.
fn show(value: &Value, desired: &Value, path: &[Step]) -> String {
    let shown = match (value, at(desired, path)) {
        (Value::Object(_), Some(own @ Value::Object(_))) => own,
        _ => value,
    };
    let text = serde_json::to_string(shown).unwrap_or_default();
    if text.chars().count() <= MAX_VALUE_CHARS {
        return text;
    }
    let mut cut: String = text.chars().take(MAX_VALUE_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// `spec.template.spec.containers[name=web].image`; keys that are not plain words are
/// quoted: `metadata.labels["app.kubernetes.io/name"]`.
fn render_path(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(key)
                if !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Step::Key(key) => {
                out.push('[');
                out.push_str(&serde_json::to_string(key).unwrap_or_default());
                out.push(']');
            }
            Step::Named(name) => {
                out.push_str("[name=");
                out.push_str(name);
                out.push(']');
            }
            Step::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn changes(
        live: Value,
        after: Value,
        desired: Value,
    ) -> Vec<(String, Option<String>, Option<String>, bool)> {
        let mut truncated = false;
        field_changes(&live, &after, &desired, &mut truncated)
            .into_iter()
            .map(|f| (f.path, f.before, f.after, f.redacted))
            .collect()
    }

    fn deployment(image: &str, replicas: u32, extra: Value) -> Value {
        let mut d = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "apps", "labels": {"app.kubernetes.io/name": "web"}},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [
                {"name": "web", "image": image}
            ]}}},
        });
        if let (Some(d), Some(extra)) = (d.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                d.insert(k.clone(), v.clone());
            }
        }
        d
    }

    #[test]
    fn image_and_replicas_show_and_server_noise_does_not() {
        let mut live = deployment("nginx:1.25", 1, json!({}));
        live["metadata"]["resourceVersion"] = json!("41");
        live["metadata"]["managedFields"] = json!([{"manager": "greenlight"}]);
        live["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        live["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] =
            json!("/dev/termination-log");
        live["spec"]["progressDeadlineSeconds"] = json!(600);
        live["status"] = json!({"replicas": 1});
        let mut after = deployment("nginx:1.26", 3, json!({}));
        after["metadata"]["resourceVersion"] = json!("42");
        after["metadata"]["generation"] = json!(2);
        after["metadata"]["managedFields"] = json!([{"manager": "greenlight", "time": "now"}]);
        after["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] =
            json!("/dev/termination-log");
        // A default the API server recomputed: the revision does not set it.
        after["spec"]["progressDeadlineSeconds"] = json!(601);
        let desired = deployment("nginx:1.26", 3, json!({}));
        assert_eq!(
            changes(live, after, desired),
            [
                (
                    "spec.replicas".to_owned(),
                    Some("1".to_owned()),
                    Some("3".to_owned()),
                    false
                ),
                (
                    "spec.template.spec.containers[name=web].image".to_owned(),
                    Some("\"nginx:1.25\"".to_owned()),
                    Some("\"nginx:1.26\"".to_owned()),
                    false
                ),
            ]
        );
    }

    #[test]
    fn a_field_the_revision_stops_setting_shows_removed_and_keys_with_dots_are_quoted() {
        let mut live = deployment("a", 1, json!({}));
        live["metadata"]["labels"]["team.example.com/owner"] = json!("blue");
        let after = deployment("a", 1, json!({}));
        let desired = after.clone();
        assert_eq!(
            changes(live, after, desired),
            [(
                "metadata.labels[\"team.example.com/owner\"]".to_owned(),
                Some("\"blue\"".to_owned()),
                None,
                false
            )]
        );
    }

    #[test]
    fn an_added_container_shows_what_the_revision_sets_not_the_defaults() {
        let live = deployment("a", 1, json!({}));
        let mut after = deployment("a", 1, json!({}));
        after["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "proxy", "image": "envoy", "imagePullPolicy": "Always"}));
        let mut desired = deployment("a", 1, json!({}));
        desired["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "proxy", "image": "envoy"}));
        assert_eq!(
            changes(live, after, desired),
            [(
                "spec.template.spec.containers[name=proxy]".to_owned(),
                None,
                Some(r#"{"image":"envoy","name":"proxy"}"#.to_owned()),
                false
            )]
        );
    }

    #[test]
    fn a_secret_shows_key_names_only() {
        let secret = |data: Value| json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}, "data": data});
        let live = secret(json!({"password": "b2xk", "user": "YWRtaW4=", "gone": "eA=="}));
        let after = secret(json!({"password": "bmV3", "user": "YWRtaW4=", "token": "dA=="}));
        let desired = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"},
            "stringData": {"password": "new", "user": "admin", "token": "t"}});
        let shown = changes(live, after, desired);
        assert_eq!(
            shown,
            [
                ("data.gone".to_owned(), Some(String::new()), None, true),
                (
                    "data.password".to_owned(),
                    Some(String::new()),
                    Some(String::new()),
                    true
                ),
                ("data.token".to_owned(), None, Some(String::new()), true),
            ]
        );
        let text = format!("{shown:?}");
        for value in ["b2xk", "bmV3", "new", "dA==", "eA=="] {
            assert!(!text.contains(value), "{value} leaked: {text}");
        }
    }

    #[test]
    fn long_values_are_cut() {
        let live = json!({"kind": "ConfigMap", "apiVersion": "v1", "data": {"v": "a"}});
        let long = "x".repeat(500);
        let after = json!({"kind": "ConfigMap", "apiVersion": "v1", "data": {"v": long}});
        let shown = changes(live, after.clone(), after);
        let value = shown[0].2.clone().unwrap();
        assert_eq!(value.chars().count(), MAX_VALUE_CHARS);
        assert!(value.ends_with('…'));
    }
}
