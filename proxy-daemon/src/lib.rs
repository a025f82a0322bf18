//! The project ingress proxy daemon. Read in this order:
//!
//! 1. `server::connection`: a client connection, request after request, in phases.
//! 2. `admission`: the request filter (health, request target, secret, target port).
//! 3. `forward`: the upstream pool and the exchange that relays one request.
//! 4. `tunnel`: what a 101 turns both connections into.
//!
//! `http1` is the HTTP/1.1 codec (pure, no I/O); `daemon` starts and stops it all.

pub mod admin;
pub mod admission;
pub mod auth;
pub mod config;
pub mod daemon;
pub mod forward;
pub mod http1;
pub mod io;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod panic;
pub mod request_id;
pub mod server;
pub mod takeover;
pub mod target;
pub mod test_fault;
pub mod tunnel;
