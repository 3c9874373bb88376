//! THE pipeline for one data-plane request, and the only place errors become
//! responses.
//!
//! accept -> authenticate (the credential is never forwarded) -> read the
//! body (bounded) -> parse once, strictly -> session / revision checks ->
//! dispatch. For `tools/call`: look up the manifest in the current snapshot
//! -> `policy::decide` -> rate limit -> hand the audit record to the writer
//! -> forward with a timeout -> respond. Every refusal and every decision is
//! audited exactly once, from [`Gate::finish`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{AsHeaderName, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use serde_json::{json, Map, Value};
use tracing::Instrument;

use crate::alert::{Alert, Alerts};
use crate::audit::{self, Auditor, Record};
use crate::config::Config;
use crate::hold::Holds;
use crate::host::HostPolicy;
use crate::identity::{self, AuthError, Caller, TokenCache, Verifier};
use crate::manifest::PolicySet;
use crate::mcp::{self, code, Id, Message};
use crate::metrics::{
    AgentDecisionLabels, DecisionLabels, KindLabels, Metrics, ResultLabels, UpstreamLabels,
};
use crate::notify::Notifier;
use crate::policy::{self, Guard, Verdict};
use crate::ratelimit::{Limiters, Scope};
use crate::session::{SessionError, Sessions};
use crate::upstream::{Answer, Catalog, RawResult, Route, Upstream, Who};

use crate::mcp::headers::{MCP_METHOD, MCP_NAME, MCP_PROTOCOL_VERSION, MCP_SESSION_ID};

mod held;
mod items;
mod rounds;

/// Verified agent tokens kept at once.
pub const TOKEN_CACHE: usize = 100_000;

/// Response body type of both planes.
pub type Body = BoxBody<Bytes, Infallible>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// The policy in force: manifests and their limiters, swapped whole.
pub struct Snapshot {
    pub policy: PolicySet,
    pub limiters: Limiters,
    pub generation: u64,
}

/// Everything the data plane shares; cheap to clone through [`Gate`].
pub struct Shared {
    pub config: Config,
    pub verifier: Verifier,
    /// Verified agent tokens (bounded; entries die with the token).
    pub tokens: TokenCache,
    pub snapshot: ArcSwap<Snapshot>,
    pub catalog: ArcSwap<Catalog>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub sessions: Sessions,
    pub auditor: Auditor,
    pub guard: Guard,
    pub holds: Holds,
    pub notifier: Option<Notifier>,
    /// Verifies approver tokens (management plane), if configured.
    pub approvers: Option<Verifier>,
    pub metrics: Metrics,
    /// Host/Origin policy of the data-plane listener.
    pub hosts: HostPolicy,
    /// Host/Origin policy of the management listener.
    pub admin_hosts: HostPolicy,
    pub alerts: Alerts,
    /// Continuations of approved multi-round-trip calls.
    pub(crate) rounds: rounds::Rounds,
    /// toolgate's own questions to session-era agents, for 2026-07-28
    /// upstreams' input requests.
    pub(crate) asked: rounds::Asked,
    /// 2026-07-28 agents' calls parked at a session-era upstream's ask.
    pub(crate) parked: rounds::Parked,
    /// Bumped when what agents may list changes (an upstream's tool list,
    /// a policy reload); agents' GET streams send `list_changed` on it.
    pub(crate) listed: tokio::sync::watch::Sender<u64>,
    /// Open `subscriptions/listen` streams.
    pub(crate) listeners: std::sync::atomic::AtomicUsize,
    /// Delivers alerts to `alerts.url`, if configured.
    pub alert_sink: Option<Notifier>,
    refresh: tokio::sync::Mutex<()>,
    pub(crate) reload_lock: tokio::sync::Mutex<()>,
    /// Set once the manifests watcher is in place and has caught up with
    /// what changed since the set in force was read.
    pub(crate) watching: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Counts `r` in the metrics; returns the alert it raises, to be raised
    /// after `r` itself is recorded.
    fn count(&self, r: &Record) -> Option<Alert> {
        let alert = self.alerts.observe(r);
        if let Some(d) = r.decision {
            self.metrics
                .decisions
                .get_or_create(&DecisionLabels {
                    event: r.event,
                    decision: d,
                })
                .inc();
            if self
                .config
                .admin
                .as_ref()
                .is_some_and(|a| a.metrics_agent_labels)
            {
                if let Some(agent) = &r.agent {
                    // Only agents with a manifest: bounded by the policy set.
                    if self.snapshot.load().policy.get(agent).is_some() {
                        self.metrics
                            .agent_decisions
                            .get_or_create(&AgentDecisionLabels {
                                agent: agent.to_string(),
                                decision: d,
                            })
                            .inc();
                    }
                }
            }
        }
        alert
    }

    /// Audits a record of something that forwards nothing (best effort,
    /// retried by the writer), counting it in the metrics.
    pub fn audit(&self, r: Record) {
        let alert = self.count(&r);
        self.auditor.record(r);
        if let Some(a) = alert {
            self.raise(&a);
        }
    }

    /// Hands over the record of a call about to be forwarded; an error means
    /// the call must not be forwarded.
    /// When the log cannot take it, the call becomes a refusal, and that
    /// is what is audited (kept in the writer's backlog until the log is
    /// writable again).
    pub fn audit_submit(&self, r: Record) -> Result<(), crate::audit::Unavailable> {
        if !self.auditor.healthy() {
            return Err(self.unaudited(r));
        }
        let alert = self.count(&r);
        let res = self.auditor.submit(r);
        if let Some(a) = alert {
            self.raise(&a);
        }
        // Lost the race with a failing write or a full queue.
        res.map_err(|crate::audit::Refused(r)| self.unaudited(*r))
    }

    fn unaudited(&self, mut r: Record) -> crate::audit::Unavailable {
        r.decision = Some("deny");
        r.rule = Some("audit.unavailable".into());
        r.reason = Some("the audit log cannot be written; nothing was forwarded".into());
        self.audit(r);
        crate::audit::Unavailable
    }

    /// Counts, audits and delivers an alert.
    pub fn raise(&self, a: &Alert) {
        tracing::warn!(
            alert.kind = a.kind,
            agent.id = a.agent.as_deref().unwrap_or("-"),
            "{}",
            a.message
        );
        self.metrics
            .alerts
            .get_or_create(&KindLabels { kind: a.kind })
            .inc();
        self.auditor.record(Alerts::record(a));
        if let Some(sink) = &self.alert_sink {
            sink.send(Alerts::payload(a));
        }
    }

    pub(crate) fn metrics_reload(&self, ok: bool) {
        self.metrics
            .reloads
            .get_or_create(&ResultLabels {
                result: if ok { "accepted" } else { "rejected" },
            })
            .inc();
    }
}

/// A cheap handle on the data plane.
#[derive(Clone)]
pub struct Gate(pub Arc<Shared>);

/// How a request ends, before it becomes HTTP.
enum Reply {
    /// A JSON-RPC message with an HTTP status.
    Rpc(StatusCode, Value),
    /// A JSON-RPC message already serialised (a relayed result).
    Raw(StatusCode, Vec<u8>),
    /// 202 Accepted, no body (notifications, responses).
    Accepted,
    /// An empty response with a status (DELETE, 404 session).
    Status(StatusCode),
    /// 401 with `WWW-Authenticate: Bearer`.
    Unauthorized(AuthError),
    /// 200 with an event stream produced by a task (a held call waiting).
    Stream(Body),
}

impl Reply {
    /// The JSON-RPC message this reply carries, serialised, if it is one.
    fn into_message(self) -> Option<Vec<u8>> {
        match self {
            Reply::Rpc(_, v) => serde_json::to_vec(&v).ok(),
            Reply::Raw(_, bytes) => Some(bytes),
            _ => None,
        }
    }
}

/// What one request produced for the audit log, if anything.
struct Outcome {
    reply: Reply,
    /// Extra headers for the response (session id on initialize).
    session_id: Option<String>,
    record: Option<Record>,
}

impl Outcome {
    fn reply(reply: Reply) -> Self {
        Outcome {
            reply,
            session_id: None,
            record: None,
        }
    }
}

