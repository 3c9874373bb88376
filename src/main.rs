//! The `toolgate` command line. Errors are printed with their whole chain and
//! turned into an exit code here, and only here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use toolgate::config::{parse_duration, Config};
use toolgate::identity::{mint_hs256, now_unix};
use toolgate::manifest::PolicySet;
use toolgate::policy::{self, Verdict};
use toolgate::server::{guard_for, Server};

/// mimalloc: under load, glibc malloc's arena locks showed up as the largest
/// user-space cost in profiles of the data plane (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "toolgate",
    version,
    about = "An inline policy gate between AI agents and the MCP tools they call"
)]
struct Cli {
    /// Operator log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the data plane (and the management plane if configured).
    Serve {
        #[arg(long, default_value = "toolgate.yaml")]
        config: PathBuf,
    },
    /// Validate the config and every manifest; exit 1 listing every problem.
    Check {
        #[arg(long, default_value = "toolgate.yaml")]
        config: PathBuf,
        /// Also ask each upstream for its live tools and warn about rules
        /// that match nothing (typos, renamed tools).
        #[arg(long)]
        against: bool,
    },
    /// Print the JSON Schema of the manifest or config format (for editors).
    Schema {
        #[arg(value_enum, default_value_t = SchemaKind::Manifest)]
        kind: SchemaKind,
    },
    /// Re-decide the calls recorded in an audit log under a new policy and
    /// print what would change (the check to run before merging a manifest
    /// change). Rate limits are not simulated; redacted arguments replay as
    /// "[REDACTED]".
    Replay {
        audit: PathBuf,
        #[arg(long, default_value = "toolgate.yaml")]
        config: PathBuf,
        /// Exit 1 when any decision would change.
        #[arg(long)]
        fail_on_change: bool,
    },
    /// Dry-run one call: decision, deciding rule, reason. No upstream, no audit.
    Explain {
        #[arg(long, default_value = "toolgate.yaml")]
        config: PathBuf,
        #[arg(long)]
        agent: String,
        #[arg(long)]
        tool: String,
        /// Arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
    },
    /// Mint a development token with a configured hs256 key.
    Token {
        #[arg(long, default_value = "toolgate.yaml")]
        config: PathBuf,
        /// The agent (or, with --plane admin, the approver's subject).
        #[arg(long)]
        agent: String,
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[arg(long, value_enum, default_value_t = Plane::Data)]
        plane: Plane,
        /// Roles for an admin token (comma separated): approver, viewer.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Authentication methods to claim (amr), e.g. mfa.
        #[arg(long, value_delimiter = ',')]
        amr: Vec<String>,
    },
    /// Approve, deny and inspect held calls on the management plane.
    Holds {
        #[command(subcommand)]
        cmd: HoldsCmd,
        /// Management plane URL, e.g. http://127.0.0.1:8081
        #[arg(long, global = true, env = "TOOLGATE_ADMIN")]
        admin: Option<String>,
        /// Approver token (or env TOOLGATE_TOKEN).
        #[arg(long, global = true, env = "TOOLGATE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Print the API's JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// The quickstart: toolgate + a bundled demo tool server, with next steps.
    Demo {
        /// Where agents connect.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Where the bundled tool server listens.
        #[arg(long, default_value = "127.0.0.1:0")]
        tools_listen: String,
    },
    /// The demo tool server alone, as an MCP stdio server (for trying a
    /// stdio upstream, and for toolgate's own tests).
    #[command(hide = true)]
    DemoTools,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SchemaKind {
    Manifest,
    Config,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Plane {
    Data,
    Admin,
}

#[derive(Subcommand)]
enum HoldsCmd {
    /// List holds (newest first).
    List {
        /// pending, approved, denied, expired or all.
        #[arg(long, default_value = "pending")]
        status: String,
    },
    /// Show one hold with its arguments and approvals.
    Show { id: String },
    /// Approve a hold; --for grants a window during which identical calls pass.
    Approve {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long = "for")]
        window: Option<String>,
    },
    /// Deny a hold.
    Deny {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the hash chain; name the first bad record; exit 1 if broken.
    Verify {
        path: PathBuf,
        /// Also check the signed checkpoints with this public key.
        #[arg(long)]
        key: Option<PathBuf>,
        /// PATH continues this rotated-out log (e.g. after logrotate's
        /// copytruncate): its chain is checked too, and PATH's first record
        /// must link to its last. Repeat it for several rotations, oldest
        /// first (`--continues audit.jsonl.2 --continues audit.jsonl.1`).
        /// Without it, PATH must start at seq 1 with a `prev` of 64 zeros,
        /// so a log whose head was cut is broken.
        #[arg(long, value_name = "PREVIOUS_LOG")]
        continues: Vec<PathBuf>,
        /// Fail when records after the last checkpoint are unsigned (for a
        /// closed log: toolgate signs the tail when it shuts down).
        #[arg(long, requires = "key")]
        require_tail_signed: bool,
        /// Fail unless the log signs at least seq N: the `audit.seq` of the
        /// last `audit checkpoint signed` line of the operator log (or
        /// however it was kept outside the file). Catches a log cut back to
        /// an earlier checkpoint, which the signatures alone cannot.
        #[arg(long, requires = "key", value_name = "N")]
        expect_seq: Option<u64>,
        /// Fail when the newest checkpoint was signed longer than DURATION
        /// ago (e.g. 5m), for a live log: toolgate checkpoints every
        /// `audit.checkpoint.interval`, idle or not, so a log cut back to an
        /// old checkpoint (or whose writer stopped) shows. Choose more than
        /// the interval.
        #[arg(long, requires = "key", value_name = "DURATION", value_parser = humantime::parse_duration)]
        max_age: Option<std::time::Duration>,
    },
    /// Generate an Ed25519 key pair for audit checkpoints: DIR/audit.key
    /// (secret, mode 0600) and DIR/audit.pub.
    Keygen {
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("toolgate: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Serve { config } => {
            let (config, policy) = match load(&config) {
                Ok(x) => x,
                Err(code) => return Ok(code),
            };
            runtime()?.block_on(serve(config, policy))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { config, against } => {
            let code = check(&config);
            if against && code == ExitCode::SUCCESS {
                runtime()?.block_on(check_against(&config))?;
            }
            Ok(code)
        }
        Cmd::Schema { kind } => {
            println!(
                "{}",
                match kind {
                    SchemaKind::Manifest => toolgate::manifest::SCHEMA,
                    SchemaKind::Config => toolgate::config::SCHEMA,
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Replay {
            audit,
            config,
            fail_on_change,
        } => replay(&audit, &config, fail_on_change),
        Cmd::Explain {
            config,
            agent,
            tool,
            args,
        } => explain(&config, &agent, &tool, &args),
        Cmd::Token {
            config,
            agent,
            ttl,
            plane,
            roles,
            amr,
        } => {
            let config =
                Config::load(&config).map_err(|p| anyhow::anyhow!("invalid config:\n{p}"))?;
            let ttl = parse_duration(&ttl).map_err(anyhow::Error::msg)?;
            println!("{}", token(&config, &agent, ttl, plane, &roles, &amr)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Holds {
            cmd,
            admin,
            token,
            json,
        } => {
            let admin = admin.context("--admin URL (or TOOLGATE_ADMIN) is required")?;
            let token =
                token.context("--token (or TOOLGATE_TOKEN) is required: an approver token")?;
            runtime()?.block_on(holds(cmd, admin.trim_end_matches('/'), &token, json))
        }
        Cmd::Audit {
            cmd:
                AuditCmd::Verify {
                    path,
                    key,
                    continues,
                    require_tail_signed,
                    expect_seq,
                    max_age,
                },
        } => {
            // The rotated-out logs, oldest first, each continuing the one
            // before: the first record of PATH links to the last of them.
            let mut start = toolgate::audit::Link::genesis();
            for prev in &continues {
                start = match toolgate::audit::verified_last_link(prev, &start) {
                    Ok(l) => l,
                    Err(b) => {
                        println!("BROKEN: {} (the log it continues): {b}", prev.display());
                        return Ok(ExitCode::from(1));
                    }
                };
            }
            let Some(key) = key else {
                return Ok(match toolgate::audit::verify_after(&path, &start) {
                    Ok(n) => {
                        let from = match continues.last() {
                            Some(prev) => format!(
                                " (from seq {}, continuing {})",
                                start.seq + 1,
                                prev.display()
                            ),
                            None => String::new(),
                        };
                        println!("ok: {n} records{from}, chain intact ({})", path.display());
                        ExitCode::SUCCESS
                    }
                    Err(b) => {
                        println!("BROKEN: {}: {b}", path.display());
                        ExitCode::from(1)
                    }
                });
            };
            let key = toolgate::audit::load_public_key(&key).map_err(anyhow::Error::msg)?;
            let s = match toolgate::audit::verify_signed_after(&path, &key, &start) {
                Ok(s) => s,
                Err(b) => {
                    println!("BROKEN: {}: {b}", path.display());
                    return Ok(ExitCode::from(1));
                }
            };
            let summary = format!(
                "{} records{}, chain intact, {} signed checkpoint(s), last signed seq {} at {}",
                s.records,
                if s.first_seq > 1 {
                    format!(" (from seq {}, continuing the previous log)", s.first_seq)
                } else {
                    String::new()
                },
                s.checkpoints,
                s.last_signed_seq,
                s.last_signed_at
                    .as_deref()
                    .or(s.last_checkpoint_ts.as_deref())
                    .unwrap_or("-"),
            );
            let anchors = toolgate::audit::Anchors {
                expect_seq,
                max_age,
                now: std::time::SystemTime::now(),
            };
            let why = match s.check(&anchors) {
                Err(why) => Some(why),
                Ok(()) if require_tail_signed && s.unsigned_tail > 0 => Some(format!(
                    "{} record(s) after the last checkpoint are not signed (--require-tail-signed)",
                    s.unsigned_tail
                )),
                Ok(()) => None,
            };
            if let Some(why) = why {
                println!("BROKEN: {}: {why}", path.display());
                println!("  ({summary})");
                return Ok(ExitCode::from(1));
            }
            println!("ok: {summary} ({})", path.display());
            if s.unsigned_tail > 0 {
                println!(
                    "warning: {} record(s) after the last checkpoint are not signed yet",
                    s.unsigned_tail
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Audit {
            cmd: AuditCmd::Keygen { out },
        } => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let (seed, public) = toolgate::audit::keygen().map_err(anyhow::Error::msg)?;
            std::fs::create_dir_all(&out)?;
            let secret = out.join("audit.key");
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&secret)
                .with_context(|| {
                    format!("cannot create {} (it must not exist yet)", secret.display())
                })?
                .write_all(format!("{seed}\n").as_bytes())?;
            std::fs::write(out.join("audit.pub"), format!("{public}\n"))?;
            println!(
                "wrote {} (secret: configure audit.checkpoint.key_file) and {}",
                secret.display(),
                out.join("audit.pub").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo {
            listen,
            tools_listen,
        } => {
            runtime()?.block_on(demo(&listen, &tools_listen))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::DemoTools => {
            runtime()?.block_on(toolgate::demo::serve_stdio())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads config and manifests, printing every problem on failure.
fn load(path: &Path) -> Result<(Config, PolicySet), ExitCode> {
    let config = Config::load(path);
    let policy = config
        .as_ref()
        .ok()
        .map(|c| PolicySet::load_dir(&c.manifests));
    let mut problems = Vec::new();
    if let Err(p) = &config {
        problems.extend(p.0.iter().cloned());
    }
    if let Some(Err(p)) = &policy {
        problems.extend(p.0.iter().cloned());
    }
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!("{} problem(s) found", problems.len());
        return Err(ExitCode::from(1));
    }
    match (config, policy) {
        (Ok(c), Some(Ok(p))) => Ok((c, p)),
        _ => Err(ExitCode::from(1)),
    }
}

fn check(path: &Path) -> ExitCode {
    let (config, policy) = match load(path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let mut ms: Vec<_> = policy.manifests().collect();
    ms.sort_by(|a, b| a.agent.cmp(&b.agent));
    for m in ms {
        let holds = m
            .tools
            .iter()
            .filter(|t| t.approval_required || !t.hold_when.is_empty())
            .count();
        println!(
            "{}: {} tool rule(s), {} deny rule(s), {} with holds, unlisted {}, rate {} ({})",
            m.agent,
            m.tools.len(),
            m.deny.len(),
            holds,
            if m.unlisted == toolgate::manifest::Unlisted::Hold {
                "hold"
            } else {
                "deny"
            },
            m.rate.map_or("none".to_owned(), |r| format!(
                "burst {} per {:?}",
                r.burst,
                r.interval * r.burst.get()
            )),
            m.file_name(),
        );
    }
    println!(
        "ok: {} agent(s), {} upstream(s), config {}",
        policy.len(),
        config.upstreams.len(),
        config.path.display()
    );
    ExitCode::SUCCESS
}

/// Warns about manifest rules that match none of the upstreams' live tools.
async fn check_against(path: &Path) -> anyhow::Result<()> {
    let (config, policy) = load(path).map_err(|_| anyhow::anyhow!("invalid config"))?;
    let client = toolgate::upstream::http_client();
    let mut exposed = Vec::new();
    for u in &config.upstreams {
        let up = toolgate::upstream::Upstream::new(
            u,
            client.clone(),
            config.limits.upstream_timeout,
            config.limits.max_upstream_body,
        );
        match up.list_tools().await {
            Ok(tools) => {
                println!(
                    "upstream {}: {} tool(s) ({})",
                    u.name,
                    tools.len(),
                    up.version().unwrap_or("?")
                );
                exposed.extend(
                    tools
                        .iter()
                        .filter_map(|t| t.get("name").and_then(Value::as_str))
                        .map(|n| format!("{}{n}", u.prefix)),
                );
            }
            Err(e) => println!(
                "warning: upstream {}: {e}; its rules cannot be checked",
                u.name
            ),
        }
    }
    let mut warnings = 0;
    let mut ms: Vec<_> = policy.manifests().collect();
    ms.sort_by(|a, b| a.agent.cmp(&b.agent));
    for m in ms {
        for (i, t) in m.tools.iter().enumerate() {
            if !exposed
                .iter()
                .any(|n| m.tool_rule(n) == Some(i) || glob_matches(&t.pattern, n))
            {
                warnings += 1;
                println!(
                    "warning: {}:{}: {}: tools[{i}] {:?} matches no upstream tool",
                    m.file_name(),
                    t.line,
                    m.agent,
                    &*t.pattern
                );
            }
        }
        for (i, d) in m.deny.iter().enumerate() {
            if !exposed.iter().any(|n| glob_matches(&d.pattern, n)) {
                warnings += 1;
                println!(
                    "warning: {}:{}: {}: deny[{i}] {:?} matches no upstream tool",
                    m.file_name(),
                    d.line,
                    m.agent,
                    d.pattern
                );
            }
        }
    }
    println!("{warnings} warning(s)");
    Ok(())
}

fn glob_matches(pattern: &str, name: &str) -> bool {
    toolgate::config::tool_glob(pattern).is_ok_and(|g| g.compile_matcher().is_match(name))
}

/// Re-decides recorded calls under the policy of `config`.
fn replay(audit: &Path, config: &Path, fail_on_change: bool) -> anyhow::Result<ExitCode> {
    use std::io::BufRead;
    let (config, policy) = match load(config) {
        Ok(x) => x,
        Err(code) => return Ok(code),
    };
    let guard = guard_for(&config);
    let f =
        std::fs::File::open(audit).with_context(|| format!("cannot open {}", audit.display()))?;
    let (mut seen, mut changed) = (0u64, 0u64);
    let mut transitions: std::collections::BTreeMap<(String, String), u64> = Default::default();
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        let Ok(r) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let event = r["event"].as_str().unwrap_or("");
        if !matches!(event, "call" | "hold_created" | "grant_used") {
            continue;
        }
        let (Some(agent), Some(tool)) = (r["agent"].as_str(), r["tool"].as_str()) else {
            continue;
        };
        let before = match (event, r["decision"].as_str().unwrap_or("")) {
            (_, "rate_limited") => continue,
            ("grant_used", _) | (_, "hold" | "denied" | "expired") => "hold",
            (_, "allow") => "allow",
            (_, "deny") => "deny",
            _ => continue,
        };
        let args = if r["args"].is_object() {
            r["args"].clone()
        } else {
            json!({})
        };
        let d = policy::decide(&guard, policy.get(agent).map(|m| &**m), agent, tool, &args);
        let after = match d.verdict {
            Verdict::Allow => "allow",
            Verdict::Deny | Verdict::Invalid(_) => "deny",
            Verdict::Hold { .. } => "hold",
        };
        seen += 1;
        if before != after {
            changed += 1;
            *transitions
                .entry((before.to_owned(), after.to_owned()))
                .or_default() += 1;
            println!(
                "seq {}: {agent} {tool}: {before} -> {after} ({}: {})",
                r["seq"],
                d.rule.id(),
                d.reason
            );
        }
    }
    let summary: Vec<String> = transitions
        .iter()
        .map(|((a, b), n)| format!("{a} -> {b}: {n}"))
        .collect();
    println!(
        "{seen} call(s) replayed, {changed} would change{}{}",
        if summary.is_empty() { "" } else { ": " },
        summary.join(", ")
    );
    Ok(if fail_on_change && changed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn explain(path: &Path, agent: &str, tool: &str, args: &str) -> anyhow::Result<ExitCode> {
    let (config, policy) = match load(path) {
        Ok(x) => x,
        Err(code) => return Ok(code),
    };
    let args = toolgate::mcp::parse_strict(args.as_bytes()).context("--args is not valid JSON")?;
    if !args.is_object() {
        bail!("--args must be a JSON object");
    }
    let guard = guard_for(&config);
    let m = policy.get(agent);
    let d = policy::decide(&guard, m.map(|m| &**m), agent, tool, &args);
    let decision = match &d.verdict {
        Verdict::Allow => "allow",
        Verdict::Deny | Verdict::Invalid(_) => "deny",
        Verdict::Hold { .. } => "hold",
    };
    let file = |m: &toolgate::manifest::Manifest| {
        let cwd = std::env::current_dir().unwrap_or_default();
        m.file
            .strip_prefix(&cwd)
            .unwrap_or(&m.file)
            .display()
            .to_string()
    };
    let location = match m {
        Some(m) => match d.rule.line(m) {
            Some(line) => format!("{}:{line}", file(m)),
            None => file(m),
        },
        None => "-".into(),
    };
    println!("decision: {decision}");
    println!("rule:     {} ({location})", d.rule.id());
    println!("reason:   {}", d.reason);
    if let Verdict::Invalid(errors) = &d.verdict {
        for e in errors {
            println!(
                "  {}: {}",
                if e.pointer.is_empty() {
                    "/"
                } else {
                    &e.pointer
                },
                e.message
            );
        }
    }
    if let Verdict::Hold { approvals } = d.verdict {
        println!("approvals needed: {approvals}");
    }
    if matches!(d.verdict, Verdict::Allow | Verdict::Hold { .. }) {
        if let Some(m) = m {
            let tool_rate = d.tool_rule.and_then(|i| m.tools[i].rate);
            if m.rate.is_some() || tool_rate.is_some() {
                println!("note:     rate limits apply at call time and are not simulated here");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn token(
    config: &Config,
    subject: &str,
    ttl: Duration,
    plane: Plane,
    roles: &[String],
    amr: &[String],
) -> anyhow::Result<String> {
    let (issuer, audience, claim, keys) = match plane {
        Plane::Data => (
            &config.agents.issuer,
            &config.agents.audience,
            config.agents.agent_claim.as_str(),
            &config.agents.keys,
        ),
        Plane::Admin => {
            let a = config
                .approvers
                .as_ref()
                .context("the config has no auth.approvers")?;
            (&a.issuer, &a.audience, a.subject_claim.as_str(), &a.keys)
        }
    };
    let Some((kid, secret)) = keys.hmac_key() else {
        bail!("refusing: no hs256 key is configured for this plane (dev tokens need a shared secret; use your identity provider otherwise)");
    };
    let now = now_unix();
    let mut claims = json!({"iss": issuer, "aud": audience, "iat": now, "nbf": now, "exp": now + ttl.as_secs().max(1)});
    claims[claim] = Value::from(subject);
    if plane == Plane::Admin {
        let roles_claim = config
            .approvers
            .as_ref()
            .map_or("roles", |a| a.roles_claim.as_str());
        claims[roles_claim] = json!(if roles.is_empty() {
            vec!["approver".to_owned()]
        } else {
            roles.to_vec()
        });
        if !amr.is_empty() {
            claims["amr"] = json!(amr);
        }
    }
    mint_hs256(kid, secret, &claims).map_err(anyhow::Error::msg)
}

async fn holds(cmd: HoldsCmd, admin: &str, token: &str, as_json: bool) -> anyhow::Result<ExitCode> {
    use http_body_util::{BodyExt, Full};
    let (method, path, body) = match &cmd {
        HoldsCmd::List { status } => (
            http::Method::GET,
            format!("/v1/holds?status={status}"),
            None,
        ),
        HoldsCmd::Show { id } => (http::Method::GET, format!("/v1/holds/{id}"), None),
        HoldsCmd::Approve { id, reason, window } => (
            http::Method::POST,
            format!("/v1/holds/{id}/approve"),
            Some(json!({"reason": reason, "for": window})),
        ),
        HoldsCmd::Deny { id, reason } => (
            http::Method::POST,
            format!("/v1/holds/{id}/deny"),
            Some(json!({"reason": reason})),
        ),
    };
    let req = http::Request::builder()
        .method(method)
        .uri(format!("{admin}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .context("invalid --admin URL")?;
    let client = toolgate::upstream::http_client();
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .context("the management plane did not answer within 30s")?
        .with_context(|| format!("cannot reach {admin}"))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .context("reading the answer")?
        .to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !status.is_success() {
        eprintln!(
            "toolgate: {} {}",
            status.as_u16(),
            v["error"]
                .as_str()
                .unwrap_or(status.canonical_reason().unwrap_or(""))
        );
        return Ok(ExitCode::from(1));
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    match cmd {
        HoldsCmd::List { .. } => {
            let holds = v["holds"].as_array().cloned().unwrap_or_default();
            if holds.is_empty() {
                println!("no holds");
            } else {
                println!(
                    "{:<32}  {:<9}  {:<16}  {:<24}  {:<9}  {:<24}  REASON",
                    "ID", "STATUS", "AGENT", "TOOL", "APPROVALS", "EXPIRES"
                );
                for h in holds {
                    println!(
                        "{:<32}  {:<9}  {:<16}  {:<24}  {:<9}  {:<24}  {}",
                        h["id"].as_str().unwrap_or(""),
                        h["status"].as_str().unwrap_or(""),
                        h["agent"].as_str().unwrap_or(""),
                        h["tool"].as_str().unwrap_or(""),
                        format!(
                            "{}/{}",
                            h["approvals"].as_array().map_or(0, Vec::len),
                            h["approvals_needed"]
                        ),
                        h["expires_at"].as_str().unwrap_or(""),
                        h["reason"].as_str().unwrap_or(""),
                    );
                }
            }
        }
        _ => print_hold(&v),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_hold(h: &Value) {
    let s = |k: &str| h[k].as_str().unwrap_or("-").to_owned();
    println!("hold       {}", s("id"));
    println!("status     {}", s("status"));
    println!("agent      {}", s("agent"));
    println!("tool       {}  (upstream {})", s("tool"), s("upstream"));
    println!("rule       {}", s("rule"));
    println!("reason     {}", s("reason"));
    println!("arguments  {}", h["arguments"]);
    println!(
        "created    {}   expires {}",
        s("created_at"),
        s("expires_at")
    );
    println!(
        "approvals  {}/{}",
        h["approvals"].as_array().map_or(0, Vec::len),
        h["approvals_needed"]
    );
    for a in h["approvals"].as_array().into_iter().flatten() {
        println!(
            "  - {} at {}{}",
            a["approver"].as_str().unwrap_or(""),
            a["at"].as_str().unwrap_or(""),
            a["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    if let Some(g) = h["grant_until"].as_str() {
        println!("window     identical calls pass until {g}");
    }
    if let Some(d) = h["deny_reason"].as_str() {
        println!("denied     {d}");
    }
}

async fn serve(config: Config, policy: PolicySet) -> anyhow::Result<()> {
    let server = Server::start(config, policy).await?;
    eprintln!("toolgate: agents connect to http://{}/mcp", server.addr);
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown(Duration::from_secs(30)).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn demo(listen: &str, tools_listen: &str) -> anyhow::Result<()> {
    use toolgate::config::Transport;
    use toolgate::demo::{ToolServer, CONFIG, MANIFESTS};
    let dir = std::env::temp_dir().join(format!("toolgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("tool-manifests"))?;
    std::fs::write(dir.join("toolgate.yaml"), CONFIG)?;
    for (name, text) in MANIFESTS {
        std::fs::write(dir.join("tool-manifests").join(name), text)?;
    }
    for var in ["TOOLGATE_AGENT_SECRET", "TOOLGATE_ADMIN_SECRET"] {
        if std::env::var(var).is_err() {
            std::env::set_var(var, uuid::Uuid::new_v4().simple().to_string());
        }
    }
    let mut config = Config::load(&dir.join("toolgate.yaml"))
        .map_err(|p| anyhow::anyhow!("embedded config:\n{p}"))?;
    let policy = PolicySet::load_dir(&config.manifests)
        .map_err(|p| anyhow::anyhow!("embedded manifests:\n{p}"))?;
    let tools = ToolServer::without_recording();
    let tools_addr = tools
        .start(tools_listen.parse().context("--tools-listen")?)
        .await?;
    config.upstreams[0].transport = Transport::Http {
        url: format!("http://{tools_addr}/mcp").parse()?,
        headers: Vec::new(),
        tls: None,
    };
    config.listen = listen.parse().context("--listen")?;
    // Free the admin port too if it is taken; the demo must start anywhere.
    if let Some(a) = &mut config.admin {
        if std::net::TcpListener::bind(a.listen).is_err() {
            a.listen = "127.0.0.1:0".parse()?;
        }
    }
    if std::net::TcpListener::bind(config.listen).is_err() {
        eprintln!("note: {} is busy; using a free port instead", config.listen);
        config.listen = "127.0.0.1:0".parse()?;
    }
    let token = token(
        &config,
        "billing-bot",
        Duration::from_secs(3600),
        Plane::Data,
        &[],
        &[],
    )?;
    let audit = config.audit_path.clone();
    let server = Server::start(config, policy).await?;
    let url = format!("http://{}/mcp", server.addr);
    let curl = |name: &str, args: &str| {
        format!(
            "curl -s {url} -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream' \\\n     -H 'MCP-Protocol-Version: 2026-07-28' -H 'Mcp-Method: tools/call' -H 'Mcp-Name: {name}' \\\n     -d '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{{\"name\":\"{name}\",\"arguments\":{args},\"_meta\":{{\"io.modelcontextprotocol/protocolVersion\":\"2026-07-28\",\"io.modelcontextprotocol/clientCapabilities\":{{}}}}}}}}'; echo"
        )
    };
    println!("toolgate demo is running.");
    println!("  agents connect to:  {url}   (MCP Streamable HTTP; revisions 2025-06-18, 2025-11-25, 2026-07-28)");
    println!("  demo tool server:   http://{tools_addr}/mcp   (tools exposed as billing__*)");
    println!(
        "  policy:             {}",
        dir.join("tool-manifests").display()
    );
    println!("  audit log:          {}", audit.display());
    println!();
    println!("A token for agent billing-bot (valid 1h):");
    println!("export TOKEN={token}");
    println!();
    println!("# allowed: the manifest lists get_invoice and the id matches its schema");
    println!(
        "{}",
        curl("billing__get_invoice", r#"{"invoice_id":"INV-000042"}"#)
    );
    println!("# denied (-32003): deny rule *__delete_* wins over everything");
    println!(
        "{}",
        curl("billing__delete_invoice", r#"{"invoice_id":"INV-000042"}"#)
    );
    println!("# schema error (-32602): every failure with its JSON pointer");
    println!(
        "{}",
        curl(
            "billing__get_invoice",
            r#"{"invoice_id":"42","extra":true}"#
        )
    );
    println!();
    println!("Then: toolgate audit verify {}", audit.display());
    println!("ready");
    shutdown_signal().await;
    server.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
