//! The systems under test: how each one is configured and started in the machine
//! namespace. All route by `X-Iterate-Proxy-Target-Host: localhost:<port>` to
//! 127.0.0.1:<port> and rewrite `Host` to `localhost:<port>`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tests::Topology;

use super::procs::Proc;

pub const PROXY_PORT: u16 = 8000;
/// The upstream app's first port: every scenario but the 8-port one targets it.
pub const UPSTREAM_PORT: u16 = 9000;
/// The upstream app listens on this many consecutive ports from `UPSTREAM_PORT` (one
/// process), so a scenario can spread requests over ports by the target header.
pub const UPSTREAM_PORT_COUNT: u16 = 8;

pub fn upstream_ports() -> impl Iterator<Item = u16> {
    UPSTREAM_PORT..UPSTREAM_PORT + UPSTREAM_PORT_COUNT
}

/// The routing header's value for an upstream port.
pub fn target(port: u16) -> String {
    format!("localhost:{port}")
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum System {
    Direct,
    DaemonEbpf,
    DaemonZeroHop,
    DaemonOff,
    Node,
    Nginx,
    NginxPooled,
    Haproxy,
}

pub const ALL: [System; 8] = [
    System::Direct,
    System::DaemonEbpf,
    System::DaemonZeroHop,
    System::DaemonOff,
    System::Node,
    System::Nginx,
    System::NginxPooled,
    System::Haproxy,
];

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Direct => "direct",
            System::DaemonEbpf => "daemon ebpf",
            System::DaemonZeroHop => "daemon zero-hop",
            System::DaemonOff => "daemon userspace",
            System::Node => "node http-proxy",
            System::Nginx => "nginx",
            System::NginxPooled => "nginx pooled",
            System::Haproxy => "haproxy",
        }
    }

    /// How it is configured, for the results.
    pub fn describe(self) -> &'static str {
        match self {
            System::Direct => "client → upstream across the veth, no proxy (the limit)",
            System::DaemonEbpf => "`project-ingress-proxy --splice ebpf` (kernel SOCKMAP fast path for tunnels), default logging (see above)",
            System::DaemonZeroHop => "`project-ingress-proxy --splice ebpf --zero-hop on` (the app's sends go straight into the client socket while it has room, docs/zero-hop.md; client→upstream as daemon ebpf), started with nsenter so the cgroup hierarchy is visible, default logging; tunnel scenarios only",
            System::DaemonOff => "`project-ingress-proxy --splice off` (userspace relay), default logging (see above)",
            System::Node => "npm `http-proxy` 1.18 without an agent, as the platform runs it: `Connection: close` upstream, so every request opens a new upstream connection and the upstream's close is relayed to the client",
            System::Nginx => "nginx, realistic routing config: `proxy_pass http://127.0.0.1:$port` with the port taken from the header (a new upstream connection per request), upgrade headers, buffering off, access log off, 2 workers",
            System::NginxPooled => "nginx with a named `upstream` block + `keepalive 64` for the one benchmark port (pooled upstream connections; needs the port list in the config, so not how routing by header works) — single-port small-HTTP scenario only",
            System::Haproxy => "HAProxy 2.6, port from the header via `set-dst-port` (any port, no list), `option splice-request` + `option splice-response`, 2 threads, http-keep-alive",
        }
    }
}

/// Where clients send their traffic for `sys`.
pub fn address(topo: &Topology, sys: System) -> SocketAddr {
    let port = if sys == System::Direct {
        UPSTREAM_PORT
    } else {
        PROXY_PORT
    };
    SocketAddr::new(topo.machine_ip, port)
}

