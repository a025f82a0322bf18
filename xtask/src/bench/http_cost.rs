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

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tests::netns::Netns;

use super::measure::{median, proxy_cpu_secs};
use super::procs::{self, Proc};
use super::report::fmt_num;
use super::results;
use super::wrk;

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
    std::fs::write(&upstream_conf, upstream_nginx_conf(dir))?;
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

    let md = markdown(
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
                .env_remove("PROJECT_INGRESS_PROXY_SECRET")
                .env_remove("PROJECT_INGRESS_PROXY_SECRET_FILE");
            if let Some(level) = rust_log {
                cmd.env("RUST_LOG", level);
            }
            cmd
        }
        Kind::Nginx => {
            let conf = dir.join(format!("nginx-{port}.conf"));
            std::fs::write(&conf, proxy_nginx_conf(dir, port))?;
            nginx_cmd(ns, dir, &conf)
        }
        Kind::Haproxy => {
            let conf = dir.join("haproxy.cfg");
            std::fs::write(&conf, haproxy_conf(port))?;
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

fn temp_paths(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi; \
         uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;"
    )
}

/// The upstream app: nginx, 1 worker, `GET /` → 200 "ok\n" (3 bytes), 421 for a request
/// not rewritten as a proxy must (Host `localhost:9000`, no target header).
fn upstream_nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    let temp = temp_paths(dir);
    format!(
        r#"worker_processes 1;
pid {d}/upstream-nginx.pid;
error_log {d}/upstream-nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    {temp}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    map "$http_host|$http_x_iterate_proxy_target_host" $misrouted {{
        "{TARGET}|" 0;
        default 1;
    }}
    server {{
        listen 127.0.0.1:{UPSTREAM_PORT} backlog=4096;
        location / {{
            if ($misrouted) {{ return 421; }}
            return 200 "ok\n";
        }}
    }}
}}
"#
    )
}

