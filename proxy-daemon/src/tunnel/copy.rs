//! Userspace relay: read into a buffer, write it out, per direction.
//! The buffer exists only while a burst is being moved, so idle tunnels cost no buffer.

use std::io;

use tokio::net::TcpStream;

use super::counters::{DataPath, DirectionCounters, TunnelCounters};
use super::{socket, RelayEnd};

const BUFFER: usize = 64 * 1024;

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

pub(super) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    moved: &DirectionCounters,
) -> io::Result<()> {
    moved.use_path(DataPath::Copy);
    loop {
        from.readable().await?;
        let mut buf = vec![0u8; BUFFER];
        loop {
            match from.try_read(&mut buf) {
                Ok(0) => return socket::shutdown_write(to),
                Ok(n) => {
                    socket::write_all(to, &buf[..n]).await?;
                    moved.copied(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}
