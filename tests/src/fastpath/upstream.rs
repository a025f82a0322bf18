//! The test upstream on the machine namespace's loopback, next to the daemon. It answers
//! every upgrade with 101 and then does what the request path says:
//!
//! - `/stream/...` ([`Plan::path`]): plays the upstream end of the plan, every byte
//!   checked; the verdict lands in [`Upstream::result`] under the plan's seed.
//! - `/echo`: echoes until EOF. `/reset/<n>`: sends `n` bytes, then resets.
//! - `/hold`: waits for the client's reset; how it ended lands under [`HOLD`].
//! - `/hand/<key>`: hands the socket to the test ([`Handed::take`]).
//! - `/raw/<n>`: unverified bulk for measurements (`n` zero bytes, drains the other way).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::plan::{play, Plan};
use super::{Result, Rig, DOWN};
use crate::pattern;
use crate::upstream::read_head;
use crate::v4;

/// The key under which a `/hold` tunnel reports how it ended (`Ok` for a reset).
pub const HOLD: u64 = 0xDEAD;

const SWITCHING: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n";

/// Verdicts of the tunnels the upstream played, by plan seed (or [`HOLD`]).
pub type Results = Arc<Mutex<HashMap<u64, std::result::Result<(), String>>>>;

/// Test upstream: answers every upgrade with 101 (plus `pre` bytes of its stream in the
/// same write), then behaves as the request path says. Results land in `results`.
pub struct Upstream {
    pub port: u16,
    pub results: Results,
    /// Sockets of `/hand/<key>` tunnels, for tests that play the upstream end themselves.
    pub handed: Arc<Handed>,
    accept: JoinHandle<()>,
}

/// Upstream sockets handed to the test, by key.
#[derive(Default)]
pub struct Handed {
    sockets: Mutex<HashMap<u64, TcpStream>>,
    arrived: tokio::sync::Notify,
}

impl Handed {
    fn put(&self, key: u64, s: TcpStream) {
        self.sockets.lock().unwrap().insert(key, s);
        self.arrived.notify_waiters();
    }

    /// The upstream socket of the `/hand/<key>` tunnel; panics if it does not arrive
    /// within 10 s.
    pub async fn take(&self, key: u64) -> TcpStream {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let arrived = self.arrived.notified();
            if let Some(s) = self.sockets.lock().unwrap().remove(&key) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "upstream socket {key} never arrived"
            );
            let _ = tokio::time::timeout(Duration::from_millis(50), arrived).await;
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Upstream {
    /// Listens on the machine namespace's loopback, next to the daemon.
    pub fn start(rig: &Rig) -> Upstream {
        Self::start_on(rig.setup.topo.machine.listen(v4(0)).unwrap())
    }

    pub fn start_on(listener: tokio::net::TcpListener) -> Upstream {
        let port = listener.local_addr().unwrap().port();
        let results = Arc::new(Mutex::new(HashMap::new()));
        let handed = Arc::new(Handed::default());
        let (r, h) = (results.clone(), handed.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let (r, h) = (r.clone(), h.clone());
                tokio::spawn(async move {
                    let _ = serve(s, r, h).await;
                });
            }
        });
        Upstream {
            port,
            results,
            handed,
            accept,
        }
    }

    /// The verdict of the tunnel that reported under `seed`, once it is in.
    pub fn result(&self, seed: u64) -> Option<std::result::Result<(), String>> {
        self.results.lock().unwrap().get(&seed).cloned()
    }
}

async fn serve(mut s: TcpStream, results: Results, handed: Arc<Handed>) -> Result<()> {
    let (head, early) = read_head(&mut s).await?;
    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
    if let Some(key) = path.strip_prefix("/hand/") {
        // The test plays this end: 101, then the socket is the test's.
        assert!(
            early.is_empty(),
            "a /hand/ client sends nothing before the 101"
        );
        s.write_all(SWITCHING).await?;
        handed.put(key.parse()?, s);
        return Ok(());
    }
    if path == "/echo" {
        s.write_all(SWITCHING).await?;
        s.write_all(&early).await?;
        let (mut r, mut w) = s.into_split();
        tokio::io::copy(&mut r, &mut w).await?;
        w.shutdown().await?;
        return Ok(());
    }
    if let Some(rest) = path.strip_prefix("/reset/") {
        // Send `n` bytes, then reset.
        let n: usize = rest.parse()?;
        s.write_all(SWITCHING).await?;
        s.write_all(&vec![7u8; n]).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
        drop(s);
        return Ok(());
    }
    if let Some(rest) = path.strip_prefix("/raw/") {
        // Unverified bulk for measurements: send `n` zero bytes and drain the other way.
        let n: u64 = rest.parse()?;
        s.write_all(SWITCHING).await?;
        raw_exchange(s, n).await?;
        return Ok(());
    }
    if path == "/hold" {
        // Waits for the client's reset (or EOF), reports how it ended.
        s.write_all(SWITCHING).await?;
        let mut b = [0u8; 1024];
        let end = loop {
            match s.read(&mut b).await {
                Ok(0) => break Err("eof".to_string()),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break Ok(()),
                Err(e) => break Err(e.to_string()),
            }
        };
        results.lock().unwrap().insert(HOLD, end);
        return Ok(());
    }
    let Some(plan) = Plan::parse(&path) else {
        s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    let result = async {
        let mut first = SWITCHING.to_vec();
        first.extend_from_slice(&pattern::bytes(
            plan.seed ^ DOWN,
            plan.upstream_pre as usize,
        ));
        s.write_all(&first).await.map_err(|e| e.to_string())?;
        play(s, plan.upstream_end(&early)).await
    }
    .await;
    results
        .lock()
        .unwrap()
        .insert(plan.seed, result.map_err(|e| e.to_string()));
    Ok(())
}

/// Writes `n` zero bytes (unverified bulk, for measurements).
/// One end of an unverified bulk tunnel (measurements only): sends `n` zero bytes and
/// drains the other way; returns the bytes drained. An idle side (`n == 0`) stays open
/// until the busy one is done, as a WebSocket would (a socket whose FIN arrived cannot
/// be spliced).
pub async fn raw_exchange(s: TcpStream, n: u64) -> io::Result<u64> {
    let (mut r, mut w) = s.into_split();
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let send = async {
        raw_send(&mut w, n).await?;
        if n == 0 {
            let _ = drained_rx.await;
        }
        w.shutdown().await
    };
    let drain = async {
        let r = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
        let _ = drained_tx.send(());
        r
    };
    let (sent, drained) = tokio::join!(send, drain);
    sent?;
    drained
}

async fn raw_send<W: AsyncWriteExt + Unpin>(w: &mut W, n: u64) -> io::Result<()> {
    let buf = vec![0u8; 256 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..k]).await?;
        left -= k as u64;
    }
    Ok(())
}
