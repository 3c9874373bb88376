//! Per-agent manifests: parse, validate, compile; the [`PolicySet`] snapshot.
//!
//! A manifest is compiled once at load: tool globs into one `GlobSet`, every
//! argument schema into a `jsonschema::Validator`, rates into quotas. The
//! decision path only reads compiled values. A set is all or nothing: one
//! broken file rejects the whole set, with every problem located.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use globset::{GlobSet, GlobSetBuilder};
use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};

use crate::config::{parse_yaml, tool_glob, Problem, Problems, Report};

/// The JSON Schema of the manifest format (`toolgate schema manifest`).
pub const SCHEMA: &str = include_str!("../schemas/manifest.schema.json");

// ---------------------------------------------------------------- specs

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestSpec {
    /// The `agent_claim` value this manifest governs.
    agent: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    /// Whole-agent rate limit.
    #[serde(default)]
    rate_limit: Option<Spanned<RateSpec>>,
    /// `deny` (default) or `hold` for tools not listed.
    #[serde(default)]
    unlisted: Option<Spanned<String>>,
    #[serde(default)]
    tools: Vec<Spanned<ToolSpec>>,
    #[serde(default)]
    deny: Vec<Spanned<DenySpec>>,
    /// URI globs of the resources the agent may list and read.
    #[serde(default)]
    resources: Vec<Spanned<String>>,
    /// Exposed names (globs) of the prompts the agent may list and get.
    #[serde(default)]
    prompts: Vec<Spanned<String>>,
}

/// `120/min`, or `{ rate: 120/min, burst: 20 }`.
#[derive(Debug, Clone)]
enum RateSpec {
    Simple(String),
    Full { rate: String, burst: u32 },
}

/// The map form, as strict as every other manifest key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateFullSpec {
    rate: String,
    burst: u32,
}

