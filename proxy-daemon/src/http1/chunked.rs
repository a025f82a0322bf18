//! A strict chunked-body tracker (RFC 9112 §7.1). Bodies pass through the proxy byte for
//! byte; this follows them to find where they end and refuses anything two parsers could
//! read differently: CRLF is required everywhere (no bare LF or CR), sizes are checked for
//! overflow, extensions and trailer fields may not contain control bytes, trailers may not
//! be folded and each is `name: value` with a token name. It accepts only what hyper's
//! decoder accepts (its limits included) and refuses, in addition, bare LF and control
//! bytes inside extensions and trailers and folded trailers (`fuzz/`'s framing target
//! holds the two side by side).

use std::ops::Range;

/// Chunk-extension bytes in one body: this many is too many (hyper's limit).
const MAX_EXTENSION_BYTES: u32 = 16 * 1024;
/// Trailer section limits (hyper's): bytes from the first trailer byte to the final LF
/// (this many is too many), and fields.
const MAX_TRAILER_BYTES: u32 = 16 * 1024;
const MAX_TRAILER_FIELDS: u32 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkError(pub &'static str);

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid chunked body: {}", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting the first hex digit of a chunk size.
    SizeStart,
    Size(u64),
    /// Whitespace after the size digits.
    SizeSpace(u64),
    /// Inside chunk extensions, until CR.
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// In a trailer field's name, until its colon.
    TrailerName,
    /// In a trailer field's value, until CR.
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// What one call to [`Chunked::step`] did with its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the input that belong to the body (framing and data).
    pub consumed: usize,
    /// Where chunk data lies in the input (within `..consumed`, possibly empty).
    pub data: Range<usize>,
    /// The body's last byte was consumed.
    pub done: bool,
}

#[derive(Debug, Clone)]
pub struct Chunked {
    state: State,
    extension_bytes: u32,
    trailer_bytes: u32,
    trailer_fields: u32,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: State::SizeStart,
            extension_bytes: 0,
            trailer_bytes: 0,
            trailer_fields: 0,
        }
    }
}

impl Chunked {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes framing bytes from the start of `input` up to and including at most one
    /// run of chunk data; call again with the rest.
    pub fn step(&mut self, input: &[u8]) -> Result<Step, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            if let State::Data(left) = self.state {
                let n = left.min((input.len() - i) as u64) as usize;
                self.state = if n as u64 == left {
                    State::DataCr
                } else {
                    State::Data(left - n as u64)
                };
                return Ok(Step {
                    consumed: i + n,
                    data: i..i + n,
                    done: false,
                });
            }
            let b = input[i];
            i += 1;
            self.state = self.byte(b)?;
            if self.state == State::Done {
                return Ok(Step {
                    consumed: i,
                    data: i..i,
                    done: true,
                });
            }
        }
        Ok(Step {
            consumed: i,
            data: i..i,
            done: self.state == State::Done,
        })
    }

    fn byte(&mut self, b: u8) -> Result<State, ChunkError> {
        use State::*;
        Ok(match self.state {
            SizeStart => Size(hex(b).ok_or(ChunkError("missing chunk size"))? as u64),
            Size(n) => match b {
                b'\r' => SizeLf(n),
                b' ' | b'\t' => SizeSpace(n),
                b';' => Extension(n),
                _ => {
                    let digit = hex(b).ok_or(ChunkError("invalid chunk size"))?;
                    Size(
                        n.checked_mul(16)
                            .and_then(|n| n.checked_add(digit as u64))
                            .ok_or(ChunkError("chunk size overflow"))?,
                    )
                }
            },
            SizeSpace(n) => match b {
                b' ' | b'\t' => SizeSpace(n),
                b';' => Extension(n),
                b'\r' => SizeLf(n),
                _ => return Err(ChunkError("invalid chunk size line")),
            },
            Extension(n) => match b {
                b'\r' => SizeLf(n),
                b'\t' => self.extension_byte(n)?,
                0..=0x1f | 0x7f => return Err(ChunkError("control byte in chunk extension")),
                _ => self.extension_byte(n)?,
            },
            SizeLf(n) => match b {
                b'\n' if n == 0 => TrailerStart,
                b'\n' => Data(n),
                _ => return Err(ChunkError("chunk size line not ended by CRLF")),
            },
            Data(_) => unreachable!("data is taken in bulk"),
            DataCr => match b {
                b'\r' => DataLf,
                _ => return Err(ChunkError("chunk data not followed by CRLF")),
            },
            DataLf => match b {
                b'\n' => SizeStart,
                _ => return Err(ChunkError("chunk data not followed by CRLF")),
            },
            TrailerStart => match b {
                b'\r' => {
                    self.trailer_byte()?;
                    EndLf
                }
                b' ' | b'\t' => return Err(ChunkError("folded trailer field")),
                b':' => return Err(ChunkError("trailer field without a name")),
                _ if is_tchar(b) => {
                    self.trailer_fields += 1;
                    if self.trailer_fields > MAX_TRAILER_FIELDS {
                        return Err(ChunkError("too many trailer fields"));
                    }
                    self.trailer_byte()?;
                    TrailerName
                }
                0..=0x1f | 0x7f => return Err(ChunkError("control byte in trailer field")),
                _ => return Err(ChunkError("invalid trailer field name")),
            },
            TrailerName => {
                self.trailer_byte()?;
                match b {
                    b':' => TrailerLine,
                    _ if is_tchar(b) => TrailerName,
                    0..=0x1f | 0x7f => return Err(ChunkError("control byte in trailer field")),
                    _ => return Err(ChunkError("invalid trailer field name")),
                }
            }
            TrailerLine => {
                self.trailer_byte()?;
                match b {
                    b'\r' => TrailerLf,
                    b'\t' => TrailerLine,
                    0..=0x1f | 0x7f => return Err(ChunkError("control byte in trailer field")),
                    _ => TrailerLine,
                }
            }
            TrailerLf => match b {
                b'\n' => {
                    self.trailer_byte()?;
                    TrailerStart
                }
                _ => return Err(ChunkError("trailer field not ended by CRLF")),
            },
            EndLf => match b {
                b'\n' => {
                    self.trailer_byte()?;
                    Done
                }
                _ => return Err(ChunkError("chunked body not ended by CRLF")),
            },
            Done => return Err(ChunkError("bytes after the end")),
        })
    }

    fn extension_byte(&mut self, n: u64) -> Result<State, ChunkError> {
        self.extension_bytes += 1;
        if self.extension_bytes >= MAX_EXTENSION_BYTES {
            return Err(ChunkError("chunk extensions too long"));
        }
        Ok(State::Extension(n))
    }

    /// Counts a byte of the trailer section (none when the body has no trailer field).
    fn trailer_byte(&mut self) -> Result<(), ChunkError> {
        if self.trailer_fields == 0 {
            return Ok(());
        }
        self.trailer_bytes += 1;
        if self.trailer_bytes >= MAX_TRAILER_BYTES {
            return Err(ChunkError("trailer section too large"));
        }
        Ok(())
    }
}

