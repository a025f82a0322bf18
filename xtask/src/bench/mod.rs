//! `cargo xtask bench [--quick]`: the daemon against its peers, side by side, in one run
//! (SPEC §6). Client in its own network namespace, proxy and upstream in the machine
//! namespace, joined by veth. Every transfer is checked byte by byte; a system that
//! corrupts or drops data is marked FAILED. `--quick` is a smoke run for the test suite:
//! small sizes, results under `target/bench-quick/`, and it fails if any system moved
//! wrong bytes or could not run; it never asserts a speed.
//!
//! This file only orchestrates: for each system, start the upstream app and the proxy,
//! run every scenario (`scenarios/`, one file each) that the system takes part in, and
//! collect the rows. `http_cost` is the separate loopback probe of issue 8.

mod context;
pub mod http_cost;
mod measure;
pub(crate) mod procs;
mod report;
pub(crate) mod results;
mod scenarios;
mod systems;
mod wrk;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tests::Topology;

use context::Ctx;
use procs::Proc;
use report::{Row, Table};
use scenarios::{warm_up::WarmUp, Part, Scenario};
use systems::System;

fn root() -> PathBuf {
    if let Some(dir) = std::env::var_os("XTASK_BENCH_ROOT") {
        return dir.into();
    }
    crate::workspace_root()
}

/// A scenario and the tables it fills, row by row, as systems run.
struct Entry {
    scenario: Box<dyn Scenario>,
    tables: Vec<Table>,
}

pub fn run(quick: bool) -> Result<()> {
    let started = Instant::now();
    let root = root();
    build(&root)?;
    procs::install_cleanup();
    let paths = systems::Paths {
        root: root.clone(),
        daemon: root.join("target/release/project-ingress-proxy"),
    };
    let tool = root.join("target/release/bench_tool");
    let tmp = tests::daemon::TempDir::new()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let load_start = results::loadavg();
    let topo = Topology::new()?;
    procs::register_cleanup(&[&topo.client.name, &topo.machine.name], &[&tmp.0]);
    let ctx = Ctx::new(quick, &topo, &tool, &tmp.0, &rt);
    let warm_up = WarmUp::new(quick);
    // Partial runs (to look at one thing): XTASK_BENCH_SYSTEMS and XTASK_BENCH_SCENARIOS,
    // comma-separated substrings of system names and of scenario descriptions. Their
    // results go under target/bench-partial/, never to bench/results/.
    let only = |var: &str| -> Option<Vec<String>> {
        std::env::var(var).ok().map(|v| {
            v.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        })
    };
    let (only_systems, only_scenarios) =
        (only("XTASK_BENCH_SYSTEMS"), only("XTASK_BENCH_SCENARIOS"));
    let partial = only_systems.is_some() || only_scenarios.is_some();
    let mut entries: Vec<Entry> = scenarios::all(quick)
        .into_iter()
        .filter(|s| {
            only_scenarios
                .as_ref()
                .is_none_or(|o| o.iter().any(|w| s.describe().contains(w.as_str())))
        })
        .map(|scenario| Entry {
            tables: scenario.tables(),
            scenario,
        })
        .collect();
    for sys in systems::ALL.iter().copied().filter(|s| {
        only_systems
            .as_ref()
            .is_none_or(|o| o.iter().any(|w| s.name() == w.as_str()))
    }) {
        eprintln!(
            "[bench] {} ({:.0}s elapsed)",
            sys.name(),
            started.elapsed().as_secs_f64()
        );
        run_system(&ctx, sys, &paths, &warm_up, &mut entries)?;
    }
    drop(topo);
    let load = format!("{load_start} at start, {} at the end", results::loadavg());
    let mut parameters: Vec<String> = entries.iter().map(|e| e.scenario.describe()).collect();
    parameters.push(warm_up.describe());
    let tables: Vec<Table> = entries.into_iter().flat_map(|e| e.tables).collect();
    let out = results::write(
        &root,
        &if partial {
            root.join("target/bench-partial")
        } else {
            results::out_dir(&root, quick)
        },
        &results::Summary {
            quick,
            parameters: &parameters,
            tables: &tables,
            took: started.elapsed(),
            load: &load,
        },
    )?;
    eprintln!("[bench] results in {}", out.display());
    if quick {
        let bad: Vec<String> = tables
            .iter()
            .flat_map(|t| {
                t.rows.iter().filter_map(move |(s, r)| match r {
                    Row::Failed(why) | Row::Unavailable(why) => {
                        Some(format!("{} / {s}: {why}", t.title))
                    }
                    _ => None,
                })
            })
            .collect();
        if !bad.is_empty() {
            bail!(
                "bench --quick: systems that did not move correct bytes:\n{}",
                bad.join("\n")
            );
        }
    }
    Ok(())
}

