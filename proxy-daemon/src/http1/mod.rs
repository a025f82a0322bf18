//! The daemon's HTTP/1.1 codec: pure types, no I/O.
//!
//! Why not hyper on this path: a proxy must forward the request target and header bytes
//! exactly as received, decide body framing once (the smuggling guard *is* the parser),
//! and pass bodies through without re-framing them; hyper hides the raw head, drops
//! `Content-Length` when `Transfer-Encoding` is present (so a guard needs a second parse of
//! the same bytes) and costs about twice the CPU per request measured here
//! (`docs/http-path.md`). httparse does the tokenizing, as it does inside hyper; this
//! module adds the framing rules (RFC 9112 §6) and the header classification a proxy needs.
//!
//! - [`request`]: one parse per request head → [`request::RequestHead`] with its framing
//!   decision and the headers the proxy treats specially.
//! - [`response`]: the upstream's response head and its framing.
//! - [`chunked`]: a strict chunked-body tracker (bodies pass through byte for byte).
//! - [`body`]: how far a body has been relayed, whatever its framing.
//! - [`write`]: the heads the proxy writes (upstream request, client response, its own).

pub mod body;
pub mod chunked;
pub mod request;
pub mod response;
pub mod write;

use std::collections::HashMap;

/// Most header fields accepted in one head (hyper's default too); more → 431.
pub const MAX_HEADERS: usize = 100;

/// Byte range of a token inside the head buffer it was parsed from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn of<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start as usize..self.end as usize]
    }

    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The span of `part`, a subslice of `buf`.
    fn within(buf: &[u8], part: &[u8]) -> Span {
        let start = part.as_ptr() as usize - buf.as_ptr() as usize;
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }
}

/// One header field: name and value spans (value without surrounding whitespace).
#[derive(Debug, Clone, Copy, Default)]
pub struct Field {
    pub name: Span,
    pub value: Span,
}

/// A set of header indices (at most [`MAX_HEADERS`]): the fields not forwarded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FieldSet(u128);

impl FieldSet {
    pub fn insert(&mut self, i: usize) {
        self.0 |= 1 << i;
    }

    pub fn remove(&mut self, i: usize) {
        self.0 &= !(1 << i);
    }

    pub fn contains(&self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }
}

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding (the final coding).
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

/// Header names the proxy treats specially, recognised in one pass per head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    Upgrade,
    KeepAlive,
    ProxyConnection,
    Te,
    Trailer,
    ProxyAuthenticate,
    ProxyAuthorization,
    TargetHost,
    Secret,
    Via,
    RequestId,
    Other,
}

pub(crate) const TARGET_HOST: &[u8] = b"x-iterate-proxy-target-host";
pub(crate) const SECRET: &[u8] = b"x-iterate-project-ingress-secret";
pub(crate) const VIA: &[u8] = b"x-iterate-proxy-via";
pub(crate) const REQUEST_ID: &[u8] = b"x-request-id";

impl Known {
    /// Classifies a header name (ASCII case-insensitive), by length first.
    pub(crate) fn of(name: &[u8]) -> Known {
        let is = |s: &[u8]| name.eq_ignore_ascii_case(s);
        match name.len() {
            2 if is(b"te") => Known::Te,
            4 if is(b"host") => Known::Host,
            7 if is(b"upgrade") => Known::Upgrade,
            7 if is(b"trailer") => Known::Trailer,
            10 if is(b"connection") => Known::Connection,
            10 if is(b"keep-alive") => Known::KeepAlive,
            12 if is(REQUEST_ID) => Known::RequestId,
            14 if is(b"content-length") => Known::ContentLength,
            16 if is(b"proxy-connection") => Known::ProxyConnection,
            17 if is(b"transfer-encoding") => Known::TransferEncoding,
            18 if is(b"proxy-authenticate") => Known::ProxyAuthenticate,
            19 if is(b"proxy-authorization") => Known::ProxyAuthorization,
            19 if is(VIA) => Known::Via,
            27 if is(TARGET_HOST) => Known::TargetHost,
            32 if is(SECRET) => Known::Secret,
            _ => Known::Other,
        }
    }

    /// Hop-by-hop fields (RFC 9110 §7.6.1 and the legacy ones proxies still strip):
    /// never forwarded as received. `Trailer` is not one: trailers pass through with the
    /// chunked body they belong to.
    pub(crate) fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            Known::Connection
                | Known::KeepAlive
                | Known::ProxyConnection
                | Known::Te
                | Known::TransferEncoding
                | Known::Upgrade
                | Known::ProxyAuthenticate
                | Known::ProxyAuthorization
        )
    }
}

/// The comma-separated tokens of a list-valued field (`Connection`, `Transfer-Encoding`).
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// The `Connection` tokens a message carries, as far as the proxy cares.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ConnectionTokens {
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
    /// Some token names another field, which is then hop-by-hop too.
    pub names_fields: bool,
}

impl ConnectionTokens {
    pub(crate) fn add(&mut self, value: &[u8]) {
        // As hyper reads it: a value that is not visible ASCII (obs-text) names no
        // connection option, so both agree on where the connection ends.
        let visible = value
            .iter()
            .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
        for t in tokens(value) {
            if !visible {
                self.names_fields = true;
            } else if t.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if t.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else {
                self.names_fields = true;
            }
        }
    }
}

/// Marks fields named by `Connection` tokens (other than the standard ones) as dropped,
/// however many tokens there are. Rare, so done in a second pass only when some token
/// names a field; linear in tokens and fields (a head may carry thousands of tokens).
pub(crate) fn drop_nominated(buf: &[u8], fields: &[Field], drop: &mut FieldSet) {
    // Field name, lowercase → the fields so named. Framing fields stay whatever a token
    // says: the body is passed through as it is framed, so its framing must reach the
    // other side unchanged.
    let mut named: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
    for (i, f) in fields.iter().enumerate() {
        let name = f.name.of(buf);
        if !matches!(
            Known::of(name),
            Known::ContentLength | Known::TransferEncoding
        ) {
            named.entry(name.to_ascii_lowercase()).or_default().push(i);
        }
    }
    let mut key = Vec::new();
    for f in fields {
        if Known::of(f.name.of(buf)) != Known::Connection {
            continue;
        }
        for t in tokens(f.value.of(buf)) {
            key.clear();
            key.extend(t.iter().map(u8::to_ascii_lowercase));
            for &i in named.get(&key).into_iter().flatten() {
                drop.insert(i);
            }
        }
    }
}

/// Decimal digits only (no sign, no spaces, no list), as hyper reads `Content-Length`.
pub(crate) fn parse_decimal(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}
