//! Fast-path torture tests (SPEC §4): tunnels through the real daemon binary with
//! `--splice ebpf`, every byte checked end to end against seeded pseudo-random streams.
//!
//! Needs root (eBPF) and the daemon built with the eBPF object embedded (`cargo xtask
//! build-ebpf`, then build). Binary: `PROXY_BIN`, else `target/{release,debug}/`.
//! Mode under test: `FASTPATH_SPLICE` (default `ebpf`; `off` runs the same suite on the
//! userspace relay). Longer repetitions: `FASTPATH_TORTURE=1`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn torture() -> bool {
    std::env::var_os("FASTPATH_TORTURE").is_some_and(|v| v != "0")
}

fn mode() -> String {
    std::env::var("FASTPATH_SPLICE").unwrap_or_else(|_| "ebpf".into())
}

// ---------------------------------------------------------------- byte streams

/// Seeded pseudo-random byte stream (xorshift64*), so both ends agree on every byte.
#[derive(Clone)]
struct Prng {
    state: u64,
    buf: [u8; 8],
    used: usize,
}

impl Prng {
    fn new(seed: u64) -> Prng {
        Prng {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            buf: [0; 8],
            used: 8,
        }
    }
    fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.buf = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.used = 0;
            }
            *b = self.buf[self.used];
            self.used += 1;
        }
    }
}

/// Checks received bytes against the expected stream.
struct Verifier {
    prng: Prng,
    seen: u64,
    scratch: Vec<u8>,
}

impl Verifier {
    fn new(seed: u64) -> Verifier {
        Verifier {
            prng: Prng::new(seed),
            seen: 0,
            scratch: Vec::new(),
        }
    }
    fn check(&mut self, data: &[u8]) -> Result<()> {
        self.scratch.resize(data.len(), 0);
        self.prng.fill(&mut self.scratch);
        if let Some(i) = (0..data.len()).find(|&i| data[i] != self.scratch[i]) {
            return Err(format!("byte {} differs (stream corrupted)", self.seen + i as u64).into());
        }
        self.seen += data.len() as u64;
        Ok(())
    }
}

async fn send_stream<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    seed: u64,
    skip: u64,
    len: u64,
) -> Result<()> {
    let mut prng = Prng::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut skipped = 0;
    while skipped < skip {
        let n = (skip - skipped).min(buf.len() as u64) as usize;
        prng.fill(&mut buf[..n]);
        skipped += n as u64;
    }
    let mut left = len - skip;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        prng.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads until EOF, verifying; returns the byte count.
async fn recv_stream<R: AsyncReadExt + Unpin>(
    r: &mut R,
    v: &mut Verifier,
    expect: u64,
) -> Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        v.check(&buf[..n])?;
        if v.seen > expect {
            return Err(format!(
                "received {} bytes, more than the {expect} sent (duplication)",
                v.seen
            )
            .into());
        }
    }
    if v.seen != expect {
        return Err(format!(
            "received {} of {expect} bytes before EOF (truncation)",
            v.seen
        )
        .into());
    }
    Ok(v.seen)
}

fn prefix(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    Prng::new(seed).fill(&mut v);
    v
}

// ---------------------------------------------------------------- daemon

struct Daemon {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

fn daemon_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PROXY_BIN") {
        return p.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["release", "debug"] {
        let p = root
            .join("target")
            .join(profile)
            .join("project-ingress-proxy");
        if p.exists() {
            return p;
        }
    }
    panic!("daemon binary not built (cargo build --release -p proxy-daemon) and PROXY_BIN unset");
}

impl Daemon {
    async fn start(splice: &str) -> Daemon {
        Self::start_args(&["--splice", splice]).await
    }

