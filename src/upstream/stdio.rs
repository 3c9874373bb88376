//! MCP tool servers reached over stdio: spawned, initialized, supervised.
//!
//! A stdio server is one session, so toolgate runs one child process per
//! agent session ([`Who`]): an upstream session is never shared between
//! agents, nor between two MCP sessions of one agent (an agent's
//! sessionless 2026-07-28 calls share one process of their own). So a
//! server's request to its client can only reach a call of the session the
//! process serves. Processes are started on a session's first call,
//! bounded per upstream ([`MAX_PROCESSES`], least recently used idle one
//! stopped first), stopped when their agent session is deleted
//! ([`Pool::forget`]), and stopped after [`IDLE`] without calls. When one dies, its calls in flight fail at once
//! (-32004, never a hang) and the next call restarts it, after an
//! exponential backoff when it keeps dying. Its stderr goes to the operator
//! log, line by line, bounded.
//!
//! Each process leads a process group of its own, and stopping it stops the
//! group: whatever the server started (a wrapper's real server, a forked
//! helper) goes with it. The server's own exit is watched apart from its
//! stdout, so a crash is seen even while a leftover child holds stdout open.
//! A start that fails or is cancelled (its call timed out) kills what it
//! spawned, and the upstream's next start waits [`START_BACKOFF`], doubling
//! while starts keep failing: a server that never answers `initialize` costs
//! one timeout now and then, not one per call.
//!
//! A child gets a clean environment: only [`INHERITED`] variables plus the
//! upstream's configured `env`. toolgate's own secrets (token keys, upstream
//! credentials) never reach a tool server by inheritance.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{oneshot, watch, Mutex};
use tokio::time::timeout;

use super::{asks, Answer, Relay, UpstreamError, Who};
use crate::mcp;

