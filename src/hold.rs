//! Holds, approvals and grants: the embedded SQLite state and waiting.
//!
//! A hold is keyed by (agent, tool, SHA-256 of the canonical arguments), so
//! an identical retry joins the pending hold whatever its key order or number
//! spelling. Lifecycle: pending -> approved | denied | expired.
//!
//! Invariants:
//! - every read-modify-write happens in one SQLite transaction under the
//!   connection's mutex, so a single-use approval is consumed exactly once
//!   even when identical retries race ([`Holds::admit`], [`Holds::poll`]);
//! - the state file uses WAL with `synchronous=FULL`: a pending hold, an
//!   approval and a window survive a restart or a kill -9;
//! - an approver can never decide a hold of their own identity, and one
//!   approver counts once (both compared by [`decider_key`]: folded, and
//!   blind to whitespace and control characters);
//! - with several approvals, the most restrictive one sets the grant: any
//!   single-use approval makes it single-use, else the shortest window wins;
//! - a denial is kept apart from the approvals (`denied_by`);
//! - pending holds per agent are bounded.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

use crate::policy::fold_identity;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// RFC 3339 for a millisecond timestamp.
pub fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Approved,
    Denied,
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Denied => "denied",
            Status::Expired => "expired",
        }
    }
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "pending" => Status::Pending,
            "approved" => Status::Approved,
            "denied" => Status::Denied,
            "expired" => Status::Expired,
            _ => return None,
        })
    }
}

/// One approver's approval of a hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Approval {
    pub approver: String,
    pub at: String,
    pub reason: Option<String>,
    /// The window this approver granted (`15m`); `None`: single use.
    #[serde(rename = "for")]
    pub window: Option<String>,
    #[serde(skip)]
    pub window_ms: Option<i64>,
}

/// Who denied a hold, when and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Denial {
    pub approver: String,
    pub at: String,
    pub reason: Option<String>,
}

/// A hold as the management API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Hold {
    pub id: String,
    pub agent: String,
    pub tool: String,
    pub upstream: Option<String>,
    /// Redacted arguments.
    pub arguments: Value,
    pub args_sha256: String,
    pub reason: String,
    pub rule: String,
    pub status: Status,
    pub approvals_needed: u32,
    pub approvals: Vec<Approval>,
    pub created_at: String,
    pub expires_at: String,
    pub decided_at: Option<String>,
    /// End of the approval window, if one was granted.
    pub grant_until: Option<String>,
    /// The window in force (the shortest all approvers granted), if any.
    pub grant_for: Option<String>,
    pub deny_reason: Option<String>,
    /// The denial, if the hold was denied by an approver.
    pub denied_by: Option<Denial>,
    #[serde(skip)]
    pub expires_ms: i64,
    #[serde(skip)]
    pub created_ms: i64,
}

/// What a new hold would hold.
#[derive(Debug, Clone)]
pub struct NewHold {
    pub agent: String,
    pub tool: String,
    pub upstream: Option<String>,
    pub arguments: Value,
    pub args_sha256: String,
    pub reason: String,
    pub rule: String,
    pub approvals_needed: u32,
}

/// What to do with a call that must be held.
#[derive(Debug, Clone)]
pub enum Admission {
    /// An approval covers this call: forward it (approvers named).
    Granted { hold: Hold, window: bool },
    /// Denied within its ttl: refuse.
    Denied(Hold),
    /// A new pending hold was created.
    Created(Hold),
    /// The call joined an identical pending hold.
    Joined(Hold),
    /// Too many pending holds for this agent.
    TooMany,
}

/// What a waiting call learns about its hold.
#[derive(Debug, Clone)]
pub enum Polled {
    Pending,
    Granted {
        hold: Hold,
        window: bool,
    },
    Refused(Hold),
    /// Approved, but an identical call already used the single-use approval.
    UsedByAnother(Hold),
}

/// Why a decision on a hold was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    #[error("no such hold")]
    NotFound,
    #[error("the hold is {0}, not pending")]
    NotPending(&'static str),
    #[error("an approver cannot decide a hold of their own identity")]
    SelfApproval,
    #[error("this approver has already approved the hold")]
    AlreadyApproved,
    #[error("state: {0}")]
    State(String),
}

/// The state database failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("state database: {0}")]
pub struct StateError(pub String);

impl From<rusqlite::Error> for StateError {
    fn from(e: rusqlite::Error) -> Self {
        StateError(e.to_string())
    }
}

/// The hold store: a cheap handle.
#[derive(Clone)]
pub struct Holds {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Mutex<Connection>,
    changed: watch::Sender<u64>,
    ttl: Duration,
    /// Added to the wall clock: virtual time for tests ([`Holds::advance`]).
    offset_ms: std::sync::atomic::AtomicI64,
    /// Holds expired on the way (by admit, poll, list or approve), not yet
    /// handed to [`Holds::expire_due`]'s caller, which audits them.
    unrecorded: Mutex<Vec<Hold>>,
}

