//! A live tunnel's state as it moves to a successor process (`takeover`): sent as the
//! JSON of a `ToNew::Tunnel` message, with the bytes its relays held as the message's
//! blob and its two sockets as the message's descriptors.

use serde::{Deserialize, Serialize};

/// Everything a successor needs to continue a tunnel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelState {
    pub request_id: String,
    pub port: u16,
    /// When the tunnel opened (Unix epoch, milliseconds).
    pub opened_unix_ms: u64,
    /// Takeovers this tunnel has gone through, this one included.
    pub takeovers: u32,
    pub client_to_upstream: DirectionState,
    pub upstream_to_client: DirectionState,
    /// Cookies of the tunnel's sockets in the fast path's `TARGETS` map (they leave it
    /// when the tunnel ends).
    pub targets: Vec<u64>,
    /// The tunnel-wide kernel counters so far.
    pub kernel_queue_peak: u64,
    pub kernel_dropped: u64,
    pub kernel_misparsed: u64,
}

impl TunnelState {
    /// Bytes of the message's blob: the held bytes of client → upstream, then those of
    /// upstream → client.
    pub fn blob_len(&self) -> usize {
        self.client_to_upstream.held + self.upstream_to_client.held
    }
}

/// Where one direction stands and how it continues.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirectionState {
    pub path: PathState,
    /// Bytes read from the source and not yet written to the destination (hyper's
    /// leftovers not yet written, a copy buffer, the contents of a splice pipe): the
    /// successor writes them before anything else of this direction.
    pub held: usize,
    /// The direction's entries in the fast path's maps, if it has any: while the kernel
    /// splices it, and after it left the kernel (they are removed when the tunnel ends).
    pub kernel: Option<KernelWay>,
    pub counters: DirectionCountersState,
}

/// The data path a direction is on. A new data path joins as a new variant; the
/// successor must know how to continue it (`tunnel::resume`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathState {
    /// No relay has started: hyper's leftovers (`held`) are still being written. The
    /// successor starts the tunnel as if it were new.
    Start,
    /// The kernel splices it (its source is in `SOCKS`, or a hand-off to userspace was
    /// requested, which the ledger records and the successor carries out).
    Kernel,
    /// The daemon relays it with splice(2).
    Splice,
    /// The daemon relays it with read(2)/write(2).
    Copy,
    /// EOF was passed on (`shutdown(SHUT_WR)` of the destination): nothing more moves.
    Closed,
}

/// A direction's fast-path registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelWay {
    /// Cookie of the source socket (the key in `SOCKS`, `TARGETS` and `DIRECTIONS`).
    pub cookie: u64,
    /// Its `LEDGER` slot.
    pub slot: u32,
    /// The destination's send-stream position before anything was redirected into it.
    pub to_base: u64,
    /// The source's receive position when the kernel took it over.
    pub from_base: u64,
}

/// A direction's byte counters so far (see `tunnel::counters`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionCountersState {
    pub copied: u64,
    pub spliced: u64,
    /// Kernel bytes of a kernel stint that ended (those of a direction still in the
    /// kernel are read from the maps).
    pub kernel: u64,
    pub paths: u8,
    pub handoff: u8,
    pub kernel_lost: u64,
    /// Bytes zero-hop put into the destination before the tunnel was switched back to
    /// the normal hop for the hand-over (absent from older daemons).
    #[serde(default)]
    pub zero_hop: u64,
}
