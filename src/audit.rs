//! The tamper-evident audit log: typed [`Record`]s, the chained writer task,
//! signed [`Checkpointer`] records, and [`verify`] / [`verify_signed`]
//! (in `audit/verify.rs`).
//!
//! Invariants:
//! - one task owns the file and the chain: it assigns `seq`, `prev` and
//!   `hash`, so the request path never hashes, serialises or touches disk;
//! - the request path hands records over through a bounded channel
//!   ([`Auditor::submit`]); a full channel or an unwritable log is an error
//!   the gate turns into -32005 before anything is forwarded;
//! - a batch that fails to write is kept and retried, never dropped; while it
//!   fails the log is reported unhealthy;
//! - `hash` = SHA-256 of the canonical JSON of the record without `hash`
//!   (keys sorted), so verification does not depend on byte layout;
//! - arguments are redacted before they are recorded ([`redact`]).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

mod verify;
pub use verify::{
    verified_last_link, verify, verify_after, verify_signed, verify_signed_after, Anchors, Broken,
    Link, Signed,
};

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Records that may wait for the writer.
pub const QUEUE: usize = 16_384;

/// How long the writer lets records gather after a write: at most 250
/// writes and wake-ups a second, and no record waits longer than this (plus
/// the write) in memory. 1 ms cost about 1.6k instructions more per call at
/// c=1 and woke the writer four times as often (BENCHMARKS.md).
const GATHER: Duration = Duration::from_millis(4);

/// One audit record, before the writer chains it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record {
    pub event: &'static str,
    pub request_id: Option<String>,
    pub agent: Option<Arc<str>>,
    pub tool: Option<String>,
    pub decision: Option<&'static str>,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub args_sha256: Option<String>,
    pub args: Option<Value>,
    pub hold_id: Option<String>,
    pub approver: Option<String>,
    pub latency_us: Option<u64>,
    /// Event-specific detail (upstream, error, reload diff, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

/// Signs checkpoint records: every `every` records, every `interval` (also
/// while the log is idle) and at shutdown, the writer appends a record
/// carrying an Ed25519 signature over the (seq, hash) of the record before
/// it and the time of signing.
///
/// What that proves, checked by `toolgate audit verify --key PUB`:
/// - rewriting the log wholesale, or any record a checkpoint covers, needs
///   the key (a re-chained record no longer matches the checkpoint after
///   it: "does not cover");
/// - records after the last checkpoint are not covered yet: verify counts
///   them, and `--require-tail-signed` refuses them in a closed log;
/// - a chain cannot show that it was cut *right after* an earlier
///   checkpoint: what is left is a shorter, validly signed log. That needs
///   an anchor kept outside the file, so each checkpoint is also published
///   to the operator log (`audit checkpoint signed`, with `audit.seq` and
///   `audit.hash`), and verify takes `--expect-seq N` (the last signed seq
///   seen there) and `--max-age D` (the newest checkpoint of a live log is
///   at most `interval` old, and its signed time cannot be forged).
#[derive(Clone)]
pub struct Checkpointer {
    key: ed25519_dalek::SigningKey,
    pub every: u64,
    pub interval: Duration,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("key_id", &key_id(&self.key.verifying_key()))
            .finish_non_exhaustive()
    }
}

/// Short id of a verifying key: the first 8 bytes of its SHA-256, hex.
pub fn key_id(k: &ed25519_dalek::VerifyingKey) -> String {
    hex::encode(&Sha256::digest(k.as_bytes())[..8])
}

/// What a checkpoint signs. v2 also signs the time, so that the age of the
/// newest checkpoint (`verify --max-age`) cannot be edited without the key;
/// v1 checkpoints (no `signed_at`) still verify.
fn checkpoint_message(seq: u64, hash: &str, signed_at: Option<&str>) -> Vec<u8> {
    match signed_at {
        Some(at) => format!("toolgate-audit-checkpoint:v2:{seq}:{hash}:{at}"),
        None => format!("toolgate-audit-checkpoint:v1:{seq}:{hash}"),
    }
    .into_bytes()
}

impl Checkpointer {
    pub fn new(key: ed25519_dalek::SigningKey, every: u64, interval: Duration) -> Self {
        Checkpointer {
            key,
            every: every.max(1),
            interval,
        }
    }

