//! The data plane on real sockets: toolgate in front of a recording upstream.
//! Every test proves what reached the upstream, and what the audit log says.

// Test helpers may unwrap: a panic there is a failed assertion.
#![allow(clippy::unwrap_used)]

use crate::support;

use http::StatusCode;
use serde_json::{json, Value};
use support::{token_with, Harness, Opts, BILLING_BOT};

fn code(v: &Value) -> i64 {
    v["error"]["code"].as_i64().unwrap_or(0)
}

#[tokio::test]
async fn allowed_call_reaches_upstream_once_without_the_agents_token() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    let v = h
        .call(
            &t,
            "billing__get_invoice",
            json!({"invoice_id": "INV-000001"}),
        )
        .await;
    assert_eq!(
        v["result"]["structuredContent"]["invoice_id"], "INV-000001",
        "{v}"
    );
    assert_eq!(v["result"]["resultType"], "complete");
    let got = h.tools.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].tool, "get_invoice", "prefix stripped");
    assert_eq!(got[0].arguments, json!({"invoice_id": "INV-000001"}));
    assert!(
        got[0].headers.get("authorization").is_none(),
        "agent token forwarded"
    );
    let audit = h.audit().await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    let r = &audit[0];
    assert_eq!(
        (
            r["event"].as_str(),
            r["decision"].as_str(),
            r["rule"].as_str()
        ),
        (Some("call"), Some("allow"), Some("tools[0]"))
    );
    assert_eq!(r["agent"], "billing-bot");
    assert_eq!(r["tool"], "billing__get_invoice");
    assert_eq!(r["args_sha256"].as_str().map(str::len), Some(64));
    assert!(
        !serde_json::to_string(&audit).unwrap().contains(&t),
        "token in audit"
    );
}

#[tokio::test]
async fn refused_calls_never_reach_the_upstream_and_say_why() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    let cases = [
        (
            "billing__delete_invoice",
            json!({"invoice_id": "INV-000001"}),
            -32003,
            "deny[0]",
        ),
        ("billing__unlisted", json!({}), -32003, "unlisted"),
        (
            "billing__get_invoice",
            json!({"invoice_id": "nope", "x": 1}),
            -32602,
            "tools[0].arguments",
        ),
    ];
    for (tool, args, want, rule) in cases {
        let v = h.call(&t, tool, args).await;
        assert_eq!(code(&v), want, "{tool}: {v}");
        assert_eq!(v["error"]["data"]["rule"], rule, "{tool}: {v}");
        assert_eq!(v["error"]["data"]["decision"], "deny", "{tool}: {v}");
        assert!(
            v["error"]["data"]["request_id"]
                .as_str()
                .is_some_and(|s| s.len() == 32),
            "{v}"
        );
    }
    // Schema errors name every failure with its JSON pointer.
    let v = h
        .call(&t, "billing__get_invoice", json!({"invoice_id": 7, "x": 1}))
        .await;
    let ptrs: Vec<&str> = v["error"]["data"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    assert!(ptrs.contains(&"/invoice_id") && ptrs.contains(&""), "{v}");
    // Holds answer -32010 after holds.wait; nothing is forwarded either.
    for (tool, args, rule) in [
        (
            "billing__refund",
            json!({"invoice_id": "INV-000001"}),
            "tools[2].approval",
        ),
        (
            "billing__grant_role",
            json!({"principal": "Billing-Bot", "role": "admin"}),
            "guard.self_identity",
        ),
    ] {
        let v = h.call(&t, tool, args).await;
        assert_eq!(code(&v), -32010, "{tool}: {v}");
        assert_eq!(v["error"]["data"]["decision"], "hold");
        assert_eq!(v["error"]["data"]["rule"], rule);
        assert!(v["error"]["data"]["hold_id"].as_str().is_some(), "{v}");
        assert!(v["error"]["data"]["expires_at"].as_str().is_some(), "{v}");
    }
    assert!(h.received().is_empty(), "upstream got {:?}", h.received());
    let audit = h.audit().await;
    // Six decisions, and an escalation alert after each of the two holds.
    assert_eq!(audit.len(), 8, "{audit:#?}");
    assert_eq!(audit.iter().filter(|r| r["event"] == "alert").count(), 2);
    assert_eq!(audit.iter().filter(|r| r["decision"] == "hold").count(), 2);
    assert_eq!(audit.iter().filter(|r| r["decision"] == "deny").count(), 4);
}

