//! Request heads: one parse per head decides everything the proxy needs, framing first.
//!
//! This parse is the request-smuggling guard: the body framing it decides is the only one
//! the daemon ever uses (to find the next request on the connection and to pass the body
//! upstream), and the upstream gets a head the daemon wrote itself. It follows hyper's
//! server rules (httparse tokenizing, `Content-Length` as plain digits, equal duplicates
//! allowed, `Transfer-Encoding` only on HTTP/1.1 and only with `chunked` last) and is
//! stricter where hyper is lenient and a proxy must not be: a head with both
//! `Content-Length` and `Transfer-Encoding`, or with more than one `Host`, is refused.

use std::mem::MaybeUninit;

use super::{
    drop_nominated, parse_decimal, ConnectionTokens, Field, FieldSet, Framing, Known, Span,
    MAX_HEADERS,
};

/// The largest `Content-Length` accepted (hyper's: larger ones are refused).
const MAX_CONTENT_LENGTH: u64 = u64::MAX - 2;

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Larger than the configured limit, or more than [`MAX_HEADERS`] fields: 431.
    TooLarge,
    /// Not HTTP/1.x syntax (httparse's verdict), or an invalid framing field: 400.
    Malformed(&'static str),
    /// Framing two parsers could read differently (`Content-Length` with
    /// `Transfer-Encoding`, differing lengths): 400 and close.
    Ambiguous(&'static str),
}

/// How many times a field occurs, and where the first one is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Occurs {
    #[default]
    Never,
    Once(Span),
    More,
}

impl Occurs {
    fn add(&mut self, value: Span) {
        *self = match self {
            Occurs::Never => Occurs::Once(value),
            _ => Occurs::More,
        }
    }
}

/// A parsed request head. Spans point into the buffer it was parsed from.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// Bytes the head took in the buffer (the body, if any, starts there).
    pub len: usize,
    pub method: Span,
    pub target: Span,
    /// HTTP/1.1 (else HTTP/1.0).
    pub http11: bool,
    pub fields: Vec<Field>,
    pub framing: Framing,
    /// The client allows another request on this connection after this one.
    pub keep_alive: bool,
    /// HTTP/1.1 with `Upgrade` and a `Connection: upgrade` token.
    pub upgrade: bool,
    pub host: Occurs,
    pub target_host: Occurs,
    pub secret: Occurs,
    /// The client's `X-Request-Id` when it sent exactly one the proxy can reuse (1–200
    /// printable ASCII bytes); otherwise `Never` and every such field is dropped.
    pub request_id: Occurs,
    /// Fields never forwarded as received: hop-by-hop ones (except the
    /// `Transfer-Encoding` of a chunked body, which passes through still chunked), those
    /// the proxy replaces (`Host`, `X-Iterate-Proxy-Via`), the proxy's own (target,
    /// secret), repeated `Content-Length` lines (one is kept) and repeated `X-Request-Id`
    /// lines.
    pub dropped: FieldSet,
}

impl RequestHead {
    pub fn fields(&self) -> &[Field] {
        &self.fields
    }

    pub fn method<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        self.method.of(buf)
    }

    pub fn is_method(&self, buf: &[u8], method: &[u8]) -> bool {
        self.method.of(buf) == method
    }

    /// The path part of the request target (no query).
    pub fn path<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        let target = self.target.of(buf);
        let end = target
            .iter()
            .position(|&b| b == b'?')
            .unwrap_or(target.len());
        &target[..end]
    }
}

