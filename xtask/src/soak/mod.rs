//! `cargo xtask soak [--minutes N | --quick]`: the real daemon (release binary, default
//! flags) under mixed traffic for a long time, every byte checked, its resources sampled
//! every second; then a report of what ran, what failed (nothing, expected) and whether
//! each sampled quantity ended flat.
//!
//! - `plan`: the phases; `wire`: what clients and upstream agree on;
//! - `upstream`: the upstream app (machine namespace loopback);
//! - `traffic/`: the clients (client namespace), one module per kind;
//! - `daemon`: starting the daemon and tallying its log; `sample`: the sampler thread;
//! - `verdict`: flatness; `report`: Markdown and CSV.
//!
//! Clients and upstream app share one single-threaded runtime (at most one core, paced
//! well below it); the sampler has its own thread.

mod daemon;
mod plan;
mod record;
mod report;
mod sample;
mod traffic;
mod upstream;
mod verdict;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio_util::sync::CancellationToken;

use crate::bench::{procs, results};
use plan::Plan;
use record::Record;
use sample::{Phase, PhaseCell, Sampler};
use tests::Topology;
use traffic::Load;

pub struct Options {
    pub minutes: u32,
    pub quick: bool,
    /// Directory for the report instead of the default.
    pub out: Option<PathBuf>,
}

/// What every part of the run shares.
pub struct Env {
    pub topo: Topology,
    /// The daemon's listener, as the clients reach it across the veth.
    pub daemon_addr: SocketAddr,
    pub record: Record,
    pub upstream: upstream::Gauges,
    pub load: Load,
    /// Cancelled when the run cannot go on (the daemon exited).
    pub abort: CancellationToken,
}

pub fn run(opts: Options) -> Result<()> {
    let plan = if opts.quick {
        Plan::quick()
    } else {
        Plan::minutes(opts.minutes)
    };
    let root = crate::workspace_root();
    let binary = crate::build_daemon()?;
    // The sampler reads the fast path's maps with it.
    crate::bench::install_tools(&["bpftool"]);
    if cfg!(debug_assertions) {
        // The clients check every byte they get: in a debug build that alone would take
        // a core. Run this same command from a release build of xtask.
        crate::run(
            std::process::Command::new(crate::cargo())
                .current_dir(&root)
                .args(["build", "--release", "-p", "xtask"]),
        )?;
        let mut release = std::process::Command::new(root.join("target/release/xtask"));
        release.arg("soak");
        if opts.quick {
            release.arg("--quick");
        } else {
            release.args(["--minutes", &opts.minutes.to_string()]);
        }
        if let Some(out) = &opts.out {
            release.arg("--out").arg(out);
        }
        let status = release.status().context("running the release xtask")?;
        if !status.success() {
            bail!("soak failed ({status})");
        }
        return Ok(());
    }
    let (dir, stem) = match (&opts.out, opts.quick) {
        (Some(dir), _) => (dir.clone(), format!("soak-{}", results::date("+%Y-%m-%d"))),
        (None, true) => (root.join("target/soak-quick"), "soak".to_owned()),
        (None, false) => (
            root.join("bench/results"),
            format!("soak-{}", results::date("+%Y-%m-%d")),
        ),
    };
    std::fs::create_dir_all(&dir)?;
    eprintln!(
        "[soak] {} s in all: {}",
        plan.total().as_secs(),
        plan.describe()
    );
    // Before any thread starts: signals then clean up namespaces and the daemon.
    procs::install_cleanup();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let passed = rt.block_on(soak(&plan, &binary, &dir, &stem, &root))?;
    let report = dir.join(format!("{stem}.md"));
    eprintln!("[soak] report: {}", report.display());
    if !passed {
        bail!("soak failed: see {}", report.display());
    }
    Ok(())
}