/// A refused 2026-07-28 request: code, message, extra `data` member.
type StatelessError = (i64, String, Option<(&'static str, Value)>);

/// The one header of `name`, as text; a repeated or non-text one is a
/// mismatch.
fn one_header<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'h str>, StatelessError> {
    let mismatch = |m: String| (code::HEADER_MISMATCH, m, None);
    let mut all = headers.get_all(name).iter();
    let first = all.next();
    if all.next().is_some() {
        return Err(mismatch(format!("{name} header appears more than once")));
    }
    first
        .map(|v| {
            v.to_str()
                .map_err(|_| mismatch(format!("{name} header is not valid text")))
        })
        .transpose()
}

/// Whether the `Mcp-Method` and `Mcp-Name` headers agree with the body.
/// Required with 2026-07-28; in any revision, headers that are present
/// must agree, since what routes or inspects by header (a load balancer, a
/// WAF) must never see another call than the one decided.
fn headers_agree(
    headers: &HeaderMap,
    req: &mcp::Request,
    required: bool,
) -> Result<(), StatelessError> {
    let mismatch = |m: String| (code::HEADER_MISMATCH, m, None);
    let method = one_header(headers, &MCP_METHOD)?;
    let name = one_header(headers, &MCP_NAME)?
        .map(mcp::decode_header_value)
        .transpose()
        .map_err(mismatch)?;
    if !required && method.is_none() && name.is_none() {
        return Ok(());
    }
    match method {
        Some(m) if m == req.method => {}
        Some(_) => {
            return Err(mismatch(
                "mcp-method header does not match the request body's method".into(),
            ))
        }
        None if !required => {}
        None => {
            return Err(mismatch(
                "mcp-method header is required with protocol revision 2026-07-28".into(),
            ))
        }
    }
    let body_name = match req.method.as_str() {
        "tools/call" | "prompts/get" => {
            Some(req.params.get("name").and_then(Value::as_str).unwrap_or(""))
        }
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            Some(req.params.get("uri").and_then(Value::as_str).unwrap_or(""))
        }
        _ => None,
    };
    match (name.as_deref(), body_name) {
        (Some(h), Some(b)) if h == b => Ok(()),
        (None, None) => Ok(()),
        (None, Some(_)) if !required => Ok(()),
        (Some(_), None) => Err(mismatch(
            "mcp-name header given for a request that names nothing".into(),
        )),
        _ => Err(mismatch(
            "mcp-name header does not match the request body's name".into(),
        )),
    }
}

/// Per-request facts the pipeline fills in.
struct Ctx {
    request_id: String,
    started: Instant,
    agent: Option<Arc<str>>,
    /// The client accepts only an event stream: answer in SSE.
    sse: bool,
    /// The client accepts an event stream: long waits may stream.
    accepts_sse: bool,
    /// The agent's MCP session (2025-era revisions), once checked.
    session: Option<Arc<str>>,
}

impl Ctx {
    /// On whose behalf this request goes upstream.
    fn who(&self, caller: &Caller) -> Who {
        Who {
            agent: caller.agent.clone(),
            session: self.session.clone(),
        }
    }
}

/// `subscriptions/listen` streams open at once.
const MAX_LISTENERS: usize = 1024;

fn rpc_error(status: StatusCode, id: Option<&Id>, code: i64, message: &str, data: Value) -> Reply {
    Reply::Rpc(status, mcp::error_response(id, code, message, Some(data)))
}

impl Gate {
    pub fn new(
        config: Config,
        policy: PolicySet,
        upstreams: Vec<Arc<Upstream>>,
        auditor: Auditor,
        guard: Guard,
        holds: Holds,
    ) -> Gate {
        let notifier = config
            .holds
            .notify_url
            .clone()
            .map(|url| Notifier::start(url, auditor.clone()));
        let alert_sink = config
            .alerts
            .url
            .clone()
            .map(|url| Notifier::start(url, auditor.clone()));
        let alerts = Alerts::new(config.alerts.denial_threshold, config.alerts.denial_window);
        let approvers = config
            .approvers
            .as_ref()
            .map(|a| Verifier::new(&a.issuer, &a.audience, a.leeway, a.keys.clone()));
        let verifier = Verifier::new(
            &config.agents.issuer,
            &config.agents.audience,
            config.agents.leeway,
            config.agents.keys.clone(),
        );
        let limiters = Limiters::build(&policy, None, governor::clock::DefaultClock::default());
        let sessions = Sessions::new(
            config.limits.max_sessions,
            std::time::Duration::from_secs(3600),
        );
        Gate(Arc::new(Shared {
            verifier,
            tokens: TokenCache::new(TOKEN_CACHE),
            snapshot: ArcSwap::from_pointee(Snapshot {
                policy,
                limiters,
                generation: 1,
            }),
            catalog: ArcSwap::from_pointee(Catalog::default()),
            upstreams,
            sessions,
            auditor,
            guard,
            holds,
            notifier,
            approvers,
            metrics: Metrics::default(),
            hosts: HostPolicy::new(
                config.listen,
                &config.allowed_hosts,
                &config.allowed_origins,
            ),
            admin_hosts: HostPolicy::new(
                config.admin.as_ref().map_or(config.listen, |a| a.listen),
                &config.allowed_hosts,
                &config.allowed_origins,
            ),
            alerts,
            rounds: rounds::Rounds::default(),
            asked: rounds::Asked::default(),
            parked: rounds::Parked::default(),
            listed: tokio::sync::watch::Sender::new(0),
            listeners: std::sync::atomic::AtomicUsize::new(0),
            alert_sink,
            config,
            refresh: tokio::sync::Mutex::new(()),
            reload_lock: tokio::sync::Mutex::new(()),
            watching: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Handles one data-plane HTTP request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut ctx = Ctx {
            request_id: uuid::Uuid::now_v7().simple().to_string(),
            started: Instant::now(),
            agent: None,
            sse: false,
            accepts_sse: false,
            session: None,
        };
        let span = tracing::info_span!(
            "request",
            request.id = %ctx.request_id,
            agent.id = tracing::field::Empty,
            tool.name = tracing::field::Empty,
            decision = tracing::field::Empty,
        );
        // Boxed once here: each async level below would otherwise copy the
        // pipeline's whole state (kilobytes) into its own on every call.
        let outcome = Box::pin(self.pipeline(req, &mut ctx))
            .instrument(span.clone())
            .await;
        let resp = self.finish(outcome, &ctx, &span);
        self.0
            .metrics
            .request_seconds
            .observe(ctx.started.elapsed().as_secs_f64());
        resp
    }

    /// Emits the audit record (if any) and turns the outcome into HTTP.
    fn finish(&self, outcome: Outcome, ctx: &Ctx, span: &tracing::Span) -> Response<Body> {
        if let Some(mut r) = outcome.record {
            r.request_id = Some(ctx.request_id.clone());
            if r.agent.is_none() {
                r.agent = ctx.agent.clone();
            }
            r.latency_us
                .get_or_insert(ctx.started.elapsed().as_micros() as u64);
            if let Some(d) = r.decision {
                span.record("decision", d);
            }
            let _e = span.enter();
            tracing::info!(
                event = r.event,
                decision = r.decision.unwrap_or("-"),
                rule = r.rule.as_deref().unwrap_or("-"),
                "decided"
            );
            // Records of calls that were forwarded were submitted already;
            // these are refusals: best effort, retried by the writer.
            self.0.audit(r);
        }
        let mut resp = match outcome.reply {
            Reply::Rpc(status, body) => message_response(
                status,
                serde_json::to_vec(&body).unwrap_or_default(),
                ctx.sse,
            ),
            Reply::Raw(status, bytes) => message_response(status, bytes, ctx.sse),
            Reply::Accepted => response(StatusCode::ACCEPTED, "", full(Bytes::new())),
            Reply::Stream(body) => response(StatusCode::OK, "text/event-stream", body),
            Reply::Status(s) => {
                let mut r = response(s, "", full(Bytes::new()));
                if s == StatusCode::METHOD_NOT_ALLOWED {
                    r.headers_mut().insert(
                        http::header::ALLOW,
                        HeaderValue::from_static("POST, DELETE"),
                    );
                }
                r
            }
            Reply::Unauthorized(e) => {
                let body = mcp::error_response(
                    None,
                    code::DENIED,
                    &format!("unauthorized: {e}"),
                    Some(json!({"decision": "deny", "request_id": ctx.request_id})),
                );
                let mut r = response(
                    StatusCode::UNAUTHORIZED,
                    "application/json",
                    full(serde_json::to_vec(&body).unwrap_or_default()),
                );
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"toolgate\", error=\"invalid_token\""),
                );
                r
            }
        };
        if let Some(sid) = outcome.session_id {
            if let Ok(v) = HeaderValue::from_str(&sid) {
                resp.headers_mut().insert(MCP_SESSION_ID, v);
            }
        }
        resp
    }

    async fn pipeline<B>(&self, req: Request<B>, ctx: &mut Ctx) -> Outcome
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        if parts.uri.path() != "/mcp" {
            return Outcome::reply(Reply::Status(StatusCode::NOT_FOUND));
        }
        // DNS-rebinding protection comes before anything else is read.
        if let Err(why) = self.0.hosts.check(&parts.headers) {
            return refused(
                rpc_error(
                    StatusCode::FORBIDDEN,
                    None,
                    code::INVALID_REQUEST,
                    &why,
                    json!({"decision": "deny", "request_id": ctx.request_id}),
                ),
                &why,
            );
        }
        // 1. Authenticate before anything else is read.
        let caller = match self.authenticate(&parts.headers) {
            Ok(c) => c,
            Err(e) => {
                return Outcome {
                    reply: Reply::Unauthorized(e.clone()),
                    session_id: None,
                    record: Some(Record {
                        event: "auth_failed",
                        decision: Some("deny"),
                        reason: Some(e.to_string()),
                        ..Record::default()
                    }),
                };
            }
        };
        ctx.agent = Some(caller.agent.clone());
        tracing::Span::current().record("agent.id", &*caller.agent);

        let modern_header = header_str(&parts.headers, &MCP_PROTOCOL_VERSION)
            .is_some_and(|v| !mcp::SESSION_VERSIONS.contains(&v) && v != "2024-11-05");
        match parts.method {
            Method::POST => {}
            _ if modern_header => {
                return Outcome::reply(Reply::Status(StatusCode::METHOD_NOT_ALLOWED))
            }
            Method::DELETE => return self.delete_session(&parts.headers, &caller),
            Method::GET => return self.listen(&parts.headers, &caller),
            _ => return Outcome::reply(Reply::Status(StatusCode::METHOD_NOT_ALLOWED)),
        }
        let accept = header_str(&parts.headers, &http::header::ACCEPT).unwrap_or("");
        ctx.accepts_sse = accept.contains("text/event-stream");
        ctx.sse = prefers_sse(accept);

        // Read the body, bounded.
        let bytes = match self.read_body(&parts.headers, body, &ctx.request_id).await {
            Ok(b) => b,
            Err(reply) => return refused(reply, "body refused"),
        };
        // Parse once, strictly.
        let msg = match mcp::parse_message(&bytes) {
            Ok(m) => m,
            Err(e) => {
                let reason = e.to_string();
                return refused(
                    rpc_error(
                        StatusCode::BAD_REQUEST,
                        None,
                        e.code(),
                        &reason,
                        json!({"decision": "deny", "request_id": ctx.request_id}),
                    ),
                    &reason,
                );
            }
        };
        let req = match msg {
            Message::Request(r) => r,
            // An answer to a server request relayed during a call.
            Message::Response { id, body } => {
                return Box::pin(self.agent_answer(&caller, id, body)).await;
            }
        };
        // Which revision, and (for the session-based ones) which session.
        let version = match self.revision(&parts.headers, &req, &caller, ctx) {
            Ok(v) => v,
            Err(o) => return *o,
        };
        if version != mcp::V2026_07_28 {
            ctx.session = header_str(&parts.headers, &MCP_SESSION_ID).map(Arc::from);
        }
        let Some(id) = req.id.clone() else {
            return self.notification(&req, &ctx.request_id);
        };
        self.dispatch(req, id, version, &caller, ctx).await
    }

