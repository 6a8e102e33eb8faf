//! docs/configuration.md against the code, so that the reference cannot drift.
//!
//! The server's config keys are learned from the parser itself, not from its source: every
//! section refuses unknown fields, and serde's refusal lists the fields the section accepts
//! (``unknown field `x`, expected one of `a`, `b` ``). Probing each section with a bogus key
//! therefore enumerates exactly the keys the code reads. Flags come from the binaries' own
//! `--help`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail, ensure};
use greenlight_server::config::{Config, Overrides};

const DOC: &str = include_str!("../../docs/configuration.md");
const DOC_PATH: &str = "docs/configuration.md";

/// A key no section will ever have.
const PROBE: &str = "zz_not_a_key";

/// One row of a Markdown table, with the `##` heading it sits under.
struct Row {
    heading: String,
    cells: Vec<String>,
}

/// Every body row of every table in `doc` (header and separator rows left out).
fn table_rows(doc: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut heading = String::new();
    let lines: Vec<&str> = doc.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim();
        if let Some(title) = line.strip_prefix("## ") {
            heading = title.trim().to_owned();
            continue;
        }
        if !line.starts_with('|') || is_separator(line) {
            continue;
        }
        // A header row is the one above a separator.
        if lines
            .get(i + 1)
            .is_some_and(|next| is_separator(next.trim()))
        {
            continue;
        }
        let cells = line
            .trim_matches('|')
            .split('|')
            .map(|cell| cell.trim().to_owned())
            .collect();
        rows.push(Row {
            heading: heading.clone(),
            cells,
        });
    }
    rows
}

fn is_separator(line: &str) -> bool {
    line.starts_with('|') && line.chars().all(|c| matches!(c, '|' | '-' | ':' | ' '))
}

/// The code spans of `text`, in order.
fn code_spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// Whether `span` is written like a config key path: `git.max_files`, `agents[].gate.mode`,
/// `webhooks.gitlab.projects.<project>.secret_token`.
fn is_key_path(span: &str) -> bool {
    span.starts_with(|c: char| c.is_ascii_lowercase())
        && span.chars().all(|c| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || matches!(c, '_' | '.' | '[' | ']' | '<' | '>')
        })
}

