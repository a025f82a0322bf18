//! `cargo xtask http-cost`: what one small HTTP request costs each proxy, measured the
//! way issue 8 states its targets. Everything on the loopback of one private network
//! namespace: `wrk -t2 -c64` `GET /` of a 3-byte body from an upstream nginx (1 worker),
//! each proxy routing by `X-Iterate-Proxy-Target-Host` (target header removed,
//! `X-Iterate-Proxy-Via` added where the proxy supports it). Runs of a few seconds,
//! interleaved round-robin over several rounds; medians of req/s, proxy CPU µs per request
//! (utime+stime of the proxy's processes / requests) and c=1 p50/p99 latency (a separate
//! `wrk -t1 -c1` run). The upstream answers 421 unless the request arrives with
//! `Host: localhost:<port>` and without the target header, so every proxy does the same
//! rewrite work and a wrong one fails instead of looking fast.

mod configs;
mod table;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tests::netns::Netns;

use crate::bench::measure::proxy_cpu_secs;
use crate::bench::procs::{self, Proc};
use crate::bench::results;
use crate::bench::wrk;

/// What to measure and how long; `cargo xtask http-cost --help` documents each field.
pub struct Options {
    pub quick: bool,
    pub rounds: usize,
    pub secs: u32,
    pub latency_secs: u32,
    /// The daemon binary (default: the release build of this workspace).
    pub daemon: Option<PathBuf>,
    /// Extra arguments for every daemon system.
    pub daemon_args: Vec<String>,
    /// A second daemon binary measured in the same run (default logging), to compare builds.
    pub baseline_daemon: Option<PathBuf>,
    /// Where the Markdown goes (default: bench/results/http-cost.md, or
    /// target/bench-quick/http-cost.md with `quick`).
    pub out: Option<PathBuf>,
}

const UPSTREAM_PORT: u16 = 9000;
const TARGET: &str = "localhost:9000";
/// The ratio column's reference.
const NGINX: &str = "nginx 1.22, 2 workers, pooled upstream, access log off";

enum Kind {
    NoProxy,
    Daemon {
        binary: PathBuf,
        /// RUST_LOG for the daemon; None = its default (info, one JSON line per request).
        rust_log: Option<&'static str>,
    },
    Nginx,
    Haproxy,
}

struct System {
    label: String,
    port: u16,
    kind: Kind,
}

/// The measurements of one system in one round.
#[derive(Default, Clone)]
struct Round {
    req_per_s: f64,
    cpu_us_per_req: f64,
    log_bytes_per_req: f64,
    c1_p50_us: f64,
    c1_p99_us: f64,
}

pub fn run(opts: Options) -> Result<()> {
    let started = Instant::now();
    let root = crate::workspace_root();
    let daemon = match &opts.daemon {
        Some(path) => path.clone(),
        None => crate::build_daemon()?,
    };
    super::install_tools(&["wrk", "nginx", "haproxy"]);
    procs::install_cleanup();
    let systems = systems(&opts, &daemon);
    let tmp = tests::daemon::TempDir::new()?;
    let ns = Netns::create(format!("ipxt{}xhc", std::process::id()))?;
    procs::register_cleanup(&[&ns.name], &[&tmp.0]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let load_start = results::loadavg();

    let dir = tmp.0.as_path();
    let upstream_conf = dir.join("upstream-nginx.conf");
    std::fs::write(&upstream_conf, configs::upstream_nginx(dir))?;
    let upstream = start(
        &ns,
        &rt,
        "upstream nginx",
        UPSTREAM_PORT,
        nginx_cmd(&ns, dir, &upstream_conf),
        dir,
    )?;
    let mut running: Vec<Option<Proc>> = Vec::new();
    for sys in &systems {
        let proc = match &sys.kind {
            Kind::NoProxy => None,
            kind => Some(start(
                &ns,
                &rt,
                &sys.label,
                sys.port,
                command(&ns, kind, sys.port, dir, &opts)?,
                dir,
            )?),
        };
        running.push(proc);
    }

    let script = wrk::write_script(dir, &[])?;
    let load = |sys: &System, threads: u32, conns: u32, secs: u32| {
        let headers = match sys.kind {
            // Without a proxy, wrk sends what a proxy would forward.
            Kind::NoProxy => vec![format!("Host: {TARGET}")],
            _ => vec![format!("X-Iterate-Proxy-Target-Host: {TARGET}")],
        };
        let url = format!("http://127.0.0.1:{}/", sys.port);
        wrk::run(
            ns.command("wrk"),
            threads,
            conns,
            secs,
            &script,
            &headers,
            &url,
        )
    };
    // Untimed warm-up: first connections, pools, caches.
    for sys in &systems {
        load(sys, 2, 64, 1).with_context(|| format!("warm-up of {}", sys.label))?;
    }
    let mut rounds: Vec<Vec<Result<Round, String>>> = vec![Vec::new(); systems.len()];
    for r in 0..opts.rounds {
        eprintln!(
            "[http-cost] round {}/{} ({:.0}s elapsed)",
            r + 1,
            opts.rounds,
            started.elapsed().as_secs_f64()
        );
        // Round-robin, starting one system later each round so no system always follows
        // the same neighbour.
        for k in 0..systems.len() {
            let i = (k + r) % systems.len();
            let sys = &systems[i];
            let proc = running[i].as_ref();
            let log = sys_log(dir, &sys.label);
            let log0 = file_len(&log);
            let (busy, cpu_secs) = proxy_cpu_secs(proc, || load(sys, 2, 64, opts.secs));
            let log_bytes = file_len(&log).saturating_sub(log0) as f64;
            let result = busy.and_then(|busy| {
                let idle = load(sys, 1, 1, opts.latency_secs)?;
                Ok(Round {
                    req_per_s: busy.requests / busy.secs,
                    cpu_us_per_req: cpu_secs * 1e6 / busy.requests,
                    log_bytes_per_req: match sys.kind {
                        Kind::Daemon { .. } => log_bytes / busy.requests,
                        _ => f64::NAN,
                    },
                    c1_p50_us: idle.p50_us,
                    c1_p99_us: idle.p99_us,
                })
            });
            if let Err(e) = &result {
                eprintln!("[http-cost] {}: {e:#}", sys.label);
            }
            rounds[i].push(result.map_err(|e| format!("{e:#}")));
        }
    }
    drop(running);
    drop(upstream);
    drop(ns);

    let md = table::markdown(
        &opts,
        &daemon,
        &systems,
        &rounds,
        started.elapsed(),
        &load_start,
    );
    print!("{md}");
    let out = match &opts.out {
        Some(path) => path.clone(),
        None if opts.quick => root.join("target/bench-quick/http-cost.md"),
        None => root.join("bench/results/http-cost.md"),
    };
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, &md)?;
    eprintln!("[http-cost] results in {}", out.display());
    let failed: Vec<&str> = systems
        .iter()
        .zip(&rounds)
        .filter(|(_, r)| r.iter().any(|r| r.is_err()))
        .map(|(s, _)| s.label.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("http-cost: runs failed for {}", failed.join(", "));
    }
    Ok(())
}

