//! Response heads from the upstream: status, framing (RFC 9112 §6.3) and the fields that
//! are not relayed to the client.

use std::mem::MaybeUninit;

use super::{
    drop_nominated, parse_decimal, tokens, ConnectionTokens, Field, FieldSet, Framing, Known, Span,
    MAX_HEADERS,
};

/// An upstream response the proxy cannot relay (the client gets 502).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseError {
    TooLarge,
    Malformed(&'static str),
}

impl std::fmt::Display for ResponseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResponseError::TooLarge => f.write_str("response head too large"),
            ResponseError::Malformed(why) => write!(f, "malformed response head: {why}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ResponseHead {
    /// Bytes the head took in the buffer.
    pub len: usize,
    pub status: u16,
    pub reason: Span,
    pub fields: Vec<Field>,
    pub framing: Framing,
    /// The upstream allows another request on this connection after this response.
    pub keep_alive: bool,
    /// `Keep-Alive: timeout=N`: the upstream closes idle connections after N seconds.
    pub idle_timeout_hint: Option<u32>,
    /// Fields not relayed as received (hop-by-hop, and `Content-Length` next to
    /// `Transfer-Encoding`). A chunked body's `Transfer-Encoding` and a 101's `Upgrade`
    /// are kept: they still describe what follows.
    pub dropped: FieldSet,
}

impl ResponseHead {
    pub fn fields(&self) -> &[Field] {
        &self.fields
    }

