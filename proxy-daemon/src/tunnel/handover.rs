//! A live tunnel's state as it moves to a successor process (`takeover`).

use serde::{Deserialize, Serialize};

/// Everything a successor needs to continue a tunnel; its two sockets travel alongside.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelState {
    pub request_id: String,
    pub port: u16,
    /// When the tunnel opened (Unix epoch, milliseconds).
    pub opened_unix_ms: u64,
}
