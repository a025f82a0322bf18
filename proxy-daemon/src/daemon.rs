//! Start-up and shutdown: limits, the tunnel data path, the listening sockets, the worker
//! threads; then SIGTERM/SIGINT → stop accepting, drain within the grace period, reset
//! what is left, exit.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwapOption;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::admission::Admission;
use crate::config::{Args, Command, SpliceMode, UserspaceRelay, ZeroHopMode};
use crate::forward::upstream::ConnectSettings;
use crate::forward::{ForwardSettings, Forwarder};
use crate::limits::{self, Capacity};
use crate::metrics;
use crate::server::{self, Shared};
use crate::takeover;
use crate::tunnel::{ebpf, zero_hop, Relay, Tunnels};

pub fn run(args: Args) -> anyhow::Result<()> {
    // The main thread runs signals, the admin interface and the fast path's event
    // readers; workers do traffic.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the main runtime")?;
    match args.command {
        Some(Command::Check) => runtime.block_on(check(args)),
        None => runtime.block_on(serve(args)),
    }
}

/// The tunnel data path and why it was chosen.
struct DataPath {
    relay: Relay,
    reason: String,
}

fn choose_relay(args: &Args) -> anyhow::Result<DataPath> {
    let userspace = match args.userspace_relay {
        UserspaceRelay::Splice => Relay::Splice,
        UserspaceRelay::Copy => Relay::Copy,
    };
    Ok(match args.splice {
        SpliceMode::Off => DataPath {
            relay: userspace,
            reason: "--splice off".into(),
        },
        SpliceMode::Ebpf => DataPath {
            relay: Relay::Ebpf(Arc::new(
                ebpf::Splicer::load(args.ebpf_settings())
                    .context("--splice ebpf: the in-kernel fast path cannot start")?,
            )),
            reason: "--splice ebpf".into(),
        },
        // Evidence (docs/fastpath.md, one run on the netns topology): the kernel path
        // wins small messages (about 25% lower round-trip time and 30% less machine
        // CPU per round trip than either userspace relay) and a bulk direction leaves
        // it after its 2 MiB budget for splice(2), which wins bulk throughput here.
        SpliceMode::Auto => match ebpf::Splicer::load(args.ebpf_settings()) {
            Ok(splicer) => DataPath {
                relay: Relay::Ebpf(Arc::new(splicer)),
                reason: "auto: the fast path loaded (it wins small messages; bulk directions move to splice(2) past their budget)".into(),
            },
            Err(e) => {
                let reason = format!("auto: the fast path cannot load: {e:#}");
                tracing::warn!(
                    error = format!("{e:#}"),
                    fallback = userspace.name(),
                    "in-kernel fast path unavailable, tunnels use the userspace relay"
                );
                DataPath {
                    relay: userspace,
                    reason,
                }
            }
        },
    })
}

/// Zero-hop (docs/zero-hop.md), and why it is on or off.
fn choose_zero_hop(
    mode: ZeroHopMode,
    listen_port: u16,
) -> anyhow::Result<(Option<Arc<zero_hop::ZeroHop>>, String)> {
    Ok(match mode {
        ZeroHopMode::Off => (None, "--zero-hop off".into()),
        ZeroHopMode::On => {
            let zh = zero_hop::ZeroHop::load(listen_port)
                .context("--zero-hop on: the zero-hop programs cannot start")?;
            let reason = format!(
                "--zero-hop on (capture attached to {})",
                zh.cgroup().display()
            );
            (Some(Arc::new(zh)), reason)
        }
        ZeroHopMode::Auto if !zero_hop::AUTO => (None, zero_hop::AUTO_REASON.into()),
        ZeroHopMode::Auto => match zero_hop::ZeroHop::load(listen_port) {
            Ok(zh) => (Some(Arc::new(zh)), "auto: zero-hop loaded".into()),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "zero-hop unavailable, tunnels keep the relay"
                );
                (None, format!("auto: zero-hop unavailable ({e:#})"))
            }
        },
    })
}

