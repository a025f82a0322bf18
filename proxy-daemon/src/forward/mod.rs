//! Forwarding: carries out a route decided by admission. Plain requests take a pooled
//! keep-alive connection to the port (or a new one), upgrades a connection of their own;
//! the exchange runs in the client connection's task, and a 101 hands both connections to
//! the tunnel layer.

pub mod exchange;
pub mod pool;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::admission::{Refusal, Route, BAD_GATEWAY, OVER_CAPACITY};
use crate::http1::Framing;
use crate::limits::Capacity;
use crate::tunnel::zero_hop::ZeroHop;
use exchange::{Failure, RequestInfo, ResponseState, Upload};
use upstream::{ConnectError, ConnectSettings, Upstream};

pub struct ForwardSettings {
    pub connect: ConnectSettings,
    /// Longest an idle pooled connection is kept (shortened by the upstream's hint).
    pub idle_timeout: Duration,
    pub max_idle_per_port: usize,
    pub max_response_head: usize,
}

/// How a forwarded request ended, for the connection loop.
#[derive(Debug)]
pub enum End {
    /// The response was relayed; the client connection takes the next request if
    /// `keep_alive`.
    Complete { keep_alive: bool },
    /// Nothing was sent to the client: the proxy answers with this error.
    Refuse(Refusal),
    /// The response was cut short or the client is gone: reset the client connection.
    Reset,
    /// The upstream switched protocols: the client connection and this one are a tunnel.
    Upgraded(Upstream),
}

#[derive(Debug)]
pub struct Outcome {
    pub end: End,
    /// Status relayed to the client (0 when the proxy answers or nothing was relayed).
    pub status: u16,
    /// Response body bytes written to the client.
    pub body_bytes: u64,
    /// For the access log: `complete`, `upgraded`, `proxy_error`, `aborted`, …
    pub label: &'static str,
}

pub struct Forwarder {
    pub settings: ForwardSettings,
    pub capacity: &'static Capacity,
    /// Zero-hop's programs when it is on: upgrades connect from a registered port.
    pub zero_hop: Option<Arc<ZeroHop>>,
}

impl Forwarder {
    /// Sends the request (`head`: the upstream request head, the body follows in
    /// `client_buf` and on `client`) and relays the response.
    pub async fn forward(
        &self,
        client: &TcpStream,
        client_buf: &mut BytesMut,
        head: &[u8],
        framing: Framing,
        route: Route,
        info: RequestInfo,
    ) -> Outcome {
        let mut upload = Upload::new(framing);
        let mut retried = false;
        loop {
            let mut up = match self.upstream(route).await {
                Ok(up) => up,
                Err(ConnectError::OverCapacity) => {
                    return refuse(OVER_CAPACITY, "over_capacity");
                }
                Err(e) => {
                    crate::metrics::connect_failed();
                    tracing::warn!(port = route.port, error = %e, "upstream failed before response headers");
                    return refuse(close_unless(BAD_GATEWAY, upload.is_done()), "proxy_error");
                }
            };
            let mut state = ResponseState::default();
            let result = exchange::run(
                client,
                client_buf,
                &mut up,
                head,
                &mut upload,
                info,
                &mut state,
            )
            .await;
            let (end, label) = match result {
                Ok(done) if done.upgraded => (End::Upgraded(up), "upgraded"),
                Ok(done) => {
                    if done.upstream_reusable && !route.upgrade {
                        let keep = pool::keep_for(self.settings.idle_timeout, done.idle_hint);
                        pool::check_in(up, keep, self.settings.max_idle_per_port);
                    }
                    (
                        End::Complete {
                            keep_alive: done.client_keep_alive,
                        },
                        "complete",
                    )
                }
                Err(Failure::NoResponse(e)) if up.reused && !retried && upload.replayable() => {
                    // The upstream closed the idle connection as the request went out.
                    tracing::debug!(port = route.port, error = %e, "pooled connection was closed by the upstream; retrying on a new one");
                    retried = true;
                    crate::metrics::retried();
                    continue;
                }
                Err(e @ (Failure::NoResponse(_) | Failure::BeforeHead(_))) => {
                    tracing::warn!(port = route.port, error = %e, "upstream failed before response headers");
                    let refusal = close_unless(BAD_GATEWAY, upload.is_done());
                    (End::Refuse(refusal), "proxy_error")
                }
                Err(e @ Failure::AfterHead(_)) => {
                    tracing::info!(port = route.port, error = %e, "response cut short: resetting the client connection");
                    (End::Reset, "aborted")
                }
                Err(Failure::BadRequestBody(e)) if !state.head_sent => {
                    tracing::debug!(port = route.port, error = %e, "bad request body");
                    let bad = Refusal::new(400, "Bad Request", "bad_request_body", true);
                    (End::Refuse(bad), "bad_request_body")
                }
                Err(Failure::BadRequestBody(_)) => (End::Reset, "bad_request_body"),
                Err(Failure::ClientGone(_)) => (End::Reset, "client_gone"),
            };
            return Outcome {
                end,
                status: state.status,
                body_bytes: state.body_bytes,
                label,
            };
        }
    }

    async fn upstream(&self, route: Route) -> Result<Upstream, ConnectError> {
        if !route.upgrade {
            if let Some(up) = pool::checkout(route.port) {
                return Ok(up);
            }
        }
        let fds = upstream::reserve_fd(self.capacity)?;
        let zero_hop = self.zero_hop.as_ref().filter(|_| route.upgrade);
        upstream::connect(route.port, &self.settings.connect, fds, zero_hop).await
    }
}

fn refuse(refusal: Refusal, label: &'static str) -> Outcome {
    Outcome {
        end: End::Refuse(refusal),
        status: 0,
        body_bytes: 0,
        label,
    }
}

/// The refusal, closing the connection unless the request body was read to its end.
fn close_unless(refusal: Refusal, body_read: bool) -> Refusal {
    Refusal {
        close: refusal.close || !body_read,
        ..refusal
    }
}
