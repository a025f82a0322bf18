//! Benchmark load generator and upstream app for `cargo xtask bench`, run inside the
//! benchmark's network namespaces with `ip netns exec`.
//!
//! - `bench_tool upstream PORT...`: hyper server on 0.0.0.0:PORT for each PORT (loopback
//!   for the proxies, the veth address for "direct") with `/small`, `/download?n=`,
//!   `/upload`, `/tunnel?down=&up=` (raw tunnel after a WebSocket 101), `/ws` (WebSocket
//!   echo) and `/idle` (raw echo after a WebSocket 101). A request with
//!   `Host: localhost:<port>` naming another port than the one it arrived on gets 421, so a
//!   proxy that routes to the wrong port fails the benchmark instead of looking fast.
//! - `bench_tool client MODE ADDR TARGET ...`: the clients; each prints one JSON line.
//!
//! Every byte is checked. The byte stream is `table[o % L] + (o / L)` with a prime `L`,
//! precomputed over its full period, so both sending and checking are plain memory copies
//! and compares (the per-byte hash of `tests::pattern` would cap the throughput).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

// ---------------------------------------------------------------- pattern

const L: usize = 65521;
const PERIOD: usize = L * 256;
const SEED_DOWN: u64 = 0xD0;
const SEED_UP: u64 = 0x0B;
const CHUNK: usize = 256 * 1024;

/// One full period of stream `seed`, followed by one extra chunk so any window of up to
/// CHUNK bytes is a contiguous slice.
fn stream(seed: u64) -> &'static [u8] {
    static DOWN: OnceLock<Vec<u8>> = OnceLock::new();
    static UP: OnceLock<Vec<u8>> = OnceLock::new();
    let cell = if seed == SEED_DOWN { &DOWN } else { &UP };
    cell.get_or_init(|| {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let table: Vec<u8> = (0..L)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        (0..PERIOD + CHUNK)
            .map(|o| table[o % L].wrapping_add(((o / L) % 256) as u8))
            .collect()
    })
}

/// The stream's bytes at `offset`, at most `max` of them (never more than CHUNK).
fn window(seed: u64, offset: u64, max: usize) -> &'static [u8] {
    let start = (offset % PERIOD as u64) as usize;
    &stream(seed)[start..start + max.min(CHUNK)]
}

struct Verifier {
    seed: u64,
    received: u64,
}

