//! Hot reload of the manifests: from file changes (debounced) and from
//! `POST /v1/reload`.
//!
//! A reload is all or nothing: the whole directory is compiled first; one
//! broken file rejects the set, keeps the last good snapshot, and is logged
//! and audited with every problem. An accepted set is swapped in atomically
//! (calls in flight finish on the snapshot they loaded), reusing rate-limit
//! state for unchanged rates, and audited with who or what caused it, each
//! file's SHA-256, the git commit when the directory is a work tree, and what
//! changed: agents added or removed, tools widened or narrowed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::audit::Record;
use crate::config::Problems;
use crate::gate::{Gate, Snapshot};
use crate::manifest::{Manifest, PolicySet};
use crate::ratelimit::Limiters;

/// How long file events settle before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// What an accepted reload changed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub generation: u64,
    pub agents: usize,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<Value>,
    pub files: Vec<Value>,
    pub duration_ms: u64,
}

/// The tools (and denials) a manifest grants, as comparable sets.
fn surface(m: &Manifest) -> (BTreeSet<String>, BTreeSet<String>) {
    let tools = m
        .tools
        .iter()
        .map(|t| {
            let mut k = t.pattern.to_string();
            if t.approval_required || !t.hold_when.is_empty() {
                k.push_str(" (held)");
            }
            if t.schema.is_none() {
                k.push_str(" (any arguments)");
            }
            k
        })
        .collect();
    let deny = m.deny.iter().map(|d| d.pattern.clone()).collect();
    (tools, deny)
}

fn diff(old: &PolicySet, new: &PolicySet) -> (Vec<String>, Vec<String>, Vec<Value>) {
    let names = |p: &PolicySet| {
        p.manifests()
            .map(|m| m.agent.to_string())
            .collect::<BTreeSet<_>>()
    };
    let (o, n) = (names(old), names(new));
    let added = n.difference(&o).cloned().collect();
    let removed = o.difference(&n).cloned().collect();
    let mut changed = Vec::new();
    for agent in o.intersection(&n) {
        let (Some(a), Some(b)) = (old.get(agent), new.get(agent)) else {
            continue;
        };
        if a.sha256 == b.sha256 {
            continue;
        }
        let ((ta, da), (tb, db)) = (surface(a), surface(b));
        let mut widened: Vec<String> = tb.difference(&ta).cloned().collect();
        let mut narrowed: Vec<String> = ta.difference(&tb).cloned().collect();
        widened.extend(da.difference(&db).map(|d| format!("deny {d} removed")));
        narrowed.extend(db.difference(&da).map(|d| format!("deny {d} added")));
        if a.unlisted != b.unlisted {
            let s = format!("unlisted: {:?} -> {:?}", a.unlisted, b.unlisted).to_lowercase();
            if b.unlisted == crate::manifest::Unlisted::Hold {
                widened.push(s);
            } else {
                narrowed.push(s);
            }
        }
        if a.rate != b.rate {
            narrowed.push(format!(
                "rate_limit changed: {:?} -> {:?}",
                a.rate.map(|r| r.burst),
                b.rate.map(|r| r.burst)
            ));
        }
        changed.push(json!({"agent": agent, "file": b.file_name(), "sha256": b.sha256, "widened": widened, "narrowed": narrowed}));
    }
    (added, removed, changed)
}

/// The manifests directory's git HEAD commit and author, if it is in a work
/// tree (who changed policy).
fn git_head(dir: &Path) -> Option<Value> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["log", "-1", "--format=%H%x1f%an <%ae>%x1f%cI", "--", "."])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8_lossy(&out.stdout);
    let mut parts = s.trim().split('\x1f');
    let (commit, author, at) = (parts.next()?, parts.next()?, parts.next()?);
    let dirty = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["status", "--porcelain", "--", "."])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    Some(
        json!({"commit": commit, "author": author, "committed_at": at, "uncommitted_changes": dirty}),
    )
}

