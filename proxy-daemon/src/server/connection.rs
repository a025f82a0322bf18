//! A client connection, request after request, in phases: read a head → admission
//! decides → answer it here or forward it → one access line. A 101 turns the connection
//! into a tunnel. Everything runs in this connection's task on one worker thread.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;

use super::Shared;
use crate::admission::{Decision, Refusal};
use crate::forward::exchange::RequestInfo;
use crate::forward::End;
use crate::http1::request::{self, HeadError, Occurs, RequestHead};
use crate::http1::write::{self, UpstreamRequest};
use crate::http1::Framing;
use crate::io::{reset_on_close, try_read, write_all};
use crate::limits::{Fds, Overload};
use crate::logging::access::{self, AccessLine};
use crate::request_id;
use crate::tunnel::Tunnel;

/// A 401 on a connection closes it after this many.
const MAX_UNAUTHORIZED_PER_CONNECTION: u32 = 3;
/// How long a connection accepted while over capacity has to send its head.
const OVERLOAD_HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection accepted before the daemon stopped accepting may still take to
/// send its first request (see [`read_head`]).
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

struct Conn {
    stream: TcpStream,
    /// Bytes read from the client and not yet consumed.
    buf: BytesMut,
    /// The upstream request head being sent, or a response the proxy writes.
    scratch: Vec<u8>,
    /// The current request's method, path and id, for its access line.
    meta: Meta,
}

#[derive(Default)]
struct Meta {
    text: Vec<u8>,
    method: usize,
    path: usize,
}

impl Meta {
    fn set(&mut self, method: &[u8], path: &[u8], id: &[u8]) {
        self.text.clear();
        self.text.extend_from_slice(method);
        self.method = self.text.len();
        self.text.extend_from_slice(path);
        self.path = self.text.len();
        self.text.extend_from_slice(id);
    }

    fn method(&self) -> &[u8] {
        &self.text[..self.method]
    }

    fn path(&self) -> &[u8] {
        &self.text[self.method..self.path]
    }

    fn id(&self) -> &[u8] {
        &self.text[self.path..]
    }
}

/// How the request loop ended.
enum Ended {
    Close,
    /// Reset the connection: the client must not take what it got as complete.
    Reset,
    /// A 101 was relayed: the connection and the upstream one become a tunnel.
    Tunnel(Box<TunnelStart>),
}

struct TunnelStart {
    upstream: crate::forward::upstream::Upstream,
    port: u16,
}

/// Serves one client connection until it closes (`fds`: its descriptors in the budget).
pub async fn serve(stream: TcpStream, fds: Fds, shared: &'static Shared) {
    let mut conn = Conn {
        stream,
        buf: BytesMut::new(),
        scratch: Vec::new(),
        meta: Meta::default(),
    };
    let ended = tokio::select! {
        ended = requests(&mut conn, shared) => ended,
        // The shutdown grace is over: nothing in flight may look complete.
        _ = shared.force_close.cancelled() => Ended::Reset,
    };
    match ended {
        Ended::Close => {}
        Ended::Reset => reset_on_close(&conn.stream),
        Ended::Tunnel(start) => {
            let TunnelStart { upstream, port } = *start;
            let request_id = String::from_utf8_lossy(conn.meta.id()).into_owned();
            let (upstream, upstream_leftover, zero_hop) = upstream.into_parts();
            // Exact-size copies (usually empty): the read buffers go now, an idle tunnel
            // keeps no buffer.
            let tunnel = Tunnel {
                request_id,
                port,
                client: conn.stream,
                client_leftover: Bytes::copy_from_slice(&conn.buf),
                upstream,
                upstream_leftover: Bytes::copy_from_slice(&upstream_leftover),
                zero_hop,
            };
            // The tunnel keeps this connection's descriptors in the budget.
            shared.tunnels.start(tunnel, fds);
        }
    }
}

