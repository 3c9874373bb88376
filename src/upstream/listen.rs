//! The standalone GET event stream of an upstream session: where a
//! Streamable-HTTP server of a session-based revision sends what is not
//! tied to a request, like `notifications/tools/list_changed`.
//!
//! As an MCP client SDK does, toolgate opens one for every upstream session
//! it holds that has an id: its own catalog session and each agent's (a
//! server may tell only the session whose call changed the tools). One task
//! per session, spawned when the session is opened; it ends when the
//! session's [`Guard`] drops (the session is forgotten, replaced or evicted
//! from the bounded map), on [`Streams::stop`], when the server no longer
//! knows the session (404) or refuses the request (another 4xx), and for
//! good on 405 or a 2xx that is not an event stream (the server offers no
//! stream: no session of this upstream opens one again). A stream that
//! drops or fails is reopened with a backoff doubling from 500 ms to 30 s.
//! A new session is used once the server answered its GET (at most 1 s
//! later), so that what the server sends about the session's first call is
//! not sent before anyone listens. Reopening sends the last event id the
//! server gave as `Last-Event-ID`, so a server that keeps events replays
//! what it sent while the stream was down, and waits the server's `retry`
//! delay when it gave one (a server may close the stream on purpose and
//! say when to come back); the catalog's 30 s cache still catches a change
//! a server without ids sent meanwhile. An event must be whole within the
//! upstream's timeout and no larger than its event limit, else the stream
//! is dropped and reopened later: a server trickling bytes costs toolgate
//! neither memory nor more than constant work per byte.
//!
//! 2026-07-28 upstreams are stateless and have no GET stream (their changes
//! come through `subscriptions/listen`); a session-era server that issues no
//! session id gets none either (there is no session for it to belong to).
//!
//! Only `notifications/tools/list_changed` is acted on: it sets the
//! upstream's `tools_changed`, and the catalog is fetched again. Other
//! notifications are logged at debug. Server requests on this stream
//! (sampling, elicitation or ping not tied to a call) are out of scope:
//! there is no agent call to relay them to, so they are logged and left
//! unanswered. Nothing read here is forwarded to agents.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::{oneshot, watch};

use super::{connect_reason, HttpClient, Session, SseReader};
use crate::mcp;

/// The first wait before reopening a stream, doubled per failure.
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// The longest wait before reopening a stream.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// A stream open this long was healthy: after it drops, the backoff
/// starts again from [`FIRST_RETRY`].
const STABLE: Duration = Duration::from_secs(30);
/// How long opening a session waits for the server to answer its GET, so
/// that what the server sends there about the session's first call is
/// heard.
const READY_WAIT: Duration = Duration::from_secs(1);

/// Ends its session's stream when dropped (held with the session).
#[derive(Debug)]
pub(crate) struct Guard {
    _cancel: oneshot::Sender<()>,
}

/// One upstream's GET streams: what opening one needs, and their state.
pub(crate) struct Streams {
    name: String,
    url: http::Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    client: HttpClient,
    /// How long the server may take to answer a GET (not the stream).
    timeout: Duration,
    /// The largest event (and unfinished event) accepted.
    max_event: usize,
    tools_changed: Arc<AtomicBool>,
    /// The server offers no GET stream (it answered 405).
    unsupported: AtomicBool,
    /// The server once took longer than [`READY_WAIT`] to answer a GET
    /// (it may hold the answer back until it has an event): sessions are
    /// no longer kept waiting for it.
    slow: AtomicBool,
    /// Streams' tasks running.
    running: AtomicUsize,
    stop: watch::Sender<bool>,
}

/// How one GET ended.
enum End {
    /// 405, or a 2xx that is not an event stream.
    NotOffered(String),
    /// 404: the server no longer knows the session.
    SessionGone,
    /// Another 4xx, which repeating will not change.
    Refused(StatusCode),
    /// A stream that was open ended or broke.
    Dropped(Instant, String),
    /// No stream was opened (unreachable, 5xx, 409, 429), or it sent an
    /// event over the size limit or too slowly.
    Failed(String),
}

