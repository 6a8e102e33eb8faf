//! Preview requests waiting for the agent: one per merge request, the newest head replacing
//! an older one, taken oldest first. Pure: no I/O.

use std::collections::BTreeMap;

use crate::assemble::ReadyPreview;

/// A merge request: its project and iid.
pub type MergeRequest = (String, u64);

/// The merge request `preview` is about.
pub fn merge_request_of(preview: &ReadyPreview) -> MergeRequest {
    (
        preview.revision.header.project.clone(),
        preview.merge_request_iid,
    )
}

/// The most merge requests waiting at once; beyond it the oldest request is dropped (its
/// next push asks again).
pub const MAX_WAITING: usize = 64;

/// Requests not started yet.
#[derive(Debug, Default)]
pub struct PreviewQueue {
    next: u64,
    waiting: BTreeMap<MergeRequest, (u64, ReadyPreview)>,
}

impl PreviewQueue {
    /// Queues `preview`, replacing a waiting one of the same merge request.
    pub fn push(&mut self, preview: ReadyPreview) {
        self.next += 1;
        self.waiting
            .insert(merge_request_of(&preview), (self.next, preview));
        while self.waiting.len() > MAX_WAITING {
            let oldest = self
                .waiting
                .iter()
                .min_by_key(|(_, (seq, _))| *seq)
                .map(|(key, _)| key.clone());
            if let Some(key) = oldest {
                self.waiting.remove(&key);
            }
        }
    }

    /// The request waiting longest.
    pub fn take(&mut self) -> Option<ReadyPreview> {
        let key = self
            .waiting
            .iter()
            .min_by_key(|(_, (seq, _))| *seq)
            .map(|(key, _)| key.clone())?;
        self.waiting.remove(&key).map(|(_, preview)| preview)
    }

    /// Whether a newer head of `merge_request` waits: the one in flight is then moot.
    pub fn supersedes(&self, merge_request: &MergeRequest) -> bool {
        self.waiting.contains_key(merge_request)
    }

    /// How many requests wait.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assemble::ReadyRevision;
    use greenlight::v1::{Revision, RevisionHeader};

    fn request(mr: u64, sha: &str) -> ReadyPreview {
        ReadyPreview {
            id: format!("{mr}-{sha}"),
            merge_request_iid: mr,
            revision: ReadyRevision {
                header: RevisionHeader {
                    project: "group/app".into(),
                    revision: Some(Revision {
                        sha: sha.into(),
                        ..Revision::default()
                    }),
                    ..RevisionHeader::default()
                },
                files: Vec::new(),
            },
        }
    }

    #[test]
    fn a_newer_head_replaces_the_waiting_one_and_supersedes_the_one_in_flight() {
        let mut queue = PreviewQueue::default();
        queue.push(request(1, "a"));
        queue.push(request(2, "b"));
        let running = queue.take().unwrap();
        assert_eq!(running.revision.sha(), "a");
        let mr = merge_request_of(&running);
        assert!(!queue.supersedes(&mr));
        queue.push(request(1, "c"));
        assert!(queue.supersedes(&mr), "a newer head of the same MR waits");
        queue.push(request(1, "d"));
        assert_eq!(queue.len(), 2, "one per merge request");
        assert_eq!(queue.take().unwrap().revision.sha(), "b");
        assert_eq!(queue.take().unwrap().revision.sha(), "d");
        assert!(queue.take().is_none());
    }

    #[test]
    fn the_queue_stays_bounded() {
        let mut queue = PreviewQueue::default();
        for mr in 0..(MAX_WAITING as u64 + 10) {
            queue.push(request(mr, "a"));
        }
        assert_eq!(queue.len(), MAX_WAITING);
        assert_eq!(
            queue.take().unwrap().merge_request_iid,
            10,
            "the oldest went"
        );
    }
}
