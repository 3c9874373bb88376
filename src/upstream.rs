//! MCP clients to tool servers, and the [`Catalog`] of exposed tool names.
//!
//! Each upstream is spoken to in the revision it supports: toolgate first
//! asks with the newest revision and follows what the server answers. Every
//! request carries the configured `headers` (never the agent's credential),
//! is bounded by `limits.upstream_timeout` and `limits.max_upstream_body`, and
//! reuses pooled keep-alive connections (HTTP/2 when an `https` upstream
//! offers it, see `tls`). Responses may be JSON or an SSE
//! stream; either way only the JSON-RPC response to our request id is taken.
//! Each upstream session also has its standalone GET stream (`listen`),
//! where the server says its tools changed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

/// Upstream sessions kept per upstream (one per agent).
pub const MAX_SESSIONS: usize = 4096;

use crate::config::{Transport, UpstreamConfig};
use crate::mcp;

pub mod asks;
mod listen;
pub mod raw;
pub mod stdio;
pub mod tls;

use raw::Checked;
pub use raw::RawResult;

/// The session-based revisions toolgate accepts from a tool server: those
/// agents may speak, and 2024-11-05, which many stdio servers still answer
/// (its tools/call is the same).
pub fn upstream_session_version(v: &str) -> Option<&'static str> {
    std::iter::once("2024-11-05")
        .chain(mcp::SESSION_VERSIONS)
        .find(|s| *s == v)
}

/// Why an upstream request failed (answered with -32004).
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {0} timed out")]
    Timeout(String),
    #[error("upstream {0} is unreachable: {1}")]
    Connect(String, String),
    #[error("upstream {0} answered HTTP {1}")]
    Status(String, u16),
    #[error("upstream {0} sent an invalid response: {1}")]
    Protocol(String, String),
    #[error("upstream {0} response is larger than the limit")]
    TooLarge(String),
}

/// A JSON-RPC answer from an upstream: a result, or its error object.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Kept as text: relayed, not rebuilt (see [`RawResult`]).
    Result(RawResult),
    Error(Value),
}

impl Answer {
    /// The answer if toolgate understands it: an error must be a JSON-RPC
    /// error object (an integer `code`, a string `message`); anything else
    /// from `upstream` is refused, never relayed.
    pub fn checked(self, upstream: &str) -> Result<Answer, UpstreamError> {
        match &self {
            Answer::Error(e) if !is_rpc_error(e) => Err(UpstreamError::Protocol(
                upstream.to_owned(),
                "its error is not a JSON-RPC error object".into(),
            )),
            _ => Ok(self),
        }
    }
}

/// Whether `e` is a JSON-RPC 2.0 error object.
fn is_rpc_error(e: &Value) -> bool {
    e.as_object().is_some_and(|o| {
        o.get("code").is_some_and(Value::is_i64) && o.get("message").is_some_and(Value::is_string)
    })
}

/// The pooled client every HTTP upstream, webhook and CLI request uses.
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

use crate::mcp::headers::{
    LAST_EVENT_ID, MCP_METHOD, MCP_NAME, MCP_PROTOCOL_VERSION, MCP_SESSION_ID,
};

/// Builds the pooled client shared by the upstreams without TLS settings of
/// their own: `http`, and `https` verified against the system's roots.
pub fn http_client() -> HttpClient {
    client_with(tls::default_config())
}

/// Builds a pooled client whose `https` connections use `tls`. ALPN offers
/// HTTP/2 and HTTP/1.1; the pool multiplexes calls over one HTTP/2
/// connection when the server picks it. `http` URLs stay plain HTTP/1.1.
pub fn client_with(tls: rustls::ClientConfig) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    // The TLS layer, not the TCP connector, decides which schemes pass.
    connector.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(connector);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector)
}

#[derive(Debug, Clone)]
pub(crate) struct Session {
    version: &'static str,
    id: Option<HeaderValue>,
}

/// An upstream session held for a [`Who`], with the guard of its GET
/// stream: the stream ends when the entry leaves the map.
struct Held {
    session: Session,
    _stream: Option<listen::Guard>,
}

/// On whose behalf a request goes upstream: the agent, and the agent's own
/// MCP session when it has one (2025-era revisions). A session-based
/// upstream gets one session per `Who`: never shared between agents, nor
/// between two sessions of one agent; nor is a stdio process.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Who {
    pub agent: Arc<str>,
    pub session: Option<Arc<str>>,
}

impl Who {
    /// An agent without a session of its own (2026-07-28 is stateless).
    pub fn agent(agent: Arc<str>) -> Who {
        Who {
            agent,
            session: None,
        }
    }

    /// toolgate itself (catalog requests).
    pub fn toolgate() -> Who {
        Who::agent(Arc::from(""))
    }
}

/// One MCP tool server reached over Streamable HTTP.
pub struct Upstream {
    pub name: String,
    pub prefix: String,
    url: http::Uri,
    headers: Vec<(http::HeaderName, HeaderValue)>,
    client: HttpClient,
    timeout: Duration,
    max_body: usize,
    next_id: AtomicI64,
    /// Sessions with a session-based upstream, one per [`Who`] (and one,
    /// agent "", for toolgate's own catalog requests): an upstream session
    /// is never shared between agents or agent sessions. Bounded by
    /// [`MAX_SESSIONS`]. Each has its GET stream (see `listen`).
    sessions: DashMap<Who, Held>,
    /// The GET streams of the sessions.
    streams: Arc<listen::Streams>,
    /// The revision this upstream speaks, once learned.
    version: ArcSwap<Option<&'static str>>,
    connecting: Mutex<()>,
    /// Set for a stdio upstream (then the HTTP fields are unused).
    stdio: Option<stdio::Pool>,
    /// Set when the server sent `notifications/tools/list_changed`: the
    /// catalog is fetched again before the next decision that needs it.
    pub tools_changed: Arc<std::sync::atomic::AtomicBool>,
    /// Server requests relayed to agents, awaiting their answers.
    asks: Arc<asks::Asks>,
    /// This upstream's call-latency histogram and error counter, resolved
    /// from the gate's metric families on its first call: a family lookup
    /// takes the family's lock and hashes a cloned label on every call.
    pub(crate) meters: std::sync::OnceLock<(
        prometheus_client::metrics::histogram::Histogram,
        prometheus_client::metrics::counter::Counter,
    )>,
}

