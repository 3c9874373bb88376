//! Fault injection: a misbehaving upstream (slow, garbage, oversized, cut
//! mid-stream, resetting, resetting in the middle of an event), an audit log that fills and frees, a state
//! database that is locked or corrupt, and `kill -9` of the toolgate binary
//! during a pending hold and during an approved forward. toolgate must fail
//! closed, say why, keep serving, and keep holds exactly-once.

// Test helpers may unwrap: a panic there is a failed assertion.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use serde_json::{json, Value};
use support::{approver_token, Harness, Opts};

// ---- an upstream that misbehaves on purpose --------------------------------

/// Tools, by what they do when called.
const TOOLS: [&str; 21] = [
    "ok",          // answers at once
    "slow",        // answers after 5 s (beyond the harness's 2 s timeout)
    "slow_ok",     // answers after 1.5 s (within it)
    "garbage",     // 200 with HTML
    "not_rpc",     // 200 with JSON that is not a JSON-RPC response
    "wrong_id",    // a JSON-RPC response to another request
    "huge",        // a result far over limits.max_body
    "sse_cut",     // an event stream that ends before the result
    "sse_garbage", // an event stream whose data is not JSON
    "status_500",  // HTTP 500
    "reset",       // drops the connection without an answer
    // An event stream closed on purpose after a priming event (id, retry)
    // and a progress event (2025-11-25's SSE polling), in the middle of a
    // third: the answer comes on the GET that resumes after "p-2".
    "sse_polled",
    "sse_polled_gone", // the same, but the resuming GET gets 404
    "sse_polled_idle", // the same, but every resuming GET ends with no event
    "sse_trickle",     // an event stream of one event in 1-byte chunks, cut off
    "error_null",      // a response whose error is null
    "error_string",    // a response whose error is a string, not an object
    "result_500",      // HTTP 500 with a JSON-RPC result
    "result_dup",      // a result with a key sent twice, deep inside
    "result_deep",     // a result nested 100 levels deep
    "sse_result_dup",  // result_dup, as an event
];

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

#[derive(Clone, Default)]
struct Flaky {
    /// Tool calls received, by tool name.
    hits: Arc<Mutex<Vec<String>>>,
    /// The polled call waiting for its resuming GET: (tool, JSON-RPC id).
    polled: Arc<Mutex<Option<(String, Value)>>>,
    /// The `last-event-id` of every GET ("" for none).
    gets: Arc<Mutex<Vec<String>>>,
}

