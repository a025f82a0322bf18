//! Loads the embedded eBPF object once at start-up and owns its maps.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use aya::maps::{HashMap, IterableMap, MapData, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use proxy_common::{
    Direction, COPIED_SEQ_OFFSET_GLOBAL, DIRECTIONS_MAP, EVENTS_MAP, LEDGER_MAP,
    MEMORY_LIMIT_GLOBAL, MEMORY_MAP, SOCKS_MAP, TARGETS_MAP, UNSPLICE_MAP, WRITE_SEQ_OFFSET_GLOBAL,
    ZH_APPS_MAP, ZH_CLIENT_SOCKS_MAP, ZH_PEERS_MAP, ZH_STATS_MAP, ZH_TUNNELS_MAP,
};
use tokio::sync::watch;

use super::btf;
use super::shared::{Accounting, MappedArray};
use super::unsplice::{Unsplicer, UNSPLICE_LINK};
use super::watch::{self as watcher, LiveDirections};

/// The eBPF object (`proxy-ebpf`), embedded at build time; empty when it was not built.
/// Zero-hop loads its own instance of it (`tunnel::zero_hop`).
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

/// Default per-direction budget: bytes redirected but not yet in the peer's TCP stream.
pub const DEFAULT_BUDGET: u32 = 2 << 20;
/// Default machine-wide limit on bytes queued in the kernel over every direction.
pub const DEFAULT_MEMORY_LIMIT: u64 = 32 << 20;
/// Default size of the over-budget event ring (about 2,700 events).
pub const DEFAULT_EVENT_RING_BYTES: u32 = 64 * 1024;
pub use proxy_common::MAX_SOCKETS as DEFAULT_MAX_SOCKETS;

/// Whether this binary carries the eBPF object (built by `cargo xtask build-ebpf`).
pub fn object_embedded() -> bool {
    !OBJECT.is_empty()
}

/// Load-time settings of the fast path (a successor that takes the maps over receives
/// them: the programs and maps were built with them).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    /// Per-direction budget (`u32::MAX`: none).
    pub budget: u32,
    /// Machine-wide limit on bytes queued in the kernel (`0`: none).
    pub memory_limit: u64,
    /// Capacity of the socket and direction maps (two entries per tunnel); tunnels beyond
    /// it use the userspace relay.
    pub max_sockets: u32,
    /// Size of the over-budget event ring buffer (a power of two, at least a page).
    pub event_ring_bytes: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            budget: DEFAULT_BUDGET,
            memory_limit: DEFAULT_MEMORY_LIMIT,
            max_sockets: DEFAULT_MAX_SOCKETS,
            event_ring_bytes: DEFAULT_EVENT_RING_BYTES,
        }
    }
}

/// Fast-path totals since start-up (for logs and metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Directions handed to the daemon for going over their own budget.
    pub handoffs_direction_budget: AtomicU64,
    /// Directions handed to the daemon because the machine-wide limit was reached.
    pub handoffs_memory_limit: AtomicU64,
    /// Of those, hand-offs found through the ledger because the event ring was full.
    pub handoffs_found_by_scan: AtomicU64,
    /// Longest time between the verdict asking for a hand-off and the daemon taking the
    /// direction out of the kernel (the kernel keeps redirecting meanwhile).
    pub handoff_latency_max_ns: AtomicU64,
    /// Tunnels relayed in userspace because the maps were full.
    pub maps_full: AtomicU64,
    /// Bytes the kernel failed to redirect (lost; the tunnel was reset).
    pub kernel_dropped: AtomicU64,
    /// Messages the stream parser could not place (must stay 0).
    pub kernel_misparsed: AtomicU64,
    /// Directions whose kernel state was missing when the daemon looked (reset).
    pub directions_lost: AtomicU64,
    /// Hand-offs whose socket left `SOCKS` by a removal from user space (no unsplice
    /// iterator, or it did not find the socket), which can race a parser pass.
    pub unsplices_from_user_space: AtomicU64,
}