impl Upstream {
    pub fn new(
        cfg: &UpstreamConfig,
        client: HttpClient,
        timeout: Duration,
        max_body: usize,
    ) -> Self {
        let tools_changed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let asks = Arc::new(asks::Asks::default());
        // An upstream with TLS settings of its own gets a pool of its own.
        let client = match &cfg.transport {
            Transport::Http { tls: Some(t), .. } => client_with(t.as_ref().clone()),
            _ => client,
        };
        let (url, headers, stdio) = match &cfg.transport {
            Transport::Http { url, headers, .. } => (url.clone(), with_host(url, headers), None),
            Transport::Stdio { command, env, cwd } => (
                http::Uri::from_static("http://127.0.0.1/"),
                Vec::new(),
                Some(stdio::Pool::new(stdio::Spec {
                    name: cfg.name.clone(),
                    command: command.clone(),
                    env: env.clone(),
                    cwd: cwd.clone(),
                    max_line: max_body,
                    tools_changed: tools_changed.clone(),
                    asks: asks.clone(),
                })),
            ),
        };
        let streams = Arc::new(listen::Streams::new(
            cfg.name.clone(),
            url.clone(),
            headers.clone(),
            client.clone(),
            timeout,
            max_body,
            tools_changed.clone(),
        ));
        Upstream {
            name: cfg.name.clone(),
            prefix: cfg.prefix.clone(),
            url,
            headers,
            client,
            timeout,
            max_body,
            next_id: AtomicI64::new(1),
            sessions: DashMap::new(),
            streams,
            version: ArcSwap::from_pointee(None),
            connecting: Mutex::new(()),
            stdio,
            tools_changed,
            asks,
            meters: std::sync::OnceLock::new(),
        }
    }

