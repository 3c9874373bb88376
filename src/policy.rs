//! `decide`: one tools/call against one agent's manifest -> a [`Decision`].
//!
//! Pure and synchronous: no network, no async, no locks, no audit. The only
//! outside fact it may consult is the filesystem's symlinks, through the
//! [`Guard`]'s resolver, for the policy-path guard. Steps 2-6 of SPEC
//! "Deciding a tools/call" live here, in that order; authentication (1) and
//! rate limits (7) are the gate's and `ratelimit`'s.
//!
//! Never returns Allow for a tool the manifest does not list, or that a deny
//! rule matches.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use globset::GlobSet;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use crate::manifest::{Expected, Manifest, Test, Unlisted};

/// The outcome of the decision proper (before rate limits).
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Allow,
    Deny,
    /// Arguments fail the tool's schema: every error, each with its pointer.
    Invalid(Vec<SchemaError>),
    /// Needs a human: `approvals` distinct approvers.
    Hold {
        approvals: u32,
    },
}

/// One schema failure.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SchemaError {
    /// JSON pointer into the arguments.
    pub pointer: String,
    pub message: String,
}

/// Which rule decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    NoManifest,
    Deny(usize),
    Unlisted,
    Tool(usize),
    Schema(usize),
    Approval(usize),
    HoldWhen(usize, usize),
    PolicyPath,
    SelfIdentity,
}

impl Rule {
    /// Stable identifier, used in `data.rule` and the audit log.
    pub fn id(&self) -> Cow<'static, str> {
        match self {
            Rule::NoManifest => "no_manifest".into(),
            Rule::Deny(i) => format!("deny[{i}]").into(),
            Rule::Unlisted => "unlisted".into(),
            Rule::Tool(i) => format!("tools[{i}]").into(),
            Rule::Schema(i) => format!("tools[{i}].arguments").into(),
            Rule::Approval(i) => format!("tools[{i}].approval").into(),
            Rule::HoldWhen(i, j) => format!("tools[{i}].hold_when[{j}]").into(),
            Rule::PolicyPath => "guard.policy_path".into(),
            Rule::SelfIdentity => "guard.self_identity".into(),
        }
    }
    /// Line of the rule in its manifest, when it has one.
    pub fn line(&self, m: &Manifest) -> Option<u64> {
        match *self {
            Rule::Deny(i) => m.deny.get(i).map(|d| d.line),
            Rule::HoldWhen(i, j) => m
                .tools
                .get(i)
                .and_then(|t| t.hold_when.get(j))
                .map(|c| c.line),
            Rule::Tool(i) | Rule::Schema(i) | Rule::Approval(i) => m.tools.get(i).map(|t| t.line),
            _ => None,
        }
    }
}

/// A decision with the rule that made it and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub verdict: Verdict,
    pub rule: Rule,
    pub reason: Cow<'static, str>,
    /// The `tools` entry that lists the tool, if any (for its rate limit).
    pub tool_rule: Option<usize>,
}

/// Most manifests directories the guard keeps protecting (start-up's and
/// the newest targets of a repointed symlink).
const MAX_POLICY_DIRS: usize = 8;

/// Most path-like tokens the policy-path guard resolves for one call; a
/// call with more is held (see [`Guard::names_policy_path_within`]).
pub const MAX_PATH_CHECKS: usize = 256;

/// The built-in escalation guard, which no manifest can switch off.
pub struct Guard {
    /// `escalation.tools`: tools where naming oneself is an escalation.
    pub escalation_tools: GlobSet,
    /// Toolgate's own policy files (config, state, audit log, key files),
    /// canonical.
    pub files: Vec<PathBuf>,
    /// Directories whose whole content is policy (manifests), canonical,
    /// with the pre-filter built over every protected name: the one at
    /// start-up and, once a repointed manifests symlink was seen, the one it
    /// reaches (see [`Guard::add_dir`]). Swapped whole, never locked.
    dirs: arc_swap::ArcSwap<Dirs>,
    /// Base for relative paths in arguments: toolgate's working directory.
    pub cwd: PathBuf,
    /// Whether `cwd` is itself protected (inside a policy directory): then
    /// every relative name is.
    cwd_protected: bool,
    /// Resolves `.`/`..` and symlinks (the only IO in `decide`).
    pub resolve: fn(&Path) -> PathBuf,
}

/// The policy directories and the names pre-filter that goes with them.
struct Dirs {
    dirs: Vec<PathBuf>,
    /// Basenames of the protected paths and their parents, as one
    /// automaton: the cheap pre-filter (`None` only if it could not be
    /// built: then every token is resolved).
    names: Option<aho_corasick::AhoCorasick>,
    /// The same basenames, for a one-component token: relative to the
    /// working directory it can name a protected path only by being one of
    /// them (a substring match would resolve `INV-000001` on the
    /// filesystem whenever a protected directory is called `N`).
    basenames: std::collections::HashSet<String>,
}

impl Dirs {
    fn new(files: &[PathBuf], dirs: Vec<PathBuf>) -> Dirs {
        let mut names: Vec<String> = Vec::new();
        for p in files.iter().chain(dirs.iter()) {
            for q in [Some(p.as_path()), p.parent()].into_iter().flatten() {
                if let Some(n) = q.file_name() {
                    names.push(n.to_string_lossy().into_owned());
                }
            }
        }
        names.sort();
        names.dedup();
        let basenames = names.iter().cloned().collect();
        let names = aho_corasick::AhoCorasick::new(&names).ok();
        Dirs {
            dirs,
            names,
            basenames,
        }
    }
}

/// What one call's guard check has spent: resolutions left, and the tokens
/// of its arguments already checked (each distinct token is resolved once,
/// whichever split found it).
pub struct Scan<'a> {
    budget: usize,
    seen: Vec<&'a str>,
}