/// Parses a request head at the start of `buf`. `Ok(None)`: incomplete, read more.
pub fn parse(buf: &[u8], max_head: usize) -> Result<Option<RequestHead>, HeadError> {
    let mut raw: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut raw)
    {
        Ok(httparse::Status::Complete(len)) if len > max_head => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_head => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Malformed(error_name(e))),
    };
    let method = Span::within(buf, req.method.expect("complete").as_bytes());
    let target = Span::within(buf, req.path.expect("complete").as_bytes());
    let http11 = req.version == Some(1);

    let mut head = RequestHead {
        len,
        method,
        target,
        http11,
        fields: Vec::with_capacity(req.headers.len()),
        framing: Framing::Empty,
        keep_alive: http11,
        upgrade: false,
        host: Occurs::Never,
        target_host: Occurs::Never,
        secret: Occurs::Never,
        request_id: Occurs::Never,
        dropped: FieldSet::default(),
    };
    let mut connection = ConnectionTokens::default();
    let mut has_upgrade = false;
    let mut length: Option<u64> = None;
    let mut te_chunked = None::<bool>;
    let mut request_id_field = 0;
    for (i, h) in req.headers.iter().enumerate() {
        let name = Span::within(buf, h.name.as_bytes());
        let value = Span::within(buf, h.value);
        head.fields.push(Field { name, value });
        let known = Known::of(h.name.as_bytes());
        if known.is_hop_by_hop() {
            head.dropped.insert(i);
        }
        match known {
            Known::ContentLength => {
                let n = parse_decimal(h.value)
                    .filter(|&n| n <= MAX_CONTENT_LENGTH)
                    .ok_or(HeadError::Malformed("invalid content-length"))?;
                match length {
                    None => length = Some(n),
                    Some(prev) if prev == n => head.dropped.insert(i),
                    Some(_) => return Err(HeadError::Ambiguous("differing content-lengths")),
                }
            }
            Known::TransferEncoding => {
                if !http11 {
                    return Err(HeadError::Malformed("transfer-encoding on HTTP/1.0"));
                }
                // The final coding is the last line's last list element, as hyper reads
                // it: an empty one (`chunked,`) is no coding, and a value with obs-text
                // names none.
                let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
                let visible = h
                    .value
                    .iter()
                    .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
                te_chunked = Some(visible && last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            }
            Known::Connection => connection.add(h.value),
            Known::Upgrade => has_upgrade = true,
            Known::Host => {
                head.host.add(value);
                head.dropped.insert(i);
            }
            Known::TargetHost => {
                head.target_host.add(value);
                head.dropped.insert(i);
            }
            Known::Secret => {
                head.secret.add(value);
                head.dropped.insert(i);
            }
            Known::Via => head.dropped.insert(i),
            Known::RequestId => {
                if head.request_id != Occurs::Never {
                    head.dropped.insert(i);
                } else {
                    request_id_field = i;
                }
                head.request_id.add(value);
            }
            _ => {}
        }
    }
    if head.host == Occurs::More {
        return Err(HeadError::Malformed("more than one host"));
    }
    head.framing = match (te_chunked, length) {
        (Some(_), Some(_)) => {
            return Err(HeadError::Ambiguous(
                "both content-length and transfer-encoding",
            ))
        }
        (Some(false), None) => return Err(HeadError::Malformed("transfer-encoding not chunked")),
        (Some(true), None) => {
            // Hop-by-hop, but the body passes through still chunked: its coding fields
            // go with it.
            for (i, f) in head.fields.iter().enumerate() {
                if Known::of(f.name.of(buf)) == Known::TransferEncoding {
                    head.dropped.remove(i);
                }
            }
            Framing::Chunked
        }
        (None, Some(0)) | (None, None) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
    };
    if http11 {
        head.keep_alive = !connection.close;
        head.upgrade = has_upgrade && connection.upgrade;
    } else {
        head.keep_alive = connection.keep_alive && !connection.close;
    }
    if connection.names_fields {
        drop_nominated(buf, &head.fields, &mut head.dropped);
    }
    // Reusable unless `Connection` named it (then it is hop-by-hop, not the client's id).
    let reusable = match head.request_id {
        Occurs::Once(id) => {
            crate::request_id::is_reusable(id.of(buf)) && !head.dropped.contains(request_id_field)
        }
        _ => false,
    };
    if !reusable && head.request_id != Occurs::Never {
        // Several ids, or one that cannot be reused: none is passed on; the proxy makes
        // one.
        head.request_id = Occurs::Never;
        for (i, f) in head.fields.iter().enumerate() {
            if Known::of(f.name.of(buf)) == Known::RequestId {
                head.dropped.insert(i);
            }
        }
    }
    Ok(Some(head))
}

