//! Request-smuggling guard for what hyper accepts leniently.
//!
//! hyper refuses most ambiguous framing itself (differing Content-Lengths, bad chunk
//! sizes, obs-fold, bare CR, non-chunked Transfer-Encoding), but a request carrying both
//! `Content-Length` and `Transfer-Encoding: chunked` is processed the RFC 9112 §6.3 way:
//! Content-Length is dropped before the service sees the request. SPEC §2 wants it refused,
//! so this wrapper watches the raw bytes hyper reads, finds each request head, and records
//! per head whether it carried both. The service takes one verdict per request, in order.
//!
//! The watcher follows message framing (Content-Length and chunked bodies) to find the
//! next head; if it ever cannot follow (upgrade, malformed input hyper will refuse anyway),
//! it stops watching and records nothing more.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Verdicts per request head, oldest first: `true` = both Content-Length and Transfer-Encoding.
#[derive(Clone, Default)]
pub struct FramingVerdicts(Arc<Mutex<VecDeque<bool>>>);

impl FramingVerdicts {
    /// The verdict for the next request hyper hands to the service.
    pub fn next_is_ambiguous(&self) -> bool {
        self.0.lock().unwrap().pop_front().unwrap_or(false)
    }
}

enum State {
    /// Collecting a request head (bytes so far).
    Head(Vec<u8>),
    /// Skipping a fixed-length body.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Stopped following (upgrade or input hyper will refuse).
    Off,
}

enum Chunk {
    /// Reading a chunk-size line.
    SizeLine(Vec<u8>),
    /// Chunk data, then its CRLF.
    Data(u64),
    /// Trailer section: the current line so far.
    Trailer(Vec<u8>),
}

pub struct Watched<T> {
    inner: T,
    state: State,
    verdicts: FramingVerdicts,
    max_head: usize,
}

impl<T> Watched<T> {
    pub fn new(inner: T, max_head: usize) -> (Self, FramingVerdicts) {
        let verdicts = FramingVerdicts::default();
        let watched = Watched {
            inner,
            state: State::Head(Vec::new()),
            verdicts: verdicts.clone(),
            max_head,
        };
        (watched, verdicts)
    }

    pub fn into_inner(self) -> T {
        self.inner
    }

    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let used = match &mut self.state {
                State::Off => return,
                State::Head(head) => {
                    let start = head.len().saturating_sub(3);
                    head.extend_from_slice(bytes);
                    match find(&head[start..], b"\r\n\r\n") {
                        None if head.len() > self.max_head => {
                            self.state = State::Off;
                            return;
                        }
                        None => bytes.len(),
                        Some(at) => {
                            let end = start + at + 4;
                            let overshoot = head.len() - end;
                            head.truncate(end);
                            let head = std::mem::take(head);
                            self.state = self.after_head(&head);
                            bytes.len() - overshoot
                        }
                    }
                }
                State::Body(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    if *left == 0 {
                        self.state = State::Head(Vec::new());
                    }
                    n as usize
                }
                State::Chunked(chunk) => match chunk {
                    Chunk::SizeLine(line) => match bytes.iter().position(|&b| b == b'\n') {
                        None => {
                            line.extend_from_slice(bytes);
                            if line.len() > 4096 {
                                self.state = State::Off;
                            }
                            bytes.len()
                        }
                        Some(at) => {
                            line.extend_from_slice(&bytes[..=at]);
                            let size = parse_chunk_size(line);
                            *chunk = match size {
                                Some(0) => Chunk::Trailer(Vec::new()),
                                Some(n) => Chunk::Data(n + 2),
                                None => {
                                    self.state = State::Off;
                                    return;
                                }
                            };
                            at + 1
                        }
                    },
                    Chunk::Data(left) => {
                        let n = (*left).min(bytes.len() as u64);
                        *left -= n;
                        if *left == 0 {
                            *chunk = Chunk::SizeLine(Vec::new());
                        }
                        n as usize
                    }
                    Chunk::Trailer(line) => match bytes.iter().position(|&b| b == b'\n') {
                        None => {
                            line.extend_from_slice(bytes);
                            bytes.len()
                        }
                        Some(at) => {
                            line.extend_from_slice(&bytes[..=at]);
                            if line.as_slice() == b"\r\n" {
                                self.state = State::Head(Vec::new());
                            } else {
                                line.clear();
                            }
                            at + 1
                        }
                    },
                },
            };
            bytes = &bytes[used..];
        }
    }

    /// Records the head's verdict and returns how its body is framed.
    fn after_head(&mut self, head: &[u8]) -> State {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut request = httparse::Request::new(&mut headers);
        if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
            return State::Off;
        }
        let mut content_length: Option<Option<u64>> = None;
        let (mut transfer_encoding, mut chunked, mut upgrade) = (false, false, false);
        for h in request.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let value = std::str::from_utf8(h.value).ok();
                content_length = Some(value.and_then(|v| v.trim().parse::<u64>().ok()));
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encoding = true;
                chunked = h
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        let has_content_length = content_length.is_some();
        self.verdicts
            .0
            .lock()
            .unwrap()
            .push_back(transfer_encoding && has_content_length);
        let connect = request
            .method
            .is_some_and(|m| m.eq_ignore_ascii_case("CONNECT"));
        if upgrade || connect || (transfer_encoding && !chunked) {
            State::Off
        } else if chunked {
            State::Chunked(Chunk::SizeLine(Vec::new()))
        } else {
            match content_length {
                None | Some(Some(0)) => State::Head(Vec::new()),
                Some(Some(n)) => State::Body(n),
                // Unparseable: hyper refuses it and closes.
                Some(None) => State::Off,
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let hex_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if hex_end == 0 || hex_end > 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[..hex_end]).ok()?, 16).ok()
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            this.observe(&buf.filled()[before..]);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(stream: &[u8], split: usize) -> Vec<bool> {
        let (mut w, v) = Watched::new((), 65536);
        for piece in stream.chunks(split) {
            w.observe(piece);
        }
        let mut out = Vec::new();
        while let Some(x) = v.0.lock().unwrap().pop_front() {
            out.push(x);
        }
        out
    }

    #[test]
    fn follows_framing_across_any_split() {
        let stream = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
POST /d HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
GET /e HTTP/1.1\r\n\r\n";
        for split in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(
                verdicts(stream, split),
                [false, false, false, true, false],
                "split {split}"
            );
        }
    }

    #[test]
    fn body_text_that_looks_like_a_head_is_not_a_head() {
        let body = "POST /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let stream = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}GET / HTTP/1.1\r\n\r\n",
            body.len()
        );
        assert_eq!(verdicts(stream.as_bytes(), 5), [false, false]);
    }
}