/// Child processes per stdio upstream (one per agent session).
pub const MAX_PROCESSES: usize = 64;
/// A process without calls for this long is stopped.
pub const IDLE: Duration = Duration::from_secs(600);
/// Requests in flight per process.
const MAX_IN_FLIGHT: usize = 1024;
/// A process that lived this long had a healthy run: its backoff resets.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest stderr line kept (the rest of the line is dropped).
const STDERR_LINE: usize = 4096;
/// How long a stopping process gets after its stdin closes, and its group
/// after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long the lines a server wrote before exiting are still read (a
/// process it left behind may hold stdout open).
const DRAIN: Duration = Duration::from_millis(200);
/// How often a stopping process group is checked for.
const POLL: Duration = Duration::from_millis(20);
/// The wait before the next start after a failed one, doubling up to
/// [`MAX_BACKOFF`] while starts keep failing.
pub const START_BACKOFF: Duration = Duration::from_secs(1);
/// The variables a child inherits from toolgate's environment.
pub const INHERITED: [&str; 7] = ["PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "TZ"];

/// What to run.
#[derive(Debug)]
pub struct Spec {
    pub name: String,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    /// Longest line (one JSON-RPC message) accepted from the server.
    pub max_line: usize,
    /// Set on `notifications/tools/list_changed`.
    pub tools_changed: Arc<std::sync::atomic::AtomicBool>,
    /// The upstream's asks awaiting agents' answers.
    pub asks: Arc<asks::Asks>,
}

#[derive(Default)]
struct Slot {
    proc: Option<Arc<Proc>>,
    /// Consecutive failed starts or short runs.
    failures: u32,
    not_before: Option<Instant>,
    last_used: Option<Instant>,
}

/// Which process asked: toolgate's id of each ask relayed to an agent ->
/// the key of the process that asked, and when.
type Asked = Arc<StdMutex<HashMap<String, (Who, Instant)>>>;

/// Asks remembered per upstream, as many as [`asks::Asks`] keeps pending,
/// for as long as it keeps one.
const MAX_ASKED: usize = 256;
const ASK_TTL: Duration = Duration::from_secs(600);

/// Failed starts of an upstream's server in a row, whichever session they
/// were for (every session runs the same command), and when the next start
/// may be tried.
#[derive(Default)]
struct Starts {
    failures: u32,
    not_before: Option<Instant>,
}

/// The processes of one stdio upstream, one per agent session.
pub struct Pool {
    spec: Arc<Spec>,
    slots: StdMutex<HashMap<Who, Arc<Mutex<Slot>>>>,
    asked: Asked,
    version: ArcSwap<Option<&'static str>>,
    starts: StdMutex<Starts>,
}

impl Pool {
    pub fn new(spec: Spec) -> Pool {
        Pool {
            spec: Arc::new(spec),
            slots: StdMutex::default(),
            asked: Asked::default(),
            version: ArcSwap::from_pointee(None),
            starts: StdMutex::default(),
        }
    }

    /// The revision the server answered with, once started.
    pub fn version(&self) -> Option<&'static str> {
        **self.version.load()
    }

    /// The process ids of running processes, by agent ("" is toolgate's
    /// own); an agent with several sessions appears once per session.
    pub fn pids(&self) -> Vec<(Arc<str>, u32)> {
        self.slots()
            .iter()
            .filter_map(|(k, s)| {
                let s = s.try_lock().ok()?;
                let p = s.proc.as_ref().filter(|p| p.alive())?;
                Some((k.agent.clone(), p.pid?))
            })
            .collect()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<Who, Arc<Mutex<Slot>>>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `msg`, `agent`'s answer to the ask toolgate numbered `id`, to
    /// the running process that asked.
    pub async fn send_to(
        &self,
        agent: &Arc<str>,
        id: &str,
        msg: &Value,
    ) -> Result<(), UpstreamError> {
        let who = self
            .asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)
            .map(|(w, _)| w)
            .filter(|w| w.agent == *agent);
        let slot = who.and_then(|w| self.slots().get(&w).cloned());
        let proc = match slot {
            Some(s) => s.lock().await.proc.clone().filter(|p| p.alive()),
            None => None,
        };
        let Some(proc) = proc else {
            return Err(UpstreamError::Connect(
                self.spec.name.clone(),
                "the stdio server that asked has exited".into(),
            ));
        };
        proc.write(msg).await
    }

    /// Sends one request to `who`'s process, starting it as needed.
    pub async fn request(
        &self,
        who: &Who,
        method: &str,
        params: Value,
        relay: Option<Relay>,
    ) -> Result<Answer, UpstreamError> {
        let proc = self.process(who).await?;
        proc.request(method, Some(params), relay).await
    }

    /// Stops `who`'s process (its agent session ended), once the call
    /// starting it, if any, is through.
    pub fn forget(&self, who: &Who) {
        let Some(slot) = self.slots().remove(who) else {
            return;
        };
        tokio::spawn(async move {
            let proc = slot.lock().await.proc.take();
            if let Some(p) = proc {
                p.stop().await;
            }
        });
    }

    async fn process(&self, who: &Who) -> Result<Arc<Proc>, UpstreamError> {
        let slot = {
            let mut slots = self.slots();
            match slots.get(who) {
                Some(s) => s.clone(),
                None => {
                    self.reap(&mut slots);
                    if slots.len() >= MAX_PROCESSES {
                        return Err(UpstreamError::Connect(
                            self.spec.name.clone(),
                            format!("all {MAX_PROCESSES} stdio sessions are busy"),
                        ));
                    }
                    let s = Arc::new(Mutex::new(Slot::default()));
                    slots.insert(who.clone(), s.clone());
                    s
                }
            }
        };
        let mut slot = slot.lock().await;
        let now = Instant::now();
        slot.last_used = Some(now);
        if let Some(p) = slot.proc.take() {
            if p.alive() {
                slot.proc = Some(p.clone());
                return Ok(p);
            }
            // It died since the last call: restart, backing off when it
            // keeps dying.
            if p.started.elapsed() >= HEALTHY_AFTER {
                slot.failures = 0;
            }
            slot.failures += 1;
            let died = p.died.get().copied().unwrap_or(now);
            slot.not_before = Some(died + backoff(slot.failures));
        }
        if let Some(t) = slot.not_before.filter(|t| *t > now) {
            return Err(UpstreamError::Connect(
                self.spec.name.clone(),
                format!(
                    "the stdio server keeps exiting; next restart in {} ms",
                    (t - now).as_millis()
                ),
            ));
        }
        let next = lock(&self.starts).not_before.filter(|t| *t > now);
        if let Some(t) = next {
            return Err(UpstreamError::Connect(
                self.spec.name.clone(),
                format!(
                    "the stdio server failed to start; next restart in {} ms",
                    (t - now).as_millis()
                ),
            ));
        }
        // Counted as a failure unless it completes, also when cancelled.
        let mut attempt = Attempt {
            slot: &mut slot,
            starts: &self.starts,
            ok: false,
        };
        let p = Proc::start(&self.spec, who, &self.asked).await?;
        attempt.ok = true;
        attempt.slot.not_before = None;
        attempt.slot.proc = Some(p.clone());
        self.version.store(Arc::new(Some(p.version())));
        Ok(p)
    }

    /// Drops slots idle past [`IDLE`] and, at the bound, the least recently
    /// used idle one, stopping their processes.
    fn reap(&self, slots: &mut HashMap<Who, Arc<Mutex<Slot>>>) {
        let now = Instant::now();
        let mut idle: Vec<(Who, Instant)> = Vec::new();
        for (k, s) in slots.iter() {
            // Busy (locked, or with calls in flight) slots are kept.
            let Ok(s) = s.try_lock() else { continue };
            if s.proc.as_ref().is_some_and(|p| p.in_flight() > 0) {
                continue;
            }
            idle.push((k.clone(), s.last_used.unwrap_or(now)));
        }
        idle.sort_by_key(|(_, t)| *t);
        let mut over = slots.len().saturating_sub(MAX_PROCESSES - 1);
        for (k, t) in idle {
            let stale = now.duration_since(t) >= IDLE;
            if !stale && over == 0 {
                continue;
            }
            over = over.saturating_sub(1);
            if let Some(s) = slots.remove(&k) {
                if let Ok(mut s) = s.try_lock() {
                    if let Some(p) = s.proc.take() {
                        tokio::spawn(async move { p.stop().await });
                    }
                }
            }
        }
    }

    /// Stops every process (toolgate is shutting down).
    pub async fn shutdown(&self) {
        let procs: Vec<Arc<Proc>> = {
            let mut slots = self.slots();
            slots
                .drain()
                .filter_map(|(_, s)| s.try_lock().ok().and_then(|mut s| s.proc.take()))
                .collect()
        };
        let stops: Vec<_> = procs
            .into_iter()
            .map(|p| tokio::spawn(async move { p.stop().await }))
            .collect();
        for s in stops {
            let _ = s.await;
        }
    }
}

