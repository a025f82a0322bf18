//! [`RecordingApp`]: a raw HTTP/1.1 upstream that records every request head exactly as
//! it arrived (what a smuggling test must inspect: a normalising server would hide it),
//! answers each request with its method and path, and can close idle keep-alive
//! connections on a timer the way Node and most servers do (without announcing it).
//!
//! Node runs expired timers before it reads sockets in each turn of its event loop, so a
//! request that arrives just before the keep-alive timer fires is never read: the socket
//! is destroyed with it unread (RST). `IdleClose::late_by` models that turn.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Request line and fields, exactly as received.
    pub head: String,
    pub body: Vec<u8>,
    /// Index of the upstream connection it came on (0-based, in accept order).
    pub connection: usize,
}

impl Recorded {
    /// Whether a field of this name is in the head (case-insensitive).
    pub fn has_field(&self, name: &str) -> bool {
        self.head.lines().skip(1).any(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        })
    }

    pub fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or_default()
    }
}

#[derive(Default)]
struct Log {
    requests: Vec<Recorded>,
    connections: usize,
    /// Hanging connections the proxy closed.
    closed_by_peer: Vec<usize>,
}

/// Close a keep-alive connection idle for `after`, `late_by` later, without reading what
/// arrived in between.
#[derive(Debug, Clone, Copy)]
pub struct IdleClose {
    pub after: Duration,
    pub late_by: Duration,
}

/// What the app sends back for a request, and what it does next.
pub struct Reply {
    pub bytes: Vec<u8>,
    pub then: Then,
}

pub enum Then {
    /// Read the next request on the connection.
    KeepAlive,
    /// Close the connection after writing.
    Close,
    /// Reset the connection (RST) after writing.
    Reset,
    /// Keep the connection open and never answer anything again (until the peer closes
    /// it, which is recorded).
    Hang,
}

/// Makes the reply to a request.
pub type Responder = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// The default reply: `200`, body `<method> <path> body=<n>`.
pub fn echo_reply(r: &Recorded) -> Reply {
    let mut line = r.request_line().split(' ');
    let (method, path) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
    let answer = format!("{method} {path} body={}", r.body.len());
    Reply {
        bytes: format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{answer}",
            answer.len()
        )
        .into_bytes(),
        then: Then::KeepAlive,
    }
}

pub struct RecordingApp {
    log: Arc<Mutex<Log>>,
    task: JoinHandle<()>,
}

impl Drop for RecordingApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RecordingApp {
    pub fn start(listener: TcpListener, idle_close: Option<IdleClose>) -> RecordingApp {
        Self::start_with(listener, idle_close, Arc::new(echo_reply))
    }

    /// An app whose replies come from `responder`.
    pub fn start_with(
        listener: TcpListener,
        idle_close: Option<IdleClose>,
        responder: Responder,
    ) -> RecordingApp {
        let log = Arc::new(Mutex::new(Log::default()));
        let l = log.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let connection = {
                    let mut log = l.lock().unwrap();
                    log.connections += 1;
                    log.connections - 1
                };
                tokio::spawn(serve(
                    stream,
                    connection,
                    idle_close,
                    l.clone(),
                    responder.clone(),
                ));
            }
        });
        RecordingApp { log, task }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().requests.clone()
    }

    pub fn connections(&self) -> usize {
        self.log.lock().unwrap().connections
    }

    /// Connections left hanging (`Then::Hang`) that the proxy has since closed.
    pub fn closed_by_peer(&self) -> Vec<usize> {
        self.log.lock().unwrap().closed_by_peer.clone()
    }
}

async fn serve(
    mut stream: TcpStream,
    connection: usize,
    idle_close: Option<IdleClose>,
    log: Arc<Mutex<Log>>,
    responder: Responder,
) {
    let mut buf = Vec::new();
    loop {
        let (head_len, framing) = loop {
            if let Some(parsed) = parse_head(&buf) {
                match parsed {
                    Ok(p) => break p,
                    Err(_) => return,
                }
            }
            let read = async {
                let mut chunk = [0u8; 16384];
                stream.read(&mut chunk).await.map(|n| chunk[..n].to_vec())
            };
            let bytes = match (idle_close, buf.is_empty()) {
                (Some(idle), true) => match tokio::time::timeout(idle.after, read).await {
                    Ok(r) => r,
                    Err(_) => {
                        // Idle: closed on the keep-alive timer, a little late, with whatever
                        // arrived meanwhile unread.
                        tokio::time::sleep(idle.late_by).await;
                        return;
                    }
                },
                _ => read.await,
            };
            match bytes {
                Ok(b) if !b.is_empty() => buf.extend_from_slice(&b),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        buf.drain(..head_len);
        let body = match read_body(&mut stream, &mut buf, framing).await {
            Ok(b) => b,
            Err(_) => return,
        };
        let recorded = Recorded {
            head,
            body,
            connection,
        };
        let reply = responder(&recorded);
        log.lock().unwrap().requests.push(recorded);
        if stream.write_all(&reply.bytes).await.is_err() {
            return;
        }
        match reply.then {
            Then::KeepAlive => {}
            Then::Close => return,
            Then::Reset => {
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                return;
            }
            Then::Hang => {
                let mut sink = [0u8; 4096];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                log.lock().unwrap().closed_by_peer.push(connection);
                return;
            }
        }
    }
}

enum BodyFraming {
    Length(usize),
    Chunked,
}

type Head = (usize, BodyFraming);

/// `None`: incomplete.
fn parse_head(buf: &[u8]) -> Option<Result<Head>> {
    let mut fields = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return None,
        Err(e) => return Some(Err(e.into())),
    };
    let mut framing = BodyFraming::Length(0);
    for f in req.headers.iter() {
        if f.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(f.value).ok()?.trim().parse().ok()?;
            framing = BodyFraming::Length(n);
        }
        if f.name.eq_ignore_ascii_case("transfer-encoding") {
            framing = BodyFraming::Chunked;
        }
    }
    Some(Ok((len, framing)))
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 16384];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        bail!("closed mid-body");
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

async fn line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<String> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..i]).into_owned();
            buf.drain(..i + 2);
            return Ok(line);
        }
        fill(stream, buf).await?;
    }
}

async fn read_body(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    framing: BodyFraming,
) -> Result<Vec<u8>> {
    match framing {
        BodyFraming::Length(n) => {
            while buf.len() < n {
                fill(stream, buf).await?;
            }
            Ok(buf.drain(..n).collect())
        }
        BodyFraming::Chunked => {
            let mut body = Vec::new();
            loop {
                let size_line = line(stream, buf).await?;
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)?;
                if size == 0 {
                    // Trailer fields up to the empty line.
                    while !line(stream, buf).await?.is_empty() {}
                    return Ok(body);
                }
                while buf.len() < size + 2 {
                    fill(stream, buf).await?;
                }
                body.extend_from_slice(&buf[..size]);
                buf.drain(..size + 2);
            }
        }
    }
}