impl Flaky {
    async fn start(&self) -> SocketAddr {
        self.start_on("127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_on(&self, addr: SocketAddr) -> SocketAddr {
        let l = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = l.local_addr().unwrap();
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |r| {
                        let me = me.clone();
                        async move { me.handle(r).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    fn hits(&self, tool: &str) -> usize {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|t| *t == tool)
            .count()
    }

    fn total(&self) -> usize {
        self.hits.lock().unwrap().len()
    }

    async fn handle(
        &self,
        req: Request<hyper::body::Incoming>,
    ) -> Result<Response<Body>, std::io::Error> {
        if req.method() == Method::GET {
            return Ok(self.resume(&req));
        }
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        let msg: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let id = msg["id"].clone();
        let ok = |result: Value| {
            Response::builder()
                .header("content-type", "application/json")
                .header("mcp-session-id", "flaky-session")
                .body(full(
                    json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string(),
                ))
                .unwrap()
        };
        match msg["method"].as_str().unwrap_or("") {
            "initialize" => {
                return Ok(ok(json!({
                    "protocolVersion": "2025-11-25",
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "flaky", "version": "1"}
                })))
            }
            "tools/list" => {
                let tools: Vec<Value> = TOOLS
                    .iter()
                    .map(|n| json!({"name": n, "inputSchema": {"type": "object"}}))
                    .collect();
                return Ok(ok(json!({ "tools": tools })));
            }
            "tools/call" => {}
            _ if id.is_null() => {
                return Ok(Response::builder()
                    .status(202)
                    .body(full(Bytes::new()))
                    .unwrap())
            }
            _ => return Ok(ok(json!({}))),
        }
        let tool = msg["params"]["name"].as_str().unwrap_or("").to_owned();
        self.hits.lock().unwrap().push(tool.clone());
        let text = |t: &str| json!({"content": [{"type": "text", "text": t}]});
        let raw = |status: u16, ct: &str, body: Body| {
            Ok(Response::builder()
                .status(status)
                .header("content-type", ct)
                .body(body)
                .unwrap())
        };
        match tool.as_str() {
            "slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(ok(text("late")))
            }
            "slow_ok" => {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                Ok(ok(text("slow but fine")))
            }
            "garbage" => raw(200, "application/json", full("<html>oops</html>")),
            "not_rpc" => raw(200, "application/json", full(r#"{"hello":"world"}"#)),
            "wrong_id" => raw(
                200,
                "application/json",
                full(
                    json!({"jsonrpc": "2.0", "id": 987654, "result": text("not yours")})
                        .to_string(),
                ),
            ),
            "huge" => {
                // 8 MiB in 64 KiB frames: never buffered whole by anyone.
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                let head = Bytes::from(format!(
                    r#"{{"jsonrpc":"2.0","id":{id},"result":{{"content":[{{"type":"text","text":""#
                ));
                raw(
                    200,
                    "application/json",
                    Chunks {
                        head: Some(head),
                        chunk,
                        left: 128,
                    }
                    .boxed(),
                )
            }
            "sse_cut" => {
                let progress = json!({"jsonrpc": "2.0", "method": "notifications/message",
                    "params": {"level": "info", "data": "working"}});
                raw(
                    200,
                    "text/event-stream",
                    full(format!("event: message\ndata: {progress}\n\n")),
                )
            }
            "sse_garbage" => raw(
                200,
                "text/event-stream",
                full("event: message\ndata: {nope\n\n"),
            ),
            "status_500" => raw(500, "text/plain", full("internal error")),
            "sse_trickle" => {
                let head = Bytes::from(format!(
                    "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"content\":[{{\"type\":\"text\",\"text\":\""
                ));
                raw(
                    200,
                    "text/event-stream",
                    Chunks {
                        head: Some(head),
                        chunk: Bytes::from_static(b"x"),
                        left: TRICKLED,
                    }
                    .boxed(),
                )
            }
            "error_null" | "error_string" => {
                let error = match tool.as_str() {
                    "error_null" => Value::Null,
                    _ => json!("boom"),
                };
                raw(
                    200,
                    "application/json",
                    full(json!({"jsonrpc": "2.0", "id": id, "error": error}).to_string()),
                )
            }
            "result_dup" | "result_deep" | "sse_result_dup" => {
                let result = match tool.as_str() {
                    "result_deep" => format!("{}{}", "[".repeat(100), "]".repeat(100)),
                    _ => r#"{"content":[{"type":"text","text":"benign","text":"evil"}]}"#.into(),
                };
                let answer = format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#);
                match tool.as_str() {
                    "sse_result_dup" => raw(
                        200,
                        "text/event-stream",
                        full(format!("event: message\ndata: {answer}\n\n")),
                    ),
                    _ => raw(200, "application/json", full(answer)),
                }
            }
            "result_500" => raw(
                500,
                "application/json",
                full(
                    json!({"jsonrpc": "2.0", "id": id, "result": text("all is well")}).to_string(),
                ),
            ),
            "sse_polled" | "sse_polled_gone" | "sse_polled_idle" => {
                *self.polled.lock().unwrap() = Some((tool.clone(), id.clone()));
                let progress = json!({"jsonrpc": "2.0", "method": "notifications/message",
                    "params": {"level": "info", "data": "working"}});
                raw(
                    200,
                    "text/event-stream",
                    full(format!(
                        // Closed in the middle of a third event: it is
                        // never dispatched, and must not run into the
                        // resumed stream's first event.
                        "id: p-1\nretry: 100\ndata: \n\nid: p-2\nevent: message\ndata: {progress}\n\nevent: message\ndata: {{\"jsonrpc\":"
                    )),
                )
            }
            "reset" => Err(std::io::Error::other("reset on purpose")),
            _ => Ok(ok(text("fine"))),
        }
    }
}

impl Flaky {
    /// A GET: resumes the polled call's stream after "p-2" (405 for a GET
    /// that resumes nothing: toolgate's own standalone stream).
    fn resume(&self, req: &Request<hyper::body::Incoming>) -> Response<Body> {
        let last = req
            .headers()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        self.gets.lock().unwrap().push(last.clone());
        let session = req
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok());
        let polled = self.polled.lock().unwrap().clone();
        let sse = |body: String| {
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(full(body))
                .unwrap()
        };
        match (polled, last.as_str(), session) {
            (Some((tool, id)), "p-2", Some("flaky-session")) if tool == "sse_polled" => {
                let done = json!({"jsonrpc": "2.0", "id": id,
                    "result": {"content": [{"type": "text", "text": "polled and done"}]}});
                sse(format!("id: p-3\nevent: message\ndata: {done}\n\n"))
            }
            (Some((tool, _)), "p-2", _) if tool == "sse_polled_idle" => {
                sse(": nothing yet\n".into())
            }
            (Some((tool, _)), _, _) if tool == "sse_polled_gone" => Response::builder()
                .status(404)
                .body(full(Bytes::new()))
                .unwrap(),
            _ => Response::builder()
                .status(405)
                .body(full(Bytes::new()))
                .unwrap(),
        }
    }

    fn gets(&self) -> Vec<String> {
        self.gets.lock().unwrap().clone()
    }
}

/// A body of `head` then `left` copies of `chunk`, one frame each.
struct Chunks {
    head: Option<Bytes>,
    chunk: Bytes,
    left: usize,
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let me = self.get_mut();
        let next = me.head.take().or_else(|| {
            (me.left > 0).then(|| {
                me.left -= 1;
                me.chunk.clone()
            })
        });
        std::task::Poll::Ready(next.map(|b| Ok(Frame::data(b))))
    }
}

/// The bytes `sse_trickle` sends one at a time.
const TRICKLED: usize = 20_000;

fn code(v: &Value) -> i64 {
    v["error"]["code"].as_i64().unwrap_or(0)
}

const FLAKY_AGENT: &str = r#"
agent: flaky-bot
tools:
  - name: "flaky__*"
"#;

fn flaky_upstream(addr: SocketAddr) -> String {
    format!("upstreams:\n  - name: flaky\n    url: http://{addr}/mcp\n")
}

/// A flaky upstream, a toolgate in front of it, and flaky-bot's token.
async fn flaky_harness() -> (Flaky, Harness, String) {
    let up = Flaky::default();
    let addr = up.start().await;
    let h = Harness::with(Opts {
        manifests: &[("flaky-bot.yaml", FLAKY_AGENT)],
        upstreams: Some(flaky_upstream(addr)),
        ..Opts::default()
    })
    .await;
    let t = h.token("flaky-bot");
    (up, h, t)
}

#[tokio::test]
async fn a_misbehaving_upstream_gets_32004_audited_and_never_hangs() {
    let (up, h, t) = flaky_harness().await;
    for tool in [
        "slow",
        "garbage",
        "not_rpc",
        "wrong_id",
        "huge",
        "sse_cut",
        "sse_garbage",
        "status_500",
        "reset",
        "sse_trickle",
        "error_null",
        "error_string",
        "result_500",
        "result_dup",
        "result_deep",
        "sse_result_dup",
    ] {
        let before = h.audit().await.len();
        let started = Instant::now();
        let v = h.call(&t, &format!("flaky__{tool}"), json!({})).await;
        assert_eq!(code(&v), -32004, "{tool}: {v}");
        assert_eq!(v["error"]["data"]["upstream"], "flaky", "{tool}: {v}");
        // The harness's upstream_timeout is 2 s.
        assert!(started.elapsed() < Duration::from_secs(4), "{tool} hung");
        assert_eq!(up.hits(tool), 1, "{tool}: forwarded once, not retried");
        let audit = h.audit().await;
        let new = support::events(&audit[before..]);
        assert_eq!(
            new,
            [("call", "allow"), ("upstream_error", "error")],
            "{tool}"
        );
        // Still serving, over the same upstream.
        let v = h.call(&t, "flaky__ok", json!({})).await;
        assert_eq!(
            v["result"]["content"][0]["text"], "fine",
            "after {tool}: {v}"
        );
    }
    // A slow answer within the timeout is not an error.
    let v = h.call(&t, "flaky__slow_ok", json!({})).await;
    assert_eq!(v["result"]["content"][0]["text"], "slow but fine", "{v}");
    assert_eq!(
        toolgate::audit::verify(&h.dir.join("audit.jsonl")).map(|n| n > 0),
        Ok(true)
    );
}

/// An event trickled a byte at a time costs constant work per byte: its
/// 20,000 one-byte chunks are read to the stream's end well within the 2 s
/// timeout (rescanning the whole event on every chunk took about 4 s of CPU
/// in a debug build, and the call timed out), and the call gets -32004.
#[tokio::test]
async fn an_event_trickled_a_byte_at_a_time_is_read_to_its_end_in_linear_time() {
    let (up, h, t) = flaky_harness().await;
    let started = Instant::now();
    let v = h.call(&t, "flaky__sse_trickle", json!({})).await;
    assert_eq!(code(&v), -32004, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("ended without a response"), "{v}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(up.hits("sse_trickle"), 1);
}

/// What is not a JSON-RPC answer is refused, not relayed: an error that is
/// no `{code, message}` object, a result under a non-2xx status, and a
/// result an agent could not send (a duplicate key, nesting past 64).
#[tokio::test]
async fn an_upstream_answer_that_is_not_json_rpc_is_refused() {
    let (_up, h, t) = flaky_harness().await;
    for (tool, why) in [
        ("error_null", "not a JSON-RPC error object"),
        ("error_string", "not a JSON-RPC error object"),
        ("result_500", "HTTP 500"),
        ("result_dup", r#"duplicate key "text" at /content/0"#),
        ("result_deep", "nesting deeper than 64 levels"),
        ("sse_result_dup", r#"duplicate key "text" at /content/0"#),
    ] {
        let started = Instant::now();
        let v = h.call(&t, &format!("flaky__{tool}"), json!({})).await;
        assert_eq!(code(&v), -32004, "{tool}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{tool}: {v}");
        assert!(v.get("result").is_none(), "{tool}: {v}");
        // Refused at once, not left waiting for another answer.
        assert!(started.elapsed() < Duration::from_secs(1), "{tool}");
    }
}

/// A 2025-11-25 server may close a call's event stream on purpose once it
/// gave an event id (SSE polling): toolgate resumes it with a GET that
/// sends `Last-Event-ID`, after the server's `retry`, and relays the answer
/// that comes there. The call is sent once; a resume the server refuses
/// (404) or that brings nothing twice in a row ends as an upstream error.
#[tokio::test]
async fn a_call_stream_closed_by_the_server_is_resumed_with_last_event_id() {
    let (up, h, t) = flaky_harness().await;
    let started = Instant::now();
    let v = h.call(&t, "flaky__sse_polled", json!({})).await;
    assert_eq!(v["result"]["content"][0]["text"], "polled and done", "{v}");
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "waited for retry"
    );
    assert_eq!(up.hits("sse_polled"), 1);
    // Resumed once: the event cut off at the close was dropped, not run
    // into the resumed stream's answer.
    assert_eq!(
        up.gets().iter().filter(|g| *g == "p-2").count(),
        1,
        "{:?}",
        up.gets()
    );
    let audit = h.audit().await;
    assert_eq!(
        support::events(&audit[audit.len() - 1..]),
        [("call", "allow")],
        "{audit:?}"
    );

    for (tool, why) in [
        ("sse_polled_gone", "resuming it got HTTP 404"),
        ("sse_polled_idle", "(resumed 2 times)"),
    ] {
        let gets = up.gets().len();
        let v = h.call(&t, &format!("flaky__{tool}"), json!({})).await;
        assert_eq!(code(&v), -32004, "{tool}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{tool}: {v}");
        assert_eq!(up.hits(tool), 1, "{tool}: sent once, never again");
        let tries = up.gets().len() - gets;
        let want = if tool == "sse_polled_gone" { 1 } else { 2 };
        assert_eq!(tries, want, "{tool}: {:?}", up.gets());
    }
}

#[tokio::test]
async fn an_upstream_that_is_down_then_back_is_used_again() {
    // Reserve a port, leave it closed: the upstream is down.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let h = Harness::with(Opts {
        manifests: &[("flaky-bot.yaml", FLAKY_AGENT)],
        upstreams: Some(flaky_upstream(addr)),
        ..Opts::default()
    })
    .await;
    let t = h.token("flaky-bot");
    let v = h.call(&t, "flaky__ok", json!({})).await;
    assert_eq!(code(&v), -32004, "{v}");
    // It comes up on the same address.
    let up = Flaky::default();
    let started = up.start_on(addr).await;
    assert_eq!(started, addr);
    let mut last = Value::Null;
    for _ in 0..50 {
        last = h.call(&t, "flaky__ok", json!({})).await;
        if last.get("result").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last["result"]["content"][0]["text"], "fine", "{last}");
}

// ---- an upstream that resets in the middle of an event ------------------------

/// An upstream speaking just enough HTTP/1.1 by hand to tear a response
/// where no HTTP library would: `torn` starts an event stream, sends half
/// of a `data:` line and resets the TCP connection (SO_LINGER 0, so an RST,
/// not a FIN); `torn_after_progress` first sends a whole notification
/// event. `ok` answers normally. Counts tool calls by name.
async fn torn_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(Mutex::new(Vec::new()));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let hits = h.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                // One request after another on the connection.
                loop {
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
                    let json = |status: &str, v: Value| {
                        let b = v.to_string();
                        format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\nmcp-session-id: torn-session\r\ncontent-length: {}\r\n\r\n{b}", b.len())
                    };
                    if !head.starts_with("post ") {
                        let _ = s
                            .write_all(
                                b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n",
                            )
                            .await;
                        continue;
                    }
                    let msg: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let id = msg["id"].clone();
                    let result =
                        |r: Value| json("200 OK", json!({"jsonrpc": "2.0", "id": id, "result": r}));
                    let answer = match msg["method"].as_str().unwrap_or("") {
                        "initialize" => result(json!({
                            "protocolVersion": "2025-11-25",
                            "capabilities": {"tools": {}},
                            "serverInfo": {"name": "torn", "version": "1"}
                        })),
                        "tools/list" => {
                            let tools: Vec<Value> = ["ok", "torn", "torn_after_progress"]
                                .iter()
                                .map(|n| json!({"name": n, "inputSchema": {"type": "object"}}))
                                .collect();
                            result(json!({ "tools": tools }))
                        }
                        "tools/call" => {
                            let tool = msg["params"]["name"].as_str().unwrap_or("").to_owned();
                            hits.lock().unwrap().push(tool.clone());
                            if tool == "ok" {
                                result(json!({"content": [{"type": "text", "text": "fine"}]}))
                            } else {
                                let mut events = String::new();
                                if tool == "torn_after_progress" {
                                    let note = json!({"jsonrpc": "2.0", "method": "notifications/message",
                                        "params": {"level": "info", "data": "working"}});
                                    events.push_str(&format!("event: message\ndata: {note}\n\n"));
                                }
                                events.push_str(&format!(
                                    "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"content\":[{{\"type\":\"te"
                                ));
                                let torn = format!(
                                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nmcp-session-id: torn-session\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{events}\r\n",
                                    events.len()
                                );
                                let _ = s.write_all(torn.as_bytes()).await;
                                let _ = s.flush().await;
                                // Let the bytes go out before the reset.
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                let _ = s.set_zero_linger();
                                return; // dropped: RST
                            }
                        }
                        _ if id.is_null() => {
                            "HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n".to_owned()
                        }
                        _ => result(json!({})),
                    };
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, hits)
}

