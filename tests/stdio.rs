//! stdio upstreams: spawned per agent, supervised, shut down with toolgate.
//! The server is toolgate's own demo tool server run as a real child process
//! (`toolgate demo-tools`); the real third-party stdio servers are exercised
//! in the interop tests.

use crate::support;

use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{json, Value};
use support::{Harness, Opts};

const MANIFEST: &str = "agent: bot\ntools:\n  - name: \"local__*\"\n";
const OTHER: &str = "agent: other-bot\ntools:\n  - name: \"local__*\"\n";

fn upstreams() -> String {
    format!(
        "upstreams:\n  - name: local\n    command: [\"{}\", demo-tools]\n    env: {{ DEMO_GREETING: \"hello ${{env:TG_TEST_UPSTREAM_KEY}}\" }}",
        env!("CARGO_BIN_EXE_toolgate")
    )
}

async fn harness() -> Harness {
    Harness::with(Opts {
        manifests: &[("bot.yaml", MANIFEST), ("other.yaml", OTHER)],
        upstreams: Some(upstreams()),
        ..Opts::default()
    })
    .await
}

fn text(v: &Value) -> &str {
    v["result"]["content"][0]["text"].as_str().unwrap_or("")
}

async fn pid(h: &Harness, token: &str) -> u32 {
    let v = h.call(token, "local__pid", json!({})).await;
    v["result"]["structuredContent"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid: {v}")) as u32
}

fn running(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would show state Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn kill9(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -9 {pid}");
}

#[tokio::test]
async fn a_stdio_server_is_listed_called_and_audited() {
    let h = harness().await;
    let t = h.token("bot");
    let (_, v) = h.modern(&t, "tools/list", json!({})).await;
    let names: Vec<&str> = v["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(names.contains(&"local__echo"), "{names:?}");
    assert!(names.contains(&"local__sleep"), "{names:?}");
    let v = h
        .call(&t, "local__echo", json!({"text": "over stdio"}))
        .await;
    assert_eq!(text(&v), "over stdio", "{v}");
    let audit = h.audit().await;
    let last = audit.last().expect("audited");
    assert_eq!(
        (last["decision"].as_str(), last["tool"].as_str()),
        (Some("allow"), Some("local__echo"))
    );
    assert_eq!(
        h.server.gate.0.upstreams[0].version(),
        Some("2025-11-25"),
        "spoken in the revision the server answered"
    );
}

#[tokio::test]
async fn each_agent_gets_its_own_process_with_a_clean_environment() {
    let h = harness().await;
    let (a, b) = (h.token("bot"), h.token("other-bot"));
    let (pa, pb) = (pid(&h, &a).await, pid(&h, &b).await);
    assert_ne!(pa, pb, "two agents must not share a stdio session");
    assert_eq!(pid(&h, &a).await, pa, "an agent keeps its process");
    // toolgate's own secrets are not inherited; configured env is passed,
    // with ${env:...} resolved.
    let v = h
        .call(&a, "local__env", json!({"name": "TG_TEST_AGENT_SECRET"}))
        .await;
    assert_eq!(
        v["result"]["structuredContent"]["value"],
        Value::Null,
        "{v}"
    );
    let v = h
        .call(&a, "local__env", json!({"name": "DEMO_GREETING"}))
        .await;
    assert_eq!(
        v["result"]["structuredContent"]["value"], "hello upstream-credential",
        "{v}"
    );
    let v = h.call(&a, "local__env", json!({"name": "PATH"})).await;
    assert!(v["result"]["structuredContent"]["value"].is_string(), "{v}");
}

/// The pid of the process serving `token`'s session `sid`.
async fn session_pid(h: &Harness, token: &str, sid: &str) -> u32 {
    let (_, v) = h
        .in_session(
            token,
            sid,
            "tools/call",
            json!({"name": "local__pid", "arguments": {}}),
        )
        .await;
    v["result"]["structuredContent"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid: {v}")) as u32
}

/// Waits (up to 10 s) until `cond` holds.
async fn eventually(cond: impl Fn() -> bool) -> bool {
    for _ in 0..200 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

#[tokio::test]
async fn each_agent_session_gets_its_own_process_and_ending_the_session_stops_it() {
    let h = harness().await;
    let (a, b) = (h.token("bot"), h.token("other-bot"));
    let (s1, s2) = (h.initialize(&a).await, h.initialize(&a).await);
    let (p1, p2) = (
        session_pid(&h, &a, &s1).await,
        session_pid(&h, &a, &s2).await,
    );
    assert_ne!(
        p1, p2,
        "two sessions of one agent must not share a stdio session"
    );
    assert_eq!(
        session_pid(&h, &a, &s1).await,
        p1,
        "a session keeps its process"
    );
    assert_eq!(
        session_pid(&h, &a, &s2).await,
        p2,
        "a session keeps its process"
    );
    // Sessionless (2026-07-28) calls of the agent share one process of
    // their own.
    let stateless = pid(&h, &a).await;
    assert!(![p1, p2].contains(&stateless), "{stateless}");
    assert_eq!(pid(&h, &a).await, stateless);
    // Another agent shares none of them, with or without a session.
    let sb = h.initialize(&b).await;
    for p in [session_pid(&h, &b, &sb).await, pid(&h, &b).await] {
        assert!(![p1, p2, stateless].contains(&p), "{p} is another agent's");
    }

    // Ending a session stops its process, and only its.
    let s = h.delete_session(&a, &s1).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(
        eventually(|| !running(p1)).await,
        "{p1} outlived its session"
    );
    assert!(running(p2) && running(stateless));
    assert_eq!(session_pid(&h, &a, &s2).await, p2);
    let s3 = h.initialize(&a).await;
    let p3 = session_pid(&h, &a, &s3).await;
    assert!(
        ![p1, p2, stateless].contains(&p3),
        "a new session, a new process"
    );
}

/// Opens a tools/call in `sid` that answers with an event stream.
async fn streaming_call(
    h: &Harness,
    token: &str,
    sid: &str,
    id: u32,
    tool: &str,
    args: Value,
    meta: Value,
) -> hyper::body::Incoming {
    let call = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": args, "_meta": meta}});
    let req = http::Request::post(&h.url)
        .header("content-type", "application/json")
        .header("accept", "text/event-stream, application/json")
        .header("authorization", format!("Bearer {token}"))
        .header("mcp-session-id", sid)
        .header("mcp-protocol-version", "2025-11-25")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            call.to_string(),
        )))
        .expect("request");
    let resp = h.client.request(req).await.expect("toolgate answers");
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    resp.into_body()
}

#[tokio::test]
async fn a_stdio_servers_ask_reaches_the_session_whose_call_made_it() {
    let h = harness().await;
    let t = h.token("bot");
    let (busy, asking) = (h.initialize(&t).await, h.initialize(&t).await);
    // One session has calls in flight with streams open...
    let mut busy_calls = Vec::new();
    for n in 1..=3 {
        let mut body = streaming_call(
            &h,
            &t,
            &busy,
            n,
            "local__sleep",
            json!({"ms": 1500}),
            json!({"progressToken": n}),
        )
        .await;
        let (mut buf, mut seen) = (String::new(), 0);
        let first = next_event(&mut body, &mut buf, &mut seen).await.unwrap();
        assert_eq!(first["params"]["progressToken"], n, "{first}");
        busy_calls.push((n, body, buf, seen));
    }
    // ...when the other's call makes its server ask: the ask reaches the
    // call that made it.
    let mut a = streaming_call(
        &h,
        &t,
        &asking,
        9,
        "local__ask",
        json!({"message": "Which session?"}),
        json!({}),
    )
    .await;
    let (mut abuf, mut aseen) = (String::new(), 0);
    let ask = next_event(&mut a, &mut abuf, &mut aseen).await.unwrap();
    assert_eq!(ask["method"], "elicitation/create", "{ask}");
    assert_eq!(ask["params"]["message"], "Which session?");
    let reply = json!({"jsonrpc": "2.0", "id": ask["id"], "result": {"action": "decline"}});
    let session = [
        ("mcp-session-id", asking.as_str()),
        ("mcp-protocol-version", "2025-11-25"),
    ];
    let (s, _, _) = h.post(Some(&t), &session, reply.to_string()).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let result = next_event(&mut a, &mut abuf, &mut aseen).await.unwrap();
    assert_eq!(result["id"], 9, "{result}");
    assert_eq!(
        result["result"]["structuredContent"]["answer"]["action"], "decline",
        "{result}"
    );
    // The busy session saw nothing of it: each call's next event is its
    // result.
    for (n, mut body, mut buf, mut seen) in busy_calls {
        let done = next_event(&mut body, &mut buf, &mut seen).await.unwrap();
        assert_eq!(done["id"], n, "{done}");
        assert_eq!(text(&done), "slept 1500 ms", "{done}");
    }
}

#[tokio::test]
async fn a_crash_mid_call_fails_that_call_at_once_and_the_next_call_restarts_it() {
    let h = harness().await;
    let t = h.token("bot");
    let first = pid(&h, &t).await;
    let call = {
        let t = t.clone();
        let h = &h;
        async move {
            let started = Instant::now();
            let v = h.call(&t, "local__sleep", json!({"ms": 10_000})).await;
            (v, started.elapsed())
        }
    };
    let killer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        kill9(first);
    };
    let ((v, took), ()) = tokio::join!(call, killer);
    assert_eq!(v["error"]["code"], -32004, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("exited")),
        "the call fails because the server died, not by timing out: {v}"
    );
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    // The next call restarts the server.
    let second = pid(&h, &t).await;
    assert_ne!(first, second, "a new process");
    let v = h.call(&t, "local__echo", json!({"text": "back"})).await;
    assert_eq!(text(&v), "back", "{v}");
    let audit = h.audit().await;
    assert!(
        audit
            .iter()
            .any(|r| r["event"] == "upstream_error" && r["tool"] == "local__sleep"),
        "the failed call is audited: {audit:?}"
    );
}