/// Counts a running task for as long as it lives.
struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Streams {
    pub(crate) fn new(
        name: String,
        url: http::Uri,
        headers: Vec<(HeaderName, HeaderValue)>,
        client: HttpClient,
        timeout: Duration,
        max_event: usize,
        tools_changed: Arc<AtomicBool>,
    ) -> Self {
        Streams {
            name,
            url,
            headers,
            client,
            timeout,
            max_event,
            tools_changed,
            unsupported: AtomicBool::new(false),
            slow: AtomicBool::new(false),
            running: AtomicUsize::new(0),
            stop: watch::channel(false).0,
        }
    }

    /// Opens `session`'s stream, unless it has none (stateless, no id) or
    /// the server offers none or toolgate is stopping. Returns the guard
    /// that ends it and a signal that fires once the server answered the
    /// first GET (whatever it answered) or the attempt failed.
    pub(crate) fn open(
        self: &Arc<Self>,
        session: &Session,
    ) -> Option<(Guard, oneshot::Receiver<()>)> {
        if session.version == mcp::V2026_07_28
            || session.id.is_none()
            || self.unsupported.load(Ordering::Acquire)
            || *self.stop.borrow()
        {
            return None;
        }
        let (cancel_tx, cancel) = oneshot::channel();
        let (ready_tx, ready) = oneshot::channel();
        self.running.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(self.clone().run(session.clone(), cancel, ready_tx));
        Some((Guard { _cancel: cancel_tx }, ready))
    }

    /// Waits, bounded, for a session's stream to be answered (`ready`
    /// from [`Streams::open`]).
    pub(crate) async fn wait_ready(&self, ready: oneshot::Receiver<()>) {
        if self.slow.load(Ordering::Relaxed) {
            return;
        }
        if tokio::time::timeout(READY_WAIT, ready).await.is_err() {
            self.slow.store(true, Ordering::Relaxed);
            tracing::debug!(upstream.name = %self.name, "upstream is slow to answer GET; new sessions no longer wait for it");
        }
    }

    /// Streams' tasks running now.
    pub(crate) fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Ends every stream, and opens no more (shutdown).
    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
    }

    async fn run(
        self: Arc<Self>,
        session: Session,
        mut cancel: oneshot::Receiver<()>,
        ready: oneshot::Sender<()>,
    ) {
        let _running = Running(&self.running);
        let mut stop = self.stop.subscribe();
        let mut ready = Some(ready);
        let mut backoff = FIRST_RETRY;
        // One reader for all of the session's streams: it keeps the last
        // event id the server gave (sent as `Last-Event-ID` on reopening,
        // so that it replays what it sent while the stream was down) and
        // its `retry` delay.
        let mut sse = SseReader::default();
        loop {
            let end = tokio::select! {
                _ = &mut cancel => return,
                _ = stop.wait_for(|s| *s) => return,
                end = self.once(&session, &mut ready, &mut sse) => end,
            };
            match end {
                End::NotOffered(why) => {
                    tracing::info!(upstream.name = %self.name, reason = %why, "upstream offers no GET stream; tool list changes are heard on call streams only");
                    return;
                }
                End::SessionGone => {
                    tracing::debug!(upstream.name = %self.name, "upstream session gone; its GET stream ends");
                    return;
                }
                End::Refused(status) => {
                    tracing::warn!(upstream.name = %self.name, status = status.as_u16(), "upstream refused the GET stream; not retried for this session");
                    return;
                }
                End::Dropped(opened, why) => {
                    if opened.elapsed() >= STABLE {
                        backoff = FIRST_RETRY;
                    }
                    // A server that closes its stream on purpose (SSE
                    // polling) says when to come back.
                    if let Some(r) = sse.retry() {
                        backoff = r;
                    }
                    tracing::debug!(upstream.name = %self.name, reason = %why, retry_ms = backoff.as_millis() as u64, "upstream GET stream ended; reopening");
                }
                End::Failed(why) => {
                    tracing::debug!(upstream.name = %self.name, reason = %why, retry_ms = backoff.as_millis() as u64, "cannot open the upstream GET stream; retrying");
                }
            }
            tokio::select! {
                _ = &mut cancel => return,
                _ = stop.wait_for(|s| *s) => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_RETRY);
        }
    }

    /// One GET: reads its events until it ends. `ready` fires once the
    /// answer's status is known (and a 405 recorded), or the GET failed.
    async fn once(
        &self,
        s: &Session,
        ready: &mut Option<oneshot::Sender<()>>,
        sse: &mut SseReader,
    ) -> End {
        let mut fire = || {
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
        };
        sse.discard_partial();
        let req = super::stream_request(&self.url, &self.headers, s, sse.last_id().cloned());
        let resp = match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                fire();
                return End::Failed(connect_reason(&e));
            }
            Err(_) => {
                fire();
                return End::Failed("timed out".into());
            }
        };
        let status = resp.status();
        let is_sse = super::is_event_stream(resp.headers());
        let end = match status {
            StatusCode::METHOD_NOT_ALLOWED => Some(End::NotOffered("HTTP 405".into())),
            s if s.is_success() && !is_sse => Some(End::NotOffered(format!(
                "HTTP {} without an event stream",
                s.as_u16()
            ))),
            s if s.is_success() => None,
            StatusCode::NOT_FOUND => Some(End::SessionGone),
            s if !super::retry_may_help(s) => Some(End::Refused(s)),
            s => Some(End::Failed(format!("HTTP {}", s.as_u16()))),
        };
        if matches!(end, Some(End::NotOffered(_))) {
            // Recorded before `ready` fires, so a session opened next does
            // not try again.
            self.unsupported.store(true, Ordering::Release);
        }
        fire();
        if let Some(end) = end {
            return end;
        }
        let opened = Instant::now();
        let mut body = resp.into_body();
        // When the event being received began: it must be whole within
        // `timeout`, so a server trickling an event (or stalling in one)
        // holds neither its bytes nor the stream for longer.
        let mut begun: Option<Instant> = None;
        loop {
            let next = match begun {
                None => body.frame().await,
                Some(t) => {
                    let until = tokio::time::Instant::from_std(t + self.timeout);
                    match tokio::time::timeout_at(until, body.frame()).await {
                        Ok(next) => next,
                        Err(_) => {
                            return End::Failed("an event took longer than the timeout".into())
                        }
                    }
                }
            };
            let Some(frame) = next else { break };
            let frame = match frame {
                Ok(f) => f,
                Err(e) => return End::Dropped(opened, e.to_string()),
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let seen = sse.events();
            for event in sse.push(&data) {
                self.event(&event);
            }
            if sse.pending() > self.max_event {
                return End::Failed("an event is larger than the limit".into());
            }
            begun = match sse.pending() {
                0 => None,
                _ if begun.is_none() || sse.events() > seen => Some(Instant::now()),
                _ => begun,
            };
        }
        End::Dropped(opened, "closed by the server".into())
    }

    /// Acts on one event's data.
    fn event(&self, data: &[u8]) {
        let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(data) else {
            tracing::debug!(upstream.name = %self.name, "not a JSON-RPC message on the GET stream; ignored");
            return;
        };
        let method = o.get("method").and_then(Value::as_str);
        match (method, o.contains_key("id")) {
            (Some("notifications/tools/list_changed"), false) => {
                tracing::debug!(upstream.name = %self.name, "upstream tools changed (GET stream)");
                self.tools_changed.store(true, Ordering::Relaxed);
            }
            (Some(m), false) => {
                tracing::debug!(upstream.name = %self.name, method = m, "notification on the GET stream ignored");
            }
            // Out of scope: a server request outside any call has no agent
            // to be relayed to; it is not answered.
            (Some(m), true) => {
                tracing::debug!(upstream.name = %self.name, method = m, "server request on the GET stream not answered");
            }
            (None, _) => {
                tracing::debug!(upstream.name = %self.name, "response on the GET stream ignored");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::Request;
    use http_body_util::Full;
    use std::sync::Mutex;

    /// A server whose GETs answer, in turn, `answers` (status, body; the
    /// last repeats), recording each GET's headers.
    async fn server(
        answers: Vec<(u16, &'static str)>,
    ) -> (String, Arc<Mutex<Vec<http::HeaderMap>>>) {
        serve(answers, false).await
    }

    /// A body that sends `.0` and then neither more nor its end.
    struct Stalled(Option<Bytes>);

    impl http_body::Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            match self.get_mut().0.take() {
                Some(b) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(b)))),
                None => std::task::Poll::Pending,
            }
        }
    }

    /// As [`server`]; with `stall`, each body is sent but never ended.
    async fn serve(
        answers: Vec<(u16, &'static str)>,
        stall: bool,
    ) -> (String, Arc<Mutex<Vec<http::HeaderMap>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/mcp", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(answers);
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (s, answers) = (s.clone(), answers.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (s, answers) = (s.clone(), answers.clone());
                            async move {
                                let n = {
                                    let mut s = s.lock().unwrap();
                                    s.push(req.headers().clone());
                                    s.len() - 1
                                };
                                let (status, body) = answers[n.min(answers.len() - 1)];
                                let body = Bytes::from_static(body.as_bytes());
                                let body = match stall {
                                    true => Stalled(Some(body)).boxed(),
                                    false => Full::new(body).boxed(),
                                };
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .header("content-type", "text/event-stream")
                                        .body(body)
                                        .unwrap(),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (url, seen)
    }

    fn streams(url: &str) -> (Arc<Streams>, Arc<AtomicBool>) {
        let changed = Arc::new(AtomicBool::new(false));
        let s = Streams::new(
            "t".into(),
            url.parse().unwrap(),
            vec![(
                HeaderName::from_static("x-upstream-key"),
                HeaderValue::from_static("k"),
            )],
            super::super::http_client(),
            Duration::from_secs(2),
            1024,
            changed.clone(),
        );
        (Arc::new(s), changed)
    }

    fn session(id: Option<&'static str>, version: &'static str) -> Session {
        Session {
            version,
            id: id.map(HeaderValue::from_static),
        }
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[tokio::test]
    async fn a_dropped_stream_is_reopened_and_hears_list_changed() {
        let (url, seen) = server(vec![
            (200, ": nothing yet\n\n"),
            (
                200,
                "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/tools/list_changed\"}\n\n",
            ),
        ])
        .await;
        let (streams, changed) = streams(&url);
        let (guard, ready) = streams
            .open(&session(Some("s-1"), mcp::V2025_11_25))
            .unwrap();
        ready.await.unwrap();
        until("list_changed is heard", || changed.load(Ordering::Relaxed)).await;
        let h = seen.lock().unwrap()[1].clone();
        assert_eq!(h["accept"], "text/event-stream");
        assert_eq!(h["mcp-session-id"], "s-1");
        assert_eq!(h["mcp-protocol-version"], "2025-11-25");
        assert_eq!(h["x-upstream-key"], "k");
        assert_eq!(streams.running(), 1);
        drop(guard);
        until("the task ends with its guard", || streams.running() == 0).await;
    }

    /// A reopened stream resumes where the last one stopped: it sends the
    /// last event id the server gave, after the server's `retry` delay.
    #[tokio::test]
    async fn a_reopened_stream_sends_the_last_event_id_after_the_servers_retry() {
        let (url, seen) = server(vec![
            (
                200,
                "id: ev-1\nretry: 400\ndata: \n\nid: ev-2\ndata: {}\n\n: no id here\n\n",
            ),
            (200, "retry: 100\n\n"),
            (200, ": still nothing\n\n"),
        ])
        .await;
        let (streams, _) = streams(&url);
        let started = Instant::now();
        let (_guard, ready) = streams
            .open(&session(Some("s-1"), mcp::V2025_11_25))
            .unwrap();
        ready.await.unwrap();
        until("the stream is reopened twice", || {
            seen.lock().unwrap().len() >= 3
        })
        .await;
        let seen = seen.lock().unwrap().clone();
        assert!(seen[0].get("last-event-id").is_none());
        // The second GET gave no id: the third still resumes from ev-2.
        assert_eq!(seen[1]["last-event-id"], "ev-2");
        assert_eq!(seen[2]["last-event-id"], "ev-2");
        assert_eq!(seen[1]["mcp-session-id"], "s-1");
        // 400 ms (not the 500 ms default backoff), then 100 ms.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(500), "{took:?}");
        assert!(took < Duration::from_millis(1400), "{took:?}");
    }

    /// A server that starts an event and stalls in it (or trickles it)
    /// holds the stream no longer than the timeout: it is dropped, and
    /// reopened.
    #[tokio::test]
    async fn an_event_not_whole_within_the_timeout_drops_the_stream() {
        let (url, seen) = serve(
            vec![(200, ": hello\n\nid: ev-1\n\ndata: {\"jsonrpc\":")],
            true,
        )
        .await;
        let (streams, changed) = streams(&url);
        let started = Instant::now();
        let (_guard, ready) = streams
            .open(&session(Some("s-1"), mcp::V2025_11_25))
            .unwrap();
        ready.await.unwrap();
        until("the stalled stream is reopened", || {
            seen.lock().unwrap().len() >= 2
        })
        .await;
        // The 2 s timeout, then the 500 ms backoff.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(2400), "{took:?}");
        assert_eq!(seen.lock().unwrap()[1]["last-event-id"], "ev-1");
        assert!(!changed.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_405_stops_the_stream_for_every_session() {
        let (url, seen) = server(vec![(405, "")]).await;
        let (streams, _) = streams(&url);
        let (_guard, ready) = streams
            .open(&session(Some("s-1"), mcp::V2025_11_25))
            .unwrap();
        ready.await.unwrap();
        until("the task gives up", || streams.running() == 0).await;
        assert!(streams
            .open(&session(Some("s-2"), mcp::V2025_11_25))
            .is_none());
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn stateless_and_idless_sessions_and_a_stopped_upstream_open_none() {
        let (url, seen) = server(vec![(200, "")]).await;
        let (streams, _) = streams(&url);
        assert!(streams.open(&session(None, mcp::V2026_07_28)).is_none());
        assert!(streams.open(&session(None, mcp::V2025_11_25)).is_none());
        let (_guard, ready) = streams
            .open(&session(Some("s-1"), mcp::V2025_06_18))
            .unwrap();
        ready.await.unwrap();
        streams.stop();
        until("stop ends the task", || streams.running() == 0).await;
        assert!(streams
            .open(&session(Some("s-2"), mcp::V2025_11_25))
            .is_none());
        assert!(!seen.lock().unwrap().is_empty());
    }
}
