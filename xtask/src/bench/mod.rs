//! `cargo xtask bench [--quick]`: the daemon against its peers, side by side, in one run
//! (SPEC §6). Client in its own network namespace, proxy and upstream in the machine
//! namespace, joined by veth. Every transfer is checked byte by byte; a system that
//! corrupts or drops data is marked FAILED. `--quick` is a smoke run for the test suite:
//! small sizes, and it fails if any system (other than an unbuilt fast path) moved wrong
//! bytes; it never asserts a speed.

mod procs;
mod report;
mod systems;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tests::Topology;

use procs::{run_bounded, Interactive, Proc};
use report::{Better, Column, Row, Table};
use systems::{System, UPSTREAM_PORT};

struct Params {
    quick: bool,
    small_conns: Vec<u32>,
    small_secs: u32,
    http_bytes: u64,
    tunnel_bytes: u64,
    both_bytes: u64,
    warm_bytes: u64,
    repeats: usize,
    ws_secs: f64,
    ws_many: u64,
    idle: Vec<usize>,
}

impl Params {
    fn new(quick: bool) -> Params {
        const GIB: u64 = 1 << 30;
        if quick {
            Params {
                quick,
                small_conns: vec![16],
                small_secs: 1,
                http_bytes: 64 << 20,
                tunnel_bytes: 64 << 20,
                both_bytes: 32 << 20,
                warm_bytes: 16 << 20,
                repeats: 1,
                ws_secs: 0.5,
                ws_many: 8,
                idle: vec![100],
            }
        } else {
            Params {
                quick,
                small_conns: vec![1, 16, 128],
                small_secs: 5,
                http_bytes: GIB,
                tunnel_bytes: 2 * GIB,
                both_bytes: GIB,
                warm_bytes: 256 << 20,
                repeats: 3,
                ws_secs: 2.0,
                ws_many: 64,
                idle: vec![1000, 7500],
            }
        }
    }

    fn describe(&self) -> String {
        format!(
            "small HTTP: wrk, {}s per concurrency {:?}, threads = min(2, c); HTTP download/upload: {} MiB each; \
             tunnel one way: {} MiB upstream→client; both ways: {} MiB each direction at once; \
             {} repeat(s) of echo and tunnel runs, median reported; WebSocket echo: 64 B messages, {}s per run, 1 and {} sockets; \
             idle upgraded connections: {:?} (the 20k fd limit per process caps one proxy at ~9k tunnels, \
             and HAProxy's fd accounting, 2 × maxconn + ~4k, at 7,900); \
             untimed warm-up of {} MiB download + tunnel per system before the timed bulk runs",
            self.small_secs,
            self.small_conns,
            self.http_bytes >> 20,
            self.tunnel_bytes >> 20,
            self.both_bytes >> 20,
            self.repeats,
            self.ws_secs,
            self.ws_many,
            self.idle,
            self.warm_bytes >> 20,
        )
    }
}

