//! Zero-hop tunnels (SPEC §4, docs/zero-hop.md) through the real daemon
//! (`--zero-hop on`) with real apps: Python asyncio, Python blocking sockets, Node `net`,
//! Node `ws`, tokio and Rust blocking sockets (`tests::apps`). Every byte is checked at
//! both ends (`tests::stamp`), EOF and resets both ways, and after each test the zero-hop
//! maps are empty and the daemon's fds are back to their baseline.
//!
//! Topology: the client in its own network namespace, joined by veth to the machine
//! namespace where the daemon and the apps run (the apps on loopback for the daemon, on
//! the veth address for the direct comparison). The daemon is started with `nsenter`
//! (`ip netns exec` hides the cgroup v2 hierarchy it attaches to).
//!
//! Needs root and the daemon built with the eBPF object (`cargo xtask build`).
//! `ZERO_HOP_APPS=tokio,node-ws` limits the apps.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tests::apps::{App, AppKind};
use tests::daemon::TempDir;
use tests::stamp::{self, Verifier};
use tests::upstream::read_head;
use tests::{Daemon, Launch, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const RUST_APP: &str = env!("CARGO_BIN_EXE_zh_app");
/// Longest any one scenario may take before it counts as a stall.
const LIMIT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn apps() -> Vec<AppKind> {
    let only = std::env::var("ZERO_HOP_APPS").unwrap_or_default();
    AppKind::ALL
        .into_iter()
        .filter(|k| only.is_empty() || only.split(',').any(|n| n.trim() == k.name()))
        .collect()
}

// ---------------------------------------------------------------- daemon

struct Rig {
    daemon: Daemon,
    topo: Topology,
    fds_before: usize,
}

impl Rig {
    async fn start() -> Rig {
        Self::start_with(&[]).await
    }

    /// A zero-hop daemon with `extra` arguments.
    async fn start_with(extra: &[&str]) -> Rig {
        Self::start_env(extra, &[]).await
    }

    /// A zero-hop daemon with `extra` arguments and environment.
    async fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Rig {
        let topo = Topology::new().expect("namespaces");
        let daemon = zero_hop_daemon(&topo, extra, env)
            .await
            .expect("starting the daemon");
        let start = daemon
            .wait_log_line("project-ingress-proxy started", 0)
            .await
            .unwrap_or_else(|| panic!("no start line:\n{}", daemon.logs()));
        assert!(
            start.contains("\"zero_hop\":\"/"),
            "zero-hop did not attach to a cgroup: {start}"
        );
        daemon.settle().await;
        Rig {
            fds_before: daemon.open_fds(),
            daemon,
            topo,
        }
    }

    /// The log lines containing `needle`, parsed.
    fn log_lines(&self, needle: &str) -> Vec<serde_json::Value> {
        self.daemon
            .log_lines(needle)
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    async fn connect(&self) -> Result<TcpStream> {
        let s = self.topo.client.connect(self.daemon.addr).await?;
        Ok(s)
    }

    /// Waits until every tunnel is gone: no zero-hop or fast-path map entries (the LRU of
    /// accepted connections excepted) and no more fds than at the start.
    async fn wait_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let counts = tests::bpf::map_key_counts(self.daemon.pid());
            let held: usize = [
                "ZH_APPS",
                "ZH_PEERS",
                "ZH_TUNNELS",
                "ZH_STATS",
                "SOCKS",
                "TARGETS",
                "DIRECTIONS",
            ]
            .iter()
            .map(|m| counts.get(*m).copied().unwrap_or(0))
            .sum();
            assert!(
                counts.contains_key("ZH_APPS"),
                "zero-hop maps missing: {counts:?}"
            );
            let fds = self.daemon.open_fds();
            if held == 0 && fds <= self.fds_before {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "leak: map entries {counts:?}, {fds} fds (before: {}); log tail:\n{}",
                    self.fds_before,
                    self.daemon.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every tunnel closed from `closed_before` on was zero-hop (the app's socket was
    /// captured and paired), or, for an app with blocking sockets, was left on the
    /// ordinary relay at its first send; `also` names another accepted outcome.
    async fn assert_zero_hop(&self, closed_before: usize, count: usize, app: AppKind) {
        self.assert_zero_hop_or(closed_before, count, app, None)
            .await
    }

    async fn assert_zero_hop_or(
        &self,
        closed_before: usize,
        count: usize,
        app: AppKind,
        also: Option<&str>,
    ) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let closed = loop {
            let closed = self.log_lines("tunnel closed");
            if closed.len() >= closed_before + count {
                break closed;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {} of {count} tunnels closed; log tail:\n{}",
                app.name(),
                closed.len() - closed_before,
                self.daemon.log_tail(10)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let want = if app.blocking() {
            "blocking app"
        } else {
            "paired"
        };
        for line in &closed[closed_before..] {
            let got = line["zero_hop"].as_str().unwrap_or("");
            assert!(
                got == want || Some(got) == also,
                "{}: zero-hop should be {want:?}: {line}",
                app.name()
            );
        }
    }

    fn zero_hop_bytes(&self) -> u64 {
        self.log_lines("tunnel closed")
            .iter()
            .filter_map(|l| l["zero_hop_bytes"].as_u64())
            .sum()
    }
}

/// A daemon with `--zero-hop on` and `extra` arguments, started with nsenter (the cgroup
/// hierarchy visible).
async fn zero_hop_daemon(topo: &Topology, extra: &[&str], env: &[(&str, &str)]) -> Result<Daemon> {
    let mut args = vec!["--zero-hop", "on"];
    args.extend_from_slice(extra);
    let level = std::env::var("ZERO_HOP_DAEMON_LOG").unwrap_or_else(|_| "info".into());
    let mut env = env.to_vec();
    env.push(("RUST_LOG", &level));
    Daemon::start_with(topo, &args, &env, Launch::Nsenter).await
}

// ---------------------------------------------------------------- clients

/// How a client reaches the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Daemon,
    /// Straight to the app's veth address (the comparison for CPU and memory).
    Direct,
}

async fn connect(rig: &Rig, app: &App, via: Via) -> Result<TcpStream> {
    let s = match via {
        Via::Daemon => rig.connect().await?,
        Via::Direct => {
            let addr = std::net::SocketAddr::new(rig.topo.machine_ip, app.port);
            rig.topo.client.connect(addr).await?
        }
    };
    Ok(s)
}

/// A raw upgrade to `path`; returns the stream and any bytes after the 101.
async fn open_raw(rig: &Rig, app: &App, via: Via, path: &str) -> Result<(TcpStream, Vec<u8>)> {
    let mut s = connect(rig, app, via).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nX-Iterate-Proxy-Target-Host: localhost:{}\r\nConnection: Upgrade\r\nUpgrade: zh\r\n\r\n",
        app.port
    );
    s.write_all(req.as_bytes()).await?;
    let (head, rest) = read_head(&mut s).await?;
    ensure!(head.starts_with("HTTP/1.1 101"), "no upgrade: {head}");
    Ok((s, rest))
}

type Ws = WebSocketStream<TcpStream>;

async fn open_ws(rig: &Rig, app: &App, via: Via, path: &str) -> Result<Ws> {
    let s = connect(rig, app, via).await?;
    let mut req = format!("ws://test{path}").into_client_request()?;
    req.headers_mut().insert(
        "x-iterate-proxy-target-host",
        format!("localhost:{}", app.port).parse()?,
    );
    let (ws, _) = tokio_tungstenite::client_async(req, s).await?;
    Ok(ws)
}

/// Reads to EOF, checking the stream; `stall` pauses reading once `after` bytes arrived.
async fn receive_raw(
    s: &mut (impl AsyncReadExt + Unpin),
    seed: u64,
    first: &[u8],
    n: u64,
    stall: Option<Stall<'_>>,
) -> Result<()> {
    let mut v = Verifier::new(seed);
    v.feed(first).map_err(|at| anyhow!("wrong byte at {at}"))?;
    let mut stall = stall;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        if let Some(st) = stall.as_ref() {
            if v.received >= st.after {
                stall.take().unwrap().pause().await;
            }
        }
        let k = s.read(&mut buf).await?;
        if k == 0 {
            break;
        }
        v.feed(&buf[..k])
            .map_err(|at| anyhow!("wrong byte at offset {at}"))?;
        ensure!(
            v.received <= n,
            "more than the {n} bytes sent (duplication)"
        );
    }
    ensure!(
        v.received == n,
        "{} of {n} bytes before EOF (truncation)",
        v.received
    );
    Ok(())
}

async fn send_raw(w: &mut (impl AsyncWriteExt + Unpin), seed: u64, n: u64) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut at = 0;
    while at < n {
        let k = (n - at).min(buf.len() as u64) as usize;
        stamp::fill(seed, at, &mut buf[..k]);
        w.write_all(&buf[..k]).await?;
        at += k as u64;
    }
    w.shutdown().await?;
    Ok(())
}

/// Short tunnel number `i` through an echo app: sends 100–999 checked bytes and EOF, and
/// checks every byte and the EOF that come back (`first`: bytes read with the 101).
async fn echo_short(s: TcpStream, first: &[u8], i: u64) -> Result<()> {
    let (mut r, mut w) = s.into_split();
    let n = 100 + i % 900;
    let (received, sent) = tokio::join!(
        receive_raw(&mut r, i, first, n, None),
        send_raw(&mut w, i, n)
    );
    received?;
    sent
}

/// A pause in reading, with what to measure meanwhile.
struct Stall<'a> {
    after: u64,
    app: &'a App,
    rig: &'a Rig,
    /// App CPU ticks and charged socket memory during the pause.
    out: &'a StallReport,
}

