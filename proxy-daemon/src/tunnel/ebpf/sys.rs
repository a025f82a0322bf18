//! Socket syscalls the fast path needs and std/socket2 do not offer.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The kernel's socket cookie (the SOCKHASH key).
pub fn cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            &mut v as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok(v)
}

fn set_int(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: plain setsockopt with an int.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// Makes the kernel run the (newly attached) stream parser over bytes already queued.
pub fn kick_queued(fd: &impl AsRawFd) -> io::Result<()> {
    set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)
}

/// Pending socket error (clears it), as an io::Error.
pub fn take_error(fd: &impl AsRawFd) -> io::Result<Option<io::Error>> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes an int.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok((v != 0).then(|| io::Error::from_raw_os_error(v)))
}

fn tcp_info(fd: RawFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; the kernel fills up to `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    check(unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok(info)
}

fn outq(fd: RawFd) -> io::Result<u64> {
    let mut v: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes an int (write_seq - snd_una).
    check(unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut v) })?;
    Ok(v as u64)
}

/// Bytes that entered the socket's TCP send stream so far (`write_seq` minus the ISN):
/// bytes acked + bytes queued unacked, read until no ACK moved bytes between the reads.
pub fn stream_position(fd: &impl AsRawFd) -> io::Result<u64> {
    let fd = fd.as_raw_fd();
    for _ in 0..1000 {
        let a = tcp_info(fd)?;
        let q = outq(fd)?;
        let b = tcp_info(fd)?;
        if a.tcpi_bytes_acked == b.tcpi_bytes_acked {
            return Ok(b.tcpi_bytes_acked + q);
        }
    }
    Err(io::Error::other("TCP send position kept moving"))
}

/// TCP state (`TCP_ESTABLISHED` = 1, ...).
pub fn tcp_state(fd: &impl AsRawFd) -> io::Result<u8> {
    Ok(tcp_info(fd.as_raw_fd())?.tcpi_state)
}

/// `recv(MSG_PEEK | MSG_DONTWAIT)` of one byte: Ok(0) at EOF with nothing queued.
pub fn peek(fd: &impl AsRawFd) -> io::Result<usize> {
    let mut b = [0u8; 1];
    // SAFETY: recv into a 1-byte stack buffer.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            b.as_mut_ptr() as *mut libc::c_void,
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Whether the peer's FIN (or a reset) has arrived: `poll(POLLRDHUP)`, which takes no
/// socket lock.
///
/// The daemon must not take the owner lock of a socket the kernel splices (`recv`, most
/// `setsockopt`s) while data may arrive: the stream parser then runs from a workqueue,
/// which taking the socket out of the map does not wait for, and a message of that pass
/// is dropped when the socket leaves the map (docs/fastpath.md).
pub fn rdhup(fd: &impl AsRawFd) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd, no wait.
    check(unsafe { libc::poll(&mut pfd, 1, 0) })?;
    Ok(pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
}

/// Bytes received in order so far (`tcpi_bytes_received`; the FIN counts as one). No
/// owner lock.
pub fn bytes_received(fd: &impl AsRawFd) -> io::Result<u64> {
    Ok(tcp_info(fd.as_raw_fd())?.tcpi_bytes_received)
}

/// Bytes waiting in the TCP receive queue, counted by a `recv(MSG_PEEK | MSG_TRUNC)`
/// (`SIOCINQ` reports only the sockmap's own queue for a socket in a sockmap on this
/// kernel). Takes the owner lock: only for a socket the kernel does not splice.
fn unread(fd: RawFd) -> io::Result<u64> {
    // SAFETY: MSG_TRUNC with MSG_PEEK copies nothing; the kernel only counts.
    let n = unsafe {
        libc::recv(
            fd,
            std::ptr::null_mut(),
            1 << 30,
            libc::MSG_PEEK | libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(0),
            _ => Err(e),
        };
    }
    Ok(n as u64)
}

/// Bytes taken out of the socket's receive stream so far (by reads, or by the kernel's
/// stream parser): received minus still queued, minus the FIN's sequence number once the
/// FIN arrived. Compared with what the verdict redirected, it shows bytes the kernel
/// consumed without redirecting them. Takes the owner lock (see [`rdhup`]): only for a
/// socket the kernel does not splice (before it enters the map, after it left it, or
/// after its FIN).
pub fn consumed_position(fd: &impl AsRawFd) -> io::Result<u64> {
    let raw = fd.as_raw_fd();
    for _ in 0..1000 {
        let a = tcp_info(raw)?;
        let fin = rdhup(&raw)?;
        let q = unread(raw)?;
        let b = tcp_info(raw)?;
        if a.tcpi_bytes_received == b.tcpi_bytes_received && fin == rdhup(&raw)? {
            return Ok(b.tcpi_bytes_received.saturating_sub(q + fin as u64));
        }
    }
    Err(io::Error::other("TCP receive position kept moving"))
}

/// Cookie of the network namespace this process's new sockets belong to (zero-hop's
/// capture program looks only at sockets of the daemon's namespace).
pub fn netns_cookie() -> io::Result<u64> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    check(unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            &mut v as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok(v)
}
