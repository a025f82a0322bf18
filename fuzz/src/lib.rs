//! Shared parts of the fuzz targets in `fuzz_targets/` (run them with `cargo xtask fuzz`).
//!
//! - [`grammar`]: SPEC §2's target grammar, written again from the SPEC's text.
//! - [`fields`]: a plain httparse view of a head, for checks that must not reuse the
//!   daemon's own classification.
//! - [`rewrite`]: the invariants of the upstream request head the daemon writes.
//! - [`ours`] and [`hyper_side`]: one connection's bytes read request after request by the
//!   daemon's codec and by hyper's HTTP/1 server; [`compare`] holds them side by side.
//! - [`front`]: an in-process daemon with a recording upstream, in a private network
//!   namespace.

pub mod compare;
pub mod fields;
pub mod front;
pub mod grammar;
pub mod hyper_side;
pub mod ours;
pub mod rewrite;

/// Bytes as text for a failure message.
pub fn show(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}