#[tokio::test]
async fn agents_without_a_manifest_see_nothing_and_are_denied() {
    let h = Harness::start().await;
    let t = h.token("stranger");
    let sid = h.initialize(&t).await;
    let (s, v) = h.in_session(&t, &sid, "tools/list", json!({})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["result"]["tools"], json!([]));
    let (_, v) = h
        .in_session(
            &t,
            &sid,
            "tools/call",
            json!({"name": "billing__get_invoice", "arguments": {"invoice_id": "INV-000001"}}),
        )
        .await;
    assert_eq!(code(&v), -32003);
    assert_eq!(v["error"]["data"]["rule"], "no_manifest");
    assert!(h.received().is_empty());
}

#[tokio::test]
async fn tools_list_shows_only_what_the_manifest_allows() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    let (_, v) = h.modern(&t, "tools/list", json!({})).await;
    let mut names: Vec<&str> = v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "billing__echo",
            "billing__get_invoice",
            "billing__grant_role",
            "billing__refund"
        ],
        "{v}"
    );
    // Definitions are passed through, renamed only.
    let def = v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "billing__get_invoice")
        .unwrap();
    assert_eq!(def["inputSchema"]["required"], json!(["invoice_id"]));
}

#[tokio::test]
async fn bad_or_missing_tokens_get_401_with_www_authenticate_and_are_audited() {
    let h = Harness::start().await;
    let body = json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}).to_string();
    let expired =
        token_with(json!({"sub": "billing-bot", "exp": toolgate::identity::now_unix() - 60}));
    let wrong_aud = token_with(json!({"sub": "billing-bot", "aud": "other"}));
    let no_sub = token_with(json!({"sub": null}));
    for tok in [
        None,
        Some("garbage"),
        Some(expired.as_str()),
        Some(wrong_aud.as_str()),
        Some(no_sub.as_str()),
    ] {
        let (s, hd, v) = h.post(tok, &[], body.clone()).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{tok:?}: {v}");
        assert!(hd
            .get("www-authenticate")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        assert_eq!(v["error"]["data"]["decision"], "deny");
    }
    // Token in the query string is not a credential.
    let t = h.token("billing-bot");
    let url = format!("{}?access_token={t}", h.url);
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    assert_eq!(
        h.client.request(req).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let audit = h.audit().await;
    assert_eq!(audit.len(), 6);
    assert!(audit
        .iter()
        .all(|r| r["event"] == "auth_failed" && r["decision"] == "deny"));
    assert!(!serde_json::to_string(&audit).unwrap().contains(&t));
}

#[tokio::test]
async fn sessions_are_bound_to_the_agent_that_opened_them() {
    let h = Harness::start().await;
    let a = h.token("billing-bot");
    let b = h.token("other-bot");
    let sid = h.initialize(&a).await;
    let (s, _) = h.in_session(&a, &sid, "ping", json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = h.in_session(&b, &sid, "tools/list", json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "another agent's session");
    let s = h.delete_session(&b, &sid).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "another agent cannot delete it");
    let s = h.delete_session(&a, &sid).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = h.in_session(&a, &sid, "ping", json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "deleted session");
    // No session at all in the session family.
    let (s, _, v) = h
        .post(
            Some(&a),
            &[],
            json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}).to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}