fn error_name(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> RequestHead {
        parse(raw.as_bytes(), 65536)
            .expect("valid")
            .expect("complete")
    }

    fn err(raw: &str) -> HeadError {
        parse(raw.as_bytes(), 65536).expect_err(raw)
    }

    #[test]
    fn framing_decisions() {
        assert_eq!(ok("GET / HTTP/1.1\r\n\r\n").framing, Framing::Empty);
        assert_eq!(
            ok("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n").framing,
            Framing::Length(5)
        );
        assert_eq!(
            ok("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").framing,
            Framing::Empty
        );
        assert_eq!(
            ok("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").framing,
            Framing::Chunked
        );
        let dup = ok("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(dup.framing, Framing::Length(5));
        assert!(!dup.dropped.contains(0) && dup.dropped.contains(1));
        for (raw, want) in [
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both",
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                "both",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                "differing",
            ),
        ] {
            assert!(
                matches!(err(raw), HeadError::Ambiguous(why) if why.contains(want)),
                "{raw:?}"
            );
        }
        for raw in [
            "POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked,\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 18446744073709551614\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nX-Folded: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
        ] {
            assert!(matches!(err(raw), HeadError::Malformed(_)), "{raw:?}");
        }
        // Not valid UTF-8 (obs-text): names no coding.
        for raw in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: \xff, chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\x80\r\n\r\n",
        ] {
            assert!(matches!(parse(raw, 65536), Err(HeadError::Malformed(_))));
        }
        let raw = "GET / HTTP/2.0\r\n\r\n";
        assert!(matches!(err(raw), HeadError::Malformed(_)), "{raw:?}");
    }

    #[test]
    fn lf_only_and_leading_empty_lines_are_one_head_each() {
        // hyper (httparse) accepts both; so does this parser, and the head ends where
        // httparse says, never at the next CRLF CRLF.
        let raw = "\r\nPOST /a HTTP/1.1\nContent-Length: 3\n\nabcGET /b HTTP/1.1\r\n\r\n";
        let head = ok(raw);
        assert_eq!(head.framing, Framing::Length(3));
        assert_eq!(&raw[head.len..head.len + 3], "abc");
        assert_eq!(head.path(raw.as_bytes()), b"/a");
    }

    #[test]
    fn partial_and_too_large() {
        assert!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n", 65536)
            .unwrap()
            .is_none());
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(100));
        assert_eq!(parse(big.as_bytes(), 64).unwrap_err(), HeadError::TooLarge);
        assert_eq!(
            parse(&big.as_bytes()[..90], 64).unwrap_err(),
            HeadError::TooLarge
        );
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            parse(raw.as_bytes(), 65536).unwrap_err(),
            HeadError::TooLarge
        );
    }

    #[test]
    fn keep_alive_and_upgrade() {
        assert!(ok("GET / HTTP/1.1\r\n\r\n").keep_alive);
        assert!(!ok("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!ok("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(ok("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        let up =
            ok("GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(up.upgrade);
        assert!(!ok("GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").upgrade);
        assert!(!ok("GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n").upgrade);
        // A value with obs-text names no option (hyper does not read it either).
        let obs = |raw: &[u8]| parse(raw, 65536).unwrap().unwrap();
        assert!(!obs(b"GET / HTTP/1.0\r\nConnection: keep-alive, \xff\r\n\r\n").keep_alive);
        assert!(obs(b"GET / HTTP/1.1\r\nConnection: close, \xff\r\n\r\n").keep_alive);
        assert!(
            !obs(b"GET / HTTP/1.1\r\nConnection: upgrade, \xff\r\nUpgrade: websocket\r\n\r\n")
                .upgrade
        );
    }

    #[test]
    fn special_fields_are_found_and_dropped() {
        let raw = "GET /p?q=1 HTTP/1.1\r\nHost: h\r\nX-Iterate-Proxy-Target-Host: 80__x\r\n\
X-ITERATE-PROJECT-INGRESS-SECRET: s\r\nX-Iterate-Proxy-Via: spoof\r\nConnection: keep-alive, X-Hop\r\n\
X-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Request-Id: abc\r\nCookie: a\r\nContent-Length: 0\r\n\r\n";
        let head = ok(raw);
        let b = raw.as_bytes();
        assert!(matches!(head.host, Occurs::Once(s) if s.of(b) == b"h"));
        assert!(matches!(head.target_host, Occurs::Once(s) if s.of(b) == b"80__x"));
        assert!(matches!(head.secret, Occurs::Once(s) if s.of(b) == b"s"));
        assert!(matches!(head.request_id, Occurs::Once(s) if s.of(b) == b"abc"));
        let kept: Vec<&[u8]> = head
            .fields()
            .iter()
            .enumerate()
            .filter(|(i, _)| !head.dropped.contains(*i))
            .map(|(_, f)| f.name.of(b))
            .collect();
        assert_eq!(kept, [&b"X-Request-Id"[..], b"Cookie", b"Content-Length"]);
        assert_eq!(head.path(b), b"/p");
    }

    #[test]
    fn connection_names_any_number_of_fields_and_the_request_id() {
        let names: Vec<String> = (0..40).map(|i| format!("X-{i}")).collect();
        let raw = format!(
            "GET / HTTP/1.1\r\nConnection: {}, X-Request-Id\r\n{}X-Request-Id: abc\r\nCookie: a\r\n\r\n",
            names.join(", "),
            names.iter().map(|n| format!("{n}: v\r\n")).collect::<String>()
        );
        let head = ok(&raw);
        let kept: Vec<&[u8]> = head
            .fields()
            .iter()
            .enumerate()
            .filter(|(i, _)| !head.dropped.contains(*i))
            .map(|(_, f)| f.name.of(raw.as_bytes()))
            .collect();
        assert_eq!(kept, [&b"Cookie"[..]]);
        assert_eq!(
            head.request_id,
            Occurs::Never,
            "a hop-by-hop id is not reused"
        );
    }

    #[test]
    fn connection_cannot_nominate_framing_fields() {
        let raw = "POST / HTTP/1.1\r\nConnection: content-length, transfer-encoding\r\nContent-Length: 2\r\n\r\n";
        let head = ok(raw);
        assert_eq!(head.framing, Framing::Length(2));
        assert!(!head.dropped.contains(1), "content-length kept");
    }
}