    /// The revision negotiated with this upstream, once connected.
    pub fn version(&self) -> Option<&'static str> {
        match &self.stdio {
            Some(p) => p.version(),
            None => **self.version.load(),
        }
    }

    /// Open upstream sessions (per agent).
    pub fn session_count(&self) -> usize {
        match &self.stdio {
            Some(p) => p.pids().len(),
            None => self.sessions.len(),
        }
    }

    /// A stdio upstream's processes, by agent.
    pub fn stdio_pids(&self) -> Vec<(Arc<str>, u32)> {
        self.stdio.as_ref().map(|p| p.pids()).unwrap_or_default()
    }

    /// The GET streams open (or reopening) to this upstream: one per
    /// session that has one.
    pub fn streams_running(&self) -> usize {
        self.streams.running()
    }

    /// Stops what this upstream runs (GET streams, stdio processes).
    pub async fn shutdown(&self) {
        self.streams.stop();
        if let Some(p) = &self.stdio {
            p.shutdown().await;
        }
    }

    /// Sends one request on behalf of `who` (an agent, or "" for toolgate
    /// itself) and returns the upstream's answer, connecting (and
    /// reconnecting once after a lost session) as needed.
    pub async fn request(
        &self,
        who: &Who,
        method: &str,
        params: Value,
    ) -> Result<Answer, UpstreamError> {
        self.request_relay(who, method, params, None).await
    }

    /// Like [`Upstream::request`], and the progress and logging
    /// notifications the server sends about this request while it runs go
    /// to `relay` (best effort: dropped when the channel is full).
    pub async fn request_relay(
        &self,
        who: &Who,
        method: &str,
        params: Value,
        relay: Option<Relay>,
    ) -> Result<Answer, UpstreamError> {
        if let Some(pool) = &self.stdio {
            return tokio::time::timeout(self.timeout, pool.request(who, method, params, relay))
                .await
                .map_err(|_| UpstreamError::Timeout(self.name.clone()))?;
        }
        let relay = relay.as_ref().map(|r| (&who.agent, r));
        let fut = async {
            let session = self.session(who).await?;
            match self.send(&session, method, &params, relay).await {
                Err(UpstreamError::Status(_, 404)) if session.id.is_some() => {
                    // The upstream forgot this session: start a new one, once.
                    self.sessions.remove(who);
                    let session = self.session(who).await?;
                    self.send(&session, method, &params, relay).await
                }
                other => other,
            }
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| UpstreamError::Timeout(self.name.clone()))?
    }

    /// How long a request may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Forgets `who`'s upstream session (its agent session ended),
    /// stopping its stdio process.
    pub fn forget(&self, who: &Who) {
        self.sessions.remove(who);
        if let Some(p) = &self.stdio {
            p.forget(who);
        }
    }

    async fn session(&self, who: &Who) -> Result<Session, UpstreamError> {
        let modern = Session {
            version: mcp::V2026_07_28,
            id: None,
        };
        // Stateless upstreams need no per-agent state.
        if **self.version.load() == Some(mcp::V2026_07_28) {
            return Ok(modern);
        }
        if let Some(s) = self.sessions.get(who) {
            return Ok(s.session.clone());
        }
        let guard = self.connecting.lock().await;
        if let Some(s) = self.sessions.get(who) {
            return Ok(s.session.clone());
        }
        let s = self.initialize().await?;
        self.version.store(Arc::new(Some(s.version)));
        if self.sessions.len() >= MAX_SESSIONS {
            // Bounded: forget half of the sessions (in no particular order);
            // a forgotten agent opens a new upstream session on its next call.
            let drop: Vec<Who> = self
                .sessions
                .iter()
                .take(MAX_SESSIONS / 2)
                .map(|e| e.key().clone())
                .collect();
            for k in drop {
                self.sessions.remove(&k);
            }
        }
        let (stream, ready) = self.streams.open(&s).unzip();
        self.sessions.insert(
            who.clone(),
            Held {
                session: s.clone(),
                _stream: stream,
            },
        );
        drop(guard);
        if let Some(ready) = ready {
            self.streams.wait_ready(ready).await;
        }
        Ok(s)
    }

    async fn initialize(&self) -> Result<Session, UpstreamError> {
        // Newest first: a 2026-07-28 server answers server/discover (not
        // asked again once the upstream is known to speak an older revision).
        let modern = Session {
            version: mcp::V2026_07_28,
            id: None,
        };
        let known_older = self.version.load().is_some();
        if known_older {
            return self.handshake().await;
        }
        if let Ok((Some(Answer::Result(r)), _)) = self
            .send_raw(&modern, "server/discover", Some(&json!({})), None)
            .await
        {
            let speaks = r
                .get("supportedVersions")
                .as_ref()
                .and_then(Value::as_array)
                .is_some_and(|v| v.iter().any(|x| x.as_str() == Some(mcp::V2026_07_28)));
            if speaks {
                tracing::info!(upstream.name = %self.name, protocol = mcp::V2026_07_28, "upstream connected");
                return Ok(modern);
            }
        }
        self.handshake().await
    }

    /// The session-based handshake: initialize, then initialized.
    async fn handshake(&self) -> Result<Session, UpstreamError> {
        let pre = Session {
            version: mcp::V2025_11_25,
            id: None,
        };
        let params = json!({
            "protocolVersion": mcp::V2025_11_25,
            // What toolgate relays to the agent whose call it is (asks).
            "capabilities": asks::client_capabilities(),
            "clientInfo": mcp::toolgate_info(),
        });
        let (answer, sid) = self
            .send_raw(&pre, "initialize", Some(&params), None)
            .await?;
        let result = match answer {
            Some(Answer::Result(r)) => r.value(),
            Some(Answer::Error(e)) => {
                return Err(UpstreamError::Protocol(
                    self.name.clone(),
                    format!("initialize failed: {e}"),
                ))
            }
            None => {
                return Err(UpstreamError::Protocol(
                    self.name.clone(),
                    "no initialize result".into(),
                ))
            }
        };
        let version = match result.get("protocolVersion").and_then(Value::as_str) {
            Some(v) => upstream_session_version(v).ok_or_else(|| {
                UpstreamError::Protocol(
                    self.name.clone(),
                    format!("unsupported protocol version {v:?}"),
                )
            })?,
            None => {
                return Err(UpstreamError::Protocol(
                    self.name.clone(),
                    "initialize result lacks protocolVersion".into(),
                ))
            }
        };
        let session = Session { version, id: sid };
        self.send_raw(&session, "notifications/initialized", None, None)
            .await?;
        tracing::info!(upstream.name = %self.name, protocol = version, "upstream connected");
        Ok(session)
    }

    /// A POST to the upstream in session `s`, with the configured headers.
    fn post(&self, s: &Session, with_version: bool, body: Vec<u8>) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.url.clone();
        let h = req.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            http::header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        session_headers(h, s, with_version, &self.headers);
        req
    }

    /// Sends the server a message that gets no answer (a response to one
    /// of its requests); the server acknowledges it with 2xx.
    async fn post_message(&self, s: &Session, msg: &Value) -> Result<(), UpstreamError> {
        let body = serde_json::to_vec(msg)
            .map_err(|e| UpstreamError::Protocol(self.name.clone(), e.to_string()))?;
        let req = self.post(s, true, body);
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| UpstreamError::Timeout(self.name.clone()))?
            .map_err(|e| UpstreamError::Connect(self.name.clone(), connect_reason(&e)))?;
        if !resp.status().is_success() {
            return Err(UpstreamError::Status(
                self.name.clone(),
                resp.status().as_u16(),
            ));
        }
        Ok(())
    }

    /// Handles a message on a call's event stream that is not its answer:
    /// a relayed notification goes to the agent; a server request is
    /// relayed to the agent when it is an ask and the call has a stream,
    /// else answered here.
    async fn server_message(&self, s: &Session, event: &[u8], relay: Option<(&Arc<str>, &Relay)>) {
        let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(event) else {
            return;
        };
        let Some(method) = o.get("method").and_then(Value::as_str).map(str::to_owned) else {
            return;
        };
        let Some(id) = o.get("id").cloned() else {
            if let Some((_, r)) = relay.filter(|_| RELAYED.contains(&method.as_str())) {
                let _ = r.try_send(Value::Object(o));
            }
            return;
        };
        if let Some((who, r)) = relay.filter(|_| asks::RELAYED.contains(&method.as_str())) {
            if let Some(msg) = self.asks.register(&self.name, who, Some(s.clone()), o) {
                let ours = msg["id"].as_str().unwrap_or_default().to_owned();
                if r.try_send(msg).is_ok() {
                    tracing::info!(upstream.name = %self.name, agent.id = %who, %method, "relaying a server request to the agent");
                    return;
                }
                self.asks.forget(&ours);
            }
        }
        let reply = asks::own_answer(&id, &method, true);
        if let Err(e) = self.post_message(s, &reply).await {
            tracing::warn!(upstream.name = %self.name, error = %e, "cannot answer the server's request");
        }
    }

    /// Passes `agent`'s answer (a JSON-RPC response) to the ask toolgate
    /// numbered `id` back to the server that asked, in the same session.
    pub async fn answer(
        &self,
        agent: &Arc<str>,
        id: &str,
        reply: &Map<String, Value>,
    ) -> Result<(), UpstreamError> {
        let Some((server_id, asked_in)) = self.asks.take(agent, id) else {
            return Err(UpstreamError::Protocol(
                self.name.clone(),
                format!("no request {id:?} is waiting for this agent's answer"),
            ));
        };
        let Some(msg) = asks::response(server_id, reply) else {
            return Err(UpstreamError::Protocol(
                self.name.clone(),
                "an answer needs exactly one of result or error, an object".into(),
            ));
        };
        if let Some(pool) = &self.stdio {
            return pool.send_to(agent, id, &msg).await;
        }
        let Some(session) = asked_in else {
            return Err(UpstreamError::Protocol(
                self.name.clone(),
                "the session that asked is gone".into(),
            ));
        };
        self.post_message(&session, &msg).await
    }

    async fn send(
        &self,
        s: &Session,
        method: &str,
        params: &Value,
        relay: Option<(&Arc<str>, &Relay)>,
    ) -> Result<Answer, UpstreamError> {
        match self.send_raw(s, method, Some(params), relay).await? {
            (Some(a), _) => Ok(a),
            (None, _) => Err(UpstreamError::Protocol(
                self.name.clone(),
                "no response to the request".into(),
            )),
        }
    }

    /// Sends a request (or, with `params == None` and a `notifications/`
    /// method, a notification) and reads the answer.
    async fn send_raw(
        &self,
        s: &Session,
        method: &str,
        params: Option<&Value>,
        relay: Option<(&Arc<str>, &Relay)>,
    ) -> Result<(Option<Answer>, Option<HeaderValue>), UpstreamError> {
        let notification = method.starts_with("notifications/");
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let modern = s.version == mcp::V2026_07_28;
        let name_header = params
            .filter(|_| modern)
            .and_then(|p| p.get("name").or_else(|| p.get("uri")))
            .and_then(Value::as_str)
            .map(mcp::encode_header_value);
        let body = mcp::upstream_message((!notification).then_some(id), method, params, modern);
        let mut req = self.post(s, method != "initialize", body);
        if modern {
            let bad = |e: http::header::InvalidHeaderValue| {
                UpstreamError::Protocol(self.name.clone(), e.to_string())
            };
            let h = req.headers_mut();
            h.insert(MCP_METHOD, HeaderValue::from_str(method).map_err(bad)?);
            if let Some(n) = name_header
                .filter(|_| matches!(method, "tools/call" | "prompts/get" | "resources/read"))
            {
                h.insert(MCP_NAME, HeaderValue::try_from(n).map_err(bad)?);
            }
        }
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| UpstreamError::Connect(self.name.clone(), connect_reason(&e)))?;
        let status = resp.status();
        let sid = resp.headers().get(MCP_SESSION_ID).cloned();
        if notification {
            if !status.is_success() {
                return Err(UpstreamError::Status(self.name.clone(), status.as_u16()));
            }
            return Ok((None, sid));
        }
        let is_sse = is_event_stream(resp.headers());
        if status == StatusCode::NOT_FOUND || (!status.is_success() && !is_json_error(&resp)) {
            return Err(UpstreamError::Status(self.name.clone(), status.as_u16()));
        }
        let body = resp.into_body();
        let want = Value::from(id);
        if is_sse {
            let mut sse = SseReader::default();
            let mut total = 0usize;
            let mut ended = match self
                .call_events(s, body, &mut sse, &mut total, &want, relay)
                .await?
            {
                Ok(a) => return Ok((Some(a), sid)),
                Err(why) => why,
            };
            // The server ended the stream before the answer, after giving
            // an event id: it means the client to resume with a GET that
            // sends `Last-Event-ID` (resumability; 2025-11-25's SSE
            // polling, where a server closes a long call's stream on
            // purpose), as the SDK clients do. 2026-07-28 has no GET
            // stream. Bounded: MAX_RESUME_FAILURES tries in a row that
            // bring no event, MAX_RESUMES in all, `max_body` over all of
            // them, and the call's timeout around everything. The call is
            // never sent again.
            let (mut failures, mut resumes) = (0u32, 0u32);
            while !modern && failures < MAX_RESUME_FAILURES && resumes < MAX_RESUMES {
                let Some(last) = sse.last_id().cloned() else {
                    break;
                };
                sse.discard_partial();
                tokio::time::sleep(sse.retry().unwrap_or(DEFAULT_SSE_RETRY)).await;
                resumes += 1;
                let seen = sse.events();
                let body = match self.resume(s, last).await {
                    Ok(b) => b,
                    Err(Resume::Final(why)) => {
                        ended = why;
                        break;
                    }
                    Err(Resume::Retry(why)) => {
                        ended = why;
                        failures += 1;
                        continue;
                    }
                };
                match self
                    .call_events(s, body, &mut sse, &mut total, &want, relay)
                    .await?
                {
                    Ok(a) => return Ok((Some(a), sid)),
                    Err(why) => ended = why,
                }
                failures = if sse.events() > seen { 0 } else { failures + 1 };
            }
            let resumed = match resumes {
                0 => String::new(),
                1 => " (resumed once)".into(),
                n => format!(" (resumed {n} times)"),
            };
            Err(UpstreamError::Protocol(
                self.name.clone(),
                format!("event stream {ended} without a response{resumed}"),
            ))
        } else {
            let bytes = http_body_util::Limited::new(body, self.max_body)
                .collect()
                .await
                .map_err(|_| UpstreamError::TooLarge(self.name.clone()))?
                .to_bytes();
            match answer_for(&bytes, &want) {
                // A failure's status with a result is no success.
                Some(Ok(Answer::Result(_))) if !status.is_success() => {
                    Err(UpstreamError::Status(self.name.clone(), status.as_u16()))
                }
                Some(a) => a.map(|a| (Some(a), sid)).map_err(|e| self.refused(&e)),
                None => Err(UpstreamError::Protocol(
                    self.name.clone(),
                    "not a JSON-RPC response to our request".into(),
                )),
            }
        }
    }

    /// A response to our request that toolgate refuses (see [`Checked`]).
    fn refused(&self, why: &mcp::ParseError) -> UpstreamError {
        UpstreamError::Protocol(self.name.clone(), format!("its result is refused: {why}"))
    }

    /// Reads one event stream of a call until its answer (`Ok(Ok)`) or
    /// its end (`Ok(Err(how))`, closed or broken). Too many bytes in all
    /// (`total`, over every stream of the call) is an error.
    async fn call_events(
        &self,
        s: &Session,
        mut body: hyper::body::Incoming,
        sse: &mut SseReader,
        total: &mut usize,
        want: &Value,
        relay: Option<(&Arc<str>, &Relay)>,
    ) -> Result<Result<Answer, String>, UpstreamError> {
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(f) => f,
                Err(e) => return Ok(Err(format!("broke ({e})"))),
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            *total += data.len();
            if *total > self.max_body {
                return Err(UpstreamError::TooLarge(self.name.clone()));
            }
            for event in sse.push(&data) {
                if let Some(a) = answer_for(&event, want) {
                    return a.map(Ok).map_err(|e| self.refused(&e));
                }
                if event.windows(LIST_CHANGED.len()).any(|w| w == LIST_CHANGED) {
                    self.tools_changed.store(true, Ordering::Relaxed);
                }
                self.server_message(s, &event, relay).await;
            }
        }
        Ok(Err("ended".into()))
    }

    /// Reopens a call's event stream after `last_id` (a GET with
    /// `Last-Event-ID`).
    async fn resume(
        &self,
        s: &Session,
        last_id: HeaderValue,
    ) -> Result<hyper::body::Incoming, Resume> {
        let req = stream_request(&self.url, &self.headers, s, Some(last_id));
        let resp = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) => {
                return Err(Resume::Retry(format!(
                    "ended, and resuming it failed: {}",
                    connect_reason(&e)
                )))
            }
        };
        let status = resp.status();
        let is_sse = is_event_stream(resp.headers());
        match status {
            s if s.is_success() && is_sse => Ok(resp.into_body()),
            s if s.is_success() => Err(Resume::Final(format!(
                "ended, and resuming it got HTTP {} without an event stream",
                s.as_u16()
            ))),
            // The session is gone, the server resumes nothing, or it
            // refuses: asking again will not change it.
            s if !retry_may_help(s) => Err(Resume::Final(format!(
                "ended, and resuming it got HTTP {}",
                s.as_u16()
            ))),
            s => Err(Resume::Retry(format!(
                "ended, and resuming it got HTTP {}",
                s.as_u16()
            ))),
        }
    }

    /// Lists every tool (following pagination, bounded).
    pub async fn list_tools(&self) -> Result<Vec<Map<String, Value>>, UpstreamError> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let result = match self.request(&Who::toolgate(), "tools/list", params).await? {
                Answer::Result(r) => r.value(),
                Answer::Error(e) => {
                    return Err(UpstreamError::Protocol(
                        self.name.clone(),
                        format!("tools/list failed: {e}"),
                    ))
                }
            };
            if let Some(Value::Array(tools)) = result.get("tools") {
                for t in tools {
                    if let Value::Object(o) = t {
                        if o.get("name").and_then(Value::as_str).is_some() && out.len() < 10_000 {
                            out.push(o.clone());
                        }
                    }
                }
            }
            cursor = result
                .get("nextCursor")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if cursor.is_none() {
                break;
            }
        }
        Ok(out)
    }
}

