//! The clients: one module per traffic kind, each a set of loops in the client namespace
//! that run operations against the daemon until told to stop, check every byte, and
//! record each operation or failure. Every wait is bounded (`bounded`): a wait that runs
//! out is a stall, recorded as a failure. Rates are fixed (`Load`), so the load is the
//! same whatever the daemon's speed.

mod bulk;
mod churn;
mod http;
mod keepalive;
mod pool_churn;
mod sse;
mod websocket;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::record::Kind;
use super::Env;
use tests::pattern;

/// How much of each kind runs at once, and how fast.
#[derive(Clone, Debug)]
pub struct Load {
    /// Keep-alive connections sending small GETs and POSTs.
    pub keepalive_conns: usize,
    /// Pause between two requests of one keep-alive connection.
    pub keepalive_gap: Duration,
    /// Connections to each idle-closing port, with requests spaced around its idle timer.
    pub pool_churn_conns: usize,
    /// SSE streams open at once.
    pub sse_streams: usize,
    /// WebSocket sessions open at once.
    pub ws_sessions: usize,
    /// Pause between two messages of a WebSocket session.
    pub ws_gap: Duration,
    /// Bulk tunnels open at once.
    pub bulk_tunnels: usize,
    /// Bytes per second each way of a bulk tunnel.
    pub bulk_rate: u64,
    /// Largest transfer one way of a bulk tunnel.
    pub bulk_max: u64,
    /// Pause between two one-request connections (each of two loops).
    pub http_churn_gap: Duration,
    /// Pause between two short-lived upgrades (each of two loops).
    pub upgrade_churn_gap: Duration,
}

impl Load {
    /// The standard mix: about half of one core for the clients and the upstream app
    /// together (measured in the report).
    pub fn standard() -> Load {
        Load {
            keepalive_conns: 12,
            keepalive_gap: Duration::from_millis(8),
            pool_churn_conns: 2,
            sse_streams: 8,
            ws_sessions: 14,
            ws_gap: Duration::from_millis(15),
            bulk_tunnels: 4,
            bulk_rate: 20 << 20,
            bulk_max: 32 << 20,
            http_churn_gap: Duration::from_millis(20),
            upgrade_churn_gap: Duration::from_millis(40),
        }
    }

    /// One line per kind, for the report.
    pub fn describe(&self) -> Vec<String> {
        let ms = |d: Duration| d.as_millis();
        vec![
            format!(
                "{}: {} connections, one request every {} ms each, to the 4 steady ports: 60% GET of 0–16 KiB, 40% POST echo of 0–64 KiB (half of them chunked)",
                Kind::KeepAlive.name(), self.keepalive_conns, ms(self.keepalive_gap)
            ),
            format!(
                "{}: {} connections to each idle-closing port (closes after {} s silently; announces `Keep-Alive: timeout={}` and closes after it), requests spaced 0.9–1.1 × its idle time, GET or POST",
                Kind::PoolChurn.name(), self.pool_churn_conns, super::wire::SILENT_IDLE.as_secs(), super::wire::ANNOUNCED_IDLE.as_secs()
            ),
            format!(
                "{}: {} streams at once, 10–60 events each 10–50 ms apart, on keep-alive connections (a new one every 10 streams)",
                Kind::Sse.name(), self.sse_streams
            ),
            format!(
                "{}: {} sessions at once, 10–200 messages each one every {} ms (text or binary, 1 B–2 KiB, one in ten up to 64 KiB), closing handshake",
                Kind::WebSocket.name(), self.ws_sessions, ms(self.ws_gap)
            ),
            format!(
                "{}: {} tunnels at once, up to {} MiB each way at {} MiB/s each way (one way or both), half-close, the upstream's verdict",
                Kind::Bulk.name(), self.bulk_tunnels, self.bulk_max >> 20, self.bulk_rate >> 20
            ),
            format!(
                "{}: 2 loops, a connection every {} ms each: one GET, then close (a quarter with `Connection: close`, waiting for the daemon's close)",
                Kind::HttpChurn.name(), ms(self.http_churn_gap)
            ),
            format!(
                "{}: 2 loops, an upgrade every {} ms each: echo then clean close (40%), echo then client reset (25%), reset with bytes in flight (15%), upstream reset (20%)",
                Kind::UpgradeChurn.name(), ms(self.upgrade_churn_gap)
            ),
        ]
    }
}