    /// Reads a base64 32-byte seed (as written by `toolgate audit keygen`).
    pub fn load_key(path: &Path) -> Result<ed25519_dalek::SigningKey, String> {
        use base64::Engine as _;
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let seed = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| format!("{} is not a base64 Ed25519 seed (32 bytes)", path.display()))?;
        Ok(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// The checkpoint record signing `covers_seq`/`covers_hash`, published
    /// to the operator log as well: that line is the anchor kept outside
    /// the file (see the type's docs). It is logged when signed, just
    /// before the writer appends it; a checkpoint whose write fails is kept
    /// and retried like any record, so the anchor never names a seq the log
    /// is not meant to hold.
    fn record(&self, covers_seq: u64, covers_hash: &str) -> Record {
        use base64::Engine as _;
        use ed25519_dalek::Signer as _;
        let signed_at = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        let sig = self.key.sign(&checkpoint_message(
            covers_seq,
            covers_hash,
            Some(&signed_at),
        ));
        let key_id = key_id(&self.key.verifying_key());
        tracing::info!(
            audit.seq = covers_seq,
            audit.hash = %covers_hash,
            audit.signed_at = %signed_at,
            audit.key_id = %key_id,
            "audit checkpoint signed"
        );
        Record {
            event: "checkpoint",
            reason: Some(format!("records 1..={covers_seq} signed")),
            detail: Some(serde_json::json!({
                "covers_seq": covers_seq,
                "covers_hash": covers_hash,
                "signed_at": signed_at,
                "key_id": key_id,
                "signature": base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()),
            })),
            ..Record::default()
        }
    }
}

/// Parses a base64 Ed25519 public key (as written by `toolgate audit keygen`).
pub fn load_public_key(path: &Path) -> Result<ed25519_dalek::VerifyingKey, String> {
    use base64::Engine as _;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok())
        .ok_or_else(|| format!("{} is not a base64 Ed25519 public key", path.display()))
}

/// Generates a key pair: (base64 seed, base64 public key).
pub fn keygen() -> Result<(String, String), String> {
    use base64::Engine as _;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("no randomness: {e}"))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok((b64.encode(seed), b64.encode(key.verifying_key().as_bytes())))
}

/// Why a record could not be handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the audit log cannot be written")]
pub struct Unavailable;

/// A record [`Auditor::submit`] could not take, given back so that the
/// refusal it turns into is audited instead.
#[derive(Debug)]
pub struct Refused(pub Box<Record>);

enum Cmd {
    Record(Box<Record>, SystemTime),
    Flush(oneshot::Sender<()>),
}

/// A cheap handle to the audit writer.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<Cmd>,
    state: Arc<State>,
}

struct State {
    healthy: AtomicBool,
    written: AtomicU64,
    write_errors: AtomicU64,
    /// Refusal records that could not be kept: the queue was full, or the
    /// backlog of an unwritable log reached [`MAX_BACKLOG`]. Never chained,
    /// so the chain stays verifiable; counted, logged and exported instead.
    dropped: AtomicU64,
    /// Bytes of chained records kept in memory while the log is unwritable.
    max_backlog: usize,
    path: PathBuf,
}

/// Bytes of chained records kept in memory while the log is unwritable.
const MAX_BACKLOG: usize = 64 << 20;

impl Auditor {
    /// Opens (or continues) the log at `path` and starts the writer thread.
    /// Refuses to start on a log whose last record cannot be read, so a
    /// damaged chain is never silently extended.
    pub fn start(path: &Path) -> Result<(Auditor, tokio::task::JoinHandle<()>), String> {
        Self::start_signed(path, None)
    }

    /// Like [`Auditor::start`], appending signed checkpoints.
    pub fn start_signed(
        path: &Path,
        checkpoints: Option<Checkpointer>,
    ) -> Result<(Auditor, tokio::task::JoinHandle<()>), String> {
        Self::open(path, checkpoints, MAX_BACKLOG)
    }

