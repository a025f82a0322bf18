//! Command line and environment (every flag has an env fallback).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};

use crate::auth::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SpliceMode {
    /// In-kernel eBPF fast path when it can load (needs CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON), else the userspace relay with one warning line.
    Auto,
    /// Require the in-kernel eBPF fast path; exit at start-up if it cannot load.
    Ebpf,
    /// Relay tunnels in userspace only.
    Off,
}

/// Zero-hop tunnels (app→client bytes from the app's own `sendmsg` straight into the
/// client socket; docs/zero-hop.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ZeroHopMode {
    /// Off: zero-hop did not beat direct as required (app-to-client 0.85-1.11x direct at up to 1.25x its CPU, echo p50 1.29-1.47x direct; docs/zero-hop.md), so `auto` keeps the relay chosen by --splice.
    Auto,
    /// Zero-hop for every tunnel to an IPv4 app the kernel captures; exit at start-up if the programs cannot load or attach (needs cgroup v2 and CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON).
    On,
    /// Tunnels use only the relay chosen by --splice.
    Off,
}

/// How tunnels are relayed when the eBPF fast path is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UserspaceRelay {
    /// splice(2) through a pipe: bytes never enter the daemon's memory, but each active
    /// direction holds a pipe (two more fds per direction).
    Splice,
    /// read(2)/write(2) through a buffer that exists only while bytes move: two fds per
    /// tunnel, nothing held while idle.
    Copy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable text when stderr is a terminal, JSON otherwise (services).
    Auto,
    Json,
    Text,
}

