//! The bundled demo tool server, and the `toolgate demo` quickstart.
//!
//! [`ToolServer`] is a small but real MCP server (Streamable HTTP, revision
//! 2025-11-25 with sessions, JSON responses, no GET stream: a GET gets 405)
//! offering billing-flavoured tools, among them `media` (every content kind
//! and schema feature, see `demo/media.rs`). It records every `tools/call` it receives, with its `_meta`,
//! which makes it the recording upstream of toolgate's own tests: what it
//! did not record never reached it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::gate::{full, Body};

mod media;

/// A call the tool server received: tool name, arguments, the request's
/// `_meta` (Null when absent), and the headers that came with it.
#[derive(Debug, Clone)]
pub struct Received {
    pub tool: String,
    pub arguments: Value,
    pub meta: Value,
    pub headers: http::HeaderMap,
    /// The HTTP version the call came over (HTTP/2 from a TLS client that
    /// negotiated it).
    pub version: http::Version,
}

/// The demo MCP tool server.
#[derive(Clone)]
pub struct ToolServer {
    received: Arc<Mutex<Vec<Received>>>,
    record: bool,
    sessions: Arc<std::sync::atomic::AtomicU64>,
    gets: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for ToolServer {
    /// A recording server (tests read what it received).
    fn default() -> Self {
        ToolServer {
            received: Arc::default(),
            record: true,
            sessions: Arc::default(),
            gets: Arc::default(),
        }
    }
}

/// The tools it offers.
pub fn tool_definitions() -> Value {
    let mut tools = json!([
        {
            "name": "get_invoice",
            "description": "Fetch an invoice by id.",
            "inputSchema": {"type": "object", "properties": {"invoice_id": {"type": "string"}}, "required": ["invoice_id"]}
        },
        {
            "name": "refund",
            "description": "Refund an invoice (needs a human).",
            "inputSchema": {"type": "object", "properties": {"invoice_id": {"type": "string"}, "amount": {"type": "number"}}, "required": ["invoice_id", "amount"]}
        },
        {
            "name": "delete_invoice",
            "description": "Delete an invoice.",
            "inputSchema": {"type": "object", "properties": {"invoice_id": {"type": "string"}}, "required": ["invoice_id"]}
        },
        {
            "name": "grant_role",
            "description": "Grant a role to a principal.",
            "inputSchema": {"type": "object", "properties": {"principal": {"type": "string"}, "role": {"type": "string"}}, "required": ["principal", "role"]}
        },
        {
            "name": "echo",
            "description": "Echo the text back.",
            "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
        },
        {
            "name": "confirm_refund",
            "description": "Refund an invoice once the user confirms (asks in a 2026-07-28 input_required round).",
            "inputSchema": {"type": "object", "properties": {"invoice_id": {"type": "string"}}, "required": ["invoice_id"]}
        }
    ]);
    if let Value::Array(t) = &mut tools {
        t.push(media::definition());
    }
    tools
}

impl ToolServer {
    /// A server that records nothing (the demo, benchmarks): its memory
    /// stays flat however many calls it serves.
    pub fn without_recording() -> Self {
        ToolServer {
            received: Arc::default(),
            record: false,
            sessions: Arc::default(),
            gets: Arc::default(),
        }
    }