    fn open(
        path: &Path,
        checkpoints: Option<Checkpointer>,
        max_backlog: usize,
    ) -> Result<(Auditor, tokio::task::JoinHandle<()>), String> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let (seq, prev) = last_link(path)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open audit log {}: {e}", path.display()))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let state = Arc::new(State {
            healthy: AtomicBool::new(true),
            written: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            max_backlog,
            path: path.to_path_buf(),
        });
        // The writer has a thread (and a timer-only runtime) of its own:
        // its file writes block, and its wake-ups (one per batch, its
        // gathering timer, checkpoint intervals) would otherwise land on
        // the runtime threads serving calls, waking an idle one and moving
        // calls between them.
        let fail = |e: std::io::Error| format!("cannot start the audit writer: {e}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(fail)?;
        let (done, finished) = oneshot::channel::<()>();
        let st = state.clone();
        std::thread::Builder::new()
            .name("toolgate-audit".into())
            .spawn(move || {
                rt.block_on(writer(rx, file, seq, prev, st, checkpoints));
                let _ = done.send(());
            })
            .map_err(fail)?;
        // Completes when the writer has written its last line (or died:
        // then the queue is closed and every submit is refused).
        let task = tokio::spawn(async move {
            let _ = finished.await;
        });
        Ok((Auditor { tx, state }, task))
    }

    /// Hands `r` to the writer without waiting. Fails when the log is
    /// unhealthy or the queue is full: the caller must not forward.
    pub fn submit(&self, r: Record) -> Result<(), Refused> {
        if !self.state.healthy.load(Ordering::Acquire) {
            return Err(Refused(Box::new(r)));
        }
        self.tx
            .try_send(Cmd::Record(Box::new(r), SystemTime::now()))
            .map_err(|e| match e.into_inner() {
                Cmd::Record(r, _) => Refused(r),
                // Not what was sent; there is nothing to give back.
                Cmd::Flush(_) => Refused(Box::default()),
            })
    }

    /// Hands `r` over even while unhealthy (it is retried with the rest);
    /// used for records of refusals, which forward nothing.
    pub fn record(&self, r: Record) {
        if self
            .tx
            .try_send(Cmd::Record(Box::new(r), SystemTime::now()))
            .is_err()
        {
            self.state.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the last write succeeded.
    pub fn healthy(&self) -> bool {
        self.state.healthy.load(Ordering::Acquire)
    }

    /// Records written since start.
    pub fn written(&self) -> u64 {
        self.state.written.load(Ordering::Relaxed)
    }

    pub fn write_errors(&self) -> u64 {
        self.state.write_errors.load(Ordering::Relaxed)
    }

    /// Refusal records dropped (see `State::dropped`).
    pub fn dropped(&self) -> u64 {
        self.state.dropped.load(Ordering::Relaxed)
    }

    /// Records waiting for the writer.
    pub fn queue_depth(&self) -> usize {
        QUEUE - self.tx.capacity()
    }

    pub fn path(&self) -> &Path {
        &self.state.path
    }

    /// Waits until everything submitted so far is written (or has failed).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Reads the chain's last `(seq, hash)` from an existing log.
fn last_link(path: &Path) -> Result<(u64, String), String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(_) => return Ok((0, GENESIS.to_owned())),
    };
    if !meta.is_file() || meta.len() == 0 {
        return Ok((0, GENESIS.to_owned()));
    }
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot read audit log: {e}"))?;
    let tail = meta.len().min(1 << 20);
    f.seek(SeekFrom::End(-(tail as i64)))
        .map_err(|e| format!("cannot read audit log: {e}"))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)
        .map_err(|e| format!("cannot read audit log: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let last = text
        .trim_end_matches('\n')
        .rsplit('\n')
        .next()
        .unwrap_or("");
    let v: Value = serde_json::from_str(last).map_err(|_| {
        format!(
            "the last line of the audit log {} is not a complete record; run `toolgate audit verify` and repair or rotate the log",
            path.display()
        )
    })?;
    match (
        v.get("seq").and_then(Value::as_u64),
        v.get("hash").and_then(Value::as_str),
    ) {
        (Some(seq), Some(h)) => Ok((seq, h.to_owned())),
        _ => Err(format!(
            "the last record of {} has no seq/hash",
            path.display()
        )),
    }
}

/// One chained record as its JSON line and hash (what the writer appends).
///
/// The line is written straight from the record in canonical form (keys
/// sorted, see [`crate::mcp::canonical_json`]), with `hash` in its sorted
/// place: the hash covers exactly the line's bytes without the `hash`
/// member, so no JSON tree is built and nothing is serialised twice.
pub fn chain_line(r: &Record, ts: SystemTime, seq: u64, prev: &str) -> (Vec<u8>, String) {
    use crate::mcp::{write_canonical, write_str};
    fn key(out: &mut Vec<u8>, k: &str) {
        if out.last() != Some(&b'{') {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b"\":");
    }
    fn opt_str(out: &mut Vec<u8>, k: &str, v: Option<&str>) {
        key(out, k);
        match v {
            Some(s) => write_str(s, out),
            None => out.extend_from_slice(b"null"),
        }
    }
    fn opt_value(out: &mut Vec<u8>, k: &str, v: Option<&Value>) {
        key(out, k);
        match v {
            Some(v) => write_canonical(v, out),
            None => out.extend_from_slice(b"null"),
        }
    }
    // Members before "hash" in key order, then those after it.
    let mut head = Vec::with_capacity(384);
    head.push(b'{');
    opt_str(&mut head, "agent", r.agent.as_deref());
    opt_str(&mut head, "approver", r.approver.as_deref());
    opt_value(&mut head, "args", r.args.as_ref());
    opt_str(&mut head, "args_sha256", r.args_sha256.as_deref());
    opt_str(&mut head, "decision", r.decision);
    if let Some(d) = &r.detail {
        opt_value(&mut head, "detail", Some(d));
    }
    opt_str(&mut head, "event", Some(r.event));
    // `tail` starts with a comma: it follows `head` (or the hash member).
    let mut tail = Vec::with_capacity(256);
    opt_str(&mut tail, "hold_id", r.hold_id.as_deref());
    key(&mut tail, "latency_us");
    match r.latency_us {
        Some(l) => {
            let _ = std::io::Write::write_fmt(&mut tail, format_args!("{l}"));
        }
        None => tail.extend_from_slice(b"null"),
    }
    opt_str(&mut tail, "prev", Some(prev));
    opt_str(&mut tail, "reason", r.reason.as_deref());
    // Present in every record (SPEC), null when no request caused it.
    opt_str(&mut tail, "request_id", r.request_id.as_deref());
    opt_str(&mut tail, "rule", r.rule.as_deref());
    key(&mut tail, "seq");
    let _ = std::io::Write::write_fmt(&mut tail, format_args!("{seq}"));
    opt_str(&mut tail, "tool", r.tool.as_deref());
    key(&mut tail, "ts");
    tail.push(b'"');
    let _ = std::io::Write::write_fmt(
        &mut tail,
        format_args!("{}", humantime::format_rfc3339_micros(ts)),
    );
    tail.extend_from_slice(b"\"}");
    let hash = sha256_hex(
        &Sha256::new()
            .chain_update(&head)
            .chain_update(&tail)
            .finalize(),
    );
    let mut line = head;
    line.reserve(tail.len() + 80);
    line.extend_from_slice(b",\"hash\":\"");
    line.extend_from_slice(hash.as_bytes());
    line.push(b'"');
    line.extend_from_slice(&tail);
    line.push(b'\n');
    (line, hash)
}

async fn writer(
    mut rx: mpsc::Receiver<Cmd>,
    mut file: std::fs::File,
    mut seq: u64,
    mut prev: String,
    state: Arc<State>,
    checkpoints: Option<Checkpointer>,
) {
    let mut unsigned = 0u64;
    let mut last_checkpoint = tokio::time::Instant::now();
    // Lines chained but not yet durably written, kept across failures.
    let mut pending: Vec<u8> = Vec::new();
    let mut pending_records = 0u64;
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        // Also while idle: the newest checkpoint of a live log is then at
        // most `interval` old, which `verify --max-age` relies on.
        let due = checkpoints.as_ref().map(|c| last_checkpoint + c.interval);
        let first = if pending.is_empty() {
            let next = match due {
                Some(at) => tokio::select! {
                    c = rx.recv() => Some(c),
                    _ = tokio::time::sleep_until(at) => None,
                },
                None => Some(rx.recv().await),
            };
            match next {
                Some(Some(c)) => Some(c),
                Some(None) => break,
                // The interval ran out with unsigned records: checkpoint now.
                None => None,
            }
        } else {
            // Retry a failed batch after a pause, taking new records meanwhile.
            match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
                Ok(Some(c)) => Some(c),
                // Closed: one last attempt after the loop.
                Ok(None) => break,
                Err(_) => None,
            }
        };
        let mut batch = Vec::with_capacity(64);
        batch.extend(first);
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        for cmd in batch {
            match cmd {
                Cmd::Record(_, _) if pending.len() > state.max_backlog => {
                    // Only refusals get here while unhealthy (submit refuses
                    // calls that would forward): drop before chaining.
                    if state.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::error!("audit backlog over 64 MiB while the log is unwritable; dropping refusal records until it recovers");
                    }
                }
                Cmd::Record(r, ts) => {
                    seq += 1;
                    let (line, hash) = chain_line(&r, ts, seq, &prev);
                    prev = hash;
                    pending.extend_from_slice(&line);
                    pending_records += 1;
                    unsigned += 1;
                }
                Cmd::Flush(tx) => flushes.push(tx),
            }
        }
        if let Some(c) = &checkpoints {
            if unsigned >= c.every || last_checkpoint.elapsed() >= c.interval {
                let r = c.record(seq, &prev);
                seq += 1;
                let (line, hash) = chain_line(&r, SystemTime::now(), seq, &prev);
                prev = hash;
                pending.extend_from_slice(&line);
                pending_records += 1;
                unsigned = 0;
                last_checkpoint = tokio::time::Instant::now();
            }
        }
        let mut wrote = false;
        if !pending.is_empty() {
            match file.write_all(&pending).and_then(|()| file.flush()) {
                Ok(()) => {
                    wrote = true;
                    state.written.fetch_add(pending_records, Ordering::Relaxed);
                    pending.clear();
                    pending_records = 0;
                    if !state.healthy.swap(true, Ordering::AcqRel) {
                        tracing::warn!(
                            audit.path = %state.path.display(),
                            audit.dropped = state.dropped.load(Ordering::Relaxed),
                            "audit log writable again"
                        );
                    }
                }
                Err(e) => {
                    state.write_errors.fetch_add(1, Ordering::Relaxed);
                    if state.healthy.swap(false, Ordering::AcqRel) {
                        tracing::error!(audit.path = %state.path.display(), error = %e, "audit log write failed; refusing calls until it recovers");
                    }
                    // A partial write may have landed: reopen so the retry
                    // appends whole lines after whatever is there.
                    if let Ok(f) = std::fs::OpenOptions::new().append(true).open(&state.path) {
                        file = f;
                    }
                }
            }
        }
        // A flush waits for the attempt, not for success: callers read
        // `healthy()` to learn the outcome.
        for f in flushes.drain(..) {
            let _ = f.send(());
        }
        // Let records gather for a moment: at most one write (and one
        // wake-up of this task) per GATHER, instead of one per record
        // or handful of records. Calls do not wait for this (their records
        // were handed over already), and a quiet log is written at once.
        if wrote {
            tokio::time::sleep(GATHER).await;
        }
    }
    // Shutdown: sign what is unsigned, so a closed log ends on a checkpoint.
    if let (Some(c), true) = (&checkpoints, unsigned > 0) {
        let r = c.record(seq, &prev);
        let (line, _) = chain_line(&r, SystemTime::now(), seq + 1, &prev);
        pending.extend_from_slice(&line);
    }
    if !pending.is_empty() {
        let _ = file.write_all(&pending);
    }
    let _ = file.sync_all();
}