/// One start of a slot's process: on drop, unless it completed, a failure
/// of the slot and of the upstream's starts (a start cancelled by its call's
/// timeout runs no code of its own).
struct Attempt<'a> {
    slot: &'a mut Slot,
    starts: &'a StdMutex<Starts>,
    ok: bool,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let mut starts = lock(self.starts);
        if self.ok {
            *starts = Starts::default();
            return;
        }
        let now = Instant::now();
        self.slot.failures += 1;
        self.slot.not_before = Some(now + backoff(self.slot.failures));
        starts.failures += 1;
        starts.not_before = Some(now + start_backoff(starts.failures));
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Restart delay after `failures` consecutive failures: the first restart is
/// immediate, then 100 ms doubling up to [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    let ms = 100u64.saturating_mul(1 << (failures - 2).min(16));
    Duration::from_millis(ms).min(MAX_BACKOFF)
}

/// Delay before the next start after `failures` failed starts in a row:
/// [`START_BACKOFF`] doubling up to [`MAX_BACKOFF`].
fn start_backoff(failures: u32) -> Duration {
    START_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

/// How a process is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Run,
    /// Stdin closed, then SIGTERM to its group, then SIGKILL.
    Graceful,
    /// SIGKILL to its group now.
    Kill,
}

/// One running server process.
pub struct Proc {
    name: String,
    pid: Option<u32>,
    stdin: Mutex<Option<ChildStdin>>,
    pending: StdMutex<HashMap<i64, oneshot::Sender<Answer>>>,
    /// Calls in flight that relay notifications: request id → (the
    /// call's progress token, where to send).
    relays: StdMutex<HashMap<i64, (Option<Value>, Relay)>>,
    next_id: AtomicI64,
    started: Instant,
    died: OnceLock<Instant>,
    version: OnceLock<&'static str>,
    stop: watch::Sender<Stop>,
    exited: watch::Receiver<bool>,
    tools_changed: Arc<std::sync::atomic::AtomicBool>,
    /// The agent session this process serves, the upstream's asks, and
    /// which process asked each.
    who: Who,
    asks: Arc<asks::Asks>,
    asked: Asked,
}

