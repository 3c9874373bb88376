//! The approver page end to end in headless Chromium, driven over the W3C
//! WebDriver protocol by Debian's chromedriver: an agent's call is held, the
//! hold appears on the page, an approver signs in and approves it there, and
//! the agent's retry goes through. Arguments carry script-injection attempts
//! that must render as text. Screenshots land in `target/`.

// Test helpers may unwrap: a panic there is a failed assertion.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::{approver_token, Harness, Opts};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Driver {
    base: String,
    session: String,
    client: toolgate::upstream::HttpClient,
    _child: Kill,
    /// Chromium's profile, removed after the browser is gone.
    _profile: support::Scratch,
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn find_binary(env: &str, candidates: &[&str]) -> String {
    if let Ok(p) = std::env::var(env) {
        return p;
    }
    for c in candidates {
        if std::path::Path::new(c).exists() {
            return (*c).to_owned();
        }
    }
    panic!("{} not found: run `bash scripts/test.sh`, which installs Debian's chromium and chromium-driver (or set {env})", candidates[0]);
}

impl Driver {
    async fn start() -> Driver {
        let chromedriver = find_binary("TOOLGATE_CHROMEDRIVER", &["/usr/bin/chromedriver"]);
        let chromium = find_binary("TOOLGATE_CHROMIUM", &["/usr/bin/chromium"]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = support::temp_dir("chromium");
        let profile_arg = format!("--user-data-dir={}", profile.display());
        let mut d = Driver {
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            client: toolgate::upstream::http_client(),
            _child: Kill(child),
            _profile: profile,
        };
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1200,900", profile_arg],
        }}}});
        let started = Instant::now();
        let v = loop {
            match d
                .try_send(http::Method::POST, "/session", Some(caps.clone()))
                .await
            {
                Some(v) if v["value"]["sessionId"].is_string() => break v,
                other => {
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "no WebDriver session: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        d.session = v["value"]["sessionId"].as_str().unwrap().to_owned();
        d
    }

    async fn try_send(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> Option<Value> {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .unwrap();
        let resp = self.client.request(req).await.ok()?;
        let bytes = resp.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice(&bytes).ok()
    }

    async fn cmd(&self, method: http::Method, path: &str, body: Option<Value>) -> Value {
        let p = format!("/session/{}{path}", self.session);
        let v = self
            .try_send(method, &p, body)
            .await
            .expect("webdriver answers");
        assert!(v["value"].get("error").is_none(), "webdriver {path}: {v}");
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(http::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    async fn find(&self, css: &str) -> String {
        let started = Instant::now();
        loop {
            let p = format!("/session/{}/element", self.session);
            let v = self
                .try_send(
                    http::Method::POST,
                    &p,
                    Some(json!({"using": "css selector", "value": css})),
                )
                .await
                .unwrap();
            if let Some(id) = v["value"][ELEMENT].as_str() {
                return id.to_owned();
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{css} never appeared"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd(
            http::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd(
            http::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn eval(&self, script: &str) -> Value {
        self.cmd(
            http::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    async fn screenshot(&self, name: &str) {
        use base64::Engine as _;
        let v = self.cmd(http::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or(""))
            .unwrap_or_default();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
        let _ = std::fs::write(dir.join(name), png);
    }
}

const OPS_BOT: &str = "agent: ops-bot\ntools:\n  - name: billing__grant_role\n    hold_when:\n      - { pointer: /role, in: [admin] }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_is_approved_in_the_browser_and_the_agents_retry_goes_through() {
    let h = Harness::with(Opts {
        manifests: &[("ops-bot.yaml", OPS_BOT)],
        require_amr: "[mfa]",
        ..Opts::default()
    })
    .await;
    let agent = h.token("ops-bot");
    let evil = "<img src=x onerror=\"window.pwned=1\"></pre><script>window.pwned=2</script>";
    let args = json!({"principal": evil, "role": "admin"});
    let v = h.call(&agent, "billing__grant_role", args.clone()).await;
    assert_eq!(v["error"]["code"], -32010, "{v}");
    let hold = v["error"]["data"]["hold_id"].as_str().unwrap().to_owned();

    let d = Driver::start().await;
    let result = async {
        d.goto(&format!("{}/", h.admin_url())).await;
        d.type_into(
            "#token",
            &approver_token("alice", &["approver"], &["pwd", "mfa"]),
        )
        .await;
        d.click("#signin-button").await;
        let card = format!("article.hold[data-hold-id='{hold}']");
        d.find(&card).await;
        // Attacker-controlled arguments are shown as text, never run.
        let shown = d
            .eval(&format!(
                "return document.querySelector(\"{card} pre.args\").textContent"
            ))
            .await;
        assert!(shown.as_str().unwrap().contains("onerror"), "{shown}");
        let safe = d.eval("return window.pwned === undefined && document.querySelectorAll('img, script:not([src])').length === 0").await;
        assert_eq!(safe, json!(true), "script injection through arguments");
        // The token is not in the URL, and lives in session storage only.
        let url = d.eval("return location.href").await;
        assert!(!url.as_str().unwrap().contains("eyJ"), "{url}");
        let stored = d.eval("return [sessionStorage.getItem('toolgate.token') !== null, localStorage.length, document.cookie]").await;
        assert_eq!(stored, json!([true, 0, ""]));
        d.screenshot("approver-page.png").await;
        d.type_into(&format!("{card} .decision-reason"), "ticket OPS-7")
            .await;
        d.click(&format!("{card} .approve")).await;
        // The card leaves the pending list and shows under recent decisions.
        d.find(&format!("#recent tr[data-hold-id='{hold}']")).await;
        d.screenshot("approver-page-after.png").await;
    };
    let outcome = tokio::time::timeout(Duration::from_secs(90), result).await;
    if outcome.is_err() {
        d.screenshot("approver-page-failure.png").await;
        panic!("the browser flow timed out (screenshot in target/approver-page-failure.png)");
    }
    let (_, held) = h
        .admin(
            http::Method::GET,
            &format!("/v1/holds/{hold}"),
            Some(&approver_token("v", &["viewer"], &[])),
            None,
        )
        .await;
    assert_eq!(held["status"], "approved", "{held}");
    assert_eq!(held["approvals"][0]["approver"], "alice");
    assert_eq!(held["approvals"][0]["reason"], "ticket OPS-7");
    let v = h.call(&agent, "billing__grant_role", args).await;
    assert!(v.get("result").is_some(), "{v}");
    assert_eq!(h.received(), ["grant_role"]);
    let _ = d
        .try_send(
            http::Method::DELETE,
            &format!("/session/{}", d.session),
            None,
        )
        .await;
}