/// Redacts secrets in arguments: values under secret-like keys, and strings
/// that look like bearer tokens or JWTs.
pub fn redact(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| {
                    if is_secret_key(k) {
                        (k.clone(), Value::String("[REDACTED]".into()))
                    } else {
                        (k.clone(), redact(x))
                    }
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(redact).collect()),
        Value::String(s) if looks_like_token(s) => Value::String("[REDACTED]".into()),
        other => other.clone(),
    }
}

fn is_secret_key(k: &str) -> bool {
    static WORDS: std::sync::LazyLock<Option<aho_corasick::AhoCorasick>> =
        std::sync::LazyLock::new(|| {
            aho_corasick::AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .build(SECRET_WORDS)
                .ok()
        });
    let b = k.as_bytes();
    // "key", "api_key", "signingKey": ends in "key", any case.
    if b.len() >= 3 && b[b.len() - 3..].eq_ignore_ascii_case(b"key") {
        return true;
    }
    match &*WORDS {
        Some(words) => words.is_match(k),
        // Never happens (the words are fixed); when in doubt, redact.
        None => true,
    }
}

/// Key parts that mark a secret, matched in any ASCII case.
const SECRET_WORDS: [&str; 10] = [
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "credential",
    "cookie",
    "apikey",
    "api_key",
    "private",
];

