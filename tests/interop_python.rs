//! Interop with the official Python MCP SDK, both lines: 1.x (2025-11-25,
//! sessions) and 2.x (2026-07-28, stateless), as clients of toolgate and as
//! the upstream servers behind it, in every bridging direction. The pinned
//! venvs come from `scripts/setup-interop.sh` (run by `scripts/test.sh`).

// Test helpers may unwrap: a panic there is a failed assertion.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};
use support::{Harness, Opts};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python(line: u8) -> String {
    let var = format!("TOOLGATE_PY{line}");
    std::env::var(&var).unwrap_or_else(|_| {
        panic!("{var} is not set: run `bash scripts/test.sh` (or `eval \"$(bash scripts/setup-interop.sh)\"` and export TOOLGATE_PY1 TOOLGATE_PY2) to create the pinned MCP SDK venvs")
    })
}

fn script(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/interop")
        .join(name)
}

/// Starts the SDK's MCP server (with its DNS-rebinding protection on, so
/// toolgate must present the upstream's own Host); returns its URL.
fn upstream(line: u8) -> (Kill, String) {
    upstream_with(line, &[])
}

/// [`upstream`] with extra environment for the server.
fn upstream_with(line: u8, env: &[(&str, &str)]) -> (Kill, String) {
    let mut child = Command::new(python(line))
        .arg(script("upstream_server.py"))
        .arg("0")
        .env("UPSTREAM_DNS_PROTECT", "1")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python upstream starts");
    let out = child.stdout.take().unwrap();
    let guard = Kill(child);
    let mut line_buf = String::new();
    BufReader::new(out).read_line(&mut line_buf).unwrap();
    let port = line_buf
        .trim()
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("upstream said {line_buf:?}"));
    (guard, format!("http://127.0.0.1:{port}/mcp"))
}

/// Runs the SDK client with `args`; returns its JSON lines by scenario.
async fn client(
    line: u8,
    mode: Option<&str>,
    url: &str,
    token: &str,
    args: Vec<String>,
) -> Vec<Value> {
    client_with(line, mode, url, token, args, &[]).await
}

/// [`client`] with extra environment for the probe.
async fn client_with(
    line: u8,
    mode: Option<&str>,
    url: &str,
    token: &str,
    args: Vec<String>,
    env: &[(&str, &str)],
) -> Vec<Value> {
    let (py, url, token, mode) = (
        python(line),
        url.to_owned(),
        token.to_owned(),
        mode.map(str::to_owned),
    );
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut c = Command::new(py);
        c.arg(script("client_check.py"))
            .args(&args)
            .env("TOOLGATE_URL", &url)
            .env("TOOLGATE_TOKEN", &token)
            .env("TOOLGATE_TIMEOUT", "20")
            .envs(env);
        if let Some(m) = mode {
            c.env("TOOLGATE_MODE", m);
        }
        let out = c.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
            .collect();
        assert!(
            out.status.success(),
            "client exited {:?}:\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        lines
    })
    .await
    .unwrap()
}

fn s(v: &str) -> String {
    v.to_owned()
}

