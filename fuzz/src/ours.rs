//! One connection's bytes read request after request by the daemon's codec, as the
//! connection loop reads them: [`request::parse`] decides each head and its framing,
//! [`BodyProgress`] follows the body, the next head starts where the body ended.

use proxy_daemon::http1::body::BodyProgress;
use proxy_daemon::http1::chunked::ChunkError;
use proxy_daemon::http1::request::{self, HeadError};
use proxy_daemon::http1::Framing;

/// Head size limit for the comparison: larger than any fuzz input, so the configurable
/// limit (431) never differs from hyper's.
pub const MAX_HEAD: usize = 1 << 20;

/// A request the daemon's codec accepted whole.
#[derive(Debug, Clone)]
pub struct Request {
    /// Where its head starts in the input.
    pub start: usize,
    pub head_len: usize,
    pub method: Vec<u8>,
    pub target: Vec<u8>,
    /// The body's data (chunked: decoded).
    pub body: Vec<u8>,
    pub keep_alive: bool,
    pub upgrade: bool,
}

/// How reading the connection ended.
#[derive(Debug, Clone)]
pub enum End {
    /// Every byte was read; nothing pending.
    Clean,
    /// The bytes ran out inside a head.
    HeadIncomplete,
    /// The head at this offset was refused.
    HeadRefused { start: usize, error: HeadError },
    /// The bytes ran out inside the body of the request (head accepted).
    BodyIncomplete(Request),
    /// The body of this request was refused.
    BodyRefused(Request, ChunkError),
    /// The daemon stops reading after the last request: it asked to close, or upgraded
    /// (tunnel bytes follow), or is a CONNECT (refused, then closed).
    Stopped,
}

#[derive(Debug, Clone)]
pub struct Reading {
    pub requests: Vec<Request>,
    pub end: End,
}

pub fn read(input: &[u8]) -> Reading {
    let mut requests = Vec::new();
    let mut at = 0;
    loop {
        let buf = &input[at..];
        if buf.is_empty() {
            return Reading {
                requests,
                end: End::Clean,
            };
        }
        let head = match request::parse(buf, MAX_HEAD) {
            Ok(Some(head)) => head,
            Ok(None) => {
                return Reading {
                    requests,
                    end: End::HeadIncomplete,
                }
            }
            Err(error) => {
                return Reading {
                    requests,
                    end: End::HeadRefused { start: at, error },
                }
            }
        };
        let mut req = Request {
            start: at,
            head_len: head.len,
            method: head.method(buf).to_vec(),
            target: head.target.of(buf).to_vec(),
            body: Vec::new(),
            keep_alive: head.keep_alive,
            upgrade: head.upgrade,
        };
        let mut pos = head.len;
        let mut body = BodyProgress::new(head.framing);
        while !body.is_done() {
            if pos == buf.len() {
                return Reading {
                    requests,
                    end: End::BodyIncomplete(req),
                };
            }
            match head.framing {
                Framing::Chunked => match body.step_chunked(&buf[pos..]) {
                    Ok(step) => {
                        req.body.extend_from_slice(&buf[pos..][step.data]);
                        pos += step.consumed;
                    }
                    Err(e) => {
                        return Reading {
                            requests,
                            end: End::BodyRefused(req, e),
                        }
                    }
                },
                _ => {
                    let n = body.take(&buf[pos..]).expect("lengths cannot fail");
                    req.body.extend_from_slice(&buf[pos..pos + n]);
                    pos += n;
                }
            }
        }
        at += pos;
        let stop = !req.keep_alive || req.upgrade || req.method == b"CONNECT";
        requests.push(req);
        if stop {
            return Reading {
                requests,
                end: End::Stopped,
            };
        }
    }
}
