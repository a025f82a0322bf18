//! Types shared by the eBPF programs (`proxy-ebpf`) and the daemon's loader.
//! `no_std` so the kernel side can use them; `#[repr(C)]` so both sides agree on layout.
#![no_std]

use core::sync::atomic::AtomicU64;

/// Name of the SOCKHASH (parser and verdict attached) holding the sockets whose incoming
/// bytes are spliced, keyed by socket cookie.
pub const SOCKS_MAP: &str = "SOCKS";
/// Name of the SOCKHASH (no programs) holding every socket of a spliced tunnel: the
/// verdict redirects into it, and it keeps a socket's psock (and the bytes queued for
/// it) alive after the socket leaves `SOCKS`.
pub const TARGETS_MAP: &str = "TARGETS";
/// Name of the ring buffer of [`OverBudgetEvent`]s: directions that went over a budget.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the hash map of [`Direction`]s, keyed by the cookie of the socket bytes come from.
pub const DIRECTIONS_MAP: &str = "DIRECTIONS";
/// Name of the array of [`Ledger`]s, one per direction slot (`Direction::slot`). Mapped
/// into the daemon's memory (`BPF_F_MMAPABLE`): both sides update it with atomics.
pub const LEDGER_MAP: &str = "LEDGER";
/// Name of the one-entry array holding the machine-wide [`KernelMemory`] counters, mapped
/// into the daemon's memory like `LEDGER`.
pub const MEMORY_MAP: &str = "MEMORY";
/// Name of the read-only global the loader sets to `offsetof(struct tcp_sock, write_seq)`
/// of the running kernel (read from its BTF).
pub const WRITE_SEQ_OFFSET_GLOBAL: &str = "TCP_SOCK_WRITE_SEQ_OFFSET";
/// Name of the read-only global the loader sets to `offsetof(struct tcp_sock, copied_seq)`.
pub const COPIED_SEQ_OFFSET_GLOBAL: &str = "TCP_SOCK_COPIED_SEQ_OFFSET";
/// Name of the read-only global the loader sets to the machine-wide limit on bytes queued
/// inside the kernel across every direction (`u64::MAX`: no limit).
pub const MEMORY_LIMIT_GLOBAL: &str = "MEMORY_LIMIT";

/// Default capacity of the socket and direction maps (sockets = directions, two per
/// tunnel); the loader may set another (`--ebpf-max-sockets`).
pub const MAX_SOCKETS: u32 = 131_072;
/// `BPF_F_MMAPABLE`: an array map the daemon can map into its memory.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// `Direction::flags`: `base_seq` holds the peer's `write_seq` at the first redirect.
pub const FLAG_BASE_SET: u32 = 1;
/// `Direction::flags`: a budget was exceeded and the daemon was asked (once) to take this
/// direction over; the verdict keeps redirecting until it does.
pub const FLAG_OVER_BUDGET: u32 = 2;
/// `Direction::flags`: the peer could not be looked up (tunnel being torn down).
pub const FLAG_PEER_GONE: u32 = 4;
/// `Direction::flags`: `next_seq` holds where the stream parser's next message starts.
pub const FLAG_SEQ_SET: u32 = 8;

/// Why a direction was handed to the daemon (`OverBudgetEvent::reason`, `Ledger::handoff`).
pub const HANDOFF_DIRECTION_BUDGET: u32 = 1;
/// The machine-wide limit (`MEMORY_LIMIT`) was exceeded while this direction had bytes
/// queued.
pub const HANDOFF_MEMORY_LIMIT: u32 = 2;

/// One direction of a tunnel, keyed by the cookie of the socket its bytes arrive on.
///
/// The daemon writes `peer`, `budget` and `slot` before either socket enters the
/// SOCKHASH; only the parser and verdict of the source socket write the rest (strparser
/// runs them serialised per socket), the daemon reads them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Direction {
    /// Cookie of the socket the bytes are redirected to (its egress).
    pub peer: u64,
    /// Most bytes that may be redirected but not yet in the peer's TCP send stream
    /// (i.e. queued in the peer's psock, unaccounted kernel memory).
    pub budget: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Peer's `tcp_sock.write_seq` when this direction's first byte was redirected.
    pub base_seq: u32,
    /// TCP sequence number of the first byte the stream parser has not yet handed out
    /// (its messages must start there, whatever offset strparser is at in an skb).
    pub next_seq: u32,
    /// Bytes redirected to the peer.
    pub redirected: u64,
    /// Index of this direction's entry in `LEDGER`.
    pub slot: u32,
    pub _pad: u32,
    /// Bytes the redirect helper refused (must stay 0 while the tunnel is up).
    pub dropped: u64,
    /// Highest number of redirected bytes seen outside the peer's TCP stream.
    pub max_outstanding: u64,
    /// Length of the message the parser just handed to the verdict.
    pub msg_len: u32,
    /// skbs whose sequence numbers did not match `next_seq` (must stay 0).
    pub misparsed: u32,
}

/// A direction's share of the machine-wide count of bytes queued in the kernel:
/// `redirected - delivered` (bytes taken from the source socket minus bytes seen in the
/// peer's TCP send stream). The verdict raises `redirected`; whoever sees the peer's
/// stream move (the verdict on the next message, or the daemon, which also looks at quiet
/// directions) raises `delivered` with one compare-and-swap and takes the difference off
/// `KernelMemory::queued`, so no byte is taken off twice.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Ledger {
    /// Bytes redirected (written by the verdict only).
    pub redirected: AtomicU64,
    /// Bytes known to have entered the peer's TCP send stream (compare-and-swap, never
    /// decreases while the direction lives).
    pub delivered: AtomicU64,
    /// `HANDOFF_*` once the direction was asked to leave the kernel (read by the daemon
    /// when the event ring was full and an event was lost).
    /// (64 bits: the BPF target has no 32-bit atomics.)
    pub handoff: AtomicU64,
}

/// Machine-wide fast-path memory counters (entry 0 of `MEMORY`).
#[repr(C)]
#[derive(Debug, Default)]
pub struct KernelMemory {
    /// Bytes redirected but not yet seen delivered, over every direction (the sum of
    /// every live `Ledger`'s `redirected - delivered`). Signed: a delivery can be counted
    /// a moment before the redirect it belongs to.
    pub queued: AtomicU64,
    /// Highest `queued` seen by the verdict.
    pub peak: AtomicU64,
    /// Over-budget events the ring buffer had no room for (the daemon then finds the
    /// direction through `Ledger::handoff`).
    pub events_missed: AtomicU64,
}

/// What the verdict writes to `EVENTS` when a direction should leave the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverBudgetEvent {
    /// Cookie of the source socket of the direction.
    pub cookie: u64,
    /// `HANDOFF_*`.
    pub reason: u32,
    pub _pad: u32,
    /// `CLOCK_MONOTONIC` nanoseconds when the verdict asked (the daemon's reaction time is
    /// memory: the kernel keeps redirecting until it acts).
    pub at_ns: u64,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Direction {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for OverBudgetEvent {}
