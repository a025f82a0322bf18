//! The fast-path tunnel harness (SPEC §4), shared by `tests/tests/fastpath.rs` and the
//! measurements of `cargo xtask measure` (`src/bin/fastpath_measure.rs`).
//!
//! - [`Rig`]: the real daemon in the machine namespace of a client/machine topology, with
//!   the closing-line check every test ends with and readers of its fast-path maps.
//! - [`Upstream`]: the in-process upstream app on the machine's loopback; it plays its end
//!   of a planned tunnel ([`Plan`], [`play`]) checking every byte, echoes, resets, or
//!   hands its socket to the test.
//! - [`tunnel`]: the client end: open a tunnel, run a plan, play both ends, read checked
//!   bytes and how a stream ended, wait until the daemon holds nothing more.
//! - [`faults`] and [`system`]: the daemon's fd limit squeezed, SIGCONT on drop; the
//!   machine's available memory, TCP socket memory and busy CPU.
//!
//! Environment knobs (read by [`mode`], [`torture`] and [`Rig`]):
//! - `FASTPATH_SPLICE`: mode under test (default `ebpf`; `off` runs the same suite on the
//!   userspace relay).
//! - `FASTPATH_TORTURE=1`: longer repetitions.
//! - `FASTPATH_DAEMON_LOG`: the daemon's `RUST_LOG` (default `info`).
//! - `FASTPATH_ECHO_LOG=1`: echo daemon log lines to stderr as they come;
//!   `SHOW_DAEMON_LOGS=1` prints the whole log when each daemon stops (the harness always
//!   does when a test fails).

pub mod faults;
mod maps;
mod plan;
mod rig;
pub mod system;
pub mod tunnel;
mod upstream;

pub use maps::{MapEntries, DIRECTION_MAP, SOCKET_MAPS};
pub use plan::{play, End, Plan};
pub use rig::Rig;
pub use upstream::{raw_exchange, Handed, Results, Upstream, HOLD};

/// Errors of tunnel plays: whatever failed (I/O, a wrong byte, the peer's verdict).
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

pub const MIB: u64 = 1 << 20;

/// Stream seed salts: client → upstream bytes use `seed ^ UP`, upstream → client
/// `seed ^ DOWN`, so the two directions of a tunnel never carry the same stream.
pub const UP: u64 = 0x5555;
pub const DOWN: u64 = 0xAAAA;

/// `FASTPATH_TORTURE`: longer repetitions.
pub fn torture() -> bool {
    std::env::var_os("FASTPATH_TORTURE").is_some_and(|v| v != "0")
}

/// `FASTPATH_SPLICE`: the daemon's `--splice` mode under test (default `ebpf`).
pub fn mode() -> String {
    std::env::var("FASTPATH_SPLICE").unwrap_or_else(|_| "ebpf".into())
}