#[tokio::test]
async fn a_call_past_upstream_timeout_is_cancelled_and_the_server_keeps_serving() {
    let h = harness().await;
    let t = h.token("bot");
    let before = pid(&h, &t).await;
    let v = h.call(&t, "local__sleep", json!({"ms": 5_000})).await;
    assert_eq!(v["error"]["code"], -32004, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("timed out")),
        "{v}"
    );
    assert_eq!(pid(&h, &t).await, before, "same process, still serving");
}

#[tokio::test]
async fn a_server_that_cannot_start_fails_closed_and_backs_off() {
    let h = Harness::with(Opts {
        manifests: &[("bot.yaml", MANIFEST)],
        upstreams: Some(
            "upstreams:\n  - name: local\n    command: [/nonexistent/mcp-server]".into(),
        ),
        ..Opts::default()
    })
    .await;
    let t = h.token("bot");
    let v = h.call(&t, "local__echo", json!({"text": "x"})).await;
    assert_eq!(v["error"]["code"], -32004, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("cannot start") || msg.contains("restart"),
        "names the problem: {v}"
    );
    let v = h.call(&t, "local__echo", json!({"text": "x"})).await;
    assert_eq!(v["error"]["code"], -32004, "{v}");
    assert!(h.received().is_empty());
}

