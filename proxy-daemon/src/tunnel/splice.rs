//! `splice(2)` relay: socket → pipe → socket, the bytes never enter userspace, but the
//! daemon still wakes for every burst (as HAProxy's splicing does).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::counters::{DataPath, DirectionCounters, TunnelCounters};
use super::handover::PathState;
use super::progress::{Progress, WayProgress};
use super::{socket, RelayEnd};

/// Bytes asked of one splice call (the pipe's default capacity is 64 KiB).
const CHUNK: usize = 1 << 20;
/// Pipe capacity requested; bigger pipes mean fewer wake-ups on bulk transfers.
const PIPE_CAPACITY: libc::c_int = 256 * 1024;

pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &TunnelCounters,
    progress: &Progress,
) -> RelayEnd {
    let up = one_way(
        client,
        upstream,
        &counters.client_to_upstream,
        &progress.client_to_upstream,
    );
    let down = one_way(
        upstream,
        client,
        &counters.upstream_to_client,
        &progress.upstream_to_client,
    );
    match tokio::try_join!(up, down) {
        Ok(_) => RelayEnd::Closed,
        Err(e) => RelayEnd::Reset(e.kind()),
    }
}

/// A pipe for splice(2); it lives in the direction's [`WayProgress`], so the bytes in it
/// can be handed to a successor.
pub(super) struct Pipe {
    pub(super) read: OwnedFd,
    pub(super) write: OwnedFd,
    /// Its two descriptors in the capacity budget, while it lives.
    _counted: Option<crate::limits::Fds>,
}

impl Pipe {
    /// A pipe counted against the descriptor budget (`force`: see
    /// [`Capacity::for_pipe`](crate::limits::Capacity::for_pipe)).
    pub(super) fn new(force: bool) -> io::Result<Pipe> {
        // Test-only fault: every pipe is refused, as when the process is out of fds.
        if crate::test_fault::active("no-pipes") {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        let counted = crate::limits::Capacity::for_pipe(force)?;
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills both fds on success; we own them from here.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
                _counted: counted,
            }
        };
        // Best effort: a smaller pipe still works.
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, PIPE_CAPACITY) };
        Ok(pipe)
    }
}

pub(super) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on fds we hold; no offsets (sockets and pipes).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One direction. Bytes `progress` holds (from a takeover) go first; the pipe's bytes are
/// counted in `progress` at every step, so the relay may stop at any await point. What
/// the source already holds is spliced first without waiting for readiness (see
/// `copy::one_way`).
pub(super) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    moved: &DirectionCounters,
    progress: &WayProgress,
) -> io::Result<()> {
    moved.use_path(DataPath::Splice);
    progress.set_path(PathState::Splice);
    progress.write_held(to, moved).await?;
    let mut drained = false;
    loop {
        // The pipe is empty here: every byte spliced in was spliced out below.
        if drained {
            from.readable().await?;
        } else if !socket::readable_now(from)? {
            drained = true;
            continue;
        }
        // Created on first data: an idle tunnel holds no pipe.
        let (pipe_read, pipe_write) = match progress.pipe() {
            Ok(fds) => fds,
            // Out of fds (EMFILE/ENFILE) or pipe memory: the bytes can still move
            // through a buffer, and nothing is lost by switching between bursts.
            Err(e) => {
                tracing::warn!(error = %e, "splice(2) relay cannot get a pipe, copying instead");
                if moved.spliced_bytes() == 0 {
                    // Nothing was spliced (the pipe comes with the first bytes).
                    moved.drop_path(DataPath::Splice);
                }
                return super::copy::one_way(from, to, moved, progress).await;
            }
        };
        let spliced = if drained {
            from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe_write, CHUNK)
            })
        } else {
            splice(from.as_raw_fd(), pipe_write, CHUNK)
        };
        match spliced {
            Ok(0) => {
                socket::shutdown_write(to)?;
                progress.set_path(PathState::Closed);
                return Ok(());
            }
            Ok(n) => progress.filled(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                drained = true;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        drain_pipe(pipe_read, to, moved, progress).await?;
    }
}

/// Splices everything in the direction's pipe into `to` (it waits while `to` is full).
pub(super) async fn drain_pipe(
    pipe_read: RawFd,
    to: &TcpStream,
    moved: &DirectionCounters,
    progress: &WayProgress,
) -> io::Result<()> {
    loop {
        let left = progress.in_pipe();
        if left == 0 {
            return Ok(());
        }
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || {
            splice(pipe_read, to.as_raw_fd(), left)
        }) {
            Ok(n) => {
                progress.drained(n);
                moved.spliced(n as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}