    /// The agent answers a server request (sampling, elicitation) that was
    /// relayed to it: the answer goes to the upstream session that asked,
    /// if this agent was asked; anything else is dropped (202 either way:
    /// a response gets no response).
    async fn agent_answer(&self, caller: &Caller, id: Option<Id>, body: Value) -> Outcome {
        let (Some(Id::Str(id)), Value::Object(body)) = (id, body) else {
            return Outcome::reply(Reply::Accepted);
        };
        if id.starts_with(rounds::ASK_PREFIX) {
            if !self.0.asked.answer(&caller.agent, &id, body) {
                tracing::debug!(agent.id = %caller.agent, "an answer to no question of this agent");
            }
            return Outcome::reply(Reply::Accepted);
        }
        let upstream = crate::upstream::asks::upstream_of(&id)
            .and_then(|name| self.0.upstreams.iter().find(|u| u.name == name));
        match upstream {
            Some(u) => {
                if let Err(e) = u.answer(&caller.agent, &id, &body).await {
                    tracing::warn!(agent.id = %caller.agent, upstream.name = %u.name, error = %e, "agent's answer not passed on");
                } else {
                    tracing::info!(agent.id = %caller.agent, upstream.name = %u.name, "agent's answer passed to the server");
                }
            }
            None => {
                tracing::debug!(agent.id = %caller.agent, "a response to nothing toolgate asked")
            }
        }
        Outcome::reply(Reply::Accepted)
    }

    fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        let token = identity::bearer(headers)?;
        let now = identity::now_unix();
        if let Some(c) = self.0.tokens.get(token, now) {
            return Ok(c);
        }
        let claims = self.0.verifier.verify(token)?;
        let caller = identity::agent_from_claims(&claims, &self.0.config.agents.agent_claim)?;
        if let Some(exp) = claims.get("exp").and_then(Value::as_u64) {
            self.0.tokens.put(token, &caller, exp, now);
        }
        Ok(caller)
    }

    async fn read_body<B>(
        &self,
        headers: &HeaderMap,
        body: B,
        request_id: &str,
    ) -> Result<Bytes, Reply>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let max = self.0.config.limits.max_body;
        let too_large = || {
            rpc_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                code::INVALID_REQUEST,
                &format!("request body exceeds limits.max_body ({max} bytes)"),
                json!({"decision": "deny", "request_id": request_id}),
            )
        };
        // Two labels are two readings of one body: which would be meant?
        if headers
            .get_all(http::header::CONTENT_TYPE)
            .iter()
            .nth(1)
            .is_some()
        {
            return Err(rpc_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                None,
                code::INVALID_REQUEST,
                "exactly one Content-Type header, application/json (UTF-8)",
                json!({"decision": "deny", "request_id": request_id}),
            ));
        }
        let ct = header_str(headers, &CONTENT_TYPE).unwrap_or("");
        let mut parts = ct.split(';');
        let media = parts.next().unwrap_or("").trim();
        // JSON is UTF-8 (RFC 8259 8.1); a body labelled otherwise would be
        // read as something its sender did not mean.
        let other_charset = parts.any(|p| {
            p.split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("charset")
                    && !v.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
            })
        });
        if !media.eq_ignore_ascii_case("application/json") || other_charset {
            return Err(rpc_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                None,
                code::INVALID_REQUEST,
                "Content-Type must be application/json (UTF-8)",
                json!({"decision": "deny", "request_id": request_id}),
            ));
        }
        if let Some(len) =
            header_str(headers, &CONTENT_LENGTH).and_then(|l| l.parse::<usize>().ok())
        {
            if len > max {
                return Err(too_large());
            }
        }
        // A client that trickles its body cannot pin a connection forever.
        let read = tokio::time::timeout(
            self.0.config.limits.body_timeout,
            Limited::new(body, max).collect(),
        )
        .await;
        let Ok(read) = read else {
            return Err(rpc_error(
                StatusCode::REQUEST_TIMEOUT,
                None,
                code::INVALID_REQUEST,
                "the request body did not arrive in time",
                json!({"decision": "deny", "request_id": request_id}),
            ));
        };
        match read {
            Ok(c) => Ok(c.to_bytes()),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(too_large())
            }
            Err(_) => Err(rpc_error(
                StatusCode::BAD_REQUEST,
                None,
                code::INVALID_REQUEST,
                "could not read the request body",
                json!({"decision": "deny", "request_id": request_id}),
            )),
        }
    }

    /// Decides the protocol revision of a request, checking the session or
    /// the stateless headers.
    fn revision(
        &self,
        headers: &HeaderMap,
        req: &mcp::Request,
        caller: &Caller,
        ctx: &Ctx,
    ) -> Result<&'static str, Box<Outcome>> {
        let header_version = header_str(headers, &MCP_PROTOCOL_VERSION);
        // Every refusal here is HTTP 400 with the revision's code.
        let refuse = |(code, msg, extra): StatelessError| {
            let mut data = json!({"decision": "deny", "request_id": ctx.request_id});
            if let Some((k, v)) = extra {
                data[k] = v;
            }
            Box::new(refused(
                rpc_error(StatusCode::BAD_REQUEST, req.id.as_ref(), code, &msg, data),
                &msg,
            ))
        };
        let bad = |msg: String| refuse((code::INVALID_REQUEST, msg, None));
        let modern = match header_version {
            Some(v) => !mcp::SESSION_VERSIONS.contains(&v) && v != "2024-11-05",
            None => false,
        };
        if req.method == "initialize" || !modern {
            headers_agree(headers, req, false).map_err(refuse)?;
        }
        if req.method == "initialize" {
            return Ok(mcp::V2025_11_25);
        }
        if modern {
            return self
                .stateless_checks(headers, req)
                .map(|()| mcp::V2026_07_28)
                .map_err(refuse);
        }
        let Some(sid) = header_str(headers, &MCP_SESSION_ID) else {
            return Err(bad("missing Mcp-Session-Id: send initialize first, or use protocol revision 2026-07-28".into()));
        };
        match self.0.sessions.get(sid, &caller.agent) {
            Ok(s) => {
                // Any session-based revision toolgate knows is accepted in a
                // session (as the SDK servers do: the conformance suite sends
                // 2025-03-26 on a 2025-11-25 session); the negotiated one
                // governs. Unknown revisions are refused.
                if let Some(v) = header_version {
                    if !mcp::SESSION_VERSIONS.contains(&v) {
                        return Err(bad(format!("unsupported MCP-Protocol-Version {v:?}")));
                    }
                }
                Ok(s.version)
            }
            Err(_) => Err(Box::new(Outcome {
                reply: Reply::Status(StatusCode::NOT_FOUND),
                session_id: None,
                record: Some(Record {
                    event: "rejected",
                    decision: Some("deny"),
                    reason: Some("unknown session".into()),
                    ..Record::default()
                }),
            })),
        }
    }

    /// 2026-07-28: the version header, `_meta` envelope, `Mcp-Method` and
    /// `Mcp-Name` must all agree with the body, so a header/body disagreement
    /// can never steer routing or policy. Errors carry the revision's codes
    /// (-32020 header mismatch, -32022 unsupported version, -32602 envelope).
    fn stateless_checks(
        &self,
        headers: &HeaderMap,
        req: &mcp::Request,
    ) -> Result<(), StatelessError> {
        let mismatch = |m: String| (code::HEADER_MISMATCH, m, None);
        let version = one_header(headers, &MCP_PROTOCOL_VERSION)?.unwrap_or_default();
        if version != mcp::V2026_07_28 {
            return Err((
                code::UNSUPPORTED_VERSION,
                "Unsupported protocol version".into(),
                Some((
                    "supported",
                    json!([mcp::V2026_07_28, mcp::V2025_11_25, mcp::V2025_06_18]),
                )),
            ));
        }
        let meta = req.params.get("_meta").and_then(Value::as_object);
        let Some(meta) = meta.filter(|m| {
            m.get(mcp::META_VERSION).is_some_and(Value::is_string)
                && m.get(mcp::META_CAPABILITIES).is_some_and(Value::is_object)
        }) else {
            return Err((
                code::INVALID_PARAMS,
                format!(
                    "params._meta must be an object carrying {:?} and {:?}",
                    mcp::META_VERSION,
                    mcp::META_CAPABILITIES
                ),
                None,
            ));
        };
        if meta.get(mcp::META_VERSION).and_then(Value::as_str) != Some(version) {
            return Err(mismatch("mcp-protocol-version header does not match the request envelope's protocol version".into()));
        }
        headers_agree(headers, req, true)
    }

    fn notification(&self, req: &mcp::Request, request_id: &str) -> Outcome {
        if req.method.starts_with("notifications/") {
            return Outcome::reply(Reply::Accepted);
        }
        // A request without id, e.g. tools/call as a notification: refused,
        // since its outcome could never be reported.
        let reason = format!("{} must be a request with an id", req.method);
        refused(
            rpc_error(
                StatusCode::BAD_REQUEST,
                None,
                code::INVALID_REQUEST,
                &reason,
                json!({"decision": "deny", "request_id": request_id}),
            ),
            &reason,
        )
    }

    /// A session's GET stream: `notifications/tools/list_changed` whenever
    /// what the agent may list can have changed (an upstream's tools, a
    /// policy reload), and keep-alives; it ends with the session. One per
    /// session.
    fn listen(&self, headers: &HeaderMap, caller: &Caller) -> Outcome {
        use std::sync::atomic::Ordering;
        let accept = header_str(headers, &http::header::ACCEPT).unwrap_or("");
        if !accept.contains("text/event-stream") {
            return Outcome::reply(Reply::Status(StatusCode::NOT_ACCEPTABLE));
        }
        let Some(sid) = header_str(headers, &MCP_SESSION_ID) else {
            return Outcome::reply(Reply::Status(StatusCode::BAD_REQUEST));
        };
        let Ok(session) = self.0.sessions.get(sid, &caller.agent) else {
            return Outcome::reply(Reply::Status(StatusCode::NOT_FOUND));
        };
        if session.listening.swap(true, Ordering::AcqRel) {
            return Outcome::reply(Reply::Status(StatusCode::CONFLICT));
        }
        let (me, sid, agent) = (self.clone(), sid.to_owned(), caller.agent.clone());
        let note =
            sse_frame(&json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}));
        self.change_stream(
            None,
            Some(note),
            move || me.0.sessions.get(&sid, &agent).is_ok(),
            move || session.listening.store(false, Ordering::Release),
        )
    }

    /// An event stream of `note` on every change of what agents may list:
    /// `first` before anything, keep-alives, until the client goes away or
    /// `alive` (asked at each keep-alive) says no; then `done`.
    fn change_stream(
        &self,
        first: Option<Bytes>,
        note: Option<Bytes>,
        alive: impl Fn() -> bool + Send + 'static,
        done: impl FnOnce() + Send + 'static,
    ) -> Outcome {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let mut changes = self.0.listed.subscribe();
        changes.mark_unchanged();
        if let Some(f) = first {
            let _ = tx.try_send(f);
        }
        tokio::spawn(async move {
            let mut keepalive = tokio::time::interval_at(
                tokio::time::Instant::now() + held::KEEPALIVE,
                held::KEEPALIVE,
            );
            loop {
                let chunk = tokio::select! {
                    r = changes.changed() => match (r, &note) {
                        (Ok(()), Some(n)) => n.clone(),
                        (Ok(()), None) => continue,
                        (Err(_), _) => break,
                    },
                    _ = keepalive.tick() => {
                        if !alive() {
                            break;
                        }
                        Bytes::from_static(b": keepalive\n\n")
                    }
                    () = tx.closed() => break,
                };
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            done();
        });
        Outcome::reply(Reply::Stream(held::ChannelBody { rx }.boxed()))
    }

    /// 2026-07-28 `subscriptions/listen`: an event stream acknowledging the
    /// notifications toolgate honours (`toolsListChanged`; others are left
    /// out of the acknowledgment, as the revision says), then each one,
    /// stamped with the listen request's id. Bounded: [`MAX_LISTENERS`].
    fn subscriptions_listen(&self, req: &mcp::Request, id: &Id, ctx: &Ctx) -> Outcome {
        use std::sync::atomic::Ordering;
        let fail = |code: i64, msg: &str| {
            Outcome::reply(Reply::Rpc(
                StatusCode::OK,
                mcp::error_response(Some(id), code, msg, None),
            ))
        };
        if !ctx.accepts_sse {
            return fail(
                code::INVALID_REQUEST,
                "subscriptions/listen answers with an event stream: accept text/event-stream",
            );
        }
        let Some(filter) = req.params.get("notifications").and_then(Value::as_object) else {
            return fail(
                code::INVALID_PARAMS,
                "params.notifications must be an object",
            );
        };
        let tools = filter.get("toolsListChanged") == Some(&Value::Bool(true));
        if self.0.listeners.fetch_add(1, Ordering::AcqRel) >= MAX_LISTENERS {
            self.0.listeners.fetch_sub(1, Ordering::AcqRel);
            return fail(
                code::INTERNAL,
                "too many subscriptions/listen streams are open",
            );
        }
        let stamp = json!({ mcp::META_SUBSCRIPTION_ID: id.to_value() });
        let mut honored = Map::new();
        if tools {
            honored.insert("toolsListChanged".into(), Value::Bool(true));
        }
        let ack = sse_frame(
            &json!({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
            "params": {"notifications": honored, "_meta": stamp}}),
        );
        let note = tools.then(|| {
            sse_frame(
                &json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed",
                "params": {"_meta": stamp}}),
            )
        });
        let me = self.clone();
        self.change_stream(
            Some(ack),
            note,
            || true,
            move || {
                me.0.listeners.fetch_sub(1, Ordering::AcqRel);
            },
        )
    }

    fn delete_session(&self, headers: &HeaderMap, caller: &Caller) -> Outcome {
        match header_str(headers, &MCP_SESSION_ID) {
            Some(sid) => match self.0.sessions.close(sid, &caller.agent) {
                Ok(()) => {
                    // Its upstream sessions end with it.
                    let who = Who {
                        agent: caller.agent.clone(),
                        session: Some(Arc::from(sid)),
                    };
                    for u in &self.0.upstreams {
                        u.forget(&who);
                    }
                    Outcome::reply(Reply::Status(StatusCode::NO_CONTENT))
                }
                Err(_) => Outcome::reply(Reply::Status(StatusCode::NOT_FOUND)),
            },
            None => Outcome::reply(Reply::Status(StatusCode::BAD_REQUEST)),
        }
    }

    async fn dispatch(
        &self,
        req: mcp::Request,
        id: Id,
        version: &'static str,
        caller: &Caller,
        ctx: &mut Ctx,
    ) -> Outcome {
        let ok = |result: Value| {
            Outcome::reply(result_reply(&id, RawResult::from_value(result), version))
        };
        let modern = version == mcp::V2026_07_28;
        let cacheable = |mut v: Value| {
            if modern {
                v["ttlMs"] = Value::from(0);
                v["cacheScope"] = Value::from("private");
            }
            v
        };
        match req.method.as_str() {
            "initialize" if !modern => self.initialize(&req, &id, caller, ctx),
            "server/discover" => ok(cacheable(self.discover_result())),
            "subscriptions/listen" if modern => self.subscriptions_listen(&req, &id, ctx),
            "ping" if !modern => ok(json!({})),
            "tools/list" => {
                let tools = Box::pin(self.tools_for(&caller.agent)).await;
                ok(cacheable(mcp::object([("tools", Value::Array(tools))])))
            }
            "tools/call" => self.call(req, id, version, caller, ctx).await,
            "resources/list" | "resources/templates/list" | "prompts/list" => {
                let v = Box::pin(self.list_items(&req.method, &ctx.who(caller))).await;
                ok(cacheable(v))
            }
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" | "prompts/get" => {
                Box::pin(self.get_item(req, id, version, caller, ctx)).await
            }
            "logging/setLevel" if !modern => {
                match Box::pin(self.set_level(&req, &ctx.who(caller))).await {
                    Ok(()) => ok(json!({})),
                    Err(msg) => Outcome::reply(Reply::Rpc(
                        StatusCode::OK,
                        mcp::error_response(
                            Some(&id),
                            code::INVALID_PARAMS,
                            &msg,
                            Some(json!({"request_id": ctx.request_id})),
                        ),
                    )),
                }
            }
            other => {
                let msg = format!("method {other:?} is not supported by toolgate");
                Outcome::reply(Reply::Rpc(
                    if modern {
                        StatusCode::NOT_FOUND
                    } else {
                        StatusCode::OK
                    },
                    mcp::error_response(
                        Some(&id),
                        code::METHOD_NOT_FOUND,
                        &msg,
                        Some(json!({"request_id": ctx.request_id})),
                    ),
                ))
            }
        }
    }

    /// `logging/setLevel`: the level applies to this agent's sessions with
    /// every upstream (each is the agent's own, so no other agent's log
    /// level changes). Upstreams without logging are skipped.
    async fn set_level(&self, req: &mcp::Request, who: &Who) -> Result<(), String> {
        const LEVELS: [&str; 8] = [
            "debug",
            "info",
            "notice",
            "warning",
            "error",
            "critical",
            "alert",
            "emergency",
        ];
        let level = req.params.get("level").and_then(Value::as_str);
        let Some(level) = level.filter(|l| LEVELS.contains(l)) else {
            return Err(format!(
                "logging/setLevel needs params.level, one of {}",
                LEVELS.join(", ")
            ));
        };
        let mut set = tokio::task::JoinSet::new();
        for u in self.0.upstreams.iter() {
            let (u, who) = (u.clone(), who.clone());
            let params = json!({ "level": level });
            set.spawn(async move {
                if let Err(e) = u.request(&who, "logging/setLevel", params).await {
                    tracing::debug!(upstream.name = %u.name, error = %e, "logging/setLevel not applied");
                }
            });
        }
        while set.join_next().await.is_some() {}
        Ok(())
    }

    fn capabilities() -> Value {
        json!({"tools": {"listChanged": true}, "resources": {}, "prompts": {}, "logging": {}})
    }

    fn discover_result(&self) -> Value {
        json!({
            "supportedVersions": [mcp::V2026_07_28, mcp::V2025_11_25, mcp::V2025_06_18],
            "serverInfo": mcp::toolgate_info(),
            "capabilities": Self::capabilities(),
            "instructions": "toolgate: every tool call is checked against this agent's manifest and audited.",
        })
    }

    fn initialize(&self, req: &mcp::Request, id: &Id, caller: &Caller, ctx: &Ctx) -> Outcome {
        let asked = req.params.get("protocolVersion").and_then(Value::as_str);
        let version = asked
            .and_then(|a| mcp::SESSION_VERSIONS.iter().copied().find(|v| *v == a))
            .unwrap_or(mcp::V2025_11_25);
        match self.0.sessions.open(&caller.agent, version) {
            Ok(sid) => Outcome {
                reply: Reply::Rpc(
                    StatusCode::OK,
                    mcp::result_response(
                        id,
                        json!({
                            "protocolVersion": version,
                            "capabilities": Self::capabilities(),
                            "serverInfo": mcp::toolgate_info(),
                        }),
                    ),
                ),
                session_id: Some(sid),
                record: None,
            },
            Err(e @ SessionError::Full) | Err(e @ SessionError::NotFound) => refused(
                rpc_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Some(id),
                    code::INTERNAL,
                    &e.to_string(),
                    json!({"decision": "deny", "request_id": ctx.request_id}),
                ),
                &e.to_string(),
            ),
        }
    }

    /// The tools this agent may call (listed and not denied), under their
    /// exposed names.
    async fn tools_for(&self, agent: &str) -> Vec<Value> {
        let catalog = self.catalog(false).await;
        let snap = self.0.snapshot.load();
        let Some(m) = snap.policy.get(agent) else {
            return Vec::new();
        };
        catalog
            .tools
            .iter()
            .filter(|(name, _)| m.exposes(name))
            .map(|(_, def)| def.clone())
            .collect()
    }

    /// The current catalog, fetching it when it was never fetched, is
    /// incomplete and stale, or `force` (a name was not found).
    pub async fn catalog(&self, force: bool) -> Arc<Catalog> {
        let current = self.0.catalog.load_full();
        let changed = self.0.upstreams.iter().any(|u| {
            u.tools_changed.load(std::sync::atomic::Ordering::Relaxed)
                && u.tools_changed
                    .swap(false, std::sync::atomic::Ordering::Relaxed)
        });
        let fresh = !changed
            && current.fetched_at.is_some_and(|t| {
                t.elapsed() < std::time::Duration::from_secs(if force { 1 } else { 30 })
            });
        if fresh
            && (!force
                || current
                    .fetched_at
                    .is_some_and(|t| t.elapsed().as_millis() < 200))
        {
            return current;
        }
        let _g = self.0.refresh.lock().await;
        let again = self.0.catalog.load_full();
        if !Arc::ptr_eq(&again, &current) {
            return again;
        }
        let lists = Box::pin(futures_join(&self.0.upstreams)).await;
        let catalog = Arc::new(Catalog::build(&self.0.upstreams, &lists));
        self.0.catalog.store(catalog.clone());
        if current.fetched_at.is_some() && current.tools != catalog.tools {
            self.0.listed.send_modify(|n| *n += 1);
        }
        catalog
    }

    /// `tools/call`: SPEC "Deciding a tools/call", steps 2-8.
    async fn call(
        &self,
        req: mcp::Request,
        id: Id,
        version: &'static str,
        caller: &Caller,
        ctx: &mut Ctx,
    ) -> Outcome {
        let call = match mcp::tool_call(req.params) {
            Ok(c) => c,
            Err(e) => {
                // A non-object where an object must be is refused like
                // malformed JSON (SPEC "Hardening promises").
                let status = match e.1 {
                    mcp::Shape::NotAnObject => StatusCode::BAD_REQUEST,
                    mcp::Shape::Other => StatusCode::OK,
                };
                return refused(
                    rpc_error(
                        status,
                        Some(&id),
                        code::INVALID_PARAMS,
                        &e.0,
                        json!({"decision": "deny", "request_id": ctx.request_id}),
                    ),
                    &e.0,
                );
            }
        };
        tracing::Span::current().record("tool.name", call.name.as_str());
        let snap = self.0.snapshot.load();
        let manifest = snap.policy.get(&caller.agent);
        let decision = policy::decide(
            &self.0.guard,
            manifest.map(|m| &**m),
            &caller.agent,
            &call.name,
            &call.arguments,
        );
        let rule_id = decision.rule.id().into_owned();
        let mut record = Record {
            event: "call",
            agent: Some(caller.agent.clone()),
            tool: Some(call.name.clone()),
            rule: Some(rule_id.clone()),
            reason: Some(decision.reason.to_string()),
            args_sha256: Some(audit::args_sha256(&call.arguments)),
            args: Some(audit::redact(&call.arguments)),
            ..Record::default()
        };
        let data = |decision: &str, extra: Option<(&str, Value)>| {
            let mut d = error_data(decision, &ctx.request_id, &rule_id);
            if let (Some((k, v)), Value::Object(o)) = (extra, &mut d) {
                o.insert(k.into(), v);
            }
            d
        };
        let deny = |record: Record, code: i64, msg: &str, data: Value| Outcome {
            reply: Reply::Rpc(
                StatusCode::OK,
                mcp::error_response(Some(&id), code, msg, Some(data)),
            ),
            session_id: None,
            record: Some(record),
        };
        let unexposed = |mut record: Record, name: &str| {
            let msg = format!("unknown tool {name:?}: no upstream exposes it");
            record.decision = Some("deny");
            record.rule = Some("catalog".into());
            record.reason = Some(msg.clone());
            let mut d = data("deny", None);
            d["rule"] = Value::from("catalog");
            deny(record, code::INVALID_PARAMS, &msg, d)
        };
        match &decision.verdict {
            Verdict::Deny => {
                let d = data("deny", None);
                record.decision = Some("deny");
                return deny(
                    record,
                    code::DENIED,
                    &format!("denied: {}", decision.reason),
                    d,
                );
            }
            Verdict::Invalid(errors) => {
                let d = data(
                    "deny",
                    Some(("errors", serde_json::to_value(errors).unwrap_or_default())),
                );
                record.decision = Some("deny");
                return deny(
                    record,
                    code::INVALID_PARAMS,
                    "invalid arguments: the call does not match the tool's schema",
                    d,
                );
            }
            Verdict::Hold { .. } | Verdict::Allow => {}
        }
        // Route: needed to forward, and to name the upstream of a hold. An
        // allowed call no upstream exposes is denied here, before the
        // limits: denied calls spend no budget.
        let mut catalog = self.catalog(false).await;
        if !catalog.routes.contains_key(&call.name) {
            catalog = self.catalog(true).await;
        }
        let route = catalog.route(&call.name);
        if route.is_none() && matches!(decision.verdict, Verdict::Allow) {
            return unexposed(record, &call.name);
        }
        // 7. Rate limits count calls that would be allowed or held.
        let m = manifest.expect("only decide() with a manifest allows or holds");
        if let Err(limited) = snap.limiters.check(m, decision.tool_rule) {
            let ms = limited.retry_after.as_millis().max(1) as u64;
            let scope = match limited.scope {
                Scope::Agent => "rate_limit.agent",
                Scope::Tool => "rate_limit.tool",
            };
            record.decision = Some("rate_limited");
            record.rule = Some(scope.to_owned());
            record.reason = Some(format!(
                "over the {} rate limit; retry after {ms} ms",
                if limited.scope == Scope::Agent {
                    "agent's"
                } else {
                    "tool's"
                }
            ));
            let d = {
                let mut d = data("rate_limited", Some(("retry_after_ms", Value::from(ms))));
                d["rule"] = Value::from(scope);
                d
            };
            return deny(record, code::RATE_LIMITED, "rate limited", d);
        }
        // The retry of an approved call that answered `input_required` is
        // that call's next round, not a new call: it continues, once.
        let continues = match (&decision.verdict, call.is_retry(), &record.args_sha256) {
            (Verdict::Hold { .. }, true, Some(sha)) => self.0.rounds.take(
                &caller.agent,
                &call.name,
                sha,
                call.request_state.as_deref(),
            ),
            _ => None,
        };
        if let Some(hold) = continues {
            record.rule = Some("hold.continuation".into());
            record.reason = Some(format!(
                "the next round of the approved call of hold {hold} (input_required)"
            ));
            record.hold_id = Some(hold);
        } else if let Verdict::Hold { approvals } = decision.verdict {
            tracing::Span::current().record("decision", "hold");
            return Box::pin(
                self.held(held::HeldCall {
                    upstream: route
                        .as_ref()
                        .map(|r| self.0.upstreams[r.upstream].name.clone()),
                    route,
                    call,
                    id,
                    version,
                    record,
                    approvals,
                    request_id: ctx.request_id.clone(),
                    stream: ctx.accepts_sse,
                    who: ctx.who(caller),
                }),
            )
            .await;
        }
        // 8. Allow: audit, then forward.
        let Some(route) = route else {
            return unexposed(record, &call.name);
        };
        record.decision = Some("allow");
        record.latency_us = Some(ctx.started.elapsed().as_micros() as u64);
        tracing::Span::current().record("decision", "allow");
        record.request_id = Some(ctx.request_id.clone());
        let via = Via {
            who: ctx.who(caller),
            version,
            relay: ctx.accepts_sse,
        };
        self.forward(route, call, &id, record, via).await
    }

    /// Hands `record` to the audit writer, then forwards `call` along
    /// `route`. Nothing is forwarded whose record could not be handed over.
    async fn forward(
        &self,
        route: Route,
        call: mcp::ToolCall,
        id: &Id,
        mut record: Record,
        via: Via,
    ) -> Outcome {
        let Via {
            who,
            version,
            relay,
        } = via;
        let request_id = record.request_id.clone().unwrap_or_default();
        let upstream = self.0.upstreams[route.upstream].clone();
        let rule = record.rule.clone().unwrap_or_default();
        record.detail = Some(json!({"upstream": upstream.name}));
        let agent = record.agent.clone();
        let grant = record.hold_id.clone().zip(record.args_sha256.clone());
        // A 2026-07-28 agent cannot take a session-era upstream's requests
        // mid-call: they become input_required rounds (see rounds.rs).
        let parkable = version == mcp::V2026_07_28 && upstream.version() != Some(mcp::V2026_07_28);
        let args_sha256 = if parkable {
            record.args_sha256.clone().unwrap_or_default()
        } else {
            String::new()
        };
        // A session-era agent cannot read 2026-07-28 input_required rounds:
        // toolgate drives them (on the call's stream), auditing each.
        let bridged = (relay && version != mcp::V2026_07_28).then(|| record.clone());
        if self.0.audit_submit(record).is_err() {
            tracing::error!("audit log unavailable: refusing to forward");
            return Outcome::reply(Reply::Rpc(
                StatusCode::OK,
                mcp::error_response(
                    Some(id),
                    code::AUDIT_UNAVAILABLE,
                    "the audit log cannot be written; nothing was forwarded",
                    Some(error_data("deny", &request_id, &rule)),
                ),
            ));
        }
        tracing::info!(upstream.name = %upstream.name, "forwarding");
        let mut call = call;
        let resuming = match call.request_state.take() {
            Some(s) if parkable && s.starts_with(rounds::PARK_PREFIX) => Some(s),
            other => {
                call.request_state = other;
                None
            }
        };
        let mut params = Map::new();
        params.insert("name".into(), Value::String(route.tool));
        params.insert("arguments".into(), call.arguments);
        if let Some(r) = call.input_responses {
            params.insert("inputResponses".into(), Value::Object(r));
        }
        if let Some(s) = call.request_state {
            params.insert("requestState".into(), Value::String(s));
        }
        let mut meta = call.meta.unwrap_or_default();
        // The envelope describes the agent's hop, not ours; but what the
        // agent can answer is what a 2026-07-28 upstream may ask of it in
        // input_required rounds: its own capabilities when it speaks
        // 2026-07-28 (the rounds pass through), or what toolgate can ask a
        // session-era agent on its stream (see rounds.rs).
        let capabilities = if version == mcp::V2026_07_28 {
            meta.remove(mcp::META_CAPABILITIES)
        } else if bridged.is_some() {
            Some(json!({"elicitation": {"form": {}}, "sampling": {}}))
        } else {
            None
        };
        meta.retain(|k, _| !k.starts_with("io.modelcontextprotocol/"));
        if let Some(c) = capabilities {
            meta.insert(mcp::META_CAPABILITIES.into(), c);
        }
        if !meta.is_empty() {
            params.insert("_meta".into(), Value::Object(meta));
        }
        let sent = std::time::Instant::now();
        let after = Settle {
            upstream: upstream.clone(),
            sent,
            id: id.clone(),
            version,
            agent,
            tool: call.name,
            request_id: request_id.clone(),
            rule,
            grant,
        };
        if parkable {
            let reply = rounds::Reply2026 {
                after,
                agent: who.agent.clone(),
                args_sha256,
                sse: relay,
                request_id,
            };
            if let Some(state) = resuming {
                let responses = match params.remove("inputResponses") {
                    Some(Value::Object(m)) => Some(m),
                    _ => None,
                };
                return Box::pin(self.resume(&state, responses, &upstream, reply)).await;
            }
            let (tx, notes) = tokio::sync::mpsc::channel::<Value>(64);
            let keep = tx.clone();
            let answer = Box::pin(async move {
                upstream
                    .request_relay(&who, "tools/call", Value::Object(params), Some(tx))
                    .await
            });
            return self
                .run_modern(
                    rounds::InFlight {
                        answer,
                        notes,
                        _keep: keep,
                    },
                    reply,
                )
                .await;
        }
        if !relay {
            let answer = upstream
                .request(&who, "tools/call", Value::Object(params))
                .await;
            return self.settle(answer, after);
        }
        // The client accepts an event stream: when the upstream reports
        // progress or logs before its result, answer with a stream that
        // relays them, then the result. A result that comes first is
        // answered as plain JSON, as without relaying.
        let (tx, mut notes) = tokio::sync::mpsc::channel::<Value>(64);
        // Closes the channel only once this task's waker is off it (see
        // `rounds::drain_quietly`).
        let _keep = tx.clone();
        let asker = Asker {
            upstream: upstream.clone(),
            agent: who.agent.clone(),
            modern: version == mcp::V2026_07_28,
        };
        let round_params = bridged.as_ref().map(|_| params.clone());
        let (up, for_rounds) = (upstream.clone(), who.clone());
        let mut answer = Box::pin(async move {
            upstream
                .request_relay(&who, "tools/call", Value::Object(params), Some(tx))
                .await
        });
        let (early, done) = tokio::select! {
            biased;
            a = &mut answer => {
                // Notifications may have come in the same read as the result.
                (rounds::drain_quietly(&mut notes), Some(a))
            }
            Some(n) = notes.recv() => (vec![n], None),
        };
        let bridge = bridged.zip(round_params);
        let done = match (early.is_empty(), done) {
            (true, Some(a)) if bridge.is_none() || !rounds::is_input_required(&a) => {
                return self.settle(a, after)
            }
            (_, d) => d,
        };
        let (body, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let me = self.clone();
        tokio::spawn(async move {
            for n in early {
                asker.pass(n, &body).await;
            }
            let a = match done {
                Some(a) => a,
                None => loop {
                    tokio::select! {
                        biased;
                        Some(n) = notes.recv() => asker.pass(n, &body).await,
                        a = &mut answer => break a,
                    }
                },
            };
            while let Ok(n) = notes.try_recv() {
                asker.pass(n, &body).await;
            }
            let a = match bridge {
                Some((rec, p)) if rounds::is_input_required(&a) => {
                    me.bridge_rounds(a, &up, &for_rounds, p, &body, rec).await
                }
                _ => a,
            };
            let outcome = me.settle(a, after);
            if let Some(mut r) = outcome.record {
                r.request_id = Some(request_id);
                me.0.audit(r);
            }
            if let Some(m) = outcome.reply.into_message() {
                let _ = body.send(sse_frame_bytes(&m)).await;
            }
        });
        Outcome::reply(Reply::Stream(held::ChannelBody { rx }.boxed()))
    }

    /// Turns an upstream's answer into the agent's reply (and, for a
    /// failure, its audit record), counting upstream metrics.
    fn settle(&self, answer: Result<Answer, crate::upstream::UpstreamError>, s: Settle) -> Outcome {
        let Settle {
            upstream,
            sent,
            id,
            version,
            agent,
            tool,
            request_id,
            rule,
            grant,
        } = s;
        let id = &id;
        // What toolgate does not understand is refused, from every transport.
        let answer = answer.and_then(|a| a.checked(&upstream.name));
        let (seconds, errors) = upstream.meters.get_or_init(|| {
            let labels = UpstreamLabels {
                upstream: upstream.name.clone(),
            };
            let m = &self.0.metrics;
            (
                m.upstream_seconds.get_or_create(&labels).clone(),
                m.upstream_errors.get_or_create(&labels).clone(),
            )
        });
        seconds.observe(sent.elapsed().as_secs_f64());
        if answer.is_err() {
            errors.inc();
        }
        if let (Ok(Answer::Result(r)), Some((hold, sha)), Some(agent)) = (&answer, &grant, &agent) {
            if r.get_str("resultType").as_deref() == Some("input_required") {
                let state = r.get_str("requestState");
                let state = state.as_deref();
                if !self.0.rounds.offer(agent, &tool, sha, state, hold) {
                    tracing::warn!(hold.id = %hold, "too many open rounds; the retry will be held again");
                }
            }
        }
        match answer {
            Ok(Answer::Result(r)) => Outcome::reply(result_reply(id, r, version)),
            Ok(Answer::Error(e)) => Outcome::reply(Reply::Rpc(
                StatusCode::OK,
                mcp::object([
                    ("jsonrpc", Value::from("2.0")),
                    ("id", id.to_value()),
                    ("error", e),
                ]),
            )),
            Err(e) => {
                tracing::warn!(upstream.name = %upstream.name, error = %e, "upstream failed");
                let mut d = error_data("allow", &request_id, &rule);
                d["upstream"] = Value::from(upstream.name.as_str());
                Outcome {
                    reply: Reply::Rpc(
                        StatusCode::OK,
                        mcp::error_response(
                            Some(id),
                            code::UPSTREAM,
                            &format!("upstream failed: {e}"),
                            Some(d),
                        ),
                    ),
                    session_id: None,
                    record: Some(Record {
                        event: "upstream_error",
                        agent,
                        tool: Some(tool),
                        decision: Some("error"),
                        reason: Some(e.to_string()),
                        detail: Some(json!({"upstream": upstream.name})),
                        ..Record::default()
                    }),
                }
            }
        }
    }
}

