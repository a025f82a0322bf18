//! Shared-secret check (SPEC §5): constant-time compare, never logged.

use http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::headers::SECRET_HEADER;

pub struct Secret(Box<[u8]>);

impl Secret {
    pub fn new(value: &[u8]) -> Self {
        Secret(value.into())
    }

    /// True when the request carries the secret exactly once, with the same bytes.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(SECRET_HEADER).iter();
        match (values.next(), values.next()) {
            (Some(value), None) => bool::from(value.as_bytes().ct_eq(&self.0)),
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
    use http::HeaderValue;

    #[test]
    fn admits_only_the_exact_value_once() {
        let secret = Secret::new(b"s3cret");
        let mut h = HeaderMap::new();
        assert!(!secret.admits(&h));
        h.insert(SECRET_HEADER, HeaderValue::from_static("s3cre"));
        assert!(!secret.admits(&h));
        h.insert(SECRET_HEADER, HeaderValue::from_static("s3cret!"));
        assert!(!secret.admits(&h));
        h.insert(SECRET_HEADER, HeaderValue::from_static("S3CRET"));
        assert!(!secret.admits(&h));
        h.insert(SECRET_HEADER, HeaderValue::from_static("s3cret"));
        assert!(secret.admits(&h));
        h.append(SECRET_HEADER, HeaderValue::from_static("s3cret"));
        assert!(!secret.admits(&h), "sent twice");
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
    }
}
