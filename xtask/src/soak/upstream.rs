//! The soak's upstream app: a hyper server on each of `wire::ALL_PORTS`, on the machine
//! namespace's loopback (where the daemon routes). Routes (see `wire::path`):
//!
//! - `GET /small/<seed>/<n>`: n pattern bytes; `POST /echo`: the body back, streamed;
//! - `GET /sse/<seed>/<events>/<interval_ms>`: server-sent events, one write each;
//! - upgrades: `/ws` (WebSocket echo), `/bulk/…` (raw tunnel, pattern bytes both ways,
//!   checked here, then a verdict), `/raw/echo`, `/raw/reset/<n>`.
//!
//! Every response names its port in `x-port`, so a misrouted request shows. Two ports
//! close idle keep-alive connections on a short timer (`wire::idle_close`), which keeps
//! the daemon's upstream pool churning. The gauges count live connections and upgraded
//! sessions: both must be back to zero once the clients are gone.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::record::Kind;
use super::traffic::send_pattern;
use super::wire::{self, IdleClose};
use super::Env;
use tests::pattern;

type Body = BoxBody<Bytes, io::Error>;

/// Live objects of the upstream app.
#[derive(Default)]
pub struct Gauges {
    /// HTTP connections accepted and not yet closed (upgraded ones move to `sessions`).
    pub connections: AtomicI64,
    /// Upgraded connections still open.
    pub sessions: AtomicI64,
}

/// Counts one live object for as long as it exists.
struct Live(Arc<Env>, fn(&Gauges) -> &AtomicI64);

impl Live {
    fn new(env: &Arc<Env>, which: fn(&Gauges) -> &AtomicI64) -> Live {
        which(&env.upstream).fetch_add(1, Ordering::Relaxed);
        Live(env.clone(), which)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        (self.1)(&self.0.upstream).fetch_sub(1, Ordering::Relaxed);
    }
}

/// Longest an upgraded session may stay open: the clients end theirs well before, so
/// one still open means the daemon kept a tunnel whose client had gone.
const SESSION_LIMIT: Duration = Duration::from_secs(120);

/// Binds every port and serves until the runtime ends.
pub fn start(env: &Arc<Env>) -> Result<()> {
    for port in wire::ALL_PORTS {
        let listener = env.topo.machine.listen(tests::v4(port))?;
        let env = env.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, port, env.clone()));
            }
        });
    }
    Ok(())
}

async fn connection(stream: TcpStream, port: u16, env: Arc<Env>) {
    let _live = Live::new(&env, |g| &g.connections);
    let epoch = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let io = Tracked {
        stream,
        epoch,
        last: last.clone(),
    };
    let service_env = env.clone();
    let service = hyper::service::service_fn(move |req| route(req, port, service_env.clone()));
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let limit = match wire::idle_close(port) {
        IdleClose::Never => {
            let _ = conn.await;
            return;
        }
        IdleClose::Silently(d) | IdleClose::Announced(d) => d,
    };
    tokio::pin!(conn);
    loop {
        let idle = epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
        if idle >= limit {
            // Dropping the connection closes the socket: a FIN, or a reset when a
            // request had already arrived unread (what Node does).
            return;
        }
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep(limit - idle) => {}
        }
    }
}

/// A TCP stream that remembers when bytes last moved (the idle-close timer).
struct Tracked {
    stream: TcpStream,
    epoch: Instant,
    /// Milliseconds after `epoch`.
    last: Arc<AtomicU64>,
}

impl Tracked {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|n| match n {}).boxed()
}

fn status(code: StatusCode, text: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(text));
    *resp.status_mut() = code;
    resp
}

async fn route(
    req: Request<Incoming>,
    port: u16,
    env: Arc<Env>,
) -> Result<Response<Body>, Infallible> {
    let mut resp = answer(req, env)
        .unwrap_or_else(|| status(StatusCode::BAD_REQUEST, "unknown route or bad numbers"));
    let headers = resp.headers_mut();
    headers.insert("x-port", port.into());
    if let IdleClose::Announced(d) = wire::idle_close(port) {
        if let Ok(v) = format!("timeout={}", d.as_secs()).parse() {
            headers.insert("keep-alive", v);
        }
    }
    Ok(resp)
}

