//! Fast-path torture tests (SPEC §4): tunnels through the real daemon binary, every byte
//! checked end to end (both directions, EOF included) against seeded pseudo-random
//! streams, plus memory bounds under stalled readers and leak checks (BPF map entries,
//! file descriptors) once tunnels are gone.
//!
//! Runs on the netns harness like production: the client sits in its own network namespace
//! joined by veth to the machine namespace, where the daemon (`--splice <mode>`) runs and
//! the in-process upstream app listens on loopback.
//!
//! Needs root (namespaces, eBPF) and the daemon built with the eBPF object embedded
//! (`cargo xtask build-ebpf`, then `cargo build --release -p proxy-daemon`). Binary:
//! `PROJECT_INGRESS_PROXY_BIN`, else the newest of `target/{release,debug}/`.
//!
//! - `FASTPATH_SPLICE`: mode under test (default `ebpf`; `off` runs the same suite on the
//!   userspace relay).
//! - `FASTPATH_TORTURE=1`: longer repetitions.
//! - `FASTPATH_DAEMON_LOG`: the daemon's `RUST_LOG` (default `info`).
//! - `FASTPATH_ECHO_LOG=1`: echo daemon log lines to stderr as they come (with
//!   `--nocapture`); `SHOW_DAEMON_LOGS=1` prints the whole log when each daemon stops (the
//!   harness always does when a test fails).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::bpf;
use tests::pattern::{self, Verifier};
use tests::upstream::read_head;
use tests::{v4, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn torture() -> bool {
    std::env::var_os("FASTPATH_TORTURE").is_some_and(|v| v != "0")
}

fn mode() -> String {
    std::env::var("FASTPATH_SPLICE").unwrap_or_else(|_| "ebpf".into())
}

// ---------------------------------------------------------------- daemon

/// The daemon in the machine namespace of a fresh client/machine topology.
struct Rig {
    setup: Setup,
    /// The start line reported the in-kernel fast path: its maps must exist.
    fast_path: bool,
    /// FASTPATH_ECHO_LOG: copies the daemon's log lines to stderr.
    echo: Option<JoinHandle<()>>,
    /// Request id → (bytes client → upstream, bytes upstream → client) of every tunnel
    /// the test moved and checked: its closing line must say exactly that.
    expected: Mutex<HashMap<String, (u64, u64)>>,
    /// This test provokes kernel-side loss on purpose.
    allow_kernel_loss: bool,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(echo) = self.echo.take() {
            echo.abort();
        }
        if !std::thread::panicking() {
            self.check_closing_lines();
        }
    }
}

impl Rig {
    /// Every test's last check: each tunnel logs exactly one closing line; those the test
    /// planned log the bytes it moved each way, exactly; the kernel dropped and misparsed
    /// nothing (SPEC §4: kernel-side loss must never be silent).
    fn check_closing_lines(&self) {
        let expected = self.expected.lock().unwrap().clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        let by_id = loop {
            let mut by_id: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
            for line in self.log_lines("tunnel closed") {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let id = v["request_id"].as_str().unwrap_or_default().to_owned();
                by_id.entry(id).or_default().push(v);
            }
            let missing = expected
                .keys()
                .filter(|id| !by_id.contains_key(*id))
                .count();
            if missing == 0 || Instant::now() > deadline {
                break by_id;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for (id, (up, down)) in &expected {
            let lines = by_id
                .get(id)
                .unwrap_or_else(|| panic!("tunnel {id} logged no closing line"));
            let v = &lines[0];
            assert_eq!(v["end"], "closed", "{v}");
            assert_eq!(v["client_to_upstream"].as_u64(), Some(*up), "{v}");
            assert_eq!(v["upstream_to_client"].as_u64(), Some(*down), "{v}");
        }
        for (id, lines) in &by_id {
            assert_eq!(
                lines.len(),
                1,
                "tunnel {id} logged {} closing lines",
                lines.len()
            );
            let v = &lines[0];
            for (total, kernel) in [
                ("client_to_upstream", "client_to_upstream_kernel"),
                ("upstream_to_client", "upstream_to_client_kernel"),
            ] {
                assert!(v[kernel].as_u64() <= v[total].as_u64(), "{v}");
            }
            if !self.allow_kernel_loss {
                assert_eq!(
                    v["kernel_dropped"], 0,
                    "the kernel dropped tunnel bytes: {v}"
                );
                assert_eq!(
                    v["kernel_misparsed"], 0,
                    "the kernel misparsed tunnel bytes: {v}"
                );
            }
        }
        if !self.allow_kernel_loss {
            let warned = self.log_lines("the kernel lost or misparsed");
            assert!(warned.is_empty(), "{warned:?}");
        }
    }

    /// Records what a tunnel moved, for [`check_closing_lines`](Self::check_closing_lines).
    fn expect(&self, request_id: &str, up: u64, down: u64) {
        self.expected
            .lock()
            .unwrap()
            .insert(request_id.to_owned(), (up, down));
    }
}

impl Rig {
    async fn start(splice: &str) -> Rig {
        Self::start_args(&["--splice", splice]).await
    }

    async fn start_args(args: &[&str]) -> Rig {
        Self::start_with(args, &[]).await
    }

    async fn start_with(args: &[&str], env: &[(&str, &str)]) -> Rig {
        let splice = args
            .iter()
            .skip_while(|a| **a != "--splice")
            .nth(1)
            .copied()
            .unwrap_or("");
        let level = std::env::var("FASTPATH_DAEMON_LOG").unwrap_or_else(|_| "info".into());
        let mut env = env.to_vec();
        env.push(("RUST_LOG", level.as_str()));
        let setup = Setup::with_env(args, &env)
            .await
            .expect("starting the daemon in the machine namespace");
        let echo = std::env::var_os("FASTPATH_ECHO_LOG")
            .is_some_and(|v| v != "0")
            .then(|| echo_logs(setup.daemon.pid()));
        let mut rig = Rig {
            setup,
            fast_path: false,
            echo,
            expected: Mutex::new(HashMap::new()),
            allow_kernel_loss: false,
        };
        // The harness returns once the listener answers; the start line follows the bind.
        let Some(start) = rig.wait_log("project-ingress-proxy started", 0).await else {
            panic!("no start line from the daemon:\n{}", rig.logs());
        };
        let v: serde_json::Value = serde_json::from_str(&start).unwrap();
        if splice == "ebpf" {
            assert_eq!(v["data_path"], "ebpf", "{start}");
        }
        rig.fast_path = v["data_path"] == "ebpf";
        rig.settle().await;
        rig
    }

    /// Waits until the daemon is fully up before a test takes its fd baseline: the fast
    /// path finishes loading after the start line (its descriptors come then), and the
    /// harness's start-up probe connection must be gone, or a leaked fd could hide
    /// behind it.
    async fn settle(&self) {
        if self.fast_path {
            self.wait_log("in-kernel fast path loaded", 0)
                .await
                .expect("no fast-path line after the start line");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.open_connections() > 0 {
            assert!(
                Instant::now() < deadline,
                "start-up probe connection still open"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The worker threads build their runtimes (an epoll and an eventfd each) after
        // the start line: wait for the descriptor count to hold still.
        let mut last = self.fd_count();
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.fd_count();
            if now == last {
                break;
            }
            last = now;
        }
    }

    /// Starts the daemon again on the same topology (after the previous one died).
    async fn restart(&mut self, args: &[&str]) {
        let level = std::env::var("FASTPATH_DAEMON_LOG").unwrap_or_else(|_| "info".into());
        self.setup.daemon = tests::Daemon::start(&self.setup.topo, args, &[("RUST_LOG", &level)])
            .await
            .expect("restarting the daemon");
        self.expected.lock().unwrap().clear();
        let start = self
            .wait_log("project-ingress-proxy started", 0)
            .await
            .expect("no start line");
        let v: serde_json::Value = serde_json::from_str(&start).unwrap();
        self.fast_path = v["data_path"] == "ebpf";
        self.settle().await;
    }

    /// A TCP connection to the daemon from the client namespace, across the veth.
    async fn connect(&self) -> Result<TcpStream> {
        let socket = self.setup.topo.client.tcp_socket(false)?;
        Ok(socket.connect(self.setup.addr()).await?)
    }

    fn pid(&self) -> i32 {
        self.setup.daemon.pid()
    }

    fn alive(&self) -> bool {
        // Still running (not a zombie): /proc/<pid>/stat's state follows the ")".
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    }

    fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// The daemon's accepted connections that may still hold an fd (ESTABLISHED or
    /// CLOSE_WAIT on its listening port), from its namespace's /proc/net/tcp{,6}.
    fn open_connections(&self) -> usize {
        let port = format!(":{:04X}", self.setup.addr().port());
        ["tcp", "tcp6"]
            .iter()
            .filter_map(|t| std::fs::read_to_string(format!("/proc/{}/net/{t}", self.pid())).ok())
            .map(|table| {
                table
                    .lines()
                    .skip(1)
                    .filter(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        f.len() > 3 && f[1].ends_with(&port) && (f[3] == "01" || f[3] == "08")
                    })
                    .count()
            })
            .sum()
    }

    fn logs(&self) -> String {
        self.setup.daemon.logs()
    }

    /// The `nth` (from 0) daemon log line containing `needle`, waiting up to 10 s for it.
    async fn wait_log(&self, needle: &str, nth: usize) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.log_lines(needle).into_iter().nth(nth) {
                return Some(l);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn log_lines(&self, needle: &str) -> Vec<String> {
        self.logs()
            .lines()
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect()
    }

    fn log_tail(&self, n: usize) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Copies the daemon's log (its stderr, a file the harness owns) to our stderr as it grows.
fn echo_logs(pid: i32) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut f) = tokio::fs::File::open(format!("/proc/{pid}/fd/2")).await else {
            eprintln!("FASTPATH_ECHO_LOG: cannot open the daemon's log");
            return;
        };
        let mut pending = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match f.read(&mut buf).await {
                Ok(0) => tokio::time::sleep(Duration::from_millis(50)).await,
                Ok(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=i).collect();
                        eprintln!("daemon: {}", String::from_utf8_lossy(&line[..i]));
                    }
                }
                Err(_) => return,
            }
        }
    })
}