impl<'de> Deserialize<'de> for RateSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RateSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a rate like 120/min, or { rate: 120/min, burst: 20 }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RateSpec, E> {
                Ok(RateSpec::Simple(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RateSpec, A::Error> {
                let f =
                    RateFullSpec::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RateSpec::Full {
                    rate: f.rate,
                    burst: f.burst,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolSpec {
    name: Spanned<String>,
    /// Free text for humans; not used in decisions.
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default)]
    arguments: Option<Spanned<Value>>,
    #[serde(default)]
    rate_limit: Option<Spanned<RateSpec>>,
    /// `required` holds every call.
    #[serde(default)]
    approval: Option<Spanned<String>>,
    /// Distinct approvers needed (default 1).
    #[serde(default)]
    approvals: Option<Spanned<u32>>,
    #[serde(default)]
    hold_when: Vec<Spanned<ConditionSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConditionSpec {
    pointer: String,
    #[serde(default)]
    equals: Option<Value>,
    #[serde(default, rename = "in")]
    in_: Option<Vec<Value>>,
    #[serde(default)]
    prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DenySpec {
    name: Spanned<String>,
    #[serde(default)]
    reason: Option<String>,
}

// ------------------------------------------------------------ compiled

/// A rate: `burst` calls at once, refilled evenly over `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub burst: NonZeroU32,
    /// Time to refill one call.
    pub interval: Duration,
}

impl Rate {
    pub fn quota(&self) -> governor::Quota {
        governor::Quota::with_period(self.interval)
            .expect("interval is non-zero by construction")
            .allow_burst(self.burst)
    }
}

/// Parses `N/s`, `N/min` or `N/hour` (burst N, even refill).
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let err = || format!("{s:?} is not a rate like 10/s, 120/min or 1000/hour");
    let (n, unit) = s.trim().split_once('/').ok_or_else(err)?;
    let n: u32 = n.trim().parse().map_err(|_| err())?;
    let n = NonZeroU32::new(n).ok_or_else(|| format!("{s:?}: a rate must be at least 1"))?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return Err(err()),
    };
    let interval = per / n.get();
    if interval.is_zero() {
        return Err(format!("{s:?} is too fast"));
    }
    Ok(Rate { burst: n, interval })
}

fn rate_of(r: &mut Report, spec: &Spanned<RateSpec>, key: &str) -> Option<Rate> {
    let res = match &spec.value {
        RateSpec::Simple(s) => parse_rate(s),
        RateSpec::Full { rate, burst } => parse_rate(rate).and_then(|mut q| {
            q.burst = NonZeroU32::new(*burst).ok_or("burst must be at least 1")?;
            Ok(q)
        }),
    };
    res.map_err(|e| r.at(spec, key, e)).ok()
}

/// What to do with a call to a tool the manifest does not list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unlisted {
    Deny,
    Hold,
}

/// A `hold_when` condition on one argument.
#[derive(Debug, Clone)]
pub struct Condition {
    pub pointer: String,
    /// Line of the condition in its manifest.
    pub line: u64,
    pub test: Test,
}

#[derive(Debug, Clone)]
pub enum Test {
    Equals(Expected),
    In(Vec<Expected>),
    Prefix(String),
}

/// A value of `equals` or `in`, with its folded form (see
/// [`crate::policy::fold_loose`]) when it is a string without `${agent}`:
/// folded once here, not on every call.
#[derive(Debug, Clone)]
pub struct Expected {
    pub value: Value,
    pub folded: Option<String>,
}

impl Expected {
    fn new(value: Value) -> Expected {
        let folded = match &value {
            Value::String(s) if !s.contains("${agent}") => Some(crate::policy::fold_loose(s)),
            _ => None,
        };
        Expected { value, folded }
    }
}

/// One `tools` entry, compiled.
#[derive(Debug)]
pub struct ToolRule {
    pub pattern: Arc<str>,
    pub line: u64,
    pub schema: Option<Arc<jsonschema::Validator>>,
    pub rate: Option<Rate>,
    pub approval_required: bool,
    pub approvals: u32,
    pub hold_when: Vec<Condition>,
}

/// One `deny` entry, compiled.
#[derive(Debug)]
pub struct DenyRule {
    pub pattern: String,
    pub line: u64,
    pub reason: Option<String>,
}

/// One agent's compiled manifest.
#[derive(Debug)]
pub struct Manifest {
    pub agent: Arc<str>,
    pub file: PathBuf,
    pub sha256: String,
    pub description: Option<String>,
    pub rate: Option<Rate>,
    pub unlisted: Unlisted,
    pub tools: Vec<ToolRule>,
    pub deny: Vec<DenyRule>,
    /// Exact names and their rules, sorted by name (binary search: with
    /// ~20 tools as fast as hashing, and half the memory of a map; names
    /// are shared with the rules').
    exact: Box<[(Arc<str>, usize)]>,
    globs: Arc<GlobSet>,
    glob_rules: Vec<usize>,
    deny_set: Arc<GlobSet>,
    /// `resources`: URI globs, in file order.
    pub resources: Vec<String>,
    resource_set: Arc<GlobSet>,
    /// `prompts`: name globs, in file order.
    pub prompts: Vec<String>,
    prompt_set: Arc<GlobSet>,
}

impl Manifest {
    /// The rule that lists `tool`: an exact name wins over globs; among globs
    /// the first in file order.
    pub fn tool_rule(&self, tool: &str) -> Option<usize> {
        if let Ok(at) = self.exact.binary_search_by(|(n, _)| (**n).cmp(tool)) {
            return Some(self.exact[at].1);
        }
        if self.glob_rules.is_empty() {
            return None;
        }
        self.globs
            .matches(tool)
            .into_iter()
            .map(|g| self.glob_rules[g])
            .min()
    }

    /// The first `deny` rule matching `tool`.
    pub fn deny_rule(&self, tool: &str) -> Option<usize> {
        if self.deny.is_empty() {
            return None;
        }
        self.deny_set.matches(tool).into_iter().min()
    }