#[tokio::test]
async fn session_family_calls_work_and_answer_sse_when_only_sse_is_accepted() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    let sid = h.initialize(&t).await;
    let body = json!({"jsonrpc":"2.0","id":"x","method":"tools/call","params":{"name":"billing__echo","arguments":{"text":"hi"}}}).to_string();
    let (s, hd, v) = h
        .post(
            Some(&t),
            &[("mcp-session-id", &sid), ("accept", "text/event-stream")],
            body,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(support::is_event_stream(&hd));
    assert_eq!(v["id"], "x");
    assert_eq!(v["result"]["content"][0]["text"], "hi");
    assert!(
        v["result"].get("resultType").is_none(),
        "2026 fields not leaked to 2025 clients: {v}"
    );
    let (s, _, _) = h
        .post(
            Some(&t),
            &[("mcp-session-id", &sid)],
            json!({"jsonrpc":"2.0","method":"notifications/initialized"}).to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn malformed_requests_are_refused_before_any_decision() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    let sid = h.initialize(&t).await;
    let sess = [("mcp-session-id", sid.as_str())];
    let deep = format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{{\"name\":\"billing__echo\",\"arguments\":{{\"a\":{}1{}}}}}}}", "[".repeat(70), "]".repeat(70));
    let cases: Vec<(String, StatusCode, i64)> = vec![
        (r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"billing__echo","arguments":{}}}]"#.into(), StatusCode::BAD_REQUEST, -32600),
        (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"billing__echo","name":"billing__delete_x","arguments":{}}}"#.into(), StatusCode::BAD_REQUEST, -32700),
        (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"billing__echo","arguments":{"t":1,"t":2}}}"#.into(), StatusCode::BAD_REQUEST, -32700),
        (deep, StatusCode::BAD_REQUEST, -32700),
        (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"billing__echo","arguments":[1]}}"#.into(), StatusCode::BAD_REQUEST, -32602),
        (r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"Name":"billing__echo"}}"#.into(), StatusCode::OK, -32602),
        (r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"billing__echo","arguments":{}}}"#.into(), StatusCode::BAD_REQUEST, -32600),
        ("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"billing__echo\",\"arguments\":{\"t\":\"\\ud800\"}}}".into(), StatusCode::BAD_REQUEST, -32700),
    ];
    for (body, status, want) in &cases {
        let (s, _, v) = h.post(Some(&t), &sess, body.clone()).await;
        assert_eq!((s, code(&v)), (*status, *want), "{body}: {v}");
    }
    let (s, _, v) = h
        .post(
            Some(&t),
            &sess,
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"params\":{\"x\":\"\xff\"}}"
                .to_vec(),
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::BAD_REQUEST, -32700),
        "invalid UTF-8"
    );
    let big = format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{{\"name\":\"billing__echo\",\"arguments\":{{\"text\":\"{}\"}}}}}}", "x".repeat(70 * 1024));
    let (s, _, _) = h.post(Some(&t), &sess, big).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    let (s, _, _) = h
        .post(
            Some(&t),
            &[("mcp-session-id", &sid), ("content-type", "text/plain")],
            "{}",
        )
        .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(h.received().is_empty(), "{:?}", h.received());
    let audit = h.audit().await;
    assert_eq!(
        audit.len(),
        cases.len() + 3,
        "one record per refusal: {audit:#?}"
    );
    assert!(audit.iter().all(|r| r["decision"] == "deny"));
}

