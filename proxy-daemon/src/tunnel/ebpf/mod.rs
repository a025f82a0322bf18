//! In-kernel fast path: each tunnel socket goes into `TARGETS` (so it has a psock the
//! other side's bytes can be redirected to) and into `SOCKS`, whose stream verdict
//! redirects its incoming bytes to the other socket's egress (see `proxy-ebpf`). The
//! daemon only watches for the end of each direction (FIN, reset) and for the verdict's
//! over-budget event, after which it takes the socket out of `SOCKS` and relays that
//! direction itself; redirected bytes never wake it.

mod btf;
mod loader;
mod sys;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proxy_common::Direction;
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
        // Both sources leave SOCKS before either socket leaves TARGETS: a verdict must
        // never redirect to a socket that is gone.
        for &c in &self.cookies {
            self.splicer.unsplice_source(c);
        }
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
        _ => return super::copy::relay(client, upstream, counters).await,
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
    // Directions first (the verdict finds its peer as soon as a socket is in SOCKS),
    // then both sockets as redirect targets. A socket that already received a FIN is
    // refused (EOPNOTSUPP): then the whole tunnel is relayed here.
    for (from, to) in [(c, u), (u, c)] {
        let dir = Direction {
            peer: to,
            budget: splicer.budget,
            ..Default::default()
        };
        entries.cookies.push(from);
        if let Err(e) = splicer.insert_direction(from, dir) {
            tracing::debug!(error = %e, "fast path: direction map insert failed, relaying in userspace");
            drop(entries);
            return super::copy::relay(client, upstream, counters).await;
        }
    }
    for (cookie, s) in [(u, upstream), (c, client)] {
        if let Err(e) = splicer.insert_target(cookie, s) {
            tracing::debug!(error = %e, "fast path: socket not spliceable, relaying in userspace");
            drop(entries);
            return super::copy::relay(client, upstream, counters).await;
        }
    }
    // Then each socket as a source. One that is refused (its FIN arrived meanwhile)
    // leaves just its direction to the daemon.
    let up_budget = splicer.watch_budget(c);
    let down_budget = splicer.watch_budget(u);
    let mut spliced = [false; 2];
    for (i, (cookie, s)) in [(u, upstream), (c, client)].into_iter().enumerate() {
        match splicer.splice_source(cookie, s) {
            Ok(()) => spliced[i] = true,
            Err(e) => tracing::debug!(error = %e, "fast path: one direction relayed in userspace"),
        }
    }
    let [down_spliced, up_spliced] = spliced;
    // Bytes queued before insertion wait for new data unless poked.
    for (s, on) in [(client, up_spliced), (upstream, down_spliced)] {
        if on {
            if let Err(e) = sys::kick_queued(s) {
                return RelayEnd::Reset(e.kind());
            }
        }
    }
    let up = direction(
        splicer,
        Way {
            from_cookie: c,
            from: client,
            to: upstream,
            to_base: upstream_base,
            spliced: up_spliced,
            over_budget: &up_budget,
        },
        &counters.client_to_upstream,
        counters,
    );
    let down = direction(
        splicer,
        Way {
            from_cookie: u,
            from: upstream,
            to: client,
            to_base: client_base,
            spliced: down_spliced,
            over_budget: &down_budget,
        },
        &counters.upstream_to_client,
        counters,
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

/// One direction of a tunnel.
struct Way<'a> {
    from_cookie: u64,
    from: &'a TcpStream,
    to: &'a TcpStream,
    /// `to`'s send-stream position before anything was redirected into it.
    to_base: u64,
    /// Whether `from` is in SOCKS (its bytes are redirected by the kernel).
    spliced: bool,
    over_budget: &'a tokio::sync::Notify,
}

