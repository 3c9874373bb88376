//! Arbitrary calls against a fixed policy. The property: the decision never
//! allows what the manifest does not allow: an allowed tool is listed, not
//! denied, its arguments satisfy its schema, and it is not a call the
//! manifest holds for a human.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use toolgate::manifest::{self, Manifest};
use toolgate::policy::{decide, Guard, Verdict};

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

fuzz_target!(|data: &[u8]| {
    // The first line is the tool name, the rest the arguments (JSON).
    let text = String::from_utf8_lossy(data);
    let (tool, rest) = text.split_once('\n').unwrap_or((&text, "{}"));
    let Ok(args) = serde_json::from_str::<Value>(rest) else {
        return;
    };
    let (guard, m) = fixture();
    let d = decide(guard, Some(m), "billing-bot", tool, &args);
    if matches!(d.verdict, Verdict::Allow) {
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
            // Self-reference survives case, width, compatibility forms and
            // invisible characters: fold before comparing.
            let principal = args
                .get("principal")
                .and_then(Value::as_str)
                .map(toolgate::policy::fold_identity);
            assert_ne!(
                principal.as_deref(),
                Some("billing-bot"),
                "allowed a self-grant: {args}"
            );
        }
    }
});
