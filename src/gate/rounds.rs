//! Rounds of 2026-07-28 multi-round-trip calls: continuations of approved
//! calls ([`Rounds`]), and the rounds toolgate drives itself for agents
//! that speak a session-era revision ([`Asked`], `Gate::bridge_rounds`).
//!
//! Approved calls.
//! An upstream may answer a tools/call with `resultType: "input_required"`:
//! it needs the agent's answers (an elicitation, a sample) and expects the
//! identical call again, carrying `inputResponses` and its `requestState`.
//! When the first round was an approved hold, the retry is the same call the
//! human approved, not a new one, so it must not be held again; but it must
//! not turn the single-use approval into standing access either. So each
//! approved round that ends in `input_required` leaves one continuation:
//! bound to the agent, the tool and the arguments' hash, and to the
//! upstream's `requestState` when it sent one; used once; gone after
//! [`TTL`]. A round that completes leaves none, so at most one approved
//! execution completes per approval. Continuations live in memory: after a
//! restart the retry is held again, which fails closed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use super::{held, sse_frame, sse_frame_bytes, Gate, Outcome, Settle};
use crate::audit::Record;
use crate::mcp::code;
use crate::upstream::{Answer, RawResult, Upstream, UpstreamError, Who};
use http_body_util::BodyExt;

/// How long an agent has to answer an approved call's `input_required`.
pub const TTL: Duration = Duration::from_secs(600);

/// Continuations kept at once, across all agents.
pub const MAX: usize = 4096;

type Key = (Arc<str>, String, String);

struct Entry {
    hold_id: String,
    request_state: Option<String>,
    expires: Instant,
}

/// The continuations of approved calls.
#[derive(Default)]
pub struct Rounds {
    map: DashMap<Key, Entry>,
}

impl Rounds {
    /// Records that the approved call `(agent, tool, args_sha256)` of hold
    /// `hold_id` answered `input_required`. Returns false when full (the
    /// retry will then be held again).
    pub fn offer(
        &self,
        agent: &Arc<str>,
        tool: &str,
        args_sha256: &str,
        request_state: Option<&str>,
        hold_id: &str,
    ) -> bool {
        let now = Instant::now();
        if self.map.len() >= MAX {
            self.map.retain(|_, e| e.expires > now);
            if self.map.len() >= MAX {
                return false;
            }
        }
        self.map.insert(
            (agent.clone(), tool.to_owned(), args_sha256.to_owned()),
            Entry {
                hold_id: hold_id.to_owned(),
                request_state: request_state.map(str::to_owned),
                expires: now + TTL,
            },
        );
        true
    }

