//! Process configuration: listeners, auth, upstreams, limits.
//!
//! YAML is parsed into `*Spec` types (`deny_unknown_fields`, strict YAML
//! budget), then converted into validated types that cannot hold invalid
//! states. Every problem is collected before failing, each naming the file,
//! line, column and key path ([`Problem`]). Paths are relative to the config
//! file. Keys are loaded once, here; nothing is read from disk afterwards.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::identity::{KeyEntry, KeySet};

/// One configuration problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    /// Key path inside the document, e.g. `auth.agents.keys[0].hs256`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.column,
            if self.path.is_empty() {
                "(document)"
            } else {
                &self.path
            },
            self.message
        )
    }
}

/// Every problem found in a configuration or manifest set.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Collects problems for one file.
pub(crate) struct Report<'a> {
    pub file: &'a Path,
    pub problems: &'a mut Vec<Problem>,
}

impl Report<'_> {
    pub fn at<T>(&mut self, span: &Spanned<T>, path: impl Into<String>, msg: impl Into<String>) {
        self.at_loc(span.referenced.line(), span.referenced.column(), path, msg);
    }
    pub fn at_loc(
        &mut self,
        line: u64,
        column: u64,
        path: impl Into<String>,
        msg: impl Into<String>,
    ) {
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            column,
            path: path.into(),
            message: msg.into(),
        });
    }
}

/// Largest config or manifest file accepted.
pub const MAX_YAML_BYTES: usize = 1 << 20;

/// Parses YAML strictly: duplicate keys rejected, tight budgets.
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
) -> Result<T, Problem> {
    let problem = |line, column, message: String| Problem {
        file: file.to_path_buf(),
        line,
        column,
        path: String::new(),
        message,
    };
    if text.len() > MAX_YAML_BYTES {
        return Err(problem(
            1,
            1,
            format!("file is larger than {MAX_YAML_BYTES} bytes"),
        ));
    }
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = 200_000;
    budget.max_aliases = 100;
    budget.max_anchors = 100;
    budget.max_depth = 64;
    budget.max_nodes = 100_000;
    budget.max_total_scalar_bytes = MAX_YAML_BYTES;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        let loc = e.location().unwrap_or(serde_saphyr::Location::UNKNOWN);
        let msg = e.without_snippet().to_string();
        // The message may repeat the position; keep the first line only,
        // without a trailing "at line L, column C".
        let mut msg = msg.lines().next().unwrap_or("invalid YAML").to_owned();
        if let Some(i) = msg.rfind(" at line ") {
            msg.truncate(i);
        }
        let (line, column) = (loc.line().max(1), loc.column().max(1));
        let mut p = problem(line, column, msg);
        p.path = key_path_at(text, line as usize, column as usize);
        if p.message.starts_with("missing field") {
            p.path = parent_path(&p.path).to_owned();
        }
        p
    })
}

/// The key path (`tools[0].arguments`) of the node at `line`:`column` in
/// block-style YAML, read from indentation. Best effort: used to name the
/// place of a parse error, never to decide anything.
pub(crate) fn key_path_at(text: &str, line: usize, column: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if line == 0 || line > lines.len() {
        return String::new();
    }
    let indent = |l: &str| l.len() - l.trim_start_matches(' ').len();
    let key_of = |s: &str| -> Option<String> {
        let s = s.trim_start_matches("- ").trim_start();
        let k = s.split_once(':')?.0.trim();
        (!k.is_empty() && !k.starts_with(['{', '[', '#', '"', '\''])).then(|| k.to_owned())
    };
    let skip = |t: &str| t.is_empty() || t.starts_with('#');
    // The index of the sequence item starting on line `i` at indent `ind`:
    // its earlier siblings at the same indent.
    let item_index = |i: usize, ind: usize| {
        let mut n = 0;
        let mut j = i;
        while j > 0 {
            j -= 1;
            let lj = lines[j];
            let tj = lj.trim_start();
            if skip(tj) {
                continue;
            }
            if indent(lj) < ind || (indent(lj) == ind && !tj.starts_with('-')) {
                break;
            }
            if indent(lj) == ind {
                n += 1;
            }
        }
        format!("[{n}]")
    };
    let mut segs: Vec<String> = Vec::new();
    let here = lines[line - 1];
    let ind = indent(here);
    let t = here.trim_start();
    let col = column.saturating_sub(1);
    // The line the error is on: its own key (whether the error points at
    // the key or into its value), and its item index when it starts one;
    // then only lines indented less than it are its parents.
    let mut limit = if skip(t) {
        col.min(ind + 1)
    } else if t.starts_with("- ") || t == "-" {
        match key_of(t) {
            Some(k) if col >= ind + 2 => segs.push(format!("{}.{k}", item_index(line - 1, ind))),
            _ => segs.push(item_index(line - 1, ind)),
        }
        ind
    } else {
        if let Some(k) = key_of(t) {
            segs.push(k);
        }
        ind
    };
    let mut i = line - 1;
    while i > 0 && limit > 0 {
        i -= 1;
        let l = lines[i];
        let t = l.trim_start();
        if skip(t) {
            continue;
        }
        let ind = indent(l);
        if ind >= limit {
            continue;
        }
        if t.starts_with("- ") || t == "-" {
            let item = item_index(i, ind);
            match key_of(t) {
                Some(k) if ind + 2 < limit => segs.push(format!("{item}.{k}")),
                _ => segs.push(item),
            }
        } else if let Some(k) = key_of(t) {
            segs.push(k);
        }
        limit = ind;
    }
    segs.reverse();
    let mut out = String::new();
    for s in segs {
        if !out.is_empty() && !s.starts_with('[') {
            out.push('.');
        }
        out.push_str(&s);
    }
    out
}

/// The key path of the mapping a "missing field" error is about: serde
/// places it at the mapping's first key, whose own name is not the place.
fn parent_path(path: &str) -> &str {
    match path.rfind(['.', '[']) {
        Some(i) if path[i..].starts_with('[') => path,
        Some(i) => &path[..i],
        None => "",
    }
}

/// The JSON Schema of the config format (`toolgate schema config`).
pub const SCHEMA: &str = include_str!("../schemas/config.schema.json");

