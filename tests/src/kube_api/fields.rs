//! Field paths and ownership sets of server-side apply, the merge rules that go with them,
//! and the two older patch formats (JSON merge patch and JSON patch).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

/// One step of a field path: a map key, or the item of an associative list whose `name` is
/// the given string (`k:{"name":"…"}` in the real `FieldsV1` format).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Seg {
    Field(String),
    Item(String),
}

pub(crate) type Path = Vec<Seg>;
pub(crate) type FieldSet = BTreeSet<Path>;

/// A path as the real server prints it in conflict messages:
/// `.spec.template.spec.containers[name="app"].image`.
pub(crate) fn display(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Field(name) => {
                out.push('.');
                out.push_str(name);
            }
            Seg::Item(name) => {
                out.push_str("[name=");
                out.push_str(&Value::String(name.clone()).to_string());
                out.push(']');
            }
        }
    }
    out
}

fn item_name(item: &Value) -> Option<&str> {
    item.get("name").and_then(Value::as_str)
}

/// Whether a list is merged item by item: every item is an object with a distinct string
/// `name`. Built-in lists with such items (containers, env, volumes, ports…) are
/// associative lists keyed on `name` in the real schemas; anything else is atomic.
fn is_keyed(items: &[Value]) -> bool {
    let mut names = BTreeSet::new();
    !items.is_empty()
        && items
            .iter()
            .all(|item| item_name(item).is_some_and(|name| names.insert(name)))
}

/// The leaf paths of `value` (an object), plus one path per item of each keyed list.
/// Empty maps and atomic lists are leaves.
pub(crate) fn field_set(value: &Value, keyed: bool) -> FieldSet {
    let mut out = FieldSet::new();
    if let Value::Object(map) = value {
        let mut path = Vec::new();
        collect_map(map, keyed, &mut path, &mut out);
    }
    out
}

fn collect_map(map: &Map<String, Value>, keyed: bool, path: &mut Path, out: &mut FieldSet) {
    for (key, value) in map {
        path.push(Seg::Field(key.clone()));
        collect(value, keyed, path, out);
        path.pop();
    }
}

