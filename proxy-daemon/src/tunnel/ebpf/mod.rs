//! In-kernel fast path: each tunnel socket goes into `TARGETS` (so it has a psock the
//! other side's bytes can be redirected to) and into `SOCKS`, whose stream verdict
//! redirects its incoming bytes to the other socket's egress (see `proxy-ebpf`). The
//! daemon only watches for the end of each direction (FIN, reset) and for the verdict's
//! over-budget hand-off, after which it takes the socket out of `SOCKS` and relays that
//! direction itself; redirected bytes never wake it.

pub(crate) mod btf;
mod loader;
mod shared;
pub(crate) mod sys;
mod unsplice;
mod watch;

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use proxy_common::HANDOFF_DIRECTION_BUDGET;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;

pub(crate) use loader::OBJECT;
pub use loader::{
    object_embedded, Settings, Splicer, Stats, DEFAULT_BUDGET, DEFAULT_EVENT_RING_BYTES,
    DEFAULT_MAX_SOCKETS, DEFAULT_MEMORY_LIMIT,
};
pub use watch::LiveDirections;

use super::counters::{DirectionCounters, TunnelCounters};
use super::handover::{KernelWay, PathState};
use super::progress::{Progress, WayProgress};
use super::{socket, RelayEnd};

const TCP_CLOSE: u8 = 7;
const MAX_POLL: Duration = Duration::from_millis(20);

/// One direction of a tunnel whose state is in the kernel's maps.
struct Way<'a> {
    from_cookie: u64,
    from: &'a TcpStream,
    to: &'a TcpStream,
    /// `to`'s send-stream position before anything was redirected into it.
    to_base: u64,
    /// `from`'s receive position (bytes consumed) before the kernel took it over.
    from_base: u64,
    /// Its entry in the shared ledger (machine-wide memory accounting).
    slot: u32,
    counters: &'a DirectionCounters,
    progress: &'a WayProgress,
    /// The kernel splices it now (its source is in `SOCKS` and it was not settled).
    in_kernel: AtomicBool,
    /// Woken when the verdict asks the daemon to take the direction over.
    handoff: Arc<Notify>,
}

impl Way<'_> {
    /// Bytes of this direction in `to`'s stream (what the kernel delivered), at most
    /// what the verdict redirected.
    fn delivered_now(&self, splicer: &Splicer) -> u64 {
        let redirected = splicer.accounting.redirected(self.slot);
        sys::stream_position(self.to)
            .map(|p| p.saturating_sub(self.to_base).min(redirected))
            .unwrap_or(0)
    }

    /// The direction is out of the kernel after `delivered` bytes: it no longer counts
    /// against the machine-wide budget, and its byte count is final. Once only.
    fn leave_kernel(&self, splicer: &Splicer, delivered: u64) {
        if self.in_kernel.swap(false, Relaxed) {
            splicer.live.forget(self.from_cookie);
            splicer.accounting.settle_all(self.slot);
            self.counters.leave_kernel(delivered);
        }
    }
}

/// A tunnel's kernel state. Dropping it (however the relay ends: EOF, reset, hand-off,
/// shutdown) settles every direction still in the kernel, collects the verdict's
/// counters, and removes the map entries — unless the tunnel is moving to a successor
/// process, which continues with them (then it only stops watching).
struct Spliced<'a> {
    splicer: &'a Splicer,
    counters: &'a TunnelCounters,
    progress: &'a Progress,
    ways: Vec<Way<'a>>,
    /// The tunnel is being parked (`tunnel::park`): its directions stay in the kernel
    /// and watched, and continue when it is woken (`resume` with `Resume::Unparked`).
    parking: bool,
}

