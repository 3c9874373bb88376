//! Calls that must wait for a human: admission to the hold store, waiting
//! for a decision (with keep-alives on an event stream), and what happens
//! after: forward exactly once, refuse, or answer "pending".

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::Frame;
use tokio::sync::mpsc;

use super::*;
use crate::hold::{Admission, Hold, NewHold, Polled};

/// SSE keep-alives while a call waits (SPEC: at least every 15 s).
pub const KEEPALIVE: Duration = Duration::from_secs(10);

/// A call the policy held, with what the gate knows about it.
pub(super) struct HeldCall {
    pub call: mcp::ToolCall,
    pub id: Id,
    pub version: &'static str,
    /// The call's audit record so far (rule, reason, args).
    pub record: Record,
    pub approvals: u32,
    pub upstream: Option<String>,
    pub route: Option<Route>,
    pub request_id: String,
    /// The client accepts an event stream: wait on it with keep-alives.
    pub stream: bool,
    /// On whose behalf it goes upstream once approved.
    pub who: crate::upstream::Who,
}

fn approvers(h: &Hold) -> String {
    h.approvals
        .iter()
        .map(|a| a.approver.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

impl Gate {
    pub(super) async fn held(&self, mut h: HeldCall) -> Outcome {
        let agent = h.record.agent.clone().unwrap_or_else(|| Arc::from(""));
        let new = NewHold {
            agent: agent.to_string(),
            tool: h.call.name.clone(),
            upstream: h.upstream.clone(),
            arguments: h.record.args.clone().unwrap_or(Value::Null),
            args_sha256: h.record.args_sha256.clone().unwrap_or_default(),
            reason: h.record.reason.clone().unwrap_or_default(),
            rule: h.record.rule.clone().unwrap_or_default(),
            approvals_needed: h.approvals,
        };
        let max = self.0.config.holds.max_pending_per_agent;
        let rule = h.record.rule.clone().unwrap_or_default();
        let request_id = h.request_id.clone();
        let base =
            |decision: &str| json!({"decision": decision, "request_id": request_id, "rule": rule});
        let answer = |id: &Id, code: i64, msg: &str, data: Value| {
            Reply::Rpc(
                StatusCode::OK,
                mcp::error_response(Some(id), code, msg, Some(data)),
            )
        };
        match self.0.holds.admit(new, max).await {
            Err(e) => {
                tracing::error!(error = %e, "hold store unavailable; refusing");
                h.record.decision = Some("deny");
                h.record.reason = Some(format!(
                    "needs approval, but the hold store is unavailable: {e}"
                ));
                Outcome {
                    reply: answer(&h.id, code::DENIED, "needs approval, but approvals are unavailable right now; nothing was forwarded", base("deny")),
                    session_id: None,
                    record: Some(h.record),
                }
            }
            Ok(Admission::TooMany) => {
                h.record.decision = Some("rate_limited");
                h.record.rule = Some("holds.max_pending_per_agent".into());
                h.record.reason = Some(format!("more than {max} pending holds for this agent"));
                let mut d = base("rate_limited");
                d["rule"] = Value::from("holds.max_pending_per_agent");
                d["retry_after_ms"] = Value::from(60_000);
                Outcome {
                    reply: answer(
                        &h.id,
                        code::RATE_LIMITED,
                        "too many calls are waiting for approval",
                        d,
                    ),
                    session_id: None,
                    record: Some(h.record),
                }
            }
            Ok(Admission::Denied(hold)) => self.refused_hold(h, &hold),
            Ok(Admission::Granted { hold, .. }) => self.granted(h, &hold).await,
            Ok(Admission::Created(hold)) => self.pending(h, hold, true).await,
            Ok(Admission::Joined(hold)) => self.pending(h, hold, false).await,
        }
    }

    /// Records the held call, notifies approvers of a new hold, and waits.
    async fn pending(&self, h: HeldCall, hold: Hold, created: bool) -> Outcome {
        let mut rec = h.record.clone();
        rec.event = if created { "hold_created" } else { "call" };
        rec.decision = Some("hold");
        rec.hold_id = Some(hold.id.clone());
        rec.request_id = Some(h.request_id.clone());
        self.0.audit(rec);
        if created {
            if let Some(n) = &self.0.notifier {
                n.send(self.hold_notice(&hold));
            }
        }
        tracing::info!(hold.id = %hold.id, created, "held; waiting for a decision");
        if h.stream {
            let (tx, rx) = mpsc::channel(8);
            let me = self.clone();
            tokio::spawn(async move { me.wait_streaming(h, hold, tx).await });
            Outcome::reply(Reply::Stream(ChannelBody { rx }.boxed()))
        } else {
            let polled = self.wait(&hold.id, None).await;
            self.after_wait(h, hold, polled).await
        }
    }

    fn hold_notice(&self, hold: &Hold) -> Value {
        let base = self
            .0
            .config
            .admin
            .as_ref()
            .map(|a| format!("http://{}", a.listen));
        json!({
            "event": "hold_created",
            "hold": hold,
            "links": base.map(|b| json!({
                "page": format!("{b}/"),
                "show": format!("{b}/v1/holds/{}", hold.id),
                "approve": format!("{b}/v1/holds/{}/approve", hold.id),
                "deny": format!("{b}/v1/holds/{}/deny", hold.id),
            })),
        })
    }

    /// Waits up to `holds.wait` for hold `id` to be decided. `tick` is
    /// called at every keep-alive interval.
    async fn wait(&self, id: &str, mut tick: Option<&mut (dyn FnMut() -> bool + Send)>) -> Polled {
        let mut changed = self.0.holds.subscribe();
        let deadline = tokio::time::Instant::now() + self.0.config.holds.wait;
        let mut keepalive =
            tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        loop {
            match self.0.holds.poll(id).await {
                Ok(Polled::Pending) => {}
                Ok(other) => return other,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read hold state");
                    return Polled::Pending;
                }
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return Polled::Pending },
                _ = tokio::time::sleep_until(deadline) => return Polled::Pending,
                _ = keepalive.tick() => {
                    if let Some(t) = tick.as_mut() {
                        if !t() {
                            // The client went away; the hold stays pending.
                            return Polled::Pending;
                        }
                    }
                }
            }
        }
    }

    async fn after_wait(&self, h: HeldCall, hold: Hold, polled: Polled) -> Outcome {
        match polled {
            Polled::Pending => {
                let mut d = json!({"decision": "hold", "request_id": h.request_id, "rule": h.record.rule.clone().unwrap_or_default()});
                d["hold_id"] = Value::from(hold.id.as_str());
                d["expires_at"] = Value::from(hold.expires_at.as_str());
                d["reason"] = Value::from(hold.reason.as_str());
                Outcome::reply(Reply::Rpc(
                    StatusCode::OK,
                    mcp::error_response(
                        Some(&h.id),
                        code::HOLD_PENDING,
                        "held for human approval; retry the identical call after a decision",
                        Some(d),
                    ),
                ))
            }
            Polled::Granted { hold, .. } => self.granted(h, &hold).await,
            Polled::Refused(hold) => {
                let mut o = self.refused_hold(h, &hold);
                // Decided by an approver or the expiry task, recorded there.
                o.record = None;
                o
            }
            Polled::UsedByAnother(hold) => {
                let why = "the single-use approval was used by an identical call; this call needs a new approval";
                let mut d = json!({"decision": "deny", "request_id": h.request_id, "rule": h.record.rule.clone().unwrap_or_default()});
                d["hold_id"] = Value::from(hold.id.as_str());
                // A decision like any other: audited.
                let mut record = h.record;
                record.decision = Some("deny");
                record.reason = Some(why.into());
                record.hold_id = Some(hold.id.clone());
                Outcome {
                    reply: Reply::Rpc(
                        StatusCode::OK,
                        mcp::error_response(Some(&h.id), code::HOLD_REFUSED, why, Some(d)),
                    ),
                    session_id: None,
                    record: Some(record),
                }
            }
        }
    }

    fn refused_hold(&self, mut h: HeldCall, hold: &Hold) -> Outcome {
        let status = hold.status.as_str();
        h.record.decision = Some(if status == "expired" {
            "expired"
        } else {
            "denied"
        });
        h.record.hold_id = Some(hold.id.clone());
        let why = hold
            .deny_reason
            .clone()
            .unwrap_or_else(|| status.to_owned());
        let mut d = json!({"decision": "deny", "request_id": h.request_id, "rule": h.record.rule.clone().unwrap_or_default()});
        d["hold_id"] = Value::from(hold.id.as_str());
        d["status"] = Value::from(status);
        d["expires_at"] = Value::from(hold.expires_at.as_str());
        Outcome {
            reply: Reply::Rpc(
                StatusCode::OK,
                mcp::error_response(
                    Some(&h.id),
                    code::HOLD_REFUSED,
                    &format!("the hold was {status}: {why}"),
                    Some(d),
                ),
            ),
            session_id: None,
            record: Some(h.record),
        }
    }

    /// An approval covers this call: audit the grant's use, then forward.
    async fn granted(&self, mut h: HeldCall, hold: &Hold) -> Outcome {
        h.record.event = "grant_used";
        h.record.decision = Some("approved");
        h.record.hold_id = Some(hold.id.clone());
        h.record.approver = Some(approvers(hold));
        let Some(route) = h.route.take() else {
            let msg = format!("unknown tool {:?}: no upstream exposes it", h.call.name);
            h.record.decision = Some("deny");
            h.record.reason = Some(msg.clone());
            let d = json!({"decision": "deny", "request_id": h.request_id, "rule": "catalog", "hold_id": hold.id});
            return Outcome {
                reply: Reply::Rpc(
                    StatusCode::OK,
                    mcp::error_response(Some(&h.id), code::INVALID_PARAMS, &msg, Some(d)),
                ),
                session_id: None,
                record: Some(h.record),
            };
        };
        tracing::info!(hold.id = %hold.id, "approved; forwarding");
        // Not relayed: a held call may already be answering in a stream.
        h.record.request_id = Some(h.request_id.clone());
        let via = Via {
            who: h.who,
            version: h.version,
            relay: false,
        };
        self.forward(route, h.call, &h.id, h.record, via).await
    }

    /// The streaming variant of waiting: keep-alives (and progress
    /// notifications when the client asked for progress), then the answer.
    async fn wait_streaming(self, h: HeldCall, hold: Hold, tx: mpsc::Sender<Bytes>) {
        let token = h
            .call
            .meta
            .as_ref()
            .and_then(|m| m.get("progressToken"))
            .cloned();
        let mut n = 0u64;
        let hold_id = hold.id.clone();
        let tx2 = tx.clone();
        let mut tick = move || {
            n += 1;
            let mut chunk = b": keepalive\n\n".to_vec();
            if let Some(t) = &token {
                let note = json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {
                    "progressToken": t, "progress": n,
                    "message": format!("waiting for approval (hold {hold_id})"),
                }});
                chunk.extend_from_slice(format!("event: message\ndata: {note}\n\n").as_bytes());
            }
            // A full or closed channel means the client is gone or stuck.
            tx2.try_send(Bytes::from(chunk)).is_ok() || !tx2.is_closed()
        };
        let polled = self.wait(&hold.id, Some(&mut tick)).await;
        let ctx_record_id = h.request_id.clone();
        let outcome = self.after_wait(h, hold, polled).await;
        if let Some(mut r) = outcome.record {
            r.request_id.get_or_insert(ctx_record_id);
            self.0.audit(r);
        }
        let body = outcome.reply.into_message().unwrap_or_default();
        let _ = tx.send(sse_frame_bytes(&body)).await;
    }
}

/// A response body fed by a channel (the held call's event stream).
pub(super) struct ChannelBody {
    pub(super) rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}