impl Proc {
    /// Spawns the server and runs the initialize handshake.
    async fn start(spec: &Spec, who: &Who, asked: &Asked) -> Result<Arc<Proc>, UpstreamError> {
        let name = spec.name.clone();
        let mut cmd = Command::new(&spec.command[0]);
        cmd.args(&spec.command[1..]).env_clear();
        for k in INHERITED {
            if let Some(v) = std::env::var_os(k) {
                cmd.env(k, v);
            }
        }
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        if let Some(d) = &spec.cwd {
            cmd.current_dir(d);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Its own group, so that stopping it reaches what it starts.
        #[cfg(unix)]
        cmd.process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            UpstreamError::Connect(
                name.clone(),
                format!("cannot start {:?}: {e}", spec.command[0]),
            )
        })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(UpstreamError::Connect(name, "no stdio pipes".into()));
        };
        let pid = child.id();
        let (stop, stop_rx) = watch::channel(Stop::Run);
        let (exited_tx, exited) = watch::channel(false);
        let proc = Arc::new(Proc {
            name: name.clone(),
            pid,
            stdin: Mutex::new(Some(stdin)),
            pending: StdMutex::default(),
            relays: StdMutex::default(),
            next_id: AtomicI64::new(1),
            started: Instant::now(),
            died: OnceLock::new(),
            version: OnceLock::new(),
            stop,
            exited,
            tools_changed: spec.tools_changed.clone(),
            who: who.clone(),
            asks: spec.asks.clone(),
            asked: asked.clone(),
        });
        tokio::spawn(log_stderr(name.clone(), pid, stderr));
        tokio::spawn(supervise(
            proc.clone(),
            child,
            stdout,
            stop_rx,
            exited_tx,
            spec.max_line,
        ));
        // From here the supervisor owns the child: unless the start
        // completes, this kills it, also when the caller gives up on it.
        let mut starting = Starting(Some(proc.clone()));
        tracing::info!(upstream.name = %name, pid, agent.id = %who.agent, command = ?spec.command, "stdio upstream started");
        let params = json!({
            "protocolVersion": mcp::V2025_11_25,
            "capabilities": asks::client_capabilities(),
            "clientInfo": mcp::toolgate_info(),
        });
        let fail = |why: String| UpstreamError::Protocol(name.clone(), why);
        let result = match proc.request("initialize", Some(params), None).await? {
            Answer::Result(r) => r.value(),
            Answer::Error(e) => return Err(fail(format!("initialize failed: {e}"))),
        };
        let asked = result.get("protocolVersion").and_then(Value::as_str);
        let Some(version) = asked.and_then(super::upstream_session_version) else {
            return Err(fail(format!(
                "unsupported protocol version {:?}",
                asked.unwrap_or("(none)")
            )));
        };
        let _ = proc.version.set(version);
        proc.write(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await?;
        tracing::info!(upstream.name = %name, pid, protocol = version, "upstream connected");
        starting.0 = None;
        Ok(proc)
    }

    fn alive(&self) -> bool {
        self.died.get().is_none()
    }

    fn version(&self) -> &'static str {
        self.version.get().copied().unwrap_or(mcp::V2025_11_25)
    }

    fn in_flight(&self) -> usize {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn exited_error(&self) -> UpstreamError {
        UpstreamError::Connect(
            self.name.clone(),
            "the stdio server exited during the call".into(),
        )
    }

    /// Sends a request and waits for its response. Dropping the future
    /// (a timeout) cancels the request at the server.
    async fn request(
        self: &Arc<Self>,
        method: &str,
        params: Option<Value>,
        relay: Option<Relay>,
    ) -> Result<Answer, UpstreamError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = relay {
            let token = params
                .as_ref()
                .and_then(|p| p.pointer("/_meta/progressToken"))
                .cloned();
            self.relays
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, (token, r));
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.len() >= MAX_IN_FLIGHT {
                return Err(UpstreamError::Connect(
                    self.name.clone(),
                    format!("{MAX_IN_FLIGHT} calls already in flight"),
                ));
            }
            pending.insert(id, tx);
        }
        let mut guard = Pending {
            proc: self.clone(),
            id,
            done: false,
        };
        // Checked after registering: the reader marks the process dead
        // before failing what is pending, so no call can slip between.
        if !self.alive() {
            guard.done = true;
            return Err(self.exited_error());
        }
        let mut msg = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if let Some(mut p) = params {
            // stdio servers speak a session-era revision.
            mcp::strip_capabilities(&mut p);
            msg["params"] = p;
        }
        self.write(&msg).await?;
        let answer = rx.await;
        guard.done = true;
        answer.map_err(|_| self.exited_error())
    }

    /// Writes one message as one line.
    async fn write(&self, msg: &Value) -> Result<(), UpstreamError> {
        let mut line = serde_json::to_vec(msg)
            .map_err(|e| UpstreamError::Protocol(self.name.clone(), e.to_string()))?;
        line.push(b'\n');
        let mut stdin = self.stdin.lock().await;
        let Some(w) = stdin.as_mut() else {
            return Err(self.exited_error());
        };
        let r = async {
            w.write_all(&line).await?;
            w.flush().await
        }
        .await;
        r.map_err(|e| {
            UpstreamError::Connect(
                self.name.clone(),
                format!("writing to the stdio server: {e}"),
            )
        })
    }

    /// Handles one line from the server's stdout.
    async fn dispatch(self: &Arc<Self>, line: &[u8]) {
        let Ok(Value::Object(mut msg)) = serde_json::from_slice::<Value>(line) else {
            tracing::warn!(upstream.name = %self.name, "stdio server wrote a line that is not a JSON-RPC message");
            return;
        };
        let method = msg.get("method").and_then(Value::as_str).map(str::to_owned);
        match (method, msg.get("id").cloned()) {
            (None, Some(id)) => {
                let Some(id) = id.as_i64() else { return };
                let tx = self
                    .pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                let answer = match (msg.remove("result"), msg.remove("error")) {
                    (Some(r), _) => Answer::Result(crate::upstream::RawResult::from_value(r)),
                    (None, Some(e)) => Answer::Error(e),
                    (None, None) => return,
                };
                if let Some(tx) = tx {
                    let _ = tx.send(answer);
                }
            }
            (Some(method), Some(id)) => {
                // A request from the server: an ask goes to a call in
                // flight with a stream (the process serves one agent
                // session, so it is a call of that session: stdio carries
                // no hint of which); the rest is answered here, off the
                // read loop: a server blocked on a full stdout must not
                // deadlock us.
                if asks::RELAYED.contains(&method.as_str()) {
                    let relay = self
                        .relays
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .values()
                        .next()
                        .map(|(_, r)| r.clone());
                    if let Some(r) = relay {
                        let agent = &self.who.agent;
                        if let Some(m) = self.asks.register(&self.name, agent, None, msg) {
                            let ours = m["id"].as_str().unwrap_or_default().to_owned();
                            self.remember_ask(&ours);
                            if r.try_send(m).is_ok() {
                                tracing::info!(upstream.name = %self.name, agent.id = %agent, %method, "relaying a server request to the agent");
                                return;
                            }
                            self.asks.forget(&ours);
                            self.asked
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .remove(&ours);
                        }
                    }
                }
                let reply = asks::own_answer(&id, &method, true);
                let me = self.clone();
                tokio::spawn(async move {
                    let _ = me.write(&reply).await;
                });
            }
            (Some(method), None) => {
                // Progress goes to the call that asked for it (by token);
                // log messages to this agent's calls in flight.
                let token = msg.get("params").and_then(|p| p.get("progressToken"));
                let relayed = super::RELAYED.contains(&method.as_str()) && {
                    let relays = self.relays.lock().unwrap_or_else(PoisonError::into_inner);
                    let mut sent = false;
                    for (t, r) in relays.values() {
                        let mine = match token {
                            Some(tok) => t.as_ref() == Some(tok),
                            None => method == "notifications/message",
                        };
                        if mine {
                            sent |= r.try_send(Value::Object(msg.clone())).is_ok();
                        }
                    }
                    sent
                };
                if relayed {
                    return;
                }
                if method == "notifications/tools/list_changed" {
                    self.tools_changed.store(true, Ordering::Relaxed);
                }
                if method == "notifications/message" {
                    let data = msg.get("params").cloned().unwrap_or(Value::Null);
                    tracing::info!(upstream.name = %self.name, pid = self.pid, %data, "stdio server log");
                } else {
                    tracing::debug!(upstream.name = %self.name, %method, "stdio server notification");
                }
            }
            (None, None) => {}
        }
    }

    /// Notes that this process asked toolgate's ask `id`, so its answer
    /// comes back here. Bounded: beyond [`MAX_ASKED`], asks past
    /// [`ASK_TTL`] are forgotten, then the oldest.
    fn remember_ask(&self, id: &str) {
        let mut asked = self.asked.lock().unwrap_or_else(PoisonError::into_inner);
        if asked.len() >= MAX_ASKED {
            asked.retain(|_, (_, at)| at.elapsed() < ASK_TTL);
            if asked.len() >= MAX_ASKED {
                let oldest = asked
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    asked.remove(&k);
                }
            }
        }
        asked.insert(id.to_owned(), (self.who.clone(), Instant::now()));
    }

    /// Closes stdin (a well-behaved server exits), then signals its group,
    /// SIGTERM and, after a grace period, SIGKILL; returns once the process
    /// and its group are gone.
    async fn stop(&self) {
        self.stop.send_if_modified(|s| {
            let run = *s == Stop::Run;
            if run {
                *s = Stop::Graceful;
            }
            run
        });
        let mut exited = self.exited.clone();
        let _ = timeout(3 * STOP_GRACE, exited.wait_for(|e| *e)).await;
    }
}

