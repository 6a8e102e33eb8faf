//! The Greenlight agent: keeps one stream to the server, assembles each ready revision and
//! hands it to the cluster side.

pub mod assemble;
pub mod client;
pub mod session;
