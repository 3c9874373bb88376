//! Holds and the management plane on real sockets: escalations wait for a
//! human on a separate, separately authenticated listener.

// Test helpers may unwrap: a panic there is a failed assertion.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::{approver_token, Harness, Opts};

const OPS_BOT: &str = r#"
agent: ops-bot
unlisted: hold
tools:
  - name: billing__grant_role
    hold_when:
      - { pointer: /principal, equals: "${agent}" }
      - { pointer: /role, in: [admin, owner] }
  - name: billing__refund
    approval: required
    approvals: 2
  - name: billing__echo
"#;

fn code(v: &Value) -> i64 {
    v["error"]["code"].as_i64().unwrap_or(0)
}

fn hold_id(v: &Value) -> String {
    v["error"]["data"]["hold_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no hold_id: {v}"))
        .to_owned()
}

async fn ops() -> Harness {
    Harness::with(Opts {
        manifests: &[("ops-bot.yaml", OPS_BOT)],
        ..Opts::default()
    })
    .await
}

#[tokio::test]
async fn a_self_targeting_grant_is_held_and_not_forwarded() {
    let h = ops().await;
    let t = h.token("ops-bot");
    let v = h
        .call(
            &t,
            "billing__grant_role",
            json!({"principal": "OPS-BOT", "role": "reader"}),
        )
        .await;
    assert_eq!(code(&v), -32010, "{v}");
    assert_eq!(v["error"]["data"]["rule"], "tools[0].hold_when[0]");
    let id = hold_id(&v);
    let (s, hold) = h
        .admin(
            Method::GET,
            &format!("/v1/holds/{id}"),
            Some(&approver_token("alice", &["viewer"], &[])),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    for k in [
        "id",
        "agent",
        "tool",
        "upstream",
        "arguments",
        "args_sha256",
        "reason",
        "rule",
        "status",
        "approvals",
        "created_at",
        "expires_at",
        "decided_at",
    ] {
        assert!(hold.get(k).is_some(), "hold lacks {k}: {hold}");
    }
    assert_eq!(
        (
            hold["agent"].as_str(),
            hold["status"].as_str(),
            hold["upstream"].as_str()
        ),
        (Some("ops-bot"), Some("pending"), Some("billing"))
    );
    assert!(h.received().is_empty());
    let audit = h.audit().await;
    assert_eq!(audit[0]["event"], "hold_created");
    assert_eq!(audit[0]["hold_id"], id.as_str());
}

#[tokio::test]
async fn an_approval_forwards_the_identical_retry_exactly_once() {
    let h = ops().await;
    let t = h.token("ops-bot");
    let v = h
        .call(
            &t,
            "billing__grant_role",
            json!({"principal": "alice", "role": "admin", "n": 1}),
        )
        .await;
    let id = hold_id(&v);
    // An identical retry (other key order, other number spelling) joins it.
    let v = h
        .call(
            &t,
            "billing__grant_role",
            json!({"n": 1.0, "role": "admin", "principal": "alice"}),
        )
        .await;
    assert_eq!(hold_id(&v), id);
    let (s, a) = h
        .approve(&id, "carol", json!({"reason": "ticket 42"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{a}");
    assert_eq!(a["status"], "approved");
    assert_eq!(a["approvals"][0]["approver"], "carol");
    let v = h
        .call(
            &t,
            "billing__grant_role",
            json!({"role": "admin", "principal": "alice", "n": 1}),
        )
        .await;
    assert!(v.get("result").is_some(), "{v}");
    assert_eq!(h.received(), ["grant_role"]);
    // Single use: the next identical call is a new request.
    let v = h
        .call(
            &t,
            "billing__grant_role",
            json!({"principal": "alice", "role": "admin", "n": 1}),
        )
        .await;
    assert_eq!(code(&v), -32010);
    assert_ne!(hold_id(&v), id);
    assert_eq!(h.received().len(), 1);
    let audit = h.audit().await;
    let used: Vec<&Value> = audit
        .iter()
        .filter(|r| r["event"] == "grant_used")
        .collect();
    assert_eq!(used.len(), 1);
    assert_eq!(
        (
            used[0]["hold_id"].as_str(),
            used[0]["approver"].as_str(),
            used[0]["decision"].as_str()
        ),
        (Some(id.as_str()), Some("carol"), Some("approved"))
    );
    assert!(audit
        .iter()
        .any(|r| r["event"] == "hold_approved" && r["approver"] == "carol"));
}

#[tokio::test]
async fn concurrent_identical_retries_still_forward_once() {
    let h = ops().await;
    let t = h.token("ops-bot");
    let args = json!({"principal": "alice", "role": "owner"});
    let id = hold_id(&h.call(&t, "billing__grant_role", args.clone()).await);
    assert_eq!(h.approve(&id, "carol", json!({})).await.0, StatusCode::OK);
    let calls = (0..8).map(|_| h.call(&t, "billing__grant_role", args.clone()));
    let answers = futures_all(calls).await;
    let ok = answers.iter().filter(|v| v.get("result").is_some()).count();
    assert_eq!(ok, 1, "{answers:#?}");
    assert_eq!(h.received().len(), 1);
}

async fn futures_all<F: std::future::Future<Output = Value>>(
    fs: impl Iterator<Item = F>,
) -> Vec<Value> {
    let mut out = Vec::new();
    let fs: Vec<_> = fs.map(Box::pin).collect();
    let mut handles = Vec::new();
    for f in fs {
        handles.push(f);
    }
    // Drive them concurrently on this task.
    let joined = async {
        let mut pending: Vec<_> = handles.into_iter().map(Some).collect();
        let mut results: Vec<Option<Value>> = vec![None; pending.len()];
        std::future::poll_fn(|cx| {
            let mut done = true;
            for (i, slot) in pending.iter_mut().enumerate() {
                if let Some(f) = slot {
                    match f.as_mut().poll(cx) {
                        std::task::Poll::Ready(v) => {
                            results[i] = Some(v);
                            *slot = None;
                        }
                        std::task::Poll::Pending => done = false,
                    }
                }
            }
            if done {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        results
    };
    for r in joined.await {
        out.push(r.expect("every future finished"));
    }
    out
}

#[tokio::test]
async fn the_management_plane_refuses_agents_self_approval_viewers_and_missing_mfa() {
    let h = Harness::with(Opts {
        manifests: &[("ops-bot.yaml", OPS_BOT)],
        require_amr: "[mfa]",
        ..Opts::default()
    })
    .await;
    let t = h.token("ops-bot");
    let id = hold_id(
        &h.call(
            &t,
            "billing__grant_role",
            json!({"principal": "x", "role": "admin"}),
        )
        .await,
    );
    let path = format!("/v1/holds/{id}/approve");
    // An agent token is not a management credential, even for reading.
    let (s, _) = h.admin(Method::GET, "/v1/holds", Some(&t), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = h
        .admin(Method::POST, &path, Some(&t), Some(json!({})))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = h.admin(Method::GET, "/v1/holds", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // The agent's own identity, as an approver: no self-approval.
    let (s, v) = h
        .admin(
            Method::POST,
            &path,
            Some(&approver_token("Ops-Bot", &["approver"], &["mfa"])),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // A viewer reads but cannot decide.
    let viewer = approver_token("vera", &["viewer"], &["mfa"]);
    let (s, v) = h
        .admin(Method::GET, "/v1/holds?status=pending", Some(&viewer), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["holds"].as_array().unwrap().len(), 1);
    let (s, _) = h
        .admin(Method::POST, &path, Some(&viewer), Some(json!({})))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // No MFA in amr.
    let (s, v) = h
        .admin(
            Method::POST,
            &path,
            Some(&approver_token("alice", &["approver"], &["pwd"])),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v["error"].as_str().unwrap().contains("mfa"));
    // No role at all.
    let (s, _) = h
        .admin(
            Method::GET,
            "/v1/holds",
            Some(&approver_token("nobody", &[], &[])),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // With MFA it works; deciding again is a conflict.
    let (s, _) = h.approve(&id, "alice", json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = h.approve(&id, "bob", json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let audit = h.audit().await;
    assert_eq!(
        audit
            .iter()
            .filter(|r| r["event"] == "admin_auth_failed")
            .count(),
        3
    );
    assert!(h.received().is_empty());
}

#[tokio::test]
async fn two_approvals_need_two_different_approvers() {
    let h = ops().await;
    let t = h.token("ops-bot");
    let args = json!({"invoice_id": "INV-1", "amount": 10});
    let id = hold_id(&h.call(&t, "billing__refund", args.clone()).await);
    let (s, v) = h.approve(&id, "alice", json!({})).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("pending")));
    let (s, _) = h.approve(&id, "alice", json!({})).await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "the same approver twice does not count"
    );
    let v = h.call(&t, "billing__refund", args.clone()).await;
    assert_eq!(code(&v), -32010, "still pending: {v}");
    let (s, v) = h.approve(&id, "bob", json!({})).await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("approved"))
    );
    let v = h.call(&t, "billing__refund", args).await;
    assert!(v.get("result").is_some(), "{v}");
    assert_eq!(h.received(), ["refund"]);
}

/// The approver comparisons see through whitespace and refuse control
/// characters: `" ops-bot"` is ops-bot, and `"alice "` is alice.
#[tokio::test]
async fn whitespace_or_control_characters_do_not_make_another_approver() {
    let h = ops().await;
    let t = h.token("ops-bot");
    let id = hold_id(
        &h.call(
            &t,
            "billing__grant_role",
            json!({"principal": "x", "role": "admin"}),
        )
        .await,
    );
    for (me, want) in [
        (" ops-bot", StatusCode::FORBIDDEN),
        ("ops-bot\u{a0}", StatusCode::FORBIDDEN),
        ("OPS-BOT\u{3000}", StatusCode::FORBIDDEN),
        ("ops-bot\n", StatusCode::UNAUTHORIZED),
        ("ops-bot\t", StatusCode::UNAUTHORIZED),
        ("ops-bot\r", StatusCode::UNAUTHORIZED),
    ] {
        let (s, v) = h.approve(&id, me, json!({})).await;
        assert_eq!(s, want, "{me:?}: {v}");
    }
    let audit = h.audit().await;
    let failed = audit
        .iter()
        .filter(|r| r["event"] == "admin_auth_failed")
        .count();
    assert_eq!(
        failed, 3,
        "control characters are an authentication failure"
    );
    // Two approvals: the same person with a trailing space counts once.
    let args = json!({"invoice_id": "INV-2", "amount": 5});
    let two = hold_id(&h.call(&t, "billing__refund", args.clone()).await);
    assert_eq!(h.approve(&two, "alice", json!({})).await.0, StatusCode::OK);
    for again in ["alice ", "\u{2003}Alice"] {
        let (s, v) = h.approve(&two, again, json!({})).await;
        assert_eq!(s, StatusCode::CONFLICT, "{again:?}: {v}");
    }
    let v = h.call(&t, "billing__refund", args).await;
    assert_eq!(code(&v), -32010, "still pending: {v}");
    assert!(h.received().is_empty());
}

/// With `approvals: 2`, the grant is the most restrictive approval: one
/// single-use approval makes it single use, else the shortest window wins;
/// a partial approval is audited as still held.
#[tokio::test]
async fn two_approvals_grant_the_most_restrictive_window_and_a_partial_one_is_still_held() {
    let h = ops().await;
    let t = h.token("ops-bot");
    let args = json!({"invoice_id": "INV-3", "amount": 7});
    let id = hold_id(&h.call(&t, "billing__refund", args.clone()).await);
    let (s, v) = h.approve(&id, "alice", json!({})).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("pending")));
    let (s, v) = h.approve(&id, "bob", json!({"for": "10m"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["grant_until"].clone(), v["grant_for"].clone()),
        (Value::Null, Value::Null),
        "{v}"
    );
    assert_eq!(v["approvals"][1]["for"], "10m", "{v}");
    assert!(h
        .call(&t, "billing__refund", args.clone())
        .await
        .get("result")
        .is_some());
    let v = h.call(&t, "billing__refund", args.clone()).await;
    assert_eq!(code(&v), -32010, "single use: {v}");
    // Alice's week and Bob's 15 minutes: 15 minutes.
    let other = json!({"invoice_id": "INV-4", "amount": 7});
    let id2 = hold_id(&h.call(&t, "billing__refund", other.clone()).await);
    assert_eq!(
        h.approve(&id2, "alice", json!({"for": "7d"})).await.0,
        StatusCode::OK
    );
    let (s, v) = h.approve(&id2, "bob", json!({"for": "15m"})).await;
    assert_eq!(
        (s, v["grant_for"].as_str()),
        (StatusCode::OK, Some("15m")),
        "{v}"
    );
    for _ in 0..2 {
        let v = h.call(&t, "billing__refund", other.clone()).await;
        assert!(v.get("result").is_some(), "within the window: {v}");
    }
    h.server.gate.0.holds.advance(Duration::from_secs(16 * 60));
    let v = h.call(&t, "billing__refund", other).await;
    assert_eq!(code(&v), -32010, "past the shorter window: {v}");
    let audit = h.audit().await;
    let decided: Vec<(&str, &str, &Value)> = audit
        .iter()
        .filter(|r| r["event"] == "hold_approved")
        .map(|r| {
            (
                r["approver"].as_str().unwrap(),
                r["decision"].as_str().unwrap(),
                &r["detail"],
            )
        })
        .collect();
    let got: Vec<(&str, &str)> = decided.iter().map(|(a, d, _)| (*a, *d)).collect();
    assert_eq!(
        got,
        [
            ("alice", "hold"),
            ("bob", "approved"),
            ("alice", "hold"),
            ("bob", "approved")
        ]
    );
    assert_eq!(
        (
            decided[0].2["approvals"].as_u64(),
            decided[0].2["approvals_needed"].as_u64()
        ),
        (Some(1), Some(2))
    );
    assert_eq!(decided[0].2["status"], "pending");
    assert_eq!(
        (
            decided[1].2["for"].clone(),
            decided[1].2["requested_for"].clone()
        ),
        (Value::Null, json!("10m"))
    );
    assert_eq!(decided[3].2["for"], "15m");
    assert!(decided[3].2["grant_until"].is_string());
}

/// The denier is not one of the approvals: `denied_by` names them.
#[tokio::test]
async fn a_denial_is_shown_apart_from_the_approvals() {
    let h = ops().await;
    let t = h.token("ops-bot");
    let args = json!({"invoice_id": "INV-5", "amount": 9});
    let id = hold_id(&h.call(&t, "billing__refund", args).await);
    assert_eq!(h.approve(&id, "alice", json!({})).await.0, StatusCode::OK);
    let (s, v) = h
        .admin(
            Method::POST,
            &format!("/v1/holds/{id}/deny"),
            Some(&approver_token("bob", &["approver"], &[])),
            Some(json!({"reason": "no"})),
        )
        .await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("denied")),
        "{v}"
    );
    let (_, hold) = h
        .admin(
            Method::GET,
            &format!("/v1/holds/{id}"),
            Some(&approver_token("vera", &["viewer"], &[])),
            None,
        )
        .await;
    let approvers: Vec<&str> = hold["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["approver"].as_str().unwrap())
        .collect();
    assert_eq!(approvers, ["alice"], "{hold}");
    assert_eq!(hold["denied_by"]["approver"], "bob", "{hold}");
    assert_eq!(hold["denied_by"]["reason"], "no");
    assert_eq!(hold["denied_by"]["at"], hold["decided_at"]);
}

/// Every 403 on the management plane is audited (who, what, why) and
/// alerted, as a 401 is.
#[tokio::test]
async fn refused_management_actions_are_audited_with_who_what_and_why() {
    let h = ops().await;
    let t = h.token("ops-bot");
    let id = hold_id(
        &h.call(
            &t,
            "billing__grant_role",
            json!({"principal": "x", "role": "admin"}),
        )
        .await,
    );
    let approve = format!("/v1/holds/{id}/approve");
    let refused = [
        (
            approver_token("vera", &["viewer"], &[]),
            Method::POST,
            approve.clone(),
            "admin.role",
        ),
        (
            approver_token("ops-bot", &["approver"], &[]),
            Method::POST,
            approve.clone(),
            "hold.self_approval",
        ),
        (
            approver_token("nobody", &[], &[]),
            Method::GET,
            "/v1/holds".to_owned(),
            "admin.role",
        ),
        (
            approver_token("vera", &["viewer"], &[]),
            Method::POST,
            "/v1/reload".to_owned(),
            "admin.role",
        ),
    ];
    for (tok, method, path, _) in &refused {
        let (s, v) = h
            .admin(method.clone(), path, Some(tok), Some(json!({})))
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {v}");
    }
    let audit = h.audit().await;
    let got: Vec<&Value> = audit
        .iter()
        .filter(|r| r["event"] == "admin_forbidden")
        .collect();
    assert_eq!(got.len(), refused.len(), "{audit:#?}");
    for (r, (_, method, path, rule)) in got.iter().zip(&refused) {
        assert_eq!(r["decision"], "deny");
        assert_eq!(r["rule"], *rule, "{r}");
        assert!(r["reason"].as_str().is_some_and(|w| !w.is_empty()), "{r}");
        assert_eq!(r["detail"]["path"], path.as_str());
        assert_eq!(r["detail"]["method"], method.as_str());
    }
    let who: Vec<&str> = got
        .iter()
        .map(|r| r["approver"].as_str().unwrap())
        .collect();
    assert_eq!(who, ["vera", "ops-bot", "nobody", "vera"]);
    assert_eq!(
        (got[0]["hold_id"].as_str(), got[1]["hold_id"].as_str()),
        (Some(id.as_str()), Some(id.as_str()))
    );
    assert!(got[2]["hold_id"].is_null());
    let alerts = audit
        .iter()
        .filter(|r| r["event"] == "alert" && r["detail"]["kind"] == "admin_forbidden")
        .count();
    assert_eq!(alerts, refused.len());
    assert!(h.received().is_empty());
}

#[tokio::test]
async fn a_denied_hold_answers_32011_to_identical_retries() {
    let h = ops().await;
    let t = h.token("ops-bot");
    let args = json!({"principal": "ops-bot", "role": "reader"});
    let id = hold_id(&h.call(&t, "billing__grant_role", args.clone()).await);
    let tok = approver_token("alice", &["approver"], &[]);
    let (s, v) = h
        .admin(
            Method::POST,
            &format!("/v1/holds/{id}/deny"),
            Some(&tok),
            Some(json!({"reason": "not today"})),
        )
        .await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("denied")));
    for _ in 0..2 {
        let v = h.call(&t, "billing__grant_role", args.clone()).await;
        assert_eq!(code(&v), -32011, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not today"));
    }
    let (s, _) = h
        .admin(
            Method::POST,
            &format!("/v1/holds/{id}/approve"),
            Some(&tok),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "deciding a decided hold");
    assert!(h.received().is_empty());
    let audit = h.audit().await;
    assert!(audit.iter().any(|r| r["event"] == "hold_denied"
        && r["decision"] == "denied"
        && r["approver"] == "alice"));
    assert_eq!(
        audit
            .iter()
            .filter(|r| r["decision"] == "denied" && r["event"] == "call")
            .count(),
        2
    );
}

#[tokio::test]
async fn a_window_lets_identical_calls_pass_until_it_ends() {
    let h = ops().await;
    let t = h.token("ops-bot");
    let args = json!({"principal": "alice", "role": "admin"});
    let id = hold_id(&h.call(&t, "billing__grant_role", args.clone()).await);
    let (s, v) = h.approve(&id, "carol", json!({"for": "15m"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["grant_until"].as_str().is_some());
    for _ in 0..3 {
        let v = h.call(&t, "billing__grant_role", args.clone()).await;
        assert!(v.get("result").is_some(), "{v}");
    }
    assert_eq!(h.received().len(), 3);
    // Other arguments are not covered.
    let v = h
        .call(
            &t,
            "billing__grant_role",
            json!({"principal": "bob", "role": "admin"}),
        )
        .await;
    assert_eq!(code(&v), -32010);
    // After the window (virtual time), a new approval is needed.
    h.server.gate.0.holds.advance(Duration::from_secs(16 * 60));
    let v = h.call(&t, "billing__grant_role", args).await;
    assert_eq!(code(&v), -32010, "{v}");
}

/// A window longer than what is left of the hold's `ttl` is honoured to
/// its end (the `grant_until` the approver was told), not cut short when
/// the hold would have expired had it stayed pending.
#[tokio::test]
async fn a_window_outlasting_the_holds_ttl_still_lets_identical_calls_pass() {
    let h = ops().await;
    let t = h.token("ops-bot");
    let args = json!({"principal": "alice", "role": "admin"});
    let id = hold_id(&h.call(&t, "billing__grant_role", args.clone()).await);
    // ttl is 1h; the window is 2h.
    let (s, v) = h.approve(&id, "carol", json!({"for": "2h"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    h.server.gate.0.holds.advance(Duration::from_secs(90 * 60));
    toolgate::server::expire_holds(&h.server.gate).await;
    let v = h.call(&t, "billing__grant_role", args.clone()).await;
    assert!(
        v.get("result").is_some(),
        "90 min in, within the window: {v}"
    );
    assert_eq!(h.received().len(), 1);
    h.server.gate.0.holds.advance(Duration::from_secs(31 * 60));
    let v = h.call(&t, "billing__grant_role", args).await;
    assert_eq!(code(&v), -32010, "past the window: a new hold: {v}");
    assert_ne!(hold_id(&v), id);
}

#[tokio::test]
async fn pending_holds_expire_and_an_expired_hold_cannot_be_approved() {
    let h = ops().await;
    let t = h.token("ops-bot");
    let args = json!({"principal": "alice", "role": "admin"});
    let id = hold_id(&h.call(&t, "billing__grant_role", args.clone()).await);
    h.server.gate.0.holds.advance(Duration::from_secs(3601));
    toolgate::server::expire_holds(&h.server.gate).await;
    let (s, v) = h.approve(&id, "carol", json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (_, v) = h
        .admin(
            Method::GET,
            "/v1/holds?status=expired",
            Some(&approver_token("v", &["viewer"], &[])),
            None,
        )
        .await;
    assert_eq!(v["holds"][0]["id"], id.as_str());
    let audit = h.audit().await;
    assert!(audit.iter().any(|r| r["event"] == "hold_expired"
        && r["decision"] == "expired"
        && r["hold_id"] == id.as_str()));
    // The identical call now starts a new hold.
    let v = h.call(&t, "billing__grant_role", args).await;
    assert_ne!(hold_id(&v), id);
}

/// Holds that expire on the way, before the expiry task sees them (an
/// approver tries one, an identical call comes for another), are audited
/// hold_expired once each, like those the task expires.
#[tokio::test]
async fn holds_expired_on_the_way_are_audited_once() {
    let h = ops().await;
    let t = h.token("ops-bot");
    let a = json!({"principal": "alice", "role": "admin"});
    let b = json!({"principal": "bob", "role": "admin"});
    let id_a = hold_id(&h.call(&t, "billing__grant_role", a).await);
    let id_b = hold_id(&h.call(&t, "billing__grant_role", b.clone()).await);
    h.server.gate.0.holds.advance(Duration::from_secs(3601));
    let (s, v) = h.approve(&id_a, "carol", json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let v = h.call(&t, "billing__grant_role", b).await;
    assert_ne!(hold_id(&v), id_b, "a new hold");
    toolgate::server::expire_holds(&h.server.gate).await;
    toolgate::server::expire_holds(&h.server.gate).await;
    h.server.gate.0.auditor.flush().await;
    let audit = h.audit().await;
    for id in [&id_a, &id_b] {
        let n = audit
            .iter()
            .filter(|r| r["event"] == "hold_expired" && r["hold_id"] == id.as_str())
            .count();
        assert_eq!(n, 1, "{id}: {audit:#?}");
    }
}

/// ops-bot's harness with calls waiting up to 10 s for a decision.
async fn ops_waiting() -> Harness {
    Harness::with(Opts {
        manifests: &[("ops-bot.yaml", OPS_BOT)],
        holds: "holds: { wait: 10s, ttl: 1h }",
        ..Opts::default()
    })
    .await
}

/// The id of the newest pending hold, once there is one.
async fn first_pending(h: &Harness) -> String {
    let viewer = approver_token("v", &["viewer"], &[]);
    loop {
        let (_, v) = h
            .admin(Method::GET, "/v1/holds?status=pending", Some(&viewer), None)
            .await;
        if let Some(id) = v["holds"][0]["id"].as_str() {
            return id.to_owned();
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_decision_during_the_wait_answers_the_waiting_call() {
    let h = ops_waiting().await;
    let t = h.token("ops-bot");
    let args = json!({"principal": "alice", "role": "admin"});
    let call = h.call(&t, "billing__grant_role", args.clone());
    let approve = async {
        let id = first_pending(&h).await;
        h.approve(&id, "carol", json!({})).await
    };
    let (v, (s, _)) = tokio::join!(call, approve);
    assert_eq!(s, StatusCode::OK);
    assert!(v.get("result").is_some(), "{v}");
    assert_eq!(h.received().len(), 1);
}

/// Two identical calls waiting on one pending hold, approved once: one is
/// forwarded, the other is refused -32011 (the single-use approval was
/// used), and that refusal is audited like any decision.
#[tokio::test]
async fn a_single_use_approval_shared_by_two_waiting_calls_forwards_one() {
    let h = ops_waiting().await;
    let t = h.token("ops-bot");
    let args = json!({"principal": "alice", "role": "admin"});
    let first = h.call(&t, "billing__grant_role", args.clone());
    let second = async {
        // Join once the hold exists.
        first_pending(&h).await;
        h.call(&t, "billing__grant_role", args.clone()).await
    };
    let approve = async {
        let id = first_pending(&h).await;
        // Both calls wait on it once the second joined: hold_created,
        // then the joined call's own record.
        loop {
            let audit = h.audit().await;
            if audit.iter().filter(|r| r["decision"] == "hold").count() == 2 {
                return h.approve(&id, "carol", json!({})).await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    let (a, b, (s, _)) = tokio::join!(first, second, approve);
    assert_eq!(s, StatusCode::OK);
    let (ok, refused): (Vec<&Value>, Vec<&Value>) = [&a, &b]
        .into_iter()
        .partition(|v| v.get("result").is_some());
    assert_eq!((ok.len(), refused.len()), (1, 1), "{a} {b}");
    assert_eq!(code(refused[0]), -32011, "{}", refused[0]);
    assert!(
        refused[0]["error"]["data"]["rule"].is_string(),
        "{}",
        refused[0]
    );
    assert_eq!(h.received().len(), 1);
    h.server.gate.0.auditor.flush().await;
    let audit = h.audit().await;
    assert!(
        audit.iter().any(|r| r["decision"] == "deny"
            && r["hold_id"].is_string()
            && r["reason"]
                .as_str()
                .is_some_and(|m| m.contains("used by an identical call"))),
        "{audit:#?}"
    );
}

#[tokio::test]
async fn event_stream_clients_wait_on_the_stream_and_get_the_answer_there() {
    let h = ops().await;
    let t = h.token("ops-bot");
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}, "progressToken": "p1"});
    let body = json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"billing__grant_role","arguments":{"principal":"ops-bot","role":"x"},"_meta":meta}}).to_string();
    let (s, hd, v) = h
        .post(
            Some(&t),
            &[
                ("mcp-protocol-version", "2026-07-28"),
                ("mcp-method", "tools/call"),
                ("mcp-name", "billing__grant_role"),
                ("accept", "application/json, text/event-stream"),
            ],
            body,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(support::is_event_stream(&hd));
    assert_eq!(code(&v), -32010, "{v}");
    assert_eq!(v["id"], 3);
}

#[tokio::test]
async fn unlisted_hold_is_an_access_request_and_holds_per_agent_are_bounded() {
    let h = Harness::with(Opts {
        manifests: &[("ops-bot.yaml", OPS_BOT)],
        holds: "holds: { wait: 100ms, ttl: 1h, max_pending_per_agent: 2 }",
        ..Opts::default()
    })
    .await;
    let t = h.token("ops-bot");
    let v = h
        .call(&t, "billing__get_invoice", json!({"invoice_id": "INV-1"}))
        .await;
    assert_eq!(code(&v), -32010);
    assert_eq!(v["error"]["data"]["rule"], "unlisted");
    // Still absent from tools/list.
    let (_, l) = h.modern(&t, "tools/list", json!({})).await;
    assert!(!l.to_string().contains("billing__get_invoice"), "{l}");
    let v = h
        .call(&t, "billing__get_invoice", json!({"invoice_id": "INV-2"}))
        .await;
    assert_eq!(code(&v), -32010);
    let v = h
        .call(&t, "billing__get_invoice", json!({"invoice_id": "INV-3"}))
        .await;
    assert_eq!(code(&v), -32029, "{v}");
    assert_eq!(v["error"]["data"]["rule"], "holds.max_pending_per_agent");
    // Joining an existing hold is not a new one.
    let v = h
        .call(&t, "billing__get_invoice", json!({"invoice_id": "INV-1"}))
        .await;
    assert_eq!(code(&v), -32010);
}

#[tokio::test]
async fn the_guard_sees_through_dot_dot_and_symlinks() {
    let base = support::temp_dir("guardsock");
    let h = Harness::with(Opts {
        manifests: &[("ops-bot.yaml", OPS_BOT)],
        dir: Some(base.clone()),
        ..Opts::default()
    })
    .await;
    let t = h.token("ops-bot");
    let link = base.join("innocent-link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(base.join("tool-manifests"), &link).unwrap();
    let b = base.display();
    for path in [
        format!("{b}/tool-manifests/ops-bot.yaml"),
        format!("{b}/somewhere/../tool-manifests/ops-bot.yaml"),
        format!("{b}//tool-manifests/./ops-bot.yaml"),
        format!("{b}/innocent-link/ops-bot.yaml"),
        format!("cat {b}/toolgate.yaml | sh"),
        format!("{b}/audit.jsonl"),
    ] {
        let v = h.call(&t, "billing__echo", json!({"text": path})).await;
        assert_eq!(code(&v), -32010, "{path}: {v}");
        assert_eq!(v["error"]["data"]["rule"], "guard.policy_path", "{path}");
    }
    let v = h
        .call(&t, "billing__echo", json!({"text": "/srv/data/report.txt"}))
        .await;
    assert!(v.get("result").is_some(), "{v}");
    assert_eq!(h.received().len(), 1);
}

#[tokio::test]
async fn a_pending_hold_and_an_approval_survive_a_restart() {
    let dir = support::temp_dir("restart");
    let opts = || Opts {
        manifests: &[("ops-bot.yaml", OPS_BOT)],
        dir: Some(dir.clone()),
        ..Opts::default()
    };
    let h = Harness::with(opts()).await;
    let t = h.token("ops-bot");
    let a = json!({"principal": "alice", "role": "admin"});
    let b = json!({"principal": "bob", "role": "admin"});
    let id_a = hold_id(&h.call(&t, "billing__grant_role", a.clone()).await);
    let id_b = hold_id(&h.call(&t, "billing__grant_role", b.clone()).await);
    assert_eq!(h.approve(&id_b, "carol", json!({})).await.0, StatusCode::OK);
    h.server.shutdown(Duration::from_secs(5)).await;

    let h = Harness::with(opts()).await;
    let (s, v) = h.approve(&id_a, "carol", json!({})).await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("approved")),
        "pending hold survived: {v}"
    );
    for args in [a, b] {
        let v = h.call(&t, "billing__grant_role", args).await;
        assert!(v.get("result").is_some(), "{v}");
    }
    assert_eq!(h.received().len(), 2);
    let chain = toolgate::audit::verify(&dir.join("audit.jsonl"));
    assert!(
        chain.is_ok(),
        "one chain across restarts: {chain:?}\n{}",
        std::fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_default()
    );
}

#[tokio::test]
async fn new_holds_are_posted_to_the_webhook_with_retries_and_failures_are_audited() {
    // A webhook that fails once, then records.
    let hook = support::Webhook::start(1).await;
    let holds = format!(
        "holds: {{ wait: 100ms, ttl: 1h, notify: {{ url: \"{}\" }} }}",
        hook.url
    );
    let h = Harness::with(Opts {
        manifests: &[("ops-bot.yaml", OPS_BOT)],
        holds: &holds,
        ..Opts::default()
    })
    .await;
    let t = h.token("ops-bot");
    let v = h
        .call(
            &t,
            "billing__grant_role",
            json!({"principal": "ops-bot", "role": "x", "password": "hunter2"}),
        )
        .await;
    let id = hold_id(&v);
    let got = hook.wait_for(1).await;
    assert_eq!(got.len(), 1, "delivered once after a retry");
    assert_eq!(got[0]["hold"]["id"], id.as_str());
    assert_eq!(got[0]["hold"]["agent"], "ops-bot");
    assert_eq!(got[0]["hold"]["arguments"]["password"], "[REDACTED]");
    assert!(got[0]["links"]["approve"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/v1/holds/{id}/approve")));

    // An unreachable webhook is audited, and the call path never waited on it.
    let h2 = Harness::with(Opts {
        manifests: &[("ops-bot.yaml", OPS_BOT)],
        holds: "holds: { wait: 100ms, ttl: 1h, notify: { url: \"http://127.0.0.1:9/x\" } }",
        ..Opts::default()
    })
    .await;
    let started = std::time::Instant::now();
    let v = h2
        .call(
            &h2.token("ops-bot"),
            "billing__grant_role",
            json!({"principal": "ops-bot", "role": "x"}),
        )
        .await;
    assert_eq!(code(&v), -32010);
    assert!(started.elapsed() < Duration::from_secs(2));
    for _ in 0..200 {
        if h2
            .audit()
            .await
            .iter()
            .any(|r| r["event"] == "notify_failed")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("notify failure was not audited");
}

#[tokio::test]
async fn multi_round_trip_rounds_pass_through_and_an_approval_covers_its_rounds_once() {
    let h = Harness::with(Opts {
        manifests: &[
            (
                "ops-bot.yaml",
                "agent: ops-bot\ntools:\n  - name: billing__confirm_refund\n    approval: required\n",
            ),
            (
                "free-bot.yaml",
                "agent: free-bot\ntools:\n  - name: billing__confirm_refund\n",
            ),
        ],
        holds: "holds: { wait: 50ms, ttl: 1h }",
        ..Opts::default()
    })
    .await;
    let round = |tool_args: Value, state: Option<&str>, ok: bool| {
        let mut p = json!({"name": "billing__confirm_refund", "arguments": tool_args});
        if let Some(s) = state {
            p["requestState"] = json!(s);
            p["inputResponses"] = json!({"confirm": {"action": "accept", "content": {"ok": ok}}});
        }
        p
    };
    let args = json!({"invoice_id": "INV-000007"});

    // Allowed outright: the input_required round reaches the agent as the
    // upstream sent it, and the retry with the answers completes.
    let free = h.token("free-bot");
    let (_, v) = h
        .modern(&free, "tools/call", round(args.clone(), None, true))
        .await;
    assert_eq!(v["result"]["resultType"], "input_required", "{v}");
    assert_eq!(
        v["result"]["inputRequests"]["confirm"]["method"], "elicitation/create",
        "{v}"
    );
    let state = v["result"]["requestState"].as_str().unwrap().to_owned();
    let (_, v) = h
        .modern(&free, "tools/call", round(args.clone(), Some(&state), true))
        .await;
    assert_eq!(
        v["result"]["content"][0]["text"], "Refunded invoice INV-000007 (confirmed)",
        "{v}"
    );
    assert_eq!(v["result"]["resultType"], "complete");
    let forwarded = h.tools.received();
    assert_eq!(forwarded.len(), 2);

    // Approval required: the approved call's input_required round leaves
    // one continuation; its retry is forwarded without a new hold, once.
    let ops = h.token("ops-bot");
    let v = h.call(&ops, "billing__confirm_refund", args.clone()).await;
    let id = hold_id(&v);
    let (s, _) = h.approve(&id, "carol", json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = h
        .modern(&ops, "tools/call", round(args.clone(), None, true))
        .await;
    assert_eq!(v["result"]["resultType"], "input_required", "{v}");
    // A retry with a forged state is not the next round: held anew.
    let (_, v) = h
        .modern(
            &ops,
            "tools/call",
            round(args.clone(), Some("forged"), true),
        )
        .await;
    assert_eq!(code(&v), -32010, "{v}");
    let (_, v) = h
        .modern(&ops, "tools/call", round(args.clone(), Some(&state), true))
        .await;
    assert_eq!(
        v["result"]["content"][0]["text"], "Refunded invoice INV-000007 (confirmed)",
        "{v}"
    );
    // The completed call used the approval up: replaying the last round is
    // a new call, held, and not forwarded.
    let (_, v) = h
        .modern(&ops, "tools/call", round(args.clone(), Some(&state), true))
        .await;
    assert_eq!(code(&v), -32010, "{v}");
    assert_eq!(h.tools.received().len(), 4, "two rounds each, nothing more");
    let audit = h.audit().await;
    let next: Vec<&Value> = audit
        .iter()
        .filter(|r| r["rule"] == "hold.continuation")
        .collect();
    assert_eq!(next.len(), 1, "{audit:#?}");
    assert_eq!(
        (next[0]["decision"].as_str(), next[0]["hold_id"].as_str()),
        (Some("allow"), Some(id.as_str()))
    );
}

#[tokio::test]
async fn a_session_era_agent_answers_input_requests_asked_on_its_stream() {
    use http_body_util::BodyExt;
    let h = Harness::with(Opts {
        manifests: &[(
            "old-bot.yaml",
            "agent: old-bot\ntools:\n  - name: billing__confirm_refund\n",
        )],
        ..Opts::default()
    })
    .await;
    let t = h.token("old-bot");
    let sid = h.initialize(&t).await;
    let body = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": "billing__confirm_refund", "arguments": {"invoice_id": "INV-000009"}}});
    let req = http::Request::post(&h.url)
        .header("authorization", format!("Bearer {t}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &sid)
        .header("mcp-protocol-version", "2025-11-25")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let resp = h.client.request(req).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.into_body();
    let mut text = String::new();
    let mut events: Vec<Value> = Vec::new();
    let mut answered = false;
    while let Some(frame) = stream.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            if let Some(d) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                events.push(serde_json::from_str(d).unwrap());
            }
        }
        let Some(ask) = events.iter().find(|e| e["method"] == "elicitation/create") else {
            continue;
        };
        if answered {
            continue;
        }
        answered = true;
        assert_eq!(
            ask["params"]["message"], "Refund invoice INV-000009?",
            "{ask}"
        );
        let ask_id = ask["id"].as_str().unwrap().to_owned();
        // Another agent cannot answer it.
        let other = h.token("other-bot");
        let osid = h.initialize(&other).await;
        let answer = |id: &str, ok: bool| {
            json!({"jsonrpc": "2.0", "id": id, "result": {"action": "accept", "content": {"ok": ok}}})
                .to_string()
        };
        let (s, _, _) = h
            .post(
                Some(&other),
                &[
                    ("mcp-session-id", &osid),
                    ("mcp-protocol-version", "2025-11-25"),
                ],
                answer(&ask_id, false),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED);
        let (s, _, _) = h
            .post(
                Some(&t),
                &[
                    ("mcp-session-id", &sid),
                    ("mcp-protocol-version", "2025-11-25"),
                ],
                answer(&ask_id, true),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED);
    }
    let result = events
        .iter()
        .find(|e| e["id"] == 5)
        .expect("the call's result");
    assert_eq!(
        result["result"]["content"][0]["text"], "Refunded invoice INV-000009 (confirmed)",
        "{events:?}"
    );
    assert!(
        result["result"].get("resultType").is_none(),
        "session-era shape"
    );
    // Both rounds reached the upstream, and both are audited.
    assert_eq!(h.tools.received().len(), 2);
    let audit = h.audit().await;
    let events: Vec<&str> = audit.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["call", "input_round"], "{audit:#?}");
}

/// SPEC: while a call waits on a hold, SSE keep-alives come at least every
/// 15 s; with a progress token each one also reports progress. This test
/// waits for the first one (about 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_on_a_hold_gets_keep_alives_within_15_s_with_progress() {
    use http_body_util::BodyExt;
    let h = Harness::with(Opts {
        manifests: &[("ops-bot.yaml", OPS_BOT)],
        holds: "holds: { wait: 30s, ttl: 1h }",
        ..Opts::default()
    })
    .await;
    let t = h.token("ops-bot");
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}, "progressToken": "p7"});
    let body = json!({"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"billing__grant_role","arguments":{"principal":"ops-bot","role":"x"},"_meta":meta}});
    let resp = h
        .modern_stream(&t, "tools/call", Some("billing__grant_role"), &body)
        .await;
    let opened = std::time::Instant::now();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.into_body();
    let mut text = String::new();
    let first = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(frame) = stream.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
            if text.contains(": keepalive\n\n") && text.contains("notifications/progress") {
                return;
            }
        }
        panic!("the stream ended while the hold was pending: {text:?}");
    })
    .await;
    assert!(
        first.is_ok(),
        "no keep-alive within 15 s (after {:?}): {text:?}",
        opened.elapsed()
    );
    let note: Value = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .unwrap();
    assert_eq!(note["method"], "notifications/progress", "{note}");
    assert_eq!(note["params"]["progressToken"], "p7");
    assert_eq!(note["params"]["progress"], 1);
    let hold = first_pending(&h).await;
    assert!(
        note["params"]["message"].as_str().unwrap().contains(&hold),
        "{note}"
    );
    // Nothing was forwarded while it waited.
    assert!(h.received().is_empty());
}