/// Kills the process of a start that did not complete (see [`Proc::start`]).
struct Starting(Option<Arc<Proc>>);

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            p.stop.send_replace(Stop::Kill);
        }
    }
}

/// Removes a request from the pending map when its caller goes away, and
/// tells the server it was cancelled.
struct Pending {
    proc: Arc<Proc>,
    id: i64,
    done: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.proc
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        self.proc
            .relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        if !self.done && self.proc.alive() {
            let (proc, id) = (self.proc.clone(), self.id);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = proc
                        .write(
                            &json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                            "params": {"requestId": id, "reason": "toolgate: upstream_timeout"}}),
                        )
                        .await;
                });
            }
        }
    }
}

/// Reads the server's stdout and watches its exit until it exits, closes
/// stdout or is asked to stop; then fails what is pending and ends the
/// process and its group.
async fn supervise(
    proc: Arc<Proc>,
    mut child: Child,
    stdout: ChildStdout,
    mut stop: watch::Receiver<Stop>,
    exited: watch::Sender<bool>,
    max_line: usize,
) {
    // The child leads its group (see `Proc::start`).
    let group = child.id().filter(|_| cfg!(unix));
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    let mut status = None;
    let why = loop {
        tokio::select! {
            _ = async { stop.wait_for(|s| *s != Stop::Run).await.is_ok() } => {
                break "stopped by toolgate".to_owned();
            }
            s = child.wait() => {
                status = Some(s.map_or_else(|e| e.to_string(), |s| s.to_string()));
                break "exited".to_owned();
            }
            r = read_line(&mut reader, &mut line, max_line, false) => match r {
                Ok(true) => {
                    proc.dispatch(&line).await;
                    line.clear();
                }
                Ok(false) => break "closed its stdout".to_owned(),
                Err(e) => break e,
            },
        }
    };
    // Dead first, then fail what is pending (see `Proc::request`).
    let _ = proc.died.set(Instant::now());
    if status.is_some() {
        // What it wrote before exiting still answers its calls.
        let drain = async {
            while let Ok(true) = read_line(&mut reader, &mut line, max_line, false).await {
                proc.dispatch(&line).await;
                line.clear();
            }
        };
        let _ = timeout(DRAIN, drain).await;
    }
    lock(&proc.pending).clear();
    // A writer blocked on a full pipe holds stdin: the signals free it.
    if let Ok(mut stdin) = timeout(POLL, proc.stdin.lock()).await {
        drop(stdin.take());
    }
    end(&mut child, group, &stop, &mut status).await;
    let status = status.unwrap_or_default();
    tracing::warn!(upstream.name = %proc.name, pid = proc.pid, reason = %why, %status, "stdio upstream exited");
    let _ = exited.send(true);
}