fn is_json_error<B>(resp: &http::Response<B>) -> bool {
    resp.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

fn connect_reason(e: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error as _;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

const LIST_CHANGED: &[u8] = b"notifications/tools/list_changed";

/// Where notifications about a request in flight go.
pub type Relay = tokio::sync::mpsc::Sender<Value>;

/// The notifications relayed to the agent while its call runs.
pub const RELAYED: [&str; 2] = ["notifications/progress", "notifications/message"];

/// Reads a JSON-RPC response with id `want` from `bytes`: `None` if it is
/// none, an error if it is one whose result is refused (see [`Checked`]).
fn answer_for(bytes: &[u8], want: &Value) -> Option<Result<Answer, mcp::ParseError>> {
    /// The members an answer is read by, parsed straight into place (no
    /// tree of the whole message to take them out of); a member present
    /// as `null` is `Some(Null)`.
    #[derive(serde::Deserialize)]
    struct Envelope {
        #[serde(default, deserialize_with = "present")]
        id: Option<Value>,
        /// Kept as text (see [`RawResult`]), checked.
        #[serde(default, deserialize_with = "present")]
        result: Option<Checked>,
        #[serde(default, deserialize_with = "present")]
        error: Option<Value>,
    }
    fn present<'de, D: serde::Deserializer<'de>, T: serde::Deserialize<'de>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        T::deserialize(d).map(Some)
    }
    // A derived struct would also take an array ([id, result, error]).
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let e: Envelope = serde_json::from_slice(bytes).ok()?;
    if e.id.as_ref() != Some(want) {
        return None;
    }
    match (e.result, e.error) {
        (Some(Checked(r)), _) => Some(r.map(Answer::Result)),
        (None, e) => e.map(|e| Ok(Answer::Error(e))),
    }
}

/// How long to wait before resuming a call's event stream when the
/// server gave no `retry` (as the Python SDK client).
const DEFAULT_SSE_RETRY: Duration = Duration::from_secs(1);
/// Resumes in a row that bring no event before a call's stream is given up.
const MAX_RESUME_FAILURES: u32 = 2;
/// Resumes of one call's stream in all.
const MAX_RESUMES: u32 = 100;

/// Why a call's event stream could not be resumed.
enum Resume {
    /// Trying again may work (unreachable, 5xx, 429).
    Retry(String),
    /// Trying again will not (404: the session is gone; 405; another 4xx).
    Final(String),
}

/// Whether asking again for a stream the server refused with `status` may
/// work: not for a 4xx (the session is gone, nothing is offered, it is
/// refused), except a conflict, a rate limit or a timeout.
pub(crate) fn retry_may_help(status: StatusCode) -> bool {
    !status.is_client_error()
        || matches!(
            status,
            StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT
        )
}

/// Whether an answer is an event stream (`text/event-stream`).
pub(crate) fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// The upstream's configured headers plus its `Host`, computed once: the
/// client would otherwise format `host:port` and validate it into a new
/// header value on every request. Its value is the one the client would
/// set (the port only when it is not the scheme's default); a configured
/// `Host` is left alone.
fn with_host(
    url: &http::Uri,
    headers: &[(HeaderName, HeaderValue)],
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = headers.to_vec();
    if out.iter().any(|(k, _)| k == http::header::HOST) {
        return out;
    }
    let Some(host) = url.host() else {
        return out;
    };
    let default_port = match url.scheme_str() {
        Some("https" | "wss") => 443,
        _ => 80,
    };
    let value = match url.port_u16() {
        Some(p) if p != default_port => HeaderValue::try_from(format!("{host}:{p}")),
        _ => HeaderValue::try_from(host),
    };
    if let Ok(v) = value {
        out.insert(0, (http::header::HOST, v));
    }
    out
}

/// A GET that opens (or, with `last_id`, resumes) a session's event
/// stream.
pub(crate) fn stream_request(
    url: &http::Uri,
    headers: &[(HeaderName, HeaderValue)],
    s: &Session,
    last_id: Option<HeaderValue>,
) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = url.clone();
    let h = req.headers_mut();
    h.insert(
        http::header::ACCEPT,
        HeaderValue::from_static("text/event-stream"),
    );
    session_headers(h, s, true, headers);
    if let Some(last) = last_id {
        h.insert(LAST_EVENT_ID, last);
    }
    req
}