impl Default for Scan<'_> {
    fn default() -> Self {
        Scan {
            budget: MAX_PATH_CHECKS,
            seen: Vec::new(),
        }
    }
}

impl Scan<'_> {
    /// Whether the budget ran out (the call was held for that).
    pub fn exhausted(&self) -> bool {
        self.budget == 0
    }
}

impl Guard {
    pub fn new(
        escalation_tools: GlobSet,
        files: Vec<PathBuf>,
        dirs: Vec<PathBuf>,
        cwd: PathBuf,
        resolve: fn(&Path) -> PathBuf,
    ) -> Guard {
        let cwd_protected = dirs.iter().any(|d| cwd.starts_with(d));
        let dirs = arc_swap::ArcSwap::from_pointee(Dirs::new(&files, dirs));
        Guard {
            escalation_tools,
            files,
            dirs,
            cwd,
            cwd_protected,
            resolve,
        }
    }

    /// Protects `dir` (canonical) as a policy directory too: the watcher
    /// calls it with what the manifests path reaches as soon as it sees the
    /// directory change, before anything is parsed (a repointed symlink,
    /// even to a broken set), and each reload does. Earlier ones stay
    /// protected; at most [`MAX_POLICY_DIRS`] are kept.
    pub fn add_dir(&self, dir: PathBuf) {
        let now = self.dirs.load();
        if now.dirs.contains(&dir) {
            return;
        }
        let mut next: Vec<PathBuf> = now.dirs.clone();
        next.push(dir);
        if next.len() > MAX_POLICY_DIRS {
            // The start-up directory and the newest ones.
            next.remove(1);
        }
        self.dirs
            .store(std::sync::Arc::new(Dirs::new(&self.files, next)));
    }

    /// Whether `p` (resolved) is protected: a policy file or its directory,
    /// or anything in a policy directory.
    fn is_protected(&self, p: &Path) -> bool {
        self.files.iter().any(|f| f == p || f.parent() == Some(p))
            || self
                .dirs
                .load()
                .dirs
                .iter()
                .any(|d| p.starts_with(d) || d.parent() == Some(p))
    }

    /// Whether `token` could name a path at all: worth resolving. One
    /// without a `/` is a name in the working directory: worth it only if
    /// it is a protected path's basename, or if the working directory is
    /// itself protected (then any name is inside).
    fn looks_like_path(&self, token: &str) -> bool {
        token.contains('/')
            || token.starts_with('.')
            || token.starts_with('~')
            || self.cwd_protected
            || self.dirs.load().basenames.contains(token)
    }

    /// Whether `s` contains the basename of a protected path.
    fn names_any(&self, s: &str) -> bool {
        self.dirs
            .load()
            .names
            .as_ref()
            .is_none_or(|ac| ac.is_match(s))
    }

    /// Whether a string argument names a protected path, whole or as a token
    /// (a shell command, say), also as a `file:` URI (any case, empty or
    /// `localhost` authority, or `file:/path`) and percent-encoded (decoded
    /// until nothing changes, so `%252F` counts too): a tool may well
    /// decode what it is given, and when in doubt, hold.
    pub fn names_policy_path(&self, s: &str) -> bool {
        self.names_policy_path_within(s, &mut Scan::default())
    }