impl Verifier {
    fn new(seed: u64) -> Self {
        Verifier { seed, received: 0 }
    }
    fn feed(&mut self, mut buf: &[u8]) -> Result<()> {
        while !buf.is_empty() {
            let want = window(self.seed, self.received, buf.len());
            let n = want.len();
            if buf[..n] != *want {
                let at = buf[..n]
                    .iter()
                    .zip(want)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                bail!("wrong byte at offset {}", self.received + at as u64);
            }
            self.received += n as u64;
            buf = &buf[n..];
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- upstream

type Body = BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|n| match n {}).boxed()
}

fn query(req: &Request<Incoming>) -> HashMap<String, u64> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn switching(req: &Request<Incoming>) -> Response<Body> {
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .body(full(Bytes::new()))
        .unwrap()
}

/// The upgraded connection as the plain TCP stream plus any bytes hyper read ahead.
async fn raw(req: &mut Request<Incoming>) -> Option<(TcpStream, Bytes)> {
    let upgraded = hyper::upgrade::on(req).await.ok()?;
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    Some((parts.io.into_inner(), parts.read_buf))
}

/// The port a `Host: localhost:<port>` header names (proxies rewrite Host to it; direct
/// requests carry the address they connected to instead).
fn host_port(req: &Request<Incoming>) -> Option<u16> {
    let host = req.headers().get("host")?.to_str().ok()?;
    host.strip_prefix("localhost:")?.parse().ok()
}

async fn route(port: u16, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if host_port(&req).is_some_and(|p| p != port) {
        return Ok(Response::builder()
            .status(StatusCode::MISDIRECTED_REQUEST)
            .body(full(format!("this is port {port}")))
            .unwrap());
    }
    let q = query(&req);
    let path = req.uri().path().to_string();
    let resp = match path.as_str() {
        "/small" => Response::new(full(&b"hello, world\n"[..])),
        "/download" => {
            let n = q.get("n").copied().unwrap_or(0);
            let chunks = futures_util::stream::unfold(0u64, move |off| async move {
                if off >= n {
                    return None;
                }
                let w = window(SEED_DOWN, off, (n - off).min(CHUNK as u64) as usize);
                let next = off + w.len() as u64;
                Some((
                    Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(w))),
                    next,
                ))
            });
            Response::builder()
                .header("content-length", n)
                .body(BodyExt::boxed(StreamBody::new(chunks)))
                .unwrap()
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut v = Verifier::new(SEED_UP);
            let mut err = None;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            if let Err(e) = v.feed(d) {
                                err = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        err = Some(e.to_string());
                        break;
                    }
                }
            }
            match err {
                None => Response::new(full(format!("ok {}", v.received))),
                Some(e) => Response::builder()
                    .status(400)
                    .body(full(format!("bad {e}")))
                    .unwrap(),
            }
        }
        "/tunnel" if req.headers().contains_key("upgrade") => {
            let (down, up) = (
                q.get("down").copied().unwrap_or(0),
                q.get("up").copied().unwrap_or(0),
            );
            let resp = switching(&req);
            tokio::spawn(async move {
                let Some((stream, early)) = raw(&mut req).await else {
                    return;
                };
                let (mut rd, mut wr) = stream.into_split();
                let reader = tokio::spawn(async move {
                    let mut v = Verifier::new(SEED_UP);
                    v.feed(&early)?;
                    let mut buf = vec![0u8; CHUNK];
                    while v.received < up {
                        let want = ((up - v.received) as usize).min(CHUNK);
                        let n = rd.read(&mut buf[..want]).await?;
                        if n == 0 {
                            bail!("eof after {} of {up}", v.received);
                        }
                        v.feed(&buf[..n])?;
                    }
                    anyhow::Ok(())
                });
                let mut off = 0u64;
                while off < down {
                    let w = window(SEED_DOWN, off, (down - off).min(CHUNK as u64) as usize);
                    if wr.write_all(w).await.is_err() {
                        return;
                    }
                    off += w.len() as u64;
                }
                let verdict = matches!(reader.await, Ok(Ok(())));
                let _ = wr.write_all(if verdict { b"OK" } else { b"ER" }).await;
                let _ = wr.shutdown().await;
            });
            resp
        }
        "/ws" if req.headers().contains_key("upgrade") => {
            let resp = switching(&req);
            tokio::spawn(async move {
                let Ok(upgraded) = hyper::upgrade::on(&mut req).await else {
                    return;
                };
                let mut ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        return;
                    }
                    if (msg.is_binary() || msg.is_text()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
            resp
        }
        "/idle" if req.headers().contains_key("upgrade") => {
            let resp = switching(&req);
            tokio::spawn(async move {
                let Some((mut stream, early)) = raw(&mut req).await else {
                    return;
                };
                if !early.is_empty() && stream.write_all(&early).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 256];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            resp
        }
        _ => Response::builder()
            .status(404)
            .body(full(format!("no route {path}")))
            .unwrap(),
    };
    Ok(resp)
}

async fn upstream(ports: Vec<u16>) -> Result<()> {
    stream(SEED_DOWN);
    stream(SEED_UP);
    let mut listeners = Vec::new();
    for port in ports {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
        println!("listening on {}", listener.local_addr()?);
        listeners.push(tokio::spawn(serve(listener, port)));
    }
    for l in listeners {
        l.await?;
    }
    Ok(())
}

async fn serve(listener: tokio::net::TcpListener, port: u16) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(move |req| route(port, req)),
                )
                .with_upgrades()
                .await;
        });
    }
}

// ---------------------------------------------------------------- clients

fn connect(addr: SocketAddr) -> Result<StdTcpStream> {
    let s = StdTcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    Ok(s)
}