/// What every request to a session-era or stateless upstream carries: its
/// revision (not on `initialize`, which negotiates it), its session, and
/// the configured headers (with `Host`, see [`with_host`]). Set in place
/// with static names: a `request::Builder` moves the whole request through
/// a `Result` at every header, and a name given as a string is parsed on
/// every request.
fn session_headers(
    h: &mut http::HeaderMap,
    s: &Session,
    with_version: bool,
    configured: &[(HeaderName, HeaderValue)],
) {
    if with_version {
        h.insert(MCP_PROTOCOL_VERSION, HeaderValue::from_static(s.version));
    }
    if let Some(sid) = &s.id {
        h.insert(MCP_SESSION_ID, sid.clone());
    }
    for (k, v) in configured {
        h.append(k, v.clone());
    }
}

/// An incremental `text/event-stream` parser yielding each event's data.
/// It also keeps what a reconnect needs: the stream's last event id (the
/// `id` of the latest complete event that set one, as EventSource keeps
/// it) and the server's `retry` delay.
#[derive(Default)]
pub struct SseReader {
    buf: BytesMut,
    /// As a header value: it is only ever sent back as `Last-Event-ID`.
    last_id: Option<HeaderValue>,
    retry: Option<Duration>,
    /// Complete events seen, with data or not.
    events: u64,
    /// How much of `buf` has been searched for an event's end without
    /// finding one: the next search resumes there, so an event that comes
    /// in many small chunks is searched once, not once per chunk.
    scanned: usize,
    /// Bytes examined by the search for events' ends, in all (tests).
    #[cfg(test)]
    examined: usize,
}

