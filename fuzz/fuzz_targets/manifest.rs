//! A revision's files through the agent's manifest parser. Files are separated by NUL bytes
//! (which neither YAML nor JSON allows); a file whose first byte is `j` is `.json` (the rest
//! is its content), any other file is YAML.
#![no_main]

use std::collections::BTreeSet;

use greenlight_agent::manifest::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let files: Vec<(String, Vec<u8>)> = data
        .split(|b| *b == 0)
        .enumerate()
        .map(|(n, file)| match file.strip_prefix(b"j") {
            Some(json) => (format!("f{n}.json"), json.to_vec()),
            None => (format!("f{n}.yaml"), file.to_vec()),
        })
        .collect();
    if let Ok(manifests) = parse(&files) {
        let mut seen = BTreeSet::new();
        for m in &manifests {
            assert!(!m.name.is_empty() && !m.kind.is_empty() && !m.api_version.is_empty());
            assert!(m.body.is_object());
            let identity = (
                m.group(),
                m.kind.as_str(),
                m.namespace.as_deref(),
                m.name.as_str(),
            );
            assert!(seen.insert(identity), "{identity:?} twice");
        }
    }
});