    /// Takes the continuation a retry of `(agent, tool, args_sha256)` with
    /// `request_state` presents, if there is one; returns its hold id.
    pub fn take(
        &self,
        agent: &Arc<str>,
        tool: &str,
        args_sha256: &str,
        request_state: Option<&str>,
    ) -> Option<String> {
        let key = (agent.clone(), tool.to_owned(), args_sha256.to_owned());
        let now = Instant::now();
        self.map
            .remove_if(&key, |_, e| {
                e.expires > now
                    && (e.request_state.is_none() || e.request_state.as_deref() == request_state)
            })
            .map(|(_, e)| e.hold_id)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_continuation_is_bound_to_agent_call_and_state_and_used_once() {
        let r = Rounds::default();
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        assert!(r.offer(&a, "t", "h1", Some("s1"), "hold-1"));
        assert_eq!(r.take(&b, "t", "h1", Some("s1")), None, "another agent");
        assert_eq!(r.take(&a, "t", "h2", Some("s1")), None, "other arguments");
        assert_eq!(r.take(&a, "u", "h1", Some("s1")), None, "another tool");
        assert_eq!(r.take(&a, "t", "h1", Some("forged")), None, "another state");
        assert_eq!(r.take(&a, "t", "h1", None), None, "no state");
        assert_eq!(r.take(&a, "t", "h1", Some("s1")).as_deref(), Some("hold-1"));
        assert_eq!(r.take(&a, "t", "h1", Some("s1")), None, "used once");
        // Without a requestState from the upstream, any retry of the call.
        assert!(r.offer(&a, "t", "h1", None, "hold-2"));
        assert_eq!(r.take(&a, "t", "h1", Some("x")).as_deref(), Some("hold-2"));
        assert!(r.is_empty());
    }

    #[test]
    fn the_map_is_bounded() {
        let r = Rounds::default();
        let a: Arc<str> = Arc::from("a");
        for i in 0..MAX {
            assert!(r.offer(&a, "t", &i.to_string(), None, "h"));
        }
        assert!(!r.offer(&a, "t", "one more", None, "h"), "full: refused");
        assert_eq!(r.len(), MAX);
    }
}

/// Questions toolgate asks a session-era agent on behalf of a 2026-07-28
/// upstream: the `inputRequests` of an `input_required` result, sent on the
/// call's event stream as server requests under toolgate's own ids, bound
/// to the agent and answered once. The answers go back to the upstream as
/// the retry's `inputResponses`.
/// Who was asked, and where their answer goes.
type Question = (Arc<str>, oneshot::Sender<Map<String, Value>>);

#[derive(Default)]
pub struct Asked {
    map: std::sync::Mutex<HashMap<String, Question>>,
    next: AtomicU64,
}

/// Questions waiting for agents' answers at once.
pub const MAX_ASKED: usize = 256;

/// Ids of toolgate's own questions start with this.
pub const ASK_PREFIX: &str = "toolgate-input:";

impl Asked {
    /// A new question for `agent`: its id and where the answer arrives.
    /// `None` when too many questions wait.
    pub fn ask(&self, agent: &Arc<str>) -> Option<(String, oneshot::Receiver<Map<String, Value>>)> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_ASKED {
            map.retain(|_, (_, tx)| !tx.is_closed());
            if map.len() >= MAX_ASKED {
                return None;
            }
        }
        let id = format!("{ASK_PREFIX}{}", self.next.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        map.insert(id.clone(), (agent.clone(), tx));
        Some((id, rx))
    }

    /// Delivers `agent`'s answer to question `id`; false when `id` was not
    /// asked of this agent (or is answered already).
    pub fn answer(&self, agent: &str, id: &str, reply: Map<String, Value>) -> bool {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(id) {
            Some((a, _)) if &**a == agent => {
                map.remove(id).is_some_and(|(_, tx)| tx.send(reply).is_ok())
            }
            _ => false,
        }
    }

    /// Forgets question `id` (its call ended without an answer).
    pub fn forget(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }
}

#[cfg(test)]
mod asked_tests {
    use super::*;

    #[test]
    fn a_question_is_answered_once_and_only_by_the_agent_asked() {
        let q = Asked::default();
        let a: Arc<str> = Arc::from("a");
        let (id, mut rx) = q.ask(&a).unwrap();
        assert!(id.starts_with(ASK_PREFIX));
        let reply = Map::from_iter([("result".to_owned(), Value::from("yes"))]);
        assert!(!q.answer("b", &id, reply.clone()), "another agent");
        assert!(q.answer("a", &id, reply.clone()));
        assert!(!q.answer("a", &id, reply), "answered once");
        assert_eq!(rx.try_recv().unwrap()["result"], "yes");
    }