/// What [`Gate::settle`] needs to know about a forwarded call.
/// How a call travels: on whose behalf, in which revision the agent
/// speaks, and whether the agent's stream may relay what comes during it.
struct Via {
    who: Who,
    version: &'static str,
    relay: bool,
}

struct Settle {
    upstream: Arc<Upstream>,
    sent: Instant,
    id: Id,
    version: &'static str,
    agent: Option<Arc<str>>,
    tool: String,
    /// The error `data` of a failed call names these (built only then).
    request_id: String,
    rule: String,
    /// For a call forwarded under an approval: the hold and the arguments'
    /// hash, so an `input_required` answer leaves a continuation.
    grant: Option<(String, String)>,
}

/// One JSON-RPC message as an SSE event.
/// Passes what an upstream sent during a call to the agent's stream.
struct Asker {
    upstream: Arc<crate::upstream::Upstream>,
    agent: Arc<str>,
    /// A 2026-07-28 agent takes no server requests on a call's stream.
    modern: bool,
}

impl Asker {
    async fn pass(&self, n: Value, body: &tokio::sync::mpsc::Sender<Bytes>) {
        let ask = n.get("method").is_some() && n.get("id").is_some();
        if !ask {
            // A slow client loses notifications, never the result.
            let _ = body.try_send(sse_frame(&n));
            return;
        }
        if !self.modern {
            // A server request is never dropped: the call waits on it.
            let _ = body.send(sse_frame(&n)).await;
            return;
        }
        let id = n["id"].as_str().unwrap_or_default();
        let mut refusal = Map::new();
        refusal.insert(
            "error".into(),
            json!({"code": code::METHOD_NOT_FOUND, "message": "the agent speaks 2026-07-28 and takes no server requests during a call"}),
        );
        if let Err(e) = self.upstream.answer(&self.agent, id, &refusal).await {
            tracing::warn!(upstream.name = %self.upstream.name, error = %e, "cannot refuse the server's request");
        }
    }
}

