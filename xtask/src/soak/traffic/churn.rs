//! Constant connection churn: connections that carry one request and close, and
//! upgrades that live for one exchange and end cleanly or by a reset from either side.

use std::io::ErrorKind;
use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{bounded, http, pause, reset, steady_port, upgrade};
use crate::soak::record::Kind;
use crate::soak::wire::{self, path};
use crate::soak::Env;
use tests::pattern;

/// A new connection per request; a quarter ask for `Connection: close` and must see
/// the daemon close after the response, the rest are closed by the client.
pub async fn http(env: Arc<Env>, stop: CancellationToken, id: u64) {
    let mut rng = fastrand::Rng::with_seed(0x6368_7572 ^ id);
    while pause(&stop, env.load.http_churn_gap).await {
        let port = steady_port(&mut rng);
        let close = rng.u8(..4) == 0;
        let n = rng.usize(..=4096);
        let result = async {
            let (mut sender, driver) = http::open(&env).await?;
            let bytes = http::get_small(&mut sender, port, n, close).await?;
            if close {
                bounded("close by the daemon after Connection: close", async {
                    Ok(driver.await?)
                })
                .await?;
            }
            anyhow::Ok(bytes)
        }
        .await;
        match result {
            Ok(bytes) => env.record.ok(Kind::HttpChurn, u64::from(close), bytes),
            Err(e) => env
                .record
                .fail(Kind::HttpChurn, format!("port {port}: {e:#}")),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Ending {
    /// Echo, then the client's FIN; the upstream's FIN must come back.
    Clean,
    /// Echo, then the client resets.
    ClientReset,
    /// The client sends and resets at once, bytes still in flight.
    ResetInFlight,
    /// Echo, then the upstream resets; the client must see the connection end.
    UpstreamReset,
}

/// Short-lived upgrades on raw tunnels.
pub async fn upgrades(env: Arc<Env>, stop: CancellationToken, id: u64) {
    let mut rng = fastrand::Rng::with_seed(0x7570_6772 ^ id);
    while pause(&stop, env.load.upgrade_churn_gap).await {
        let port = steady_port(&mut rng);
        let ending = match rng.u8(..20) {
            0..8 => Ending::Clean,
            8..13 => Ending::ClientReset,
            13..16 => Ending::ResetInFlight,
            _ => Ending::UpstreamReset,
        };
        let n = rng.usize(1..=8192);
        match exchange(&env, port, ending, n).await {
            Ok(bytes) => env.record.ok(
                Kind::UpgradeChurn,
                u64::from(!matches!(ending, Ending::Clean)),
                bytes,
            ),
            Err(e) => env.record.fail(
                Kind::UpgradeChurn,
                format!("port {port}, {ending:?}: {e:#}"),
            ),
        }
    }
}

/// One upgrade; returns the bytes checked.
async fn exchange(env: &Env, port: u16, ending: Ending, n: usize) -> Result<u64> {
    let route = match ending {
        Ending::UpstreamReset => path::raw_reset(n),
        _ => path::RAW_ECHO.to_owned(),
    };
    let (mut stream, early) = upgrade(env, port, &route).await?;
    ensure!(
        early.is_empty(),
        "{} bytes before the client sent any",
        early.len()
    );
    let seed = wire::next_seed();
    let data = pattern::bytes(seed, n);
    bounded("write", async { Ok(stream.write_all(&data).await?) }).await?;
    if let Ending::ResetInFlight = ending {
        reset(stream);
        return Ok(0);
    }
    let mut echo = vec![0u8; n];
    bounded("echo", async { Ok(stream.read_exact(&mut echo).await?) }).await?;
    pattern::check(seed, 0, &echo)
        .map_err(|at| anyhow::anyhow!("echo: wrong byte at offset {at}"))?;
    match ending {
        Ending::Clean => {
            stream.shutdown().await?;
            expect_end(&mut stream, false).await?;
        }
        Ending::ClientReset => reset(stream),
        Ending::UpstreamReset => {
            bounded("write", async { Ok(stream.write_all(b"R").await?) }).await?;
            expect_end(&mut stream, true).await?;
        }
        Ending::ResetInFlight => unreachable!(),
    }
    Ok(n as u64)
}

/// Waits for the connection's end: EOF, or also a reset when `reset_ok`. Any byte is
/// wrong: the echo was complete.
async fn expect_end(stream: &mut TcpStream, reset_ok: bool) -> Result<()> {
    let mut buf = [0u8; 1024];
    let n = bounded("end of the connection", async {
        match stream.read(&mut buf).await {
            Ok(n) => Ok(n),
            Err(e) if reset_ok && e.kind() == ErrorKind::ConnectionReset => Ok(0),
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    if n > 0 {
        bail!("{n} unexpected bytes after the echo");
    }
    Ok(())
}
