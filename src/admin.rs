//! The management plane: the approvers' and operators' API on
//! `admin.listen`, a listener of its own.
//!
//! Invariants:
//! - every endpoint but `/healthz` and `/readyz` needs an approver token
//!   (`auth.approvers`: its own issuer/audience/keys), so an agent token is
//!   refused here (401) and nothing on the data plane reaches this API;
//! - `viewer` may read, `approver` may also decide; with `require_amr`, a
//!   decision needs a token whose `amr` shows one of the listed methods;
//! - nobody decides a hold of their own identity; deciding a hold that is
//!   not pending is a conflict (409);
//! - every authentication failure, every refusal (403) and every decision
//!   is audited; a partial approval (1 of 2) is audited as still `hold`.
//!
//! The API takes credentials only from the `Authorization` header (never
//! cookies), so a browser cannot be tricked into a cross-site decision.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::{json, Value};

use crate::audit::Record;
use crate::config::parse_duration;
use crate::gate::{full, Body, Gate};
use crate::hold::{DecideError, Status};
use crate::identity::{self, Approver};

/// Largest management request body.
pub const MAX_BODY: usize = 16 * 1024;
/// Longest approval window.
pub const MAX_WINDOW: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The approver page: static, embedded, no external assets (works offline).
const PAGE_HTML: &str = include_str!("admin/page.html");
const PAGE_JS: &str = include_str!("admin/page.js");
const PAGE_CSS: &str = include_str!("admin/page.css");

/// Serves a page asset. The CSP allows only this origin's own script and
/// style (no inline code, no eval), no framing, and no form posts, so
/// attacker-controlled strings shown on the page cannot run.
fn asset(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(serde_json::to_vec(v).unwrap_or_default())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn error(status: StatusCode, msg: &str) -> Response<Body> {
    json_response(status, &json!({"error": msg}))
}

/// Handles one management-plane request.
pub async fn handle<B>(gate: &Gate, req: Request<B>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path().to_owned();
    if let Err(why) = gate.0.admin_hosts.check(req.headers()) {
        gate.0.audit(Record {
            event: "rejected",
            decision: Some("deny"),
            reason: Some(why.clone()),
            detail: Some(json!({"plane": "admin", "path": path})),
            ..Record::default()
        });
        return error(StatusCode::FORBIDDEN, &why);
    }
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => {
            return json_response(StatusCode::OK, &json!({"status": "alive"}))
        }
        (&Method::GET, "/readyz") => return readyz(gate).await,
        (&Method::GET, "/") => return asset(PAGE_HTML, "text/html; charset=utf-8"),
        (&Method::GET, "/app.js") => return asset(PAGE_JS, "text/javascript; charset=utf-8"),
        (&Method::GET, "/app.css") => return asset(PAGE_CSS, "text/css; charset=utf-8"),
        (&Method::GET, "/metrics")
            if gate
                .0
                .config
                .admin
                .as_ref()
                .is_some_and(|a| a.metrics_public) =>
        {
            return metrics(gate).await
        }
        _ => {}
    }
    let approver = match authenticate(gate, req.headers()) {
        Ok(a) => a,
        Err(e) => {
            gate.0.audit(Record {
                event: "admin_auth_failed",
                decision: Some("deny"),
                reason: Some(e.clone()),
                detail: Some(json!({"path": path, "method": req.method().as_str()})),
                ..Record::default()
            });
            let mut r = error(StatusCode::UNAUTHORIZED, &e);
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"toolgate-admin\""),
            );
            return r;
        }
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let refused = Refused {
        gate,
        approver: &approver,
        method: req.method().clone(),
        path: &path,
        hold_id: match segments.as_slice() {
            ["v1", "holds", id, ..] => Some(id),
            _ => None,
        },
    };
    let can_read = approver.has_role("approver") || approver.has_role("viewer");
    if !can_read {
        return refused.forbidden(
            "admin.role",
            "this token has neither the viewer nor the approver role",
        );
    }
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["metrics"]) => metrics(gate).await,
        (Method::GET, ["v1", "agents"]) => agents(gate),
        (Method::GET, ["v1", "audit"]) => audit(gate, req.uri().query()).await,
        (Method::POST, ["v1", "reload"]) => {
            if !approver.has_role("approver") {
                return refused.forbidden("admin.role", "reloading needs the approver role");
            }
            match gate.reload(&format!("api:{}", approver.subject)).await {
                Ok(report) => json_response(StatusCode::OK, &json!(report)),
                Err(problems) => json_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &json!({"error": "the manifests are invalid; the last good set stays in force",
                            "problems": problems.0.iter().map(|p| p.to_string()).collect::<Vec<_>>()}),
                ),
            }
        }
        (Method::GET, ["v1", "holds"]) => list_holds(gate, req.uri().query()).await,
        (Method::GET, ["v1", "holds", id]) => match gate.0.holds.get(id).await {
            Ok(Some(h)) => json_response(StatusCode::OK, &json!(h)),
            Ok(None) => error(StatusCode::NOT_FOUND, "no such hold"),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        },
        (Method::POST, ["v1", "holds", id, action @ ("approve" | "deny")]) => {
            let id = (*id).to_owned();
            let approve = *action == "approve";
            decide(gate, &refused, &id, approve, req).await
        }
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

