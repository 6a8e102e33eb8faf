//! The Greenlight agent: keeps one stream to the server, and applies each ready revision to
//! its cluster with server-side apply, prunes, waits for health and reports back.
//!
//! Pure decisions live in [`manifest`], [`plan`] and [`health`]; [`cluster`], [`inventory`]
//! and [`lease`] talk to Kubernetes; [`client`] and [`session`] to the server.

pub mod assemble;
pub mod client;
pub mod cluster;
pub mod drift;
pub mod health;
pub mod health_watch;
pub mod impersonate;
pub mod inventory;
pub mod lease;
pub mod manifest;
pub mod metrics;
pub mod plan;
pub mod preview;
pub mod reconcile;
pub mod run;
pub mod session;
#[cfg(test)]
mod testing;