/// Ends the process (its stdin closed) and what is left of its `group`:
/// unless a kill is asked for, it gets [`STOP_GRACE`] to exit, then its
/// group gets SIGTERM and [`STOP_GRACE`] more; then SIGKILL. Sets `status`.
async fn end(
    child: &mut Child,
    group: Option<u32>,
    stop: &watch::Receiver<Stop>,
    status: &mut Option<String>,
) {
    let mut gone = false;
    if *stop.borrow() != Stop::Kill {
        gone_within(child, None, STOP_GRACE, stop, status).await;
        gone = gone_within(child, group, Duration::ZERO, stop, status).await;
        if !gone {
            if let Some(g) = group {
                signal_group(g, Sig::Term);
                gone = gone_within(child, group, STOP_GRACE, stop, status).await;
            }
        }
    }
    if !gone {
        match group {
            Some(g) => {
                signal_group(g, Sig::Kill);
            }
            None => {
                let _ = child.start_kill();
            }
        }
        let s = child.wait().await;
        status.get_or_insert_with(|| s.map_or_else(|e| e.to_string(), |s| s.to_string()));
    }
}

/// Waits up to `grace` (less when a kill is asked for) until the process has
/// exited (setting `status`) and nothing of `group` is left; true if so.
async fn gone_within(
    child: &mut Child,
    group: Option<u32>,
    grace: Duration,
    stop: &watch::Receiver<Stop>,
    status: &mut Option<String>,
) -> bool {
    let deadline = Instant::now() + grace;
    loop {
        if status.is_none() {
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(s)) => *status = Some(s.to_string()),
                Err(e) => *status = Some(e.to_string()),
            }
        }
        if status.is_some() && group.is_none_or(|g| !signal_group(g, Sig::Probe)) {
            return true;
        }
        if Instant::now() >= deadline || *stop.borrow() == Stop::Kill {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

#[derive(Clone, Copy)]
enum Sig {
    /// Only whether the group still has a process.
    Probe,
    Term,
    Kill,
}

/// Sends `sig` to the process group `pgid`; false when it has no process
/// left (or none toolgate may signal).
#[cfg(unix)]
fn signal_group(pgid: u32, sig: Sig) -> bool {
    use rustix::process::{kill_process_group, test_kill_process_group, Pid, Signal};
    let Some(pid) = i32::try_from(pgid).ok().and_then(Pid::from_raw) else {
        return false;
    };
    match sig {
        Sig::Probe => test_kill_process_group(pid),
        Sig::Term => kill_process_group(pid, Signal::TERM),
        Sig::Kill => kill_process_group(pid, Signal::KILL),
    }
    .is_ok()
}

#[cfg(not(unix))]
fn signal_group(_: u32, _: Sig) -> bool {
    false
}

async fn log_stderr(name: String, pid: Option<u32>, stderr: tokio::process::ChildStderr) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    while let Ok(true) = read_line(&mut reader, &mut line, STDERR_LINE, true).await {
        let text = String::from_utf8_lossy(&line);
        tracing::info!(upstream.name = %name, pid, stderr = %text.trim_end(), "stdio server stderr");
        line.clear();
    }
}