/// The response to a request; `None` for a path this app does not know.
fn answer(mut req: Request<Incoming>, env: Arc<Env>) -> Option<Response<Body>> {
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let upgrade = req.headers().contains_key("upgrade");
    let method = req.method().as_str().to_owned();
    Some(match (method.as_str(), parts.as_slice(), upgrade) {
        ("GET", ["small", seed, n], false) => {
            let body = pattern::bytes(seed.parse().ok()?, n.parse().ok()?);
            Response::new(full(body))
        }
        ("POST", ["echo"], false) => {
            Response::new(req.into_body().map_err(io::Error::other).boxed())
        }
        ("GET", ["sse", seed, events, interval], false) => sse(
            seed.parse().ok()?,
            events.parse().ok()?,
            interval.parse().ok()?,
        ),
        ("GET", ["ws"], true) => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let _live = Live::new(&env, |g| &g.sessions);
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                if tokio::time::timeout(SESSION_LIMIT, ws_echo(ws))
                    .await
                    .is_err()
                {
                    env.record.fail(
                        Kind::WebSocket,
                        "upstream side: a WebSocket stayed open past the session limit",
                    );
                }
            });
            switching(&req)
        }
        ("GET", ["bulk", seed, down, up, rate], true) => {
            let (seed, down, up, rate) = (
                seed.parse().ok()?,
                down.parse().ok()?,
                up.parse().ok()?,
                rate.parse().ok()?,
            );
            let resp = switching(&req);
            tokio::spawn(async move {
                let _live = Live::new(&env, |g| &g.sessions);
                let Some((stream, early)) = raw(&mut req).await else {
                    return;
                };
                if let Err(e) = bulk(stream, early, seed, down, up, rate, &env).await {
                    env.record
                        .fail(Kind::Bulk, format!("upstream side, seed {seed}: {e:#}"));
                }
            });
            resp
        }
        ("GET", ["raw", "echo"], true) => {
            let resp = switching(&req);
            tokio::spawn(async move {
                let _live = Live::new(&env, |g| &g.sessions);
                let Some((stream, early)) = raw(&mut req).await else {
                    return;
                };
                if let Err(e) = raw_echo(stream, early).await {
                    env.record
                        .fail(Kind::UpgradeChurn, format!("upstream side, echo: {e:#}"));
                }
            });
            resp
        }
        ("GET", ["raw", "reset", n], true) => {
            let n: usize = n.parse().ok()?;
            let resp = switching(&req);
            tokio::spawn(async move {
                let _live = Live::new(&env, |g| &g.sessions);
                let Some((stream, early)) = raw(&mut req).await else {
                    return;
                };
                if let Err(e) = raw_reset(stream, early, n).await {
                    env.record
                        .fail(Kind::UpgradeChurn, format!("upstream side, reset: {e:#}"));
                }
            });
            resp
        }
        _ => return None,
    })
}

