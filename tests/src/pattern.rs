//! Deterministic byte streams: every byte at every offset is known, so a receiver can
//! check each one (loss, duplication, reordering and corruption all show as a mismatch).

/// The 8 bytes of block `block` (offsets 8*block..8*block+8) of stream `seed`.
#[inline]
fn block(seed: u64, block: u64) -> [u8; 8] {
    let mut x = seed ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x.to_le_bytes()
}

/// The byte at `offset` of stream `seed`.
pub fn byte_at(seed: u64, offset: u64) -> u8 {
    block(seed, offset / 8)[(offset % 8) as usize]
}

/// Calls `f(position in buf, expected bytes)` for each block-aligned piece of
/// `offset..offset+len`.
#[inline]
fn for_each_piece(seed: u64, offset: u64, len: usize, mut f: impl FnMut(usize, &[u8]) -> bool) {
    let mut pos = 0usize;
    while pos < len {
        let at = offset + pos as u64;
        let skip = (at % 8) as usize;
        let take = (8 - skip).min(len - pos);
        if !f(pos, &block(seed, at / 8)[skip..skip + take]) {
            return;
        }
        pos += take;
    }
}

/// Fills `buf` with the stream from `offset`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for_each_piece(seed, offset, buf.len(), |pos, expected| {
        buf[pos..pos + expected.len()].copy_from_slice(expected);
        true
    });
}

/// Checks `buf` against the stream from `offset`; returns the first wrong offset.
pub fn check(seed: u64, offset: u64, buf: &[u8]) -> Result<(), u64> {
    let mut wrong = None;
    for_each_piece(seed, offset, buf.len(), |pos, expected| {
        let got = &buf[pos..pos + expected.len()];
        if got != expected {
            let i = got.iter().zip(expected).position(|(a, b)| a != b).unwrap();
            wrong = Some(offset + (pos + i) as u64);
            return false;
        }
        true
    });
    wrong.map_or(Ok(()), Err)
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

/// Bytes `0..n` of stream `seed`.
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    fill(seed, 0, &mut v);
    v
}

/// Writes bytes `from..to` of stream `seed`.
pub async fn send<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    seed: u64,
    from: u64,
    to: u64,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = from;
    while at < to {
        let n = (to - at).min(buf.len() as u64) as usize;
        fill(seed, at, &mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        at += n as u64;
    }
    Ok(())
}

/// Reads to EOF through `v`: a wrong byte, more than `expect` bytes in all (duplication)
/// or fewer (truncation) is an error. Returns the bytes `v` has seen.
pub async fn receive<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    v: &mut Verifier,
    expect: u64,
) -> anyhow::Result<u64> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        v.feed(&buf[..n])?;
        anyhow::ensure!(
            v.received <= expect,
            "received {} bytes, more than the {expect} sent (duplication)",
            v.received
        );
    }
    anyhow::ensure!(
        v.received == expect,
        "received {} of {expect} bytes before EOF (truncation)",
        v.received
    );
    Ok(v.received)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_and_check_agree_with_byte_at_at_any_alignment() {
        for start in 0..20u64 {
            let mut buf = vec![0u8; 37];
            fill(9, start, &mut buf);
            for (i, b) in buf.iter().enumerate() {
                assert_eq!(*b, byte_at(9, start + i as u64));
            }
            assert_eq!(check(9, start, &buf), Ok(()));
            buf[13] ^= 1;
            assert_eq!(check(9, start, &buf), Err(start + 13));
            assert!(
                check(9, start + 1, &buf).is_err(),
                "a shifted stream must not pass"
            );
        }
    }
}
