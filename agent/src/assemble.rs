//! Turns a stream of header, chunks and trailer back into a revision, checking the digest.

use greenlight::digest::ContentDigest;
use greenlight::v1::{PreviewHeader, RevisionHeader, SyncEvent, sync_event::Event};

/// A revision with all its files, verified against the trailer.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadyRevision {
    pub header: RevisionHeader,
    /// Files in the order the server sent them.
    pub files: Vec<(String, Vec<u8>)>,
}

impl ReadyRevision {
    /// The commit SHA.
    pub fn sha(&self) -> &str {
        self.header.revision.as_ref().map_or("", |r| r.sha.as_str())
    }

    /// The generation of the decision that sent it.
    pub fn generation(&self) -> u64 {
        self.header.revision.as_ref().map_or(0, |r| r.generation)
    }
}

/// A preview request with all its files: the merge request's head as a revision, which the
/// agent dry-runs and never applies.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadyPreview {
    /// The request's id.
    pub id: String,
    pub merge_request_iid: u64,
    /// The head commit, its files and the agent's settings.
    pub revision: ReadyRevision,
}

/// What a completed header, chunks and trailer were.
#[derive(Debug, Clone, PartialEq)]
pub enum Ready {
    Revision(ReadyRevision),
    Preview(ReadyPreview),
}

/// The stream broke the protocol; the revision is discarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    #[error("received a {0} before any header")]
    NoHeader(&'static str),
    #[error("header announced {expected} files, received {got}")]
    FileCount { expected: u32, got: usize },
    #[error("header announced {expected} bytes, received {got}")]
    ByteCount { expected: u64, got: u64 },
    #[error("content checksum mismatch: trailer says {expected}, content hashes to {got}")]
    Checksum { expected: String, got: String },
    #[error("received more than the {0} bytes the header announced")]
    TooLarge(u64),
    #[error("empty event")]
    Empty,
}

/// Collects one revision at a time.
#[derive(Default)]
pub struct Assembler {
    current: Option<ReadyRevision>,
    /// Set while the files being collected are a preview request's.
    preview: Option<PreviewHeader>,
    bytes: u64,
}

impl Assembler {
    /// A fresh assembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one event; returns a revision when its trailer verifies. Preview requests are
    /// passed over.
    pub fn push(&mut self, event: SyncEvent) -> Result<Option<ReadyRevision>, AssembleError> {
        Ok(match self.push_any(event)? {
            Some(Ready::Revision(revision)) => Some(revision),
            _ => None,
        })
    }