/// The whole run; `Ok(passed)` once the report is written.
async fn soak(
    plan: &Plan,
    binary: &std::path::Path,
    dir: &std::path::Path,
    stem: &str,
    root: &std::path::Path,
) -> Result<bool> {
    let started = results::date("+%Y-%m-%d %H:%M UTC");
    let load_start = results::loadavg();
    let topo = Topology::new()?;
    procs::register_cleanup(&[&topo.client.name, &topo.machine.name], &[]);
    let env = Arc::new(Env {
        daemon_addr: traffic::daemon_addr(topo.machine_ip),
        topo,
        record: Record::new(),
        upstream: upstream::Gauges::default(),
        load: Load::standard(),
        abort: CancellationToken::new(),
    });
    upstream::start(&env)?;
    let daemon = Arc::new(
        daemon::Daemon::start(&env.topo, binary)
            .await
            .context("starting the daemon")?,
    );
    let data_path = data_path(&env).await;
    eprintln!(
        "[soak] daemon pid {} serving; data path {data_path}",
        daemon.pid
    );

    let phase = Arc::new(PhaseCell::default());
    let sampler = Sampler::start(env.clone(), daemon.clone(), phase.clone());
    let idle = |length: Duration| {
        let env = env.clone();
        async move {
            tokio::select! {
                _ = tokio::time::sleep(length) => {}
                _ = env.abort.cancelled() => {}
            }
        }
    };
    for (p, length) in [
        (Phase::Baseline, plan.baseline),
        (Phase::WarmUp, plan.warm_up),
        (Phase::Settle, plan.settle),
        (Phase::Load, plan.load),
        (Phase::CoolDown, plan.cool_down),
    ] {
        if env.abort.is_cancelled() {
            break;
        }
        eprintln!(
            "[soak] {:>7.1}s {} for {} s",
            env.record.start.elapsed().as_secs_f64(),
            p.name(),
            length.as_secs()
        );
        phase.set(p);
        match p {
            Phase::WarmUp | Phase::Load => traffic::run_phase(&env, length).await,
            _ => idle(length).await,
        }
    }
    let samples = sampler.finish();
    let mut hard_failures = Vec::new();
    let daemon_exit = if env.abort.is_cancelled() {
        "it had exited during the run".to_owned()
    } else {
        let status = daemon.stop(Duration::from_secs(20)).await;
        if status != "exit status: 0" {
            hard_failures.push(format!(
                "the daemon did not exit cleanly on SIGTERM: {status}"
            ));
        }
        status
    };
    hard_failures.extend(verdict::moved_counters(&samples));
    let counted = requests_counted(&samples);
    let sent = env.record.requests_sent();
    if env.record.total_failures() == 0 && counted.is_some_and(|c| c != sent) {
        hard_failures.push(format!(
            "the daemon's requests_total grew by {} during the run, the clients made {sent} requests",
            counted.unwrap_or(0)
        ));
    }
    let daemon = Arc::into_inner(daemon).context("the sampler still holds the daemon")?;
    let log = daemon.finish_log();
    // Errors are panics, stuck workers and the like; warnings are listed, and their
    // effects (a 502, a reset) are what the clients check.
    if let Some(n) = log.by_level.get("ERROR") {
        hard_failures.push(format!("the daemon logged {n} ERROR lines (listed below)"));
    }
    let judged = report::judge_all(plan, &samples);
    let passed = env.record.total_failures() == 0
        && hard_failures.is_empty()
        && judged
            .iter()
            .all(|(_, j)| j.verdict != verdict::Verdict::Fail);
    let facts = report::Facts {
        plan,
        load: &env.load,
        record: &env.record,
        samples: &samples,
        judged: &judged,
        log: &log,
        daemon_command: daemon::command_line(binary),
        data_path,
        daemon_exit,
        machine: results::machine(),
        commit: commit(root),
        started,
        loadavg: format!(
            "{load_start} at the start, {} at the end",
            results::loadavg()
        ),
        hard_failures: &hard_failures,
        requests: (counted, sent),
        passed,
    };
    std::fs::write(dir.join(format!("{stem}.md")), report::markdown(&facts))?;
    report::write_csv(&dir.join(format!("{stem}.csv")), &samples)?;
    Ok(passed)
}

/// Requests the daemon counted from the first sample (before any traffic) to the last.
fn requests_counted(samples: &[sample::Sample]) -> Option<u64> {
    let at = |s: Option<&sample::Sample>| s?.values.get("m_requests_total").copied();
    Some((at(samples.last())? - at(samples.first())?) as u64)
}

/// The data path the daemon chose and why, from its `build_info` metric.
async fn data_path(env: &Env) -> String {
    let admin = SocketAddr::from(wire::ADMIN_ADDR);
    let Ok((200, text)) = daemon::get(env.topo.machine.connect(admin), "/metrics").await else {
        return "unknown (no /metrics)".into();
    };
    let Some(line) = text.lines().find(|l| l.contains("build_info{")) else {
        return "unknown (no build_info)".into();
    };
    let label = |name: &str| {
        line.split_once(&format!("{name}=\""))
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(v, _)| v.to_owned())
            .unwrap_or_default()
    };
    format!("{} ({})", label("data_path"), label("reason"))
}

/// The workspace's commit, with `-dirty` when the tree has changes.
fn commit(root: &std::path::Path) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    format!(
        "{}{}",
        git(&["rev-parse", "--short", "HEAD"]),
        if dirty { "-dirty" } else { "" }
    )
}
