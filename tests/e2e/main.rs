//! End-to-end tests: real redis-server, real gRPC and HTTP over loopback.

mod agent;
mod badges;
mod close_loop;
mod config_reference;
mod deploy;
mod gate;
mod git;
mod ingest_errors;
mod metrics;
mod real_cluster;
mod replicas;
mod status_page;
mod store_suite;
mod tls;
mod trust;