// ---------------------------------------------------------------- BPF maps

/// The fast path's maps, by the names the eBPF object gives them.
const SOCKET_MAPS: [&str; 2] = ["SOCKS", "TARGETS"];
const DIRECTION_MAP: &str = "DIRECTIONS";

/// Entries in the daemon's fast-path maps.
#[derive(Debug)]
struct MapEntries {
    /// SOCKS + TARGETS (sockhash) entries.
    sockets: usize,
    /// DIRECTIONS (hash) entries.
    directions: usize,
    /// Which of the three maps the daemon holds.
    found: BTreeSet<String>,
}

/// Ids of the BPF objects (`map_id:` or `prog_id:` in fdinfo) a process holds fds of.
fn bpf_ids(pid: i32, kind: &str) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for e in dir.flatten() {
            let Ok(info) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            if let Some(id) = info
                .lines()
                .find_map(|l| l.strip_prefix(kind))
                .and_then(|v| v.trim().parse::<u32>().ok())
            {
                ids.insert(id);
            }
        }
    }
    ids
}

impl Rig {
    /// One of the daemon's fast-path maps, by name.
    fn map(&self, name: &str) -> Option<OwnedFd> {
        bpf::map_named(self.pid(), name)
    }

    /// The machine-wide counters the verdict keeps: (bytes queued in the kernel now,
    /// most at once, over-budget events lost to a full ring).
    fn kernel_memory(&self) -> (i64, u64, u64) {
        let map = self.map("MEMORY").expect("MEMORY map");
        let mut v = [0u64; 3];
        assert!(bpf::lookup(&map, &0u32.to_ne_bytes(), bytemuck_u64(&mut v)));
        (v[0] as i64, v[1], v[2])
    }

    /// The verdict's state of every direction, by source socket cookie.
    fn directions(&self) -> HashMap<u64, proxy_common::Direction> {
        let map = self.map(DIRECTION_MAP).expect("DIRECTIONS map");
        bpf::keys(&map)
            .into_iter()
            .filter_map(|k| {
                let mut d = proxy_common::Direction::default();
                // SAFETY: Direction is repr(C) plain data; the kernel writes its bytes.
                let bytes = unsafe {
                    std::slice::from_raw_parts_mut(
                        &mut d as *mut proxy_common::Direction as *mut u8,
                        std::mem::size_of::<proxy_common::Direction>(),
                    )
                };
                bpf::lookup(&map, &k.to_ne_bytes(), bytes).then_some((k, d))
            })
            .collect()
    }

    /// Deletes every key of one of the daemon's maps (fault injection).
    fn clear_map(&self, name: &str) -> usize {
        let map = self.map(name).unwrap_or_else(|| panic!("{name} map"));
        let keys = bpf::keys(&map);
        for k in &keys {
            assert!(bpf::delete(&map, &k.to_ne_bytes()), "deleting from {name}");
        }
        keys.len()
    }

    /// Finds the daemon's maps through the map ids in /proc/<pid>/fdinfo, names them with
    /// BPF_OBJ_GET_INFO_BY_FD and counts their keys.
    fn map_entries(&self) -> MapEntries {
        let ids = bpf_ids(self.pid(), "map_id:");
        let mut m = MapEntries {
            sockets: 0,
            directions: 0,
            found: BTreeSet::new(),
        };
        for id in ids {
            let Some(map) = bpf::map_by_id(id) else {
                continue;
            };
            let Some((name, _)) = bpf::map_info(&map) else {
                continue;
            };
            if SOCKET_MAPS.contains(&name.as_str()) {
                m.sockets += bpf::count_keys(&map);
            } else if name == DIRECTION_MAP {
                m.directions += bpf::count_keys(&map);
            } else {
                continue;
            }
            m.found.insert(name);
        }
        m
    }
}