    /// Whether `tool` would be listed in tools/list (listed, not denied).
    /// The first `resources` pattern matching `uri`.
    pub fn resource_rule(&self, uri: &str) -> Option<usize> {
        self.resource_set.matches(uri).into_iter().min()
    }

    /// The first `prompts` pattern matching the exposed prompt `name`.
    pub fn prompt_rule(&self, name: &str) -> Option<usize> {
        self.prompt_set.matches(name).into_iter().min()
    }

    pub fn exposes(&self, tool: &str) -> bool {
        self.deny_rule(tool).is_none() && self.tool_rule(tool).is_some()
    }

    pub fn file_name(&self) -> String {
        self.file.file_name().map_or_else(
            || self.file.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        )
    }
}

/// Compiled argument schemas by canonical text, and compiled glob sets by
/// their pattern lists: identical ones (common across agents' manifests: a
/// standard deny list, a shared schema) are compiled once per set and
/// shared. A glob set that needs a regex costs ~15 KiB; 10,000 manifests
/// with the same deny list would otherwise hold 10,000 copies.
#[derive(Default)]
pub struct Schemas {
    schemas: HashMap<String, Arc<jsonschema::Validator>>,
    globsets: HashMap<String, Arc<GlobSet>>,
    /// Tool names: many agents list the same tools.
    names: std::collections::HashSet<Arc<str>>,
}

impl Schemas {
    fn compile(&mut self, schema: &Value) -> Result<Arc<jsonschema::Validator>, String> {
        let key = crate::mcp::canonical_json(schema);
        if let Some(v) = self.schemas.get(&key) {
            return Ok(v.clone());
        }
        let v = compile_schema(schema)?;
        self.schemas.insert(key, v.clone());
        Ok(v)
    }

    /// `name`, shared with every other rule of the set that names it.
    fn name(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(n.clone());
        n
    }