async fn requests(conn: &mut Conn, shared: &'static Shared) -> Ended {
    let mut unauthorized = 0;
    let mut first = true;
    loop {
        let read = read_head(
            conn,
            shared.max_head,
            shared.header_read_timeout,
            shared,
            first,
        );
        first = false;
        let head = match read.await {
            Read::Head(head) => head,
            Read::Closed => return Ended::Close,
            Read::Refused(refusal) => {
                let id = request_id::make();
                conn.meta.set(b"", b"", &id);
                let started = Instant::now();
                answer_error(conn, refusal, true).await;
                log(conn, None, refusal.status, 0, started, "refused");
                return Ended::Close;
            }
        };
        let started = Instant::now();

        // Request filter. The request id: the client's (kept by the parser only when
        // it is reusable) or a new one, sent upstream.
        let made_id = match head.request_id {
            Occurs::Once(_) => None,
            _ => Some(request_id::make()),
        };
        let id = match (&made_id, head.request_id) {
            (Some(made), _) => &made[..],
            (None, Occurs::Once(id)) => id.of(&conn.buf),
            (None, _) => unreachable!("an id was made"),
        };
        conn.meta
            .set(head.method(&conn.buf), head.path(&conn.buf), id);
        let with_body = !head.is_method(&conn.buf, b"HEAD");
        // Draining: every answer from now on closes its connection.
        let keep_alive = head.keep_alive && !shared.draining.load(Ordering::Relaxed);
        let decision = shared.admission.decide(&head, &conn.buf);
        let port = match decision {
            Decision::Forward(route) => Some(route.port),
            _ => None,
        };

        match decision {
            Decision::Health => {
                conn.buf.advance(head.len);
                let keep = keep_alive && head.framing == Framing::Empty;
                conn.scratch.clear();
                write::local_response(
                    &mut conn.scratch,
                    200,
                    "OK",
                    "text/plain; charset=utf-8",
                    b"OK",
                    !keep,
                    with_body,
                );
                let ok = write_all(&conn.stream, &conn.scratch).await.is_ok();
                log(conn, None, 200, 2, started, "complete");
                if !ok || !keep {
                    return Ended::Close;
                }
            }
            Decision::Refuse(mut refusal) => {
                if refusal.status == 401 {
                    unauthorized += 1;
                    refusal.close |= unauthorized >= MAX_UNAUTHORIZED_PER_CONNECTION;
                }
                refusal.close |= !keep_alive;
                conn.buf.advance(head.len);
                let ok = answer_error(conn, refusal, with_body).await;
                log(conn, port, refusal.status, 0, started, "refused");
                if !ok || refusal.close {
                    return Ended::Close;
                }
            }
            Decision::Forward(route) => {
                // Upstream request: method and target as received, the rewritten fields.
                conn.scratch.clear();
                let add = UpstreamRequest {
                    port: route.port,
                    new_request_id: made_id.as_ref().map(|id| &id[..]),
                    upgrade: route.upgrade,
                };
                write::upstream_request(&mut conn.scratch, &conn.buf, &head, &add);
                let info = RequestInfo {
                    head_method: !with_body,
                    client_http11: head.http11,
                    client_keep_alive: keep_alive,
                    upgrade: route.upgrade,
                    max_response_head: shared.max_response_head,
                };
                conn.buf.advance(head.len);
                let outcome = shared
                    .forwarder
                    .forward(
                        &conn.stream,
                        &mut conn.buf,
                        &conn.scratch,
                        head.framing,
                        route,
                        info,
                    )
                    .await;
                match outcome.end {
                    End::Complete { keep_alive } => {
                        log(
                            conn,
                            port,
                            outcome.status,
                            outcome.body_bytes,
                            started,
                            outcome.label,
                        );
                        if !keep_alive {
                            return Ended::Close;
                        }
                    }
                    End::Refuse(mut refusal) => {
                        // An upgrade's client expected a tunnel: its error closes too.
                        refusal.close |= !info.client_keep_alive || route.upgrade;
                        let ok = answer_error(conn, refusal, with_body).await;
                        log(conn, port, refusal.status, 0, started, outcome.label);
                        if !ok || refusal.close {
                            return Ended::Close;
                        }
                    }
                    End::Reset => {
                        log(
                            conn,
                            port,
                            outcome.status,
                            outcome.body_bytes,
                            started,
                            outcome.label,
                        );
                        return Ended::Reset;
                    }
                    End::Upgraded(upstream) => {
                        log(conn, port, 101, 0, started, outcome.label);
                        return Ended::Tunnel(Box::new(TunnelStart {
                            upstream,
                            port: route.port,
                        }));
                    }
                }
            }
        }
    }
}

/// The request's end: its access line and its metrics.
fn log(
    conn: &Conn,
    port: Option<u16>,
    status: u16,
    bytes: u64,
    started: Instant,
    outcome: &'static str,
) {
    let duration = started.elapsed();
    crate::metrics::request(port, status, duration);
    access::write(&AccessLine {
        request_id: conn.meta.id(),
        method: conn.meta.method(),
        path: conn.meta.path(),
        port,
        status,
        bytes,
        duration,
        outcome,
    });
}

