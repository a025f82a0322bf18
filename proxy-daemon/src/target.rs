//! The `X-Iterate-Proxy-Target-Host` grammar (SPEC §2): which local port a request goes to.

use crate::http1::request::Occurs;

/// Port used for a bare hostname (`mach_123.iterate.town`).
pub const DEFAULT_PORT: u16 = 3000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("missing_proxy_target_host")]
    Missing,
    #[error("invalid_proxy_target_host")]
    Invalid,
}

impl TargetError {
    /// The `error` code of the JSON body sent to the client.
    pub fn code(self) -> &'static str {
        match self {
            TargetError::Missing => "missing_proxy_target_host",
            TargetError::Invalid => "invalid_proxy_target_host",
        }
    }
}

/// The target port of a request whose head carried the header `target` (`buf` is the
/// head's buffer). The header may appear once only.
pub fn target_port(target: Occurs, buf: &[u8]) -> Result<u16, TargetError> {
    let value = match target {
        Occurs::Never => return Err(TargetError::Missing),
        Occurs::More => return Err(TargetError::Invalid),
        Occurs::Once(value) => value.of(buf),
    };
    // Header values may carry obs-text bytes; none of them can form a valid target.
    let value = std::str::from_utf8(value).map_err(|_| TargetError::Invalid)?;
    parse_target(value)
}

/// Parses one header value (SPEC §2 grammar).
pub fn parse_target(raw: &str) -> Result<u16, TargetError> {
    let value = raw.trim();
    if value.is_empty() {
        return Err(TargetError::Missing);
    }
    // `<port>__<rest>`: only when `__` starts after the first character. Searched in the
    // bytes: `_` is ASCII, so byte 1 on is "after the first character" even when that one
    // takes several bytes (`é__x` is a bad port, not a bare name).
    if let Some(at) = value.as_bytes()[1..]
        .windows(2)
        .position(|w| w == b"__")
        .map(|i| i + 1)
    {
        let (port, rest) = (&value[..at], &value[at + 2..]);
        if rest.is_empty() {
            return Err(TargetError::Invalid);
        }
        return parse_port(port).ok_or(TargetError::Invalid);
    }
    if let Some((host, port)) = value.split_once(':') {
        let local = host.eq_ignore_ascii_case("localhost") || host == "127.0.0.1";
        if !local {
            return Err(TargetError::Invalid);
        }
        return parse_port(port).ok_or(TargetError::Invalid);
    }
    Ok(DEFAULT_PORT)
}

/// Decimal digits only, leading zeros allowed, value 1..=65535.
fn parse_port(digits: &str) -> Option<u16> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let significant = digits.trim_start_matches('0');
    if significant.len() > 5 {
        return None;
    }
    match significant.parse::<u32>() {
        Ok(port @ 1..=65535) => Some(port as u16),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TargetError::*;

    #[test]
    fn grammar_table() {
        let cases: &[(&str, Result<u16, TargetError>)] = &[
            // <port>__<rest>
            ("4096__mach_123.iterate.town", Ok(4096)),
            ("4096__misha.iterate.town", Ok(4096)),
            ("4096__mach_123.p.os.iterate.com", Ok(4096)),
            ("1__x", Ok(1)),
            ("65535__x", Ok(65535)),
            ("0080__x", Ok(80)),
            ("000000000000000080__x", Ok(80)),
            ("80__x__y", Ok(80)),
            ("80___x", Ok(80)),
            ("  4096__mach.iterate.town\t", Ok(4096)),
            ("abc__x", Err(Invalid)),
            ("70000__x", Err(Invalid)),
            ("65536__x", Err(Invalid)),
            ("0__x", Err(Invalid)),
            ("000__x", Err(Invalid)),
            ("80__", Err(Invalid)),
            ("-80__x", Err(Invalid)),
            ("+80__x", Err(Invalid)),
            ("8 0__x", Err(Invalid)),
            ("99999999999999999999__x", Err(Invalid)),
            ("localhost:80__x", Err(Invalid)),
            // the first character is not ASCII: still `<port>__<rest>`
            ("é__x", Err(Invalid)),
            ("\u{2c2}__\u{1}", Err(Invalid)),
            // `__` at the very start is not the port form: a bare name → 3000
            ("__x", Ok(3000)),
            // <host>:<port>
            ("localhost:8080", Ok(8080)),
            ("LOCALHOST:8080", Ok(8080)),
            ("LocalHost:1", Ok(1)),
            ("127.0.0.1:5173", Ok(5173)),
            ("127.0.0.1:00443", Ok(443)),
            (" localhost:3001 ", Ok(3001)),
            ("localhost:", Err(Invalid)),
            ("localhost:0", Err(Invalid)),
            ("localhost:65536", Err(Invalid)),
            ("localhost:80:81", Err(Invalid)),
            ("localhost:http", Err(Invalid)),
            ("localhost: 80", Err(Invalid)),
            ("example.com:80", Err(Invalid)),
            ("[::1]:80", Err(Invalid)),
            ("127.0.0.2:80", Err(Invalid)),
            ("localhost.evil.com:80", Err(Invalid)),
            ("evil.com:80", Err(Invalid)),
            (":80", Err(Invalid)),
            // anything else without a colon → 3000
            ("mach_123.iterate.town", Ok(3000)),
            ("opencode.example.com", Ok(3000)),
            ("misha.iterate.town", Ok(3000)),
            ("localhost", Ok(3000)),
            ("x", Ok(3000)),
            ("_", Ok(3000)),
            // blank → missing
            ("", Err(Missing)),
            ("   ", Err(Missing)),
            ("\t", Err(Missing)),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_target(input), *expected, "input {input:?}");
        }
    }

    #[test]
    fn header_presence() {
        let head = |raw: &str| {
            crate::http1::request::parse(raw.as_bytes(), 65536)
                .unwrap()
                .unwrap()
        };
        let check = |raw: &str| target_port(head(raw).target_host, raw.as_bytes());
        assert_eq!(check("GET / HTTP/1.1\r\n\r\n"), Err(Missing));
        assert_eq!(
            check("GET / HTTP/1.1\r\nX-Iterate-Proxy-Target-Host: 4096__m\r\n\r\n"),
            Ok(4096)
        );
        assert_eq!(
            check("GET / HTTP/1.1\r\nx-iterate-proxy-target-host: 4096__m\r\nX-ITERATE-PROXY-TARGET-HOST: 4096__m\r\n\r\n"),
            Err(Invalid),
            "sent twice"
        );
        let obs = b"GET / HTTP/1.1\r\nX-Iterate-Proxy-Target-Host: 80__\xff\r\n\r\n";
        let h = crate::http1::request::parse(obs, 65536).unwrap().unwrap();
        assert_eq!(target_port(h.target_host, obs), Err(Invalid), "obs-text");
    }
}