fn root() -> PathBuf {
    if let Some(dir) = std::env::var_os("XTASK_BENCH_ROOT") {
        return dir.into();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn run(quick: bool) -> Result<()> {
    let started = Instant::now();
    let p = Params::new(quick);
    let root = root();
    build(&root)?;
    procs::install_cleanup();
    let paths = systems::Paths {
        root: root.clone(),
        daemon: root.join("target/release/project-ingress-proxy"),
    };
    let tool = root.join("target/release/bench_tool");
    let tmp = tests::daemon::TempDir::new()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let topo = Topology::new()?;
    procs::register_cleanup(&[&topo.client.name, &topo.machine.name], &[&tmp.0]);
    let target = format!("localhost:{UPSTREAM_PORT}");
    let mut bench = Bench {
        p: &p,
        topo: &topo,
        tool: &tool,
        target: &target,
        dir: &tmp.0,
        rt: &rt,
        tables: Tables::new(&p),
        strikes: std::cell::Cell::new(0),
    };
    for sys in systems::ALL {
        eprintln!(
            "[bench] {} ({:.0}s elapsed)",
            sys.name(),
            started.elapsed().as_secs_f64()
        );
        bench.system(sys, &paths)?;
    }
    let tables = bench.tables.all();
    drop(topo);
    let load = format!(
        "{} at start, {} at the end",
        load_start
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = write_results(&root, &p, &tables, started.elapsed(), &load)?;
    eprintln!("[bench] results in {}", out.display());
    if quick {
        let failed: Vec<String> = tables
            .iter()
            .flat_map(|t| {
                t.rows.iter().filter_map(move |(s, r)| match r {
                    Row::Failed(why) => Some(format!("{} / {s}: {why}", t.title)),
                    _ => None,
                })
            })
            .collect();
        let missing: Vec<String> = tables
            .iter()
            .flat_map(|t| {
                t.rows.iter().filter_map(move |(s, r)| match r {
                    Row::Na(why) => Some(format!("{} / {s}: {why}", t.title)),
                    _ => None,
                })
            })
            .collect();
        if !failed.is_empty() || !missing.is_empty() {
            bail!(
                "bench --quick: systems that did not move correct bytes:\n{}",
                [failed, missing].concat().join("\n")
            );
        }
    }
    Ok(())
}

fn build(root: &Path) -> Result<()> {
    for args in [
        &["build", "--release", "-p", "proxy-daemon"][..],
        &["build", "--release", "-p", "tests", "--bin", "bench_tool"][..],
    ] {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(args)
            .current_dir(root)
            .status()
            .context("running cargo")?;
        if !status.success() {
            bail!("cargo {} failed", args.join(" "));
        }
    }
    for tool in ["wrk", "nginx", "haproxy", "node"] {
        if which(tool).is_none() {
            eprintln!("[bench] installing {tool}");
            let pkg = if tool == "node" { "nodejs" } else { tool };
            let _ = Command::new("apt-get")
                .args(["install", "-y", "-q", pkg])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
        }
    }
    if !root.join("bench/node/node_modules/http-proxy").exists() {
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent"])
            .current_dir(root.join("bench/node"))
            .status()
            .context("running npm")?;
        if !status.success() {
            bail!("npm install in bench/node failed");
        }
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
}

struct Tables {
    small: Vec<Table>,
    download: Table,
    upload: Table,
    ws1: Table,
    ws_many: Table,
    one_way: Table,
    both: Table,
    idle: Vec<Table>,
}

fn col(name: &'static str, better: Better) -> Column {
    Column { name, better }
}

impl Tables {
    fn new(p: &Params) -> Tables {
        use Better::*;
        let bulk = || {
            vec![
                col("Gbit/s", Higher),
                col("machine CPU s/GB", Lower),
                col("proxy process CPU s/GB", Lower),
            ]
        };
        let ws = || {
            vec![
                col("RTT p50 µs", Lower),
                col("RTT p99 µs", Lower),
                col("msgs/s", Higher),
            ]
        };
        Tables {
            small: p
                .small_conns
                .iter()
                .map(|c| {
                    Table::new(
                        format!("Small HTTP GETs over keep-alive, {c} connection(s)"),
                        "wrk, `GET /small` (13-byte body); latency percentiles from wrk's histogram. \
                         Node closes every connection (platform config), so wrk reconnects per request."
                            .into(),
                        vec![
                            col("req/s", Higher),
                            col("p50 ms", Lower),
                            col("p99 ms", Lower),
                            col("p99.9 ms", Lower),
                        ],
                        Some(0),
                    )
                })
                .collect(),
            download: Table::new(
                format!("HTTP download, {} MiB", p.http_bytes >> 20),
                "One GET, body checked byte by byte. Machine CPU = all cores from /proc/stat \
                 (user+nice+system+irq+softirq) over the transfer, client and upstream included."
                    .into(),
                bulk(),
                Some(0),
            ),
            upload: Table::new(
                format!("HTTP upload, {} MiB", p.http_bytes >> 20),
                "One POST with Content-Length; the upstream checks every byte.".into(),
                bulk(),
                Some(0),
            ),
            ws1: Table::new(
                "WebSocket echo, 64 B messages, 1 socket".into(),
                "One message in flight per socket; every echo compared. Median of the repeats.".into(),
                ws(),
                Some(0),
            ),
            ws_many: Table::new(
                format!("WebSocket echo, 64 B messages, {} sockets", p.ws_many),
                "One message in flight per socket; every echo compared. Median of the repeats.".into(),
                ws(),
                Some(2),
            ),
            one_way: Table::new(
                format!("Tunnel throughput one way, {} MiB upstream → client", p.tunnel_bytes >> 20),
                "Raw bytes after a WebSocket 101 (no framing), checked on receipt; the upstream's \
                 verdict closes the run. Median of the repeats. Whole-machine CPU counts the \
                 kernel work a fast path moves out of the proxy process."
                    .into(),
                bulk(),
                Some(0),
            ),
            both: Table::new(
                format!("Tunnel throughput both ways at once, {} MiB each way", p.both_bytes >> 20),
                "Gbit/s counts both directions. Median of the repeats.".into(),
                bulk(),
                Some(0),
            ),
            idle: p
                .idle
                .iter()
                .map(|n| {
                    Table::new(
                        format!("{n} idle upgraded connections (WebSocket handshake, then idle)"),
                        "Measured on a freshly started proxy. RSS = VmRSS of the proxy's process tree. \
                         Kernel = whole-machine `Slab` from /proc/meminfo (includes the client's and \
                         the upstream's sockets, so `direct` is the no-proxy baseline) and TCP `mem` \
                         pages from /proc/net/sockstat. Per connection."
                            .into(),
                        vec![
                            col("proxy RSS KiB/conn", Lower),
                            col("kernel slab KiB/conn", Lower),
                            col("TCP mem KiB/conn", Lower),
                        ],
                        Some(0),
                    )
                })
                .collect(),
        }
    }

    fn all(self) -> Vec<Table> {
        let mut v = self.small;
        v.extend([
            self.download,
            self.upload,
            self.ws1,
            self.ws_many,
            self.one_way,
            self.both,
        ]);
        v.extend(self.idle);
        v
    }

    fn mark_all(&mut self, sys: System, row: Row) {
        let name = sys.name();
        for t in self.small.iter_mut() {
            t.set(name, row.clone());
        }
        if sys == System::NginxPooled {
            return;
        }
        for t in [
            &mut self.download,
            &mut self.upload,
            &mut self.ws1,
            &mut self.ws_many,
            &mut self.one_way,
            &mut self.both,
        ] {
            t.set(name, row.clone());
        }
        for t in self.idle.iter_mut() {
            t.set(name, row.clone());
        }
    }
}

struct Bench<'a> {
    p: &'a Params,
    topo: &'a Topology,
    tool: &'a Path,
    target: &'a str,
    dir: &'a Path,
    rt: &'a tokio::runtime::Runtime,
    tables: Tables,
    /// Timed-out transfers of the current system; after three, its remaining transfers
    /// are marked failed without running (keeps a wedged system from eating the run).
    strikes: std::cell::Cell<u32>,
}

fn machine_busy_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    [0, 1, 2, 5, 6].iter().filter_map(|i| f.get(*i)).sum()
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

fn slab_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("Slab:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn medians(runs: &[Vec<f64>]) -> Vec<f64> {
    (0..runs.first().map_or(0, |r| r.len()))
        .map(|i| median(runs.iter().map(|r| r[i]).collect()))
        .collect()
}

impl Bench<'_> {
    fn system(&mut self, sys: System, paths: &systems::Paths) -> Result<()> {
        self.strikes.set(0);
        // A fresh upstream per system.
        let up_log = self.dir.join("upstream.log");
        let mut cmd = self.topo.machine.command(self.tool.to_str().unwrap());
        cmd.args(["upstream", &UPSTREAM_PORT.to_string()]);
        let _upstream = Proc::spawn("upstream", cmd, &up_log)?;
        let up_addr = std::net::SocketAddr::new(self.topo.machine_ip, UPSTREAM_PORT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.rt.block_on(self.topo.client.connect(up_addr)).is_err() {
            if Instant::now() > deadline {
                bail!("the upstream app did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }

        let start = |b: &Bench| systems::start(b.rt, b.topo, sys, paths, b.dir);
        // Idle connections first, each count on a freshly started process.
        if sys != System::NginxPooled {
            for i in 0..self.p.idle.len() {
                let row = match start(self) {
                    Ok(proc) => self.idle(proc.as_ref(), self.p.idle[i]),
                    Err(e) => return self.unavailable(sys, e),
                };
                self.tables.idle[i].set(sys.name(), row);
            }
        }
        let mut proc = match start(self) {
            Ok(proc) => proc,
            Err(e) => return self.unavailable(sys, e),
        };
        for i in 0..self.p.small_conns.len() {
            let row = self.small(sys, self.p.small_conns[i]);
            self.tables.small[i].set(sys.name(), row);
        }
        if sys == System::NginxPooled {
            return Ok(());
        }
        // A transfer that timed out may have wedged the proxy: later scenarios get a
        // freshly started one.
        let restart = |b: &Bench, proc: &mut Option<Proc>, seen: u32| {
            if b.strikes.get() > seen {
                eprintln!(
                    "[bench] {}: restarting after a timed-out transfer",
                    sys.name()
                );
                drop(proc.take());
                *proc = start(b).unwrap_or(None);
            }
        };
        // Untimed warm-up (its time-outs do not count against the system).
        let seen = self.strikes.get();
        let n = self.p.warm_bytes.to_string();
        let _ = self.client(sys, &["download", &n]);
        let _ = self.client(sys, &["tunnel", &n, &n]);
        restart(self, &mut proc, seen);
        self.strikes.set(seen);

        let http = self.p.http_bytes.to_string();
        let (secs, many) = (self.p.ws_secs.to_string(), self.p.ws_many.to_string());
        let (one, both) = (
            self.p.tunnel_bytes.to_string(),
            self.p.both_bytes.to_string(),
        );
        for step in 0..6 {
            let seen = self.strikes.get();
            let p = proc.as_ref();
            let reps = self.p.repeats;
            let row = match step {
                0 => self.bulk(sys, p, 1, &["download", &http]),
                1 => self.bulk(sys, p, 1, &["upload", &http]),
                2 => self.ws(sys, &["wsecho", "1", &secs, "10000000"]),
                3 => self.ws(sys, &["wsecho", &many, &secs, "10000000"]),
                4 => self.bulk(sys, p, reps, &["tunnel", &one, "0"]),
                _ => self.bulk(sys, p, reps, &["tunnel", &both, &both]),
            };
            let table = match step {
                0 => &mut self.tables.download,
                1 => &mut self.tables.upload,
                2 => &mut self.tables.ws1,
                3 => &mut self.tables.ws_many,
                4 => &mut self.tables.one_way,
                _ => &mut self.tables.both,
            };
            table.set(sys.name(), row);
            restart(self, &mut proc, seen);
        }
        Ok(())
    }

    fn unavailable(&mut self, sys: System, e: anyhow::Error) -> Result<()> {
        let why = format!("{e:#}");
        let why: String = why.chars().take(160).collect();
        eprintln!("[bench] {} unavailable: {why}", sys.name());
        let row = if sys == System::DaemonEbpf {
            Row::Na(format!("did not start: {why}"))
        } else {
            Row::Failed(format!("did not start: {why}"))
        };
        self.tables.mark_all(sys, row);
        Ok(())
    }

    fn addr(&self, sys: System) -> String {
        systems::address(self.topo, sys).to_string()
    }

    /// Runs one bench_tool client in the client namespace; its JSON line.
    fn client(&self, sys: System, args: &[&str]) -> Result<Value> {
        if self.strikes.get() >= 3 {
            bail!("not run: three earlier transfers of this system timed out");
        }
        // Generous for the slowest peer (≥ 100 MB/s), but bounded.
        let bytes: u64 = args[1..]
            .iter()
            .filter_map(|a| a.parse::<u64>().ok())
            .filter(|n| *n >= 1 << 20)
            .sum();
        let base = if self.p.quick { 8 } else { 15 };
        let limit = Duration::from_secs(base + bytes / 100_000_000);
        let mut cmd = self.topo.client.command(self.tool.to_str().unwrap());
        cmd.args(["client", args[0], &self.addr(sys), self.target])
            .args(&args[1..]);
        let out = run_bounded(cmd, limit).inspect_err(|_| {
            self.strikes.set(self.strikes.get() + 1);
        })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or("");
        let v: Value = serde_json::from_str(line).map_err(|_| {
            anyhow!(
                "client printed no result: {} {}",
                line,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        if v["ok"] != Value::Bool(true) {
            bail!("{}", v["error"].as_str().unwrap_or("failed"));
        }
        Ok(v)
    }

    fn bulk(&self, sys: System, proc: Option<&Proc>, repeats: usize, args: &[&str]) -> Row {
        let hz = ticks_per_sec();
        let mut runs = Vec::new();
        for _ in 0..repeats {
            let (m0, p0) = (machine_busy_ticks(), proc.map_or(0, |p| p.cpu_ticks()));
            let v = match self.client(sys, args) {
                Ok(v) => v,
                Err(e) => return Row::Failed(format!("{e:#}")),
            };
            let (m1, p1) = (machine_busy_ticks(), proc.map_or(0, |p| p.cpu_ticks()));
            let gb = v["bytes"].as_f64().unwrap_or(0.0) / 1e9;
            let proxy_cpu = if proc.is_some() {
                p1.saturating_sub(p0) as f64 / hz / gb
            } else {
                f64::NAN
            };
            runs.push(vec![
                v["gbit_s"].as_f64().unwrap_or(f64::NAN),
                m1.saturating_sub(m0) as f64 / hz / gb,
                proxy_cpu,
            ]);
        }
        Row::Values(medians(&runs))
    }

    fn ws(&self, sys: System, args: &[&str]) -> Row {
        let mut runs = Vec::new();
        for _ in 0..self.p.repeats {
            match self.client(sys, args) {
                Ok(v) => runs.push(vec![
                    v["p50_us"].as_f64().unwrap_or(f64::NAN),
                    v["p99_us"].as_f64().unwrap_or(f64::NAN),
                    v["msgs_per_s"].as_f64().unwrap_or(f64::NAN),
                ]),
                Err(e) => return Row::Failed(format!("{e:#}")),
            }
        }
        Row::Values(medians(&runs))
    }

    fn small(&self, sys: System, conns: u32) -> Row {
        match self.wrk(sys, conns) {
            Ok(r) => r,
            Err(e) => Row::Failed(format!("{e:#}")),
        }
    }

    fn wrk(&self, sys: System, conns: u32) -> Result<Row> {
        let script = self.dir.join("report.lua");
        std::fs::write(
            &script,
            r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50":%d,"p99":%d,"p999":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#,
        )?;
        let mut cmd = self.topo.client.command("wrk");
        cmd.args([
            "-t",
            &conns.min(2).to_string(),
            "-c",
            &conns.to_string(),
            "-d",
            &format!("{}s", self.p.small_secs),
            "--timeout",
            "5s",
            "-s",
            script.to_str().unwrap(),
            "-H",
            &format!("X-Iterate-Proxy-Target-Host: {}", self.target),
            &format!("http://{}/small", self.addr(sys)),
        ]);
        let out = run_bounded(cmd, Duration::from_secs(self.p.small_secs as u64 + 30))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("WRKJSON "))
            .ok_or_else(|| {
                anyhow!(
                    "wrk printed no summary: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        let v: Value = serde_json::from_str(line)?;
        let g = |k: &str| v[k].as_f64().unwrap_or(0.0);
        if g("requests") < 1.0 {
            bail!("no request completed");
        }
        if g("status") > 0.0 {
            bail!("{} responses were not 2xx/3xx", g("status"));
        }
        let errors = g("connect") + g("write") + g("timeout");
        if errors > g("requests") * 0.001 {
            bail!(
                "socket errors: connect {} read {} write {} timeout {}",
                g("connect"),
                g("read"),
                g("write"),
                g("timeout")
            );
        }
        Ok(Row::Values(vec![
            g("requests") / (g("duration_us") / 1e6),
            g("p50") / 1000.0,
            g("p99") / 1000.0,
            g("p999") / 1000.0,
        ]))
    }

    fn idle(&self, proc: Option<&Proc>, count: usize) -> Row {
        match self.idle_inner(proc, count) {
            Ok(r) => r,
            Err(e) => Row::Failed(format!("{e:#}")),
        }
    }

    fn sockstat_mem_bytes(&self) -> u64 {
        let out = self
            .topo
            .machine
            .command("cat")
            .arg("/proc/net/sockstat")
            .output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with("TCP:"))
            .and_then(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let i = f.iter().position(|x| *x == "mem")?;
                f.get(i + 1)?.parse::<u64>().ok()
            })
            .unwrap_or(0)
            * 4096
    }

    fn idle_inner(&self, proc: Option<&Proc>, count: usize) -> Result<Row> {
        std::thread::sleep(Duration::from_millis(500));
        let rss0 = proc.map_or(0, |p| p.rss());
        let (slab0, mem0) = (slab_bytes(), self.sockstat_mem_bytes());
        let sys_addr = self.addr_of_proc(proc);
        let mut cmd = self.topo.client.command(self.tool.to_str().unwrap());
        cmd.args(["client", "idle", &sys_addr, self.target, &count.to_string()]);
        let mut client = Interactive::spawn(cmd)?;
        let line = client.next_line(Duration::from_secs(20 + count as u64 / 50))?;
        if !line.starts_with("READY") {
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            bail!("{}", v["error"].as_str().unwrap_or(&line));
        }
        std::thread::sleep(Duration::from_secs(1));
        let rss1 = proc.map_or(0, |p| p.rss());
        let fds: usize = proc.map_or(0, |p| {
            p.tree()
                .iter()
                .filter_map(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok())
                .map(|d| d.count())
                .sum()
        });
        let (slab1, mem1) = (slab_bytes(), self.sockstat_mem_bytes());
        client.poke()?;
        let line = client.next_line(Duration::from_secs(20 + count as u64 / 100))?;
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v["ok"] != Value::Bool(true) {
            let why = v["error"].as_str().unwrap_or(&line);
            if proc.is_some() {
                bail!("{why} (the proxy held {fds} fds when all {count} were open; 2 per tunnel expected)");
            }
            bail!("{why}");
        }
        let per = |a: u64, b: u64| (b as f64 - a as f64) / count as f64 / 1024.0;
        let rss = if proc.is_some() {
            per(rss0, rss1)
        } else {
            f64::NAN
        };
        Ok(Row::Values(vec![rss, per(slab0, slab1), per(mem0, mem1)]))
    }

    fn addr_of_proc(&self, proc: Option<&Proc>) -> String {
        if proc.is_some() {
            std::net::SocketAddr::new(self.topo.machine_ip, systems::PROXY_PORT).to_string()
        } else {
            self.addr(System::Direct)
        }
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn write_results(
    root: &Path,
    p: &Params,
    tables: &[Table],
    took: Duration,
    load: &str,
) -> Result<PathBuf> {
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let ncpu = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = sh("date", &["-u", "+%Y-%m-%d"]);
    let kind = if p.quick { "quick" } else { "full" };
    let mut md = String::new();
    md.push_str(&format!(
        "# project-ingress-proxy benchmark ({kind}), {}\n\n",
        sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    ));
    md.push_str(&format!(
        "- Kernel: {} · CPUs: {ncpu} × {cpu}\n- Versions: {} · {} · {} · node {} · {}\n\
         - Topology: client netns ⟷ veth ⟷ machine netns (proxy on :{}, upstream app on 127.0.0.1:{UPSTREAM_PORT}; \
         `direct` reaches the upstream across the veth). Client, proxy and upstream share the same {ncpu} CPUs.\n\
         - Parameters: {}\n- Run took {:.0} s; load average {load} (other work on the machine \
         during the run shifts absolute figures between runs; ratios within one run are the point).\n\n",
        sh("uname", &["-r"]),
        sh("haproxy", &["-v"]).lines().next().unwrap_or(""),
        String::from_utf8_lossy(&Command::new("nginx").arg("-v").output().map(|o| o.stderr).unwrap_or_default()).trim(),
        String::from_utf8_lossy(&Command::new("wrk").arg("-v").output().map(|o| o.stdout).unwrap_or_default()).lines().next().unwrap_or("").trim(),
        sh("node", &["--version"]),
        "bench_tool (Rust, hdrhistogram) clients",
        systems::PROXY_PORT,
        p.describe(),
        took.as_secs_f64(),
    ));
    md.push_str("Each figure is followed by its ratio to `direct` (no proxy) and to `daemon userspace` \
                 (`--splice off`). ↑ higher is better, ↓ lower is better. A system that moved wrong or \
                 missing bytes is **FAILED**, never fast.\n\n## Systems\n\n");
    for s in systems::ALL {
        md.push_str(&format!("- **{}**: {}\n", s.name(), s.describe()));
    }
    md.push_str("\nConfigs as run: `bench/results/configs/`.\n\n## Results\n\n");
    for t in tables {
        md.push_str(&t.markdown());
    }
    print!("{md}");
    let names: Vec<&str> = systems::ALL.iter().map(|s| s.name()).collect();
    let svg = report::svg(tables, &names);
    let dated = dir.join(format!("{date}-{kind}.md"));
    std::fs::write(&dated, &md)?;
    std::fs::write(dir.join(format!("{date}-{kind}.svg")), &svg)?;
    // A smoke run (the test suite's) must not replace the committed full results.
    let latest = if p.quick { "latest-quick" } else { "latest" };
    std::fs::write(dir.join(format!("{latest}.md")), &md)?;
    std::fs::write(dir.join(format!("{latest}.svg")), &svg)?;
    systems::write_configs(&dir.join("configs"), Path::new("/tmp/ipx-bench"))?;
    Ok(dated)
}
