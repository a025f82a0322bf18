//! How far a message body has been relayed, whatever its framing. The proxy passes body
//! bytes through unchanged; this says how many of the bytes at hand belong to the body
//! and when it has ended.

use super::chunked::{ChunkError, Chunked, Step};
use super::Framing;

#[derive(Debug, Clone)]
pub enum BodyProgress {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// Everything until the sender closes.
    UntilClose,
    Done,
}

impl BodyProgress {
    pub fn new(framing: Framing) -> BodyProgress {
        match framing {
            Framing::Empty | Framing::Length(0) => BodyProgress::Done,
            Framing::Length(n) => BodyProgress::Length(n),
            Framing::Chunked => BodyProgress::Chunked(Chunked::default()),
            Framing::UntilClose => BodyProgress::UntilClose,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, BodyProgress::Done)
    }

    /// The number of leading bytes of `input` that belong to the body (the rest, if
    /// any, follows the body on the connection).
    pub fn take(&mut self, input: &[u8]) -> Result<usize, ChunkError> {
        match self {
            BodyProgress::Done => Ok(0),
            BodyProgress::UntilClose => Ok(input.len()),
            BodyProgress::Length(left) => {
                let n = (*left).min(input.len() as u64);
                *left -= n;
                if *left == 0 {
                    *self = BodyProgress::Done;
                }
                Ok(n as usize)
            }
            BodyProgress::Chunked(c) => {
                let mut used = 0;
                while used < input.len() {
                    let step = c.step(&input[used..])?;
                    used += step.consumed;
                    if step.done {
                        *self = BodyProgress::Done;
                        break;
                    }
                }
                Ok(used)
            }
        }
    }

    /// For a chunked body: one step of framing and data (see [`Chunked::step`]), for a
    /// relay that decodes the chunks.
    pub fn step_chunked(&mut self, input: &[u8]) -> Result<Step, ChunkError> {
        let BodyProgress::Chunked(c) = self else {
            return Ok(Step {
                consumed: 0,
                data: 0..0,
                done: self.is_done(),
            });
        };
        let step = c.step(input)?;
        if step.done {
            *self = BodyProgress::Done;
        }
        Ok(step)
    }

    /// The sender closed: true if that ends the body, false if the body was cut short.
    pub fn at_eof(&mut self) -> bool {
        match self {
            BodyProgress::Done => true,
            BodyProgress::UntilClose => {
                *self = BodyProgress::Done;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_chunks_and_close() {
        let mut b = BodyProgress::new(Framing::Length(5));
        assert_eq!(b.take(b"hel").unwrap(), 3);
        assert_eq!(b.take(b"loGET").unwrap(), 2);
        assert!(b.is_done());
        assert_eq!(b.take(b"more").unwrap(), 0);

        let mut b = BodyProgress::new(Framing::Chunked);
        assert_eq!(b.take(b"3\r\nabc\r\n0\r\n\r\nNEXT").unwrap(), 13);
        assert!(b.is_done());

        let mut b = BodyProgress::new(Framing::UntilClose);
        assert_eq!(b.take(b"anything").unwrap(), 8);
        assert!(!b.is_done());
        assert!(b.at_eof());

        let mut b = BodyProgress::new(Framing::Length(5));
        b.take(b"abc").unwrap();
        assert!(!b.at_eof(), "cut short");
        assert!(BodyProgress::new(Framing::Empty).is_done());
    }
}
