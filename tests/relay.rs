//! What toolgate relays unchanged: tool definitions (whatever schema
//! features they use, whatever the manifest constrains), call results of
//! every content kind with `structuredContent` and `_meta`, and the agent's
//! own `_meta` keys. Each is compared with what the demo tool server's
//! `media` tool gives a client that asks it directly.

// Test helpers may unwrap: a panic there is a failed assertion.
#![allow(clippy::unwrap_used)]

use crate::support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::{Harness, Opts};

/// Constrains `billing__media`'s arguments more tightly than the tool's
/// own inputSchema does.
const MEDIA_BOT: &str = r#"
agent: media-bot
tools:
  - name: billing__media
    arguments:
      type: object
      properties:
        invoice_id: { type: string, pattern: "^INV-0000[0-9]{2}$" }
      required: [invoice_id]
"#;

async fn harness() -> Harness {
    Harness::with(Opts {
        manifests: &[("media-bot.yaml", MEDIA_BOT)],
        ..Opts::default()
    })
    .await
}

/// Sends `body` to `url` as an MCP POST; returns every JSON-RPC message of
/// the answer (each event's data for a stream).
async fn messages(h: &Harness, url: &str, headers: &[(&str, &str)], body: Value) -> Vec<Value> {
    let mut req = Request::post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = h.client.request(req).await.unwrap();
    let sse = support::is_event_stream(resp.headers());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    if sse {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    } else {
        vec![serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))]
    }
}

/// Asks the demo tool server directly; returns the result.
async fn direct(h: &Harness, method: &str, params: Value) -> Value {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let msgs = messages(h, &h.tools_url, &[], body).await;
    msgs.last().unwrap()["result"].clone()
}

/// The demo tool server's own result for a `media` call with `args`.
async fn direct_media(h: &Harness, args: &Value) -> Value {
    direct(h, "tools/call", json!({"name": "media", "arguments": args})).await
}

/// The upstream's `media` definition, as toolgate exposes it: the same
/// object under the prefixed name.
async fn upstream_definition(h: &Harness) -> Value {
    let tools = direct(h, "tools/list", json!({})).await;
    let mut def = tools["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "media")
        .unwrap_or_else(|| panic!("no media tool: {tools}"))
        .clone();
    // Sanity: the definition uses what this test is about.
    let schema = &def["inputSchema"];
    assert!(schema["$schema"].is_string() && schema["$defs"].is_object());
    assert_eq!(
        schema["properties"]["invoice_id"]["$ref"],
        "#/$defs/invoiceId"
    );
    assert_eq!(schema["additionalProperties"], false);
    assert!(def["outputSchema"].is_object() && def["annotations"].is_object());
    def["name"] = json!("billing__media");
    def
}

/// Removes what toolgate adds to a 2026-07-28 agent's result (SPEC "MCP
/// versions": `resultType` and its own `serverInfo` in `_meta`), asserting
/// both were there.
fn without_2026_additions(mut r: Value) -> Value {
    assert_eq!(r["resultType"], "complete", "{r}");
    r.as_object_mut().unwrap().remove("resultType");
    let meta = r["_meta"].as_object_mut().unwrap();
    let info = meta.remove("io.modelcontextprotocol/serverInfo");
    assert_eq!(info.unwrap()["name"], "toolgate", "{r}");
    r
}

#[tokio::test]
async fn tool_definitions_are_relayed_exactly_even_where_the_manifest_constrains_arguments() {
    let h = harness().await;
    let want = upstream_definition(&h).await;
    let t = h.token("media-bot");

    let sid = h.initialize(&t).await;
    let (_, v) = h.in_session(&t, &sid, "tools/list", json!({})).await;
    assert_eq!(v["result"]["tools"], json!([want]), "2025-11-25: {v}");
    let (_, v) = h.modern(&t, "tools/list", json!({})).await;
    assert_eq!(v["result"]["tools"], json!([want]), "2026-07-28: {v}");

    // The manifest's schema still decides: an id the tool's own schema
    // admits is refused by the tighter manifest, and never forwarded.
    let before = h.received().len();
    let v = h
        .call(&t, "billing__media", json!({"invoice_id": "INV-123456"}))
        .await;
    assert_eq!(v["error"]["code"], -32602, "{v}");
    assert_eq!(h.received().len(), before);
}

#[tokio::test]
async fn every_content_kind_structured_content_and_result_meta_are_relayed_unchanged() {
    let h = harness().await;
    let args = json!({"invoice_id": "INV-000042"});
    let want = direct_media(&h, &args).await;
    let kinds: Vec<&str> = want["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "text",
            "image",
            "audio",
            "resource",
            "resource",
            "resource_link"
        ]
    );
    assert_eq!(want["content"][2]["mimeType"], "audio/wav");
    assert!(want["content"][4]["resource"]["blob"].is_string());
    assert!(want["structuredContent"].is_object());
    assert_eq!(want["_meta"]["com.example/served-by"], "toolgate-demo");

    let t = h.token("media-bot");
    let sid = h.initialize(&t).await;
    let (_, v) = h
        .in_session(
            &t,
            &sid,
            "tools/call",
            json!({"name": "billing__media", "arguments": args}),
        )
        .await;
    assert_eq!(
        v["result"], want,
        "2025-11-25: exactly the upstream's result"
    );

    let v = h.call(&t, "billing__media", args.clone()).await;
    assert_eq!(
        without_2026_additions(v["result"].clone()),
        want,
        "2026-07-28: the upstream's result and only the documented additions"
    );
    assert_eq!(h.received(), ["media", "media", "media"]);
}

