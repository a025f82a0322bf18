//! Upgrades (WebSocket or any other `Upgrade:` protocol, any method): the request goes to
//! its own target over a fresh connection; a 101 turns both connections into a tunnel,
//! anything else is relayed as a normal response.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::{InboundBody, ProxyBody};
use crate::framing::Watched;
use crate::proxy::{relay_response, upstream_failed, Proxy};
use crate::tunnel::Tunnel;

pub async fn proxy(
    proxy: &Proxy,
    port: u16,
    mut request: Request<Incoming>,
    request_id: String,
) -> Response<ProxyBody> {
    // Taken out of the request before it is forwarded: resolves after our 101 is sent.
    let client_side = hyper::upgrade::on(&mut request);
    let (parts, body) = request.into_parts();
    let (body, _) = InboundBody::new(body);
    let mut response = match proxy
        .upstreams
        .send_upgrade(port, Request::from_parts(parts, body))
        .await
    {
        Ok(response) => response,
        Err(e) => return upstream_failed(port, &e),
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_side = hyper::upgrade::on(&mut response);
        proxy
            .tunnels
            .spawn(take_sockets(request_id, port, client_side, upstream_side));
    }
    relay_response(response)
}

/// Waits for both upgrades and takes the raw sockets back from hyper.
async fn take_sockets(
    request_id: String,
    port: u16,
    client_side: OnUpgrade,
    upstream_side: OnUpgrade,
) -> Option<Tunnel> {
    let (client, upstream) = match tokio::try_join!(client_side, upstream_side) {
        Ok(both) => both,
        Err(e) => {
            tracing::warn!(request_id = %request_id, port, error = %e, "upgrade did not complete");
            return None;
        }
    };
    let (Some((client, client_leftover)), Some((upstream, upstream_leftover))) =
        (into_socket(client), into_socket(upstream))
    else {
        tracing::error!(request_id = %request_id, "upgraded connection is not a TCP socket");
        return None;
    };
    Some(Tunnel {
        request_id,
        port,
        client,
        client_leftover,
        upstream,
        upstream_leftover,
    })
}

fn into_socket(upgraded: Upgraded) -> Option<(TcpStream, bytes::Bytes)> {
    // The client side is wrapped by the framing watcher, the upstream side is not.
    match upgraded.downcast::<TokioIo<Watched<TcpStream>>>() {
        Ok(parts) => Some((parts.io.into_inner().into_inner(), parts.read_buf)),
        Err(upgraded) => {
            let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
            Some((parts.io.into_inner(), parts.read_buf))
        }
    }
}