/// A key path in one spelling: any `<placeholder>` segment becomes `<>`.
fn normalized(key: &str) -> String {
    key.split('.')
        .map(|segment| {
            if segment.starts_with('<') && segment.ends_with('>') {
                "<>"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The config keys documented in the first column of the tables, normalized, each with the
/// key as written.
fn documented_keys() -> BTreeMap<String, String> {
    table_rows(DOC)
        .iter()
        .filter_map(|row| code_spans(row.cells.first()?).first().copied())
        .filter(|span| is_key_path(span))
        .map(|key| (normalized(key), key.to_owned()))
        .collect()
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Field(String),
    /// Every element of a list.
    Each,
    /// Every value of a map keyed by the operator's choice (a project).
    Any,
}

fn parse_path(key: &str) -> Vec<Segment> {
    let mut path = Vec::new();
    for part in key.split('.') {
        if part.starts_with('<') {
            path.push(Segment::Any);
            continue;
        }
        let (name, lists) = match part.find("[]") {
            Some(at) => (&part[..at], part[at..].len() / 2),
            None => (part, 0),
        };
        path.push(Segment::Field(name.to_owned()));
        path.extend(std::iter::repeat_n(Segment::Each, lists));
    }
    path
}

fn render_path(path: &[Segment]) -> String {
    let mut key = String::new();
    for segment in path {
        match segment {
            Segment::Field(name) => {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(name);
            }
            Segment::Each => key.push_str("[]"),
            Segment::Any => key.push_str(".<>"),
        }
    }
    key
}

/// A YAML document (flow style) that puts `value` at `path`.
fn yaml_at(path: &[Segment], value: &str) -> String {
    let mut yaml = value.to_owned();
    for segment in path.iter().rev() {
        yaml = match segment {
            Segment::Field(name) => format!("{{{name}: {yaml}}}"),
            Segment::Each => format!("[{yaml}]"),
            // A project path: the map's keys are projects.
            Segment::Any => format!("{{group/app: {yaml}}}"),
        };
    }
    yaml
}

/// Why a config was refused, or `None` when it was accepted.
fn refusal(yaml: &str) -> Option<String> {
    Config::from_yaml(yaml, &Overrides::default())
        .err()
        .map(|error| error.to_string())
}

/// The fields named in the refusal of the unknown field `PROBE`, when it was refused.
///
/// serde-saphyr writes ``unknown field `x`, expected one of a, b``; serde's own wording is
/// ``expected `a` or `b` `` or "there are no fields". Both are read.
fn fields_listed(error: &str) -> Option<Vec<String>> {
    let marker = format!("unknown field `{PROBE}`, ");
    let at = error.find(&marker)?;
    let rest = &error[at + marker.len()..];
    let rest = &rest[..rest.find('\n').unwrap_or(rest.len())];
    if rest.starts_with("there are no fields") {
        return Some(Vec::new());
    }
    let list = rest
        .strip_prefix("expected ")?
        .trim_start_matches("one of ")
        .replace('`', "");
    Some(
        list.split(", ")
            .flat_map(|part| part.split(" or "))
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_owned)
            .collect(),
    )
}

/// What the value at a path is, as far as the config's structure goes.
enum Shape {
    /// A section with these fields.
    Section(Vec<String>),
    /// A list of sections with these fields.
    List(Vec<String>),
    /// A map from a name of the operator's choice to sections with these fields.
    Map(Vec<String>),
    /// A value.
    Leaf,
}

fn shape(path: &[Segment]) -> Shape {
    let probe = |value: &str| refusal(&yaml_at(path, value)).and_then(|e| fields_listed(&e));
    if let Some(fields) = probe(&format!("{{{PROBE}: 1}}")) {
        Shape::Section(fields)
    } else if let Some(fields) = probe(&format!("[{{{PROBE}: 1}}]")) {
        Shape::List(fields)
    } else if let Some(fields) = probe(&format!("{{{PROBE}: {{{PROBE}: 1}}}}")) {
        Shape::Map(fields)
    } else {
        Shape::Leaf
    }
}

/// Every key the server's config parser accepts, as documented paths (`<>` for map keys).
fn code_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut pending = vec![Vec::new()];
    while let Some(path) = pending.pop() {
        let (fields, prefix) = match shape(&path) {
            Shape::Leaf => {
                keys.insert(render_path(&path));
                continue;
            }
            Shape::Section(fields) => (fields, path),
            Shape::List(fields) => (fields, [path, vec![Segment::Each]].concat()),
            Shape::Map(fields) => (fields, [path, vec![Segment::Any]].concat()),
        };
        for field in fields {
            let mut child = prefix.clone();
            child.push(Segment::Field(field));
            pending.push(child);
        }
    }
    keys
}

#[test]
fn every_documented_key_is_one_the_server_reads() {
    let documented = documented_keys();
    assert!(
        documented.len() >= 20,
        "{DOC_PATH} documents only {} keys; are its tables still `| `key` | ... |`?",
        documented.len()
    );
    let mut unknown = Vec::new();
    for key in documented.values() {
        let path = parse_path(key);
        // Any value will do: the field name is checked before its value is read, so a
        // refusal can only be about the value, unless the key itself is unknown.
        let yaml = yaml_at(&path, "1");
        if let Some(error) = refusal(&yaml)
            && error.contains("unknown field")
        {
            let first_line = error.lines().next().unwrap_or_default();
            unknown.push(format!("{key} ({first_line})"));
        }
    }
    assert!(
        unknown.is_empty(),
        "{DOC_PATH} documents keys the server refuses as unknown:\n  {}",
        unknown.join("\n  ")
    );
}

#[test]
fn every_key_the_server_reads_is_documented() {
    let code = code_keys();
    // The probe itself must work, or this test would pass on nothing.
    for expected in ["listen.grpc", "agents[].gate.mode", "git.max_files"] {
        assert!(
            code.contains(expected),
            "probing the parser did not find {expected}; found {code:?}"
        );
    }
    let documented: BTreeSet<String> = documented_keys().into_keys().collect();
    let missing: Vec<_> = code.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&code).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{DOC_PATH} and the server's config disagree.\n  read by the server, not documented: {missing:?}\n  documented, not read by the server: {extra:?}"
    );
}