#[tokio::test]
async fn the_agents_own_meta_keys_reach_the_upstream_and_progress_still_flows() {
    let h = harness().await;
    let args = json!({"invoice_id": "INV-000042"});
    let want = direct_media(&h, &args).await;
    let t = h.token("media-bot");
    let auth = format!("Bearer {t}");

    // A session agent.
    let sid = h.initialize(&t).await;
    let body = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
        "name": "billing__media", "arguments": args,
        "_meta": {"com.example/trace": "abc", "progressToken": "p-7"}}});
    let msgs = messages(
        &h,
        &h.url,
        &[
            ("authorization", &auth),
            ("mcp-session-id", &sid),
            ("mcp-protocol-version", "2025-11-25"),
        ],
        body,
    )
    .await;
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
    assert_eq!(msgs[0]["params"]["progressToken"], "p-7", "{msgs:?}");
    assert_eq!(msgs[2]["id"], 9);
    assert_eq!(msgs[2]["result"], want);
    let got = h.tools.received();
    assert_eq!(
        got.last().unwrap().meta,
        json!({"com.example/trace": "abc", "progressToken": "p-7"}),
        "the upstream got the agent's _meta"
    );

    // A 2026-07-28 agent: its own keys pass, the envelope's do not.
    let (ct, msgs) = h
        .call_messages(
            &t,
            "application/json, text/event-stream",
            "billing__media",
            args.clone(),
            json!({"com.example/trace": "xyz", "progressToken": "p-8"}),
        )
        .await;
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    assert_eq!(msgs[0]["method"], "notifications/progress", "{msgs:?}");
    assert_eq!(msgs[0]["params"]["progressToken"], "p-8", "{msgs:?}");
    let last = msgs.last().unwrap();
    assert_eq!(without_2026_additions(last["result"].clone()), want);
    let meta = h.tools.received().last().unwrap().meta.clone();
    assert_eq!(meta["com.example/trace"], "xyz", "{meta}");
    assert_eq!(meta["progressToken"], "p-8", "{meta}");
    assert!(
        !meta
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("io.modelcontextprotocol/")),
        "the agent's hop envelope is not forwarded to a 2025-11-25 server: {meta}"
    );
}

#[tokio::test]
async fn a_stdio_servers_definitions_and_results_are_relayed_unchanged_too() {
    // The stdio demo serves the same media tool as the HTTP one.
    let h = Harness::with(Opts {
        manifests: &[(
            "media-bot.yaml",
            "agent: media-bot\ntools:\n  - name: local__media\n",
        )],
        upstreams: Some(format!(
            "upstreams:\n  - name: local\n    command: [\"{}\", demo-tools]\n",
            env!("CARGO_BIN_EXE_toolgate")
        )),
        ..Opts::default()
    })
    .await;
    let mut want = upstream_definition(&h).await;
    want["name"] = json!("local__media");
    let args = json!({"invoice_id": "INV-000042"});
    let result = direct_media(&h, &args).await;
    let t = h.token("media-bot");
    let sid = h.initialize(&t).await;
    let (_, v) = h.in_session(&t, &sid, "tools/list", json!({})).await;
    assert_eq!(v["result"]["tools"], json!([want]), "{v}");
    let (_, v) = h
        .in_session(
            &t,
            &sid,
            "tools/call",
            json!({"name": "local__media", "arguments": args}),
        )
        .await;
    assert_eq!(v["result"], result, "2025-11-25");
    let v = h.call(&t, "local__media", args).await;
    assert_eq!(
        without_2026_additions(v["result"].clone()),
        result,
        "2026-07-28"
    );
}