/// The longest reconnection delay a server's `retry` field can ask for.
pub const MAX_SSE_RETRY: Duration = Duration::from_secs(30);
/// The shortest: a server that asks for 0 and closes at once would have
/// toolgate reconnect in a busy loop.
pub const MIN_SSE_RETRY: Duration = Duration::from_millis(100);

impl SseReader {
    /// Bytes received of an event not yet complete.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The id to send as `Last-Event-ID` when reconnecting, if the server
    /// gave one (an empty `id`, or one no header can carry, clears it).
    pub fn last_id(&self) -> Option<&HeaderValue> {
        self.last_id.as_ref()
    }

    /// Forgets an event the stream ended in the middle of: as EventSource
    /// does, it is never dispatched, and a reconnected stream starts clean.
    pub fn discard_partial(&mut self) {
        self.buf.clear();
        self.scanned = 0;
    }

    /// The reconnection delay the server asked for (between
    /// [`MIN_SSE_RETRY`] and [`MAX_SSE_RETRY`]).
    pub fn retry(&self) -> Option<Duration> {
        self.retry
    }

    /// Complete events seen so far, with data or not.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Feeds bytes; returns the data of every event completed by them.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        loop {
            let from = self.scanned;
            let found = find_event_end(&self.buf, from);
            #[cfg(test)]
            {
                self.examined += found.map_or(self.buf.len(), |(end, sep)| end + sep) - from;
            }
            let Some((end, sep)) = found else {
                // A separator may begin in the last bytes: they are
                // searched again with the next chunk.
                self.scanned = self.buf.len().saturating_sub(3);
                break;
            };
            let event = self.buf.split_to(end + sep);
            self.scanned = 0;
            self.events += 1;
            let mut data: Option<Vec<u8>> = None;
            for line in event[..end].split(|b| *b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let (field, value) = match line.iter().position(|b| *b == b':') {
                    Some(i) => (&line[..i], &line[i + 1..]),
                    None => (line, &b""[..]),
                };
                let value = value.strip_prefix(b" ").unwrap_or(value);
                match field {
                    // Lines joined with '\n' (the first may be empty).
                    b"data" => match &mut data {
                        Some(d) => {
                            d.push(b'\n');
                            d.extend_from_slice(value);
                        }
                        None => data = Some(value.to_vec()),
                    },
                    // As EventSource: an id with a NUL is ignored.
                    b"id" if !value.contains(&0) => {
                        self.last_id = Some(value)
                            .filter(|v| !v.is_empty())
                            .and_then(|v| HeaderValue::from_bytes(v).ok());
                    }
                    b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                        let ms = std::str::from_utf8(value)
                            .ok()
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(u64::MAX);
                        self.retry =
                            Some(Duration::from_millis(ms).clamp(MIN_SSE_RETRY, MAX_SSE_RETRY));
                    }
                    _ => {}
                }
            }
            if let Some(d) = data.filter(|d| !d.is_empty()) {
                out.push(d);
            }
        }
        out
    }
}

/// Where the first event of `b` ends, searching from `from` (no separator
/// starts before it): the blank line's start and length, `\n\n` or
/// `\r\n\r\n`, whichever comes first. One pass over `b[from..]`.
fn find_event_end(b: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i + 1 < b.len() {
        match (b[i], b[i + 1]) {
            (b'\n', b'\n') => return Some((i, 2)),
            (b'\r', b'\n') if b.get(i + 2..i + 4) == Some(&b"\r\n"[..]) => return Some((i, 4)),
            _ => i += 1,
        }
    }
    None
}