/// `project-ingress-proxy check`: the configuration and what `auto` would choose.
async fn check(args: Args) -> anyhow::Result<()> {
    let mut ok = true;
    match args.secret() {
        Ok(Some(_)) => println!("secret: set (every non-health request must carry it)"),
        Ok(None) => println!("secret: not set (no authentication)"),
        Err(e) => {
            println!("secret: ERROR {e:#}");
            ok = false;
        }
    }
    if let Some(path) = &args.log_level_file {
        match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                tracing_subscriber::EnvFilter::try_new(t.trim()).map_err(|e| e.to_string())
            }) {
            Ok(f) => println!("log level file: {} ({f})", path.display()),
            Err(e) => {
                println!("log level file: ERROR {}: {e}", path.display());
                ok = false;
            }
        }
    }
    match limits::raise_nofile() {
        Ok(f) => println!(
            "open files: soft {} (raised from {}), hard {}",
            f.soft, f.soft_before, f.hard
        ),
        Err(e) => println!("open files: cannot read the limit: {e}"),
    }
    println!(
        "listen: {} with {} worker(s)",
        args.listen,
        args.worker_count()
    );
    match args.admin_listen.0 {
        Some(a) => println!("admin: {a}"),
        None => println!("admin: off"),
    }
    let userspace = match args.userspace_relay {
        UserspaceRelay::Splice => Relay::Splice,
        UserspaceRelay::Copy => Relay::Copy,
    };
    match ebpf::Splicer::load(args.ebpf_settings()) {
        Ok(_) => {
            println!("in-kernel fast path: loads");
            println!("--splice auto chooses: ebpf (it wins small messages; bulk directions move to splice(2) past their budget, docs/fastpath.md)");
        }
        Err(e) => {
            println!("in-kernel fast path: cannot load: {e:#}");
            println!(
                "--splice auto chooses: {} (the userspace relay)",
                userspace.name()
            );
            if args.splice == SpliceMode::Ebpf {
                println!("--splice ebpf: ERROR the daemon would exit at start-up");
                ok = false;
            }
        }
    }
    let configured = match args.splice {
        SpliceMode::Auto => "auto",
        SpliceMode::Ebpf => "ebpf",
        SpliceMode::Off => "off (the userspace relay whatever the kernel allows)",
    };
    println!("--splice configured: {configured}");
    // Zero-hop: whether its programs load and attach here, and what `auto` chooses.
    match zero_hop::ZeroHop::load(args.listen.port()) {
        Ok(zh) => println!(
            "zero-hop: loads (capture program attaches to cgroup {})",
            zh.cgroup().display()
        ),
        Err(e) => {
            println!("zero-hop: cannot load: {e:#}");
            if args.zero_hop == ZeroHopMode::On {
                println!("--zero-hop on: ERROR the daemon would exit at start-up");
                ok = false;
            }
        }
    }
    if zero_hop::AUTO {
        println!("--zero-hop auto chooses: on where it loads");
    } else {
        // "auto: off, <why>"
        println!("--zero-hop {}", zero_hop::AUTO_REASON);
    }
    println!("--zero-hop {:?} configured", args.zero_hop);
    println!(
        "{}",
        if ok {
            "configuration OK"
        } else {
            "configuration NOT usable"
        }
    );
    if ok {
        Ok(())
    } else {
        anyhow::bail!("configuration not usable")
    }
}