/// Writes `{"error":"<code>"}`; false if the client is gone.
async fn answer_error(conn: &mut Conn, refusal: Refusal, with_body: bool) -> bool {
    conn.scratch.clear();
    let body = format!("{{\"error\":\"{}\"}}", refusal.code);
    write::local_response(
        &mut conn.scratch,
        refusal.status,
        refusal.reason,
        "application/json",
        body.as_bytes(),
        refusal.close,
        with_body,
    );
    write_all(&conn.stream, &conn.scratch).await.is_ok()
}

// A head is returned by value once per request; boxing it would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Read {
    Head(RequestHead),
    /// EOF, a read error, the head timeout, or shutdown while idle.
    Closed,
    /// The head is refused (431, 400): answer and close.
    Refused(Refusal),
}

/// Reads until a complete head is in the buffer. `timeout` runs from the first wait: the
/// keep-alive idle time and the slow-head guard in one.
///
/// When the daemon stops accepting (shutdown, takeover), a connection idle between
/// requests is closed at once: its client retries on a new connection, which the
/// successor (or nobody, at shutdown) accepts. A connection whose `first` request has not
/// arrived yet gets [`FIRST_REQUEST_GRACE`] more: it was accepted just before, and its
/// request is usually on its way; closed unanswered, the client would see a new
/// connection fail (a takeover test did, once in many runs).
async fn read_head(
    conn: &mut Conn,
    max_head: usize,
    timeout: Duration,
    shared: &Shared,
    first: bool,
) -> Read {
    let mut deadline = None;
    loop {
        if !conn.buf.is_empty() {
            match request::parse(&conn.buf, max_head) {
                Ok(Some(head)) => return Read::Head(head),
                Ok(None) => {}
                Err(HeadError::TooLarge) => {
                    return Read::Refused(Refusal::new(
                        431,
                        "Request Header Fields Too Large",
                        "request_header_fields_too_large",
                        true,
                    ))
                }
                Err(HeadError::Malformed(why)) => {
                    tracing::debug!(why, "malformed request head");
                    return Read::Refused(Refusal::new(400, "Bad Request", "bad_request", true));
                }
                Err(HeadError::Ambiguous(why)) => {
                    tracing::debug!(why, "ambiguous request framing");
                    return Read::Refused(Refusal::new(
                        400,
                        "Bad Request",
                        "ambiguous_framing",
                        true,
                    ));
                }
            }
        }
        match try_read(&conn.stream, &mut conn.buf) {
            Ok(0) => return Read::Closed,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Read::Closed,
        }
        let deadline = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + timeout);
        let idle = conn.buf.is_empty();
        tokio::select! {
            biased;
            ready = conn.stream.readable() => if ready.is_err() {
                return Read::Closed;
            },
            _ = tokio::time::sleep_until(deadline) => return Read::Closed,
            _ = shared.stop_accepting.cancelled(), if idle && !first => return Read::Closed,
            _ = async {
                shared.stop_accepting.cancelled().await;
                tokio::time::sleep(FIRST_REQUEST_GRACE).await;
            }, if idle && first => return Read::Closed,
        }
    }
}

/// A connection accepted while over capacity: `/health` is answered, anything else gets
/// `503 over_capacity` at once; then it is closed.
pub async fn serve_overloaded(stream: TcpStream, _slot: Overload, shared: &'static Shared) {
    let mut conn = Conn {
        stream,
        buf: BytesMut::new(),
        scratch: Vec::new(),
        meta: Meta::default(),
    };
    let started = Instant::now();
    let refusal = crate::admission::OVER_CAPACITY;
    let read = read_head(
        &mut conn,
        shared.max_head,
        OVERLOAD_HEAD_TIMEOUT,
        shared,
        true,
    );
    let head = match read.await {
        Read::Head(head) => head,
        _ => return,
    };
    let with_body = !head.is_method(&conn.buf, b"HEAD");
    let id = request_id::make();
    conn.meta
        .set(head.method(&conn.buf), head.path(&conn.buf), &id);
    if matches!(shared.admission.decide(&head, &conn.buf), Decision::Health) {
        conn.scratch.clear();
        write::local_response(
            &mut conn.scratch,
            200,
            "OK",
            "text/plain; charset=utf-8",
            b"OK",
            true,
            with_body,
        );
        let _ = write_all(&conn.stream, &conn.scratch).await;
        log(&conn, None, 200, 2, started, "complete");
        return;
    }
    answer_error(&mut conn, refusal, with_body).await;
    log(&conn, None, refusal.status, 0, started, "over_capacity");
}
