//! Types shared by the eBPF programs (`proxy-ebpf`) and the daemon's loader.
//! `no_std` so the kernel side can use them; `#[repr(C)]` so both sides agree on layout.
#![no_std]

/// Name of the SOCKHASH (parser and verdict attached) holding the sockets whose incoming
/// bytes are spliced, keyed by socket cookie.
pub const SOCKS_MAP: &str = "SOCKS";
/// Name of the SOCKHASH (no programs) holding every socket of a spliced tunnel: the
/// verdict redirects into it, and it keeps a socket's psock (and the bytes queued for
/// it) alive after the socket leaves `SOCKS`.
pub const TARGETS_MAP: &str = "TARGETS";
/// Name of the ring buffer of cookies (u64) of sockets whose direction went over budget.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the hash map of [`Direction`]s, keyed by the cookie of the socket bytes come from.
pub const DIRECTIONS_MAP: &str = "DIRECTIONS";
/// Name of the read-only global the loader sets to `offsetof(struct tcp_sock, write_seq)`
/// of the running kernel (read from its BTF).
pub const WRITE_SEQ_OFFSET_GLOBAL: &str = "TCP_SOCK_WRITE_SEQ_OFFSET";
/// Name of the read-only global the loader sets to `offsetof(struct tcp_sock, copied_seq)`.
pub const COPIED_SEQ_OFFSET_GLOBAL: &str = "TCP_SOCK_COPIED_SEQ_OFFSET";
/// Capacity of the maps (two entries per tunnel).
pub const MAX_SOCKETS: u32 = 131_072;

/// `Direction::flags`: `base_seq` holds the peer's `write_seq` at the first redirect.
pub const FLAG_BASE_SET: u32 = 1;
/// `Direction::flags`: the budget was exceeded and the daemon was told (once) to take
/// this direction over; the verdict keeps redirecting until it does.
pub const FLAG_OVER_BUDGET: u32 = 2;
/// `Direction::flags`: the peer could not be looked up (tunnel being torn down).
pub const FLAG_PEER_GONE: u32 = 4;
/// `Direction::flags`: `next_seq` holds where the stream parser's next message starts.
pub const FLAG_SEQ_SET: u32 = 8;

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
    /// TCP sequence number of the first byte the stream parser has not yet handed out
    /// (its messages must start there, whatever offset strparser is at in an skb).
    pub next_seq: u32,
    /// Bytes redirected to the peer.
    pub redirected: u64,
    /// Unused (the verdict never passes bytes to the source socket).
    pub passed: u64,
    /// Bytes the redirect helper refused (must stay 0 while the tunnel is up).
    pub dropped: u64,
    /// Highest number of redirected bytes seen outside the peer's TCP stream.
    pub max_outstanding: u64,
    /// Length of the message the parser just handed to the verdict.
    pub msg_len: u32,
    /// skbs whose sequence numbers did not match `next_seq` (must stay 0).
    pub misparsed: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Direction {}