/// The loaded programs and their maps. The maps are not pinned: they (and every socket
/// reference in them) go away with the last process that holds them, so a crash never
/// leaves a socket spliced. A takeover passes their descriptors to the successor.
pub struct Splicer {
    socks: Arc<Mutex<SockHash<MapData, u64>>>,
    targets: Mutex<SockHash<MapData, u64>>,
    directions: Mutex<HashMap<MapData, u64, Direction>>,
    pub(super) accounting: Arc<Accounting>,
    /// Directions the kernel splices now, watched by the hand-off thread.
    pub(super) live: Arc<LiveDirections>,
    /// What the hand-off thread works with (a direction adopted from the daemon taken
    /// over may need its hand-off at once).
    watched: Arc<watcher::Shared>,
    pub(super) budget: u32,
    pub settings: Settings,
    pub stats: Arc<Stats>,
    /// Set once the thread that hands directions over has failed: from then on no
    /// direction could leave the kernel, so the daemon must exit.
    failed: watch::Receiver<Option<String>>,
    thread: tokio::sync::Mutex<watcher::Thread>,
    /// The event ring's descriptor (its reader lives in the hand-off thread).
    events: OwnedFd,
    ledger_map: MapData,
    memory_map: MapData,
    /// Set once the maps moved to a successor (the hand-off thread stopped on purpose).
    handed_over: std::sync::atomic::AtomicBool,
    /// The programs, when this process loaded them (a successor only has the maps: the
    /// programs stay attached to `SOCKS` in the kernel).
    ebpf: Mutex<Option<Ebpf>>,
}

impl std::fmt::Debug for Splicer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Splicer")
            .field("settings", &self.settings)
            .finish()
    }
}

/// The fast path as it moves to a successor: its maps' descriptors, by name, the ledger
/// slots in use, and the settings the maps and programs were built with.
pub struct HandedOver {
    pub maps: Vec<(String, OwnedFd)>,
    pub used_slots: Vec<u32>,
    pub settings: Settings,
}

impl Splicer {
    /// Takes over the maps of a running daemon (`HandedOver`, received over the control
    /// socket): no object is loaded, the programs stay attached to `SOCKS`. Starts this
    /// process's hand-off thread, which reads the event ring from where the other one
    /// stopped.
    pub fn adopt(
        maps: Vec<(String, OwnedFd)>,
        settings: Settings,
        used_slots: &[u32],
    ) -> anyhow::Result<Splicer> {
        let mut by_name: std::collections::HashMap<String, aya::maps::Map> = Default::default();
        let (unsplice, maps): (Vec<_>, Vec<_>) = maps
            .into_iter()
            .partition(|(name, _)| name == UNSPLICE_MAP || name == UNSPLICE_LINK);
        let unsplicer = adopt_unsplicer(unsplice);
        for (name, fd) in maps {
            let data = MapData::from_fd(fd).with_context(|| format!("map {name}"))?;
            let map = aya::maps::Map::from_map_data(data).with_context(|| format!("map {name}"))?;
            by_name.insert(name, map);
        }
        let mut take = |name: &str| {
            by_name
                .remove(name)
                .with_context(|| format!("map {name} not handed over"))
        };
        let socks: SockHash<MapData, u64> = SockHash::try_from(take(SOCKS_MAP)?)?;
        let targets: SockHash<MapData, u64> = SockHash::try_from(take(TARGETS_MAP)?)?;
        let directions: HashMap<MapData, u64, Direction> =
            HashMap::try_from(take(DIRECTIONS_MAP)?)?;
        let events = RingBuf::try_from(take(EVENTS_MAP)?)?;
        let ledger = array_map(take(LEDGER_MAP)?)?;
        let memory = array_map(take(MEMORY_MAP)?)?;
        let slots = ledger.info()?.max_entries();
        let accounting = Arc::new(Accounting::adopted(
            MappedArray::new(ledger.fd(), slots)
                .with_context(|| format!("mapping {LEDGER_MAP}"))?,
            MappedArray::new(memory.fd(), 1).with_context(|| format!("mapping {MEMORY_MAP}"))?,
            used_slots,
        ));
        Self::start(
            socks, targets, directions, events, ledger, memory, accounting, settings, None,
            unsplicer,
        )
    }

