//! Start-up and shutdown: limits, the tunnel data path, the listening sockets, the worker
//! threads; then SIGTERM/SIGINT → stop accepting, drain within the grace period, reset
//! what is left, exit.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::config::{Args, SpliceMode, UserspaceRelay};
use crate::forward::upstream::ConnectSettings;
use crate::forward::{ForwardSettings, Forwarder};
use crate::limits::{self, Capacity};
use crate::server::{self, Shared};
use crate::tunnel::{ebpf, Relay, Tunnels};

pub fn run(args: Args) -> anyhow::Result<()> {
    // The main thread runs signals and the fast path's event readers; workers do traffic.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the main runtime")?;
    runtime.block_on(serve(args))
}

fn choose_relay(args: &Args) -> anyhow::Result<Relay> {
    let userspace = match args.userspace_relay {
        UserspaceRelay::Splice => Relay::Splice,
        UserspaceRelay::Copy => Relay::Copy,
    };
    Ok(match args.splice {
        SpliceMode::Off => userspace,
        SpliceMode::Ebpf => Relay::Ebpf(Arc::new(
            ebpf::Splicer::load(args.ebpf_budget)
                .context("--splice ebpf: the in-kernel fast path cannot start")?,
        )),
        // Evidence (docs/fastpath.md, one run on the netns topology): the kernel path
        // wins small messages (about 25% lower round-trip time and 30% less machine
        // CPU per round trip than either userspace relay) and a bulk direction leaves
        // it after its 2 MiB budget for splice(2), which wins bulk throughput here.
        SpliceMode::Auto => match ebpf::Splicer::load(args.ebpf_budget) {
            Ok(splicer) => Relay::Ebpf(Arc::new(splicer)),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    fallback = userspace.name(),
                    "in-kernel fast path unavailable, tunnels use the userspace relay"
                );
                userspace
            }
        },
    })
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let files = limits::raise_nofile().context("reading the open-file limit")?;
    let secret = args.secret()?;
    let relay = choose_relay(&args)?;
    let workers = args.worker_count();
    let listeners = server::bind(args.listen, workers)?;
    let listen: SocketAddr = listeners[0].local_addr()?;
    let capacity = Capacity::new(files.soft);
    tracing::info!(
        listen = %listen,
        workers,
        data_path = relay.name(),
        splice = ?args.splice,
        secret_auth = secret.is_some(),
        open_files_soft_limit_at_start = files.soft_before,
        open_files_limit = files.soft,
        open_files_hard_limit = files.hard,
        capacity_fds = capacity.limit(),
        "project-ingress-proxy started"
    );
    if secret.is_none() && !listen.ip().is_loopback() {
        tracing::warn!(
            listen = %listen,
            "listening beyond loopback without PROJECT_INGRESS_PROXY_SECRET: anyone who can reach this address can reach every local port"
        );
    }

    let max_head = args.max_header_bytes as usize;
    let shared: &'static Shared = Box::leak(Box::new(Shared {
        admission: Admission {
            secret,
            own_ports: vec![listen.port()],
            allowed: args.allow_ports.clone(),
        },
        forwarder: Forwarder {
            settings: ForwardSettings {
                connect: ConnectSettings {
                    timeout: args.upstream_connect_timeout,
                    keepalive: args.keepalive(),
                },
                idle_timeout: args.upstream_idle_timeout,
                max_idle_per_port: args.upstream_max_idle_per_port,
                max_response_head: max_head.max(8192) * 4,
            },
            capacity,
        },
        tunnels: Tunnels::new(relay),
        capacity,
        max_head,
        max_response_head: max_head.max(8192) * 4,
        header_read_timeout: args.header_read_timeout,
        keepalive: args.keepalive(),
        connections: TaskTracker::new(),
        stop_accepting: CancellationToken::new(),
        draining: AtomicBool::new(false),
        force_close: CancellationToken::new(),
    }));

    let exit = CancellationToken::new();
    let mut threads = Vec::with_capacity(workers);
    for (i, listener) in listeners.into_iter().enumerate() {
        threads.push(server::spawn_worker(i, listener, shared, exit.clone())?);
    }

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM received"),
        _ = sigint.recv() => tracing::info!("SIGINT received"),
    }

    shared.draining.store(true, Ordering::Relaxed);
    shared.stop_accepting.cancel();
    tracing::info!(
        grace_ms = args.shutdown_grace.as_millis() as u64,
        open_tunnels = shared.tunnels.open(),
        "shutting down: stopped accepting"
    );
    shared.connections.close();
    let drain = async {
        shared.connections.wait().await;
        shared.tunnels.wait_idle().await;
    };
    if tokio::time::timeout(args.shutdown_grace, drain)
        .await
        .is_err()
    {
        tracing::info!(
            open_tunnels = shared.tunnels.open(),
            "grace period over: resetting what is left"
        );
        shared.force_close.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), shared.connections.wait())
            .await;
    }
    shared.tunnels.close_all().await;
    exit.cancel();
    for t in threads {
        let _ = t.join();
    }
    tracing::info!("stopped");
    Ok(())
}
