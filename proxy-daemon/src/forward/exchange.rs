//! One request/response exchange over one upstream connection, driven inside the client
//! connection's task: the request head and body go up while the response comes down,
//! both passed through byte for byte (bodies keep their framing; a body the upstream ends
//! by closing is chunk-encoded for HTTP/1.1 clients, a chunked one decoded for HTTP/1.0).

use std::io;
use std::os::fd::AsRawFd;

use bytes::{Buf, BytesMut};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::http1::body::BodyProgress;
use crate::http1::chunked::ChunkError;
use crate::http1::response::{self, ResponseError, ResponseHead};
use crate::http1::write::{self, ClientFraming};
use crate::http1::Framing;
use crate::io::{read_some, write_all};

use super::upstream::Upstream;

/// Request body bytes kept to resend on a retry; a longer body makes a request
/// unreplayable.
const REPLAY_LIMIT: usize = 64 * 1024;
/// Response bytes that ride in the same write as the response head.
const COALESCE_LIMIT: usize = 16 * 1024;
/// How long an exchange runs before the client's connection is watched for a close.
const CLIENT_WATCH_DELAY: std::time::Duration = std::time::Duration::from_millis(200);

/// What the exchange needs to know about the request.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo {
    pub head_method: bool,
    pub client_http11: bool,
    /// The client connection may stay open after this response.
    pub client_keep_alive: bool,
    pub upgrade: bool,
    pub max_response_head: usize,
}

/// The request body on its way up.
#[derive(Debug)]
pub struct Upload {
    body: BodyProgress,
    /// Bytes at the front of the client buffer already counted by `body`, not yet sent.
    pending: usize,
    /// Body bytes sent so far, while they fit in [`REPLAY_LIMIT`].
    replay: Vec<u8>,
    replayable: bool,
}

impl Upload {
    pub fn new(framing: Framing) -> Upload {
        Upload {
            body: BodyProgress::new(framing),
            pending: 0,
            replay: Vec::new(),
            replayable: true,
        }
    }

    /// Counts the body bytes at the front of `buf` (if none are counted yet).
    fn stage(&mut self, buf: &[u8]) -> Result<(), ChunkError> {
        if self.pending == 0 {
            self.pending = self.body.take(buf)?;
        }
        Ok(())
    }

    /// The staged bytes were sent: drop them from `buf`, keep them for a replay.
    fn commit(&mut self, buf: &mut BytesMut) {
        let sent = &buf[..self.pending];
        if self.replayable && self.replay.len() + sent.len() <= REPLAY_LIMIT {
            self.replay.extend_from_slice(sent);
        } else {
            self.replayable = false;
            self.replay = Vec::new();
        }
        buf.advance(self.pending);
        self.pending = 0;
    }

    pub fn is_done(&self) -> bool {
        self.body.is_done() && self.pending == 0
    }

    /// Everything sent so far can be sent again.
    pub fn replayable(&self) -> bool {
        self.replayable
    }
}

/// How far the response got; read after the exchange, whatever its end.
#[derive(Debug, Default)]
pub struct ResponseState {
    /// Some response byte came from the upstream.
    pub received: bool,
    /// The final response head was written to the client.
    pub head_sent: bool,
    pub status: u16,
    /// Bytes written to the client after the final head.
    pub body_bytes: u64,
}

/// A completed exchange.
#[derive(Debug)]
pub struct Done {
    /// The client connection can take the next request.
    pub client_keep_alive: bool,
    /// The upstream connection can serve another request.
    pub upstream_reusable: bool,
    /// `Keep-Alive: timeout=N` from the upstream.
    pub idle_hint: Option<u32>,
    /// The upstream answered 101: both connections are now a tunnel.
    pub upgraded: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The upstream failed before sending a byte: a reused connection it had just
    /// closed, typically; retryable when the request can be sent again.
    #[error("upstream closed or failed before responding: {0}")]
    NoResponse(io::Error),
    /// The upstream failed or misbehaved before the response head was complete: 502.
    #[error("upstream failed before the response head: {0}")]
    BeforeHead(String),
    /// The upstream failed after the head was relayed: the client connection is reset.
    #[error("upstream failed mid-response: {0}")]
    AfterHead(String),
    /// The client's request body is malformed (400, or reset if the head was relayed).
    #[error("{0}")]
    BadRequestBody(ChunkError),
    /// The client went away (reset, closed mid-body or before its response).
    #[error("client gone: {0}")]
    ClientGone(io::Error),
}

