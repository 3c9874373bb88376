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
#[derive(Debug, Clone, Default, serde::Serialize)]
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
        self.reload_inner(by, false)
            .await
            .map(|r| r.unwrap_or_default())
    }

    /// [`Self::reload`]; with `quiet_if_same`, a set whose files are those
    /// in force (same names, same contents) is left alone, unaudited, and
    /// `None` is returned (the watcher's check at start-up).
    async fn reload_inner(
        &self,
        by: &str,
        quiet_if_same: bool,
    ) -> Result<Option<Report>, Problems> {
        let _one_at_a_time = self.0.reload_lock.lock().await;
        let started = std::time::Instant::now();
        self.protect_manifests_target();
        // As written, so a repointed symlink is followed.
        let dir = self.0.config.manifests_as_written.clone();
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
                    file: self.0.config.manifests_as_written.clone(),
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
        if quiet_if_same {
            let names = |files: &[(std::path::PathBuf, String)]| {
                let mut v: Vec<_> = files
                    .iter()
                    .map(|(p, sha)| (p.file_name().map(|n| n.to_os_string()), sha.clone()))
                    .collect();
                v.sort();
                v
            };
            if names(&current.policy.files) == names(&policy.files) {
                return Ok(None);
            }
        }
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
        Ok(Some(report))
    }

    /// Whether the manifests watcher is in place (and caught up with what
    /// changed since start-up): a change made after this is reloaded.
    pub fn watching(&self) -> bool {
        self.0.watching.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Has the guard protect what the manifests path reaches now: after a
    /// repointed symlink, a new directory. Called when a change is first
    /// seen and at every reload, before anything is parsed, so the window
    /// in which an agent could write to the new target is the time the
    /// change takes to be noticed (an inotify event), not a reload.
    fn protect_manifests_target(&self) {
        self.0.guard.add_dir(crate::config::normalize_path(
            &self.0.config.manifests_as_written,
        ));
    }

    /// Watches the manifests directory and reloads on change (debounced)
    /// until `stop` fires.
    ///
    /// The directory's parent is watched too, so a directory that is
    /// removed, replaced, renamed into place or reached through a repointed
    /// symlink is watched again and reloaded: the watch on a directory
    /// follows its inode, not its name. While it is missing the last good
    /// set stays (the reload is rejected and audited). A rescan every
    /// [`RESCAN`] catches what lost events would miss.
    pub async fn watch_manifests(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let dir = absolute(&self.0.config.manifests_as_written);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let wake = tx.clone();
        let scope = dir.clone();
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = &ev {
                if matches!(ev.kind, notify::EventKind::Access(_))
                    || (!ev.need_rescan()
                        && !ev.paths.is_empty()
                        && !ev.paths.iter().any(|p| p.starts_with(&scope)))
                {
                    // Reads, and the parent's other entries (the audit
                    // log may live beside the manifests).
                    return;
                }
            }
            // A change, or an error that may hide one.
            let _ = wake.try_send(());
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(error = %e, rescan_s = RESCAN.as_secs(), "cannot watch the manifests directory; rescanning periodically (or reload with POST /v1/reload)");
                None
            }
        };
        // In place before the first await, as the caller expects: what
        // changes after start-up is seen.
        let mut first = Watch::new(watcher, dir);
        let (_, mut last) = first.survey(true);
        // The set in force was read before this watch existed: whatever
        // changed in between (a swap right after start) is caught here.
        self.protect_manifests_target();
        let _ = self.reload_inner("watcher", true).await;
        self.0
            .watching
            .store(true, std::sync::atomic::Ordering::Release);
        let watch = Arc::new(std::sync::Mutex::new(first));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + RESCAN, RESCAN);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                got = rx.recv() => {
                    if got.is_none() { break }
                    // Before anything settles or is parsed: what the path
                    // reaches now is policy (a repointed symlink's target,
                    // even one holding a broken set an agent could fix up).
                    self.protect_manifests_target();
                    // Let a burst of writes (an editor's save, a git checkout) settle.
                    while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
                    // Watch again first: what changes after this is seen,
                    // what changed before it is in the reload.
                    let Some((_, seen)) = survey(&watch, true).await else { break };
                    last = seen;
                    let _ = self.reload("watcher").await;
                }
                _ = tick.tick() => {
                    let Some((moved, seen)) = survey(&watch, false).await else { break };
                    if moved || seen != last {
                        self.protect_manifests_target();
                        last = seen;
                        let _ = self.reload("watcher").await;
                    }
                }
                _ = stop.changed() => break,
            }
        }
        drop(tx);
    }
}

