//! Stamped pattern streams, shared with the Python and Node test apps
//! (`tests/apps/stamp.py`, `tests/apps/stamp.js`): block k (65,536 bytes) of stream
//! `seed` is the 8-byte little-endian `k ^ seed`, then bytes 8.. of a fixed pseudo-random
//! body derived from the seed. A lost, duplicated or reordered byte anywhere shows as a
//! mismatch, and producing or checking it is a memory copy or compare per block, fast
//! enough for any language at bulk rates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub const BLOCK: usize = 65536;

/// The body of stream `seed` (bytes 8.. of every block; the first 8 are the stamp).
pub fn body(seed: u64) -> Arc<Vec<u8>> {
    static BODIES: OnceLock<Mutex<HashMap<u64, Arc<Vec<u8>>>>> = OnceLock::new();
    let bodies = BODIES.get_or_init(Default::default);
    bodies
        .lock()
        .unwrap()
        .entry(seed)
        .or_insert_with(|| {
            let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
            if state == 0 {
                state = 1;
            }
            let mut out = Vec::with_capacity(BLOCK);
            for _ in 0..BLOCK / 8 {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
            }
            Arc::new(out)
        })
        .clone()
}

/// Fills `buf` with stream `seed` from `offset`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let body = body(seed);
    let mut pos = 0;
    while pos < buf.len() {
        let at = offset + pos as u64;
        let (k, within) = (at / BLOCK as u64, (at % BLOCK as u64) as usize);
        let take = (BLOCK - within).min(buf.len() - pos);
        copy_block_range(seed, k, &body, within, &mut buf[pos..pos + take]);
        pos += take;
    }
}

fn copy_block_range(seed: u64, k: u64, body: &[u8], within: usize, out: &mut [u8]) {
    let stamp = (k ^ seed).to_le_bytes();
    for (i, b) in out.iter_mut().enumerate() {
        let o = within + i;
        if o >= 8 {
            // The rest of the range is body: one copy.
            let rest = &body[o..o + (out.len() - i)];
            out[i..].copy_from_slice(rest);
            return;
        }
        *b = stamp[o];
    }
}

/// Checks what arrives, in order.
pub struct Verifier {
    seed: u64,
    body: Arc<Vec<u8>>,
    pub received: u64,
}

impl Verifier {
    pub fn new(seed: u64) -> Self {
        Verifier {
            seed,
            body: body(seed),
            received: 0,
        }
    }

    /// Ok, or the offset of the first wrong byte.
    pub fn feed(&mut self, buf: &[u8]) -> Result<(), u64> {
        let mut pos = 0;
        while pos < buf.len() {
            let at = self.received;
            let (k, within) = (at / BLOCK as u64, (at % BLOCK as u64) as usize);
            let take = (BLOCK - within).min(buf.len() - pos);
            let got = &buf[pos..pos + take];
            let stamp = (k ^ self.seed).to_le_bytes();
            for (i, g) in got.iter().enumerate() {
                let o = within + i;
                let expected = if o < 8 { stamp[o] } else { self.body[o] };
                if o >= 8 {
                    if got[i..] != self.body[o..o + (take - i)] {
                        let j = got[i..]
                            .iter()
                            .zip(&self.body[o..])
                            .position(|(a, b)| a != b)
                            .unwrap_or(0);
                        return Err(at + (i + j) as u64);
                    }
                    break;
                }
                if *g != expected {
                    return Err(at + i as u64);
                }
            }
            self.received += take as u64;
            pos += take;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_and_verify_agree_at_any_split() {
        let mut buf = vec![0u8; 3 * BLOCK + 77];
        fill(5, 0, &mut buf);
        for split in [0, 1, 7, 8, 9, BLOCK - 1, BLOCK, BLOCK + 3, buf.len()] {
            let mut v = Verifier::new(5);
            assert_eq!(v.feed(&buf[..split]), Ok(()));
            assert_eq!(v.feed(&buf[split..]), Ok(()));
            assert_eq!(v.received, buf.len() as u64);
        }
        let mut part = vec![0u8; 100];
        fill(5, BLOCK as u64 - 50, &mut part);
        assert_eq!(&part[..], &buf[BLOCK - 50..BLOCK + 50]);
        for bad in [0, 5, 8, 100, BLOCK, BLOCK + 4, 2 * BLOCK + 60] {
            let mut wrong = buf.clone();
            wrong[bad] ^= 1;
            assert_eq!(Verifier::new(5).feed(&wrong), Err(bad as u64));
        }
        // A stream shifted by a whole block (a lost block) fails on its stamp.
        assert_eq!(Verifier::new(5).feed(&buf[BLOCK..2 * BLOCK]), Err(0));
    }

    #[test]
    fn matches_the_python_apps_stream() {
        // First bytes of block 1 of seed 5 as tests/apps/stamp.py produces them.
        let mut buf = vec![0u8; 16];
        fill(5, BLOCK as u64, &mut buf);
        assert_eq!(&buf[..8], &(1u64 ^ 5).to_le_bytes());
        assert_eq!(&buf[8..], &body(5)[8..16]);
        assert_eq!(&buf[8..], &[0xdb, 0x79, 0xa9, 0x76, 0xc2, 0xfe, 0xd9, 0xb5]);
    }
}
