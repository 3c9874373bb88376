//! The hold webhook: a JSON POST to `holds.notify.url` for every new hold.
//!
//! Never on the call path: the gate hands a payload to a bounded queue and
//! goes on; one task delivers, retrying with exponential backoff. A payload
//! that cannot be delivered (or queued) is audited, so a silent approver
//! channel is visible.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::audit::{Auditor, Record};

/// Payloads waiting for delivery.
pub const QUEUE: usize = 1024;
/// Delivery attempts per payload.
pub const ATTEMPTS: u32 = 5;

/// A cheap handle on the notifier task.
#[derive(Clone)]
pub struct Notifier {
    tx: mpsc::Sender<Value>,
    auditor: Auditor,
}

impl Notifier {
    /// Starts delivering to `url`.
    pub fn start(url: String, auditor: Auditor) -> Notifier {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(deliver(url, rx, auditor.clone()));
        Notifier { tx, auditor }
    }

    /// Queues `payload` without waiting.
    pub fn send(&self, payload: Value) {
        let hold_id = payload["hold"]["id"].as_str().map(str::to_owned);
        if self.tx.try_send(payload).is_err() {
            self.auditor.record(Record {
                event: "notify_failed",
                hold_id,
                reason: Some("notification queue full".into()),
                ..Record::default()
            });
        }
    }
}

async fn deliver(url: String, mut rx: mpsc::Receiver<Value>, auditor: Auditor) {
    let client = crate::upstream::http_client();
    while let Some(payload) = rx.recv().await {
        let body = Bytes::from(payload.to_string());
        let mut last = String::new();
        let mut delivered = false;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            }
            let req = match http::Request::post(&url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(
                    http::header::USER_AGENT,
                    concat!("toolgate/", env!("CARGO_PKG_VERSION")),
                )
                .body(Full::new(body.clone()))
            {
                Ok(r) => r,
                Err(e) => {
                    last = e.to_string();
                    break;
                }
            };
            match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(Ok(resp)) => last = format!("HTTP {}", resp.status()),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "timed out".into(),
            }
        }
        if !delivered {
            tracing::warn!(error = %last, "hold notification not delivered");
            auditor.record(Record {
                event: "notify_failed",
                hold_id: payload["hold"]["id"].as_str().map(str::to_owned),
                reason: Some(format!("after {ATTEMPTS} attempts: {last}")),
                ..Record::default()
            });
        }
    }
}