/// Runs every kind for `length` (or until the run is aborted), then stops the loops;
/// each ends its current operation first (all of them bounded).
pub async fn run_phase(env: &Arc<Env>, length: Duration) {
    let stop = CancellationToken::new();
    let load = &env.load;
    let mut loops = Vec::new();
    for i in 0..load.keepalive_conns {
        loops.push(tokio::spawn(keepalive::run(
            env.clone(),
            stop.clone(),
            i as u64,
        )));
    }
    for i in 0..load.pool_churn_conns {
        for port in [
            super::wire::SILENT_CLOSE_PORT,
            super::wire::ANNOUNCED_CLOSE_PORT,
        ] {
            loops.push(tokio::spawn(pool_churn::run(
                env.clone(),
                stop.clone(),
                port,
                i as u64,
            )));
        }
    }
    for i in 0..load.sse_streams {
        loops.push(tokio::spawn(sse::run(env.clone(), stop.clone(), i as u64)));
    }
    for i in 0..load.ws_sessions {
        loops.push(tokio::spawn(websocket::run(
            env.clone(),
            stop.clone(),
            i as u64,
        )));
    }
    for i in 0..load.bulk_tunnels {
        loops.push(tokio::spawn(bulk::run(env.clone(), stop.clone(), i as u64)));
    }
    for i in 0..2 {
        loops.push(tokio::spawn(churn::http(env.clone(), stop.clone(), i)));
        loops.push(tokio::spawn(churn::upgrades(env.clone(), stop.clone(), i)));
    }
    tokio::select! {
        _ = tokio::time::sleep(length) => {}
        _ = env.abort.cancelled() => {}
    }
    stop.cancel();
    // The longest operation left is a bulk tunnel finishing at its paced rate.
    let limit = Duration::from_secs(30) + Duration::from_secs(2 * load.bulk_max / load.bulk_rate);
    let all = futures_util::future::join_all(loops.iter_mut());
    if tokio::time::timeout(limit, all).await.is_err() {
        env.record.fail(
            Kind::Monitor,
            format!("traffic loops did not stop within {limit:?} of the end of the phase"),
        );
        for l in &loops {
            l.abort();
        }
    }
}

/// Longest wait for any single step (connect, a response head, a frame, an echo, a
/// write): beyond it the step has stalled.
pub const STALL: Duration = Duration::from_secs(15);

/// `fut`, or a "stalled" error after `STALL`.
pub async fn bounded<T>(what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(STALL, fut).await {
        Ok(r) => r,
        Err(_) => bail!("stalled: no {what} within {STALL:?}"),
    }
}

/// A new connection to the daemon from the client namespace.
pub async fn connect(env: &Env) -> Result<TcpStream> {
    bounded("connection", env.topo.client.connect(env.daemon_addr)).await
}

/// Sleeps `gap`, or returns `false` at once when the loop must stop.
pub async fn pause(stop: &CancellationToken, gap: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(gap) => !stop.is_cancelled(),
        _ = stop.cancelled() => false,
    }
}

/// Keeps a sender under `rate` bytes per second.
pub struct Pacer {
    start: Instant,
    rate: u64,
    sent: u64,
}

impl Pacer {
    pub fn new(rate: u64) -> Pacer {
        Pacer {
            start: Instant::now(),
            rate: rate.max(1),
            sent: 0,
        }
    }

    /// Counts `n` bytes sent and waits until the rate allows more.
    pub async fn sent(&mut self, n: u64) {
        self.sent += n;
        let due = Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// Writes bytes `0..n` of stream `seed` at most `rate` bytes/s, each write bounded.
pub async fn send_pattern<W: AsyncWrite + Unpin>(
    w: &mut W,
    seed: u64,
    n: u64,
    rate: u64,
) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pacer = Pacer::new(rate);
    let mut at = 0u64;
    while at < n {
        let k = (n - at).min(buf.len() as u64) as usize;
        pattern::fill(seed, at, &mut buf[..k]);
        bounded("progress writing", async {
            w.write_all(&buf[..k]).await.map_err(anyhow::Error::from)
        })
        .await
        .with_context(|| format!("after {at} of {n} bytes"))?;
        at += k as u64;
        pacer.sent(k as u64).await;
    }
    Ok(())
}

/// Sends an upgrade request for `path` on `port` and reads the 101; returns the stream
/// and any bytes that came after the response head.
pub async fn upgrade(env: &Env, port: u16, path: &str) -> Result<(TcpStream, Vec<u8>)> {
    let mut stream = connect(env).await?;
    let target = super::wire::target(port);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: soak.example\r\nX-Iterate-Proxy-Target-Host: {target}\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    bounded("write of the upgrade request", async {
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(Into::into)
    })
    .await?;
    let (head, rest) = bounded("101 response", tests::upstream::read_head(&mut stream)).await?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "101" {
        return Err(anyhow!(
            "upgrade of {path} on port {port} answered {:?}",
            head.lines().next().unwrap_or("")
        ));
    }
    if tests::upstream::header_value(&head, "x-port").as_deref() != Some(&port.to_string()) {
        bail!("upgrade for port {port} answered by another port: {head:?}");
    }
    Ok((stream, rest))
}

/// Resets a connection (RST instead of FIN) as it closes.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// A random one of the steady ports.
pub fn steady_port(rng: &mut fastrand::Rng) -> u16 {
    super::wire::STEADY_PORTS[rng.usize(..super::wire::STEADY_PORTS.len())]
}

/// Where clients connect.
pub fn daemon_addr(machine_ip: std::net::IpAddr) -> SocketAddr {
    SocketAddr::new(machine_ip, super::wire::PROXY_PORT)
}