fn looks_like_token(s: &str) -> bool {
    let t = s.trim();
    let t = t
        .strip_prefix("Bearer ")
        .or_else(|| t.strip_prefix("bearer "))
        .unwrap_or(t);
    (t.starts_with("eyJ") && t.matches('.').count() >= 2 && t.len() > 20)
        || s.trim_start().starts_with("Bearer ")
}

/// SHA-256 of the canonical arguments.
pub fn args_sha256(args: &Value) -> String {
    let mut canonical = Vec::with_capacity(128);
    crate::mcp::write_canonical(args, &mut canonical);
    sha256_hex(&Sha256::digest(&canonical))
}

/// Lowercase hex of a SHA-256 digest. `hex::encode` collects it char by
/// char; this writes the 64 digits at once (it runs twice per call).
pub fn sha256_hex(digest: &[u8]) -> String {
    let mut buf = [0u8; 64];
    match hex::encode_to_slice(digest, &mut buf) {
        Ok(()) => String::from_utf8(buf.to_vec()).unwrap_or_else(|_| hex::encode(digest)),
        Err(_) => hex::encode(digest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SPEC: every record has at least these members (null when they do
    /// not apply).
    const SPEC_MEMBERS: [&str; 16] = [
        "ts",
        "seq",
        "event",
        "request_id",
        "agent",
        "tool",
        "decision",
        "rule",
        "reason",
        "args_sha256",
        "args",
        "hold_id",
        "approver",
        "latency_us",
        "prev",
        "hash",
    ];
    use crate::mcp::canonical_json;
    use serde_json::json;

    /// A scratch dir (hold it: it goes when dropped) and a log path in it.
    fn tmp(name: &str) -> (crate::scratch::Scratch, PathBuf) {
        let d = crate::scratch::Scratch::new(name).unwrap();
        let log = d.join("audit.jsonl");
        (d, log)
    }

    fn rec(tool: &str) -> Record {
        Record {
            event: "call",
            tool: Some(tool.into()),
            decision: Some("allow"),
            ..Record::default()
        }
    }

    /// The line written straight from the record is the canonical JSON of
    /// the record as a tree (what `verify` recomputes), plus its hash.
    #[test]
    fn chain_line_is_the_canonical_record_with_its_hash() {
        let ts = SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_000_000_123_456);
        let full = Record {
            event: "call",
            request_id: Some("r-1".into()),
            agent: Some(Arc::from("bot \"q\" \u{e9}")),
            tool: Some("billing__x".into()),
            decision: Some("allow"),
            rule: Some("tools[0]".into()),
            reason: Some("line\nbreak".into()),
            args_sha256: Some("ab".into()),
            args: Some(json!({"z": [1.0, 2.5, {"b": null, "a": true}], "a": "\u{1F600}", "n": -3})),
            hold_id: Some("h".into()),
            approver: Some("alice".into()),
            latency_us: Some(42),
            detail: Some(json!({"upstream": "billing"})),
        };
        for r in [full, Record::default(), rec("t")] {
            let (line, hash) = chain_line(&r, ts, 7, GENESIS);
            assert_eq!(line.last(), Some(&b'\n'));
            let mut parsed: serde_json::Map<String, Value> = serde_json::from_slice(&line).unwrap();
            for k in SPEC_MEMBERS {
                assert!(parsed.contains_key(k), "{k} missing from {parsed:?}");
            }
            assert_eq!(parsed.remove("hash"), Some(Value::String(hash.clone())));
            // The tree the record serialises to, with the chain's members.
            let mut tree = match serde_json::to_value(&r).unwrap() {
                Value::Object(o) => o,
                _ => unreachable!(),
            };
            tree.insert(
                "ts".into(),
                Value::String(humantime::format_rfc3339_micros(ts).to_string()),
            );
            tree.insert("seq".into(), Value::from(7));
            tree.insert("prev".into(), Value::from(GENESIS));
            let canonical = canonical_json(&Value::Object(tree));
            assert_eq!(
                canonical_json(&Value::Object(parsed)),
                canonical,
                "the line holds exactly the record"
            );
            assert_eq!(hash, hex::encode(Sha256::digest(canonical.as_bytes())));
            // And the line is itself canonical, hash member aside.
            let text = String::from_utf8(line).unwrap();
            let without = text
                .trim_end()
                .replace(&format!(",\"hash\":\"{hash}\""), "");
            assert_eq!(without, canonical);
        }
    }

    #[tokio::test]
    async fn chain_verifies_and_continues_across_restarts() {
        let (_d, p) = tmp("chain");
        let (a, _t) = Auditor::start(&p).unwrap();
        for i in 0..5 {
            a.submit(rec(&format!("t{i}"))).unwrap();
        }
        a.flush().await;
        assert_eq!(verify(&p), Ok(5));
        drop(a);
        let (a, _t) = Auditor::start(&p).unwrap();
        a.submit(rec("after")).unwrap();
        a.flush().await;
        assert_eq!(verify(&p), Ok(6));
        let text = std::fs::read_to_string(&p).unwrap();
        let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["prev"], GENESIS);
        assert_eq!(first["seq"], 1);
        for k in SPEC_MEMBERS {
            assert!(first.get(k).is_some(), "record lacks {k}: {first}");
        }
    }

    #[tokio::test]
    async fn records_are_written_while_the_callers_runtime_is_busy() {
        // This test's runtime has one thread, blocked below: a writer that
        // were a task on it could not write until the block ends.
        let (_d, p) = tmp("own-thread");
        let (a, _t) = Auditor::start(&p).unwrap();
        a.submit(rec("while-busy")).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&p)
            .unwrap_or_default()
            .lines()
            .count()
            < 1
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the record was not written while the runtime was blocked"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(verify(&p), Ok(1));
    }

    #[tokio::test]
    async fn tampering_is_detected_at_the_first_bad_record() {
        let (_d, p) = tmp("tamper");
        let (a, _t) = Auditor::start(&p).unwrap();
        for i in 0..4 {
            a.submit(rec(&format!("t{i}"))).unwrap();
        }
        a.flush().await;
        let text = std::fs::read_to_string(&p).unwrap();
        let edited = text.replacen("\"t2\"", "\"t9\"", 1);
        std::fs::write(&p, &edited).unwrap();
        let e = verify(&p).unwrap_err();
        assert_eq!((e.line, e.seq), (3, 3), "{e}");
        // Deleting a record breaks the link of the next one.
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(&p, format!("{}\n{}\n{}\n", lines[0], lines[2], lines[3])).unwrap();
        let e = verify(&p).unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.why.contains("seq 3 where 2"), "{e}");
    }

    #[tokio::test]
    async fn an_outage_keeps_a_bounded_backlog_and_the_chain_verifies_after_recovery() {
        // The log is a symlink to /dev/full (every write fails with ENOSPC)
        // until it is pointed at a real file: a disk that fills and frees.
        let (_d, link) = tmp("outage");
        let real = link.with_file_name("real.jsonl");
        std::os::unix::fs::symlink("/dev/full", &link).unwrap();
        // A small bound, so the test need not queue 64 MiB.
        let (a, _t) = Auditor::open(&link, None, 2048).unwrap();
        a.submit(rec("first")).unwrap();
        a.flush().await;
        assert!(!a.healthy());
        for i in 0..200 {
            a.record(rec(&format!("refusal-{i}")));
            if i % 20 == 0 {
                a.flush().await;
            }
        }
        a.flush().await;
        let dropped = a.dropped();
        assert!(
            dropped > 0 && dropped < 200,
            "bounded, not all dropped: {dropped}"
        );
        std::fs::write(&real, "").unwrap();
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        // The writer retries every 500 ms; a flush waits for an attempt.
        for _ in 0..20 {
            a.flush().await;
            if a.healthy() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(a.healthy(), "recovered once writable");
        a.submit(rec("after")).unwrap();
        a.flush().await;
        let kept = verify(&link).expect("the chain verifies across the outage");
        assert_eq!(
            kept,
            1 + 200 - dropped + 1,
            "every record not counted as dropped is there"
        );
    }

    #[tokio::test]
    async fn unwritable_log_turns_unhealthy_and_refuses() {
        // /dev/full accepts the open but fails every write with ENOSPC.
        let (a, _t) = Auditor::start(Path::new("/dev/full")).unwrap();
        assert!(a.healthy());
        a.submit(rec("x")).unwrap();
        a.flush().await;
        assert!(!a.healthy());
        assert!(a.submit(rec("y")).is_err());
        assert!(a.write_errors() >= 1);
    }

    #[test]
    fn a_torn_last_line_refuses_to_start() {
        let (_d, p) = tmp("torn");
        std::fs::write(&p, "{\"seq\":1,\"hash\":\"ab").unwrap();
        assert!(Auditor::start(&p).is_err());
    }

    #[tokio::test]
    async fn signed_checkpoints_detect_wholesale_rewrites_and_count_the_unsigned_tail() {
        use base64::Engine as _;
        let (_d, p) = tmp("signed");
        let (seed, public) = keygen().unwrap();
        let seed: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(seed)
            .unwrap()
            .try_into()
            .unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let public = ed25519_dalek::VerifyingKey::from_bytes(
            &base64::engine::general_purpose::STANDARD
                .decode(public)
                .unwrap()
                .try_into()
                .unwrap(),
        )
        .unwrap();
        let (a, task) = Auditor::start_signed(
            &p,
            Some(Checkpointer::new(key, 3, Duration::from_secs(3600))),
        )
        .unwrap();
        for i in 0..7 {
            a.submit(rec(&format!("t{i}"))).unwrap();
            a.flush().await;
        }
        let s = verify_signed(&p, &public).unwrap();
        assert_eq!(
            (s.records, s.checkpoints, s.unsigned_tail),
            (9, 2, 1),
            "{s:?}"
        );
        drop(a);
        task.await.unwrap();
        let s = verify_signed(&p, &public).unwrap();
        assert_eq!(
            (s.checkpoints, s.unsigned_tail),
            (3, 0),
            "shutdown signs the tail: {s:?}"
        );
        // Rewrite everything with a fresh chain but no key: detected.
        let (_d, forged) = tmp("forged");
        let (f, ft) = Auditor::start(&forged).unwrap();
        for i in 0..7 {
            f.submit(rec(&format!("t{i}"))).unwrap();
        }
        f.flush().await;
        drop(f);
        ft.await.unwrap();
        assert!(verify(&forged).is_ok(), "the chain alone cannot tell");
        assert!(verify_signed(&forged, &public)
            .unwrap_err()
            .why
            .contains("no signed checkpoint"));
        // A checkpoint signed by another key is refused.
        let (_, other) = keygen().unwrap();
        let other = ed25519_dalek::VerifyingKey::from_bytes(
            &base64::engine::general_purpose::STANDARD
                .decode(other)
                .unwrap()
                .try_into()
                .unwrap(),
        )
        .unwrap();
        assert!(verify_signed(&p, &other)
            .unwrap_err()
            .why
            .contains("does not verify"));
    }

    /// The time trigger: a checkpoint after `interval` with records
    /// unsigned, and another after `interval` of idleness (what keeps the
    /// newest checkpoint of a live log fresh for `verify --max-age`). A
    /// real 200 ms interval (tokio's paused clock needs its test-util
    /// feature, which the crate does not enable).
    #[tokio::test]
    async fn interval_checkpoints_sign_the_tail_and_keep_an_idle_log_fresh() {
        let (_d, p) = tmp("interval");
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let public = key.verifying_key();
        let (a, _t) = Auditor::start_signed(
            &p,
            Some(Checkpointer::new(key, 1000, Duration::from_millis(200))),
        )
        .unwrap();
        a.submit(rec("t0")).unwrap();
        a.flush().await;
        let started = tokio::time::Instant::now();
        let s = verify_signed(&p, &public).unwrap_err();
        assert!(s.why.contains("no signed checkpoint"), "not yet: {s}");
        // Waits (up to 5 s) until `n` checkpoints are in the log.
        let until = |n: u64| {
            let (p, public) = (p.clone(), public);
            async move {
                for _ in 0..100 {
                    if let Ok(s) = verify_signed(&p, &public) {
                        if s.checkpoints >= n {
                            return s;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("no checkpoint {n} within 5 s");
            }
        };
        let s = until(1).await;
        assert!(started.elapsed() >= Duration::from_millis(150), "by time");
        assert_eq!(
            (s.records, s.checkpoints, s.unsigned_tail, s.last_signed_seq),
            (2, 1, 0, 1),
            "{s:?}"
        );
        let first_at = s.last_signed_at.clone().expect("a signed time");
        // Idle: no record, and still a checkpoint every interval, signing
        // the checkpoint before it.
        let s = until(2).await;
        assert_eq!(
            (s.records, s.checkpoints, s.last_signed_seq),
            (3, 2, 2),
            "an idle log is checkpointed too: {s:?}"
        );
        assert!(s.last_signed_at.expect("a signed time") > first_at);
    }

    #[test]
    fn redacts_secret_keys_and_tokens() {
        let v = json!({"user":"a","password":"p","nested":{"api_key":"k","Authorization":"x","list":["eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.sig", "plain"]}, "token_count": 3});
        let r = redact(&v);
        assert_eq!(r["user"], "a");
        assert_eq!(r["password"], "[REDACTED]");
        assert_eq!(r["nested"]["api_key"], "[REDACTED]");
        assert_eq!(r["nested"]["Authorization"], "[REDACTED]");
        assert_eq!(r["nested"]["list"][0], "[REDACTED]");
        assert_eq!(r["nested"]["list"][1], "plain");
        assert_eq!(r["token_count"], "[REDACTED]");
    }

    #[test]
    fn args_hash_is_canonical() {
        let a = crate::mcp::parse_strict(br#"{"b":1.0,"a":"x"}"#).unwrap();
        let b = crate::mcp::parse_strict(br#"{"a":"x","b":1}"#).unwrap();
        assert_eq!(args_sha256(&a), args_sha256(&b));
        assert_eq!(
            args_sha256(&a),
            hex::encode(Sha256::digest(canonical_json(&a).as_bytes()))
        );
    }

    #[test]
    fn secret_keys_match_in_any_case_and_any_script() {
        for k in [
            "key",
            "KEY",
            "signingKey",
            "X-Api-Key",
            "PassWord",
            "my_SECRET_x",
            "sessionCookie",
            "PRIVATE",
            "refresh_Token",
        ] {
            assert!(is_secret_key(k), "{k} is a secret key");
        }
        for k in [
            "",
            "ke",
            "keyboard",
            "invoice_id",
            "path",
            "ключ",
            "kéy",
            "€ey",
        ] {
            assert!(!is_secret_key(k), "{k} is not a secret key");
        }
    }
}
