//! The project ingress proxy daemon. `proxy` is the request path; read it first.

pub mod auth;
pub mod body;
pub mod config;
pub mod framing;
pub mod headers;
pub mod logging;
pub mod proxy;
pub mod responses;
pub mod server;
pub mod target;
pub mod tunnel;
pub mod upgrade;
pub mod upstream;