impl Drop for Spliced<'_> {
    fn drop(&mut self) {
        let splicer = self.splicer;
        if self.parking {
            return;
        }
        if self.progress.handing_over() {
            // Never remove a socket from a map during a hand-over: removal can lose a
            // message (docs/fastpath.md). The successor watches these directions now.
            for w in &self.ways {
                if w.in_kernel.load(Relaxed) {
                    splicer.live.forget(w.from_cookie);
                }
            }
            return;
        }
        // Both sources leave SOCKS before anything else: no verdict runs after this
        // (a pass in flight holds the socket lock, which the stream-position read of
        // the source takes too).
        for w in &self.ways {
            splicer.unsplice_source(w.from_cookie);
        }
        for w in &self.ways {
            if w.in_kernel.load(Relaxed) {
                let _ = sys::stream_position(w.from);
                w.leave_kernel(splicer, w.delivered_now(splicer));
            }
        }
        for w in &self.ways {
            match splicer.direction(w.from_cookie) {
                Some(dir) => {
                    let c = self.counters;
                    c.kernel_queue_peak.fetch_max(dir.max_outstanding, Relaxed);
                    c.kernel_dropped.fetch_add(dir.dropped, Relaxed);
                    c.kernel_misparsed.fetch_add(dir.misparsed as u64, Relaxed);
                    splicer.stats.kernel_dropped.fetch_add(dir.dropped, Relaxed);
                    splicer
                        .stats
                        .kernel_misparsed
                        .fetch_add(dir.misparsed as u64, Relaxed);
                }
                None => {
                    splicer.stats.directions_lost.fetch_add(1, Relaxed);
                }
            }
        }
        // Sockets leave TARGETS only now: a verdict must never redirect to a socket
        // that is gone.
        for w in &self.ways {
            splicer.remove(w.from_cookie, Some(w.slot));
        }
        for c in self.progress.targets() {
            splicer.remove(c, None);
        }
    }
}

/// Whether a map insert failed because the map is full.
fn is_full(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::E2BIG) || e.raw_os_error() == Some(libc::ENOMEM)
}

/// Splices both directions in the kernel. With `park`, a tunnel whose two directions
/// both went into the kernel returns [`RelayEnd::Parked`] at once: nothing is left for a
/// task to do until a direction ends or is handed over (`tunnel::park` waits for that).
pub async fn relay(
    splicer: &Splicer,
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &TunnelCounters,
    progress: &Progress,
    park: bool,
) -> RelayEnd {
    relay_with(
        splicer,
        client,
        upstream,
        counters,
        progress,
        None::<std::future::Pending<io::Result<()>>>,
        park,
    )
    .await
}

/// A zero-hop tunnel: only client → upstream is spliced here; `down` carries upstream
/// → client (the app's own sends into the client socket, and the daemon's relay of the
/// normal hop), so the upstream socket is never a source. Both sockets still go into
/// `TARGETS` (the client's psock must outlive its stint in `SOCKS`, as in `relay`).
pub async fn relay_up(
    splicer: &Splicer,
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &TunnelCounters,
    progress: &Progress,
    down: impl Future<Output = io::Result<()>>,
    park: bool,
) -> RelayEnd {
    relay_with(
        splicer,
        client,
        upstream,
        counters,
        progress,
        Some(down),
        park,
    )
    .await
}

/// The userspace relay, for a tunnel the kernel cannot take (`down`: see `relay_up`).
async fn userspace(
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &TunnelCounters,
    progress: &Progress,
    down: Option<impl Future<Output = io::Result<()>>>,
) -> RelayEnd {
    let Some(down) = down else {
        return super::copy::relay(client, upstream, counters, progress).await;
    };
    let up = super::copy::one_way(
        client,
        upstream,
        &counters.client_to_upstream,
        &progress.client_to_upstream,
    );
    match tokio::try_join!(up, down) {
        Ok(_) => RelayEnd::Closed,
        Err(e) => RelayEnd::Reset(e.kind()),
    }
}

