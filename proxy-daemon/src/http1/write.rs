//! The heads the proxy writes. Kept fields are copied byte for byte (name case included);
//! the proxy adds only what it owns.

use super::request::RequestHead;
use super::response::ResponseHead;
use super::Known;

/// Writes `<decimal n>`.
pub fn decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// What the proxy adds to the request it sends upstream.
pub struct UpstreamRequest<'a> {
    pub port: u16,
    /// A request id the proxy made (the client sent none it could reuse): sent as
    /// `X-Request-Id`.
    pub new_request_id: Option<&'a [u8]>,
    /// Forward the `Connection: upgrade` + `Upgrade` pair.
    pub upgrade: bool,
}

/// The request head for the upstream: method and target as received, HTTP/1.1,
/// `Host: localhost:<port>`, `X-Iterate-Proxy-Via: <inbound Host>`, every field the
/// client sent except the dropped ones.
pub fn upstream_request(out: &mut Vec<u8>, buf: &[u8], head: &RequestHead, add: &UpstreamRequest) {
    out.extend_from_slice(head.method.of(buf));
    out.push(b' ');
    out.extend_from_slice(head.target.of(buf));
    out.extend_from_slice(b" HTTP/1.1\r\nHost: localhost:");
    decimal(out, add.port as u64);
    out.extend_from_slice(b"\r\n");
    if let super::request::Occurs::Once(host) = head.host {
        field(out, b"X-Iterate-Proxy-Via", host.of(buf));
    }
    if let Some(id) = add.new_request_id {
        field(out, b"X-Request-Id", id);
    }
    for (i, f) in head.fields().iter().enumerate() {
        if !head.dropped.contains(i) {
            field(out, f.name.of(buf), f.value.of(buf));
        }
    }
    if add.upgrade {
        out.extend_from_slice(b"Connection: Upgrade\r\n");
        copy_fields(out, buf, head.fields(), Known::Upgrade);
    }
    out.extend_from_slice(b"\r\n");
}

fn copy_fields(out: &mut Vec<u8>, buf: &[u8], fields: &[super::Field], which: Known) {
    for f in fields {
        if Known::of(f.name.of(buf)) == which {
            field(out, f.name.of(buf), f.value.of(buf));
        }
    }
}

/// How the proxy frames a response for its client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientFraming {
    /// The proxy chunk-encodes a body the upstream delimited by closing.
    pub add_chunked: bool,
    /// The upstream's chunked body is decoded for an HTTP/1.0 client: its
    /// `Transfer-Encoding` is not relayed.
    pub remove_chunked: bool,
    /// `Connection: close`: the proxy closes the client connection after this response.
    pub close: bool,
    /// `Connection: keep-alive` for an HTTP/1.0 client that keeps the connection.
    pub keep_alive_1_0: bool,
    /// A 101: `Connection: upgrade` (the `Upgrade` fields are kept).
    pub upgrade: bool,
}

/// The response head for the client: status as received, every field the upstream sent
/// except the dropped ones, and the proxy's framing.
pub fn client_response(out: &mut Vec<u8>, buf: &[u8], head: &ResponseHead, framing: ClientFraming) {
    status_line(out, head.status, head.reason.of(buf));
    for (i, f) in head.fields().iter().enumerate() {
        if head.dropped.contains(i) {
            continue;
        }
        if framing.remove_chunked && Known::of(f.name.of(buf)) == Known::TransferEncoding {
            continue;
        }
        field(out, f.name.of(buf), f.value.of(buf));
    }
    if framing.add_chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if framing.upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\n");
    } else if framing.close {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if framing.keep_alive_1_0 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    decimal(out, status as u64);
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

/// A response the proxy makes itself (health, JSON errors): always with Content-Length.
pub fn local_response(
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    content_type: &str,
    body: &[u8],
    close: bool,
    with_body: bool,
) {
    status_line(out, status, reason.as_bytes());
    field(out, b"Content-Type", content_type.as_bytes());
    out.extend_from_slice(b"Content-Length: ");
    decimal(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if with_body {
        out.extend_from_slice(body);
    }
}

/// The chunk header for `n` data bytes the proxy chunk-encodes.
pub fn chunk_header(out: &mut Vec<u8>, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(n >> (i * 4)) & 0xf]);
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::{request, response};

    #[test]
    fn upstream_head_rewrites_as_specified() {
        let raw = b"GET //a/%2F/..\\b?x=* HTTP/1.0\r\nHost: 4096__m.iterate.town\r\n\
X-Iterate-Proxy-Target-Host: 4096__m.iterate.town\r\nX-Iterate-Project-Ingress-Secret: s\r\n\
X-Iterate-Proxy-Via: spoofed\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n\
TE: trailers\r\nProxy-Authorization: Basic x\r\nOrigin: https://o\r\nCookie: a=1\r\nCookie: b=2\r\n\
X-Forwarded-For: 1.2.3.4\r\nSec-WebSocket-Key: k\r\n\r\n";
        let head = request::parse(raw, 65536).unwrap().unwrap();
        let mut out = Vec::new();
        upstream_request(
            &mut out,
            raw,
            &head,
            &UpstreamRequest {
                port: 4096,
                new_request_id: Some(b"rid"),
                upgrade: false,
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET //a/%2F/..\\b?x=* HTTP/1.1\r\nHost: localhost:4096\r\n\
X-Iterate-Proxy-Via: 4096__m.iterate.town\r\nX-Request-Id: rid\r\nOrigin: https://o\r\n\
Cookie: a=1\r\nCookie: b=2\r\nX-Forwarded-For: 1.2.3.4\r\nSec-WebSocket-Key: k\r\n\r\n"
        );
    }

    #[test]
    fn upgrade_keeps_the_pair_and_chunked_keeps_its_coding() {
        let raw = b"GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Protocol: tty\r\nX-Request-Id: abc\r\n\r\n";
        let head = request::parse(raw, 65536).unwrap().unwrap();
        let mut out = Vec::new();
        let add = UpstreamRequest {
            port: 7681,
            new_request_id: None,
            upgrade: head.upgrade,
        };
        upstream_request(&mut out, raw, &head, &add);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /ws HTTP/1.1\r\nHost: localhost:7681\r\nSec-WebSocket-Protocol: tty\r\n\
X-Request-Id: abc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        );
        let raw = b"POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let head = request::parse(raw, 65536).unwrap().unwrap();
        let mut out = Vec::new();
        upstream_request(&mut out, raw, &head, &add);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("\r\nTransfer-Encoding: chunked\r\n"));
    }

    #[test]
    fn chunk_headers_are_lowercase_hex() {
        for (n, want) in [
            (0, "0\r\n"),
            (5, "5\r\n"),
            (255, "ff\r\n"),
            (65536, "10000\r\n"),
        ] {
            let mut out = Vec::new();
            chunk_header(&mut out, n);
            assert_eq!(out, want.as_bytes());
        }
    }

    #[test]
    fn client_head_framing() {
        let raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nContent-Type: text/event-stream\r\nSet-Cookie: a=1\r\n\r\n";
        let head = response::parse(raw, 65536, false).unwrap().unwrap();
        let mut out = Vec::new();
        let framing = ClientFraming {
            add_chunked: true,
            remove_chunked: false,
            close: false,
            keep_alive_1_0: false,
            upgrade: false,
        };
        client_response(&mut out, raw, &head, framing);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nSet-Cookie: a=1\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
    }
}
