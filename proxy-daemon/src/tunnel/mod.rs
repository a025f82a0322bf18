//! Tunnels: after a successful upgrade the client and upstream sockets become one raw byte
//! stream each way. This module owns their lifecycle (leftover bytes first, then a relay,
//! then close/reset, one log line each at open and close); the relays move the bytes,
//! recording in `progress` where each direction stands, so that a takeover can pause a
//! tunnel anywhere and move it to the successor process (`transfer`).

pub mod copy;
pub mod counters;
pub mod ebpf;
pub mod handover;
mod park;
pub mod progress;
pub mod registry;
pub mod socket;
pub mod splice;
pub mod transfer;
pub mod zero_hop;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use counters::{DataPath, DirectionCounters, DirectionSnapshot, TunnelCounters};
use handover::PathState;
use progress::{Progress, WayProgress};
use registry::LiveTunnel;
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
    /// Set when the upstream connection was registered for zero-hop.
    pub zero_hop: Option<zero_hop::Registration>,
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
    /// Not an end: both directions are in the kernel and the tunnel can wait without a
    /// task (`park`) until one of them ends or is handed over.
    Parked,
}

impl RelayEnd {
    fn name(&self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::Reset(_) => "reset",
            RelayEnd::Shutdown => "shutdown",
            RelayEnd::Parked => "parked",
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
        gauge(
            encoder,
            "tunnels_parked",
            "Open tunnels spliced in the kernel both ways and waiting without a task (docs/fastpath.md, Parked tunnels)",
            self.parked() as i64,
        )?;
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
            "Directions of open tunnels by the data paths they have used (kernel, splice, copy, zero-hop; kernel+splice: handed over)",
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
            "Tunnel bytes delivered since start-up, by direction and data path (kernel and zero-hop bytes read from the eBPF maps)",
            None,
            MetricType::Counter,
        )?;
        for (direction, b) in [
            ("client_to_upstream", bytes.client_to_upstream),
            ("upstream_to_client", bytes.upstream_to_client),
        ] {
            let by_path = [
                ("kernel", b.kernel),
                ("splice", b.splice),
                ("copy", b.copy),
                ("zero-hop", b.zero_hop),
            ];
            for (path, n) in by_path {
                m.encode_family(&[("direction", direction), ("path", path)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        if let Some(zh) = &self.zero_hop {
            gauge(
                encoder,
                "zero_hop_tunnels_in_map",
                "Tunnels registered in zero-hop's maps",
                zh.tunnels_in_map() as i64,
            )?;
            gauge(
                encoder,
                "zero_hop_map_sockets",
                "Sockets in zero-hop's maps (apps' and clients')",
                zh.sockets_in_map() as i64,
            )?;
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
            "fastpath_unsplices_from_user_space",
            "Hand-offs whose socket left the kernel's map by a removal from user space, which can race a stream-parser pass (must stay 0 while the unsplice iterator loads)",
            load(&st.unsplices_from_user_space),
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
    /// Zero-hop's programs, when it is on (docs/zero-hop.md).
    zero_hop: Option<Arc<zero_hop::ZeroHop>>,
    registry: Arc<Registry>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Cancelled when every tunnel must stop where it stands and move to a successor
    /// process (`transfer`).
    pause: CancellationToken,
    /// While a takeover runs: where paused tunnels, and tunnels started from then on,
    /// go to be sent to the successor.
    outgoing: Arc<Mutex<Option<mpsc::UnboundedSender<transfer::Outgoing>>>>,
    /// Where kernel-spliced tunnels wait without a task (with the fast path only; set
    /// once at start-up).
    parker: Arc<OnceLock<Arc<park::Parker>>>,
}

impl Tunnels {
    /// Within a tokio runtime when `relay` is the fast path (its parked tunnels are
    /// watched by a task of that runtime).
    pub fn new(relay: Relay, zero_hop: Option<Arc<zero_hop::ZeroHop>>) -> Self {
        let tunnels = Tunnels {
            registry: Arc::new(Registry::new(relay.splicer().cloned(), zero_hop.clone())),
            relay,
            zero_hop,
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            pause: CancellationToken::new(),
            outgoing: Arc::new(Mutex::new(None)),
            parker: Arc::new(OnceLock::new()),
        };
        if let Some(splicer) = tunnels.relay.splicer() {
            match park::Parker::start(splicer.clone(), &tunnels) {
                Ok(parker) => {
                    let _ = tunnels.parker.set(parker);
                }
                // Tunnels keep their tasks: correct, only heavier.
                Err(e) => tracing::warn!(error = %e, "idle tunnels cannot be parked"),
            }
        }
        tunnels
    }

    /// Tunnels parked now (kernel-spliced both ways, waiting without a task).
    pub fn parked(&self) -> usize {
        self.parker.get().map_or(0, |p| p.len())
    }

    pub fn relay(&self) -> Relay {
        self.relay.clone()
    }

    /// Zero-hop's programs, when it is on.
    pub fn zero_hop(&self) -> Option<&Arc<zero_hop::ZeroHop>> {
        self.zero_hop.as_ref()
    }

    /// The live tunnels and their counters.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Runs a tunnel; `hold` (its descriptors in the capacity budget) lives as long as it.
    /// A panic inside is contained to it and logged with its request id. During a
    /// takeover the tunnel goes straight to the successor instead.
    pub fn start(&self, tunnel: Tunnel, hold: crate::limits::Fds) {
        let outgoing = self.outgoing.lock().unwrap().clone();
        if let Some(outgoing) = outgoing {
            transfer::send_straight_on(tunnel, &outgoing);
            return;
        }
        let tunnels = self.clone();
        let label = format!("tunnel {}", tunnel.request_id);
        self.tracker
            .spawn(crate::panic::contained(label.as_bytes(), async move {
                let Tunnel {
                    request_id,
                    port,
                    client,
                    client_leftover,
                    upstream,
                    upstream_leftover,
                    zero_hop,
                } = tunnel;
                let live = tunnels.registry.open(request_id, port);
                tracing::info!(
                    request_id = %live.request_id,
                    tunnel_id = live.id,
                    port,
                    relay = tunnels.relay.name(),
                    // Bytes hyper read past the upgrade: relayed by the daemon before
                    // anything else.
                    client_leftover = client_leftover.len(),
                    upstream_leftover = upstream_leftover.len(),
                    "tunnel opened"
                );
                let progress = Progress::new(client_leftover.into(), upstream_leftover.into());
                run(
                    &tunnels,
                    Running {
                        live,
                        client,
                        upstream,
                        progress,
                        takeovers: 0,
                        start: Start::New,
                        zero_hop,
                        hold,
                    },
                )
                .await;
            }));
    }

    /// Number of tunnels still open.
    pub fn open(&self) -> usize {
        self.tracker.len()
    }

    /// Waits until every tunnel has ended by itself (or moved to a successor).
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

/// A tunnel about to run.
struct Running {
    live: Arc<LiveTunnel>,
    client: TcpStream,
    upstream: TcpStream,
    progress: Progress,
    /// Takeovers it has gone through so far.
    takeovers: u32,
    start: Start,
    /// Its upstream connection's zero-hop registration (a new tunnel with zero-hop on).
    zero_hop: Option<zero_hop::Registration>,
    /// Its descriptors in the capacity budget.
    hold: crate::limits::Fds,
}

/// How a tunnel's relay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// A new tunnel: the held leftovers first, then its relay.
    New,
    /// Adopted from the daemon taken over: each direction where it stood there.
    Adopted,
    /// Woken from the parker: each direction where it stood when it parked.
    Unparked { zero_hop_state: &'static str },
}

/// Runs a tunnel until it ends (its closing line), or until a takeover pauses it (it
/// moves to the successor, which logs its closing line one day).
async fn run(tunnels: &Tunnels, r: Running) {
    let Running {
        mut live,
        mut client,
        mut upstream,
        mut progress,
        takeovers,
        mut start,
        zero_hop,
        mut hold,
    } = r;
    let relay = &tunnels.relay;
    let parker = tunnels.parker.get();
    // Outside the relay's future, so that whatever ends the tunnel (its end, a
    // shutdown, a takeover) switches zero-hop off first (`end_zero_hop`).
    let mut zero_hop = zero_hop;
    let mut zero_hop_state = match start {
        Start::Unparked { zero_hop_state } => zero_hop_state,
        _ if zero_hop.is_some() => "registered",
        // Adopted: the daemon taken over switched it back to the normal hop.
        _ if live.counters.upstream_to_client.used_zero_hop() => "ended by takeover",
        _ => "off",
    };
    let end = loop {
        let mut relayed = relay_future(
            tunnels,
            &client,
            &upstream,
            &live.counters,
            &progress,
            start,
            ZeroHopStart {
                registration: &mut zero_hop,
                state: &mut zero_hop_state,
            },
        );
        let end = tokio::select! {
            // First: a tunnel paused for a takeover must not start anything new.
            biased;
            _ = tunnels.pause.cancelled() => None,
            end = &mut relayed => Some(end),
            _ = tunnels.shutdown.cancelled() => Some(RelayEnd::Shutdown),
        };
        if end.is_none() {
            // Paused: from here on its fast-path entries belong to the successor, so
            // dropping the relay leaves them in the maps.
            progress.start_handing_over();
        }
        // Dropping the relay (on shutdown) settles its kernel state and counts first;
        // paused or parked, it leaves the kernel state as it is.
        drop(relayed);
        if end != Some(RelayEnd::Parked) {
            break end;
        }
        // Both directions are in the kernel: wait without a task until something
        // happens to them (`park`).
        let Some(parker) = parker else {
            unreachable!("a relay parks only when there is a parker")
        };
        let parked = park::Parked {
            client,
            upstream,
            tunnel: park::Waiting {
                live,
                progress: Box::new(progress),
                takeovers,
                hold,
                zero_hop: zero_hop.take(),
                zero_hop_state,
                worker: tokio::runtime::Handle::current(),
            },
        };
        let Err(back) = parker.park(parked, tunnels) else {
            return;
        };
        // It could not wait there (a hand-off came first, a takeover began): this task
        // continues it.
        let t = back.tunnel;
        (client, upstream) = (back.client, back.upstream);
        (live, progress, hold, zero_hop) = (t.live, *t.progress, t.hold, t.zero_hop);
        start = Start::Unparked { zero_hop_state };
    };
    let counters = &live.counters;
    let Some(end) = end else {
        // Stopped at an await point: `progress` says where each direction stands. The
        // fast-path entries stay in the maps for the successor; this process stops
        // watching them (a relay that ran did already).
        if let Some(splicer) = relay.splicer() {
            ebpf::stop_watching(splicer, &progress);
        }
        // A zero-hop tunnel goes back to the normal hop first: the successor relays
        // it as an ordinary splice(2) direction (docs/zero-hop.md, Takeover).
        end_zero_hop(zero_hop, counters);
        transfer::hand_over(tunnels, &live, client, upstream, &progress, takeovers);
        return;
    };
    end_zero_hop(zero_hop, counters);
    if end != RelayEnd::Closed {
        // Propagate the failure: close both with RST rather than a clean FIN.
        socket::reset_on_close(&client);
        socket::reset_on_close(&upstream);
    }
    log_closed(
        &tunnels.registry,
        &live,
        relay,
        &end,
        takeovers,
        zero_hop_state,
    );
}

/// A new tunnel's zero-hop registration (if any) and the word its closing line gives.
struct ZeroHopStart<'a> {
    registration: &'a mut Option<zero_hop::Registration>,
    state: &'a mut &'static str,
}

/// The tunnel's relay, boxed on its own: the task keeps only a pointer, and the box
/// holds the one data path this tunnel runs, not the largest of them.
fn relay_future<'a>(
    tunnels: &'a Tunnels,
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    counters: &'a TunnelCounters,
    progress: &'a Progress,
    start: Start,
    zero_hop: ZeroHopStart<'a>,
) -> Pin<Box<dyn Future<Output = RelayEnd> + Send + 'a>> {
    let relay = &tunnels.relay;
    // A relay may park the tunnel only where a parker waits for it.
    let park = tunnels.parker.get().is_some();
    let how = match start {
        Start::New => None,
        Start::Adopted => Some(ebpf::Resume::Adopted { park }),
        Start::Unparked { .. } => Some(ebpf::Resume::Unparked),
    };
    if let Some(how) = how {
        // A paired zero-hop tunnel woken from the parker continues as one.
        if let Some(registration) = zero_hop.registration.as_ref().filter(|r| r.paired()) {
            return Box::pin(relay_zero_hop(
                relay,
                registration,
                client,
                upstream,
                counters,
                progress,
                ZeroHopRelay::Resume(how),
            ));
        }
        return Box::pin(resume_relay(
            relay, client, upstream, counters, progress, how,
        ));
    }
    // The bytes hyper read past the upgrade go first, then the relay starts (boxed
    // apart: the leftovers' state is not kept for the tunnel's life).
    Box::pin(async move {
        if let Err(e) = forward_leftovers(client, upstream, counters, progress).await {
            return RelayEnd::Reset(e.kind());
        }
        // The leftovers are in the client socket: redirects may start.
        if let Some(registration) = pair(zero_hop.registration, client, upstream, zero_hop.state) {
            counters
                .upstream_to_client
                .enter_zero_hop(registration.port());
            let relay = Box::pin(relay_zero_hop(
                relay,
                registration,
                client,
                upstream,
                counters,
                progress,
                ZeroHopRelay::Start { park },
            ));
            return relay.await;
        }
        let relay: Pin<Box<dyn Future<Output = RelayEnd> + Send + 'a>> = match relay {
            Relay::Copy => Box::pin(copy::relay(client, upstream, counters, progress)),
            Relay::Splice => Box::pin(splice::relay(client, upstream, counters, progress)),
            Relay::Ebpf(splicer) => Box::pin(ebpf::relay(
                splicer, client, upstream, counters, progress, park,
            )),
        };
        relay.await
    })
}

/// Removes an ended tunnel from the registry and logs its closing line.
fn log_closed(
    registry: &Registry,
    live: &LiveTunnel,
    relay: &Relay,
    end: &RelayEnd,
    takeovers: u32,
    zero_hop: &str,
) {
    let counters = &live.counters;
    let ended = registry.close(live);
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
        port = live.port,
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
        // Since the tunnel opened, in whichever process (bytes too).
        duration_ms = live.started.elapsed().as_secs_f64() * 1e3,
        takeovers,
        // "paired", "off", or why a registered tunnel stayed on the relay.
        zero_hop,
        // Of upstream_to_client, bytes the app's own sends put into the client socket.
        zero_hop_bytes = down.zero_hop,
        end = end.name(),
        error = match end {
            RelayEnd::Reset(kind) => Some(format!("{kind:?}")),
            _ => None,
        },
        "tunnel closed"
    );
}

/// Turns redirects on for a captured tunnel (after its leftovers are written). None when
/// it stays on the ordinary relay: then its registration goes at once (the app's socket
/// leaves the maps) and `state` says why.
fn pair<'a>(
    registration: &'a mut Option<zero_hop::Registration>,
    client: &TcpStream,
    upstream: &TcpStream,
    state: &mut &'static str,
) -> Option<&'a zero_hop::Registration> {
    let r = registration.as_mut()?;
    match r.pair(client, upstream) {
        Ok(()) => {
            *state = "paired";
            registration.as_ref()
        }
        Err(e) => {
            *state = e.as_str();
            if let zero_hop::NotPaired::Map(e) = &e {
                tracing::warn!(error = %e, "zero-hop: map operation failed, relaying as usual");
            }
            *registration = None;
            None
        }
    }
}