fn collect(value: &Value, keyed: bool, path: &mut Path, out: &mut FieldSet) {
    match value {
        Value::Object(map) if !map.is_empty() => collect_map(map, keyed, path, out),
        Value::Array(items) if keyed && is_keyed(items) => {
            for item in items {
                let (Some(name), Value::Object(map)) = (item_name(item), item) else {
                    continue;
                };
                path.push(Seg::Item(name.to_owned()));
                out.insert(path.clone());
                collect_map(map, keyed, path, out);
                path.pop();
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at `path`, if present.
pub(crate) fn value_at<'a>(value: &'a Value, path: &[Seg]) -> Option<&'a Value> {
    let mut current = value;
    for seg in path {
        current = match seg {
            Seg::Field(name) => current.as_object()?.get(name)?,
            Seg::Item(name) => current
                .as_array()?
                .iter()
                .find(|item| item_name(item) == Some(name))?,
        };
    }
    Some(current)
}

fn value_at_mut<'a>(value: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    let mut current = value;
    for seg in path {
        current = match seg {
            Seg::Field(name) => current.as_object_mut()?.get_mut(name)?,
            Seg::Item(name) => current
                .as_array_mut()?
                .iter_mut()
                .find(|item| item_name(item) == Some(name))?,
        };
    }
    Some(current)
}

/// Removes the field or list item at `path`; false when there was none.
pub(crate) fn remove_at(value: &mut Value, path: &[Seg]) -> bool {
    let Some((last, parent)) = path.split_last() else {
        return false;
    };
    let Some(parent) = value_at_mut(value, parent) else {
        return false;
    };
    match last {
        Seg::Field(name) => parent
            .as_object_mut()
            .and_then(|map| map.remove(name))
            .is_some(),
        Seg::Item(name) => match parent.as_array_mut() {
            Some(items) => {
                let before = items.len();
                items.retain(|item| item_name(item) != Some(name));
                items.len() != before
            }
            None => false,
        },
    }
}

/// After `removed` was taken out, drops the maps and lists it left empty, up to the first
/// ancestor that is not empty or that some manager owns as a whole.
pub(crate) fn prune_emptied(value: &mut Value, removed: &[Seg], owned: &FieldSet) {
    let mut end = removed.len().saturating_sub(1);
    while end > 0 {
        let ancestor = &removed[..end];
        if !matches!(ancestor.last(), Some(Seg::Field(_))) || owned.contains(ancestor) {
            return;
        }
        let empty = match value_at(value, ancestor) {
            Some(Value::Object(map)) => map.is_empty(),
            Some(Value::Array(items)) => items.is_empty(),
            _ => false,
        };
        if !empty {
            return;
        }
        remove_at(value, ancestor);
        end -= 1;
    }
}

/// Merges an applied configuration into the live object: maps key by key, keyed lists item
/// by item (in the applied order, then the live-only items), anything else replaced.
pub(crate) fn merge_applied(live: &mut Value, applied: &Value, keyed: bool) {
    match (&mut *live, applied) {
        (Value::Object(live_map), Value::Object(applied_map)) => {
            for (key, applied_value) in applied_map {
                match live_map.get_mut(key) {
                    Some(live_value) => merge_applied(live_value, applied_value, keyed),
                    None => {
                        live_map.insert(key.clone(), applied_value.clone());
                    }
                }
            }
        }
        (Value::Array(live_items), Value::Array(applied_items))
            if keyed && is_keyed(live_items) && is_keyed(applied_items) =>
        {
            let mut rest = std::mem::take(live_items);
            let mut merged = Vec::with_capacity(applied_items.len() + rest.len());
            for applied_item in applied_items {
                let position = rest
                    .iter()
                    .position(|item| item_name(item) == item_name(applied_item));
                match position {
                    Some(position) => {
                        let mut item = rest.remove(position);
                        merge_applied(&mut item, applied_item, keyed);
                        merged.push(item);
                    }
                    None => merged.push(applied_item.clone()),
                }
            }
            merged.extend(rest);
            *live_items = merged;
        }
        _ => *live = applied.clone(),
    }
}

/// Drops `null` members: in an applied configuration they mean "not specified".
pub(crate) fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, member| !member.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

#[derive(Default)]
struct Trie {
    member: bool,
    children: BTreeMap<String, Trie>,
}

impl Trie {
    fn render(&self) -> Value {
        let mut map = Map::new();
        if self.member && !self.children.is_empty() {
            map.insert(".".into(), Value::Object(Map::new()));
        }
        for (key, child) in &self.children {
            map.insert(key.clone(), child.render());
        }
        Value::Object(map)
    }
}

/// A field set in the real `FieldsV1` format: `{"f:spec":{"f:replicas":{}}}`, keyed list
/// items as `k:{"name":"app"}`, and `".": {}` where an item is owned along with its fields.
pub(crate) fn fields_v1(set: &FieldSet) -> Value {
    let mut root = Trie::default();
    for path in set {
        let mut node = &mut root;
        for seg in path {
            let key = match seg {
                Seg::Field(name) => format!("f:{name}"),
                Seg::Item(name) => {
                    format!("k:{{\"name\":{}}}", Value::String(name.clone()))
                }
            };
            node = node.children.entry(key).or_default();
        }
        node.member = true;
    }
    root.render()
}

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target_map) = target {
        for (key, patch_value) in patch_map {
            if patch_value.is_null() {
                target_map.remove(key);
            } else {
                let member = target_map.entry(key.clone()).or_insert(Value::Null);
                merge_patch(member, patch_value);
            }
        }
    }
}