impl Gate {
    /// Reloads the manifests; `by` names the cause (`api:<subject>`,
    /// `watcher`). All or nothing.
    pub async fn reload(&self, by: &str) -> Result<Report, Problems> {
        let _one_at_a_time = self.0.reload_lock.lock().await;
        let started = std::time::Instant::now();
        let dir = self.0.config.manifests.clone();
        let previous = self.0.snapshot.load_full();
        let loaded = tokio::task::spawn_blocking(move || {
            let set = PolicySet::load_dir_reusing(&dir, Some(&previous.policy));
            let git = git_head(&dir);
            (set, git)
        })
        .await;
        let (set, git) = match loaded {
            Ok(x) => x,
            Err(e) => {
                return Err(Problems(vec![crate::config::Problem {
                    file: self.0.config.manifests.clone(),
                    line: 0,
                    column: 0,
                    path: String::new(),
                    message: format!("reload task failed: {e}"),
                }]))
            }
        };
        let policy = match set {
            Ok(p) => p,
            Err(problems) => {
                self.0.metrics_reload(false);
                tracing::error!(by, problems = %problems, "manifest reload rejected; keeping the last good set");
                self.0.audit(Record {
                    event: "manifests_rejected",
                    decision: Some("deny"),
                    reason: Some(format!(
                        "{} problem(s); the last good set stays in force",
                        problems.0.len()
                    )),
                    approver: Some(by.to_owned()),
                    detail: Some(json!({
                        "by": by,
                        "errors": problems.0.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                        "git": git,
                    })),
                    ..Record::default()
                });
                return Err(problems);
            }
        };
        let current = self.0.snapshot.load_full();
        let (added, removed, changed) = diff(&current.policy, &policy);
        let old_files: BTreeMap<_, _> = current.policy.files.iter().cloned().collect();
        let files: Vec<Value> = policy
            .files
            .iter()
            .filter(|(p, sha)| old_files.get(p) != Some(sha))
            .map(|(p, sha)| json!({"file": p.file_name().map(|f| f.to_string_lossy().into_owned()), "sha256": sha}))
            .collect();
        let limiters = Limiters::build(
            &policy,
            Some(&current.limiters),
            governor::clock::DefaultClock::default(),
        );
        let generation = current.generation + 1;
        let agents = policy.len();
        self.0.snapshot.store(Arc::new(Snapshot {
            policy,
            limiters,
            generation,
        }));
        // What agents may see may have changed: tell their open streams.
        self.0.listed.send_modify(|n| *n += 1);
        self.0.metrics_reload(true);
        let report = Report {
            generation,
            agents,
            added,
            removed,
            changed,
            files,
            duration_ms: started.elapsed().as_millis() as u64,
        };
        tracing::info!(
            by,
            generation,
            agents,
            added = report.added.len(),
            removed = report.removed.len(),
            changed = report.changed.len(),
            "manifests reloaded"
        );
        self.0.audit(Record {
            event: "manifests_reloaded",
            decision: Some("allow"),
            reason: Some(format!("generation {generation}: {agents} agent(s)")),
            approver: Some(by.to_owned()),
            detail: Some(json!({
                "by": by,
                "generation": generation,
                "added": report.added,
                "removed": report.removed,
                "changed": report.changed,
                "files": report.files,
                "git": git,
            })),
            ..Record::default()
        });
        Ok(report)
    }

    /// Watches the manifests directory and reloads on change (debounced)
    /// until `stop` fires.
    pub async fn watch_manifests(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        use notify::{RecursiveMode, Watcher};
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                if !matches!(ev.kind, notify::EventKind::Access(_)) {
                    let _ = tx.try_send(());
                }
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the manifests directory; reload with POST /v1/reload");
                return;
            }
        };
        if let Err(e) = watcher.watch(&self.0.config.manifests, RecursiveMode::NonRecursive) {
            tracing::error!(error = %e, "cannot watch the manifests directory; reload with POST /v1/reload");
            return;
        }
        loop {
            tokio::select! {
                got = rx.recv() => {
                    if got.is_none() { break }
                    // Let a burst of writes (an editor's save, a git checkout) settle.
                    while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
                    let _ = self.reload("watcher").await;
                }
                _ = stop.changed() => break,
            }
        }
    }
}
