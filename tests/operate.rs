//! Operating toolgate: hot reload, metrics, health and the admin reads.

// Test helpers may unwrap: a panic there is a failed assertion.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::path::Path;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::{approver_token, Harness, Opts, BILLING_BOT};

fn code(v: &Value) -> i64 {
    v["error"]["code"].as_i64().unwrap_or(0)
}

fn viewer() -> String {
    approver_token("vic", &["viewer"], &[])
}

fn approver() -> String {
    approver_token("alice", &["approver"], &[])
}

async fn generation(h: &Harness) -> u64 {
    h.admin(Method::GET, "/v1/agents", Some(&viewer()), None)
        .await
        .1["generation"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn reload_via_the_api_swaps_the_set_and_audits_who_and_what() {
    let h = Harness::start().await;
    std::fs::write(
        h.dir.join("tool-manifests/new-bot.yaml"),
        "agent: new-bot\ntools: [ { name: billing__echo } ]\n",
    )
    .unwrap();
    let (s, _) = h
        .admin(Method::POST, "/v1/reload", Some(&viewer()), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "viewers cannot reload");
    let (s, v) = h
        .admin(Method::POST, "/v1/reload", Some(&approver()), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["added"], json!(["new-bot"]));
    let v = h
        .call(&h.token("new-bot"), "billing__echo", json!({"text": "hi"}))
        .await;
    assert!(v.get("result").is_some(), "{v}");
    let audit = h.audit().await;
    let r = audit
        .iter()
        .find(|r| r["event"] == "manifests_reloaded")
        .expect("reload audited");
    assert_eq!(r["detail"]["by"], "api:alice");
    assert_eq!(r["detail"]["files"][0]["file"], "new-bot.yaml");
    assert_eq!(
        r["detail"]["files"][0]["sha256"].as_str().map(str::len),
        Some(64)
    );
}

#[tokio::test]
async fn an_invalid_set_is_rejected_whole_and_the_last_good_one_stays() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    std::fs::write(
        h.dir.join("tool-manifests/billing-bot.yaml"),
        "agent: billing-bot\ntools: []\n",
    )
    .unwrap();
    std::fs::write(
        h.dir.join("tool-manifests/broken.yaml"),
        "agent: broken\nrate_limit: 5/fortnight\n",
    )
    .unwrap();
    let (s, v) = h
        .admin(Method::POST, "/v1/reload", Some(&approver()), None)
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["problems"][0]
            .as_str()
            .unwrap()
            .contains("broken.yaml:2:13: rate_limit"),
        "{v}"
    );
    // The old billing-bot manifest (with echo) is still in force.
    let v = h.call(&t, "billing__echo", json!({"text": "still"})).await;
    assert!(v.get("result").is_some(), "{v}");
    let audit = h.audit().await;
    let r = audit
        .iter()
        .find(|r| r["event"] == "manifests_rejected")
        .expect("rejection audited");
    assert!(r["detail"]["errors"][0]
        .as_str()
        .unwrap()
        .contains("fortnight"));
}

