//! Zero-hop tunnels: the app→client bytes of a tunnel go from the app's own `sendmsg`
//! straight into the client socket, without the loopback hop and the daemon.
//!
//! How a tunnel becomes zero-hop:
//!
//! 1. [`ZeroHop::connect_registered`] binds the upstream socket U to 127.0.0.1:0, registers
//!    that port P (`ZH_TUNNELS`, with the app's port), then connects. When the app
//!    accepts, the kernel's capture program (cgroup `sock_ops`, see `proxy-ebpf`) puts
//!    the app's socket A into `ZH_APPS` under P: from then on an `sk_msg` program runs in
//!    every `sendmsg` of A. Until the tunnel is paired it passes everything (the HTTP
//!    response goes the normal way, to hyper).
//! 2. After the 101 and the leftovers, [`Registration::pair`] puts the client socket D and
//!    U into `ZH_PEERS` and marks the tunnel paired. The program then redirects A's
//!    messages into D whenever D has room and every byte A sent the normal way has been
//!    relayed; otherwise the message takes the normal hop (A → loopback → U), where A's
//!    own send buffer gives the app real backpressure.
//! 3. [`app_to_client`] relays what arrives on U into D with `splice(2)`, marking the
//!    tunnel `RELAYING` from before it takes bytes out of U until all of them are in D:
//!    U's `copied_seq` and that mark are how the program knows the daemon has caught up.
//!    At U's EOF every byte before it is in D (redirects are synchronous), so D's write
//!    side is shut then.
//!
//! Blocking apps stay on the ordinary relay: the capture program takes a blocking app's
//! socket out of the maps at its first send (see `proxy-ebpf`), and `pair` then refuses.
//!
//! The client→app direction is not changed (the tunnel's ordinary relay carries it).
//! Dropping the [`Registration`] removes every map entry: the app's socket leaves
//! `ZH_APPS` and is an ordinary TCP socket again.
//!
//! Takeover: a zero-hop tunnel is switched back to the normal hop before it moves to the
//! successor ([`Registration::finish`]: from then on every send of the app takes the
//! normal hop, A → U); the relay of the normal hop keeps its pipe in the direction's
//! progress, so its bytes move with the tunnel and the successor continues it as an
//! ordinary splice(2) direction. No byte is lost or reordered: a redirect is only ever
//! decided while the normal hop is empty (and the relay not marked), and completes inside
//! the app's `sendmsg` before any later byte of the app can enter U.

mod cgroup;
mod loader;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use proxy_common::{
    ZeroHopStats, ZeroHopTunnel, ZH_APP_BLOCKING, ZH_APP_NONBLOCKING, ZH_CAPTURED, ZH_PAIRED,
    ZH_RELAYING,
};
use tokio::io::Interest;
use tokio::net::{TcpSocket, TcpStream};

use super::counters::{DataPath, DirectionCounters};
use super::ebpf::sys;
use super::handover::PathState;
use super::progress::WayProgress;
use super::socket;
use super::splice::splice;

pub use cgroup::v2_root;

/// Whether `--zero-hop auto` turns zero-hop on. The measurements in docs/zero-hop.md
/// decide it: off until zero-hop beats the relay it replaces for every kind of traffic
/// and app.
pub const AUTO: bool = false;

/// Why `auto` is what it is (the start-up line, `check`, `--help`).
pub const AUTO_REASON: &str = "auto: off, zero-hop did not beat direct as required (app-to-client 0.85-1.11x direct throughput at up to 1.25x its CPU, WebSocket echo p50 1.29-1.47x direct; docs/zero-hop.md)";

/// Bytes asked of one splice from the upstream socket.
const CHUNK: usize = 1 << 20;
/// The buffer of a burst copied for want of a pipe.
const COPY_BUFFER: usize = 64 * 1024;

/// `TCP_NOTSENT_LOWAT` the capture program gives each captured app socket A. While the
/// bytes take the normal hop, the app then gets EAGAIN as soon as 16 KiB wait unsent in A
/// (instead of a send buffer of up to 4 MiB), so it pauses and the normal hop can drain;
/// a redirect is allowed again only once it has. While redirecting, A holds nothing and
/// the setting changes nothing. An app that sets its own (after accept) keeps its own.
/// Measured (docs/zero-hop.md, A/B in one run): bytes of a 1 GiB download that took the
/// normal hop 0.7-20.8% → 0.0-1.3% (with NORMAL_HOP_RCVBUF).
pub const APP_NOTSENT_LOWAT: u32 = 16 * 1024;