/// The longest path or hold id an audit record of a refusal keeps.
const MAX_AUDITED: usize = 256;

/// An authenticated management request, for refusing it.
struct Refused<'a> {
    gate: &'a Gate,
    approver: &'a Approver,
    method: Method,
    path: &'a str,
    hold_id: Option<&'a str>,
}

impl Refused<'_> {
    /// Answers 403 and records it as an authentication failure is: one
    /// audit record (who, what, why) through the same bounded queue, and an
    /// `admin_forbidden` alert. What the caller controls is cut to
    /// [`MAX_AUDITED`] characters.
    fn forbidden(&self, rule: &str, why: &str) -> Response<Body> {
        let cut = |s: &str| s.chars().take(MAX_AUDITED).collect::<String>();
        let (path, hold_id) = (cut(self.path), self.hold_id.map(cut));
        let detail = json!({"path": path, "method": self.method.as_str(), "status": 403});
        self.gate.0.audit(Record {
            event: "admin_forbidden",
            decision: Some("deny"),
            rule: Some(rule.to_owned()),
            reason: Some(why.to_owned()),
            hold_id: hold_id.clone(),
            approver: Some(self.approver.subject.clone()),
            detail: Some(detail.clone()),
            ..Record::default()
        });
        self.gate.0.raise(&crate::alert::Alert {
            kind: "admin_forbidden",
            agent: None,
            message: format!(
                "management plane refused {} {path} to {:?}: {why}",
                self.method, self.approver.subject
            ),
            detail: json!({"approver": self.approver.subject, "hold_id": hold_id, "rule": rule, "request": detail}),
        });
        error(StatusCode::FORBIDDEN, why)
    }
}

fn authenticate(gate: &Gate, headers: &http::HeaderMap) -> Result<Approver, String> {
    let Some(verifier) = &gate.0.approvers else {
        return Err("the management plane has no approver keys configured".into());
    };
    let cfg = gate
        .0
        .config
        .approvers
        .as_ref()
        .ok_or("no auth.approvers")?;
    let token = identity::bearer(headers).map_err(|e| e.to_string())?;
    let claims = verifier.verify(token).map_err(|e| e.to_string())?;
    identity::approver_from_claims(&claims, &cfg.subject_claim, &cfg.roles_claim)
        .map_err(|e| e.to_string())
}

async fn readyz(gate: &Gate) -> Response<Body> {
    let audit = gate.0.auditor.healthy();
    let state = gate.0.holds.pending_count().await.is_ok();
    let catalog = gate.0.catalog.load();
    let degraded: Vec<&str> = catalog
        .unreachable
        .iter()
        .map(|(i, _)| gate.0.upstreams[*i].name.as_str())
        .collect();
    let ready = audit && state;
    json_response(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &json!({
            "status": if ready { "ready" } else { "not ready" },
            "config": "loaded",
            "generation": gate.0.snapshot.load().generation,
            "audit": if audit { "writable" } else { "unwritable" },
            "state": if state { "open" } else { "unavailable" },
            "upstreams_degraded": degraded,
        }),
    )
}