    /// [`Self::names_policy_path`], within one call's [`Scan`]: at most
    /// [`MAX_PATH_CHECKS`] distinct tokens are resolved across a call's
    /// arguments. Resolving is filesystem IO on the calling thread, so an
    /// argument made of a million path-like tokens would stall it: once the
    /// budget is spent the answer is yes (hold), since what was not checked
    /// may name a policy path.
    pub fn names_policy_path_within<'a>(&self, s: &'a str, scan: &mut Scan<'a>) -> bool {
        if self.names_plain_policy_path(s, scan) {
            return true;
        }
        let mut text = Cow::Borrowed(s);
        for _ in 0..4 {
            match percent_decode(&text) {
                Some(d) => {
                    if self.names_derived_policy_path(&d, scan) {
                        return true;
                    }
                    text = Cow::Owned(d);
                }
                None => break,
            }
        }
        false
    }

    /// The check of a string made from an argument (decoded, unquoted):
    /// its tokens do not outlive this call, so they are not remembered,
    /// but they spend the same budget.
    fn names_derived_policy_path(&self, s: &str, scan: &mut Scan<'_>) -> bool {
        let mut inner = Scan {
            budget: scan.budget,
            seen: Vec::new(),
        };
        let hit = self.names_plain_policy_path(s, &mut inner);
        scan.budget = inner.budget;
        hit
    }

    fn names_plain_policy_path<'a>(&self, s: &'a str, scan: &mut Scan<'a>) -> bool {
        if self.names_unquoted_policy_path(s, scan) {
            return true;
        }
        // A shell removes quotes and backslashes: `tg."yaml"` is `tg.yaml`.
        if s.contains(['"', '\'', '\\']) {
            let bare: String = s
                .chars()
                .filter(|c| !matches!(c, '"' | '\'' | '\\'))
                .collect();
            return self.names_derived_policy_path(&bare, scan);
        }
        false
    }

    fn names_unquoted_policy_path<'a>(&self, s: &'a str, scan: &mut Scan<'a>) -> bool {
        // Every token checked below is a substring of `s` (a `file:` URI's
        // path too), so a string without '/', '.', '~', a glob character or
        // a protected basename has none that could name a path: the usual
        // argument.
        if !s
            .bytes()
            .any(|b| matches!(b, b'/' | b'.' | b'~' | b'*' | b'?' | b'['))
            && !self.names_any(s)
        {
            return false;
        }
        let mut check = |tok: &'a str| {
            let tok = strip_file_uri(tok);
            // A bare `*` or `?` is arithmetic or a bullet more often than a
            // path: `5 * 3`, `* buy milk`.
            let bare_wildcard = tok.bytes().all(|b| matches!(b, b'*' | b'?'));
            let glob = !bare_wildcard && tok.contains(['*', '?', '[']);
            if tok.is_empty() || !(glob || self.looks_like_path(tok)) {
                return false;
            }
            if scan.seen.contains(&tok) {
                return false;
            }
            if scan.budget == 0 {
                return true;
            }
            scan.budget -= 1;
            scan.seen.push(tok);
            let p = Path::new(tok);
            let abs = if p.is_absolute() {
                p.to_path_buf()
            } else {
                self.cwd.join(p)
            };
            if glob {
                return self.glob_names_protected(&abs);
            }
            self.is_protected(&(self.resolve)(&abs))
        };
        // Shell words, then the same split finer (`X=1:/p`, `[/p]`, `${p}`),
        // which a glob's `[...]` must not be split by first.
        let words = |c: char| {
            c.is_whitespace()
                || matches!(
                    c,
                    ';' | '|' | '&' | '<' | '>' | '(' | ')' | '`' | '\'' | '"' | '=' | ','
                )
        };
        let finer = |c: char| words(c) || matches!(c, ':' | '[' | ']' | '{' | '}' | '$');
        check(s) || s.split(words).any(&mut check) || s.split(finer).any(&mut check)
    }

    /// Whether the glob `pattern` (absolute) could expand to a protected
    /// path: a policy file, a policy directory, one of their parents, or
    /// anything inside a policy directory. Matched component by component,
    /// so a glob in a directory part counts (`tool-manifest*/bot.yaml`,
    /// `/srv/*/bot.yaml`), and `**` matches any rest.
    fn glob_names_protected(&self, pattern: &Path) -> bool {
        use std::cmp::Ordering::{Equal, Greater, Less};
        use std::path::Component;
        let text = pattern.to_string_lossy();
        // The directory before the first glob character is resolved like
        // any path, so a symlinked prefix cannot hide a policy file.
        let first = text.find(['*', '?', '[']).unwrap_or(text.len());
        let cut = text[..first].rfind('/').map_or(0, |i| i + 1);
        let full = (self.resolve)(Path::new(&text[..cut])).join(&text[cut..]);
        // Lexically normalised components (a `..` after a glob pops it).
        let mut parts: Vec<String> = Vec::new();
        for c in full.components() {
            match c {
                Component::ParentDir => {
                    parts.pop();
                }
                Component::Normal(n) => parts.push(n.to_string_lossy().into_owned()),
                _ => {}
            }
        }
        let mut matchers = Vec::with_capacity(parts.len());
        for part in &parts {
            if part == "**" {
                matchers.push(None);
                continue;
            }
            match globset::Glob::new(part) {
                Ok(g) => matchers.push(Some(g.compile_matcher())),
                // Not a glob after all (an unclosed `[`): the plain check.
                Err(_) => return self.is_protected(&(self.resolve)(pattern)),
            }
        }
        // How the pattern relates to a path: it names the path itself
        // (Equal), something inside it (Greater), or an ancestor (Less).
        let relation = |target: &Path| -> Option<std::cmp::Ordering> {
            let comps: Vec<_> = target
                .components()
                .filter_map(|c| match c {
                    Component::Normal(n) => Some(n),
                    _ => None,
                })
                .collect();
            for (i, m) in matchers.iter().enumerate() {
                let Some(m) = m else {
                    // `**`: anything below what matched so far.
                    return Some(Greater);
                };
                match comps.get(i) {
                    Some(c) if m.is_match(Path::new(c)) => {}
                    Some(_) => return None,
                    None => return Some(Greater),
                }
            }
            Some(matchers.len().cmp(&comps.len()))
        };
        // A protected path is named by the pattern itself or its parent;
        // a policy directory also by anything inside it.
        let named = |target: &Path, inside_counts: bool| match relation(target) {
            Some(Equal) => true,
            Some(Greater) => inside_counts,
            Some(Less) => target.parent().is_some_and(|p| relation(p) == Some(Equal)),
            None => false,
        };
        self.files.iter().any(|f| named(f, false))
            || self.dirs.load().dirs.iter().any(|d| named(d, true))
    }
}

/// The path of a `file:` URI (`file:///p`, `FILE://localhost/p`, `file:/p`;
/// another host's path too: it may be mounted here), or `tok` itself.
fn strip_file_uri(tok: &str) -> &str {
    let Some(rest) = tok
        .get(..5)
        .filter(|s| s.eq_ignore_ascii_case("file:"))
        .map(|_| &tok[5..])
    else {
        return tok;
    };
    match rest.strip_prefix("//") {
        Some(authority_and_path) => authority_and_path
            .find('/')
            .map_or("", |i| &authority_and_path[i..]),
        None => rest,
    }
}

/// `s` with its `%XX` escapes decoded, when it has any (invalid UTF-8 after
/// decoding is replaced, not trusted).
fn percent_decode(s: &str) -> Option<String> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    // Every string argument of every call comes here: most have no escape.
    if !b.contains(&b'%') {
        return None;
    }
    let mut out = Vec::with_capacity(b.len());
    let mut changed = false;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                out.push(h << 4 | l);
                changed = true;
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    changed.then(|| String::from_utf8_lossy(&out).into_owned())
}

/// Folds an identity for generous comparison: Unicode compatibility forms
/// (NFKC), case, invisible characters, and confusables: the UTS #39
/// skeleton (the table rustc's `confusable_idents` lint uses), so that a
/// Cyrillic `і` or `о`, or a digit `0` or `1`, stands for the Latin letter
/// it looks like. Folding more than needed only holds more: when in doubt,
/// hold.
pub fn fold_identity(s: &str) -> String {
    let plain: String = s
        .nfkc()
        .filter(|c| !is_invisible(*c))
        .flat_map(char::to_lowercase)
        .collect();
    // Prototypes may be capitals (`0` -> `O`): lower again.
    unicode_security::confusable_detection::skeleton(&plain)
        .flat_map(char::to_lowercase)
        .collect()
}

fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E0FFF}')
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether folded `hay` equals folded `agent` or contains it as a whole token.
fn names_identity(hay: &str, agent_folded: &str) -> bool {
    if agent_folded.is_empty() {
        return false;
    }
    let hay = fold_identity(hay);
    let mut from = 0;
    while let Some(pos) = hay[from..].find(agent_folded) {
        let start = from + pos;
        let end = start + agent_folded.len();
        let before_ok = hay[..start].chars().next_back().is_none_or(|c| !is_word(c));
        let after_ok = hay[end..].chars().next().is_none_or(|c| !is_word(c));
        if before_ok && after_ok {
            return true;
        }
        from = start + agent_folded.chars().next().map_or(1, char::len_utf8);
    }
    false
}

/// Visits every string in `v` (values and object keys); stops at `true`.
fn any_string<'v>(v: &'v Value, f: &mut dyn FnMut(&'v str) -> bool) -> bool {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().any(|x| any_string(x, f)),
        Value::Object(o) => o.iter().any(|(k, x)| f(k) || any_string(x, f)),
        _ => false,
    }
}

/// The folded form `hold_when` strings are compared by: generous, since
/// a false match only holds (`Admin`, `ADMIN ` and a full-width `ａｄｍｉｎ`
/// all fold to `admin`: case, compatibility forms, look-alikes, invisible
/// characters and whitespace).
pub fn fold_loose(s: &str) -> String {
    fold_identity(&s.split_whitespace().collect::<String>())
}

/// Whether argument `actual` equals any of `expected` for a hold condition.
/// Strings compare folded ([`fold_loose`]; `${agent}` stands for the calling
/// agent); the argument is folded at most once, the expected values were
/// folded when the manifest compiled.
fn cond_matches(actual: &Value, expected: &[Expected], agent: &str) -> bool {
    let mut folded: Option<String> = None;
    for e in expected {
        let hit = match (actual, &e.value) {
            (Value::String(a), Value::String(s)) if s.contains("${agent}") => {
                let s = s.replace("${agent}", agent);
                *a == s || *folded.get_or_insert_with(|| fold_loose(a)) == fold_loose(&s)
            }
            (Value::String(a), Value::String(s)) => {
                a == s
                    || e.folded
                        .as_ref()
                        .is_some_and(|f| folded.get_or_insert_with(|| fold_loose(a)) == f)
            }
            (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            (a, b) => a == b,
        };
        if hit {
            return true;
        }
    }
    false
}

fn deny(rule: Rule, reason: impl Into<Cow<'static, str>>, tool_rule: Option<usize>) -> Decision {
    Decision {
        verdict: Verdict::Deny,
        rule,
        reason: reason.into(),
        tool_rule,
    }
}

/// A resource or prompt an agent asks for (`resources/read`, `prompts/get`,
/// and each entry of their lists).
#[derive(Debug, Clone, Copy)]
pub enum Item<'a> {
    Resource(&'a str),
    Prompt(&'a str),
}

/// The decision on an [`Item`]: allowed by the rule named, or refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemDecision {
    pub allow: bool,
    /// `resources[i]`, `prompts[i]`, `no_manifest`, `unlisted`, `uri`, `guard`.
    pub rule: String,
    pub reason: String,
}

/// Decides a resource or prompt request. Resources and prompts are listed
/// or not (no schemas, no holds): an unlisted one is refused whatever
/// `unlisted` says, a URI with dot segments is refused before matching, and
/// a `file:` URI naming toolgate's own policy is refused by the guard.
pub fn decide_item(guard: &Guard, manifest: Option<&Manifest>, item: Item<'_>) -> ItemDecision {
    let refuse = |rule: &str, reason: String| ItemDecision {
        allow: false,
        rule: rule.to_owned(),
        reason,
    };
    let Some(m) = manifest else {
        return refuse("no_manifest", "no manifest governs this agent".into());
    };
    match item {
        Item::Resource(uri) => {
            if let Err(why) = plain_uri(uri) {
                return refuse("uri", why.into());
            }
            if uri.starts_with("file:") && guard.names_policy_path(uri) {
                return refuse(
                    "guard",
                    "the resource is one of toolgate's own policy files".into(),
                );
            }
            match m.resource_rule(uri) {
                Some(i) => ItemDecision {
                    allow: true,
                    rule: format!("resources[{i}]"),
                    reason: format!("matches {}", m.resources[i]),
                },
                None => refuse(
                    "unlisted",
                    "resource is not in this agent's manifest".into(),
                ),
            }
        }
        Item::Prompt(name) => match m.prompt_rule(name) {
            Some(i) => ItemDecision {
                allow: true,
                rule: format!("prompts[{i}]"),
                reason: format!("matches {}", m.prompts[i]),
            },
            None => refuse("unlisted", "prompt is not in this agent's manifest".into()),
        },
    }
}

/// Refuses URIs a glob could be fooled by: dot segments (also
/// percent-encoded), encoded slashes or backslashes, control characters.
fn plain_uri(uri: &str) -> Result<(), &'static str> {
    if uri.is_empty() || uri.len() > 4096 {
        return Err("a resource URI must be 1-4096 bytes");
    }
    if uri.chars().any(char::is_control) || uri.contains('\\') {
        return Err("a resource URI may not contain control characters or backslashes");
    }
    let lower = uri.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains("%00") {
        return Err("a resource URI may not contain encoded slashes or NUL");
    }
    let path = lower.split(['?', '#']).next().unwrap_or("");
    let decoded = path.replace("%2e", ".");
    if decoded.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("a resource URI may not contain . or .. segments");
    }
    Ok(())
}

