//! Once a second, on its own thread: the daemon's RSS, fds, threads and CPU (/proc), the
//! entries of its eBPF maps (`bpftool map dump` of the maps its fds hold), kernel memory
//! (`Slab`, `SUnreclaim`; TCP sockets and memory from the machine namespace's
//! sockstat; its sockets' memory from `ss -tm`), its `/metrics`, the upstream app's live connections and sessions, and the
//! traffic counts so far. Each sample is a column→value map (missing values stay empty).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::daemon::{self, Daemon};
use super::record::Kind;
use super::wire;
use super::Env;

/// The parts of a run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Phase {
    /// Idle, before any traffic.
    Baseline,
    /// Traffic, not judged (caches, pools and allocator arenas fill).
    WarmUp,
    /// Idle after the warm-up: the reference the end is compared with.
    Settle,
    /// The judged traffic.
    Load,
    /// Idle after the load, until idle connections have expired: the end state.
    CoolDown,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Baseline,
        Phase::WarmUp,
        Phase::Settle,
        Phase::Load,
        Phase::CoolDown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Baseline => "baseline",
            Phase::WarmUp => "warm-up",
            Phase::Settle => "settle",
            Phase::Load => "load",
            Phase::CoolDown => "cool-down",
        }
    }
}

pub struct Sample {
    /// Seconds since the start of the run.
    pub t: f64,
    pub phase: Phase,
    pub values: BTreeMap<String, f64>,
}

/// The phase the run is in, shared with the sampler.
#[derive(Default)]
pub struct PhaseCell(AtomicU8);

impl PhaseCell {
    pub fn set(&self, p: Phase) {
        self.0.store(p as u8, Ordering::Relaxed);
    }
    pub fn get(&self) -> Phase {
        Phase::ALL[self.0.load(Ordering::Relaxed) as usize]
    }
}

pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Sample>>,
}

impl Sampler {
    pub fn start(env: Arc<Env>, daemon: Arc<Daemon>, phase: Arc<PhaseCell>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("sampler runtime");
            rt.block_on(run(env, daemon, phase, stop2))
        });
        Sampler { stop, thread }
    }

    pub fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

async fn run(
    env: Arc<Env>,
    daemon: Arc<Daemon>,
    phase: Arc<PhaseCell>,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut maps = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let pid = daemon.pid;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        if let Some(status) = daemon.exited() {
            env.record
                .fail(Kind::Monitor, format!("the daemon exited: {status}"));
            env.abort.cancel();
            break;
        }
        let mut v = BTreeMap::new();
        let t = env.record.start.elapsed().as_secs_f64();
        process(pid, &mut v);
        kernel(pid, &mut v);
        let machine = socket_memory(&env.topo.machine.name);
        let client = socket_memory(&env.topo.client.name);
        if let (Some((_, machine_kib)), Some((client_socks, client_kib))) = (machine, client) {
            v.insert("socket_mem_kib".into(), machine_kib);
            v.insert("client_socket_mem_kib".into(), client_kib);
            // sockstat's `alloc` counts every TCP socket of the machine: what is not
            // the soak's tells how busy the rest of the machine was.
            if let (Some(all), Some(ours)) = (v.get("tcp_alloc"), v.get("tcp_inuse")) {
                let others = all - ours - client_socks as f64;
                v.insert("other_tcp_sockets".into(), others.max(0.0));
            }
        }
        if maps.is_empty() {
            maps = bpf_maps(pid);
        }
        for (id, name) in &maps {
            if let Some(n) = map_entries(*id) {
                v.insert(format!("map_{name}_entries"), n as f64);
            }
        }
        let admin = std::net::SocketAddr::from(wire::ADMIN_ADDR);
        match daemon::get(env.topo.machine.connect(admin), "/metrics").await {
            Ok((200, text)) => metrics(&text, &mut v),
            Ok((status, _)) => env
                .record
                .fail(Kind::Monitor, format!("GET /metrics answered {status}")),
            Err(e) => env.record.fail(Kind::Monitor, format!("{e:#}")),
        }
        v.insert(
            "upstream_connections".into(),
            env.upstream.connections.load(Ordering::Relaxed) as f64,
        );
        v.insert(
            "upstream_sessions".into(),
            env.upstream.sessions.load(Ordering::Relaxed) as f64,
        );
        for kind in Kind::ALL {
            let c = env.record.counts(kind);
            v.insert(
                format!("ops_{}", kind.key()),
                c.ops.load(Ordering::Relaxed) as f64,
            );
        }
        v.insert("failures".into(), env.record.total_failures() as f64);
        // The clients and the upstream app run on the main thread; this one only samples.
        v.insert(
            "generator_cpu_s".into(),
            (cpu_seconds(libc::RUSAGE_SELF) - cpu_seconds(libc::RUSAGE_THREAD)).max(0.0),
        );
        samples.push(Sample {
            t,
            phase: phase.get(),
            values: v,
        });
        env.record.ok(Kind::Monitor, 0, 0);
    }
    samples
}