/// Clears tokio's read readiness so the next `readable()` waits for a new kernel event.
fn clear_readable(s: &TcpStream) {
    let _ = s.try_io(Interest::READABLE, || {
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
}

/// Resolves when the socket fails (reset, timeout) while the tunnel runs. Waits on the
/// socket's own registration for error readiness only: data and FIN never wake it, and
/// it never consumes the read readiness the direction tasks wait for (a dup of the fd
/// with its own registration would cost two more fds per tunnel).
async fn watch_error(s: &TcpStream) -> io::Error {
    let mut seen_ready = false;
    loop {
        match sys::take_error(s) {
            Ok(Some(e)) | Err(e) => return e,
            // Error readiness stays set once seen; if a relay's own syscall already
            // took the error, do not spin on it.
            Ok(None) if seen_ready => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(None) => {}
        }
        if let Err(e) = s.ready(Interest::ERROR).await {
            return e;
        }
        seen_ready = true;
    }
}

/// One direction: while spliced, sleeps until the source's EOF (then finishes it once
/// every redirected byte is in `to`'s stream) or until the verdict reports it over
/// budget (then takes it out of the kernel and relays it here).
async fn direction(
    splicer: &Splicer,
    way: Way<'_>,
    moved: &AtomicU64,
    counters: &TunnelCounters,
) -> io::Result<()> {
    let Way {
        from_cookie,
        from,
        to,
        to_base,
        spliced,
        over_budget,
    } = way;
    if spliced {
        tokio::select! {
            r = wait_eof(from) => {
                r?;
                let dir = splicer.direction(from_cookie).unwrap_or_default();
                wait_delivered(to, to_base, dir.redirected).await?;
                moved.fetch_add(dir.redirected, Ordering::Relaxed);
                count_kernel_bytes(counters, &dir);
                return socket::shutdown_write(to);
            }
            _ = over_budget.notified() => {}
        }
        splicer.unsplice_source(from_cookie);
        // A strparser pass still running on another CPU holds the socket lock; this
        // takes it too, so the verdict's count below is final.
        sys::stream_position(from)?;
        let dir = splicer.direction(from_cookie).unwrap_or_default();
        tracing::debug!(
            redirected = dir.redirected,
            budget = dir.budget,
            max_outstanding = dir.max_outstanding,
            "fast path: direction over budget, relaying it in userspace"
        );
        wait_delivered(to, to_base, dir.redirected).await?;
        moved.fetch_add(dir.redirected, Ordering::Relaxed);
        count_kernel_bytes(counters, &dir);
    }
    if drain_queued(from, to, moved).await? {
        return Ok(());
    }
    if spliced {
        // Handed over for being over budget: a bulk direction, where splice(2) is the
        // fastest relay measured here (docs/fastpath.md); its pipe exists only for it.
        super::splice::one_way(from, to, moved).await
    } else {
        super::copy::one_way(from, to, moved).await
    }
}

fn count_kernel_bytes(counters: &TunnelCounters, dir: &Direction) {
    counters
        .in_kernel
        .fetch_add(dir.redirected, Ordering::Relaxed);
    counters
        .kernel_queue_peak
        .fetch_max(dir.max_outstanding, Ordering::Relaxed);
}

/// Resolves at the spliced socket's EOF with nothing unparsed in front of it.
async fn wait_eof(from: &TcpStream) -> io::Result<()> {
    loop {
        match sys::peek(from) {
            Ok(0) => return Ok(()),
            // The verdict never passes bytes to the socket itself, so there is nothing
            // to read; the parser just has not reached the FIN yet.
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                from.readable().await?;
                clear_readable(from);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Relays what `from` already holds with plain syscalls; true when that reached EOF.
///
/// The watch loop above clears tokio's read readiness before it peeks, so when it sees
/// the budget flip the passed bytes may already be queued with no readiness left. The
/// sender, its window closed by those very bytes, sends nothing more to raise a new
/// edge; waiting for readiness here would wait for ever.
async fn drain_queued(from: &TcpStream, to: &TcpStream, moved: &AtomicU64) -> io::Result<bool> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match sys::recv(from, &mut buf) {
            Ok(0) => {
                socket::shutdown_write(to)?;
                return Ok(true);
            }
            Ok(n) => {
                socket::write_all(to, &buf[..n]).await?;
                moved.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Waits until `redirected` bytes entered `to`'s TCP send stream since `base` (the kernel
/// worker that sends redirected skbs runs asynchronously).
async fn wait_delivered(to: &TcpStream, base: u64, redirected: u64) -> io::Result<()> {
    let mut delay = Duration::from_micros(200);
    tracing::trace!(base, redirected, pos = ?sys::stream_position(to), "fast path: waiting for delivery");
    let started = std::time::Instant::now();
    let mut warned = false;
    loop {
        let delivered = sys::stream_position(to)?.wrapping_sub(base);
        if delivered >= redirected {
            return Ok(());
        }
        if !warned && started.elapsed() > Duration::from_secs(2) {
            warned = true;
            tracing::warn!(
                delivered,
                redirected,
                "fast path: redirected bytes still not delivered after 2 s"
            );
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