    /// The set `build` makes of `patterns` (of kind `kind`), built once.
    fn globset(
        &mut self,
        kind: &str,
        patterns: &[&str],
        build: GlobSetBuilder,
    ) -> Result<Arc<GlobSet>, globset::Error> {
        let mut key = String::from(kind);
        for p in patterns {
            key.push('\0');
            key.push_str(p);
        }
        if let Some(g) = self.globsets.get(&key) {
            return Ok(g.clone());
        }
        let g = Arc::new(build.build()?);
        self.globsets.insert(key, g.clone());
        Ok(g)
    }
}

/// Compiles one manifest file's text.
pub fn compile(file: &Path, text: &str, problems: &mut Vec<Problem>) -> Option<Manifest> {
    compile_with(file, text, problems, &mut Schemas::default())
}

/// Compiles one manifest, sharing compiled schemas through `schemas`.
pub fn compile_with(
    file: &Path,
    text: &str,
    problems: &mut Vec<Problem>,
    schemas: &mut Schemas,
) -> Option<Manifest> {
    let sha256 = crate::audit::sha256_hex(&Sha256::digest(text.as_bytes()));
    compile_hashed(file, text, sha256, problems, schemas)
}

/// [`compile_with`] for a text whose SHA-256 (hex) is already known.
fn compile_hashed(
    file: &Path,
    text: &str,
    sha256: String,
    problems: &mut Vec<Problem>,
    schemas: &mut Schemas,
) -> Option<Manifest> {
    let spec: ManifestSpec = match parse_yaml(file, text) {
        Ok(s) => s,
        Err(p) => {
            problems.push(p);
            return None;
        }
    };
    let before = problems.len();
    let mut r = Report { file, problems };
    let agent = spec.agent.value.trim().to_owned();
    if agent.is_empty() || agent.len() > 256 || agent.chars().any(char::is_control) {
        r.at(
            &spec.agent,
            "agent",
            "agent must be 1-256 characters without control characters",
        );
    }
    let rate = spec
        .rate_limit
        .as_ref()
        .and_then(|s| rate_of(&mut r, s, "rate_limit"));
    let unlisted = match spec.unlisted.as_ref().map(|u| u.value.as_str()) {
        None | Some("deny") => Unlisted::Deny,
        Some("hold") => Unlisted::Hold,
        Some(other) => {
            let u = spec.unlisted.as_ref().expect("matched Some above");
            r.at(u, "unlisted", format!("{other:?}: expected deny or hold"));
            Unlisted::Deny
        }
    };
    let mut tools = Vec::new();
    let mut exact = HashMap::new();
    let mut globs = GlobSetBuilder::new();
    let mut glob_names: Vec<&str> = Vec::new();
    let mut glob_rules = Vec::new();
    for (i, t) in spec.tools.iter().enumerate() {
        let key = format!("tools[{i}]");
        let name = &t.value.name;
        let is_glob = name.value.contains(['*', '?']);
        if is_glob {
            match tool_glob(&name.value) {
                Ok(g) => {
                    globs.add(g);
                    glob_names.push(&name.value);
                    glob_rules.push(i);
                }
                Err(e) => r.at(name, format!("{key}.name"), e),
            }
        } else if name.value.is_empty() {
            r.at(name, format!("{key}.name"), "a tool name must not be empty");
        } else if exact.insert(name.value.clone(), i).is_some() {
            r.at(
                name,
                format!("{key}.name"),
                format!("tool {:?} is listed twice", name.value),
            );
        }
        let schema = t.value.arguments.as_ref().and_then(|s| {
            schemas
                .compile(&s.value)
                .map_err(|e| r.at(s, format!("{key}.arguments"), e))
                .ok()
        });
        let trate = t
            .value
            .rate_limit
            .as_ref()
            .and_then(|s| rate_of(&mut r, s, &format!("{key}.rate_limit")));
        let approval_required = match t.value.approval.as_ref().map(|a| a.value.as_str()) {
            None | Some("none") => false,
            Some("required") => true,
            Some(other) => {
                let a = t.value.approval.as_ref().expect("matched Some above");
                r.at(
                    a,
                    format!("{key}.approval"),
                    format!("{other:?}: expected required or none"),
                );
                false
            }
        };
        let approvals = match &t.value.approvals {
            None => 1,
            Some(a) if (1..=5).contains(&a.value) => a.value,
            Some(a) => {
                r.at(
                    a,
                    format!("{key}.approvals"),
                    "approvals must be between 1 and 5",
                );
                1
            }
        };
        let mut hold_when = Vec::new();
        for (j, c) in t.value.hold_when.iter().enumerate() {
            let ck = format!("{key}.hold_when[{j}]");
            let spec = &c.value;
            if !(spec.pointer.is_empty() || spec.pointer.starts_with('/')) {
                r.at(
                    c,
                    format!("{ck}.pointer"),
                    "a JSON pointer is empty or starts with '/'",
                );
                continue;
            }
            let tests = [
                spec.equals.clone().map(|v| Test::Equals(Expected::new(v))),
                spec.in_
                    .clone()
                    .map(|vs| Test::In(vs.into_iter().map(Expected::new).collect())),
                spec.prefix.clone().map(Test::Prefix),
            ];
            let mut set = tests.into_iter().flatten();
            match (set.next(), set.next()) {
                (Some(test), None) => hold_when.push(Condition {
                    pointer: spec.pointer.clone(),
                    line: c.referenced.line(),
                    test,
                }),
                _ => r.at(
                    c,
                    &ck,
                    "a condition needs exactly one of equals, in or prefix",
                ),
            }
        }
        tools.push(ToolRule {
            pattern: schemas.name(&name.value),
            line: t.referenced.line(),
            schema,
            rate: trate,
            approval_required,
            approvals,
            hold_when,
        });
    }
    let mut deny = Vec::new();
    let mut deny_set = GlobSetBuilder::new();
    let mut deny_names: Vec<&str> = Vec::new();
    for (i, d) in spec.deny.iter().enumerate() {
        match tool_glob(&d.value.name.value) {
            Ok(g) => {
                deny_set.add(g);
                deny_names.push(&d.value.name.value);
            }
            Err(e) => {
                r.at(&d.value.name, format!("deny[{i}].name"), e);
                continue;
            }
        }
        deny.push(DenyRule {
            pattern: d.value.name.value.clone(),
            line: d.referenced.line(),
            reason: d.value.reason.clone(),
        });
    }
    let mut item_sets = Vec::new();
    for (key, list, glob) in [
        (
            "resources",
            &spec.resources,
            crate::config::uri_glob as fn(&str) -> _,
        ),
        ("prompts", &spec.prompts, crate::config::tool_glob),
    ] {
        let mut set = GlobSetBuilder::new();
        for (i, p) in list.iter().enumerate() {
            match glob(&p.value) {
                Ok(g) => {
                    set.add(g);
                }
                Err(e) => r.at(p, format!("{key}[{i}]"), e),
            }
        }
        let names: Vec<&str> = list.iter().map(|p| p.value.as_str()).collect();
        let built = schemas.globset(key, &names, set);
        item_sets.push((list.iter().map(|p| p.value.clone()).collect(), built));
    }
    let globs = schemas.globset("tools", &glob_names, globs);
    let deny_set = schemas.globset("deny", &deny_names, deny_set);
    let mut item_sets = item_sets.into_iter();
    let (
        Ok(globs),
        Ok(deny_set),
        Some((resources, Ok(resource_set))),
        Some((prompts, Ok(prompt_set))),
    ) = (globs, deny_set, item_sets.next(), item_sets.next())
    else {
        r.at_loc(1, 1, "tools", "patterns could not be compiled together");
        return None;
    };
    if r.problems.len() > before {
        return None;
    }
    let mut exact: Box<[(Arc<str>, usize)]> = exact
        .into_values()
        .filter_map(|i| tools.get(i).map(|t: &ToolRule| (t.pattern.clone(), i)))
        .collect();
    exact.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Some(Manifest {
        agent: Arc::from(agent),
        file: file.to_path_buf(),
        sha256,
        description: spec.description,
        rate,
        unlisted,
        tools,
        deny,
        exact,
        globs,
        glob_rules,
        deny_set,
        resources,
        resource_set,
        prompts,
        prompt_set,
    })
}

/// Compiles an argument schema (JSON Schema 2020-12 unless it says
/// otherwise). No remote `$ref` is ever fetched.
pub fn compile_schema(schema: &Value) -> Result<Arc<jsonschema::Validator>, String> {
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(schema)
        .map(Arc::new)
        .map_err(|e| format!("invalid JSON Schema: {}", e.masked()))
}

/// The set of manifests in force: one immutable snapshot, swapped whole.
#[derive(Debug, Default)]
pub struct PolicySet {
    by_agent: HashMap<Arc<str>, Arc<Manifest>>,
    /// Every file read, with its SHA-256 (including ones that failed).
    pub files: Vec<(PathBuf, String)>,
}

/// One file's compilation: its index, the manifest, its problems.
type Compiled = (usize, Option<Manifest>, Vec<Problem>);

/// The most manifest files one directory may hold.
pub const MAX_MANIFESTS: usize = 100_000;

impl PolicySet {
    pub fn get(&self, agent: &str) -> Option<&Arc<Manifest>> {
        self.by_agent.get(agent)
    }
    pub fn len(&self) -> usize {
        self.by_agent.len()
    }
    pub fn is_empty(&self) -> bool {
        self.by_agent.is_empty()
    }
    pub fn manifests(&self) -> impl Iterator<Item = &Arc<Manifest>> {
        self.by_agent.values()
    }

