//! Connections to `localhost:<port>`: 127.0.0.1 first, `[::1]` when refused (dev servers
//! that bind `localhost` often listen on `::1` only), never any other address and never
//! through an HTTP proxy.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::io::{tune, Keepalive};
use crate::limits::{Capacity, Fds};
use crate::tunnel::zero_hop::{Registration, ZeroHop};

/// An upstream connection with its read buffer.
#[derive(Debug)]
pub struct Upstream {
    pub stream: TcpStream,
    /// Bytes read from the upstream and not yet relayed.
    pub buf: BytesMut,
    pub port: u16,
    /// Taken from the pool (it served a request before).
    pub reused: bool,
    /// Set when this connection was opened for an upgrade from a port registered for
    /// zero-hop: the tunnel it becomes takes it (dropped, it leaves the maps).
    pub zero_hop: Option<Registration>,
    _fds: Fds,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to port {port}: {source}")]
    Failed { port: u16, source: io::Error },
    #[error("connect to port {port}: timed out")]
    TimedOut { port: u16 },
    #[error("over capacity: no file descriptor left for an upstream connection")]
    OverCapacity,
}

pub struct ConnectSettings {
    pub timeout: Duration,
    pub keepalive: Option<Keepalive>,
}

impl Upstream {
    pub fn into_parts(self) -> (TcpStream, BytesMut, Option<Registration>) {
        (self.stream, self.buf, self.zero_hop)
    }
}

/// Opens a new connection to the local `port`, counted against `capacity` (`fds`: the
/// descriptor it will use, when the caller already holds it). With `zero_hop` (an
/// upgrade while zero-hop is on) the IPv4 connection comes from a registered port, so
/// the kernel captures the app's end (docs/zero-hop.md); an app on `[::1]` gets a plain
/// connection.
pub async fn connect(
    port: u16,
    settings: &ConnectSettings,
    fds: Fds,
    zero_hop: Option<&Arc<ZeroHop>>,
) -> Result<Upstream, ConnectError> {
    let attempt = async {
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let first = match zero_hop {
            Some(zh) => zh.connect_registered(port).await.map(|(s, r)| (s, Some(r))),
            None => TcpStream::connect(v4).await.map(|s| (s, None)),
        };
        match first {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
                // Report the IPv4 refusal if IPv6 is refused too: it is the usual case.
                TcpStream::connect(v6)
                    .await
                    .map(|s| (s, None))
                    .map_err(|e6| match e6.kind() {
                        io::ErrorKind::ConnectionRefused => e,
                        _ => e6,
                    })
            }
            other => other,
        }
    };
    let (stream, zero_hop) = tokio::time::timeout(settings.timeout, attempt)
        .await
        .map_err(|_| ConnectError::TimedOut { port })?
        .map_err(|source| ConnectError::Failed { port, source })?;
    tune(&stream, settings.keepalive);
    Ok(Upstream {
        stream,
        buf: BytesMut::new(),
        port,
        reused: false,
        zero_hop,
        _fds: fds,
    })
}

/// A descriptor for a new upstream connection, evicting idle pooled connections of this
/// worker if that is what it takes.
pub fn reserve_fd(capacity: &'static Capacity) -> Result<Fds, ConnectError> {
    if let Some(fds) = capacity.try_take(1, 0) {
        return Ok(fds);
    }
    while super::pool::evict_one() {
        if let Some(fds) = capacity.try_take(1, 0) {
            return Ok(fds);
        }
    }
    Err(ConnectError::OverCapacity)
}
