//! Listeners, wiring of shared state, background tasks, graceful shutdown.
//!
//! [`Server::start`] loads nothing itself: it takes a validated [`Config`]
//! and [`PolicySet`], opens the audit log, binds the listeners (port 0 is
//! fine, for tests) and returns a handle with the bound addresses and a
//! shutdown trigger. Each background task stops on the shutdown signal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::Auditor;
use crate::config::{normalize_path, Config};
use crate::gate::{Body, Gate};
use crate::hold::Holds;
use crate::manifest::PolicySet;
use crate::policy::Guard;
use crate::upstream::{http_client, Upstream};

mod wake;

/// Most connections served at once per listener.
pub const MAX_CONNECTIONS: usize = 10_000;

/// A running toolgate.
pub struct Server {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub gate: Gate,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    audit_task: tokio::task::JoinHandle<()>,
}

/// Builds the escalation guard for a config.
pub fn guard_for(config: &Config) -> Guard {
    let state = &config.state;
    let mut files: Vec<PathBuf> = vec![
        config.path.clone(),
        config.audit_path.clone(),
        state.clone(),
    ];
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut s = state.clone().into_os_string();
        s.push(suffix);
        files.push(PathBuf::from(s));
    }
    files.extend(config.key_files.iter().cloned());
    let cwd = std::env::current_dir()
        .map(|d| normalize_path(&d))
        .unwrap_or_default();
    Guard::new(
        config.escalation.tools.clone(),
        files,
        vec![config.manifests.clone()],
        cwd,
        normalize_path,
    )
}

impl Server {
    /// Starts serving `config` with `policy`.
    pub async fn start(config: Config, policy: PolicySet) -> anyhow::Result<Server> {
        let (auditor, audit_task) =
            Auditor::start_signed(&config.audit_path, config.checkpoints.clone())
                .map_err(|e| anyhow::anyhow!(e))?;
        let client = http_client();
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| {
                Arc::new(Upstream::new(
                    u,
                    client.clone(),
                    config.limits.upstream_timeout,
                    config.limits.max_upstream_body,
                ))
            })
            .collect();
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let addr = listener.local_addr()?;
        let admin_listener = match &config.admin {
            Some(a) => Some(
                TcpListener::bind(a.listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {} (admin): {e}", a.listen))?,
            ),
            None => None,
        };
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
        let guard = guard_for(&config);
        let holds = Holds::open(&config.state, config.holds.ttl).map_err(|e| anyhow::anyhow!(e))?;
        let gate = Gate::new(config, policy, upstreams, auditor, guard, holds);
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = Vec::new();

        let g = gate.clone();
        tasks.push(tokio::spawn(serve(listener, rx.clone(), move |req| {
            let g = g.clone();
            async move { g.handle(req).await }
        })));
        if let Some(l) = admin_listener {
            let g = gate.clone();
            tasks.push(tokio::spawn(serve(l, rx.clone(), move |req| {
                let g = g.clone();
                async move { crate::admin::handle(&g, req).await }
            })));
        }
        // Fetch the tool catalog early so the first calls need not wait.
        let g = gate.clone();
        let mut stop = rx.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = g.catalog(true) => {}
                _ = stop.changed() => {}
            }
        }));
        // Reload manifests when their files change.
        tasks.push(tokio::spawn(gate.clone().watch_manifests(rx.clone())));
        // Expire holds past their ttl (auditing each); alert on audit
        // write errors.
        let g = gate.clone();
        let mut stop = rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut write_errors = 0;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        expire_holds(&g).await;
                        let now = g.0.auditor.write_errors();
                        if now > write_errors {
                            g.0.raise(&crate::alert::Alert {
                                kind: "audit_write_error",
                                agent: None,
                                message: format!("{} audit write error(s); calls are refused until the log is writable", now - write_errors),
                                detail: serde_json::json!({"path": g.0.auditor.path().display().to_string(), "healthy": g.0.auditor.healthy()}),
                            });
                            write_errors = now;
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
        }));
        // An upstream said its tools changed: refresh the catalog now (not
        // at the next call), so agents' GET streams hear of it.
        let g = gate.clone();
        let mut stop = rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let changed = g.0.upstreams.iter().any(|u| {
                            u.tools_changed.load(std::sync::atomic::Ordering::Relaxed)
                        });
                        if changed {
                            g.catalog(false).await;
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
        }));
        // Housekeeping: idle limiter keys and sessions.
        let g = gate.clone();
        let mut stop = rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        g.0.snapshot.load().limiters.reclaim();
                        g.0.sessions.sweep();
                    }
                    _ = stop.changed() => break,
                }
            }
        }));
        tracing::info!(listen = %addr, admin = ?admin_addr, "toolgate serving");
        Ok(Server {
            addr,
            admin_addr,
            gate,
            shutdown,
            tasks,
            audit_task,
        })
    }

    /// Stops accepting, lets in-flight requests finish (up to `deadline`),
    /// and flushes the audit log.
    pub async fn shutdown(self, deadline: Duration) {
        let _ = self.shutdown.send(true);
        let all = async {
            for t in self.tasks {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!("in-flight requests did not finish before the deadline");
        }
        for u in &self.gate.0.upstreams {
            u.shutdown().await;
        }
        self.gate.0.auditor.flush().await;
        drop(self.gate);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.audit_task).await;
    }
}