/// Gives back to the kernel what start-up freed: loading the eBPF objects parses and
/// relocates them in about 17 MiB of buffers, which glibc would otherwise keep for the
/// process's life (RSS 23.4 MiB before, 10.4 MiB after, with the fast path loaded).
fn release_start_up_memory() {
    // SAFETY: malloc_trim only releases free memory; it has no preconditions.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let files = limits::raise_nofile().context("reading the open-file limit")?;
    let secret = args.secret()?;

    // The sockets: inherited from the running daemon (takeover), or new.
    let mut inherited = None;
    let take_over = args.takeover
        || (args.takeover_if_running
            && takeover::answers(
                args.control_socket
                    .as_deref()
                    .expect("clap: --takeover-if-running requires it"),
            )
            .await);
    let (listeners, admin) = if take_over {
        let path = args
            .control_socket
            .as_deref()
            .expect("clap: --takeover requires it");
        let got = takeover::connect(path).await?;
        let listeners = got.listeners;
        let admin = got.admin;
        inherited = Some((got.fast_path, got.channel));
        (listeners, admin)
    } else {
        let admin = match args.admin_listen.0 {
            Some(addr) => Some(
                std::net::TcpListener::bind(addr)
                    .with_context(|| format!("admin interface: listening on {addr}"))?,
            ),
            None => None,
        };
        (server::bind(args.listen, args.worker_count())?, admin)
    };
    let (inherited_maps, handover_channel) = match inherited {
        Some((maps, channel)) => (maps, Some(channel)),
        None => (None, None),
    };
    let DataPath { relay, reason } = match inherited_maps {
        Some(fast_path) => DataPath {
            relay: Relay::Ebpf(Arc::new(
                ebpf::Splicer::adopt(fast_path.maps, fast_path.settings, &fast_path.used_slots)
                    .context("--takeover: adopting the fast path's maps")?,
            )),
            reason: "inherited from the daemon taken over".into(),
        },
        None => choose_relay(&args)?,
    };
    // Kept for the next takeover: the listening sockets never close while serving.
    let listener_fds: Vec<OwnedFd> = listeners
        .iter()
        .map(|l| l.try_clone().map(OwnedFd::from))
        .collect::<std::io::Result<_>>()?;
    let admin_fd = admin
        .as_ref()
        .map(|l| l.try_clone().map(OwnedFd::from))
        .transpose()?;
    let workers = listeners.len();
    let listen: SocketAddr = listeners[0].local_addr()?;
    let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;
    let control = match &args.control_socket {
        Some(path) => Some(takeover::bind(path, take_over).await?),
        None => None,
    };
    let (zero_hop, zero_hop_reason) = choose_zero_hop(args.zero_hop, listen.port())?;
    release_start_up_memory();
    let capacity = Capacity::new(files.soft);
    capacity.install();
    tracing::info!(
        pid = std::process::id(),
        listen = %listen,
        admin = %admin_addr.map_or("off".to_owned(), |a| a.to_string()),
        workers,
        took_over = take_over,
        data_path = relay.name(),
        data_path_reason = %reason,
        splice = ?args.splice,
        zero_hop = zero_hop.as_ref().map(|z| z.cgroup().display().to_string()),
        zero_hop_reason = %zero_hop_reason,
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
    let mut own_ports = vec![listen.port()];
    own_ports.extend(admin_addr.map(|a| a.port()));
    let data_path = relay.name();
    let shared: &'static Shared = Box::leak(Box::new(Shared {
        admission: Admission {
            secret: ArcSwapOption::new(secret.map(Arc::new)),
            own_ports,
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
            zero_hop: zero_hop.clone(),
        },
        tunnels: Tunnels::new(relay, zero_hop),
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
    metrics::add_source(shared.tunnels.clone());
    metrics::add_source(DaemonMetrics {
        shared,
        files,
        data_path,
        reason,
    });

    let exit = CancellationToken::new();
    let mut threads = Vec::with_capacity(workers);
    let mut worker_loops = Vec::with_capacity(workers);
    for (i, listener) in listeners.into_iter().enumerate() {
        let (thread, event_loop) = server::spawn_worker(i, listener, shared, exit.clone())?;
        threads.push(thread);
        worker_loops.push(event_loop);
    }
    let admin_task = match admin {
        Some(admin) => {
            admin.set_nonblocking(true)?;
            let admin = tokio::net::TcpListener::from_std(admin)?;
            Some(tokio::spawn(crate::admin::serve(admin, &shared.tunnels)))
        }
        None => None,
    };
    if let Some(channel) = handover_channel {
        // The tunnels of the daemon taken over arrive now; it exits after `Done`.
        tokio::spawn(async move {
            match shared
                .tunnels
                .adopt_all(channel, shared.capacity, worker_loops)
                .await
            {
                Ok(n) => tracing::info!(
                    tunnels = n,
                    "takeover complete: the previous daemon is done"
                ),
                Err(e) => tracing::error!(error = %e, "takeover: receiving tunnels failed"),
            }
        });
    }
    admin::READY.store(true, Ordering::Relaxed);
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::MainPid(std::process::id()),
    ]);
    if let Some(period) = sd_notify::watchdog_enabled() {
        tokio::spawn(watchdog(period));
    }

    let splicer = shared.tunnels.relay().splicer().cloned();
    if let Some(splicer) = &splicer {
        let s = &splicer.settings;
        tracing::info!(
            budget_per_direction = s.budget,
            memory_limit = s.memory_limit,
            max_sockets = s.max_sockets,
            "in-kernel fast path loaded"
        );
    }
    // Without the thread that takes directions out of the kernel, a direction over
    // budget would stay there for good: stop, and let the supervisor restart the daemon.
    let fast_path_failed = async {
        match &splicer {
            Some(s) => s.failed().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(fast_path_failed);

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigusr2 = signal(SignalKind::user_defined2())?;
    let mut successor = None;
    loop {
        tokio::select! {
            reason = &mut fast_path_failed => {
                // Reset every tunnel (each logs its closing line) so that no peer takes
                // the exit for the clean end of its stream.
                admin::READY.store(false, Ordering::Relaxed);
                let _ = tokio::time::timeout(Duration::from_secs(5), shared.tunnels.close_all()).await;
                // The workers hand their last log lines (those closing lines) over as
                // they stop: stop them before the process exits.
                shared.stop_accepting.cancel();
                exit.cancel();
                for t in threads {
                    let _ = t.join();
                }
                anyhow::bail!("the in-kernel fast path stopped handing directions over ({reason})");
            }
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM received");
                break;
            }
            _ = sigint.recv() => {
                tracing::info!("SIGINT received");
                break;
            }
            _ = sighup.recv() => reload(&args, shared),
            _ = sigusr2.recv() => start_successor(&args),
            accepted = async { takeover::accept(control.as_ref().unwrap()).await }, if control.is_some() => {
                match accepted {
                    Ok((channel, _pid)) => {
                        successor = Some(channel);
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "control socket: accept failed"),
                }
            }
        }
    }

    admin::READY.store(false, Ordering::Relaxed);
    let mut handover = None;
    if let Some(channel) = successor {
        // Hand over: the sockets first (they never close, so nothing is refused), then
        // the maps and every tunnel (new ones go straight on), then stop accepting here.
        drop(control);
        takeover::send_sockets(&channel, &listener_fds, admin_fd.as_ref()).await?;
        handover = Some(shared.tunnels.hand_over(channel).await);
        if let Some(task) = admin_task {
            task.abort();
        }
    } else {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }
    let handing_over = handover.is_some();
    drop(listener_fds);
    drop(admin_fd);
    shared.draining.store(true, Ordering::Relaxed);
    shared.stop_accepting.cancel();
    tracing::info!(
        grace_ms = args.shutdown_grace.as_millis() as u64,
        open_tunnels = shared.tunnels.open(),
        handing_over,
        "shutting down: stopped accepting"
    );
    shared.connections.close();
    // Draining: in-flight requests finish within the grace period; during a takeover
    // every tunnel moves on at once (a tunnel a draining request opens follows).
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
        let _ = tokio::time::timeout(Duration::from_secs(2), shared.connections.wait()).await;
    }
    let handed_over = match handover {
        Some(handover) => Some(shared.tunnels.finish_hand_over(handover).await),
        None => None,
    };
    shared.tunnels.close_all().await;
    exit.cancel();
    for t in threads {
        let _ = t.join();
    }
    tracing::info!(handed_over = handing_over, "stopped");
    if let Some(Err(e)) = handed_over {
        anyhow::bail!("the takeover failed: {e}");
    }
    Ok(())
}