    #[test]
    fn waiting_questions_are_bounded() {
        let q = Asked::default();
        let a: Arc<str> = Arc::from("a");
        let mut keep = Vec::new();
        for _ in 0..MAX_ASKED {
            keep.push(q.ask(&a).unwrap());
        }
        assert!(q.ask(&a).is_none());
        // A question whose call gave up makes room.
        drop(keep.pop());
        assert!(q.ask(&a).is_some());
    }
}

/// Rounds toolgate drives for a session-era agent before giving up.
pub const MAX_ROUNDS: u32 = 8;

/// How long an agent has to answer one of toolgate's questions.
const ANSWER_WAIT: Duration = Duration::from_secs(300);

/// Whether an upstream result is a 2026-07-28 `input_required` round.
pub fn is_input_required(a: &Result<Answer, UpstreamError>) -> bool {
    matches!(a, Ok(Answer::Result(r)) if r.get_str("resultType").as_deref() == Some("input_required"))
}

fn failed(code: i64, message: String) -> Result<Answer, UpstreamError> {
    Ok(Answer::Error(
        serde_json::json!({"code": code, "message": message}),
    ))
}

impl Gate {
    /// Drives a 2026-07-28 upstream's `input_required` rounds for a
    /// session-era agent, which cannot read them: each input request is
    /// asked on the call's event stream `body` as a server request, and the
    /// answers go back to the upstream in the retry, until the upstream
    /// completes (or [`MAX_ROUNDS`]). Each round forwarded is audited.
    pub(super) async fn bridge_rounds(
        &self,
        mut answer: Result<Answer, UpstreamError>,
        upstream: &Arc<Upstream>,
        who: &Who,
        params: Map<String, Value>,
        body: &mpsc::Sender<Bytes>,
        audit: Record,
    ) -> Result<Answer, UpstreamError> {
        for round in 1..=MAX_ROUNDS {
            let Ok(Answer::Result(r)) = &answer else {
                return answer;
            };
            if !is_input_required(&answer) {
                return answer;
            }
            let r = r.value();
            let mut responses = Map::new();
            if let Some(requests) = r.get("inputRequests").and_then(Value::as_object) {
                for (key, req) in requests {
                    let method = req.get("method").and_then(Value::as_str).unwrap_or("");
                    let result = match method {
                        "roots/list" => serde_json::json!({"roots": []}),
                        m if crate::upstream::asks::RELAYED.contains(&m) => {
                            match self.ask_agent(&who.agent, m, req.get("params"), body).await {
                                Ok(v) => v,
                                Err(e) => return Ok(Answer::Error(e)),
                            }
                        }
                        other => {
                            return failed(
                                code::METHOD_NOT_FOUND,
                                format!(
                                    "the tool asked for {other:?}, which toolgate does not relay"
                                ),
                            )
                        }
                    };
                    responses.insert(key.clone(), result);
                }
            } else {
                // Only state: the upstream asks to be polled.
                tokio::time::sleep(Duration::from_millis(100 * u64::from(round))).await;
            }
            let mut p = params.clone();
            if !responses.is_empty() {
                p.insert("inputResponses".into(), Value::Object(responses));
            }
            if let Some(s) = r.get("requestState") {
                p.insert("requestState".into(), s.clone());
            }
            let mut rec = audit.clone();
            rec.event = "input_round";
            rec.decision = Some("allow");
            rec.reason = Some(format!(
                "round {} of the call: the agent's answers to the tool's input requests",
                round + 1
            ));
            if self.0.audit_submit(rec).is_err() {
                return failed(
                    code::AUDIT_UNAVAILABLE,
                    "the audit log cannot be written; the next round was not forwarded".into(),
                );
            }
            answer = upstream.request(who, "tools/call", Value::Object(p)).await;
        }
        if is_input_required(&answer) {
            return failed(
                code::INTERNAL,
                format!("the tool asked for input more than {MAX_ROUNDS} times"),
            );
        }
        answer
    }