async fn metrics(gate: &Gate) -> Response<Body> {
    let m = &gate.0.metrics;
    if let Ok(n) = gate.0.holds.pending_count().await {
        m.holds_pending.set(n as i64);
    }
    m.audit_queue.set(gate.0.auditor.queue_depth() as i64);
    let errors = gate.0.auditor.write_errors();
    let seen = m.audit_write_errors.get();
    if errors > seen {
        m.audit_write_errors.inc_by(errors - seen);
    }
    let dropped = gate.0.auditor.dropped();
    let seen = m.audit_dropped.get();
    if dropped > seen {
        m.audit_dropped.inc_by(dropped - seen);
    }
    m.generation.set(gate.0.snapshot.load().generation as i64);
    let mut r = Response::new(full(Bytes::from(m.encode())));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

fn agents(gate: &Gate) -> Response<Body> {
    let snap = gate.0.snapshot.load();
    let mut list: Vec<Value> = snap
        .policy
        .manifests()
        .map(|m| {
            json!({
                "agent": m.agent,
                "file": m.file_name(),
                "sha256": m.sha256,
                "description": m.description,
                "unlisted": if m.unlisted == crate::manifest::Unlisted::Hold { "hold" } else { "deny" },
                "tools": m.tools.iter().map(|t| json!({
                    "name": t.pattern,
                    "schema": t.schema.is_some(),
                    "approval": if t.approval_required { "required" } else { "none" },
                    "approvals": t.approvals,
                    "hold_when": t.hold_when.len(),
                })).collect::<Vec<_>>(),
                "deny": m.deny.iter().map(|d| d.pattern.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    list.sort_by(|a, b| a["agent"].as_str().cmp(&b["agent"].as_str()));
    json_response(
        StatusCode::OK,
        &json!({"generation": snap.generation, "agents": list}),
    )
}

/// Reads recent audit records, newest first, filtered.
async fn audit(gate: &Gate, query: Option<&str>) -> Response<Body> {
    let agent = query_param(query, "agent").map(percent_decode);
    let decision = query_param(query, "decision").map(percent_decode);
    let event = query_param(query, "event").map(percent_decode);
    let limit = query_param(query, "limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100usize)
        .clamp(1, 1000);
    gate.0.auditor.flush().await;
    let path = gate.0.auditor.path().to_path_buf();
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<Value>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&path)?;
        let len = f.metadata()?.len();
        // The most recent 8 MiB is plenty for an operator's view.
        let from = len.saturating_sub(8 << 20);
        f.seek(SeekFrom::Start(from))?;
        let mut buf = Vec::new();
        f.take(8 << 20).read_to_end(&mut buf)?;
        let mut out = Vec::new();
        for line in buf.split(|b| *b == b'\n').rev() {
            let Ok(v) = serde_json::from_slice::<Value>(line) else {
                continue;
            };
            let keep = agent.as_deref().is_none_or(|a| v["agent"] == a)
                && decision.as_deref().is_none_or(|d| v["decision"] == d)
                && event.as_deref().is_none_or(|e| v["event"] == e);
            if keep {
                out.push(v);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    })
    .await;
    match read {
        Ok(Ok(records)) => json_response(StatusCode::OK, &json!({"records": records})),
        Ok(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cannot read the audit log: {e}"),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 2 < b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (hex, b[i]) {
            (Some(v), _) => {
                out.push(v);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, c) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

async fn list_holds(gate: &Gate, query: Option<&str>) -> Response<Body> {
    let status = match query_param(query, "status") {
        None | Some("") | Some("all") => None,
        Some(s) => match Status::parse(s) {
            Some(s) => Some(s),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "status must be pending, approved, denied or expired",
                )
            }
        },
    };
    let limit = query_param(query, "limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100u32)
        .clamp(1, 1000);
    match gate.0.holds.list(status, limit).await {
        Ok(holds) => json_response(StatusCode::OK, &json!({"holds": holds})),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default, rename = "for")]
    window: Option<String>,
}

async fn decide<B>(
    gate: &Gate,
    refused: &Refused<'_>,
    id: &str,
    approve: bool,
    req: Request<B>,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let approver = refused.approver;
    if !approver.has_role("approver") {
        return refused.forbidden("admin.role", "deciding holds needs the approver role");
    }
    let cfg = gate.0.config.approvers.as_ref();
    if let Some(required) = cfg.map(|c| &c.require_amr).filter(|r| !r.is_empty()) {
        if !approver.amr.iter().any(|m| required.contains(m)) {
            return refused.forbidden(
                "admin.require_amr",
                &format!("deciding holds needs a token whose amr shows one of {required:?} (sign in with MFA)"),
            );
        }
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
    };
    let parsed: DecisionBody = if body.iter().all(u8::is_ascii_whitespace) {
        DecisionBody::default()
    } else {
        match crate::mcp::parse_strict(&body).and_then(|v| {
            serde_json::from_value(v).map_err(|e| crate::mcp::ParseError::Envelope(e.to_string()))
        }) {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid body: {e}")),
        }
    };
    let reason = parsed
        .reason
        .filter(|r| !r.trim().is_empty())
        .map(|r| r.chars().take(1000).collect::<String>());
    let window = match parsed.window.as_deref() {
        None | Some("") => None,
        Some(w) if approve => match parse_duration(w) {
            Ok(d) if d > std::time::Duration::ZERO && d <= MAX_WINDOW => Some(d),
            Ok(_) => return error(StatusCode::BAD_REQUEST, "for must be between 1s and 7d"),
            Err(e) => return error(StatusCode::BAD_REQUEST, &e),
        },
        Some(_) => return error(StatusCode::BAD_REQUEST, "for applies to approvals only"),
    };
    let result = if approve {
        gate.0
            .holds
            .approve(id, &approver.subject, reason.clone(), window)
            .await
    } else {
        gate.0
            .holds
            .deny(id, &approver.subject, reason.clone())
            .await
    };
    match result {
        Ok(hold) => {
            // Only the approval that approves the hold records `approved`;
            // one short of `approvals_needed` leaves it held.
            let decision = match (approve, hold.status) {
                (false, _) => "denied",
                (true, Status::Pending) => "hold",
                (true, _) => "approved",
            };
            gate.0.audit(Record {
                event: if approve {
                    "hold_approved"
                } else {
                    "hold_denied"
                },
                agent: Some(Arc::from(hold.agent.as_str())),
                tool: Some(hold.tool.clone()),
                decision: Some(decision),
                rule: Some(hold.rule.clone()),
                reason,
                args_sha256: Some(hold.args_sha256.clone()),
                hold_id: Some(hold.id.clone()),
                approver: Some(approver.subject.clone()),
                detail: Some(json!({
                    "status": hold.status.as_str(),
                    "approvals": hold.approvals.len(),
                    "approvals_needed": hold.approvals_needed,
                    // The window in force (the most restrictive approval's),
                    // and the one this approver asked for.
                    "for": hold.grant_for,
                    "grant_until": hold.grant_until,
                    "requested_for": parsed.window,
                })),
                ..Record::default()
            });
            tracing::info!(hold.id = %hold.id, approver = %approver.subject, approve, status = hold.status.as_str(), "hold decision");
            if hold.status != Status::Pending {
                let secs = (crate::hold::now_ms() - hold.created_ms).max(0) as f64 / 1000.0;
                gate.0.metrics.hold_decision_seconds.observe(secs);
            }
            json_response(StatusCode::OK, &json!(hold))
        }
        Err(DecideError::SelfApproval) => {
            refused.forbidden("hold.self_approval", &DecideError::SelfApproval.to_string())
        }
        Err(e) => {
            let status = match e {
                DecideError::NotFound => StatusCode::NOT_FOUND,
                DecideError::NotPending(_) | DecideError::AlreadyApproved => StatusCode::CONFLICT,
                DecideError::SelfApproval => StatusCode::FORBIDDEN,
                DecideError::State(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            error(status, &e.to_string())
        }
    }
}
