//! Small HTTP requests on hyper client connections, each response checked: status 200,
//! the port that answered, and every body byte.

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use http::Request;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;

use super::{bounded, connect};
use crate::soak::wire::{self, path};
use crate::soak::Env;
use tests::pattern;

pub type Body = BoxBody<Bytes, std::io::Error>;
pub type Sender = SendRequest<Body>;

/// A keep-alive connection to the daemon; the handle ends when the connection does.
pub async fn open(env: &Env) -> Result<(Sender, JoinHandle<()>)> {
    let stream = connect(env).await?;
    let (sender, conn) = bounded("HTTP handshake", async {
        hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(Into::into)
    })
    .await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, driver))
}

fn request(port: u16, method: &str, uri: &str, body: Body, close: bool) -> Result<Request<Body>> {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "soak.example")
        .header("x-iterate-proxy-target-host", wire::target(port));
    if close {
        req = req.header("connection", "close");
    }
    Ok(req.body(body)?)
}

/// GET of `n` pattern bytes; returns the bytes checked.
pub async fn get_small(sender: &mut Sender, port: u16, n: usize, close: bool) -> Result<u64> {
    let seed = wire::next_seed();
    let body = Empty::new().map_err(|e| match e {}).boxed();
    let req = request(port, "GET", &path::small(seed, n), body, close)?;
    exchange(sender, req, port, seed, n).await
}

/// POST of `n` pattern bytes to the echo route, with Content-Length or chunked; the
/// response must carry the same bytes back.
pub async fn post_echo(sender: &mut Sender, port: u16, n: usize, chunked: bool) -> Result<u64> {
    let seed = wire::next_seed();
    let bytes = Bytes::from(pattern::bytes(seed, n));
    let body = if chunked {
        // A stream of frames has no known length: hyper sends it chunked.
        let third = n / 3;
        let pieces = [
            bytes.slice(..third),
            bytes.slice(third..2 * third),
            bytes.slice(2 * third..),
        ];
        let frames = futures_util::stream::iter(
            pieces
                .into_iter()
                .map(|b| Ok::<_, std::io::Error>(Frame::data(b))),
        );
        BodyExt::boxed(StreamBody::new(frames))
    } else {
        Full::new(bytes).map_err(|e| match e {}).boxed()
    };
    let req = request(port, "POST", path::ECHO, body, false)?;
    exchange(sender, req, port, seed, n).await
}

async fn exchange(
    sender: &mut Sender,
    req: Request<Body>,
    port: u16,
    seed: u64,
    n: usize,
) -> Result<u64> {
    let uri = req.uri().clone();
    let resp = bounded("response head", async {
        sender
            .ready()
            .await
            .context("connection not usable for the next request")?;
        sender.send_request(req).await.map_err(Into::into)
    })
    .await
    .with_context(|| format!("{uri} on port {port}"))?;
    let status = resp.status();
    let answered_by = resp
        .headers()
        .get("x-port")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = bounded("response body", async {
        Ok(resp.into_body().collect().await?.to_bytes())
    })
    .await
    .with_context(|| format!("{uri} on port {port}"))?;
    ensure!(
        status == 200,
        "{uri} on port {port}: status {status}: {:?}",
        String::from_utf8_lossy(&body[..body.len().min(200)])
    );
    ensure!(
        answered_by == port.to_string(),
        "{uri} for port {port} answered by port {answered_by:?}"
    );
    ensure!(
        body.len() == n,
        "{uri} on port {port}: {} body bytes, expected {n}",
        body.len()
    );
    pattern::check(seed, 0, &body)
        .map_err(|at| anyhow::anyhow!("{uri} on port {port}: wrong body byte at offset {at}"))?;
    Ok(n as u64)
}