/// nginx as the issue's reference: 2 workers, a named `upstream` block with keepalive
/// (pooled; it lists the one port), access log off.
fn proxy_nginx_conf(dir: &Path, port: u16) -> String {
    let d = dir.display();
    let temp = temp_paths(dir);
    format!(
        r#"worker_processes 2;
pid {d}/nginx-{port}.pid;
error_log {d}/nginx-{port}-error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    {temp}
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    map $http_x_iterate_proxy_target_host $target_port {{
        "~^localhost:(?<p>[0-9]+)$" $p;
        default "";
    }}
    upstream app{UPSTREAM_PORT} {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            if ($target_port = "") {{ return 400; }}
            proxy_pass http://app{UPSTREAM_PORT};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host localhost:$target_port;
            proxy_set_header X-Iterate-Proxy-Target-Host "";
            proxy_set_header X-Iterate-Proxy-Via $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"#
    )
}

/// HAProxy 2.6, 2 threads: the port from the header (`set-dst-port`, any port).
fn haproxy_conf(port: u16) -> String {
    format!(
        r#"global
    maxconn 7900
    nbthread 2

defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    option http-keep-alive

frontend fe
    bind 127.0.0.1:{port}
    default_backend app

backend app
    http-request set-var(txn.port) req.hdr(x-iterate-proxy-target-host),regsub(^localhost:,)
    http-request return status 400 unless {{ var(txn.port) -m reg ^[0-9]+$ }}
    http-request set-header X-Iterate-Proxy-Via %[req.hdr(host)]
    http-request set-header Host localhost:%[var(txn.port)]
    http-request del-header X-Iterate-Proxy-Target-Host
    http-request set-dst-port var(txn.port)
    server app 127.0.0.1:0
"#
    )
}

fn markdown(
    opts: &Options,
    daemon: &Path,
    systems: &[System],
    rounds: &[Vec<Result<Round, String>>],
    took: Duration,
    load_start: &str,
) -> String {
    let ok = |i: usize| -> Vec<Round> {
        rounds[i]
            .iter()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect()
    };
    let med = |i: usize, f: fn(&Round) -> f64| median(ok(i).iter().map(f).collect());
    let nginx = systems.iter().position(|s| s.label == NGINX);
    let ratio = |i: usize, f: fn(&Round) -> f64| match nginx {
        Some(n) if med(n, f).is_finite() && med(n, f) > 0.0 && med(i, f).is_finite() => {
            format!("{:.2}", med(i, f) / med(n, f))
        }
        _ => "–".into(),
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# HTTP cost per request on loopback (issue 8's probe), {}\n",
        results::date("+%Y-%m-%d %H:%M UTC")
    );
    let _ = writeln!(
        s,
        "- Method: one network namespace, everything on its loopback. `wrk -t2 -c64 -d{}s` `GET /` \
         of a 3-byte body from an upstream nginx (1 worker, `return 200`); every proxy routes by \
         `X-Iterate-Proxy-Target-Host: {TARGET}`, rewrites `Host`, removes the target header and \
         adds `X-Iterate-Proxy-Via` (the upstream answers 421 otherwise; any non-2xx fails the run). \
         {} round(s), systems interleaved round-robin (each round starts one system later), after a \
         1 s untimed warm-up each. Figures are medians over the rounds. Proxy CPU = utime+stime of \
         all the proxy's processes and threads (/proc/<pid>/stat) over the c=64 run / requests. \
         c=1 latency: a separate `wrk -t1 -c1 -d{}s` run right after each c=64 run. \
         Log B/req: growth of the daemon's log file (its stderr) per request.",
        opts.secs, opts.rounds, opts.latency_secs
    );
    let _ = writeln!(
        s,
        "- Daemon: `{}`{} (default `--splice auto`; default logging = no `RUST_LOG`, JSON since \
         stderr is a file).",
        daemon.display(),
        if opts.daemon_args.is_empty() {
            String::new()
        } else {
            format!(" with `{}`", opts.daemon_args.join(" "))
        }
    );
    if let Some(b) = &opts.baseline_daemon {
        let _ = writeln!(s, "- Baseline daemon build: `{}`.", b.display());
    }
    let _ = writeln!(
        s,
        "- Commit: {} · {} · {}\n- Run took {:.0} s; load average {load_start} at start, {} at \
         the end. Client, proxies and upstream share the machine's CPUs: a proxy that spends more \
         CPU leaves less for the others, so req/s falls with it. Compare within one run.\n",
        commit(),
        results::machine(),
        results::versions(),
        took.as_secs_f64(),
        results::loadavg(),
    );
    let _ = writeln!(
        s,
        "| system | req/s ↑ | ×nginx | proxy CPU µs/req ↓ | ×nginx | c=1 p50 µs ↓ | c=1 p99 µs ↓ | ×nginx (p99) | log B/req |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, sys) in systems.iter().enumerate() {
        if ok(i).is_empty() {
            let why = rounds[i]
                .iter()
                .find_map(|r| r.as_ref().err())
                .map_or("no run", |e| e.as_str());
            let _ = writeln!(
                s,
                "| {} | **FAILED**: {} | | | | | | | |",
                sys.label,
                why.replace('|', "/")
            );
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            sys.label,
            fmt_num(med(i, |r| r.req_per_s)),
            ratio(i, |r| r.req_per_s),
            fmt_num(med(i, |r| r.cpu_us_per_req)),
            ratio(i, |r| r.cpu_us_per_req),
            fmt_num(med(i, |r| r.c1_p50_us)),
            fmt_num(med(i, |r| r.c1_p99_us)),
            ratio(i, |r| r.c1_p99_us),
            fmt_num(med(i, |r| r.log_bytes_per_req)),
        );
    }
    let _ = writeln!(s, "\n## Every round\n");
    let _ = writeln!(
        s,
        "req/s · proxy CPU µs/req · c=1 p50/p99 µs, per round in order.\n"
    );
    let _ = writeln!(s, "| system | rounds |\n|---|---|");
    for (i, sys) in systems.iter().enumerate() {
        let cells: Vec<String> = rounds[i]
            .iter()
            .map(|r| match r {
                Ok(r) => format!(
                    "{} · {} · {}/{}",
                    fmt_num(r.req_per_s),
                    fmt_num(r.cpu_us_per_req),
                    fmt_num(r.c1_p50_us),
                    fmt_num(r.c1_p99_us)
                ),
                Err(_) => "FAILED".into(),
            })
            .collect();
        let _ = writeln!(s, "| {} | {} |", sys.label, cells.join(" ‖ "));
    }
    s
}

/// The workspace's commit, marked when the tree has changes.
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(crate::workspace_root())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    format!(
        "`{head}`{}",
        if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        }
    )
}
