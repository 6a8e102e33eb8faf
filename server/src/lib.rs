//! The Greenlight server: records pushes and pipelines, decides per agent which commit is
//! ready (the gate), and streams ready revisions to agents.
//!
//! Pure decisions live in [`gate`]. Facts come in through [`ingest`] as small records in
//! the [`store`], whose change log carries every change to every replica; the [`evaluate`]
//! module runs the gate of each ref on the replica holding its lease and writes each
//! agent's state; each replica's [`index`] feeds its agents' streams. [`engine`] wires one
//! replica together; [`grpc`] and [`http`] are the edges.

pub mod catalog;
pub mod clock;
pub mod config;
pub mod engine;
pub mod evaluate;
pub mod gate;
pub mod git;
pub mod gitlab;
pub mod grpc;
pub mod http;
pub mod index;
pub mod ingest;
pub mod metrics;
pub mod preview;
pub mod progress;
pub mod queue;
pub mod redact;
pub mod run;
pub mod store;
pub mod sync_errors;
pub mod tls;
pub mod trust;

pub use run::{Listeners, RunError, run};