    async fn start_args(args: &[&str]) -> Daemon {
        let splice = args
            .iter()
            .skip_while(|a| **a != "--splice")
            .nth(1)
            .copied()
            .unwrap_or("");
        let mut child = Command::new(daemon_bin())
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("FASTPATH_DAEMON_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning the daemon");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(Vec::new()));
        let addr = loop {
            let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
                .await
                .expect("daemon start-up timed out")
                .unwrap()
                .unwrap_or_else(|| {
                    panic!("daemon exited during start-up: {:?}", log.lock().unwrap())
                });
            log.lock().unwrap().push(line.clone());
            if line.contains("project-ingress-proxy started") {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                if splice == "ebpf" {
                    assert_eq!(v["data_path"], "ebpf");
                }
                break v["listen"].as_str().unwrap().parse().unwrap();
            }
        };
        let l2 = log.clone();
        let echo = std::env::var_os("FASTPATH_ECHO_LOG").is_some();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if echo {
                    eprintln!("daemon: {line}");
                }
                l2.lock().unwrap().push(line);
            }
        });
        Daemon { child, addr, log }
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Entries in the daemon's BPF maps: (sockhash, hash) summed over its maps.
    fn map_entries(&self) -> (usize, usize) {
        let mut sock = 0;
        let mut hash = 0;
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fdinfo", self.pid())) else {
            return (0, 0);
        };
        for e in dir.flatten() {
            let Ok(info) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            let field = |k: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
            };
            let (Some(ty), Some(id)) = (field("map_type:"), field("map_id:")) else {
                continue;
            };
            let id: u32 = id.parse().unwrap();
            match ty.as_str() {
                "18" => sock += count_keys(id),
                "1" => hash += count_keys(id),
                _ => {}
            }
        }
        (sock, hash)
    }
}

/// Counts a map's keys (8-byte keys) through the bpf(2) syscall.
fn count_keys(map_id: u32) -> usize {
    #[repr(C)]
    struct GetFd {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    #[repr(C)]
    struct NextKey {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    unsafe {
        let mut a = GetFd {
            id: map_id,
            next_id: 0,
            open_flags: 0,
        };
        let fd = libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_GET_FD_BY_ID,
            &mut a as *mut _,
            std::mem::size_of::<GetFd>(),
        );
        if fd < 0 {
            return 0;
        }
        let mut key = 0u64;
        let mut next = 0u64;
        let mut first = true;
        let mut n = 0;
        loop {
            let mut b = NextKey {
                map_fd: fd as u32,
                _pad: 0,
                key: if first { 0 } else { &key as *const u64 as u64 },
                next_key: &mut next as *mut u64 as u64,
            };
            let r = libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &mut b as *mut _,
                std::mem::size_of::<NextKey>(),
            );
            if r < 0 {
                break;
            }
            n += 1;
            key = next;
            first = false;
            if n > 1_000_000 {
                break;
            }
        }
        libc::close(fd as i32);
        n
    }
}

// ---------------------------------------------------------------- upstream

/// Test upstream: answers every upgrade with 101 (plus `pre` bytes of its stream in the
/// same write), then behaves as the request path says. Results land in `results`.
struct Upstream {
    port: u16,
    results: Arc<Mutex<HashMap<u64, std::result::Result<(), String>>>>,
}

#[derive(Clone, Copy, Debug)]
struct Plan {
    seed: u64,
    /// Bytes client → upstream.
    up: u64,
    /// Bytes upstream → client.
    down: u64,
    /// Upstream bytes sent together with the 101 (hyper's leftover on that side).
    upstream_pre: u64,
    /// Client bytes sent together with the request (leftover on the client side).
    client_pre: u64,
    /// Upstream starts sending only after the client's EOF (half-close client first).
    down_after_eof: bool,
    /// Client starts sending only after the upstream's EOF.
    up_after_eof: bool,
    /// Upstream reader stalls this long before reading (slow reader).
    upstream_stall_ms: u64,
    /// Client reader stalls this long.
    client_stall_ms: u64,
}