/// Runs one exchange: `head` (the upstream request head, already written for this
/// connection) plus the body, then the response.
pub async fn run(
    client: &TcpStream,
    client_buf: &mut BytesMut,
    upstream: &mut Upstream,
    head: &[u8],
    upload: &mut Upload,
    info: RequestInfo,
    state: &mut ResponseState,
) -> Result<Done, Failure> {
    let Upstream {
        stream: up,
        buf: up_buf,
        ..
    } = upstream;
    let up: &TcpStream = up;
    // The head, any bytes of a replay, and the body bytes already here, in one write.
    upload.stage(client_buf).map_err(Failure::BadRequestBody)?;
    let mut first = Vec::with_capacity(head.len() + upload.replay.len() + upload.pending);
    first.extend_from_slice(head);
    first.extend_from_slice(&upload.replay);
    first.extend_from_slice(&client_buf[..upload.pending]);
    write_all(up, &first).await.map_err(Failure::NoResponse)?;
    drop(first);
    upload.commit(client_buf);

    let mut uploading = !upload.is_done();
    let mut upload_failed: Option<io::Error> = None;
    let result = {
        let up_body = send_body(client, client_buf, up, upload);
        let down = relay_response(up, up_buf, client, info, state);
        tokio::pin!(up_body, down);
        loop {
            tokio::select! {
                biased;
                r = &mut down => break r,
                r = &mut up_body, if uploading => {
                    uploading = false;
                    match r {
                        Ok(()) => {}
                        // The upstream stopped reading (it may have answered early): the
                        // response decides.
                        Err(SendError::Upstream(e)) => upload_failed = Some(e),
                        Err(SendError::Client(e)) => break Err(Failure::ClientGone(e)),
                        Err(SendError::Body(e)) => break Err(Failure::BadRequestBody(e)),
                    }
                }
                e = client_gone(client), if !uploading => break Err(Failure::ClientGone(e)),
            }
        }
    };
    match result {
        Ok(mut done) => {
            if !upload.is_done() || upload_failed.is_some() {
                // Part of the request body was never read: neither connection can carry
                // another message.
                done.client_keep_alive = false;
                done.upstream_reusable = false;
            }
            Ok(done)
        }
        Err(f) => Err(f),
    }
}

enum SendError {
    Client(io::Error),
    Upstream(io::Error),
    Body(ChunkError),
}

/// The rest of the request body, client → upstream.
async fn send_body(
    client: &TcpStream,
    buf: &mut BytesMut,
    up: &TcpStream,
    upload: &mut Upload,
) -> Result<(), SendError> {
    loop {
        if upload.pending == 0 {
            if upload.body.is_done() {
                return Ok(());
            }
            if buf.is_empty() {
                match read_some(client, buf).await {
                    Ok(0) => {
                        return Err(SendError::Client(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "closed in the middle of the request body",
                        )))
                    }
                    Ok(_) => {}
                    Err(e) => return Err(SendError::Client(e)),
                }
            }
            upload.stage(buf).map_err(SendError::Body)?;
        }
        write_all(up, &buf[..upload.pending])
            .await
            .map_err(SendError::Upstream)?;
        upload.commit(buf);
    }
}