/// RFC 6902 JSON patch; the error says which operation failed and why.
pub(crate) fn json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let operations = patch
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    for operation in operations {
        let op = operation
            .get("op")
            .and_then(Value::as_str)
            .ok_or("an operation has no \"op\"")?;
        let path = operation
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("operation {op} has no \"path\""))?;
        let value = || {
            operation
                .get("value")
                .cloned()
                .ok_or_else(|| format!("operation {op} {path} has no \"value\""))
        };
        let from = || {
            operation
                .get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("operation {op} {path} has no \"from\""))
        };
        match op {
            "add" => pointer_add(target, path, value()?)?,
            "remove" => {
                pointer_remove(target, path)?;
            }
            "replace" => {
                pointer_remove(target, path)?;
                pointer_add(target, path, value()?)?;
            }
            "move" => {
                let moved = pointer_remove(target, from()?)?;
                pointer_add(target, path, moved)?;
            }
            "copy" => {
                let source = from()?;
                let copied = target
                    .pointer(source)
                    .cloned()
                    .ok_or_else(|| format!("copy: {source} does not exist"))?;
                pointer_add(target, path, copied)?;
            }
            "test" => {
                if target.pointer(path) != Some(&value()?) {
                    return Err(format!("test operation for path {path} failed"));
                }
            }
            other => return Err(format!("unknown JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

fn split_pointer(path: &str) -> Result<(String, String), String> {
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or_else(|| format!("{path:?} is not a JSON pointer"))?;
    Ok((
        parent.to_owned(),
        last.replace("~1", "/").replace("~0", "~"),
    ))
}

fn pointer_add(target: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *target = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match target.pointer_mut(&parent) {
        Some(Value::Object(map)) => {
            map.insert(last, value);
            Ok(())
        }
        Some(Value::Array(items)) => {
            let index = if last == "-" {
                items.len()
            } else {
                last.parse::<usize>()
                    .ok()
                    .filter(|index| *index <= items.len())
                    .ok_or_else(|| format!("add: index {last:?} is out of range at {path}"))?
            };
            items.insert(index, value);
            Ok(())
        }
        _ => Err(format!("add: the parent of {path} does not exist")),
    }
}

fn pointer_remove(target: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    let missing = || format!("remove: {path} does not exist");
    match target.pointer_mut(&parent) {
        Some(Value::Object(map)) => map.remove(&last).ok_or_else(missing),
        Some(Value::Array(items)) => {
            let index = last
                .parse::<usize>()
                .ok()
                .filter(|index| *index < items.len())
                .ok_or_else(missing)?;
            Ok(items.remove(index))
        }
        _ => Err(missing()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keyed_lists_give_item_paths_and_fields_v1() {
        let value = json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "app", "image": "a:1"}], "args": ["x"], "empty": {}}
        });
        let set = field_set(&value, true);
        let shown: Vec<String> = set.iter().map(|path| display(path)).collect();
        assert_eq!(
            shown,
            [
                ".metadata.labels.app",
                ".spec.args",
                ".spec.containers[name=\"app\"]",
                ".spec.containers[name=\"app\"].image",
                ".spec.containers[name=\"app\"].name",
                ".spec.empty",
            ]
        );
        assert_eq!(
            fields_v1(&set),
            json!({
                "f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {
                    "f:args": {},
                    "f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:image": {}, "f:name": {}}},
                    "f:empty": {}
                }
            })
        );
        assert_eq!(field_set(&value, false).len(), 4);
    }

    #[test]
    fn merge_keeps_live_only_items_after_applied_ones() {
        let mut live = json!({"c": [{"name": "a", "x": 1}, {"name": "b"}]});
        merge_applied(
            &mut live,
            &json!({"c": [{"name": "z"}, {"name": "a", "y": 2}]}),
            true,
        );
        assert_eq!(
            live,
            json!({"c": [{"name": "z"}, {"name": "a", "x": 1, "y": 2}, {"name": "b"}]})
        );
    }

    #[test]
    fn removal_prunes_emptied_parents() {
        let mut value =
            json!({"metadata": {"name": "x", "labels": {"a": "1"}}, "data": {"k": "v"}});
        let path = vec![Seg::Field("data".into()), Seg::Field("k".into())];
        assert!(remove_at(&mut value, &path));
        prune_emptied(&mut value, &path, &FieldSet::new());
        assert_eq!(
            value,
            json!({"metadata": {"name": "x", "labels": {"a": "1"}}})
        );
    }

    #[test]
    fn patches() {
        let mut value = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut value, &json!({"a": {"b": null, "d": 3}}));
        assert_eq!(value, json!({"a": {"c": 2, "d": 3}, "l": [1, 2]}));
        json_patch(
            &mut value,
            &json!([
                {"op": "add", "path": "/l/-", "value": 3},
                {"op": "replace", "path": "/a/c", "value": 5},
                {"op": "move", "from": "/a/d", "path": "/e"},
                {"op": "test", "path": "/e", "value": 3}
            ]),
        )
        .unwrap();
        assert_eq!(value, json!({"a": {"c": 5}, "l": [1, 2, 3], "e": 3}));
        assert!(json_patch(&mut value, &json!([{"op": "remove", "path": "/nope"}])).is_err());
    }
}
