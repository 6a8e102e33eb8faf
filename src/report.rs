//! Bounds on a status report, shared so that the agent never sends what the server refuses:
//! a revision of many thousand objects, or an error listing each of them, stays a report
//! of bounded size.

use crate::v1::StatusReport;

/// Per-object results one report carries; the count of the rest is said in the message.
pub const MAX_REPORT_OBJECTS: usize = 1000;
/// Bytes of a report's message, and of each object's message.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
pub const MAX_OBJECT_MESSAGE_BYTES: usize = 512;
/// Largest encoded report request the server accepts; reports within the bounds above
/// stay well below it.
pub const MAX_REPORT_REQUEST_BYTES: usize = 2 * 1024 * 1024;

/// `text` cut to at most `max` bytes at a character boundary, saying that it was.
fn cut(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    const MARK: &str = " … (cut)";
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MARK);
}

/// Cuts `report` to the bounds: the first [`MAX_REPORT_OBJECTS`] objects (failures first,
/// since they are what a reader looks for), and messages to their lengths.
pub fn bound(report: &mut StatusReport) {
    if report.objects.len() > MAX_REPORT_OBJECTS {
        // Stable: failures first, the rest in their order.
        report
            .objects
            .sort_by_key(|o| o.action() != crate::v1::object_result::Action::Failed);
        let left = report.objects.len() - MAX_REPORT_OBJECTS;
        report.objects.truncate(MAX_REPORT_OBJECTS);
        report
            .message
            .push_str(&format!(" ({left} more objects not listed)"));
    }
    cut(&mut report.message, MAX_MESSAGE_BYTES);
    for object in &mut report.objects {
        cut(&mut object.message, MAX_OBJECT_MESSAGE_BYTES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::ObjectResult;
    use crate::v1::object_result::Action;
    use prost::Message;

    fn object(i: usize, action: Action) -> ObjectResult {
        ObjectResult {
            name: format!("cm-{i}"),
            action: action.into(),
            message: "é".repeat(600),
            ..ObjectResult::default()
        }
    }

    #[test]
    fn a_huge_report_is_cut_to_its_bounds_keeping_failures() {
        let mut objects: Vec<ObjectResult> =
            (0..5000).map(|i| object(i, Action::Applied)).collect();
        objects.push(object(5000, Action::Failed));
        let mut report = StatusReport {
            message: "x".repeat(100_000),
            objects,
            ..StatusReport::default()
        };
        bound(&mut report);
        assert_eq!(report.objects.len(), MAX_REPORT_OBJECTS);
        assert_eq!(report.objects[0].name, "cm-5000", "the failure is kept");
        assert!(report.message.len() <= MAX_MESSAGE_BYTES);
        assert!(report.message.ends_with("(cut)"));
        assert!(
            report
                .objects
                .iter()
                .all(|o| o.message.len() <= MAX_OBJECT_MESSAGE_BYTES)
        );
        assert!(report.encode_to_vec().len() < MAX_REPORT_REQUEST_BYTES);
    }

    #[test]
    fn a_small_report_is_left_alone() {
        let mut report = StatusReport {
            message: "3 objects".into(),
            objects: vec![object(1, Action::Applied)],
            ..StatusReport::default()
        };
        report.objects[0].message = "fine".into();
        let before = report.clone();
        bound(&mut report);
        assert_eq!(report, before);
    }
}