    /// Asks `agent` one server request on its call's stream; returns the
    /// result it answered, or the JSON-RPC error to end the call with.
    async fn ask_agent(
        &self,
        agent: &Arc<str>,
        method: &str,
        params: Option<&Value>,
        body: &mpsc::Sender<Bytes>,
    ) -> Result<Value, Value> {
        let Some((id, rx)) = self.0.asked.ask(agent) else {
            return Err(serde_json::json!({"code": code::INTERNAL,
                "message": "too many questions are waiting for agents' answers"}));
        };
        let mut msg = Map::new();
        msg.insert("jsonrpc".into(), Value::from("2.0"));
        msg.insert("id".into(), Value::String(id.clone()));
        msg.insert("method".into(), Value::from(method));
        if let Some(p) = params {
            msg.insert("params".into(), p.clone());
        }
        if body.send(sse_frame(&Value::Object(msg))).await.is_err() {
            self.0.asked.forget(&id);
            return Err(
                serde_json::json!({"code": code::INTERNAL, "message": "the agent's stream closed"}),
            );
        }
        let reply = match tokio::time::timeout(ANSWER_WAIT, rx).await {
            Ok(Ok(r)) => r,
            _ => {
                self.0.asked.forget(&id);
                return Err(serde_json::json!({"code": code::INTERNAL,
                    "message": format!("the agent did not answer {method}")}));
            }
        };
        match (reply.get("result"), reply.get("error")) {
            (Some(r @ Value::Object(_)), _) => Ok(r.clone()),
            (_, Some(e @ Value::Object(_))) => Err(e.clone()),
            _ => Err(serde_json::json!({"code": code::INVALID_REQUEST,
                "message": format!("the agent's answer to {method} has no result")})),
        }
    }
}

// ---- 2026-07-28 agents, session-era upstreams that ask mid-call ---------
//
// A session-era upstream asks (`elicitation/create`, `sampling/...`) while a
// call runs and waits for the answer; a 2026-07-28 agent takes no server
// requests. So toolgate parks the running call, answers the agent with an
// `input_required` round whose one input request is the upstream's ask
// (keyed by toolgate's ask id) and whose `requestState` names the parked
// call; the agent's retry (decided and audited like any call) delivers the
// answer to the upstream session that asked, and the parked call goes on
// to its result, or to its next ask.

/// The `requestState` of a round toolgate made for a parked call.
pub const PARK_PREFIX: &str = "toolgate-park:";

/// Parked calls kept at once; beyond this the oldest expired are dropped,
/// then new asks are refused.
const MAX_PARKED: usize = 256;

/// A call running upstream: its answer, and what the upstream sends
/// during it.
pub(super) struct InFlight {
    pub answer:
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Answer, UpstreamError>> + Send>>,
    pub notes: mpsc::Receiver<Value>,
    /// A sender of `notes` kept here, so the channel closes only when the
    /// call is dropped, after [`drain_quietly`] took this task's waker off
    /// it (the upstream's sender goes with `answer`, mid-poll).
    pub _keep: mpsc::Sender<Value>,
}

/// Takes what is queued on `notes` and leaves a no-op waker registered on
/// it instead of this task's. The channel's last sender is dropped later
/// while this task still runs, and a task woken while it runs is
/// rescheduled as a yield, which wakes an idle runtime thread to steal it:
/// measured, a futex wake and a thread hop on every forwarded call.
pub(super) fn drain_quietly(notes: &mut mpsc::Receiver<Value>) -> Vec<Value> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut out = Vec::new();
    while let std::task::Poll::Ready(Some(n)) = notes.poll_recv(&mut cx) {
        out.push(n);
    }
    out
}

struct ParkedCall {
    call: InFlight,
    agent: Arc<str>,
    tool: String,
    args_sha256: String,
    expires: Instant,
}

/// Parked calls, by their `requestState`.
#[derive(Default)]
pub struct Parked {
    map: std::sync::Mutex<HashMap<String, ParkedCall>>,
    next: AtomicU64,
}

enum Step {
    Done(Result<Answer, UpstreamError>),
    Ask(InFlight, Value),
}

fn is_ask(n: &Value) -> bool {
    n.get("id").is_some() && n.get("method").and_then(Value::as_str).is_some()
}

/// Runs `f` until it answers or the upstream asks something, passing its
/// notifications to `sink` when the agent has a stream.
async fn step(mut f: InFlight, sink: Option<&mpsc::Sender<Bytes>>) -> Step {
    loop {
        tokio::select! {
            biased;
            Some(n) = f.notes.recv() => {
                if is_ask(&n) {
                    return Step::Ask(f, n);
                }
                if let Some(s) = sink {
                    // A slow client loses notifications, never the result.
                    let _ = s.try_send(sse_frame(&n));
                }
            }
            a = &mut f.answer => {
                // What came with the result, in order, before it.
                for n in drain_quietly(&mut f.notes) {
                    if let (Some(s), false) = (sink, is_ask(&n)) {
                        let _ = s.try_send(sse_frame(&n));
                    }
                }
                return Step::Done(a);
            }
        }
    }
}

