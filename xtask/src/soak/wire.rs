//! What the soak's clients and its upstream app agree on: ports, request paths, and the
//! bytes of every body, SSE event and tunnel stream. All bytes come from
//! `tests::pattern` streams named by a seed, so whichever end receives them can check
//! every one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tests::pattern;

/// The daemon's default listen port (it runs with default flags).
pub const PROXY_PORT: u16 = 8080;
/// The daemon's default admin address, inside the machine namespace.
pub const ADMIN_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 9180);

/// Upstream ports that keep idle keep-alive connections open: small requests, SSE,
/// WebSocket, tunnels and churn spread over them.
pub const STEADY_PORTS: [u16; 4] = [9101, 9102, 9103, 9104];
/// Closes a keep-alive connection after this long idle, without warning (a reset when
/// a request was already on its way): a server whose timer is shorter than the pool's.
pub const SILENT_CLOSE_PORT: u16 = 9105;
pub const SILENT_IDLE: Duration = Duration::from_secs(1);
/// Announces `Keep-Alive: timeout=2` and closes after 2 s idle (Node does this at 5 s).
pub const ANNOUNCED_CLOSE_PORT: u16 = 9106;
pub const ANNOUNCED_IDLE: Duration = Duration::from_secs(2);

pub const ALL_PORTS: [u16; 6] = [
    STEADY_PORTS[0],
    STEADY_PORTS[1],
    STEADY_PORTS[2],
    STEADY_PORTS[3],
    SILENT_CLOSE_PORT,
    ANNOUNCED_CLOSE_PORT,
];

/// How an upstream port treats idle keep-alive connections.
#[derive(Clone, Copy, Debug)]
pub enum IdleClose {
    Never,
    Silently(Duration),
    Announced(Duration),
}

pub fn idle_close(port: u16) -> IdleClose {
    match port {
        SILENT_CLOSE_PORT => IdleClose::Silently(SILENT_IDLE),
        ANNOUNCED_CLOSE_PORT => IdleClose::Announced(ANNOUNCED_IDLE),
        _ => IdleClose::Never,
    }
}

/// The routing header's value for an upstream port.
pub fn target(port: u16) -> String {
    format!("localhost:{port}")
}

/// A seed no other operation of this run uses.
pub fn next_seed() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0x50A4_0000);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The stream a tunnel's upstream sends to its client.
pub fn down_seed(seed: u64) -> u64 {
    seed.wrapping_mul(2)
}

/// The stream a tunnel's client sends to its upstream.
pub fn up_seed(seed: u64) -> u64 {
    seed.wrapping_mul(2) | 1
}

/// What a tunnel's upstream sends after its last pattern byte: whether every byte it
/// received was right.
pub const VERDICT_OK: &[u8; 2] = b"OK";
pub const VERDICT_WRONG: &[u8; 2] = b"ER";

/// SSE event `i` of stream `seed`: an id and a hex payload of 16–255 pattern bytes.
pub fn sse_event(seed: u64, i: u32) -> String {
    let len = 16 + pattern::byte_at(seed ^ 0x55E, u64::from(i)) as usize % 240;
    let mut data = vec![0u8; len];
    pattern::fill(seed, u64::from(i) * 256, &mut data);
    let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
    format!("id: {i}\ndata: {hex}\n\n")
}

/// A WebSocket text message's content: hex of pattern bytes (text must be UTF-8).
pub fn text_payload(seed: u64, len: usize) -> String {
    pattern::bytes(seed, len.div_ceil(2))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..len]
        .to_owned()
}

/// Request paths (the upstream app parses the same shapes).
pub mod path {
    /// `n` pattern bytes of stream `seed`, with Content-Length.
    pub fn small(seed: u64, n: usize) -> String {
        format!("/small/{seed}/{n}")
    }
    /// POST: the request body comes back as the response body.
    pub const ECHO: &str = "/echo";
    /// `events` SSE events of stream `seed`, `interval_ms` apart.
    pub fn sse(seed: u64, events: u32, interval_ms: u64) -> String {
        format!("/sse/{seed}/{events}/{interval_ms}")
    }
    /// Upgrade: WebSocket echo.
    pub const WS: &str = "/ws";
    /// Upgrade: raw tunnel; `down` bytes to the client and `up` checked from it, each
    /// way at most `rate` bytes/s, then the upstream's verdict and a clean close.
    pub fn bulk(seed: u64, down: u64, up: u64, rate: u64) -> String {
        format!("/bulk/{seed}/{down}/{up}/{rate}")
    }
    /// Upgrade: raw echo until the client's EOF, then EOF back.
    pub const RAW_ECHO: &str = "/raw/echo";
    /// Upgrade: echoes `n` bytes, then resets the connection on the next byte.
    pub fn raw_reset(n: usize) -> String {
        format!("/raw/reset/{n}")
    }
}
