//! Parsing a revision's files into Kubernetes objects, all validated before the first write.

use std::collections::BTreeMap;

use serde_json::Value;

/// Where an object came from, for error messages and reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    /// Zero-based index of the document in the file, counting non-empty documents.
    pub document: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} document {}", self.file, self.document)
    }
}

/// One object from the manifests, not yet resolved against the API server.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    /// As written; the agent fills in its default for namespaced kinds.
    pub namespace: Option<String>,
    pub body: Value,
    pub origin: Origin,
}

impl Manifest {
    /// The API group (empty for the core group).
    pub fn group(&self) -> &str {
        split_api_version(&self.api_version).0
    }

    /// The version part of `apiVersion`.
    pub fn version(&self) -> &str {
        split_api_version(&self.api_version).1
    }
}

/// `(group, version)` of an `apiVersion`; the core group is empty.
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    api_version.rsplit_once('/').unwrap_or(("", api_version))
}

/// A document that cannot be applied; names the file, the document and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file} document {document}: {reason}")]
pub struct ParseError {
    pub file: String,
    pub document: usize,
    pub reason: String,
}

/// The most values (mappings, sequences and scalars, aliases counted as expanded) one
/// revision may parse into. The parser's own limits hold per file, so without a total a
/// revision of many files each just within them (YAML aliases make a few KB expand a
/// thousandfold) could exhaust the agent's memory; a million values is some 20,000 ordinary
/// objects.
pub const MAX_REVISION_VALUES: usize = 1_000_000;

/// The most documents one revision may hold, across all its files.
pub const MAX_REVISION_DOCUMENTS: usize = 10_000;

/// Parses every file (multi-document YAML, or JSON for `.json`). Empty documents are
/// skipped; `kind: List` documents contribute their items. The whole revision is held to
/// [`MAX_REVISION_VALUES`] and [`MAX_REVISION_DOCUMENTS`].
pub fn parse(files: &[(String, Vec<u8>)]) -> Result<Vec<Manifest>, ParseError> {
    let mut manifests = Vec::new();
    let mut seen: BTreeMap<(String, String, Option<String>, String), Origin> = BTreeMap::new();
    let mut values_left = MAX_REVISION_VALUES;
    let mut documents_left = MAX_REVISION_DOCUMENTS;
    for (file, content) in files {
        let fail = |document: usize, reason: String| ParseError {
            file: file.clone(),
            document,
            reason,
        };
        let text = std::str::from_utf8(content).map_err(|e| fail(0, format!("not UTF-8: {e}")))?;
        let documents: Vec<Value> = if file.ends_with(".json") {
            vec![serde_json::from_str(text).map_err(|e| fail(0, format!("invalid JSON: {e}")))?]
        } else {
            serde_saphyr::from_multiple_with_options(text, yaml_options(values_left)).map_err(
                |e| {
                    let share = if values_left < MAX_REVISION_VALUES {
                        format!(
                            " (this file's share of the revision's {MAX_REVISION_VALUES} values \
                             was {values_left}: the files before it hold the rest)"
                        )
                    } else {
                        String::new()
                    };
                    fail(0, format!("invalid YAML: {e}{share}"))
                },
            )?
        };
        let over_budget = |what: &str, limit: usize| {
            fail(
                0,
                format!(
                    "the revision holds more than {limit} {what} in all (this file takes it past \
                     the limit); split it across agents or reduce it"
                ),
            )
        };
        documents_left = documents_left
            .checked_sub(documents.len())
            .ok_or_else(|| over_budget("documents", MAX_REVISION_DOCUMENTS))?;
        let values: usize = documents.iter().map(count_values).sum();
        values_left = values_left
            .checked_sub(values)
            .ok_or_else(|| over_budget("values", MAX_REVISION_VALUES))?;
        for (index, document) in documents.into_iter().enumerate() {
            let origin = Origin {
                file: file.clone(),
                document: index,
            };
            let items = match document {
                Value::Null => continue,
                Value::Object(ref map)
                    if map.get("kind").and_then(Value::as_str) == Some("List") =>
                {
                    match map.get("items") {
                        Some(Value::Array(items)) => items.clone(),
                        _ => return Err(fail(index, "a List needs an `items` array".into())),
                    }
                }
                other => vec![other],
            };
            for item in items {
                let manifest =
                    validate(item, origin.clone()).map_err(|reason| fail(index, reason))?;
                // Only manifests spelled alike are caught here: whether two spelled apart name
                // one object depends on the kind's scope and the default namespace, which
                // `plan::duplicates` checks once they are known.
                let identity = (
                    manifest.group().to_owned(),
                    manifest.kind.clone(),
                    manifest.namespace.clone(),
                    manifest.name.clone(),
                );
                if let Some(first) = seen.insert(identity, origin.clone()) {
                    return Err(fail(
                        index,
                        format!(
                            "{} {} is also defined in {} document {}",
                            manifest.kind, manifest.name, first.file, first.document
                        ),
                    ));
                }
                manifests.push(manifest);
            }
        }
    }
    Ok(manifests)
}

