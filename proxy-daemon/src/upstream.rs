//! Connections to `localhost:<port>`: 127.0.0.1 first, `[::1]` when refused, never any
//! other address and never through an HTTP proxy. Plain requests reuse pooled
//! keep-alive connections; upgrades get a connection of their own.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::InboundBody;

/// A connection on its way back to the pool once its response has been read.
struct CheckIn {
    pool: Arc<Upstreams>,
    port: u16,
    sender: SendRequest<InboundBody>,
}

impl CheckIn {
    /// Back to the pool now if the connection is ready for another request (it is, when
    /// the response body just ended), else once it is; a connection that closes instead
    /// (e.g. `Connection: close`) is dropped.
    fn finish(self) {
        let CheckIn {
            pool,
            port,
            mut sender,
        } = self;
        if sender.is_ready() {
            pool.check_in(port, sender);
            return;
        }
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.check_in(port, sender);
            }
        });
    }
}

/// An upstream response body that checks its connection back in as soon as the body has
/// been read to its end, before the client sees that end: a client's next request on
/// the same connection then finds it in the pool instead of opening another.
pub struct PooledBody {
    inner: Incoming,
    check_in: Option<CheckIn>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let result = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        let ended = match &result {
            None => true,
            Some(Ok(_)) => self.inner.is_end_stream(),
            Some(Err(_)) => {
                // A failed exchange: the connection is not reusable.
                self.check_in = None;
                false
            }
        };
        if ended {
            if let Some(c) = self.check_in.take() {
                c.finish();
            }
        }
        Poll::Ready(result)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Not read to the end (client gone, or no body was polled): the connection comes
        // back only if hyper can still finish the exchange.
        if let Some(c) = self.check_in.take() {
            c.finish();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to port {port}: {source}")]
    Connect { port: u16, source: io::Error },
    #[error("connect to port {port}: timed out")]
    ConnectTimeout { port: u16 },
    #[error("upstream exchange: {0}")]
    Http(#[from] hyper::Error),
}

pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_port: usize,
    pub max_header_bytes: usize,
}

struct IdleConnection {
    sender: SendRequest<InboundBody>,
    since: Instant,
}

pub struct Upstreams {
    settings: UpstreamSettings,
    idle: Mutex<HashMap<u16, Vec<IdleConnection>>>,
}

impl Upstreams {
    pub fn new(settings: UpstreamSettings) -> Arc<Self> {
        Arc::new(Upstreams {
            settings,
            idle: Mutex::new(HashMap::new()),
        })
    }

    /// Opens a TCP connection to the local port: 127.0.0.1, then [::1] if refused.
    pub async fn connect(&self, port: u16) -> Result<TcpStream, UpstreamError> {
        let attempt = async {
            let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            match TcpStream::connect(v4).await {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
                    // Report the IPv4 refusal if IPv6 is refused too: it is the usual case.
                    TcpStream::connect(v6).await.map_err(|e6| match e6.kind() {
                        io::ErrorKind::ConnectionRefused => e,
                        _ => e6,
                    })
                }
                other => other,
            }
        };
        let stream = tokio::time::timeout(self.settings.connect_timeout, attempt)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout { port })?
            .map_err(|source| UpstreamError::Connect { port, source })?;
        stream
            .set_nodelay(true)
            .map_err(|source| UpstreamError::Connect { port, source })?;
        Ok(stream)
    }

    fn client_builder(&self) -> http1::Builder {
        let mut builder = http1::Builder::new();
        builder.max_buf_size(self.settings.max_header_bytes.max(8192) * 4);
        builder
    }

    async fn handshake(
        &self,
        port: u16,
        upgrades: bool,
    ) -> Result<SendRequest<InboundBody>, UpstreamError> {
        let stream = self.connect(port).await?;
        let (sender, conn) = self
            .client_builder()
            .handshake(TokioIo::new(stream))
            .await?;
        if upgrades {
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(port, error = %e, "upstream connection ended");
                }
            });
        } else {
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(port, error = %e, "upstream connection ended");
                }
            });
        }
        Ok(sender)
    }

    /// Sends a plain request over a pooled connection (or a new one). A request that a
    /// stale pooled connection could not even start sending is retried on a fresh one.
    pub async fn send(
        self: &Arc<Self>,
        port: u16,
        mut request: Request<InboundBody>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        loop {
            let (mut sender, reused) = match self.checkout(port) {
                Some(sender) => (sender, true),
                None => (self.handshake(port, false).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let check_in = CheckIn {
                        pool: Arc::clone(self),
                        port,
                        sender,
                    };
                    return Ok(response.map(|inner| PooledBody {
                        inner,
                        check_in: Some(check_in),
                    }));
                }
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(failed.into_error().into()),
                },
            }
        }
    }

    /// Sends an upgrade request over a connection of its own, ready to be taken back with
    /// `hyper::upgrade::on` when the upstream answers 101.
    pub async fn send_upgrade(
        &self,
        port: u16,
        request: Request<InboundBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut sender = self.handshake(port, true).await?;
        Ok(sender.send_request(request).await?)
    }

    fn checkout(&self, port: u16) -> Option<SendRequest<InboundBody>> {
        let mut idle = self.idle.lock().unwrap();
        let list = idle.get_mut(&port)?;
        while let Some(conn) = list.pop() {
            if conn.since.elapsed() < self.settings.idle_timeout
                && conn.sender.is_ready()
                && !conn.sender.is_closed()
            {
                return Some(conn.sender);
            }
        }
        None
    }

    fn check_in(&self, port: u16, sender: SendRequest<InboundBody>) {
        let mut idle = self.idle.lock().unwrap();
        let list = idle.entry(port).or_default();
        list.retain(|c| c.since.elapsed() < self.settings.idle_timeout && !c.sender.is_closed());
        if list.len() < self.settings.max_idle_per_port {
            list.push(IdleConnection {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Drops idle connections past their idle timeout; run periodically.
    pub fn sweep_idle(&self) {
        let mut idle = self.idle.lock().unwrap();
        idle.retain(|_, list| {
            list.retain(|c| {
                c.since.elapsed() < self.settings.idle_timeout && !c.sender.is_closed()
            });
            !list.is_empty()
        });
    }

    /// Closes every idle connection (shutdown).
    pub fn clear(&self) {
        self.idle.lock().unwrap().clear();
    }
}