/// RSS, fds, threads and CPU of the daemon.
fn process(pid: i32, v: &mut BTreeMap<String, f64>) {
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
        for line in status.lines() {
            let mut f = line.split_whitespace();
            match (f.next(), f.next().and_then(|n| n.parse::<f64>().ok())) {
                (Some("VmRSS:"), Some(kib)) => v.insert("daemon_rss_kib".into(), kib),
                (Some("Threads:"), Some(n)) => v.insert("daemon_threads".into(), n),
                _ => None,
            };
        }
    }
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        v.insert("daemon_fds".into(), dir.count() as f64);
    }
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // After "pid (comm) ": utime and stime are fields 11 and 12.
        if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: f64 = [11, 12]
                .iter()
                .filter_map(|i| f.get(*i)?.parse::<f64>().ok())
                .sum();
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            v.insert("daemon_cpu_s".into(), ticks / hz);
        }
    }
}

/// Machine-wide slab memory, and TCP in the daemon's namespace.
fn kernel(pid: i32, v: &mut BTreeMap<String, f64>) {
    if let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") {
        for line in meminfo.lines() {
            let mut f = line.split_whitespace();
            match (f.next(), f.next().and_then(|n| n.parse::<f64>().ok())) {
                (Some("Slab:"), Some(kib)) => v.insert("slab_kib".into(), kib),
                (Some("SUnreclaim:"), Some(kib)) => v.insert("sunreclaim_kib".into(), kib),
                _ => None,
            };
        }
    }
    // `TCP: inuse N orphan N tw N alloc N mem N`: counts for this namespace, `mem`
    // (pages) for the whole machine.
    if let Ok(sockstat) = std::fs::read_to_string(format!("/proc/{pid}/net/sockstat")) {
        if let Some(line) = sockstat.lines().find(|l| l.starts_with("TCP:")) {
            let f: Vec<&str> = line.split_whitespace().collect();
            for pair in f[1..].chunks(2) {
                if let [key, value] = pair {
                    if let Ok(n) = value.parse::<f64>() {
                        v.insert(format!("tcp_{key}"), n);
                    }
                }
            }
        }
    }
}

/// The TCP sockets of a namespace (not listening ones) and the memory they hold, KiB:
/// Σ rmem_alloc + wmem_queued + forward_alloc as `ss -tm` reports them. Unlike the
/// machine-wide `tcp_mem`, nothing else on the machine moves it.
fn socket_memory(netns: &str) -> Option<(usize, f64)> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-tmnH"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut sockets, mut bytes) = (0usize, 0u64);
    // `skmem:(r0,rb131072,t0,tb87040,f0,w0,o0,bl0,d0)` per socket.
    for part in text.split("skmem:(").skip(1) {
        sockets += 1;
        let fields = part.split(')').next().unwrap_or("");
        for field in fields.split(',') {
            let Some(at) = field.find(|c: char| c.is_ascii_digit()) else {
                continue;
            };
            let (name, value) = field.split_at(at);
            if matches!(name, "r" | "w" | "f") {
                bytes += value.parse::<u64>().unwrap_or(0);
            }
        }
    }
    Some((sockets, bytes as f64 / 1024.0))
}

/// The eBPF maps the daemon holds: (id, name), from its fds' fdinfo and `bpftool`.
fn bpf_maps(pid: i32) -> Vec<(u32, String)> {
    let mut ids = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for fd in fds.flatten() {
        let Ok(info) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|id| id.trim().parse::<u32>().ok())
        {
            if !ids.iter().any(|(i, _)| *i == id) {
                ids.push((id, String::new()));
            }
        }
    }
    for (id, name) in &mut ids {
        let out = Command::new("bpftool")
            .args(["-j", "map", "show", "id", &id.to_string()])
            .output();
        let info: serde_json::Value = out
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default();
        let kind = info["type"].as_str().unwrap_or("");
        *name = info["name"].as_str().unwrap_or("unknown").to_lowercase();
        // Ring buffers and arrays have no entries that come and go.
        if kind == "ringbuf" || kind.ends_with("array") {
            name.clear();
        }
    }
    ids.retain(|(_, name)| !name.is_empty());
    ids.sort();
    ids
}

/// Live entries of a hash or sockhash map.
fn map_entries(id: u32) -> Option<usize> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "id", &id.to_string()])
        .output()
        .ok()?;
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(dump.as_array()?.len())
}

/// The daemon's metrics: each counter and gauge summed over its labels (histograms and
/// info lines left out), plus requests answered with a status outside 1xx/2xx.
fn metrics(text: &str, v: &mut BTreeMap<String, f64>) {
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let name = name.trim_start_matches("project_ingress_proxy_");
        if name.ends_with("_bucket")
            || name.ends_with("_info")
            || name.starts_with("request_duration")
        {
            continue;
        }
        *v.entry(format!("m_{name}")).or_default() += value;
        if name == "requests_total"
            && !(labels.contains("class=\"1xx\"") || labels.contains("class=\"2xx\""))
        {
            *v.entry("m_requests_not_1xx_2xx".into()).or_default() += value;
        }
    }
    if v.contains_key("m_requests_total") {
        v.entry("m_requests_not_1xx_2xx".into()).or_insert(0.0);
    }
}

fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage writes the struct it is given.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut r) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(r.ru_utime) + t(r.ru_stime)
}