/// Whether a one-message reply should be an event stream: the client
/// accepts only that, or ranks it above JSON (by q-value, then by order).
fn prefers_sse(accept: &str) -> bool {
    let rank = |ty: &str| {
        accept.split(',').enumerate().find_map(|(i, range)| {
            let mut parts = range.split(';');
            if !parts.next()?.trim().eq_ignore_ascii_case(ty) {
                return None;
            }
            let q = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .and_then(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            Some((q, i))
        })
    };
    match (rank("text/event-stream"), rank("application/json")) {
        (Some((qs, _)), _) if qs <= 0.0 => false,
        (Some(_), None) => true,
        (Some((qs, is)), Some((qj, ij))) => qj <= 0.0 || qs > qj || (qs >= qj && is < ij),
        (None, _) => false,
    }
}

fn sse_frame(v: &Value) -> Bytes {
    sse_frame_bytes(&serde_json::to_vec(v).unwrap_or_default())
}

/// One `message` event of a serialised JSON-RPC message.
fn sse_frame_bytes(message: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(message.len() + 24);
    framed.extend_from_slice(b"event: message\ndata: ");
    framed.extend_from_slice(message);
    framed.extend_from_slice(b"\n\n");
    Bytes::from(framed)
}

/// A JSON-RPC message as the agent asked for it: one event of a stream for
/// a client that accepts only `text/event-stream`, or plain JSON.
fn message_response(status: StatusCode, bytes: Vec<u8>, sse: bool) -> Response<Body> {
    if sse && status == StatusCode::OK {
        response(status, "text/event-stream", full(sse_frame_bytes(&bytes)))
    } else {
        response(status, "application/json", full(bytes))
    }
}

async fn futures_join(upstreams: &[Arc<Upstream>]) -> Vec<Option<Vec<Map<String, Value>>>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, u) in upstreams.iter().enumerate() {
        let u = u.clone();
        set.spawn(async move { (i, u.list_tools().await) });
    }
    let mut out = vec![None; upstreams.len()];
    while let Some(Ok((i, r))) = set.join_next().await {
        match r {
            Ok(list) => out[i] = Some(list),
            Err(e) => {
                tracing::warn!(upstream.name = %upstreams[i].name, error = %e, "cannot list tools")
            }
        }
    }
    out
}

