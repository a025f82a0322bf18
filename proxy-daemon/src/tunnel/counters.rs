//! Byte counts of a tunnel, per direction and per data path, readable while the tunnel
//! runs (bytes the kernel is splicing are read from its maps on demand) and final when it
//! ends (the closing log line).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};

use serde::Serialize;

use super::ebpf::Splicer;
use super::handover::DirectionCountersState;
use super::zero_hop::ZeroHop;

/// The mechanisms that can move a direction's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// The eBPF stream verdict, socket to socket inside the kernel.
    Kernel,
    /// `splice(2)` through a pipe, driven by the daemon.
    Splice,
    /// `read(2)`/`write(2)` through a buffer in the daemon.
    Copy,
    /// Zero-hop (app→client only): the app's own sends put the bytes into the client
    /// socket; what takes the normal hop meanwhile is spliced by the daemon (counted as
    /// splice bytes).
    ZeroHop,
}

impl DataPath {
    fn bit(self) -> u8 {
        match self {
            DataPath::Kernel => 1,
            DataPath::Splice => 2,
            DataPath::Copy => 4,
            DataPath::ZeroHop => 8,
        }
    }
}

/// One direction's counters.
#[derive(Debug, Default)]
pub struct DirectionCounters {
    /// Bytes the daemon wrote with write(2): hyper's leftovers and the copy relay.
    copied: AtomicU64,
    /// Bytes the daemon moved with splice(2).
    spliced: AtomicU64,
    /// Bytes the kernel delivered into the destination socket, once the direction left
    /// the kernel (hand-off or end).
    kernel: AtomicU64,
    /// Cookie of the source socket while the kernel splices it (0: it does not): live
    /// kernel bytes are then read from the maps.
    kernel_source: AtomicU64,
    /// `DataPath` bits of every relay this direction has used.
    paths: AtomicU8,
    /// Why the kernel handed the direction to the daemon (`HANDOFF_*`, 0: it did not).
    handoff: AtomicU8,
    /// Bytes the kernel consumed from the source without the verdict seeing them.
    kernel_lost: AtomicU64,
    /// Bytes the app's own sends put into the destination (zero-hop), once the tunnel
    /// was unpaired.
    zero_hop: AtomicU64,
    /// Registered port of the zero-hop tunnel while it is paired (0: it is not): live
    /// zero-hop bytes are then read from its map.
    zero_hop_port: AtomicU32,
}

impl DirectionCounters {
    pub(super) fn use_path(&self, path: DataPath) {
        self.paths.fetch_or(path.bit(), Relaxed);
    }

    /// Forgets a relay that never moved a byte (it was replaced before the first).
    pub(super) fn drop_path(&self, path: DataPath) {
        self.paths.fetch_and(!path.bit(), Relaxed);
    }

    pub(super) fn copied(&self, n: u64) {
        self.copied.fetch_add(n, Relaxed);
    }

    pub(super) fn spliced(&self, n: u64) {
        self.spliced.fetch_add(n, Relaxed);
    }

    /// The kernel splices this direction from now on (source socket `cookie`).
    pub(super) fn enter_kernel(&self, cookie: u64) {
        self.use_path(DataPath::Kernel);
        self.kernel_source.store(cookie, Relaxed);
    }

    /// The direction left the kernel after it delivered `delivered` bytes.
    pub(super) fn leave_kernel(&self, delivered: u64) {
        self.kernel.fetch_add(delivered, Relaxed);
        self.kernel_source.store(0, Relaxed);
    }

    /// Zero-hop carries this direction from now on (registered port `port`).
    pub(super) fn enter_zero_hop(&self, port: u16) {
        self.use_path(DataPath::ZeroHop);
        self.zero_hop_port.store(port as u32, Relaxed);
    }

    /// Zero-hop carried this direction at some point (in this process or one taken over).
    pub fn used_zero_hop(&self) -> bool {
        self.paths.load(Relaxed) & DataPath::ZeroHop.bit() != 0
    }

    /// Zero-hop stopped after the app's sends put `redirected` bytes into the
    /// destination.
    pub(super) fn leave_zero_hop(&self, redirected: u64) {
        self.zero_hop.fetch_add(redirected, Relaxed);
        self.zero_hop_port.store(0, Relaxed);
    }

    /// Bytes the kernel consumed from the source without redirecting them.
    pub(super) fn kernel_lost(&self, n: u64) {
        self.kernel_lost.fetch_add(n, Relaxed);
    }

    /// Bytes of this direction the kernel lost (consumed, never delivered).
    pub fn lost(&self) -> u64 {
        self.kernel_lost.load(Relaxed)
    }

    /// The kernel handed the direction over (`proxy_common::HANDOFF_*`).
    pub(super) fn handed_off(&self, reason: u32) {
        self.handoff.store(reason as u8, Relaxed);
    }

