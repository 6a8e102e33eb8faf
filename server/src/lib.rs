//! The Greenlight server: records pushes and pipelines, decides per agent which commit is
//! ready (the gate), and streams ready revisions to agents.
//!
//! Pure decisions live in [`gate`]; [`engine`] reads, decides and writes through a
//! [`store::Store`]; [`grpc`] and [`http`] are the edges.

pub mod catalog;
pub mod clock;
pub mod config;
pub mod engine;
pub mod gate;
pub mod git;
pub mod gitlab;
pub mod grpc;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod prepare;
pub mod progress;
pub mod redact;
pub mod run;
pub mod store;
pub mod tls;
pub mod trust;

pub use run::{Listeners, RunError, run};