/// Reads one `\n`-terminated line into `out` (without the newline), which
/// the caller clears once it handled the line: cancelled mid-line (cancel
/// safe), the part read stays in `out` and the next call goes on with it.
/// Returns false at end of input. A line over `max` bytes is an error, or
/// with `truncate`, cut to `max` (the rest dropped).
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
    max: usize,
    truncate: bool,
) -> Result<bool, String> {
    let mut over = false;
    loop {
        let buf = r.fill_buf().await.map_err(|e| e.to_string())?;
        if buf.is_empty() {
            return Ok(!out.is_empty());
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        let room = max.saturating_sub(out.len());
        if take > room {
            if !truncate {
                return Err(format!("the stdio server sent a message over {max} bytes"));
            }
            over = true;
        }
        out.extend_from_slice(&buf[..take.min(room)]);
        r.consume(if done { take + 1 } else { take });
        if done {
            if out.last() == Some(&b'\r') && !over {
                out.pop();
            }
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_immediate_then_doubles_to_a_cap() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        let mut out = Vec::new();
        let mut r = BufReader::new(&b"short\r\ntoo long a line\nend"[..]);
        assert_eq!(read_line(&mut r, &mut out, 8, false).await, Ok(true));
        assert_eq!(out, b"short");
        out.clear();
        assert!(read_line(&mut r, &mut out, 8, false).await.is_err());
        out.clear();
        let mut r = BufReader::new(&b"too long a line\nnext\n"[..]);
        assert_eq!(read_line(&mut r, &mut out, 8, true).await, Ok(true));
        assert_eq!(out, b"too long");
        out.clear();
        assert_eq!(read_line(&mut r, &mut out, 8, true).await, Ok(true));
        assert_eq!(out, b"next");
        out.clear();
        assert_eq!(read_line(&mut r, &mut out, 8, true).await, Ok(false));
    }
}