fn nginx_conf(dir: &Path, pooled: bool) -> String {
    let d = dir.display();
    let (upstream_block, pass, keep) = if pooled {
        (
            format!(
                "upstream app{UPSTREAM_PORT} {{ server 127.0.0.1:{UPSTREAM_PORT}; keepalive 64; }}"
            ),
            format!("http://app{UPSTREAM_PORT}"),
            "map $http_upgrade $connection_upgrade { default upgrade; '' ''; }",
        )
    } else {
        (
            String::new(),
            "http://127.0.0.1:$target_port".to_string(),
            "map $http_upgrade $connection_upgrade { default upgrade; '' close; }",
        )
    };
    format!(
        r#"worker_processes 2;
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 19000; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000;
    keepalive_timeout 300s;
    client_max_body_size 0;
    map $http_x_iterate_proxy_target_host $target_port {{
        "~^localhost:(?<p>[0-9]+)$" $p;
        default "";
    }}
    {keep}
    {upstream_block}
    server {{
        listen {PROXY_PORT} backlog=4096;
        location / {{
            if ($target_port = "") {{ return 400; }}
            proxy_pass {pass};
            proxy_http_version 1.1;
            proxy_set_header Host localhost:$target_port;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"#
    )
}

fn haproxy_conf() -> String {
    format!(
        r#"global
    maxconn 7900
    ulimit-n 20000
    nbthread 2

defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout tunnel 3600s
    timeout http-keep-alive 300s
    option http-keep-alive
    option splice-request
    option splice-response

frontend fe
    bind 0.0.0.0:{PROXY_PORT}
    default_backend app

backend app
    http-request set-var(txn.port) req.hdr(x-iterate-proxy-target-host),regsub(^localhost:,)
    http-request return status 400 unless {{ var(txn.port) -m reg ^[0-9]+$ }}
    http-request set-header Host localhost:%[var(txn.port)]
    http-request set-dst-port var(txn.port)
    server app 127.0.0.1:0
"#
    )
}

pub struct Paths {
    pub root: std::path::PathBuf,
    pub daemon: std::path::PathBuf,
}

/// Starts a fresh instance of `sys` (None for direct) and waits until it accepts
/// connections from the client namespace. `Err` with a one-line reason if it cannot start.
pub fn start(
    rt: &tokio::runtime::Runtime,
    topo: &Topology,
    sys: System,
    paths: &Paths,
    dir: &Path,
) -> Result<Option<Proc>> {
    let log = dir.join(format!("{}.log", sys.name().replace(' ', "-")));
    let proc = match sys {
        System::Direct => return Ok(None),
        System::DaemonEbpf | System::DaemonZeroHop | System::DaemonOff => {
            let (mode, zero_hop) = match sys {
                System::DaemonEbpf => ("ebpf", "off"),
                System::DaemonZeroHop => ("ebpf", "on"),
                _ => ("off", "off"),
            };
            // Zero-hop attaches to the cgroup hierarchy, which `ip netns exec` hides.
            let mut cmd = if sys == System::DaemonZeroHop {
                topo.machine.enter(paths.daemon.to_str().unwrap())
            } else {
                topo.machine.command(paths.daemon.to_str().unwrap())
            };
            // Production logging: no RUST_LOG and no --log-format, so the daemon's defaults
            // apply (info, JSON because stderr is not a terminal) and every request writes
            // its access line into the log file, as journald would receive it.
            cmd.args([
                "--listen",
                &format!("0.0.0.0:{PROXY_PORT}"),
                "--splice",
                mode,
                "--zero-hop",
                zero_hop,
            ])
            .env_remove("RUST_LOG")
            .env_remove("PROJECT_INGRESS_PROXY_LOG_FORMAT")
            .env_remove("PROJECT_INGRESS_PROXY_SECRET")
            .env_remove("PROJECT_INGRESS_PROXY_SECRET_FILE");
            Proc::spawn(sys.name(), cmd, &log)?
        }
        System::Node => {
            let server = paths.root.join("bench/node/server.js");
            let mut cmd = topo.machine.command("node");
            cmd.arg(server).arg(format!("0.0.0.0:{PROXY_PORT}"));
            Proc::spawn(sys.name(), cmd, &log)?
        }
        System::Nginx | System::NginxPooled => {
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, nginx_conf(dir, sys == System::NginxPooled))?;
            let mut cmd = topo.machine.command("nginx");
            cmd.args(["-p", dir.to_str().unwrap(), "-c", conf.to_str().unwrap()])
                .args(["-e", dir.join("nginx-error.log").to_str().unwrap()])
                .args(["-g", "daemon off;"]);
            Proc::spawn(sys.name(), cmd, &log)?
        }
        System::Haproxy => {
            let conf = dir.join("haproxy.cfg");
            std::fs::write(&conf, haproxy_conf())?;
            let mut cmd = topo.machine.command("haproxy");
            cmd.args(["-db", "-f", conf.to_str().unwrap()]);
            Proc::spawn(sys.name(), cmd, &log)?
        }
    };
    wait_listening(rt, topo, address(topo, sys), proc)
}

fn wait_listening(
    rt: &tokio::runtime::Runtime,
    topo: &Topology,
    addr: SocketAddr,
    mut proc: Proc,
) -> Result<Option<Proc>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = proc.exited() {
            bail!("exited at start-up ({status}): {}", proc.log_tail());
        }
        if rt.block_on(topo.client.connect(addr)).is_ok() {
            // Let multi-process servers finish starting their workers.
            std::thread::sleep(Duration::from_millis(300));
            if let Some(status) = proc.exited() {
                bail!("exited at start-up ({status}): {}", proc.log_tail());
            }
            return Ok(Some(proc));
        }
        if Instant::now() > deadline {
            bail!("did not listen within 15 s: {}", proc.log_tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes the configs as used, for the results folder.
pub fn write_configs(out: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("nginx.conf"), nginx_conf(dir, false))?;
    std::fs::write(out.join("nginx-pooled.conf"), nginx_conf(dir, true))?;
    std::fs::write(out.join("haproxy.cfg"), haproxy_conf())?;
    Ok(())
}