#[tokio::test]
async fn an_upstream_reset_in_the_middle_of_an_event_gets_32004_audited_at_once() {
    let (addr, hits) = torn_upstream().await;
    let h = Harness::with(Opts {
        manifests: &[(
            "torn-bot.yaml",
            "agent: torn-bot\ntools:\n  - name: \"torn__*\"\n",
        )],
        upstreams: Some(format!(
            "upstreams:\n  - name: torn\n    url: http://{addr}/mcp\n"
        )),
        ..Opts::default()
    })
    .await;
    let t = h.token("torn-bot");
    let sid = h.initialize(&t).await;
    let hit = |tool: &str| hits.lock().unwrap().iter().filter(|t| *t == tool).count();
    let mut n = 0;
    for (tool, session) in [
        ("torn", false),
        ("torn_after_progress", false),
        ("torn_after_progress", true),
    ] {
        n += 1;
        let before = h.audit().await.len();
        let started = Instant::now();
        let v = if session {
            h.in_session(
                &t,
                &sid,
                "tools/call",
                json!({"name": format!("torn__{tool}"), "arguments": {}}),
            )
            .await
            .1
        } else {
            h.call(&t, &format!("torn__{tool}"), json!({})).await
        };
        assert_eq!(code(&v), -32004, "{tool}: {v}");
        assert_eq!(v["error"]["data"]["upstream"], "torn", "{tool}: {v}");
        // A reset is seen at once, not when the 2 s upstream timeout ends.
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{tool}: took {:?}",
            started.elapsed()
        );
        let audit = h.audit().await;
        let new = support::events(&audit[before..]);
        assert_eq!(
            new,
            [("call", "allow"), ("upstream_error", "error")],
            "{tool}"
        );
        assert_eq!(
            hit("torn") + hit("torn_after_progress"),
            n,
            "{tool}: forwarded once, not retried"
        );
        // Still serving, over the same upstream.
        let v = h.call(&t, "torn__ok", json!({})).await;
        assert_eq!(
            v["result"]["content"][0]["text"], "fine",
            "after {tool}: {v}"
        );
    }
    assert_eq!(
        toolgate::audit::verify(&h.dir.join("audit.jsonl")).map(|n| n > 0),
        Ok(true)
    );
}