    /// Feeds one event; returns a revision or a preview request when its trailer verifies.
    pub fn push_any(&mut self, event: SyncEvent) -> Result<Option<Ready>, AssembleError> {
        match event.event.ok_or(AssembleError::Empty)? {
            Event::Header(header) => {
                // A new header abandons an unfinished revision: the server moved on.
                self.current = Some(ReadyRevision {
                    header,
                    files: Vec::new(),
                });
                self.preview = None;
                self.bytes = 0;
                Ok(None)
            }
            Event::Preview(mut preview) => {
                self.current = Some(ReadyRevision {
                    header: preview.revision.take().unwrap_or_default(),
                    files: Vec::new(),
                });
                self.preview = Some(preview);
                self.bytes = 0;
                Ok(None)
            }
            Event::Chunk(chunk) => {
                let current = self
                    .current
                    .as_mut()
                    .ok_or(AssembleError::NoHeader("chunk"))?;
                self.bytes = self.bytes.saturating_add(chunk.data.len() as u64);
                if self.bytes > current.header.total_bytes {
                    return Err(AssembleError::TooLarge(current.header.total_bytes));
                }
                match current.files.last_mut() {
                    Some((path, data)) if *path == chunk.path => {
                        data.extend_from_slice(&chunk.data)
                    }
                    _ => current.files.push((chunk.path, chunk.data.to_vec())),
                }
                Ok(None)
            }
            Event::Trailer(trailer) => {
                let current = self
                    .current
                    .take()
                    .ok_or(AssembleError::NoHeader("trailer"))?;
                let bytes = std::mem::take(&mut self.bytes);
                if current.files.len() != current.header.file_count as usize {
                    return Err(AssembleError::FileCount {
                        expected: current.header.file_count,
                        got: current.files.len(),
                    });
                }
                if bytes != current.header.total_bytes {
                    return Err(AssembleError::ByteCount {
                        expected: current.header.total_bytes,
                        got: bytes,
                    });
                }
                let mut digest = ContentDigest::new();
                for (path, data) in &current.files {
                    digest.add_file(path, data);
                }
                let got = digest.finish();
                if got != trailer.content_sha256 {
                    return Err(AssembleError::Checksum {
                        expected: trailer.content_sha256,
                        got,
                    });
                }
                Ok(Some(match self.preview.take() {
                    Some(preview) => Ready::Preview(ReadyPreview {
                        id: preview.id,
                        merge_request_iid: preview.merge_request_iid,
                        revision: current,
                    }),
                    None => Ready::Revision(current),
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use greenlight::v1::{ManifestChunk, RevisionTrailer};

    fn header(files: u32, bytes: u64) -> SyncEvent {
        SyncEvent {
            event: Some(Event::Header(RevisionHeader {
                file_count: files,
                total_bytes: bytes,
                ..Default::default()
            })),
        }
    }

    fn chunk(path: &str, data: &[u8]) -> SyncEvent {
        SyncEvent {
            event: Some(Event::Chunk(ManifestChunk {
                path: path.into(),
                data: data.to_vec().into(),
            })),
        }
    }

    fn trailer(files: &[(&str, &[u8])]) -> SyncEvent {
        let mut digest = ContentDigest::new();
        for (path, data) in files {
            digest.add_file(path, data);
        }
        SyncEvent {
            event: Some(Event::Trailer(RevisionTrailer {
                content_sha256: digest.finish(),
            })),
        }
    }

    #[test]
    fn chunks_of_one_path_concatenate_and_the_checksum_verifies() {
        let mut assembler = Assembler::new();
        assert_eq!(assembler.push(header(2, 6)).unwrap(), None);
        assembler.push(chunk("a.yaml", b"ab")).unwrap();
        assembler.push(chunk("a.yaml", b"cd")).unwrap();
        assembler.push(chunk("b.yaml", b"ef")).unwrap();
        let ready = assembler
            .push(trailer(&[("a.yaml", b"abcd"), ("b.yaml", b"ef")]))
            .unwrap()
            .unwrap();
        assert_eq!(
            ready.files,
            vec![
                ("a.yaml".into(), b"abcd".to_vec()),
                ("b.yaml".into(), b"ef".to_vec())
            ]
        );
    }

    #[test]
    fn corrupted_content_is_refused() {
        let mut assembler = Assembler::new();
        assembler.push(header(1, 2)).unwrap();
        assembler.push(chunk("a.yaml", b"xx")).unwrap();
        let err = assembler.push(trailer(&[("a.yaml", b"ab")])).unwrap_err();
        assert!(matches!(err, AssembleError::Checksum { .. }));
    }

    #[test]
    fn events_out_of_protocol_are_errors_not_panics() {
        let mut assembler = Assembler::new();
        assert_eq!(
            assembler.push(chunk("a", b"x")).unwrap_err(),
            AssembleError::NoHeader("chunk")
        );
        assert_eq!(
            assembler.push(SyncEvent { event: None }).unwrap_err(),
            AssembleError::Empty
        );
        assembler.push(header(1, 1)).unwrap();
        assert_eq!(
            assembler.push(chunk("a", b"xy")).unwrap_err(),
            AssembleError::TooLarge(1)
        );
    }

    use proptest::prelude::*;

    /// Any event the stream might carry, in no particular order.
    fn any_event() -> impl Strategy<Value = SyncEvent> {
        let path = prop::sample::select(vec!["a.yaml", "b.yaml", "", "dir/c.json"]);
        prop_oneof![
            (0u32..4, 0u64..16).prop_map(|(files, bytes)| header(files, bytes)),
            (any::<u32>(), any::<u64>()).prop_map(|(files, bytes)| header(files, bytes)),
            (path, prop::collection::vec(any::<u8>(), 0..8))
                .prop_map(|(path, data)| chunk(path, &data)),
            "[0-9a-f]{0,64}".prop_map(|content_sha256| SyncEvent {
                event: Some(Event::Trailer(RevisionTrailer { content_sha256 })),
            }),
            Just(trailer(&[])),
            Just(trailer(&[("a.yaml", b"")])),
            Just(SyncEvent { event: None }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_event_sequences_never_panic_and_only_verified_revisions_come_out(
            events in prop::collection::vec(any_event(), 0..32),
        ) {
            let mut assembler = Assembler::new();
            for event in events {
                if let Ok(Some(ready)) = assembler.push(event) {
                    let bytes: usize = ready.files.iter().map(|(_, data)| data.len()).sum();
                    prop_assert_eq!(ready.files.len(), ready.header.file_count as usize);
                    prop_assert_eq!(bytes as u64, ready.header.total_bytes);
                }
            }
        }

        #[test]
        fn files_sent_in_any_chunking_come_back_as_sent(
            files in prop::collection::btree_map("[a-z]{1,8}\\.yaml", prop::collection::vec(any::<u8>(), 0..64), 0..6),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let files: Vec<(String, Vec<u8>)> = files.into_iter().collect();
            let total: usize = files.iter().map(|(_, data)| data.len()).sum();
            let mut assembler = Assembler::new();
            prop_assert_eq!(assembler.push(header(files.len() as u32, total as u64)).unwrap(), None);
            for (path, data) in &files {
                // Every file is announced by at least one chunk, an empty file by an empty one.
                let mut at: Vec<usize> = cuts.iter().map(|cut| cut.index(data.len() + 1)).collect();
                at.extend([0, data.len()]);
                at.sort_unstable();
                at.dedup();
                if at.len() == 1 {
                    prop_assert_eq!(assembler.push(chunk(path, &[])).unwrap(), None);
                }
                for part in at.windows(2) {
                    prop_assert_eq!(assembler.push(chunk(path, &data[part[0]..part[1]])).unwrap(), None);
                }
            }
            let sent: Vec<(&str, &[u8])> = files.iter().map(|(p, d)| (p.as_str(), d.as_slice())).collect();
            let ready = assembler.push(trailer(&sent)).unwrap().unwrap();
            prop_assert_eq!(ready.files, files);
        }
    }
}
