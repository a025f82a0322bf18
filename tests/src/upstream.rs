//! Upstream apps, run in-process on the machine namespace's loopback.
//!
//! - [`HttpApp`]: a hyper server whose routes report what arrived (inspection), stream
//!   pattern bytes, check uploads, emit SSE one event at a time, fail mid-body, and accept
//!   WebSocket upgrades (echo).
//! - [`RawUpgradeApp`]: a bare TCP server that answers any upgrade request with 101 (plus
//!   optional bytes in the same write) and hands the socket to the test.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::pattern;

type Body = BoxBody<Bytes, std::io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|n| match n {}).boxed()
}

pub struct HttpApp {
    pub addr: SocketAddr,
    /// TCP connections accepted so far (pooling checks).
    pub connections: Arc<AtomicU64>,
    /// One permit lets `/sse` send its next event.
    pub sse_gate: Arc<Semaphore>,
    task: JoinHandle<()>,
}

impl Drop for HttpApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpApp {
    pub fn start(listener: TcpListener) -> Result<HttpApp> {
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicU64::new(0));
        let sse_gate = Arc::new(Semaphore::new(0));
        let (conns, gate) = (connections.clone(), sse_gate.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::Relaxed);
                let gate = gate.clone();
                let family = if addr.is_ipv6() { "v6" } else { "v4" };
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req| route(req, gate.clone(), family));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Ok(HttpApp {
            addr,
            connections,
            sse_gate,
            task,
        })
    }
}

/// Text report of the request as the upstream saw it: request line, then every header.
fn inspect(req: &Request<Incoming>) -> String {
    let mut out = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
    for (name, value) in req.headers() {
        out.push_str(&format!(
            "{}: {}\n",
            name,
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    out
}

async fn route(
    mut req: Request<Incoming>,
    gate: Arc<Semaphore>,
    family: &'static str,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut resp = match parts.as_slice() {
        ["download", n, seed] => {
            let (n, seed) = (n.parse().unwrap(), seed.parse().unwrap());
            let mut resp = Response::new(pattern_body(n, seed, None));
            if req.uri().query() == Some("length") {
                resp.headers_mut().insert("content-length", n.into());
            }
            resp
        }
        ["upload", seed] => {
            let seed: u64 = seed.parse().unwrap();
            let mut verifier = pattern::Verifier::new(seed);
            let mut body = req.into_body();
            let mut outcome = String::new();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Some(data) = frame.data_ref() {
                            if let Err(e) = verifier.feed(data) {
                                outcome = format!("corrupt: {e}");
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        outcome = format!("body error: {e}");
                        break;
                    }
                }
            }
            if outcome.is_empty() {
                outcome = format!("ok {}", verifier.received);
            }
            Response::new(full(outcome))
        }
        ["echo"] => {
            let body = req.into_body().map_err(std::io::Error::other).boxed();
            Response::new(body)
        }
        ["sse", n] => {
            let n: u32 = n.parse().unwrap();
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
            tokio::spawn(async move {
                for i in 0..n {
                    if i > 0 {
                        // The test releases the next event only after it saw this one.
                        let Ok(permit) = gate.acquire().await else {
                            return;
                        };
                        permit.forget();
                    }
                    let event = format!("id: {i}\ndata: event {i}\n\n");
                    if tx.send(Ok(Frame::data(event.into()))).await.is_err() {
                        return;
                    }
                }
            });
            let stream = tokio_stream_from(rx);
            let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            resp.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            resp
        }
        ["abort-after-headers"] => {
            // Promises 1000 bytes, sends 100, then the connection dies.
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 100])))).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = tx.send(Err(std::io::Error::other("upstream dies"))).await;
            });
            let mut resp = Response::new(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))));
            resp.headers_mut().insert("content-length", 1000.into());
            resp
        }
        ["close"] => {
            let mut resp = Response::new(full(inspect(&req)));
            resp.headers_mut()
                .insert("connection", "close".parse().unwrap());
            resp
        }
        ["status", code] => {
            let mut resp = Response::new(full(inspect(&req)));
            *resp.status_mut() = StatusCode::from_u16(code.parse().unwrap()).unwrap();
            resp
        }
        ["ws"] if req.headers().contains_key("upgrade") => {
            let key = req.headers()["sec-websocket-key"].clone();
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let protocol = req.headers().get("sec-websocket-protocol").cloned();
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let mut ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            let mut resp = Response::new(full(Bytes::new()));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = resp.headers_mut();
            h.insert("connection", "upgrade".parse().unwrap());
            h.insert("upgrade", "websocket".parse().unwrap());
            h.insert("sec-websocket-accept", accept.parse().unwrap());
            if let Some(p) = protocol {
                h.insert("sec-websocket-protocol", p);
            }
            h.insert(
                "x-inspect",
                inspect(&req).replace('\n', " | ").parse().unwrap(),
            );
            resp
        }
        _ => Response::new(full(inspect(&req))),
    };
    resp.headers_mut()
        .insert("x-upstream-family", family.parse().unwrap());
    Ok(resp)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// `n` pattern bytes of stream `seed` in 64 KiB frames.
pub fn pattern_body(n: u64, seed: u64, _hint: Option<()>) -> Body {
    let chunk = 64 * 1024u64;
    let stream = futures_util::stream::unfold(0u64, move |offset| async move {
        if offset >= n {
            return None;
        }
        let len = chunk.min(n - offset);
        let mut buf = vec![0u8; len as usize];
        pattern::fill(seed, offset, &mut buf);
        Some((Ok(Frame::data(Bytes::from(buf))), offset + len))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// A bare TCP app that answers every upgrade request with 101 and hands over the socket.
pub struct RawUpgradeApp {
    pub addr: SocketAddr,
    pub accepted: mpsc::Receiver<RawUpgrade>,
    task: JoinHandle<()>,
}

pub struct RawUpgrade {
    pub stream: TcpStream,
    /// The request head as received (request line and headers).
    pub head: String,
}

impl Drop for RawUpgradeApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpgradeApp {
    /// `first_bytes` is written in the same write as the 101 head.
    pub fn start(listener: TcpListener, first_bytes: Vec<u8>) -> Result<RawUpgradeApp> {
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(4096);
        let first_bytes = Arc::new(first_bytes);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let (tx, first_bytes) = (tx.clone(), first_bytes.clone());
                tokio::spawn(async move {
                    let Ok((head, leftover)) = read_head(&mut stream).await else {
                        return;
                    };
                    assert!(leftover.is_empty(), "client sent data before the 101");
                    let proto = header_value(&head, "upgrade").unwrap_or_default();
                    let mut out = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {proto}\r\n\r\n"
                    )
                    .into_bytes();
                    out.extend_from_slice(&first_bytes);
                    if stream.write_all(&out).await.is_ok() {
                        let _ = tx.send(RawUpgrade { stream, head }).await;
                    }
                });
            }
        });
        Ok(RawUpgradeApp {
            addr,
            accepted: rx,
            task,
        })
    }
}

/// Reads an HTTP head up to the blank line; returns it and any bytes read past it.
pub async fn read_head(stream: &mut TcpStream) -> Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!(
                "connection closed inside an HTTP head: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A header's value from a raw head (first match, name case-insensitive).
pub fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}
