//! The fuzz targets' properties as plain functions, so that one definition
//! serves both: each target in `fuzz_targets/` hands libFuzzer's input to
//! one of these, and `tests/fuzz_seeds.rs` replays every file of
//! `fuzz/seeds/<target>/` through the same function under `cargo test`.
//! Each panics when its property fails, and returns what the input came to
//! (for the replay's checks of what a seed is for).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;
use toolgate::config::Config;
use toolgate::manifest::{self, Manifest};
use toolgate::mcp::{self, Message};
use toolgate::policy::{decide as decide_call, Guard, Verdict};

/// Any bytes an agent can POST: the strict JSON-RPC/MCP parser never
/// panics, and whatever it accepts is a well-formed message whose
/// tools/call parameters either parse or are refused; requests read in one
/// pass come out as the general path reads them. Returns "refused",
/// "request", "tools/call", "tools/call refused" or "response".
pub fn mcp_parse(data: &[u8]) -> &'static str {
    let parsed = mcp::parse_message(data);
    // Requests are read in one pass, everything else as a tree: the answer
    // (message, refusal and its wording) is the tree's in every case.
    assert_eq!(
        parsed,
        mcp::parse_strict(data).and_then(mcp::message_from_value),
        "the one-pass read differs from the general path"
    );
    let Ok(msg) = parsed else {
        return "refused";
    };
    match msg {
        Message::Request(req) => {
            assert!(!req.method.is_empty(), "a request has a method");
            if req.method != "tools/call" {
                return "request";
            }
            let Ok(call) = mcp::tool_call(req.params) else {
                return "tools/call refused";
            };
            assert!(call.arguments.is_object(), "arguments are an object");
            // Canonical form is stable (what holds are matched on).
            let once = mcp::canonical_json(&call.arguments);
            let again: Value = serde_json::from_str(&once).expect("canonical JSON parses");
            assert_eq!(once, mcp::canonical_json(&again));
            "tools/call"
        }
        Message::Response { .. } => "response",
    }
}

/// Any text as a manifest and as a config: problems are reported, never a
/// panic; a manifest that compiles answers its lookups without panicking.
/// Returns whether it compiled as a manifest and loaded as a config.
pub fn policy_parse(data: &[u8]) -> (bool, bool) {
    let Ok(text) = std::str::from_utf8(data) else {
        return (false, false);
    };
    let mut problems = Vec::new();
    let compiled = match manifest::compile(
        Path::new("/fuzz/tool-manifests/agent.yaml"),
        text,
        &mut problems,
    ) {
        Some(m) => {
            for name in ["billing__get_invoice", "", "*", "a__b"] {
                let _ = m.tool_rule(name);
                let _ = m.deny_rule(name);
                let _ = m.prompt_rule(name);
            }
            let _ = m.resource_rule("billing://invoices/1");
            true
        }
        None => {
            assert!(!problems.is_empty(), "a refused manifest says why");
            false
        }
    };
    let config = Config::from_yaml(Path::new("/fuzz/toolgate.yaml"), text).is_ok();
    (compiled, config)
}

const MANIFEST: &str = r#"
agent: billing-bot
tools:
  - name: billing__get_invoice
    arguments:
      type: object
      properties:
        invoice_id: { type: string, pattern: "^INV-[0-9]{6}$" }
      required: [invoice_id]
      additionalProperties: false
  - name: billing__refund
    approval: required
  - name: "billing__list_*"
  - name: iam__grant_role
    hold_when:
      - { pointer: /principal, equals: "${agent}" }
      - { pointer: /role, in: [admin, owner] }
deny:
  - name: "*__delete_*"
"#;

fn fixture() -> &'static (Guard, Manifest) {
    static F: OnceLock<(Guard, Manifest)> = OnceLock::new();
    F.get_or_init(|| {
        let mut b = globset::GlobSetBuilder::new();
        for p in toolgate::config::DEFAULT_ESCALATION_TOOLS {
            b.add(toolgate::config::tool_glob(p).expect("glob"));
        }
        let guard = Guard::new(
            b.build().expect("globset"),
            vec![PathBuf::from("/etc/toolgate/toolgate.yaml")],
            vec![PathBuf::from("/etc/toolgate/tool-manifests")],
            PathBuf::from("/srv/toolgate"),
            toolgate::config::normalize_path,
        );
        let mut problems = Vec::new();
        let m = manifest::compile(
            Path::new("/etc/toolgate/tool-manifests/billing-bot.yaml"),
            MANIFEST,
            &mut problems,
        )
        .expect("the fixture compiles");
        (guard, m)
    })
}

/// Arbitrary calls against a fixed policy (the first line is the tool
/// name, the rest the arguments as JSON). The property: the decision never
/// allows what the manifest does not allow: an allowed tool is listed, not
/// denied, its arguments satisfy its schema, and it is not a call the
/// manifest holds for a human. Returns the verdict ("allow", "deny",
/// "invalid", "hold"), or `None` when the arguments are not JSON.
pub fn decide(data: &[u8]) -> Option<&'static str> {
    let text = String::from_utf8_lossy(data);
    let (tool, rest) = text.split_once('\n').unwrap_or((&text, "{}"));
    let args = serde_json::from_str::<Value>(rest).ok()?;
    let (guard, m) = fixture();
    let d = decide_call(guard, Some(m), "billing-bot", tool, &args);
    Some(match d.verdict {
        Verdict::Allow => {
            assert_allowed(m, tool, &args);
            "allow"
        }
        Verdict::Deny => "deny",
        Verdict::Invalid(_) => "invalid",
        Verdict::Hold { .. } => "hold",
    })
}

fn assert_allowed(m: &Manifest, tool: &str, args: &Value) {
    assert!(
        m.deny_rule(tool).is_none(),
        "allowed a denied tool {tool:?}"
    );
    let rule = m
        .tool_rule(tool)
        .unwrap_or_else(|| panic!("allowed an unlisted tool {tool:?}"));
    assert!(
        tool == "billing__get_invoice"
            || tool.starts_with("billing__list_")
            || tool == "iam__grant_role",
        "allowed {tool:?} by rule {rule}"
    );
    assert_ne!(tool, "billing__refund", "approval: required was allowed");
    if tool == "billing__get_invoice" {
        let id = args.get("invoice_id").and_then(Value::as_str).unwrap_or("");
        assert!(
            args.as_object().is_some_and(|o| o.len() == 1)
                && id.len() == 10
                && id.starts_with("INV-")
                && id[4..].bytes().all(|b| b.is_ascii_digit()),
            "allowed arguments the schema refuses: {args}"
        );
    }
    if tool == "iam__grant_role" {
        let role = args.get("role").and_then(Value::as_str);
        assert!(
            !matches!(role, Some("admin" | "owner")),
            "allowed a held role: {args}"
        );
        // Self-reference survives case, width, compatibility forms,
        // invisible characters and confusables: fold before comparing.
        let principal = args
            .get("principal")
            .and_then(Value::as_str)
            .map(toolgate::policy::fold_identity);
        assert_ne!(
            principal,
            Some(toolgate::policy::fold_identity("billing-bot")),
            "allowed a self-grant: {args}"
        );
    }
}
