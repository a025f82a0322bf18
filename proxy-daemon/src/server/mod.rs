//! Worker threads: each runs its own single-threaded event loop with its own listening
//! socket on the same address (SO_REUSEPORT: the kernel spreads connections over them)
//! and its own upstream pool, so a request stays on one thread from the client socket to
//! the upstream socket and back, with no cross-thread wake-up and no lock
//! (docs/http-path.md).

pub mod connection;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::forward::{pool, Forwarder};
use crate::io::{tune, Keepalive};
use crate::limits::Capacity;
use crate::tunnel::Tunnels;

/// Listen backlog per worker socket.
const BACKLOG: i32 = 4096;

/// Everything the workers share, read-only (leaked: it lives as long as the process).
pub struct Shared {
    pub admission: Admission,
    pub forwarder: Forwarder,
    pub tunnels: Tunnels,
    pub capacity: &'static Capacity,
    pub max_head: usize,
    pub max_response_head: usize,
    pub header_read_timeout: Duration,
    pub keepalive: Option<Keepalive>,
    /// Client connection tasks (shutdown waits for them).
    pub connections: TaskTracker,
    /// Cancelled at SIGTERM: stop accepting, close idle connections, answer in-flight
    /// requests with `Connection: close`.
    pub stop_accepting: CancellationToken,
    /// The same, as a flag read once per request (cheaper than the token).
    pub draining: AtomicBool,
    /// Cancelled when the shutdown grace is over: connections still open are reset.
    pub force_close: CancellationToken,
}

/// One listening socket per worker, all on `addr`.
pub fn bind(addr: SocketAddr, workers: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    // SO_REUSEPORT would let a second daemon (same user) silently share the port with a
    // running one; a plain bind first finds out whether anything holds it.
    if addr.port() != 0 {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        probe.set_reuse_address(true)?;
        if let Err(e) = probe.bind(&addr.into()) {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                anyhow::bail!(
                    "listening on {addr}: the address is in use (another daemon? start with --takeover and --control-socket to replace it)"
                );
            }
            return Err(e).with_context(|| format!("listening on {addr}"));
        }
    }
    (0..workers)
        .map(|_| {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(BACKLOG)?;
            Ok(socket.into())
        })
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("listening on {addr}"))
}

/// Starts worker `index` on its own thread; it serves until `exit` is cancelled. Also
/// returns a handle to its event loop (tunnels adopted in a takeover run there).
pub fn spawn_worker(
    index: usize,
    listener: std::net::TcpListener,
    shared: &'static Shared,
    exit: CancellationToken,
) -> anyhow::Result<(std::thread::JoinHandle<()>, tokio::runtime::Handle)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // Log lines batched on this thread leave it when it goes idle.
        .on_thread_park(crate::logging::flush)
        .build()
        .context("starting a worker runtime")?;
    let handle = runtime.handle().clone();
    let thread = std::thread::Builder::new()
        .name(format!("worker-{index}"))
        .spawn(move || {
            crate::logging::batch_this_thread();
            let stats = crate::metrics::register_worker();
            runtime.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "worker cannot use its listening socket");
                        return;
                    }
                };
                let sweeper = tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        tick.tick().await;
                        pool::sweep();
                        // Proof of life for the systemd watchdog.
                        stats
                            .heartbeat
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
                accept_loop(&listener, shared).await;
                drop(listener);
                exit.cancelled().await;
                sweeper.abort();
                pool::clear();
            });
            crate::logging::flush();
        })
        .context("starting a worker thread")?;
    Ok((thread, handle))
}

async fn accept_loop(listener: &TcpListener, shared: &'static Shared) {
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shared.stop_accepting.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors beyond the budget (EMFILE, ENFILE) or a transient
                // error: back off briefly instead of spinning.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(error = %e, "accept failed");
                    last_warning = Some(tokio::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tune(&stream, shared.keepalive);
        // One descriptor for the client, one more free for its upstream connection.
        if let Some(fds) = shared.capacity.try_take(1, 1) {
            shared.connections.spawn(crate::panic::contained(
                b"connection",
                connection::serve(stream, fds, shared),
            ));
        } else if let Some(slot) = shared.capacity.try_overload() {
            if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(
                    in_use = shared.capacity.in_use(),
                    limit = shared.capacity.limit(),
                    "over capacity: answering new requests with 503 over_capacity"
                );
                last_warning = Some(tokio::time::Instant::now());
            }
            tokio::spawn(crate::panic::contained(
                b"connection",
                connection::serve_overloaded(stream, slot, shared),
            ));
        }
        // Else the reserve is spent too: the connection is closed unanswered.
    }
}