async fn relay_with(
    splicer: &Splicer,
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &TunnelCounters,
    progress: &Progress,
    down: Option<impl Future<Output = io::Result<()>>>,
    park: bool,
) -> RelayEnd {
    let (c, u) = match (sys::cookie(client), sys::cookie(upstream)) {
        (Ok(c), Ok(u)) => (c, u),
        _ => return Box::pin(userspace(client, upstream, counters, progress, down)).await,
    };
    // Upstream → client in the kernel too (not for zero-hop).
    let both_ways = down.is_none();
    // Where each send stream stands before any byte is redirected into it.
    let (client_base, upstream_base) =
        match (sys::stream_position(client), sys::stream_position(upstream)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return RelayEnd::Reset(e.kind()),
        };
    let mut spliced = Spliced {
        splicer,
        counters,
        progress,
        ways: Vec::with_capacity(2),
        parking: false,
    };
    // Directions first (the verdict finds its peer as soon as a socket is in SOCKS),
    // then both sockets as redirect targets. Full maps, or a socket that already
    // received a FIN (EOPNOTSUPP), leave the whole tunnel to the userspace relay.
    let up_way = (
        c,
        client,
        u,
        upstream,
        upstream_base,
        &counters.client_to_upstream,
        &progress.client_to_upstream,
    );
    let down_way = (
        u,
        upstream,
        c,
        client,
        client_base,
        &counters.upstream_to_client,
        &progress.upstream_to_client,
    );
    let ways = if both_ways {
        vec![up_way, down_way]
    } else {
        vec![up_way]
    };
    for (from_cookie, from, to_cookie, to, to_base, dir_counters, dir_progress) in ways {
        let from_base = match sys::consumed_position(from) {
            Ok(p) => p,
            Err(e) => {
                drop(spliced);
                return RelayEnd::Reset(e.kind());
            }
        };
        match splicer.add_direction(from_cookie, to_cookie) {
            Ok(slot) => {
                dir_progress.set_kernel(KernelWay {
                    cookie: from_cookie,
                    slot,
                    to_base,
                    from_base,
                });
                spliced.ways.push(Way {
                    from_cookie,
                    from,
                    to,
                    to_base,
                    from_base,
                    slot,
                    counters: dir_counters,
                    progress: dir_progress,
                    in_kernel: AtomicBool::new(false),
                    handoff: Arc::new(Notify::new()),
                })
            }
            Err(e) => {
                splicer.stats.maps_full.fetch_add(1, Relaxed);
                tracing::debug!(error = %e, "fast path: maps full, relaying in userspace");
                drop(spliced);
                return Box::pin(userspace(client, upstream, counters, progress, down)).await;
            }
        }
    }
    for (cookie, s) in [(u, upstream), (c, client)] {
        if let Err(e) = splicer.insert_target(cookie, s) {
            if is_full(&e) {
                splicer.stats.maps_full.fetch_add(1, Relaxed);
            }
            tracing::debug!(error = %e, "fast path: socket not spliceable, relaying in userspace");
            drop(spliced);
            return Box::pin(userspace(client, upstream, counters, progress, down)).await;
        }
        progress.add_target(cookie);
    }
    // Then each socket as a source, upstream first. One that is refused (its FIN
    // arrived meanwhile) leaves just its direction to the daemon.
    for w in spliced.ways.iter_mut().rev() {
        w.handoff = splicer.live.watch(
            w.from_cookie,
            w.slot,
            w.from.as_raw_fd(),
            w.to.as_raw_fd(),
            w.to_base,
        );
        w.in_kernel.store(true, Relaxed);
        w.counters.enter_kernel(w.from_cookie);
        w.progress.set_path(PathState::Kernel);
        if let Err(e) = splicer.splice_source(w.from_cookie, w.from) {
            tracing::debug!(error = %e, "fast path: one direction relayed in userspace");
            w.in_kernel.store(false, Relaxed);
            splicer.live.forget(w.from_cookie);
            w.counters.leave_kernel(0);
            w.counters.drop_path(super::DataPath::Kernel);
            w.progress.set_path(PathState::Copy);
        }
    }
    // Bytes queued before insertion wait for new data unless poked. The poke takes the
    // socket's owner lock, which moves that parser pass to a workqueue (see `sys::rdhup`):
    // only when there is something to parse.
    for w in &spliced.ways {
        let arrived = sys::bytes_received(w.from).is_ok_and(|n| n > w.from_base);
        if w.in_kernel.load(Relaxed) && arrived {
            if let Err(e) = sys::kick_queued(w.from) {
                return RelayEnd::Reset(e.kind());
            }
        }
    }
    if park && parkable(&spliced, both_ways) {
        spliced.parking = true;
        return RelayEnd::Parked;
    }
    // Boxed: this frame's set-up state is not kept for the tunnel's life.
    let ways = Box::pin(run_ways(
        splicer, &spliced, client, upstream, counters, progress, down,
    ));
    ways.await
}