/// Resolves when the client resets or closes its connection while its response is
/// awaited or relayed (an HTTP client does not half-close mid-exchange; nginx reads it the
/// same way), so an upstream that never answers does not hold the exchange for ever.
/// Pipelined bytes are left for later: then only a reset counts.
///
/// Watching starts after a short delay: the read readiness left from reading the request
/// is usually stale, and telling it from a close costs a syscall that a quick exchange
/// should not pay.
async fn client_gone(client: &TcpStream) -> io::Error {
    tokio::time::sleep(CLIENT_WATCH_DELAY).await;
    loop {
        let ready = match client.ready(Interest::READABLE | Interest::ERROR).await {
            Ok(r) => r,
            Err(e) => return e,
        };
        if ready.is_error() {
            break;
        }
        // Clears the readiness if it was stale (WouldBlock), so the next wait is real.
        match client.try_io(Interest::READABLE, || peek(client)) {
            Ok(0) => return io::Error::new(io::ErrorKind::UnexpectedEof, "closed its connection"),
            Ok(_) => {
                // Pipelined bytes: left for later; from now on only a reset counts.
                if let Err(e) = client.ready(Interest::ERROR).await {
                    return e;
                }
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return e,
        }
    }
    client
        .take_error()
        .ok()
        .flatten()
        .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into())
}

/// `recv(MSG_PEEK)` of one byte, without blocking.
fn peek(s: &TcpStream) -> io::Result<usize> {
    let mut byte = 0u8;
    // SAFETY: a one-byte buffer we own; the fd is open for the borrow's duration.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// How the response body reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relay {
    /// Byte for byte (lengths, chunked to HTTP/1.1, close-delimited to HTTP/1.0).
    AsIs,
    /// A close-delimited body chunk-encoded for an HTTP/1.1 client.
    Chunk,
    /// A chunked body decoded for an HTTP/1.0 client.
    Dechunk,
}

/// Response head(s) and body, upstream → client.
async fn relay_response(
    up: &TcpStream,
    buf: &mut BytesMut,
    client: &TcpStream,
    info: RequestInfo,
    state: &mut ResponseState,
) -> Result<Done, Failure> {
    let head = loop {
        let head = read_response_head(up, buf, info, state).await?;
        if !head.is_interim() {
            break head;
        }
        // 100 Continue, 103 Early Hints…: relayed to HTTP/1.1 clients, then the next head.
        if info.client_http11 {
            let mut out = Vec::new();
            write::client_response(&mut out, buf, &head, ClientFraming::default());
            write_all(client, &out).await.map_err(Failure::ClientGone)?;
        }
        buf.advance(head.len);
    };
    if head.status == 101 && !info.upgrade {
        return Err(Failure::BeforeHead(
            "101 to a request that asked for no upgrade".into(),
        ));
    }
    state.status = head.status;
    let relay = match (head.framing, info.client_http11) {
        (Framing::UntilClose, true) => Relay::Chunk,
        (Framing::Chunked, false) => Relay::Dechunk,
        _ => Relay::AsIs,
    };
    let upgraded = head.status == 101;
    // An HTTP/1.0 client learns where a body of unknown length ends only by the close.
    let body_ends_by_close =
        !info.client_http11 && matches!(head.framing, Framing::UntilClose | Framing::Chunked);
    let client_keep_alive = info.client_keep_alive && !body_ends_by_close && !upgraded;
    let framing = ClientFraming {
        add_chunked: relay == Relay::Chunk,
        remove_chunked: relay == Relay::Dechunk,
        close: !client_keep_alive,
        keep_alive_1_0: client_keep_alive && !info.client_http11,
        upgrade: upgraded,
    };
    let mut out = Vec::with_capacity(1024);
    write::client_response(&mut out, buf, &head, framing);
    buf.advance(head.len);
    let upstream_keep_alive = head.keep_alive;
    let idle_hint = head.idle_timeout_hint;
    let mut body = BodyProgress::new(head.framing);

    if upgraded {
        // The bytes after the 101 (already in `buf`) belong to the tunnel.
        write_all(client, &out).await.map_err(Failure::ClientGone)?;
        state.head_sent = true;
        return Ok(Done {
            client_keep_alive: false,
            upstream_reusable: false,
            idle_hint,
            upgraded: true,
        });
    }

    // The head and the first body bytes in one write when they are small.
    let head_len = out.len();
    if buf.len() <= COALESCE_LIMIT {
        take_body(relay, &mut body, buf, &mut out)?;
    }
    write_all(client, &out).await.map_err(Failure::ClientGone)?;
    state.head_sent = true;
    state.body_bytes += (out.len() - head_len) as u64;

    loop {
        if !buf.is_empty() && !body.is_done() {
            if relay == Relay::AsIs {
                // Straight from the read buffer: no copy.
                let n = body
                    .take(buf)
                    .map_err(|e| Failure::AfterHead(e.to_string()))?;
                write_all(client, &buf[..n])
                    .await
                    .map_err(Failure::ClientGone)?;
                buf.advance(n);
                state.body_bytes += n as u64;
            } else {
                out.clear();
                take_body(relay, &mut body, buf, &mut out)?;
                write_all(client, &out).await.map_err(Failure::ClientGone)?;
                state.body_bytes += out.len() as u64;
            }
        }
        if body.is_done() {
            break;
        }
        match read_some(up, buf).await {
            Ok(0) => {
                if !body.at_eof() {
                    return Err(Failure::AfterHead(
                        "closed before the end of the body".into(),
                    ));
                }
                if relay == Relay::Chunk {
                    write_all(client, b"0\r\n\r\n")
                        .await
                        .map_err(Failure::ClientGone)?;
                }
                break;
            }
            Ok(_) => {}
            Err(e) => return Err(Failure::AfterHead(e.to_string())),
        }
    }
    Ok(Done {
        client_keep_alive,
        // Anything after the response is a protocol error: not reusable then.
        upstream_reusable: upstream_keep_alive && buf.is_empty(),
        idle_hint,
        upgraded: false,
    })
}