#[tokio::test]
async fn shutdown_stops_every_stdio_process() {
    let h = harness().await;
    let (a, b) = (h.token("bot"), h.token("other-bot"));
    let pids = [pid(&h, &a).await, pid(&h, &b).await];
    assert!(pids.iter().all(|p| running(*p)));
    let Harness { server, .. } = h;
    server.shutdown(Duration::from_secs(5)).await;
    for p in pids {
        assert!(!running(p), "process {p} outlived toolgate");
    }
}

#[tokio::test]
async fn progress_of_a_stdio_call_reaches_the_agent_that_asked_for_it() {
    let h = harness().await;
    let t = h.token("bot");
    let (ct, msgs) = h
        .call_messages(
            &t,
            "application/json, text/event-stream",
            "local__sleep",
            json!({"ms": 200}),
            json!({"progressToken": 42}),
        )
        .await;
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    assert_eq!(
        msgs.len(),
        2,
        "only this call's progress, then the result: {msgs:?}"
    );
    assert_eq!(msgs[0]["method"], "notifications/progress");
    assert_eq!(msgs[0]["params"]["progressToken"], 42);
    assert_eq!(msgs[1]["result"]["content"][0]["text"], "slept 200 ms");
}

#[tokio::test]
async fn a_stdio_servers_stderr_reaches_the_operator_log_and_its_log_messages_the_calling_agent() {
    let log = support::operator_log();
    let h = harness().await;
    let t = h.token("bot");
    let server = pid(&h, &t).await;
    let line = format!("stderr line of test process {}", std::process::id());

    // With an event stream open, the server's logging notification reaches
    // the agent before the result.
    let (ct, msgs) = h
        .call_messages(
            &t,
            "application/json, text/event-stream",
            "local__log",
            json!({"text": line}),
            json!({}),
        )
        .await;
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let methods = support::methods(&msgs);
    assert_eq!(methods, ["notifications/message", "(response)"], "{msgs:?}");
    assert_eq!(msgs[0]["params"]["data"], line.as_str(), "{msgs:?}");
    assert_eq!(msgs[0]["params"]["level"], "info", "{msgs:?}");
    assert_eq!(text(&msgs[1]), "logged", "{msgs:?}");

    // What it wrote to stderr is in toolgate's operator log, naming the
    // upstream and the process.
    let entry = log
        .wait_for(|l| l["fields"]["stderr"] == line.as_str())
        .await
        .unwrap_or_else(|| panic!("no stderr line in the operator log: {:?}", log.lines()));
    assert_eq!(entry["fields"]["message"], "stdio server stderr", "{entry}");
    assert_eq!(entry["fields"]["upstream.name"], "local", "{entry}");
    assert_eq!(entry["fields"]["pid"], server, "{entry}");
    assert_eq!(entry["level"], "INFO", "{entry}");

    // A session agent taking JSON only has no stream to relay it on: the
    // logging notification goes to the operator log instead, and the agent
    // gets the result alone.
    let quiet = format!("{line}, no stream open");
    let sid = h.initialize(&t).await;
    let session_server = session_pid(&h, &t, &sid).await;
    let body = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "local__log", "arguments": {"text": quiet}}});
    let (s, hd, v) = h
        .post(
            Some(&t),
            &[
                ("accept", "application/json"),
                ("mcp-session-id", &sid),
                ("mcp-protocol-version", "2025-11-25"),
            ],
            body.to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(hd["content-type"], "application/json", "{v}");
    assert_eq!(text(&v), "logged", "{v}");
    let entry = log
        .wait_for(|l| {
            l["fields"]["message"] == "stdio server log"
                && l["fields"]["data"]
                    .as_str()
                    .is_some_and(|d| d.contains(&quiet))
        })
        .await
        .unwrap_or_else(|| panic!("no log message in the operator log: {:?}", log.lines()));
    assert_eq!(entry["fields"]["pid"], session_server, "{entry}");
}