#[tokio::test]
async fn stateless_header_body_disagreements_are_refused() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}});
    let body = |name: &str| {
        json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":name,"arguments":{"invoice_id":"INV-000001"},"_meta":meta}}).to_string()
    };
    let v2026 = ("mcp-protocol-version", "2026-07-28");
    type Case<'a> = (Vec<(&'a str, &'a str)>, String, i64);
    let cases: Vec<Case> = vec![
        (vec![v2026, ("mcp-method", "tools/call"), ("mcp-name", "billing__get_invoice")], body("billing__delete_invoice"), -32020),
        (vec![v2026, ("mcp-method", "tools/list"), ("mcp-name", "billing__get_invoice")], body("billing__get_invoice"), -32020),
        (vec![v2026, ("mcp-method", "tools/call")], body("billing__get_invoice"), -32020),
        (vec![v2026, ("mcp-method", "tools/call"), ("mcp-name", "billing__get_invoice"), ("mcp-name", "billing__get_invoice")], body("billing__get_invoice"), -32020),
        (vec![("mcp-protocol-version", "2099-01-01"), ("mcp-method", "tools/call"), ("mcp-name", "billing__get_invoice")], body("billing__get_invoice"), -32022),
        (vec![v2026, ("mcp-method", "tools/call"), ("mcp-name", "billing__get_invoice")], json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"billing__get_invoice","arguments":{}}}).to_string(), -32602),
    ];
    for (headers, body, want) in &cases {
        let (s, _, v) = h.post(Some(&t), headers, body.clone()).await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::BAD_REQUEST, *want),
            "{headers:?}: {v}"
        );
    }
    // base64-encoded Mcp-Name is decoded before comparing.
    let (s, _, v) = h
        .post(
            Some(&t),
            &[
                v2026,
                ("mcp-method", "tools/call"),
                ("mcp-name", "=?base64?YmlsbGluZ19fZ2V0X2ludm9pY2U=?="),
            ],
            body("billing__get_invoice"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(h.received().len(), 1, "only the consistent call arrived");
}

/// Three echo calls pass, the fourth is rate limited (a budget of 3):
/// returns the fourth's answer.
async fn spend_three_echoes(h: &Harness, t: &str) -> Value {
    for i in 0..3 {
        let v = h
            .call(t, "billing__echo", json!({"text": format!("{i}")}))
            .await;
        assert!(v.get("result").is_some(), "call {i}: {v}");
    }
    let v = h.call(t, "billing__echo", json!({"text": "4"})).await;
    assert_eq!(code(&v), -32029, "{v}");
    v
}

#[tokio::test]
async fn rate_limits_answer_retry_after_and_denials_spend_no_budget() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    // Denied calls first: they must not eat the echo budget (burst 3).
    for _ in 0..5 {
        let v = h.call(&t, "billing__delete_x", json!({})).await;
        assert_eq!(code(&v), -32003);
    }
    let v = spend_three_echoes(&h, &t).await;
    assert_eq!(v["error"]["data"]["decision"], "rate_limited");
    assert_eq!(v["error"]["data"]["rule"], "rate_limit.tool");
    let ms = v["error"]["data"]["retry_after_ms"].as_u64().unwrap();
    assert!(ms > 0 && ms <= 20_000, "{ms}");
    assert_eq!(h.received().len(), 3);
    let audit = h.audit().await;
    assert_eq!(
        audit
            .iter()
            .filter(|r| r["decision"] == "rate_limited")
            .count(),
        1
    );
}

/// A call the manifest allows but no upstream exposes is denied (rule
/// `catalog`) without spending the agent's budget either.
#[tokio::test]
async fn calls_no_upstream_exposes_are_denied_and_spend_no_budget() {
    let (h, t) = Harness::with_agent(
        "prober",
        "agent: prober\nrate_limit: { rate: 3/min, burst: 3 }\ntools:\n  - name: \"*\"\n",
    )
    .await;
    for _ in 0..5 {
        // No upstream has the prefix `ghost`.
        let v = h.call(&t, "ghost__thing", json!({})).await;
        assert_eq!(code(&v), -32602, "{v}");
        assert_eq!(v["error"]["data"]["rule"], "catalog", "{v}");
    }
    spend_three_echoes(&h, &t).await;
}

#[tokio::test]
async fn an_unwritable_audit_log_fails_closed() {
    let h = Harness::with(Opts {
        audit: Some("/dev/full"),
        ..Opts::default()
    })
    .await;
    let t = h.token("billing-bot");
    // A refusal's record fails to write and turns the log unhealthy.
    let v = h.call(&t, "billing__delete_x", json!({})).await;
    assert_eq!(code(&v), -32003);
    h.server.gate.0.auditor.flush().await;
    assert!(!h.server.gate.0.auditor.healthy());
    let v = h
        .call(
            &t,
            "billing__get_invoice",
            json!({"invoice_id": "INV-000001"}),
        )
        .await;
    assert_eq!(code(&v), -32005, "{v}");
    assert!(h.received().is_empty(), "forwarded without an audit record");
}

#[tokio::test]
async fn upstream_failures_answer_32004_and_are_audited() {
    // Nothing listens on port 9 of loopback.
    let h = Harness::with(Opts {
        upstream: Some("http://127.0.0.1:9/mcp".into()),
        ..Opts::default()
    })
    .await;
    let t = h.token("billing-bot");
    let v = h
        .call(
            &t,
            "billing__get_invoice",
            json!({"invoice_id": "INV-000001"}),
        )
        .await;
    assert_eq!(code(&v), -32004, "{v}");
    assert_eq!(v["error"]["data"]["upstream"], "billing");
    let audit = h.audit().await;
    let kinds = support::events(&audit);
    assert_eq!(kinds, [("call", "allow"), ("upstream_error", "error")]);
    // Any other tool behind the same prefix fails the same way.
    let v = h.call(&t, "billing__echo", json!({"text": "x"})).await;
    assert_eq!(code(&v), -32004, "{v}");
}

