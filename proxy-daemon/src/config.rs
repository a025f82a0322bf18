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
    /// Address and port to listen on.
    #[arg(
        long,
        env = "PROJECT_INGRESS_PROXY_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: SocketAddr,

    /// Data path for tunnels: auto, ebpf (required, fail at start-up without it) or off (userspace).
    #[arg(long, env = "PROJECT_INGRESS_PROXY_SPLICE", value_enum, default_value_t = SpliceMode::Auto)]
    pub splice: SpliceMode,

    /// Fast path: most bytes one tunnel direction may have queued inside the kernel (memory no socket is charged for). A direction that goes over it (a slow reader, a bulk burst) is relayed with splice(2) for the rest of the tunnel, where TCP's own flow control bounds it.
    #[arg(long, env = "PROJECT_INGRESS_PROXY_EBPF_BUDGET", default_value_t = crate::tunnel::ebpf::DEFAULT_BUDGET, value_parser = clap::value_parser!(u32).range(64 * 1024..))]
    pub ebpf_budget: u32,

    /// Fast path: most bytes queued inside the kernel over every tunnel direction at once (memory no socket or cgroup is charged for; 0 = no machine-wide limit). Past it, the direction that adds more is relayed with splice(2) for the rest of its tunnel, as over --ebpf-budget.
    #[arg(long, env = "PROJECT_INGRESS_PROXY_EBPF_MEMORY_LIMIT", default_value_t = crate::tunnel::ebpf::DEFAULT_MEMORY_LIMIT)]
    pub ebpf_memory_limit: u64,

    /// Fast path: capacity of its socket maps (two sockets per tunnel). Tunnels beyond it use the userspace relay.
    #[arg(long, env = "PROJECT_INGRESS_PROXY_EBPF_MAX_SOCKETS", default_value_t = crate::tunnel::ebpf::DEFAULT_MAX_SOCKETS, value_parser = clap::value_parser!(u32).range(2..))]
    pub ebpf_max_sockets: u32,

    /// Fast path: size of the over-budget event ring buffer in bytes (a power of two, at least a page). For tests; the default fits thousands of events.
    #[arg(long, env = "PROJECT_INGRESS_PROXY_EBPF_EVENT_RING_BYTES", default_value_t = crate::tunnel::ebpf::DEFAULT_EVENT_RING_BYTES, hide = true)]
    pub ebpf_event_ring_bytes: u32,

    /// Relay used for tunnels that are not spliced by eBPF (`--splice off`, or `auto`
    /// when the fast path cannot load or does not pay).
    #[arg(long, env = "PROJECT_INGRESS_PROXY_USERSPACE_RELAY", value_enum, default_value_t = UserspaceRelay::Copy)]
    pub userspace_relay: UserspaceRelay,

    /// Read the ingress secret from this file (surrounding whitespace trimmed) instead of
    /// the PROJECT_INGRESS_PROXY_SECRET environment variable.
    #[arg(long, env = "PROJECT_INGRESS_PROXY_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "PROJECT_INGRESS_PROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    /// On SIGTERM/SIGINT: stop accepting, then give in-flight requests and tunnels this
    /// long to finish before closing them and exiting.
    #[arg(long, env = "PROJECT_INGRESS_PROXY_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Largest request head (request line + headers) accepted; larger gets 431.
    #[arg(long, env = "PROJECT_INGRESS_PROXY_MAX_HEADER_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(8192..))]
    pub max_header_bytes: u32,

    /// Time a client has to send a complete request head (slowloris guard); also the
    /// idle time after which a keep-alive client connection is closed.
    #[arg(long, env = "PROJECT_INGRESS_PROXY_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// Time allowed to connect to the upstream port; beyond it the client gets 502.
    #[arg(long, env = "PROJECT_INGRESS_PROXY_UPSTREAM_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// How long an idle pooled upstream connection is kept.
    #[arg(long, env = "PROJECT_INGRESS_PROXY_UPSTREAM_IDLE_TIMEOUT", default_value = "90s", value_parser = humantime::parse_duration)]
    pub upstream_idle_timeout: Duration,

    /// Most idle pooled connections kept per upstream port.
    #[arg(
        long,
        env = "PROJECT_INGRESS_PROXY_UPSTREAM_MAX_IDLE",
        default_value_t = 64
    )]
    pub upstream_max_idle_per_port: usize,
}

impl Args {
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