/// Machine-side ingress port router.
///
/// Terminates HTTP on the listen address and routes each request to
/// `localhost:<port>`, the port named by the `X-Iterate-Proxy-Target-Host` header
/// (`<port>__<host>`, `localhost:<port>`, `127.0.0.1:<port>`, or a bare hostname for
/// port 3000). Upgraded connections (WebSocket and any other `Upgrade:` protocol) become
/// raw byte tunnels, spliced in the kernel by an eBPF SOCKMAP program where that helps.
///
/// Secret auth: when the environment variable PROJECT_INGRESS_PROXY_SECRET (or
/// --secret-file) is set, every request except `/health` must carry the same value in
/// `X-Iterate-Project-Ingress-Secret`. The secret is never logged.
///
/// Log verbosity follows RUST_LOG (default `info`).
#[derive(Debug, Parser)]
#[command(name = "project-ingress-proxy", version, about, long_about)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address and port to listen on.
    #[arg(
        long,
        global = true,
        env = "PROJECT_INGRESS_PROXY_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: SocketAddr,

    /// Data path for tunnels: auto, ebpf (required, fail at start-up without it) or off (userspace).
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_SPLICE", value_enum, default_value_t = SpliceMode::Auto)]
    pub splice: SpliceMode,

    /// Fast path: bytes one tunnel direction may have queued inside the kernel (memory no socket is charged for). A direction that reaches half of it (a slow reader, a bulk burst) is taken out of the kernel and relayed with splice(2) for the rest of the tunnel, where TCP's own flow control bounds it. What arrives while it is taken out comes on top: the other half, and at loopback line rate up to a few MiB more (docs/fastpath.md).
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_EBPF_BUDGET", default_value_t = crate::tunnel::ebpf::DEFAULT_BUDGET, value_parser = clap::value_parser!(u32).range(64 * 1024..))]
    pub ebpf_budget: u32,

    /// Fast path: most bytes queued inside the kernel over every tunnel direction at once (memory no socket or cgroup is charged for; 0 = no machine-wide limit). Past it, the direction that adds more is relayed in userspace for the rest of its tunnel (the copy relay, which holds no pipe).
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_EBPF_MEMORY_LIMIT", default_value_t = crate::tunnel::ebpf::DEFAULT_MEMORY_LIMIT)]
    pub ebpf_memory_limit: u64,

    /// Fast path: capacity of its socket maps (two sockets per tunnel). Tunnels beyond it use the userspace relay.
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_EBPF_MAX_SOCKETS", default_value_t = crate::tunnel::ebpf::DEFAULT_MAX_SOCKETS, value_parser = clap::value_parser!(u32).range(2..))]
    pub ebpf_max_sockets: u32,

    /// Fast path: size of the over-budget event ring buffer in bytes (a power of two, at least a page). For tests; the default fits thousands of events.
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_EBPF_EVENT_RING_BYTES", default_value_t = crate::tunnel::ebpf::DEFAULT_EVENT_RING_BYTES, hide = true)]
    pub ebpf_event_ring_bytes: u32,

    /// Zero-hop tunnels: the app's bytes go from its own send straight into the client
    /// socket while the client keeps up, and through the daemon (no reordering) while it
    /// does not. Not safe for apps that read with blocking sockets while another thread
    /// writes (docs/zero-hop.md).
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_ZERO_HOP", value_enum, default_value_t = ZeroHopMode::Auto)]
    pub zero_hop: ZeroHopMode,

    /// Relay used for tunnels that are not spliced by eBPF (`--splice off`, or `auto`
    /// when the fast path cannot load or does not pay).
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_USERSPACE_RELAY", value_enum, default_value_t = UserspaceRelay::Copy)]
    pub userspace_relay: UserspaceRelay,

    /// Read the ingress secret from this file (surrounding whitespace trimmed) instead of
    /// the PROJECT_INGRESS_PROXY_SECRET environment variable.
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,

    /// Log format.
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    /// Read the log filter (`info`, `debug`, `info,proxy_daemon=debug`…, RUST_LOG syntax)
    /// from this file at start and again on SIGHUP. Without it, RUST_LOG (default
    /// `info`), fixed for the process's life.
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_LOG_LEVEL_FILE")]
    pub log_level_file: Option<PathBuf>,

    /// Unix socket (created root-only, mode 0600) on which this daemon hands its
    /// listening sockets, fast-path maps and live tunnels to a successor started with
    /// `--takeover` and the same path. Off when unset.
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_CONTROL_SOCKET")]
    pub control_socket: Option<PathBuf>,

    /// Take over from the daemon listening on `--control-socket`: receive its listening
    /// sockets, admin socket, fast-path maps and every live tunnel (no connection is
    /// dropped, no byte lost); it finishes its in-flight requests and exits 0.
    #[arg(
        long,
        global = true,
        env = "PROJECT_INGRESS_PROXY_TAKEOVER",
        requires = "control_socket"
    )]
    pub takeover: bool,

    /// Take over (as `--takeover`) if a daemon answers on `--control-socket`, else start
    /// fresh. For supervisors that follow one process id and restart it when it exits
    /// (pidnap): after a `SIGUSR2` upgrade the process they started exits 0, and the one
    /// they start again takes everything over from its successor (docs/operations.md).
    #[arg(
        long,
        global = true,
        env = "PROJECT_INGRESS_PROXY_TAKEOVER_IF_RUNNING",
        requires = "control_socket"
    )]
    pub takeover_if_running: bool,

    /// Admin interface (plain HTTP): `GET /metrics` (Prometheus), `GET /debug/tunnels`
    /// (JSON), `GET /ready` (200 serving, 503 draining). `off` disables it. Keep it on
    /// loopback; the proxy never routes a request to it.
    #[arg(
        long,
        global = true,
        env = "PROJECT_INGRESS_PROXY_ADMIN_LISTEN",
        default_value = "127.0.0.1:9180"
    )]
    pub admin_listen: AdminListen,

    /// On SIGTERM/SIGINT: stop accepting, then give in-flight requests and tunnels this
    /// long to finish before closing them and exiting.
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Largest request head (request line + headers) accepted; larger gets 431.
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_MAX_HEADER_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(8192..))]
    pub max_header_bytes: u32,

    /// Time a client has to send a complete request head (slowloris guard); also the
    /// idle time after which a keep-alive client connection is closed.
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// Time allowed to connect to the upstream port; beyond it the client gets 502.
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_UPSTREAM_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// Longest an idle pooled upstream connection is kept. Servers close idle
    /// connections on their own timers (Node: 5 s, uvicorn: 5 s); a shorter `Keep-Alive:
    /// timeout=N` from the upstream shortens it to N-1 s, and a request that meets a
    /// connection the upstream just closed is retried once on a new one.
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_UPSTREAM_IDLE_TIMEOUT", default_value = "4s", value_parser = humantime::parse_duration)]
    pub upstream_idle_timeout: Duration,

    /// Most idle pooled connections kept per upstream port and worker thread.
    #[arg(
        long,
        global = true,
        env = "PROJECT_INGRESS_PROXY_UPSTREAM_MAX_IDLE",
        default_value_t = 64
    )]
    pub upstream_max_idle_per_port: usize,

    /// Worker threads, each with its own event loop, listening socket (SO_REUSEPORT) and
    /// upstream pool; a request stays on one thread from client to upstream and back.
    /// 0: one per CPU.
    #[arg(
        long,
        global = true,
        env = "PROJECT_INGRESS_PROXY_WORKERS",
        default_value_t = 0
    )]
    pub workers: usize,

    /// TCP keepalive on client and upstream sockets: idle time before the first probe, or
    /// `off`. With the interval and probe count below, a peer that vanished without FIN
    /// or RST (a laptop gone to sleep) is dropped within minutes, its tunnel closed.
    #[arg(
        long,
        global = true,
        env = "PROJECT_INGRESS_PROXY_TCP_KEEPALIVE",
        default_value = "60s"
    )]
    pub tcp_keepalive: KeepaliveIdle,

    /// Time between keepalive probes.
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_TCP_KEEPALIVE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tcp_keepalive_interval: Duration,

    /// Unanswered keepalive probes before the connection is dropped.
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_TCP_KEEPALIVE_PROBES", default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=127))]
    pub tcp_keepalive_probes: u32,

    /// Only these target ports are routed (e.g. `3000,4000-4999`); others get 403
    /// `forbidden_target`. Default: every port. The daemon's own ports are always refused.
    #[arg(long, global = true, env = "PROJECT_INGRESS_PROXY_ALLOW_PORTS")]
    pub allow_ports: Option<crate::admission::PortSet>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Validate the configuration, try to load the in-kernel fast path, print what
    /// `--splice auto` would choose and why, and exit 0 (usable) or 1 (not).
    Check,
}

