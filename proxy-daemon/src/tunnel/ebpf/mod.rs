//! In-kernel fast path: both tunnel sockets go into a SOCKHASH whose stream verdict
//! redirects each skb to the other socket's egress (see `proxy-ebpf`). The daemon only
//! watches for the end of the tunnel (FIN, reset, or a direction that went over its
//! memory budget and must be relayed here); redirected bytes never wake it.

mod btf;
mod loader;
mod sys;

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proxy_common::{Direction, FLAG_PASSING, FLAG_PEER_GONE};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;

pub use loader::{object_embedded, Splicer, DEFAULT_BUDGET};

use super::{socket, RelayEnd, TunnelCounters};

const TCP_CLOSE: u8 = 7;
const MAX_POLL: Duration = Duration::from_millis(20);

/// Removes the tunnel's map entries however the relay ends (also when its future is
/// dropped at shutdown). By then nothing is queued in either psock on a clean end.
struct Entries<'a> {
    splicer: &'a Splicer,
    cookies: Vec<u64>,
}

impl Drop for Entries<'_> {
    fn drop(&mut self) {
        for &c in &self.cookies {
            self.splicer.remove(c);
        }
    }
}

pub async fn relay(
    splicer: &Splicer,
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &TunnelCounters,
) -> RelayEnd {
    let (c, u) = match (sys::cookie(client), sys::cookie(upstream)) {
        (Ok(c), Ok(u)) => (c, u),
        _ => return super::splice::relay(client, upstream, counters).await,
    };
    // Where each send stream stands before any byte is redirected into it.
    let (client_base, upstream_base) =
        match (sys::stream_position(client), sys::stream_position(upstream)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return RelayEnd::Reset(e.kind()),
        };
    let mut entries = Entries {
        splicer,
        cookies: Vec::with_capacity(2),
    };
    // Directions first: the verdict finds its peer as soon as a socket is in the map.
    for (from, to) in [(c, u), (u, c)] {
        let dir = Direction {
            peer: to,
            budget: splicer.budget,
            ..Default::default()
        };
        if let Err(e) = splicer.insert_direction(from, dir) {
            tracing::debug!(error = %e, "fast path: direction map insert failed, relaying in userspace");
            drop(entries);
            return super::splice::relay(client, upstream, counters).await;
        }
        entries.cookies.push(from);
    }
    // Upstream first, then client; a socket that already received a FIN is refused
    // (EOPNOTSUPP).
    if let Err(e) = splicer.insert_socket(u, upstream) {
        tracing::debug!(error = %e, "fast path: upstream socket not spliceable, relaying in userspace");
        drop(entries);
        return super::splice::relay(client, upstream, counters).await;
    }
    if let Err(e) = splicer.insert_socket(c, client) {
        // The upstream socket is in the map and may already have passed or redirected
        // bytes (redirects to a missing peer flip its direction to pass). Keep it there:
        // mark it passing and read it through its psock with the plain copy relay.
        tracing::debug!(error = %e, "fast path: client socket not spliceable, relaying in userspace");
        if let Some(mut dir) = splicer.direction(u) {
            dir.flags |= FLAG_PASSING | FLAG_PEER_GONE;
            let _ = splicer.insert_direction(u, dir);
        }
        let end = wait_then_copy(splicer, u, client, client_base, upstream, counters).await;
        drop(entries);
        return end;
    }
    // Bytes queued before insertion wait for new data unless poked.
    for s in [client, upstream] {
        if let Err(e) = sys::kick_queued(s) {
            return RelayEnd::Reset(e.kind());
        }
    }
    let up = direction(
        splicer,
        c,
        client,
        upstream,
        upstream_base,
        &counters.client_to_upstream,
    );
    let down = direction(
        splicer,
        u,
        upstream,
        client,
        client_base,
        &counters.upstream_to_client,
    );
    let both = async { tokio::try_join!(up, down) };
    let end = tokio::select! {
        r = both => match r {
            Ok(_) => RelayEnd::Closed,
            Err(e) => RelayEnd::Reset(e.kind()),
        },
        e = watch_error(client) => RelayEnd::Reset(e.kind()),
        e = watch_error(upstream) => RelayEnd::Reset(e.kind()),
    };
    drop(entries);
    end
}

