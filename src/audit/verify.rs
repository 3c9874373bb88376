//! Verifying an audit log: the hash chain ([`verify`]), the signed
//! checkpoints ([`verify_signed`]), and the anchors kept outside the file
//! ([`Signed::check`]).
//!
//! What each proves (see [`super::Checkpointer`]): the chain shows any edit
//! that was not re-chained; a checkpoint shows any re-chained edit of what
//! it covers, and a wholesale rewrite by someone without the key; only an
//! anchor (`--expect-seq`, `--max-age`) shows a log cut right after an
//! earlier checkpoint. Reads the file once, so a live log can be checked
//! while the writer appends to it. Never writes.

use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{checkpoint_message, GENESIS};
use crate::mcp::canonical_json;

/// The first broken place in a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line} (seq {seq}): {why}")]
pub struct Broken {
    pub line: u64,
    /// The `seq` the record carries, or the one expected if unreadable.
    pub seq: u64,
    pub why: String,
}

/// What a verification with a key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub records: u64,
    /// `seq` of the log's first record: 1, or more for a log checked with
    /// [`verify_signed_after`] (it continues a rotated-out one).
    pub first_seq: u64,
    pub checkpoints: u64,
    /// Records after the last checkpoint (not yet covered by a signature).
    pub unsigned_tail: u64,
    /// The last record a checkpoint signs: its `seq` and `hash` (what the
    /// operator log's `audit checkpoint signed` lines name as `audit.seq`
    /// and `audit.hash`). 0 and empty for an empty log.
    pub last_signed_seq: u64,
    pub last_signed_hash: String,
    /// When the newest checkpoint was signed (a signed value; `None` for a
    /// checkpoint written before times were signed).
    pub last_signed_at: Option<String>,
    /// The newest checkpoint record's own `ts`.
    pub last_checkpoint_ts: Option<String>,
}

/// Facts about the log kept outside it, checked by [`Signed::check`].
#[derive(Debug, Clone, Copy)]
pub struct Anchors {
    /// The log must sign at least this `seq` (the last `audit.seq` the
    /// operator saw published).
    pub expect_seq: Option<u64>,
    /// The newest checkpoint must have been signed at most this long
    /// before `now`.
    pub max_age: Option<Duration>,
    pub now: SystemTime,
}

impl Signed {
    /// Checks the anchors; the error says what is missing.
    pub fn check(&self, a: &Anchors) -> Result<(), String> {
        if let Some(n) = a.expect_seq {
            if self.last_signed_seq < n {
                let have = if self.last_signed_seq == 0 {
                    "the log signs no record".to_owned()
                } else {
                    format!("the last signed record is seq {}", self.last_signed_seq)
                };
                return Err(format!(
                    "{have}, but seq {n} was signed before (--expect-seq {n}): records {}..={n} are missing, the log was cut back to an earlier checkpoint",
                    self.last_signed_seq + 1
                ));
            }
        }
        if let Some(max) = a.max_age {
            let Some(at) = &self.last_signed_at else {
                return Err(if self.checkpoints == 0 {
                    "the log has no checkpoint, so its age cannot be checked (--max-age)".into()
                } else {
                    "the newest checkpoint carries no signed time (written by an older toolgate), so its age cannot be checked (--max-age)".into()
                });
            };
            let signed = humantime::parse_rfc3339(at).map_err(|e| {
                format!("the newest checkpoint's signed_at {at:?} is not a time: {e}")
            })?;
            // A checkpoint from the future (clock skew) is not stale.
            let age = a.now.duration_since(signed).unwrap_or_default();
            if age > max {
                return Err(format!(
                    "the newest checkpoint (seq {}) was signed at {at}, {} ago, more than --max-age {}: a live log is checkpointed every audit.checkpoint.interval, so it was cut back to an old checkpoint or its writer has stopped",
                    self.last_signed_seq,
                    humantime::format_duration(Duration::from_secs(age.as_secs())),
                    humantime::format_duration(max),
                ));
            }
        }
        Ok(())
    }
}

/// What a log's first record must link to: the record before it (`seq`
/// and `hash`). A log toolgate started links to [`Link::genesis`]; a log
/// that continues a rotated-out one links to that one's last record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub seq: u64,
    pub hash: String,
}

