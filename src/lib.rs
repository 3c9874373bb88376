//! toolgate: an inline policy gate between AI agents and the MCP tools they call.
//!
//! Layout, in the order a call flows through it:
//! - [`server`]: listeners, wiring of shared state, graceful shutdown.
//! - [`host`]: Host/Origin checks on both listeners (DNS-rebinding protection).
//! - [`identity`]: JWT verification -> `Caller` (agents) or `Approver`.
//! - [`mcp`]: JSON-RPC / MCP wire types, strict parsing, error codes; pure.
//! - [`session`]: MCP sessions of the session-based revisions, bound to agents.
//! - [`gate`]: THE pipeline for one request; the only place errors become responses.
//! - [`manifest`]: per-agent manifests compiled into the `PolicySet` snapshot.
//! - [`policy`]: `decide(manifest, call) -> Decision`; pure.
//! - [`ratelimit`]: governor limiters keyed by agent and (agent, tool).
//! - [`audit`]: hash-chained audit records, the writer task, `verify`.
//! - [`upstream`]: MCP clients to tool servers.
//! - [`hold`]: holds, approvals and grants in SQLite; waiting for decisions.
//! - [`notify`]: the webhook for new holds, off the call path.
//! - [`admin`]: the management plane: approver-authenticated API.
//! - [`reload`]: hot reload of the manifests, all or nothing, audited.
//! - [`metrics`]: Prometheus metrics with bounded labels.
//! - [`alert`]: alerts on probing, escalations, admin auth failures, audit errors.
//! - [`config`]: process configuration, validated with located problems.
//! - [`demo`]: the bundled demo tool server and the `demo` command.

pub mod admin;
pub mod alert;
pub mod audit;
pub mod config;
pub mod demo;
pub mod gate;
pub mod hold;
pub mod host;
pub mod identity;
pub mod manifest;
pub mod mcp;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod ratelimit;
pub mod reload;
#[doc(hidden)]
pub mod scratch;
pub mod server;
pub mod session;
pub mod upstream;