/// Every direction it splices is in the kernel (both, or client → upstream of a
/// zero-hop tunnel, whose other direction waits for its normal hop) and none was handed
/// over: a task has nothing to do for this tunnel but wait.
fn parkable(spliced: &Spliced<'_>, both_ways: bool) -> bool {
    let ways = if both_ways { 2 } else { 1 };
    spliced.ways.len() == ways && spliced.ways.iter().all(|w| w.in_kernel.load(Relaxed))
}

/// Where a tunnel that `resume` continues comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Adopted from the daemon taken over; `park` as in [`relay`].
    Adopted { park: bool },
    /// Woken from the parker: its kernel directions are still watched here.
    Unparked,
}

/// A tunnel paused for a takeover before its relay ran again (woken from the parker for
/// the pause): its directions leave this process's watch list, as a running relay's
/// guard does, so the hand-off thread no longer acts on them (the successor's does).
pub fn stop_watching(splicer: &Splicer, progress: &Progress) {
    for w in [&progress.client_to_upstream, &progress.upstream_to_client] {
        if let Some(k) = w.kernel() {
            splicer.live.forget(k.cookie);
        }
    }
}

/// Continues a tunnel adopted from the daemon taken over (`takeover`), or woken from the
/// parker: its directions in the kernel stay there (their sockets never left the maps;
/// the hand-off thread of this process watches them), the others continue in userspace
/// on the path they were on, their held bytes first.
pub async fn resume(
    splicer: &Splicer,
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &TunnelCounters,
    progress: &Progress,
    how: Resume,
) -> RelayEnd {
    let no_override = None::<std::future::Pending<io::Result<()>>>;
    resume_with(
        splicer,
        client,
        upstream,
        counters,
        progress,
        how,
        no_override,
    )
    .await
}

/// A zero-hop tunnel woken from the parker: [`resume`] for client → upstream, `down`
/// (see [`relay_up`]) for upstream → client.
pub async fn resume_up(
    splicer: &Splicer,
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &TunnelCounters,
    progress: &Progress,
    how: Resume,
    down: impl Future<Output = io::Result<()>>,
) -> RelayEnd {
    resume_with(
        splicer,
        client,
        upstream,
        counters,
        progress,
        how,
        Some(down),
    )
    .await
}

async fn resume_with(
    splicer: &Splicer,
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &TunnelCounters,
    progress: &Progress,
    how: Resume,
    down: Option<impl Future<Output = io::Result<()>>>,
) -> RelayEnd {
    let mut spliced = Spliced {
        splicer,
        counters,
        progress,
        ways: Vec::with_capacity(2),
        parking: false,
    };
    let ways = [
        (
            client,
            upstream,
            &counters.client_to_upstream,
            &progress.client_to_upstream,
        ),
        (
            upstream,
            client,
            &counters.upstream_to_client,
            &progress.upstream_to_client,
        ),
    ];
    for (from, to, dir_counters, dir_progress) in ways {
        let Some(k) = dir_progress.kernel() else {
            continue;
        };
        let way = Way {
            from_cookie: k.cookie,
            from,
            to,
            to_base: k.to_base,
            from_base: k.from_base,
            slot: k.slot,
            counters: dir_counters,
            progress: dir_progress,
            in_kernel: AtomicBool::new(false),
            handoff: Arc::new(Notify::new()),
        };
        spliced.ways.push(way);
    }
    for w in spliced.ways.iter_mut() {
        if w.progress.path() == PathState::Kernel {
            let watched = match how {
                // Its hand-off notifier is the one it was parked with (a hand-off that
                // came meanwhile left its permit there).
                Resume::Unparked => splicer.live.unpark(w.from_cookie),
                Resume::Adopted { .. } => None,
            };
            w.handoff = watched.unwrap_or_else(|| {
                splicer.adopt_direction(
                    w.from_cookie,
                    w.slot,
                    w.from.as_raw_fd(),
                    w.to.as_raw_fd(),
                    w.to_base,
                )
            });
            w.in_kernel.store(true, Relaxed);
            w.counters.enter_kernel(w.from_cookie);
        }
    }
    // A woken tunnel never parks again here: what woke it (an EOF, an error, a hand-off)
    // is for a task to handle.
    if how == (Resume::Adopted { park: true }) && parkable(&spliced, down.is_none()) {
        spliced.parking = true;
        return RelayEnd::Parked;
    }
    run_ways(
        splicer, &spliced, client, upstream, counters, progress, down,
    )
    .await
}