/// Events one write at a time, `interval_ms` apart; the client checks each in order.
fn sse(seed: u64, events: u32, interval_ms: u64) -> Response<Body> {
    let frames = futures_util::stream::unfold(0u32, move |i| async move {
        if i >= events {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(interval_ms)).await;
        }
        let event = Bytes::from(wire::sse_event(seed, i));
        Some((Ok::<_, io::Error>(Frame::data(event)), i + 1))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    let h = resp.headers_mut();
    h.insert("content-type", "text/event-stream".parse().unwrap());
    h.insert("cache-control", "no-cache".parse().unwrap());
    resp
}

fn switching(req: &Request<Incoming>) -> Response<Body> {
    let mut resp = status(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    let h = resp.headers_mut();
    h.insert("connection", "upgrade".parse().unwrap());
    h.insert("upgrade", "websocket".parse().unwrap());
    if let Some(key) = req.headers().get("sec-websocket-key") {
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        if let Ok(v) = accept.parse() {
            h.insert("sec-websocket-accept", v);
        }
    }
    resp
}

/// The upgraded connection's TCP stream, and the bytes hyper had read past the request.
async fn raw(req: &mut Request<Incoming>) -> Option<(TcpStream, Bytes)> {
    let upgraded = hyper::upgrade::on(req).await.ok()?;
    let parts = upgraded.downcast::<TokioIo<Tracked>>().ok()?;
    Some((parts.io.into_inner().stream, parts.read_buf))
}

async fn ws_echo(mut ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>) {
    // Reading on after a Close lets tungstenite send the reply Close before the end.
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

/// Sends `down` bytes (paced) while checking the client's `up` bytes up to its EOF; then
/// the verdict and a clean close.
async fn bulk(
    stream: TcpStream,
    early: Bytes,
    seed: u64,
    down: u64,
    up: u64,
    rate: u64,
    env: &Env,
) -> Result<()> {
    // Paced transfers take size/rate; anything far beyond is a stall.
    let limit = Duration::from_secs(30 + 2 * down.max(up) / rate.max(1));
    let (mut rd, mut wr) = stream.into_split();
    let reader = async {
        let mut v = pattern::Verifier::new(wire::up_seed(seed));
        v.feed(&early)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            v.feed(&buf[..n])?;
            ensure!(
                v.received <= up,
                "more than the {up} bytes sent (duplication)"
            );
        }
        ensure!(v.received == up, "EOF after {} of {up} bytes", v.received);
        anyhow::Ok(v.received)
    };
    let writer = send_pattern(&mut wr, wire::down_seed(seed), down, rate);
    let (got, sent) = tokio::time::timeout(limit, async { tokio::join!(reader, writer) })
        .await
        .map_err(|_| anyhow::anyhow!("not done within {limit:?}"))?;
    sent?;
    let verdict = match got {
        Ok(n) => {
            env.record.checked(Kind::Bulk, n);
            wire::VERDICT_OK
        }
        Err(e) => {
            env.record
                .fail(Kind::Bulk, format!("upstream side, seed {seed}: {e:#}"));
            wire::VERDICT_WRONG
        }
    };
    wr.write_all(verdict).await?;
    wr.shutdown().await?;
    Ok(())
}

/// Echoes until the client's EOF (then EOF back) or its reset (the churn's client resets).
async fn raw_echo(mut stream: TcpStream, early: Bytes) -> Result<()> {
    let session = async {
        stream.write_all(&early).await?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                // The client reset its side; the daemon passed it on.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            match stream.write_all(&buf[..n]).await {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e.into()),
            }
        }
        stream.shutdown().await?;
        anyhow::Ok(())
    };
    match tokio::time::timeout(SESSION_LIMIT, session).await {
        Ok(r) => r,
        Err(_) => bail!("still open after {SESSION_LIMIT:?}: the client's end never arrived"),
    }
}

/// Echoes `n` bytes, then on the next byte resets the connection.
async fn raw_reset(mut stream: TcpStream, early: Bytes, n: usize) -> Result<()> {
    let session = async {
        let mut got = early.to_vec();
        let mut buf = vec![0u8; 64 * 1024];
        while got.len() < n {
            let k = stream.read(&mut buf).await?;
            ensure!(k > 0, "EOF after {} of {n} bytes", got.len());
            got.extend_from_slice(&buf[..k]);
        }
        ensure!(
            got.len() == n,
            "{} bytes before the echo, expected {n}",
            got.len()
        );
        stream.write_all(&got).await?;
        // The client asks for the reset only after it read the echo.
        let mut one = [0u8; 1];
        let k = stream.read(&mut one).await?;
        ensure!(k == 1, "EOF before the reset request");
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
        drop(stream);
        anyhow::Ok(())
    };
    match tokio::time::timeout(SESSION_LIMIT, session).await {
        Ok(r) => r,
        Err(_) => bail!("still open after {SESSION_LIMIT:?}"),
    }
}