/// Marks due holds expired and audits each.
pub async fn expire_holds(g: &Gate) {
    match g.0.holds.expire_due().await {
        Ok(expired) => {
            for h in expired {
                g.0.audit(crate::audit::Record {
                    event: "hold_expired",
                    agent: Some(std::sync::Arc::from(h.agent.as_str())),
                    tool: Some(h.tool.clone()),
                    decision: Some("expired"),
                    rule: Some(h.rule.clone()),
                    reason: Some("no decision within holds.ttl".into()),
                    args_sha256: Some(h.args_sha256.clone()),
                    hold_id: Some(h.id.clone()),
                    ..Default::default()
                });
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot expire holds"),
    }
}

/// Accept loop: HTTP/1.1 and HTTP/2, bounded connections, header timeout,
/// graceful on shutdown.
async fn serve<F, Fut>(listener: TcpListener, mut stop: watch::Receiver<bool>, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(64 * 1024)
        .max_concurrent_streams(256);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => break,
        };
        let (stream, _peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let svc = service_fn(move |req| {
            let h = h.clone();
            async move { Ok::<_, std::convert::Infallible>(h(req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        // The connection's own wake-ups (hyper's body channel, when the
        // handler reads the request body) are served in the same turn.
        let conn = wake::Coalesced::new(graceful.watch(conn));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::io::{Read, Write};

    #[test]
    fn the_guard_protects_the_key_files_the_config_names() {
        let dir = crate::scratch::Scratch::new("guard-keys").unwrap();
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        std::fs::write(
            dir.join("keys/agent.secret"),
            "0123456789abcdef0123456789abcdef",
        )
        .unwrap();
        std::fs::write(dir.join("keys/audit.key"), "x").unwrap();
        let yaml = "auth:\n  agents:\n    issuer: i\n    audience: a\n    keys:\n      - hs256: { secret_file: keys/agent.secret }\n";
        let config = Config::from_yaml(&dir.join("toolgate.yaml"), yaml).unwrap();
        let g = guard_for(&config);
        let secret = dir.join("keys/agent.secret").canonicalize().unwrap();
        assert!(g.names_policy_path(&secret.display().to_string()));
        assert!(g.names_policy_path(&format!("cat {}", secret.display())));
        let sibling = secret.with_file_name("other");
        assert!(!g.names_policy_path(&sibling.display().to_string()));
        assert!(!g.names_policy_path("/srv/data/x"));
    }

    /// One POST with a body on a kept-alive connection; returns the body.
    fn call(s: &mut std::net::TcpStream, body: &[u8]) -> Vec<u8> {
        let head = format!(
            "POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(&[head.as_bytes(), body].concat()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed");
            got.extend_from_slice(&buf[..n]);
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("a content-length");
                if got.len() >= end + 4 + len {
                    return got[end + 4..end + 4 + len].to_vec();
                }
            }
        }
    }

    /// Every tools/call reads its request body. On two workers, called one
    /// request at a time, a call should keep to the worker serving it: that
    /// worker parks once per call, waiting for the next request. Without
    /// `wake::Coalesced`, reading the body woke the connection's own task,
    /// tokio woke the idle worker to run it, and each call parked a worker
    /// twice (measured: 2.0 parks per call; 1.0 with it).
    #[test]
    fn reading_the_body_keeps_the_call_on_one_worker() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, rx) = watch::channel(false);
        rt.spawn(serve(listener, rx, |req: Request<Incoming>| async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Response::new(Full::new(body).map_err(|e| match e {}).boxed())
        }));
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#;
        for _ in 0..50 {
            assert_eq!(call(&mut s, body), body);
        }
        let m = rt.metrics();
        let parks = || {
            (0..m.num_workers())
                .map(|w| m.worker_park_count(w))
                .sum::<u64>()
        };
        const CALLS: u64 = 500;
        let before = parks();
        for _ in 0..CALLS {
            call(&mut s, body);
        }
        let per_call = (parks() - before) as f64 / CALLS as f64;
        assert!(per_call < 1.5, "{per_call:.2} worker parks per call");
    }
}
