//! The agent's revision assembler fed any sequence of events: structured ones (a trailer may
//! carry the digest of what was sent, so that a revision can verify) and raw protobuf.
#![no_main]

use arbitrary::Arbitrary;
use greenlight::digest::ContentDigest;
use greenlight::v1::{
    ManifestChunk, RevisionHeader, RevisionTrailer, SyncEvent, sync_event::Event,
};
use greenlight_agent::assemble::Assembler;
use libfuzzer_sys::fuzz_target;
use prost::Message;

#[derive(Arbitrary, Debug)]
enum Op {
    Header {
        file_count: u8,
        total_bytes: u16,
    },
    Chunk {
        path: String,
        data: Vec<u8>,
    },
    /// `honest`: the digest of the files sent since the last header.
    Trailer {
        honest: bool,
        content_sha256: String,
    },
    Empty,
    /// Whatever a peer might put on the wire.
    Raw(Vec<u8>),
}

fuzz_target!(|ops: Vec<Op>| {
    let mut assembler = Assembler::new();
    // What the assembler should hold: the files since the last header, if any.
    let mut sent: Option<(RevisionHeader, Vec<(String, Vec<u8>)>)> = None;
    let mut previewing = false;
    for op in ops {
        let event = match op {
            Op::Header {
                file_count,
                total_bytes,
            } => Event::Header(RevisionHeader {
                file_count: file_count.into(),
                total_bytes: total_bytes.into(),
                ..Default::default()
            }),
            Op::Chunk { path, data } => Event::Chunk(ManifestChunk {
                path,
                data: data.into(),
            }),
            Op::Trailer {
                honest,
                content_sha256,
            } => {
                let content_sha256 = match (&sent, honest) {
                    (Some((_, files)), true) => {
                        let mut digest = ContentDigest::new();
                        for (path, data) in files {
                            digest.add_file(path, data);
                        }
                        digest.finish()
                    }
                    _ => content_sha256,
                };
                Event::Trailer(RevisionTrailer { content_sha256 })
            }
            Op::Empty => {
                let _ = assembler.push(SyncEvent { event: None });
                continue;
            }
            Op::Raw(bytes) => match SyncEvent::decode(bytes.as_slice()) {
                Ok(SyncEvent { event: Some(event) }) => event,
                _ => continue,
            },
        };
        let pushed = assembler.push(SyncEvent {
            event: Some(event.clone()),
        });
        // The model: a header starts over, accepted chunks of one path in a row concatenate.
        match (&event, &pushed) {
            (Event::Header(header), _) => sent = Some((header.clone(), Vec::new())),
            // A preview request collects files as a revision does, and is never a revision.
            (Event::Preview(preview), _) => {
                sent = Some((preview.revision.clone().unwrap_or_default(), Vec::new()))
            }
            (Event::Chunk(chunk), Ok(_)) => {
                let (_, files) = sent.as_mut().expect("a chunk is accepted after a header");
                match files.last_mut() {
                    Some((path, data)) if *path == chunk.path => {
                        data.extend_from_slice(&chunk.data)
                    }
                    _ => files.push((chunk.path.clone(), chunk.data.to_vec())),
                }
            }
            _ => {}
        }
        if let Ok(Some(ready)) = &pushed {
            assert!(!previewing, "a preview request came out as a revision");
            let (header, files) = sent.as_ref().expect("a revision needs a header");
            assert_eq!(&ready.header, header);
            assert_eq!(&ready.files, files);
            assert_eq!(ready.files.len(), header.file_count as usize);
            let bytes: u64 = ready.files.iter().map(|(_, d)| d.len() as u64).sum();
            assert_eq!(bytes, header.total_bytes);
        }
        match event {
            Event::Header(_) => previewing = false,
            Event::Preview(_) => previewing = true,
            // A trailer ends the revision, verified or not.
            Event::Trailer(_) => {
                sent = None;
                previewing = false;
            }
            Event::Chunk(_) => {}
        }
    }
});