/// SIGUSR2: a binary upgrade with takeover. Starts the program this daemon was started
/// as (`argv[0]`: a new binary installed at that path) with the same arguments plus
/// `--takeover`; it takes everything over and this process exits 0. If it cannot
/// start, this one keeps serving.
fn start_successor(args: &Args) {
    if args.control_socket.is_none() {
        tracing::error!("SIGUSR2: a binary upgrade with takeover needs --control-socket");
        return;
    }
    let mut argv = std::env::args_os();
    let Some(program) = argv.next() else {
        return;
    };
    let rest: Vec<std::ffi::OsString> = argv
        .filter(|a| a != "--takeover" && a != "--takeover-if-running")
        .collect();
    let mut command = tokio::process::Command::new(&program);
    command.args(rest).arg("--takeover");
    match command.spawn() {
        Ok(mut child) => {
            tracing::info!(
                program = %program.to_string_lossy(),
                successor_pid = child.id(),
                "SIGUSR2: successor started, handing over to it"
            );
            tokio::spawn(async move {
                if let Ok(status) = child.wait().await {
                    if !status.success() {
                        tracing::error!(%status, "SIGUSR2: the successor exited");
                    }
                }
            });
        }
        Err(e) => tracing::error!(
            program = %program.to_string_lossy(),
            error = %e,
            "SIGUSR2: cannot start the successor; still serving"
        ),
    }
}