fn refused(reply: Reply, reason: &str) -> Outcome {
    Outcome {
        reply,
        session_id: None,
        record: Some(Record {
            event: "rejected",
            decision: Some("deny"),
            reason: Some(reason.to_owned()),
            ..Record::default()
        }),
    }
}

/// Shapes a result for the agent's revision: 2026-07-28 results carry
/// `resultType` and toolgate's `serverInfo`; older revisions carry neither.
fn shape(mut result: RawResult, version: &str) -> RawResult {
    use serde_json::value::{to_raw_value, RawValue};
    use std::sync::LazyLock;
    /// `_meta` naming toolgate, as text: what a result without `_meta` gets.
    static SERVER_META: LazyLock<Box<RawValue>> = LazyLock::new(|| {
        let meta = mcp::object([(mcp::META_SERVER_INFO, mcp::toolgate_info())]);
        to_raw_value(&meta).unwrap_or_else(|_| RawValue::NULL.to_owned())
    });
    /// `"complete"`, as text: what a result without `resultType` gets.
    static COMPLETE: LazyLock<Box<RawValue>> =
        LazyLock::new(|| to_raw_value("complete").unwrap_or_else(|_| RawValue::NULL.to_owned()));
    if !matches!(result, RawResult::Object(_)) {
        return result;
    }
    let meta = match result.get("_meta") {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    };
    if version == mcp::V2026_07_28 {
        if !result.contains("resultType") {
            result.insert_text("resultType", COMPLETE.clone());
        }
        match meta {
            Some(mut m) => {
                m.insert(mcp::META_SERVER_INFO.into(), mcp::toolgate_info());
                result.insert("_meta", &Value::Object(m));
            }
            // A `_meta` that is no object is left as it is.
            None if result.contains("_meta") => {}
            None => result.insert_text("_meta", SERVER_META.clone()),
        }
    } else {
        if result.get_str("resultType").as_deref() == Some("complete") {
            result.remove("resultType");
        }
        if let Some(mut m) = meta {
            let ours = m.remove(mcp::META_SERVER_INFO).is_some();
            if m.is_empty() {
                result.remove("_meta");
            } else if ours {
                result.insert("_meta", &Value::Object(m));
            }
        }
    }
    result
}