/// `v` as bytes (for a map lookup into u64s).
fn bytemuck_u64(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: any bytes are valid u64s; same memory, length in bytes.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

// ---------------------------------------------------------------- upstream

/// Test upstream: answers every upgrade with 101 (plus `pre` bytes of its stream in the
/// same write), then behaves as the request path says. Results land in `results`.
struct Upstream {
    port: u16,
    results: Arc<Mutex<HashMap<u64, std::result::Result<(), String>>>>,
    /// Sockets of `/hand/<key>` tunnels, for tests that play the upstream end themselves.
    handed: Arc<Handed>,
    accept: JoinHandle<()>,
}

/// Upstream sockets handed to the test, by key.
#[derive(Default)]
struct Handed {
    sockets: Mutex<HashMap<u64, TcpStream>>,
    arrived: tokio::sync::Notify,
}

impl Handed {
    fn put(&self, key: u64, s: TcpStream) {
        self.sockets.lock().unwrap().insert(key, s);
        self.arrived.notify_waiters();
    }

    async fn take(&self, key: u64) -> TcpStream {
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

impl Upstream {
    /// Listens on the machine namespace's loopback, next to the daemon.
    fn start(rig: &Rig) -> Upstream {
        Self::start_on(rig.setup.topo.machine.listen(v4(0)).unwrap())
    }

    fn start_on(listener: tokio::net::TcpListener) -> Upstream {
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

    fn result(&self, seed: u64) -> Option<std::result::Result<(), String>> {
        self.results.lock().unwrap().get(&seed).cloned()
    }
}

async fn serve(
    mut s: TcpStream,
    results: Arc<Mutex<HashMap<u64, std::result::Result<(), String>>>>,
    handed: Arc<Handed>,
) -> Result<()> {
    let (head, early) = read_head(&mut s).await?;
    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
    if let Some(key) = path.strip_prefix("/hand/") {
        // The test plays this end: 101, then the socket is the test's.
        assert!(
            early.is_empty(),
            "a /hand/ client sends nothing before the 101"
        );
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n",
        )
        .await?;
        handed.put(key.parse()?, s);
        return Ok(());
    }
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
        let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
        let send = async {
            raw_send(&mut w, n).await?;
            if n == 0 {
                // An idle side stays open until the busy one is done, as a WebSocket
                // would (a socket whose FIN arrived cannot be spliced).
                let _ = drained_rx.await;
            }
            w.shutdown().await
        };
        let drain = async {
            let r = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
            let _ = drained_tx.send(());
            r
        };
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
        first.extend_from_slice(&pattern::bytes(
            plan.seed ^ DOWN,
            plan.upstream_pre as usize,
        ));
        s.write_all(&first).await.map_err(|e| e.to_string())?;
        play(
            s,
            End {
                who: "upstream",
                recv_seed: plan.seed ^ UP,
                recv_len: plan.up,
                early: &early,
                stall_ms: plan.upstream_stall_ms,
                send_seed: plan.seed ^ DOWN,
                send_from: plan.upstream_pre,
                send_to: plan.down,
                send_after_eof: plan.down_after_eof,
            },
        )
        .await
    }
    .await;
    results
        .lock()
        .unwrap()
        .insert(plan.seed, result.map_err(|e| e.to_string()));
    Ok(())
}

/// One end of a planned tunnel.
struct End<'a> {
    who: &'static str,
    /// The stream coming in: its seed and total length, and the bytes of it that
    /// arrived together with the handshake.
    recv_seed: u64,
    recv_len: u64,
    early: &'a [u8],
    /// Wait this long before reading (slow reader).
    stall_ms: u64,
    /// The stream going out: bytes `send_from..send_to` (the ones before went with the
    /// handshake), then a half-close.
    send_seed: u64,
    send_from: u64,
    send_to: u64,
    /// Start sending only once the incoming stream has ended.
    send_after_eof: bool,
}

/// Plays one end of a tunnel: every incoming byte and the EOF checked, the outgoing
/// stream sent, both at once.
async fn play(s: TcpStream, end: End<'_>) -> std::result::Result<(), String> {
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

// ---------------------------------------------------------------- client

async fn open(rig: &Rig, port: u16, path: &str, pre: &[u8]) -> Result<(TcpStream, Vec<u8>)> {
    open_as(rig, port, path, pre, None).await
}

/// `open` with an `X-Request-Id` (the daemon logs the tunnel under it).
async fn open_as(
    rig: &Rig,
    port: u16,
    path: &str,
    pre: &[u8],
    request_id: Option<&str>,
) -> Result<(TcpStream, Vec<u8>)> {
    let s = rig.connect().await?;
    open_on(s, port, path, pre, request_id).await
}

/// Sends the upgrade request on `s` and reads the 101.
async fn open_on(
    mut s: TcpStream,
    port: u16,
    path: &str,
    pre: &[u8],
    request_id: Option<&str>,
) -> Result<(TcpStream, Vec<u8>)> {
    let id = request_id
        .map(|id| format!("X-Request-Id: {id}\r\n"))
        .unwrap_or_default();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nX-Iterate-Proxy-Target-Host: localhost:{port}\r\n{id}Connection: Upgrade\r\nUpgrade: test\r\n\r\n"
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
async fn run_plan(rig: &Rig, upstream: &Upstream, plan: Plan) -> Result<()> {
    let pre = pattern::bytes(plan.seed ^ UP, plan.client_pre as usize);
    let id = format!("plan-{}", plan.seed);
    let (s, early) = open_as(rig, upstream.port, &plan.path(), &pre, Some(&id)).await?;
    play(
        s,
        End {
            who: "client",
            recv_seed: plan.seed ^ DOWN,
            recv_len: plan.down,
            early: &early,
            stall_ms: plan.client_stall_ms,
            send_seed: plan.seed ^ UP,
            send_from: plan.client_pre,
            send_to: plan.up,
            send_after_eof: plan.up_after_eof,
        },
    )
    .await?;
    // The upstream's verdict lands right after its own EOF.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = upstream.result(plan.seed) {
            if r.is_ok() {
                rig.expect(&id, plan.up, plan.down);
            }
            return r.map_err(Into::into);
        }
        if Instant::now() > deadline {
            return Err("upstream never finished".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `run_plan` with a deadline; on failure shows the rig's last log lines.
async fn check(rig: &Rig, upstream: &Upstream, plan: Plan, secs: u64) {
    let r = tokio::time::timeout(Duration::from_secs(secs), run_plan(rig, upstream, plan)).await;
    let err = match r {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "stalled".to_string(),
    };
    panic!("{plan:?}: {err}; daemon log tail:\n{}", rig.log_tail(12));
}

/// Waits until the tunnels are gone from the daemon: no fast-path map entries, no more fds
/// than `fds_before`.
async fn wait_idle(rig: &Rig, fds_before: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            rig.alive(),
            "daemon exited; log tail:\n{}",
            rig.log_tail(20)
        );
        let maps = rig.map_entries();
        if rig.fast_path {
            let want: BTreeSet<String> = SOCKET_MAPS
                .into_iter()
                .chain([DIRECTION_MAP])
                .map(String::from)
                .collect();
            assert_eq!(maps.found, want, "the daemon's fast-path maps");
        }
        let fds = rig.fd_count();
        if maps.sockets == 0 && maps.directions == 0 && fds <= fds_before {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "leak: {} SOCKS+TARGETS entries, {} DIRECTIONS entries, {fds} fds (before: {fds_before}); daemon log tail:\n{}",
                maps.sockets,
                maps.directions,
                rig.log_tail(20)
            );
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
    let rig = Rig::start(&mode()).await;
    bulk_both_ways(&rig, 1000).await;
}

/// The same with the budgets off, so every byte of the bulk stays in the kernel (with the
/// default budget a bulk direction leaves it within milliseconds): the kernel's own
/// bulk path, where published sockmap deployments lost and duplicated data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_all_in_kernel() {
    if mode() != "ebpf" {
        return;
    }
    let rig = Rig::start_with(
        &["--splice", "ebpf"],
        &[
            ("PROJECT_INGRESS_PROXY_EBPF_BUDGET", "4294967295"),
            ("PROJECT_INGRESS_PROXY_EBPF_MEMORY_LIMIT", "0"),
        ],
    )
    .await;
    bulk_both_ways(&rig, 5000).await;
    let json = |l: &String| serde_json::from_str::<serde_json::Value>(l).unwrap();
    let leftovers: std::collections::HashMap<String, u64> = rig
        .log_lines("tunnel opened")
        .iter()
        .map(json)
        .map(|v| {
            let n =
                v["client_leftover"].as_u64().unwrap() + v["upstream_leftover"].as_u64().unwrap();
            (v["request_id"].as_str().unwrap().to_owned(), n)
        })
        .collect();
    let closed = rig.log_lines("tunnel closed");
    assert!(!closed.is_empty());
    for line in &closed {
        let v = json(line);
        let total =
            v["client_to_upstream"].as_u64().unwrap() + v["upstream_to_client"].as_u64().unwrap();
        // Every byte but those hyper had read past the upgrade moved in the kernel.
        let leftover = leftovers[v["request_id"].as_str().unwrap()];
        assert_eq!(v["in_kernel"].as_u64().unwrap(), total - leftover, "{line}");
    }
}

/// 4 tunnels at once, each `size` bytes both ways, for several rounds.
async fn bulk_both_ways(rig: &Rig, seed: u64) {
    let upstream = Upstream::start(rig);
    let fds = rig.fd_count();
    let (rounds, size) = if torture() {
        (40, 256 * MIB)
    } else {
        (8, 48 * MIB)
    };
    for round in 0..rounds {
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let plan = Plan::new(seed + round * 10 + t, size, size);
            let u = &upstream;
            tasks.push(async move {
                tokio::time::timeout(Duration::from_secs(60), run_plan(rig, u, plan))
                    .await
                    .map_err(|_| format!("round {round} tunnel {t}: stalled"))?
                    .map_err(|e| format!("round {round} tunnel {t}: {e}"))
            });
        }
        for r in futures_util::future::join_all(tasks).await {
            r.unwrap();
        }
    }
    wait_idle(rig, fds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_ping_pong() {
    let rig = Rig::start(&mode()).await;
    let upstream = Upstream::start(&rig);
    let (mut s, early) = open(&rig, upstream.port, "/echo", b"").await.unwrap();
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
    let rig = Rig::start(&mode()).await;
    let upstream = Upstream::start(&rig);
    for seed in 0..if torture() { 20 } else { 4 } {
        let (s, _) = open(&rig, upstream.port, "/echo", b"").await.unwrap();
        s.set_nodelay(true).unwrap();
        let (mut r, mut w) = s.into_split();
        let total = 4 * MIB;
        let writer = async move {
            // Message sizes 1..=300 from a second stream, data from the checked one.
            let mut sent = 0u64;
            let mut k = 0u64;
            let mut buf = vec![0u8; 300];
            while sent < total {
                let sz = [pattern::byte_at(seed, k), pattern::byte_at(seed, k + 1)];
                k += 2;
                let n = ((u16::from_le_bytes(sz) as u64 % 300) + 1).min(total - sent) as usize;
                pattern::fill(seed ^ 0x77, sent, &mut buf[..n]);
                w.write_all(&buf[..n]).await.unwrap();
                sent += n as u64;
                if sz[0].is_multiple_of(16) {
                    tokio::task::yield_now().await;
                }
            }
            w.shutdown().await.unwrap();
        };
        let reader = async move {
            let mut v = Verifier::new(seed ^ 0x77);
            pattern::receive(&mut r, &mut v, total).await.unwrap();
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
    let rig = Rig::start(&mode()).await;
    let upstream = Upstream::start(&rig);
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
            tokio::time::timeout(Duration::from_secs(30), run_plan(&rig, &upstream, plan))
                .await
                .unwrap_or_else(|_| panic!("stalled: {plan:?}"))
                .unwrap_or_else(|e| panic!("{plan:?}: {e}"));
        }
    }
    // Client sends right after receiving the 101 (bytes queued before the splice),
    // upstream replies only when it has them: nothing more comes to kick the kernel.
    for i in 0..if torture() { 200 } else { 30 } {
        let (mut s, _) = open(&rig, upstream.port, "/echo", b"").await.unwrap();
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
    let _heavy = MEMORY_HEAVY.lock().await;
    let rig = Rig::start(&mode()).await;
    let upstream = Upstream::start(&rig);
    let total = 512 * MIB;
    let stall = 3000;
    let mut plan = if client_slow {
        Plan::new(70_001, 0, total)
    } else {
        Plan::new(70_002, total, 0)
    };
    // The idle direction closes only after the busy one: a socket whose FIN has
    // arrived cannot enter a sockmap, which would leave the whole tunnel in userspace.
    if client_slow {
        plan.client_stall_ms = stall;
        plan.up_after_eof = true;
    } else {
        plan.upstream_stall_ms = stall;
        plan.down_after_eof = true;
    }
    let before = mem_available_kib();
    let d = &rig;
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
    if mode() == "ebpf" {
        // The kernel's own count: the most bytes queued in a psock at once (memory no
        // socket is charged for) stays near the 2 MiB budget. The verdict keeps
        // redirecting between its over-budget event and the daemon taking the socket
        // out of the map; that overshoot is allowed 2 MiB more.
        let line = rig
            .wait_log("tunnel closed", 0)
            .await
            .expect("no tunnel-closed line");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let peak = v["kernel_queue_peak"].as_u64().expect("kernel_queue_peak");
        let in_kernel = v["in_kernel"].as_u64().expect("in_kernel");
        eprintln!(
            "slow reader: kernel queue peak {peak} bytes, {in_kernel} bytes moved in the kernel"
        );
        assert!(peak <= 4 * MIB, "kernel queued {peak} bytes for one socket");
        assert!(
            in_kernel < total,
            "a stalled reader must move the direction out of the kernel ({in_kernel} bytes stayed in it)"
        );
    }
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
    let rig = Rig::start(&mode()).await;
    let upstream = Upstream::start(&rig);
    for i in 0..if torture() { 100 } else { 10 } {
        // Client half-closes first, upstream answers after it saw the EOF.
        let mut plan = Plan::new(80_000 + i, 2 * MIB + i, 3 * MIB);
        plan.down_after_eof = true;
        check(&rig, &upstream, plan, 30).await;
        // Upstream half-closes first, client answers after it saw the EOF.
        let mut plan = Plan::new(81_000 + i, 3 * MIB, 2 * MIB + i);
        plan.up_after_eof = true;
        check(&rig, &upstream, plan, 30).await;
        // Tiny: a few bytes and EOF right away (FIN possibly before the splice).
        let mut plan = Plan::new(82_000 + i, 10, 10);
        plan.client_pre = 10;
        plan.upstream_pre = 10;
        check(&rig, &upstream, plan, 30).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_propagate() {
    let rig = Rig::start(&mode()).await;
    let upstream = Upstream::start(&rig);
    let fds = rig.fd_count();
    for _ in 0..if torture() { 50 } else { 5 } {
        // Upstream resets: the client sees its bytes then a reset (not a clean EOF).
        let (mut s, early) = open(&rig, upstream.port, "/reset/100000", b"")
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
        let (s, _) = open(&rig, upstream.port, "/hold", b"").await.unwrap();
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
    wait_idle(&rig, fds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_concurrent_tunnels_leave_nothing_behind() {
    let rig = Rig::start(&mode()).await;
    let upstream = Upstream::start(&rig);
    let fds = rig.fd_count();
    let n = if torture() { 10_000 } else { 2_000 };
    let sem = Arc::new(tokio::sync::Semaphore::new(500));
    let mut tasks = Vec::new();
    let d = Arc::new(rig);
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
    wait_idle(&d, fds).await;
    // Log lines leave the daemon in batches: give the last ones a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let closed = loop {
        let closed = d.log_lines("tunnel closed").len();
        if closed >= n as usize - 10 || Instant::now() > deadline {
            break closed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        closed >= n as usize - 10,
        "only {closed} tunnels logged closed"
    );
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

async fn raw_run(rig: &Rig, port: u16, up: u64, down: u64) -> Result<()> {
    let (s, early) = open(rig, port, &format!("/raw/{down}"), b"").await?;
    let (mut r, mut w) = s.into_split();
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let send = async {
        raw_send(&mut w, up).await?;
        if up == 0 {
            let _ = drained_rx.await;
        }
        w.shutdown().await
    };
    let drain = async {
        let r = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
        let _ = drained_tx.send(());
        r
    };
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
/// client namespace → veth → daemon → upstream on the machine's loopback.
/// `cargo test --release -p tests --test fastpath -- --ignored measure --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_relays() {
    let size = 4096 * MIB;
    let ebpf = vec!["--splice", "ebpf"];
    for (name, args, budget) in [
        ("ebpf", ebpf.clone(), None),
        ("ebpf-16M", ebpf.clone(), Some("16777216")),
        ("ebpf-inf", ebpf, Some("4294967295")),
        (
            "splice",
            vec!["--splice", "off", "--userspace-relay", "splice"],
            None,
        ),
        (
            "copy",
            vec!["--splice", "off", "--userspace-relay", "copy"],
            None,
        ),
    ] {
        let env: Vec<(&str, &str)> = budget
            .map(|b| ("PROJECT_INGRESS_PROXY_EBPF_BUDGET", b))
            .into_iter()
            .collect();
        let rig = Rig::start_with(&args, &env).await;
        let upstream = Upstream::start(&rig);
        let hz = 100.0; // USER_HZ
        for (label, up, down) in [
            ("up", size, 0),
            ("down", 0, size),
            ("both-ways", size / 2, size / 2),
        ] {
            let closed_before = rig.log_lines("tunnel closed").len();
            let j0 = cpu_jiffies();
            let t0 = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(60),
                raw_run(&rig, upstream.port, up, down),
            )
            .await;
            let secs = t0.elapsed().as_secs_f64();
            let cpu = (cpu_jiffies() - j0) as f64 / hz;
            let gb = (up + down) as f64 / 1e9;
            match r {
                Ok(Ok(())) => eprintln!(
                    "MEASURE {name:8} {label:9} {:6.2} GB/s  {:5.2} CPU-s/GB (whole machine){}",
                    gb / secs,
                    cpu / gb,
                    kernel_share(&rig, closed_before).await
                ),
                Ok(Err(e)) => eprintln!("MEASURE {name:8} {label:9} FAILED: {e}"),
                Err(_) => eprintln!("MEASURE {name:8} {label:9} STALLED (60 s)"),
            }
        }
        let (mut s, _) = open(&rig, upstream.port, "/echo", b"").await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut rtts = Vec::new();
        let j0 = cpu_jiffies();
        let msg = [42u8; 64];
        let mut b = [0u8; 64];
        let mut ok = true;
        for _ in 0..20_000 {
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
        let cpu_ms = (cpu_jiffies() - j0) as f64 * 10.0; // USER_HZ = 100
        rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if ok {
            eprintln!(
                "MEASURE {name:8} rtt-64B   p50 {:.1} us  p99 {:.1} us  {:.1} ms CPU per 1000 round trips (whole machine)",
                rtts[rtts.len() / 2],
                rtts[rtts.len() * 99 / 100],
                cpu_ms * 1000.0 / rtts.len() as f64
            );
        } else {
            eprintln!(
                "MEASURE {name:8} rtt-64B   STALLED after {} round trips",
                rtts.len()
            );
        }
    }
}

/// ", N% of bytes in the kernel, queue peak P" from the tunnel that closed after
/// `closed_before` others (empty for the userspace relays).
async fn kernel_share(rig: &Rig, closed_before: usize) -> String {
    let Some(line) = rig.wait_log("tunnel closed", closed_before).await else {
        return ", no tunnel-closed line".into();
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let total = v["client_to_upstream"].as_u64().unwrap_or(0)
        + v["upstream_to_client"].as_u64().unwrap_or(0);
    match (v["in_kernel"].as_u64(), v["relay"].as_str()) {
        (Some(k), Some("ebpf")) if total > 0 => format!(
            ", {:.0}% in kernel, queue peak {:.1} MiB",
            k as f64 * 100.0 / total as f64,
            v["kernel_queue_peak"].as_u64().unwrap_or(0) as f64 / MIB as f64
        ),
        _ => String::new(),
    }
}

// ---------------------------------------------------------------- hardening

/// A tunnel whose both ends the test plays: (client socket, upstream socket). Logged by
/// the daemon under `request_id`.
async fn pair(
    rig: &Rig,
    upstream: &Upstream,
    key: u64,
    request_id: &str,
) -> (TcpStream, TcpStream) {
    let (c, early) = open_as(
        rig,
        upstream.port,
        &format!("/hand/{key}"),
        b"",
        Some(request_id),
    )
    .await
    .unwrap();
    assert!(early.is_empty());
    (c, upstream.handed.take(key).await)
}

/// Reads exactly `n` bytes of stream `seed` from `offset`, checking each.
async fn read_checked(s: &mut TcpStream, seed: u64, offset: u64, n: u64) -> io::Result<()> {
    let mut v = Verifier::new(seed);
    v.received = offset;
    let mut buf = vec![0u8; 64 * 1024];
    let end = offset + n;
    while v.received < end {
        let want = ((end - v.received) as usize).min(buf.len());
        let got = s.read(&mut buf[..want]).await?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF after {} of {end} bytes", v.received),
            ));
        }
        v.feed(&buf[..got]).map_err(io::Error::other)?;
    }
    Ok(())
}

/// How a stream ended after its last expected byte: `Ok(())` for a clean EOF.
async fn read_end(s: &mut TcpStream) -> std::result::Result<(), io::ErrorKind> {
    let mut b = [0u8; 1024];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
        .await
        .expect("stream neither ended nor reset");
    match r {
        Ok(0) => Ok(()),
        Ok(n) => panic!("{n} unexpected bytes"),
        Err(e) => Err(e.kind()),
    }
}

/// The closing line of the tunnel logged under `request_id`.
async fn closing_line(rig: &Rig, request_id: &str) -> serde_json::Value {
    let needle = format!("\"request_id\":\"{request_id}\"");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = rig
            .log_lines("tunnel closed")
            .into_iter()
            .find(|l| l.contains(&needle))
        {
            return serde_json::from_str(&l).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no closing line for {request_id}:\n{}",
            rig.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Tests that hold or measure large amounts of memory run one at a time (the slow-reader
/// tests bound the machine's `MemAvailable`, which every other such test would move).
static MEMORY_HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Issue 10.4: the machine-wide budget. 48 stalled readers, each direction under its own
/// 16 MiB budget (together they could hold 768 MiB): with an 8 MiB machine-wide limit
/// most directions must leave the kernel for the limit, long before their own budget
/// (not all: a tunnel opened last may find the queue drained by then). With the default
/// 2 MiB budget, whether a direction crossed its own budget or the limit first depended
/// on how fast the daemon handed directions over: the test measured timing. How far the kernel's peak goes past the limit depends on how fast the daemon
/// reacts (line rate meanwhile) and so on the machine's load: it is printed and measured
/// in `measure_stalled_tunnels_memory`, not asserted. Once every tunnel is gone the
/// count is back to exactly 0: the ledger neither leaks nor double-counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_bounds_kernel_memory_across_tunnels() {
    if mode() != "ebpf" {
        return;
    }
    let _heavy = MEMORY_HEAVY.lock().await;
    let (for_limit, _) = stalled_readers_kernel_peak(8 * MIB).await;
    assert!(
        for_limit >= 24,
        "only {for_limit} of 48 directions left the kernel for the machine-wide limit"
    );
}

/// 48 tunnels whose clients stall 2 s while their upstreams send 32 MiB each, with
/// `--ebpf-memory-limit limit`: directions handed over for the limit, and the kernel's
/// machine-wide peak of queued bytes.
async fn stalled_readers_kernel_peak(limit: u64) -> (usize, u64) {
    let tunnels = 48u64;
    let rig = Rig::start_with(
        &["--splice", "ebpf", "--ebpf-budget", &(16 * MIB).to_string()],
        &[(
            "PROJECT_INGRESS_PROXY_EBPF_MEMORY_LIMIT",
            &limit.to_string(),
        )],
    )
    .await;
    let upstream = Upstream::start(&rig);
    let fds = rig.fd_count();
    let tasks = (0..tunnels).map(|i| {
        let mut plan = Plan::new(90_000 + i, 0, 32 * MIB);
        plan.client_stall_ms = 2000;
        plan.up_after_eof = true;
        let (rig, upstream) = (&rig, &upstream);
        async move {
            tokio::time::timeout(Duration::from_secs(90), run_plan(rig, upstream, plan))
                .await
                .map_err(|_| format!("tunnel {i} stalled"))?
                .map_err(|e| format!("tunnel {i}: {e}"))
        }
    });
    for r in futures_util::future::join_all(tasks).await {
        r.unwrap();
    }
    wait_idle(&rig, fds).await;
    let (queued, peak, _) = rig.kernel_memory();
    let handed: Vec<String> = rig
        .log_lines("tunnel closed")
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["upstream_to_client_handoff"].as_str().unwrap().to_owned()
        })
        .collect();
    let for_limit = handed.iter().filter(|h| *h == "memory_limit").count();
    eprintln!(
        "memory limit {:.0} MiB, {tunnels} stalled readers: kernel peak {:.1} MiB machine-wide; {for_limit} directions handed over for the limit, {} for their own budget",
        limit as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        handed.iter().filter(|h| *h == "budget").count(),
    );
    assert_eq!(
        queued, 0,
        "bytes still counted as queued with no tunnel left"
    );
    (for_limit, peak)
}

/// Issue 10.9: the maps full. With room for 4 tunnels (8 sockets), 10 tunnels open at once
/// all carry every byte; the 4 first are spliced in the kernel, the rest fall back to the
/// userspace relay; once they are gone the kernel takes tunnels again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_full_fall_back_to_userspace() {
    if mode() != "ebpf" {
        return;
    }
    let rig = Rig::start_args(&["--splice", "ebpf", "--ebpf-max-sockets", "8"]).await;
    let upstream = Upstream::start(&rig);
    let fds = rig.fd_count();
    let mut pairs = Vec::new();
    for i in 0..10u64 {
        let id = format!("full-{i}");
        let (c, u) = pair(&rig, &upstream, i, &id).await;
        pairs.push((id, c, u));
    }
    let n = 256 * 1024;
    let tasks = pairs.into_iter().enumerate().map(|(i, (id, c, u))| {
        let rig = &rig;
        async move {
            exchange(c, u, 91_000 + i as u64, n).await;
            rig.expect(&id, n, n);
            id
        }
    });
    let ids = futures_util::future::join_all(tasks).await;
    let mut kernel = 0;
    for id in &ids {
        let v = closing_line(&rig, id).await;
        match (
            v["client_to_upstream_path"].as_str(),
            v["upstream_to_client_path"].as_str(),
        ) {
            (Some("kernel"), Some("kernel")) => kernel += 1,
            (Some("copy"), Some("copy")) => {}
            other => panic!("unexpected data paths {other:?}: {v}"),
        }
    }
    assert_eq!(kernel, 4, "tunnels spliced in the kernel with room for 4");
    wait_idle(&rig, fds).await;
    let (c, u) = pair(&rig, &upstream, 99, "full-after").await;
    exchange(c, u, 91_999, n).await;
    rig.expect("full-after", n, n);
    let v = closing_line(&rig, "full-after").await;
    assert_eq!(v["client_to_upstream_path"], "kernel", "{v}");
}

/// Both ends send `n` checked bytes, read the other's, then half-close; both EOFs checked.
async fn exchange(c: TcpStream, u: TcpStream, seed: u64, n: u64) {
    let end = |s: TcpStream, send_seed: u64, recv_seed: u64| async move {
        let (mut r, mut w) = s.into_split();
        let send = async {
            pattern::send(&mut w, send_seed, 0, n).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let recv = async {
            let mut v = Verifier::new(recv_seed);
            pattern::receive(&mut r, &mut v, n).await.unwrap();
        };
        tokio::join!(send, recv);
    };
    tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join(
            end(c, seed ^ UP, seed ^ DOWN),
            end(u, seed ^ DOWN, seed ^ UP),
        ),
    )
    .await
    .expect("exchange stalled");
}

/// Issue 10.9: the event ring full. With a one-page ring (about 170 events) and the daemon
/// stopped, 192 upstreams push 1 MiB each into clients that do not read: 192 directions go
/// over their 64 KiB budget while nobody drains the ring. Once the daemon runs again,
/// every one of them must still leave the kernel (before: those whose event was lost
/// stayed there, holding their bytes), and every byte arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_ring_full_still_hands_every_direction_over() {
    if mode() != "ebpf" {
        return;
    }
    let _heavy = MEMORY_HEAVY.lock().await;
    let rig = Rig::start_with(
        &[
            "--splice",
            "ebpf",
            "--ebpf-budget",
            "65536",
            "--ebpf-event-ring-bytes",
            "4096",
        ],
        &[],
    )
    .await;
    let upstream = Upstream::start(&rig);
    let fds = rig.fd_count();
    let tunnels = 192u64;
    let n = MIB;
    let mut pairs = Vec::new();
    for i in 0..tunnels {
        // A tiny receive window, so the bytes redirected to the client queue in the
        // kernel (the daemon's client socket sends little over the veth).
        let sock = rig.setup.topo.client.tcp_socket(false).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let c = sock.connect(rig.setup.addr()).await.unwrap();
        let id = format!("ring-{i}");
        let (c, early) = open_on(c, upstream.port, &format!("/hand/{i}"), b"", Some(&id))
            .await
            .unwrap();
        assert!(early.is_empty());
        pairs.push((id, c, upstream.handed.take(i).await));
    }
    // Every tunnel's directions in the kernel before the daemon stops: one whose relay
    // had not inserted its sockets yet would wait for the stopped daemon (under load,
    // the 101 reaches the client before the relay task runs).
    let deadline = Instant::now() + Duration::from_secs(20);
    while (rig.directions().len() as u64) < 2 * tunnels {
        assert!(
            Instant::now() < deadline,
            "{} of {} directions entered the kernel",
            rig.directions().len(),
            2 * tunnels
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rig.setup.daemon.stop_process().await;
    let resumed = scopeguard_cont(rig.pid());
    // The upstreams write while the daemon is stopped; the kernel splices on.
    let mut ends = Vec::new();
    for (i, (id, c, mut u)) in pairs.into_iter().enumerate() {
        let seed = 92_000 + i as u64;
        pattern::send(&mut u, seed ^ DOWN, 0, n).await.unwrap();
        ends.push((id, seed, c, u));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let redirected: u64 = rig.directions().values().map(|d| d.redirected).sum();
        if redirected == tunnels * n {
            break;
        }
        if Instant::now() > deadline {
            let short: Vec<String> = rig
                .directions()
                .iter()
                .filter(|(_, d)| d.redirected != 0 && d.redirected != n)
                .map(|(k, d)| format!("{k}: {} bytes, flags {:#x}", d.redirected, d.flags))
                .collect();
            panic!(
                "the kernel redirected {redirected} of {} bytes; short directions: {short:?}",
                tunnels * n
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, _, missed) = rig.kernel_memory();
    let over = rig
        .directions()
        .values()
        .filter(|d| d.flags & proxy_common::FLAG_OVER_BUDGET != 0)
        .count();
    assert_eq!(over as u64, tunnels, "directions over budget");
    assert!(missed > 0, "the ring never filled; the test proves nothing");
    drop(resumed);
    let tasks = ends.into_iter().map(|(id, seed, mut c, mut u)| {
        let rig = &rig;
        async move {
            tokio::time::timeout(Duration::from_secs(60), async {
                read_checked(&mut c, seed ^ DOWN, 0, n).await.unwrap();
                u.shutdown().await.unwrap();
                assert_eq!(read_end(&mut c).await, Ok(()));
                c.shutdown().await.unwrap();
                assert_eq!(read_end(&mut u).await, Ok(()));
            })
            .await
            .expect("stalled");
            rig.expect(&id, 0, n);
            id
        }
    });
    let ids = futures_util::future::join_all(tasks).await;
    for id in &ids {
        let v = closing_line(&rig, id).await;
        assert_ne!(
            v["upstream_to_client_handoff"], "none",
            "{id}: a direction over budget stayed in the kernel: {v}"
        );
    }
    assert!(!rig.log_lines("event ring was full").is_empty());
    wait_idle(&rig, fds).await;
}

/// Sends SIGCONT to `pid` when dropped (also when the test fails while it is stopped).
fn scopeguard_cont(pid: i32) -> impl Drop {
    struct Cont(i32);
    impl Drop for Cont {
        fn drop(&mut self) {
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    Cont(pid)
}

/// Issue 10.9: `kill -9` with spliced tunnels. The kernel frees every map and program of
/// the dead daemon (nothing is pinned), its clients see their connections end instead of
/// hanging, and a daemon started again on the same address serves tunnels in the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_frees_kernel_state_and_a_restart_serves() {
    if mode() != "ebpf" {
        return;
    }
    let mut rig = Rig::start("ebpf").await;
    let upstream = Upstream::start(&rig);
    let mut live = Vec::new();
    for i in 0..8u64 {
        let (mut c, mut u) = pair(&rig, &upstream, i, &format!("k9-{i}")).await;
        // Bytes both ways through the kernel, checked, then the tunnel stays open.
        let seed = 93_000 + i;
        pattern::send(&mut c, seed ^ UP, 0, 100_000).await.unwrap();
        read_checked(&mut u, seed ^ UP, 0, 100_000).await.unwrap();
        pattern::send(&mut u, seed ^ DOWN, 0, 100_000)
            .await
            .unwrap();
        read_checked(&mut c, seed ^ DOWN, 0, 100_000).await.unwrap();
        live.push((c, u));
    }
    assert_eq!(rig.map_entries().sockets, 32, "8 tunnels spliced");
    let maps = bpf_ids(rig.pid(), "map_id:");
    let progs: BTreeSet<u32> = bpf_ids(rig.pid(), "prog_id:");
    assert!(
        maps.len() >= 6 && !progs.is_empty(),
        "maps {maps:?} programs {progs:?}"
    );
    rig.setup.daemon.signal(libc::SIGKILL);
    let code = rig
        .setup
        .daemon
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(code, None, "killed by a signal");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left_maps: Vec<u32> = maps
            .iter()
            .copied()
            .filter(|&id| bpf::map_by_id(id).is_some())
            .collect();
        let left_progs: Vec<u32> = progs
            .iter()
            .copied()
            .filter(|&id| bpf::prog_exists(id))
            .collect();
        if left_maps.is_empty() && left_progs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the kernel kept maps {left_maps:?} and programs {left_progs:?} of the killed daemon"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (mut c, mut u) in live {
        // The daemon died: each side's connection ends (either way), none hangs.
        let _ = read_end(&mut c).await;
        let _ = read_end(&mut u).await;
    }
    rig.restart(&["--splice", "ebpf"]).await;
    let fds = rig.fd_count();
    check(&rig, &upstream, Plan::new(93_100, 3 * MIB, 3 * MIB), 30).await;
    let v = closing_line(&rig, "plan-93100").await;
    assert!(
        v["client_to_upstream_path"]
            .as_str()
            .unwrap()
            .starts_with("kernel"),
        "{v}"
    );
    wait_idle(&rig, fds).await;
}

/// Issues 10.3 and 10.9: a hand-off to splice(2) that cannot get a pipe (the daemon is at
/// its fd limit) relays that direction with the copy relay, never resets the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_without_a_pipe_copies_instead() {
    if mode() != "ebpf" {
        return;
    }
    let rig = Rig::start("ebpf").await;
    let upstream = Upstream::start(&rig);
    let (mut c, mut u) = pair(&rig, &upstream, 1, "nopipe").await;
    let n = 32 * MIB;
    // From here on the daemon cannot open a single fd.
    let limit = FdLimit::squeeze(rig.pid());
    let seed = 94_000;
    let send = async {
        pattern::send(&mut u, seed ^ DOWN, 0, n).await.unwrap();
        u.shutdown().await.unwrap();
    };
    let recv = async {
        // A reader that starts late: the direction goes over its budget.
        tokio::time::sleep(Duration::from_millis(500)).await;
        read_checked(&mut c, seed ^ DOWN, 0, n).await.unwrap();
        assert_eq!(read_end(&mut c).await, Ok(()));
    };
    tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(send, recv) })
        .await
        .expect("stalled");
    drop(limit);
    // The idle direction closes cleanly too.
    c.shutdown().await.unwrap();
    assert_eq!(read_end(&mut u).await, Ok(()));
    rig.expect("nopipe", 0, n);
    let v = closing_line(&rig, "nopipe").await;
    assert_eq!(v["upstream_to_client_path"], "kernel+copy", "{v}");
    assert!(!rig.log_lines("cannot get a pipe").is_empty());
}

/// Lowers a process's soft open-file limit to its lowest free fd number (no new fd can be
/// opened) and restores it when dropped.
struct FdLimit {
    pid: i32,
    old: libc::rlimit,
}

impl FdLimit {
    fn squeeze(pid: i32) -> FdLimit {
        let used: BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        let lowest_free = (0..).find(|n| !used.contains(n)).unwrap();
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit reads `new` and writes `old`.
        let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
        assert_eq!(r, 0, "prlimit: {}", io::Error::last_os_error());
        let new = libc::rlimit {
            rlim_cur: lowest_free,
            rlim_max: old.rlim_max,
        };
        let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
        assert_eq!(r, 0, "prlimit: {}", io::Error::last_os_error());
        FdLimit { pid, old }
    }
}

impl Drop for FdLimit {
    fn drop(&mut self) {
        unsafe {
            libc::prlimit(
                self.pid,
                libc::RLIMIT_NOFILE,
                &self.old,
                std::ptr::null_mut(),
            )
        };
    }
}

/// Issue 10.6: if the task that hands directions over from the kernel stops (here: a
/// test-only fault makes it panic at its first event), directions over budget could never
/// leave the kernel again. The daemon must log it and exit non-zero, and reset its
/// tunnels on the way out rather than let them look complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_task_failure_is_fatal() {
    if mode() != "ebpf" {
        return;
    }
    let mut rig = Rig::start_with(
        &["--splice", "ebpf"],
        &[("PROJECT_INGRESS_PROXY_TEST_FAULT", "event-reader-panic")],
    )
    .await;
    let upstream = Upstream::start(&rig);
    let (mut c, mut u) = pair(&rig, &upstream, 1, "fatal").await;
    let seed = 95_000;
    // A reader that does not read: the direction goes over budget, the event kills the task.
    let send = async {
        let _ = pattern::send(&mut u, seed ^ DOWN, 0, 64 * MIB).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), send).await;
    let code = rig
        .setup
        .daemon
        .wait_exit(Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!(code, Some(1), "exit status");
    assert!(
        !rig.log_lines("stopped handing directions over").is_empty(),
        "{}",
        rig.log_tail(10)
    );
    // Every byte the client got is right, and the stream ends in a reset.
    let mut v = Verifier::new(seed ^ DOWN);
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("hang")
        {
            Ok(0) => break Ok(()),
            Ok(n) => v.feed(&buf[..n]).unwrap(),
            Err(e) => break Err(e.kind()),
        }
    };
    assert_eq!(
        end,
        Err(io::ErrorKind::ConnectionReset),
        "after {} bytes",
        v.received
    );
    let v = closing_line(&rig, "fatal").await;
    assert_eq!(v["end"], "shutdown", "{v}");
}

/// Issue 10.6: the verdict's state of a direction is gone when its EOF comes (simulated by
/// deleting it from the map). The daemon cannot know whether every byte went through, so
/// it must reset the tunnel, not shut it down as if the stream were complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_direction_state_resets_the_tunnel() {
    if mode() != "ebpf" {
        return;
    }
    let rig = Rig::start("ebpf").await;
    let upstream = Upstream::start(&rig);
    let (mut c, mut u) = pair(&rig, &upstream, 1, "lost").await;
    let seed = 96_000;
    pattern::send(&mut c, seed ^ UP, 0, 50_000).await.unwrap();
    read_checked(&mut u, seed ^ UP, 0, 50_000).await.unwrap();
    pattern::send(&mut u, seed ^ DOWN, 0, 50_000).await.unwrap();
    read_checked(&mut c, seed ^ DOWN, 0, 50_000).await.unwrap();
    assert_eq!(rig.clear_map(DIRECTION_MAP), 2);
    c.shutdown().await.unwrap();
    assert_eq!(read_end(&mut u).await, Err(io::ErrorKind::ConnectionReset));
    let v = closing_line(&rig, "lost").await;
    assert_eq!(v["end"], "reset", "{v}");
}

/// Issue 10.6: bytes the kernel failed to redirect (simulated by taking both sockets out
/// of the redirect map) are counted, logged as a warning, and the tunnel is reset instead
/// of closed as if complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_loss_is_reported_and_resets_the_tunnel() {
    if mode() != "ebpf" {
        return;
    }
    let mut rig = Rig::start("ebpf").await;
    rig.allow_kernel_loss = true;
    let upstream = Upstream::start(&rig);
    let (mut c, mut u) = pair(&rig, &upstream, 1, "loss").await;
    let seed = 97_000;
    pattern::send(&mut c, seed ^ UP, 0, 20_000).await.unwrap();
    read_checked(&mut u, seed ^ UP, 0, 20_000).await.unwrap();
    assert_eq!(rig.clear_map("TARGETS"), 2);
    pattern::send(&mut c, seed ^ UP, 20_000, 21_000)
        .await
        .unwrap();
    // Wait until the verdict has seen (and dropped) them, then end the stream.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.directions().values().map(|d| d.dropped).sum::<u64>() < 1000 {
        assert!(Instant::now() < deadline, "the verdict never saw the bytes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.shutdown().await.unwrap();
    assert_eq!(read_end(&mut u).await, Err(io::ErrorKind::ConnectionReset));
    let v = closing_line(&rig, "loss").await;
    assert_eq!(v["kernel_dropped"], 1000, "{v}");
    assert_eq!(v["end"], "reset", "{v}");
    assert_eq!(rig.log_lines("the kernel lost or misparsed").len(), 1);
}

/// Issue 11.8: a kernel-spliced tunnel that ends in a reset logs the bytes each way that
/// went through (before: 0 each way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_tunnel_logs_true_byte_counts() {
    let rig = Rig::start(&mode()).await;
    let upstream = Upstream::start(&rig);
    for i in 0..if torture() { 20 } else { 3 } {
        let id = format!("reset-{i}");
        let (mut c, mut u) = pair(&rig, &upstream, i, &id).await;
        let seed = 98_000 + i;
        pattern::send(&mut c, seed ^ UP, 0, 5000).await.unwrap();
        read_checked(&mut u, seed ^ UP, 0, 5000).await.unwrap();
        pattern::send(&mut u, seed ^ DOWN, 0, 100_000)
            .await
            .unwrap();
        read_checked(&mut c, seed ^ DOWN, 0, 100_000).await.unwrap();
        // One more byte up, so the test knows everything arrived before the reset.
        pattern::send(&mut c, seed ^ UP, 5000, 5001).await.unwrap();
        read_checked(&mut u, seed ^ UP, 5000, 1).await.unwrap();
        socket2::SockRef::from(&u)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(u);
        assert_eq!(read_end(&mut c).await, Err(io::ErrorKind::ConnectionReset));
        let v = closing_line(&rig, &id).await;
        assert_eq!(v["end"], "reset", "{v}");
        assert_eq!(v["client_to_upstream"], 5001, "{v}");
        assert_eq!(v["upstream_to_client"], 100_000, "{v}");
        if rig.fast_path {
            assert_eq!(v["client_to_upstream_path"], "kernel", "{v}");
            assert_eq!(v["upstream_to_client_kernel"], 100_000, "{v}");
        }
    }
}

/// Issues 10.6 and 11.8: tunnels still open when the shutdown grace ends are reset (never
/// closed as if complete) and each logs its closing line with its byte counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_end_resets_and_logs_each_tunnel() {
    let splice = mode();
    let mut rig = Rig::start_args(&["--splice", &splice, "--shutdown-grace", "1s"]).await;
    let upstream = Upstream::start(&rig);
    let mut open = Vec::new();
    for i in 0..3u64 {
        let id = format!("grace-{i}");
        let (mut c, mut u) = pair(&rig, &upstream, i, &id).await;
        let seed = 99_000 + i;
        pattern::send(&mut c, seed ^ UP, 0, 3000).await.unwrap();
        read_checked(&mut u, seed ^ UP, 0, 3000).await.unwrap();
        pattern::send(&mut u, seed ^ DOWN, 0, 7000).await.unwrap();
        read_checked(&mut c, seed ^ DOWN, 0, 7000).await.unwrap();
        open.push((id, c, u));
    }
    rig.setup.daemon.signal(libc::SIGTERM);
    let code = rig
        .setup
        .daemon
        .wait_exit(Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    for (id, mut c, mut u) in open {
        assert_eq!(
            read_end(&mut c).await,
            Err(io::ErrorKind::ConnectionReset),
            "{id} client"
        );
        assert_eq!(
            read_end(&mut u).await,
            Err(io::ErrorKind::ConnectionReset),
            "{id} upstream"
        );
        let v = closing_line(&rig, &id).await;
        assert_eq!(v["end"], "shutdown", "{v}");
        assert_eq!(v["client_to_upstream"], 3000, "{v}");
        assert_eq!(v["upstream_to_client"], 7000, "{v}");
    }
}

/// Issue 10.4's measurement: `n` tunnels whose clients never read while their upstreams
/// push as much as TCP lets them, on the fast path (default budgets) and on the
/// userspace copy relay, once every sender is blocked: the machine's `MemAvailable` drop
/// per tunnel (everything, but shared with whatever else runs on the machine), TCP socket
/// memory (`/proc/net/sockstat`, charged to sockets) and the bytes the fast path holds
/// queued in the kernel (charged to nothing). Then every client reads and checks every
/// byte. Numbers in docs/fastpath.md.
/// `cargo test --release -p tests --test fastpath -- --ignored measure_stalled --nocapture`
/// (`STALLED_RUNS=n` repeats each case).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_stalled_tunnels_memory() {
    let _heavy = MEMORY_HEAVY.lock().await;
    let runs: u32 = std::env::var("STALLED_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for n in [64u64, 256] {
        for _ in 0..runs {
            for (name, args) in [
                ("ebpf", vec!["--splice", "ebpf"]),
                ("copy", vec!["--splice", "off", "--userspace-relay", "copy"]),
            ] {
                let m = stalled_tunnels_memory(n, &args).await;
                let per = |kib: i64| kib as f64 / 1024.0 / n as f64;
                eprintln!(
                    "MEASURE stalled {n:3} tunnels {name:4}: per tunnel MemAvailable -{:.2} MiB, TCP sockets {:.2} MiB, fast-path queue {:.2} MiB (kernel peak {:.1} MiB in all)",
                    per(m.mem_available_drop_kib),
                    per(m.tcp_kib),
                    per(m.kernel_queued_kib),
                    m.kernel_peak as f64 / MIB as f64
                );
            }
        }
    }
}

/// What `n` stalled tunnels cost, in KiB over all of them.
struct StalledMemory {
    mem_available_drop_kib: i64,
    tcp_kib: i64,
    kernel_queued_kib: i64,
    kernel_peak: u64,
}

/// Machine-wide TCP socket memory in KiB (`/proc/net/sockstat`, pages).
fn tcp_mem_kib() -> i64 {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap();
    let line = s.lines().find(|l| l.starts_with("TCP:")).unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    let i = f.iter().position(|w| *w == "mem").unwrap();
    f[i + 1].parse::<i64>().unwrap() * 4
}

/// Opens `n` stalled tunnels on a fresh daemon started with `args` and measures them.
async fn stalled_tunnels_memory(n: u64, args: &[&str]) -> StalledMemory {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let rig = Rig::start_args(args).await;
    let upstream = Upstream::start(&rig);
    let fds = rig.fd_count();
    let size = 24 * MIB;
    let mut pairs = Vec::new();
    for i in 0..n {
        pairs.push(pair(&rig, &upstream, i, &format!("stalled-{i}")).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (before, tcp_before) = (mem_available_kib(), tcp_mem_kib());
    let sent = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    let mut clients = Vec::new();
    for (i, (c, mut u)) in pairs.into_iter().enumerate() {
        let sent = sent.clone();
        let seed = 100_000 + i as u64;
        writers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut at = 0;
            while at < size {
                pattern::fill(seed ^ DOWN, at, &mut buf);
                u.write_all(&buf).await.unwrap();
                at += buf.len() as u64;
                sent.fetch_add(buf.len() as u64, Relaxed);
            }
            u.shutdown().await.unwrap();
            u
        }));
        clients.push((seed, c));
    }
    // Every sender blocked: nothing moved for a second and a half.
    let mut last = 0;
    let mut still = 0;
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = sent.load(Relaxed);
        still = if now == last { still + 1 } else { 0 };
        last = now;
        if still >= 15 {
            break;
        }
    }
    assert!(still >= 15, "the senders never stopped ({last} bytes sent)");
    let mut m = StalledMemory {
        mem_available_drop_kib: 0,
        tcp_kib: tcp_mem_kib() - tcp_before,
        kernel_queued_kib: 0,
        kernel_peak: 0,
    };
    for _ in 0..5 {
        m.mem_available_drop_kib = m.mem_available_drop_kib.max(before - mem_available_kib());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if rig.fast_path {
        let (queued, peak, _) = rig.kernel_memory();
        m.kernel_queued_kib = queued / 1024;
        m.kernel_peak = peak;
    }
    let readers = clients.into_iter().map(|(seed, mut c)| async move {
        read_checked(&mut c, seed ^ DOWN, 0, size).await.unwrap();
        assert_eq!(read_end(&mut c).await, Ok(()));
        c.shutdown().await.unwrap();
        c
    });
    let done = tokio::time::timeout(
        Duration::from_secs(600),
        futures_util::future::join_all(readers),
    )
    .await
    .expect("stalled readers never finished");
    for w in writers {
        let mut u = w.await.unwrap();
        assert_eq!(read_end(&mut u).await, Ok(()));
    }
    drop(done);
    for i in 0..n {
        rig.expect(&format!("stalled-{i}"), 0, size);
    }
    wait_idle(&rig, fds).await;
    m
}
