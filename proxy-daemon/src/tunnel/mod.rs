//! Tunnels: after a successful upgrade the client and upstream sockets become one raw byte
//! stream each way. This module owns their lifecycle (leftover bytes first, then a relay,
//! then close/reset, one log line each at open and close); the relays move the bytes.

pub mod copy;
pub mod counters;
pub mod ebpf;
pub mod handover;
pub mod registry;
pub mod socket;
pub mod splice;

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use counters::{DataPath, DirectionCounters, DirectionSnapshot, TunnelCounters};
pub use registry::{Registry, TunnelSnapshot};

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

/// How a relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions saw EOF and passed it on after their last byte.
    Closed,
    /// One side failed (reset, timeout), or bytes were lost: the other is reset too.
    Reset(io::ErrorKind),
    /// The shutdown grace period ended first: both sides are reset (never closed as if
    /// the stream were complete).
    Shutdown,
}

impl RelayEnd {
    fn name(&self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::Reset(_) => "reset",
            RelayEnd::Shutdown => "shutdown",
        }
    }
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

    pub fn splicer(&self) -> Option<&Arc<ebpf::Splicer>> {
        match self {
            Relay::Ebpf(s) => Some(s),
            _ => None,
        }
    }
}

/// The tunnel and fast-path metrics, read at scrape time from the registry and the maps.
impl crate::metrics::Source for Tunnels {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use crate::metrics::{counter, gauge};
        use prometheus_client::encoding::NoLabelSet;
        use prometheus_client::metrics::MetricType;