/// Flags and their environment variables from a binary's `--help`, and its subcommands.
#[derive(Debug, Default)]
struct Help {
    /// `--flag` → its environment variable, if it has one.
    flags: BTreeMap<String, Option<String>>,
    commands: BTreeSet<String>,
}

fn parse_help(text: &str) -> Help {
    let mut help = Help::default();
    let mut section = "";
    let mut current: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line.trim_end_matches(':');
            current = None;
            continue;
        }
        let trimmed = line.trim_start();
        match section {
            "Commands" if line.starts_with("  ") && !line.starts_with("   ") => {
                if let Some(name) = trimmed.split_whitespace().next()
                    && name != "help"
                {
                    help.commands.insert(name.to_owned());
                }
            }
            "Options" => {
                // `  -h, --help` or `      --server <SERVER>`.
                let flag_start = trimmed
                    .strip_prefix('-')
                    .filter(|rest| !rest.starts_with('-'))
                    .and_then(|rest| rest.split_once(", "))
                    .map_or(trimmed, |(_, long)| long);
                if let Some(long) = flag_start.strip_prefix("--") {
                    let name: String = long
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect();
                    let flag = format!("--{name}");
                    if name != "help" && name != "version" {
                        help.flags.insert(flag.clone(), None);
                    }
                    current = Some(flag);
                }
                if let Some(at) = line.find("[env: ") {
                    let env: String = line[at + 6..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if let Some(slot) = current.as_ref().and_then(|f| help.flags.get_mut(f)) {
                        *slot = Some(env);
                    }
                }
            }
            _ => {}
        }
    }
    help
}

/// `binary --help`, in an environment without `GREENLIGHT_*` values to show.
fn help_of(dir: &Path, binary: &str) -> anyhow::Result<Help> {
    let output = Command::new(dir.join(binary))
        .arg("--help")
        .env_clear()
        .output()
        .with_context(|| format!("cannot run {binary} --help"))?;
    ensure!(
        output.status.success(),
        "{binary} --help failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let help = parse_help(&String::from_utf8_lossy(&output.stdout));
    ensure!(
        help.flags.len() >= 3,
        "read only {:?} from {binary} --help",
        help.flags
    );
    Ok(help)
}

/// Which binary's flags a `##` heading lists, judged by its wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Binary {
    Server,
    Agent,
}

impl Binary {
    fn name(self) -> &'static str {
        match self {
            Binary::Server => "greenlight-server",
            Binary::Agent => "greenlight-agent",
        }
    }

    fn of_heading(heading: &str) -> Option<Self> {
        let heading = heading.to_lowercase();
        match (heading.contains("server"), heading.contains("agent")) {
            (true, false) => Some(Binary::Server),
            (false, true) => Some(Binary::Agent),
            _ => None,
        }
    }
}

/// The documented flags of each binary: `--flag` → the `GREENLIGHT_*` variables named in its
/// row. A flag row under a heading that names neither binary (or both) is an error.
fn documented_flags() -> anyhow::Result<BTreeMap<(Binary, String), BTreeSet<String>>> {
    let mut flags = BTreeMap::new();
    for row in table_rows(DOC) {
        let Some(flag) = row
            .cells
            .first()
            .and_then(|cell| code_spans(cell).first().copied())
            .filter(|span| span.starts_with("--"))
        else {
            continue;
        };
        let flag = flag.split_whitespace().next().unwrap_or(flag).to_owned();
        let Some(binary) = Binary::of_heading(&row.heading) else {
            bail!(
                "{DOC_PATH}: {flag} is listed under \"## {}\", which names neither greenlight-server nor greenlight-agent",
                row.heading
            );
        };
        let envs = row
            .cells
            .iter()
            .flat_map(|cell| code_spans(cell))
            .filter(|span| span.starts_with("GREENLIGHT_"))
            .map(str::to_owned)
            .collect();
        flags.insert((binary, flag), envs);
    }
    Ok(flags)
}

