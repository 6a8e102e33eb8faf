//! Path globs selecting a revision's manifests: patterns, one a line, up to the first empty
//! line (none: the default), then the paths to match, one a line.
#![no_main]

use greenlight_server::git::Patterns;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (patterns, paths) = text.split_once("\n\n").unwrap_or(("", &text));
    let patterns: Vec<String> = patterns
        .split('\n')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    let Ok(compiled) = Patterns::compile(&patterns) else {
        return;
    };
    for path in paths.split('\n') {
        let matched = compiled.matches(path);
        if patterns.is_empty() {
            // `**/*.{yaml,yml,json}` with `*` kept within one directory.
            let file = path.rsplit('/').next().unwrap_or(path);
            let expected = [".yaml", ".yml", ".json"].iter().any(|e| file.ends_with(e));
            assert_eq!(matched, expected, "default globs on {path:?}");
        }
    }
});
