//! Interop with the Node side of the MCP world: the official conformance
//! suite (`@modelcontextprotocol/conformance`, on Node 22) against
//! `@modelcontextprotocol/server-everything` directly and through toolgate,
//! the TypeScript SDK client (`examples/typescript/client.mjs`), and the
//! stdio `@modelcontextprotocol/server-filesystem` behind the example config
//! `examples/stdio/`. The pinned packages come from `scripts/setup-interop.sh`
//! (run by `scripts/test.sh`).

// Test helpers may unwrap: a panic there is a failed assertion.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::{Harness, Opts};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/interop/node`, with its pinned `node_modules`.
fn node_dir() -> PathBuf {
    let dir = std::env::var("TOOLGATE_NODE_DIR").unwrap_or_else(|_| {
        panic!("TOOLGATE_NODE_DIR is not set: run `bash scripts/test.sh` (or `eval \"$(bash scripts/setup-interop.sh)\"` and export TOOLGATE_NODE_DIR) to install the pinned npm packages")
    });
    PathBuf::from(dir)
}

/// The pinned Node 22 (the npm `node` package).
fn node() -> PathBuf {
    node_dir().join("node_modules/.bin/node")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on port {port}");
}

async fn run(mut c: Command) -> Output {
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

/// Starts server-everything (streamable HTTP); returns its URL.
async fn everything() -> (Kill, String) {
    let port = free_port();
    let child = Command::new(node())
        .arg(node_dir().join("node_modules/@modelcontextprotocol/server-everything/dist/index.js"))
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let guard = Kill(child);
    wait_for_port(port).await;
    (guard, format!("http://127.0.0.1:{port}/mcp"))
}

/// What one conformance run found.
struct Run {
    /// Every check, as `scenario/check-id` -> status.
    checks: BTreeMap<String, String>,
    /// The tool names the `tools-list` scenario saw listed.
    listed: BTreeSet<String>,
}

/// Runs the conformance suite's server scenarios against `url` (with the
/// agent token on every request when given).
async fn conformance(url: &str, token: Option<&str>) -> Run {
    let out_dir = support::temp_dir("conformance");
    let mut c = Command::new(node());
    c.current_dir(node_dir());
    if let Some(t) = token {
        // The runner cannot be told to send a header; an agent framework
        // would be configured with one. The preload adds it (see the file).
        c.arg("--import=./inject-token.mjs")
            .env("TOOLGATE_URL", url)
            .env("TOOLGATE_TOKEN", t);
    }
    c.arg("node_modules/@modelcontextprotocol/conformance/dist/index.js")
        .args(["server", "--url", url, "-o"])
        .arg(&out_dir);
    let out = run(c).await;
    let mut checks = BTreeMap::new();
    let mut listed = BTreeSet::new();
    for entry in std::fs::read_dir(&out_dir).unwrap() {
        let dir = entry.unwrap().path();
        // server-<scenario>-<timestamp with 6 dashes>
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("server-") {
            continue; // the scratch folder's own
        }
        let scenario = name.rsplitn(7, '-').last().unwrap()["server-".len()..].to_owned();
        let text = std::fs::read_to_string(dir.join("checks.json")).unwrap();
        let list: Vec<Value> = serde_json::from_str(&text).unwrap();
        for c in list {
            if scenario == "tools-list" {
                let names = c["details"]["tools"].as_array().into_iter().flatten();
                listed.extend(names.filter_map(Value::as_str).map(str::to_owned));
            }
            checks.insert(
                format!("{scenario}/{}", c["id"].as_str().unwrap()),
                c["status"].as_str().unwrap().to_owned(),
            );
        }
    }
    assert!(
        checks.len() >= 30,
        "the suite ran too few checks ({}):\n{}\n{}",
        checks.len(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Run { checks, listed }
}

/// Where the parity test leaves its report: cargo shows a passing test's
/// output to nobody, so `scripts/test.sh` prints this file after the tests.
fn report_path() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
        .join("conformance-report.txt")
}

/// Writes the pass counts and sets of `runs`, and how each differs from
/// the first.
fn write_report(runs: &[(&str, &Run)]) {
    use std::fmt::Write;
    let mut out = String::from(
        "conformance suite 0.1.16 against server-everything 2026.8.31 (tests/interop_node.rs)\n",
    );
    let base = passing(&runs[0].1.checks);
    for (name, r) in runs {
        let p = passing(&r.checks);
        let _ = writeln!(
            out,
            "{name:>8}: {} of {} checks pass; tools-list saw {} tools",
            p.len(),
            r.checks.len(),
            r.listed.len()
        );
        for k in p.difference(&base) {
            let _ = writeln!(out, "          + {k}");
        }
        for k in base.difference(&p) {
            let _ = writeln!(out, "          - {k}");
        }
    }
    if runs.iter().any(|(n, _)| *n == "hidden") {
        let _ = writeln!(
            out,
            "hidden: the run with the test_* tools, get-sum and gzip-file-as-resource hidden"
        );
    }
    for (name, r) in runs {
        let _ = writeln!(out, "{name} passes:");
        for k in passing(&r.checks) {
            let _ = writeln!(out, "  {k}");
        }
    }
    let path = report_path();
    let _ = std::fs::create_dir_all(path.parent().unwrap());
    std::fs::write(&path, out).unwrap();
}

fn passing(checks: &BTreeMap<String, String>) -> BTreeSet<String> {
    checks
        .iter()
        .filter(|(_, s)| *s == "SUCCESS")
        .map(|(k, _)| k.clone())
        .collect()
}

fn everything_upstream(url: &str) -> String {
    format!("upstreams:\n  - name: everything\n    url: {url}\n    prefix: \"\"\n")
}

const ALLOW_ALL: &str = r#"
agent: conformance
rate_limit: 100000/min
tools:
  - name: "*"
resources: ["**"]
prompts: ["*"]
"#;

/// Lists server-everything's own tools by name, so the conformance suite's
/// `test_*` tools (which server-everything does not implement) are refused
/// (-32003), and hides two real server-everything tools as well: `get-sum`
/// denied, `gzip-file-as-resource` not listed. No scenario the suite passes
/// calls a real server-everything tool (they call `test_*` tools, prompts and
/// resources, which server-everything lacks, or only list), so hiding the
/// real ones changes no check; the `tools-list` scenario sees them gone.
const HIDE_TOOLS: &str = r#"
agent: conformance
rate_limit: 100000/min
tools:
  - name: echo
  - name: "get-*"
  - name: "trigger-*"
  - name: "toggle-*"
  - name: simulate-research-query
deny:
  - name: get-sum
    reason: hidden from the conformance run
resources: ["**"]
prompts: ["*"]
"#;

/// The real server-everything tools [`HIDE_TOOLS`] hides, with the rule
/// that refuses each.
const HIDDEN_REAL: [(&str, &str); 2] = [
    ("get-sum", "deny[0]"),
    ("gzip-file-as-resource", "unlisted"),
];

/// The one check toolgate passes and server-everything does not: it checks
/// Host and Origin itself (DNS-rebinding protection).
const TOOLGATE_ADDS: &str = "dns-rebinding-protection/localhost-host-rebinding-rejected";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_the_same_checks_through_toolgate_as_direct() {
    let (_server, url) = everything().await;
    let direct = conformance(&url, None).await;

    let h = Harness::with(Opts {
        manifests: &[("conformance.yaml", ALLOW_ALL)],
        upstreams: Some(everything_upstream(&url)),
        ..Opts::default()
    })
    .await;
    let token = h.token("conformance");
    let through = conformance(&h.url, Some(&token)).await;
    write_report(&[("direct", &direct), ("through", &through)]);

    let (d, t) = (passing(&direct.checks), passing(&through.checks));
    assert!(
        d.contains("server-initialize/server-initialize") && d.contains("tools-list/tools-list"),
        "the direct run itself is broken: {:?}",
        direct.checks
    );
    assert_eq!(
        direct.checks.keys().collect::<Vec<_>>(),
        through.checks.keys().collect::<Vec<_>>(),
        "the same checks ran"
    );
    let mut want = d.clone();
    want.insert(TOOLGATE_ADDS.to_owned());
    assert_eq!(
        t, want,
        "through toolgate: the direct pass set plus Host/Origin checking"
    );
    assert_eq!(
        through.listed, direct.listed,
        "the suite saw the same tools listed"
    );
    for (tool, _) in HIDDEN_REAL {
        assert!(
            direct.listed.contains(tool),
            "{tool} is a real tool: {:?}",
            direct.listed
        );
    }
    drop(h);

    // Hide the `test_*` tools two scenarios call, and two real tools:
    // exactly those scenarios fail now.
    let h = Harness::with(Opts {
        manifests: &[("conformance.yaml", HIDE_TOOLS)],
        upstreams: Some(everything_upstream(&url)),
        ..Opts::default()
    })
    .await;
    let token = h.token("conformance");
    let hidden = conformance(&h.url, Some(&token)).await;
    write_report(&[
        ("direct", &direct),
        ("through", &through),
        ("hidden", &hidden),
    ]);
    let hp = passing(&hidden.checks);
    let uses_hidden =
        |k: &str| k.starts_with("tools-call-simple-text/") || k.starts_with("tools-call-error/");
    let want: BTreeSet<String> = t.iter().filter(|k| !uses_hidden(k)).cloned().collect();
    assert_eq!(hp, want, "only the scenarios calling hidden tools changed");
    assert!(
        t.iter().any(|k| uses_hidden(k)),
        "they passed before hiding"
    );
    // The suite's own tools/list no longer shows the hidden real tools, and
    // shows every other tool as before.
    let mut want = through.listed.clone();
    for (tool, _) in HIDDEN_REAL {
        want.remove(tool);
    }
    assert_eq!(
        hidden.listed, want,
        "the tools-list scenario saw them hidden"
    );

    // Asked directly: absent from tools/list, refused with -32003 and the
    // rule, each refusal audited.
    let sid = h.initialize(&token).await;
    let (_, v) = h.in_session(&token, &sid, "tools/list", json!({})).await;
    let names: BTreeSet<&str> = v["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(names.contains("echo"), "{names:?}");
    for (tool, rule) in HIDDEN_REAL {
        assert!(!names.contains(tool), "{tool} listed: {names:?}");
        let args = json!({"a": 1, "b": 2, "name": "x", "data": "https://example.com/x"});
        let (_, v) = h
            .in_session(
                &token,
                &sid,
                "tools/call",
                json!({"name": tool, "arguments": args}),
            )
            .await;
        assert_eq!(v["error"]["code"], -32003, "{tool}: {v}");
        assert_eq!(v["error"]["data"]["rule"], rule, "{tool}: {v}");
    }
    let refused: Vec<Value> = h
        .audit()
        .await
        .into_iter()
        .filter(|r| r["event"] == "call" && r["decision"] == "deny")
        .collect();
    let names: BTreeSet<(&str, &str)> = refused
        .iter()
        .filter_map(|r| Some((r["tool"].as_str()?, r["rule"].as_str()?)))
        .collect();
    for (tool, rule) in HIDDEN_REAL.into_iter().chain([
        ("test_simple_text", "unlisted"),
        ("test_error_handling", "unlisted"),
    ]) {
        assert!(
            names.contains(&(tool, rule)),
            "{tool} by {rule}: {refused:?}"
        );
    }
    assert_eq!(
        refused
            .iter()
            .filter(|r| HIDDEN_REAL.iter().any(|(t, _)| r["tool"] == *t))
            .count(),
        2,
        "one record per refused call of a hidden real tool: {refused:?}"
    );
}

/// Runs `examples/typescript/client.mjs TOOL ARGS` against `url`.
async fn ts_example(url: &str, token: &str, tool: &str, args: &str) -> (bool, String) {
    let mut c = Command::new(node());
    c.arg(repo().join("examples/typescript/client.mjs"))
        .args([tool, args])
        .env("TOOLGATE_URL", url)
        .env("TOOLGATE_TOKEN", token);
    let out = run(c).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.code() != Some(0) && out.status.code() != Some(1) {
        panic!(
            "the example crashed ({:?}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (out.status.success(), stdout)
}

/// The JSON after `prefix` on the output line that starts with it.
fn line_json(stdout: &str, prefix: &str) -> Value {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in {stdout}"));
    serde_json::from_str(line.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typescript_example_client_is_allowed_and_refused_as_the_manifest_says() {
    let h = Harness::start().await;
    let token = h.token("billing-bot");
    let (ok, out) = ts_example(
        &h.url,
        &token,
        "billing__get_invoice",
        r#"{"invoice_id": "INV-000042"}"#,
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.starts_with(
            "tools: billing__echo, billing__get_invoice, billing__grant_role, billing__refund\n"
        ),
        "{out}"
    );
    let result = line_json(&out, "result:");
    assert_eq!(result["isError"], false, "{out}");
    assert_eq!(
        result["structuredContent"]["invoice_id"], "INV-000042",
        "{out}"
    );

    let (ok, out) = ts_example(
        &h.url,
        &token,
        "billing__delete_invoice",
        r#"{"invoice_id": "INV-000042"}"#,
    )
    .await;
    assert!(!ok, "{out}");
    let refused = line_json(&out, "refused:");
    assert_eq!(refused["code"], -32003, "{out}");
    assert_eq!(refused["data"]["rule"], "deny[0]", "{out}");
    assert_eq!(refused["data"]["decision"], "deny", "{out}");

    let (ok, out) = ts_example(
        &h.url,
        &token,
        "billing__get_invoice",
        r#"{"invoice_id": 7}"#,
    )
    .await;
    assert!(!ok, "{out}");
    let refused = line_json(&out, "refused:");
    assert_eq!(refused["code"], -32602, "{out}");
    assert_eq!(
        refused["data"]["errors"][0]["pointer"], "/invoice_id",
        "{out}"
    );
    // Only the allowed call reached the tool server.
    assert_eq!(h.received(), ["get_invoice"]);

    let (ok, out) = ts_example(&h.url, "not-a-token", "billing__get_invoice", "{}").await;
    assert!(!ok && !out.contains("tools:"), "{out}");
}

/// `examples/stdio/` as shipped (copied to a scratch folder), served by the
/// toolgate binary with the filesystem server found in PATH, and used by the
/// TypeScript example client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stdio_example_fronts_the_filesystem_server_for_the_typescript_sdk() {
    let dir = support::temp_dir("stdio-example");
    let src = repo().join("examples/stdio");
    let copy = |from: &Path, to: &Path| {
        fn walk(from: &Path, to: &Path) {
            std::fs::create_dir_all(to).unwrap();
            for e in std::fs::read_dir(from).unwrap() {
                let e = e.unwrap();
                let (f, t) = (e.path(), to.join(e.file_name()));
                if e.file_type().unwrap().is_dir() {
                    if e.file_name() != ".toolgate" {
                        walk(&f, &t);
                    }
                } else {
                    std::fs::copy(&f, &t).unwrap();
                }
            }
        }
        walk(from, to)
    };
    let ex = dir.join("stdio");
    copy(&src, &ex);
    let port = free_port();
    let config = ex.join("toolgate.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("listen: 127.0.0.1:8090"));
    std::fs::write(
        &config,
        text.replace(
            "listen: 127.0.0.1:8090",
            &format!("listen: 127.0.0.1:{port}"),
        ),
    )
    .unwrap();
    let secret = "example-secret-0123456789abcdef0123456789";
    let path = format!(
        "{}:{}",
        node_dir().join("node_modules/.bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let bin = env!("CARGO_BIN_EXE_toolgate");
    let serve = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .env("TOOLGATE_AGENT_SECRET", secret)
        .env("PATH", &path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _serve = Kill(serve);
    wait_for_port(port).await;
    let mut mint = Command::new(bin);
    mint.args(["token", "--config"])
        .arg(&config)
        .args(["--agent", "files-bot"])
        .env("TOOLGATE_AGENT_SECRET", secret);
    let token = String::from_utf8(run(mint).await.stdout).unwrap();
    let token = token.trim();
    let url = format!("http://127.0.0.1:{port}/mcp");

    let (ok, out) = ts_example(
        &url,
        token,
        "fs__read_text_file",
        r#"{"path": "hello.txt"}"#,
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.starts_with("tools: fs__list_directory, fs__read_text_file\n"),
        "{out}"
    );
    let result = line_json(&out, "result:");
    assert_eq!(
        result["structuredContent"]["content"], "Hello from the shared folder.\n",
        "{out}"
    );
    let (ok, out) = ts_example(&url, token, "fs__list_directory", r#"{"path": "reports"}"#).await;
    assert!(ok, "{out}");
    assert!(
        line_json(&out, "result:").to_string().contains("q3.txt"),
        "{out}"
    );

    for escape in [
        r#"{"path": "../toolgate.yaml"}"#,
        r#"{"path": "/etc/passwd"}"#,
    ] {
        let (ok, out) = ts_example(&url, token, "fs__read_text_file", escape).await;
        assert!(!ok, "{out}");
        let refused = line_json(&out, "refused:");
        assert_eq!(refused["code"], -32602, "{escape}: {out}");
        assert_eq!(refused["data"]["errors"][0]["pointer"], "/path", "{out}");
    }
    let (ok, out) = ts_example(
        &url,
        token,
        "fs__write_file",
        r#"{"path": "hello.txt", "content": "overwritten"}"#,
    )
    .await;
    assert!(!ok, "{out}");
    assert_eq!(
        line_json(&out, "refused:")["data"]["rule"],
        "deny[0]",
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(ex.join("shared/hello.txt")).unwrap(),
        "Hello from the shared folder.\n",
        "nothing was written"
    );
    // Every decision is in the example's audit log.
    let audit = std::fs::read_to_string(ex.join(".toolgate/audit.jsonl")).unwrap();
    let calls: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["event"] == "call")
        .collect();
    let decisions: Vec<&str> = calls
        .iter()
        .map(|r| r["decision"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(
        decisions,
        ["allow", "allow", "deny", "deny", "deny"],
        "{audit}"
    );
}

/// Runs `tests/interop/node/sdk_client.mjs` against `url`; returns its
/// lines by step.
async fn sdk_client(url: &str, token: &str) -> BTreeMap<String, Value> {
    let mut c = Command::new(node());
    c.arg(node_dir().join("sdk_client.mjs"))
        .env("TOOLGATE_URL", url)
        .env("TOOLGATE_TOKEN", token);
    let out = run(c).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "sdk_client.mjs failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"));
            (v["step"].as_str().unwrap().to_owned(), v)
        })
        .collect()
}

const EVERYTHING_BUT_ENV: &str = r#"
agent: ts-agent
rate_limit: 1000/min
tools:
  - name: "*"
deny:
  - name: get-env
    reason: the server's environment holds secrets
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typescript_sdk_gets_sampling_elicitation_progress_and_rich_content_through_toolgate() {
    let (_server, url) = everything().await;
    let direct = sdk_client(&url, "unused").await;
    let h = Harness::with(Opts {
        manifests: &[("ts-agent.yaml", EVERYTHING_BUT_ENV)],
        upstreams: Some(everything_upstream(&url)),
        extra: "",
        ..Opts::default()
    })
    .await;
    let token = h.token("ts-agent");
    let via = sdk_client(&h.url, &token).await;
    assert_eq!(via["connected"]["version"], "2025-11-25");

    // Tool definitions (schemas with $schema, additionalProperties...) are
    // exactly the server's; only the denied tool is missing.
    let strip = |v: &Value| -> Vec<Value> {
        v["tools"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["name"] != "get-env")
            .cloned()
            .collect()
    };
    assert_eq!(strip(&via["tools"]), strip(&direct["tools"]));
    let names = via["tools"]["names"].as_array().unwrap();
    assert!(!names.contains(&Value::from("get-env")), "{names:?}");
    for t in ["trigger-sampling-request", "trigger-elicitation-request"] {
        assert!(names.contains(&Value::from(t)), "{t} listed: {names:?}");
    }

    // Server-to-client requests reach the agent and its answers the server.
    let sampled = via["trigger-sampling-request"]["result"]["content"][0]["text"]
        .as_str()
        .unwrap();
    assert!(sampled.contains("sampled by the agent"), "{sampled}");
    let elicited = via["trigger-elicitation-request"]["result"]["content"][0]["text"]
        .as_str()
        .unwrap();
    assert!(elicited.contains("declined"), "{elicited}");
    assert_eq!(
        via["asked"]["asked"], direct["asked"]["asked"],
        "the agent was asked exactly what a direct client is asked"
    );
    assert_eq!(via["asked"]["asked"].as_array().unwrap().len(), 2);

    // Progress, and every content kind, pass through unchanged.
    assert_eq!(via["progress"]["progress"], direct["progress"]["progress"]);
    assert_eq!(via["progress"]["progress"].as_array().unwrap().len(), 3);
    for step in ["get-tiny-image", "get-annotated-message"] {
        assert_eq!(via[step]["result"], direct[step]["result"], "{step}");
    }
    let image = &via["get-tiny-image"]["result"]["content"][1];
    assert_eq!(image["type"], "image");
    assert!(image["data"].as_str().unwrap().len() > 100);
    assert!(via["get-annotated-message"]["result"]["content"][0]["annotations"].is_object());
    assert!(
        via["get-structured-content"]["result"]["structuredContent"]["temperature"].is_number()
    );
    assert_eq!(
        via["get-resource-reference"]["result"]["content"][1]["type"],
        "resource"
    );
    // The denied tool is refused by toolgate, with the rule.
    assert_eq!(via["get-env"]["error"]["code"], -32003);
    assert_eq!(via["get-env"]["error"]["data"]["rule"], "deny[0]");

    // A 2026-07-28 agent takes no server requests: server-everything's
    // sampling request mid-call reaches it as an input_required round made
    // by toolgate, and its retry carries the answer back to the server.
    let args = serde_json::json!({"prompt": "p", "maxTokens": 5});
    let (ct, msgs) = h
        .call_messages(
            &token,
            "application/json",
            "trigger-sampling-request",
            args.clone(),
            serde_json::json!({}),
        )
        .await;
    assert!(ct.starts_with("application/json"), "{ct}");
    let round = &msgs[0]["result"];
    assert_eq!(round["resultType"], "input_required", "{}", msgs[0]);
    let (key, ask) = round["inputRequests"]
        .as_object()
        .and_then(|m| m.iter().next())
        .expect("one input request");
    assert_eq!(ask["method"], "sampling/createMessage", "{ask}");
    let (_, v) = h
        .modern(
            &token,
            "tools/call",
            serde_json::json!({"name": "trigger-sampling-request", "arguments": args,
                "requestState": round["requestState"],
                "inputResponses": {key.as_str(): {"role": "assistant", "model": "test-model",
                    "stopReason": "endTurn", "content": {"type": "text", "text": "sampled through toolgate"}}}}),
        )
        .await;
    assert!(
        v["result"].to_string().contains("sampled through toolgate"),
        "{v}"
    );

    let audit = h.audit().await;
    let calls: Vec<(&str, &str)> = audit
        .iter()
        .filter(|r| r["event"] == "call")
        .map(|r| {
            (
                r["tool"].as_str().unwrap_or("-"),
                r["decision"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert!(calls.contains(&("get-env", "deny")), "{calls:?}");
    assert!(
        calls.contains(&("trigger-elicitation-request", "allow")),
        "{calls:?}"
    );
}
