//! A planned tunnel: how many checked bytes go each way, which of them ride with the
//! handshake, who half-closes first and who reads slowly; and how one end plays its part.
//! The client sends the plan to the upstream as its request path (`/stream/...`).

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{DOWN, UP};
use crate::pattern::{self, Verifier};

#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub seed: u64,
    /// Bytes client → upstream.
    pub up: u64,
    /// Bytes upstream → client.
    pub down: u64,
    /// Upstream bytes sent together with the 101 (hyper's leftover on that side).
    pub upstream_pre: u64,
    /// Client bytes sent together with the request (leftover on the client side).
    pub client_pre: u64,
    /// Upstream starts sending only after the client's EOF (half-close client first).
    pub down_after_eof: bool,
    /// Client starts sending only after the upstream's EOF.
    pub up_after_eof: bool,
    /// Upstream reader stalls this long before reading (slow reader).
    pub upstream_stall_ms: u64,
    /// Client reader stalls this long.
    pub client_stall_ms: u64,
}

impl Plan {
    /// `up` bytes client → upstream and `down` back, both sent at once, nothing early.
    pub fn new(seed: u64, up: u64, down: u64) -> Plan {
        Plan {
            seed,
            up,
            down,
            upstream_pre: 0,
            client_pre: 0,
            down_after_eof: false,
            up_after_eof: false,
            upstream_stall_ms: 0,
            client_stall_ms: 0,
        }
    }

    /// The request path that tells the upstream its part.
    pub fn path(&self) -> String {
        format!(
            "/stream/{}/{}/{}/{}/{}/{}/{}",
            self.seed,
            self.up,
            self.down,
            self.upstream_pre,
            self.down_after_eof as u8,
            self.upstream_stall_ms,
            self.client_pre
        )
    }

    /// The upstream's side of the plan back from [`Plan::path`].
    pub fn parse(path: &str) -> Option<Plan> {
        let p: Vec<&str> = path.strip_prefix("/stream/")?.split('/').collect();
        let mut plan = Plan::new(p[0].parse().ok()?, p[1].parse().ok()?, p[2].parse().ok()?);
        plan.upstream_pre = p[3].parse().ok()?;
        plan.down_after_eof = p[4] == "1";
        plan.upstream_stall_ms = p[5].parse().ok()?;
        plan.client_pre = p[6].parse().ok()?;
        Some(plan)
    }

    /// The client's end: it sends `up` (the first `client_pre` bytes went with the
    /// handshake) and checks `down`.
    pub fn client_end<'a>(&self, early: &'a [u8]) -> End<'a> {
        End {
            who: "client",
            recv_seed: self.seed ^ DOWN,
            recv_len: self.down,
            early,
            stall_ms: self.client_stall_ms,
            send_seed: self.seed ^ UP,
            send_from: self.client_pre,
            send_to: self.up,
            send_after_eof: self.up_after_eof,
        }
    }

    /// The upstream's end, the mirror of [`Plan::client_end`].
    pub fn upstream_end<'a>(&self, early: &'a [u8]) -> End<'a> {
        End {
            who: "upstream",
            recv_seed: self.seed ^ UP,
            recv_len: self.up,
            early,
            stall_ms: self.upstream_stall_ms,
            send_seed: self.seed ^ DOWN,
            send_from: self.upstream_pre,
            send_to: self.down,
            send_after_eof: self.down_after_eof,
        }
    }
}

/// One end of a planned tunnel.
pub struct End<'a> {
    pub who: &'static str,
    /// The stream coming in: its seed and total length, and the bytes of it that
    /// arrived together with the handshake.
    pub recv_seed: u64,
    pub recv_len: u64,
    pub early: &'a [u8],
    /// Wait this long before reading (slow reader).
    pub stall_ms: u64,
    /// The stream going out: bytes `send_from..send_to` (the ones before went with the
    /// handshake), then a half-close.
    pub send_seed: u64,
    pub send_from: u64,
    pub send_to: u64,
    /// Start sending only once the incoming stream has ended.
    pub send_after_eof: bool,
}

/// Plays one end of a tunnel: every incoming byte and the EOF checked, the outgoing
/// stream sent, both at once.
pub async fn play(s: TcpStream, end: End<'_>) -> std::result::Result<(), String> {
    let (mut r, mut w) = s.into_split();
    let (eof_tx, eof_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = async {
        let mut v = Verifier::new(end.recv_seed);
        v.feed(end.early).map_err(|e| e.to_string())?;
        if end.stall_ms > 0 {
            tokio::time::sleep(Duration::from_millis(end.stall_ms)).await;
        }
        let r = pattern::receive(&mut r, &mut v, end.recv_len).await;
        let _ = eof_tx.send(());
        r.map(|_| ())
            .map_err(|e| format!("{} receiving: {e}", end.who))
    };
    let writer = async {
        if end.send_after_eof {
            let _ = eof_rx.await;
        }
        pattern::send(&mut w, end.send_seed, end.send_from, end.send_to).await?;
        w.shutdown().await
    };
    let (a, b) = tokio::join!(reader, writer);
    a?;
    b.map_err(|e| format!("{} sending: {e}", end.who))
}