    /// Starts serving on `addr` (port 0 for any); returns the bound address.
    pub async fn start(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(me.clone().serve_io(stream));
            }
        });
        Ok(local)
    }

    /// Serves one connection, HTTP/1.1 or HTTP/2 (tests put TLS under it).
    pub async fn serve_io<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let svc = hyper::service::service_fn(move |req| {
            let me = self.clone();
            async move { Ok::<_, std::convert::Infallible>(me.handle(req).await) }
        });
        let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
            .await;
    }

    /// GET requests received so far (it offers no GET stream: each is
    /// answered 405).
    pub fn gets(&self) -> u64 {
        self.gets.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every tools/call received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        if parts.method != http::Method::POST {
            if parts.method == http::Method::GET {
                self.gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            return status(StatusCode::METHOD_NOT_ALLOWED);
        }
        let Ok(bytes) = http_body_util::Limited::new(body, 1 << 20)
            .collect()
            .await
            .map(|c| c.to_bytes())
        else {
            return status(StatusCode::PAYLOAD_TOO_LARGE);
        };
        let Ok(msg) = serde_json::from_slice::<Value>(&bytes) else {
            return status(StatusCode::BAD_REQUEST);
        };
        let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
        let Some(id) = msg.get("id").cloned() else {
            return status(StatusCode::ACCEPTED);
        };
        let params = msg.get("params").cloned().unwrap_or(json!({}));
        let result = match method {
            "initialize" => {
                let body = json!({"jsonrpc": "2.0", "id": id, "result": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "toolgate-demo-tools", "version": env!("CARGO_PKG_VERSION")},
                }});
                let mut r = json_response(&body);
                // A fresh session id per initialize, as real servers do.
                let n = self
                    .sessions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Ok(v) = http::HeaderValue::from_str(&format!("demo-session-{n}")) {
                    r.headers_mut()
                        .insert(crate::mcp::headers::MCP_SESSION_ID, v);
                }
                return r;
            }
            "ping" => json!({}),
            "tools/list" => json!({"tools": tool_definitions()}),
            "resources/list" => json!({"resources": [
                {"uri": "billing://invoices/INV-000001", "name": "Invoice INV-000001", "mimeType": "application/json"},
                {"uri": "billing://reports/q3", "name": "Q3 revenue report", "mimeType": "text/plain"},
            ]}),
            "resources/templates/list" => json!({"resourceTemplates": [
                {"uriTemplate": "billing://invoices/{invoice_id}", "name": "Any invoice"},
            ]}),
            "prompts/list" => json!({"prompts": [
                {"name": "summarize_invoice", "arguments": [{"name": "invoice_id", "required": true}]},
                {"name": "internal_notes"},
            ]}),
            "resources/read" | "prompts/get" => {
                let key = if method == "resources/read" {
                    "uri"
                } else {
                    "name"
                };
                let target = params
                    .get(key)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                if let Some(mut r) = self.record.then(|| self.received.lock().ok()).flatten() {
                    r.push(Received {
                        tool: format!("{method}:{target}"),
                        arguments: params.get("arguments").cloned().unwrap_or(Value::Null),
                        meta: params.get("_meta").cloned().unwrap_or(Value::Null),
                        headers: parts.headers.clone(),
                        version: parts.version,
                    });
                }
                if method == "resources/read" {
                    json!({"contents": [{"uri": target, "mimeType": "text/plain", "text": format!("contents of {target}")}]})
                } else {
                    let id = params
                        .pointer("/arguments/invoice_id")
                        .and_then(Value::as_str)
                        .unwrap_or("?");
                    json!({"messages": [{"role": "user", "content": {"type": "text", "text": format!("Summarize invoice {id}")}}]})
                }
            }
            "tools/call" => {
                let tool = params
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                let args = params.get("arguments").cloned().unwrap_or(json!({}));
                if let Some(mut r) = self.record.then(|| self.received.lock().ok()).flatten() {
                    r.push(Received {
                        tool: tool.clone(),
                        arguments: args.clone(),
                        meta: params.get("_meta").cloned().unwrap_or(Value::Null),
                        headers: parts.headers.clone(),
                        version: parts.version,
                    });
                }
                let result = if tool == "confirm_refund" {
                    confirm_refund(&args, &params)
                } else {
                    call(&tool, &args)
                };
                if let Some(token) = params.pointer("/_meta/progressToken") {
                    // Asked for progress: answer as a stream that reports
                    // progress and logs a line before the result.
                    return sse_response(&[
                        json!({"jsonrpc": "2.0", "method": "notifications/progress",
                               "params": {"progressToken": token, "progress": 1, "total": 2, "message": format!("working on {tool}")}}),
                        json!({"jsonrpc": "2.0", "method": "notifications/message",
                               "params": {"level": "info", "logger": "demo", "data": format!("{tool} called")}}),
                        json!({"jsonrpc": "2.0", "id": id, "result": result}),
                    ]);
                }
                result
            }
            _ => {
                return json_response(
                    &json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "method not found"}}),
                );
            }
        };
        json_response(&json!({"jsonrpc": "2.0", "id": id, "result": result}))
    }
}

