//! Policy tooling a security team runs in CI: the shipped JSON Schemas,
//! `toolgate replay` and `toolgate check --against`.

// Test helpers may unwrap: a panic there is a failed assertion.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::process::Command;

use serde_json::{json, Value};

fn toolgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_toolgate"));
    c.env("TOOLGATE_AGENT_SECRET", support::SECRET)
        .env("TOOLGATE_ADMIN_SECRET", support::ADMIN_SECRET)
        .env("TG_TEST_AGENT_SECRET", support::SECRET)
        .env("TG_TEST_ADMIN_SECRET", support::ADMIN_SECRET)
        .env("TG_TEST_UPSTREAM_KEY", "k")
        .env("RUST_LOG", "warn");
    c
}

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &std::path::Path) -> Value {
    serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_shipped_schemas_accept_every_shipped_file_and_reject_mistakes() {
    let out = toolgate().args(["schema", "manifest"]).output().unwrap();
    let manifest: Value = serde_json::from_slice(&out.stdout).unwrap();
    let on_disk: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("schemas/manifest.schema.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest, on_disk,
        "`toolgate schema` prints what the repo ships"
    );
    let out = toolgate().args(["schema", "config"]).output().unwrap();
    let config: Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = jsonschema::validator_for(&manifest).unwrap();
    let c = jsonschema::validator_for(&config).unwrap();
    for f in std::fs::read_dir(root().join("tool-manifests")).unwrap() {
        let p = f.unwrap().path();
        let errors: Vec<String> = m
            .iter_errors(&yaml(&p))
            .map(|e| format!("{} {e}", e.instance_path().as_str()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", p.display());
    }
    assert!(c.is_valid(&yaml(&root().join("toolgate.yaml"))));
    for bad in [
        json!({"agent": "a", "tools": [{"name": "x", "aproval": "required"}]}),
        json!({"agent": "a", "rate_limit": "5/fortnight"}),
        json!({"tools": []}),
    ] {
        assert!(!m.is_valid(&bad), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_shows_what_a_manifest_change_would_change() {
    let h = support::Harness::start().await;
    let t = h.token("billing-bot");
    h.call(
        &t,
        "billing__get_invoice",
        json!({"invoice_id": "INV-000001"}),
    )
    .await;
    h.call(&t, "billing__echo", json!({"text": "x"})).await;
    h.call(&t, "billing__delete_x", json!({})).await;
    h.audit().await;
    // The proposed policy drops echo and lets get_invoice take any id.
    let proposed = support::BILLING_BOT
        .replace(
            "  - name: billing__echo\n    rate_limit: { rate: 3/min, burst: 3 }\n",
            "",
        )
        .replace("pattern: \"^INV-[0-9]{6}$\"", "minLength: 1");
    std::fs::write(h.dir.join("tool-manifests/billing-bot.yaml"), proposed).unwrap();
    let (dir, audit) = (h.dir.clone(), h.dir.join("audit.jsonl"));
    let out = tokio::task::spawn_blocking(move || {
        toolgate()
            .args(["replay"])
            .arg(&audit)
            .arg("--config")
            .arg(dir.join("toolgate.yaml"))
            .arg("--fail-on-change")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("billing-bot billing__echo: allow -> deny (unlisted"),
        "{stdout}"
    );
    assert!(
        stdout.contains("3 call(s) replayed, 1 would change: allow -> deny: 1"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_against_warns_about_rules_that_match_no_live_tool() {
    let manifest = "agent: a\ntools:\n  - name: billing__get_invoice\n  - name: billing__get_invoce\n  - name: \"billing__get_*\"\ndeny:\n  - name: \"*__drop_*\"\n";
    let h = support::Harness::with(support::Opts {
        manifests: &[("a.yaml", manifest)],
        ..support::Opts::default()
    })
    .await;
    let dir = h.dir.clone();
    let out = tokio::task::spawn_blocking(move || {
        toolgate()
            .args(["check", "--against", "--config"])
            .arg(dir.join("toolgate.yaml"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("upstream billing: 7 tool(s)"), "{stdout}");
    assert!(
        stdout.contains("a.yaml:4: a: tools[1] \"billing__get_invoce\" matches no upstream tool"),
        "{stdout}"
    );
    assert!(
        stdout.contains("deny[0] \"*__drop_*\" matches no upstream tool"),
        "{stdout}"
    );
    assert!(stdout.contains("2 warning(s)"), "{stdout}");
}