// ---- the audit log fills and frees -------------------------------------------

#[tokio::test]
async fn a_full_audit_disk_fails_closed_and_recovers_when_writable_again() {
    let dir = support::temp_dir("audit-full");
    let link = dir.join("audit.jsonl");
    let real = dir.join("audit-real.jsonl");
    // The log path points at /dev/full (every write fails with ENOSPC)
    // until it is pointed at a real file.
    std::os::unix::fs::symlink("/dev/full", &link).unwrap();
    // toolgate resolves the audit path once at startup (a swapped symlink
    // cannot redirect its log); to model a disk that fills and frees, the
    // writer is handed the link itself.
    let unresolved = |c: &mut toolgate::config::Config| c.audit_path = link.clone();
    let h = Harness::with(Opts {
        dir: Some(dir.clone()),
        configure: Some(&unresolved),
        ..Opts::default()
    })
    .await;
    let t = h.token("billing-bot");
    let good = json!({"invoice_id": "INV-000001"});
    // The first call is admitted (the log was healthy) and its write fails.
    let _ = h.call(&t, "billing__get_invoice", good.clone()).await;
    h.server.gate.0.auditor.flush().await;
    let forwarded = h.received().len();
    // From now on nothing is forwarded: -32005, readiness down.
    for _ in 0..3 {
        let v = h.call(&t, "billing__get_invoice", good.clone()).await;
        assert_eq!(code(&v), -32005, "{v}");
    }
    let v = h.call(&t, "billing__delete_invoice", json!({})).await;
    assert_eq!(code(&v), -32003, "refusals are still answered: {v}");
    assert_eq!(
        h.received().len(),
        forwarded,
        "nothing forwarded while unaudited"
    );
    let (s, v) = h.admin(Method::GET, "/readyz", None, None).await;
    assert_eq!(
        (s, v["audit"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("unwritable")),
        "{v}"
    );
    // Space comes back.
    std::fs::write(&real, "").unwrap();
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        h.server.gate.0.auditor.flush().await;
        let (s, _) = h.admin(Method::GET, "/readyz", None, None).await;
        if s == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never recovered: written {} errors {} dropped {} queue {} link {:?}",
            h.server.gate.0.auditor.written(),
            h.server.gate.0.auditor.write_errors(),
            h.server.gate.0.auditor.dropped(),
            h.server.gate.0.auditor.queue_depth(),
            std::fs::read_link(&link)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = h.call(&t, "billing__get_invoice", good).await;
    assert!(v.get("result").is_some(), "{v}");
    // Nothing was lost: every decision made during the outage is in the
    // log, in order, and the chain verifies.
    let audit = h.audit().await;
    let kinds = support::events(&audit);
    assert_eq!(
        kinds.iter().filter(|k| **k == ("call", "deny")).count(),
        4,
        "three -32005 refusals and one denial: {kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == ("call", "allow")).count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(
        audit
            .iter()
            .filter(|r| r["rule"] == "audit.unavailable")
            .count(),
        3,
        "the refusals say why: {audit:#?}"
    );
    assert_eq!(toolgate::audit::verify(&link), Ok(audit.len() as u64));
    assert_eq!(h.server.gate.0.auditor.dropped(), 0);
}

// ---- the state database --------------------------------------------------------

use support::toolgate_command as toolgate;

#[test]
fn a_corrupt_state_database_stops_startup_with_a_clear_error_and_is_left_untouched() {
    let dir = support::temp_dir("corrupt-state");
    std::fs::write(
        dir.join("tool-manifests/billing-bot.yaml"),
        support::BILLING_BOT,
    )
    .unwrap();
    let garbage: Vec<u8> = b"SQLite format 3\0"
        .iter()
        .copied()
        .chain((0..8192u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8))
        .collect();
    std::fs::write(dir.join("state.db"), &garbage).unwrap();
    std::fs::write(
        dir.join("toolgate.yaml"),
        "listen: 127.0.0.1:0\nstate: sqlite://state.db\naudit: { path: audit.jsonl }\nauth:\n  agents:\n    issuer: toolgate-test\n    audience: toolgate\n    keys: [ { hs256: { secret_env: TOOLGATE_AGENT_SECRET } } ]\nupstreams:\n  - name: billing\n    url: http://127.0.0.1:9/mcp\n",
    )
    .unwrap();
    let out = toolgate()
        .args(["serve", "--config"])
        .arg(dir.join("toolgate.yaml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started on a corrupt state database: {err}"
    );
    assert!(err.contains("state.db"), "names the file: {err}");
    assert!(
        err.contains("corrupt") || err.contains("not a database"),
        "says why: {err}"
    );
    assert_eq!(
        std::fs::read(dir.join("state.db")).unwrap(),
        garbage,
        "the file was modified"
    );
}

#[tokio::test]
async fn a_locked_state_database_refuses_holds_then_recovers() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    let refund = json!({"invoice_id": "INV-000001"});
    let v = h.call(&t, "billing__refund", refund.clone()).await;
    assert_eq!(code(&v), -32010, "{v}");
    let first = v["error"]["data"]["hold_id"].as_str().unwrap().to_owned();
    // Another process takes the write lock and keeps it.
    let locker = rusqlite::Connection::open(h.dir.join("state.db")).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let v = h
        .call(&t, "billing__refund", json!({"invoice_id": "INV-000002"}))
        .await;
    assert_eq!(code(&v), -32003, "fails closed: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("approvals are unavailable"),
        "{v}"
    );
    assert!(h.received().is_empty());
    let audit = h.audit().await;
    let last = audit.last().unwrap();
    assert_eq!(last["decision"], "deny");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("hold store is unavailable"),
        "{last}"
    );
    // The lock goes away: holds work again, and the earlier one survived.
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);
    let v = h
        .call(&t, "billing__refund", json!({"invoice_id": "INV-000002"}))
        .await;
    assert_eq!(code(&v), -32010, "{v}");
    let (s, hold) = h
        .admin(
            Method::GET,
            &format!("/v1/holds/{first}"),
            Some(&approver_token("v", &["viewer"], &[])),
            None,
        )
        .await;
    assert_eq!(
        (s, hold["status"].as_str()),
        (StatusCode::OK, Some("pending")),
        "{hold}"
    );
}

