//! Plain-text rendering of a [`Preview`]: what `greenlightctl preview` prints, and the diff
//! the server puts in the merge request's note. Pure: no I/O.

use std::fmt::Write as _;

use crate::v1::preview::Outcome;
use crate::v1::preview_object::Change;
use crate::v1::{FieldChange, Preview, PreviewObject};

/// The most objects a preview lists: the agent counts the rest in `truncated`, and the server
/// keeps no more from an agent of another version.
pub const MAX_OBJECTS: usize = 500;
/// The most changed fields a preview lists per object, on both sides alike.
pub const MAX_FIELDS: usize = 50;

/// How many objects of each change a preview holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub create: usize,
    pub update: usize,
    pub prune: usize,
    pub refused: usize,
    pub unchanged: usize,
}

impl Counts {
    /// Counts the objects of `preview`.
    pub fn of(preview: &Preview) -> Self {
        let mut counts = Self {
            unchanged: preview.unchanged as usize,
            ..Self::default()
        };
        for object in &preview.objects {
            match object.change() {
                Change::Create => counts.create += 1,
                Change::Update => counts.update += 1,
                Change::Prune => counts.prune += 1,
                Change::Refused => counts.refused += 1,
                Change::Unspecified => {}
            }
        }
        counts
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} to create, {} to change, {} to prune, {} refused, {} unchanged",
            self.create, self.update, self.prune, self.refused, self.unchanged
        )
    }
}

/// `Kind namespace/name`, or `Kind name` for a cluster-scoped object.
pub fn object_name(object: &PreviewObject) -> String {
    if object.namespace.is_empty() {
        format!("{} {}", object.kind, object.name)
    } else {
        format!("{} {}/{}", object.kind, object.namespace, object.name)
    }
}

/// The one-line verdict: clean, or the first reason it is not.
pub fn verdict(preview: &Preview) -> String {
    match preview.outcome() {
        Outcome::Clean => "would apply cleanly".to_owned(),
        Outcome::Refused => format!("would fail: {}", preview.reason),
        Outcome::Error => format!("no preview: {}", preview.reason),
        Outcome::Unspecified => "unknown outcome".to_owned(),
    }
}

fn field_line(field: &FieldChange) -> String {
    if field.redacted {
        let what = match (&field.before, &field.after) {
            (None, _) => "added",
            (_, None) => "removed",
            _ => "changed",
        };
        return format!("{}: {what} (value hidden)", field.path);
    }
    match (&field.before, &field.after) {
        (None, Some(after)) => format!("{}: + {after}", field.path),
        (Some(before), None) => format!("{}: - {before}", field.path),
        (Some(before), Some(after)) => format!("{}: {before} → {after}", field.path),
        (None, None) => field.path.clone(),
    }
}

/// The diff, one object per line in `diff` style (`+` create, `~` change, `-` prune, `!`
/// refused), each changed field indented below its object.
pub fn render_diff(preview: &Preview) -> String {
    let mut out = String::new();
    let order = [
        Change::Refused,
        Change::Create,
        Change::Update,
        Change::Prune,
    ];
    for change in order {
        for object in preview.objects.iter().filter(|o| o.change() == change) {
            let name = object_name(object);
            let _ = match change {
                Change::Create => writeln!(out, "+ {name}"),
                Change::Update => writeln!(out, "~ {name}"),
                Change::Prune => writeln!(out, "- {name}"),
                Change::Refused => writeln!(out, "! {name}: {}", object.message),
                Change::Unspecified => Ok(()),
            };
            if change != Change::Refused && !object.message.is_empty() {
                let _ = writeln!(out, "    ({})", object.message);
            }
            for field in &object.fields {
                let _ = writeln!(out, "    {}", field_line(field));
            }
        }
    }
    if preview.truncated {
        out.push_str("… (the agent left out more objects or fields)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(kind: &str, name: &str, change: Change) -> PreviewObject {
        PreviewObject {
            api_version: "v1".into(),
            kind: kind.into(),
            namespace: "apps".into(),
            name: name.into(),
            change: change.into(),
            ..PreviewObject::default()
        }
    }

    #[test]
    fn the_diff_lists_refusals_first_and_hides_secret_values() {
        let mut secret = object("Secret", "db", Change::Update);
        secret.fields.push(FieldChange {
            path: "data.password".into(),
            before: Some(String::new()),
            after: Some(String::new()),
            redacted: true,
        });
        let mut web = object("Deployment", "web", Change::Update);
        web.fields.push(FieldChange {
            path: "spec.replicas".into(),
            before: Some("1".into()),
            after: Some("3".into()),
            redacted: false,
        });
        let mut bad = object("ConfigMap", "bad", Change::Refused);
        bad.message = "namespace x is not in the agent's scope".into();
        let preview = Preview {
            objects: vec![
                web,
                secret,
                object("Service", "old", Change::Prune),
                bad,
                object("ConfigMap", "new", Change::Create),
            ],
            unchanged: 4,
            ..Preview::default()
        };
        assert_eq!(
            render_diff(&preview),
            "! ConfigMap apps/bad: namespace x is not in the agent's scope\n\
             + ConfigMap apps/new\n\
             ~ Deployment apps/web\n    spec.replicas: 1 → 3\n\
             ~ Secret apps/db\n    data.password: changed (value hidden)\n\
             - Service apps/old\n"
        );
        assert_eq!(
            Counts::of(&preview).to_string(),
            "1 to create, 2 to change, 1 to prune, 1 refused, 4 unchanged"
        );
    }
}
