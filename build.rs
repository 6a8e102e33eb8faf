//! Compiles `proto/` without a system `protoc`: protox parses the files in pure Rust, the
//! descriptor set feeds both code generation and gRPC reflection.

use std::{env, fs, path::PathBuf};

use prost_types::FileDescriptorSet;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/greenlight/v1/types.proto",
        "proto/greenlight/v1/preview.proto",
        "proto/greenlight/v1/agent.proto",
        "proto/greenlight/v1/admin.proto",
        "proto/greenlight/v1/ingest.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let descriptors: FileDescriptorSet = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("greenlight_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        // Small per-call buffers: an idle agent stream holds them for its whole life.
        .codec_path("crate::codec::LeanCodec")
        // Manifest chunks are slices of files shared by every agent: no copies.
        .bytes(".greenlight.v1.ManifestChunk.data")
        .compile_fds(descriptors)?;
    Ok(())
}