#[tokio::test]
async fn file_changes_are_picked_up_within_a_second_and_narrowing_applies_to_the_next_call() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    let v = h.call(&t, "billing__echo", json!({"text": "before"})).await;
    assert!(v.get("result").is_some());
    let g0 = generation(&h).await;
    let narrowed = BILLING_BOT.replace(
        "  - name: billing__echo\n    rate_limit: { rate: 3/min, burst: 3 }\n",
        "",
    );
    assert_ne!(narrowed, BILLING_BOT);
    let written = Instant::now();
    std::fs::write(h.dir.join("tool-manifests/billing-bot.yaml"), narrowed).unwrap();
    while generation(&h).await == g0 {
        assert!(written.elapsed() < Duration::from_secs(3), "not reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = written.elapsed();
    assert!(took < Duration::from_secs(1), "reload took {took:?}");
    let v = h.call(&t, "billing__echo", json!({"text": "after"})).await;
    assert_eq!(code(&v), -32003, "{v}");
    let audit = h.audit().await;
    let r = audit
        .iter()
        .rev()
        .find(|r| r["event"] == "manifests_reloaded")
        .unwrap();
    assert_eq!(r["detail"]["by"], "watcher");
    let narrowed = r["detail"]["changed"][0]["narrowed"].as_array().unwrap();
    assert!(
        narrowed
            .iter()
            .any(|n| n.as_str().unwrap().starts_with("billing__echo")),
        "{r}"
    );
}

#[tokio::test]
async fn racing_edits_end_on_the_last_good_content_and_budgets_survive() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    for i in 0..3 {
        assert!(h
            .call(&t, "billing__echo", json!({"text": i.to_string()}))
            .await
            .get("result")
            .is_some());
    }
    assert_eq!(
        code(&h.call(&t, "billing__echo", json!({"text": "x"})).await),
        -32029
    );
    let path = h.dir.join("tool-manifests/billing-bot.yaml");
    for i in 0..20 {
        std::fs::write(&path, format!("{BILLING_BOT}description: edit {i}\n")).unwrap();
    }
    // An API reload racing the watcher: both serialised.
    let (s, _) = h
        .admin(Method::POST, "/v1/reload", Some(&approver()), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, v) = h
        .admin(Method::GET, "/v1/agents", Some(&viewer()), None)
        .await;
    let want = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&path).unwrap()))
    };
    assert_eq!(
        v["agents"][0]["sha256"],
        want.as_str(),
        "the last edit is in force"
    );
    assert_eq!(
        code(&h.call(&t, "billing__echo", json!({"text": "y"})).await),
        -32029,
        "the echo budget survived the reloads"
    );
}

const NEWBIE: &str = "agent: newbie\ntools: [ { name: billing__echo } ]\n";

/// billing-bot's manifest with billing__echo revoked.
fn billing_bot_without_echo() -> String {
    let narrowed = BILLING_BOT.replace(
        "  - name: billing__echo\n    rate_limit: { rate: 3/min, burst: 3 }\n",
        "",
    );
    assert_ne!(narrowed, BILLING_BOT);
    narrowed
}