impl Inner {
    /// Keeps holds expired on the way for [`Holds::expire_due`].
    fn note_expired(&self, holds: Vec<Hold>) {
        if holds.is_empty() {
            return;
        }
        if let Ok(mut q) = self.unrecorded.lock() {
            q.extend(holds);
        }
    }
}

/// Which pending holds [`expire_pending`] looks at.
enum Only<'a> {
    All,
    Agent(&'a str),
    Hold(&'a str),
}

/// Marks the pending holds past their ttl expired (of `only`); returns them.
fn expire_pending(c: &Connection, now: i64, only: Only<'_>) -> rusqlite::Result<Vec<Hold>> {
    let (agent, id) = match only {
        Only::All => (None, None),
        Only::Agent(a) => (Some(a), None),
        Only::Hold(h) => (None, Some(h)),
    };
    let mut st = c.prepare_cached(
        "SELECT id FROM holds WHERE status = 'pending' AND expires_at <= ?1 \
         AND (?2 IS NULL OR agent = ?2) AND (?3 IS NULL OR id = ?3)",
    )?;
    let ids: Vec<String> = st
        .query_map(params![now, agent, id], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        c.execute(
            "UPDATE holds SET status = 'expired', decided_at = ?1 WHERE id = ?2",
            params![now, id],
        )?;
        if let Some(r) = load(c, &id)? {
            out.push(r.hold);
        }
    }
    Ok(out)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS holds (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    tool TEXT NOT NULL,
    upstream TEXT,
    arguments TEXT NOT NULL,
    args_sha256 TEXT NOT NULL,
    reason TEXT NOT NULL,
    rule TEXT NOT NULL,
    approvals_needed INTEGER NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    decided_at INTEGER,
    grant_until INTEGER,
    used INTEGER NOT NULL DEFAULT 0,
    deny_reason TEXT,
    denied_by TEXT,
    denied_at INTEGER
);
CREATE INDEX IF NOT EXISTS holds_key ON holds(agent, tool, args_sha256, created_at);
CREATE INDEX IF NOT EXISTS holds_status ON holds(status, created_at);
CREATE TABLE IF NOT EXISTS approvals (
    hold_id TEXT NOT NULL REFERENCES holds(id),
    approver TEXT NOT NULL,
    at INTEGER NOT NULL,
    reason TEXT,
    window_ms INTEGER,
    PRIMARY KEY (hold_id, approver)
);
";

/// Whether `table` has `column` (older state files lack newer columns).
fn has_column(c: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    let mut st = c.prepare(&format!("PRAGMA table_info({table})"))?;
    let names = st.query_map([], |r| r.get::<_, String>(1))?;
    for n in names {
        if n? == column {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Brings a state file written by an older toolgate up to [`SCHEMA`], in
/// one transaction: adds the columns it lacks, and moves each denial, which
/// older versions stored among the approvals (reason `denied` or
/// `denied: ...`, at the hold's decision time), to `holds.denied_by`.
/// Approvals recorded before `window_ms` existed count as single use.
fn migrate(c: &mut Connection) -> rusqlite::Result<()> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if !has_column(&tx, "approvals", "window_ms")? {
        tx.execute("ALTER TABLE approvals ADD COLUMN window_ms INTEGER", [])?;
    }
    if !has_column(&tx, "holds", "denied_by")? {
        tx.execute_batch(
            "ALTER TABLE holds ADD COLUMN denied_by TEXT;
             ALTER TABLE holds ADD COLUMN denied_at INTEGER;
             UPDATE holds SET denied_at = decided_at, denied_by = (
                 SELECT a.approver FROM approvals a
                 WHERE a.hold_id = holds.id AND a.at = holds.decided_at
                   AND (a.reason = 'denied' OR a.reason LIKE 'denied: %')
                 ORDER BY a.approver LIMIT 1)
             WHERE status = 'denied';
             DELETE FROM approvals WHERE EXISTS (
                 SELECT 1 FROM holds h
                 WHERE h.id = approvals.hold_id AND h.status = 'denied'
                   AND h.denied_by = approvals.approver AND h.decided_at = approvals.at
                   AND (approvals.reason = 'denied' OR approvals.reason LIKE 'denied: %'));",
        )?;
    }
    tx.commit()
}

/// The key identities are compared by when deciding holds (approver
/// against agent, approver against approver): [`fold_identity`], with every
/// whitespace (Unicode `White_Space`) and control character dropped before
/// and after folding, so `" ops-bot"`, `"ops-bot\u{a0}"` and `"alice "` are
/// `ops-bot` and `alice`. Stricter than the escalation guard's comparison,
/// which must keep word boundaries.
fn decider_key(s: &str) -> String {
    fn strip(s: &str) -> String {
        s.chars()
            .filter(|c| !c.is_whitespace() && !c.is_control())
            .collect()
    }
    strip(&fold_identity(&strip(s)))
}

/// The grant of a hold approved with these windows (`None`: single use):
/// the most restrictive one, so any single-use approval makes the grant
/// single-use, and otherwise the shortest window wins.
fn effective_window(windows: impl IntoIterator<Item = Option<i64>>) -> Option<i64> {
    windows
        .into_iter()
        .try_fold(i64::MAX, |shortest, w| w.map(|w| shortest.min(w)))
}

/// A window in milliseconds as the API shows it (`15m`).
fn show_window(ms: i64) -> String {
    humantime::format_duration(Duration::from_millis(ms.max(0) as u64)).to_string()
}

const COLS: &str = "id, agent, tool, upstream, arguments, args_sha256, reason, rule, approvals_needed, status, created_at, expires_at, decided_at, grant_until, deny_reason, used, denied_by, denied_at";

struct Row {
    hold: Hold,
    used: bool,
    grant_until_ms: Option<i64>,
}

fn row(r: &rusqlite::Row) -> rusqlite::Result<Row> {
    let status: String = r.get(9)?;
    let grant_until_ms: Option<i64> = r.get(13)?;
    let decided_ms: Option<i64> = r.get(12)?;
    let args: String = r.get(4)?;
    let deny_reason: Option<String> = r.get(14)?;
    let denied_by = match (
        r.get::<_, Option<String>>(16)?,
        r.get::<_, Option<i64>>(17)?,
    ) {
        (Some(approver), Some(at)) => Some(Denial {
            approver,
            at: rfc3339(at),
            reason: deny_reason.clone(),
        }),
        _ => None,
    };
    Ok(Row {
        hold: Hold {
            id: r.get(0)?,
            agent: r.get(1)?,
            tool: r.get(2)?,
            upstream: r.get(3)?,
            arguments: serde_json::from_str(&args).unwrap_or(Value::Null),
            args_sha256: r.get(5)?,
            reason: r.get(6)?,
            rule: r.get(7)?,
            approvals_needed: r.get(8)?,
            status: Status::parse(&status).unwrap_or(Status::Expired),
            approvals: Vec::new(),
            created_at: rfc3339(r.get(10)?),
            expires_at: rfc3339(r.get(11)?),
            decided_at: decided_ms.map(rfc3339),
            grant_until: grant_until_ms.map(rfc3339),
            grant_for: grant_until_ms
                .zip(decided_ms)
                .map(|(until, at)| show_window(until - at)),
            deny_reason,
            denied_by,
            expires_ms: r.get(11)?,
            created_ms: r.get(10)?,
        },
        used: r.get::<_, i64>(15)? != 0,
        grant_until_ms,
    })
}

fn approvals_of(c: &Connection, id: &str) -> rusqlite::Result<Vec<Approval>> {
    let mut st = c.prepare_cached(
        "SELECT approver, at, reason, window_ms FROM approvals WHERE hold_id = ?1 ORDER BY at, approver",
    )?;
    let rows = st.query_map([id], |r| {
        let window_ms: Option<i64> = r.get(3)?;
        Ok(Approval {
            approver: r.get(0)?,
            at: rfc3339(r.get(1)?),
            reason: r.get(2)?,
            window: window_ms.map(show_window),
            window_ms,
        })
    })?;
    rows.collect()
}

fn load(c: &Connection, id: &str) -> rusqlite::Result<Option<Row>> {
    let mut r = c
        .query_row(
            &format!("SELECT {COLS} FROM holds WHERE id = ?1"),
            [id],
            row,
        )
        .optional()?;
    if let Some(r) = &mut r {
        r.hold.approvals = approvals_of(c, id)?;
    }
    Ok(r)
}

impl Holds {
    /// Opens (or creates) the state database at `path`.
    pub fn open(path: &Path, ttl: Duration) -> Result<Holds, String> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let mut conn = Connection::open(path)
            .map_err(|e| format!("cannot open state {}: {e}", path.display()))?;
        let mut setup = || -> rusqlite::Result<()> {
            conn.busy_timeout(Duration::from_secs(5))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.execute_batch(SCHEMA)?;
            migrate(&mut conn)?;
            let ok: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
            if ok != "ok" {
                return Err(rusqlite::Error::InvalidQuery);
            }
            Ok(())
        };
        setup().map_err(|e| {
            format!(
                "state {} is unusable ({e}); it may be locked by another toolgate or corrupt: stop the other process or restore the file",
                path.display()
            )
        })?;
        let (changed, _) = watch::channel(0);
        Ok(Holds {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                changed,
                ttl,
                offset_ms: std::sync::atomic::AtomicI64::new(0),
                unrecorded: Mutex::new(Vec::new()),
            }),
        })
    }

    async fn run<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, i64) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = inner
                .conn
                .lock()
                .map_err(|_| StateError("state lock poisoned".into()))?;
            let now = now_ms() + inner.offset_ms.load(std::sync::atomic::Ordering::Relaxed);
            f(&mut c, now).map_err(StateError::from)
        })
        .await
        .map_err(|e| StateError(e.to_string()))?
    }

    /// Moves this store's clock forward (virtual time, for tests and drills).
    pub fn advance(&self, d: Duration) {
        self.inner
            .offset_ms
            .fetch_add(d.as_millis() as i64, std::sync::atomic::Ordering::Relaxed);
    }

    fn bump(&self) {
        self.inner.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes whenever any hold is decided.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Admits a call that must be held: uses a covering approval, refuses on
    /// a denial, joins an identical pending hold, or creates one.
    pub async fn admit(&self, new: NewHold, max_pending: u32) -> Result<Admission, StateError> {
        let ttl = self.inner.ttl.as_millis() as i64;
        let inner = self.inner.clone();
        let out = self
            .run(move |c, now| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let expired = expire_pending(&tx, now, Only::Agent(&new.agent))?;
                let latest: Option<Row> = tx
                    .query_row(
                        // A granted window lasts to its own end, past the
                        // hold's ttl when the approver gave it longer.
                        &format!("SELECT {COLS} FROM holds WHERE agent = ?1 AND tool = ?2 AND args_sha256 = ?3 AND (expires_at > ?4 OR grant_until > ?4) AND status != 'expired' ORDER BY created_at DESC LIMIT 1"),
                        params![new.agent, new.tool, new.args_sha256, now],
                        row,
                    )
                    .optional()?;
                let admission = match latest {
                    Some(mut r) => {
                        r.hold.approvals = approvals_of(&tx, &r.hold.id)?;
                        match r.hold.status {
                            Status::Approved if r.grant_until_ms.is_some_and(|g| g > now) => {
                                Some(Admission::Granted { hold: r.hold, window: true })
                            }
                            Status::Approved if !r.used && r.grant_until_ms.is_none() => {
                                tx.execute("UPDATE holds SET used = 1 WHERE id = ?1 AND used = 0", [&r.hold.id])?;
                                Some(Admission::Granted { hold: r.hold, window: false })
                            }
                            Status::Denied => Some(Admission::Denied(r.hold)),
                            Status::Pending => Some(Admission::Joined(r.hold)),
                            // Used, or its window ended: a new request.
                            _ => None,
                        }
                    }
                    None => None,
                };
                let admission = match admission {
                    Some(a) => a,
                    None => {
                        let pending: i64 = tx.query_row(
                            "SELECT COUNT(*) FROM holds WHERE agent = ?1 AND status = 'pending'",
                            [&new.agent],
                            |r| r.get(0),
                        )?;
                        if pending >= i64::from(max_pending) {
                            Admission::TooMany
                        } else {
                            let id = uuid::Uuid::now_v7().simple().to_string();
                            tx.execute(
                                "INSERT INTO holds (id, agent, tool, upstream, arguments, args_sha256, reason, rule, approvals_needed, status, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending', ?10, ?11)",
                                params![id, new.agent, new.tool, new.upstream, new.arguments.to_string(), new.args_sha256, new.reason, new.rule, new.approvals_needed, now, now + ttl],
                            )?;
                            let r = load(&tx, &id)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
                            Admission::Created(r.hold)
                        }
                    }
                };
                tx.commit()?;
                inner.note_expired(expired);
                Ok(admission)
            })
            .await?;
        Ok(out)
    }

    /// What a call waiting on hold `id` should do now; consumes a
    /// single-use approval for it.
    pub async fn poll(&self, id: &str) -> Result<Polled, StateError> {
        let id = id.to_owned();
        let inner = self.inner.clone();
        self.run(move |c, now| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let Some(mut r) = load(&tx, &id)? else {
                return Err(rusqlite::Error::QueryReturnedNoRows);
            };
            let mut expired = Vec::new();
            let out = match r.hold.status {
                Status::Pending if r.hold.expires_ms <= now => {
                    expired = expire_pending(&tx, now, Only::Hold(&id))?;
                    r.hold.status = Status::Expired;
                    Polled::Refused(r.hold)
                }
                Status::Pending => Polled::Pending,
                Status::Approved if r.grant_until_ms.is_some_and(|g| g > now) => Polled::Granted {
                    hold: r.hold,
                    window: true,
                },
                Status::Approved
                    if !r.used && r.grant_until_ms.is_none() && r.hold.expires_ms > now =>
                {
                    tx.execute("UPDATE holds SET used = 1 WHERE id = ?1", [&id])?;
                    Polled::Granted {
                        hold: r.hold,
                        window: false,
                    }
                }
                Status::Approved => Polled::UsedByAnother(r.hold),
                Status::Denied | Status::Expired => Polled::Refused(r.hold),
            };
            tx.commit()?;
            inner.note_expired(expired);
            Ok(out)
        })
        .await
    }

    /// One hold with its approvals.
    pub async fn get(&self, id: &str) -> Result<Option<Hold>, StateError> {
        let id = id.to_owned();
        self.run(move |c, _| Ok(load(c, &id)?.map(|r| r.hold)))
            .await
    }

    /// Holds, newest first, optionally with one status.
    pub async fn list(&self, status: Option<Status>, limit: u32) -> Result<Vec<Hold>, StateError> {
        let inner = self.inner.clone();
        self.run(move |c, now| {
            let tx = c.transaction()?;
            let expired = expire_pending(&tx, now, Only::All)?;
            tx.commit()?;
            inner.note_expired(expired);
            let sql = match status {
                Some(_) => format!("SELECT {COLS} FROM holds WHERE status = ?1 ORDER BY created_at DESC LIMIT ?2"),
                None => format!("SELECT {COLS} FROM holds WHERE ?1 IS NULL OR 1 ORDER BY created_at DESC LIMIT ?2"),
            };
            let mut st = c.prepare(&sql)?;
            let rows: Vec<Row> = st
                .query_map(params![status.map(Status::as_str), limit], row)?
                .collect::<rusqlite::Result<_>>()?;
            let mut out = Vec::with_capacity(rows.len());
            for mut r in rows {
                r.hold.approvals = approvals_of(c, &r.hold.id)?;
                out.push(r.hold);
            }
            Ok(out)
        })
        .await
    }

    /// Records `approver`'s approval; the hold becomes approved once enough
    /// distinct approvers agree. `window` lets identical calls pass until it
    /// ends (else the approval is single-use); with several approvals the
    /// most restrictive one counts ([`effective_window`]), from the moment
    /// the hold is approved.
    pub async fn approve(
        &self,
        id: &str,
        approver: &str,
        reason: Option<String>,
        window: Option<Duration>,
    ) -> Result<Hold, DecideError> {
        let (id, approver) = (id.to_owned(), approver.to_owned());
        let inner = self.inner.clone();
        let res = self
            .run(move |c, now| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let Some(r) = load(&tx, &id)? else { return Ok(Err(DecideError::NotFound)) };
                if let Some(e) = undecidable(&r.hold, &approver, now) {
                    if matches!(e, DecideError::NotPending("expired")) {
                        let expired = expire_pending(&tx, now, Only::Hold(&id))?;
                        tx.commit()?;
                        inner.note_expired(expired);
                    }
                    return Ok(Err(e));
                }
                let key = decider_key(&approver);
                if r.hold.approvals.iter().any(|a| decider_key(&a.approver) == key) {
                    return Ok(Err(DecideError::AlreadyApproved));
                }
                let window_ms = window.map(|w| w.as_millis() as i64);
                tx.execute(
                    "INSERT INTO approvals (hold_id, approver, at, reason, window_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![id, approver, now, reason, window_ms],
                )?;
                let count = r.hold.approvals.len() as u32 + 1;
                if count >= r.hold.approvals_needed {
                    let windows = r.hold.approvals.iter().map(|a| a.window_ms);
                    let until = effective_window(windows.chain([window_ms])).map(|w| now + w);
                    tx.execute(
                        "UPDATE holds SET status = 'approved', decided_at = ?1, grant_until = ?2 WHERE id = ?3",
                        params![now, until, id],
                    )?;
                }
                let r = load(&tx, &id)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
                tx.commit()?;
                Ok(Ok(r.hold))
            })
            .await
            .map_err(|e| DecideError::State(e.0))?;
        if res.is_ok() {
            self.bump();
        }
        res
    }

    /// Denies a pending hold; the denier is kept in `denied_by`, apart from
    /// the approvals.
    pub async fn deny(
        &self,
        id: &str,
        approver: &str,
        reason: Option<String>,
    ) -> Result<Hold, DecideError> {
        let (id, approver) = (id.to_owned(), approver.to_owned());
        let res = self
            .run(move |c, now| {
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let Some(r) = load(&tx, &id)? else { return Ok(Err(DecideError::NotFound)) };
                if let Some(e) = undecidable(&r.hold, &approver, now) {
                    return Ok(Err(e));
                }
                tx.execute(
                    "UPDATE holds SET status = 'denied', decided_at = ?1, deny_reason = ?2, denied_by = ?3, denied_at = ?1 WHERE id = ?4",
                    params![now, reason.unwrap_or_else(|| format!("denied by {approver}")), approver, id],
                )?;
                let r = load(&tx, &id)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
                tx.commit()?;
                Ok(Ok(r.hold))
            })
            .await
            .map_err(|e| DecideError::State(e.0))?;
        if res.is_ok() {
            self.bump();
        }
        res
    }

    /// Marks pending holds past their ttl as expired; returns them, with
    /// those expired on the way since the last call (by admit, poll, list
    /// or approve), so the caller audits each once.
    pub async fn expire_due(&self) -> Result<Vec<Hold>, StateError> {
        let mut out = self
            .run(|c, now| {
                let tx = c.transaction()?;
                let out = expire_pending(&tx, now, Only::All)?;
                tx.commit()?;
                Ok(out)
            })
            .await?;
        let changed = !out.is_empty();
        if let Ok(mut q) = self.inner.unrecorded.lock() {
            out.splice(0..0, q.drain(..));
        }
        if changed {
            self.bump();
        }
        Ok(out)
    }

    /// Pending holds right now (for metrics and readiness).
    pub async fn pending_count(&self) -> Result<u64, StateError> {
        self.run(|c, _| {
            c.query_row(
                "SELECT COUNT(*) FROM holds WHERE status = 'pending'",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .await
        .map(|n| n as u64)
    }
}

/// Why `approver` may not decide `hold` now, if so.
fn undecidable(hold: &Hold, approver: &str, now: i64) -> Option<DecideError> {
    if decider_key(approver) == decider_key(&hold.agent) {
        return Some(DecideError::SelfApproval);
    }
    match hold.status {
        Status::Pending if hold.expires_ms <= now => Some(DecideError::NotPending("expired")),
        Status::Pending => None,
        s => Some(DecideError::NotPending(s.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A store in a scratch dir (first, so it is dropped after the store).
    fn store(tag: &str, ttl: Duration) -> (crate::scratch::Scratch, Holds, std::path::PathBuf) {
        let d = crate::scratch::Scratch::new(tag).unwrap();
        let p = d.join("holds.db");
        (d, Holds::open(&p, ttl).unwrap(), p)
    }

    fn new(agent: &str, sha: &str, needed: u32) -> NewHold {
        NewHold {
            agent: agent.into(),
            tool: "iam__grant_role".into(),
            upstream: Some("iam".into()),
            arguments: json!({"role": "admin"}),
            args_sha256: sha.into(),
            reason: "r".into(),
            rule: "tools[0].approval".into(),
            approvals_needed: needed,
        }
    }

    #[tokio::test]
    async fn identical_calls_join_then_an_approval_is_used_exactly_once() {
        let (_d, h, _) = store("once", Duration::from_secs(60));
        let Admission::Created(hold) = h.admit(new("bot", "a", 1), 10).await.unwrap() else {
            panic!()
        };
        assert!(
            matches!(h.admit(new("bot", "a", 1), 10).await.unwrap(), Admission::Joined(j) if j.id == hold.id)
        );
        assert!(
            matches!(
                h.admit(new("bot", "b", 1), 10).await.unwrap(),
                Admission::Created(_)
            ),
            "other args, other hold"
        );
        h.approve(&hold.id, "alice", Some("ok".into()), None)
            .await
            .unwrap();
        // Many racing retries: exactly one is granted.
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                h.admit(new("bot", "a", 1), 100).await.unwrap()
            }));
        }
        let mut granted = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), Admission::Granted { window: false, .. }) {
                granted += 1;
            }
        }
        assert_eq!(granted, 1);
        assert!(matches!(
            h.poll(&hold.id).await.unwrap(),
            Polled::UsedByAnother(_)
        ));
    }

    #[tokio::test]
    async fn two_person_rule_self_approval_and_decided_holds() {
        let (_d, h, _) = store("two", Duration::from_secs(60));
        let Admission::Created(hold) = h.admit(new("bot", "a", 2), 10).await.unwrap() else {
            panic!()
        };
        assert_eq!(
            h.approve(&hold.id, "BOT", None, None).await.unwrap_err(),
            DecideError::SelfApproval
        );
        let after_one = h.approve(&hold.id, "alice", None, None).await.unwrap();
        assert_eq!(after_one.status, Status::Pending);
        assert_eq!(
            h.approve(&hold.id, "Alice", None, None).await.unwrap_err(),
            DecideError::AlreadyApproved
        );
        let done = h.approve(&hold.id, "bob", None, None).await.unwrap();
        assert_eq!(done.status, Status::Approved);
        assert_eq!(done.approvals.len(), 2);
        assert_eq!(
            h.deny(&hold.id, "carol", None).await.unwrap_err(),
            DecideError::NotPending("approved")
        );
        assert_eq!(
            h.approve("nope", "carol", None, None).await.unwrap_err(),
            DecideError::NotFound
        );
    }

    #[tokio::test]
    async fn denied_holds_refuse_identical_retries_and_windows_let_them_pass() {
        let (_d, h, _) = store("deny", Duration::from_secs(60));
        let Admission::Created(d) = h.admit(new("bot", "x", 1), 10).await.unwrap() else {
            panic!()
        };
        h.deny(&d.id, "alice", Some("no".into())).await.unwrap();
        assert!(matches!(
            h.admit(new("bot", "x", 1), 10).await.unwrap(),
            Admission::Denied(_)
        ));
        let Admission::Created(w) = h.admit(new("bot", "y", 1), 10).await.unwrap() else {
            panic!()
        };
        h.approve(&w.id, "alice", None, Some(Duration::from_secs(60)))
            .await
            .unwrap();
        for _ in 0..3 {
            assert!(matches!(
                h.admit(new("bot", "y", 1), 10).await.unwrap(),
                Admission::Granted { window: true, .. }
            ));
        }
    }

    #[tokio::test]
    async fn holds_expire_and_pending_holds_are_bounded() {
        let (_d, h, _) = store("exp", Duration::from_millis(30));
        let Admission::Created(a) = h.admit(new("bot", "1", 1), 2).await.unwrap() else {
            panic!()
        };
        h.admit(new("bot", "2", 1), 2).await.unwrap();
        assert!(matches!(
            h.admit(new("bot", "3", 1), 2).await.unwrap(),
            Admission::TooMany
        ));
        h.advance(Duration::from_millis(50));
        assert_eq!(
            h.approve(&a.id, "alice", None, None).await.unwrap_err(),
            DecideError::NotPending("expired")
        );
        // Both: the one approve found expired, and the other one.
        let expired = h.expire_due().await.unwrap();
        assert_eq!(expired.len(), 2, "{expired:?}");
        assert_eq!(expired[0].id, a.id, "the one approve expired, first");
        assert_ne!(expired[1].id, a.id);
        assert!(h.expire_due().await.unwrap().is_empty(), "each once");
        assert!(matches!(
            h.admit(new("bot", "3", 1), 2).await.unwrap(),
            Admission::Created(_)
        ));
    }

    #[tokio::test]
    async fn state_survives_reopening() {
        let (_d, h, p) = store("reopen", Duration::from_secs(60));
        let Admission::Created(a) = h.admit(new("bot", "1", 1), 10).await.unwrap() else {
            panic!()
        };
        let Admission::Created(b) = h.admit(new("bot", "2", 1), 10).await.unwrap() else {
            panic!()
        };
        h.approve(&b.id, "alice", None, None).await.unwrap();
        drop(h);
        let h = Holds::open(&p, Duration::from_secs(60)).unwrap();
        assert_eq!(h.get(&a.id).await.unwrap().unwrap().status, Status::Pending);
        assert!(matches!(
            h.admit(new("bot", "2", 1), 10).await.unwrap(),
            Admission::Granted { .. }
        ));
        assert_eq!(h.list(Some(Status::Pending), 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn deciders_are_compared_blind_to_whitespace_and_control_characters() {
        let (_d, h, _) = store("blind", Duration::from_secs(60));
        let Admission::Created(hold) = h.admit(new("ops-bot", "a", 2), 10).await.unwrap() else {
            panic!()
        };
        for me in [
            " ops-bot",
            "ops-bot\n",
            "ops-bot\t",
            "ops-bot\u{a0}",
            "ops-bot\r",
            "OPS-BOT\u{3000}",
            "ops\u{2003}-bot",
        ] {
            assert_eq!(
                h.approve(&hold.id, me, None, None).await.unwrap_err(),
                DecideError::SelfApproval,
                "{me:?}"
            );
            assert_eq!(
                h.deny(&hold.id, me, None).await.unwrap_err(),
                DecideError::SelfApproval,
                "{me:?}"
            );
        }
        h.approve(&hold.id, "alice", None, None).await.unwrap();
        for again in ["alice ", "\u{3000}Alice", "al ice", "alice\u{85}"] {
            assert_eq!(
                h.approve(&hold.id, again, None, None).await.unwrap_err(),
                DecideError::AlreadyApproved,
                "{again:?}"
            );
        }
        let hold = h.get(&hold.id).await.unwrap().unwrap();
        assert_eq!((hold.status, hold.approvals.len()), (Status::Pending, 1));
    }

    #[test]
    fn the_grant_is_the_most_restrictive_approval() {
        assert_eq!(effective_window([None, Some(600_000)]), None);
        assert_eq!(effective_window([Some(7 * 86_400_000), None]), None);
        assert_eq!(
            effective_window([Some(600_000), Some(60_000)]),
            Some(60_000)
        );
        assert_eq!(effective_window([Some(900_000)]), Some(900_000));
    }

    #[tokio::test]
    async fn with_two_approvals_the_shorter_window_or_single_use_wins() {
        let (_d, h, _) = store("windows", Duration::from_secs(3600));
        let min = |m: u64| Some(Duration::from_secs(60 * m));
        // (alice's window, bob's window) -> the grant's.
        let cases = [
            ("1", None, min(10), None),
            ("2", min(7 * 24 * 60), None, None),
            ("3", min(10), min(60), Some("10m")),
            ("4", min(60), min(5), Some("5m")),
        ];
        for (sha, alice, bob, want) in cases {
            let Admission::Created(hold) = h.admit(new("bot", sha, 2), 10).await.unwrap() else {
                panic!()
            };
            h.approve(&hold.id, "alice", None, alice).await.unwrap();
            let done = h.approve(&hold.id, "bob", None, bob).await.unwrap();
            assert_eq!(done.status, Status::Approved);
            assert_eq!(done.grant_for.as_deref(), want, "case {sha}");
            assert_eq!(done.grant_until.is_some(), want.is_some(), "case {sha}");
            let first = h.admit(new("bot", sha, 2), 10).await.unwrap();
            assert!(
                matches!(first, Admission::Granted { window, .. } if window == want.is_some()),
                "case {sha}: {first:?}"
            );
            let second = h.admit(new("bot", sha, 2), 10).await.unwrap();
            assert_eq!(
                matches!(second, Admission::Granted { .. }),
                want.is_some(),
                "case {sha}: single use passes once: {second:?}"
            );
        }
        // The window runs from the approval that approved the hold.
        let Admission::Created(hold) = h.admit(new("bot", "5", 2), 10).await.unwrap() else {
            panic!()
        };
        h.approve(&hold.id, "alice", None, min(10)).await.unwrap();
        h.approve(&hold.id, "bob", None, min(60)).await.unwrap();
        h.advance(Duration::from_secs(11 * 60));
        assert!(matches!(
            h.admit(new("bot", "5", 2), 10).await.unwrap(),
            Admission::Created(_)
        ));
    }

    #[tokio::test]
    async fn a_denial_is_kept_apart_from_the_approvals() {
        let (_d, h, p) = store("denied-by", Duration::from_secs(60));
        let Admission::Created(hold) = h.admit(new("bot", "a", 2), 10).await.unwrap() else {
            panic!()
        };
        h.approve(&hold.id, "alice", Some("fine".into()), None)
            .await
            .unwrap();
        let denied = h.deny(&hold.id, "bob", Some("no".into())).await.unwrap();
        assert_eq!(denied.status, Status::Denied);
        assert_eq!(denied.approvals.len(), 1);
        assert_eq!(denied.approvals[0].approver, "alice");
        let by = denied.denied_by.clone().expect("denied_by");
        assert_eq!(
            (by.approver.as_str(), by.reason.as_deref()),
            ("bob", Some("no"))
        );
        assert_eq!(Some(&by.at), denied.decided_at.as_ref());
        drop(h);
        let h = Holds::open(&p, Duration::from_secs(60)).unwrap();
        let again = h.get(&hold.id).await.unwrap().unwrap();
        assert_eq!(again.denied_by, denied.denied_by, "survives a restart");
        assert_eq!(again.approvals, denied.approvals);
    }

    /// The schema before `denied_by` and `window_ms`, with a denial stored
    /// the old way (among the approvals).
    const OLD_STATE: &str = "
        CREATE TABLE holds (id TEXT PRIMARY KEY, agent TEXT NOT NULL, tool TEXT NOT NULL,
            upstream TEXT, arguments TEXT NOT NULL, args_sha256 TEXT NOT NULL, reason TEXT NOT NULL,
            rule TEXT NOT NULL, approvals_needed INTEGER NOT NULL, status TEXT NOT NULL,
            created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, decided_at INTEGER,
            grant_until INTEGER, used INTEGER NOT NULL DEFAULT 0, deny_reason TEXT);
        CREATE TABLE approvals (hold_id TEXT NOT NULL REFERENCES holds(id), approver TEXT NOT NULL,
            at INTEGER NOT NULL, reason TEXT, PRIMARY KEY (hold_id, approver));
        INSERT INTO holds VALUES ('d', 'bot', 't', NULL, '{}', 'x', 'r', 'rule', 2, 'denied',
            1000, 9999999999999, 2000, NULL, 0, 'no');
        INSERT INTO approvals VALUES ('d', 'alice', 1500, 'denied: early'), ('d', 'bob', 2000, 'denied: no');
        INSERT INTO holds VALUES ('p', 'bot', 't', NULL, '{}', 'y', 'r', 'rule', 2, 'pending',
            1000, 9999999999999, NULL, NULL, 0, NULL);
        INSERT INTO approvals VALUES ('p', 'carol', 1500, 'ok');
    ";

    #[tokio::test]
    async fn an_older_state_file_is_migrated_and_its_denials_moved_out_of_the_approvals() {
        let d = crate::scratch::Scratch::new("migrate").unwrap();
        let p = d.join("holds.db");
        Connection::open(&p)
            .unwrap()
            .execute_batch(OLD_STATE)
            .unwrap();
        for _ in 0..2 {
            let h = Holds::open(&p, Duration::from_secs(60)).unwrap();
            let denied = h.get("d").await.unwrap().unwrap();
            let by = denied.denied_by.expect("moved to denied_by");
            assert_eq!(
                (by.approver.as_str(), by.reason.as_deref()),
                ("bob", Some("no"))
            );
            assert_eq!(
                denied
                    .approvals
                    .iter()
                    .map(|a| a.approver.as_str())
                    .collect::<Vec<_>>(),
                ["alice"],
                "only the row at the decision time was the denial"
            );
            let pending = h.get("p").await.unwrap().unwrap();
            assert_eq!(
                pending.approvals[0].window, None,
                "an old approval is single use"
            );
            assert!(pending.denied_by.is_none());
        }
        let h = Holds::open(&p, Duration::from_secs(60)).unwrap();
        let done = h
            .approve("p", "dave", None, Some(Duration::from_secs(600)))
            .await
            .unwrap();
        assert_eq!((done.status, done.grant_for), (Status::Approved, None));
    }

    #[test]
    fn a_corrupt_state_file_is_a_clear_error() {
        let d = crate::scratch::Scratch::new("corrupt").unwrap();
        let p = d.join("holds.db");
        std::fs::write(&p, vec![0x42u8; 8192]).unwrap();
        let e = Holds::open(&p, Duration::from_secs(1)).err().unwrap();
        assert!(e.contains("unusable"), "{e}");
    }
}
