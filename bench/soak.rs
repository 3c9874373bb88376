//! The soak run: the release toolgate binary on loopback in front of the
//! demo tool server, at a steady rate of tools/calls mixing allowed, denied,
//! schema-invalid, held and rate-limited ones, for a bounded time. Every
//! interval it prints toolgate's RSS, CPU and the answers by kind; at the end
//! it stops toolgate with SIGTERM and checks:
//! - no unexpected answer (transport errors, wrong codes) at any point;
//! - memory flat: RSS at the end within 10% (+4 MiB) of RSS after warm-up;
//! - the audit chain verifies, and it holds exactly one decision record per
//!   call sent;
//! - the log is signed (checkpoints every 1000 records or 5 s): while still
//!   live, `toolgate audit verify --key --max-age 30s` passes; once stopped,
//!   `--require-tail-signed --expect-seq N` passes, N being the last
//!   checkpoint toolgate published in its operator log.
//!
//!     bash bench/soak.sh [MINUTES=10] [RATE=300]
//!
//! Exits non-zero if a check fails. The report goes to bench/SOAK.md for a
//! run of 10 minutes or more (the documented one), to
//! target/soak-report.md for a shorter one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

const SECRET: &str = "soak-secret-0123456789abcdef0123456789";

/// What a call is meant to get.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Allowed,
    Denied,
    Invalid,
    Held,
    Limited,
}

/// One slot of every 20 calls, in order: 13 allowed, 2 denied, 1 invalid,
/// 1 held, 3 to an agent whose tool limit is 2/s.
fn kind_of(i: u64) -> Kind {
    match i % 20 {
        0..=12 => Kind::Allowed,
        13 | 14 => Kind::Denied,
        15 => Kind::Invalid,
        16 => Kind::Held,
        _ => Kind::Limited,
    }
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    by: [AtomicU64; 6],
    unexpected: AtomicU64,
}

