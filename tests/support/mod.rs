//! Test support: a real toolgate on 127.0.0.1:0 in front of the recording
//! demo tool server, token minting, and small MCP client helpers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use toolgate::config::Config;
use toolgate::demo::ToolServer;
use toolgate::identity::{mint_hs256, now_unix};
use toolgate::manifest::PolicySet;
use toolgate::server::Server;

pub const SECRET: &str = "test-agent-secret-0123456789abcdef";
pub const ADMIN_SECRET: &str = "test-admin-secret-0123456789abcdef";

pub use toolgate::scratch::Scratch;

/// A fresh temporary directory with an empty `tool-manifests/`, removed
/// when dropped (see [`Scratch`]).
pub fn temp_dir(tag: &str) -> Scratch {
    let d = Scratch::new(tag).expect("temp dir");
    std::fs::create_dir_all(d.join("tool-manifests")).expect("temp dir");
    d
}

pub const BILLING_BOT: &str = r#"
agent: billing-bot
rate_limit: 100/min
tools:
  - name: billing__get_invoice
    arguments:
      type: object
      properties:
        invoice_id: { type: string, pattern: "^INV-[0-9]{6}$" }
      required: [invoice_id]
      additionalProperties: false
  - name: billing__echo
    rate_limit: { rate: 3/min, burst: 3 }
  - name: billing__refund
    approval: required
  - name: billing__grant_role
deny:
  - name: "*__delete_*"
    reason: deletions are never automated
"#;

pub struct Harness {
    pub server: Server,
    pub tools: ToolServer,
    /// The recording tool server's own MCP endpoint (to ask it directly).
    pub tools_url: String,
    pub dir: PathBuf,
    pub url: String,
    pub client: toolgate::upstream::HttpClient,
    /// The directory this harness made (none when it was given one).
    _scratch: Option<Scratch>,
}

pub struct Opts<'a> {
    pub manifests: &'a [(&'a str, &'a str)],
    /// Extra top-level config YAML.
    pub extra: &'a str,
    /// Audit path (default: in the temp dir).
    pub audit: Option<&'a str>,
    /// Upstream URL (default: the recording tool server).
    pub upstream: Option<String>,
    /// The `holds:` block.
    pub holds: &'a str,
    /// `auth.approvers.require_amr`, as YAML.
    pub require_amr: &'a str,
    /// Reuse this directory (a restart).
    pub dir: Option<PathBuf>,
    /// A whole `upstreams:` block instead of the recording tool server.
    pub upstreams: Option<String>,
    /// `auth.agents.keys` entries (YAML list items), instead of the HS256
    /// secret alone.
    pub agent_keys: Option<&'a str>,
    /// Adjusts the loaded config before the server starts.
    pub configure: Option<&'a dyn Fn(&mut Config)>,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            manifests: &[("billing-bot.yaml", BILLING_BOT)],
            extra: "",
            audit: None,
            upstream: None,
            holds: "holds: { wait: 300ms, ttl: 1h }",
            require_amr: "[]",
            dir: None,
            upstreams: None,
            agent_keys: None,
            configure: None,
        }
    }
}

impl Harness {
    pub async fn start() -> Harness {
        Self::with(Opts::default()).await
    }