/// `--admin-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminListen(pub Option<SocketAddr>);

impl std::str::FromStr for AdminListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(AdminListen(None));
        }
        s.parse()
            .map(|a| AdminListen(Some(a)))
            .map_err(|e| format!("{e} (an address such as 127.0.0.1:9180, or `off`)"))
    }
}

/// `--tcp-keepalive`: a duration, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveIdle(pub Option<Duration>);

impl std::str::FromStr for KeepaliveIdle {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(KeepaliveIdle(None));
        }
        humantime::parse_duration(s)
            .map(|d| KeepaliveIdle(Some(d)))
            .map_err(|e| e.to_string())
    }
}

impl Args {
    /// Keepalive settings for traffic sockets (`None`: off).
    pub fn keepalive(&self) -> Option<crate::io::Keepalive> {
        self.tcp_keepalive.0.map(|idle| crate::io::Keepalive {
            idle,
            interval: self.tcp_keepalive_interval,
            probes: self.tcp_keepalive_probes,
        })
    }

    /// Worker threads to run.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// The fast path's load-time settings.
    pub fn ebpf_settings(&self) -> crate::tunnel::ebpf::Settings {
        crate::tunnel::ebpf::Settings {
            budget: self.ebpf_budget,
            memory_limit: self.ebpf_memory_limit,
            max_sockets: self.ebpf_max_sockets,
            event_ring_bytes: self.ebpf_event_ring_bytes,
        }
    }

    /// The secret from `--secret-file` or PROJECT_INGRESS_PROXY_SECRET; empty means off.
    pub fn secret(&self) -> anyhow::Result<Option<Secret>> {
        let raw = match &self.secret_file {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading secret file {}", path.display()))?,
            None => std::env::var("PROJECT_INGRESS_PROXY_SECRET").unwrap_or_default(),
        };
        let trimmed = raw.trim();
        Ok((!trimmed.is_empty()).then(|| Secret::new(trimmed.as_bytes())))
    }
}
