//! Loads the embedded eBPF object once at start-up and owns its maps.

use std::collections::HashMap as StdHashMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use aya::maps::{HashMap, MapData, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use proxy_common::{
    Direction, COPIED_SEQ_OFFSET_GLOBAL, DIRECTIONS_MAP, EVENTS_MAP, SOCKS_MAP, TARGETS_MAP,
    WRITE_SEQ_OFFSET_GLOBAL,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::btf;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf.o"));

/// Default per-direction budget: bytes redirected but not yet in the peer's TCP stream.
pub const DEFAULT_BUDGET: u32 = 2 << 20;

/// Whether this binary carries the eBPF object (built by `cargo xtask build-ebpf`).
pub fn object_embedded() -> bool {
    !OBJECT.is_empty()
}

/// The loaded programs and their maps. The maps are not pinned: they (and every socket
/// reference in them) go away with the process, so a crash never leaves a socket spliced.
pub struct Splicer {
    socks: Mutex<SockHash<MapData, u64>>,
    targets: Mutex<SockHash<MapData, u64>>,
    directions: Mutex<HashMap<MapData, u64, Direction>>,
    /// Per spliced source socket: woken when its direction goes over budget.
    over_budget: Arc<Mutex<StdHashMap<u64, Arc<Notify>>>>,
    pub(super) budget: u32,
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Splicer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Splicer")
            .field("budget", &self.budget)
            .finish()
    }
}

impl Splicer {
    /// Takes over the maps of a running daemon (their descriptors, by name).
    pub fn adopt(
        _maps: Vec<(String, std::os::fd::OwnedFd)>,
        _budget: u32,
    ) -> anyhow::Result<Splicer> {
        anyhow::bail!("adopting maps is not implemented yet")
    }

    /// Loads and attaches the programs. Must run inside the tokio runtime (aya-log and
    /// event readers). `budget`: see `--ebpf-budget` (u32::MAX turns accounting off).
    pub fn load(budget: u32) -> anyhow::Result<Splicer> {
        if !object_embedded() {
            bail!("the eBPF object was not embedded in this build (build it with `cargo xtask build-ebpf`, then rebuild)");
        }
        let write_seq_offset = btf::member_offset("tcp_sock", "write_seq")
            .context("finding tcp_sock.write_seq in the kernel's BTF")?;
        let copied_seq_offset = btf::member_offset("tcp_sock", "copied_seq")
            .context("finding tcp_sock.copied_seq in the kernel's BTF")?;
        let mut ebpf = EbpfLoader::new()
            .override_global(WRITE_SEQ_OFFSET_GLOBAL, &write_seq_offset, true)
            .override_global(COPIED_SEQ_OFFSET_GLOBAL, &copied_seq_offset, true)
            .load(OBJECT)
            .context("loading the eBPF object (needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)")?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_logger(logger),
            Err(e) => tracing::warn!(error = %e, "eBPF logs unavailable"),
        }
        let socks: SockHash<MapData, u64> = SockHash::try_from(
            ebpf.take_map(SOCKS_MAP)
                .with_context(|| format!("map {SOCKS_MAP} missing"))?,
        )?;
        let targets: SockHash<MapData, u64> = SockHash::try_from(
            ebpf.take_map(TARGETS_MAP)
                .with_context(|| format!("map {TARGETS_MAP} missing"))?,
        )?;
        let directions: HashMap<MapData, u64, Direction> = HashMap::try_from(
            ebpf.take_map(DIRECTIONS_MAP)
                .with_context(|| format!("map {DIRECTIONS_MAP} missing"))?,
        )?;
        let events = RingBuf::try_from(
            ebpf.take_map(EVENTS_MAP)
                .with_context(|| format!("map {EVENTS_MAP} missing"))?,
        )?;
        let over_budget = Arc::new(Mutex::new(StdHashMap::new()));
        spawn_event_reader(events, over_budget.clone())?;
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
        Ok(Splicer {
            socks: Mutex::new(socks),
            targets: Mutex::new(targets),
            directions: Mutex::new(directions),
            over_budget,
            budget,
            _ebpf: ebpf,
        })
    }

    /// Entries in the socket maps (`SOCKS` + `TARGETS`).
    pub fn sockets_in_map(&self) -> usize {
        self.socks.lock().unwrap().keys().count() + self.targets.lock().unwrap().keys().count()
    }

    /// Entries in the direction map (two per spliced tunnel).
    pub fn directions_in_map(&self) -> usize {
        self.directions.lock().unwrap().keys().count()
    }

    pub(super) fn direction(&self, cookie: u64) -> Option<Direction> {
        self.directions.lock().unwrap().get(&cookie, 0).ok()
    }

    pub(super) fn insert_direction(&self, cookie: u64, dir: Direction) -> anyhow::Result<()> {
        self.directions.lock().unwrap().insert(cookie, dir, 0)?;
        Ok(())
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

    /// A notifier woken (with a stored permit) when `cookie`'s direction goes over budget.
    pub(super) fn watch_budget(&self, cookie: u64) -> Arc<Notify> {
        self.over_budget
            .lock()
            .unwrap()
            .entry(cookie)
            .or_default()
            .clone()
    }

    /// Forgets everything about a tunnel socket. Call only when nothing is queued in its
    /// psock any more: leaving `TARGETS` drops the psock and its queues.
    pub(super) fn remove(&self, cookie: u64) {
        let _ = self.socks.lock().unwrap().remove(&cookie);
        let _ = self.targets.lock().unwrap().remove(&cookie);
        let _ = self.directions.lock().unwrap().remove(&cookie);
        self.over_budget.lock().unwrap().remove(&cookie);
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

/// Reads over-budget events and wakes the tunnel watching that socket.
fn spawn_event_reader(
    events: RingBuf<MapData>,
    over_budget: Arc<Mutex<StdHashMap<u64, Arc<Notify>>>>,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd and keeps it open until it is dropped
    // together with the AsyncFd.
    let mut fd = unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
        .context("watching the eBPF event ring buffer")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                let Ok(bytes) = <[u8; 8]>::try_from(&item[..]) else {
                    continue;
                };
                let cookie = u64::from_ne_bytes(bytes);
                let notify = over_budget.lock().unwrap().get(&cookie).cloned();
                if let Some(n) = notify {
                    n.notify_one();
                }
            }
            guard.clear_ready();
        }
    });
    Ok(())
}

fn spawn_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
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
