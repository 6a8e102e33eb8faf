//! Greenlight's wire format (`greenlight.v1`) and the few pieces the server and the agent
//! must agree on byte for byte.

pub mod auth;
pub mod backoff;
pub mod codec;
pub mod connect;
pub mod ctl;
pub mod digest;
pub mod health_check;
pub mod preview;
pub mod report;
#[cfg(feature = "telemetry")]
pub mod telemetry;
pub mod tls;

/// Generated protobuf messages and gRPC stubs of the `greenlight.v1` package.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("greenlight.v1");
}

/// Encoded `FileDescriptorSet` of `proto/`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("greenlight_descriptor");