/// Where an exposed tool name leads.
#[derive(Debug, Clone)]
pub struct Route {
    pub upstream: usize,
    /// The tool's name at the upstream.
    pub tool: String,
}

/// The exposed tools of all upstreams: one immutable snapshot.
#[derive(Debug, Default)]
pub struct Catalog {
    pub routes: HashMap<String, Route>,
    /// Tool definitions, renamed to their exposed names, in upstream order.
    pub tools: Vec<(String, Value)>,
    /// Names two upstreams both expose: unavailable (fail closed).
    pub collisions: Vec<String>,
    /// Upstreams whose tools could not be listed: `(index, prefix)`.
    pub unreachable: Vec<(usize, String)>,
    /// Each upstream's prefix, by index.
    pub prefixes: Vec<String>,
    pub fetched_at: Option<Instant>,
}

impl Catalog {
    /// Builds a catalog from each upstream's tool list (`None`: not reached).
    pub fn build(
        upstreams: &[Arc<Upstream>],
        lists: &[Option<Vec<Map<String, Value>>>],
    ) -> Catalog {
        let mut routes: HashMap<String, Route> = HashMap::new();
        let mut tools = Vec::new();
        let mut collisions = Vec::new();
        let mut unreachable = Vec::new();
        for (i, (u, list)) in upstreams.iter().zip(lists).enumerate() {
            if list.is_none() {
                unreachable.push((i, u.prefix.clone()));
            }
            for t in list.iter().flatten() {
                let Some(name) = t.get("name").and_then(Value::as_str) else {
                    continue;
                };
                let exposed = format!("{}{}", u.prefix, name);
                if routes.contains_key(&exposed) {
                    collisions.push(exposed);
                    continue;
                }
                let mut def = t.clone();
                def.insert("name".into(), Value::String(exposed.clone()));
                routes.insert(
                    exposed.clone(),
                    Route {
                        upstream: i,
                        tool: name.to_owned(),
                    },
                );
                tools.push((exposed, Value::Object(def)));
            }
        }
        for c in &collisions {
            tracing::error!(tool.name = %c, "two upstreams expose the same tool name; it is unavailable");
            routes.remove(c);
            tools.retain(|(n, _)| n != c);
        }
        Catalog {
            routes,
            tools,
            collisions,
            unreachable,
            prefixes: upstreams.iter().map(|u| u.prefix.clone()).collect(),
            fetched_at: Some(Instant::now()),
        }
    }