/// The differences between `binary`'s `--help` and the documented flags, one line each.
fn flag_problems(
    binary: Binary,
    help: &Help,
    documented: &BTreeMap<(Binary, String), BTreeSet<String>>,
) -> Vec<String> {
    let name = binary.name();
    let mut problems = Vec::new();
    for (flag, env) in &help.flags {
        match (documented.get(&(binary, flag.clone())), env) {
            (None, _) => problems.push(format!("{name} {flag} is not documented")),
            (Some(envs), Some(env)) if !envs.contains(env) => problems.push(format!(
                "{name} {flag} is documented without its variable {env}"
            )),
            _ => {}
        }
    }
    for (_, flag) in documented.keys().filter(|(b, _)| *b == binary) {
        if !help.flags.contains_key(flag) {
            problems.push(format!("{name} has no flag {flag}, but it is documented"));
        }
    }
    for command in &help.commands {
        if !DOC.contains(&format!("{name} {command}")) {
            problems.push(format!(
                "the subcommand `{name} {command}` is not documented"
            ));
        }
    }
    problems
}

#[test]
fn every_flag_of_the_binaries_is_documented_with_its_variable() -> anyhow::Result<()> {
    let documented = documented_flags()?;
    let dir = greenlight_e2e::process::built_binaries()?;
    let mut problems = Vec::new();
    for binary in [Binary::Server, Binary::Agent] {
        let help = help_of(&dir, binary.name())?;
        problems.extend(flag_problems(binary, &help, &documented));
    }
    if !problems.is_empty() {
        bail!(
            "{DOC_PATH} and the binaries disagree:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

#[test]
fn the_help_parser_reads_clap_output() {
    let help = parse_help(
        "Usage: x [OPTIONS] --server <SERVER>\n\nCommands:\n  hash-token    Prints\n  help          Print this\n\nOptions:\n      --server <SERVER>\n          Server address\n          \n          [env: GREENLIGHT_SERVER=]\n      --insecure  Allow it [env: GREENLIGHT_INSECURE=]\n  -h, --help      Print help\n",
    );
    assert_eq!(
        help.flags,
        BTreeMap::from([
            (
                "--insecure".to_owned(),
                Some("GREENLIGHT_INSECURE".to_owned())
            ),
            ("--server".to_owned(), Some("GREENLIGHT_SERVER".to_owned())),
        ])
    );
    assert_eq!(help.commands, BTreeSet::from(["hash-token".to_owned()]));
    let listed = |error: &str| fields_listed(&error.replace("X", PROBE));
    assert_eq!(
        listed("line 1: unknown field `X`, expected one of cert_file, key_file\n -->"),
        Some(vec!["cert_file".to_owned(), "key_file".to_owned()])
    );
    assert_eq!(
        listed("unknown field `X`, expected `a` or `b`"),
        Some(vec!["a".to_owned(), "b".to_owned()])
    );
    assert_eq!(
        listed("unknown field `X`, there are no fields"),
        Some(Vec::new())
    );
    assert_eq!(listed("missing field `X`"), None);
    assert_eq!(
        parse_path("agents[].health_checks[].kind"),
        [
            Segment::Field("agents".into()),
            Segment::Each,
            Segment::Field("health_checks".into()),
            Segment::Each,
            Segment::Field("kind".into()),
        ]
    );
    assert_eq!(
        yaml_at(
            &parse_path("webhooks.gitlab.projects.<project>.secret_token"),
            "1"
        ),
        "{webhooks: {gitlab: {projects: {group/app: {secret_token: 1}}}}}"
    );
}