/// Reads a response head byte by byte (only the head: the body stays in the socket).
fn read_head(s: &mut StdTcpStream) -> Result<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            bail!("eof in response head: {:?}", String::from_utf8_lossy(&head));
        }
        head.push(b[0]);
        if head.len() > 64 * 1024 {
            bail!("response head too long");
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn upgrade_request(path: &str, target: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nX-Iterate-Proxy-Target-Host: {target}\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

fn download(addr: SocketAddr, target: &str, n: u64) -> Result<u64> {
    let mut s = connect(addr)?;
    write!(
        s,
        "GET /download?n={n} HTTP/1.1\r\nHost: {target}\r\nX-Iterate-Proxy-Target-Host: {target}\r\n\r\n"
    )?;
    let head = read_head(&mut s)?;
    if status_of(&head) != 200 {
        bail!("status {}", head.lines().next().unwrap_or(""));
    }
    let chunked = header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked"));
    if chunked {
        bail!("chunked download not expected: {head}");
    }
    let mut v = Verifier::new(SEED_DOWN);
    let mut buf = vec![0u8; CHUNK];
    while v.received < n {
        let want = ((n - v.received) as usize).min(CHUNK);
        let got = s.read(&mut buf[..want])?;
        if got == 0 {
            bail!("eof after {} of {n} bytes", v.received);
        }
        v.feed(&buf[..got])?;
    }
    Ok(v.received)
}

fn upload(addr: SocketAddr, target: &str, n: u64) -> Result<u64> {
    let mut s = connect(addr)?;
    write!(
        s,
        "POST /upload HTTP/1.1\r\nHost: {target}\r\nX-Iterate-Proxy-Target-Host: {target}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
    )?;
    let mut off = 0u64;
    while off < n {
        let w = window(SEED_UP, off, (n - off).min(CHUNK as u64) as usize);
        s.write_all(w)?;
        off += w.len() as u64;
    }
    let head = read_head(&mut s)?;
    let len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let mut body = vec![0u8; len.min(4096)];
    s.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body);
    if status_of(&head) != 200 || body.trim() != format!("ok {n}") {
        bail!(
            "upload rejected: {} {body}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(n)
}

/// Raw tunnel after a WebSocket 101: `down` bytes upstream → client, `up` bytes client →
/// upstream, at the same time; then the upstream's verdict on what it received.
fn tunnel(addr: SocketAddr, target: &str, down: u64, up: u64) -> Result<u64> {
    let mut s = connect(addr)?;
    s.write_all(upgrade_request(&format!("/tunnel?down={down}&up={up}"), target).as_bytes())?;
    let head = read_head(&mut s)?;
    if status_of(&head) != 101 {
        bail!("no upgrade: {}", head.lines().next().unwrap_or(""));
    }
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || -> Result<()> {
        let mut off = 0u64;
        while off < up {
            let win = window(SEED_UP, off, (up - off).min(CHUNK as u64) as usize);
            w.write_all(win)?;
            off += win.len() as u64;
        }
        Ok(())
    });
    let mut v = Verifier::new(SEED_DOWN);
    let mut buf = vec![0u8; CHUNK];
    while v.received < down {
        let want = ((down - v.received) as usize).min(CHUNK);
        let got = s.read(&mut buf[..want])?;
        if got == 0 {
            bail!("eof after {} of {down} bytes", v.received);
        }
        v.feed(&buf[..got])?;
    }
    writer
        .join()
        .map_err(|_| anyhow!("writer panicked"))?
        .context("sending")?;
    let mut verdict = [0u8; 2];
    s.read_exact(&mut verdict)
        .context("reading the upstream's verdict")?;
    if &verdict != b"OK" {
        bail!("upstream saw wrong or missing bytes");
    }
    Ok(down + up)
}

/// `conns` WebSockets, each sending 64-byte messages one at a time and waiting for the
/// echo, for `secs` seconds or `max` messages per socket.
async fn wsecho(
    addr: SocketAddr,
    target: &str,
    conns: usize,
    secs: f64,
    max: u64,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut sockets = Vec::new();
    for _ in 0..conns {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut req = format!("ws://{addr}/ws").into_client_request()?;
        req.headers_mut()
            .insert("x-iterate-proxy-target-host", target.parse()?);
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::client_async(req, stream),
        )
        .await??;
        sockets.push(ws);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut ws) in sockets.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
            let mut msg = [0u8; 64];
            let mut n = 0u64;
            while n < max && Instant::now() < deadline {
                msg[..8].copy_from_slice(&(i as u64).to_le_bytes());
                msg[8..16].copy_from_slice(&n.to_le_bytes());
                msg[16..].copy_from_slice(&window(SEED_UP, n * 48, 48)[..48]);
                let t = Instant::now();
                ws.send(Message::binary(msg.to_vec())).await?;
                let back = loop {
                    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await? {
                        Some(Ok(Message::Binary(b))) => break b,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        other => bail!("unexpected {other:?}"),
                    }
                };
                h.record(t.elapsed().as_nanos() as u64)?;
                if back[..] != msg[..] {
                    bail!("echo differs at message {n}");
                }
                n += 1;
            }
            let _ = ws.close(None).await;
            anyhow::Ok((h, n))
        }));
    }
    let mut all = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut total = 0u64;
    for t in tasks {
        let (h, n) = t.await??;
        all.add(h)?;
        total += n;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "ok": true,
        "msgs": total,
        "secs": secs,
        "msgs_per_s": total as f64 / secs,
        "p50_us": all.value_at_quantile(0.50) as f64 / 1000.0,
        "p99_us": all.value_at_quantile(0.99) as f64 / 1000.0,
        "p999_us": all.value_at_quantile(0.999) as f64 / 1000.0,
    }))
}