impl Link {
    /// Before the first record of a log: seq 0, 64 zeros.
    pub fn genesis() -> Self {
        Link {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }
}

/// Walks the chain from `start`, calling `each(line, seq, record without
/// hash, hash)` for every record that links; returns the number of records.
fn walk(
    path: &Path,
    start: &Link,
    mut each: impl FnMut(u64, u64, &Map<String, Value>, &str) -> Result<(), Broken>,
) -> Result<u64, Broken> {
    let f = std::fs::File::open(path).map_err(|e| Broken {
        line: 0,
        seq: 0,
        why: format!("cannot open {}: {e}", path.display()),
    })?;
    let mut prev = start.hash.clone();
    let mut want = start.seq.saturating_add(1);
    let mut n = 0u64;
    for (i, line) in std::io::BufReader::new(f).split(b'\n').enumerate() {
        let line_no = i as u64 + 1;
        let bad = |why: String, seq: u64| Broken {
            line: line_no,
            seq,
            why,
        };
        let line = line.map_err(|e| bad(format!("read error: {e}"), want))?;
        // Strictly, as the gate parses a call: with duplicate keys, what a
        // reader sees (say, the first `decision`) need not be what was hashed.
        let mut obj = match crate::mcp::parse_strict(&line) {
            Ok(Value::Object(o)) => o,
            Err(e @ crate::mcp::ParseError::DuplicateKey { .. }) => {
                return Err(bad(
                    format!("{e}: a record with a duplicated key was tampered with"),
                    claimed_seq(&line).unwrap_or(want),
                ))
            }
            _ => return Err(bad("not a JSON record".into(), want)),
        };
        let seq = obj
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("no seq".into(), want))?;
        if seq != want {
            // A log starting past `start` lost its head: records were cut
            // from the front (toolgate never starts a log anywhere else).
            let why = if n == 0 && seq > want {
                format!(
                    "the log starts at seq {seq} where {want} was expected: records {want}..{seq} were cut from its head (a log that continues a rotated-out one is checked with --continues PREVIOUS_LOG)"
                )
            } else {
                format!("seq {seq} where {want} was expected")
            };
            return Err(bad(why, seq));
        }
        let hash = match obj.remove("hash") {
            Some(Value::String(h)) => h,
            _ => return Err(bad("no hash".into(), seq)),
        };
        let rec_prev = obj.get("prev").and_then(Value::as_str).unwrap_or("");
        if rec_prev != prev {
            let why = if n == 0 && start.seq == 0 {
                "the first record's prev is not 64 zeros".into()
            } else if n == 0 {
                format!(
                    "prev does not match the hash of seq {} in the log it continues",
                    start.seq
                )
            } else {
                "prev does not match the previous record's hash".into()
            };
            return Err(bad(why, seq));
        }
        let obj = Value::Object(obj);
        let computed = super::sha256_hex(&Sha256::digest(canonical_json(&obj).as_bytes()));
        if computed != hash {
            return Err(bad("hash does not match the record's content".into(), seq));
        }
        let obj = obj.as_object().expect("built as an object just above");
        each(line_no, seq, obj, &hash)?;
        prev = hash;
        want = seq.saturating_add(1);
        n += 1;
    }
    Ok(n)
}

/// The `seq` an unreadable line claims, to name it by (the last one, as a
/// lenient reader would take it).
fn claimed_seq(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(line)
        .ok()?
        .get("seq")?
        .as_u64()
}

/// Checks the whole chain of a log toolgate started (its first record is
/// seq 1 and links to 64 zeros); returns the number of records.
pub fn verify(path: &Path) -> Result<u64, Broken> {
    verify_after(path, &Link::genesis())
}

/// Checks the whole chain of a log whose first record must link to
/// `start` (the last record of the log it continues).
pub fn verify_after(path: &Path, start: &Link) -> Result<u64, Broken> {
    walk(path, start, |_, _, _, _| Ok(()))
}

/// Checks the chain of `path`, whose first record must link to `start`,
/// and returns its last record's link (what a log that continues it starts
/// from); `start` for an empty log.
pub fn verified_last_link(path: &Path, start: &Link) -> Result<Link, Broken> {
    let mut last = start.clone();
    walk(path, start, |_, seq, _, hash| {
        last = Link {
            seq,
            hash: hash.to_owned(),
        };
        Ok(())
    })?;
    Ok(last)
}

/// Checks the chain and every checkpoint's signature with `key`: each
/// checkpoint must sign exactly the record before it. A log with records
/// but no valid checkpoint is broken: it could have been rewritten
/// wholesale by someone without the key. What this cannot see (a cut right
/// after a checkpoint) is for [`Signed::check`].
pub fn verify_signed(path: &Path, key: &ed25519_dalek::VerifyingKey) -> Result<Signed, Broken> {
    verify_signed_after(path, key, &Link::genesis())
}