impl Plan {
    fn new(seed: u64, up: u64, down: u64) -> Plan {
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
    fn path(&self) -> String {
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
    fn parse(path: &str) -> Option<Plan> {
        let p: Vec<&str> = path.strip_prefix("/stream/")?.split('/').collect();
        let mut plan = Plan::new(p[0].parse().ok()?, p[1].parse().ok()?, p[2].parse().ok()?);
        plan.upstream_pre = p[3].parse().ok()?;
        plan.down_after_eof = p[4] == "1";
        plan.upstream_stall_ms = p[5].parse().ok()?;
        plan.client_pre = p[6].parse().ok()?;
        Some(plan)
    }
}

const UP: u64 = 0x5555;
const DOWN: u64 = 0xAAAA;

async fn read_head(s: &mut TcpStream) -> io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).into_owned();
            return Ok((head, buf[i + 4..].to_vec()));
        }
    }
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let results = Arc::new(Mutex::new(HashMap::new()));
        let r = results.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let r = r.clone();
                tokio::spawn(async move {
                    let _ = serve(s, r).await;
                });
            }
        });
        Upstream { port, results }
    }

    fn result(&self, seed: u64) -> Option<std::result::Result<(), String>> {
        self.results.lock().unwrap().get(&seed).cloned()
    }
}

async fn serve(
    mut s: TcpStream,
    results: Arc<Mutex<HashMap<u64, std::result::Result<(), String>>>>,
) -> Result<()> {
    let (head, early) = read_head(&mut s).await?;
    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
    if path == "/echo" {
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n",
        )
        .await?;
        s.write_all(&early).await?;
        let (mut r, mut w) = s.into_split();
        tokio::io::copy(&mut r, &mut w).await?;
        w.shutdown().await?;
        return Ok(());
    }
    if let Some(rest) = path.strip_prefix("/reset/") {
        // Send `n` bytes, then reset.
        let n: usize = rest.parse()?;
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n",
        )
        .await?;
        s.write_all(&vec![7u8; n]).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
        drop(s);
        return Ok(());
    }
    if let Some(rest) = path.strip_prefix("/raw/") {
        // Unverified bulk for measurements: send `n` zero bytes and drain the other way.
        let n: u64 = rest.parse()?;
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n",
        )
        .await?;
        let (mut r, mut w) = s.into_split();
        let send = async {
            raw_send(&mut w, n).await?;
            w.shutdown().await
        };
        let drain = async { tokio::io::copy(&mut r, &mut tokio::io::sink()).await };
        let (a, b) = tokio::join!(send, drain);
        a?;
        b?;
        return Ok(());
    }
    if path == "/hold" {
        // Waits for the client's reset (or EOF), reports how it ended.
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n",
        )
        .await?;
        let mut b = [0u8; 1024];
        let end = loop {
            match s.read(&mut b).await {
                Ok(0) => break Err("eof".to_string()),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break Ok(()),
                Err(e) => break Err(e.to_string()),
            }
        };
        results.lock().unwrap().insert(0xDEAD, end);
        return Ok(());
    }
    let Some(plan) = Plan::parse(&path) else {
        s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    let result = async {
        let mut first =
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n"
                .to_vec();
        first.extend_from_slice(&prefix(plan.seed ^ DOWN, plan.upstream_pre as usize));
        s.write_all(&first).await.map_err(|e| e.to_string())?;
        let (mut r, mut w) = s.into_split();
        let (eof_tx, eof_rx) = tokio::sync::oneshot::channel::<()>();
        let reader = async {
            let mut v = Verifier::new(plan.seed ^ UP);
            v.check(&early).map_err(|e| e.to_string())?;
            if plan.upstream_stall_ms > 0 {
                tokio::time::sleep(Duration::from_millis(plan.upstream_stall_ms)).await;
            }
            let r = recv_stream(&mut r, &mut v, plan.up).await;
            let _ = eof_tx.send(());
            r.map_err(|e| format!("upstream receiving: {e}"))
        };
        let writer = async {
            if plan.down_after_eof {
                let _ = eof_rx.await;
            }
            send_stream(&mut w, plan.seed ^ DOWN, plan.upstream_pre, plan.down).await?;
            w.shutdown().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        };
        let (a, b) = tokio::join!(reader, writer);
        a?;
        b.map_err(|e| format!("upstream sending: {e}"))?;
        Ok::<_, String>(())
    }
    .await;
    results
        .lock()
        .unwrap()
        .insert(plan.seed, result.map_err(|e| e.to_string()));
    Ok(())
}