/// `GET /v1/agents` once it satisfies `ok`; fails after 10 s.
async fn agents_once(h: &Harness, ok: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (_, v) = h
            .admin(Method::GET, "/v1/agents", Some(&viewer()), None)
            .await;
        if ok(&v) {
            return v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not reloaded: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn lists(v: &Value, agent: &str) -> bool {
    v["agents"]
        .as_array()
        .is_some_and(|a| a.iter().any(|m| m["agent"] == agent))
}

/// Whether billing-bot's listed manifest still grants billing__echo.
fn grants_echo(v: &Value) -> bool {
    v["agents"].as_array().is_some_and(|a| {
        a.iter()
            .filter(|m| m["agent"] == "billing-bot")
            .flat_map(|m| m["tools"].as_array().into_iter().flatten())
            .any(|t| t["name"] == "billing__echo")
    })
}

#[tokio::test]
async fn a_manifests_directory_replaced_by_a_rename_is_still_watched() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    let g0 = generation(&h).await;
    let live = h.dir.join("tool-manifests");
    let next = h.dir.join("tool-manifests.next");
    // cp -a r r2 && rm -rf r && mv r2 r: the watched inode is gone.
    std::fs::create_dir(&next).unwrap();
    std::fs::copy(live.join("billing-bot.yaml"), next.join("billing-bot.yaml")).unwrap();
    std::fs::remove_dir_all(&live).unwrap();
    std::fs::rename(&next, &live).unwrap();
    agents_once(&h, |v| v["generation"].as_u64() > Some(g0)).await;
    // The new directory is watched: an added manifest and a revoked tool
    // take effect without a manual reload.
    std::fs::write(live.join("newbie.yaml"), NEWBIE).unwrap();
    agents_once(&h, |v| lists(v, "newbie")).await;
    std::fs::write(live.join("billing-bot.yaml"), billing_bot_without_echo()).unwrap();
    agents_once(&h, |v| !grants_echo(v)).await;
    let v = h
        .call(&t, "billing__echo", json!({"text": "revoked"}))
        .await;
    assert_eq!(code(&v), -32003, "{v}");
    let v = h.call(&h.token("newbie"), "billing__echo", json!({})).await;
    assert!(v.get("result").is_some(), "{v}");
}

/// A harness whose `tool-manifests` is a symlink to `v1`.
async fn linked_to_v1(tag: &str) -> (support::Scratch, Harness) {
    let base = support::temp_dir(tag);
    std::fs::remove_dir(base.join("tool-manifests")).unwrap();
    std::fs::create_dir(base.join("v1")).unwrap();
    std::os::unix::fs::symlink("v1", base.join("tool-manifests")).unwrap();
    let h = Harness::with(Opts {
        dir: Some(base.to_path_buf()),
        ..Opts::default()
    })
    .await;
    (base, h)
}

/// Repoints `tool-manifests` to `v2` atomically, as `ln -sfn v2 tmp && mv
/// -T tmp tool-manifests` (or a ConfigMap's `..data` swap) does.
fn repoint_to_v2(base: &Path) {
    std::os::unix::fs::symlink("v2", base.join("tool-manifests.tmp")).unwrap();
    std::fs::rename(base.join("tool-manifests.tmp"), base.join("tool-manifests")).unwrap();
}

#[tokio::test]
async fn a_repointed_manifests_symlink_is_followed() {
    // tool-manifests -> v1, then swapped for v2 as `ln -sfn v2 tmp && mv
    // -T tmp tool-manifests` (or a ConfigMap's `..data`) does, and v1
    // removed.
    let (base, h) = linked_to_v1("relink").await;
    let t = h.token("billing-bot");
    assert!(base.join("v1/billing-bot.yaml").is_file());
    let v = h.call(&t, "billing__echo", json!({"text": "v1"})).await;
    assert!(v.get("result").is_some(), "{v}");
    std::fs::create_dir(base.join("v2")).unwrap();
    std::fs::write(base.join("v2/billing-bot.yaml"), billing_bot_without_echo()).unwrap();
    std::fs::write(base.join("v2/newbie.yaml"), NEWBIE).unwrap();
    repoint_to_v2(&base);
    std::fs::remove_dir_all(base.join("v1")).unwrap();
    agents_once(&h, |v| lists(v, "newbie") && !grants_echo(v)).await;
    let v = h.call(&t, "billing__echo", json!({"text": "v2"})).await;
    assert_eq!(code(&v), -32003, "{v}");
    // The watch moved to v2 with the link.
    std::fs::write(
        base.join("v2/later.yaml"),
        "agent: later\ntools: [ { name: billing__echo } ]\n",
    )
    .unwrap();
    agents_once(&h, |v| lists(v, "later")).await;
    // And the guard protects the directory the policy now comes from.
    let later = h.token("later");
    let v2 = base.join("v2").canonicalize().unwrap();
    let v = h
        .call(
            &later,
            "billing__echo",
            json!({"text": format!("rm {}/later.yaml", v2.display())}),
        )
        .await;
    assert_eq!(v["error"]["data"]["rule"], "guard.policy_path", "{v}");
}

/// The directory a repointed symlink reaches is protected as soon as the
/// change is seen, before anything is parsed: even when the new set is
/// broken and rejected, an agent must not be able to write there (fixing
/// the broken file up into a manifest that widens its own permissions).
#[tokio::test]
async fn a_repointed_symlink_to_a_broken_set_is_protected_though_rejected() {
    let (base, h) = linked_to_v1("relink-broken").await;
    let t = h.token("billing-bot");
    std::fs::create_dir(base.join("v2")).unwrap();
    std::fs::write(base.join("v2/billing-bot.yaml"), "agent: [\n").unwrap();
    repoint_to_v2(&base);
    let started = Instant::now();
    while !h
        .audit()
        .await
        .iter()
        .any(|r| r["event"] == "manifests_rejected")
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not rejected: {:?}",
            support::events(&h.audit().await)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The old set is in force (echo allowed) and the new target is guarded.
    let v2 = base.join("v2").canonicalize().unwrap();
    let v = h
        .call(
            &t,
            "billing__echo",
            json!({"text": format!("echo 'agent: billing-bot' > {}/billing-bot.yaml", v2.display())}),
        )
        .await;
    assert_eq!(v["error"]["data"]["rule"], "guard.policy_path", "{v}");
    let v = h.call(&t, "billing__echo", json!({"text": "plain"})).await;
    assert!(v.get("result").is_some(), "the last good set stays: {v}");
}

#[tokio::test]
async fn while_the_manifests_directory_is_gone_the_last_good_set_stays() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    let g0 = generation(&h).await;
    let live = h.dir.join("tool-manifests");
    std::fs::rename(&live, h.dir.join("tool-manifests.old")).unwrap();
    let started = Instant::now();
    let rejected = loop {
        let audit = h.audit().await;
        if let Some(r) = audit.iter().find(|r| r["event"] == "manifests_rejected") {
            break r.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "not rejected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(rejected["detail"]["by"], "watcher");
    assert!(
        rejected["detail"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("cannot read manifests directory"),
        "{rejected}"
    );
    // Not an empty set: billing-bot keeps what it had.
    let (_, v) = h
        .admin(Method::GET, "/v1/agents", Some(&viewer()), None)
        .await;
    assert_eq!(v["generation"].as_u64(), Some(g0), "{v}");
    assert!(grants_echo(&v), "{v}");
    let v = h.call(&t, "billing__echo", json!({"text": "kept"})).await;
    assert!(v.get("result").is_some(), "{v}");
    // It comes back, narrowed: watched and reloaded again.
    std::fs::create_dir(&live).unwrap();
    std::fs::write(live.join("billing-bot.yaml"), billing_bot_without_echo()).unwrap();
    agents_once(&h, |v| !grants_echo(v) && lists(v, "billing-bot")).await;
    let v = h.call(&t, "billing__echo", json!({"text": "back"})).await;
    assert_eq!(code(&v), -32003, "{v}");
}

/// `admin.metrics_public: true` serves /metrics without a token (for a
/// scraper inside the control plane); the rest of the admin API still
/// needs one.
#[tokio::test]
async fn public_metrics_need_no_token_and_nothing_else_opens() {
    let public = |c: &mut toolgate::config::Config| {
        if let Some(a) = c.admin.as_mut() {
            a.metrics_public = true;
        }
    };
    let h = Harness::with(Opts {
        configure: Some(&public),
        ..Opts::default()
    })
    .await;
    let (s, _) = h.admin(Method::GET, "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = h.admin(Method::GET, "/v1/holds", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn metrics_count_decisions_and_need_a_token() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    h.call(
        &t,
        "billing__get_invoice",
        json!({"invoice_id": "INV-000001"}),
    )
    .await;
    h.call(
        &t,
        "billing__get_invoice",
        json!({"invoice_id": "INV-000002"}),
    )
    .await;
    h.call(&t, "billing__delete_x", json!({})).await;
    h.post(None, &[], "{}").await;
    let (s, _) = h.admin(Method::GET, "/metrics", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let req = http::Request::get(format!("{}/metrics", h.admin_url()))
        .header("authorization", format!("Bearer {}", viewer()))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    use http_body_util::BodyExt;
    let resp = h.client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    for line in [
        "toolgate_decisions_total{event=\"call\",decision=\"allow\"} 2",
        "toolgate_decisions_total{event=\"call\",decision=\"deny\"} 1",
        "toolgate_decisions_total{event=\"auth_failed\",decision=\"deny\"} 1",
        "toolgate_config_generation 1",
        "toolgate_holds_pending 0",
        "toolgate_audit_write_errors_total 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(
        text.contains("toolgate_upstream_request_duration_seconds_count{upstream=\"billing\"} 2"),
        "{text}"
    );
    // Resolved with the histogram on the upstream's first call: a series
    // at zero until a call fails.
    assert!(
        text.lines()
            .any(|l| l == "toolgate_upstream_errors_total{upstream=\"billing\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("toolgate_request_duration_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn readiness_flips_when_the_audit_log_cannot_be_written() {
    let h = Harness::start().await;
    let (s, v) = h.admin(Method::GET, "/readyz", None, None).await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("ready")),
        "{v}"
    );
    let (s, _) = h.admin(Method::GET, "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let bad = Harness::with(Opts {
        audit: Some("/dev/full"),
        ..Opts::default()
    })
    .await;
    bad.call(&bad.token("billing-bot"), "billing__delete_x", json!({}))
        .await;
    bad.server.gate.0.auditor.flush().await;
    let (s, v) = bad.admin(Method::GET, "/readyz", None, None).await;
    assert_eq!(
        (s, v["audit"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("unwritable")),
        "{v}"
    );
}

#[tokio::test]
async fn agents_and_audit_reads_for_viewers() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    h.call(
        &t,
        "billing__get_invoice",
        json!({"invoice_id": "INV-000001"}),
    )
    .await;
    h.call(&t, "billing__delete_x", json!({})).await;
    h.call(&h.token("other"), "billing__echo", json!({})).await;
    let (s, v) = h
        .admin(Method::GET, "/v1/agents", Some(&viewer()), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let a = &v["agents"][0];
    assert_eq!(
        (a["agent"].as_str(), a["file"].as_str()),
        (Some("billing-bot"), Some("billing-bot.yaml"))
    );
    assert_eq!(a["sha256"].as_str().map(str::len), Some(64));
    assert!(a["tools"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "billing__refund" && t["approval"] == "required"));
    let (_, v) = h
        .admin(
            Method::GET,
            "/v1/audit?agent=billing-bot&decision=deny",
            Some(&viewer()),
            None,
        )
        .await;
    let recs = v["records"].as_array().unwrap();
    assert_eq!(recs.len(), 1, "{v}");
    assert_eq!(recs[0]["tool"], "billing__delete_x");
    let (_, v) = h
        .admin(Method::GET, "/v1/audit?limit=2", Some(&viewer()), None)
        .await;
    assert_eq!(v["records"].as_array().unwrap().len(), 2);
    assert_eq!(v["records"][0]["agent"], "other", "newest first");
    let (s, _) = h
        .admin(
            Method::GET,
            "/v1/audit",
            Some(&h.token("billing-bot")),
            None,
        )
        .await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "agents cannot read the audit log"
    );
}

#[tokio::test]
async fn probing_and_escalations_raise_alerts_that_are_audited_counted_and_posted() {
    let hook = support::Webhook::start(0).await;
    let extra = format!(
        "alerts: {{ url: \"{}\", denials: {{ threshold: 2, window: 1m }} }}",
        hook.url
    );
    let h = Harness::with(Opts {
        extra: &extra,
        ..Opts::default()
    })
    .await;
    let t = h.token("billing-bot");
    for _ in 0..5 {
        h.call(&t, "billing__delete_x", json!({})).await;
    }
    h.call(&t, "billing__refund", json!({"invoice_id": "INV-000001"}))
        .await;
    h.admin(Method::GET, "/v1/holds", Some("not-a-token"), None)
        .await;
    let got = hook.wait_for(3).await;
    let kinds: Vec<&str> = got.iter().map(|a| a["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["probing", "escalation", "admin_auth_failed"],
        "{got:#?}"
    );
    assert_eq!(got[0]["agent"], "billing-bot");
    let audit = h.audit().await;
    assert_eq!(audit.iter().filter(|r| r["event"] == "alert").count(), 3);
    let (_, m) = h
        .admin(Method::GET, "/v1/agents", Some(&viewer()), None)
        .await;
    assert!(m["agents"].is_array());
}

#[tokio::test]
async fn a_reload_from_a_git_work_tree_records_the_commit_and_author() {
    let h = Harness::start().await;
    let dir = h.dir.join("tool-manifests");
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(&dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&["init", "-q"]);
    git(&[
        "-c",
        "user.name=Sec Team",
        "-c",
        "user.email=sec@example.com",
        "add",
        ".",
    ]);
    std::fs::write(dir.join("new-bot.yaml"), "agent: new-bot\n").unwrap();
    git(&["add", "."]);
    git(&[
        "-c",
        "user.name=Sec Team",
        "-c",
        "user.email=sec@example.com",
        "commit",
        "-q",
        "-m",
        "add new-bot",
    ]);
    let head = git(&["rev-parse", "HEAD"]);
    let (s, _) = h
        .admin(Method::POST, "/v1/reload", Some(&approver()), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let audit = h.audit().await;
    let r = audit
        .iter()
        .rev()
        .find(|r| r["event"] == "manifests_reloaded")
        .unwrap();
    assert_eq!(r["detail"]["git"]["commit"], head.as_str(), "{r}");
    assert_eq!(r["detail"]["git"]["author"], "Sec Team <sec@example.com>");
    assert_eq!(r["detail"]["git"]["uncommitted_changes"], false);
}

#[tokio::test]
async fn a_reload_tells_listening_agents_their_tools_may_have_changed() {
    use http_body_util::BodyExt;
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    let sid = h.initialize(&t).await;
    let req = http::Request::get(&h.url)
        .header("authorization", format!("Bearer {t}"))
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &sid)
        .header("mcp-protocol-version", "2025-11-25")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = h.client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // Narrow the agent's manifest and reload.
    std::fs::write(
        h.dir.join("tool-manifests/billing-bot.yaml"),
        "agent: billing-bot\ntools: [ { name: billing__echo } ]\n",
    )
    .unwrap();
    let (s, v) = h
        .admin(Method::POST, "/v1/reload", Some(&approver()), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut text = String::new();
    while !text.contains("\n\n") {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("an event after the reload")
            .expect("the stream goes on")
            .unwrap();
        if let Ok(d) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&d));
        }
    }
    let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    let note: Value = serde_json::from_str(data).unwrap();
    assert_eq!(note["method"], "notifications/tools/list_changed");
}

#[tokio::test]
async fn a_2026_agent_listens_for_list_changes_with_subscriptions_listen() {
    let h = Harness::start().await;
    let t = h.token("billing-bot");
    let body = json!({"jsonrpc": "2.0", "id": "listen-1", "method": "subscriptions/listen",
        "params": {"notifications": {"toolsListChanged": true, "resourceSubscriptions": ["billing://x"]},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                      "io.modelcontextprotocol/clientCapabilities": {}}}});
    let resp = h
        .modern_stream(&t, "subscriptions/listen", None, &body)
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.into_body();
    let mut text = String::new();
    let ack = next_event(&mut stream, &mut text).await;
    assert_eq!(
        ack["method"], "notifications/subscriptions/acknowledged",
        "{ack}"
    );
    // Only what toolgate honours is acknowledged.
    assert_eq!(
        ack["params"]["notifications"],
        json!({"toolsListChanged": true})
    );
    assert_eq!(
        ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
        "listen-1"
    );
    std::fs::write(
        h.dir.join("tool-manifests/billing-bot.yaml"),
        "agent: billing-bot\ntools: [ { name: billing__echo } ]\n",
    )
    .unwrap();
    let (s, v) = h
        .admin(Method::POST, "/v1/reload", Some(&approver()), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let note = next_event(&mut stream, &mut text).await;
    assert_eq!(note["method"], "notifications/tools/list_changed", "{note}");
    assert_eq!(
        note["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"],
        "listen-1"
    );
}

/// The next SSE event's data from `body` (`text` keeps what was read).
async fn next_event(body: &mut hyper::body::Incoming, text: &mut String) -> Value {
    use http_body_util::BodyExt;
    loop {
        if let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            if let Some(d) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                return serde_json::from_str(d).unwrap();
            }
            continue;
        }
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("an event")
            .expect("the stream goes on")
            .unwrap();
        if let Ok(d) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&d));
        }
    }
}