/// Receive buffer of U once the tunnel is paired (the kernel doubles it: 256 KiB of
/// window). U is the normal hop's reservoir: with its default autotuning it takes
/// megabytes before A's send queue holds anything, and all of it must be relayed before
/// the next redirect.
const NORMAL_HOP_RCVBUF: usize = 128 * 1024;

/// The loaded zero-hop programs (one per daemon).
pub struct ZeroHop {
    maps: loader::Maps,
}

impl std::fmt::Debug for ZeroHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroHop")
            .field("cgroup", &self.maps.cgroup)
            .finish()
    }
}

impl ZeroHop {
    /// Loads the programs and attaches the capture program to the root of the cgroup v2
    /// hierarchy (see `cgroup`). `listen_port`: the daemon's port, whose accepted
    /// connections are the client sockets of tunnels.
    pub fn load(listen_port: u16) -> anyhow::Result<ZeroHop> {
        let root = v2_root()
            .context("no cgroup v2 hierarchy mounted here (needed to see the apps' sockets)")?;
        Self::load_at(&root, listen_port)
    }

    /// Same, attached to the given cgroup v2 directory (its processes and descendants).
    pub fn load_at(cgroup: &Path, listen_port: u16) -> anyhow::Result<ZeroHop> {
        Ok(ZeroHop {
            maps: loader::Maps::load(cgroup, listen_port)?,
        })
    }

    /// The cgroup the capture program is attached to.
    pub fn cgroup(&self) -> &Path {
        &self.maps.cgroup
    }

    /// Connects to the app on 127.0.0.1:`port` from a registered local port, so the
    /// kernel captures the app's end of this connection.
    pub async fn connect_registered(
        self: &Arc<Self>,
        port: u16,
    ) -> io::Result<(TcpStream, Registration)> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let registered = socket.local_addr()?.port();
        let registration = Registration {
            zero_hop: Arc::clone(self),
            port: registered,
            target_port: port,
            peers: Vec::new(),
            paired: None,
        };
        registration.register()?;
        let stream = socket
            .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .await?;
        Ok((stream, registration))
    }

    /// What the programs did so far for the tunnel registered on `port`.
    pub fn stats(&self, port: u16) -> Option<ZeroHopStats> {
        self.maps.stats.lock().unwrap().get(&(port as u32), 0).ok()
    }

    /// Registered tunnels still in the maps (for leak checks).
    pub fn tunnels_in_map(&self) -> usize {
        self.maps.tunnels.lock().unwrap().keys().count()
    }

    /// Sockets still in `ZH_APPS` and `ZH_PEERS` (for leak checks).
    pub fn sockets_in_map(&self) -> usize {
        self.maps.apps.lock().unwrap().keys().count()
            + self.maps.peers.lock().unwrap().keys().count()
    }
}

/// Why a registered tunnel stays on the ordinary relay.
#[derive(Debug)]
pub enum NotPaired {
    /// The app's socket was not captured: the app runs outside the cgroup, in another
    /// network namespace, or accepted over IPv6.
    NotCaptured,
    /// The app sent its first data from a blocking socket (docs/zero-hop.md).
    BlockingApp,
    /// The client half-closed before the tunnel started (such a socket cannot enter a
    /// sockmap).
    ClientClosed,
    /// The kernel program did not see one of the daemon's sockets being established (a
    /// client connection older than the `ZH_CLIENT_SOCKS` capacity).
    NotSeen,
    /// A map operation failed.
    Map(io::Error),
}

impl NotPaired {
    /// Short form for the tunnel's log line.
    pub fn as_str(&self) -> &'static str {
        match self {
            NotPaired::NotCaptured => "not captured",
            NotPaired::BlockingApp => "blocking app",
            NotPaired::ClientClosed => "client closed first",
            NotPaired::NotSeen => "socket not seen",
            NotPaired::Map(_) => "map error",
        }
    }
}

impl std::fmt::Display for NotPaired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotPaired::Map(e) => write!(f, "map error: {e}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// One registered upstream connection. Dropping it removes every map entry of the tunnel.
pub struct Registration {
    zero_hop: Arc<ZeroHop>,
    /// U's local port: the key of every map entry.
    port: u16,
    target_port: u16,
    /// Cookies put into `ZH_PEERS`.
    peers: Vec<u64>,
    /// The tunnel as written when paired (rewritten with `ZH_RELAYING` around relays).
    paired: Option<ZeroHopTunnel>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("port", &self.port)
            .field("target_port", &self.target_port)
            .finish()
    }
}