/// How often the watcher looks at the manifests directory itself, in case
/// a file event was lost (an overflowed queue, a parent replaced too).
pub const RESCAN: Duration = Duration::from_secs(5);

/// At most this many directory entries are looked at by one rescan.
const RESCAN_ENTRIES: usize = 2 * crate::manifest::MAX_MANIFESTS;

/// Which directory a path reaches now, after symlinks: a replaced or
/// repointed directory has another.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    real: std::path::PathBuf,
    #[cfg(unix)]
    inode: (u64, u64),
}

fn identity(path: &Path) -> Option<Identity> {
    let meta = std::fs::metadata(path).ok().filter(|m| m.is_dir())?;
    #[cfg(not(unix))]
    let _ = meta;
    Some(Identity {
        real: path.canonicalize().ok()?,
        #[cfg(unix)]
        inode: {
            use std::os::unix::fs::MetadataExt as _;
            (meta.dev(), meta.ino())
        },
    })
}

/// A digest of the manifest files' names, sizes, times and inodes (after
/// symlinks): a change the events missed changes it. `None` when the
/// directory cannot be read.
fn fingerprint(dir: &Path) -> Option<u64> {
    use std::hash::{Hash as _, Hasher as _};
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).ok()?.take(RESCAN_ENTRIES) {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        #[cfg(unix)]
        let inode = {
            use std::os::unix::fs::MetadataExt as _;
            (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
        };
        #[cfg(not(unix))]
        let inode = ();
        files.push((entry.file_name(), meta.len(), meta.modified().ok(), inode));
    }
    files.sort();
    let mut h = std::hash::DefaultHasher::new();
    files.hash(&mut h);
    Some(h.finish())
}

