//! Where each direction of a running tunnel stands, kept outside the relays' futures.
//!
//! The relays record here, synchronously after every syscall, which data path a
//! direction is on and which bytes they have read from its source but not yet written
//! to its destination (a copy buffer, a splice pipe). A relay stopped at any await point
//! therefore leaves a state that says exactly how its direction must continue: a takeover
//! pauses every tunnel that way and sends this state to the successor (`handover`).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;

use tokio::net::TcpStream;

use super::counters::DirectionCounters;
use super::handover::{KernelWay, PathState};
use super::splice::Pipe;

/// Both directions of a tunnel, and its fast-path entries.
pub struct Progress {
    pub client_to_upstream: WayProgress,
    pub upstream_to_client: WayProgress,
    /// Cookies of the tunnel's sockets in `TARGETS`.
    targets: Mutex<Vec<u64>>,
    /// Set once the tunnel moves to a successor: its fast-path entries must stay in the
    /// maps (the successor continues with them), so the relays' drop guards leave them.
    handing_over: AtomicBool,
}

impl Progress {
    /// A tunnel whose relay has not started: `client_leftover` goes upstream first,
    /// `upstream_leftover` to the client.
    pub fn new(client_leftover: Vec<u8>, upstream_leftover: Vec<u8>) -> Progress {
        Progress {
            client_to_upstream: WayProgress::new(PathState::Start, client_leftover, None),
            upstream_to_client: WayProgress::new(PathState::Start, upstream_leftover, None),
            targets: Mutex::new(Vec::new()),
            handing_over: AtomicBool::new(false),
        }
    }

    /// A tunnel adopted from the daemon taken over.
    pub fn adopted(up: WayProgress, down: WayProgress, targets: Vec<u64>) -> Progress {
        Progress {
            client_to_upstream: up,
            upstream_to_client: down,
            targets: Mutex::new(targets),
            handing_over: AtomicBool::new(false),
        }
    }

    pub fn add_target(&self, cookie: u64) {
        self.targets.lock().unwrap().push(cookie);
    }

    pub fn targets(&self) -> Vec<u64> {
        self.targets.lock().unwrap().clone()
    }

    /// From now on the tunnel's fast-path entries belong to a successor.
    pub fn start_handing_over(&self) {
        self.handing_over.store(true, Relaxed);
    }

    pub fn handing_over(&self) -> bool {
        self.handing_over.load(Relaxed)
    }
}

/// One direction.
pub struct WayProgress {
    inner: Mutex<Way>,
}

struct Way {
    path: PathState,
    /// `held[start..end]`: bytes read from the source, not yet written.
    held: Vec<u8>,
    start: usize,
    end: usize,
    /// The splice(2) relay's pipe and the bytes in it.
    pipe: Option<Pipe>,
    in_pipe: usize,
    kernel: Option<KernelWay>,
}

impl WayProgress {
    pub fn new(path: PathState, held: Vec<u8>, kernel: Option<KernelWay>) -> WayProgress {
        let end = held.len();
        WayProgress {
            inner: Mutex::new(Way {
                path,
                held,
                start: 0,
                end,
                pipe: None,
                in_pipe: 0,
                kernel,
            }),
        }
    }

    pub fn path(&self) -> PathState {
        self.inner.lock().unwrap().path
    }

    pub fn set_path(&self, path: PathState) {
        self.inner.lock().unwrap().path = path;
    }

    pub fn kernel(&self) -> Option<KernelWay> {
        self.inner.lock().unwrap().kernel
    }

    /// The direction has entries in the fast path's maps.
    pub fn set_kernel(&self, way: KernelWay) {
        self.inner.lock().unwrap().kernel = Some(way);
    }

    /// Holds the first `len` bytes of `buf`, just read from the source. Nothing may be
    /// held already.
    pub fn hold(&self, buf: Vec<u8>, len: usize) {
        let mut w = self.inner.lock().unwrap();
        debug_assert_eq!(w.start, w.end, "bytes held twice");
        w.held = buf;
        w.start = 0;
        w.end = len;
    }

