//! Header rewriting between client and upstream (SPEC §2).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::target::TARGET_HEADER;

pub const SECRET_HEADER: &str = "x-iterate-project-ingress-secret";
pub const VIA_HEADER: &str = "x-iterate-proxy-via";
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy ones proxies still strip).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// True when the request asks for a protocol upgrade (`Connection: upgrade` + `Upgrade`).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has_token(headers, "upgrade")
}

fn connection_has_token(headers: &HeaderMap, token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers and those named in `Connection`. With `keep_upgrade`, the
/// `Connection: upgrade` + `Upgrade` pair of an upgrade survives.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = if keep_upgrade {
        headers.get_all(header::UPGRADE).iter().cloned().collect()
    } else {
        Vec::new()
    };
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    if !upgrade.is_empty() {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        for value in upgrade {
            headers.append(header::UPGRADE, value);
        }
    }
}

/// Turns the client's request headers into the upstream's.
pub fn rewrite_request(
    headers: &mut HeaderMap,
    port: u16,
    is_upgrade: bool,
    request_id: &HeaderValue,
) {
    let via = headers.get(header::HOST).cloned();
    strip_hop_by_hop(headers, is_upgrade);
    headers.remove(TARGET_HEADER);
    headers.remove(SECRET_HEADER);
    headers.insert(header::HOST, localhost_authority(port));
    headers.remove(VIA_HEADER);
    if let Some(via) = via {
        headers.insert(VIA_HEADER, via);
    }
    headers.insert(REQUEST_ID_HEADER, request_id.clone());
}

/// Turns the upstream's response headers into the client's.
pub fn rewrite_response(headers: &mut HeaderMap, is_switching_protocols: bool) {
    strip_hop_by_hop(headers, is_switching_protocols);
}

fn localhost_authority(port: u16) -> HeaderValue {
    HeaderValue::try_from(format!("localhost:{port}")).expect("ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn request_rewrite() {
        let mut h = map(&[
            ("host", "4096__mach.iterate.town"),
            ("x-iterate-proxy-target-host", "4096__mach.iterate.town"),
            ("x-iterate-project-ingress-secret", "s3cret"),
            ("x-iterate-proxy-via", "spoofed"),
            ("connection", "keep-alive, X-Custom-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-custom-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("origin", "https://4096__mach.iterate.town"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("x-forwarded-for", "1.2.3.4"),
            ("upgrade", "websocket"),
        ]);
        rewrite_request(&mut h, 4096, false, &HeaderValue::from_static("rid"));
        assert_eq!(h["host"], "localhost:4096");
        assert_eq!(h["x-iterate-proxy-via"], "4096__mach.iterate.town");
        assert_eq!(h["x-request-id"], "rid");
        for gone in [
            "x-iterate-proxy-target-host",
            "x-iterate-project-ingress-secret",
            "connection",
            "keep-alive",
            "x-custom-hop",
            "te",
            "transfer-encoding",
            "proxy-authorization",
            "upgrade",
        ] {
            assert!(!h.contains_key(gone), "{gone} must be removed");
        }
        assert_eq!(h["origin"], "https://4096__mach.iterate.town");
        let cookies: Vec<_> = h.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4");
    }

    #[test]
    fn upgrade_rewrite_keeps_the_pair() {
        let mut h = map(&[
            ("host", "h"),
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-protocol", "tty"),
            ("sec-websocket-extensions", "permessage-deflate"),
        ]);
        assert!(is_upgrade_request(&h));
        rewrite_request(&mut h, 7681, true, &HeaderValue::from_static("rid"));
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(h["sec-websocket-protocol"], "tty");
        assert_eq!(h["sec-websocket-extensions"], "permessage-deflate");
    }

    #[test]
    fn upgrade_detection() {
        assert!(!is_upgrade_request(&map(&[("upgrade", "websocket")])));
        assert!(!is_upgrade_request(&map(&[("connection", "upgrade")])));
        assert!(is_upgrade_request(&map(&[
            ("connection", "UPGRADE"),
            ("upgrade", "h2c")
        ])));
    }

    #[test]
    fn response_rewrite() {
        let mut h = map(&[
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-type", "text/event-stream"),
            ("set-cookie", "a=1"),
        ]);
        rewrite_response(&mut h, false);
        assert!(!h.contains_key("connection"));
        assert!(!h.contains_key("keep-alive"));
        assert!(!h.contains_key("transfer-encoding"));
        assert_eq!(h["content-type"], "text/event-stream");
        assert_eq!(h["set-cookie"], "a=1");

        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        ]);
        rewrite_response(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