/// How a paired zero-hop tunnel's relay starts.
enum ZeroHopRelay {
    /// Just paired; `park` as in [`ebpf::relay`].
    Start { park: bool },
    /// Woken from the parker.
    Resume(ebpf::Resume),
}

/// A paired zero-hop tunnel: app → client is the kernel's redirects plus
/// [`zero_hop::app_to_client`] for what takes the normal hop; client → app uses the
/// configured relay for that direction alone.
async fn relay_zero_hop(
    relay: &Relay,
    registration: &zero_hop::Registration,
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &TunnelCounters,
    progress: &Progress,
    how: ZeroHopRelay,
) -> RelayEnd {
    // From here on app → client continues as a splice(2) relay wherever it stops (a
    // takeover hands it over on that path).
    progress.upstream_to_client.set_path(PathState::Splice);
    let down = zero_hop::app_to_client(
        registration,
        upstream,
        client,
        &counters.upstream_to_client,
        &progress.upstream_to_client,
    );
    let (up, up_progress) = (&counters.client_to_upstream, &progress.client_to_upstream);
    let both = match relay {
        Relay::Ebpf(splicer) => {
            return match how {
                ZeroHopRelay::Start { park } => {
                    ebpf::relay_up(splicer, client, upstream, counters, progress, down, park).await
                }
                ZeroHopRelay::Resume(how) => {
                    ebpf::resume_up(splicer, client, upstream, counters, progress, how, down).await
                }
            };
        }
        Relay::Copy => tokio::try_join!(copy::one_way(client, upstream, up, up_progress), down),
        Relay::Splice => {
            tokio::try_join!(splice::one_way(client, upstream, up, up_progress), down)
        }
    };
    match both {
        Ok(_) => RelayEnd::Closed,
        Err(e) => RelayEnd::Reset(e.kind()),
    }
}