/// [`verify_signed`] for a log whose first record must link to `start`.
pub fn verify_signed_after(
    path: &Path,
    key: &ed25519_dalek::VerifyingKey,
    start: &Link,
) -> Result<Signed, Broken> {
    use base64::Engine as _;
    let mut out = Signed {
        records: 0,
        first_seq: 0,
        checkpoints: 0,
        unsigned_tail: 0,
        last_signed_seq: 0,
        last_signed_hash: String::new(),
        last_signed_at: None,
        last_checkpoint_ts: None,
    };
    // The record before the current one (for the first, what it links to).
    let mut prev: Option<(u64, String)> = None;
    out.records = walk(path, start, |line, seq, rec, hash| {
        let (prev_seq, prev_hash) = prev.take().unwrap_or_else(|| {
            out.first_seq = seq;
            let linked = rec.get("prev").and_then(Value::as_str).unwrap_or(GENESIS);
            (seq - 1, linked.to_owned())
        });
        if rec.get("event").and_then(Value::as_str) == Some("checkpoint") {
            let bad = |why: &str| Broken {
                line,
                seq,
                why: why.to_owned(),
            };
            let d = rec.get("detail").unwrap_or(&Value::Null);
            let covers_seq = d["covers_seq"]
                .as_u64()
                .ok_or_else(|| bad("checkpoint without covers_seq"))?;
            let covers_hash = d["covers_hash"]
                .as_str()
                .ok_or_else(|| bad("checkpoint without covers_hash"))?;
            if covers_seq != prev_seq || covers_hash != prev_hash {
                return Err(bad(&format!(
                    "checkpoint does not cover the record before it: it signs seq {covers_seq} with hash {covers_hash}, the log has seq {prev_seq} with hash {prev_hash} (a covered record was rewritten)"
                )));
            }
            let signed_at = match d.get("signed_at") {
                None => None,
                Some(Value::String(s)) => Some(s.as_str()),
                Some(_) => return Err(bad("checkpoint signed_at is not a string")),
            };
            let sig = d["signature"]
                .as_str()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                .and_then(|b| <[u8; 64]>::try_from(b).ok())
                .map(|b| ed25519_dalek::Signature::from_bytes(&b))
                .ok_or_else(|| bad("checkpoint signature is malformed"))?;
            key.verify_strict(
                &checkpoint_message(covers_seq, covers_hash, signed_at),
                &sig,
            )
            .map_err(|_| bad("checkpoint signature does not verify with this key"))?;
            out.checkpoints += 1;
            out.unsigned_tail = 0;
            out.last_signed_seq = covers_seq;
            out.last_signed_hash = covers_hash.to_owned();
            out.last_signed_at = signed_at.map(str::to_owned);
            out.last_checkpoint_ts = rec.get("ts").and_then(Value::as_str).map(str::to_owned);
        } else {
            out.unsigned_tail += 1;
        }
        prev = Some((seq, hash.to_owned()));
        Ok(())
    })?;
    if out.records > 0 && out.checkpoints == 0 {
        return Err(Broken {
            line: 1,
            seq: out.first_seq,
            why: "no signed checkpoint in the log: it may have been rewritten by someone without the key".into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(last_signed_seq: u64, last_signed_at: Option<&str>) -> Signed {
        Signed {
            records: 10,
            first_seq: 1,
            checkpoints: 2,
            unsigned_tail: 0,
            last_signed_seq,
            last_signed_hash: "ab".into(),
            last_signed_at: last_signed_at.map(str::to_owned),
            last_checkpoint_ts: None,
        }
    }

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn expect_seq_names_the_missing_signed_records() {
        let a = Anchors {
            expect_seq: Some(9),
            max_age: None,
            now: SystemTime::now(),
        };
        let e = signed(4, None).check(&a).unwrap_err();
        assert!(
            e.contains("last signed record is seq 4") && e.contains("records 5..=9 are missing"),
            "{e}"
        );
        assert_eq!(signed(9, None).check(&a), Ok(()));
        assert_eq!(signed(12, None).check(&a), Ok(()));
        let mut empty = signed(0, None);
        empty.checkpoints = 0;
        assert!(empty.check(&a).unwrap_err().contains("signs no record"));
    }

    #[test]
    fn max_age_uses_the_signed_time_of_the_newest_checkpoint() {
        let a = Anchors {
            expect_seq: None,
            max_age: Some(Duration::from_secs(120)),
            now: at("2026-01-01T12:00:00Z"),
        };
        let fresh = signed(9, Some("2026-01-01T11:59:00.000000Z"));
        assert_eq!(fresh.check(&a), Ok(()));
        let stale = signed(9, Some("2026-01-01T11:50:00.000000Z"));
        let e = stale.check(&a).unwrap_err();
        assert!(e.contains("10m ago") && e.contains("--max-age 2m"), "{e}");
        // Clock skew: a checkpoint from the future is not stale.
        assert_eq!(
            signed(9, Some("2026-01-01T12:00:05.000000Z")).check(&a),
            Ok(())
        );
        assert!(signed(9, None)
            .check(&a)
            .unwrap_err()
            .contains("no signed time"));
    }
}