#[tokio::test]
async fn audit_chain_verifies_and_counts_every_decision() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    for i in 0..10 {
        let tool = if i % 2 == 0 {
            "billing__get_invoice"
        } else {
            "billing__delete_invoice"
        };
        h.call(
            &t,
            tool,
            json!({"invoice_id": "INV-000001", "password": "hunter2"}),
        )
        .await;
    }
    let audit = h.audit().await;
    assert_eq!(audit.len(), 10);
    assert_eq!(toolgate::audit::verify(&h.dir.join("audit.jsonl")), Ok(10));
    let text = std::fs::read_to_string(h.dir.join("audit.jsonl")).unwrap();
    assert!(!text.contains("hunter2"), "secrets redacted");
}

#[tokio::test]
async fn the_shipped_manifests_load_and_decide_as_documented() {
    std::env::set_var("TOOLGATE_AGENT_SECRET", support::SECRET);
    std::env::set_var("TOOLGATE_ADMIN_SECRET", support::ADMIN_SECRET);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = toolgate::config::Config::load(&root.join("toolgate.yaml")).unwrap();
    let policy = toolgate::manifest::PolicySet::load_dir(&config.manifests).unwrap();
    let files: Vec<_> = std::fs::read_dir(root.join("tool-manifests"))
        .unwrap()
        .collect();
    assert_eq!(policy.len(), files.len(), "every shipped manifest loads");
    let guard = toolgate::server::guard_for(&config);
    let ops = policy.get("ops-bot").unwrap();
    let d = toolgate::policy::decide(
        &guard,
        Some(ops),
        "ops-bot",
        "billing__grant_role",
        &json!({"principal": "ops-bot", "role": "reader"}),
    );
    assert!(
        matches!(d.verdict, toolgate::policy::Verdict::Hold { .. }),
        "{d:?}"
    );
    let d = toolgate::policy::decide(
        &guard,
        Some(ops),
        "ops-bot",
        "billing__grant_role",
        &json!({"principal": "alice", "role": "reader"}),
    );
    assert_eq!(d.verdict, toolgate::policy::Verdict::Allow);
    let _ = BILLING_BOT;
}

#[tokio::test]
async fn several_upstreams_are_aggregated_and_routed_by_prefix() {
    let (a, b) = (
        toolgate::demo::ToolServer::default(),
        toolgate::demo::ToolServer::default(),
    );
    let aa = a.start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let ba = b.start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let upstreams = format!("upstreams:\n  - name: billing\n    url: http://{aa}/mcp\n  - name: crm\n    url: http://{ba}/mcp\n    prefix: crm_");
    let h = Harness::with(Opts {
        manifests: &[(
            "bot.yaml",
            "agent: bot\ntools:\n  - name: \"billing__*\"\n  - name: crm_echo\n",
        )],
        upstreams: Some(upstreams),
        ..Opts::default()
    })
    .await;
    let t = h.token("bot");
    let (_, v) = h.modern(&t, "tools/list", json!({})).await;
    let mut names: Vec<&str> = v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "billing__confirm_refund",
            "billing__delete_invoice",
            "billing__echo",
            "billing__get_invoice",
            "billing__grant_role",
            "billing__media",
            "billing__refund",
            "crm_echo"
        ],
        "both upstreams, each under its prefix, filtered by the manifest"
    );
    let v = h.call(&t, "crm_echo", json!({"text": "to crm"})).await;
    assert_eq!(v["result"]["content"][0]["text"], "to crm", "{v}");
    let v = h
        .call(&t, "billing__echo", json!({"text": "to billing"}))
        .await;
    assert_eq!(v["result"]["content"][0]["text"], "to billing", "{v}");
    assert_eq!(
        a.received()
            .iter()
            .map(|r| r.arguments["text"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>(),
        ["to billing"]
    );
    assert_eq!(
        b.received()
            .iter()
            .map(|r| r.tool.clone())
            .collect::<Vec<_>>(),
        ["echo"]
    );
    assert!(
        h.received().is_empty(),
        "the default recording server is not configured here"
    );
}

#[tokio::test]
async fn foreign_hosts_and_origins_are_refused_on_both_planes() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    let body = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"billing__echo","arguments":{"text":"x"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}).to_string();
    let modern = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "billing__echo"),
    ];
    for bad in [
        ("host", "evil.example:8080"),
        ("origin", "http://evil.example"),
    ] {
        let mut headers = modern.to_vec();
        headers.push(bad);
        let (s, _, v) = h.post(Some(&t), &headers, body.clone()).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{bad:?}: {v}");
    }
    let mut ok = modern.to_vec();
    ok.push(("origin", "http://localhost:5173"));
    let (s, _, _) = h.post(Some(&t), &ok, body.clone()).await;
    assert_eq!(s, StatusCode::OK, "a loopback origin is fine");
    assert_eq!(h.received().len(), 1, "only the allowed request arrived");
    // The management plane too, even for the page and health.
    let req = http::Request::get(format!("{}/", h.admin_url()))
        .header("host", "rebound.example")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(
        h.client.request(req).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let audit = h.audit().await;
    assert_eq!(
        audit.iter().filter(|r| r["event"] == "rejected").count(),
        3,
        "{audit:#?}"
    );
}