/// The upstream socket is in the map, the client is not: upstream→client waits for any
/// redirected bytes then copies; client→upstream is a plain copy.
async fn wait_then_copy(
    splicer: &Splicer,
    u: u64,
    client: &TcpStream,
    client_base: u64,
    upstream: &TcpStream,
    counters: &TunnelCounters,
) -> RelayEnd {
    let redirected = splicer.direction(u).map(|d| d.redirected).unwrap_or(0);
    if let Err(e) = wait_delivered(client, client_base, redirected).await {
        return RelayEnd::Reset(e.kind());
    }
    counters
        .upstream_to_client
        .fetch_add(redirected, Ordering::Relaxed);
    super::copy::relay(client, upstream, counters).await
}

/// Clears tokio's read readiness so the next `readable()` waits for a new kernel event.
fn clear_readable(s: &TcpStream) {
    let _ = s.try_io(Interest::READABLE, || {
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
}

/// Resolves when the socket fails (reset, timeout) while the tunnel runs. Waits for
/// EPOLLERR through its own registration (a dup of the fd): data and FIN never wake it,
/// and it never consumes the readiness the direction tasks wait for.
async fn watch_error(s: &TcpStream) -> io::Error {
    let fd = match s.as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    // SAFETY: the AsyncFd owns the duplicated fd and closes it when dropped.
    let watch = match unsafe { AsyncFd::register_with_interest(fd, Interest::ERROR) } {
        Ok(w) => w,
        Err(e) => return e.into(),
    };
    loop {
        match sys::take_error(s) {
            Ok(Some(e)) => return e,
            Ok(None) => {}
            Err(e) => return e,
        }
        match watch.ready(Interest::ERROR).await {
            Ok(mut guard) => guard.clear_ready(),
            Err(e) => return e,
        }
    }
}

/// One direction while it is spliced: sleeps until the source socket signals (FIN,
/// passed bytes after a budget flip), then finishes the direction.
async fn direction(
    splicer: &Splicer,
    from_cookie: u64,
    from: &TcpStream,
    to: &TcpStream,
    to_base: u64,
    moved: &AtomicU64,
) -> io::Result<()> {
    let mut delay = Duration::from_millis(1);
    loop {
        let p = sys::peek(from);
        tracing::trace!(from_cookie, peek = ?p, "fast path: direction check");
        match p {
            Ok(0) => {
                // EOF, and nothing left unparsed in front of it.
                let dir = splicer.direction(from_cookie).unwrap_or_default();
                if dir.flags & FLAG_PASSING != 0 {
                    break;
                }
                wait_delivered(to, to_base, dir.redirected).await?;
                moved.fetch_add(dir.redirected, Ordering::Relaxed);
                return socket::shutdown_write(to);
            }
            Ok(_) => {
                let dir = splicer.direction(from_cookie).unwrap_or_default();
                if dir.flags & FLAG_PASSING != 0 {
                    break;
                }
                // Queued but not yet through the stream parser (its work runs soon).
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_POLL);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                delay = Duration::from_millis(1);
                from.readable().await?;
                clear_readable(from);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // Over budget (or peer vanished): the verdict now passes every byte to `from`'s own
    // queue. Once every redirected byte is in `to`'s stream, relay the rest here.
    let dir = splicer.direction(from_cookie).unwrap_or_default();
    tracing::debug!(
        redirected = dir.redirected,
        budget = dir.budget,
        "fast path: direction over budget, relaying it in userspace"
    );
    wait_delivered(to, to_base, dir.redirected).await?;
    moved.fetch_add(dir.redirected, Ordering::Relaxed);
    super::copy::one_way(from, to, moved).await
}

/// Waits until `redirected` bytes entered `to`'s TCP send stream since `base` (the kernel
/// worker that sends redirected skbs runs asynchronously).
async fn wait_delivered(to: &TcpStream, base: u64, redirected: u64) -> io::Result<()> {
    let mut delay = Duration::from_micros(200);
    tracing::trace!(base, redirected, pos = ?sys::stream_position(to), "fast path: waiting for delivery");
    loop {
        if sys::stream_position(to)?.wrapping_sub(base) >= redirected {
            return Ok(());
        }
        if sys::tcp_state(to)? == TCP_CLOSE {
            return Err(
                sys::take_error(to)?.unwrap_or_else(|| io::ErrorKind::ConnectionReset.into())
            );
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_POLL);
    }
}