/// Runs every scenario `sys` takes part in: scenarios that need a fresh proxy per table
/// first, then the others in results order on one proxy process (restarted after a
/// transfer that timed out, which may have wedged it).
fn run_system(
    ctx: &Ctx,
    sys: System,
    paths: &systems::Paths,
    warm_up: &WarmUp,
    entries: &mut [Entry],
) -> Result<()> {
    ctx.set_strikes(0);
    let _upstream = start_upstream(ctx)?;
    let start = || systems::start(ctx.rt, ctx.topo, sys, paths, ctx.dir);
    let runs = |e: &Entry| matches!(e.scenario.part(sys), Part::Runs);
    for e in entries.iter_mut() {
        if let Part::NotApplicable(why) = e.scenario.part(sys) {
            for t in &mut e.tables {
                t.set(sys.name(), Row::NotApplicable(why.into()));
            }
        }
    }
    for k in 0..entries.len() {
        if !(runs(&entries[k]) && entries[k].scenario.fresh_proxy()) {
            continue;
        }
        for i in 0..entries[k].tables.len() {
            let proxy = match start() {
                Ok(proxy) => proxy,
                Err(err) => return unavailable(sys, err, entries),
            };
            let row = entries[k].scenario.run(ctx, sys, proxy.as_ref(), i);
            entries[k].tables[i].set(sys.name(), row);
        }
    }
    let mut proxy = match start() {
        Ok(proxy) => proxy,
        Err(err) => return unavailable(sys, err, entries),
    };
    let restart_if_struck = |proxy: &mut Option<Proc>, seen: u32| {
        if ctx.strikes() > seen {
            eprintln!(
                "[bench] {}: restarting after a timed-out transfer",
                sys.name()
            );
            drop(proxy.take());
            *proxy = start().unwrap_or(None);
        }
    };
    let mut warmed = false;
    for e in entries
        .iter_mut()
        .filter(|e| runs(e) && !e.scenario.fresh_proxy())
    {
        if e.scenario.bulk() && !warmed {
            // Its time-outs do not count against the system.
            let seen = ctx.strikes();
            warm_up.run(ctx, sys);
            restart_if_struck(&mut proxy, seen);
            ctx.set_strikes(seen);
            warmed = true;
        }
        for i in 0..e.tables.len() {
            let seen = ctx.strikes();
            let row = e.scenario.run(ctx, sys, proxy.as_ref(), i);
            e.tables[i].set(sys.name(), row);
            restart_if_struck(&mut proxy, seen);
        }
    }
    Ok(())
}

/// A fresh upstream app per system, listening on all its ports.
fn start_upstream(ctx: &Ctx) -> Result<Proc> {
    let mut cmd = ctx.topo.machine.command(ctx.tool.to_str().unwrap());
    cmd.arg("upstream")
        .args(systems::upstream_ports().map(|p| p.to_string()));
    let upstream = Proc::spawn("upstream", cmd, &ctx.dir.join("upstream.log"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in systems::upstream_ports() {
        let addr = std::net::SocketAddr::new(ctx.topo.machine_ip, port);
        while ctx.rt.block_on(ctx.topo.client.connect(addr)).is_err() {
            if Instant::now() > deadline {
                bail!("the upstream app did not start on port {port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(upstream)
}

/// `sys` did not start: every table it takes part in says so.
fn unavailable(sys: System, e: anyhow::Error, entries: &mut [Entry]) -> Result<()> {
    let why = format!("{e:#}");
    let why: String = why.chars().take(160).collect();
    eprintln!("[bench] {} unavailable: {why}", sys.name());
    let row = if matches!(sys, System::DaemonEbpf | System::DaemonZeroHop) {
        Row::Unavailable(format!("did not start: {why}"))
    } else {
        Row::Failed(format!("did not start: {why}"))
    };
    for e in entries.iter_mut() {
        if matches!(e.scenario.part(sys), Part::Runs) {
            for t in &mut e.tables {
                t.set(sys.name(), row.clone());
            }
        }
    }
    Ok(())
}

fn build(root: &Path) -> Result<()> {
    for args in [
        &["build", "--release", "-p", "proxy-daemon"][..],
        &["build", "--release", "-p", "tests", "--bin", "bench_tool"][..],
    ] {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(args)
            .current_dir(root)
            .status()
            .context("running cargo")?;
        if !status.success() {
            bail!("cargo {} failed", args.join(" "));
        }
    }
    install_tools(&["wrk", "nginx", "haproxy", "node"]);
    if !root.join("bench/node/node_modules/http-proxy").exists() {
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent"])
            .current_dir(root.join("bench/node"))
            .status()
            .context("running npm")?;
        if !status.success() {
            bail!("npm install in bench/node failed");
        }
    }
    Ok(())
}

/// apt-installs the tools that are missing (best effort: a missing peer shows as FAILED).
pub(crate) fn install_tools(tools: &[&str]) {
    for tool in tools {
        if which(tool).is_none() {
            eprintln!("[xtask] installing {tool}");
            let pkg = match *tool {
                "node" => "nodejs",
                "ip" => "iproute2",
                other => other,
            };
            let _ = Command::new("apt-get")
                .args(["install", "-y", "-q", pkg])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
        }
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
}
