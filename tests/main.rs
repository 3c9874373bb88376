//! toolgate's integration tests, one binary: each file beside this one is a
//! module (`cargo test --test integration adversarial::` runs one of them).
//! They start real toolgate servers and CLI processes on loopback; the
//! interop modules also drive the official Python and TypeScript MCP SDKs.

mod support;

mod adversarial;
mod audit_verify;
mod browser;
mod cli;
mod faults;
mod fuzz_seeds;
mod gate;
mod holds;
mod interop_node;
mod interop_python;
mod jwt;
mod operate;
mod relay;
mod stdio;
mod tls;
mod tooling;
