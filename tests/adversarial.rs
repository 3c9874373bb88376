//! The adversarial suite: toolgate attacked by the agents it governs.
//!
//! Every case runs against a real toolgate on loopback in front of the
//! recording demo tool server, and asserts the same five things:
//! 1. the expected HTTP status and JSON-RPC code;
//! 2. nothing reached the upstream (the tool server records every call);
//! 3. exactly one audit record, and it is not an `allow`;
//! 4. toolgate still serves: a good call right after is forwarded;
//! 5. no token used in the case appears in the operator log (captured at
//!    `toolgate=trace`) or the audit log.
//!
//! Refusals that happen in the HTTP layer before a request exists (hyper's
//! 431 for too many headers, 400 for broken framing) cannot be attributed
//! to anyone, so they expect zero records; those cases say so.

// Test helpers may unwrap: a panic there is a failed assertion.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use http::{Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use support::{approver_token, token_with, Harness, Opts, SECRET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use toolgate::identity::now_unix;

const AGENT: &str = r#"
agent: billing-bot
rate_limit: 100000/min
tools:
  - name: billing__get_invoice
    arguments:
      type: object
      properties:
        invoice_id: { type: string, pattern: "^INV-[0-9]{6}$" }
      required: [invoice_id]
      additionalProperties: false
  - name: billing__echo
  - name: billing__refund
    approval: required
  - name: billing__grant_role
deny:
  - name: "*__delete_*"
"#;

const RATE_BOT: &str = r#"
agent: rate-bot
tools:
  - name: billing__echo
    rate_limit: { rate: 5/min, burst: 5 }
"#;

const BURST_BOT: &str = r#"
agent: burst-bot
tools:
  - name: billing__echo
    rate_limit: { rate: 5/min, burst: 5 }
"#;

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

// ---- the suite ----------------------------------------------------------

#[derive(Clone, Copy)]
struct Expect {
    status: StatusCode,
    /// The JSON-RPC error code, when the answer has a body.
    code: Option<i64>,
    /// Audit records the case must add (1, or 0 for HTTP-layer refusals).
    records: usize,
}

const fn rpc(status: StatusCode, code: i64) -> Expect {
    Expect {
        status,
        code: Some(code),
        records: 1,
    }
}

const UNAUTHORIZED: Expect = rpc(StatusCode::UNAUTHORIZED, -32003);
const DENIED: Expect = rpc(StatusCode::OK, -32003);
const HELD: Expect = rpc(StatusCode::OK, -32010);

struct Suite {
    h: Harness,
    good: String,
    /// Every token a case used: none may appear in a log.
    secrets: Mutex<Vec<String>>,
}

impl Suite {
    async fn with(opts: Opts<'_>) -> Suite {
        support::operator_log();
        let h = Harness::with(Opts {
            extra: "alerts: { denials: { threshold: 1000000, window: 1m } }",
            ..opts
        })
        .await;
        let good = h.token("billing-bot");
        Suite {
            h,
            secrets: Mutex::new(vec![good.clone()]),
            good,
        }
    }

    async fn new() -> Suite {
        Self::with(Opts {
            manifests: &[
                ("billing-bot.yaml", AGENT),
                ("rate-bot.yaml", RATE_BOT),
                ("burst-bot.yaml", BURST_BOT),
            ],
            ..Opts::default()
        })
        .await
    }

    /// Remembers `token` as a secret and returns it.
    fn secret(&self, token: String) -> String {
        self.secrets.lock().unwrap().push(token.clone());
        token
    }

    /// Audit records of calls (alerts about probing are not records of a
    /// call; they are tested in tests/operate.rs).
    async fn records(&self) -> Vec<Value> {
        self.h
            .audit()
            .await
            .into_iter()
            .filter(|r| r["event"] != "alert")
            .collect()
    }

    /// Runs one case and asserts the suite's five properties.
    async fn case<F>(&self, name: &str, want: Expect, run: F)
    where
        F: Future<Output = (StatusCode, Value)>,
    {
        let before = self.records().await.len();
        let reached = self.h.tools.received().len();
        let (status, body) = run.await;
        assert_eq!(status, want.status, "{name}: status ({body})");
        if let Some(c) = want.code {
            assert_eq!(body["error"]["code"], c, "{name}: JSON-RPC code ({body})");
        }
        assert_eq!(
            self.h.tools.received().len(),
            reached,
            "{name}: reached the upstream"
        );
        let records = self.records().await;
        let new = &records[before..];
        assert_eq!(new.len(), want.records, "{name}: audit records {new:#?}");
        for r in new {
            assert_ne!(r["decision"], "allow", "{name}: {r}");
        }
        self.still_serving(name).await;
        self.no_secret_logged(name);
    }

    async fn still_serving(&self, name: &str) {
        let reached = self.h.tools.received().len();
        let v = self
            .h
            .call(
                &self.good,
                "billing__get_invoice",
                json!({"invoice_id": "INV-000001"}),
            )
            .await;
        assert!(v.get("result").is_some(), "{name}: not serving after: {v}");
        assert_eq!(self.h.tools.received().len(), reached + 1, "{name}");
    }

    fn no_secret_logged(&self, name: &str) {
        let log = support::operator_log().text();
        let audit = std::fs::read_to_string(self.h.dir.join("audit.jsonl")).unwrap_or_default();
        assert!(
            log.contains("toolgate::"),
            "{name}: the operator log is not captured"
        );
        for s in self.secrets.lock().unwrap().iter() {
            // The signature alone identifies a token; check it and the whole.
            let sig = s.rsplit('.').next().unwrap_or(s);
            for needle in [s.as_str(), sig] {
                if needle.len() < 16 {
                    continue;
                }
                assert!(
                    !log.contains(needle),
                    "{name}: a token is in the operator log"
                );
                assert!(
                    !audit.contains(needle),
                    "{name}: a token is in the audit log"
                );
            }
        }
    }

    /// A 2026-07-28 tools/call with `token`.
    async fn call_as(&self, token: &str, tool: &str, args: Value) -> (StatusCode, Value) {
        self.h
            .modern(
                token,
                "tools/call",
                json!({"name": tool, "arguments": args}),
            )
            .await
    }

    /// A tools/call as the good agent.
    async fn call(&self, tool: &str, args: Value) -> (StatusCode, Value) {
        self.call_as(&self.good, tool, args).await
    }

    /// POSTs a raw body with the good token in session `sid` (2025-11-25,
    /// so that only what the body gets wrong is refused).
    async fn post_raw(&self, sid: &str, body: impl Into<bytes::Bytes>) -> (StatusCode, Value) {
        let (s, _, v) = self
            .h
            .post(
                Some(&self.good),
                &[
                    ("mcp-protocol-version", "2025-11-25"),
                    ("mcp-session-id", sid),
                ],
                body,
            )
            .await;
        (s, v)
    }

    /// A tools/call as the good agent in session `sid`.
    async fn call_in(&self, sid: &str, tool: &str, args: Value) -> (StatusCode, Value) {
        self.h
            .in_session(
                &self.good,
                sid,
                "tools/call",
                json!({"name": tool, "arguments": args}),
            )
            .await
    }