    /// Why the kernel handed the direction to the daemon: "budget" (its own),
    /// "memory_limit" (the machine-wide one), or "none".
    pub fn handoff_name(&self) -> &'static str {
        match self.handoff.load(Relaxed) as u32 {
            0 => "none",
            proxy_common::HANDOFF_DIRECTION_BUDGET => "budget",
            proxy_common::HANDOFF_MEMORY_LIMIT => "memory_limit",
            _ => "other",
        }
    }

    /// Bytes per data path now. While the kernel splices the direction, its bytes are
    /// those the verdict redirected so far (a map read).
    /// Zero-hop bytes are read from its map likewise while the tunnel is paired.
    pub fn snapshot(
        &self,
        splicer: Option<&Splicer>,
        zero_hop: Option<&ZeroHop>,
    ) -> DirectionSnapshot {
        let source = self.kernel_source.load(Relaxed);
        let mut kernel = self.kernel.load(Relaxed);
        if source != 0 {
            if let Some(dir) = splicer.and_then(|s| s.direction(source)) {
                kernel += dir.redirected;
            }
        }
        let port = self.zero_hop_port.load(Relaxed);
        let mut zero_hop_bytes = self.zero_hop.load(Relaxed);
        if port != 0 {
            if let Some(stats) = zero_hop.and_then(|z| z.stats(port as u16)) {
                zero_hop_bytes += stats.redirected_bytes;
            }
        }
        let (copy, splice) = (self.copied.load(Relaxed), self.spliced.load(Relaxed));
        DirectionSnapshot {
            bytes: kernel + splice + copy + zero_hop_bytes,
            kernel,
            splice,
            copy,
            zero_hop: zero_hop_bytes,
            path: self.path_name(),
            handoff: self.handoff_name(),
        }
    }

    /// The relays this direction used, in the order a direction can go through them:
    /// "kernel", "kernel+splice", "kernel+copy", "splice", "copy" ("none" before any);
    /// "zero-hop" (its normal hop included), "zero-hop+splice"/"zero-hop+copy" when it
    /// went on without zero-hop (after a takeover).
    pub fn path_name(&self) -> &'static str {
        let bits = self.paths.load(Relaxed);
        if bits & DataPath::ZeroHop.bit() != 0 {
            return match (
                bits & DataPath::Splice.bit() != 0,
                bits & DataPath::Copy.bit() != 0,
            ) {
                (false, false) => "zero-hop",
                (true, false) => "zero-hop+splice",
                (false, true) => "zero-hop+copy",
                (true, true) => "zero-hop+splice+copy",
            };
        }
        let (k, s, c) = (
            bits & DataPath::Kernel.bit() != 0,
            bits & DataPath::Splice.bit() != 0,
            bits & DataPath::Copy.bit() != 0,
        );
        match (k, s, c) {
            (true, false, false) => "kernel",
            (true, true, false) => "kernel+splice",
            (true, false, true) => "kernel+copy",
            (true, true, true) => "kernel+splice+copy",
            (false, true, false) => "splice",
            (false, false, true) => "copy",
            (false, true, true) => "splice+copy",
            (false, false, false) => "none",
        }
    }

    /// Whether the kernel splices this direction now.
    pub fn in_kernel_now(&self) -> bool {
        self.kernel_source.load(Relaxed) != 0
    }

    /// Bytes moved with splice(2) so far.
    pub(super) fn spliced_bytes(&self) -> u64 {
        self.spliced.load(Relaxed)
    }

    /// The counters as they move to a successor process (a direction still in the
    /// kernel carries its kernel bytes in the maps, which move too).
    pub(super) fn to_state(&self) -> DirectionCountersState {
        DirectionCountersState {
            copied: self.copied.load(Relaxed),
            spliced: self.spliced.load(Relaxed),
            kernel: self.kernel.load(Relaxed),
            paths: self.paths.load(Relaxed),
            handoff: self.handoff.load(Relaxed),
            kernel_lost: self.kernel_lost.load(Relaxed),
            zero_hop: self.zero_hop.load(Relaxed),
        }
    }

    /// Counters of a direction adopted from the daemon taken over.
    pub(super) fn from_state(s: &DirectionCountersState) -> Self {
        DirectionCounters {
            copied: AtomicU64::new(s.copied),
            spliced: AtomicU64::new(s.spliced),
            kernel: AtomicU64::new(s.kernel),
            kernel_source: AtomicU64::new(0),
            paths: AtomicU8::new(s.paths),
            handoff: AtomicU8::new(s.handoff),
            kernel_lost: AtomicU64::new(s.kernel_lost),
            zero_hop: AtomicU64::new(s.zero_hop),
            zero_hop_port: AtomicU32::new(0),
        }
    }
}

/// A direction's bytes by data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DirectionSnapshot {
    /// Every byte delivered to the destination socket so far.
    pub bytes: u64,
    pub kernel: u64,
    pub splice: u64,
    pub copy: u64,
    /// Bytes the app's own sends put into the destination (zero-hop).
    pub zero_hop: u64,
    /// See [`DirectionCounters::path_name`].
    pub path: &'static str,
    /// See [`DirectionCounters::handoff_name`].
    pub handoff: &'static str,
}

/// Both directions of a tunnel plus what the kernel reported about it.
#[derive(Debug, Default)]
pub struct TunnelCounters {
    pub client_to_upstream: DirectionCounters,
    pub upstream_to_client: DirectionCounters,
    /// Most bytes the kernel held queued for one socket at once (the eBPF fast path's
    /// unaccounted memory; its budgets bound it).
    pub kernel_queue_peak: AtomicU64,
    /// Bytes the kernel could not redirect (lost: must stay 0; the tunnel is reset).
    pub kernel_dropped: AtomicU64,
    /// Messages the kernel's stream parser could not place (must stay 0).
    pub kernel_misparsed: AtomicU64,
}
