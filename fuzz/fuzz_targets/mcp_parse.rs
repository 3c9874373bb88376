//! Any bytes an agent can POST: the strict JSON-RPC/MCP parser must never
//! panic, and whatever it accepts must be a well-formed message whose
//! tools/call parameters either parse or are refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use toolgate::mcp::{self, Message};

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = mcp::parse_message(data) else {
        return;
    };
    match msg {
        Message::Request(req) => {
            assert!(!req.method.is_empty(), "a request has a method");
            if req.method == "tools/call" {
                if let Ok(call) = mcp::tool_call(&req.params) {
                    assert!(call.arguments.is_object(), "arguments are an object");
                    // Canonical form is stable (what holds are matched on).
                    let once = mcp::canonical_json(&call.arguments);
                    let again: serde_json::Value =
                        serde_json::from_str(&once).expect("canonical JSON parses");
                    assert_eq!(once, mcp::canonical_json(&again));
                }
            }
        }
        Message::Response { .. } => {}
    }
});
