//! Shared-secret check (SPEC §5): constant-time compare, never logged.

use subtle::ConstantTimeEq;

use crate::http1::request::Occurs;

pub struct Secret(Box<[u8]>);

impl Secret {
    pub fn new(value: &[u8]) -> Self {
        Secret(value.into())
    }

    /// True when the request carried the secret header exactly once (`presented`, in
    /// the head's buffer `buf`), with the same bytes.
    pub fn admits(&self, presented: Occurs, buf: &[u8]) -> bool {
        match presented {
            Occurs::Once(value) => bool::from(value.of(buf).ct_eq(&self.0)),
            _ => false,
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_only_the_exact_value_once() {
        let secret = Secret::new(b"s3cret");
        let check = |values: &[&str]| {
            let fields: String = values
                .iter()
                .map(|v| format!("X-Iterate-Project-Ingress-Secret: {v}\r\n"))
                .collect();
            let raw = format!("GET / HTTP/1.1\r\n{fields}\r\n");
            let head = crate::http1::request::parse(raw.as_bytes(), 65536)
                .unwrap()
                .unwrap();
            secret.admits(head.secret, raw.as_bytes())
        };
        assert!(!check(&[]));
        assert!(!check(&["s3cre"]));
        assert!(!check(&["s3cret!"]));
        assert!(!check(&["S3CRET"]));
        assert!(check(&["s3cret"]));
        assert!(!check(&["s3cret", "s3cret"]), "sent twice");
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
    }
}
