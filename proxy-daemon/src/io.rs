//! Socket I/O on shared references, so the futures of one task (a request body going up
//! while the response comes down) can use one socket at once. Readiness first, then the
//! syscall: tokio's `try_*` calls cost no syscall while the socket is known not ready.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Bytes read per call when a buffer has to grow.
const READ_CHUNK: usize = 16 * 1024;

/// Reads what is available into `buf` (at least one byte, or 0 at EOF).
pub async fn read_some(s: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        match try_read(s, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.readable().await?,
            other => return other,
        }
    }
}

/// One read if the socket may be readable; `WouldBlock` otherwise.
pub fn try_read(s: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    s.try_read_buf(buf)
}

/// Writes every byte.
pub async fn write_all(s: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match s.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes the coming close send RST instead of FIN: the peer must not take what it got
/// for a complete message.
pub fn reset_on_close(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// TCP keepalive probing, so a peer that vanished without FIN or RST is noticed.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub probes: u32,
}

/// Socket options every traffic socket gets: no Nagle delay, keepalive probes.
pub fn tune(s: &TcpStream, keepalive: Option<Keepalive>) {
    let _ = s.set_nodelay(true);
    if let Some(k) = keepalive {
        let params = TcpKeepalive::new()
            .with_time(k.idle)
            .with_interval(k.interval)
            .with_retries(k.probes);
        let _ = SockRef::from(s).set_tcp_keepalive(&params);
    }
}
