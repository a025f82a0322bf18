//! Types shared by the eBPF programs (`proxy-ebpf`) and the daemon's loader.
//! `no_std` so the kernel side can use them; `#[repr(C)]` so both sides agree on layout.
#![no_std]

/// Name of the SOCKHASH holding both sockets of every spliced tunnel, keyed by socket cookie.
pub const SOCKS_MAP: &str = "SOCKS";
/// Name of the hash map of [`Direction`]s, keyed by the cookie of the socket bytes come from.
pub const DIRECTIONS_MAP: &str = "DIRECTIONS";
/// Name of the read-only global the loader sets to `offsetof(struct tcp_sock, write_seq)`
/// of the running kernel (read from its BTF).
pub const WRITE_SEQ_OFFSET_GLOBAL: &str = "TCP_SOCK_WRITE_SEQ_OFFSET";
/// Capacity of both maps (two entries per tunnel).
pub const MAX_SOCKETS: u32 = 131_072;

/// `Direction::flags`: `base_seq` holds the peer's `write_seq` at the first redirect.
pub const FLAG_BASE_SET: u32 = 1;
/// `Direction::flags`: the budget was exceeded; every later byte of this direction is
/// passed to the source socket's own queue (for good) and relayed by the daemon.
pub const FLAG_PASSING: u32 = 2;
/// `Direction::flags`: the peer could not be looked up (tunnel being torn down).
pub const FLAG_PEER_GONE: u32 = 4;

/// One direction of a tunnel, keyed by the cookie of the socket its bytes arrive on.
///
/// The daemon writes `peer` and `budget` before either socket enters the SOCKHASH; only
/// the stream verdict of the source socket writes the rest (strparser runs it serialised
/// per socket), the daemon reads them.
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
    pub _pad: u32,
    /// Bytes redirected to the peer.
    pub redirected: u64,
    /// Bytes passed to the source socket itself (after the budget flip).
    pub passed: u64,
    /// Bytes the redirect helper refused (must stay 0 while the tunnel is up).
    pub dropped: u64,
    /// Highest number of redirected bytes seen outside the peer's TCP stream.
    pub max_outstanding: u64,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Direction {}