impl Parked {
    fn park(&self, p: ParkedCall) -> Option<String> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_PARKED {
            let now = Instant::now();
            map.retain(|_, c| c.expires > now);
            if map.len() >= MAX_PARKED {
                return None;
            }
        }
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).ok()?;
        let id = format!(
            "{PARK_PREFIX}{}{}",
            hex::encode(raw),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        map.insert(id.clone(), p);
        Some(id)
    }

    fn take(&self, state: &str, agent: &str, tool: &str, args_sha256: &str) -> Option<InFlight> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(state) {
            Some(c)
                if &*c.agent == agent
                    && c.tool == tool
                    && c.args_sha256 == args_sha256
                    && c.expires > Instant::now() =>
            {
                map.remove(state).map(|c| c.call)
            }
            _ => None,
        }
    }
}

/// What a parked step needs to answer the agent.
pub(super) struct Reply2026 {
    pub after: Settle,
    pub agent: Arc<str>,
    pub args_sha256: String,
    /// The agent accepts an event stream (progress may be relayed).
    pub sse: bool,
    pub request_id: String,
}

impl Gate {
    /// Runs a 2026-07-28 agent's call `f` to its answer, or parks it at the
    /// upstream's first ask and answers an `input_required` round.
    pub(super) async fn run_modern(&self, f: InFlight, r: Reply2026) -> Outcome {
        if !r.sse {
            return match step(f, None).await {
                Step::Done(a) => self.settle(a, r.after),
                Step::Ask(f, ask) => self.park_round(f, ask, r),
            };
        }
        // With a stream: answer in JSON unless something comes first.
        let mut f = f;
        tokio::select! {
            biased;
            a = &mut f.answer => {
                // Notifications may have come in the same read as the result.
                let mut early = drain_quietly(&mut f.notes);
                early.retain(|n| !is_ask(n));
                if early.is_empty() {
                    return self.settle(a, r.after);
                }
                let (body, rx) = mpsc::channel::<Bytes>(early.len() + 1);
                for n in &early {
                    let _ = body.try_send(sse_frame(n));
                }
                let outcome = self.settle(a, r.after);
                if let Some(mut rec) = outcome.record {
                    rec.request_id = Some(r.request_id);
                    self.0.audit(rec);
                }
                if let Some(m) = outcome.reply.into_message() {
                    let _ = body.try_send(sse_frame_bytes(&m));
                }
                Outcome::reply(super::Reply::Stream(held::ChannelBody { rx }.boxed()))
            }
            Some(n) = f.notes.recv() => {
                if is_ask(&n) {
                    return self.park_round(f, n, r);
                }
                // Not an ask: a notification, so answer with a stream.
                let (body, rx) = mpsc::channel::<Bytes>(16);
                let _ = body.try_send(sse_frame(&n));
                let me = self.clone();
                let request_id = r.request_id.clone();
                tokio::spawn(async move {
                    let outcome = match step(f, Some(&body)).await {
                        Step::Done(a) => me.settle(a, r.after),
                        Step::Ask(f, ask) => me.park_round(f, ask, r),
                    };
                    if let Some(mut rec) = outcome.record {
                        rec.request_id = Some(request_id);
                        me.0.audit(rec);
                    }
                    if let Some(m) = outcome.reply.into_message() {
                        let _ = body.send(sse_frame_bytes(&m)).await;
                    }
                });
                Outcome::reply(super::Reply::Stream(held::ChannelBody { rx }.boxed()))
            }
        }
    }