/// Serves the demo tools as an MCP stdio server (newline-delimited JSON-RPC
/// on stdin/stdout) until stdin closes. Besides the billing tools it offers
/// `pid` (its process id), `sleep` (`ms`, then answers), `env` (the value of
/// variable `name`), `log` (sends a logging notification and writes `text`
/// to stderr) and `ask` (asks its client an `elicitation/create` with
/// `message` and answers with the client's answer), which toolgate's tests
/// use to observe supervision and relaying.
pub async fn serve_stdio() -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let out = Arc::new(tokio::sync::Mutex::new(tokio::io::stdout()));
    let write = move |msg: Value| {
        let out = out.clone();
        async move {
            let mut line = serde_json::to_vec(&msg).unwrap_or_default();
            line.push(b'\n');
            let mut o = out.lock().await;
            let _ = o.write_all(&line).await;
            let _ = o.flush().await;
        }
    };
    eprintln!("demo stdio tool server ready (pid {})", std::process::id());
    // Our asks awaiting the client's answer: ask id -> the call's id.
    let mut asked: std::collections::HashMap<String, Value> = Default::default();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let Some(id) = msg.get("id").cloned() else {
            continue;
        };
        if msg.get("method").is_none() {
            // The client's answer to one of our requests.
            let call = id.as_str().and_then(|k| asked.remove(k));
            if let Some(call) = call {
                let answer = msg
                    .get("result")
                    .cloned()
                    .or_else(|| msg.get("error").map(|e| json!({ "error": e })))
                    .unwrap_or(Value::Null);
                write(json!({"jsonrpc": "2.0", "id": call, "result": {
                    "content": [{"type": "text", "text": answer.to_string()}],
                    "structuredContent": {"answer": answer}}}))
                .await;
            }
            continue;
        }
        let method = msg.get("method").and_then(Value::as_str).unwrap_or("");
        let params = msg.get("params").cloned().unwrap_or(json!({}));
        let reply = match method {
            "initialize" => {
                // Answers the revision asked for when it knows it, or the
                // one DEMO_PROTOCOL pins (to play an older server).
                let asked = params.get("protocolVersion").and_then(Value::as_str);
                let pinned = std::env::var("DEMO_PROTOCOL").ok();
                let v = pinned
                    .as_deref()
                    .or(asked)
                    .filter(|v| ["2025-06-18", "2025-11-25"].contains(v))
                    .unwrap_or("2025-06-18")
                    .to_owned();
                json!({"protocolVersion": v, "capabilities": {"tools": {}, "logging": {}},
                       "serverInfo": {"name": "toolgate-demo-stdio", "version": env!("CARGO_PKG_VERSION")}})
            }
            "ping" => json!({}),
            "tools/list" => {
                let mut tools = tool_definitions();
                if let Value::Array(t) = &mut tools {
                    t.push(json!({"name": "pid", "inputSchema": {"type": "object"}}));
                    t.push(json!({"name": "sleep", "inputSchema": {"type": "object", "properties": {"ms": {"type": "integer"}}}}));
                    t.push(json!({"name": "log", "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}}}));
                    t.push(json!({"name": "env", "inputSchema": {"type": "object", "properties": {"name": {"type": "string"}}}}));
                    t.push(json!({"name": "reveal", "inputSchema": {"type": "object"}}));
                    t.push(json!({"name": "ask", "inputSchema": {"type": "object", "properties": {"message": {"type": "string"}}}}));
                    if revealed() {
                        t.push(json!({"name": "hidden", "inputSchema": {"type": "object"}}));
                    }
                }
                json!({ "tools": tools })
            }
            "tools/call" => {
                let tool = params.get("name").and_then(Value::as_str).unwrap_or("");
                let args = params.get("arguments").cloned().unwrap_or(json!({}));
                match tool {
                    "pid" => {
                        let pid = std::process::id();
                        json!({"content": [{"type": "text", "text": pid.to_string()}], "structuredContent": {"pid": pid}})
                    }
                    "sleep" => {
                        let ms = args
                            .get("ms")
                            .and_then(Value::as_u64)
                            .unwrap_or(0)
                            .min(60_000);
                        if let Some(token) = params.pointer("/_meta/progressToken") {
                            write(json!({"jsonrpc": "2.0", "method": "notifications/progress",
                                         "params": {"progressToken": token, "progress": 0, "total": ms, "message": "sleeping"}}))
                            .await;
                            // Progress for a token nobody asked for: not relayed.
                            write(json!({"jsonrpc": "2.0", "method": "notifications/progress",
                                         "params": {"progressToken": "someone-else", "progress": 1}}))
                            .await;
                        }
                        let write = write.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                            write(json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": format!("slept {ms} ms")}]}})).await;
                        });
                        continue;
                    }
                    "reveal" => {
                        // Offers one more tool (to every process sharing
                        // DEMO_STATE_DIR) and says so.
                        if let Ok(d) = std::env::var("DEMO_STATE_DIR") {
                            let _ = std::fs::write(std::path::Path::new(&d).join("revealed"), b"1");
                        }
                        write(
                            json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}),
                        )
                        .await;
                        json!({"content": [{"type": "text", "text": "revealed"}]})
                    }
                    "ask" => {
                        let key = format!("ask-{id}");
                        asked.insert(key.clone(), id.clone());
                        let message = args
                            .get("message")
                            .and_then(Value::as_str)
                            .unwrap_or("Proceed?");
                        write(json!({"jsonrpc": "2.0", "id": key, "method": "elicitation/create", "params": {
                            "message": message,
                            "requestedSchema": {"type": "object", "properties": {"ok": {"type": "boolean"}}}}}))
                        .await;
                        continue;
                    }
                    "hidden" if revealed() => {
                        json!({"content": [{"type": "text", "text": "found"}]})
                    }
                    "env" => {
                        let name = args.get("name").and_then(Value::as_str).unwrap_or("");
                        let value = std::env::var(name).ok();
                        json!({"content": [{"type": "text", "text": format!("{value:?}")}], "structuredContent": {"value": value}})
                    }
                    "log" => {
                        let text = args.get("text").and_then(Value::as_str).unwrap_or("");
                        eprintln!("{text}");
                        write(json!({"jsonrpc": "2.0", "method": "notifications/message",
                                     "params": {"level": "info", "data": text}}))
                        .await;
                        json!({"content": [{"type": "text", "text": "logged"}]})
                    }
                    _ => call(tool, &args),
                }
            }
            _ => {
                write(json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "method not found"}})).await;
                continue;
            }
        };
        write(json!({"jsonrpc": "2.0", "id": id, "result": reply})).await;
    }
    Ok(())
}