/// Switches zero-hop off for a tunnel whose relay stopped (it ended, or it pauses for a
/// takeover): no redirect after this, and the bytes the app's sends put into the client
/// socket join the direction's counters.
fn end_zero_hop(registration: Option<zero_hop::Registration>, counters: &TunnelCounters) {
    let Some(registration) = registration else {
        return;
    };
    let paired = registration.paired();
    let stats = registration.finish();
    if paired {
        counters
            .upstream_to_client
            .leave_zero_hop(stats.redirected_bytes);
        tracing::debug!(?stats, "zero-hop counters");
    }
}

/// Continues an adopted tunnel's directions, each on the path it was on.
async fn resume_relay(
    relay: &Relay,
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &TunnelCounters,
    progress: &Progress,
    how: ebpf::Resume,
) -> RelayEnd {
    if let Relay::Ebpf(splicer) = relay {
        return ebpf::resume(splicer, client, upstream, counters, progress, how).await;
    }
    let up = continue_way(
        client,
        upstream,
        &counters.client_to_upstream,
        &progress.client_to_upstream,
    );
    let down = continue_way(
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

/// One adopted direction, without the fast path.
async fn continue_way(
    from: &TcpStream,
    to: &TcpStream,
    moved: &DirectionCounters,
    progress: &WayProgress,
) -> io::Result<()> {
    match progress.path() {
        PathState::Splice => splice::one_way(from, to, moved, progress).await,
        PathState::Copy => copy::one_way(from, to, moved, progress).await,
        PathState::Closed => Ok(()),
        // The daemon taken over spliced it in the kernel, and this one has no fast
        // path: nothing here can know where its stream stands.
        PathState::Kernel | PathState::Start => Err(io::Error::other(
            "an adopted direction is on a data path this daemon does not run",
        )),
    }
}

/// Sends the bytes hyper read past the upgrade (or what is left of them), before
/// anything else moves.
async fn forward_leftovers(
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &TunnelCounters,
    progress: &Progress,
) -> io::Result<()> {
    let to_upstream = progress
        .client_to_upstream
        .write_held(upstream, &counters.client_to_upstream);
    let to_client = progress
        .upstream_to_client
        .write_held(client, &counters.upstream_to_client);
    // Written: an idle tunnel keeps no buffer (the emptied buffers are dropped).
    tokio::try_join!(to_upstream, to_client).map(|_| ())
}