    /// An interim response (1xx other than 101): another head follows.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// Parses a response head at the start of `buf`. `request_was_head`: a response to
/// `HEAD` has no body whatever its fields say. `Ok(None)`: incomplete.
pub fn parse(
    buf: &[u8],
    max_head: usize,
    request_was_head: bool,
) -> Result<Option<ResponseHead>, ResponseError> {
    let mut raw: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut raw)
    {
        Ok(httparse::Status::Complete(len)) if len > max_head => {
            return Err(ResponseError::TooLarge)
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_head => {
            return Err(ResponseError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooLarge),
        Err(_) => return Err(ResponseError::Malformed("not an HTTP/1.x response")),
    };
    let status = resp.code.expect("complete");
    let http11 = resp.version == Some(1);
    // An empty reason phrase may not point into `buf`.
    let reason = match resp.reason {
        Some(r) if !r.is_empty() => Span::within(buf, r.as_bytes()),
        _ => Span::default(),
    };
    let mut head = ResponseHead {
        len,
        status,
        reason,
        fields: Vec::with_capacity(resp.headers.len()),
        framing: Framing::UntilClose,
        keep_alive: http11,
        idle_timeout_hint: None,
        dropped: FieldSet::default(),
    };
    let mut connection = ConnectionTokens::default();
    let mut length: Option<u64> = None;
    let mut length_invalid = false;
    let mut te_chunked: Option<bool> = None;
    for (i, h) in resp.headers.iter().enumerate() {
        head.fields.push(Field {
            name: Span::within(buf, h.name.as_bytes()),
            value: Span::within(buf, h.value),
        });
        let known = Known::of(h.name.as_bytes());
        if known.is_hop_by_hop() {
            head.dropped.insert(i);
        }
        match known {
            Known::ContentLength => {
                // As hyper's client: a list of equal values is one length.
                for v in tokens(h.value) {
                    match (parse_decimal(v), length) {
                        (Some(n), None) => length = Some(n),
                        (Some(n), Some(prev)) if n == prev => {}
                        _ => length_invalid = true,
                    }
                }
            }
            Known::TransferEncoding => {
                te_chunked = Some(
                    tokens(h.value)
                        .last()
                        .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")),
                );
            }
            Known::Connection => connection.add(h.value),
            Known::KeepAlive => head.idle_timeout_hint = keep_alive_timeout(h.value),
            _ => {}
        }
    }
    let no_body =
        request_was_head || (100..200).contains(&status) || status == 204 || status == 304;
    head.framing = if no_body {
        Framing::Empty
    } else if let Some(chunked) = te_chunked {
        // Transfer-Encoding wins over Content-Length, which is then not relayed.
        for (i, f) in head.fields.iter().enumerate() {
            match Known::of(f.name.of(buf)) {
                Known::ContentLength => head.dropped.insert(i),
                Known::TransferEncoding if chunked => head.dropped.remove(i),
                _ => {}
            }
        }
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if length_invalid {
        return Err(ResponseError::Malformed("invalid content-length"));
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    if no_body && te_chunked == Some(true) {
        // HEAD/304 describe the body they would have: keep the field as sent.
        for (i, f) in head.fields.iter().enumerate() {
            if Known::of(f.name.of(buf)) == Known::TransferEncoding {
                head.dropped.remove(i);
            }
        }
    }
    if status == 101 {
        for (i, f) in head.fields.iter().enumerate() {
            if Known::of(f.name.of(buf)) == Known::Upgrade {
                head.dropped.remove(i);
            }
        }
    }
    head.keep_alive = if http11 {
        !connection.close
    } else {
        connection.keep_alive && !connection.close
    } && head.framing != Framing::UntilClose;
    if connection.names_fields {
        drop_nominated(buf, &head.fields, &mut head.dropped);
    }
    Ok(Some(head))
}

/// `timeout=N` in a `Keep-Alive` field.
fn keep_alive_timeout(value: &[u8]) -> Option<u32> {
    tokens(value).find_map(|t| {
        let (k, v) = t.split_at(t.iter().position(|&b| b == b'=')?);
        k.trim_ascii()
            .eq_ignore_ascii_case(b"timeout")
            .then(|| parse_decimal(v[1..].trim_ascii()))
            .flatten()
            .map(|n| n.min(u32::MAX as u64) as u32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str, head: bool) -> ResponseHead {
        parse(raw.as_bytes(), 65536, head).unwrap().unwrap()
    }

    #[test]
    fn framing_per_rfc_9112() {
        let f = |raw: &str| ok(raw, false).framing;
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"),
            Framing::Length(3)
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n"),
            Framing::Length(3)
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            Framing::Empty
        );
        assert_eq!(f("HTTP/1.1 200 OK\r\n\r\n"), Framing::UntilClose);
        assert_eq!(
            f("HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"),
            Framing::Empty
        );
        assert_eq!(f("HTTP/1.1 304 Not Modified\r\n\r\n"), Framing::Empty);
        assert_eq!(f("HTTP/1.1 100 Continue\r\n\r\n"), Framing::Empty);
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
            Framing::Chunked
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Framing::UntilClose
        );
        assert_eq!(
            ok("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true).framing,
            Framing::Empty
        );
        assert!(parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n",
            65536,
            false
        )
        .is_err());
        assert!(parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            65536,
            false
        )
        .is_err());
    }

    #[test]
    fn keep_alive_and_hints() {
        let r = ok(
            "HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\nContent-Length: 1\r\n\r\n",
            false,
        );
        assert!(r.keep_alive);
        assert_eq!(r.idle_timeout_hint, Some(5));
        assert!(
            !ok(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                false
            )
            .keep_alive
        );
        assert!(!ok("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false).keep_alive);
        assert!(
            ok(
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
                false
            )
            .keep_alive
        );
        assert!(
            !ok("HTTP/1.1 200 OK\r\n\r\n", false).keep_alive,
            "close-delimited"
        );
    }

    #[test]
    fn dropped_fields() {
        let raw =
            "HTTP/1.1 200 OK\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
Transfer-Encoding: chunked\r\nContent-Length: 4\r\nSet-Cookie: a=1\r\n\r\n";
        let r = ok(raw, false);
        let kept: Vec<&[u8]> = r
            .fields()
            .iter()
            .enumerate()
            .filter(|(i, _)| !r.dropped.contains(*i))
            .map(|(_, f)| f.name.of(raw.as_bytes()))
            .collect();
        assert_eq!(kept, [&b"Transfer-Encoding"[..], b"Set-Cookie"]);
        let up =
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let r = ok(up, false);
        assert!(r.dropped.contains(0) && !r.dropped.contains(1));
        assert!(!r.is_interim());
        assert!(ok("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", false).is_interim());
    }
}
