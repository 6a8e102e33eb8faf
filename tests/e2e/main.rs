//! End-to-end tests: real redis-server, real gRPC and HTTP over loopback.

mod gate;
