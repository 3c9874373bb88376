//! Requests a tool server sends its client while a call runs ("asks":
//! sampling and elicitation), relayed to the agent whose call it is, and
//! the agent's answer routed back to the same upstream session.
//!
//! The agent sees toolgate's own id for each ask, never the server's, so
//! asks from different upstreams (or different sessions of one) cannot
//! collide, and an agent can only answer what it was asked: the id is
//! bound to the agent it was sent to and is answered once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::mcp;

/// The server requests relayed to the agent; others are answered by
/// toolgate itself (see [`own_answer`]).
pub const RELAYED: [&str; 2] = ["sampling/createMessage", "elicitation/create"];

/// The client capabilities toolgate declares to session-based servers: it
/// relays sampling and elicitation requests to the agent whose call made
/// them (an agent without the capability answers with an error, which goes
/// back to the server as the agent sent it).
pub fn client_capabilities() -> Value {
    json!({"sampling": {}, "elicitation": {}})
}

/// Unanswered asks kept per upstream; beyond this a new ask is refused.
const MAX_PENDING: usize = 256;

/// An ask not answered in this time is forgotten (its call has long timed
/// out).
const TTL: Duration = Duration::from_secs(600);

const PREFIX: &str = "toolgate-ask:";

/// Who was asked, the server's id for the ask, the upstream session that
/// asked (HTTP; stdio answers go to the agent's process), and when.
type Pending = (Arc<str>, Value, Option<super::Session>, Instant);

/// One upstream's unanswered asks, by toolgate's id.
#[derive(Debug, Default)]
pub struct Asks {
    map: Mutex<HashMap<String, Pending>>,
    next: AtomicU64,
}

impl Asks {
    /// Registers the server's request `msg` as asked of `agent`; returns
    /// it with toolgate's id in place of the server's, or `None` when too
    /// many asks are unanswered.
    pub(crate) fn register(
        &self,
        upstream: &str,
        agent: &Arc<str>,
        session: Option<super::Session>,
        mut msg: Map<String, Value>,
    ) -> Option<Value> {
        let server_id = msg.get("id")?.clone();
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_PENDING {
            map.retain(|_, (_, _, _, at)| at.elapsed() < TTL);
            if map.len() >= MAX_PENDING {
                return None;
            }
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let ours = format!("{PREFIX}{upstream}:{n}");
        map.insert(
            ours.clone(),
            (agent.clone(), server_id, session, Instant::now()),
        );
        msg.insert("id".into(), Value::String(ours));
        Some(Value::Object(msg))
    }

    /// The server's id for toolgate's `id` and the session that asked,
    /// when it was asked of `agent`; removed, so an ask is answered once.
    pub(crate) fn take(&self, agent: &str, id: &str) -> Option<(Value, Option<super::Session>)> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(id) {
            Some((a, _, _, at)) if &**a == agent && at.elapsed() < TTL => {
                map.remove(id).map(|(_, v, s, _)| (v, s))
            }
            _ => None,
        }
    }

    /// Forgets an ask that could not be delivered.
    pub fn forget(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }
}

/// The upstream named in one of toolgate's ask ids.
pub fn upstream_of(id: &str) -> Option<&str> {
    id.strip_prefix(PREFIX)?.rsplit_once(':').map(|(u, _)| u)
}

/// The response to send the server for the agent's answer `reply` (a
/// JSON-RPC response object) to the ask the server numbered `server_id`:
/// its result or error, nothing else.
pub fn response(server_id: Value, reply: &Map<String, Value>) -> Option<Value> {
    let mut out = Map::new();
    out.insert("jsonrpc".into(), Value::from("2.0"));
    out.insert("id".into(), server_id);
    match (reply.get("result"), reply.get("error")) {
        (Some(r @ Value::Object(_)), None) => out.insert("result".into(), r.clone()),
        (None, Some(e @ Value::Object(_))) => out.insert("error".into(), e.clone()),
        _ => return None,
    };
    Some(Value::Object(out))
}

/// toolgate's own answer to a server request it does not relay (or cannot:
/// the agent's call has no stream open, or too many asks are waiting).
pub fn own_answer(id: &Value, method: &str, relayable: bool) -> Value {
    match method {
        "ping" => json!({"jsonrpc": "2.0", "id": id, "result": {}}),
        "roots/list" => json!({"jsonrpc": "2.0", "id": id, "result": {"roots": []}}),
        m if relayable && RELAYED.contains(&m) => json!({"jsonrpc": "2.0", "id": id, "error": {
            "code": mcp::code::METHOD_NOT_FOUND,
            "message": format!("{m} cannot reach the agent: its call has no event stream open"),
        }}),
        m => json!({"jsonrpc": "2.0", "id": id, "error": {
            "code": mcp::code::METHOD_NOT_FOUND,
            "message": format!("{m} is not offered to tool servers by toolgate"),
        }}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ask_is_answered_once_and_only_by_the_agent_asked() {
        let asks = Asks::default();
        let bot: Arc<str> = Arc::from("bot");
        let msg = json!({"jsonrpc": "2.0", "id": 7, "method": "elicitation/create", "params": {}});
        let sent = asks
            .register("fs", &bot, None, msg.as_object().unwrap().clone())
            .unwrap();
        let ours = sent["id"].as_str().unwrap().to_owned();
        assert_eq!(upstream_of(&ours), Some("fs"));
        assert_eq!(sent["method"], "elicitation/create");
        assert!(asks.take("other-bot", &ours).is_none(), "another agent");
        assert_eq!(asks.take("bot", &ours).map(|(v, _)| v), Some(json!(7)));
        assert!(asks.take("bot", &ours).is_none(), "answered once");
        assert_eq!(upstream_of("7"), None);
    }

    #[test]
    fn pending_asks_are_bounded() {
        let asks = Asks::default();
        let bot: Arc<str> = Arc::from("bot");
        for i in 0..MAX_PENDING {
            let m = json!({"id": i, "method": "sampling/createMessage"});
            assert!(asks
                .register("u", &bot, None, m.as_object().unwrap().clone())
                .is_some());
        }
        let m = json!({"id": "x", "method": "sampling/createMessage"});
        assert!(asks
            .register("u", &bot, None, m.as_object().unwrap().clone())
            .is_none());
    }

    #[test]
    fn only_a_result_or_an_error_object_is_passed_back() {
        let ok = json!({"id": "a", "result": {"action": "accept"}, "extra": 1});
        assert_eq!(
            response(json!(3), ok.as_object().unwrap()),
            Some(json!({"jsonrpc": "2.0", "id": 3, "result": {"action": "accept"}}))
        );
        let both = json!({"id": "a", "result": {}, "error": {}});
        assert_eq!(response(json!(3), both.as_object().unwrap()), None);
        let scalar = json!({"id": "a", "result": 5});
        assert_eq!(response(json!(3), scalar.as_object().unwrap()), None);
    }
}