/// The reply carrying `result` (shaped for `version`) to request `id`.
fn result_reply(id: &Id, result: RawResult, version: &str) -> Reply {
    Reply::Raw(
        StatusCode::OK,
        mcp::result_message(id, &shape(result, version)),
    )
}

/// The `data` of a refused or failed call's error.
fn error_data(decision: &str, request_id: &str, rule: &str) -> Value {
    json!({"decision": decision, "request_id": request_id, "rule": rule})
}

fn header_str(h: &HeaderMap, name: impl AsHeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// A response with `content_type` (none when empty). The type is static,
/// so its header value is not parsed and copied for every response.
fn response(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if !content_type.is_empty() {
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(content_type),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::prefers_sse;

    #[test]
    fn event_stream_is_chosen_only_when_the_client_ranks_it_first() {
        assert!(!prefers_sse(""));
        assert!(!prefers_sse("application/json"));
        assert!(!prefers_sse("application/json, text/event-stream"));
        assert!(prefers_sse("text/event-stream"));
        assert!(prefers_sse("text/event-stream, application/json"));
        assert!(prefers_sse("Text/Event-Stream ;q=1 , application/json"));
        assert!(prefers_sse("application/json;q=0.5, text/event-stream"));
        assert!(!prefers_sse("text/event-stream;q=0.4, application/json"));
        assert!(!prefers_sse("text/event-stream;q=0"));
        assert!(prefers_sse("application/json;q=0, text/event-stream"));
    }
}
