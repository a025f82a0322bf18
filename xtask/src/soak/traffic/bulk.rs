//! Bulk tunnels: after the upgrade, pattern bytes both ways at a paced rate (or one way);
//! the client half-closes after its last byte, the upstream checks what it got and
//! answers with a verdict after its own last byte, then closes. The client checks every
//! byte, the verdict, and that nothing follows it.

use std::sync::Arc;

use anyhow::{ensure, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{bounded, pause, send_pattern, steady_port, upgrade};
use crate::soak::record::Kind;
use crate::soak::wire::{self, path};
use crate::soak::Env;
use tests::pattern::Verifier;

pub async fn run(env: Arc<Env>, stop: CancellationToken, id: u64) {
    let mut rng = fastrand::Rng::with_seed(0x6275_6C6B ^ id);
    while pause(&stop, std::time::Duration::from_millis(rng.u64(50..500))).await {
        let port = steady_port(&mut rng);
        let size = |rng: &mut fastrand::Rng| rng.u64(1..=env.load.bulk_max);
        let (down, up) = match rng.u8(..10) {
            0 | 1 => (size(&mut rng), 0),
            2 | 3 => (0, size(&mut rng)),
            _ => (size(&mut rng), size(&mut rng)),
        };
        match tunnel(&env, port, down, up).await {
            // The upstream counts the bytes it checked.
            Ok(()) => env
                .record
                .ok(Kind::Bulk, u64::from(down > 0 && up > 0), down),
            Err(e) => env.record.fail(
                Kind::Bulk,
                format!("port {port}, {down} down / {up} up: {e:#}"),
            ),
        }
    }
}

async fn tunnel(env: &Env, port: u16, down: u64, up: u64) -> Result<()> {
    let seed = wire::next_seed();
    let rate = env.load.bulk_rate;
    let (stream, early) = upgrade(env, port, &path::bulk(seed, down, up, rate)).await?;
    let (mut rd, mut wr) = stream.into_split();
    let writer = async {
        send_pattern(&mut wr, wire::up_seed(seed), up, rate).await?;
        wr.shutdown().await?;
        anyhow::Ok(())
    };
    let reader = async {
        let mut incoming = Incoming::new(seed, down);
        incoming.feed(&early)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = bounded("tunnel bytes", async { Ok(rd.read(&mut buf).await?) }).await?;
            if n == 0 {
                break;
            }
            incoming.feed(&buf[..n])?;
        }
        incoming.end()
    };
    let (sent, received) = tokio::join!(writer, reader);
    sent?;
    received
}

/// What the client receives: `down` pattern bytes, then the 2-byte verdict, then EOF.
struct Incoming {
    verifier: Verifier,
    down: u64,
    tail: Vec<u8>,
}

impl Incoming {
    fn new(seed: u64, down: u64) -> Self {
        Incoming {
            verifier: Verifier::new(wire::down_seed(seed)),
            down,
            tail: Vec::new(),
        }
    }

    fn feed(&mut self, buf: &[u8]) -> Result<()> {
        let room = (self.down - self.verifier.received).min(buf.len() as u64) as usize;
        self.verifier.feed(&buf[..room])?;
        self.tail.extend_from_slice(&buf[room..]);
        ensure!(
            self.tail.len() <= 2,
            "{} bytes after the {} expected (duplication?)",
            self.tail.len(),
            self.down
        );
        Ok(())
    }

    fn end(self) -> Result<()> {
        ensure!(
            self.verifier.received == self.down,
            "EOF after {} of {} bytes (truncation)",
            self.verifier.received,
            self.down
        );
        ensure!(
            self.tail == wire::VERDICT_OK,
            "the upstream's verdict: {:?} (it saw wrong or missing bytes)",
            String::from_utf8_lossy(&self.tail)
        );
        Ok(())
    }
}
