//! Micro-benchmarks of the per-call work: the decision (small and 10,000
//! agents x 20 tools), strict parsing and re-serialisation, JWT verification
//! with and without the verified-token cache, rate limiting, and audit
//! record hashing. `cargo bench`; numbers go to BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use toolgate::identity::{
    agent_from_claims, mint_hs256, now_unix, Caller, KeyEntry, KeySet, TokenCache, Verifier,
};
use toolgate::manifest::PolicySet;
use toolgate::policy::{decide, Guard};

fn guard() -> Guard {
    let mut b = globset::GlobSetBuilder::new();
    for p in toolgate::config::DEFAULT_ESCALATION_TOOLS {
        b.add(toolgate::config::tool_glob(p).expect("glob"));
    }
    Guard::new(
        b.build().expect("globset"),
        vec![
            PathBuf::from("/etc/toolgate/toolgate.yaml"),
            PathBuf::from("/var/lib/toolgate/state.db"),
            PathBuf::from("/var/log/toolgate/audit.jsonl"),
        ],
        vec![PathBuf::from("/etc/toolgate/tool-manifests")],
        PathBuf::from("/srv/toolgate"),
        toolgate::config::normalize_path,
    )
}

const TOOL: &str = r#"
  - name: svc__tool_NN
    rate_limit: 600/min
    arguments:
      type: object
      properties:
        invoice_id: { type: string, pattern: "^INV-[0-9]{6}$" }
        amount: { type: number, minimum: 0 }
      required: [invoice_id]
      additionalProperties: false"#;

fn manifest(agent: usize, tools: usize) -> String {
    let mut m = format!("agent: agent-{agent}\nrate_limit: 120/min\ntools:");
    for t in 0..tools {
        m.push_str(&TOOL.replace("NN", &t.to_string()));
    }
    m.push_str("\n  - name: \"svc__read_*\"\ndeny:\n  - name: \"*__delete_*\"\n");
    m
}

fn policy(agents: usize) -> PolicySet {
    let texts = (0..agents)
        .map(|a| (PathBuf::from(format!("agent-{a}.yaml")), manifest(a, 20)))
        .collect();
    PolicySet::from_texts(texts, vec![]).expect("valid")
}

fn decision(c: &mut Criterion) {
    let g = guard();
    let args = json!({"invoice_id": "INV-000042", "amount": 12.5});
    let small = policy(1);
    let m = small.get("agent-0").expect("agent");
    c.bench_function("decide/1 agent, allowed call with schema", |b| {
        b.iter(|| {
            decide(
                &g,
                Some(m),
                "agent-0",
                black_box("svc__tool_7"),
                black_box(&args),
            )
        })
    });
    let big = policy(10_000);
    c.bench_function("decide/10k agents x 20 tools, lookup + allowed call", |b| {
        b.iter(|| {
            let m = big.get(black_box("agent-7777")).map(|m| &**m);
            decide(
                &g,
                m,
                "agent-7777",
                black_box("svc__tool_19"),
                black_box(&args),
            )
        })
    });
    c.bench_function("decide/10k agents, denied by rule", |b| {
        b.iter(|| {
            decide(
                &g,
                big.get("agent-1").map(|m| &**m),
                "agent-1",
                black_box("svc__delete_all"),
                &args,
            )
        })
    });
    let limiters =
        toolgate::ratelimit::Limiters::build(&big, None, governor::clock::DefaultClock::default());
    let m = big.get("agent-42").expect("agent");
    c.bench_function("ratelimit/agent + tool check", |b| {
        b.iter(|| limiters.check(m, Some(3)))
    });
}

fn reload(c: &mut Criterion) {
    let texts: Vec<(PathBuf, String)> = (0..10_000)
        .map(|a| (PathBuf::from(format!("agent-{a}.yaml")), manifest(a, 20)))
        .collect();
    let mut g = c.benchmark_group("reload");
    g.sample_size(10);
    g.bench_function("compile 10k manifests x 20 tools (cold start)", |b| {
        b.iter(|| PolicySet::from_texts(texts.clone(), vec![]).expect("valid"))
    });
    let current = PolicySet::from_texts(texts.clone(), vec![]).expect("valid");
    let mut edited = texts.clone();
    edited[1234].1.push_str("description: edited\n");
    g.bench_function("reload 10k manifests, one file changed", |b| {
        b.iter(|| PolicySet::compile_set(edited.clone(), vec![], Some(&current)).expect("valid"))
    });
    g.finish();

    // Where a cold compile goes, per manifest (~4.8 KB): the YAML parser's
    // events alone (the floor any serde layer on it has), the same text
    // into a plain JSON value through serde-saphyr, and toolgate's compile
    // (serde-saphyr into the typed, spanned spec, then schemas and globs).
    let one = &texts[42].1;
    let mut g = c.benchmark_group("manifest");
    g.bench_function("yaml events only (granit-parser)", |b| {
        b.iter(|| {
            serde_saphyr::granit_parser::Parser::new_from_str(black_box(one))
                .try_fold(0usize, |n, e| e.map(|_| n + 1))
                .expect("valid")
        })
    });
    g.bench_function("yaml into a serde_json::Value (serde-saphyr)", |b| {
        b.iter(|| serde_saphyr::from_str::<serde_json::Value>(black_box(one)).expect("valid"))
    });
    g.bench_function("compile one manifest x 20 tools", |b| {
        b.iter(|| {
            let mut problems = Vec::new();
            toolgate::manifest::compile(Path::new("agent-42.yaml"), black_box(one), &mut problems)
                .expect("valid")
        })
    });
    g.finish();
}

