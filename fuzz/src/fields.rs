//! A plain httparse view of a request head, for checks that must not lean on the daemon's
//! own field classification.

/// Enough for any head the daemon accepts (100 fields) plus the ones it adds.
const MAX_FIELDS: usize = 256;

/// A parsed request head, owned.
#[derive(Debug, Clone)]
pub struct Head {
    /// Bytes the head took.
    pub len: usize,
    pub method: Vec<u8>,
    pub target: Vec<u8>,
    /// 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub version: u8,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What httparse makes of the start of `buf`.
pub enum Parsed {
    Complete(Head),
    Partial,
    Error(httparse::Error),
}

pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = vec![httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Parsed::Complete(Head {
            len,
            method: req.method.unwrap_or_default().as_bytes().to_vec(),
            target: req.path.unwrap_or_default().as_bytes().to_vec(),
            version: req.version.unwrap_or_default(),
            fields: req
                .headers
                .iter()
                .map(|h| (h.name.as_bytes().to_vec(), h.value.to_vec()))
                .collect(),
        }),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(e) => Parsed::Error(e),
    }
}

impl Head {
    /// Values of the fields named `name` (ASCII case-insensitive), in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.fields
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.as_slice())
    }

    pub fn count(&self, name: &str) -> usize {
        self.values(name).count()
    }

    pub fn has(&self, name: &str) -> bool {
        self.count(name) > 0
    }

    /// The comma-separated tokens of every `Connection` field, trimmed.
    pub fn connection_tokens(&self) -> Vec<Vec<u8>> {
        self.values("connection")
            .flat_map(list)
            .map(<[u8]>::to_vec)
            .collect()
    }

    /// Connection options (`close`, `upgrade`…) as hyper reads them: only from values
    /// that are visible ASCII.
    pub fn connection_options(&self) -> Vec<Vec<u8>> {
        self.values("connection")
            .filter(|v| v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)))
            .flat_map(list)
            .map(<[u8]>::to_vec)
            .collect()
    }
}

/// The non-empty comma-separated elements of a list-valued field, trimmed of SP/HTAB.
pub fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// Hop-by-hop fields (RFC 9110 §7.6.1 and the legacy ones proxies strip).
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// The daemon's own request fields: never forwarded as the client sent them.
pub const TARGET_HOST: &str = "x-iterate-proxy-target-host";
pub const SECRET: &str = "x-iterate-project-ingress-secret";
pub const VIA: &str = "x-iterate-proxy-via";
pub const REQUEST_ID: &str = "x-request-id";

pub fn is_one_of(name: &[u8], names: &[&str]) -> bool {
    names
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
}