    /// Where `name` leads: its listed route, or else the one upstream whose
    /// prefix it carries (an empty prefix: the only upstream). A name no
    /// listing showed (a tool the server does not list, or one of an
    /// upstream that could not be listed) is answered by that upstream as a
    /// direct client would be answered; the manifest has already allowed
    /// the name. A name two upstreams both list leads nowhere (fail closed).
    pub fn route(&self, name: &str) -> Option<Route> {
        if let Some(r) = self.routes.get(name) {
            return Some(r.clone());
        }
        if self.collisions.iter().any(|c| c == name) {
            return None;
        }
        let mut hits = self
            .prefixes
            .iter()
            .enumerate()
            .filter(|(_, p)| name.len() > p.len() && name.starts_with(p.as_str()));
        match (hits.next(), hits.next()) {
            (Some((i, p)), None) => Some(Route {
                upstream: i,
                tool: name[p.len()..].to_owned(),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_computed_once_as_the_client_would_set_it() {
        let host = |url: &str, headers: &[(HeaderName, HeaderValue)]| {
            let all = with_host(&url.parse().unwrap(), headers);
            let hosts: Vec<_> = all
                .iter()
                .filter(|(k, _)| k == http::header::HOST)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
                .collect();
            (hosts, all.len())
        };
        assert_eq!(
            host("http://127.0.0.1:8080/mcp", &[]),
            (vec!["127.0.0.1:8080".into()], 1)
        );
        assert_eq!(
            host("http://tools.internal/mcp", &[]),
            (vec!["tools.internal".into()], 1)
        );
        assert_eq!(
            host("http://tools.internal:80/mcp", &[]),
            (vec!["tools.internal".into()], 1)
        );
        assert_eq!(
            host("https://tools.internal:443/mcp", &[]),
            (vec!["tools.internal".into()], 1)
        );
        assert_eq!(
            host("https://tools.internal:80/mcp", &[]),
            (vec!["tools.internal:80".into()], 1)
        );
        assert_eq!(
            host("http://[::1]:9000/mcp", &[]),
            (vec!["[::1]:9000".into()], 1)
        );
        // Configured headers are kept; a configured Host wins and is not doubled.
        let auth = (
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer x"),
        );
        assert_eq!(
            host("http://a:1/", std::slice::from_ref(&auth)),
            (vec!["a:1".into()], 2)
        );
        let own = (
            http::header::HOST,
            HeaderValue::from_static("front.example"),
        );
        assert_eq!(
            host("http://a:1/", &[own, auth]),
            (vec!["front.example".into()], 2)
        );
    }

    #[test]
    fn sse_reader_splits_events_across_chunks() {
        let mut r = SseReader::default();
        assert!(r.push(b"event: message\nda").is_empty());
        let ev = r.push(b"ta: {\"a\":1}\n\n: keepalive\n\ndata: x\r\ndata: y\r\n\r\n");
        assert_eq!(ev, vec![b"{\"a\":1}".to_vec(), b"x\ny".to_vec()]);
    }

    /// The search for events' ends examines each byte a bounded number
    /// of times, however the stream is chunked: an event trickled a byte
    /// at a time, and many events in one chunk, cost linear work.
    #[test]
    fn sse_reader_work_is_linear_in_the_bytes_received() {
        const N: usize = 50_000;
        let mut r = SseReader::default();
        assert!(r.push(b"data: {\"a\":\"").is_empty());
        for _ in 0..N {
            assert!(r.push(b"x").is_empty());
        }
        // The separator itself split across chunks, CRLF and LF.
        assert!(r.push(b"\"}\r\n\r").is_empty());
        let ev = r.push(b"\n");
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].len(), N + 8);
        assert_eq!(r.pending(), 0);
        assert!(r.examined <= 4 * (N + 20), "{} bytes examined", r.examined);

        let mut r = SseReader::default();
        let many = b"data: x\n\n".repeat(N);
        assert_eq!(r.push(&many).len(), N);
        assert!(r.examined <= many.len(), "{} bytes examined", r.examined);
        // A CRLF separator split at each point still ends its event.
        for cut in 1..4 {
            let mut r = SseReader::default();
            let (a, b) = b"data: y\r\n\r\n".split_at(7 + cut);
            assert!(r.push(a).is_empty());
            assert_eq!(r.push(b), vec![b"y".to_vec()]);
        }
    }

    #[test]
    fn sse_reader_keeps_the_last_event_id_and_the_retry_delay() {
        let id = |r: &SseReader| r.last_id().map(|v| v.to_str().unwrap().to_owned());
        let mut r = SseReader::default();
        assert_eq!((id(&r), r.retry(), r.events()), (None, None, 0));
        // A priming event: an id, a retry, no data (nothing to dispatch).
        assert!(r
            .push(b"id: e-1\r\nretry: 2500\r\ndata: \r\n\r\n")
            .is_empty());
        assert_eq!(
            (id(&r).as_deref(), r.retry(), r.events()),
            (Some("e-1"), Some(Duration::from_millis(2500)), 1)
        );
        // The id counts once its event is complete, across chunks.
        assert_eq!(r.push(b"id: e-2\ndata: {}\n"), Vec::<Vec<u8>>::new());
        assert_eq!(id(&r).as_deref(), Some("e-1"));
        assert_eq!(r.push(b"\n"), vec![b"{}".to_vec()]);
        assert_eq!(id(&r).as_deref(), Some("e-2"));
        // An event without an id keeps it; a NUL in an id is ignored; a
        // retry that is not all digits is ignored; one too long or too
        // short is clamped.
        r.push(b"data: x\n\nid: a\0b\nretry: 5s\n\n");
        assert_eq!(
            (id(&r).as_deref(), r.retry()),
            (Some("e-2"), Some(Duration::from_millis(2500)))
        );
        r.push(b"retry: 99999999999999999999999\n\n");
        assert_eq!(r.retry(), Some(MAX_SSE_RETRY));
        r.push(b"retry: 0\n\n");
        assert_eq!(r.retry(), Some(MIN_SSE_RETRY));
        // An empty id clears it, and so does one no header can carry:
        // there is nothing to resume from.
        r.push(b"id\n\n");
        assert_eq!(id(&r), None);
        r.push(b"id: e-3\n\nid: a\x01b\n\n");
        assert_eq!(id(&r), None);
        assert_eq!(r.events(), 9);
        // "data" without a colon is a data line with no value, the first
        // line too.
        assert_eq!(
            r.push(b"data: a\ndata\ndata:b\n\ndata\ndata: c\n\n"),
            vec![b"a\n\nb".to_vec(), b"\nc".to_vec()]
        );
        // An event the stream ended in the middle of is never dispatched,
        // and does not run into the next stream's first event.
        assert!(r.push(b"data: {\"half").is_empty());
        r.discard_partial();
        assert_eq!(r.pending(), 0);
        assert_eq!(r.push(b"data: {}\n\n"), vec![b"{}".to_vec()]);
    }

    #[test]
    fn only_a_json_rpc_error_object_is_an_error_relayed() {
        let ok = |e: Value| Answer::Error(e).checked("u").is_ok();
        assert!(ok(json!({"code": -32000, "message": "m"})));
        assert!(ok(json!({"code": 1, "message": "", "data": null})));
        for bad in [
            Value::Null,
            json!("boom"),
            json!([]),
            json!({}),
            json!({"code": "1", "message": "m"}),
            json!({"code": 1.5, "message": "m"}),
            json!({"code": 1}),
            json!({"code": 1, "message": null}),
        ] {
            assert!(!ok(bad.clone()), "{bad}");
        }
        assert!(Answer::Result(RawResult::from_value(Value::Null))
            .checked("u")
            .is_ok());
    }

    #[test]
    fn answers_only_match_our_id() {
        let want = Value::from(7);
        assert_eq!(
            answer_for(br#"{"jsonrpc":"2.0","id":7,"result":{"ok":true}}"#, &want),
            Some(Ok(Answer::Result(RawResult::from_value(
                json!({"ok":true})
            ))))
        );
        assert_eq!(
            answer_for(br#"{"jsonrpc":"2.0","id":8,"result":{}}"#, &want),
            None
        );
        assert_eq!(
            answer_for(
                br#"{"jsonrpc":"2.0","id":7,"error":{"code":-1,"message":"m"}}"#,
                &want
            ),
            Some(Ok(Answer::Error(json!({"code":-1,"message":"m"}))))
        );
        assert_eq!(
            answer_for(
                br#"{"jsonrpc":"2.0","method":"notifications/progress"}"#,
                &want
            ),
            None
        );
        // A null result is an answer; a server request reusing our id, a
        // null id, or a message that is no object is not.
        assert_eq!(
            answer_for(br#"{"jsonrpc":"2.0","id":7,"result":null}"#, &want),
            Some(Ok(Answer::Result(RawResult::from_value(Value::Null))))
        );
        // Our answer, with a result refused: known as ours, and refused.
        assert!(matches!(
            answer_for(br#"{"jsonrpc":"2.0","id":7,"result":{"a":1,"a":2}}"#, &want),
            Some(Err(mcp::ParseError::DuplicateKey { .. }))
        ));
        for other in [
            &br#"{"jsonrpc":"2.0","id":7,"method":"sampling/createMessage","params":{}}"#[..],
            br#"{"jsonrpc":"2.0","id":null,"result":{}}"#,
            br#"[{"jsonrpc":"2.0","id":7,"result":{}}]"#,
            br#"[7,{"ok":true}]"#,
            br#"7"#,
        ] {
            assert_eq!(
                answer_for(other, &want),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