/// Moves the body bytes at the front of `buf` into `out`, framed for the client.
fn take_body(
    relay: Relay,
    body: &mut BodyProgress,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
) -> Result<(), Failure> {
    let bad = |e: ChunkError| Failure::AfterHead(e.to_string());
    match relay {
        Relay::AsIs => {
            let n = body.take(buf).map_err(bad)?;
            out.extend_from_slice(&buf[..n]);
            buf.advance(n);
        }
        Relay::Chunk => {
            let n = body.take(buf).map_err(bad)?;
            if n > 0 {
                write::chunk_header(out, n);
                out.extend_from_slice(&buf[..n]);
                out.extend_from_slice(b"\r\n");
                buf.advance(n);
            }
        }
        Relay::Dechunk => {
            let mut used = 0;
            while used < buf.len() && !body.is_done() {
                let step = body.step_chunked(&buf[used..]).map_err(bad)?;
                out.extend_from_slice(&buf[used..][step.data.clone()]);
                used += step.consumed;
            }
            buf.advance(used);
        }
    }
    Ok(())
}

/// Reads until a complete response head is in `buf`.
async fn read_response_head(
    up: &TcpStream,
    buf: &mut BytesMut,
    info: RequestInfo,
    state: &mut ResponseState,
) -> Result<ResponseHead, Failure> {
    loop {
        if !buf.is_empty() {
            match response::parse(buf, info.max_response_head, info.head_method) {
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(e @ (ResponseError::TooLarge | ResponseError::Malformed(_))) => {
                    return Err(Failure::BeforeHead(e.to_string()))
                }
            }
        }
        match read_some(up, buf).await {
            Ok(0) if !state.received => {
                return Err(Failure::NoResponse(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed the connection",
                )))
            }
            Ok(0) => {
                return Err(Failure::BeforeHead(
                    "closed in the middle of the response head".into(),
                ))
            }
            Ok(_) => state.received = true,
            Err(e) if !state.received => return Err(Failure::NoResponse(e)),
            Err(e) => return Err(Failure::BeforeHead(e.to_string())),
        }
    }
}