    /// Parks `f` at the upstream's `ask` and answers the agent with an
    /// `input_required` round carrying it.
    fn park_round(&self, f: InFlight, ask: Value, r: Reply2026) -> Outcome {
        let id = ask
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let method = ask.get("method").cloned().unwrap_or(Value::Null);
        let Reply2026 {
            after,
            agent,
            args_sha256,
            ..
        } = r;
        let parked = ParkedCall {
            call: f,
            agent: agent.clone(),
            tool: after.tool.clone(),
            args_sha256: args_sha256.clone(),
            expires: Instant::now() + after.upstream.timeout(),
        };
        let Some(state) = self.0.parked.park(parked) else {
            return self.settle(
                Ok(Answer::Error(serde_json::json!({"code": code::INTERNAL,
                    "message": "the tool asked for input, but too many calls are waiting for input"}))),
                after,
            );
        };
        if let Some((hold, sha)) = &after.grant {
            // The approved call's next round is this call, not a new one.
            self.0
                .rounds
                .offer(&agent, &after.tool, sha, Some(&state), hold);
        }
        let mut request = Map::new();
        request.insert("method".into(), method);
        if let Some(p) = ask.get("params") {
            request.insert("params".into(), p.clone());
        }
        let mut requests = Map::new();
        requests.insert(id, Value::Object(request));
        let round = serde_json::json!({
            "resultType": "input_required",
            "inputRequests": requests,
            "requestState": state,
        });
        tracing::info!(agent.id = %agent, tool.name = %after.tool, "the upstream asked mid-call: an input_required round for the agent");
        self.settle(Ok(Answer::Result(RawResult::from_value(round))), after)
    }

    /// A 2026-07-28 agent's retry of a parked call: its answers go to the
    /// upstream session that asked, and the parked call runs on.
    pub(super) async fn resume(
        &self,
        state: &str,
        responses: Option<Map<String, Value>>,
        upstream: &Arc<Upstream>,
        r: Reply2026,
    ) -> Outcome {
        let Some(f) = self
            .0
            .parked
            .take(state, &r.agent, &r.after.tool, &r.args_sha256)
        else {
            return self.settle(
                Ok(Answer::Error(serde_json::json!({"code": code::INVALID_PARAMS,
                    "message": "requestState names no call waiting for this agent's input (expired, or not this call); call again without it"}))),
                r.after,
            );
        };
        for (key, result) in responses.unwrap_or_default() {
            let mut reply = Map::new();
            reply.insert("result".into(), result);
            if let Err(e) = upstream.answer(&r.agent, &key, &reply).await {
                tracing::warn!(agent.id = %r.agent, error = %e, "an input response not passed on");
            }
        }
        self.run_modern(f, r).await
    }
}

#[cfg(test)]
mod quiet_tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Context, Poll, Wake, Waker};

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The task that waited on the notes is not woken when the channel
    /// closes after `drain_quietly`, and what was queued is returned in
    /// order; without it, closing the channel wakes the waiting task.
    #[test]
    fn draining_quietly_takes_the_tasks_waker_off_the_channel() {
        for quiet in [true, false] {
            let count = Arc::new(Count(AtomicUsize::new(0)));
            let waker = Waker::from(count.clone());
            let (tx, mut rx) = mpsc::channel::<Value>(4);
            let keep = tx.clone();
            // The task waits on the notes (as the select does)...
            assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
            // ...the upstream sends two and its sender goes with the answer.
            let woken_by_sends = {
                tx.try_send(Value::from(1)).unwrap();
                drop(tx);
                count.0.swap(0, Ordering::SeqCst)
            };
            assert_eq!(woken_by_sends, 1, "a send wakes the waiting task");
            keep.try_send(Value::from(2)).unwrap();
            if quiet {
                assert_eq!(drain_quietly(&mut rx), vec![Value::from(1), Value::from(2)]);
            } else {
                while let Ok(_n) = rx.try_recv() {}
                // A fresh registration, as the select's next poll makes.
                assert!(rx.poll_recv(&mut Context::from_waker(&waker)).is_pending());
            }
            drop(keep);
            let woken = count.0.load(Ordering::SeqCst);
            assert_eq!(woken, usize::from(!quiet), "quiet={quiet}");
            assert!(matches!(
                rx.poll_recv(&mut Context::from_waker(Waker::noop())),
                Poll::Ready(None)
            ));
        }
    }
}