/// A request body that sends one chunk and then nothing, forever.
struct Stalled(bool);

impl http_body::Body for Stalled {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.0 {
            return std::task::Poll::Pending;
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(
            b"{\"jsonrpc\":",
        )))))
    }
}

#[tokio::test]
async fn a_body_that_never_finishes_is_refused_with_408() {
    use http_body_util::BodyExt;
    // The harness sets limits.body_timeout to 500ms.
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    let req = http::Request::post("/mcp")
        .header("authorization", format!("Bearer {t}"))
        .header("content-type", "application/json")
        .header("host", "127.0.0.1")
        .body(Stalled(false))
        .unwrap();
    let started = std::time::Instant::now();
    let resp = h.server.gate.handle(req).await;
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["code"], -32600);
    assert!(h.received().is_empty());
}

/// agent-a and agent-b, each allowed only `billing__echo`.
async fn two_echo_agents() -> Harness {
    Harness::with(Opts {
        manifests: &[
            (
                "a.yaml",
                "agent: agent-a\ntools:\n  - name: billing__echo\n",
            ),
            (
                "b.yaml",
                "agent: agent-b\ntools:\n  - name: billing__echo\n",
            ),
        ],
        ..Opts::default()
    })
    .await
}

#[tokio::test]
async fn upstream_sessions_are_never_shared_between_agents() {
    let h = two_echo_agents().await;
    let (ta, tb) = (h.token("agent-a"), h.token("agent-b"));
    for (t, text) in [(&ta, "a1"), (&tb, "b1"), (&ta, "a2"), (&tb, "b2")] {
        let v = h.call(t, "billing__echo", json!({ "text": text })).await;
        assert_eq!(v["result"]["content"][0]["text"], text, "{v}");
    }
    let session_of = |text: &str| -> String {
        let r = h
            .tools
            .received()
            .into_iter()
            .find(|r| r.arguments["text"] == text)
            .unwrap_or_else(|| panic!("{text} not received"));
        r.headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{text} sent without an upstream session"))
    };
    assert_eq!(
        session_of("a1"),
        session_of("a2"),
        "an agent keeps its session"
    );
    assert_eq!(
        session_of("b1"),
        session_of("b2"),
        "an agent keeps its session"
    );
    assert_ne!(
        session_of("a1"),
        session_of("b1"),
        "two agents must not share an upstream session"
    );
}

