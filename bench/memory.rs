//! Memory at scale: the policy snapshot of 10,000 agent manifests x 20 tools
//! and 100,000 distinct rate-limit keys, measured as the process's RSS, and
//! the reclaiming of idle agents' keys. Uses the library's own types (the
//! ones `toolgate serve` holds) and the same allocator as the binary.
//!
//!     cargo run --release --example memory
//!
//! Prints one `MEMORY ...` line and exits 1 if RSS passes 100 MB or idle
//! keys are not reclaimed.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use governor::clock::FakeRelativeClock;
use toolgate::manifest::PolicySet;
use toolgate::ratelimit::Limiters;

const AGENTS: usize = 10_000;
const TOOLS: usize = 20;
/// Tools with a rate limit of their own: with the agent's, 10 keys an agent.
const LIMITED: usize = 9;

/// The resident set once the allocator has returned what was freed: the
/// steady state a running server holds, not the compile's transient peak.
/// mimalloc purges freed pages lazily, at its next allocation or free once
/// `purge_delay` (1 s) has passed; a server allocates on every call, so
/// this waits out the delay and then allocates a little, as traffic would.
/// (Sleeping alone left RSS at the peak in about one run in five.)
fn rss_mib() -> f64 {
    std::thread::sleep(Duration::from_millis(1100));
    let churn: Vec<Vec<u8>> = (0..256).map(|i| vec![i as u8; 4096]).collect();
    drop(std::hint::black_box(churn));
    std::thread::sleep(Duration::from_millis(50));
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn manifest(agent: usize) -> String {
    let mut m = format!("agent: agent-{agent}\nrate_limit: 600/min\ntools:\n");
    for t in 0..TOOLS {
        m.push_str(&format!("  - name: svc{}__tool_{t}\n", agent % 7));
        if t < LIMITED {
            m.push_str("    rate_limit: 60/min\n");
        }
        m.push_str(
            "    arguments:\n      type: object\n      properties:\n        id: { type: string, pattern: \"^[A-Z]{3}-[0-9]{6}$\" }\n        n: { type: integer, minimum: 0 }\n      required: [id]\n      additionalProperties: false\n",
        );
    }
    m.push_str("deny:\n  - name: \"*__delete_*\"\n  - name: \"*__drop_*\"\n");
    m
}

fn main() -> ExitCode {
    let start = rss_mib();
    let texts: Vec<(PathBuf, String)> = (0..AGENTS)
        .map(|a| (PathBuf::from(format!("agent-{a}.yaml")), manifest(a)))
        .collect();
    let t = Instant::now();
    let policy = match PolicySet::from_texts(texts, vec![]) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("the generated manifests do not compile: {e:?}");
            return ExitCode::FAILURE;
        }
    };
    let compile = t.elapsed();
    let with_policy = rss_mib();

    let clock = FakeRelativeClock::default();
    let limiters = Limiters::build(&policy, None, clock.clone());
    let mut refused = 0usize;
    for m in policy.manifests() {
        for rule in 0..LIMITED {
            if limiters.check(m, Some(rule)).is_err() {
                refused += 1;
            }
        }
    }
    let keys = limiters.key_count();
    let with_keys = rss_mib();

    // An hour later every budget is full again: the agents are idle.
    clock.advance(Duration::from_secs(3600));
    limiters.reclaim();
    let keys_after = limiters.key_count();
    let after_reclaim = rss_mib();

    println!(
        "MEMORY agents={AGENTS} tools={} compile_ms={} rss_start_mib={start:.1} rss_policy_mib={with_policy:.1} keys={keys} refused={refused} rss_keys_mib={with_keys:.1} keys_after_reclaim={keys_after} rss_after_reclaim_mib={after_reclaim:.1}",
        AGENTS * TOOLS,
        compile.as_millis(),
    );
    let mut ok = true;
    if with_keys * 1_048_576.0 > 100e6 {
        eprintln!("RSS {with_keys:.1} MiB is over the 100 MB target");
        ok = false;
    }
    if keys < 100_000 {
        eprintln!("only {keys} rate-limit keys were made; the measurement needs 100,000");
        ok = false;
    }
    if keys_after != 0 {
        eprintln!("{keys_after} idle keys were not reclaimed");
        ok = false;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