    /// Writes the held bytes to `to` (counted as written by the daemon); returns the
    /// emptied buffer for reuse.
    pub async fn write_held(
        &self,
        to: &TcpStream,
        moved: &DirectionCounters,
    ) -> io::Result<Vec<u8>> {
        loop {
            {
                let mut w = self.inner.lock().unwrap();
                if w.start == w.end {
                    w.start = 0;
                    w.end = 0;
                    return Ok(std::mem::take(&mut w.held));
                }
                let Way {
                    held, start, end, ..
                } = &mut *w;
                match to.try_write(&held[*start..*end]) {
                    Ok(n) => {
                        *start += n;
                        moved.copied(n as u64);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            to.writable().await?;
        }
    }

    /// The splice(2) relay's pipe (read end, write end), created on first use; refused
    /// (EMFILE) when the descriptor budget is full, for a relay that can copy instead.
    pub fn pipe(&self) -> io::Result<(RawFd, RawFd)> {
        self.pipe_counted(false)
    }

    /// The pipe, taken even past the descriptor budget (counted all the same): for a
    /// relay with no copy fallback.
    pub fn pipe_forced(&self) -> io::Result<(RawFd, RawFd)> {
        self.pipe_counted(true)
    }

    fn pipe_counted(&self, force: bool) -> io::Result<(RawFd, RawFd)> {
        let mut w = self.inner.lock().unwrap();
        let pipe = match &w.pipe {
            Some(p) => p,
            None => w.pipe.insert(Pipe::new(force)?),
        };
        Ok((pipe.read.as_raw_fd(), pipe.write.as_raw_fd()))
    }

    /// `n` more bytes went into the pipe.
    pub fn filled(&self, n: usize) {
        self.inner.lock().unwrap().in_pipe += n;
    }

    /// `n` bytes left the pipe for the destination.
    pub fn drained(&self, n: usize) {
        self.inner.lock().unwrap().in_pipe -= n;
    }

    pub fn in_pipe(&self) -> usize {
        self.inner.lock().unwrap().in_pipe
    }

    /// For a successor: the data path, every byte held (those in the pipe drained into
    /// memory), and the fast-path entries. Only once the relay is stopped.
    pub fn take(&self) -> io::Result<(PathState, Vec<u8>, Option<KernelWay>)> {
        let mut w = self.inner.lock().unwrap();
        let mut bytes = w.held[w.start..w.end].to_vec();
        w.start = 0;
        w.end = 0;
        if w.in_pipe > 0 {
            let pipe = w
                .pipe
                .as_ref()
                .expect("bytes in a pipe that does not exist");
            let from = bytes.len();
            bytes.resize(from + w.in_pipe, 0);
            read_exactly(pipe.read.as_raw_fd(), &mut bytes[from..])?;
            w.in_pipe = 0;
        }
        Ok((w.path, bytes, w.kernel))
    }
}

/// Reads exactly `buf.len()` bytes from a non-blocking pipe that holds at least that.
fn read_exactly(fd: RawFd, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: read into the unfilled part of a buffer we own.
        let n = unsafe {
            libc::read(
                fd,
                buf[got..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - got,
            )
        };
        match n {
            n if n > 0 => got += n as usize,
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a paused relay hands over: the held bytes not yet written, then the pipe's,
    /// in stream order; nothing is left behind.
    #[test]
    fn take_returns_held_then_piped_bytes() {
        let way = WayProgress::new(PathState::Splice, Vec::new(), None);
        way.hold(b"0123456789".to_vec(), 8);
        // Three of the eight held bytes were written.
        way.inner.lock().unwrap().start = 3;
        let (_, write) = way.pipe().unwrap();
        // SAFETY: a write to the pipe we just created.
        let n = unsafe { libc::write(write, b"abcdef".as_ptr().cast(), 6) };
        assert_eq!(n, 6);
        way.filled(6);
        way.drained(2); // two went out: what remains in the pipe is "cdef"
        let mut two = [0u8; 2];
        let (read, _) = way.pipe().unwrap();
        // SAFETY: a read from our pipe into a stack buffer.
        assert_eq!(unsafe { libc::read(read, two.as_mut_ptr().cast(), 2) }, 2);
        let (path, bytes, kernel) = way.take().unwrap();
        assert_eq!(path, PathState::Splice);
        assert_eq!(bytes, b"34567cdef");
        assert_eq!(kernel, None);
        assert_eq!(way.in_pipe(), 0);
        assert_eq!(way.take().unwrap().1, b"", "taken once");
    }
}
