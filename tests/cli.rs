//! The command line, run as a user would: the built binary, real files.

// Test helpers may unwrap: a panic there is a failed assertion.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use serde_json::json;

use support::toolgate_command as toolgate;

/// Runs `cmd`, which must succeed; returns its stdout.
#[track_caller]
fn succeeds(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_accepts_the_shipped_config_and_summarises_each_agent() {
    let out = toolgate()
        .args(["check", "--config"])
        .arg(root().join("toolgate.yaml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("billing-bot: 3 tool rule(s), 1 deny rule(s)")),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("ops-bot: ")),
        "{stdout}"
    );
    assert!(stdout.contains("ok: 2 agent(s)"), "{stdout}");
}

#[test]
fn check_reports_every_problem_with_file_line_column_and_key_path() {
    let dir = support::temp_dir("check");
    std::fs::copy(root().join("toolgate.yaml"), dir.join("toolgate.yaml")).unwrap();
    std::fs::write(
        dir.join("tool-manifests/a.yaml"),
        "agent: a\nrate_limit: 5/fortnight\ntools:\n  - name: x\n    approvals: 0\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("tool-manifests/b.yaml"),
        "agent: b\ntools:\n  - name: y\n    argumets: {}\n",
    )
    .unwrap();
    let out = toolgate()
        .args(["check", "--config"])
        .arg(dir.join("toolgate.yaml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("a.yaml:2:13: rate_limit:"), "{err}");
    assert!(err.contains("a.yaml:5:16: tools[0].approvals:"), "{err}");
    assert!(
        err.contains("b.yaml:4:5: tools[0].argumets: unknown field `argumets`"),
        "{err}"
    );
    assert!(err.contains("argumets"), "{err}");
    assert!(err.contains("3 problem(s) found"), "{err}");
}

#[test]
fn explain_prints_decision_rule_location_and_reason_without_calling_anything() {
    let cfg = root().join("toolgate.yaml");
    let run = |tool: &str, args: &str| {
        succeeds(toolgate().args(["explain", "--config"]).arg(&cfg).args([
            "--agent",
            "billing-bot",
            "--tool",
            tool,
            "--args",
            args,
        ]))
    };
    let o = run("billing__get_invoice", r#"{"invoice_id":"INV-000001"}"#);
    assert!(
        o.contains("decision: allow")
            && o.contains("rule:     tools[0] (")
            && o.contains("billing-bot.yaml:"),
        "{o}"
    );
    let o = run("billing__delete_invoice", "{}");
    assert!(
        o.contains("decision: deny") && o.contains("deny[0]") && o.contains("never automated"),
        "{o}"
    );
    let o = run("billing__get_invoice", r#"{"invoice_id":"x"}"#);
    assert!(
        o.contains("decision: deny") && o.contains("/invoice_id:"),
        "{o}"
    );
    let o = run(
        "billing__refund",
        r#"{"invoice_id":"INV-000001","amount":5}"#,
    );
    assert!(
        o.contains("decision: hold") && o.contains("approvals needed: 2"),
        "{o}"
    );
}

#[test]
fn token_mints_verifiable_tokens_and_refuses_without_an_hs256_key() {
    let cfg = root().join("toolgate.yaml");
    let out = toolgate()
        .args(["token", "--config"])
        .arg(&cfg)
        .args(["--agent", "billing-bot", "--ttl", "5m"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let tok = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(tok.matches('.').count(), 2);
    // A config whose only agent key is public refuses to mint.
    let dir = support::temp_dir("token");
    let pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEVs/o5+uQbTjL3chynL4wXgUg2R9\nq9UU8I5mEovUf86QZ7kOBIjJwqnzD1omageEHWwHdBO6B+dFabmdT9POxg==\n-----END PUBLIC KEY-----\n";
    std::fs::write(dir.join("es.pem"), pem).unwrap();
    std::fs::write(dir.join("toolgate.yaml"), "auth:\n  agents:\n    issuer: i\n    audience: a\n    keys:\n      - es256: { public_key_pem: es.pem }\n").unwrap();
    let out = toolgate()
        .args(["token", "--config"])
        .arg(dir.join("toolgate.yaml"))
        .args(["--agent", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refusing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn audit_verify_names_the_first_bad_record() {
    let dir = support::temp_dir("verify");
    let p = dir.join("audit.jsonl");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (a, _t) = toolgate::audit::Auditor::start(&p).unwrap();
        for i in 0..5 {
            a.submit(toolgate::audit::Record {
                event: "call",
                tool: Some(format!("t{i}")),
                ..Default::default()
            })
            .unwrap();
        }
        a.flush().await;
    });
    let out = toolgate()
        .args(["audit", "verify"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("5 records"));
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replacen("\"t3\"", "\"tX\"", 1);
    std::fs::write(&p, text).unwrap();
    let out = toolgate()
        .args(["audit", "verify"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("line 4 (seq 4)"), "{s}");
}

#[test]
fn demo_starts_and_its_printed_calls_show_allow_deny_and_schema_error() {
    // The demo writes its files under the temp dir and keeps them (for
    // `audit verify` afterwards): here that is a scratch dir.
    let tmp = support::temp_dir("demo");
    let mut child = toolgate()
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env("TMPDIR", &*tmp)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let _guard = Kill(child);
    let mut url = String::new();
    let mut token = String::new();
    let mut curls = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("  agents connect to:  ") {
            url = rest.split_whitespace().next().unwrap().to_owned();
        }
        if let Some(t) = line.strip_prefix("export TOKEN=") {
            token = t.to_owned();
        }
        curls += usize::from(line.starts_with("curl "));
        if line == "ready" {
            break;
        }
    }
    assert!(
        url.starts_with("http://127.0.0.1:") && !token.is_empty() && curls == 3,
        "{url} {curls}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = toolgate::upstream::http_client();
        let call = |name: &'static str, args: serde_json::Value| {
            let body = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":name,"arguments":args,"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}});
            let req = http::Request::post(&url)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", "tools/call")
                .header("mcp-name", name)
                .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
                .unwrap();
            let client = client.clone();
            async move {
                use http_body_util::BodyExt;
                let r = client.request(req).await.unwrap();
                serde_json::from_slice::<serde_json::Value>(&r.into_body().collect().await.unwrap().to_bytes()).unwrap()
            }
        };
        let v = call("billing__get_invoice", json!({"invoice_id": "INV-000042"})).await;
        assert_eq!(v["result"]["structuredContent"]["invoice_id"], "INV-000042", "{v}");
        let v = call("billing__delete_invoice", json!({"invoice_id": "INV-000042"})).await;
        assert_eq!(v["error"]["code"], -32003, "{v}");
        let v = call("billing__get_invoice", json!({"invoice_id": "42", "extra": true})).await;
        assert_eq!(v["error"]["code"], -32602, "{v}");
    });
}

/// `toolgate token --plane admin --roles approver` mints a token the admin
/// API takes (and the data plane refuses); a data-plane token is refused
/// by the admin API. Each plane has its own issuer, audience and key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mints_admin_plane_tokens_the_admin_api_takes() {
    let h = support::Harness::start().await;
    let cfg = h.dir.join("toolgate.yaml");
    let mint = |args: &[&str]| {
        succeeds(toolgate().args(["token", "--config"]).arg(&cfg).args(args))
            .trim()
            .to_owned()
    };
    let admin = mint(&[
        "--agent", "carol", "--plane", "admin", "--roles", "approver",
    ]);
    let agent = mint(&["--agent", "billing-bot"]);
    let (s, v) = h
        .admin(http::Method::GET, "/v1/holds", Some(&admin), None)
        .await;
    assert_eq!(s, http::StatusCode::OK, "{v}");
    let (s, _) = h
        .admin(http::Method::GET, "/v1/holds", Some(&agent), None)
        .await;
    assert_eq!(s, http::StatusCode::UNAUTHORIZED);
    let v = h.call(&agent, "billing__echo", json!({"text": "hi"})).await;
    assert!(v.get("result").is_some(), "{v}");
    let (s, _, _) = h.post(Some(&admin), &[], "{}").await;
    assert_eq!(s, http::StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_cli_lists_shows_approves_and_denies() {
    let ops = "agent: ops-bot\ntools:\n  - name: billing__refund\n    approval: required\n";
    let h = support::Harness::with(support::Opts {
        manifests: &[("ops-bot.yaml", ops)],
        ..support::Opts::default()
    })
    .await;
    let t = h.token("ops-bot");
    let a = h
        .call(
            &t,
            "billing__refund",
            json!({"invoice_id": "INV-1", "amount": 3}),
        )
        .await;
    let b = h
        .call(
            &t,
            "billing__refund",
            json!({"invoice_id": "INV-2", "amount": 4}),
        )
        .await;
    let (ida, idb) = (
        a["error"]["data"]["hold_id"].as_str().unwrap().to_owned(),
        b["error"]["data"]["hold_id"].as_str().unwrap().to_owned(),
    );
    let admin = h.admin_url();
    let run = move |args: Vec<String>, token: String| {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || {
            let out = toolgate()
                .arg("holds")
                .args(&args)
                .args(["--admin", &admin])
                .env("TOOLGATE_TOKEN", token)
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    let approver = support::approver_token("carol", &["approver"], &["mfa"]);
    let (code, out, err) = run(vec!["list".into()], approver.clone()).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert!(out.lines().next().unwrap().starts_with("ID "), "{out}");
    assert!(
        out.contains(&ida)
            && out.contains(&idb)
            && out.contains("billing__refund")
            && out.contains("0/1"),
        "{out}"
    );
    let (_, out, _) = run(vec!["show".into(), ida.clone()], approver.clone())
        .await
        .unwrap();
    assert!(
        out.contains("status     pending") && out.contains("INV-1"),
        "{out}"
    );
    let (code, out, _) = run(
        vec![
            "approve".into(),
            ida.clone(),
            "--reason".into(),
            "ok".into(),
            "--for".into(),
            "10m".into(),
        ],
        approver.clone(),
    )
    .await
    .unwrap();
    assert_eq!(code, Some(0));
    assert!(
        out.contains("status     approved") && out.contains("carol") && out.contains("window"),
        "{out}"
    );
    let (code, out, _) = run(
        vec![
            "deny".into(),
            idb.clone(),
            "--reason".into(),
            "no".into(),
            "--json".into(),
        ],
        approver.clone(),
    )
    .await
    .unwrap();
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "denied");
    // Deciding again is refused with the API's reason; agent tokens are refused.
    let (code, _, err) = run(vec!["approve".into(), idb.clone()], approver)
        .await
        .unwrap();
    assert_eq!(code, Some(1));
    assert!(err.contains("409"), "{err}");
    let (code, _, err) = run(vec!["list".into()], t.clone()).await.unwrap();
    assert_eq!(code, Some(1));
    assert!(err.contains("401"), "{err}");
    let v = h
        .call(
            &t,
            "billing__refund",
            json!({"amount": 3, "invoice_id": "INV-1"}),
        )
        .await;
    assert!(v.get("result").is_some(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_shuts_down_gracefully_on_sigterm_with_the_audit_log_flushed() {
    let mut served = support::Served::start(
        "sigterm",
        "{ path: .toolgate/audit.jsonl, checkpoint: { key_file: keys/audit.key, every: 100 } }",
    )
    .await;
    let logs = served.stop().await;
    let (dir, token) = (&served.dir, &served.token);
    // Operator logs: JSON lines with the request's agent and decision, no token.
    assert!(!logs.contains(token), "a token reached the operator log");
    let json_lines: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        json_lines
            .iter()
            .any(|l| l["fields"]["message"] == "toolgate serving"),
        "{logs}"
    );
    assert!(
        json_lines
            .iter()
            .any(|l| l["span"]["agent.id"] == "billing-bot" && l["span"]["decision"] == "allow"),
        "{logs}"
    );
    let audit = dir.join(".toolgate/audit.jsonl");
    assert_eq!(
        toolgate::audit::verify(&audit),
        Ok(2),
        "the call's record, and the shutdown checkpoint, were flushed before exit"
    );
    // The closed log ends on a signed checkpoint; cutting it off shows.
    let verify = |extra: &[&str]| {
        toolgate()
            .args(["audit", "verify"])
            .arg(&audit)
            .arg("--key")
            .arg(dir.join("keys/audit.pub"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = verify(&["--require-tail-signed"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 signed checkpoint(s)"));
    let text = std::fs::read_to_string(&audit).unwrap();
    let first = text.lines().next().unwrap();
    std::fs::write(&audit, format!("{first}\n")).unwrap();
    let out = verify(&["--require-tail-signed"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(served.tools.received().len(), 1);
}