fn map_err(e: aya::maps::MapError) -> io::Error {
    match e {
        aya::maps::MapError::SyscallError(s) => s.io_error,
        other => io::Error::other(other.to_string()),
    }
}

impl Registration {
    fn key(&self) -> u32 {
        self.port as u32
    }

    fn register(&self) -> io::Result<()> {
        let maps = &self.zero_hop.maps;
        // Counters first: the capture program looks for them once it finds the tunnel.
        maps.stats
            .lock()
            .unwrap()
            .insert(self.key(), ZeroHopStats::default(), 0)
            .map_err(map_err)?;
        let tunnel = ZeroHopTunnel {
            target_port: self.target_port as u32,
            ..Default::default()
        };
        maps.tunnels
            .lock()
            .unwrap()
            .insert(self.key(), tunnel, 0)
            .map_err(map_err)
    }

    /// The registered (upstream socket's local) port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What the programs did so far.
    pub fn stats(&self) -> ZeroHopStats {
        self.zero_hop
            .maps
            .stats
            .lock()
            .unwrap()
            .get(&self.key(), 0)
            .unwrap_or_default()
    }

    /// Whether the kernel captured the app's socket (false when the app runs outside the
    /// cgroup, in another network namespace, or accepted over IPv6).
    pub fn captured(&self) -> bool {
        self.stats().flags & ZH_CAPTURED != 0
    }

    /// Turns redirects on. Call after the leftovers are written into `client` and with
    /// nothing else reading the upstream socket but [`app_to_client`]. When it cannot
    /// (see [`NotPaired`]) the tunnel stays on the ordinary relay.
    pub fn pair(&mut self, client: &TcpStream, upstream: &TcpStream) -> Result<(), NotPaired> {
        let maps = &self.zero_hop.maps;
        let stats = self.stats();
        if stats.flags & ZH_CAPTURED == 0 {
            return Err(NotPaired::NotCaptured);
        }
        if stats.flags & ZH_APP_BLOCKING != 0 {
            return Err(NotPaired::BlockingApp);
        }
        if stats.flags & ZH_APP_NONBLOCKING == 0 || stats.upstream_sk == 0 {
            // The app's 101 and our connect came first, so this cannot happen; stay on
            // the relay if it does.
            return Err(NotPaired::NotSeen);
        }
        let client_cookie = sys::cookie(client).map_err(NotPaired::Map)?;
        let client_sk = maps
            .client_socks
            .lock()
            .unwrap()
            .get(&client_cookie, 0)
            .map_err(|_| NotPaired::NotSeen)?;
        maps.peers
            .lock()
            .unwrap()
            .insert(client_cookie, client.as_raw_fd(), 0)
            .map_err(|e| match map_err(e) {
                // A socket that already received a FIN cannot enter a sockmap.
                e if e.raw_os_error() == Some(libc::EOPNOTSUPP) => NotPaired::ClientClosed,
                e => NotPaired::Map(e),
            })?;
        self.peers.push(client_cookie);
        // Keep the normal hop short (see NORMAL_HOP_RCVBUF). A failure costs only that.
        if let Err(e) = socket2::SockRef::from(upstream).set_recv_buffer_size(NORMAL_HOP_RCVBUF) {
            tracing::debug!(error = %e, "zero-hop: could not size the upstream receive buffer");
        }
        let tunnel = ZeroHopTunnel {
            client: client_cookie,
            client_sk,
            target_port: self.target_port as u32,
            flags: ZH_PAIRED,
        };
        maps.tunnels
            .lock()
            .unwrap()
            .insert(self.key(), tunnel, 0)
            .map_err(|e| NotPaired::Map(map_err(e)))?;
        self.paired = Some(tunnel);
        Ok(())
    }

    /// Marks (or clears) the daemon's relay in progress: set before bytes are taken out
    /// of U, cleared once every one of them is in D. The map update is an element swap,
    /// complete when the call returns, so it is ordered before the splice that follows.
    fn set_relaying(&self, on: bool) -> io::Result<()> {
        let Some(mut tunnel) = self.paired else {
            return Ok(());
        };
        if on {
            tunnel.flags |= ZH_RELAYING;
        }
        self.zero_hop
            .maps
            .tunnels
            .lock()
            .unwrap()
            .insert(self.key(), tunnel, 0)
            .map_err(map_err)
    }