// ---------------------------------------------------------------- client

async fn open(daemon: &Daemon, port: u16, path: &str, pre: &[u8]) -> Result<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect(daemon.addr).await?;
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nX-Iterate-Proxy-Target-Host: localhost:{port}\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n"
    )
    .into_bytes();
    req.extend_from_slice(pre);
    s.write_all(&req).await?;
    let (head, rest) = read_head(&mut s).await?;
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("no upgrade: {head}").into());
    }
    Ok((s, rest))
}

/// Runs one tunnel per `plan` and checks both ends.
async fn run_plan(daemon: &Daemon, upstream: &Upstream, plan: Plan) -> Result<()> {
    let pre = prefix(plan.seed ^ UP, plan.client_pre as usize);
    let (s, early) = open(daemon, upstream.port, &plan.path(), &pre).await?;
    let (mut r, mut w) = s.into_split();
    let (eof_tx, eof_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = async {
        let mut v = Verifier::new(plan.seed ^ DOWN);
        v.check(&early).map_err(|e| e.to_string())?;
        if plan.client_stall_ms > 0 {
            tokio::time::sleep(Duration::from_millis(plan.client_stall_ms)).await;
        }
        let r = recv_stream(&mut r, &mut v, plan.down).await;
        let _ = eof_tx.send(());
        r.map_err(|e| format!("client receiving: {e}"))
    };
    let writer = async {
        if plan.up_after_eof {
            let _ = eof_rx.await;
        }
        send_stream(&mut w, plan.seed ^ UP, plan.client_pre, plan.up).await?;
        w.shutdown().await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    let (a, b) = tokio::join!(reader, writer);
    a?;
    b.map_err(|e| format!("client sending: {e}"))?;
    // The upstream's verdict lands right after its own EOF.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = upstream.result(plan.seed) {
            return r.map_err(Into::into);
        }
        if Instant::now() > deadline {
            return Err("upstream never finished".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `run_plan` with a deadline; on failure shows the daemon's last log lines.
async fn check(daemon: &Daemon, upstream: &Upstream, plan: Plan, secs: u64) {
    let r = tokio::time::timeout(Duration::from_secs(secs), run_plan(daemon, upstream, plan)).await;
    let err = match r {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "stalled".to_string(),
    };
    let log = daemon.log.lock().unwrap();
    let tail: Vec<&String> = log.iter().rev().take(12).collect();
    panic!("{plan:?}: {err}; daemon log tail: {tail:#?}");
}

async fn wait_idle(daemon: &Daemon, fds_before: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (sock, hash) = daemon.map_entries();
        let fds = daemon.fd_count();
        if sock == 0 && hash == 0 && fds <= fds_before {
            return;
        }
        if Instant::now() > deadline {
            panic!("leak: {sock} sockhash entries, {hash} direction entries, {fds} fds (before: {fds_before})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn mem_available_kib() -> i64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

// ---------------------------------------------------------------- tests

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_many_tunnels() {
    let daemon = Daemon::start(&mode()).await;
    let upstream = Upstream::start().await;
    let fds = daemon.fd_count();
    let (rounds, size) = if torture() {
        (40, 256 * MIB)
    } else {
        (8, 48 * MIB)
    };
    for round in 0..rounds {
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let plan = Plan::new(1000 + round * 10 + t, size, size);
            let d = &daemon;
            let u = &upstream;
            tasks.push(async move {
                tokio::time::timeout(Duration::from_secs(60), run_plan(d, u, plan))
                    .await
                    .map_err(|_| format!("round {round} tunnel {t}: stalled"))?
                    .map_err(|e| format!("round {round} tunnel {t}: {e}"))
            });
        }
        for r in futures_util::future::join_all(tasks).await {
            r.unwrap();
        }
    }
    wait_idle(&daemon, fds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_ping_pong() {
    let daemon = Daemon::start(&mode()).await;
    let upstream = Upstream::start().await;
    let (mut s, early) = open(&daemon, upstream.port, "/echo", b"").await.unwrap();
    assert!(early.is_empty());
    s.set_nodelay(true).unwrap();
    let n = if torture() { 20_000 } else { 3_000 };
    let mut b = [0u8; 1];
    for i in 0..n {
        let x = (i % 251) as u8;
        s.write_all(&[x]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .expect("stalled")
            .unwrap();
        assert_eq!(b[0], x, "round trip {i}");
    }
    s.shutdown().await.unwrap();
    assert_eq!(s.read(&mut b).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_small_messages() {
    let daemon = Daemon::start(&mode()).await;
    let upstream = Upstream::start().await;
    for seed in 0..if torture() { 20 } else { 4 } {
        let (s, _) = open(&daemon, upstream.port, "/echo", b"").await.unwrap();
        s.set_nodelay(true).unwrap();
        let (mut r, mut w) = s.into_split();
        let total = 4 * MIB;
        let writer = async move {
            let mut prng = Prng::new(seed ^ 0x77);
            let mut sizes = Prng::new(seed);
            let mut sent = 0u64;
            let mut buf = vec![0u8; 300];
            while sent < total {
                let mut sz = [0u8; 2];
                sizes.fill(&mut sz);
                let n = ((u16::from_le_bytes(sz) as u64 % 300) + 1).min(total - sent) as usize;
                prng.fill(&mut buf[..n]);
                w.write_all(&buf[..n]).await.unwrap();
                sent += n as u64;
                if sz[0] % 16 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            w.shutdown().await.unwrap();
        };
        let reader = async move {
            let mut v = Verifier::new(seed ^ 0x77);
            recv_stream(&mut r, &mut v, total).await.unwrap();
        };
        tokio::time::timeout(Duration::from_secs(60), async {
            tokio::join!(writer, reader)
        })
        .await
        .expect("stalled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_and_queued_bytes() {
    let daemon = Daemon::start(&mode()).await;
    let upstream = Upstream::start().await;
    let mut seed = 50_000;
    for (upstream_pre, client_pre, up, down) in [
        (1000, 1000, 1000, 1000), // only leftovers, nothing after: handoff must not wait for more
        (1, 1, 1, 1),
        (5000, 0, 5000, 5000), // upstream speaks right after its 101, nothing else
        (0, 3000, 3000, 0),    // client speaks with its request, nothing else
        (60_000, 60_000, 8 * MIB, 8 * MIB),
    ] {
        for _ in 0..if torture() { 50 } else { 5 } {
            seed += 1;
            let mut plan = Plan::new(seed, up, down);
            plan.upstream_pre = upstream_pre;
            plan.client_pre = client_pre;
            tokio::time::timeout(Duration::from_secs(30), run_plan(&daemon, &upstream, plan))
                .await
                .unwrap_or_else(|_| panic!("stalled: {plan:?}"))
                .unwrap_or_else(|e| panic!("{plan:?}: {e}"));
        }
    }
    // Client sends right after receiving the 101 (bytes queued before the splice),
    // upstream replies only when it has them: nothing more comes to kick the kernel.
    for i in 0..if torture() { 200 } else { 30 } {
        let (mut s, _) = open(&daemon, upstream.port, "/echo", b"").await.unwrap();
        let msg = format!("hello {i}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut b = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .expect("queued bytes stalled")
            .unwrap();
        assert_eq!(b, msg.as_bytes());
    }
}

async fn slow_reader(client_slow: bool) {
    let daemon = Daemon::start(&mode()).await;
    let upstream = Upstream::start().await;
    let total = 512 * MIB;
    let stall = 3000;
    let mut plan = if client_slow {
        Plan::new(70_001, 0, total)
    } else {
        Plan::new(70_002, total, 0)
    };
    if client_slow {
        plan.client_stall_ms = stall;
    } else {
        plan.upstream_stall_ms = stall;
    }
    let before = mem_available_kib();
    let d = &daemon;
    let u = &upstream;
    let run = run_plan(d, u, plan);
    let sampler = async {
        let mut worst = 0i64;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(stall - 200) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            worst = worst.max(before - mem_available_kib());
        }
        worst
    };
    let (r, worst_kib) = tokio::join!(tokio::time::timeout(Duration::from_secs(60), run), sampler);
    r.expect("stalled").unwrap();
    eprintln!(
        "slow reader ({}): memory grew by at most {} MiB while stalled",
        if client_slow { "client" } else { "upstream" },
        worst_kib / 1024
    );
    // Socket buffers (a few MiB each) + the fast-path budget; without the budget this was
    // gigabytes.
    assert!(
        worst_kib < 96 * 1024,
        "memory grew by {} MiB with a stalled reader",
        worst_kib / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_reader_bounded_memory() {
    slow_reader(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_reader_bounded_memory() {
    slow_reader(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_each_way() {
    let daemon = Daemon::start(&mode()).await;
    let upstream = Upstream::start().await;
    for i in 0..if torture() { 100 } else { 10 } {
        // Client half-closes first, upstream answers after it saw the EOF.
        let mut plan = Plan::new(80_000 + i, 2 * MIB + i, 3 * MIB);
        plan.down_after_eof = true;
        check(&daemon, &upstream, plan, 30).await;
        // Upstream half-closes first, client answers after it saw the EOF.
        let mut plan = Plan::new(81_000 + i, 3 * MIB, 2 * MIB + i);
        plan.up_after_eof = true;
        check(&daemon, &upstream, plan, 30).await;
        // Tiny: a few bytes and EOF right away (FIN possibly before the splice).
        let mut plan = Plan::new(82_000 + i, 10, 10);
        plan.client_pre = 10;
        plan.upstream_pre = 10;
        check(&daemon, &upstream, plan, 30).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_propagate() {
    let daemon = Daemon::start(&mode()).await;
    let upstream = Upstream::start().await;
    let fds = daemon.fd_count();
    for _ in 0..if torture() { 50 } else { 5 } {
        // Upstream resets: the client sees its bytes then a reset (not a clean EOF).
        let (mut s, early) = open(&daemon, upstream.port, "/reset/100000", b"")
            .await
            .unwrap();
        let mut got = early.len();
        let mut b = vec![0u8; 65536];
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut b).await {
                    Ok(0) => return Err("clean EOF instead of reset".to_string()),
                    Ok(n) => got += n,
                    Err(e) => return Ok(e.kind()),
                }
            }
        })
        .await
        .expect("reset not propagated");
        assert_eq!(end, Ok(io::ErrorKind::ConnectionReset), "after {got} bytes");
        // Client resets: the upstream sees a reset.
        upstream.results.lock().unwrap().remove(&0xDEAD);
        let (s, _) = open(&daemon, upstream.port, "/hold", b"").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(r) = upstream.result(0xDEAD) {
                r.unwrap();
                break;
            }
            assert!(Instant::now() < deadline, "client reset not propagated");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    wait_idle(&daemon, fds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_concurrent_tunnels_leave_nothing_behind() {
    let daemon = Daemon::start(&mode()).await;
    let upstream = Upstream::start().await;
    let fds = daemon.fd_count();
    let n = if torture() { 10_000 } else { 2_000 };
    let sem = Arc::new(tokio::sync::Semaphore::new(500));
    let mut tasks = Vec::new();
    let d = Arc::new(daemon);
    let u = Arc::new(upstream);
    for i in 0..n {
        let sem = sem.clone();
        let d = d.clone();
        let u = u.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let plan = Plan::new(1_000_000 + i, 1000 + i % 5000, 2000 + i % 3000);
            tokio::time::timeout(Duration::from_secs(60), run_plan(&d, &u, plan))
                .await
                .map_err(|_| format!("tunnel {i} stalled"))?
                .map_err(|e| format!("tunnel {i}: {e}"))
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let closed = d.log_lines("tunnel closed").len();
    assert!(
        closed >= n as usize - 10,
        "only {closed} tunnels logged closed"
    );
    wait_idle(&d, fds).await;
}

// ---------------------------------------------------------------- measurement

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

async fn raw_run(daemon: &Daemon, port: u16, up: u64, down: u64) -> Result<()> {
    let (s, early) = open(daemon, port, &format!("/raw/{down}"), b"").await?;
    let (mut r, mut w) = s.into_split();
    let send = async {
        raw_send(&mut w, up).await?;
        w.shutdown().await
    };
    let drain = async { tokio::io::copy(&mut r, &mut tokio::io::sink()).await };
    let (a, b) = tokio::join!(send, drain);
    a?;
    let got = b? + early.len() as u64;
    if got != down {
        return Err(format!("received {got} of {down}").into());
    }
    Ok(())
}

fn cpu_jiffies() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap();
    let line = s.lines().next().unwrap();
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle + iowait
    v.iter().take(8).sum::<u64>() - v[3] - v[4]
}

/// Throughput, small-message RTT and whole-machine CPU per GB for each relay, one run,
/// loopback. `cargo test --release -p tests --test fastpath -- --ignored measure --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_relays() {
    let size = 4096 * MIB;
    for (name, args) in [
        ("ebpf", vec!["--splice", "ebpf"]),
        (
            "splice",
            vec!["--splice", "off", "--userspace-relay", "splice"],
        ),
        ("copy", vec!["--splice", "off", "--userspace-relay", "copy"]),
    ] {
        let daemon = Daemon::start_args(&args).await;
        let upstream = Upstream::start().await;
        let hz = 100.0; // USER_HZ
        for (label, up, down) in [("one-way", size, 0), ("both-ways", size / 2, size / 2)] {
            let j0 = cpu_jiffies();
            let t0 = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(60),
                raw_run(&daemon, upstream.port, up, down),
            )
            .await;
            let secs = t0.elapsed().as_secs_f64();
            let cpu = (cpu_jiffies() - j0) as f64 / hz;
            let gb = (up + down) as f64 / 1e9;
            match r {
                Ok(Ok(())) => eprintln!(
                    "MEASURE {name:7} {label:9} {:6.2} GB/s  {:5.2} CPU-s/GB (whole machine)",
                    gb / secs,
                    cpu / gb
                ),
                Ok(Err(e)) => eprintln!("MEASURE {name:7} {label:9} FAILED: {e}"),
                Err(_) => eprintln!("MEASURE {name:7} {label:9} STALLED (60 s)"),
            }
        }
        let (mut s, _) = open(&daemon, upstream.port, "/echo", b"").await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut rtts = Vec::new();
        let msg = [42u8; 64];
        let mut b = [0u8; 64];
        let mut ok = true;
        for _ in 0..5000 {
            let t = Instant::now();
            s.write_all(&msg).await.unwrap();
            if tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b))
                .await
                .is_err()
            {
                ok = false;
                break;
            }
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
        rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if ok {
            eprintln!(
                "MEASURE {name:7} rtt-64B   p50 {:.1} us  p99 {:.1} us",
                rtts[rtts.len() / 2],
                rtts[rtts.len() * 99 / 100]
            );
        } else {
            eprintln!(
                "MEASURE {name:7} rtt-64B   STALLED after {} round trips",
                rtts.len()
            );
        }
    }
}
