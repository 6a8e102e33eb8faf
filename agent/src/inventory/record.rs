//! The inventory as its ConfigMap holds it: each distinct kind once, then each object as the
//! index of its kind and its name. An entry costs little more than its name, so a ConfigMap
//! (1 MiB) holds tens of thousands of objects rather than the seven thousand that entries
//! written out in full fitted.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::plan::{InventoryEntry, ObjectKey};

/// The data key of this format.
pub const OBJECTS_KEY: &str = "objects";
/// The data key of the format before it, each entry in full: still read.
pub const LEGACY_KEY: &str = "entries";
/// The most the record may take: a ConfigMap's data holds 1 MiB in all, and the revision
/// and the object's metadata need some of it.
pub const MAX_BYTES: usize = 1_000_000;

/// Why an inventory cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("the inventory is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the inventory's object {object} names kind {kind}, of {kinds} listed")]
    UnknownKind {
        object: usize,
        kind: usize,
        kinds: usize,
    },
    #[error("the inventory marks object {at} {mark}, of {listed} listed")]
    UnknownMarked {
        mark: &'static str,
        at: usize,
        listed: usize,
    },
    #[error(
        "the inventory of {objects} objects takes {bytes} bytes, more than its ConfigMap holds \
         ({MAX_BYTES}); split the agent's manifests between agents"
    )]
    TooLarge { objects: usize, bytes: usize },
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    kinds: Vec<Kind>,
    /// The index of its kind in `kinds`, and its name.
    objects: Vec<(usize, String)>,
    /// Indexes in `objects` of the adopted ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    adopted: Vec<usize>,
    /// Indexes in `objects` of the ones kept from an earlier revision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    kept: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct Kind {
    api_version: String,
    group: String,
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    namespaced: bool,
}

/// `entries` as the ConfigMap holds them, in their order.
pub fn encode(entries: &[InventoryEntry]) -> Result<String, RecordError> {
    let mut known: HashMap<Kind, usize> = HashMap::new();
    let mut record = Record {
        kinds: Vec::new(),
        objects: Vec::with_capacity(entries.len()),
        adopted: Vec::new(),
        kept: Vec::new(),
    };
    for (at, entry) in entries.iter().enumerate() {
        let kind = Kind {
            api_version: entry.api_version.clone(),
            group: entry.key.group.clone(),
            kind: entry.key.kind.clone(),
            namespace: entry.key.namespace.clone(),
            namespaced: entry.namespaced,
        };
        let next = record.kinds.len();
        let index = *known.entry(kind.clone()).or_insert(next);
        if index == next {
            record.kinds.push(kind);
        }
        record.objects.push((index, entry.key.name.clone()));
        if entry.adopted {
            record.adopted.push(at);
        }
        if entry.kept {
            record.kept.push(at);
        }
    }
    let text = serde_json::to_string(&record)?;
    if text.len() > MAX_BYTES {
        return Err(RecordError::TooLarge {
            objects: entries.len(),
            bytes: text.len(),
        });
    }
    Ok(text)
}

/// The entries [`encode`] wrote, in their order.
pub fn decode(text: &str) -> Result<Vec<InventoryEntry>, RecordError> {
    let record: Record = serde_json::from_str(text)?;
    let mut entries = Vec::with_capacity(record.objects.len());
    for (object, (index, name)) in record.objects.into_iter().enumerate() {
        let kind = record.kinds.get(index).ok_or(RecordError::UnknownKind {
            object,
            kind: index,
            kinds: record.kinds.len(),
        })?;
        entries.push(InventoryEntry {
            key: ObjectKey {
                group: kind.group.clone(),
                kind: kind.kind.clone(),
                namespace: kind.namespace.clone(),
                name,
            },
            api_version: kind.api_version.clone(),
            namespaced: kind.namespaced,
            adopted: false,
            kept: false,
        });
    }
    for at in record.adopted {
        marked(&mut entries, "adopted", at)?.adopted = true;
    }
    for at in record.kept {
        marked(&mut entries, "kept", at)?.kept = true;
    }
    Ok(entries)
}

/// The entry at `at` that the record marks `mark`.
fn marked<'a>(
    entries: &'a mut [InventoryEntry],
    mark: &'static str,
    at: usize,
) -> Result<&'a mut InventoryEntry, RecordError> {
    let listed = entries.len();
    entries
        .get_mut(at)
        .ok_or(RecordError::UnknownMarked { mark, at, listed })
}

/// Entries as the format before this one wrote them.
pub fn decode_legacy(text: &str) -> Result<Vec<InventoryEntry>, RecordError> {
    Ok(serde_json::from_str(text)?)
}