/// Opens `count` idle upgraded connections, prints `READY`, waits for a line on stdin,
/// then checks every one still echoes.
fn idle(addr: SocketAddr, target: &str, count: usize) -> Result<serde_json::Value> {
    let mut conns = Vec::with_capacity(count);
    let req = upgrade_request("/idle", target);
    for i in 0..count {
        let mut s = connect(addr).with_context(|| format!("connection {i}"))?;
        s.write_all(req.as_bytes())?;
        let head = read_head(&mut s)?;
        if status_of(&head) != 101 {
            bail!(
                "connection {i}: no upgrade: {}",
                head.lines().next().unwrap_or("")
            );
        }
        conns.push(s);
    }
    println!("READY {count}");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    for (i, s) in conns.iter_mut().enumerate() {
        let probe = (i as u32).to_le_bytes();
        s.write_all(&probe)?;
        let mut back = [0u8; 4];
        s.read_exact(&mut back)
            .with_context(|| format!("connection {i} no longer echoes"))?;
        if back != probe {
            bail!("connection {i}: wrong echo");
        }
    }
    Ok(json!({ "ok": true, "conns": count }))
}

fn timed(f: impl FnOnce() -> Result<u64>) -> serde_json::Value {
    let t = Instant::now();
    match f() {
        Ok(bytes) => {
            let secs = t.elapsed().as_secs_f64();
            json!({ "ok": true, "bytes": bytes, "secs": secs, "gbit_s": bytes as f64 * 8.0 / secs / 1e9 })
        }
        Err(e) => json!({ "ok": false, "error": format!("{e:#}") }),
    }
}

fn client(args: &[String]) -> Result<serde_json::Value> {
    let arg = |i: usize| -> Result<&str> {
        args.get(i)
            .map(|s| s.as_str())
            .ok_or_else(|| anyhow!("missing argument {i}"))
    };
    let num = |i: usize| -> Result<u64> { Ok(arg(i)?.parse()?) };
    let mode = arg(0)?;
    let addr: SocketAddr = arg(1)?.parse()?;
    let target = arg(2)?.to_string();
    stream(SEED_DOWN);
    stream(SEED_UP);
    Ok(match mode {
        "download" => {
            let n = num(3)?;
            timed(|| download(addr, &target, n))
        }
        "upload" => {
            let n = num(3)?;
            timed(|| upload(addr, &target, n))
        }
        "tunnel" => {
            let (down, up) = (num(3)?, num(4)?);
            timed(|| tunnel(addr, &target, down, up))
        }
        "wsecho" => {
            let (conns, secs, max) = (num(3)? as usize, arg(4)?.parse::<f64>()?, num(5)?);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(wsecho(addr, &target, conns, secs, max))
                .unwrap_or_else(|e| json!({ "ok": false, "error": format!("{e:#}") }))
        }
        "idle" => {
            let count = num(3)? as usize;
            idle(addr, &target, count)
                .unwrap_or_else(|e| json!({ "ok": false, "error": format!("{e:#}") }))
        }
        other => bail!("unknown client mode {other}"),
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(|s| s.as_str()) {
        Some("upstream") => {
            let ports = args[1..]
                .iter()
                .map(|p| p.parse::<u16>())
                .collect::<Result<Vec<u16>, _>>()?;
            if ports.is_empty() {
                bail!("upstream: no port");
            }
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(upstream(ports))
        }
        Some("client") => {
            let out = client(&args[1..])?;
            println!("{out}");
            Ok(())
        }
        _ => bail!("usage: bench_tool upstream PORT... | bench_tool client MODE ADDR TARGET ..."),
    }
}