    pub async fn with(o: Opts<'_>) -> Harness {
        std::env::set_var("TG_TEST_AGENT_SECRET", SECRET);
        std::env::set_var("TG_TEST_ADMIN_SECRET", ADMIN_SECRET);
        std::env::set_var("TG_TEST_UPSTREAM_KEY", "upstream-credential");
        let (dir, scratch) = match o.dir.clone() {
            Some(d) => (d, None),
            None => {
                let s = temp_dir("gate");
                (s.to_path_buf(), Some(s))
            }
        };
        for (name, text) in o.manifests {
            std::fs::write(dir.join("tool-manifests").join(name), text).expect("write manifest");
        }
        let tools = ToolServer::default();
        let taddr = tools
            .start("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("tool server");
        let upstream = o.upstream.unwrap_or_else(|| format!("http://{taddr}/mcp"));
        let audit = o.audit.map_or_else(
            || dir.join("audit.jsonl").display().to_string(),
            str::to_owned,
        );
        let yaml = format!(
            r#"listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
manifests: tool-manifests
state: sqlite://state.db
audit: {{ path: "{audit}" }}
auth:
  agents:
    issuer: toolgate-test
    audience: toolgate
    leeway: 0s
    keys:
{agent_keys}
  approvers:
    issuer: toolgate-test
    audience: toolgate-admin
    require_amr: {amr}
    keys:
      - hs256: {{ secret_env: TG_TEST_ADMIN_SECRET }}
{upstreams}
limits:
  max_body: 64KiB
  upstream_timeout: 2s
  body_timeout: 500ms
{holds}
{extra}"#,
            extra = o.extra,
            holds = o.holds,
            amr = o.require_amr,
            agent_keys = o
                .agent_keys
                .unwrap_or("      - hs256: { secret_env: TG_TEST_AGENT_SECRET }"),
            upstreams = o.upstreams.unwrap_or_else(|| format!(
                "upstreams:\n  - name: billing\n    url: {upstream}\n    headers: {{ X-Upstream-Key: \"k=${{env:TG_TEST_UPSTREAM_KEY}}\" }}"
            )),
        );
        let cfg_path = dir.join("toolgate.yaml");
        std::fs::write(&cfg_path, &yaml).expect("write config");
        let mut config = Config::load(&cfg_path).unwrap_or_else(|p| panic!("config: {p}"));
        if let Some(f) = o.configure {
            f(&mut config);
        }
        let policy =
            PolicySet::load_dir(&config.manifests).unwrap_or_else(|p| panic!("manifests: {p}"));
        let server = Server::start(config, policy).await.expect("server starts");
        // Tests change manifests right away: let the watcher be in place.
        let started = std::time::Instant::now();
        while !server.gate.watching() && started.elapsed() < std::time::Duration::from_secs(5) {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let url = format!("http://{}/mcp", server.addr);
        Harness {
            server,
            tools,
            tools_url: format!("http://{taddr}/mcp"),
            dir,
            url,
            client: toolgate::upstream::http_client(),
            _scratch: scratch,
        }
    }

    /// A harness whose only manifest is `yaml`, for `agent`, and a token
    /// for that agent.
    pub async fn with_agent(agent: &str, yaml: &str) -> (Harness, String) {
        let file = format!("{agent}.yaml");
        let h = Self::with(Opts {
            manifests: &[(file.as_str(), yaml)],
            ..Opts::default()
        })
        .await;
        let t = h.token(agent);
        (h, t)
    }

    /// A valid agent token.
    pub fn token(&self, agent: &str) -> String {
        token_with(json!({"sub": agent}))
    }

    /// POSTs `body` to /mcp with `headers`; returns status, headers, JSON body
    /// (Null when empty; SSE bodies are unwrapped).
    pub async fn post(
        &self,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> (StatusCode, HeaderMap, Value) {
        self.send(http::Method::POST, token, headers, body.into())
            .await
    }

    pub async fn send(
        &self,
        method: http::Method,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> (StatusCode, HeaderMap, Value) {
        let mut req = Request::builder().method(method).uri(&self.url);
        let mut has_ct = false;
        for (k, v) in headers {
            has_ct |= k.eq_ignore_ascii_case("content-type");
            req = req.header(*k, *v);
        }
        if !has_ct {
            req = req.header("content-type", "application/json");
        }
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("accept"))
        {
            req = req.header("accept", "application/json, text/event-stream");
        }
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = self
            .client
            .request(req.body(Full::new(body)).expect("request"))
            .await
            .expect("toolgate answers");
        let status = resp.status();
        let h = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&bytes).to_string();
        let json_text = if h
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or("").starts_with("text/event-stream"))
        {
            text.lines()
                .rev()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("")
                .to_owned()
        } else {
            text
        };
        let v = if json_text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&json_text).unwrap_or(Value::String(json_text))
        };
        (status, h, v)
    }

    /// A 2026-07-28 request (`Mcp-Method`, and `Mcp-Name` when given)
    /// that accepts an event stream; the response comes back unread, for
    /// tests that read the stream as it arrives.
    pub async fn modern_stream(
        &self,
        token: &str,
        method: &str,
        name: Option<&str>,
        body: &Value,
    ) -> http::Response<hyper::body::Incoming> {
        let mut req = Request::post(&self.url)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", method);
        if let Some(n) = name {
            req = req.header("mcp-name", n);
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        self.client.request(req).await.expect("toolgate answers")
    }

    /// A 2026-07-28 tools/call with `_meta` extras, sent with `accept`;
    /// returns the content type and every message of the answer (each
    /// event's data for a stream).
    pub async fn call_messages(
        &self,
        token: &str,
        accept: &str,
        tool: &str,
        args: Value,
        meta: Value,
    ) -> (String, Vec<Value>) {
        let mut m = json!({
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        });
        if let (Value::Object(m), Value::Object(extra)) = (&mut m, meta) {
            m.extend(extra);
        }
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": args, "_meta": m}});
        let req = Request::builder()
            .method(http::Method::POST)
            .uri(&self.url)
            .header("content-type", "application/json")
            .header("accept", accept)
            .header("authorization", format!("Bearer {token}"))
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", tool)
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        let resp = self.client.request(req).await.expect("toolgate answers");
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        let msgs = if ct.starts_with("text/event-stream") {
            text.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .map(|d| serde_json::from_str(d).expect("event data is JSON"))
                .collect()
        } else {
            vec![serde_json::from_str(&text).expect("JSON answer")]
        };
        (ct, msgs)
    }

    /// A 2026-07-28 (stateless) request with correct headers and envelope.
    pub async fn modern(&self, token: &str, method: &str, params: Value) -> (StatusCode, Value) {
        let mut params = params;
        params["_meta"] = json!({
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        });
        let name = params
            .get("name")
            .or_else(|| params.get("uri"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let mut headers = vec![
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", method),
        ];
        if let Some(n) = &name {
            headers.push(("mcp-name", n.as_str()));
        }
        let body =
            json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string();
        let (s, _, v) = self.post(Some(token), &headers, body).await;
        (s, v)
    }

    /// A 2026-07-28 tools/call.
    pub async fn call(&self, token: &str, tool: &str, args: Value) -> Value {
        self.modern(
            token,
            "tools/call",
            json!({"name": tool, "arguments": args}),
        )
        .await
        .1
    }

    /// Opens a 2025-11-25 session; returns its id.
    pub async fn initialize(&self, token: &str) -> String {
        let body = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}).to_string();
        let (s, h, v) = self.post(Some(token), &[], body).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["result"]["protocolVersion"], "2025-11-25");
        h.get("mcp-session-id")
            .expect("session id")
            .to_str()
            .expect("ascii")
            .to_owned()
    }

    /// A request inside a session.
    pub async fn in_session(
        &self,
        token: &str,
        sid: &str,
        method: &str,
        params: Value,
    ) -> (StatusCode, Value) {
        let body = json!({"jsonrpc":"2.0","id":7,"method":method,"params":params}).to_string();
        let (s, _, v) = self
            .post(
                Some(token),
                &[
                    ("mcp-session-id", sid),
                    ("mcp-protocol-version", "2025-11-25"),
                ],
                body,
            )
            .await;
        (s, v)
    }

    /// Closes session `sid` as the holder of `token` (DELETE /mcp); returns
    /// the status.
    pub async fn delete_session(&self, token: &str, sid: &str) -> StatusCode {
        self.send(
            http::Method::DELETE,
            Some(token),
            &[("mcp-session-id", sid)],
            Bytes::new(),
        )
        .await
        .0
    }

    /// The management plane's base URL.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.server.admin_addr.expect("admin listener"))
    }

    /// A management-plane request; returns status and JSON body.
    pub async fn admin(
        &self,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.admin_url()));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        req = req.header("content-type", "application/json");
        let resp = self
            .client
            .request(req.body(Full::new(Bytes::from(body))).expect("request"))
            .await
            .expect("admin answers");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Approves hold `id` as `who` (an approver with MFA).
    pub async fn approve(&self, id: &str, who: &str, body: Value) -> (StatusCode, Value) {
        let t = approver_token(who, &["approver"], &["pwd", "mfa"]);
        self.admin(
            http::Method::POST,
            &format!("/v1/holds/{id}/approve"),
            Some(&t),
            Some(body),
        )
        .await
    }

    /// Every audit record so far.
    pub async fn audit(&self) -> Vec<Value> {
        self.server.gate.0.auditor.flush().await;
        let text = std::fs::read_to_string(self.dir.join("audit.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// Tools the upstream received, in order.
    pub fn received(&self) -> Vec<String> {
        self.tools.received().into_iter().map(|r| r.tool).collect()
    }
}

/// Each message's method, `(response)` for a response: the order a stream
/// delivered them in.
pub fn methods(msgs: &[Value]) -> Vec<&str> {
    msgs.iter()
        .map(|m| m["method"].as_str().unwrap_or("(response)"))
        .collect()
}

/// Each audit record's (event, decision); `-` for a record without a
/// decision.
pub fn events(records: &[Value]) -> Vec<(&str, &str)> {
    records
        .iter()
        .map(|r| {
            (
                r["event"].as_str().expect("event"),
                r["decision"].as_str().unwrap_or("-"),
            )
        })
        .collect()
}

/// Whether an answer's headers say it is an event stream.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// Mints an agent token with default claims overridden by `claims`.
pub fn token_with(claims: Value) -> String {
    let now = now_unix();
    let mut c = json!({"iss": "toolgate-test", "aud": "toolgate", "exp": now + 600, "iat": now});
    for (k, v) in claims.as_object().expect("object").iter() {
        if v.is_null() {
            c.as_object_mut().expect("object").remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    mint_hs256(None, SECRET.as_bytes(), &c).expect("mint")
}

/// Mints an approver token.
pub fn approver_token(sub: &str, roles: &[&str], amr: &[&str]) -> String {
    let now = now_unix();
    let c = json!({"iss": "toolgate-test", "aud": "toolgate-admin", "exp": now + 600, "sub": sub, "roles": roles, "amr": amr});
    mint_hs256(None, ADMIN_SECRET.as_bytes(), &c).expect("mint")
}

/// A webhook receiver on loopback that answers 500 to the first `fail`
/// requests, then 200, recording the JSON bodies it accepted.
pub struct Webhook {
    pub url: String,
    pub got: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

impl Webhook {
    pub async fn start(fail: u32) -> Webhook {
        use std::sync::atomic::AtomicU32;
        use std::sync::{Arc, Mutex};
        let got = Arc::new(Mutex::new(Vec::<Value>::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hooks", listener.local_addr().expect("addr"));
        let g = got.clone();
        let calls = Arc::new(AtomicU32::new(0));
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (g, calls) = (g.clone(), calls.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (g, calls) = (g.clone(), calls.clone());
                            async move {
                                let b = req.into_body().collect().await.expect("body").to_bytes();
                                let n = calls.fetch_add(1, Ordering::SeqCst);
                                let ok = n >= fail;
                                if ok {
                                    g.lock()
                                        .expect("lock")
                                        .push(serde_json::from_slice(&b).unwrap_or(Value::Null));
                                }
                                let status = if ok { 200 } else { 500 };
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .body(Full::new(Bytes::new()))
                                        .expect("response"),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Webhook { url, got }
    }

    /// Waits (up to 10 s of real delivery time) until `n` bodies arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Value> {
        for _ in 0..200 {
            let got = self.got.lock().expect("lock").clone();
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.got.lock().expect("lock").clone()
    }
}

/// toolgate's operator log in this test process: every `tracing` event at
/// info and above (and toolgate's own down to trace, so a secret logged at
/// any level is caught), as the JSON lines `--log-format json` writes, from
/// the first call of [`operator_log`] on. It installs the process's one
/// subscriber, so every test module captures through it.
pub struct OperatorLog(&'static std::sync::Mutex<Vec<u8>>);

static OPERATOR_LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// The operator log, capturing from now on.
pub fn operator_log() -> OperatorLog {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        struct Writer;
        impl std::io::Write for Writer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                OPERATOR_LOG
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,toolgate=trace"))
            .with_writer(|| Writer)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
    });
    OperatorLog(&OPERATOR_LOG)
}

impl OperatorLog {
    /// Everything logged so far, as written.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<Value> {
        self.text()
            .lines()
            .map(|l| serde_json::from_str(l).expect("log line is JSON"))
            .collect()
    }

    /// Waits (up to 10 s) for a line that `pred` accepts; returns it.
    pub async fn wait_for(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        for _ in 0..200 {
            if let Some(l) = self.lines().into_iter().find(&pred) {
                return Some(l);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        None
    }
}

/// `toolgate serve`, the built binary, as a child process on a free loopback
/// port in front of the recording tool server, with its stderr (the operator
/// log) read on a thread. Killed on drop unless [`Served::stop`] ran.
pub struct Served {
    pub tools: ToolServer,
    pub port: u16,
    pub dir: Scratch,
    /// An agent token for billing-bot.
    pub token: String,
    child: Option<std::process::Child>,
    stderr: Option<std::thread::JoinHandle<String>>,
    client: toolgate::upstream::HttpClient,
}

impl Served {
    /// Writes a config with this `audit:` value (YAML) for billing-bot in a
    /// fresh temp dir, signing keys in DIR/keys, and starts `toolgate serve`
    /// with `--log-format json` at info; returns once it answers a call.
    pub async fn start(tag: &str, audit: &str) -> Served {
        let tools = ToolServer::default();
        let taddr = tools
            .start("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("tool server");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let dir = temp_dir(tag);
        std::fs::write(dir.join("tool-manifests/billing-bot.yaml"), BILLING_BOT)
            .expect("write manifest");
        std::fs::write(
            dir.join("toolgate.yaml"),
            format!("listen: 127.0.0.1:{port}\naudit: {audit}\nauth:\n  agents:\n    issuer: toolgate-test\n    audience: toolgate\n    keys: [ {{ hs256: {{ secret_env: TOOLGATE_AGENT_SECRET }} }} ]\nupstreams:\n  - name: billing\n    url: http://{taddr}/mcp\n"),
        )
        .expect("write config");
        let keygen = toolgate_command()
            .args(["audit", "keygen", "--out"])
            .arg(dir.join("keys"))
            .output()
            .expect("keygen runs");
        assert!(
            keygen.status.success(),
            "{}",
            String::from_utf8_lossy(&keygen.stderr)
        );
        let mut child = toolgate_command()
            .args(["--log-format", "json", "serve", "--config"])
            .arg(dir.join("toolgate.yaml"))
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("serve starts");
        let stderr = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || std::io::read_to_string(stderr).expect("stderr"));
        let served = Served {
            tools,
            port,
            dir,
            token: token_with(json!({"sub": "billing-bot"})),
            child: Some(child),
            stderr: Some(stderr),
            client: toolgate::upstream::http_client(),
        };
        let mut up = false;
        for _ in 0..100 {
            if let Ok(r) = served.call().await {
                assert_eq!(r.status(), 200);
                up = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(up, "toolgate did not come up");
        served
    }

    /// A 2026-07-28 billing__get_invoice call as billing-bot.
    pub async fn call(
        &self,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        let body = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"billing__get_invoice","arguments":{"invoice_id":"INV-000001"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}});
        let req = Request::post(format!("http://127.0.0.1:{}/mcp", self.port))
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "billing__get_invoice")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        self.client.request(req).await
    }

    /// Sends SIGTERM, asserts a clean exit, and returns the operator log.
    pub async fn stop(&mut self) -> String {
        let mut child = self.child.take().expect("still serving");
        let pid = child.id().to_string();
        assert!(std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs")
            .success());
        let status = tokio::task::spawn_blocking(move || child.wait().expect("wait"))
            .await
            .expect("join");
        assert!(status.success(), "{status:?}");
        self.stderr
            .take()
            .expect("stderr")
            .join()
            .expect("stderr thread")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The built binary, with the test secrets in its environment.
pub fn toolgate_command() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_toolgate"));
    c.env("TOOLGATE_AGENT_SECRET", SECRET)
        .env("TOOLGATE_ADMIN_SECRET", ADMIN_SECRET)
        .env("RUST_LOG", "warn");
    c
}