    /// Builds a set from already compiled manifests (tests, benchmarks).
    pub fn from_manifests(ms: impl IntoIterator<Item = Manifest>) -> Self {
        PolicySet {
            by_agent: ms
                .into_iter()
                .map(|m| (m.agent.clone(), Arc::new(m)))
                .collect(),
            files: Vec::new(),
        }
    }

    /// Loads every `*.yaml`/`*.yml` file in `dir`. All or nothing.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, Problems> {
        Self::load_dir_reusing(dir, None)
    }

    /// Like [`PolicySet::load_dir`], reusing `previous`'s compiled manifest
    /// for every file whose content (SHA-256) is unchanged, so a reload
    /// costs reading and hashing the files plus compiling what changed.
    pub fn load_dir_reusing(
        dir: &Path,
        previous: Option<&PolicySet>,
    ) -> Result<PolicySet, Problems> {
        let one = |msg: String| {
            Problems(vec![Problem {
                file: dir.to_path_buf(),
                line: 0,
                column: 0,
                path: String::new(),
                message: msg,
            }])
        };
        let rd = std::fs::read_dir(dir)
            .map_err(|e| one(format!("cannot read manifests directory: {e}")))?;
        let mut paths: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .collect();
        if paths.len() > MAX_MANIFESTS {
            return Err(one(format!("more than {MAX_MANIFESTS} manifest files")));
        }
        paths.sort();
        let mut texts = Vec::with_capacity(paths.len());
        let mut problems = Vec::new();
        for p in paths {
            match std::fs::read_to_string(&p) {
                Ok(t) => texts.push((p, t)),
                Err(e) => problems.push(Problem {
                    file: p,
                    line: 0,
                    column: 0,
                    path: String::new(),
                    message: format!("cannot read: {e}"),
                }),
            }
        }
        Self::compile_set(texts, problems, previous)
    }