const BODY: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"billing__get_invoice","arguments":{"invoice_id":"INV-000042","amount":12.5},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;

fn parsing(c: &mut Criterion) {
    c.bench_function("parse/strict tools/call + params check + re-serialise", |b| {
        b.iter(|| {
            let toolgate::mcp::Message::Request(r) = toolgate::mcp::parse_message(black_box(BODY)).expect("valid") else { unreachable!() };
            let call = toolgate::mcp::tool_call(r.params).expect("valid");
            serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": call.name, "arguments": call.arguments}})).expect("serialises")
        })
    });
    // What parse_message falls back to (and did for every message before
    // the envelope was read in one pass): a tree of the whole message.
    c.bench_function("parse/general path: strict tree + envelope check", |b| {
        b.iter(|| {
            toolgate::mcp::parse_strict(black_box(BODY))
                .and_then(toolgate::mcp::message_from_value)
                .expect("valid")
        })
    });
    c.bench_function("parse/one pass: parse_message", |b| {
        b.iter(|| toolgate::mcp::parse_message(black_box(BODY)).expect("valid"))
    });
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .expect("fixture")
}

fn jwt(c: &mut Criterion) {
    use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
    let secret = b"bench-secret-0123456789abcdef0123456789".to_vec();
    let claims = json!({"iss": "i", "aud": "a", "sub": "bench-bot", "exp": now_unix() + 3600});
    let hs = mint_hs256(None, &secret, &claims).expect("token");
    let rs = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&fixture("rsa-private.pem")).expect("key"),
    )
    .expect("token");
    let es = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&fixture("ec-private.pem")).expect("key"),
    )
    .expect("token");
    let leeway = std::time::Duration::from_secs(30);
    let cases = [
        ("hs256", hs, KeyEntry::hmac(None, secret.clone())),
        (
            "rs256",
            rs,
            KeyEntry::public(
                None,
                Algorithm::RS256,
                DecodingKey::from_rsa_pem(&fixture("rsa-public.pem")).expect("key"),
            ),
        ),
        (
            "es256",
            es,
            KeyEntry::public(
                None,
                Algorithm::ES256,
                DecodingKey::from_ec_pem(&fixture("ec-public.pem")).expect("key"),
            ),
        ),
    ];
    for (name, token, key) in cases {
        let v = Verifier::new("i", "a", leeway, Arc::new(KeySet::new(vec![key])));
        c.bench_function(&format!("jwt/{name} verify"), |b| {
            b.iter(|| {
                agent_from_claims(&v.verify(black_box(&token)).expect("valid"), "sub")
                    .expect("agent")
            })
        });
        let cache = TokenCache::new(100_000);
        cache.put(
            &token,
            &Caller {
                agent: Arc::from("bench-bot"),
            },
            now_unix() + 3600,
            now_unix(),
        );
        c.bench_function(&format!("jwt/{name} cached"), |b| {
            b.iter(|| cache.get(black_box(&token), now_unix()).expect("hit"))
        });
    }
}

fn audit(c: &mut Criterion) {
    let args = json!({"invoice_id": "INV-000042", "amount": 12.5, "password": "x"});
    let r = toolgate::audit::Record {
        event: "call",
        agent: Some(Arc::from("bench-bot")),
        tool: Some("billing__get_invoice".into()),
        decision: Some("allow"),
        rule: Some("tools[0]".into()),
        reason: Some("allowed".into()),
        args_sha256: Some(toolgate::audit::args_sha256(&args)),
        args: Some(toolgate::audit::redact(&args)),
        ..Default::default()
    };
    c.bench_function("audit/args hash + redact (request path)", |b| {
        b.iter(|| {
            (
                toolgate::audit::args_sha256(black_box(&args)),
                toolgate::audit::redact(black_box(&args)),
            )
        })
    });
    c.bench_function("audit/chain one record (writer task)", |b| {
        b.iter(|| {
            toolgate::audit::chain_line(
                black_box(&r),
                std::time::SystemTime::now(),
                42,
                toolgate::audit::GENESIS,
            )
        })
    });
}

criterion_group!(benches, decision, parsing, jwt, audit, reload);
criterion_main!(benches);