fn systems(opts: &Options, daemon: &Path) -> Vec<System> {
    let mut v = vec![
        System {
            label: "no proxy".into(),
            port: UPSTREAM_PORT,
            kind: Kind::NoProxy,
        },
        System {
            label: "project-ingress-proxy, default logging (JSON line per request to a file)"
                .into(),
            port: 8001,
            kind: Kind::Daemon {
                binary: daemon.to_path_buf(),
                rust_log: None,
            },
        },
        System {
            label: "project-ingress-proxy, `RUST_LOG=warn`".into(),
            port: 8002,
            kind: Kind::Daemon {
                binary: daemon.to_path_buf(),
                rust_log: Some("warn"),
            },
        },
        System {
            label: NGINX.into(),
            port: 8003,
            kind: Kind::Nginx,
        },
        System {
            label: "HAProxy 2.6, 2 threads".into(),
            port: 8004,
            kind: Kind::Haproxy,
        },
    ];
    if let Some(baseline) = &opts.baseline_daemon {
        v.insert(
            3,
            System {
                label: "baseline daemon build, default logging".into(),
                port: 8005,
                kind: Kind::Daemon {
                    binary: baseline.clone(),
                    rust_log: None,
                },
            },
        );
    }
    v
}

fn sys_log(dir: &Path, label: &str) -> PathBuf {
    let name: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    dir.join(format!("{name}.log"))
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn nginx_cmd(ns: &Netns, dir: &Path, conf: &Path) -> std::process::Command {
    let mut cmd = ns.command("nginx");
    cmd.args(["-p", dir.to_str().unwrap(), "-c", conf.to_str().unwrap()])
        .args(["-e", dir.join("nginx-error.log").to_str().unwrap()])
        .args(["-g", "daemon off;"]);
    cmd
}

fn command(
    ns: &Netns,
    kind: &Kind,
    port: u16,
    dir: &Path,
    opts: &Options,
) -> Result<std::process::Command> {
    Ok(match kind {
        Kind::NoProxy => unreachable!("no process"),
        Kind::Daemon { binary, rust_log } => {
            let mut cmd = ns.command(binary.to_str().context("daemon path")?);
            cmd.args(["--listen", &format!("127.0.0.1:{port}")])
                .args(&opts.daemon_args)
                .env_remove("RUST_LOG")
                .env_remove("PROJECT_INGRESS_PROXY_LOG_FORMAT")
                // Several daemons run side by side here: each admin interface on a free
                // port (an env fallback, which builds without one ignore).
                .env("PROJECT_INGRESS_PROXY_ADMIN_LISTEN", "127.0.0.1:0")
                .env_remove("PROJECT_INGRESS_PROXY_SECRET")
                .env_remove("PROJECT_INGRESS_PROXY_SECRET_FILE");
            if let Some(level) = rust_log {
                cmd.env("RUST_LOG", level);
            }
            cmd
        }
        Kind::Nginx => {
            let conf = dir.join(format!("nginx-{port}.conf"));
            std::fs::write(&conf, configs::proxy_nginx(dir, port))?;
            nginx_cmd(ns, dir, &conf)
        }
        Kind::Haproxy => {
            let conf = dir.join("haproxy.cfg");
            std::fs::write(&conf, configs::haproxy(port))?;
            let mut cmd = ns.command("haproxy");
            cmd.args(["-db", "-f", conf.to_str().unwrap()]);
            cmd
        }
    })
}

/// Starts `cmd` (output to the system's log file) and waits until it accepts on `port`.
fn start(
    ns: &Netns,
    rt: &tokio::runtime::Runtime,
    label: &str,
    port: u16,
    cmd: std::process::Command,
    dir: &Path,
) -> Result<Proc> {
    let mut proc = Proc::spawn(label, cmd, &sys_log(dir, label))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(15);
    while rt.block_on(ns.connect(addr)).is_err() {
        if let Some(status) = proc.exited() {
            bail!("{label} exited at start-up ({status}): {}", proc.log_tail());
        }
        if Instant::now() > deadline {
            bail!("{label} did not listen within 15 s: {}", proc.log_tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let multi-process servers start their workers.
    std::thread::sleep(Duration::from_millis(300));
    Ok(proc)
}