fn slot(k: Kind) -> usize {
    k as usize
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn write_config(dir: &Path, port: u16, admin: u16, upstream: std::net::SocketAddr) {
    std::fs::create_dir_all(dir.join("tool-manifests")).expect("work dir");
    std::fs::write(
        dir.join("toolgate.yaml"),
        format!(
            "listen: 127.0.0.1:{port}
admin: {{ listen: 127.0.0.1:{admin}, metrics_public: true }}
manifests: tool-manifests
state: sqlite://state.db
audit: {{ path: audit.jsonl, checkpoint: {{ key_file: keys/audit.key, every: 1000, interval: 5s }} }}
auth:
  agents:
    issuer: soak
    audience: toolgate
    keys: [ {{ hs256: {{ secret_env: SOAK_SECRET }} }} ]
  approvers:
    issuer: soak
    audience: toolgate-admin
    keys: [ {{ hs256: {{ secret_env: SOAK_SECRET }} }} ]
upstreams:
  - name: billing
    url: http://{upstream}/mcp
holds: {{ wait: 0s, ttl: 1h }}
alerts: {{ denials: {{ threshold: 1000000000, window: 1m }} }}
"
        ),
    )
    .expect("config");
    std::fs::write(
        dir.join("tool-manifests/soak-bot.yaml"),
        r#"agent: soak-bot
tools:
  - name: billing__get_invoice
    arguments:
      type: object
      properties:
        invoice_id: { type: string, pattern: "^INV-[0-9]{6}$" }
      required: [invoice_id]
      additionalProperties: false
  - name: billing__refund
    approval: required
deny:
  - name: "*__delete_*"
"#,
    )
    .expect("manifest");
    std::fs::write(
        dir.join("tool-manifests/limited-bot.yaml"),
        "agent: limited-bot\ntools:\n  - name: billing__echo\n    rate_limit: { rate: 2/s, burst: 2 }\n",
    )
    .expect("manifest");
}

fn token(agent: &str) -> String {
    let now = toolgate::identity::now_unix();
    toolgate::identity::mint_hs256(
        None,
        SECRET.as_bytes(),
        &json!({"iss": "soak", "aud": "toolgate", "sub": agent, "iat": now, "exp": now + 86_400}),
    )
    .expect("mint")
}

fn request(port: u16, token: &str, i: u64, kind: Kind) -> http::Request<Full<Bytes>> {
    let (tool, args) = match kind {
        Kind::Allowed => (
            "billing__get_invoice",
            json!({"invoice_id": format!("INV-{:06}", i % 1_000_000)}),
        ),
        Kind::Denied => (
            "billing__delete_invoice",
            json!({"invoice_id": "INV-000001"}),
        ),
        Kind::Invalid => ("billing__get_invoice", json!({"invoice_id": i})),
        // Five distinct held calls: identical retries join their hold, so
        // pending holds stay bounded.
        Kind::Held => (
            "billing__refund",
            json!({"invoice_id": format!("INV-00000{}", (i / 20) % 5)}),
        ),
        Kind::Limited => ("billing__echo", json!({"text": "x"})),
    };
    let body = json!({"jsonrpc": "2.0", "id": i, "method": "tools/call",
        "params": {"name": tool, "arguments": args, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}}}});
    http::Request::post(format!("http://127.0.0.1:{port}/mcp"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

/// Whether `v` is what a call of `kind` should get.
fn expected(kind: Kind, v: &Value) -> bool {
    let code = v["error"]["code"].as_i64();
    match kind {
        Kind::Allowed => v.get("result").is_some(),
        Kind::Denied => code == Some(-32003),
        Kind::Invalid => code == Some(-32602),
        Kind::Held => code == Some(-32010),
        Kind::Limited => v.get("result").is_some() || code == Some(-32029),
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let minutes: f64 = args.next().and_then(|m| m.parse().ok()).unwrap_or(10.0);
    let rate: u64 = args.next().and_then(|r| r.parse().ok()).unwrap_or(300);
    let duration = Duration::from_secs_f64(minutes * 60.0);
    let interval = Duration::from_secs(if minutes >= 2.0 { 30 } else { 10 });

    let bin = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join("toolgate")))
        .filter(|p| p.exists())
        .expect("target/release/toolgate: run bench/soak.sh, which builds it");
    let work = std::env::temp_dir().join(format!("toolgate-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let upstream = toolgate::demo::ToolServer::without_recording()
        .start("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("upstream");
    let (port, admin) = (free_port(), free_port());
    write_config(&work, port, admin, upstream);
    let keygen = Command::new(&bin)
        .args(["audit", "keygen", "--out"])
        .arg(work.join("keys"))
        .output()
        .expect("toolgate audit keygen");
    assert!(keygen.status.success(), "audit keygen failed");
    let mut child = Command::new(&bin)
        .args(["--log-format", "json", "serve", "--config"])
        .arg(work.join("toolgate.yaml"))
        .env("SOAK_SECRET", SECRET)
        // Warnings, and the checkpoints published as anchors.
        .env("RUST_LOG", "warn,toolgate::audit=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("toolgate starts");
    let pid = child.id();
    // The operator log: checkpoint lines are counted and the last seq kept
    // (the anchor for `verify --expect-seq`); everything else passes on.
    let anchor = Arc::new(AtomicU64::new(0));
    let published = Arc::new(AtomicU64::new(0));
    let operator_log = {
        let (anchor, published) = (anchor.clone(), published.clone());
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                match v["fields"]["audit.seq"].as_u64() {
                    Some(seq) if v["fields"]["message"] == "audit checkpoint signed" => {
                        anchor.store(seq, Ordering::Relaxed);
                        published.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => eprintln!("{line}"),
                }
            }
        })
    };
    let client = toolgate::upstream::http_client();
    let ready = Instant::now();
    loop {
        let r = client
            .request(
                http::Request::get(format!("http://127.0.0.1:{admin}/readyz"))
                    .body(Full::new(Bytes::new()))
                    .expect("request"),
            )
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            ready.elapsed() < Duration::from_secs(20),
            "toolgate did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    println!(
        "soak: {minutes} min at {rate} calls/s against toolgate pid {pid} (work dir {})",
        work.display()
    );
    println!(
        "{:>6} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>9} {:>5}",
        "t(s)",
        "sent",
        "allowed",
        "denied",
        "invalid",
        "held",
        "limited",
        "unexp",
        "rss(MiB)",
        "cpu(%)",
        "fds"
    );
    let counts = Arc::new(Counts::default());
    let tokens = Arc::new([token("soak-bot"), token("limited-bot")]);
    let started = Instant::now();
    let workers = 16u64;
    let per_worker = Duration::from_secs_f64(workers as f64 / rate as f64);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (counts, tokens, client) = (counts.clone(), tokens.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(per_worker);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            while started.elapsed() < duration {
                tick.tick().await;
                let i = n * workers + w;
                n += 1;
                let kind = kind_of(i);
                let t = if kind == Kind::Limited {
                    &tokens[1]
                } else {
                    &tokens[0]
                };
                counts.sent.fetch_add(1, Ordering::Relaxed);
                let answer = match client.request(request(port, t, i, kind)).await {
                    Ok(r) => r.into_body().collect().await.ok().map(|b| b.to_bytes()),
                    Err(_) => None,
                };
                let v: Value = answer
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or(Value::Null);
                if expected(kind, &v) {
                    let k = if kind == Kind::Limited && v.get("result").is_some() {
                        5 // limited-bot calls within its budget
                    } else {
                        slot(kind)
                    };
                    counts.by[k].fetch_add(1, Ordering::Relaxed);
                } else {
                    counts.unexpected.fetch_add(1, Ordering::Relaxed);
                    if counts.unexpected.load(Ordering::Relaxed) <= 5 {
                        eprintln!("unexpected answer to a {kind:?} call: {v}");
                    }
                }
            }
        }));
    }
    let hz = 100.0; // USER_HZ on Linux
    let mut samples: Vec<(f64, u64, usize)> = Vec::new();
    let mut last_cpu = (Instant::now(), cpu_ticks(pid));
    let mut unexpected_at: Vec<u64> = Vec::new();
    while started.elapsed() < duration {
        tokio::time::sleep(
            interval.min(duration.saturating_sub(started.elapsed()) + Duration::from_millis(1)),
        )
        .await;
        let rss = rss_kib(pid);
        let (now, ticks) = (Instant::now(), cpu_ticks(pid));
        let cpu =
            (ticks - last_cpu.1) as f64 / hz / now.duration_since(last_cpu.0).as_secs_f64() * 100.0;
        last_cpu = (now, ticks);
        let t = started.elapsed().as_secs_f64();
        let fds = open_fds(pid);
        samples.push((t, rss, fds));
        let c = |k: usize| counts.by[k].load(Ordering::Relaxed);
        let unexpected = counts.unexpected.load(Ordering::Relaxed);
        unexpected_at.push(unexpected);
        println!(
            "{:>6.0} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10.1} {:>9.1} {:>5}",
            t,
            counts.sent.load(Ordering::Relaxed),
            c(0),
            c(1),
            c(2),
            c(3),
            c(4) + c(5),
            unexpected,
            rss as f64 / 1024.0,
            cpu,
            fds
        );
    }
    for t in tasks {
        let _ = t.await;
    }
    let sent = counts.sent.load(Ordering::Relaxed);
    let log = work.join("audit.jsonl");
    let public = work.join("keys/audit.pub");
    // `toolgate audit verify --key` as an operator runs it; the first line
    // of its answer and whether it passed.
    let verify_cli = |extra: &[&str]| {
        let out = Command::new(&bin)
            .args(["audit", "verify"])
            .arg(&log)
            .arg("--key")
            .arg(&public)
            .args(extra)
            .output()
            .expect("toolgate audit verify");
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text
            .lines()
            .next()
            .unwrap_or("")
            .replace(&format!("{}: ", log.display()), "");
        (
            out.status.success(),
            first.replace(&format!(" ({})", log.display()), ""),
        )
    };
    // Live (the calls have stopped, the writer still checkpoints every 5 s).
    let live = verify_cli(&["--max-age", "30s"]);
    // Graceful stop: the audit log is flushed, its tail signed, closed.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    let _ = operator_log.join();
    let anchor = anchor.load(Ordering::Relaxed);
    let published = published.load(Ordering::Relaxed);
    let closed = verify_cli(&["--require-tail-signed", "--expect-seq", &anchor.to_string()]);

    let verified = toolgate::audit::verify(&log);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut by_event: BTreeMap<String, u64> = BTreeMap::new();
    let mut ids = std::collections::HashSet::new();
    let mut decisions = 0u64;
    for line in text.lines() {
        let r: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        let e = r["event"].as_str().unwrap_or("?").to_owned();
        // One record per call, carrying its request id: the decision
        // (`call`), or `hold_created` for the call that opened a hold.
        // Checkpoints carry none.
        if let Some(id) = r["request_id"].as_str() {
            decisions += 1;
            ids.insert(id.to_owned());
        }
        *by_event.entry(e).or_default() += 1;
    }
    let distinct = ids.len() as u64;
    let unexpected = counts.unexpected.load(Ordering::Relaxed);
    let warm_sample = samples
        .iter()
        .find(|(t, _, _)| *t >= 60.0_f64.min(duration.as_secs_f64() / 3.0))
        .or(samples.first())
        .copied()
        .unwrap_or_default();
    let end_sample = samples.last().copied().unwrap_or_default();
    let (warm, end) = (warm_sample.1, end_sample.1);
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let flat = end as f64 <= warm as f64 * 1.10 + 4096.0 && end_sample.2 <= warm_sample.2 + 8;
    let chain_ok = verified.is_ok();
    let count_ok = decisions == sent && distinct == sent;
    let checkpoints = by_event.get("checkpoint").copied().unwrap_or(0);
    let signed_ok = live.0 && closed.0 && anchor > 0 && published == checkpoints;
    let pass = unexpected == 0 && flat && chain_ok && count_ok && signed_ok;

    let report = format!(
        "# Soak\n\nGenerated by `bash bench/soak.sh {minutes} {rate}` on {date}: the release toolgate on loopback in front of the demo tool server, {rate} tools/call per second for {minutes} minutes from 16 workers; per 20 calls 13 allowed, 2 denied, 1 schema-invalid, 1 held (five distinct holds, joined by identical retries), 3 from an agent limited to 2/s; audit checkpoints signed every 1000 records or 5 s.\n\n\
| check | result |\n|---|---|\n\
| calls sent | {sent} |\n\
| unexpected answers (transport errors, wrong codes) | {unexpected} |\n\
| RSS after warm-up / peak / at the end | {warm_mib:.1} / {peak_mib:.1} / {end_mib:.1} MiB ({flat}) |\n\
| open file descriptors after warm-up / at the end | {warm_fds} / {end_fds} |\n\
| audit chain | {chain} |\n\
| signed checkpoints published in the operator log / in the audit log | {published} / {checkpoints} |\n\
| `audit verify --key --max-age 30s`, live | {live} |\n\
| `audit verify --key --require-tail-signed --expect-seq {anchor}`, stopped | {closed} |\n\
| records of a call (with a request id) / distinct ids / calls sent | {decisions} / {distinct} / {sent} ({count}) |\n\
| all audit records by event | {events} |\n\
| **result** | **{result}** |\n",
        date = chrono_like_now(),
        warm_mib = warm as f64 / 1024.0,
        end_mib = end as f64 / 1024.0,
        peak_mib = peak as f64 / 1024.0,
        warm_fds = warm_sample.2,
        end_fds = end_sample.2,
        flat = if flat { "flat" } else { "GREW" },
        chain = match &verified {
            Ok(n) => format!("verifies ({n} records)"),
            Err(e) => format!("BROKEN: {e}"),
        },
        count = if count_ok { "equal" } else { "DIFFERENT" },
        live = live.1,
        closed = closed.1,
        events = by_event.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
        result = if pass { "pass" } else { "FAIL" },
    );
    println!("\n{report}");
    // Only the documented (10 minute) run replaces bench/SOAK.md.
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(if minutes >= 10.0 {
        "bench/SOAK.md"
    } else {
        "target/soak-report.md"
    });
    std::fs::write(&out, &report).expect("write the soak report");
    println!("report: {}", out.display());
    let _ = std::fs::remove_dir_all(&work);
    if !pass {
        std::process::exit(1);
    }
}

/// The UTC date, without a date crate: `date -u`.
fn chrono_like_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
