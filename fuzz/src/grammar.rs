//! The `X-Iterate-Proxy-Target-Host` grammar of SPEC §2, written from the SPEC's text
//! alone (characters, not bytes; no shared code with `proxy_daemon::target`), so the fuzz
//! target can hold the daemon's parser against it.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Port(u16),
    /// Absent or blank: `missing_proxy_target_host`.
    Missing,
    /// `invalid_proxy_target_host`.
    Invalid,
}

/// The port SPEC §2 gives a header value.
pub fn reference(value: &str) -> Verdict {
    // "value trimmed of surrounding whitespace"
    let chars: Vec<char> = value.trim_matches(char::is_whitespace).chars().collect();
    if chars.is_empty() {
        return Verdict::Missing;
    }
    // "A value with `__` after its first character is `<port>__<rest>`", split at the
    // first such `__`.
    let double_underscore =
        (1..chars.len()).find(|&i| chars[i] == '_' && chars.get(i + 1) == Some(&'_'));
    if let Some(at) = double_underscore {
        let port = &chars[..at];
        let rest = &chars[at + 2..];
        return match decimal_port(port) {
            Some(p) if !rest.is_empty() => Verdict::Port(p),
            _ => Verdict::Invalid,
        };
    }
    // "`<host>:<port>` with host `localhost` or `127.0.0.1` (ASCII case-insensitive)";
    // any other host with a colon is invalid.
    if let Some(colon) = chars.iter().position(|&c| c == ':') {
        let host: String = chars[..colon].iter().collect();
        let local = host.eq_ignore_ascii_case("localhost") || host == "127.0.0.1";
        return match decimal_port(&chars[colon + 1..]) {
            Some(p) if local => Verdict::Port(p),
            _ => Verdict::Invalid,
        };
    }
    // "Anything else without a colon: port 3000."
    Verdict::Port(3000)
}

/// "decimal digits with value 1..=65535 (leading zeros allowed)".
fn decimal_port(digits: &[char]) -> Option<u16> {
    if digits.is_empty() {
        return None;
    }
    let mut value: u32 = 0;
    for c in digits {
        value = value * 10 + c.to_digit(10).filter(|_| c.is_ascii_digit())?;
        if value > 65535 {
            return None;
        }
    }
    u16::try_from(value).ok().filter(|&p| p >= 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_examples() {
        use Verdict::*;
        for (value, want) in [
            ("4096__mach_123.iterate.town", Port(4096)),
            ("0080__x", Port(80)),
            ("abc__x", Invalid),
            ("70000__x", Invalid),
            ("0__x", Invalid),
            ("80__", Invalid),
            ("__x", Port(3000)),
            ("localhost:8080", Port(8080)),
            ("LOCALHOST:1", Port(1)),
            ("127.0.0.1:5173", Port(5173)),
            ("example.com:80", Invalid),
            ("[::1]:80", Invalid),
            ("127.0.0.2:80", Invalid),
            ("localhost.evil.com:80", Invalid),
            ("mach_123.iterate.town", Port(3000)),
            ("é__x", Invalid),
            ("  ", Missing),
            ("", Missing),
        ] {
            assert_eq!(reference(value), want, "{value:?}");
        }
    }
}