#[derive(Default)]
struct StallReport {
    cpu_ticks: AtomicU64,
    socket_bytes: AtomicU64,
}

impl Stall<'_> {
    /// Stops reading for 3 s; measures the app's CPU over the middle 2 s and the machine
    /// namespace's charged socket memory at the end.
    async fn pause(self) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = self.app.cpu_ticks();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ticks = self.app.cpu_ticks() - before;
        self.out.cpu_ticks.store(ticks, Ordering::Relaxed);
        self.out
            .socket_bytes
            .store(socket_memory(&self.rig.topo), Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Memory charged to the machine namespace's TCP sockets (receive queues, send queues and
/// their reserves), from `ss -tm`.
fn socket_memory(topo: &Topology) -> u64 {
    // `ss` prints the kernel's signed counters unsigned: a forward-allocated reserve that
    // is briefly negative (the kernel lets `sk_forward_alloc` go below 0 between
    // reclaims) reads as about 4 GiB. Each field is read back as the `int` it is.
    let out = topo
        .machine
        .command("ss")
        .args(["-tmn"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut total: i64 = 0;
    for part in out.split("skmem:(").skip(1) {
        let fields = part.split(')').next().unwrap_or("");
        for f in fields.split(',') {
            // r: receive queue, w: send queue, f: forward-allocated reserve.
            for prefix in ["r", "w", "f"] {
                if let Some(v) = f.strip_prefix(prefix) {
                    if let Ok(v) = v.parse::<u32>() {
                        total += i64::from(v as i32);
                    }
                }
            }
        }
    }
    total.max(0) as u64
}

/// The client side of one scenario against one app, raw or WebSocket.
#[derive(Clone, Copy, Debug)]
enum Scenario {
    /// App → client bulk.
    Down(u64),
    /// Client → app bulk.
    Up(u64),
    /// Both at once; the shorter side half-closes while the other keeps sending.
    Both { down: u64, up: u64 },
    /// One byte each way, `n` times.
    PingPong(u64),
    /// `n` messages of 1..300 bytes, pipelined.
    Bursts(u64),
    /// App → client bulk with the client not reading for 3 s after 1 MiB.
    Stalled(u64),
}

async fn run(
    rig: &Rig,
    app: &App,
    via: Via,
    sc: Scenario,
    seed: u64,
    report: &StallReport,
) -> Result<()> {
    if app.kind.websocket() {
        return run_ws(rig, app, via, sc, seed, report).await;
    }
    match sc {
        Scenario::Down(n) | Scenario::Stalled(n) => {
            let (mut s, first) = open_raw(rig, app, via, &format!("/source/{seed}/{n}")).await?;
            let stall = matches!(sc, Scenario::Stalled(_)).then_some(Stall {
                after: MIB,
                app,
                rig,
                out: report,
            });
            receive_raw(&mut s, seed, &first, n, stall).await?;
            s.shutdown().await?;
        }
        Scenario::Up(n) => {
            let (mut s, first) = open_raw(rig, app, via, &format!("/sink/{seed}/{n}")).await?;
            ensure!(first.is_empty(), "bytes before the sink's end");
            send_raw(&mut s, seed, n).await?;
            let mut tail = Vec::new();
            s.read_to_end(&mut tail).await?;
            ensure!(tail.is_empty(), "bytes after the sink: {}", tail.len());
        }
        Scenario::Both { down, up } => {
            let path = format!("/both/{seed}/{down}/{}/{up}", seed + 1);
            let (s, first) = open_raw(rig, app, via, &path).await?;
            let (mut r, mut w) = s.into_split();
            let (a, b) = tokio::join!(
                receive_raw(&mut r, seed, &first, down, None),
                send_raw(&mut w, seed + 1, up)
            );
            a.context("receiving")?;
            b.context("sending")?;
        }
        Scenario::PingPong(n) => {
            let (mut s, first) = open_raw(rig, app, via, "/echo").await?;
            ensure!(first.is_empty(), "bytes before the first echo");
            let mut b = [0u8; 1];
            for i in 0..n {
                stamp::fill(seed, i, &mut b);
                let sent = b[0];
                s.write_all(&b).await?;
                s.read_exact(&mut b).await?;
                ensure!(b[0] == sent, "echo {i} came back wrong");
            }
            s.shutdown().await?;
            let mut tail = Vec::new();
            s.read_to_end(&mut tail).await?;
            ensure!(tail.is_empty(), "bytes after the last echo");
        }
        Scenario::Bursts(n) => {
            let (s, first) = open_raw(rig, app, via, "/echo").await?;
            let total: u64 = (0..n).map(|i| 1 + (i * 7919) % 300).sum();
            let (mut r, mut w) = s.into_split();
            let writer = async {
                let mut at = 0;
                for i in 0..n {
                    let len = (1 + (i * 7919) % 300) as usize;
                    let mut msg = vec![0u8; len];
                    stamp::fill(seed, at, &mut msg);
                    w.write_all(&msg).await?;
                    at += len as u64;
                    if i % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                w.shutdown().await?;
                anyhow::Ok(())
            };
            let (a, b) = tokio::join!(receive_raw(&mut r, seed, &first, total, None), writer);
            a.context("receiving the echoes")?;
            b?;
        }
    }
    Ok(())
}

async fn receive_ws(ws: &mut Ws, seed: u64, n: u64, stall: Option<Stall<'_>>) -> Result<()> {
    let mut v = Verifier::new(seed);
    let mut stall = stall;
    loop {
        if let Some(st) = stall.as_ref() {
            if v.received >= st.after {
                stall.take().unwrap().pause().await;
            }
        }
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                v.feed(&b)
                    .map_err(|at| anyhow!("wrong byte at offset {at}"))?;
                ensure!(
                    v.received <= n,
                    "more than the {n} bytes sent (duplication)"
                );
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
    ensure!(
        v.received == n,
        "{} of {n} bytes before the close (truncation)",
        v.received
    );
    Ok(())
}

async fn send_ws(
    ws: &mut (impl SinkExt<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin),
    seed: u64,
    n: u64,
) -> Result<()> {
    let mut at = 0;
    while at < n {
        let k = (n - at).min(256 * 1024) as usize;
        let mut buf = vec![0u8; k];
        stamp::fill(seed, at, &mut buf);
        ws.send(Message::binary(buf)).await?;
        at += k as u64;
    }
    Ok(())
}

async fn run_ws(
    rig: &Rig,
    app: &App,
    via: Via,
    sc: Scenario,
    seed: u64,
    report: &StallReport,
) -> Result<()> {
    match sc {
        Scenario::Down(n) | Scenario::Stalled(n) => {
            let mut ws = open_ws(rig, app, via, &format!("/source/{seed}/{n}")).await?;
            let stall = matches!(sc, Scenario::Stalled(_)).then_some(Stall {
                after: MIB,
                app,
                rig,
                out: report,
            });
            receive_ws(&mut ws, seed, n, stall).await?;
        }
        Scenario::Up(n) => {
            let mut ws = open_ws(rig, app, via, &format!("/sink/{seed}/{n}")).await?;
            send_ws(&mut ws, seed, n).await?;
            ws.close(None).await?;
            while let Some(m) = ws.next().await {
                ensure!(!matches!(m?, Message::Binary(_)), "data after the sink");
            }
        }
        Scenario::Both { down, up } => {
            let path = format!("/both/{seed}/{down}/{}/{up}", seed + 1);
            let ws = open_ws(rig, app, via, &path).await?;
            let (mut w, mut r) = ws.split();
            let reader = async {
                let mut v = Verifier::new(seed);
                while let Some(m) = r.next().await {
                    match m? {
                        Message::Binary(b) => v
                            .feed(&b)
                            .map_err(|at| anyhow!("wrong byte at offset {at}"))?,
                        Message::Close(_) => break,
                        _ => {}
                    }
                    if v.received == down {
                        break;
                    }
                }
                ensure!(v.received == down, "{} of {down} bytes", v.received);
                anyhow::Ok(())
            };
            let writer = async {
                send_ws(&mut w, seed + 1, up).await?;
                anyhow::Ok(())
            };
            let (a, b) = tokio::join!(reader, writer);
            a.context("receiving")?;
            b.context("sending")?;
            let mut ws = w.reunite(r).map_err(|_| anyhow!("reunite"))?;
            ws.close(None).await?;
            while let Some(m) = ws.next().await {
                if m.is_err() {
                    break;
                }
            }
        }
        Scenario::PingPong(n) | Scenario::Bursts(n) => {
            let mut ws = open_ws(rig, app, via, "/echo").await?;
            let burst = matches!(sc, Scenario::Bursts(_));
            let mut at = 0u64;
            for i in 0..n {
                let len = if burst { 1 + (i * 7919) % 300 } else { 1 } as usize;
                let mut msg = vec![0u8; len];
                stamp::fill(seed, at, &mut msg);
                at += len as u64;
                ws.send(Message::binary(msg.clone())).await?;
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => ensure!(b[..] == msg[..], "echo {i} differs"),
                    other => bail!("echo {i}: {other:?}"),
                }
            }
            ws.close(None).await?;
            while let Some(m) = ws.next().await {
                if m.is_err() {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Runs `sc` against every app through the daemon, every tunnel zero-hop; checks each
/// app's own verdict on what it received; then the leak check.
async fn each_app(sc: impl Fn(AppKind) -> Scenario) {
    let rig = Rig::start().await;
    for kind in apps() {
        let app = App::start(kind, &rig.topo.machine, std::path::Path::new(RUST_APP)).unwrap();
        let closed = rig.log_lines("tunnel closed").len();
        let scenario = sc(kind);
        let report = StallReport::default();
        let r =
            tokio::time::timeout(LIMIT, run(&rig, &app, Via::Daemon, scenario, 7, &report)).await;
        let err = match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some("stalled".into()),
        };
        if let Some(err) = err {
            panic!(
                "{} {scenario:?}: {err}; app said {:?}; daemon log tail:\n{}",
                kind.name(),
                app.done_lines(),
                rig.daemon.log_tail(12)
            );
        }
        let done = app.wait_done(1, Duration::from_secs(20)).await.unwrap();
        assert!(
            done.iter().all(|l| l.contains(" ok")),
            "{} {scenario:?}: the app reports {done:?}",
            kind.name()
        );
        rig.assert_zero_hop(closed, 1, kind).await;
        rig.wait_idle().await;
    }
}

// ---------------------------------------------------------------- tests

fn bulk(kind: AppKind) -> u64 {
    if kind.fast() {
        256 * MIB
    } else {
        32 * MIB
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_app_to_client() {
    each_app(|k| Scenario::Down(bulk(k))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_client_to_app() {
    each_app(|k| Scenario::Up(bulk(k))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways() {
    each_app(|k| Scenario::Both {
        down: bulk(k) / 2,
        up: bulk(k) / 2,
    })
    .await;
}

/// The app finishes first (its FIN while the client still sends), then the client
/// finishes first: half-close each way, every byte after it still delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_each_way() {
    each_app(|k| Scenario::Both {
        down: MIB,
        up: bulk(k) / 4,
    })
    .await;
    each_app(|k| Scenario::Both {
        down: bulk(k) / 4,
        up: MIB,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_ping_pong() {
    each_app(|_| Scenario::PingPong(2_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_small_messages() {
    each_app(|_| Scenario::Bursts(2_000)).await;
}

/// The normal hop when no pipe can be had (out of descriptors; a test fault refuses every
/// pipe): the app's bytes that take it while the client is stalled are copied instead;
/// every byte arrives and the tunnel closes cleanly (it used to be reset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_hop_without_a_pipe_copies_instead() {
    let rig = Rig::start_env(&[], &[("PROJECT_INGRESS_PROXY_TEST_FAULT", "no-pipes")]).await;
    let kind = AppKind::Tokio;
    let app = App::start(kind, &rig.topo.machine, std::path::Path::new(RUST_APP)).unwrap();
    let closed = rig.log_lines("tunnel closed").len();
    let report = StallReport::default();
    let r = tokio::time::timeout(
        LIMIT,
        run(
            &rig,
            &app,
            Via::Daemon,
            Scenario::Stalled(64 * MIB),
            11,
            &report,
        ),
    )
    .await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e:#}; log tail:\n{}", rig.daemon.log_tail(12)),
        Err(_) => panic!("stalled; log tail:\n{}", rig.daemon.log_tail(12)),
    }
    let done = app.wait_done(1, Duration::from_secs(20)).await.unwrap();
    assert!(done.iter().all(|l| l.contains(" ok")), "{done:?}");
    rig.assert_zero_hop(closed, 1, kind).await;
    let line = &rig.log_lines("tunnel closed")[closed];
    assert_eq!(line["end"], "closed", "{line}");
    assert!(
        line["upstream_to_client_path"]
            .as_str()
            .is_some_and(|p| p.contains("copy")),
        "the normal hop did not copy: {line}"
    );
    assert!(!rig.daemon.log_lines("cannot get a pipe").is_empty());
    rig.wait_idle().await;
}

/// The client stops reading for 3 s while the app writes as fast as it can: the app must
/// not spin (its CPU while stalled no higher than with a direct connection), nothing
/// stalls afterwards, and the memory held is socket memory the kernel charges and bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_no_spin_no_stall_bounded_memory() {
    let rig = Rig::start().await;
    for kind in apps() {
        let app = App::start(kind, &rig.topo.machine, std::path::Path::new(RUST_APP)).unwrap();
        let n = if kind.fast() { 1024 * MIB } else { 128 * MIB };
        let mut ticks = Vec::new();
        for via in [Via::Direct, Via::Daemon] {
            let report = StallReport::default();
            let closed = rig.log_lines("tunnel closed").len();
            let r = tokio::time::timeout(
                LIMIT,
                run(&rig, &app, via, Scenario::Stalled(n), 9, &report),
            )
            .await;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!(
                    "{} {via:?}: {e:#}; log tail:\n{}",
                    kind.name(),
                    rig.daemon.log_tail(12)
                ),
                Err(_) => panic!(
                    "{} {via:?}: stalled; log tail:\n{}",
                    kind.name(),
                    rig.daemon.log_tail(12)
                ),
            }
            let cpu = report.cpu_ticks.load(Ordering::Relaxed);
            let mem = report.socket_bytes.load(Ordering::Relaxed);
            eprintln!(
                "{} {via:?}: app CPU while the client stalled {cpu} ticks / 2 s, socket memory {} KiB",
                kind.name(),
                mem / 1024
            );
            ticks.push(cpu);
            if via == Via::Daemon {
                rig.assert_zero_hop(closed, 1, kind).await;
                // Everything the tunnel holds is in socket buffers the kernel charges and
                // caps (app send buffer, upstream receive buffer, client send buffer):
                // nothing grows with the app's speed.
                assert!(
                    mem < 64 * MIB,
                    "{}: {} KiB of socket memory while stalled",
                    kind.name(),
                    mem / 1024
                );
            }
        }
        // No spin: a spinning app burns ~200 ticks in the 2 s window.
        assert!(
            ticks[1] <= ticks[0] + 10,
            "{}: app CPU while stalled {} ticks through zero-hop vs {} direct",
            kind.name(),
            ticks[1],
            ticks[0]
        );
        app.wait_done(2, Duration::from_secs(20)).await.unwrap();
        rig.wait_idle().await;
    }
    assert!(rig.zero_hop_bytes() > 0, "nothing went zero-hop");
}

/// A reset on either side resets the other: the app resets after some bytes (the client
/// sees a reset, not a clean end), and the client resets (the app sees a failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_propagate_both_ways() {
    let rig = Rig::start().await;
    for kind in apps() {
        let app = App::start(kind, &rig.topo.machine, std::path::Path::new(RUST_APP)).unwrap();
        // The client resets mid-tunnel.
        if kind.websocket() {
            let ws = open_ws(&rig, &app, Via::Daemon, "/hold").await.unwrap();
            let s = ws.into_inner();
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(s);
        } else {
            let (mut s, _) = open_raw(&rig, &app, Via::Daemon, "/hold").await.unwrap();
            s.write_all(b"some bytes").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(s);
        }
        let done = app.wait_done(1, Duration::from_secs(20)).await.unwrap();
        assert!(
            done[0].contains("error") || done[0].contains("bad"),
            "{}: the client's reset reached the app as {:?}",
            kind.name(),
            done[0]
        );
        // The app resets mid-tunnel (the WebSocket app has no reset command).
        if !kind.websocket() {
            let (mut s, _) = open_raw(&rig, &app, Via::Daemon, "/reset/1000")
                .await
                .unwrap();
            s.write_all(&[1u8; 1000]).await.unwrap();
            let mut buf = [0u8; 64];
            let end = tokio::time::timeout(LIMIT, async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => return Ok(()),
                        Ok(_) => continue,
                        Err(e) => return Err(e),
                    }
                }
            })
            .await
            .expect("no end after the app's reset");
            assert_eq!(
                end.as_ref().map_err(|e| e.kind()),
                Err(io::ErrorKind::ConnectionReset),
                "{}: the app's reset reached the client as {end:?}",
                kind.name()
            );
        }
        rig.wait_idle().await;
    }
    let closed = rig.log_lines("tunnel closed");
    assert!(
        closed.iter().all(|l| l["end"].as_str() == Some("reset")),
        "every tunnel ended by a reset: {closed:?}"
    );
}

/// 2,000 tunnels open, echo a little and close at the same time; then nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_concurrent_short_tunnels() {
    let rig = Arc::new(Rig::start().await);
    for kind in apps()
        .into_iter()
        .filter(|k| matches!(k, AppKind::Tokio | AppKind::PyAsyncio))
    {
        let app =
            Arc::new(App::start(kind, &rig.topo.machine, std::path::Path::new(RUST_APP)).unwrap());
        let closed = rig.log_lines("tunnel closed").len();
        let mut tasks = Vec::new();
        for i in 0..2_000u64 {
            let (rig, app) = (rig.clone(), app.clone());
            tasks.push(tokio::spawn(async move {
                let (s, first) = open_raw(&rig, &app, Via::Daemon, "/echo").await?;
                echo_short(s, &first, i).await
            }));
        }
        let mut failed = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            match tokio::time::timeout(LIMIT, t).await {
                Ok(Ok(Ok(()))) => {}
                other => failed.push(format!("tunnel {i}: {other:?}")),
            }
        }
        assert!(
            failed.is_empty(),
            "{}: {} failed: {:?}",
            kind.name(),
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        let done = app.wait_done(2_000, Duration::from_secs(30)).await.unwrap();
        assert!(
            done.iter().all(|l| l.contains(" ok")),
            "{}: {:?}",
            kind.name(),
            done.iter().find(|l| !l.contains(" ok"))
        );
        // A client that half-closes before its tunnel starts cannot be paired (a socket
        // that received a FIN cannot enter a sockmap): that tunnel is relayed as usual.
        rig.assert_zero_hop_or(closed, 2_000, kind, Some("client closed first"))
            .await;
        rig.wait_idle().await;
    }
}

/// An idle zero-hop tunnel holds its two sockets and nothing else (no splice pipe): the
/// capacity budget counts two descriptors per tunnel, so anything more runs the daemon out
/// of descriptors in `accept` before the budget answers `503 over_capacity` (7,500 idle
/// tunnels on a 20,000-descriptor limit did). Then every tunnel still carries its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnels_hold_only_their_two_sockets() {
    const TUNNELS: usize = 300;
    let rig = Arc::new(Rig::start().await);
    let app = App::start(
        AppKind::Tokio,
        &rig.topo.machine,
        std::path::Path::new(RUST_APP),
    )
    .unwrap();
    let closed = rig.log_lines("tunnel closed").len();
    let mut open = Vec::with_capacity(TUNNELS);
    for _ in 0..TUNNELS {
        open.push(open_raw(&rig, &app, Via::Daemon, "/echo").await.unwrap());
    }
    // Each relay starts right after its 101 is written (and before, the daemon created a
    // pipe there at once, on a readiness left from the HTTP exchange): give the last ones
    // time to start, then count. Late relays could only hide extra descriptors, never
    // add them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = rig.daemon.open_fds().saturating_sub(rig.fds_before);
    assert!(
        held <= 2 * TUNNELS + 8,
        "{TUNNELS} idle tunnels hold {held} descriptors (2 per tunnel expected)"
    );
    // And no task: each waits parked (docs/fastpath.md, parked tunnels) until its
    // client's bytes end it; the echoes below go through the kernel and zero-hop without
    // waking it.
    let parked = || async {
        let (_, body) = tests::admin_get(&rig.topo, "/metrics").await.unwrap();
        tests::metric(&body, "project_ingress_proxy_tunnels_parked")
    };
    assert_eq!(
        parked().await,
        Some(TUNNELS as f64),
        "idle zero-hop tunnels parked"
    );
    let mut tasks = Vec::new();
    for (i, (s, first)) in open.into_iter().enumerate() {
        let i = i as u64;
        tasks.push(tokio::spawn(async move { echo_short(s, &first, i).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        match tokio::time::timeout(LIMIT, t).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("tunnel {i}: {other:?}"),
        }
    }
    let done = app
        .wait_done(TUNNELS, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(done.iter().all(|l| l.contains(" ok")), "{done:?}");
    rig.assert_zero_hop(closed, TUNNELS, AppKind::Tokio).await;
    rig.wait_idle().await;
}

/// Apps with blocking sockets stay on the ordinary relay (their tunnels say
/// `zero_hop: false`), and the pattern that breaks a blocking `recv()` on a sockmap
/// socket works for them: one thread blocked in `recv()` while another writes to a
/// stalled client, is woken by the write space and goes on writing
/// (`examples/blocking_recv_eagain.rs` shows the kernel behaviour this avoids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_apps_stay_on_the_relay_and_work() {
    let rig = Rig::start().await;
    for kind in apps().into_iter().filter(|k| k.blocking()) {
        let app = App::start(kind, &rig.topo.machine, std::path::Path::new(RUST_APP)).unwrap();
        let closed = rig.log_lines("tunnel closed").len();
        let n = 64 * MIB;
        let path = format!("/both/3/{n}/4/{MIB}");
        let (s, first) = open_raw(&rig, &app, Via::Daemon, &path).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let report = StallReport::default();
        let stall = Stall {
            after: MIB,
            app: &app,
            rig: &rig,
            out: &report,
        };
        // The client sends its 1 MiB only after the stall: the app's reader thread waits
        // in recv() while its writer thread blocks on a full buffer and is woken.
        let (a, b) = tokio::time::timeout(LIMIT, async {
            tokio::join!(receive_raw(&mut r, 3, &first, n, Some(stall)), async {
                tokio::time::sleep(Duration::from_secs(4)).await;
                send_raw(&mut w, 4, MIB).await
            })
        })
        .await
        .expect("stalled");
        a.unwrap();
        b.unwrap();
        let done = app.wait_done(1, Duration::from_secs(20)).await.unwrap();
        assert!(done[0].contains(" ok"), "{}: {:?}", kind.name(), done[0]);
        rig.assert_zero_hop(closed, 1, kind).await;
        rig.wait_idle().await;
    }
}

// ---------------------------------------------------------------- takeover

/// One tunnel's client side during the takeover test; resolves once every byte each way
/// was checked.
type TunnelTask = tokio::task::JoinHandle<Result<()>>;

/// A download whose client reads 1 MiB, then stops reading until `resume` (the takeover
/// is done)
/// (so the app's bytes fill the normal hop: the app's send queue, the daemon's socket
/// and pipe), then reads the rest: every byte checked, EOF at the end.
fn stalled_download(
    s: TcpStream,
    first: Vec<u8>,
    seed: u64,
    n: u64,
    resume: Arc<AtomicBool>,
) -> TunnelTask {
    tokio::spawn(async move {
        let mut s = s;
        let mut v = Verifier::new(seed);
        v.feed(&first).map_err(|at| anyhow!("wrong byte at {at}"))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut stalled = false;
        loop {
            if !stalled && v.received >= MIB {
                stalled = true;
                while !resume.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let k = s.read(&mut buf).await?;
            if k == 0 {
                break;
            }
            v.feed(&buf[..k])
                .map_err(|at| anyhow!("wrong byte at offset {at}"))?;
        }
        ensure!(v.received == n, "{} of {n} bytes before EOF", v.received);
        s.shutdown().await?;
        Ok(())
    })
}

/// Echoed bursts: the client writes messages (a pause after each) until the takeover is
/// done and 200 more, then half-closes; every echoed byte is checked, in order.
fn echo_across(s: TcpStream, first: Vec<u8>, seed: u64, done: Arc<AtomicBool>) -> TunnelTask {
    tokio::spawn(async move {
        ensure!(first.is_empty(), "bytes before the first echo");
        let sent = Arc::new(AtomicU64::new(0));
        let (mut r, mut w) = s.into_split();
        let writer = {
            let sent = sent.clone();
            async move {
                let mut after = 0;
                let mut i: u64 = 0;
                while after < 200 {
                    let len = (1 + (i * 7919) % 300) as usize;
                    let mut msg = vec![0u8; len];
                    let at = sent.load(Ordering::Relaxed);
                    stamp::fill(seed, at, &mut msg);
                    w.write_all(&msg).await?;
                    sent.fetch_add(len as u64, Ordering::Relaxed);
                    i += 1;
                    if done.load(Ordering::Relaxed) {
                        after += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                w.shutdown().await?;
                anyhow::Ok(())
            }
        };
        let reader = async {
            let mut v = Verifier::new(seed);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let k = r.read(&mut buf).await?;
                if k == 0 {
                    break;
                }
                v.feed(&buf[..k])
                    .map_err(|at| anyhow!("echo: wrong byte at offset {at}"))?;
            }
            anyhow::Ok(v.received)
        };
        let (w, got) = tokio::join!(writer, reader);
        w.context("writing")?;
        let got = got.context("reading the echoes")?;
        let sent = sent.load(Ordering::Relaxed);
        ensure!(got == sent, "{got} of {sent} echoed bytes before EOF");
        Ok(())
    })
}

/// Takeover with zero-hop tunnels (docs/zero-hop.md, Takeover): the running daemon
/// switches each one back to the normal hop and hands it over like any tunnel; the
/// successor relays it. Downloads whose clients stall across the takeover (the normal
/// hop full: bytes held in the daemon's pipe move with the tunnel), both-ways transfers
/// and echo sessions that run throughout; every byte each way is checked, every EOF, each
/// tunnel closes once (in the successor) with the bytes zero-hop moved before the
/// takeover; new tunnels in the successor are zero-hop again; nothing is left in the maps.
///
/// Once with client → app in the kernel (`--splice auto`), once with the userspace relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_moves_zero_hop_tunnels_over_the_normal_hop() {
    takeover_with(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_moves_zero_hop_tunnels_over_the_normal_hop_with_the_userspace_relay() {
    takeover_with(&["--splice", "off"]).await;
}

async fn takeover_with(relay: &[&str]) {
    let dir = TempDir::new().unwrap();
    let ctl = dir.0.join("control.sock");
    let ctl = ctl.to_str().unwrap().to_owned();
    let mut args = vec!["--control-socket", ctl.as_str(), "--shutdown-grace", "5s"];
    args.extend_from_slice(relay);
    let mut rig = Rig::start_with(&args).await;
    let kinds: Vec<AppKind> = apps()
        .into_iter()
        .filter(|k| !k.websocket() && !k.blocking())
        .collect();
    let apps: Vec<App> = kinds
        .iter()
        .map(|&k| App::start(k, &rig.topo.machine, std::path::Path::new(RUST_APP)).unwrap())
        .collect();
    // Set once the takeover is done: the stalled clients read on, the echoes finish.
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks: Vec<(String, TunnelTask)> = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let seed = 1000 + 10 * i as u64;
        // Far more than the sockets and the pipe can hold while the client stalls (a few
        // tens of MiB here), so every tunnel is still running at the takeover.
        let n = 128 * MIB;
        let (s, first) = open_raw(&rig, app, Via::Daemon, &format!("/source/{seed}/{n}"))
            .await
            .unwrap();
        tasks.push((
            format!("{} download", app.kind.name()),
            stalled_download(s, first, seed, n, done.clone()),
        ));
        let (down, up) = (128 * MIB, 16 * MIB);
        let path = format!("/both/{}/{down}/{}/{up}", seed + 1, seed + 2);
        let (s, first) = open_raw(&rig, app, Via::Daemon, &path).await.unwrap();
        let (r, mut w) = s.into_split();
        let receive = stalled_download_half(r, first, seed + 1, down, done.clone());
        let send = tokio::spawn(async move { send_raw(&mut w, seed + 2, up).await });
        tasks.push((format!("{} both ways (down)", app.kind.name()), receive));
        tasks.push((format!("{} both ways (up)", app.kind.name()), send));
        let (s, first) = open_raw(&rig, app, Via::Daemon, "/echo").await.unwrap();
        tasks.push((
            format!("{} echo", app.kind.name()),
            echo_across(s, first, seed + 3, done.clone()),
        ));
    }
    let tunnels = 3 * apps.len();
    // Every tunnel paired, and zero-hop moved bytes in each app's download before the
    // takeover (its first MiB and more: the client had room).
    let deadline = Instant::now() + Duration::from_secs(20);
    while rig.log_lines("tunnel opened").len() < tunnels {
        assert!(Instant::now() < deadline, "tunnels did not open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut takeover_args = args.clone();
    takeover_args.push("--takeover");
    let next = zero_hop_daemon(&rig.topo, &takeover_args, &[])
        .await
        .unwrap();
    next.log_containing("takeover complete").await.unwrap();
    let mut old = std::mem::replace(&mut rig.daemon, next);
    let status = old.wait_exit(Duration::from_secs(15)).await.unwrap();
    assert_eq!(status, Some(0), "the daemon taken over exits 0");
    let handed: Vec<serde_json::Value> = old
        .logs()
        .lines()
        .filter(|l| l.contains("\"tunnel handed over\""))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        handed.len(),
        tunnels,
        "every tunnel was live and handed over: {handed:?}"
    );
    assert!(
        old.logs().lines().all(|l| !l.contains("\"tunnel closed\"")),
        "no tunnel ended in the daemon taken over"
    );
    done.store(true, Ordering::Relaxed);
    for (name, task) in tasks {
        match tokio::time::timeout(LIMIT, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("{name}: {e:#}; log tail:\n{}", rig.daemon.log_tail(20)),
            Ok(Err(e)) => panic!("{name}: {e}"),
            Err(_) => panic!("{name}: stalled; log tail:\n{}", rig.daemon.log_tail(20)),
        }
    }
    for app in &apps {
        let done = app.wait_done(3, Duration::from_secs(20)).await.unwrap();
        assert!(
            done.iter().all(|l| l.contains(" ok")),
            "{}: the app reports {done:?}",
            app.kind.name()
        );
    }
    // Each tunnel closed once, in the successor, cleanly, with zero-hop's bytes from
    // before the takeover and the normal hop's after it.
    let deadline = Instant::now() + Duration::from_secs(15);
    let closed = loop {
        let closed = rig.log_lines("tunnel closed");
        if closed.len() >= tunnels {
            break closed;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {tunnels} closed",
            closed.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(closed.len(), tunnels, "{closed:?}");
    for line in &closed {
        assert_eq!(line["end"], "closed", "{line}");
        assert_eq!(line["takeovers"], 1, "{line}");
        assert!(
            line["upstream_to_client_path"]
                .as_str()
                .is_some_and(|p| p.starts_with("zero-hop")),
            "zero-hop before the takeover: {line}"
        );
    }
    assert!(
        rig.zero_hop_bytes() > 0,
        "nothing went zero-hop: {closed:?}"
    );
    // The successor's own tunnels are zero-hop again.
    rig.fds_before = usize::MAX;
    for app in &apps {
        let before = rig.log_lines("tunnel closed").len();
        let report = StallReport::default();
        let r = run(&rig, app, Via::Daemon, Scenario::Down(4 * MIB), 77, &report);
        tokio::time::timeout(LIMIT, r).await.unwrap().unwrap();
        rig.assert_zero_hop(before, 1, app.kind).await;
    }
    rig.wait_idle().await;
}

/// [`stalled_download`] on the read half of a both-ways tunnel (no shutdown: the
/// sending half does it).
fn stalled_download_half(
    mut r: tokio::net::tcp::OwnedReadHalf,
    first: Vec<u8>,
    seed: u64,
    n: u64,
    resume: Arc<AtomicBool>,
) -> TunnelTask {
    tokio::spawn(async move {
        let mut v = Verifier::new(seed);
        v.feed(&first).map_err(|at| anyhow!("wrong byte at {at}"))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut stalled = false;
        loop {
            if !stalled && v.received >= MIB {
                stalled = true;
                while !resume.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let k = r.read(&mut buf).await?;
            if k == 0 {
                break;
            }
            v.feed(&buf[..k])
                .map_err(|at| anyhow!("wrong byte at offset {at}"))?;
        }
        ensure!(v.received == n, "{} of {n} bytes before EOF", v.received);
        Ok(())
    })
}