/// SIGHUP: the secret file and the log level are read again; nothing in flight changes.
fn reload(args: &Args, shared: &Shared) {
    tracing::info!("SIGHUP received: reloading");
    crate::logging::reload_level();
    if args.secret_file.is_none() {
        tracing::info!("no --secret-file: secret unchanged");
        return;
    }
    match args.secret() {
        Ok(secret) => {
            let on = secret.is_some();
            shared.admission.secret.store(secret.map(Arc::new));
            tracing::info!(secret_auth = on, "secret reloaded");
        }
        Err(e) => tracing::error!(
            error = format!("{e:#}"),
            "secret not reloaded: keeping the current one"
        ),
    }
}

/// systemd's watchdog: pinged at half its period while every worker's event loop still
/// ticks (each ticks once a second); a worker stuck for 3 s stops the pings, and systemd
/// restarts the service.
async fn watchdog(period: Duration) {
    let mut tick = tokio::time::interval((period / 2).min(Duration::from_secs(1)));
    let mut last = metrics::heartbeats();
    let mut progressed = vec![tokio::time::Instant::now(); last.len()];
    loop {
        tick.tick().await;
        let now = metrics::heartbeats();
        // Workers register as they start: a new one counts as alive.
        progressed.resize(now.len(), tokio::time::Instant::now());
        last.resize(now.len(), 0);
        for (i, (n, l)) in now.iter().zip(&last).enumerate() {
            if n > l {
                progressed[i] = tokio::time::Instant::now();
            }
        }
        last = now;
        if progressed
            .iter()
            .all(|t| t.elapsed() < Duration::from_secs(3))
        {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        } else {
            tracing::error!("a worker's event loop is stuck: not pinging the systemd watchdog");
        }
    }
}

/// The daemon's own gauges, read at scrape time.
struct DaemonMetrics {
    shared: &'static Shared,
    files: limits::FileLimits,
    data_path: &'static str,
    reason: String,
}

impl metrics::Source for DaemonMetrics {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.shared;
        metrics::gauge(
            encoder,
            "client_connections",
            "Open client connections (HTTP; tunnels are counted apart)",
            s.connections.len() as i64,
        )?;
        metrics::gauge(
            encoder,
            "open_fds",
            "File descriptors the process has open",
            open_fds() as i64,
        )?;
        metrics::gauge(
            encoder,
            "resident_memory_bytes",
            "The process's resident memory (VmRSS)",
            resident_bytes() as i64,
        )?;
        metrics::gauge(
            encoder,
            "open_fds_limit",
            "The process's open-file limit (soft, after raising it to the hard one)",
            self.files.soft as i64,
        )?;
        metrics::gauge(
            encoder,
            "capacity_fds_in_use",
            "Descriptors held for traffic (sockets, splice pipes)",
            s.capacity.in_use() as i64,
        )?;
        metrics::gauge(
            encoder,
            "capacity_fds_limit",
            "Descriptors allowed for traffic before new requests get 503 over_capacity",
            s.capacity.limit() as i64,
        )?;
        metrics::gauge(
            encoder,
            "ready",
            "1 while serving, 0 while draining or handing over",
            i64::from(admin::READY.load(Ordering::Relaxed)),
        )?;
        metrics::counter(
            encoder,
            "log_lines_dropped",
            "Log lines dropped because the log reader did not keep up",
            crate::logging::dropped_lines(),
        )?;
        let labels = [
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("data_path", self.data_path.to_owned()),
            ("reason", self.reason.clone()),
        ];
        encoder
            .encode_descriptor(
                "build",
                "Build and start-up facts: version, tunnel data path chosen and why",
                None,
                MetricType::Info,
            )?
            .encode_info(&labels)
    }
}

fn resident_bytes() -> u64 {
    // statm: size resident shared … in pages.
    let pages: u64 = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}