    /// Whether [`Registration::pair`] succeeded.
    pub fn paired(&self) -> bool {
        self.paired.is_some()
    }

    /// Takes the app's socket out of `ZH_APPS` (it becomes an ordinary TCP socket).
    pub fn release_app(&self) {
        let _ = self.zero_hop.maps.apps.lock().unwrap().remove(&self.key());
    }

    /// Ends zero-hop for this tunnel: the program passes every message from now on (the
    /// app's bytes take the normal hop), then the entries go. Returns what the programs
    /// did (a redirect decided a moment before, still completing in the app's `sendmsg`,
    /// may be missing from the count; never from the stream).
    pub fn finish(self) -> ZeroHopStats {
        self.stop_redirects();
        let stats = self.stats();
        drop(self);
        stats
    }

    fn stop_redirects(&self) {
        let _ = self
            .zero_hop
            .maps
            .tunnels
            .lock()
            .unwrap()
            .remove(&self.key());
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let maps = &self.zero_hop.maps;
        // The tunnel first: from here on the program passes everything, so nothing is
        // redirected to a socket that is leaving the maps.
        self.stop_redirects();
        self.release_app();
        for cookie in &self.peers {
            let _ = maps.peers.lock().unwrap().remove(cookie);
        }
        let _ = maps.stats.lock().unwrap().remove(&self.key());
    }
}

/// The normal hop of the app→client direction: splices what arrives on U into D, with
/// the tunnel marked `RELAYING` from before anything leaves U until all of it is in D.
/// Shuts D's write side at U's EOF. The pipe and its bytes live in `progress` (a
/// takeover may stop this at any await point and hand them over as held bytes).
pub async fn app_to_client(
    registration: &Registration,
    upstream: &TcpStream,
    client: &TcpStream,
    moved: &DirectionCounters,
    progress: &WayProgress,
) -> io::Result<()> {
    progress.set_path(PathState::Splice);
    loop {
        upstream.readable().await?;
        registration.set_relaying(true)?;
        let burst = splice_burst(upstream, client, moved, progress).await;
        // Every byte taken out of U is in D now (or the tunnel is failing anyway).
        registration.set_relaying(false)?;
        if burst? {
            socket::shutdown_write(client)?;
            progress.set_path(PathState::Closed);
            return Ok(());
        }
    }
}

/// The normal hop without a pipe: copies from U into D until U has nothing more for
/// now; true at U's EOF. Bytes read are held in `progress` until written (a takeover
/// hands them over).
async fn copy_burst(
    upstream: &TcpStream,
    client: &TcpStream,
    moved: &DirectionCounters,
    progress: &WayProgress,
) -> io::Result<bool> {
    moved.use_path(DataPath::Copy);
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        match upstream.try_read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => {
                progress.hold(buf, n);
                buf = progress.write_held(client, moved).await?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Splices from U into D until U has nothing more for now; true at U's EOF.
async fn splice_burst(
    upstream: &TcpStream,
    client: &TcpStream,
    moved: &DirectionCounters,
    progress: &WayProgress,
) -> io::Result<bool> {
    // U's readiness can be stale (left over from the HTTP exchange, or spurious): look
    // before the pipe is created, so a tunnel that stays zero-hop (or idle) never holds
    // one. Its two descriptors are not in the capacity budget: with a pipe per idle
    // tunnel, 7,500 tunnels ran the daemon out of descriptors in `accept`.
    let has_bytes = upstream.try_io(Interest::READABLE, || {
        if socket::readable_now(upstream)? {
            Ok(())
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    });
    match has_bytes {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
        Err(e) => return Err(e),
    }
    loop {
        // Created on the first passed byte: a tunnel that stays zero-hop holds no pipe.
        let (pipe_read, pipe_write) = match progress.pipe_forced() {
            Ok(fds) => fds,
            // Out of descriptors or pipe memory: this burst moves through a buffer (the
            // pipe did not exist, so no byte is in one; order holds).
            Err(e) => {
                tracing::warn!(error = %e, "zero-hop: the normal hop cannot get a pipe, copying instead");
                return copy_burst(upstream, client, moved, progress).await;
            }
        };
        match upstream.try_io(Interest::READABLE, || {
            splice(upstream.as_raw_fd(), pipe_write, CHUNK)
        }) {
            Ok(0) => return Ok(true),
            Ok(n) => progress.filled(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        super::splice::drain_pipe(pipe_read, client, moved, progress).await?;
    }
}