/// `path` made absolute and lexically normalised, the way event paths
/// are built from it.
fn absolute(path: &Path) -> std::path::PathBuf {
    use std::path::Component;
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut out = std::path::PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// One watched directory: what it was when last looked at, and whether
/// the watch is in place.
#[derive(Debug, Default)]
struct Target {
    seen: Option<Identity>,
    watched: bool,
    /// Placing the watch failed last time (logged once, retried).
    failing: bool,
}

/// The watcher's hold on the manifests directory and its parent.
struct Watch {
    notify: Option<notify::RecommendedWatcher>,
    dir: std::path::PathBuf,
    parent: Option<std::path::PathBuf>,
    on_dir: Target,
    on_parent: Target,
}

impl Watch {
    fn new(notify: Option<notify::RecommendedWatcher>, dir: std::path::PathBuf) -> Watch {
        let parent = dir
            .parent()
            .filter(|p| *p != dir && !p.as_os_str().is_empty())
            .map(Path::to_path_buf);
        Watch {
            notify,
            dir,
            parent,
            on_dir: Target::default(),
            on_parent: Target::default(),
        }
    }

    /// Places again each watch whose directory changed (the manifests
    /// directory's always when `force`: its name may have come back on
    /// the same inode). Returns whether the manifests directory changed,
    /// and its [`fingerprint`].
    fn survey(&mut self, force: bool) -> (bool, Option<u64>) {
        if let Some(parent) = &self.parent {
            let now = identity(parent);
            if now != self.on_parent.seen || (now.is_some() && !self.on_parent.watched) {
                place(
                    self.notify.as_mut(),
                    parent,
                    &mut self.on_parent,
                    now.is_some(),
                );
            }
            self.on_parent.seen = now;
        }
        let now = identity(&self.dir);
        let moved = now != self.on_dir.seen;
        if force || moved || (now.is_some() && !self.on_dir.watched) {
            place(
                self.notify.as_mut(),
                &self.dir,
                &mut self.on_dir,
                now.is_some(),
            );
        }
        if moved && self.on_dir.seen.is_some() {
            match &now {
                Some(id) => {
                    tracing::info!(dir = %self.dir.display(), now = %id.real.display(), "manifests directory replaced; watching the new one")
                }
                None => {
                    tracing::warn!(dir = %self.dir.display(), "manifests directory is gone; the last good set stays in force")
                }
            }
        }
        self.on_dir.seen = now;
        (moved, fingerprint(&self.dir))
    }
}

/// (Re)places the watch on `path`: the old one follows the inode it was
/// placed on, which may no longer be what `path` names.
fn place(
    notify: Option<&mut notify::RecommendedWatcher>,
    path: &Path,
    target: &mut Target,
    exists: bool,
) {
    use notify::Watcher as _;
    let Some(notify) = notify else { return };
    // Not found when notify already dropped it (the directory went).
    let _ = notify.unwatch(path);
    target.watched = false;
    if !exists {
        return;
    }
    match notify.watch(path, notify::RecursiveMode::NonRecursive) {
        Ok(()) => {
            target.watched = true;
            target.failing = false;
        }
        Err(e) => {
            if !target.failing {
                tracing::warn!(error = %e, dir = %path.display(), rescan_s = RESCAN.as_secs(), "cannot watch a directory; retrying at each rescan");
            }
            target.failing = true;
        }
    }
}

/// [`Watch::survey`] off the async threads (it reads the directory).
/// `None` if it panicked, which ends the watcher.
async fn survey(watch: &Arc<std::sync::Mutex<Watch>>, force: bool) -> Option<(bool, Option<u64>)> {
    let watch = Arc::clone(watch);
    let got = tokio::task::spawn_blocking(move || {
        let mut w = watch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        w.survey(force)
    })
    .await;
    match got {
        Ok(x) => Some(x),
        Err(e) => {
            tracing::error!(error = %e, "the manifests watcher failed; reload with POST /v1/reload");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    // Test helpers may unwrap: a panic there is a failed assertion.
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_survey_notices_a_replaced_a_missing_and_a_repointed_directory() {
        let d = crate::scratch::Scratch::new("survey").unwrap();
        let live = d.join("m");
        std::fs::create_dir(d.join("v1")).unwrap();
        std::fs::write(d.join("v1/a.yaml"), "agent: a\n").unwrap();
        std::os::unix::fs::symlink("v1", &live).unwrap();
        let mut w = Watch::new(None, live.clone());
        let (_, fp) = w.survey(false);
        assert!(fp.is_some());
        assert_eq!(w.survey(false), (false, fp), "nothing changed");
        // Repointed: another directory, same contents by name.
        std::fs::create_dir(d.join("v2")).unwrap();
        std::fs::write(d.join("v2/a.yaml"), "agent: a\n").unwrap();
        std::os::unix::fs::symlink("v2", d.join("m.tmp")).unwrap();
        std::fs::rename(d.join("m.tmp"), &live).unwrap();
        assert!(w.survey(false).0, "the link's new target is noticed");
        // Gone, then back.
        std::fs::remove_file(&live).unwrap();
        assert_eq!(w.survey(false), (true, None));
        assert_eq!(w.survey(false), (false, None), "reported once");
        std::fs::rename(d.join("v1"), &live).unwrap();
        assert!(w.survey(false).0);
    }

    #[test]
    fn the_fingerprint_follows_manifest_files_only() {
        let d = crate::scratch::Scratch::new("fingerprint").unwrap();
        let f0 = fingerprint(&d).unwrap();
        std::fs::write(d.join("notes.txt"), "x").unwrap();
        assert_eq!(fingerprint(&d), Some(f0), "not a manifest");
        std::fs::write(d.join("a.yaml"), "agent: a\n").unwrap();
        let f1 = fingerprint(&d).unwrap();
        assert_ne!(f1, f0);
        std::fs::write(d.join("a.yaml"), "agent: a\ndescription: longer\n").unwrap();
        assert_ne!(fingerprint(&d), Some(f1), "an edit");
        assert_eq!(fingerprint(&d.join("absent")), None);
    }

    #[test]
    fn watch_paths_are_absolute_and_lexical() {
        assert_eq!(
            absolute(Path::new("/a/./b/../m")),
            std::path::PathBuf::from("/a/m")
        );
        assert!(absolute(Path::new("m")).is_absolute());
        let w = Watch::new(None, std::path::PathBuf::from("/"));
        assert_eq!(w.parent, None, "the root has no parent to watch");
    }
}
