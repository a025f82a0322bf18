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
/// Name of the map of sockets the daemon asks to leave `SOCKS` (cookie → 0 asked, 1
/// done), served by the `unsplice` iterator program.
pub const UNSPLICE_MAP: &str = "UNSPLICE";
/// Name of the TCP iterator program that takes sockets out of `SOCKS` under their owner
/// lock.
pub const UNSPLICE_PROGRAM: &str = "unsplice";
/// Most removals asked for at once.
pub const UNSPLICE_MAX: u32 = 4096;
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

// ---------------------------------------------------------------- zero-hop

/// Name of the SOCKHASH holding the apps' accepted sockets of zero-hop tunnels, keyed by
/// the registered port (the local port of the daemon's upstream socket, which is the
/// app socket's remote port). The `sk_msg` program is attached to it.
pub const ZH_APPS_MAP: &str = "ZH_APPS";
/// Name of the SOCKHASH (no programs) holding the client socket of every paired zero-hop
/// tunnel, keyed by socket cookie: the redirect target (it also keeps the socket, and so
/// its kernel address, alive while the tunnel is paired).
pub const ZH_PEERS_MAP: &str = "ZH_PEERS";
/// Name of the hash map of [`ZeroHopTunnel`]s (written by the daemon only), keyed by the
/// registered port.
pub const ZH_TUNNELS_MAP: &str = "ZH_TUNNELS";
/// Name of the hash map of [`ZeroHopStats`] (written by the programs only; created and
/// removed by the daemon), keyed by the registered port.
pub const ZH_STATS_MAP: &str = "ZH_STATS";
/// Name of the LRU hash map from the cookie of a connection the daemon accepted to the
/// kernel address of its socket (written by the capture program).
pub const ZH_CLIENT_SOCKS_MAP: &str = "ZH_CLIENT_SOCKS";
/// Name of the read-only global the loader sets to the daemon's network namespace cookie:
/// the capture program only looks at sockets of that namespace.
pub const ZH_NETNS_COOKIE_GLOBAL: &str = "ZH_NETNS_COOKIE";
/// Name of the read-only global the loader sets to the daemon's listening port.
pub const ZH_LISTEN_PORT_GLOBAL: &str = "ZH_LISTEN_PORT";
/// Name of the read-only global the loader sets to the `TCP_NOTSENT_LOWAT` the capture
/// program gives a captured app socket (0: leave it alone).
pub const ZH_APP_NOTSENT_LOWAT_GLOBAL: &str = "ZH_APP_NOTSENT_LOWAT";
/// Name of the read-only global the loader sets to `offsetof(struct sock, sk_sndbuf)`.
pub const SNDBUF_OFFSET_GLOBAL: &str = "SOCK_SNDBUF_OFFSET";
/// Name of the read-only global the loader sets to `offsetof(struct sock, sk_wmem_queued)`.
pub const WMEM_QUEUED_OFFSET_GLOBAL: &str = "SOCK_WMEM_QUEUED_OFFSET";
/// Name of the read-only global the loader sets to `offsetof(struct sock_common, skc_state)`.
pub const STATE_OFFSET_GLOBAL: &str = "SOCK_STATE_OFFSET";
/// Name of the read-only global the loader sets to `offsetof(struct sock, sk_socket)`.
pub const SK_SOCKET_OFFSET_GLOBAL: &str = "SOCK_SK_SOCKET_OFFSET";
/// Name of the read-only global the loader sets to `offsetof(struct socket, file)`.
pub const SOCKET_FILE_OFFSET_GLOBAL: &str = "SOCKET_FILE_OFFSET";
/// Name of the read-only global the loader sets to `offsetof(struct file, f_flags)`.
pub const FILE_FLAGS_OFFSET_GLOBAL: &str = "FILE_FLAGS_OFFSET";
/// Capacity of the per-tunnel zero-hop maps (one entry per registered port).
pub const ZH_MAX_TUNNELS: u32 = 65_536;
/// Capacity of `ZH_CLIENT_SOCKS`: the most recent accepted connections (an upgrade on an
/// older connection stays on the relay).
pub const ZH_MAX_CLIENTS: u32 = 32_768;

/// `ZeroHopTunnel::flags`: the daemon wrote the leftovers and the client socket's cookie
/// and address; the program may redirect (when every byte it passed has been relayed).
pub const ZH_PAIRED: u32 = 1;
/// `ZeroHopTunnel::flags`: the daemon is taking bytes out of the upstream socket and has
/// not yet written all of them into the client socket (its normal-hop relay splices
/// through a pipe): no redirect now, whatever U's `copied_seq` says.
pub const ZH_RELAYING: u32 = 2;

/// One registered zero-hop tunnel, as the daemon describes it. Written whole by the
/// daemon (an element swap, so the programs see the old or the new value, never a mix).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroHopTunnel {
    /// Cookie of the client socket D: its key in `ZH_PEERS` (the redirect target).
    pub client: u64,
    /// Kernel address of D (from `ZH_CLIENT_SOCKS`): the program reads D's send-buffer
    /// state through it.
    pub client_sk: u64,
    /// The app's listening port: the captured socket's local port must be this.
    pub target_port: u32,
    /// `ZH_*` flags above.
    pub flags: u32,
}

/// `ZeroHopStats::flags`: the capture program put the app's socket into `ZH_APPS`.
pub const ZH_CAPTURED: u32 = 1;
/// `ZeroHopStats::flags`: the last message was redirected; `expected_seq` is where the
/// client socket's `write_seq` stands if all of it went in.
pub const ZH_LAST_REDIRECTED: u32 = 2;
/// `ZeroHopStats::flags`: the app's first data left from a non-blocking socket.
pub const ZH_APP_NONBLOCKING: u32 = 4;
/// `ZeroHopStats::flags`: the app's first data left from a blocking socket, so the
/// capture program took the socket out of `ZH_APPS` at once (a blocking `recv()` on a
/// socket in a sockmap can fail with EAGAIN on this kernel; docs/zero-hop.md).
pub const ZH_APP_BLOCKING: u32 = 8;
/// `ZeroHopStats::flags`: the capture program set the app socket's `TCP_NOTSENT_LOWAT`.
pub const ZH_APP_LOWAT: u32 = 16;

/// What the programs saw and did for one tunnel. Written only by the programs (the
/// `sk_msg` runs under the app socket's lock, so one at a time per tunnel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroHopStats {
    /// Kernel address of the daemon's upstream socket U (seen when it connected): the
    /// program reads U's `copied_seq` through it.
    pub upstream_sk: u64,
    /// Kernel address of the app's socket A (seen when it was captured).
    pub app_sk: u64,
    /// `ZH_CAPTURED`, `ZH_LAST_REDIRECTED`, `ZH_APP_*`.
    pub flags: u32,
    /// Client socket's `write_seq` expected after the last redirect.
    pub expected_seq: u32,
    /// Bytes and messages redirected into the client socket.
    pub redirected_bytes: u64,
    pub redirects: u64,
    /// Bytes and messages passed to the normal hop.
    pub passed_bytes: u64,
    pub passes: u64,
    /// Passes, by reason: not paired yet; bytes passed earlier not yet relayed; client
    /// socket without room; a socket not in a sending state; the previous redirect was
    /// cut short by the kernel; the redirect helper refused.
    pub pass_unpaired: u64,
    pub pass_pending: u64,
    pub pass_full: u64,
    pub pass_state: u64,
    pub pass_partial: u64,
    pub pass_refused: u64,
    /// Largest message seen.
    pub max_msg: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for ZeroHopTunnel {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ZeroHopStats {}