    /// Compiles `(file, text)` pairs into a set. All or nothing.
    pub fn from_texts(
        texts: Vec<(PathBuf, String)>,
        problems: Vec<Problem>,
    ) -> Result<PolicySet, Problems> {
        Self::compile_set(texts, problems, None)
    }

    /// Compiles a set: unchanged files reuse `previous`'s manifests; the
    /// others compile in parallel, one schema cache per worker.
    pub fn compile_set(
        texts: Vec<(PathBuf, String)>,
        mut problems: Vec<Problem>,
        previous: Option<&PolicySet>,
    ) -> Result<PolicySet, Problems> {
        let reusable: HashMap<(&Path, &str), &Arc<Manifest>> = previous
            .map(|p| {
                p.by_agent
                    .values()
                    .map(|m| ((m.file.as_path(), m.sha256.as_str()), m))
                    .collect()
            })
            .unwrap_or_default();
        let hashed: Vec<(PathBuf, String, String)> = texts
            .into_iter()
            .map(|(p, t)| {
                let sha = crate::audit::sha256_hex(&Sha256::digest(t.as_bytes()));
                (p, t, sha)
            })
            .collect();
        let files: Vec<(PathBuf, String)> = hashed
            .iter()
            .map(|(p, _, sha)| (p.clone(), sha.clone()))
            .collect();
        let mut compiled: Vec<Option<Arc<Manifest>>> = vec![None; hashed.len()];
        let mut todo = Vec::new();
        for (i, (p, _, sha)) in hashed.iter().enumerate() {
            match reusable.get(&(p.as_path(), sha.as_str())) {
                Some(m) => compiled[i] = Some(Arc::clone(m)),
                None => todo.push(i),
            }
        }
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(todo.len().max(1));
        let chunk = todo.len().div_ceil(workers).max(1);
        let results: Vec<Vec<Compiled>> = std::thread::scope(|scope| {
            let handles: Vec<_> = todo
                .chunks(chunk)
                .map(|idx| {
                    let hashed = &hashed;
                    scope.spawn(move || {
                        let mut schemas = Schemas::default();
                        idx.iter()
                            .map(|&i| {
                                let (path, text, sha) = &hashed[i];
                                let mut ps = Vec::new();
                                let m =
                                    compile_hashed(path, text, sha.clone(), &mut ps, &mut schemas);
                                (i, m, ps)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        for (i, m, ps) in results.into_iter().flatten() {
            problems.extend(ps);
            compiled[i] = m.map(Arc::new);
        }
        let mut by_agent: HashMap<Arc<str>, Arc<Manifest>> = HashMap::with_capacity(compiled.len());
        for m in compiled.into_iter().flatten() {
            if let Some(prev) = by_agent.get(&m.agent) {
                problems.push(Problem {
                    file: m.file.clone(),
                    line: 1,
                    column: 1,
                    path: "agent".into(),
                    message: format!(
                        "agent {:?} already has a manifest in {}",
                        m.agent,
                        prev.file.display()
                    ),
                });
                continue;
            }
            by_agent.insert(m.agent.clone(), m);
        }
        if problems.is_empty() {
            Ok(PolicySet { by_agent, files })
        } else {
            problems.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
            Err(Problems(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_glob_lists_and_schemas_are_compiled_once_and_shared() {
        let text = |agent: &str, glob: &str| {
            format!("agent: {agent}\ntools:\n  - name: \"{glob}\"\n    arguments: {{ type: object }}\ndeny:\n  - name: \"*__delete_*\"\n")
        };
        let mut cache = Schemas::default();
        let mut problems = Vec::new();
        let mut one = |agent: &str, glob: &str| {
            compile_with(
                Path::new("m.yaml"),
                &text(agent, glob),
                &mut problems,
                &mut cache,
            )
            .expect("valid")
        };
        let (a, b, c) = (one("a", "x__*"), one("b", "x__*"), one("c", "y__*"));
        assert!(Arc::ptr_eq(&a.deny_set, &b.deny_set));
        assert!(Arc::ptr_eq(&a.deny_set, &c.deny_set));
        assert!(Arc::ptr_eq(&a.globs, &b.globs), "same tool globs");
        assert!(!Arc::ptr_eq(&a.globs, &c.globs), "other tool globs");
        assert_eq!(c.tool_rule("y__t"), Some(0));
        assert_eq!(c.tool_rule("x__t"), None);
        assert_eq!(a.deny_rule("x__delete_all"), Some(0));
        let (sa, sb) = (a.tools[0].schema.as_ref(), b.tools[0].schema.as_ref());
        assert!(Arc::ptr_eq(sa.expect("schema"), sb.expect("schema")));
        assert!(
            Arc::ptr_eq(&a.tools[0].pattern, &b.tools[0].pattern),
            "names shared"
        );
        let (d, e) = (one("d", "exact__tool"), one("e", "exact__tool"));
        assert!(Arc::ptr_eq(&d.tools[0].pattern, &e.tools[0].pattern));
        assert_eq!(d.tool_rule("exact__tool"), Some(0));
        assert_eq!(d.tool_rule("exact__too"), None);
    }

    pub(crate) fn manifest(text: &str) -> Manifest {
        let mut p = Vec::new();
        let m = compile(Path::new("t.yaml"), text, &mut p);
        assert!(p.is_empty(), "{:?}", p);
        m.unwrap()
    }

    fn problems(text: &str) -> String {
        let mut p = Vec::new();
        assert!(compile(Path::new("bad.yaml"), text, &mut p).is_none());
        Problems(p).to_string()
    }

    #[test]
    fn exact_names_win_over_globs_and_deny_is_separate() {
        let m = manifest("agent: a\ntools:\n  - name: b__*\n  - name: b__x\n    approval: required\ndeny:\n  - name: \"*__delete_*\"\n");
        assert_eq!(m.tool_rule("b__x"), Some(1));
        assert_eq!(m.tool_rule("b__y"), Some(0));
        assert_eq!(m.tool_rule("c__y"), None);
        assert_eq!(m.deny_rule("b__delete_all"), Some(0));
        assert!(!m.exposes("b__delete_all"));
        assert!(m.exposes("b__y"));
        assert!(m.tools[1].approval_required);
    }

    #[test]
    fn rates() {
        assert_eq!(
            parse_rate("120/min"),
            Ok(Rate {
                burst: NonZeroU32::new(120).unwrap(),
                interval: Duration::from_millis(500)
            })
        );
        assert_eq!(
            parse_rate("10/s").unwrap().interval,
            Duration::from_millis(100)
        );
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("5/fortnight").is_err());
        assert!(parse_rate("lots").is_err());
        let m = manifest("agent: a\nrate_limit: { rate: 120/min, burst: 20 }\n");
        assert_eq!(m.rate.unwrap().burst.get(), 20);
    }

    #[test]
    fn reports_every_problem_with_location() {
        let text = "agent: a\nunlisted: maybe\nrate_limit: 3/fortnight\ntools:\n  - name: x\n    arguments: { type: objekt }\n  - name: x\n  - name: y\n    approvals: 9\n    hold_when:\n      - { pointer: nope, equals: 1 }\n      - { pointer: /a }\n";
        let all = problems(text);
        assert!(
            all.contains("bad.yaml:2:11: unlisted: \"maybe\": expected deny or hold"),
            "{all}"
        );
        assert!(all.contains("bad.yaml:3:13: rate_limit:"), "{all}");
        assert!(
            all.contains("bad.yaml:6:16: tools[0].arguments: invalid JSON Schema"),
            "{all}"
        );
        assert!(
            all.contains("bad.yaml:7:11: tools[1].name: tool \"x\" is listed twice"),
            "{all}"
        );
        assert!(all.contains("bad.yaml:9:16: tools[2].approvals"), "{all}");
        assert!(all.contains("tools[2].hold_when[0].pointer"), "{all}");
        assert!(
            all.contains("tools[2].hold_when[1]: a condition needs exactly one"),
            "{all}"
        );
        assert_eq!(all.lines().count(), 7, "{all}");
    }

    #[test]
    fn unknown_and_duplicate_keys_are_refused() {
        let all = problems("agent: a\ntools:\n  - name: x\n    aproval: required\n");
        assert!(all.starts_with("bad.yaml:4:"), "{all}");
        assert!(all.contains("aproval"), "{all}");
        let all = problems("agent: a\nagent: b\n");
        assert!(all.to_lowercase().contains("duplicate"), "{all}");
        // The map form of a rate is as strict as every other key.
        let all = problems("agent: a\nrate_limit: { rate: 10/min, burst: 5, brust: 7 }\n");
        assert!(
            all.contains("bad.yaml:2:") && all.contains("brust"),
            "{all}"
        );
        assert!(all.contains("rate_limit"), "{all}");
        let all = problems("agent: a\nrate_limit: 10\n");
        assert!(
            all.contains("bad.yaml:2:1: rate_limit: invalid type"),
            "{all}"
        );
        assert!(all.contains("120/min"), "names the expected forms: {all}");
    }

    #[test]
    fn remote_refs_are_never_fetched() {
        let e = compile_schema(&serde_json::json!({"$ref": "http://127.0.0.1:9/schema.json"}));
        assert!(e.is_err());
    }

    #[test]
    fn one_bad_file_rejects_the_set_and_duplicate_agents_are_refused() {
        let ok = (PathBuf::from("a.yaml"), "agent: a\n".to_owned());
        let dup = (PathBuf::from("b.yaml"), "agent: a\n".to_owned());
        let bad = (PathBuf::from("c.yaml"), "agent: [\n".to_owned());
        let e = PolicySet::from_texts(vec![ok.clone(), dup], vec![]).unwrap_err();
        assert!(
            e.to_string().contains("already has a manifest in a.yaml"),
            "{e}"
        );
        assert!(PolicySet::from_texts(vec![ok.clone(), bad], vec![]).is_err());
        assert_eq!(PolicySet::from_texts(vec![ok], vec![]).unwrap().len(), 1);
    }
}
