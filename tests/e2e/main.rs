//! End-to-end tests: real redis-server, real gRPC and HTTP over loopback.

mod agent;
mod badges;
mod chaos;
mod close_loop;
mod cluster;
mod config_reference;
mod deploy;
mod durability;
mod gate;
mod git;
mod ingest_errors;
mod limits;
mod metrics;
mod preview;
mod real_cluster;
mod replicas;
mod runtime_agents;
mod shutdown;
mod status_page;
mod store_suite;
mod stream_end;
mod tls;
mod trust;