/// The ConfigMap's data for `entries`, by key: the compact record, and, while both fit,
/// the entries in the earlier format too, so that an agent rolled back to a version before
/// this one still finds what it applied (an inventory too large for both could not have
/// been written by that version anyway).
pub fn data_for(entries: &[InventoryEntry]) -> Result<Vec<(&'static str, String)>, RecordError> {
    let compact = encode(entries)?;
    let legacy = serde_json::to_string(entries)?;
    let mut data = vec![(OBJECTS_KEY, compact)];
    if data[0].1.len() + legacy.len() <= MAX_BYTES {
        data.push((LEGACY_KEY, legacy));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn entry(
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        adopted: bool,
    ) -> InventoryEntry {
        InventoryEntry {
            key: ObjectKey {
                group: crate::manifest::split_api_version(api_version).0.into(),
                kind: kind.into(),
                namespace: namespace.map(str::to_owned),
                name: name.into(),
            },
            api_version: api_version.into(),
            namespaced: namespace.is_some(),
            adopted,
            kept: false,
        }
    }

    #[test]
    fn each_kind_is_written_once_and_each_object_as_little_more_than_its_name() {
        let entries: Vec<InventoryEntry> = (0..1000)
            .map(|n| {
                entry(
                    "apps/v1",
                    "Deployment",
                    Some("apps"),
                    &format!("web-{n:04}"),
                    n == 7,
                )
            })
            .chain([entry("v1", "Namespace", None, "apps", false)])
            .collect();
        let text = encode(&entries).unwrap();
        assert_eq!(text.matches("Deployment").count(), 1, "{}", &text[..200]);
        assert!(text.len() < 1001 * 16, "{} bytes", text.len());
        assert_eq!(decode(&text).unwrap(), entries);
        // What the format before wrote for the same entries: about six times as much.
        let legacy = serde_json::to_string(&entries).unwrap();
        assert!(
            legacy.len() > 6 * text.len(),
            "{} vs {}",
            legacy.len(),
            text.len()
        );
        assert_eq!(decode_legacy(&legacy).unwrap(), entries);
    }

    #[test]
    fn an_inventory_too_large_for_its_configmap_says_so_and_what_to_do() {
        let entries: Vec<InventoryEntry> = (0..20_000)
            .map(|n| {
                let name = format!("{n:05}-{}", "x".repeat(60));
                entry("v1", "ConfigMap", Some("apps"), &name, false)
            })
            .collect();
        let error = encode(&entries).unwrap_err();
        assert!(matches!(
            error,
            RecordError::TooLarge {
                objects: 20_000,
                ..
            }
        ));
        assert!(error.to_string().contains("split"), "{error}");
    }

    #[test]
    fn the_earlier_format_is_written_alongside_while_both_fit() {
        let few = vec![entry("v1", "ConfigMap", Some("apps"), "a", true)];
        let data = data_for(&few).unwrap();
        let keys: Vec<&str> = data.iter().map(|(key, _)| *key).collect();
        assert_eq!(keys, [OBJECTS_KEY, LEGACY_KEY]);
        assert_eq!(decode_legacy(&data[1].1).unwrap(), few);
        let many: Vec<InventoryEntry> = (0..8_000)
            .map(|n| {
                entry(
                    "v1",
                    "ConfigMap",
                    Some("apps"),
                    &format!("{n:05}-{}", "x".repeat(40)),
                    false,
                )
            })
            .collect();
        let data = data_for(&many).unwrap();
        let keys: Vec<&str> = data.iter().map(|(key, _)| *key).collect();
        assert_eq!(keys, [OBJECTS_KEY], "the compact record alone");
        assert_eq!(decode(&data[0].1).unwrap(), many);
    }

    #[test]
    fn a_damaged_record_is_an_error_not_a_panic() {
        for (text, says) in [
            ("{", "not valid JSON"),
            (
                r#"{"kinds": [], "objects": [[0, "a"]]}"#,
                "names kind 0, of 0",
            ),
            (
                r#"{"kinds": [{"api_version": "v1", "group": "", "kind": "ConfigMap", "namespaced": false}], "objects": [[0, "a"]], "adopted": [3]}"#,
                "object 3 adopted, of 1",
            ),
            (
                r#"{"kinds": [{"api_version": "v1", "group": "", "kind": "ConfigMap", "namespaced": false}], "objects": [[0, "a"]], "kept": [1]}"#,
                "object 1 kept, of 1",
            ),
        ] {
            let error = decode(text).unwrap_err().to_string();
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    fn any_entry() -> impl Strategy<Value = InventoryEntry> {
        (
            prop::sample::select(vec!["v1", "apps/v1", "example.com/v2"]),
            prop::sample::select(vec!["ConfigMap", "Deployment", "Widget"]),
            prop::option::of(prop::sample::select(vec!["apps", "team-a"])),
            "[a-z0-9.-]{1,20}",
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(api_version, kind, namespace, name, adopted, kept)| {
                InventoryEntry {
                    kept,
                    ..entry(api_version, kind, namespace, &name, adopted)
                }
            })
    }

    proptest! {
        /// Whatever the agent records reads back exactly, in its order: the reconcile
        /// compares what it read with what it would write, and writes only a change.
        #[test]
        fn entries_read_back_exactly_as_written(entries in prop::collection::vec(any_entry(), 0..60)) {
            let text = encode(&entries).unwrap();
            prop_assert_eq!(decode(&text).unwrap(), entries);
        }

        #[test]
        fn any_text_is_read_or_refused(text in "\\PC{0,200}") {
            let _ = decode(&text);
        }
    }
}