// ---- kill -9 -----------------------------------------------------------------

struct Gate {
    child: Child,
    dir: PathBuf,
    port: u16,
    admin: u16,
    client: toolgate::upstream::HttpClient,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Gate {
    fn configure(dir: &Path, upstream: SocketAddr, port: u16, admin: u16) {
        std::fs::write(
            dir.join("tool-manifests/flaky-bot.yaml"),
            "agent: flaky-bot\ntools:\n  - name: flaky__ok\n    approval: required\n  - name: flaky__slow_ok\n    approval: required\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("toolgate.yaml"),
            format!(
                "listen: 127.0.0.1:{port}\nadmin: {{ listen: 127.0.0.1:{admin} }}\nstate: sqlite://state.db\naudit: {{ path: audit.jsonl }}\nauth:\n  agents:\n    issuer: toolgate-test\n    audience: toolgate\n    keys: [ {{ hs256: {{ secret_env: TOOLGATE_AGENT_SECRET }} }} ]\n  approvers:\n    issuer: toolgate-test\n    audience: toolgate-admin\n    keys: [ {{ hs256: {{ secret_env: TOOLGATE_ADMIN_SECRET }} }} ]\nholds: {{ wait: 100ms, ttl: 1h }}\nlimits: {{ upstream_timeout: 10s }}\n{}",
                flaky_upstream(upstream)
            ),
        )
        .unwrap();
    }

    async fn start(dir: &Path, port: u16, admin: u16) -> Gate {
        let child = toolgate()
            .args(["serve", "--config"])
            .arg(dir.join("toolgate.yaml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let g = Gate {
            child,
            dir: dir.to_path_buf(),
            port,
            admin,
            client: toolgate::upstream::http_client(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((StatusCode::OK, _)) = g.admin_call(Method::GET, "/readyz", None).await {
                return g;
            }
            assert!(Instant::now() < deadline, "toolgate did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill9(&mut self) {
        assert!(Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success());
        self.child.wait().unwrap();
    }

    async fn restart(mut self) -> Gate {
        self.kill9();
        Gate::start(&self.dir, self.port, self.admin).await
    }

    async fn admin_call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), hyper_util::client::legacy::Error> {
        let t = approver_token("carol", &["approver"], &["pwd", "mfa"]);
        let req = Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{}{path}", self.admin))
            .header("authorization", format!("Bearer {t}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .unwrap();
        let r = self.client.request(req).await?;
        let s = r.status();
        let b = r.into_body().collect().await.unwrap().to_bytes();
        Ok((s, serde_json::from_slice(&b).unwrap_or(Value::Null)))
    }

    /// Approves hold `id` (as carol, with MFA).
    async fn approve(&self, id: &str) -> (StatusCode, Value) {
        self.admin_call(
            Method::POST,
            &format!("/v1/holds/{id}/approve"),
            Some(json!({})),
        )
        .await
        .unwrap()
    }

    async fn call(
        &self,
        tool: &str,
        args: Value,
    ) -> Result<Value, hyper_util::client::legacy::Error> {
        call_on(self.port, tool, args).await
    }
}

/// A 2026-07-28 tools/call as flaky-bot to the toolgate on `port`.
async fn call_on(
    port: u16,
    tool: &str,
    args: Value,
) -> Result<Value, hyper_util::client::legacy::Error> {
    let client = toolgate::upstream::http_client();
    let token = support::token_with(json!({"sub": "flaky-bot"}));
    let body = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":tool,"arguments":args,
            "_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}});
    let req = Request::post(format!("http://127.0.0.1:{port}/mcp"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let r = client.request(req).await?;
    let b = r.into_body().collect().await.unwrap().to_bytes();
    Ok(serde_json::from_slice(&b).unwrap_or(Value::Null))
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_pending_hold_and_an_approved_forward_keeps_holds_exactly_once() {
    let up = Flaky::default();
    let upstream = up.start().await;
    let dir = support::temp_dir("kill9");
    let (port, admin) = (free_port(), free_port());
    Gate::configure(&dir, upstream, port, admin);
    let g = Gate::start(&dir, port, admin).await;

    // 1. A pending hold survives kill -9, and its approval forwards once.
    let v = g.call("flaky__ok", json!({"n": 1})).await.unwrap();
    assert_eq!(code(&v), -32010, "{v}");
    let a = v["error"]["data"]["hold_id"].as_str().unwrap().to_owned();
    let g = g.restart().await;
    let (s, hold) = g
        .admin_call(Method::GET, &format!("/v1/holds/{a}"), None)
        .await
        .unwrap();
    assert_eq!(
        (s, hold["status"].as_str()),
        (StatusCode::OK, Some("pending")),
        "{hold}"
    );
    let (s, r) = g.approve(&a).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let v = g.call("flaky__ok", json!({"n": 1})).await.unwrap();
    assert_eq!(v["result"]["content"][0]["text"], "fine", "{v}");
    let v = g.call("flaky__ok", json!({"n": 1})).await.unwrap();
    assert_eq!(code(&v), -32010, "single use: {v}");
    assert_eq!(up.hits("ok"), 1);

    // 2. kill -9 while an approved call is being forwarded: the approval
    // was spent before forwarding, so a retry after restart is not forwarded
    // a second time.
    let v = g.call("flaky__slow_ok", json!({"n": 2})).await.unwrap();
    let b = v["error"]["data"]["hold_id"].as_str().unwrap().to_owned();
    let (s, _) = g.approve(&b).await;
    assert_eq!(s, StatusCode::OK);
    let mut g = g;
    let in_flight = tokio::spawn(call_on(port, "flaky__slow_ok", json!({"n": 2})));
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.hits("slow_ok") == 0 {
        assert!(
            Instant::now() < deadline,
            "the approved call never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    g.kill9();
    assert!(
        in_flight.await.unwrap().is_err(),
        "the caller saw the connection die"
    );
    let g = Gate::start(&dir, port, admin).await;
    let v = g.call("flaky__slow_ok", json!({"n": 2})).await.unwrap();
    assert_eq!(
        code(&v),
        -32010,
        "a spent approval is not revived by a crash: {v}"
    );
    assert_eq!(up.hits("slow_ok"), 1, "forwarded exactly once");

    // The audit log survived both kills: it verifies, and it holds the
    // record of each approval's use.
    drop(g);
    let log = dir.join("audit.jsonl");
    assert!(
        toolgate::audit::verify(&log).is_ok(),
        "{:?}",
        toolgate::audit::verify(&log)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let used: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["event"] == "grant_used")
        .collect();
    let ids: Vec<&str> = used
        .iter()
        .map(|r| r["hold_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [a.as_str(), b.as_str()], "{used:#?}");
    let total = up.total();
    assert_eq!(total, 2, "nothing else reached the upstream");
}