/// Parser limits for one file: its share is whatever the revision has left, and never more
/// than the parser's own defaults.
fn yaml_options(values_left: usize) -> serde_saphyr::Options {
    // A value costs at least one parser event; the slack covers document and collection ends.
    let events = values_left.saturating_mul(2).saturating_add(64);
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = budget.max_events.min(events);
    budget.max_recorded_anchor_events = budget.max_recorded_anchor_events.min(events);
    budget.max_nodes = budget.max_nodes.min(values_left.saturating_add(1));
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// How many values `value` holds, itself included.
fn count_values(value: &Value) -> usize {
    let mut count = 0;
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        count += 1;
        match value {
            Value::Array(items) => pending.extend(items),
            Value::Object(map) => pending.extend(map.values()),
            _ => {}
        }
    }
    count
}

fn validate(value: Value, origin: Origin) -> Result<Manifest, String> {
    let Value::Object(map) = &value else {
        return Err("a Kubernetes object must be a mapping".into());
    };
    let text = |field: &str| {
        map.get(field)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let api_version = text("apiVersion").ok_or("missing apiVersion")?.to_owned();
    let kind = text("kind").ok_or("missing kind")?.to_owned();
    let metadata = map
        .get("metadata")
        .and_then(Value::as_object)
        .ok_or("missing metadata")?;
    let name = metadata
        .get("name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("missing metadata.name (generateName is not supported: objects need a stable name)")?
        .to_owned();
    // RBAC objects may be named with any characters that fit in a URL's path segment
    // (`system:controller:…`), as the API server validates them; the others are DNS names.
    let rbac = matches!(
        kind.as_str(),
        "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
    );
    let valid = if rbac {
        is_path_segment_name(&name)
    } else {
        is_dns_subdomain(&name)
    };
    if !valid {
        return Err(format!(
            "metadata.name {name:?} is not a valid Kubernetes name"
        ));
    }
    let namespace = match metadata.get("namespace") {
        None | Some(Value::Null) => None,
        Some(Value::String(ns)) if is_dns_label(ns) => Some(ns.clone()),
        Some(other) => {
            return Err(format!(
                "metadata.namespace {other} is not a valid namespace name"
            ));
        }
    };
    if api_version.split('/').count() > 2 {
        return Err(format!("apiVersion {api_version:?} is not group/version"));
    }
    Ok(Manifest {
        api_version,
        kind,
        name,
        namespace,
        body: value,
        origin,
    })
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name
            .split('.')
            .all(|part| !part.is_empty() && part.len() <= 63 && label_chars(part))
}

/// A name the API server takes as one path segment of its URL: the client does not escape
/// it, so `..` or a `/` would name another resource.
fn is_path_segment_name(name: &str) -> bool {
    name != "." && name != ".." && !name.contains(['/', '%'])
}

fn is_dns_label(name: &str) -> bool {
    name.len() <= 63 && !name.is_empty() && label_chars(name)
}

fn label_chars(part: &str) -> bool {
    let bytes = part.as_bytes();
    bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, content: &str) -> (String, Vec<u8>) {
        (name.to_owned(), content.as_bytes().to_vec())
    }

    #[test]
    fn multi_document_yaml_and_json_parse() {
        let files = [
            file(
                "a.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: one}\n---\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: prod}\n",
            ),
            file(
                "b.json",
                r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Service","metadata":{"name":"svc"}}]}"#,
            ),
        ];
        let manifests = parse(&files).unwrap();
        let names: Vec<_> = manifests
            .iter()
            .map(|m| (m.kind.as_str(), m.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("ConfigMap", "one"),
                ("Deployment", "web"),
                ("Service", "svc")
            ]
        );
        assert_eq!(manifests[1].group(), "apps");
        assert_eq!(manifests[1].version(), "v1");
        assert_eq!(
            manifests[1].origin.document, 1,
            "empty documents are not counted"
        );
        assert_eq!(manifests[0].group(), "");
    }

    #[test]
    fn invalid_documents_name_file_document_and_reason() {
        let files = [
            file(
                "ok.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: one}\n",
            ),
            file(
                "bad.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: two}\n---\nkind: Secret\nmetadata: {name: x}\n",
            ),
        ];
        let err = parse(&files).unwrap_err();
        assert_eq!((err.file.as_str(), err.document), ("bad.yaml", 1));
        assert!(err.reason.contains("apiVersion"), "{err}");

        let err = parse(&[file("broken.yaml", "a: [unclosed\n")]).unwrap_err();
        assert!(err.reason.contains("invalid YAML"), "{err}");
        let err = parse(&[file(
            "x.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: Not_Valid}\n",
        )])
        .unwrap_err();
        assert!(err.reason.contains("Not_Valid"), "{err}");
        let err = parse(&[file("x.yaml", "- just\n- a list\n")]).unwrap_err();
        assert!(err.reason.contains("mapping"), "{err}");
    }

    #[test]
    fn rbac_names_may_hold_colons_but_never_leave_their_path_segment() {
        let role = |name: &str| {
            let doc = format!(
                "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: {name:?}}}\n"
            );
            parse(&[file("role.yaml", &doc)])
        };
        assert!(role("system:controller:greenlight").is_ok());
        for name in ["..", ".", "../../namespaces/kube-system", "a/b", "a%2Fb"] {
            let err = role(name).unwrap_err();
            assert!(
                err.reason.contains("not a valid Kubernetes name"),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn the_same_object_twice_is_refused() {
        let doc = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: one}\n";
        let err = parse(&[file("a.yaml", doc), file("b.yaml", doc)]).unwrap_err();
        assert!(err.reason.contains("a.yaml document 0"), "{err}");
    }

    /// A ConfigMap whose data expands, through aliases, to about `width`⁴ values from a few
    /// hundred bytes: each level repeats the one below `width` times.
    fn alias_bomb(name: &str, width: usize) -> String {
        let repeat = |anchor: &str| vec![format!("*{anchor}"); width].join(", ");
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\nx:\n  a: &a [{}]\n  b: &b [{}]\n  c: &c [{}]\n  d: [{}]\n",
            vec!["v"; width].join(", "),
            repeat("a"),
            repeat("b"),
            repeat("c"),
        )
    }

    #[test]
    fn a_revision_is_bounded_in_all_not_only_per_file() {
        // Each file alone stays well within the limit (~160,000 values)…
        let one = alias_bomb("bomb-0", 20);
        assert!(one.len() < 1_000, "a few hundred bytes: {}", one.len());
        let parsed = parse(&[file("bomb-0.yaml", &one)]).unwrap();
        assert_eq!(parsed.len(), 1);
        // …but twenty of them would hold over three million.
        let files: Vec<_> = (0..20)
            .map(|n| {
                file(
                    &format!("bomb-{n}.yaml"),
                    &alias_bomb(&format!("bomb-{n}"), 20),
                )
            })
            .collect();
        let err = parse(&files).unwrap_err();
        assert!(err.reason.contains("1000000 values"), "{err}");
        assert!(err.file.starts_with("bomb-"), "names the file: {err}");
    }

    #[test]
    fn one_file_expanding_past_the_revision_budget_is_refused_by_the_parser() {
        let err = parse(&[file("bomb.yaml", &alias_bomb("bomb", 40))]).unwrap_err();
        assert!(err.reason.contains("budget breached"), "{err}");
    }

    #[test]
    fn a_flood_of_documents_is_refused_across_files() {
        let files: Vec<_> = (0..20)
            .map(|n| {
                let documents: String = (0..600)
                    .map(|i| {
                        format!(
                            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c{n}-{i}}}\n"
                        )
                    })
                    .collect();
                file(&format!("f{n}.yaml"), &documents)
            })
            .collect();
        let err = parse(&files).unwrap_err();
        assert!(
            err.reason.contains("more than 10000 documents in all"),
            "{err}"
        );
    }

    use proptest::prelude::*;

    /// A valid object name: DNS labels joined by dots.
    fn name() -> impl Strategy<Value = String> {
        prop::collection::vec("[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", 1..4).prop_map(|l| l.join("."))
    }

    /// How a ConfigMap is written down.
    #[derive(Debug, Clone, Copy)]
    enum Spelling {
        /// Block YAML, one document each.
        Yaml,
        /// Flow YAML, quoted.
        Flow,
        /// One JSON file each.
        Json,
        /// All in one `kind: List`.
        List,
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_manifest_parser(
            files in prop::collection::vec(
                (
                    prop::sample::select(vec!["a.yaml", "b.yml", "c.json", "d"]),
                    prop::collection::vec(any::<u8>(), 0..256),
                ),
                0..4,
            ),
        ) {
            let files: Vec<(String, Vec<u8>)> =
                files.into_iter().map(|(name, content)| (name.to_owned(), content)).collect();
            let _ = parse(&files);
        }

        #[test]
        fn arbitrary_yaml_like_text_never_panics_the_manifest_parser(
            text in "([-:{}\\[\\],&*!|>'\"#? \n]|apiVersion|kind|List|items|metadata|name|namespace|v1|[a-z0-9]{1,3}|---\n|  ){0,64}",
            json in any::<bool>(),
        ) {
            let file = if json { "x.json" } else { "x.yaml" };
            let _ = parse(&[(file.to_owned(), text.into_bytes())]);
        }

        #[test]
        fn generated_config_maps_parse_back_to_their_names_and_namespaces(
            objects in prop::collection::btree_set((name(), prop::option::of("[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?")), 1..12),
            spelling in prop::sample::select(vec![Spelling::Yaml, Spelling::Flow, Spelling::Json, Spelling::List]),
        ) {
            let objects: Vec<(String, Option<String>)> = objects.into_iter().collect();
            let json_of = |(name, namespace): &(String, Option<String>)| {
                let mut metadata = serde_json::json!({ "name": name });
                if let Some(namespace) = namespace {
                    metadata["namespace"] = serde_json::json!(namespace);
                }
                serde_json::json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": { "k": name } })
            };
            let files: Vec<(String, Vec<u8>)> = match spelling {
                Spelling::Yaml => {
                    let text: String = objects
                        .iter()
                        .map(|(name, namespace)| {
                            let namespace = namespace.as_ref().map(|ns| format!("  namespace: \"{ns}\"\n")).unwrap_or_default();
                            format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: \"{name}\"\n{namespace}data:\n  k: \"{name}\"\n")
                        })
                        .collect();
                    vec![file("all.yaml", &text)]
                }
                Spelling::Flow => {
                    let text = objects
                        .iter()
                        .map(|object| json_of(object).to_string())
                        .collect::<Vec<_>>()
                        .join("\n---\n");
                    vec![file("all.yml", &text)]
                }
                Spelling::Json => objects
                    .iter()
                    .enumerate()
                    .map(|(n, object)| file(&format!("{n}.json"), &json_of(object).to_string()))
                    .collect(),
                Spelling::List => {
                    let items: Vec<_> = objects.iter().map(json_of).collect();
                    let list = serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items });
                    vec![file("list.json", &list.to_string())]
                }
            };
            let manifests = parse(&files).unwrap();
            let parsed: Vec<(String, Option<String>)> = manifests
                .iter()
                .map(|m| (m.name.clone(), m.namespace.clone()))
                .collect();
            prop_assert_eq!(parsed, objects.clone());
            for (manifest, object) in manifests.iter().zip(&objects) {
                prop_assert_eq!((manifest.kind.as_str(), manifest.group(), manifest.version()), ("ConfigMap", "", "v1"));
                prop_assert_eq!(&manifest.body, &json_of(object));
            }
        }
    }
}