/// Runs both directions until they end (or fail), each from where it stands; `down`,
/// when given, replaces the upstream → client direction (zero-hop).
async fn run_ways(
    splicer: &Splicer,
    spliced: &Spliced<'_>,
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &TunnelCounters,
    progress: &Progress,
    down_override: Option<impl Future<Output = io::Result<()>>>,
) -> RelayEnd {
    let way_from = |s: &TcpStream| spliced.ways.iter().find(|w| std::ptr::eq(w.from, s));
    // The direction futures are made inside the block, so they are stored once.
    let both = async {
        tokio::try_join!(
            direction(
                splicer,
                way_from(client),
                client,
                upstream,
                &counters.client_to_upstream,
                &progress.client_to_upstream,
            ),
            async {
                match down_override {
                    // Zero-hop: upstream → client is the app's sends and their normal hop.
                    Some(down) => down.await,
                    None => {
                        direction(
                            splicer,
                            way_from(upstream),
                            upstream,
                            client,
                            &counters.upstream_to_client,
                            &progress.upstream_to_client,
                        )
                        .await
                    }
                }
            }
        )
    };
    tokio::select! {
        r = both => match r {
            Ok(_) => RelayEnd::Closed,
            Err(e) => RelayEnd::Reset(e.kind()),
        },
        e = watch_error(client) => RelayEnd::Reset(e.kind()),
        e = watch_error(upstream) => RelayEnd::Reset(e.kind()),
    }
}

/// A sleep on a path an idle tunnel never takes. Boxed: a timer inline would sit in
/// every idle tunnel's future (issue 9: an idle tunnel holds as little as possible).
async fn rare_sleep(d: Duration) {
    Box::pin(tokio::time::sleep(d)).await
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
            Ok(None) if seen_ready => rare_sleep(Duration::from_millis(50)).await,
            Ok(None) => {}
        }
        if let Err(e) = s.ready(Interest::ERROR).await {
            return e;
        }
        seen_ready = true;
    }
}

/// The verdict's state of a direction the daemon is about to finish: its bytes must all
/// have been redirected. A lookup that fails (the state is gone) or bytes the kernel
/// dropped mean the stream is not whole: the tunnel is reset, never closed cleanly.
fn final_state(splicer: &Splicer, way: &Way<'_>) -> io::Result<proxy_common::Direction> {
    let dir = verdict_state(splicer, way)?;
    // Every byte the kernel took from the source must have been redirected: a message
    // the parser handed on after the socket left the map is dropped by the kernel.
    let consumed = sys::consumed_position(way.from)?.saturating_sub(way.from_base);
    if consumed != dir.redirected {
        let lost = consumed.saturating_sub(dir.redirected + dir.dropped);
        way.counters.kernel_lost(lost);
        splicer.stats.kernel_dropped.fetch_add(lost, Relaxed);
        tracing::warn!(
            consumed,
            redirected = dir.redirected,
            "fast path: the kernel consumed tunnel bytes it did not redirect, resetting the tunnel"
        );
        return Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!(
                "the kernel consumed {consumed} bytes but redirected {}",
                dir.redirected
            ),
        ));
    }
    Ok(dir)
}

fn verdict_state(splicer: &Splicer, way: &Way<'_>) -> io::Result<proxy_common::Direction> {
    let Some(dir) = splicer.direction(way.from_cookie) else {
        tracing::warn!(
            cookie = way.from_cookie,
            "fast path: direction state missing from the kernel map, resetting the tunnel"
        );
        return Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "fast-path direction state lost",
        ));
    };
    if dir.dropped != 0 {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("the kernel dropped {} bytes of this direction", dir.dropped),
        ));
    }
    Ok(dir)
}