#[tokio::test]
async fn each_session_of_an_agent_has_its_own_upstream_session() {
    let h = Harness::with(Opts {
        manifests: &[(
            "billing-bot.yaml",
            "agent: billing-bot\ntools:\n  - name: billing__echo\n",
        )],
        ..Opts::default()
    })
    .await;
    let t = h.token("billing-bot");
    let (s1, s2) = (h.initialize(&t).await, h.initialize(&t).await);
    let echo = |sid: String, text: &'static str| {
        let h = &h;
        let t = &t;
        async move {
            let (s, v) = h
                .in_session(
                    t,
                    &sid,
                    "tools/call",
                    json!({"name": "billing__echo", "arguments": {"text": text}}),
                )
                .await;
            assert_eq!(s, StatusCode::OK);
            assert_eq!(v["result"]["content"][0]["text"], text, "{v}");
        }
    };
    echo(s1.clone(), "one-a").await;
    echo(s2.clone(), "two-a").await;
    echo(s1.clone(), "one-b").await;
    echo(s2.clone(), "two-b").await;
    // A stateless (2026-07-28) call of the same agent is in neither.
    let v = h
        .call(&t, "billing__echo", json!({"text": "stateless"}))
        .await;
    assert!(v.get("result").is_some(), "{v}");
    let upstream_session = |text: &str| -> String {
        h.tools
            .received()
            .into_iter()
            .find(|r| r.arguments["text"] == text)
            .and_then(|r| {
                r.headers
                    .get("mcp-session-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| panic!("{text}: no upstream session"))
    };
    assert_eq!(upstream_session("one-a"), upstream_session("one-b"));
    assert_eq!(upstream_session("two-a"), upstream_session("two-b"));
    assert_ne!(upstream_session("one-a"), upstream_session("two-a"));
    assert_ne!(upstream_session("stateless"), upstream_session("one-a"));
    assert_ne!(upstream_session("stateless"), upstream_session("two-a"));
    // Closing an agent session ends its upstream session: a new agent
    // session with the same id would not inherit it.
    let before = h.server.gate.0.upstreams[0].session_count();
    let s = h.delete_session(&t, &s1).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(h.server.gate.0.upstreams[0].session_count(), before - 1);
}

/// The demo tool server offers no standalone GET stream (it answers 405):
/// toolgate asks at most once per upstream session opened before it knew,
/// then opens none for later sessions, and retries nothing.
#[tokio::test]
async fn an_upstream_answering_405_to_get_is_not_asked_again() {
    let h = two_echo_agents().await;
    let (ta, tb) = (h.token("agent-a"), h.token("agent-b"));
    for t in [&ta, &tb] {
        let v = h.call(t, "billing__echo", json!({"text": "x"})).await;
        assert!(v.get("result").is_some(), "{v}");
    }
    let u = &h.server.gate.0.upstreams[0];
    for _ in 0..200 {
        if u.streams_running() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(u.streams_running(), 0, "a stream task still runs after 405");
    let gets = h.tools.gets();
    let sessions = u.session_count() as u64;
    assert!(
        (1..=sessions).contains(&gets),
        "{gets} GETs for {sessions} upstream sessions"
    );
    // New upstream sessions (a session-era agent session, another
    // agent's calls) open no stream.
    let sid = h.initialize(&ta).await;
    let (status, v) = h
        .in_session(
            &ta,
            &sid,
            "tools/call",
            json!({"name": "billing__echo", "arguments": {"text": "y"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let v = h.call(&tb, "billing__echo", json!({"text": "z"})).await;
    assert!(v.get("result").is_some(), "{v}");
    assert_eq!(u.session_count() as u64, sessions + 1);
    assert_eq!(h.tools.gets(), gets, "GET asked again after 405");
    assert_eq!(u.streams_running(), 0);
}

#[tokio::test]
async fn progress_and_log_notifications_are_relayed_before_the_result() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    let args = json!({"invoice_id": "INV-000001"});
    let (ct, msgs) = h
        .call_messages(
            &t,
            "application/json, text/event-stream",
            "billing__get_invoice",
            args.clone(),
            json!({"progressToken": "p-1"}),
        )
        .await;
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let methods = support::methods(&msgs);
    assert_eq!(
        methods,
        [
            "notifications/progress",
            "notifications/message",
            "(response)"
        ],
        "{msgs:?}"
    );
    assert_eq!(msgs[0]["params"]["progressToken"], "p-1");
    assert_eq!(msgs[1]["params"]["data"], "get_invoice called");
    assert_eq!(
        msgs[2]["result"]["structuredContent"]["invoice_id"],
        "INV-000001"
    );
    assert_eq!(msgs[2]["id"], 1);
    // A client that takes only JSON gets the result alone.
    let (ct, msgs) = h
        .call_messages(
            &t,
            "application/json",
            "billing__get_invoice",
            args,
            json!({"progressToken": "p-2"}),
        )
        .await;
    assert!(ct.starts_with("application/json"), "{ct}");
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        msgs[0]["result"]["structuredContent"]["invoice_id"],
        "INV-000001"
    );
    // Both calls were audited once each, as allowed.
    let audit = h.audit().await;
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert!(audit.iter().all(|r| r["decision"] == "allow"));
}

#[tokio::test]
async fn resources_and_prompts_are_gated_by_the_manifest_lists() {
    let h = Harness::with(Opts {
        manifests: &[
            (
                "reader.yaml",
                "agent: reader\nrate_limit: { rate: 100/min, burst: 100 }\nresources: [\"billing://invoices/*\"]\nprompts: [billing__summarize_invoice]\n",
            ),
            ("billing-bot.yaml", support::BILLING_BOT),
        ],
        ..Opts::default()
    })
    .await;
    let t = h.token("reader");
    let uris = |v: &Value, key: &str, field: &str| -> Vec<String> {
        v["result"][key]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|r| r[field].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, v) = h.modern(&t, "resources/list", json!({})).await;
    assert_eq!(
        uris(&v, "resources", "uri"),
        ["billing://invoices/INV-000001"]
    );
    let (_, v) = h.modern(&t, "resources/templates/list", json!({})).await;
    assert_eq!(
        uris(&v, "resourceTemplates", "uriTemplate"),
        ["billing://invoices/{invoice_id}"]
    );
    let (_, v) = h.modern(&t, "prompts/list", json!({})).await;
    assert_eq!(uris(&v, "prompts", "name"), ["billing__summarize_invoice"]);

    let (_, v) = h
        .modern(
            &t,
            "resources/read",
            json!({"uri": "billing://invoices/INV-000001"}),
        )
        .await;
    assert_eq!(
        v["result"]["contents"][0]["text"], "contents of billing://invoices/INV-000001",
        "{v}"
    );
    let (_, v) = h
        .modern(
            &t,
            "prompts/get",
            json!({"name": "billing__summarize_invoice", "arguments": {"invoice_id": "INV-000007"}}),
        )
        .await;
    assert_eq!(
        v["result"]["messages"][0]["content"]["text"], "Summarize invoice INV-000007",
        "{v}"
    );
    // Refused: unlisted, dot segments, a * that would cross a segment, an
    // unlisted prompt; none reaches the upstream.
    for (method, params, rule) in [
        (
            "resources/read",
            json!({"uri": "billing://reports/q3"}),
            "unlisted",
        ),
        (
            "resources/read",
            json!({"uri": "billing://invoices/../reports/q3"}),
            "uri",
        ),
        (
            "resources/read",
            json!({"uri": "billing://invoices/%2E%2E/reports/q3"}),
            "uri",
        ),
        (
            "resources/read",
            json!({"uri": "billing://invoices/x/../../reports/q3"}),
            "uri",
        ),
        (
            "resources/read",
            json!({"uri": "billing://invoices/a/b"}),
            "unlisted",
        ),
        (
            "prompts/get",
            json!({"name": "billing__internal_notes"}),
            "unlisted",
        ),
    ] {
        let (_, v) = h.modern(&t, method, params.clone()).await;
        assert_eq!(v["error"]["code"], -32003, "{params}: {v}");
        assert_eq!(v["error"]["data"]["rule"], rule, "{params}: {v}");
    }
    assert_eq!(
        h.received(),
        [
            "resources/read:billing://invoices/INV-000001",
            "prompts/get:summarize_invoice"
        ],
        "only allowed reads reach the upstream, prompts under their own name"
    );
    // An agent whose manifest lists none sees none and reads none.
    let b = h.token("billing-bot");
    let (_, v) = h.modern(&b, "resources/list", json!({})).await;
    assert_eq!(v["result"]["resources"], json!([]));
    let (_, v) = h
        .modern(
            &b,
            "resources/read",
            json!({"uri": "billing://invoices/INV-000001"}),
        )
        .await;
    assert_eq!(v["error"]["code"], -32003, "{v}");
    // Every read and get was audited, allowed or not.
    let audit = h.audit().await;
    let got = support::events(&audit);
    assert_eq!(got.len(), 9, "{audit:?}");
    assert_eq!(got[0], ("resource", "allow"));
    assert_eq!(got[1], ("prompt", "allow"));
    assert!(got[2..].iter().all(|(_, d)| *d == "deny"), "{got:?}");
    assert!(toolgate::audit::verify(&h.dir.join("audit.jsonl")).is_ok());
}
