//! Prometheus metrics for operators (`GET /metrics` on the admin listener).
//!
//! Label values come from small fixed sets (event and decision names,
//! configured upstream names), never from call input, so cardinality is
//! bounded by configuration. Agents are not labels unless
//! `admin.metrics_agent_labels` is on, and then only agents that have a
//! manifest (bounded by the policy set).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub event: &'static str,
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentDecisionLabels {
    pub agent: String,
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// Every metric toolgate exports.
pub struct Metrics {
    registry: Registry,
    pub decisions: Family<DecisionLabels, Counter>,
    pub agent_decisions: Family<AgentDecisionLabels, Counter>,
    pub request_seconds: Histogram,
    pub upstream_seconds: Family<UpstreamLabels, Histogram>,
    pub upstream_errors: Family<UpstreamLabels, Counter>,
    pub holds_pending: Gauge,
    pub hold_decision_seconds: Histogram,
    pub audit_queue: Gauge,
    pub audit_write_errors: Counter,
    pub audit_dropped: Counter,
    pub reloads: Family<ResultLabels, Counter>,
    pub generation: Gauge,
    pub alerts: Family<KindLabels, Counter>,
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.5, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("toolgate");
        let m = Metrics {
            decisions: Family::default(),
            agent_decisions: Family::default(),
            request_seconds: seconds_histogram(),
            upstream_seconds: Family::new_with_constructor(seconds_histogram),
            upstream_errors: Family::default(),
            holds_pending: Gauge::default(),
            hold_decision_seconds: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            audit_queue: Gauge::default(),
            audit_write_errors: Counter::default(),
            audit_dropped: Counter::default(),
            reloads: Family::default(),
            generation: Gauge::default(),
            alerts: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "decisions",
            "Audited decisions and events, by event and decision",
            m.decisions.clone(),
        );
        registry.register(
            "agent_decisions",
            "Decisions by agent (only with admin.metrics_agent_labels)",
            m.agent_decisions.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Data-plane request latency, including upstream time",
            m.request_seconds.clone(),
        );
        registry.register(
            "upstream_request_duration_seconds",
            "Upstream tools/call latency",
            m.upstream_seconds.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures (timeouts, refused connections, bad answers)",
            m.upstream_errors.clone(),
        );
        registry.register(
            "holds_pending",
            "Holds waiting for a decision",
            m.holds_pending.clone(),
        );
        registry.register(
            "hold_decision_seconds",
            "Time from hold creation to a human decision",
            m.hold_decision_seconds.clone(),
        );
        registry.register(
            "audit_queue_depth",
            "Audit records waiting for the writer",
            m.audit_queue.clone(),
        );
        registry.register(
            "audit_write_errors",
            "Failed audit writes",
            m.audit_write_errors.clone(),
        );
        registry.register(
            "audit_dropped",
            "Records of refusals dropped because the audit queue or the backlog of an unwritable log was full",
            m.audit_dropped.clone(),
        );
        registry.register("reloads", "Manifest reloads by result", m.reloads.clone());
        registry.register(
            "config_generation",
            "Generation of the policy in force",
            m.generation.clone(),
        );
        registry.register("alerts", "Alerts raised, by kind", m.alerts.clone());
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
