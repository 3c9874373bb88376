//! `toolgate audit verify --key`, run as an operator runs it (the built
//! binary, real files), against logs tampered with the ways an intruder
//! with write access to the log but not the signing key would: edits,
//! edits re-chained, a wholesale rewrite, and a cut right after an earlier
//! checkpoint, which only an anchor kept outside the file can show
//! (`--expect-seq` from the operator log, `--max-age` for a live log).

// Test helpers may unwrap: a panic there is a failed assertion.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use toolgate::audit::{Auditor, Checkpointer, Record};

use support::toolgate_command as toolgate;

/// Writes DIR/keys/audit.key and audit.pub with `toolgate audit keygen`.
fn keygen(dir: &Path) -> (PathBuf, PathBuf) {
    let out = toolgate()
        .args(["audit", "keygen", "--out"])
        .arg(dir.join("keys"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    (dir.join("keys/audit.key"), dir.join("keys/audit.pub"))
}

fn verify(log: &Path, public: &Path, extra: &[&str]) -> Output {
    toolgate()
        .args(["audit", "verify"])
        .arg(log)
        .arg("--key")
        .arg(public)
        .args(extra)
        .output()
        .unwrap()
}

/// `toolgate audit verify` without `--key`: the hash chain alone.
fn verify_unkeyed(log: &Path) -> Output {
    toolgate()
        .args(["audit", "verify"])
        .arg(log)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
fn assert_ok(o: &Output) -> String {
    let t = text(o);
    assert!(o.status.success(), "expected ok: {t}");
    assert!(t.starts_with("ok: "), "{t}");
    t
}

#[track_caller]
fn assert_broken(o: &Output, why: &str) -> String {
    let t = text(o);
    assert_eq!(o.status.code(), Some(1), "expected BROKEN: {t}");
    assert!(t.starts_with("BROKEN: "), "{t}");
    assert!(t.contains(why), "expected {why:?} in: {t}");
    t
}

fn lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write(log: &Path, lines: &[Value]) {
    let mut out = String::new();
    for l in lines {
        out.push_str(&l.to_string());
        out.push('\n');
    }
    std::fs::write(log, out).unwrap();
}

/// Recomputes every `prev` and `hash` from the first record's `prev` on:
/// what anyone can do who can write the file, key or not.
fn rechain(lines: &mut [Value]) {
    let mut prev = lines[0]["prev"].clone();
    for l in lines.iter_mut() {
        let o = l.as_object_mut().unwrap();
        o.remove("hash");
        o.insert("prev".into(), prev.clone());
        let hash = hex::encode(Sha256::digest(
            toolgate::mcp::canonical_json(&Value::Object(o.clone())).as_bytes(),
        ));
        o.insert("hash".into(), json!(hash));
        prev = json!(hash);
    }
}

fn is_checkpoint(l: &Value) -> bool {
    l["event"] == "checkpoint"
}

/// Waits (up to 10 s) until the log's records satisfy `pred`.
async fn wait_log(log: &Path, pred: impl Fn(&[Value]) -> bool) {
    for _ in 0..200 {
        let ls: Vec<Value> = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if pred(&ls) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the log never got there: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// A closed log of 7 calls signed every 3 records and at shutdown:
/// t0 t1 t2 [cp] t3 t4 t5 [cp] t6 [cp]. The directory goes with the
/// returned [`support::Scratch`].
fn signed_log(tag: &str) -> (support::Scratch, PathBuf, PathBuf) {
    let dir = support::temp_dir(tag);
    let (secret, public) = keygen(&dir);
    let log = dir.join("audit.jsonl");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let key = Checkpointer::load_key(&secret).unwrap();
        let (a, task) = Auditor::start_signed(
            &log,
            Some(Checkpointer::new(key, 3, Duration::from_secs(3600))),
        )
        .unwrap();
        for i in 0..7 {
            a.submit(Record {
                event: "call",
                tool: Some(format!("t{i}")),
                decision: Some("allow"),
                ..Record::default()
            })
            .unwrap();
            // One batch per record, so the layout is exact.
            a.flush().await;
        }
        drop(a);
        task.await.unwrap();
    });
    let events: Vec<bool> = lines(&log).iter().map(is_checkpoint).collect();
    assert_eq!(
        events,
        [false, false, false, true, false, false, false, true, false, true],
        "layout"
    );
    (dir, log, public)
}

#[test]
fn an_intact_signed_log_verifies_and_names_its_last_signed_seq_and_time() {
    let (_dir, log, public) = signed_log("intact");
    let last = lines(&log).pop().unwrap();
    let t = assert_ok(&verify(
        &log,
        &public,
        &["--require-tail-signed", "--expect-seq", "9"],
    ));
    assert!(
        t.contains("10 records, chain intact, 3 signed checkpoint(s), last signed seq 9 at ")
            && t.contains(last["detail"]["signed_at"].as_str().unwrap()),
        "{t}"
    );
}

#[test]
fn an_edit_inside_the_signed_part_fails_whether_or_not_it_is_rechained() {
    let (_dir, log, public) = signed_log("edit");
    let orig = lines(&log);
    // t4 (seq 6) sits between two checkpoints, which are kept.
    let mut edited = orig.clone();
    edited[5]["decision"] = json!("deny");
    write(&log, &edited);
    assert_broken(
        &verify(&log, &public, &[]),
        "line 6 (seq 6): hash does not match",
    );
    rechain(&mut edited);
    write(&log, &edited);
    assert_ok(&verify_unkeyed(&log));
    let t = assert_broken(
        &verify(&log, &public, &[]),
        "line 8 (seq 8): checkpoint does not cover the record before it",
    );
    assert!(t.contains("signs seq 7"), "{t}");
}

#[test]
fn records_after_the_first_checkpoint_rewritten_and_rechained_are_caught() {
    let (_dir, log, public) = signed_log("after-first");
    let orig = lines(&log);
    // Later checkpoints kept, everything after the first rewritten.
    let mut forged = orig.clone();
    for l in forged[4..].iter_mut().filter(|l| !is_checkpoint(l)) {
        l["tool"] = json!("forged");
    }
    rechain(&mut forged);
    write(&log, &forged);
    assert_broken(
        &verify(&log, &public, &[]),
        "line 8 (seq 8): checkpoint does not cover",
    );
    // Later checkpoints dropped (the intruder cannot sign new ones): the
    // forged records are an unsigned tail, refused for a closed log.
    let mut forged: Vec<Value> = orig[..4].to_vec();
    for i in 0..5 {
        let mut l = orig[4].clone();
        l["tool"] = json!(format!("forged{i}"));
        l["seq"] = json!(5 + i);
        forged.push(l);
    }
    rechain(&mut forged);
    write(&log, &forged);
    let t = text(&verify(&log, &public, &[]));
    assert!(
        t.contains("warning: 5 record(s) after the last checkpoint are not signed yet"),
        "{t}"
    );
    assert_broken(
        &verify(&log, &public, &["--require-tail-signed"]),
        "5 record(s) after the last checkpoint are not signed (--require-tail-signed)",
    );
}

#[test]
fn a_wholesale_rewrite_fails_with_or_without_the_checkpoint_lines() {
    let (_dir, log, public) = signed_log("wholesale");
    let orig = lines(&log);
    // Every checkpoint removed, the rest renumbered and re-chained: the
    // hash chain alone is happy, the key is not.
    let mut forged: Vec<Value> = orig.iter().filter(|l| !is_checkpoint(l)).cloned().collect();
    for (i, l) in forged.iter_mut().enumerate() {
        l["seq"] = json!(i + 1);
        l["tool"] = json!("forged");
    }
    rechain(&mut forged);
    write(&log, &forged);
    assert_ok(&verify_unkeyed(&log));
    assert_broken(
        &verify(&log, &public, &[]),
        "no signed checkpoint in the log",
    );
    // The checkpoint lines kept, everything re-chained from genesis.
    let mut forged = orig.clone();
    for l in forged.iter_mut().filter(|l| !is_checkpoint(l)) {
        l["tool"] = json!("forged");
    }
    rechain(&mut forged);
    write(&log, &forged);
    assert_broken(
        &verify(&log, &public, &[]),
        "line 4 (seq 4): checkpoint does not cover",
    );
    // A checkpoint's signed time edited: its signature no longer verifies.
    let mut forged = orig.clone();
    forged[9]["detail"]["signed_at"] = json!("2099-01-01T00:00:00.000000Z");
    rechain(&mut forged);
    write(&log, &forged);
    assert_broken(
        &verify(&log, &public, &[]),
        "line 10 (seq 10): checkpoint signature does not verify",
    );
}

/// The end-to-end anchor: `toolgate serve` publishes each checkpoint in its
/// operator log; a log cut right after an earlier checkpoint is a valid
/// signed log to `--key` (and `--require-tail-signed`), and is caught by
/// `--expect-seq` with the last published seq, and, while the log is live,
/// by `--max-age`, because the interval checkpoints keep coming while idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_cut_back_to_an_earlier_checkpoint_is_caught_by_its_anchors() {
    let mut served = support::Served::start(
        "anchors",
        "{ path: audit.jsonl, checkpoint: { key_file: keys/audit.key, every: 1, interval: 200ms } }",
    )
    .await;
    let dir = served.dir.clone();
    let public = dir.join("keys/audit.pub");
    let log = dir.join("audit.jsonl");
    // Each call is signed by a checkpoint right after it (every: 1).
    for n in 2..=3 {
        wait_log(&log, |ls| {
            ls.iter().filter(|l| l["event"] == "call").count() == n - 1
                && ls.last().is_some_and(is_checkpoint)
        })
        .await;
        assert_eq!(served.call().await.unwrap().status(), 200);
    }
    wait_log(&log, |ls| {
        ls.iter().filter(|l| l["event"] == "call").count() == 3
    })
    .await;
    // The first checkpoint after the first call, and, while idle, interval
    // checkpoints until one is 4 s younger than it.
    let signed_at =
        |l: &Value| humantime::parse_rfc3339(l["detail"]["signed_at"].as_str().unwrap()).unwrap();
    let ls = lines(&log);
    let first_call = ls.iter().position(|l| l["event"] == "call").unwrap();
    let first_line = first_call + ls[first_call..].iter().position(is_checkpoint).unwrap();
    let first = ls[first_line].clone();
    wait_log(&log, |ls| {
        ls.iter().rev().find(|l| is_checkpoint(l)).is_some_and(|l| {
            signed_at(l)
                .duration_since(signed_at(&first))
                .is_ok_and(|d| d >= Duration::from_secs(4))
        })
    })
    .await;

    // Live: the whole log is fresh, the cut copy is stale.
    let cut = dir.join("cut.jsonl");
    let cut_back = |from: &Path| {
        let text = std::fs::read_to_string(from).unwrap();
        let kept: Vec<&str> = text.lines().take(first_line + 1).collect();
        std::fs::write(&cut, format!("{}\n", kept.join("\n"))).unwrap();
    };
    cut_back(&log);
    let t = assert_ok(&verify(&log, &public, &["--max-age", "3s"]));
    assert!(t.contains("last signed seq "), "{t}");
    assert_ok(&verify(&cut, &public, &["--require-tail-signed"]));
    assert_broken(
        &verify(&cut, &public, &["--max-age", "3s"]),
        "was cut back to an old checkpoint or its writer has stopped",
    );

    // Stop; the operator log's last published checkpoint is the anchor.
    let published: Vec<Value> = served
        .stop()
        .await
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "audit checkpoint signed")
        .collect();
    let ls = lines(&log);
    let checkpoints: Vec<&Value> = ls.iter().filter(|l| is_checkpoint(l)).collect();
    assert_eq!(
        published.len(),
        checkpoints.len(),
        "every checkpoint is published"
    );
    for (p, c) in published.iter().zip(&checkpoints) {
        assert_eq!(p["fields"]["audit.seq"], c["detail"]["covers_seq"], "{p}");
        assert_eq!(p["fields"]["audit.hash"], c["detail"]["covers_hash"], "{p}");
    }
    let anchor = published.last().unwrap()["fields"]["audit.seq"]
        .as_u64()
        .unwrap();
    let n = anchor.to_string();
    let t = assert_ok(&verify(
        &log,
        &public,
        &["--require-tail-signed", "--expect-seq", &n],
    ));
    assert!(t.contains(&format!("last signed seq {anchor} at ")), "{t}");
    let cut_seq = first["detail"]["covers_seq"].as_u64().unwrap();
    cut_back(&log);
    assert_ok(&verify(&cut, &public, &["--require-tail-signed"]));
    assert_broken(
        &verify(&cut, &public, &["--require-tail-signed", "--expect-seq", &n]),
        &format!(
            "the last signed record is seq {cut_seq}, but seq {anchor} was signed before (--expect-seq {anchor}): records {}..={anchor} are missing",
            cut_seq + 1
        ),
    );
    assert_eq!(served.tools.received().len(), 3);
}

/// Deleting records from the front of a log leaves a valid chain behind
/// them; verify refuses a log that does not start at seq 1 with a `prev`
/// of 64 zeros (with or without the key), unless told which rotated-out
/// log it continues, and then it checks that one's chain and the link.
#[test]
fn a_log_whose_head_was_cut_is_broken_unless_it_continues_a_named_log() {
    let (_dir, log, public) = signed_log("head-cut");
    let all = lines(&log);
    let dir = log.parent().unwrap().to_path_buf();
    write(&log, &all[2..]);
    let t = assert_broken(&verify_unkeyed(&log), "records 1..3 were cut from its head");
    assert!(t.contains("line 1 (seq 3)"), "{t}");
    assert_broken(&verify(&log, &public, &[]), "were cut from its head");

    // A log rotated out of it (logrotate's copytruncate): the two are one
    // chain, checked together.
    let previous = dir.join("audit.jsonl.1");
    write(&previous, &all[..2]);
    let continues = ["--continues", previous.to_str().unwrap()];
    let unkeyed = || {
        toolgate()
            .args(["audit", "verify"])
            .arg(&log)
            .args(continues)
            .output()
            .unwrap()
    };
    let t = assert_ok(&unkeyed());
    assert!(t.contains("8 records (from seq 3, continuing"), "{t}");
    let t = assert_ok(&verify(&log, &public, &continues));
    assert!(
        t.contains("(from seq 3, continuing the previous log)"),
        "{t}"
    );

    // The wrong previous log, or one edited and re-chained, does not link.
    write(&previous, &all[..1]);
    assert_broken(
        &verify(&log, &public, &continues),
        "seq 3 where 2 was expected",
    );
    let mut edited = all[..2].to_vec();
    edited[1]["tool"] = json!("t9");
    rechain(&mut edited);
    write(&previous, &edited);
    assert_broken(&unkeyed(), "does not match the hash of seq 2");
    // A previous log that is itself broken is named as such.
    edited[0]["tool"] = json!("t8");
    write(&previous, &edited);
    assert_broken(&unkeyed(), "(the log it continues)");

    // Two rotations, named oldest first: one chain over three files. In
    // the other order the older one does not start the chain.
    let oldest = dir.join("audit.jsonl.2");
    write(&oldest, &all[..1]);
    write(&previous, &all[1..2]);
    let both = |first: &Path, second: &Path| {
        toolgate()
            .args(["audit", "verify"])
            .arg(&log)
            .arg("--continues")
            .arg(first)
            .arg("--continues")
            .arg(second)
            .output()
            .unwrap()
    };
    let t = assert_ok(&both(&oldest, &previous));
    assert!(t.contains("8 records (from seq 3, continuing"), "{t}");
    assert_broken(&both(&previous, &oldest), "(the log it continues)");
}

/// A key injected before the real one (`{"decision":"deny",...}`) leaves
/// the hash intact for a reader that keeps the last value, while another
/// reader sees the first: verify refuses duplicate keys at any depth.
#[test]
fn a_record_with_an_injected_duplicate_key_is_broken_at_any_depth() {
    let (_dir, log, public) = signed_log("dup-key");
    let orig = std::fs::read_to_string(&log).unwrap();
    // Writes the log with `with` inserted after the first `at` of `line`.
    let inject = |line: usize, at: &str, with: &str| {
        let mut out: Vec<String> = orig.lines().map(str::to_owned).collect();
        let edited = out[line - 1].replacen(at, &format!("{at}{with}"), 1);
        assert_ne!(edited, out[line - 1], "{at} not in line {line}");
        out[line - 1] = edited;
        std::fs::write(&log, out.join("\n") + "\n").unwrap();
    };
    // seq 5 is the allowed call t3.
    assert_eq!(lines(&log)[4]["decision"], "allow");
    inject(5, "{", r#""decision":"deny","#);
    assert_eq!(
        lines(&log)[4]["decision"],
        "allow",
        "a lenient reader still sees the hashed value"
    );
    assert_broken(
        &verify_unkeyed(&log),
        r#"line 5 (seq 5): duplicate key "decision" at /"#,
    );
    assert_broken(&verify(&log, &public, &[]), "line 5 (seq 5): duplicate key");
    // Nested: inside a checkpoint's detail (seq 4).
    inject(4, r#""detail":{"#, r#""covers_seq":1,"#);
    assert_broken(
        &verify_unkeyed(&log),
        r#"line 4 (seq 4): duplicate key "covers_seq" at /detail"#,
    );
    std::fs::write(&log, &orig).unwrap();
    assert_ok(&verify(&log, &public, &[]));
}