    /// Builds the splicer around its maps and starts the hand-off thread.
    #[allow(clippy::too_many_arguments)]
    fn start(
        socks: SockHash<MapData, u64>,
        targets: SockHash<MapData, u64>,
        directions: HashMap<MapData, u64, Direction>,
        events: RingBuf<MapData>,
        ledger_map: MapData,
        memory_map: MapData,
        accounting: Arc<Accounting>,
        settings: Settings,
        ebpf: Option<Ebpf>,
        unsplicer: Option<Unsplicer>,
    ) -> anyhow::Result<Splicer> {
        // SAFETY: the ring's fd is open for as long as `events` lives; dup'd here.
        let events_fd = unsafe { BorrowedFd::borrow_raw(events.as_raw_fd()) }
            .try_clone_to_owned()
            .context("duplicating the event ring's descriptor")?;
        let live = Arc::new(LiveDirections::default());
        let stats = Arc::new(Stats::default());
        let socks = Arc::new(Mutex::new(socks));
        let watched = Arc::new(watcher::Shared {
            live: live.clone(),
            accounting: accounting.clone(),
            stats: stats.clone(),
            socks: socks.clone(),
            unsplicer: unsplicer
                .filter(|_| !watcher::racy_unsplice_fault())
                .map(Arc::new),
        });
        let (thread, failed) = watcher::spawn(events, watched.clone())?;
        Ok(Splicer {
            socks,
            targets: Mutex::new(targets),
            directions: Mutex::new(directions),
            accounting,
            live,
            watched,
            budget: settings.budget,
            settings,
            stats,
            failed,
            thread: tokio::sync::Mutex::new(thread),
            events: events_fd,
            ledger_map,
            memory_map,
            handed_over: std::sync::atomic::AtomicBool::new(false),
            ebpf: Mutex::new(ebpf),
        })
    }

    /// Takeover, running side: stops handing out ledger slots, stops the hand-off thread
    /// (without the fatal report; whatever it has not read stays in the ring for the
    /// successor), makes sure nothing in this process can ever detach the programs from
    /// `SOCKS`, and returns what the successor needs to share the maps. From now on this
    /// process adds no direction to the maps and removes none of those it hands over.
    pub async fn hand_over(&self) -> std::io::Result<HandedOver> {
        let used_slots = self.accounting.freeze();
        self.handed_over.store(true, Relaxed);
        self.thread.lock().await.stop().await;
        // The programs are attached with BPF_PROG_ATTACH: dropping aya's links would
        // detach them from SOCKS and every socket the successor adds would be spliced by
        // nothing. Leaked on purpose: the attachment lives as long as the map.
        if let Some(ebpf) = self.ebpf.lock().unwrap().take() {
            std::mem::forget(ebpf);
        }
        let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned();
        let mut maps = vec![
            (
                SOCKS_MAP.to_owned(),
                dup(self.socks.lock().unwrap().fd().as_fd())?,
            ),
            (
                TARGETS_MAP.to_owned(),
                dup(self.targets.lock().unwrap().fd().as_fd())?,
            ),
            (
                DIRECTIONS_MAP.to_owned(),
                dup(self.directions.lock().unwrap().map().fd().as_fd())?,
            ),
            (EVENTS_MAP.to_owned(), dup(self.events.as_fd())?),
            (LEDGER_MAP.to_owned(), dup(self.ledger_map.fd().as_fd())?),
            (MEMORY_MAP.to_owned(), dup(self.memory_map.fd().as_fd())?),
        ];
        if let Some(u) = &self.watched.unsplicer {
            maps.extend(u.hand_over()?);
        }
        Ok(HandedOver {
            maps,
            used_slots,
            settings: self.settings.clone(),
        })
    }

    /// Takeover, successor side: watches a direction the kernel splices, adopted from the
    /// daemon taken over. If the verdict already asked for its hand-off (an event the
    /// other process read but did not act on, or one this thread read before the
    /// direction was watched), the hand-off starts now.
    pub(super) fn adopt_direction(
        &self,
        cookie: u64,
        slot: u32,
        from: std::os::fd::RawFd,
        to: std::os::fd::RawFd,
        to_base: u64,
    ) -> Arc<tokio::sync::Notify> {
        let handoff = self.live.watch(cookie, slot, from, to, to_base);
        let reason = self.accounting.handoff(slot);
        if reason != 0 && !self.watched.hand_off(&[(cookie, reason)]).is_empty() {
            self.stats.handoffs_found_by_scan.fetch_add(1, Relaxed);
        }
        handoff
    }

    /// The directions the kernel splices now (parked tunnels wait on their hand-offs).
    pub fn live(&self) -> &Arc<LiveDirections> {
        &self.live
    }

    /// An adopted direction uses ledger `slot`.
    pub fn claim_slot(&self, slot: u32) {
        self.accounting.claim(slot);
    }

    /// The daemon taken over is done: the ledger slots of its tunnels that ended there
    /// are free again. Returns how many.
    pub fn release_unclaimed_slots(&self) -> usize {
        self.accounting.release_unclaimed()
    }

