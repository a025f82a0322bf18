//! Client-side helpers, run from the client namespace.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::netns::Netns;
use crate::upstream::read_head;

pub type ClientBody = BoxBody<Bytes, std::io::Error>;

pub fn empty() -> ClientBody {
    Empty::new().map_err(|n| match n {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> ClientBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|n| match n {})
        .boxed()
}

/// An HTTP/1.1 keep-alive connection to `addr`. The second value resolves when the
/// connection ends (so a test can tell whether the proxy closed it).
pub async fn http1(
    ns: &Netns,
    addr: SocketAddr,
) -> Result<(SendRequest<ClientBody>, tokio::task::JoinHandle<()>)> {
    let stream = ns.connect(addr).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let done = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, done))
}

/// Writes raw bytes and reads whatever comes back until the peer closes or 3 s pass.
pub async fn raw_exchange(ns: &Netns, addr: SocketAddr, request: &[u8]) -> Result<String> {
    let mut stream = ns.connect(addr).await?;
    stream.write_all(request).await?;
    Ok(read_until_close(&mut stream, Duration::from_secs(3)).await)
}

pub async fn read_until_close(stream: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends an upgrade request and reads the response head. Returns the stream, the head
/// and any bytes that came after it.
pub async fn upgrade(
    ns: &Netns,
    addr: SocketAddr,
    target: &str,
    protocol: &str,
    extra_headers: &str,
) -> Result<(TcpStream, String, Vec<u8>)> {
    let mut stream = ns.connect(addr).await?;
    let request = format!(
        "GET /tunnel HTTP/1.1\r\nHost: {target}\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\nX-Iterate-Proxy-Target-Host: {target}\r\n{extra_headers}\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let (head, rest) = read_head(&mut stream).await?;
    Ok((stream, head, rest))
}

/// Waits until the connection can take another request (the previous response is fully
/// read), then sends.
pub async fn send(
    sender: &mut SendRequest<ClientBody>,
    request: http::Request<ClientBody>,
) -> Result<http::Response<hyper::body::Incoming>> {
    sender.ready().await?;
    Ok(sender.send_request(request).await?)
}