#[tokio::test]
async fn a_tools_list_changed_notification_refreshes_the_catalog() {
    let dir = support::temp_dir("stdio-reveal");
    let h = Harness::with(Opts {
        manifests: &[("bot.yaml", MANIFEST)],
        upstreams: Some(format!(
            "upstreams:\n  - name: local\n    command: [\"{}\", demo-tools]\n    env: {{ DEMO_STATE_DIR: \"{}\" }}",
            env!("CARGO_BIN_EXE_toolgate"),
            dir.display()
        )),
        ..Opts::default()
    })
    .await;
    let t = h.token("bot");
    // A session-era agent listens on its session's GET stream.
    let sid = h.initialize(&t).await;
    let get = |token: &str, sid: Option<&str>| {
        let mut r = http::Request::get(&h.url)
            .header("authorization", format!("Bearer {token}"))
            .header("accept", "text/event-stream")
            .header("mcp-protocol-version", "2025-11-25");
        if let Some(s) = sid {
            r = r.header("mcp-session-id", s);
        }
        h.client.request(
            r.body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
    };
    let listening = get(&t, Some(&sid)).await.unwrap();
    assert_eq!(listening.status(), StatusCode::OK);
    assert_eq!(listening.headers()["content-type"], "text/event-stream");
    let mut stream = listening.into_body();
    // One stream per session; none without a session, nor on another's.
    assert_eq!(
        get(&t, Some(&sid)).await.unwrap().status(),
        StatusCode::CONFLICT
    );
    assert_eq!(
        get(&t, None).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let other = h.token("other-bot");
    assert_eq!(
        get(&other, Some(&sid)).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let names = |v: &Value| -> Vec<String> {
        v["result"]["tools"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (_, v) = h.modern(&t, "tools/list", json!({})).await;
    assert!(!names(&v).contains(&"local__hidden".to_owned()), "{v}");
    let v = h.call(&t, "local__reveal", json!({})).await;
    assert_eq!(text(&v), "revealed", "{v}");
    // The server's list_changed reaches the listening agent on its own.
    let (mut buf, mut seen) = (String::new(), 0);
    let note = next_event(&mut stream, &mut buf, &mut seen).await;
    assert_eq!(
        note.as_ref().map(|n| n["method"].clone()),
        Some(json!("notifications/tools/list_changed")),
        "{note:?}"
    );
    // Well within the catalog's 30 s freshness: only the notification can
    // make toolgate list again.
    let (_, v) = h.modern(&t, "tools/list", json!({})).await;
    assert!(names(&v).contains(&"local__hidden".to_owned()), "{v}");
    let v = h.call(&t, "local__hidden", json!({})).await;
    assert_eq!(text(&v), "found", "{v}");
}

/// Reads `body` until it holds one more complete SSE event than `seen`;
/// returns that event's data as JSON.
async fn next_event(
    body: &mut hyper::body::Incoming,
    buf: &mut String,
    seen: &mut usize,
) -> Option<Value> {
    use http_body_util::BodyExt;
    loop {
        let events: Vec<&str> = buf.split("\n\n").filter(|e| e.contains("data: ")).collect();
        let complete = if buf.ends_with("\n\n") {
            events.len()
        } else {
            events.len().saturating_sub(1)
        };
        if complete > *seen {
            let e = events[*seen];
            *seen += 1;
            let data = e.lines().find_map(|l| l.strip_prefix("data: "))?;
            return serde_json::from_str(data).ok();
        }
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the stream goes on")?
            .ok()?;
        if let Ok(d) = frame.into_data() {
            buf.push_str(&String::from_utf8_lossy(&d));
        }
    }
}

#[tokio::test]
async fn an_elicitation_from_a_stdio_server_reaches_the_calling_agent_and_only_its_answer_returns()
{
    use http_body_util::Full;
    let h = harness().await;
    let t = h.token("bot");
    let other = h.token("other-bot");
    let sid = h.initialize(&t).await;
    let call = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": "local__ask", "arguments": {"message": "Deploy to prod?"}}});
    let req = http::Request::post(&h.url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("authorization", format!("Bearer {t}"))
        .header("mcp-session-id", &sid)
        .header("mcp-protocol-version", "2025-11-25")
        .body(Full::new(bytes::Bytes::from(call.to_string())))
        .unwrap();
    let resp = h.client.request(req).await.unwrap();
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut body = resp.into_body();
    let (mut buf, mut seen) = (String::new(), 0);
    let ask = next_event(&mut body, &mut buf, &mut seen)
        .await
        .expect("the server's question");
    assert_eq!(ask["method"], "elicitation/create", "{ask}");
    assert_eq!(ask["params"]["message"], "Deploy to prod?");
    let ask_id = ask["id"].as_str().expect("toolgate's own id").to_owned();
    assert!(ask_id.starts_with("toolgate-ask:local:"), "{ask_id}");

    let answer = |ok: bool| {
        json!({"jsonrpc": "2.0", "id": ask_id, "result": {"action": "accept", "content": {"ok": ok}}}).to_string()
    };
    // Another agent cannot answer it (the id is bound to the agent asked).
    let (s, _, _) = h.post(Some(&other), &[], answer(false)).await;
    assert_eq!(s, http::StatusCode::ACCEPTED);
    let session = [
        ("mcp-session-id", sid.as_str()),
        ("mcp-protocol-version", "2025-11-25"),
    ];
    let (s, _, _) = h.post(Some(&t), &session, answer(true)).await;
    assert_eq!(s, http::StatusCode::ACCEPTED);
    // Answered once: a replay goes nowhere.
    let (s, _, _) = h.post(Some(&t), &session, answer(false)).await;
    assert_eq!(s, http::StatusCode::ACCEPTED);

    let result = next_event(&mut body, &mut buf, &mut seen)
        .await
        .expect("the call's result");
    assert_eq!(result["id"], 5, "{result}");
    assert_eq!(
        result["result"]["structuredContent"]["answer"],
        json!({"action": "accept", "content": {"ok": true}}),
        "the asked agent's answer, not the other's: {result}"
    );

    // A 2026-07-28 agent takes no server requests: it gets the question as
    // an input_required round instead (see the next test), never as a
    // server request on its stream.
    let (_, msgs) = h
        .call_messages(
            &t,
            "application/json, text/event-stream",
            "local__ask",
            json!({}),
            json!({}),
        )
        .await;
    let last = msgs.last().unwrap();
    assert_eq!(last["result"]["resultType"], "input_required", "{msgs:?}");
    assert!(
        msgs.iter().all(|m| m.get("method").is_none()),
        "no server request reached the 2026-07-28 agent: {msgs:?}"
    );
}

#[tokio::test]
async fn a_2026_agent_gets_a_session_era_servers_ask_as_an_input_required_round() {
    let h = harness().await;
    let t = h.token("bot");
    let args = json!({"message": "Deploy to prod?"});
    let (_, v) = h
        .modern(
            &t,
            "tools/call",
            json!({"name": "local__ask", "arguments": args}),
        )
        .await;
    let round = &v["result"];
    assert_eq!(round["resultType"], "input_required", "{v}");
    let requests = round["inputRequests"].as_object().expect("input requests");
    assert_eq!(requests.len(), 1, "{v}");
    let (key, ask) = requests.iter().next().unwrap();
    assert_eq!(ask["method"], "elicitation/create", "{v}");
    assert_eq!(ask["params"]["message"], "Deploy to prod?", "{v}");
    let state = round["requestState"].as_str().unwrap().to_owned();
    let retry = |answer: bool, state: &str| {
        json!({"name": "local__ask", "arguments": args,
            "requestState": state,
            "inputResponses": {key.as_str(): {"action": "accept", "content": {"ok": answer}}}})
    };
    // Another agent cannot resume it, nor can other arguments.
    let other = h.token("other-bot");
    let (_, v) = h.modern(&other, "tools/call", retry(false, &state)).await;
    assert_eq!(v["error"]["code"], -32602, "{v}");
    let (_, v) = h
        .modern(
            &t,
            "tools/call",
            json!({"name": "local__ask", "arguments": {"message": "other"}, "requestState": state,
                "inputResponses": {key.as_str(): {"action": "accept", "content": {"ok": false}}}}),
        )
        .await;
    assert_eq!(v["error"]["code"], -32602, "{v}");
    // The agent's retry answers the server, and the call completes.
    let (_, v) = h.modern(&t, "tools/call", retry(true, &state)).await;
    assert_eq!(
        v["result"]["structuredContent"]["answer"],
        json!({"action": "accept", "content": {"ok": true}}),
        "{v}"
    );
    assert_eq!(v["result"]["resultType"], "complete");
    // Used once.
    let (_, v) = h.modern(&t, "tools/call", retry(true, &state)).await;
    assert_eq!(v["error"]["code"], -32602, "{v}");
    // Every round is a decided, audited call.
    let audit = h.audit().await;
    let calls = audit
        .iter()
        .filter(|r| r["event"] == "call" && r["tool"] == "local__ask")
        .count();
    assert_eq!(calls, 5, "{audit:#?}");
}

/// A stdio upstream running the Python script `script` (with the path of a
/// file it writes its process ids to), its harness, and the ids written.
struct Scripted {
    h: Harness,
    pids: Pids,
}

/// The file of process ids; dropped, it kills whatever a failed test left
/// running.
struct Pids {
    path: std::path::PathBuf,
    _dir: support::Scratch,
}

impl Pids {
    /// Every process id written (each line: a server's own, then any it
    /// forked).
    fn all(&self) -> Vec<u32> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Pids {
    fn drop(&mut self) {
        for p in self.all().into_iter().filter(|p| running(*p)) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &p.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

impl Scripted {
    async fn start(tag: &str, script: &str) -> Scripted {
        let dir = support::temp_dir(tag);
        let (path, pids) = (dir.join("server.py"), dir.join("pids"));
        std::fs::write(&path, script).expect("write the server");
        let h = Harness::with(Opts {
            manifests: &[("bot.yaml", MANIFEST)],
            upstreams: Some(format!(
                "upstreams:\n  - name: local\n    command: [python3, \"{}\", \"{}\"]",
                path.display(),
                pids.display()
            )),
            ..Opts::default()
        })
        .await;
        let pids = Pids {
            path: pids,
            _dir: dir,
        };
        Scripted { h, pids }
    }

    fn pids(&self) -> Vec<u32> {
        self.pids.all()
    }

    /// The process ids written by the server `leader`, itself first.
    fn group(&self, leader: u32) -> Vec<u32> {
        std::fs::read_to_string(&self.pids.path)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .find(|g: &Vec<u32>| g.first() == Some(&leader))
            .unwrap_or_else(|| panic!("{leader} wrote no pids"))
    }
}

/// Writes its pid, reads stdin, never answers, and outlives its stdin.
const MUTE: &str = r#"
import os, sys, time
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()}\n")
for _ in sys.stdin:
    pass
while True:
    time.sleep(1)
"#;

#[tokio::test]
async fn a_server_that_never_answers_initialize_is_killed_and_its_restarts_back_off() {
    let s = Scripted::start("stdio-mute", MUTE).await;
    let t = s.h.token("bot");
    let timeout = s.h.server.gate.0.upstreams[0].timeout();
    let call = || async {
        let started = Instant::now();
        let v = s.h.call(&t, "local__echo", json!({"text": "x"})).await;
        assert_eq!(v["error"]["code"], -32004, "{v}");
        started.elapsed()
    };
    let all_gone = |s: &Scripted| {
        let pids = s.pids();
        !pids.is_empty() && pids.iter().all(|p| !running(*p))
    };
    // The first call spends one timeout on the start (for the catalog);
    // the call itself is then refused at once, not given a start of its
    // own, and the server that timed out is killed.
    let took = call().await;
    assert!(took < timeout + Duration::from_secs(1), "took {took:?}");
    assert!(eventually(|| all_gone(&s)).await, "alive: {:?}", s.pids());
    // Within the backoff, no start is tried.
    let took = call().await;
    assert!(took < Duration::from_millis(500), "took {took:?}");
    assert_eq!(s.pids().len(), 1, "{:?}", s.pids());
    // Past it, one more start, killed in turn.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let took = call().await;
    assert!(took < timeout + Duration::from_secs(1), "took {took:?}");
    assert!(eventually(|| all_gone(&s)).await, "alive: {:?}", s.pids());
    assert_eq!(s.pids().len(), 2, "{:?}", s.pids());
    assert!(s.h.server.gate.0.upstreams[0].stdio_pids().is_empty());
}

/// An MCP server (tools `pid` and `sleep`) that forks a child ignoring
/// SIGTERM and holding its stdout; writes "its-pid child-pid".
const FORKER: &str = r#"
import json, os, signal, sys, time
child = os.fork()
if child == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)
    os._exit(0)
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()} {child}\n")
def send(m):
    sys.stdout.write(json.dumps(m) + "\n")
    sys.stdout.flush()
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m:
        continue
    method, id = m.get("method"), m["id"]
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": id, "result": {"protocolVersion": "2025-11-25",
              "capabilities": {"tools": {}}, "serverInfo": {"name": "forker", "version": "1"}}})
    elif method == "tools/list":
        tools = [{"name": n, "inputSchema": {"type": "object"}} for n in ("pid", "sleep")]
        send({"jsonrpc": "2.0", "id": id, "result": {"tools": tools}})
    elif method == "tools/call":
        if m["params"]["name"] == "sleep":
            time.sleep(30)
        send({"jsonrpc": "2.0", "id": id, "result": {"structuredContent": {"pid": os.getpid()},
              "content": [{"type": "text", "text": str(os.getpid())}]}})
    else:
        send({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": method}})
"#;

#[tokio::test]
async fn stopping_a_stdio_server_stops_what_it_forked() {
    let s = Scripted::start("stdio-forker-stop", FORKER).await;
    let t = s.h.token("bot");
    let sid = s.h.initialize(&t).await;
    let session = s.group(session_pid(&s.h, &t, &sid).await);
    let stateless = s.group(pid(&s.h, &t).await);
    assert_eq!((session.len(), stateless.len()), (2, 2));
    assert!(session.iter().chain(&stateless).all(|p| running(*p)));
    // Ending the session stops its server and the child that ignores
    // SIGTERM, and nothing else.
    let status = s.h.delete_session(&t, &sid).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(
        eventually(|| session.iter().all(|p| !running(*p))).await,
        "{session:?} outlived its session"
    );
    assert!(stateless.iter().all(|p| running(*p)));
    // Shutdown stops every group before it returns.
    let Scripted { h, pids } = s;
    let Harness { server, .. } = h;
    server.shutdown(Duration::from_secs(5)).await;
    let left: Vec<u32> = pids.all().into_iter().filter(|p| running(*p)).collect();
    assert!(left.is_empty(), "{left:?} outlived toolgate");
}

#[tokio::test]
async fn a_server_that_crashes_while_its_child_holds_stdout_fails_its_calls_at_once() {
    let s = Scripted::start("stdio-forker-crash", FORKER).await;
    let t = s.h.token("bot");
    let first = s.group(pid(&s.h, &t).await);
    let call = async {
        let started = Instant::now();
        let v = s.h.call(&t, "local__sleep", json!({})).await;
        (v, started.elapsed())
    };
    let killer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        kill9(first[0]);
    };
    let ((v, took), ()) = tokio::join!(call, killer);
    assert_eq!(v["error"]["code"], -32004, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("exited")),
        "the call fails because the server died, not by timing out: {v}"
    );
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    // What it forked goes with it, and the next call restarts the server.
    assert!(
        eventually(|| !running(first[1])).await,
        "{} outlived its server",
        first[1]
    );
    let second = pid(&s.h, &t).await;
    assert_ne!(first[0], second, "a new process");
}