    /// Loads and attaches the programs. Must run inside the tokio runtime (aya-log and
    /// the event reader).
    pub fn load(settings: Settings) -> anyhow::Result<Splicer> {
        if !object_embedded() {
            bail!("the eBPF object was not embedded in this build (build it with `cargo xtask build-ebpf`, then rebuild)");
        }
        let write_seq_offset = btf::member_offset("tcp_sock", "write_seq")
            .context("finding tcp_sock.write_seq in the kernel's BTF")?;
        let copied_seq_offset = btf::member_offset("tcp_sock", "copied_seq")
            .context("finding tcp_sock.copied_seq in the kernel's BTF")?;
        let memory_limit = match settings.memory_limit {
            0 => u64::MAX,
            n => n,
        };
        let mut loader = EbpfLoader::new();
        loader
            .override_global(WRITE_SEQ_OFFSET_GLOBAL, &write_seq_offset, true)
            .override_global(COPIED_SEQ_OFFSET_GLOBAL, &copied_seq_offset, true)
            .override_global(MEMORY_LIMIT_GLOBAL, &memory_limit, true)
            .map_max_entries(EVENTS_MAP, settings.event_ring_bytes);
        for map in [SOCKS_MAP, TARGETS_MAP, DIRECTIONS_MAP, LEDGER_MAP] {
            loader.map_max_entries(map, settings.max_sockets);
        }
        // Zero-hop's maps: its own instance of the object uses them, not this one.
        for map in [
            ZH_APPS_MAP,
            ZH_PEERS_MAP,
            ZH_TUNNELS_MAP,
            ZH_STATS_MAP,
            ZH_CLIENT_SOCKS_MAP,
        ] {
            loader.map_max_entries(map, 1);
        }
        let mut ebpf = loader
            .load(OBJECT)
            .context("loading the eBPF object (needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)")?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_logger(logger),
            Err(e) => tracing::warn!(error = %e, "eBPF logs unavailable"),
        }
        let socks: SockHash<MapData, u64> = SockHash::try_from(take_map(&mut ebpf, SOCKS_MAP)?)?;
        let targets: SockHash<MapData, u64> =
            SockHash::try_from(take_map(&mut ebpf, TARGETS_MAP)?)?;
        let directions: HashMap<MapData, u64, Direction> =
            HashMap::try_from(take_map(&mut ebpf, DIRECTIONS_MAP)?)?;
        let events = RingBuf::try_from(take_map(&mut ebpf, EVENTS_MAP)?)?;
        let ledger = array_map(take_map(&mut ebpf, LEDGER_MAP)?)?;
        let memory = array_map(take_map(&mut ebpf, MEMORY_MAP)?)?;
        let accounting = Arc::new(Accounting::new(
            MappedArray::new(ledger.fd(), settings.max_sockets)
                .with_context(|| format!("mapping {LEDGER_MAP}"))?,
            MappedArray::new(memory.fd(), 1).with_context(|| format!("mapping {MEMORY_MAP}"))?,
        ));
        let unsplicer = match Unsplicer::load(&mut ebpf) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "fast path: no unsplice iterator; hand-offs remove sockets from user space, which can race a stream-parser pass (docs/fastpath.md, finding 6)");
                None
            }
        };
        for name in ["parser", "verdict"] {
            let prog: &mut SkSkb = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("loading program {name}"))?;
            prog.attach(socks.fd())
                .with_context(|| format!("attaching program {name} to {SOCKS_MAP}"))?;
        }
        Self::start(
            socks,
            targets,
            directions,
            events,
            ledger,
            memory,
            accounting,
            settings,
            Some(ebpf),
            unsplicer,
        )
    }

    /// Resolves (with the reason) if the thread that hands directions over from the kernel
    /// stops. Directions over budget would then stay in the kernel for good: the caller
    /// must treat it as fatal.
    pub async fn failed(&self) -> String {
        let mut rx = self.failed.clone();
        let reason = match rx.wait_for(|f| f.is_some()).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // Stopped on purpose: the successor's thread does its work now.
            Err(_) if self.handed_over.load(Relaxed) => std::future::pending().await,
            Err(_) => "the fast path's hand-off thread is gone".into(),
        };
        reason
    }

    /// Entries in the socket maps (`SOCKS` + `TARGETS`).
    pub fn sockets_in_map(&self) -> usize {
        self.socks.lock().unwrap().keys().count() + self.targets.lock().unwrap().keys().count()
    }

    /// Entries in the direction map (two per spliced tunnel).
    pub fn directions_in_map(&self) -> usize {
        self.directions.lock().unwrap().keys().count()
    }

    /// Directions the kernel splices now.
    pub fn directions_in_kernel(&self) -> usize {
        self.live.len()
    }

    /// Bytes queued in the kernel now over every direction, and the most seen at once.
    pub fn kernel_queued(&self) -> (u64, u64) {
        (self.accounting.queued(), self.accounting.peak())
    }

    /// Over-budget events lost to a full ring buffer (their directions were found anyway).
    pub fn events_missed(&self) -> u64 {
        self.accounting.events_missed()
    }

    /// The verdict's state for the direction whose bytes arrive on `cookie`.
    pub fn direction(&self, cookie: u64) -> Option<Direction> {
        self.directions.lock().unwrap().get(&cookie, 0).ok()
    }

    /// Writes a direction with a fresh ledger slot. Fails when the maps are full.
    pub(super) fn add_direction(&self, cookie: u64, peer: u64) -> anyhow::Result<u32> {
        let slot = self
            .accounting
            .take_slot()
            .context("every direction slot is in use")?;
        let dir = Direction {
            peer,
            budget: self.budget,
            slot,
            ..Default::default()
        };
        if let Err(e) = self.directions.lock().unwrap().insert(cookie, dir, 0) {
            self.accounting.free_slot(slot);
            return Err(e.into());
        }
        Ok(slot)
    }

    /// Puts a tunnel socket in `TARGETS` (gives it a psock the verdict can redirect to).
    pub(super) fn insert_target(&self, cookie: u64, fd: &impl AsRawFd) -> std::io::Result<()> {
        insert(&self.targets, cookie, fd)
    }

    /// Puts a socket in `SOCKS`: from now on the kernel splices its incoming bytes.
    pub(super) fn splice_source(&self, cookie: u64, fd: &impl AsRawFd) -> std::io::Result<()> {
        insert(&self.socks, cookie, fd)
    }

    /// Takes a socket out of `SOCKS`: its parser and verdict stop (after any pass in
    /// flight), its psock and the bytes queued to it stay (it is still in `TARGETS`).
    pub(super) fn unsplice_source(&self, cookie: u64) {
        let _ = self.socks.lock().unwrap().remove(&cookie);
    }

    /// Forgets a direction: its map entries and its ledger slot. Call only when nothing is
    /// queued in the socket's psock any more (leaving `TARGETS` drops the psock and its
    /// queues) and the direction was settled.
    pub(super) fn remove(&self, cookie: u64, slot: Option<u32>) {
        let _ = self.socks.lock().unwrap().remove(&cookie);
        let _ = self.targets.lock().unwrap().remove(&cookie);
        let _ = self.directions.lock().unwrap().remove(&cookie);
        if let Some(slot) = slot {
            // No verdict can reach the slot any more: its direction is gone.
            self.accounting.free_slot(slot);
        }
    }
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing"))
}

