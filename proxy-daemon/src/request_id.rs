//! Request ids: the client's `X-Request-Id` when it is sane, else one made here: 32 hex
//! digits, a random prefix per thread and a counter, unique per request without a
//! random-number draw or an allocation per request.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

/// Length of the ids the proxy makes.
pub const LEN: usize = 32;

thread_local! {
    static NEXT: Cell<(u64, u64)> = Cell::new((random_prefix(), 0));
}

fn random_prefix() -> u64 {
    // std seeds RandomState from the OS once per thread and varies it per instance.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default(),
    );
    h.finish()
}

/// A new id.
pub fn make() -> [u8; LEN] {
    let (prefix, counter) = NEXT.with(|n| {
        let (p, c) = n.get();
        n.set((p, c.wrapping_add(1)));
        (p, c)
    });
    let mut out = [0u8; LEN];
    for (i, word) in [prefix, counter].into_iter().enumerate() {
        for j in 0..16 {
            out[i * 16 + j] = b"0123456789abcdef"[((word >> (60 - 4 * j)) & 0xf) as usize];
        }
    }
    out
}

/// Whether a client's `X-Request-Id` can be reused: 1–200 printable ASCII bytes.
pub fn is_reusable(value: &[u8]) -> bool {
    (1..=200).contains(&value.len()) && value.iter().all(|&b| (0x20..0x7f).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_hex() {
        let a = make();
        let b = make();
        assert_ne!(a, b);
        assert!(a.iter().all(u8::is_ascii_hexdigit));
        let other = std::thread::spawn(make).join().unwrap();
        assert_ne!(a[..16], other[..16], "threads get different prefixes");
        assert!(is_reusable(b"req-abc-123"));
        assert!(!is_reusable(b""));
        assert!(!is_reusable(b"a\x01b"));
        assert!(!is_reusable(&[b'a'; 201]));
    }
}