/// One client SDK line against one server SDK line, through toolgate.
async fn pair(client_line: u8, mode: Option<&str>, server_line: u8) {
    let what = format!(
        "client {client_line}.x{} -> toolgate -> server {server_line}.x",
        mode.map(|m| format!(" ({m})")).unwrap_or_default()
    );
    let (_server, url) = upstream(server_line);
    let h = Harness::with(Opts {
        upstream: Some(url),
        ..Opts::default()
    })
    .await;
    let token = h.token("billing-bot");
    let out = client(
        client_line,
        mode,
        &h.url,
        &token,
        vec![
            s("list_tools"),
            s("call"),
            s("billing__get_invoice"),
            s(r#"{"invoice_id":"INV-000001"}"#),
            s("call"),
            s("billing__get_invoice"),
            s(r#"{"invoice_id":"nope"}"#),
            s("call"),
            s("billing__unlisted"),
            s("{}"),
            s("call"),
            s("billing__delete_invoice"),
            s(r#"{"invoice_id":"INV-000001"}"#),
            s("calls"),
            s("5"),
            s("billing__echo"),
            s(r#"{"text":"hi"}"#),
            s("call"),
            s("billing__refund"),
            s(r#"{"invoice_id":"INV-000001","amount":5}"#),
        ],
    )
    .await;
    let connect = &out[0];
    assert_eq!(connect["ok"], true, "{what}: {connect}");
    let want_era = if client_line == 2 {
        "modern"
    } else {
        "handshake"
    };
    assert_eq!(connect["era"], want_era, "{what}: {connect}");
    let tools: Vec<&str> = out[1]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        tools,
        ["billing__echo", "billing__get_invoice", "billing__refund"],
        "{what}"
    );
    let ok = &out[2];
    assert_eq!(
        (ok["ok"].as_bool(), ok["is_error"].as_bool()),
        (Some(true), Some(false)),
        "{what}: {ok}"
    );
    assert_eq!(ok["result"]["invoice_id"], "INV-000001", "{what}: {ok}");
    let bad = &out[3];
    assert_eq!(bad["code"], -32602, "{what}: {bad}");
    assert_eq!(
        bad["data"]["errors"][0]["pointer"], "/invoice_id",
        "{what}: {bad}"
    );
    assert_eq!(
        (out[4]["code"].as_i64(), out[4]["data"]["rule"].as_str()),
        (Some(-32003), Some("unlisted")),
        "{what}: {}",
        out[4]
    );
    assert_eq!(
        (out[5]["code"].as_i64(), out[5]["data"]["rule"].as_str()),
        (Some(-32003), Some("deny[0]")),
        "{what}: {}",
        out[5]
    );
    let calls = &out[6];
    assert_eq!(
        calls["codes"],
        json!([0, 0, 0, -32029, -32029]),
        "{what}: {calls}"
    );
    assert!(
        calls["errors"][0]["data"]["retry_after_ms"]
            .as_u64()
            .is_some(),
        "{what}: {calls}"
    );
    let held = &out[7];
    assert_eq!(held["code"], -32010, "{what}: {held}");
    let hold = held["data"]["hold_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: {held}"))
        .to_owned();

    // The approver approves; the same SDK client's identical retry succeeds.
    let (status, _) = h
        .approve(&hold, "carol", json!({"reason": "interop"}))
        .await;
    assert_eq!(status, http::StatusCode::OK);
    let out = client(
        client_line,
        mode,
        &h.url,
        &token,
        vec![
            s("call"),
            s("billing__refund"),
            s(r#"{"amount":5,"invoice_id":"INV-000001"}"#),
        ],
    )
    .await;
    assert_eq!(
        (out[1]["ok"].as_bool(), out[1]["is_error"].as_bool()),
        (Some(true), Some(false)),
        "{what}: {}",
        out[1]
    );

    // Nothing refused reached the upstream: only these were allowed.
    let audit = h.audit().await;
    let allowed: Vec<(&str, &str)> = audit
        .iter()
        .filter(|r| matches!(r["event"].as_str(), Some("call" | "grant_used")))
        .filter(|r| matches!(r["decision"].as_str(), Some("allow" | "approved")))
        .map(|r| (r["tool"].as_str().unwrap(), r["decision"].as_str().unwrap()))
        .collect();
    assert_eq!(
        allowed,
        [
            ("billing__get_invoice", "allow"),
            ("billing__echo", "allow"),
            ("billing__echo", "allow"),
            ("billing__echo", "allow"),
            ("billing__refund", "approved")
        ],
        "{what}"
    );
    assert!(toolgate::audit::verify(&h.dir.join("audit.jsonl")).is_ok());
    // Each upstream is spoken to in the newest revision it supports.
    let spoken = h.server.gate.0.upstreams[0].version();
    assert_eq!(
        spoken,
        Some(if server_line == 2 {
            "2026-07-28"
        } else {
            "2025-11-25"
        }),
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_1x_client_through_toolgate_to_sdk_1x_server() {
    pair(1, None, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_2x_client_through_toolgate_to_sdk_2x_server() {
    pair(2, None, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_2x_stateless_client_bridged_to_a_2025_session_server() {
    pair(2, Some("2026-07-28"), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_1x_session_client_bridged_to_a_2026_server() {
    pair(1, None, 2).await;
}

/// Each SDK line's server behind HTTPS (uvicorn's TLS, certificate from a
/// CA only toolgate's `tls.ca_file` trusts), called by the same line's SDK
/// client through toolgate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_clients_reach_sdk_servers_over_https() {
    let dir = support::temp_dir("interop-tls");
    let ca = crate::tls::Ca::new("interop CA");
    let ca_file = ca.write_pem(&dir, "ca.pem");
    let (_, _, cert, key) = ca.issue();
    std::fs::write(dir.join("server.pem"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    for line in [1u8, 2] {
        let (_server, url) = upstream_with(
            line,
            &[
                ("UPSTREAM_TLS_CERT", cert.to_str().unwrap()),
                ("UPSTREAM_TLS_KEY", key.to_str().unwrap()),
            ],
        );
        let url = url.replace("http://127.0.0.1", "https://localhost");
        let h = Harness::with(Opts {
            upstreams: Some(format!(
                "upstreams:\n  - name: billing\n    url: {url}\n    tls: {{ ca_file: \"{}\" }}",
                ca_file.display()
            )),
            ..Opts::default()
        })
        .await;
        let token = h.token("billing-bot");
        let out = client(
            line,
            None,
            &h.url,
            &token,
            vec![
                s("call"),
                s("billing__get_invoice"),
                s(r#"{"invoice_id":"INV-000001"}"#),
            ],
        )
        .await;
        assert_eq!(out[0]["ok"], true, "{line}.x: {out:?}");
        let call = &out[1];
        assert_eq!(call["ok"], true, "{line}.x over https: {call}");
        assert_eq!(
            call["result"]["invoice_id"], "INV-000001",
            "{line}.x: {call}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_clients_without_a_valid_token_cannot_connect() {
    let (_server, url) = upstream(2);
    let h = Harness::with(Opts {
        upstream: Some(url),
        ..Opts::default()
    })
    .await;
    for line in [1, 2] {
        let py = python(line);
        let hurl = h.url.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(py)
                .arg(script("client_check.py"))
                .arg("list_tools")
                .env("TOOLGATE_URL", hurl)
                .env("TOOLGATE_TOKEN", "not-a-jwt")
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert_eq!(
            out.status.code(),
            Some(3),
            "SDK {line}.x connected without a valid token: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(h.audit().await.iter().all(|r| r["event"] == "auth_failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_client_works_with_both_sdk_lines() {
    let h = Harness::start().await;
    let token = h.token("billing-bot");
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python_client.py");
    for line in [1, 2] {
        let run = |tool: &'static str, args: &'static str| {
            let (py, url, token, example) =
                (python(line), h.url.clone(), token.clone(), example.clone());
            tokio::task::spawn_blocking(move || {
                Command::new(py)
                    .arg(example)
                    .args([tool, args])
                    .env("TOOLGATE_URL", url)
                    .env("TOOLGATE_TOKEN", token)
                    .output()
                    .unwrap()
            })
        };
        let out = run("billing__get_invoice", r#"{"invoice_id": "INV-000042"}"#)
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "SDK {line}.x: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.starts_with(
                "tools: billing__echo, billing__get_invoice, billing__grant_role, billing__refund"
            ),
            "{stdout}"
        );
        assert!(
            stdout.contains(r#"{"ok": true, "text": "Invoice INV-000042"#),
            "{stdout}"
        );
        let out = run("billing__delete_invoice", r#"{"invoice_id": "INV-000042"}"#)
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        let refusal: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(refusal["error"]["code"], -32003);
        assert_eq!(refusal["error"]["data"]["rule"], "deny[0]");
    }
}

/// SDK clients of both lines (and the 2.x client pinned to stateless
/// 2026-07-28) reach stdio servers through toolgate: PyPI `mcp-server-time`
/// (the real server, on the Python SDK 2.x, answering 2025-11-25) and a
/// server that speaks only 2025-06-18.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_clients_reach_stdio_servers_of_older_revisions() {
    let venv_bin = std::path::Path::new(&python(2))
        .parent()
        .expect("venv bin")
        .to_path_buf();
    let time_server = venv_bin.join("mcp-server-time");
    let upstreams = format!(
        "upstreams:\n  - name: time\n    command: [\"{}\", --local-timezone, Etc/UTC]\n  - name: old\n    command: [\"{}\", demo-tools]\n    env: {{ DEMO_PROTOCOL: \"2025-06-18\" }}",
        time_server.display(),
        env!("CARGO_BIN_EXE_toolgate"),
    );
    let h = Harness::with(Opts {
        manifests: &[(
            "bot.yaml",
            "agent: bot\ntools:\n  - name: time__get_current_time\n    arguments: { type: object, properties: { timezone: { enum: [Europe/Paris, Etc/UTC] } } }\n  - name: old__echo\n",
        )],
        upstreams: Some(upstreams),
        ..Opts::default()
    })
    .await;
    let token = h.token("bot");
    for (line, mode) in [(1, None), (2, None), (2, Some("2026-07-28"))] {
        let what = format!("client {line}.x {mode:?}");
        let out = client(
            line,
            mode,
            &h.url,
            &token,
            vec![
                s("list_tools"),
                s("call"),
                s("time__get_current_time"),
                s(r#"{"timezone":"Europe/Paris"}"#),
                s("call"),
                s("time__get_current_time"),
                s(r#"{"timezone":"America/New_York"}"#),
                s("call"),
                s("old__echo"),
                s(r#"{"text":"from 2025-06-18"}"#),
            ],
        )
        .await;
        assert_eq!(out[0]["ok"], true, "{what}: {}", out[0]);
        assert_eq!(
            out[1]["tools"],
            json!(["old__echo", "time__get_current_time"]),
            "{what}"
        );
        let ok = &out[2];
        assert_eq!(ok["ok"], true, "{what}: {ok}");
        assert_eq!(ok["result"]["timezone"], "Europe/Paris", "{what}: {ok}");
        assert!(
            ok["result"]["datetime"]
                .as_str()
                .is_some_and(|d| d.len() >= 19),
            "{what}: {ok}"
        );
        assert_eq!(out[3]["code"], -32602, "{what}: {}", out[3]);
        assert_eq!(
            out[3]["data"]["errors"][0]["pointer"], "/timezone",
            "{what}: {}",
            out[3]
        );
        assert_eq!(out[4]["text"], "from 2025-06-18", "{what}: {}", out[4]);
    }
    let ups = &h.server.gate.0.upstreams;
    assert_eq!(ups[0].version(), Some("2025-11-25"));
    assert_eq!(ups[1].version(), Some("2025-06-18"));
}

/// A 2.x server tool that asks the user (an elicitation resolver): a 2.x
/// client on 2026-07-28 gets the `input_required` round through toolgate and
/// retries with its answer; with `approval: required`, the approval covers
/// the call's rounds once; a 1.x client (2025-11-25 session) gets the same
/// question asked on its stream by toolgate, which drives the rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_required_rounds_reach_2x_and_1x_clients_of_a_2x_server() {
    input_rounds(2).await;
}

/// The reverse: a 1.x server asks mid-call (elicitation/create); a 2.x
/// client on 2026-07-28 gets it as an input_required round made by toolgate
/// (the call parked until the retry), a 1.x client on its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1x_servers_mid_call_ask_reaches_2x_and_1x_clients() {
    input_rounds(1).await;
}

async fn input_rounds(server_line: u8) {
    let (_server, url) = upstream(server_line);
    let h = Harness::with(Opts {
        upstream: Some(url),
        manifests: &[
            (
                "free-bot.yaml",
                "agent: free-bot\ntools:\n  - name: billing__confirm_refund\n",
            ),
            (
                "ops-bot.yaml",
                "agent: ops-bot\ntools:\n  - name: billing__confirm_refund\n    approval: required\n",
            ),
        ],
        ..Opts::default()
    })
    .await;
    let call = || {
        vec![
            s("call"),
            s("billing__confirm_refund"),
            s(r#"{"invoice_id":"INV-000001"}"#),
        ]
    };
    let confirm = [("TOOLGATE_CONFIRM", "1")];
    let free = h.token("free-bot");
    for line in [2, 1] {
        let out = client_with(line, None, &h.url, &free, call(), &confirm).await;
        assert_eq!(out[1]["scenario"], "elicited", "{line}.x: {out:?}");
        assert_eq!(out[1]["message"], "Refund invoice INV-000001?", "{line}.x");
        assert_eq!(out[2]["ok"], true, "{line}.x: {out:?}");
        assert_eq!(out[2]["text"], "refunded INV-000001", "{line}.x: {out:?}");
    }
    // Approval required: held, approved, then the approved call's rounds.
    let ops = h.token("ops-bot");
    let out = client_with(2, None, &h.url, &ops, call(), &confirm).await;
    assert_eq!(out[1]["code"], -32010, "{out:?}");
    let hold = out[1]["data"]["hold_id"].as_str().unwrap().to_owned();
    let (status, _) = h.approve(&hold, "carol", json!({})).await;
    assert_eq!(status, http::StatusCode::OK);
    let out = client_with(2, None, &h.url, &ops, call(), &confirm).await;
    assert_eq!(out[1]["scenario"], "elicited", "{out:?}");
    assert_eq!(out[2]["text"], "refunded INV-000001", "{out:?}");
    // Spent: the same call again is a new request.
    let out = client_with(2, None, &h.url, &ops, call(), &confirm).await;
    assert_eq!(out[1]["code"], -32010, "{out:?}");
    let audit = h.audit().await;
    let kinds: Vec<(&str, &str, &str)> = audit
        .iter()
        .filter(|r| r["agent"] == "ops-bot")
        .map(|r| {
            (
                r["event"].as_str().unwrap(),
                r["decision"].as_str().unwrap_or("-"),
                r["rule"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("grant_used", "approved", "tools[0].approval"))
            && kinds.contains(&("call", "allow", "hold.continuation")),
        "{kinds:?}"
    );
    assert!(toolgate::audit::verify(&h.dir.join("audit.jsonl")).is_ok());
}

/// The Python 2.x SDK's `listen()` accepts toolgate's acknowledgment of
/// `subscriptions/listen`: tool list changes honoured, prompt list changes
/// (not offered) left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_2x_client_listens_for_list_changes_through_toolgate() {
    let (_server, url) = upstream(2);
    let h = Harness::with(Opts {
        upstream: Some(url),
        ..Opts::default()
    })
    .await;
    let out = client(2, None, &h.url, &h.token("billing-bot"), vec![s("listen")]).await;
    assert_eq!(out[0]["era"], "modern", "{out:?}");
    assert_eq!(out[1]["scenario"], "listen", "{out:?}");
    assert_eq!(
        out[1]["honored"],
        json!({"toolsListChanged": true}),
        "{out:?}"
    );
}

/// A 1.x server's `notifications/tools/list_changed` that belongs to no
/// request goes out on the standalone GET stream of the session whose call
/// changed the tools (`send_tool_list_changed()` in the SDK): toolgate holds
/// that stream open for each upstream session, so a tool added at runtime
/// is listed within moments (not when the 30 s catalog cache runs out), and
/// agents hear of it on their own streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1x_servers_tool_list_change_on_its_get_stream_reaches_toolgate_and_agents() {
    let (_server, url) = upstream(1);
    let h = Harness::with(Opts {
        upstream: Some(url),
        manifests: &[(
            "lister.yaml",
            "agent: lister\ntools:\n  - name: billing__reveal\n  - name: billing__hidden\n  - name: billing__echo\n",
        )],
        ..Opts::default()
    })
    .await;
    let token = h.token("lister");
    let listed = |v: &Value| -> Vec<String> {
        v["result"]["tools"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, before) = h.modern(&token, "tools/list", json!({})).await;
    assert_eq!(listed(&before), ["billing__echo", "billing__reveal"]);
    let asked = std::time::Instant::now();
    let out = client(
        1,
        None,
        &h.url,
        &token,
        vec![
            s("list_tools"),
            s("call"),
            s("billing__reveal"),
            s("{}"),
            s("wait_tools_changed"),
            s("10"),
            s("list_tools"),
            s("call"),
            s("billing__hidden"),
            s("{}"),
        ],
    )
    .await;
    assert_eq!(
        out[1]["tools"],
        json!(["billing__echo", "billing__reveal"]),
        "{out:?}"
    );
    assert_eq!(out[2]["text"], "revealed", "{out:?}");
    // The SDK client heard it on its GET stream to toolgate.
    assert_eq!(
        out[3],
        json!({"scenario": "tools_changed", "ok": true}),
        "{out:?}"
    );
    assert_eq!(
        out[4]["tools"],
        json!(["billing__echo", "billing__hidden", "billing__reveal"]),
        "{out:?}"
    );
    assert_eq!(out[5]["text"], "found", "{out:?}");
    // And any agent's listing shows it, long before the cache expires.
    let mut now = Vec::new();
    for _ in 0..100 {
        let (_, v) = h.modern(&token, "tools/list", json!({})).await;
        now = listed(&v);
        if now.iter().any(|n| n == "billing__hidden") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(now.iter().any(|n| n == "billing__hidden"), "{now:?}");
    assert!(asked.elapsed() < std::time::Duration::from_secs(20));
    // The agent's session ended (the SDK client DELETEs it on close), and
    // its upstream session's GET stream with it: toolgate's own remains.
    let u = &h.server.gate.0.upstreams[0];
    let mut running = usize::MAX;
    for _ in 0..100 {
        running = u.streams_running();
        if running == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!((running, u.session_count()), (1, 1));
}

/// A 1.x server with an event store may close a call's event stream on
/// purpose (`ctx.close_sse_stream()`, 2025-11-25's SSE polling) and expect
/// the client to come back with a GET that sends `Last-Event-ID`, as the
/// SDK clients do. toolgate resumes it: the agent gets the log sent before
/// the close, the one sent after it, and the result, on one stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1x_server_that_closes_a_calls_stream_is_resumed_with_last_event_id() {
    let (_server, url) = upstream_with(1, &[("UPSTREAM_RESUMABLE", "1")]);
    let h = Harness::with(Opts {
        upstream: Some(url),
        manifests: &[(
            "poller.yaml",
            "agent: poller\ntools:\n  - name: billing__polled_report\n",
        )],
        ..Opts::default()
    })
    .await;
    let token = h.token("poller");
    let (_, msgs) = h
        .call_messages(
            &token,
            "application/json, text/event-stream",
            "billing__polled_report",
            json!({"steps": 3}),
            json!({}),
        )
        .await;
    let logs: Vec<&str> = msgs
        .iter()
        .filter(|m| m["method"] == "notifications/message")
        .filter_map(|m| m["params"]["data"].as_str())
        .collect();
    assert_eq!(logs, ["starting 3 steps", "finished 3 steps"], "{msgs:?}");
    let last = msgs.last().unwrap();
    assert_eq!(
        last["result"]["content"][0]["text"], "report of 3 steps",
        "{msgs:?}"
    );
}
