//! Userspace relay: read into a buffer, write it out, per direction.
//! The buffer exists only while a burst is being moved, so idle tunnels cost no buffer.

use std::io;

use tokio::net::TcpStream;

use super::counters::{DataPath, DirectionCounters, TunnelCounters};
use super::handover::PathState;
use super::progress::{Progress, WayProgress};
use super::{socket, RelayEnd};

const BUFFER: usize = 64 * 1024;

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

/// One direction. Bytes `progress` holds go first; a buffer read from the source is
/// held there until written, so the relay may stop at any await point.
///
/// What the source already holds is read first without waiting for readiness: a
/// direction that comes from the kernel's fast path may have bytes queued whose readiness
/// was consumed (the kernel path's EOF watch clears it), and with edge-triggered readiness
/// no new edge comes until the sender sends more, which it may not (its window closed by
/// those very bytes, or nothing left to say).
pub(super) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    moved: &DirectionCounters,
    progress: &WayProgress,
) -> io::Result<()> {
    moved.use_path(DataPath::Copy);
    progress.set_path(PathState::Copy);
    progress.write_held(to, moved).await?;
    let mut drained = false;
    loop {
        if drained {
            from.readable().await?;
        }
        // The buffer exists only while a burst is being moved.
        let mut buf = vec![0u8; BUFFER];
        loop {
            let read = if drained {
                from.try_read(&mut buf)
            } else {
                socket::recv_now(from, &mut buf)
            };
            match read {
                Ok(0) => {
                    socket::shutdown_write(to)?;
                    progress.set_path(PathState::Closed);
                    return Ok(());
                }
                Ok(n) => {
                    progress.hold(buf, n);
                    buf = progress.write_held(to, moved).await?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}