// ---------------------------------------------------------------- specs

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigSpec {
    /// Data-plane listener (agents, MCP at `/mcp`).
    #[serde(default)]
    listen: Option<Spanned<String>>,
    /// Management-plane listener; absent means no management plane.
    #[serde(default)]
    admin: Option<AdminSpec>,
    /// Directory of agent manifests.
    #[serde(default)]
    manifests: Option<Spanned<String>>,
    /// `sqlite://PATH` for holds, approvals and grants.
    #[serde(default)]
    state: Option<Spanned<String>>,
    #[serde(default)]
    audit: Option<AuditSpec>,
    auth: Spanned<AuthSpec>,
    #[serde(default)]
    upstreams: Vec<Spanned<UpstreamSpec>>,
    #[serde(default)]
    holds: Option<HoldsSpec>,
    #[serde(default)]
    escalation: Option<EscalationSpec>,
    #[serde(default)]
    limits: Option<LimitsSpec>,
    #[serde(default)]
    alerts: Option<AlertsSpec>,
    /// Extra Host names the listeners accept (DNS-rebinding protection).
    #[serde(default)]
    allowed_hosts: Vec<String>,
    /// Browser origins allowed besides loopback ones.
    #[serde(default)]
    allowed_origins: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertsSpec {
    /// Webhook receiving every alert.
    #[serde(default)]
    url: Option<Spanned<String>>,
    #[serde(default)]
    denials: Option<DenialsSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DenialsSpec {
    #[serde(default)]
    threshold: Option<u32>,
    #[serde(default)]
    window: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminSpec {
    listen: Spanned<String>,
    /// Serve `/metrics` without a token.
    #[serde(default)]
    metrics_public: bool,
    /// Label decision metrics with agent names (bounded by the manifests).
    #[serde(default)]
    metrics_agent_labels: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditSpec {
    path: Spanned<String>,
    /// Signed checkpoints (Ed25519), so a rewritten log is detectable.
    #[serde(default)]
    checkpoint: Option<CheckpointSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointSpec {
    /// Base64 Ed25519 seed, as written by `toolgate audit keygen`.
    key_file: Spanned<String>,
    #[serde(default)]
    every: Option<u64>,
    #[serde(default)]
    interval: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthSpec {
    agents: Spanned<AgentAuthSpec>,
    #[serde(default)]
    approvers: Option<Spanned<ApproverAuthSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentAuthSpec {
    issuer: String,
    audience: String,
    #[serde(default = "default_sub")]
    agent_claim: String,
    /// Clock skew allowed on `exp`/`nbf`; at most 30s.
    #[serde(default)]
    leeway: Option<Spanned<String>>,
    keys: Spanned<Vec<Spanned<KeySpec>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproverAuthSpec {
    issuer: String,
    audience: String,
    #[serde(default = "default_sub")]
    subject_claim: String,
    #[serde(default = "default_roles")]
    roles_claim: String,
    #[serde(default)]
    require_amr: Vec<String>,
    #[serde(default)]
    leeway: Option<Spanned<String>>,
    keys: Spanned<Vec<Spanned<KeySpec>>>,
}

/// Every key or certificate file `spec` names, resolved against `base`.
fn key_files(spec: &ConfigSpec, base: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let a = &spec.auth.value;
    let approvers = a.approvers.iter().flat_map(|p| p.value.keys.value.iter());
    for k in a.agents.value.keys.value.iter().chain(approvers) {
        match &k.value {
            KeySpec::Hs256(s) => out.extend(s.secret_file.as_deref().map(|f| resolve(base, f))),
            KeySpec::Rs256(p) | KeySpec::Es256(p) => out.push(resolve(base, &p.public_key_pem)),
            KeySpec::Jwks(j) => out.push(resolve(base, &j.path)),
        }
    }
    if let Some(c) = spec.audit.as_ref().and_then(|a| a.checkpoint.as_ref()) {
        out.push(resolve(base, &c.key_file.value));
    }
    for u in &spec.upstreams {
        if let Some(t) = &u.value.tls {
            let t = &t.value;
            for f in [&t.ca_file, &t.cert_file, &t.key_file]
                .into_iter()
                .flatten()
            {
                out.push(resolve(base, &f.value));
            }
        }
    }
    out.iter().map(|p| normalize_path(p)).collect()
}

fn default_sub() -> String {
    "sub".into()
}
fn default_roles() -> String {
    "roles".into()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
enum KeySpec {
    Hs256(SecretSpec),
    Rs256(PemSpec),
    Es256(PemSpec),
    Jwks(JwksSpec),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretSpec {
    #[serde(default)]
    secret_env: Option<String>,
    #[serde(default)]
    secret_file: Option<String>,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PemSpec {
    public_key_pem: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JwksSpec {
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamSpec {
    name: Spanned<String>,
    #[serde(default)]
    url: Option<Spanned<String>>,
    #[serde(default)]
    command: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    cwd: Option<Spanned<String>>,
    #[serde(default)]
    prefix: Option<Spanned<String>>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, Spanned<String>>,
    /// TLS for an `https` url: trusted roots and the client certificate.
    #[serde(default)]
    tls: Option<Spanned<TlsSpec>>,
}

/// An `https` upstream's TLS settings. The server's certificate is always
/// verified; there is no setting to skip that.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSpec {
    /// PEM bundle of the CAs to trust, instead of the system's roots.
    #[serde(default)]
    ca_file: Option<Spanned<String>>,
    /// PEM certificate chain presented for mutual TLS (with `key_file`).
    #[serde(default)]
    cert_file: Option<Spanned<String>>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    key_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldsSpec {
    #[serde(default)]
    wait: Option<Spanned<String>>,
    #[serde(default)]
    ttl: Option<Spanned<String>>,
    #[serde(default)]
    notify: Option<NotifySpec>,
    #[serde(default)]
    max_pending_per_agent: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NotifySpec {
    url: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EscalationSpec {
    tools: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSpec {
    #[serde(default)]
    max_body: Option<Spanned<String>>,
    #[serde(default)]
    upstream_timeout: Option<Spanned<String>>,
    #[serde(default)]
    max_upstream_body: Option<Spanned<String>>,
    #[serde(default)]
    max_sessions: Option<Spanned<u32>>,
    /// How long a request body may take to arrive.
    #[serde(default)]
    body_timeout: Option<Spanned<String>>,
}

// ------------------------------------------------------------ validated

/// The validated process configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file, absolute.
    pub path: PathBuf,
    pub listen: SocketAddr,
    pub admin: Option<AdminConfig>,
    /// Manifests directory, absolute.
    pub manifests: PathBuf,
    /// The manifests directory as written: absolute, symlinks kept. Reloads
    /// read it and the watcher follows it, so a repointed symlink (a
    /// Kubernetes `..data` swap, `ln -sfn` and a rename) takes effect.
    pub manifests_as_written: PathBuf,
    /// SQLite state file, absolute.
    pub state: PathBuf,
    /// The key and certificate files the config names (hs256 `secret_file`,
    /// public keys, JWK sets, the checkpoint signing key, upstream TLS
    /// files), absolute: policy as much as the config itself, so the
    /// policy-path guard protects them (a read secret mints tokens).
    pub key_files: Vec<PathBuf>,
    /// Audit log file, absolute.
    pub audit_path: PathBuf,
    /// Signs audit checkpoints, when configured.
    pub checkpoints: Option<crate::audit::Checkpointer>,
    pub agents: AgentAuth,
    pub approvers: Option<ApproverAuth>,
    pub upstreams: Vec<UpstreamConfig>,
    pub holds: HoldsConfig,
    pub escalation: Escalation,
    pub limits: Limits,
    pub alerts: AlertsConfig,
    pub allowed_hosts: Vec<String>,
    pub allowed_origins: Vec<String>,
}

/// Where alerts go and when probing is suspected.
#[derive(Debug, Clone)]
pub struct AlertsConfig {
    pub url: Option<String>,
    pub denial_threshold: u32,
    pub denial_window: Duration,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub metrics_public: bool,
    pub metrics_agent_labels: bool,
}

/// How agent tokens are verified.
#[derive(Debug, Clone)]
pub struct AgentAuth {
    pub issuer: String,
    pub audience: String,
    pub agent_claim: String,
    pub leeway: Duration,
    pub keys: Arc<KeySet>,
}

/// How approver tokens are verified.
#[derive(Debug, Clone)]
pub struct ApproverAuth {
    pub issuer: String,
    pub audience: String,
    pub subject_claim: String,
    pub roles_claim: String,
    pub require_amr: Vec<String>,
    pub leeway: Duration,
    pub keys: Arc<KeySet>,
}

/// How toolgate reaches one tool server.
#[derive(Debug, Clone)]
pub enum Transport {
    Http {
        url: http::Uri,
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
        /// This upstream's own TLS settings (`tls:`); `None` means the
        /// shared client, which verifies against the system's roots.
        tls: Option<Arc<rustls::ClientConfig>>,
    },
    Stdio {
        command: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<PathBuf>,
    },
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    /// Prepended to the upstream's tool names to form exposed names.
    pub prefix: String,
    pub transport: Transport,
}

#[derive(Debug, Clone)]
pub struct HoldsConfig {
    pub wait: Duration,
    pub ttl: Duration,
    pub notify_url: Option<String>,
    pub max_pending_per_agent: u32,
}

/// The escalation guard's tool patterns.
#[derive(Debug, Clone)]
pub struct Escalation {
    pub patterns: Vec<String>,
    pub tools: GlobSet,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body: usize,
    pub max_upstream_body: usize,
    pub upstream_timeout: Duration,
    pub max_sessions: usize,
    pub body_timeout: Duration,
}

pub const DEFAULT_ESCALATION_TOOLS: [&str; 9] = [
    "*grant*",
    "*role*",
    "*permission*",
    "*policy*",
    "*token*",
    "*credential*",
    "*manifest*",
    "*assume*",
    "*impersonate*",
];

/// Parses a size such as `1MiB`, `512KiB`, `2MB` or `1048576`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 1MiB, 64KiB, 1000000)"))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => {
            return Err(format!(
                "unknown size unit {u:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} is out of range"))
}

/// Parses a duration such as `30s`, `15m`, `1h`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration (e.g. 500ms, 30s, 15m, 1h): {e}"))
}

/// Replaces `${env:NAME}` with the variable's value.
fn interpolate_env(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${env:") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 6..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${env:...}".to_owned())?;
        let name = &after[..end];
        let val =
            std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?;
        out.push_str(&val);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Lexically normalises `p` (`.`, `..`, repeated separators), then resolves
/// symlinks for the longest existing ancestor.
pub fn normalize_path(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    // Resolve symlinks of the longest prefix that exists.
    let mut existing = out.clone();
    let mut tail = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut r = real;
            for t in tail.iter().rev() {
                r.push(t);
            }
            return r;
        }
        match (
            existing.file_name().map(|s| s.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                tail.push(name);
                existing = parent.to_path_buf();
            }
            _ => return out,
        }
    }
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, Problems> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problems(vec![Problem {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                path: String::new(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        Self::from_yaml(path, &text)
    }

    /// Validates config `text` as if read from `path`.
    pub fn from_yaml(path: &Path, text: &str) -> Result<Config, Problems> {
        let spec: ConfigSpec = parse_yaml(path, text).map_err(|p| Problems(vec![p]))?;
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(path))
                .unwrap_or_else(|_| path.to_path_buf())
        };
        // Paths in the config are relative to the directory the config was
        // named in, not to where a symlinked config file resolves: with a
        // Kubernetes ConfigMap mount, `toolgate.yaml` -> `..data/...` ->
        // `..2026_12_01_.../toolgate.yaml`, and a directory relative to the
        // time-stamped target would vanish at the next update.
        let base = abs.parent().map(normalize_path).unwrap_or_default();
        let abs = normalize_path(&abs);
        let mut problems = Vec::new();
        let cfg = {
            let mut r = Report {
                file: path,
                problems: &mut problems,
            };
            let key_files = key_files(&spec, &base);
            build(spec, abs, &base, &mut r).map(|c| Config { key_files, ..c })
        };
        match cfg {
            Some(c) if problems.is_empty() => Ok(c),
            _ => Err(Problems(problems)),
        }
    }
}

fn addr(r: &mut Report, s: &Spanned<String>, key: &str) -> Option<SocketAddr> {
    match s.value.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            r.at(
                s,
                key,
                format!("{:?} is not an address like 127.0.0.1:8080", s.value),
            );
            None
        }
    }
}

fn duration_at(
    r: &mut Report,
    s: &Option<Spanned<String>>,
    key: &str,
    default: Duration,
) -> Duration {
    match s {
        None => default,
        Some(s) => parse_duration(&s.value).unwrap_or_else(|e| {
            r.at(s, key, e);
            default
        }),
    }
}

fn size_at(r: &mut Report, s: &Option<Spanned<String>>, key: &str, default: usize) -> usize {
    match s {
        None => default,
        Some(s) => parse_size(&s.value).unwrap_or_else(|e| {
            r.at(s, key, e);
            default
        }),
    }
}

fn leeway_at(r: &mut Report, s: &Option<Spanned<String>>, key: &str) -> Duration {
    let d = duration_at(r, s, key, Duration::from_secs(30));
    if d > Duration::from_secs(30) {
        if let Some(s) = s {
            r.at(s, key, "leeway must be at most 30s");
        }
        return Duration::from_secs(30);
    }
    d
}

fn build(spec: ConfigSpec, abs: PathBuf, base: &Path, r: &mut Report) -> Option<Config> {
    let listen = match &spec.listen {
        Some(s) => addr(r, s, "listen"),
        None => Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
    };
    let admin = spec.admin.as_ref().and_then(|a| {
        addr(r, &a.listen, "admin.listen").map(|listen| AdminConfig {
            listen,
            metrics_public: a.metrics_public,
            metrics_agent_labels: a.metrics_agent_labels,
        })
    });
    if let (Some(l), Some(a)) = (listen, &admin) {
        if l == a.listen && l.port() != 0 {
            if let Some(s) = &spec.admin {
                r.at(
                    &s.listen,
                    "admin.listen",
                    "the management plane must not share the data-plane listener",
                );
            }
        }
    }
    let manifests_as_written = resolve(
        base,
        spec.manifests
            .as_ref()
            .map_or("tool-manifests", |s| s.value.as_str()),
    );
    let manifests = normalize_path(&manifests_as_written);
    let state = match &spec.state {
        None => normalize_path(&base.join(".toolgate/state.db")),
        Some(s) => match s.value.strip_prefix("sqlite://") {
            Some(p) if !p.is_empty() => normalize_path(&resolve(base, p)),
            _ => {
                r.at(s, "state", "state must be sqlite://PATH");
                PathBuf::new()
            }
        },
    };
    let audit_path = normalize_path(&resolve(
        base,
        spec.audit
            .as_ref()
            .map_or(".toolgate/audit.jsonl", |a| a.path.value.as_str()),
    ));

    let agents = {
        let a = &spec.auth.value.agents;
        let keys = keyset(r, &a.value.keys, base, "auth.agents.keys");
        let leeway = leeway_at(r, &a.value.leeway, "auth.agents.leeway");
        if a.value.issuer.is_empty() || a.value.audience.is_empty() {
            r.at(a, "auth.agents", "issuer and audience must not be empty");
        }
        AgentAuth {
            issuer: a.value.issuer.clone(),
            audience: a.value.audience.clone(),
            agent_claim: a.value.agent_claim.clone(),
            leeway,
            keys: Arc::new(keys),
        }
    };
    let approvers = spec.auth.value.approvers.as_ref().map(|a| {
        let keys = keyset(r, &a.value.keys, base, "auth.approvers.keys");
        let leeway = leeway_at(r, &a.value.leeway, "auth.approvers.leeway");
        if a.value.audience == agents.audience && a.value.issuer == agents.issuer {
            r.at(
                a,
                "auth.approvers",
                "approver tokens need their own issuer or audience, distinct from agents' (an agent token must never work on the management plane)",
            );
        }
        ApproverAuth {
            issuer: a.value.issuer.clone(),
            audience: a.value.audience.clone(),
            subject_claim: a.value.subject_claim.clone(),
            roles_claim: a.value.roles_claim.clone(),
            require_amr: a.value.require_amr.clone(),
            leeway,
            keys: Arc::new(keys),
        }
    });
    if admin.is_some() && approvers.is_none() {
        r.at(
            &spec.auth,
            "auth.approvers",
            "admin.listen needs auth.approvers to authenticate the management plane",
        );
    }

    let upstreams = upstreams(r, &spec.upstreams, base);

    let holds = {
        let h = spec.holds.as_ref();
        let wait = duration_at(
            r,
            &h.and_then(|h| h.wait.clone()),
            "holds.wait",
            Duration::from_secs(30),
        );
        let ttl = duration_at(
            r,
            &h.and_then(|h| h.ttl.clone()),
            "holds.ttl",
            Duration::from_secs(3600),
        );
        let notify_url = h.and_then(|h| h.notify.as_ref()).and_then(|n| {
            match n.url.value.parse::<http::Uri>() {
                Ok(u) if u.scheme_str() == Some("http") || u.scheme_str() == Some("https") => {
                    Some(n.url.value.clone())
                }
                _ => {
                    r.at(&n.url, "holds.notify.url", "must be an http(s) URL");
                    None
                }
            }
        });
        let max_pending_per_agent = h
            .and_then(|h| h.max_pending_per_agent.as_ref())
            .map_or(20, |m| m.value);
        if let Some(t) = h.and_then(|h| h.ttl.as_ref()).filter(|_| ttl.is_zero()) {
            r.at(
                t,
                "holds.ttl",
                "must be longer than 0s: every hold would expire at once",
            );
        }
        if let Some(w) = h.and_then(|h| h.wait.as_ref()).filter(|_| wait > ttl) {
            r.at(
                w,
                "holds.wait",
                format!(
                    "is longer than holds.ttl ({}): a hold would expire while its call waits",
                    humantime::format_duration(ttl)
                ),
            );
        }
        if let Some(m) = h
            .and_then(|h| h.max_pending_per_agent.as_ref())
            .filter(|m| m.value == 0)
        {
            r.at(
                m,
                "holds.max_pending_per_agent",
                "must be at least 1: no call could be held",
            );
        }
        HoldsConfig {
            wait,
            ttl,
            notify_url,
            max_pending_per_agent,
        }
    };

    let escalation = {
        let patterns: Vec<Spanned<String>> = match &spec.escalation {
            Some(e) => e.tools.clone(),
            None => DEFAULT_ESCALATION_TOOLS
                .iter()
                .map(|s| Spanned {
                    value: (*s).to_owned(),
                    referenced: serde_saphyr::Location::UNKNOWN,
                    defined: serde_saphyr::Location::UNKNOWN,
                })
                .collect(),
        };
        let mut b = GlobSetBuilder::new();
        for (i, p) in patterns.iter().enumerate() {
            match escalation_glob(&p.value) {
                Ok(g) => {
                    b.add(g);
                }
                Err(e) => r.at(p, format!("escalation.tools[{i}]"), e),
            }
        }
        Escalation {
            patterns: patterns.into_iter().map(|p| p.value).collect(),
            tools: b.build().unwrap_or_else(|_| GlobSet::empty()),
        }
    };

    let l = spec.limits.as_ref();
    let limits = Limits {
        max_body: size_at(
            r,
            &l.and_then(|l| l.max_body.clone()),
            "limits.max_body",
            1 << 20,
        ),
        max_upstream_body: size_at(
            r,
            &l.and_then(|l| l.max_upstream_body.clone()),
            "limits.max_upstream_body",
            16 << 20,
        ),
        upstream_timeout: duration_at(
            r,
            &l.and_then(|l| l.upstream_timeout.clone()),
            "limits.upstream_timeout",
            Duration::from_secs(30),
        ),
        max_sessions: l
            .and_then(|l| l.max_sessions.as_ref())
            .map_or(10_000, |m| m.value as usize),
        body_timeout: duration_at(
            r,
            &l.and_then(|l| l.body_timeout.clone()),
            "limits.body_timeout",
            Duration::from_secs(10),
        ),
    };
    if let Some(l) = l {
        let zero = [
            (&l.max_body, "limits.max_body", limits.max_body == 0),
            (
                &l.max_upstream_body,
                "limits.max_upstream_body",
                limits.max_upstream_body == 0,
            ),
            (
                &l.upstream_timeout,
                "limits.upstream_timeout",
                limits.upstream_timeout.is_zero(),
            ),
            (
                &l.body_timeout,
                "limits.body_timeout",
                limits.body_timeout.is_zero(),
            ),
        ];
        for (span, key, is_zero) in zero {
            if let Some(s) = span.as_ref().filter(|_| is_zero) {
                r.at(s, key, "must be more than 0: every request would fail");
            }
        }
        if let Some(m) = l.max_sessions.as_ref().filter(|m| m.value == 0) {
            r.at(
                m,
                "limits.max_sessions",
                "must be at least 1: no session could open",
            );
        }
    }

    let alerts = {
        let a = spec.alerts.as_ref();
        let url = a
            .and_then(|a| a.url.as_ref())
            .and_then(|u| match u.value.parse::<http::Uri>() {
                Ok(p) if matches!(p.scheme_str(), Some("http" | "https")) => Some(u.value.clone()),
                _ => {
                    r.at(u, "alerts.url", "must be an http(s) URL");
                    None
                }
            });
        let d = a.and_then(|a| a.denials.as_ref());
        AlertsConfig {
            url,
            denial_threshold: d.and_then(|d| d.threshold).unwrap_or(20).max(1),
            denial_window: duration_at(
                r,
                &d.and_then(|d| d.window.clone()),
                "alerts.denials.window",
                Duration::from_secs(60),
            ),
        }
    };

    let checkpoints = spec
        .audit
        .as_ref()
        .and_then(|a| a.checkpoint.as_ref())
        .and_then(|c| {
            let key = crate::audit::Checkpointer::load_key(&resolve(base, &c.key_file.value))
                .map_err(|e| r.at(&c.key_file, "audit.checkpoint.key_file", e))
                .ok()?;
            let interval = duration_at(
                r,
                &c.interval,
                "audit.checkpoint.interval",
                Duration::from_secs(60),
            );
            Some(crate::audit::Checkpointer::new(
                key,
                c.every.unwrap_or(1000),
                interval,
            ))
        });

    Some(Config {
        checkpoints,
        allowed_hosts: spec.allowed_hosts.clone(),
        allowed_origins: spec.allowed_origins.clone(),
        alerts,
        path: abs,
        listen: listen?,
        admin,
        manifests,
        manifests_as_written,
        state,
        key_files: Vec::new(),
        audit_path,
        agents,
        approvers,
        upstreams,
        holds,
        escalation,
        limits,
    })
}

/// Compiles a tool-name glob: `*` and `?` over exposed names, nothing else
/// special (no character classes, no alternation, `/` is an ordinary char).
pub fn tool_glob(pattern: &str) -> Result<Glob, String> {
    literal_glob(pattern, false, false)
}

/// An `escalation.tools` pattern: like [`tool_glob`], but case-insensitive.
/// The guard errs towards holding: `*grant*` must catch an upstream's
/// `GrantRole` as surely as `grant_role`.
pub fn escalation_glob(pattern: &str) -> Result<Glob, String> {
    literal_glob(pattern, false, true)
}

/// A resource URI pattern: like [`tool_glob`], but `*` and `?` stay within
/// one `/`-separated segment and `**` spans segments.
pub fn uri_glob(pattern: &str) -> Result<Glob, String> {
    literal_glob(pattern, true, false)
}

fn literal_glob(pattern: &str, segments: bool, any_case: bool) -> Result<Glob, String> {
    if pattern.is_empty() {
        return Err("an empty pattern matches nothing".into());
    }
    let mut escaped = String::with_capacity(pattern.len());
    for c in pattern.chars() {
        match c {
            '*' | '?' => escaped.push(c),
            '[' | ']' | '{' | '}' | '\\' | '!' => {
                escaped.push('[');
                escaped.push(c);
                escaped.push(']');
            }
            c => escaped.push(c),
        }
    }
    globset::GlobBuilder::new(&escaped)
        .literal_separator(segments)
        .case_insensitive(any_case)
        .backslash_escape(false)
        .build()
        .map_err(|e| format!("invalid pattern {pattern:?}: {e}"))
}

fn keyset(
    r: &mut Report,
    keys: &Spanned<Vec<Spanned<KeySpec>>>,
    base: &Path,
    path: &str,
) -> KeySet {
    let mut out = Vec::new();
    if keys.value.is_empty() {
        r.at(keys, path, "at least one key is required");
    }
    for (i, k) in keys.value.iter().enumerate() {
        let p = format!("{path}[{i}]");
        match load_key(&k.value, base) {
            Ok(mut entries) => out.append(&mut entries),
            Err(e) => r.at(k, p, e),
        }
    }
    KeySet::new(out)
}

fn load_key(k: &KeySpec, base: &Path) -> Result<Vec<KeyEntry>, String> {
    use jsonwebtoken::{Algorithm, DecodingKey};
    match k {
        KeySpec::Hs256(s) => {
            let secret = match (&s.secret_env, &s.secret_file) {
                (Some(env), None) => std::env::var(env)
                    .map_err(|_| format!("hs256: environment variable {env} is not set"))?
                    .into_bytes(),
                (None, Some(f)) => {
                    let p = resolve(base, f);
                    let mut b = std::fs::read(&p)
                        .map_err(|e| format!("hs256: cannot read {}: {e}", p.display()))?;
                    while b.last().is_some_and(|c| c.is_ascii_whitespace()) {
                        b.pop();
                    }
                    b
                }
                _ => return Err("hs256 needs exactly one of secret_env or secret_file".into()),
            };
            if secret.len() < 32 {
                return Err(format!(
                    "hs256 secret is {} bytes; at least 32 are required",
                    secret.len()
                ));
            }
            Ok(vec![KeyEntry::hmac(s.kid.clone(), secret)])
        }
        KeySpec::Rs256(p) | KeySpec::Es256(p) => {
            let (alg, what) = match k {
                KeySpec::Rs256(_) => (Algorithm::RS256, "rs256"),
                _ => (Algorithm::ES256, "es256"),
            };
            let path = resolve(base, &p.public_key_pem);
            let pem = std::fs::read(&path)
                .map_err(|e| format!("{what}: cannot read {}: {e}", path.display()))?;
            let key = match alg {
                Algorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
                _ => DecodingKey::from_ec_pem(&pem),
            }
            .map_err(|e| format!("{what}: {} is not a PEM public key: {e}", path.display()))?;
            Ok(vec![KeyEntry::public(p.kid.clone(), alg, key)])
        }
        KeySpec::Jwks(j) => {
            let path = resolve(base, &j.path);
            let text = std::fs::read(&path)
                .map_err(|e| format!("jwks: cannot read {}: {e}", path.display()))?;
            let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&text)
                .map_err(|e| format!("jwks: {} is not a JWK set: {e}", path.display()))?;
            let mut out = Vec::new();
            for (i, jwk) in set.keys.iter().enumerate() {
                let kid = jwk
                    .common
                    .key_id
                    .clone()
                    .ok_or_else(|| format!("jwks: key {i} has no kid"))?;
                let alg = jwk_alg(jwk).ok_or_else(|| {
                    format!(
                        "jwks: key {kid:?} needs an alg of RS256 or ES256 (or an RSA / P-256 key)"
                    )
                })?;
                let key =
                    DecodingKey::from_jwk(jwk).map_err(|e| format!("jwks: key {kid:?}: {e}"))?;
                out.push(KeyEntry::public(Some(kid), alg, key));
            }
            if out.is_empty() {
                return Err("jwks: the set has no keys".into());
            }
            Ok(out)
        }
    }
}

fn jwk_alg(jwk: &jsonwebtoken::jwk::Jwk) -> Option<jsonwebtoken::Algorithm> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, KeyAlgorithm};
    use jsonwebtoken::Algorithm;
    let declared = jwk.common.key_algorithm;
    let inferred = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Some(Algorithm::ES256)
        }
        _ => None,
    };
    match declared {
        None => inferred,
        Some(KeyAlgorithm::RS256) if inferred == Some(Algorithm::RS256) => inferred,
        Some(KeyAlgorithm::ES256) if inferred == Some(Algorithm::ES256) => inferred,
        Some(_) => None,
    }
}

/// An upstream's `tls:` block as a client config, each problem located at
/// its key. Without the block, an `https` upstream uses the system's roots,
/// so an empty system store is a problem here rather than a failed call.
fn upstream_tls(
    r: &mut Report,
    key: &str,
    spec: Option<&Spanned<TlsSpec>>,
    url: &Spanned<String>,
    https: bool,
    base: &Path,
) -> Option<Arc<rustls::ClientConfig>> {
    use crate::upstream::tls::{client_config, system_roots, TlsField};
    let Some(spec) = spec else {
        if https && system_roots().is_empty() {
            r.at(
                url,
                format!("{key}.url"),
                "no CA certificates found in the system store; set tls.ca_file",
            );
        }
        return None;
    };
    let t = &spec.value;
    if !https {
        r.at(spec, format!("{key}.tls"), "tls applies to an https url");
        return None;
    }
    let identity = match (&t.cert_file, &t.key_file) {
        (Some(c), Some(k)) => Some((resolve(base, &c.value), resolve(base, &k.value))),
        (None, None) => None,
        (Some(c), None) => {
            r.at(
                c,
                format!("{key}.tls.cert_file"),
                "cert_file needs key_file",
            );
            return None;
        }
        (None, Some(k)) => {
            r.at(k, format!("{key}.tls.key_file"), "key_file needs cert_file");
            return None;
        }
    };
    if t.ca_file.is_none() && system_roots().is_empty() {
        r.at(
            spec,
            format!("{key}.tls"),
            "no CA certificates found in the system store; set ca_file",
        );
        return None;
    }
    let ca = t.ca_file.as_ref().map(|c| resolve(base, &c.value));
    let identity_ref = identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
    match client_config(ca.as_deref(), identity_ref) {
        Ok(c) => Some(Arc::new(c)),
        Err(e) => {
            let (field, at) = match e.field {
                TlsField::CaFile => ("ca_file", t.ca_file.as_ref()),
                TlsField::CertFile => ("cert_file", t.cert_file.as_ref()),
                TlsField::KeyFile => ("key_file", t.key_file.as_ref()),
            };
            match at {
                Some(at) => r.at(at, format!("{key}.tls.{field}"), e.message),
                None => r.at(spec, format!("{key}.tls"), e.message),
            }
            None
        }
    }
}

fn upstreams(r: &mut Report, specs: &[Spanned<UpstreamSpec>], base: &Path) -> Vec<UpstreamConfig> {
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    let mut prefixes: Vec<(String, String)> = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let key = format!("upstreams[{i}]");
        let u = &s.value;
        let name = &u.name.value;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            r.at(
                &u.name,
                format!("{key}.name"),
                "names use letters, digits, '-' and '_'",
            );
        }
        if !names.insert(name.clone()) {
            r.at(
                &u.name,
                format!("{key}.name"),
                format!("upstream {name:?} is defined twice"),
            );
        }
        let prefix = u
            .prefix
            .as_ref()
            .map_or_else(|| format!("{name}__"), |p| p.value.clone());
        for (other, op) in &prefixes {
            let clash = if prefix.is_empty() || op.is_empty() {
                true
            } else {
                prefix.starts_with(op.as_str()) || op.starts_with(prefix.as_str())
            };
            if clash {
                let at = u
                    .prefix
                    .as_ref()
                    .map_or((s.referenced.line(), s.referenced.column()), |p| {
                        (p.referenced.line(), p.referenced.column())
                    });
                r.at_loc(
                    at.0,
                    at.1,
                    format!("{key}.prefix"),
                    format!(
                        "prefix {prefix:?} can collide with upstream {other:?}'s prefix {op:?}: exposed tool names must be unambiguous"
                    ),
                );
            }
        }
        prefixes.push((name.clone(), prefix.clone()));
        let transport = match (&u.url, &u.command) {
            (Some(url), None) => {
                let uri = match url.value.parse::<http::Uri>() {
                    Ok(uri)
                        if matches!(uri.scheme_str(), Some("http" | "https"))
                            && uri.host().is_some() =>
                    {
                        Some(uri)
                    }
                    _ => {
                        r.at(
                            url,
                            format!("{key}.url"),
                            format!("{:?} is not an http(s) URL", url.value),
                        );
                        None
                    }
                };
                if let Some((ek, ev)) = u.env.iter().next() {
                    r.at(
                        ev,
                        format!("{key}.env.{ek}"),
                        "env applies to command upstreams; give a url upstream its settings with headers",
                    );
                }
                if let Some(c) = &u.cwd {
                    r.at(c, format!("{key}.cwd"), "cwd applies to command upstreams");
                }
                let https = uri
                    .as_ref()
                    .is_some_and(|u| u.scheme_str() == Some("https"));
                let tls = upstream_tls(r, &key, u.tls.as_ref(), url, https, base);
                let mut headers = Vec::new();
                for (hk, hv) in &u.headers {
                    let hname = match http::HeaderName::try_from(hk.as_str()) {
                        Ok(n) => n,
                        Err(_) => {
                            r.at(hv, format!("{key}.headers.{hk}"), "invalid header name");
                            continue;
                        }
                    };
                    if matches!(
                        hname.as_str(),
                        "host"
                            | "content-length"
                            | "transfer-encoding"
                            | "connection"
                            | "mcp-session-id"
                            | "mcp-protocol-version"
                    ) {
                        r.at(
                            hv,
                            format!("{key}.headers.{hk}"),
                            "this header is managed by toolgate",
                        );
                        continue;
                    }
                    match interpolate_env(&hv.value) {
                        Ok(v) => match http::HeaderValue::try_from(v) {
                            Ok(mut v) => {
                                v.set_sensitive(true);
                                headers.push((hname, v));
                            }
                            Err(_) => {
                                r.at(hv, format!("{key}.headers.{hk}"), "invalid header value")
                            }
                        },
                        Err(e) => r.at(hv, format!("{key}.headers.{hk}"), e),
                    }
                }
                uri.map(|url| Transport::Http { url, headers, tls })
            }
            (None, Some(cmd)) => {
                if cmd.value.is_empty() {
                    r.at(
                        cmd,
                        format!("{key}.command"),
                        "command needs at least the program",
                    );
                    None
                } else {
                    if let Some((hk, hv)) = u.headers.iter().next() {
                        r.at(
                            hv,
                            format!("{key}.headers.{hk}"),
                            "headers apply to url upstreams; give a stdio server its settings with env",
                        );
                    }
                    if let Some(t) = &u.tls {
                        r.at(t, format!("{key}.tls"), "tls applies to an https url");
                    }
                    let mut env = Vec::new();
                    for (ek, ev) in &u.env {
                        if ek.is_empty() || ek.contains('=') || ek.contains('\0') {
                            r.at(ev, format!("{key}.env.{ek}"), "invalid variable name");
                            continue;
                        }
                        match interpolate_env(&ev.value) {
                            Ok(v) if v.contains('\0') => {
                                r.at(ev, format!("{key}.env.{ek}"), "a value may not contain NUL")
                            }
                            Ok(v) => env.push((ek.clone(), v)),
                            Err(e) => r.at(ev, format!("{key}.env.{ek}"), e),
                        }
                    }
                    let mut command = cmd.value.clone();
                    // A program given as a relative path is relative to the
                    // config file, like every other path in it; a bare name
                    // is looked up in PATH.
                    if command[0].contains('/') {
                        command[0] = resolve(base, &command[0]).display().to_string();
                    }
                    Some(Transport::Stdio {
                        command,
                        env,
                        cwd: u.cwd.as_ref().map(|c| resolve(base, &c.value)),
                    })
                }
            }
            _ => {
                r.at(s, &key, "an upstream needs exactly one of url or command");
                None
            }
        };
        if let Some(transport) = transport {
            out.push(UpstreamConfig {
                name: name.clone(),
                prefix,
                transport,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, Problems> {
        std::env::set_var("TG_TEST_SECRET", "0123456789abcdef0123456789abcdef");
        Config::from_yaml(Path::new("/tmp/tg/toolgate.yaml"), text)
    }

    const MIN: &str = "auth:\n  agents:\n    issuer: i\n    audience: a\n    keys:\n      - hs256: { secret_env: TG_TEST_SECRET }\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = load(MIN).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.manifests, Path::new("/tmp/tg/tool-manifests"));
        assert_eq!(c.limits.max_body, 1 << 20);
        assert_eq!(c.holds.wait, Duration::from_secs(30));
        assert_eq!(c.escalation.patterns.len(), 9);
        assert!(c.escalation.tools.is_match("iam__grant_role"));
        assert!(!c.escalation.tools.is_match("billing__get_invoice"));
        for camel in [
            "iam__GrantRole",
            "aws__AssumeRole",
            "iam__PutRolePolicy",
            "X__TOKEN",
        ] {
            assert!(
                c.escalation.tools.is_match(camel),
                "{camel}: any case is guarded"
            );
        }
    }

    #[test]
    fn reports_every_problem_with_line_column_and_key_path() {
        let text = "listen: nowhere\nauth:\n  agents:\n    issuer: i\n    audience: a\n    leeway: 90s\n    keys:\n      - hs256: { secret_env: TG_NOT_SET_ANYWHERE }\nupstreams:\n  - name: billing\n    url: ftp://x\n  - name: billing\n    url: http://127.0.0.1:1/mcp\nlimits:\n  max_body: 12 parsecs\n";
        let e = load(text).unwrap_err();
        let msgs: Vec<String> = e.0.iter().map(|p| p.to_string()).collect();
        let all = msgs.join("\n");
        assert!(all.contains("toolgate.yaml:1:9: listen:"), "{all}");
        assert!(
            all.contains(":6:13: auth.agents.leeway: leeway must be at most 30s"),
            "{all}"
        );
        assert!(
            all.contains(
                "auth.agents.keys[0]: hs256: environment variable TG_NOT_SET_ANYWHERE is not set"
            ),
            "{all}"
        );
        assert!(all.contains(":11:10: upstreams[0].url"), "{all}");
        assert!(
            all.contains(":12:11: upstreams[1].name: upstream \"billing\" is defined twice"),
            "{all}"
        );
        assert!(all.contains("upstreams[1].prefix"), "{all}");
        assert!(all.contains(":15:13: limits.max_body"), "{all}");
        assert_eq!(e.0.len(), 7, "{all}");
    }

    #[test]
    fn stdio_upstreams_resolve_paths_and_check_env() {
        let c = load(&format!("{MIN}upstreams:\n  - name: fs\n    command: [bin/server, --root, data]\n    cwd: work\n    env: {{ ROOT: \"${{env:TG_TEST_SECRET}}\" }}\n  - name: time\n    command: [mcp-server-time]\n")).unwrap();
        let Transport::Stdio { command, env, cwd } = &c.upstreams[0].transport else {
            panic!("not stdio");
        };
        assert_eq!(command[0], "/tmp/tg/bin/server", "relative to the config");
        assert_eq!(command[2], "data", "arguments are left alone");
        assert_eq!(cwd.as_deref(), Some(Path::new("/tmp/tg/work")));
        assert_eq!(env[0].1, "0123456789abcdef0123456789abcdef");
        let Transport::Stdio { command, .. } = &c.upstreams[1].transport else {
            panic!("not stdio");
        };
        assert_eq!(
            command[0], "mcp-server-time",
            "bare names are looked up in PATH"
        );
        let e = load(&format!("{MIN}upstreams:\n  - name: fs\n    command: []\n  - name: t\n    command: [x]\n    headers: {{ A: b }}\n    env: {{ K: \"${{env:TG_NOT_SET_ANYWHERE}}\" }}\n  - name: both\n    command: [x]\n    url: http://127.0.0.1:1/mcp\n")).unwrap_err();
        let all = e.to_string();
        assert!(
            all.contains("upstreams[0].command: command needs at least the program"),
            "{all}"
        );
        assert!(
            all.contains("upstreams[1].headers.A: headers apply to url upstreams"),
            "{all}"
        );
        assert!(all.contains("upstreams[1].env.K"), "{all}");
        assert!(
            all.contains("upstreams[2]: an upstream needs exactly one of url or command"),
            "{all}"
        );
        assert_eq!(e.0.len(), 4, "{all}");
    }

    #[test]
    fn paths_are_relative_to_where_a_symlinked_config_is_named() {
        // A ConfigMap volume: the file is a link into a time-stamped dir.
        let d = crate::scratch::Scratch::new("config-link").unwrap();
        std::fs::create_dir_all(d.join("..2026_12_01/tool-manifests")).unwrap();
        std::os::unix::fs::symlink("..2026_12_01", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/tool-manifests", d.join("tool-manifests")).unwrap();
        std::fs::write(d.join("..data/toolgate.yaml"), MIN).unwrap();
        std::os::unix::fs::symlink("..data/toolgate.yaml", d.join("toolgate.yaml")).unwrap();
        std::env::set_var("TG_TEST_SECRET", "0123456789abcdef0123456789abcdef");
        let c = Config::load(&d.join("toolgate.yaml")).unwrap();
        let root = d.canonicalize().unwrap();
        assert_eq!(c.manifests_as_written, root.join("tool-manifests"));
        assert_eq!(c.state, root.join(".toolgate/state.db"));
        assert_eq!(
            c.path,
            root.join("..2026_12_01/toolgate.yaml"),
            "the file itself, resolved"
        );
    }

    #[test]
    fn limits_that_would_refuse_everything_are_refused() {
        let e = load(&format!("{MIN}holds:\n  wait: 2h\n  ttl: 1h\n  max_pending_per_agent: 0\nlimits:\n  max_body: 0B\n  upstream_timeout: 0s\n  body_timeout: 0s\n  max_sessions: 0\n")).unwrap_err();
        let all = e.to_string();
        assert!(
            all.contains(":8:9: holds.wait: is longer than holds.ttl (1h)"),
            "{all}"
        );
        assert!(
            all.contains("holds.max_pending_per_agent: must be at least 1"),
            "{all}"
        );
        assert!(
            all.contains("limits.max_body: \"0B\" is out of range"),
            "{all}"
        );
        for key in ["limits.upstream_timeout", "limits.body_timeout"] {
            assert!(
                all.contains(&format!("{key}: must be more than 0")),
                "{key}: {all}"
            );
        }
        assert!(
            all.contains("limits.max_sessions: must be at least 1"),
            "{all}"
        );
        assert_eq!(e.0.len(), 6, "{all}");
        let e = load(&format!("{MIN}holds:\n  wait: 0s\n  ttl: 0s\n")).unwrap_err();
        assert!(
            e.to_string().contains("holds.ttl: must be longer than 0s"),
            "{e}"
        );
        assert!(load(&format!("{MIN}holds:\n  wait: 1h\n  ttl: 1h\n")).is_ok());
    }

    #[test]
    fn https_upstreams_check_their_tls_settings_where_they_are_written() {
        let dir = crate::scratch::Scratch::new("config-tls").unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.join("client.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.join("client.key"), ca.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("empty.pem"), "").unwrap();
        let load_in = |text: String| {
            std::env::set_var("TG_TEST_SECRET", "0123456789abcdef0123456789abcdef");
            Config::from_yaml(&dir.join("toolgate.yaml"), &text)
        };
        let c = load_in(format!("{MIN}upstreams:\n  - name: a\n    url: https://tools.internal/mcp\n    tls: {{ ca_file: ca.pem, cert_file: client.pem, key_file: client.key }}\n  - name: b\n    url: https://other.internal/mcp\n")).unwrap();
        let Transport::Http { tls, url, .. } = &c.upstreams[0].transport else {
            panic!("not http");
        };
        assert!(tls.is_some());
        assert_eq!(url.scheme_str(), Some("https"));
        let Transport::Http { tls, .. } = &c.upstreams[1].transport else {
            panic!("not http");
        };
        assert!(tls.is_none(), "no block: the shared client, system roots");

        let e = load_in(format!("{MIN}upstreams:\n  - name: a\n    url: http://127.0.0.1:1/mcp\n    tls: {{ ca_file: ca.pem }}\n  - name: b\n    url: https://x.internal/mcp\n    tls: {{ ca_file: empty.pem }}\n  - name: c\n    url: https://x.internal/mcp\n    tls: {{ cert_file: client.pem }}\n  - name: d\n    url: https://x.internal/mcp\n    tls: {{ ca_file: ca.pem, cert_file: client.pem, key_file: ca.pem }}\n  - name: e\n    command: [x]\n    tls: {{ ca_file: ca.pem }}\n  - name: g\n    url: http://127.0.0.1:1/mcp\n    env: {{ A: b }}\n    cwd: work\n")).unwrap_err();
        let all = e.to_string();
        assert!(
            all.contains(":10:10: upstreams[0].tls: tls applies to an https url"),
            "{all}"
        );
        assert!(all.contains(":13:21: upstreams[1].tls.ca_file:"), "{all}");
        assert!(all.contains("empty.pem holds no PEM certificate"), "{all}");
        assert!(
            all.contains(":16:23: upstreams[2].tls.cert_file: cert_file needs key_file"),
            "{all}"
        );
        assert!(all.contains(":19:62: upstreams[3].tls.key_file:"), "{all}");
        assert!(all.contains("no usable private key"), "{all}");
        assert!(
            all.contains("upstreams[4].tls: tls applies to an https url"),
            "{all}"
        );
        assert!(
            all.contains("upstreams[5].env.A: env applies to command upstreams"),
            "{all}"
        );
        assert!(
            all.contains(":26:10: upstreams[5].cwd: cwd applies to command upstreams"),
            "{all}"
        );
        assert_eq!(e.0.len(), 7, "{all}");
        // No setting turns verification off.
        let e = load_in(format!("{MIN}upstreams:\n  - name: f\n    url: https://x.internal/mcp\n    tls: {{ verify: false }}\n")).unwrap_err();
        assert!(
            e.to_string()
                .contains(":10:12: upstreams[0].tls: unknown field `verify`"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_duplicate_keys_are_refused_with_location() {
        let e = load(&format!("{MIN}listne: 1\n")).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].line, 7, "{}", e);
        assert!(e.0[0].message.contains("listne"), "{e}");
        let e = load(&format!("{MIN}listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n")).unwrap_err();
        assert!(e.to_string().to_lowercase().contains("duplicate"), "{e}");
    }

    #[test]
    fn short_hmac_secrets_and_shared_admin_listener_are_refused() {
        std::env::set_var("TG_SHORT", "short");
        let e = load("listen: 127.0.0.1:9\nadmin: { listen: 127.0.0.1:9 }\nauth:\n  agents: { issuer: i, audience: a, keys: [ { hs256: { secret_env: TG_SHORT } } ] }\n  approvers: { issuer: i, audience: a, keys: [ { hs256: { secret_env: TG_TEST_SECRET } } ] }\n").unwrap_err();
        let all = e.to_string();
        assert!(all.contains("at least 32"), "{all}");
        assert!(
            all.contains("must not share the data-plane listener"),
            "{all}"
        );
        assert!(all.contains("distinct from agents'"), "{all}");
    }

    #[test]
    fn key_paths_are_read_from_block_structure() {
        let y = "auth:\n  agents:\n    keys:\n      - hs256: {}\n      - rs256:\n          public_key_pem: x\ntools:\n  - name: a\n  - name: b\n    argumets: {}\n";
        assert_eq!(key_path_at(y, 2, 3), "auth.agents");
        assert_eq!(
            key_path_at(y, 6, 11),
            "auth.agents.keys[1].rs256.public_key_pem"
        );
        assert_eq!(key_path_at(y, 10, 5), "tools[1].argumets");
        assert_eq!(key_path_at(y, 1, 1), "auth");
        // An error in a key's value names that key, never a sibling.
        let y = "limits:\n  max_body: 1MiB\n  max_sessions: lots\nupstreams:\n  - name: a\n    url: http://x\n  - name: b\n    command: cat\n    tls: { verify: false }\n";
        assert_eq!(key_path_at(y, 3, 17), "limits.max_sessions");
        assert_eq!(key_path_at(y, 8, 14), "upstreams[1].command");
        assert_eq!(key_path_at(y, 9, 12), "upstreams[1].tls");
        assert_eq!(key_path_at(y, 7, 11), "upstreams[1].name");
        assert_eq!(key_path_at(y, 7, 3), "upstreams[1]");
        assert_eq!(parent_path("upstreams[1].name"), "upstreams[1]");
        assert_eq!(parent_path("listen"), "");
        assert_eq!(parent_path("tools[0]"), "tools[0]");
    }

    #[test]
    fn hs256_secrets_can_come_from_a_file() {
        let d = crate::scratch::Scratch::new("secret").unwrap();
        std::fs::write(
            d.join("agent.key"),
            "file-secret-0123456789abcdef0123456789\n",
        )
        .unwrap();
        let text = "auth:\n  agents:\n    issuer: i\n    audience: a\n    keys:\n      - hs256: { secret_file: agent.key, kid: k1 }\n";
        let c = Config::from_yaml(&d.join("toolgate.yaml"), text).unwrap();
        let (kid, secret) = c.agents.keys.hmac_key().unwrap();
        assert_eq!(
            (kid, secret),
            (Some("k1"), &b"file-secret-0123456789abcdef0123456789"[..]),
            "trailing newline trimmed"
        );
        let e = Config::from_yaml(
            &d.join("toolgate.yaml"),
            &text.replace("agent.key", "missing.key"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("hs256: cannot read"), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1 furlong").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn tool_globs_treat_brackets_literally() {
        let g = tool_glob("a[b]*").unwrap().compile_matcher();
        assert!(g.is_match("a[b]c"));
        assert!(!g.is_match("abc"));
        let g = tool_glob("fs__*").unwrap().compile_matcher();
        assert!(g.is_match("fs__read/x"));
    }

    #[test]
    fn normalize_resolves_dots_and_symlinks() {
        let d = crate::scratch::Scratch::new("norm").unwrap();
        std::fs::create_dir_all(d.join("real")).unwrap();
        let link = d.join("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(d.join("real"), &link).unwrap();
        let real = d.join("real").canonicalize().unwrap();
        assert_eq!(
            normalize_path(&d.join("link/x/../y.txt")),
            real.join("y.txt")
        );
        assert_eq!(normalize_path(&d.join("./real//./z")), real.join("z"));
    }
}
