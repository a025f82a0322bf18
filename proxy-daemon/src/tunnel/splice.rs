//! `splice(2)` relay: socket → pipe → socket, the bytes never enter userspace, but the
//! daemon still wakes for every burst (as HAProxy's splicing does).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::counters::{DataPath, DirectionCounters, TunnelCounters};
use super::{socket, RelayEnd};

/// Bytes asked of one splice call (the pipe's default capacity is 64 KiB).
const CHUNK: usize = 1 << 20;
/// Pipe capacity requested; bigger pipes mean fewer wake-ups on bulk transfers.
const PIPE_CAPACITY: libc::c_int = 256 * 1024;

pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &TunnelCounters,
) -> RelayEnd {
    let up = one_way(client, upstream, &counters.client_to_upstream);
    let down = one_way(upstream, client, &counters.upstream_to_client);
    match tokio::try_join!(up, down) {
        Ok(_) => RelayEnd::Closed,
        Err(e) => RelayEnd::Reset(e.kind()),
    }
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills both fds on success; we own them from here.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // Best effort: a smaller pipe still works.
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, PIPE_CAPACITY) };
        Ok(pipe)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
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

pub(super) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    moved: &DirectionCounters,
) -> io::Result<()> {
    moved.use_path(DataPath::Splice);
    let mut pipe: Option<Pipe> = None;
    loop {
        from.readable().await?;
        // Created on first data: an idle tunnel holds no pipe.
        let pipe = match &pipe {
            Some(p) => p,
            None => match Pipe::new() {
                Ok(p) => pipe.insert(p),
                // Out of fds (EMFILE/ENFILE) or pipe memory: the bytes can still move
                // through a buffer, and nothing is lost by switching before the first.
                Err(e) => {
                    tracing::warn!(error = %e, "splice(2) relay cannot get a pipe, copying instead");
                    // Nothing was spliced (the pipe comes with the first bytes).
                    moved.drop_path(DataPath::Splice);
                    return super::copy::one_way(from, to, moved).await;
                }
            },
        };
        let filled = match from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
        }) {
            Ok(0) => return socket::shutdown_write(to),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut left = filled;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        moved.spliced(filled as u64);
    }
}