        let live = self.registry.snapshot();
        gauge(encoder, "tunnels", "Open tunnels", live.len() as i64)?;
        let mut paths: std::collections::BTreeMap<(&str, &str), i64> = Default::default();
        for t in &live {
            *paths
                .entry(("client_to_upstream", t.client_to_upstream.path))
                .or_default() += 1;
            *paths
                .entry(("upstream_to_client", t.upstream_to_client.path))
                .or_default() += 1;
        }
        let mut m = encoder.encode_descriptor(
            "tunnel_directions",
            "Directions of open tunnels by the data paths they have used (kernel, splice, copy; kernel+splice: handed over)",
            None,
            MetricType::Gauge,
        )?;
        for ((direction, path), n) in paths {
            m.encode_family(&[("direction", direction), ("path", path)])?
                .encode_gauge(&n)?;
        }
        let bytes = self.registry.bytes();
        let mut m = encoder.encode_descriptor(
            "tunnel_bytes",
            "Tunnel bytes delivered since start-up, by direction and data path (kernel bytes read from the eBPF maps)",
            None,
            MetricType::Counter,
        )?;
        for (direction, b) in [
            ("client_to_upstream", bytes.client_to_upstream),
            ("upstream_to_client", bytes.upstream_to_client),
        ] {
            for (path, n) in [("kernel", b.kernel), ("splice", b.splice), ("copy", b.copy)] {
                m.encode_family(&[("direction", direction), ("path", path)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        let Some(splicer) = self.relay.splicer() else {
            return Ok(());
        };
        let st = &splicer.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut m = encoder.encode_descriptor(
            "fastpath_handoffs",
            "Directions the kernel handed to the daemon (over their own budget, or the machine-wide memory limit)",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in [
            ("direction_budget", load(&st.handoffs_direction_budget)),
            ("memory_limit", load(&st.handoffs_memory_limit)),
        ] {
            m.encode_family(&[("reason", reason)])?
                .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
        counter(
            encoder,
            "fastpath_handoffs_found_by_scan",
            "Hand-offs whose event was lost to a full ring, found in the ledger",
            load(&st.handoffs_found_by_scan),
        )?;
        counter(
            encoder,
            "fastpath_dropped_bytes",
            "Tunnel bytes the kernel lost (must stay 0; such a tunnel is reset)",
            load(&st.kernel_dropped),
        )?;
        counter(
            encoder,
            "fastpath_misparsed",
            "Messages the stream parser could not place (must stay 0)",
            load(&st.kernel_misparsed),
        )?;
        counter(
            encoder,
            "fastpath_directions_lost",
            "Directions whose kernel state was missing (the tunnel was reset)",
            load(&st.directions_lost),
        )?;
        counter(
            encoder,
            "fastpath_maps_full",
            "Tunnels relayed in userspace because the maps were full",
            load(&st.maps_full),
        )?;
        counter(
            encoder,
            "fastpath_events_missed",
            "Over-budget events lost to a full ring buffer",
            splicer.events_missed(),
        )?;
        let (queued, peak) = splicer.kernel_queued();
        gauge(
            encoder,
            "fastpath_queued_bytes",
            "Bytes queued in the kernel now over every direction (memory no socket is charged for)",
            queued as i64,
        )?;
        gauge(
            encoder,
            "fastpath_queued_bytes_peak",
            "Most bytes queued in the kernel at once since start-up",
            peak as i64,
        )?;
        gauge(
            encoder,
            "fastpath_memory_limit_bytes",
            "Machine-wide limit on bytes queued in the kernel (0: none)",
            splicer.settings.memory_limit as i64,
        )?;
        gauge(
            encoder,
            "fastpath_directions_in_kernel",
            "Directions the kernel splices now",
            splicer.directions_in_kernel() as i64,
        )?;
        gauge(
            encoder,
            "fastpath_map_sockets",
            "Entries in the socket maps (SOCKS + TARGETS)",
            splicer.sockets_in_map() as i64,
        )?;
        Ok(())
    }
}

impl crate::admin::TunnelList for Tunnels {
    fn json(&self) -> String {
        serde_json::to_string(&self.registry.snapshot()).unwrap_or_else(|_| "[]".into())
    }
}

/// Runs and tracks every tunnel, so shutdown can close them and wait for them.
#[derive(Clone)]
pub struct Tunnels {
    relay: Relay,
    registry: Arc<Registry>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Tunnels {
    pub fn new(relay: Relay) -> Self {
        Tunnels {
            registry: Arc::new(Registry::new(relay.splicer().cloned())),
            relay,
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        }
    }

    pub fn relay(&self) -> Relay {
        self.relay.clone()
    }

    /// The live tunnels and their counters.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Runs a tunnel; `hold` (its descriptors in the capacity budget) lives as long as it.
    /// A panic inside is contained to it and logged with its request id.
    pub fn start(&self, tunnel: Tunnel, hold: impl Send + 'static) {
        let relay = self.relay.clone();
        let registry = self.registry.clone();
        let shutdown = self.shutdown.clone();
        let label = format!("tunnel {}", tunnel.request_id);
        self.tracker
            .spawn(crate::panic::contained(label.as_bytes(), async move {
                let _hold = hold;
                run(tunnel, relay, &registry, &shutdown).await;
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

    /// Closes every tunnel now (each with a reset and its closing line).
    pub async fn close_all(&self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

async fn run(tunnel: Tunnel, relay: Relay, registry: &Registry, shutdown: &CancellationToken) {
    let Tunnel {
        request_id,
        port,
        client,
        client_leftover,
        upstream,
        upstream_leftover,
    } = tunnel;
    let live = registry.open(request_id, port);
    tracing::info!(
        request_id = %live.request_id,
        tunnel_id = live.id,
        port,
        relay = relay.name(),
        // Bytes hyper read past the upgrade: relayed by the daemon before anything else.
        client_leftover = client_leftover.len(),
        upstream_leftover = upstream_leftover.len(),
        "tunnel opened"
    );
    let counters = &live.counters;
    let relayed = async {
        let leftovers = (client_leftover, upstream_leftover);
        if let Err(e) =
            forward_leftovers(&client, &leftovers.0, &upstream, &leftovers.1, counters).await
        {
            return RelayEnd::Reset(e.kind());
        }
        // Written: an idle tunnel keeps no buffer.
        drop(leftovers);
        match &relay {
            Relay::Copy => copy::relay(&client, &upstream, counters).await,
            Relay::Splice => splice::relay(&client, &upstream, counters).await,
            Relay::Ebpf(splicer) => ebpf::relay(splicer, &client, &upstream, counters).await,
        }
    };
    // Dropping the relay on shutdown settles its kernel state and counts first.
    let end = tokio::select! {
        end = relayed => end,
        _ = shutdown.cancelled() => RelayEnd::Shutdown,
    };
    if end != RelayEnd::Closed {
        // Propagate the failure: close both with RST rather than a clean FIN.
        socket::reset_on_close(&client);
        socket::reset_on_close(&upstream);
    }
    let ended = registry.close(&live);
    let (up, down) = (&ended.client_to_upstream, &ended.upstream_to_client);
    let dropped = counters.kernel_dropped.load(Ordering::Relaxed)
        + counters.client_to_upstream.lost()
        + counters.upstream_to_client.lost();
    let misparsed = counters.kernel_misparsed.load(Ordering::Relaxed);
    if dropped != 0 || misparsed != 0 {
        tracing::warn!(
            request_id = %live.request_id,
            tunnel_id = live.id,
            kernel_dropped = dropped,
            kernel_misparsed = misparsed,
            "fast path: the kernel lost or misparsed tunnel bytes"
        );
    }
    tracing::info!(
        request_id = %live.request_id,
        tunnel_id = live.id,
        port,
        relay = relay.name(),
        client_to_upstream = up.bytes,
        upstream_to_client = down.bytes,
        client_to_upstream_path = up.path,
        upstream_to_client_path = down.path,
        client_to_upstream_kernel = up.kernel,
        upstream_to_client_kernel = down.kernel,
        client_to_upstream_handoff = up.handoff,
        upstream_to_client_handoff = down.handoff,
        // Both directions' kernel bytes (kept for older readers of this line).
        in_kernel = up.kernel + down.kernel,
        kernel_queue_peak = counters.kernel_queue_peak.load(Ordering::Relaxed),
        kernel_dropped = dropped,
        kernel_misparsed = misparsed,
        duration_ms = live.started.elapsed().as_secs_f64() * 1e3,
        end = end.name(),
        error = match &end {
            RelayEnd::Reset(kind) => Some(format!("{kind:?}")),
            _ => None,
        },
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
            .copied(client_leftover.len() as u64);
        Ok::<_, io::Error>(())
    };
    let to_client = async {
        socket::write_all(client, upstream_leftover).await?;
        counters
            .upstream_to_client
            .copied(upstream_leftover.len() as u64);
        Ok::<_, io::Error>(())
    };
    tokio::try_join!(to_upstream, to_client).map(|_| ())
}