/// The unsplice iterator handed over with the maps, if the daemon taken over had one.
fn adopt_unsplicer(fds: Vec<(String, OwnedFd)>) -> Option<Unsplicer> {
    let mut by_name: std::collections::HashMap<String, OwnedFd> = fds.into_iter().collect();
    let (Some(map), Some(link)) = (by_name.remove(UNSPLICE_MAP), by_name.remove(UNSPLICE_LINK))
    else {
        tracing::warn!("--takeover: the daemon taken over had no unsplice iterator (an older version, or its kernel refused it); hand-offs remove sockets from user space, which can race a stream-parser pass (docs/fastpath.md, finding 6), until the next restart");
        return None;
    };
    match Unsplicer::adopt(map, link) {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::warn!(error = format!("{e:#}"), "--takeover: the unsplice iterator could not be adopted; hand-offs remove sockets from user space");
            None
        }
    }
}

/// The map behind an `Array` (the mapped arrays hold atomics, which aya's typed
/// `Array` cannot: they are not `Pod`).
fn array_map(map: aya::maps::Map) -> anyhow::Result<MapData> {
    match map {
        aya::maps::Map::Array(data) => Ok(data),
        _ => bail!("expected an array map"),
    }
}

fn insert(
    map: &Mutex<SockHash<MapData, u64>>,
    cookie: u64,
    fd: &impl AsRawFd,
) -> std::io::Result<()> {
    map.lock()
        .unwrap()
        .insert(cookie, fd.as_raw_fd(), 0)
        .map_err(|e| match e {
            aya::maps::MapError::SyscallError(s) => s.io_error,
            other => std::io::Error::other(other.to_string()),
        })
}

fn spawn_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    use tokio::io::unix::AsyncFd;
    // SAFETY: the logger owns its ring buffer fd and keeps it open until it is dropped
    // together with the AsyncFd.
    let Ok(mut fd) =
        (unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) })
    else {
        return;
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