fn revealed() -> bool {
    std::env::var("DEMO_STATE_DIR")
        .is_ok_and(|d| std::path::Path::new(&d).join("revealed").exists())
}

/// A 2026-07-28 multi-round-trip tool: the first round asks for a
/// confirmation (`input_required`, with `requestState`); the retry that
/// carries the answer and the state completes.
fn confirm_refund(args: &Value, params: &Value) -> Value {
    let id = args
        .get("invoice_id")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let state = format!("confirm:{id}");
    let answer = params.pointer("/inputResponses/confirm");
    let echoed = params.get("requestState").and_then(Value::as_str);
    match answer {
        Some(a) if echoed == Some(state.as_str()) => {
            let yes = a.pointer("/content/ok").and_then(Value::as_bool) == Some(true)
                && a.get("action").and_then(Value::as_str) == Some("accept");
            let text = if yes {
                format!("Refunded invoice {id} (confirmed)")
            } else {
                format!("Kept invoice {id} (not confirmed)")
            };
            json!({"content": [{"type": "text", "text": text}], "structuredContent": {"refunded": yes}, "isError": false})
        }
        _ => json!({
            "resultType": "input_required",
            "inputRequests": {"confirm": {"method": "elicitation/create", "params": {
                "message": format!("Refund invoice {id}?"),
                "requestedSchema": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
            }}},
            "requestState": state,
        }),
    }
}

fn call(tool: &str, args: &Value) -> Value {
    let s = |k: &str| args.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let (text, structured) = match tool {
        "get_invoice" => {
            let id = s("invoice_id");
            (
                format!("Invoice {id}: 120.00 EUR, paid"),
                json!({"invoice_id": id, "amount": 120.0, "currency": "EUR", "status": "paid"}),
            )
        }
        "refund" => (
            format!("Refunded invoice {}", s("invoice_id")),
            json!({"refunded": true}),
        ),
        "delete_invoice" => (
            format!("Deleted invoice {}", s("invoice_id")),
            json!({"deleted": true}),
        ),
        "grant_role" => (
            format!("Granted {} to {}", s("role"), s("principal")),
            json!({"granted": true}),
        ),
        "echo" => (s("text"), json!({"text": s("text")})),
        "media" => return media::call(args),
        other => {
            return json!({"isError": true, "content": [{"type": "text", "text": format!("unknown tool {other}")}]});
        }
    };
    json!({"content": [{"type": "text", "text": text}], "structuredContent": structured, "isError": false})
}

fn json_response(v: &Value) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(serde_json::to_vec(v).unwrap_or_default())));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn sse_response(messages: &[Value]) -> Response<Body> {
    let mut body = Vec::new();
    for m in messages {
        body.extend_from_slice(b"event: message\ndata: ");
        body.extend_from_slice(&serde_json::to_vec(m).unwrap_or_default());
        body.extend_from_slice(b"\n\n");
    }
    let mut r = Response::new(full(Bytes::from(body)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    r
}

fn status(s: StatusCode) -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = s;
    r
}

/// The shipped configuration, embedded for `toolgate demo`.
pub const CONFIG: &str = include_str!("../toolgate.yaml");
/// The shipped manifests, embedded for `toolgate demo`.
pub const MANIFESTS: [(&str, &str); 2] = [
    (
        "billing-bot.yaml",
        include_str!("../tool-manifests/billing-bot.yaml"),
    ),
    (
        "ops-bot.yaml",
        include_str!("../tool-manifests/ops-bot.yaml"),
    ),
];