    /// Sends raw bytes on a fresh connection to the data plane and returns
    /// the status line's code and the response text (`Connection: close`).
    async fn raw(&self, request: &[u8]) -> (u16, String) {
        raw(self.h.server.addr, request).await
    }
}

async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String) {
    let (status, text, _) = raw_closing(addr, request).await;
    (status, text)
}

/// Like [`raw`], and whether toolgate closed the connection (within 3 s).
async fn raw_closing(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String, bool) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out))
        .await
        .is_ok();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text, closed)
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

fn claims() -> Value {
    let now = now_unix();
    json!({"iss": "toolgate-test", "aud": "toolgate", "sub": "billing-bot", "exp": now + 600, "iat": now})
}

/// A JWT with exactly this header, signed with `key` under `alg`.
fn forge(header: Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let msg = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), key, alg).unwrap();
    format!("{msg}.{sig}")
}

/// A loopback listener that counts connections: key URLs in token headers
/// point here, and nothing may ever connect.
async fn tripwire() -> (String, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/keys", l.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    (url, hits)
}

// ---- JWT ----------------------------------------------------------------

#[tokio::test]
async fn forged_and_invalid_tokens_are_refused_with_401() {
    let rsa_public = fixtures().join("rsa-public.pem");
    let keys = format!(
        "      - hs256: {{ secret_env: TG_TEST_AGENT_SECRET }}\n      - rs256: {{ public_key_pem: \"{}\", kid: rsa }}",
        rsa_public.display()
    );
    let s = Suite::with(Opts {
        manifests: &[("billing-bot.yaml", AGENT)],
        agent_keys: Some(&keys),
        ..Opts::default()
    })
    .await;
    let hs = EncodingKey::from_secret(SECRET.as_bytes());
    let attacker = EncodingKey::from_secret(b"the attacker's own secret, 32 bytes+");
    let pem = std::fs::read(&rsa_public).unwrap();
    let pem_as_secret = EncodingKey::from_secret(&pem);
    let (url, hits) = tripwire().await;
    let c = claims();
    let now = now_unix();
    let with = |extra: Value| {
        let mut c = claims();
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(c.to_string().as_bytes())
    );
    let jwk =
        json!({"kty": "oct", "k": b64(b"the attacker's own secret, 32 bytes+"), "alg": "HS256"});
    let cases: Vec<(&str, String)> = vec![
        ("alg none", none.clone()),
        ("alg none with a configured kid", {
            format!(
                "{}.{}.",
                b64(br#"{"alg":"none","kid":"rsa"}"#),
                b64(c.to_string().as_bytes())
            )
        }),
        (
            "alg NONE",
            none.replacen(
                &b64(br#"{"alg":"none","typ":"JWT"}"#),
                &b64(br#"{"alg":"NONE"}"#),
                1,
            ),
        ),
        (
            "HS256 signed with the RSA public key, kid rsa",
            forge(
                json!({"alg": "HS256", "kid": "rsa"}),
                &c,
                &pem_as_secret,
                Algorithm::HS256,
            ),
        ),
        (
            "HS256 signed with the RSA public key, no kid",
            forge(
                json!({"alg": "HS256"}),
                &c,
                &pem_as_secret,
                Algorithm::HS256,
            ),
        ),
        (
            "unknown kid",
            forge(
                json!({"alg": "HS256", "kid": "nope"}),
                &c,
                &hs,
                Algorithm::HS256,
            ),
        ),
        (
            "path-injected kid",
            forge(
                json!({"alg": "HS256", "kid": "../../../../dev/null"}),
                &c,
                &attacker,
                Algorithm::HS256,
            ),
        ),
        (
            "SQL-injected kid",
            forge(
                json!({"alg": "HS256", "kid": "x' UNION SELECT 'k"}),
                &c,
                &attacker,
                Algorithm::HS256,
            ),
        ),
        (
            "jku to an attacker's key set",
            forge(
                json!({"alg": "HS256", "jku": url}),
                &c,
                &attacker,
                Algorithm::HS256,
            ),
        ),
        (
            "embedded jwk",
            forge(
                json!({"alg": "HS256", "jwk": jwk}),
                &c,
                &attacker,
                Algorithm::HS256,
            ),
        ),
        (
            "x5u to an attacker's certificate",
            forge(
                json!({"alg": "RS256", "x5u": url}),
                &c,
                &attacker,
                Algorithm::HS256,
            ),
        ),
        (
            "expired",
            token_with(json!({"sub": "billing-bot", "exp": now - 5})),
        ),
        (
            "not valid before a future nbf",
            token_with(json!({"sub": "billing-bot", "nbf": now + 600})),
        ),
        (
            "wrong audience",
            token_with(json!({"sub": "billing-bot", "aud": "someone-else"})),
        ),
        (
            "audience list without ours",
            token_with(json!({"sub": "billing-bot", "aud": ["a", "b"]})),
        ),
        (
            "wrong issuer",
            token_with(json!({"sub": "billing-bot", "iss": "evil"})),
        ),
        (
            "no exp",
            token_with(json!({"sub": "billing-bot", "exp": null})),
        ),
        ("no agent claim", token_with(json!({"sub": null}))),
        ("empty agent claim", token_with(json!({"sub": ""}))),
        ("numeric agent claim", token_with(json!({"sub": 7}))),
        ("signature stripped", {
            let t = s.h.token("billing-bot");
            format!("{}.", t.rsplit_once('.').unwrap().0)
        }),
        ("payload swapped under a valid signature", {
            let t = s.h.token("billing-bot");
            let parts: Vec<&str> = t.split('.').collect();
            let evil = with(json!({"sub": "ops-admin"}));
            format!(
                "{}.{}.{}",
                parts[0],
                b64(evil.to_string().as_bytes()),
                parts[2]
            )
        }),
        ("16 KiB token", {
            let big = with(json!({"pad": "x".repeat(16 * 1024)}));
            forge(json!({"alg": "HS256"}), &big, &hs, Algorithm::HS256)
        }),
        ("not a JWT", "not-a-jwt".into()),
    ];
    for (name, token) in cases {
        let token = s.secret(token);
        s.case(
            name,
            UNAUTHORIZED,
            s.call_as(
                &token,
                "billing__get_invoice",
                json!({"invoice_id": "INV-000001"}),
            ),
        )
        .await;
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "a key URL from a token was fetched"
    );

    // Header tricks around a valid token.
    let good = s.good.clone();
    let body = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"billing__get_invoice","arguments":{"invoice_id":"INV-000001"}}}).to_string();
    let addr = s.h.server.addr;
    let http = |auth: Vec<String>, path: &str| {
        let mut r = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMcp-Protocol-Version: 2025-11-25\r\nConnection: close\r\nContent-Length: {}\r\n",
            addr.port(),
            body.len()
        );
        for a in auth {
            r.push_str(&format!("Authorization: {a}\r\n"));
        }
        r.push_str("\r\n");
        r.push_str(&body);
        r.into_bytes()
    };
    let json_of = |text: &str| -> Value {
        serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or("")).unwrap_or(Value::Null)
    };
    let other = s.secret(s.h.token("ops-admin"));
    type Raw = (&'static str, Vec<u8>);
    let raws: Vec<Raw> = vec![
        (
            "token in the query string",
            http(vec![], &format!("/mcp?access_token={good}")),
        ),
        (
            "two Authorization headers, both valid",
            http(
                vec![format!("Bearer {good}"), format!("Bearer {other}")],
                "/mcp",
            ),
        ),
        (
            "two Authorization headers, one empty",
            http(vec![format!("Bearer {good}"), "Bearer ".into()], "/mcp"),
        ),
        ("Basic scheme", http(vec![format!("Basic {good}")], "/mcp")),
        ("token without a scheme", http(vec![good.clone()], "/mcp")),
    ];
    for (name, req) in raws {
        s.case(name, UNAUTHORIZED, async {
            let (st, text) = raw(addr, &req).await;
            (StatusCode::from_u16(st).unwrap(), json_of(&text))
        })
        .await;
    }

    // Key-URL headers on an otherwise valid token are ignored, not followed.
    let t = s.secret(forge(
        json!({"alg": "HS256", "jku": url, "x5u": url}),
        &c,
        &hs,
        Algorithm::HS256,
    ));
    let (st, v) = s.call_as(&t, "billing__echo", json!({"text": "hi"})).await;
    assert_eq!(st, StatusCode::OK);
    assert!(v.get("result").is_some(), "{v}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    s.no_secret_logged("valid token with jku");
}

// ---- JSON-RPC -----------------------------------------------------------

#[tokio::test]
async fn malformed_json_rpc_is_refused_before_any_decision() {
    let s = Suite::new().await;
    let call = |params: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{params}}}"#)
    };
    let meta = r#""_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}"#;
    let deep = format!(
        r#"{{"name":"billing__echo","arguments":{{"a":{}1{}}},{meta}}}"#,
        "[".repeat(70),
        "]".repeat(70)
    );
    let bad = StatusCode::BAD_REQUEST;
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("batch", format!("[{}]", call(r#"{"name":"billing__echo","arguments":{}}"#)).into_bytes(), rpc(bad, -32600)),
        ("empty batch", b"[]".to_vec(), rpc(bad, -32600)),
        (
            "tools/call as a notification",
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"billing__echo","arguments":{}}}"#.into(),
            rpc(bad, -32600),
        ),
        (
            "duplicate name",
            call(r#"{"name":"billing__echo","name":"billing__delete_invoice","arguments":{}}"#).into_bytes(),
            rpc(bad, -32700),
        ),
        (
            "duplicate method",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"billing__delete_invoice"}}"#.into(),
            rpc(bad, -32700),
        ),
        (
            "duplicate key deep in arguments",
            call(r#"{"name":"billing__echo","arguments":{"a":[{"b":{"c":1,"c":2}}]}}"#).into_bytes(),
            rpc(bad, -32700),
        ),
        (
            "duplicate params",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"billing__echo"},"params":{"name":"billing__delete_invoice"}}"#.into(),
            rpc(bad, -32700),
        ),
        (
            "case-variant Name beside name",
            call(r#"{"name":"billing__echo","Name":"billing__delete_invoice","arguments":{}}"#).into_bytes(),
            rpc(StatusCode::OK, -32602),
        ),
        (
            "case-variant Method",
            r#"{"jsonrpc":"2.0","id":1,"Method":"tools/call","params":{"name":"billing__echo"}}"#.into(),
            rpc(bad, -32600),
        ),
        (
            "case-variant Arguments",
            call(r#"{"name":"billing__echo","Arguments":{"text":"x"}}"#).into_bytes(),
            rpc(StatusCode::OK, -32602),
        ),
        (
            "invalid UTF-8",
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"billing__echo\",\"arguments\":{\"t\":\"\xff\xfe\"}}}".to_vec(),
            rpc(bad, -32700),
        ),
        (
            "overlong UTF-8 encoding of a quote",
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"billing__echo\xc0\xa2}}".to_vec(),
            rpc(bad, -32700),
        ),
        (
            "lone surrogate",
            call(r#"{"name":"billing__echo","arguments":{"t":"\ud800"}}"#).into_bytes(),
            rpc(bad, -32700),
        ),
        (
            "lone surrogate in the name",
            call(r#"{"name":"billing__ech\udc6f","arguments":{}}"#).into_bytes(),
            rpc(bad, -32700),
        ),
        ("nesting deeper than 64", call(&deep).into_bytes(), rpc(bad, -32700)),
        (
            "number beyond f64",
            call(r#"{"name":"billing__echo","arguments":{"n":1e400}}"#).into_bytes(),
            rpc(bad, -32700),
        ),
        ("arguments an array", call(r#"{"name":"billing__echo","arguments":[1]}"#).into_bytes(), rpc(bad, -32602)),
        ("arguments a string", call(r#"{"name":"billing__echo","arguments":"{}"}"#).into_bytes(), rpc(bad, -32602)),
        ("arguments null", call(r#"{"name":"billing__echo","arguments":null}"#).into_bytes(), rpc(bad, -32602)),
        ("params an array", call(r#"["billing__echo"]"#).into_bytes(), rpc(bad, -32600)),
        ("name a number", call(r#"{"name":7}"#).into_bytes(), rpc(StatusCode::OK, -32602)),
        ("id an object", r#"{"jsonrpc":"2.0","id":{},"method":"tools/call","params":{"name":"billing__echo"}}"#.into(), rpc(bad, -32600)),
        ("jsonrpc 1.0", r#"{"jsonrpc":"1.0","id":1,"method":"tools/call","params":{"name":"billing__echo"}}"#.into(), rpc(bad, -32600)),
        ("trailing garbage", format!("{} {{}}", call(r#"{"name":"billing__echo"}"#)).into_bytes(), rpc(bad, -32700)),
        ("empty body", Vec::new(), rpc(bad, -32700)),
        ("a bare string", br#""tools/call""#.to_vec(), rpc(bad, -32600)),
        ("byte-order mark", [&[0xef, 0xbb, 0xbf][..], call(r#"{"name":"billing__echo"}"#).as_bytes()].concat(), rpc(bad, -32700)),
    ];
    let sid = s.h.initialize(&s.good).await;
    for (name, body, want) in cases {
        s.case(name, want, s.post_raw(&sid, body)).await;
    }

    // Huge integers within f64 range are numbers, not errors: what is
    // checked is what is forwarded (toolgate's own serialisation).
    let (_, v) = s
        .call("billing__echo", json!({"text": "n", "n": 1e300}))
        .await;
    assert!(v.get("result").is_some(), "{v}");

    // Content types.
    let body = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"billing__get_invoice","arguments":{"invoice_id":"INV-000001"}}}).to_string();
    for (name, ct) in [
        ("text/plain", "text/plain"),
        ("form", "application/x-www-form-urlencoded"),
        ("json lookalike", "application/jsonp"),
        ("UTF-16 charset", "application/json; charset=utf-16"),
        ("multipart", "multipart/form-data; boundary=x"),
    ] {
        s.case(
            name,
            Expect {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code: None,
                records: 1,
            },
            async {
                let (st, _, v) =
                    s.h.post(
                        Some(&s.good),
                        &[("content-type", ct), ("mcp-protocol-version", "2025-11-25")],
                        body.clone(),
                    )
                    .await;
                (st, v)
            },
        )
        .await;
    }
    // No Content-Type at all: not assumed to be JSON.
    let no_ct = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {}\r\nAccept: application/json, text/event-stream\r\nMcp-Protocol-Version: 2025-11-25\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        s.h.server.addr.port(),
        s.good,
        body.len()
    );
    s.case(
        "no Content-Type header",
        rpc(StatusCode::UNSUPPORTED_MEDIA_TYPE, -32600),
        async {
            let (st, text) = s.raw(no_ct.as_bytes()).await;
            let v: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or(""))
                .unwrap_or(Value::Null);
            (StatusCode::from_u16(st).unwrap(), v)
        },
    )
    .await;
    // Two Content-Type headers, even if one is JSON: refused, not guessed.
    for second in ["text/plain", "application/json"] {
        let two_ct = format!(
            "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Type: {second}\r\nAccept: application/json, text/event-stream\r\nMcp-Protocol-Version: 2025-11-25\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            s.h.server.addr.port(),
            s.good,
            body.len()
        );
        s.case(
            &format!("two Content-Type headers (application/json, {second})"),
            rpc(StatusCode::UNSUPPORTED_MEDIA_TYPE, -32600),
            async {
                let (st, text) = s.raw(two_ct.as_bytes()).await;
                let v: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or(""))
                    .unwrap_or(Value::Null);
                (StatusCode::from_u16(st).unwrap(), v)
            },
        )
        .await;
    }
    // Case and parameters of a JSON media type are fine.
    for ct in [
        "Application/JSON",
        "application/json; charset=UTF-8",
        "application/json;charset=utf-8",
    ] {
        let sid = s.h.initialize(&s.good).await;
        let (st, _, v) =
            s.h.post(
                Some(&s.good),
                &[
                    ("content-type", ct),
                    ("mcp-session-id", &sid),
                    ("mcp-protocol-version", "2025-11-25"),
                ],
                body.clone(),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{ct}: {v}");
        assert!(v.get("result").is_some(), "{ct}: {v}");
    }
}

/// A 2026-07-28 tools/call of `billing__echo` whose `arguments` are the raw
/// JSON text `args` (so that number literals reach toolgate as written).
async fn echo_raw(s: &Suite, args: &str) -> (StatusCode, Value) {
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"billing__echo","arguments":{args},"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{{}}}}}}}}"#
    );
    let (st, _, v) =
        s.h.post(
            Some(&s.good),
            &[
                ("mcp-protocol-version", "2026-07-28"),
                ("mcp-method", "tools/call"),
                ("mcp-name", "billing__echo"),
            ],
            body,
        )
        .await;
    (st, v)
}

/// Integers that fit 64 bits, beyond what a double holds exactly (2^53),
/// are forwarded digit for digit: what was checked is what is forwarded.
#[tokio::test]
async fn integers_up_to_64_bits_are_forwarded_exactly() {
    let s = Suite::new().await;
    for (lit, want) in [
        ("9007199254740993", json!(9_007_199_254_740_993u64)),
        ("18446744073709551615", json!(u64::MAX)),
        ("-9223372036854775808", json!(i64::MIN)),
    ] {
        let before = s.h.tools.received().len();
        let (st, v) = echo_raw(&s, &format!(r#"{{"text":"n","n":{lit}}}"#)).await;
        assert_eq!(st, StatusCode::OK, "{lit}: {v}");
        assert!(v.get("result").is_some(), "{lit}: {v}");
        let got = s.h.tools.received();
        assert_eq!(got.len(), before + 1, "{lit}");
        let n = &got.last().unwrap().arguments["n"];
        assert_eq!(n, &want, "{lit} reached the upstream as {n}");
        assert_eq!(n.to_string(), lit);
    }
    s.no_secret_logged("64-bit integers");
}

/// An integer literal beyond 64 bits would reach the upstream as another
/// number than the one the agent wrote (serde_json reads it as the nearest
/// f64: 18446744073709551616 became 1.8446744073709552e19): it is refused,
/// -32700 naming its JSON pointer, like 1e400 is.
#[tokio::test]
async fn integers_beyond_64_bits_are_refused_not_altered() {
    let s = Suite::new().await;
    for lit in [
        "18446744073709551616",
        "-9223372036854775809",
        "123456789012345678901234567890",
    ] {
        s.case(
            &format!("integer literal {lit}"),
            rpc(StatusCode::BAD_REQUEST, -32700),
            async {
                let (st, v) =
                    echo_raw(&s, &format!(r#"{{"text":"n","deep":[{{"n":{lit}}}]}}"#)).await;
                let msg = v["error"]["message"].as_str().unwrap_or("");
                assert!(msg.contains("/deep/0/n"), "{lit}: names the pointer: {v}");
                (st, v)
            },
        )
        .await;
    }
}

// ---- names --------------------------------------------------------------

#[tokio::test]
async fn tool_names_match_exactly_as_exposed() {
    let s = Suite::new().await;
    let args = json!({"invoice_id": "INV-000001"});
    let bad = rpc(StatusCode::OK, -32602);
    let cases: Vec<(&str, &str, Expect)> = vec![
        ("upper case", "BILLING__GET_INVOICE", DENIED),
        ("one capital", "billing__Get_invoice", DENIED),
        ("Cyrillic i", "billing__get_\u{456}nvoice", DENIED),
        ("fullwidth letters", "\u{ff42}illing__get_invoice", DENIED),
        ("zero-width space", "billing__get_\u{200b}invoice", DENIED),
        ("combining accent", "billing__get_invoice\u{301}", DENIED),
        ("leading space", " billing__get_invoice", DENIED),
        ("trailing space", "billing__get_invoice ", DENIED),
        ("no-break space", "billing__get_invoice\u{a0}", DENIED),
        ("tab", "billing__get_invoice\t", bad),
        ("newline", "billing__get_invoice\n", bad),
        ("NUL", "billing__get_invoice\u{0}", bad),
        (
            "NUL then a denied suffix",
            "billing__get_invoice\u{0}__delete_x",
            bad,
        ),
        ("three underscores", "billing___get_invoice", DENIED),
        ("prefix alone", "billing__", DENIED),
        ("prefix doubled", "billing__billing__get_invoice", DENIED),
        ("suffix added", "billing__get_invoice__x", DENIED),
        ("other prefix", "ops__get_invoice", DENIED),
        ("no prefix", "get_invoice", DENIED),
        ("glob characters", "billing__get_*", DENIED),
        (
            "denied by glob, any case of the rest",
            "billing__delete_invoice",
            DENIED,
        ),
        (
            "denied through a path-like name",
            "billing__x/../delete_invoice",
            DENIED,
        ),
        (
            "300 characters",
            &*Box::leak("a".repeat(300).into_boxed_str()),
            bad,
        ),
        ("empty", "", bad),
    ];
    // In a session: the name travels only in the body.
    let sid = s.h.initialize(&s.good).await;
    for (name, tool, want) in cases {
        s.case(name, want, s.call_in(&sid, tool, args.clone()))
            .await;
    }
    // 2026-07-28: Mcp-Name carries non-ASCII names base64-encoded, and the
    // decoded header must equal the body's name.
    let confusable = "billing__get_\u{456}nvoice";
    let encoded = format!(
        "=?base64?{}?=",
        base64::engine::general_purpose::STANDARD.encode(confusable)
    );
    let body = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":confusable,"arguments":args,
        "_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}})
    .to_string();
    s.case("Cyrillic i, stateless", DENIED, async {
        let (st, _, v) =
            s.h.post(
                Some(&s.good),
                &[
                    ("mcp-protocol-version", "2026-07-28"),
                    ("mcp-method", "tools/call"),
                    ("mcp-name", &encoded),
                ],
                body,
            )
            .await;
        (st, v)
    })
    .await;
}

// ---- sessions and 2026-07-28 headers --------------------------------------

#[tokio::test]
async fn sessions_belong_to_one_agent_and_headers_must_match_the_body() {
    let s = Suite::with(Opts {
        manifests: &[
            ("billing-bot.yaml", AGENT),
            (
                "other-bot.yaml",
                "agent: other-bot\ntools:\n  - name: billing__echo\n",
            ),
        ],
        ..Opts::default()
    })
    .await;
    let other = s.secret(s.h.token("other-bot"));
    let sid = s.h.initialize(&s.good).await;
    let not_found = Expect {
        status: StatusCode::NOT_FOUND,
        code: None,
        records: 1,
    };
    let call = json!({"name": "billing__get_invoice", "arguments": {"invoice_id": "INV-000001"}});
    s.case(
        "another agent's session",
        not_found,
        s.h.in_session(&other, &sid, "tools/call", call.clone()),
    )
    .await;
    s.case(
        "a made-up session",
        not_found,
        s.h.in_session(
            &s.good,
            "0123456789abcdef0123456789abcdef",
            "tools/call",
            call.clone(),
        ),
    )
    .await;
    s.case(
        "a session id with odd bytes",
        not_found,
        s.h.in_session(&s.good, "../../x", "tools/call", call.clone()),
    )
    .await;
    let st = s.h.delete_session(&s.good, &sid).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    s.case(
        "a deleted session",
        not_found,
        s.h.in_session(&s.good, &sid, "tools/call", call.clone()),
    )
    .await;

    // 2026-07-28: the routing headers must say what the body says.
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}});
    let body = |name: &str, version: &str| {
        let mut m = meta.clone();
        m["io.modelcontextprotocol/protocolVersion"] = json!(version);
        json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":name,"arguments":{"invoice_id":"INV-000001"},"_meta":m}}).to_string()
    };
    let v = ("mcp-protocol-version", "2026-07-28");
    let mismatch = rpc(StatusCode::BAD_REQUEST, -32020);
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String, Expect);
    let cases: Vec<Case> = vec![
        (
            "Mcp-Name names an allowed tool, the body a denied one",
            vec![
                v,
                ("mcp-method", "tools/call"),
                ("mcp-name", "billing__get_invoice"),
            ],
            body("billing__delete_invoice", "2026-07-28"),
            mismatch,
        ),
        (
            "Mcp-Name in another case",
            vec![
                v,
                ("mcp-method", "tools/call"),
                ("mcp-name", "BILLING__GET_INVOICE"),
            ],
            body("billing__get_invoice", "2026-07-28"),
            mismatch,
        ),
        (
            "Mcp-Method says list",
            vec![
                v,
                ("mcp-method", "tools/list"),
                ("mcp-name", "billing__get_invoice"),
            ],
            body("billing__get_invoice", "2026-07-28"),
            mismatch,
        ),
        (
            "Mcp-Name missing",
            vec![v, ("mcp-method", "tools/call")],
            body("billing__get_invoice", "2026-07-28"),
            mismatch,
        ),
        (
            "two Mcp-Name headers",
            vec![
                v,
                ("mcp-method", "tools/call"),
                ("mcp-name", "billing__get_invoice"),
                ("mcp-name", "billing__delete_invoice"),
            ],
            body("billing__get_invoice", "2026-07-28"),
            mismatch,
        ),
        (
            "header and _meta versions differ",
            vec![
                v,
                ("mcp-method", "tools/call"),
                ("mcp-name", "billing__get_invoice"),
            ],
            body("billing__get_invoice", "2025-11-25"),
            mismatch,
        ),
        (
            "unknown version",
            vec![
                ("mcp-protocol-version", "2099-01-01"),
                ("mcp-method", "tools/call"),
                ("mcp-name", "billing__get_invoice"),
            ],
            body("billing__get_invoice", "2099-01-01"),
            rpc(StatusCode::BAD_REQUEST, -32022),
        ),
    ];
    for (name, headers, body, want) in cases {
        s.case(name, want, async {
            let (st, _, v) = s.h.post(Some(&s.good), &headers, body).await;
            (st, v)
        })
        .await;
    }
}

// ---- escalation evasions --------------------------------------------------

#[tokio::test]
async fn routing_headers_that_disagree_with_the_body_are_refused_in_every_revision() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    // initialize naming another method in its headers: no session opened.
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}).to_string();
    for headers in [
        vec![
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "billing__delete_all"),
        ],
        vec![("mcp-method", "tools/call")],
        vec![("mcp-name", "billing__get_invoice")],
    ] {
        let (s, hs, v) = h.post(Some(&t), &headers, init.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{headers:?}: {v}");
        assert_eq!(v["error"]["code"], -32020, "{v}");
        assert!(hs.get("mcp-session-id").is_none());
    }
    // In a 2025-11-25 session: headers may be absent, but never disagree.
    let sid = h.initialize(&t).await;
    let call = |name: &str| {
        json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":name,"arguments":{"invoice_id":"INV-000001"}}}).to_string()
    };
    let session = [
        ("mcp-session-id", sid.as_str()),
        ("mcp-protocol-version", "2025-11-25"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v: Vec<(&str, &str)> = session.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let (s, _, v) = h
        .post(
            Some(&t),
            &with(&[("mcp-name", "billing__get_invoice")]),
            call("billing__delete_invoice"),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_i64()),
        (StatusCode::BAD_REQUEST, Some(-32020)),
        "{v}"
    );
    let (s, _, v) = h
        .post(
            Some(&t),
            &with(&[("mcp-method", "tools/list")]),
            call("billing__get_invoice"),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_i64()),
        (StatusCode::BAD_REQUEST, Some(-32020)),
        "{v}"
    );
    assert!(h.tools.received().is_empty(), "nothing forwarded");
    // Agreeing headers, and none at all, pass.
    let (s, _, v) = h
        .post(
            Some(&t),
            &with(&[
                ("mcp-method", "tools/call"),
                ("mcp-name", "billing__get_invoice"),
            ]),
            call("billing__get_invoice"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, v) = h
        .post(Some(&t), &session, call("billing__get_invoice"))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(h.tools.received().len(), 2);
}

#[tokio::test]
async fn disguised_self_grants_and_policy_paths_are_held() {
    // More cases than the default bound on pending holds per agent.
    let s = Suite::with(Opts {
        manifests: &[("billing-bot.yaml", AGENT)],
        holds: "holds: { wait: 300ms, ttl: 1h, max_pending_per_agent: 100 }",
        ..Opts::default()
    })
    .await;
    let dir = s.h.dir.display().to_string();
    let cases: Vec<(&str, &str, Value)> = vec![
        (
            "self by case",
            "billing__grant_role",
            json!({"principal": "BILLING-BOT", "role": "viewer"}),
        ),
        (
            "self in fullwidth",
            "billing__grant_role",
            json!({"principal": "\u{ff42}\u{ff49}\u{ff4c}\u{ff4c}\u{ff49}\u{ff4e}\u{ff47}-bot", "role": "viewer"}),
        ),
        (
            "self with a zero-width space",
            "billing__grant_role",
            json!({"principal": "billing\u{200b}-bot", "role": "viewer"}),
        ),
        (
            "self with a soft hyphen",
            "billing__grant_role",
            json!({"principal": "bill\u{ad}ing-bot", "role": "viewer"}),
        ),
        (
            "self with padding",
            "billing__grant_role",
            json!({"principal": "  billing-bot\t", "role": "viewer"}),
        ),
        (
            "self in a URI",
            "billing__grant_role",
            json!({"principal": "agent://billing-bot", "role": "viewer"}),
        ),
        (
            "self with a Cyrillic i (U+0456)",
            "billing__grant_role",
            json!({"principal": "b\u{456}lling-bot", "role": "viewer"}),
        ),
        (
            "self with Cyrillic i and o",
            "billing__grant_role",
            json!({"principal": "b\u{456}lling-b\u{43e}t", "role": "viewer"}),
        ),
        (
            "self with a digit zero for o",
            "billing__grant_role",
            json!({"principal": "billing-b0t", "role": "viewer"}),
        ),
        (
            "self nested deep",
            "billing__grant_role",
            json!({"subjects": [{"ids": ["x", "Billing-Bot"]}], "role": "viewer"}),
        ),
        (
            "self inside a sentence",
            "billing__grant_role",
            json!({"note": "please grant billing-bot owner", "principal": "alice"}),
        ),
        (
            "manifest path with dot-dot",
            "billing__echo",
            json!({"text": format!("{dir}/tool-manifests/../tool-manifests/billing-bot.yaml")}),
        ),
        (
            "manifest path with dot segments",
            "billing__echo",
            json!({"text": format!("{dir}/./tool-manifests/./x/../billing-bot.yaml")}),
        ),
        (
            "manifest path with doubled slashes",
            "billing__echo",
            json!({"text": format!("{dir}//tool-manifests//billing-bot.yaml")}),
        ),
        (
            "config path",
            "billing__echo",
            json!({"path": format!("{dir}/toolgate.yaml")}),
        ),
        (
            "config path as a file URI",
            "billing__echo",
            json!({"uri": format!("file://{dir}/toolgate.yaml")}),
        ),
        (
            "config path as an upper-case FILE URI with a host",
            "billing__echo",
            json!({"uri": format!("FILE://localhost{dir}/toolgate.yaml")}),
        ),
        (
            "config path as a file: URI without slashes",
            "billing__echo",
            json!({"uri": format!("file:{dir}/toolgate.yaml")}),
        ),
        (
            "manifest path with a percent-encoded letter",
            "billing__echo",
            json!({"path": format!("{dir}/tool-manifests/billing%2Dbot.yaml")}),
        ),
        (
            "audit log path with every slash percent-encoded",
            "billing__echo",
            json!({"path": format!("{dir}/audit.jsonl").replace('/', "%2F")}),
        ),
        (
            "state path double-encoded in a file URI",
            "billing__echo",
            json!({"uri": format!("file://{dir}/state.db").replace('/', "%252f")}),
        ),
        (
            "a new manifest in the directory",
            "billing__echo",
            json!({"path": format!("{dir}/tool-manifests/evil.yaml")}),
        ),
        (
            "approval-required tool",
            "billing__refund",
            json!({"invoice_id": "INV-000001"}),
        ),
    ];
    for (name, tool, args) in cases {
        s.case(name, HELD, s.call(tool, args)).await;
    }
    // Not held: another principal with a name that merely contains ours,
    // or merely looks like a path.
    for (tool, args) in [
        (
            "billing__grant_role",
            json!({"principal": "billing-botanist", "role": "viewer"}),
        ),
        (
            "billing__grant_role",
            json!({"principal": "b\u{456}lling-bots", "role": "viewer"}),
        ),
        (
            "billing__echo",
            json!({"text": "file:///srv/data/report.txt"}),
        ),
        ("billing__echo", json!({"text": "100%25 done"})),
    ] {
        let (_, v) = s.call(tool, args.clone()).await;
        assert!(v.get("result").is_some(), "{args}: {v}");
    }
}

// ---- approvals ----------------------------------------------------------

fn hold_id(v: &Value) -> String {
    v["error"]["data"]["hold_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no hold_id: {v}"))
        .to_owned()
}

#[tokio::test]
async fn approvals_are_single_use_bound_to_the_arguments_and_never_revived() {
    let s = Suite::with(Opts {
        manifests: &[("billing-bot.yaml", AGENT)],
        holds: "holds: { wait: 50ms, ttl: 1h }",
        ..Opts::default()
    })
    .await;
    let refund = |inv: &str| json!({"invoice_id": inv});
    let (_, v) = s.call("billing__refund", refund("INV-000001")).await;
    let id = hold_id(&v);
    let (st, a) = s.h.approve(&id, "carol", json!({})).await;
    assert_eq!(st, StatusCode::OK, "{a}");

    // Argument swap: the approval does not cover another invoice.
    s.case(
        "argument swap after approval",
        HELD,
        s.call("billing__refund", refund("INV-999999")),
    )
    .await;
    s.case(
        "extra argument after approval",
        HELD,
        s.call(
            "billing__refund",
            json!({"invoice_id": "INV-000001", "amount": 1e9}),
        ),
    )
    .await;
    // Concurrent identical retries: one forward, the rest are held anew.
    let before = s.h.tools.received().len();
    let records_before = s.records().await.len();
    let answers =
        futures_all((0..8).map(|_| s.call("billing__refund", refund("INV-000001")))).await;
    let forwarded = answers
        .iter()
        .filter(|(_, v)| v.get("result").is_some())
        .count();
    assert_eq!(forwarded, 1, "{answers:?}");
    assert_eq!(s.h.tools.received().len(), before + 1);
    assert!(answers
        .iter()
        .filter(|(_, v)| v.get("result").is_none())
        .all(|(_, v)| v["error"]["code"] == -32010));
    // Exactly one record per call: the forward is the approval's use
    // (grant_used), the first retry after it opens a new hold
    // (hold_created) and the other six join it.
    let records = s.records().await;
    let new = &records[records_before..];
    assert_eq!(new.len(), 8, "one record per call: {new:#?}");
    let ids: std::collections::HashSet<&str> = new
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    assert_eq!(ids.len(), 8, "each of a distinct call: {new:#?}");
    let count = |event: &str, decision: &str| {
        new.iter()
            .filter(|r| r["event"] == event && r["decision"] == decision)
            .count()
    };
    assert_eq!(
        (
            count("grant_used", "approved"),
            count("hold_created", "hold"),
            count("call", "hold")
        ),
        (1, 1, 6),
        "{new:#?}"
    );
    // Replay: the approval is spent.
    s.case(
        "replay of an approved call",
        HELD,
        s.call("billing__refund", refund("INV-000001")),
    )
    .await;
    // Another agent presenting the same call is not covered either.
    let audit = s.h.audit().await;
    assert_eq!(
        audit.iter().filter(|r| r["event"] == "grant_used").count(),
        1
    );

    // Approving twice, and approving a denied or expired hold.
    let (st, _) = s.h.approve(&id, "dave", json!({})).await;
    assert_eq!(st, StatusCode::CONFLICT, "an approved hold is decided");
    let (_, v) = s.call("billing__refund", refund("INV-000002")).await;
    let denied = hold_id(&v);
    let t = approver_token("erin", &["approver"], &["pwd", "mfa"]);
    let (st, _) =
        s.h.admin(
            Method::POST,
            &format!("/v1/holds/{denied}/deny"),
            Some(&t),
            Some(json!({"reason": "no"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = s.h.approve(&denied, "carol", json!({})).await;
    assert_eq!(st, StatusCode::CONFLICT, "a denied hold cannot be approved");
    s.case(
        "retry of a denied hold",
        rpc(StatusCode::OK, -32011),
        s.call("billing__refund", refund("INV-000002")),
    )
    .await;
    let (_, v) = s.call("billing__refund", refund("INV-000003")).await;
    let expired = hold_id(&v);
    s.h.server.gate.0.holds.advance(Duration::from_secs(3601));
    toolgate::server::expire_holds(&s.h.server.gate).await;
    let (st, _) = s.h.approve(&expired, "carol", json!({})).await;
    assert_eq!(
        st,
        StatusCode::CONFLICT,
        "an expired hold cannot be approved"
    );
    s.case(
        "retry after the hold expired",
        HELD,
        s.call("billing__refund", refund("INV-000003")),
    )
    .await;
    // The agent's own token cannot approve anything.
    let (st, _) =
        s.h.admin(
            Method::POST,
            &format!("/v1/holds/{expired}/approve"),
            Some(&s.good),
            Some(json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    s.no_secret_logged("approvals");
}

async fn futures_all<F: Future<Output = (StatusCode, Value)>>(
    fs: impl Iterator<Item = F>,
) -> Vec<(StatusCode, Value)> {
    let handles: Vec<_> = fs.collect();
    let mut out = Vec::new();
    let mut pinned: Vec<_> = handles.into_iter().map(Box::pin).collect();
    // Poll all together.
    let joined = futures_join(&mut pinned).await;
    out.extend(joined);
    out
}

async fn futures_join<F: Future<Output = (StatusCode, Value)> + Unpin>(
    fs: &mut [F],
) -> Vec<(StatusCode, Value)> {
    let mut done: Vec<Option<(StatusCode, Value)>> = fs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in fs.iter_mut().zip(done.iter_mut()) {
            if slot.is_none() {
                match std::pin::Pin::new(f).poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    done.into_iter().map(Option::unwrap).collect()
}

// ---- HTTP -----------------------------------------------------------------

#[tokio::test]
async fn hostile_http_is_bounded_and_refused() {
    let s = Suite::new().await;
    let port = s.h.server.addr.port();
    let good = s.good.clone();
    let call = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"billing__delete_invoice","arguments":{}}}).to_string();
    let head = |extra: &str| {
        format!(
            "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {good}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMcp-Protocol-Version: 2025-11-25\r\nConnection: close\r\n{extra}"
        )
    };

    let sid = s.h.initialize(&s.good).await;
    // Oversized body, declared and undeclared.
    let big = format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{{\"name\":\"billing__echo\",\"arguments\":{{\"t\":\"{}\"}}}}}}", "x".repeat(80 * 1024));
    s.case(
        "oversized body",
        Expect {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: Some(-32600),
            records: 1,
        },
        s.post_raw(&sid, big.clone()),
    )
    .await;
    let chunked = {
        let mut r = head("Transfer-Encoding: chunked\r\n\r\n");
        for piece in big.as_bytes().chunks(4096) {
            r.push_str(&format!(
                "{:x}\r\n{}\r\n",
                piece.len(),
                std::str::from_utf8(piece).unwrap()
            ));
        }
        r.push_str("0\r\n\r\n");
        r
    };
    s.case(
        "oversized chunked body",
        Expect {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: None,
            records: 1,
        },
        async {
            let (st, _) = s.raw(chunked.as_bytes()).await;
            (StatusCode::from_u16(st).unwrap(), Value::Null)
        },
    )
    .await;
    s.case(
        "Content-Length beyond the limit, no body sent",
        Expect {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: None,
            records: 1,
        },
        async {
            let (st, _) = s
                .raw(head("Content-Length: 99999999\r\n\r\n{").as_bytes())
                .await;
            (StatusCode::from_u16(st).unwrap(), Value::Null)
        },
    )
    .await;

    // Request smuggling: Content-Length and Transfer-Encoding together,
    // with a second request hidden where one parser would see it. hyper
    // frames by Transfer-Encoding (an empty chunked body here, refused as
    // unparseable) and closes the connection (RFC 9112 6.3), so the hidden
    // request is never read; toolgate forwards its own serialisation, never
    // client bytes, so no upstream can be desynchronised either.
    let smuggle = {
        let inner = format!("POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {good}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}", call.len(), call);
        let mut r = format!(
            "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {good}\r\nContent-Type: application/json\r\nMcp-Session-Id: {sid}\r\nMcp-Protocol-Version: 2025-11-25\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        r.push_str("0\r\n\r\n");
        r.push_str(&inner);
        r
    };
    s.case(
        "Content-Length with Transfer-Encoding",
        rpc(StatusCode::BAD_REQUEST, -32700),
        async {
            let (st, text, closed) = raw_closing(s.h.server.addr, smuggle.as_bytes()).await;
            assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "one answer: {text}");
            assert!(
                closed,
                "the connection stays open after ambiguous framing: {text}"
            );
            let v: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or(""))
                .unwrap_or(Value::Null);
            (StatusCode::from_u16(st).unwrap(), v)
        },
    )
    .await;
    s.case(
        "two Content-Length headers that differ",
        Expect {
            status: StatusCode::BAD_REQUEST,
            code: None,
            records: 0,
        },
        async {
            let (st, _) = s
                .raw(
                    format!(
                        "{}Content-Length: 2\r\nContent-Length: {}\r\n\r\n{call}",
                        head(""),
                        call.len()
                    )
                    .as_bytes(),
                )
                .await;
            (StatusCode::from_u16(st).unwrap(), Value::Null)
        },
    )
    .await;

    // Many headers: past hyper's bound it is 431 and no request exists;
    // under it the request is served normally.
    let many = |n: usize| {
        (0..n)
            .map(|i| format!("X-Pad-{i}: {}\r\n", "v".repeat(40)))
            .collect::<String>()
    };
    s.case(
        "200 headers",
        Expect {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            code: None,
            records: 0,
        },
        async {
            let (st, _) = s
                .raw(
                    format!(
                        "{}{}Content-Length: {}\r\n\r\n{call}",
                        head(""),
                        many(200),
                        call.len()
                    )
                    .as_bytes(),
                )
                .await;
            (StatusCode::from_u16(st).unwrap(), Value::Null)
        },
    )
    .await;
    s.case(
        "one 100 KiB header",
        Expect {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            code: None,
            records: 0,
        },
        async {
            let (st, _) = s
                .raw(
                    format!(
                        "{}X-Big: {}\r\nContent-Length: {}\r\n\r\n{call}",
                        head(""),
                        "v".repeat(100 * 1024),
                        call.len()
                    )
                    .as_bytes(),
                )
                .await;
            (StatusCode::from_u16(st).unwrap(), Value::Null)
        },
    )
    .await;
    s.case("80 headers and a denied call", DENIED, async {
        let sid = s.h.initialize(&s.good).await;
        let (st, text) = s
            .raw(
                format!(
                    "{}Mcp-Session-Id: {sid}\r\n{}Content-Length: {}\r\n\r\n{call}",
                    head(""),
                    many(80),
                    call.len()
                )
                .as_bytes(),
            )
            .await;
        let v: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or(""))
            .unwrap_or(Value::Null);
        (StatusCode::from_u16(st).unwrap(), v)
    })
    .await;

    // A slow body: refused after limits.body_timeout (500 ms here).
    s.case(
        "body that stalls",
        Expect {
            status: StatusCode::REQUEST_TIMEOUT,
            code: None,
            records: 1,
        },
        async {
            let (st, _) = s
                .raw(
                    format!(
                        "{}Content-Length: {}\r\n\r\n{{\"jsonrpc\"",
                        head(""),
                        call.len()
                    )
                    .as_bytes(),
                )
                .await;
            (StatusCode::from_u16(st).unwrap(), Value::Null)
        },
    )
    .await;
}

#[tokio::test]
async fn a_slow_header_client_is_cut_off_while_others_are_served() {
    let s = Suite::new().await;
    let mut slow = tokio::net::TcpStream::connect(s.h.server.addr)
        .await
        .unwrap();
    slow.write_all(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    // Others are served meanwhile.
    s.still_serving("during a slowloris").await;
    let records_before = s.records().await.len();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "the half-sent request was never cut off");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "cut off after the header timeout, not at once"
    );
    // hyper's header timeout closes the connection without an answer: no
    // status line, nothing the client could mistake for a response.
    assert!(
        buf.is_empty(),
        "answered instead of closing: {:?}",
        String::from_utf8_lossy(&buf)
    );
    assert!(s.h.tools.received().len() == 1);
    // Refused in the HTTP layer before a request exists: no record.
    assert_eq!(s.records().await.len(), records_before);
    s.still_serving("after a slowloris").await;
    s.no_secret_logged("slowloris");
}

// ---- rate limits ------------------------------------------------------------

#[tokio::test]
async fn rate_limits_hold_at_the_boundary_under_bursts_and_across_agents() {
    let s = Suite::new().await;
    let rate = s.secret(s.h.token("rate-bot"));
    let echo = || json!({"text": "x"});
    // Exactly the burst passes; the next is refused with a retry hint.
    for i in 0..5 {
        let (_, v) = s.call_as(&rate, "billing__echo", echo()).await;
        assert!(v.get("result").is_some(), "call {i}: {v}");
    }
    s.case(
        "the call after the burst",
        rpc(StatusCode::OK, -32029),
        async {
            let (st, v) = s.call_as(&rate, "billing__echo", echo()).await;
            assert!(
                v["error"]["data"]["retry_after_ms"]
                    .as_u64()
                    .is_some_and(|ms| ms > 0),
                "{v}"
            );
            (st, v)
        },
    )
    .await;
    // Denied calls spend no budget of another agent, and refusals of one
    // agent do not touch the next agent's budget.
    let burst = s.secret(s.h.token("burst-bot"));
    let before = s.h.tools.received().len();
    let records_before = s.records().await.len();
    let answers = futures_all((0..20).map(|_| s.call_as(&burst, "billing__echo", echo()))).await;
    let passed = answers
        .iter()
        .filter(|(_, v)| v.get("result").is_some())
        .count();
    assert_eq!(
        passed, 5,
        "a concurrent burst gets exactly the budget: {answers:?}"
    );
    assert!(answers
        .iter()
        .filter(|(_, v)| v.get("result").is_none())
        .all(|(_, v)| v["error"]["code"] == -32029));
    assert_eq!(s.h.tools.received().len(), before + 5);
    let records = s.records().await;
    let new = &records[records_before..];
    assert_eq!(new.len(), 20, "one record per call of the burst: {new:#?}");
    let count = |d: &str| new.iter().filter(|r| r["decision"] == d).count();
    assert_eq!((count("allow"), count("rate_limited")), (5, 15), "{new:#?}");
    assert!(new.iter().all(|r| r["agent"] == "burst-bot"), "{new:#?}");
    s.still_serving("after the burst").await;
    s.no_secret_logged("the burst");
    // Many agents without manifests: each is denied, and neither the
    // limiter nor anything else grows a key for them.
    let keys = s.h.server.gate.0.snapshot.load().limiters.key_count();
    let records_before = s.records().await.len();
    for i in 0..300 {
        let t = s.secret(token_with(json!({"sub": format!("stranger-{i}")})));
        let (_, v) = s.call_as(&t, "billing__echo", echo()).await;
        assert_eq!(v["error"]["code"], -32003, "{v}");
    }
    assert_eq!(s.h.server.gate.0.snapshot.load().limiters.key_count(), keys);
    let records = s.records().await;
    let new = &records[records_before..];
    assert_eq!(new.len(), 300, "one record per stranger's call");
    assert!(
        new.iter()
            .all(|r| r["decision"] == "deny" && r["rule"] == "no_manifest"),
        "{new:#?}"
    );
    s.case("a stranger after the flood", DENIED, async {
        let t = s.secret(token_with(json!({"sub": "stranger-x"})));
        s.call_as(&t, "billing__echo", echo()).await
    })
    .await;
    // The good agent was never limited by any of it.
    s.still_serving("after the flood").await;
}
