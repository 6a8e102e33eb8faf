//! The note an agent's preview becomes on the merge request, and its commit status. Pure:
//! no I/O.

use greenlight::preview::{Counts, render_diff, verdict};
use greenlight::v1::Preview;
use greenlight::v1::preview::Outcome;

/// The longest note, in bytes: beyond it the diff is cut, and the note links to the full
/// preview (GitLab takes far more, but a longer note helps no reviewer).
pub const MAX_NOTE_BYTES: usize = 32 * 1024;
/// Diffs of more lines than this are collapsed (GitLab renders `<details>`).
pub const COLLAPSE_LINES: usize = 15;

/// Where the full preview is: a URL, or the command that prints it.
pub fn full_preview(base: Option<&str>, agent: &str, sha: &str) -> String {
    match base {
        Some(base) => format!(
            "{}/agents/{agent}/previews/{sha}",
            base.trim_end_matches('/')
        ),
        None => format!("`greenlightctl preview {agent} --sha {sha}`"),
    }
}

/// The commit status context of `agent`'s previews.
pub fn context(agent: &str) -> String {
    format!("{}{agent}/preview", crate::gitlab::CONTEXT_PREFIX)
}

/// The commit status a preview sets: `success` when the revision would apply cleanly,
/// `failed` with the first reason otherwise.
pub fn status(preview: &Preview) -> (&'static str, String) {
    match preview.outcome() {
        Outcome::Clean => (
            "success",
            format!("would apply cleanly: {}", Counts::of(preview)),
        ),
        _ => ("failed", verdict(preview)),
    }
}

/// Escapes what GitLab Markdown would read as HTML.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A code fence longer than any run of backticks in `text`.
fn fence(text: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in text.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    "`".repeat((longest + 1).max(3))
}

/// The note: headed `greenlight/<agent>`, the verdict, the counts and the diff, collapsed
/// when long and cut at [`MAX_NOTE_BYTES`] with a pointer to `full`.
pub fn render(preview: &Preview, full: &str) -> String {
    let short: String = preview.sha.chars().take(8).collect();
    let icon = match preview.outcome() {
        Outcome::Clean => "✅",
        _ => "❌",
    };
    let mut head = format!(
        "### greenlight/{}\n\n{icon} Preview of {short}: **{}**\n\n{}\n\n",
        preview.agent,
        escape(&verdict(preview)),
        Counts::of(preview)
    );
    let diff = render_diff(preview);
    let footer = format!("\nFull preview: {full}\n");
    if diff.is_empty() {
        head.push_str("No object would change.\n");
        head.push_str(&footer);
        return head;
    }
    let lines: Vec<&str> = diff.lines().collect();
    // Room for the wrapping: fences, `<details>` and the cut notice.
    let budget = MAX_NOTE_BYTES.saturating_sub(head.len() + footer.len() + 200);
    let mut kept = String::new();
    let mut cut = 0;
    for (i, line) in lines.iter().enumerate() {
        if kept.len() + line.len() + 1 > budget {
            cut = lines.len() - i;
            break;
        }
        kept.push_str(line);
        kept.push('\n');
    }
    let fence = fence(&kept);
    let block = format!("{fence}diff\n{kept}{fence}\n");
    let shown = lines.len() - cut;
    if lines.len() > COLLAPSE_LINES {
        head.push_str(&format!(
            "<details><summary>Diff ({} lines)</summary>\n\n{block}\n</details>\n",
            lines.len()
        ));
    } else {
        head.push_str(&block);
    }
    if cut > 0 {
        head.push_str(&format!(
            "\n{cut} more lines were cut after {shown}: the note stops at {} KiB.\n",
            MAX_NOTE_BYTES / 1024
        ));
    }
    head.push_str(&footer);
    head
}

#[cfg(test)]
mod tests {
    use super::*;
    use greenlight::v1::preview_object::Change;
    use greenlight::v1::{FieldChange, PreviewObject};

    fn object(name: &str, change: Change) -> PreviewObject {
        PreviewObject {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: "apps".into(),
            name: name.into(),
            change: change.into(),
            ..PreviewObject::default()
        }
    }

    fn preview(objects: Vec<PreviewObject>) -> Preview {
        Preview {
            agent: "prod".into(),
            sha: "0123456789abcdef0123456789abcdef01234567".into(),
            outcome: Outcome::Clean.into(),
            objects,
            ..Preview::default()
        }
    }

    #[test]
    fn a_short_diff_shows_inline_with_counts_and_the_link() {
        let mut web = object("web", Change::Update);
        web.fields.push(FieldChange {
            path: "data.v".into(),
            before: Some("\"a\"".into()),
            after: Some("\"b\"".into()),
            redacted: false,
        });
        let note = render(
            &preview(vec![web, object("new", Change::Create)]),
            "https://gl.example/agents/prod/previews/0123",
        );
        assert!(note.starts_with("### greenlight/prod\n"), "{note}");
        assert!(note.contains("**would apply cleanly**"), "{note}");
        assert!(
            note.contains("1 to create, 1 to change, 0 to prune"),
            "{note}"
        );
        assert!(
            note.contains("```diff\n+ ConfigMap apps/new\n~ ConfigMap apps/web\n    data.v: \"a\" → \"b\"\n```"),
            "{note}"
        );
        assert!(!note.contains("<details>"));
        assert!(note.ends_with("Full preview: https://gl.example/agents/prod/previews/0123\n"));
    }

    #[test]
    fn a_long_diff_is_collapsed_and_a_huge_one_cut_within_the_limit() {
        let many: Vec<PreviewObject> = (0..30)
            .map(|i| object(&format!("c{i}"), Change::Create))
            .collect();
        let note = render(&preview(many), "link");
        assert!(
            note.contains("<details><summary>Diff (30 lines)</summary>"),
            "{note}"
        );

        let huge: Vec<PreviewObject> = (0..5000)
            .map(|i| object(&format!("configmap-with-a-long-name-{i}"), Change::Create))
            .collect();
        let note = render(&preview(huge), "link");
        assert!(note.len() <= MAX_NOTE_BYTES, "{}", note.len());
        assert!(note.contains("more lines were cut"), "cut is said");
        assert!(note.ends_with("Full preview: link\n"));
    }

    #[test]
    fn backticks_in_a_refusal_cannot_close_the_fence_and_the_status_names_the_reason() {
        let mut bad = object("bad", Change::Refused);
        bad.message = "field ```x``` <b>is</b> invalid".into();
        let mut p = preview(vec![bad]);
        p.outcome = Outcome::Refused.into();
        p.reason = "ConfigMap apps/bad: <b>invalid</b>".into();
        let note = render(&p, "link");
        assert!(note.contains("````diff\n"), "{note}");
        assert!(note.contains("&lt;b&gt;invalid&lt;/b&gt;"), "{note}");
        assert_eq!(
            status(&p),
            (
                "failed",
                "would fail: ConfigMap apps/bad: <b>invalid</b>".to_owned()
            )
        );
    }
}
