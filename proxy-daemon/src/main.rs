use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use proxy_daemon::config::{Args, SpliceMode, UserspaceRelay};
use proxy_daemon::logging;
use proxy_daemon::proxy::Proxy;
use proxy_daemon::server::{self, ServerSettings};
use proxy_daemon::tunnel::{ebpf, Relay, Tunnels};
use proxy_daemon::upstream::{UpstreamSettings, Upstreams};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    logging::init(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = runtime.block_on(run(args));
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "exiting");
    }
    result
}

async fn run(args: Args) -> anyhow::Result<()> {
    let secret = args.secret()?;
    let userspace = match args.userspace_relay {
        UserspaceRelay::Splice => Relay::Splice,
        UserspaceRelay::Copy => Relay::Copy,
    };
    let relay = match args.splice {
        SpliceMode::Off => userspace,
        SpliceMode::Ebpf => Relay::Ebpf(Arc::new(
            ebpf::Splicer::load(args.ebpf_settings())
                .context("--splice ebpf: the in-kernel fast path cannot start")?,
        )),
        // Evidence (docs/fastpath.md, one run on the netns topology): the kernel path
        // wins small messages (about 25% lower round-trip time and 30% less machine
        // CPU per round trip than either userspace relay) and a bulk direction leaves
        // it after its 2 MiB budget for splice(2), which wins bulk throughput here.
        SpliceMode::Auto => match ebpf::Splicer::load(args.ebpf_settings()) {
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
    };
    if let Some(splicer) = relay.splicer() {
        let s = &splicer.settings;
        tracing::info!(
            budget_per_direction = s.budget,
            memory_limit = s.memory_limit,
            max_sockets = s.max_sockets,
            "in-kernel fast path loaded"
        );
    }
    let splicer = relay.splicer().cloned();
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        data_path = relay.name(),
        splice = ?args.splice,
        secret_auth = secret.is_some(),
        "project-ingress-proxy started"
    );

    let max_header_bytes = args.max_header_bytes as usize;
    let upstreams = Upstreams::new(UpstreamSettings {
        connect_timeout: args.upstream_connect_timeout,
        idle_timeout: args.upstream_idle_timeout,
        max_idle_per_port: args.upstream_max_idle_per_port,
        max_header_bytes,
    });
    let proxy = Arc::new(Proxy {
        upstreams,
        secret,
        tunnels: Tunnels::new(relay),
    });
    let settings = ServerSettings {
        max_header_bytes,
        header_read_timeout: args.header_read_timeout,
        shutdown_grace: args.shutdown_grace,
    };
    let tunnels = proxy.tunnels.clone();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM received"),
            _ = sigint.recv() => tracing::info!("SIGINT received"),
        }
    };
    // Without the task that takes directions out of the kernel, a direction over budget
    // would stay there for good: stop, and let the supervisor restart the daemon.
    let fast_path_failed = async {
        match &splicer {
            Some(s) => s.failed().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = server::serve(listener, proxy, settings, shutdown) => {}
        reason = fast_path_failed => {
            // Reset every tunnel (each logs its closing line) so that no peer takes the
            // exit for the clean end of its stream.
            let _ = tokio::time::timeout(Duration::from_secs(5), tunnels.close_all()).await;
            anyhow::bail!("the in-kernel fast path stopped handing directions over ({reason})");
        }
    }
    tracing::info!("stopped");
    Ok(())
}