/// One direction: while spliced, sleeps until the source's EOF (then finishes it once
/// every redirected byte is in `to`'s stream) or until the verdict asks for a hand-off
/// (then takes it out of the kernel and relays it here). A direction out of the kernel
/// continues on the userspace path its progress names.
async fn direction(
    splicer: &Splicer,
    way: Option<&Way<'_>>,
    from: &TcpStream,
    to: &TcpStream,
    moved: &DirectionCounters,
    progress: &WayProgress,
) -> io::Result<()> {
    if let Some(way) = way.filter(|w| w.in_kernel.load(Relaxed)) {
        tokio::select! {
            r = wait_eof(from) => {
                r?;
                let dir = final_state(splicer, way)?;
                wait_delivered(to, way.to_base, dir.redirected).await?;
                way.leave_kernel(splicer, dir.redirected);
                socket::shutdown_write(to)?;
                progress.set_path(PathState::Closed);
                return Ok(());
            }
            _ = way.handoff.notified() => {}
        }
        splicer.unsplice_source(way.from_cookie);
        // A strparser pass still running on another CPU holds the socket lock; this
        // takes it too, so the verdict's count below is final.
        sys::stream_position(from)?;
        let dir = final_state(splicer, way)?;
        let handoff = splicer.accounting.handoff(way.slot);
        moved.handed_off(handoff);
        tracing::debug!(
            redirected = dir.redirected,
            budget = dir.budget,
            max_outstanding = dir.max_outstanding,
            reason = handoff,
            "fast path: direction handed over, relaying it in userspace"
        );
        wait_delivered(to, way.to_base, dir.redirected).await?;
        way.leave_kernel(splicer, dir.redirected);
        progress.set_path(if handoff == HANDOFF_DIRECTION_BUDGET {
            // Over its own budget: a bulk direction, where splice(2) is the fastest
            // relay measured here (docs/fastpath.md); its pipe exists only for it.
            PathState::Splice
        } else {
            // Handed over because the machine-wide limit was reached: under memory
            // pressure the copy relay holds least (no pipe buffer).
            PathState::Copy
        });
    }
    match progress.path() {
        PathState::Splice => Box::pin(super::splice::one_way(from, to, moved, progress)).await,
        PathState::Closed => Ok(()),
        // Never spliced (its source was refused by the map), or copied already.
        PathState::Copy | PathState::Start | PathState::Kernel => {
            Box::pin(super::copy::one_way(from, to, moved, progress)).await
        }
    }
}

/// Resolves at the spliced socket's EOF with nothing unparsed in front of it.
///
/// Watches without taking the socket's owner lock (see `sys::rdhup`): only once the FIN
/// is in, when no more data can come, does it `recv` to tell a FIN from a reset.
async fn wait_eof(from: &TcpStream) -> io::Result<()> {
    loop {
        if sys::rdhup(from)? {
            match sys::peek(from) {
                Ok(0) => return Ok(()),
                // The verdict never passes bytes to the socket itself, so they are the
                // parser's still: it has not reached the FIN yet.
                Ok(_) => rare_sleep(Duration::from_millis(1)).await,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    rare_sleep(Duration::from_millis(1)).await
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        } else {
            from.readable().await?;
            clear_readable(from);
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
        rare_sleep(delay).await;
        delay = (delay * 2).min(MAX_POLL);
    }
}

/// A parked tunnel that cannot get a task again (its sockets could not be registered
/// with an event loop): its kernel state goes as when a tunnel ends; the caller resets
/// its sockets, so no byte the kernel still held can look delivered.
pub fn abandon(splicer: &Splicer, progress: &Progress, counters: &TunnelCounters) {
    let ways = [&progress.client_to_upstream, &progress.upstream_to_client];
    for k in ways.iter().filter_map(|w| w.kernel()) {
        splicer.unsplice_source(k.cookie);
        splicer.live.forget(k.cookie);
        splicer.accounting.settle_all(k.slot);
        // The verdict's losses still reach the closing line and the totals.
        if let Some(dir) = splicer.direction(k.cookie) {
            counters.kernel_dropped.fetch_add(dir.dropped, Relaxed);
            splicer.stats.kernel_dropped.fetch_add(dir.dropped, Relaxed);
        }
        splicer.remove(k.cookie, Some(k.slot));
    }
    for c in progress.targets() {
        splicer.remove(c, None);
    }
}
