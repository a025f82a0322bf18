//! Deterministic byte streams: every byte at every offset is known, so a receiver can
//! check each one (loss, duplication, reordering and corruption all show as a mismatch).

/// The byte at `offset` of stream `seed`.
#[inline]
pub fn byte_at(seed: u64, offset: u64) -> u8 {
    let block = offset / 8;
    let mut x = seed ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x.to_le_bytes()[(offset % 8) as usize]
}

/// Fills `buf` with the stream from `offset`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = byte_at(seed, offset + i as u64);
    }
}

/// Checks `buf` against the stream from `offset`; returns the first wrong offset.
pub fn check(seed: u64, offset: u64, buf: &[u8]) -> Result<(), u64> {
    match buf
        .iter()
        .enumerate()
        .find(|(i, b)| **b != byte_at(seed, offset + *i as u64))
    {
        None => Ok(()),
        Some((i, _)) => Err(offset + i as u64),
    }
}

/// Streaming verifier: feed it what arrives, in order.
pub struct Verifier {
    seed: u64,
    pub received: u64,
}

impl Verifier {
    pub fn new(seed: u64) -> Self {
        Verifier { seed, received: 0 }
    }

    pub fn feed(&mut self, buf: &[u8]) -> anyhow::Result<()> {
        check(self.seed, self.received, buf)
            .map_err(|at| anyhow::anyhow!("stream {:#x}: wrong byte at offset {at}", self.seed))?;
        self.received += buf.len() as u64;
        Ok(())
    }
}