/// Decides one call. `manifest` is the calling agent's, if any.
pub fn decide(
    guard: &Guard,
    manifest: Option<&Manifest>,
    agent: &str,
    tool: &str,
    args: &Value,
) -> Decision {
    // 2. No manifest.
    let Some(m) = manifest else {
        return deny(Rule::NoManifest, "no manifest governs this agent", None);
    };
    // 3. Deny rules win over every allow.
    if let Some(i) = m.deny_rule(tool) {
        let reason = match &m.deny[i].reason {
            Some(r) => Cow::Owned(format!("{r} (deny[{i}])")),
            None => Cow::Owned(format!(
                "the tool matches deny[{i}] ({})",
                m.deny[i].pattern
            )),
        };
        return deny(Rule::Deny(i), reason, None);
    }
    // 4. Not listed.
    let Some(ti) = m.tool_rule(tool) else {
        return match m.unlisted {
            Unlisted::Deny => deny(Rule::Unlisted, "tool is not in this agent's manifest", None),
            Unlisted::Hold => Decision {
                verdict: Verdict::Hold { approvals: 1 },
                rule: Rule::Unlisted,
                reason: "access request: tool is not in this agent's manifest".into(),
                tool_rule: None,
            },
        };
    };
    let rule = &m.tools[ti];
    // 5. Schema.
    if let Some(schema) = &rule.schema {
        if !schema.is_valid(args) {
            let errors: Vec<SchemaError> = schema
                .iter_errors(args)
                .take(64)
                .map(|e| SchemaError {
                    pointer: e.instance_path().as_str().to_owned(),
                    message: e.masked().to_string(),
                })
                .collect();
            let reason = format!(
                "arguments do not match the tool's schema: {}",
                errors
                    .iter()
                    .map(|e| format!(
                        "{} {}",
                        if e.pointer.is_empty() {
                            "/"
                        } else {
                            &e.pointer
                        },
                        e.message
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            return Decision {
                verdict: Verdict::Invalid(errors),
                rule: Rule::Schema(ti),
                reason: reason.into(),
                tool_rule: Some(ti),
            };
        }
    }
    // 6. Escalation.
    let hold = |rule: Rule, reason: Cow<'static, str>| Decision {
        verdict: Verdict::Hold {
            approvals: m.tools[ti].approvals,
        },
        rule,
        reason,
        tool_rule: Some(ti),
    };
    if rule.approval_required {
        return hold(
            Rule::Approval(ti),
            "this tool needs approval for every call".into(),
        );
    }
    for (j, c) in rule.hold_when.iter().enumerate() {
        let Some(actual) = args.pointer(&c.pointer) else {
            continue;
        };
        let hit = match &c.test {
            Test::Equals(e) => cond_matches(actual, std::slice::from_ref(e), agent),
            Test::In(set) => cond_matches(actual, set, agent),
            Test::Prefix(p) => actual.as_str().is_some_and(|a| {
                let p = p.replace("${agent}", agent);
                fold_identity(a).starts_with(&fold_identity(&p))
            }),
        };
        if hit {
            return hold(
                Rule::HoldWhen(ti, j),
                format!("argument {} matches hold_when[{j}]", c.pointer).into(),
            );
        }
    }
    let mut scan = Scan::default();
    if any_string(args, &mut |s| guard.names_policy_path_within(s, &mut scan)) {
        let reason = if scan.exhausted() {
            "arguments hold more paths than the policy-path guard checks"
        } else {
            "arguments name a path of toolgate's own policy"
        };
        return hold(Rule::PolicyPath, reason.into());
    }
    if guard.escalation_tools.is_match(tool) {
        let me = fold_identity(agent);
        if any_string(args, &mut |s| names_identity(s, &me)) {
            return hold(
                Rule::SelfIdentity,
                "an escalation tool called with the agent's own identity".into(),
            );
        }
    }
    Decision {
        verdict: Verdict::Allow,
        rule: Rule::Tool(ti),
        reason: Cow::Borrowed("allowed"),
        tool_rule: Some(ti),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{escalation_glob, normalize_path, DEFAULT_ESCALATION_TOOLS};
    use crate::manifest::compile;
    use serde_json::json;

    fn manifest(text: &str) -> Manifest {
        let mut p = Vec::new();
        let m = compile(Path::new("t.yaml"), text, &mut p);
        assert!(p.is_empty(), "{p:?}");
        m.expect("compiles")
    }

    fn guard_in(dir: &Path) -> Guard {
        let mut b = globset::GlobSetBuilder::new();
        for p in DEFAULT_ESCALATION_TOOLS {
            b.add(escalation_glob(p).unwrap());
        }
        let dir = dir.canonicalize().unwrap();
        Guard::new(
            b.build().unwrap(),
            vec![
                dir.join("toolgate.yaml"),
                dir.join(".toolgate/state.db"),
                dir.join(".toolgate/audit.jsonl"),
            ],
            vec![dir.join("tool-manifests")],
            dir.join("work"),
            normalize_path,
        )
    }

    fn guard() -> Guard {
        guard_in(&std::env::temp_dir())
    }

    #[test]
    fn resources_and_prompts_are_listed_or_refused() {
        let g = guard();
        let tmp = std::env::temp_dir().canonicalize().unwrap();
        let m = manifest(&format!(
            "agent: a\nresources: [\"file://{}/**\", \"docs://*/readme\"]\nprompts: [\"kb__*\"]\n",
            tmp.display()
        ));
        let d = |item: Item<'_>| decide_item(&g, Some(&m), item);
        let ok = |item: Item<'_>| d(item).allow;
        assert!(ok(Item::Resource(&format!(
            "file://{}/work/a/b.txt",
            tmp.display()
        ))));
        assert!(ok(Item::Resource("docs://x/readme")));
        assert!(
            !ok(Item::Resource("docs://x/y/readme")),
            "* stays in a segment"
        );
        assert_eq!(d(Item::Resource("docs://x/../readme")).rule, "uri");
        assert_eq!(d(Item::Resource("docs://x/%2e%2E/readme")).rule, "uri");
        assert_eq!(d(Item::Resource("docs://x%2freadme")).rule, "uri");
        assert_eq!(d(Item::Resource("docs://x/readme\u{0}")).rule, "uri");
        // The guard: toolgate's own policy, even where a glob allows it.
        let own = format!("file://{}/tool-manifests/a.yaml", tmp.display());
        assert_eq!(d(Item::Resource(&own)).rule, "guard");
        assert_eq!(
            d(Item::Resource(&format!(
                "file://{}/toolgate.yaml",
                tmp.display()
            )))
            .rule,
            "guard"
        );
        assert!(ok(Item::Prompt("kb__summary")));
        assert_eq!(d(Item::Prompt("other__summary")).rule, "unlisted");
        // None by default, nothing without a manifest.
        let bare = manifest("agent: b\n");
        assert!(!decide_item(&g, Some(&bare), Item::Resource("docs://x/readme")).allow);
        assert!(!decide_item(&g, Some(&bare), Item::Prompt("kb__summary")).allow);
        assert_eq!(
            decide_item(&g, None, Item::Prompt("kb__x")).rule,
            "no_manifest"
        );
    }

    const M: &str = r#"
agent: billing-bot
unlisted: deny
tools:
  - name: billing__get_invoice
    arguments:
      type: object
      properties:
        invoice_id: { type: string, pattern: "^INV-[0-9]{6}$" }
        n: { type: integer }
      required: [invoice_id]
      additionalProperties: false
  - name: billing__refund
    approval: required
    approvals: 2
  - name: iam__grant_role
    hold_when:
      - { pointer: /principal, equals: "${agent}" }
      - { pointer: /role, in: [admin, owner] }
  - name: "fs__*"
  - name: "billing__delete_old"
deny:
  - name: "*__delete_*"
    reason: deletes are never automated
"#;

    fn d(tool: &str, args: Value) -> Decision {
        decide(&guard(), Some(&manifest(M)), "billing-bot", tool, &args)
    }

    #[test]
    fn no_manifest_denies() {
        let dec = decide(&guard(), None, "x", "billing__get_invoice", &json!({}));
        assert_eq!((dec.verdict, dec.rule), (Verdict::Deny, Rule::NoManifest));
    }

    #[test]
    fn deny_wins_over_an_exact_allow() {
        let dec = d("billing__delete_old", json!({}));
        assert_eq!((dec.verdict, dec.rule), (Verdict::Deny, Rule::Deny(0)));
        assert!(dec.reason.contains("never automated"));
    }

    #[test]
    fn denies_tool_absent_from_manifest_or_holds_when_unlisted_hold() {
        let dec = d("billing__get_invoices", json!({}));
        assert_eq!((dec.verdict, dec.rule), (Verdict::Deny, Rule::Unlisted));
        let m = manifest("agent: a\nunlisted: hold\n");
        let dec = decide(&guard(), Some(&m), "a", "x__y", &json!({}));
        assert_eq!(dec.verdict, Verdict::Hold { approvals: 1 });
        assert_eq!(dec.rule, Rule::Unlisted);
    }

    #[test]
    fn schema_failures_list_every_error_with_pointer() {
        let dec = d(
            "billing__get_invoice",
            json!({"invoice_id": "INV-1", "n": "x", "extra": 1}),
        );
        let Verdict::Invalid(errs) = dec.verdict else {
            panic!("{dec:?}")
        };
        let ptrs: Vec<&str> = errs.iter().map(|e| e.pointer.as_str()).collect();
        assert!(ptrs.contains(&"/invoice_id"), "{errs:?}");
        assert!(ptrs.contains(&"/n"), "{errs:?}");
        assert!(ptrs.contains(&""), "{errs:?}");
        assert_eq!(dec.rule, Rule::Schema(0));
        let ok = d("billing__get_invoice", json!({"invoice_id": "INV-000001"}));
        assert_eq!((ok.verdict, ok.rule), (Verdict::Allow, Rule::Tool(0)));
    }

    #[test]
    fn approval_required_and_hold_when_hold() {
        let dec = d("billing__refund", json!({}));
        assert_eq!(
            (dec.verdict, dec.rule),
            (Verdict::Hold { approvals: 2 }, Rule::Approval(1))
        );
        let dec = d(
            "iam__grant_role",
            json!({"principal": "BILLING-BOT", "role": "reader"}),
        );
        assert_eq!(dec.rule, Rule::HoldWhen(2, 0));
        let dec = d(
            "iam__grant_role",
            json!({"principal": "someone", "role": "owner"}),
        );
        assert_eq!(dec.rule, Rule::HoldWhen(2, 1));
        // Literal values are compared as generously as identities.
        for role in [
            "Admin",
            "ADMIN",
            "OWNER",
            "admin ",
            " owner\t",
            "\u{ff41}\u{ff44}\u{ff4d}\u{ff49}\u{ff4e}",
            "ad\u{200b}min",
        ] {
            let dec = d(
                "iam__grant_role",
                json!({"principal": "someone", "role": role}),
            );
            assert_eq!(dec.rule, Rule::HoldWhen(2, 1), "{role:?}");
        }
        let dec = d(
            "iam__grant_role",
            json!({"principal": "someone", "role": "reader"}),
        );
        assert_eq!(dec.verdict, Verdict::Allow);
    }

    #[test]
    fn self_identity_guard_folds_case_unicode_and_invisibles() {
        for evasion in [
            "billing-bot",
            "Billing-Bot",
            "ｂｉｌｌｉｎｇ-ｂｏｔ",
            "billing\u{200B}-bot",
            "agents/billing-bot/roles",
            "user:billing-bot",
        ] {
            let dec = d("fs__grant_access", json!({"who": evasion}));
            assert_eq!(dec.rule, Rule::SelfIdentity, "{evasion}");
        }
        let dec = d("fs__grant_access", json!({"who": "billing-bots"}));
        assert_eq!(dec.verdict, Verdict::Allow);
        let dec = d("fs__read", json!({"who": "billing-bot"}));
        assert_eq!(dec.verdict, Verdict::Allow, "not an escalation tool");
    }

    #[test]
    fn policy_path_guard_resolves_dots_and_symlinks() {
        let base = crate::scratch::Scratch::new("guard").unwrap();
        std::fs::create_dir_all(base.join("tool-manifests")).unwrap();
        std::fs::create_dir_all(base.join("work")).unwrap();
        std::fs::write(base.join("toolgate.yaml"), "x").unwrap();
        let _ = std::fs::remove_file(base.join("work/innocent"));
        std::os::unix::fs::symlink(base.join("tool-manifests"), base.join("work/innocent"))
            .unwrap();
        let g = guard_in(&base);
        let m = manifest(M);
        let b = base.canonicalize().unwrap();
        let held = [
            b.join("toolgate.yaml").display().to_string(),
            format!("{}/work/../toolgate.yaml", b.display()),
            format!("{}//tool-manifests/./x.yaml", b.display()),
            "../tool-manifests/billing-bot.yaml".to_owned(),
            format!("sh -c 'rm -rf {}/.toolgate'", b.display()),
            "innocent/billing-bot.yaml".to_owned(),
            format!("file://{}/.toolgate/audit.jsonl", b.display()),
            format!("FILE://localhost{}/toolgate.yaml", b.display()),
            format!("file:{}/toolgate.yaml", b.display()),
            format!("see file://{}/tool-manifests/x.yaml", b.display()),
            format!("{}/tool-manifests/billing%2Dbot.yaml", b.display()),
            b.join("toolgate.yaml")
                .display()
                .to_string()
                .replace('/', "%2F"),
            format!("file://{}", b.join("toolgate.yaml").display()).replace('/', "%252f"),
            format!("curl -d path={}%2Ftoolgate.yaml x", b.display()),
        ];
        for arg in held {
            let dec = decide(
                &g,
                Some(&m),
                "billing-bot",
                "fs__write",
                &json!({"path": arg}),
            );
            assert_eq!(dec.rule, Rule::PolicyPath, "{arg}");
        }
        for arg in [
            "notes.txt",
            "/srv/data/x",
            "tool-manifests-backup",
            "file:///srv/data/x",
            "100%25 done",
            "%zz%",
        ] {
            let dec = decide(
                &g,
                Some(&m),
                "billing-bot",
                "fs__write",
                &json!({"path": arg}),
            );
            assert_eq!(dec.verdict, Verdict::Allow, "{arg}");
        }
    }

    #[test]
    fn policy_path_guard_sees_through_globs_quotes_and_separators() {
        let base = crate::scratch::Scratch::new("guard-shell").unwrap();
        std::fs::create_dir_all(base.join("tool-manifests")).unwrap();
        std::fs::create_dir_all(base.join("work")).unwrap();
        std::fs::write(base.join("toolgate.yaml"), "x").unwrap();
        let g = guard_in(&base);
        let m = manifest(M);
        let b = base.canonicalize().unwrap().display().to_string();
        let held = [
            format!("cat {b}/toolgate.y*"),
            format!("cat {b}/tool?ate.yaml"),
            format!("cat {b}/toolgate.y[a]ml"),
            format!("cat {b}/tool-manifests/*.yaml"),
            format!("rm -rf {b}/tool-*"),
            format!("cat {b}/.toolgate/audit.json?"),
            format!("cat {b}/toolgate.\"yaml\""),
            format!("cat '{b}'/toolgate.yaml"),
            format!("cat {b}/tool\\gate.yaml"),
            format!("cat [{b}/toolgate.yaml]"),
            format!("X=1:{b}/toolgate.yaml"),
            format!("echo ${{{b}/toolgate.yaml}}"),
            "../toolgate.y*".to_owned(),
            // Globs in a directory part, and brackets alone.
            format!("cat {b}/tool-manifest*/bot.yaml"),
            format!("cp /tmp/evil.yaml {b}/tool-manifest?/bot.yaml"),
            format!("cat {b}/*/bot.yaml"),
            format!("rm -rf {b}/tool-manifest[s]"),
            format!("rm -rf {b}/**"),
            format!("cat {b}/*/../toolgate.yaml"),
        ];
        for arg in held {
            let dec = decide(&g, Some(&m), "billing-bot", "fs__run", &json!({"cmd": arg}));
            assert_eq!(dec.rule, Rule::PolicyPath, "{arg}");
        }
        for arg in [
            format!("cat {b}/work/*.txt"),
            format!("cat {b}/work/*/x.txt"),
            format!("cat {b}/*.txt"),
            "ls *.txt".to_owned(),
            "what? why?".to_owned(),
            format!("cat {b}/work/[notes].md"),
            // Bare wildcards are arithmetic or bullets, not paths.
            "5 * 3".to_owned(),
            "* buy milk\n* and eggs".to_owned(),
        ] {
            let dec = decide(&g, Some(&m), "billing-bot", "fs__run", &json!({"cmd": arg}));
            assert_eq!(dec.verdict, Verdict::Allow, "{arg}");
        }
    }

    #[test]
    fn policy_path_guard_holds_what_it_has_no_budget_to_check() {
        let g = guard();
        let m = manifest(M);
        let run = |args: Value| decide(&g, Some(&m), "billing-bot", "fs__run", &args);
        // Distinct path-like tokens, none protected: each one would be
        // resolved on the filesystem.
        let tokens = |n: usize, stem: &str| -> Vec<String> {
            (0..n).map(|i| format!("a/{stem}{i}")).collect()
        };
        let dec = run(json!({"cmd": tokens(MAX_PATH_CHECKS + 10, "b").join(" ")}));
        assert_eq!(dec.rule, Rule::PolicyPath);
        assert!(dec.reason.contains("more paths than"), "{}", dec.reason);
        let dec = run(json!({"cmd": tokens(MAX_PATH_CHECKS / 4, "b").join(" ")}));
        assert_eq!(dec.verdict, Verdict::Allow);
        // Each distinct token is resolved once, whichever split finds it:
        // 200 paths, one per item, fit in the budget.
        let dec = run(json!({"paths": tokens(200, "d")}));
        assert_eq!(dec.verdict, Verdict::Allow, "{}", dec.reason);
        // The budget is per call, across every string argument.
        let dec = run(json!({"paths": tokens(MAX_PATH_CHECKS + 1, "c")}));
        assert_eq!(dec.rule, Rule::PolicyPath);
    }

    #[test]
    fn a_word_that_merely_contains_a_protected_name_is_not_resolved() {
        static RESOLVED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn counting(p: &Path) -> PathBuf {
            RESOLVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            normalize_path(p)
        }
        // A deployment whose policy lives in a directory called `N`.
        let base = crate::scratch::Scratch::new("guard-short").unwrap();
        let b = base.canonicalize().unwrap();
        let g = Guard::new(
            GlobSet::empty(),
            vec![b.join("N/toolgate.yaml")],
            vec![b.join("N/tool-manifests")],
            b.clone(),
            counting,
        );
        assert!(!g.names_policy_path("INV-000001"));
        assert!(!g.names_policy_path("NORTH WIND"));
        assert_eq!(RESOLVED.load(std::sync::atomic::Ordering::Relaxed), 0);
        // The name itself, relative to the working directory, still counts.
        assert!(g.names_policy_path("rm -rf N"));
        assert!(g.names_policy_path("N/toolgate.yaml"));
    }

    #[test]
    fn a_directory_added_to_the_guard_is_protected_by_name_too() {
        let base = crate::scratch::Scratch::new("guard-add").unwrap();
        std::fs::create_dir_all(base.join("m1")).unwrap();
        std::fs::create_dir_all(base.join("m3")).unwrap();
        let b = base.canonicalize().unwrap();
        let g = Guard::new(
            GlobSet::empty(),
            vec![b.join("toolgate.yaml")],
            vec![b.join("m1")],
            b.clone(),
            normalize_path,
        );
        assert!(!g.names_policy_path("rm -rf m3"));
        g.add_dir(b.join("m3"));
        assert!(
            g.names_policy_path("rm -rf m3"),
            "the pre-filter knows its name"
        );
        assert!(g.names_policy_path(&format!("cat {}/m3/x.yaml", b.display())));
        assert!(g.names_policy_path("rm -rf m1"), "the earlier one stays");
        for i in 0..2 * MAX_POLICY_DIRS {
            g.add_dir(b.join(format!("n{i}")));
        }
        assert!(
            g.names_policy_path("rm -rf m1"),
            "start-up's is never dropped"
        );
    }

    #[test]
    fn self_identity_guard_folds_confusables() {
        for evasion in [
            "b\u{456}lling-bot",                    // Cyrillic i
            "billing-b\u{43e}t",                    // Cyrillic o
            "bi11ing-bot",                          // digits one for l
            "billing-b0t",                          // digit zero for o
            "B\u{406}LLING-BOT",                    // Cyrillic capital I
            "agents/b\u{456}lling-b\u{43e}t/roles", // inside a path
        ] {
            let dec = d("fs__grant_access", json!({"who": evasion}));
            assert_eq!(dec.rule, Rule::SelfIdentity, "{evasion:?}");
        }
        // Escalation tools match in any case: an upstream's CamelCase names.
        let m = manifest("agent: billing-bot\ntools:\n  - name: \"iam__*\"\n");
        for tool in ["iam__GrantRole", "iam__AssumeRole", "iam__PutRolePolicy"] {
            let dec = decide(
                &guard(),
                Some(&m),
                "billing-bot",
                tool,
                &json!({"who": "billing-bot"}),
            );
            assert_eq!(dec.rule, Rule::SelfIdentity, "{tool}");
        }
        // Folding is of look-alikes only: other names still pass.
        for other in ["billing-bat", "bi11ing-bots", "filling-bot"] {
            let dec = d("fs__grant_access", json!({"who": other}));
            assert_eq!(dec.verdict, Verdict::Allow, "{other:?}");
        }
        // And in hold_when conditions on ${agent}.
        let dec = d(
            "iam__grant_role",
            json!({"principal": "b\u{456}lling-bot", "role": "reader"}),
        );
        assert_eq!(dec.rule, Rule::HoldWhen(2, 0));
        assert_eq!(
            fold_identity("b\u{456}lling-bot"),
            fold_identity("billing-bot")
        );
    }

    #[test]
    fn names_identity_needs_whole_tokens() {
        let me = fold_identity("bot");
        assert!(names_identity("bot", &me));
        assert!(names_identity("a/bot/b", &me));
        assert!(!names_identity("robot", &me));
        assert!(!names_identity("bots", &me));
        assert!(names_identity("robot bot", &me));
    }
}