/// A field-name character (RFC 9110 §5.6.2 `tchar`).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `split` bytes; returns (data, bytes consumed, done).
    fn run(input: &[u8], split: usize) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut c = Chunked::default();
        let mut data = Vec::new();
        let mut total = 0;
        for piece in input.chunks(split) {
            let mut at = 0;
            while at < piece.len() {
                let s = c.step(&piece[at..])?;
                data.extend_from_slice(&piece[at..][s.data.clone()]);
                at += s.consumed;
                total += s.consumed;
                if s.done {
                    return Ok((data, total, true));
                }
            }
        }
        Ok((data, total, false))
    }

    #[test]
    fn limits_are_hypers() {
        // Extension bytes: one under the limit passes, the limit is refused.
        let ext = |n: u32| format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(n as usize));
        assert!(
            run(ext(MAX_EXTENSION_BYTES - 1).as_bytes(), 4096)
                .unwrap()
                .2
        );
        assert!(run(ext(MAX_EXTENSION_BYTES).as_bytes(), 4096).is_err());
        // The trailer section counts every byte from its first to the final LF.
        let trailers = |total: u32| {
            let value = "v".repeat(total as usize - "X: \r\n\r\n".len());
            format!("0\r\nX: {value}\r\n\r\n")
        };
        assert!(
            run(trailers(MAX_TRAILER_BYTES - 1).as_bytes(), 4096)
                .unwrap()
                .2
        );
        assert!(run(trailers(MAX_TRAILER_BYTES).as_bytes(), 4096).is_err());
    }

    #[test]
    fn valid_bodies_any_split() {
        let body =
            b"5;name=\"v\"\r\nhello\r\n00006 \r\n world\r\n0\r\nX-T: 1\r\nY: 2\r\n\r\nGET /next";
        for split in [1, 2, 3, 5, 8, 1000] {
            let (data, used, done) = run(body, split).unwrap();
            assert!(done);
            assert_eq!(data, b"hello world");
            assert_eq!(&body[used..], b"GET /next", "split {split}");
        }
        assert_eq!(run(b"0\r\n\r\n", 1).unwrap(), (vec![], 5, true));
    }

    #[test]
    fn ambiguous_bodies_are_refused() {
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"0\r\n\n",
            b"0\r\nX: a\nb\r\n\r\n",
            b"0\r\n folded\r\n\r\n",
            b"0\r\nX y: z\r\n\r\n",
            b"0\r\nnocolon\r\n\r\n",
            b"0\r\nX(y): z\r\n\r\n",
            b"0\r\nX: a\x7fb\r\n\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffff0\r\n",
            b"10000000000000000\r\n",
            b"-5\r\n",
            b" 5\r\n",
            b"5 5\r\n",
        ] {
            assert!(run(bad, 1).is_err(), "{:?}", String::from_utf8_lossy(bad));
            assert!(run(bad, 64).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // The largest size that fits is a size, not an overflow (and never a panic).
        let max = b"ffffffffffffffff\r\n";
        let mut c = Chunked::default();
        assert_eq!(c.step(max).unwrap().consumed, max.len());
    }
}
