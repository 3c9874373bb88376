//! Alerts on unusual events, for the people watching: an agent probing
//! (denials over a threshold within a window), every escalation attempt
//! (a new hold), management-plane authentication failures, and audit write
//! errors. Each alert is counted (`toolgate_alerts_total{kind}`), audited
//! (`event: "alert"`), and posted to `alerts.url` when configured, through
//! the same retrying, off-path notifier as hold notifications.
//!
//! The per-agent denial counters are bounded: agents are authenticated
//! identities, and the map is capped and cleared with each window.

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use serde_json::{json, Value};

use crate::audit::Record;

/// Most agents tracked for probing at once.
pub const MAX_TRACKED: usize = 10_000;

/// One raised alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub kind: &'static str,
    pub agent: Option<Arc<str>>,
    pub message: String,
    pub detail: Value,
}

struct Window {
    start_ms: AtomicI64,
    count: AtomicU32,
}

/// Watches audited records for alert conditions.
pub struct Alerts {
    threshold: u32,
    window: Duration,
    denials: DashMap<Arc<str>, Window>,
}

fn now_ms() -> i64 {
    crate::hold::now_ms()
}

impl Alerts {
    pub fn new(threshold: u32, window: Duration) -> Self {
        Alerts {
            threshold: threshold.max(1),
            window,
            denials: DashMap::new(),
        }
    }

    /// The alert `r` raises, if any.
    pub fn observe(&self, r: &Record) -> Option<Alert> {
        match (r.event, r.decision) {
            ("hold_created", _) => Some(Alert {
                kind: "escalation",
                agent: r.agent.clone(),
                message: format!(
                    "{} tried {}: held for approval ({})",
                    r.agent.as_deref().unwrap_or("?"),
                    r.tool.as_deref().unwrap_or("?"),
                    r.reason.as_deref().unwrap_or("")
                ),
                detail: json!({"hold_id": r.hold_id, "rule": r.rule, "tool": r.tool}),
            }),
            ("admin_auth_failed", _) => Some(Alert {
                kind: "admin_auth_failed",
                agent: None,
                message: format!(
                    "management plane authentication failed: {}",
                    r.reason.as_deref().unwrap_or("")
                ),
                detail: r.detail.clone().unwrap_or(Value::Null),
            }),
            ("call" | "rejected", Some("deny")) => self.denied(r.agent.as_ref()?),
            _ => None,
        }
    }

    fn denied(&self, agent: &Arc<str>) -> Option<Alert> {
        let now = now_ms();
        let window_ms = self.window.as_millis() as i64;
        if !self.denials.contains_key(agent) && self.denials.len() >= MAX_TRACKED {
            self.denials
                .retain(|_, w| now - w.start_ms.load(Ordering::Relaxed) < window_ms);
            if self.denials.len() >= MAX_TRACKED {
                return None;
            }
        }
        let w = self.denials.entry(agent.clone()).or_insert_with(|| Window {
            start_ms: AtomicI64::new(now),
            count: AtomicU32::new(0),
        });
        if now - w.start_ms.load(Ordering::Relaxed) >= window_ms {
            w.start_ms.store(now, Ordering::Relaxed);
            w.count.store(0, Ordering::Relaxed);
        }
        let n = w.count.fetch_add(1, Ordering::Relaxed) + 1;
        // Once per window: when the count crosses the threshold.
        (n == self.threshold + 1).then(|| Alert {
            kind: "probing",
            agent: Some(agent.clone()),
            message: format!(
                "{agent} was denied more than {} times within {}",
                self.threshold,
                humantime::format_duration(self.window)
            ),
            detail: json!({"denials": n, "window_s": self.window.as_secs()}),
        })
    }

    /// The audit record of an alert.
    pub fn record(a: &Alert) -> Record {
        Record {
            event: "alert",
            agent: a.agent.clone(),
            decision: None,
            reason: Some(a.message.clone()),
            detail: Some(json!({"kind": a.kind, "detail": a.detail})),
            ..Record::default()
        }
    }

    /// The webhook payload of an alert.
    pub fn payload(a: &Alert) -> Value {
        json!({"event": "alert", "kind": a.kind, "agent": a.agent, "message": a.message, "detail": a.detail,
               "at": crate::hold::rfc3339(now_ms())})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny(agent: &str) -> Record {
        Record {
            event: "call",
            agent: Some(Arc::from(agent)),
            decision: Some("deny"),
            ..Record::default()
        }
    }

    #[test]
    fn probing_alerts_once_when_denials_cross_the_threshold() {
        let a = Alerts::new(3, Duration::from_secs(60));
        let raised: Vec<_> = (0..10).filter_map(|_| a.observe(&deny("bot"))).collect();
        assert_eq!(raised.len(), 1);
        assert_eq!(raised[0].kind, "probing");
        assert!(a.observe(&deny("other")).is_none(), "per agent");
        let allow = Record {
            decision: Some("allow"),
            ..deny("bot")
        };
        assert!(a.observe(&allow).is_none());
    }

    #[test]
    fn escalations_and_admin_failures_always_alert() {
        let a = Alerts::new(3, Duration::from_secs(60));
        let hold = Record {
            event: "hold_created",
            decision: Some("hold"),
            ..deny("bot")
        };
        assert_eq!(a.observe(&hold).map(|x| x.kind), Some("escalation"));
        let admin = Record {
            event: "admin_auth_failed",
            decision: Some("deny"),
            ..Record::default()
        };
        assert_eq!(a.observe(&admin).map(|x| x.kind), Some("admin_auth_failed"));
    }
}
