//! Project tasks: `cargo xtask <command>`. Every command installs what it needs first
//! (idempotently), so each one works on a fresh machine of this kind.

mod bench;
mod ebpf;
mod fuzz;
mod measure;
mod soak;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run, test and benchmark the ingress proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain if missing and build the eBPF object.
    BuildEbpf,
    /// Build the release daemon with the eBPF object embedded; prints the binary's path last.
    Build,
    /// Build and run the daemon: `cargo xtask run -- --listen 127.0.0.1:8080`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests, netns integration tests (as root), fast-path torture
    /// suite (short form), a short run of every fuzz target, the benchmark smoke run and
    /// the quick soak.
    Test {
        /// Skip the `bench --quick` smoke run.
        #[arg(long)]
        no_bench: bool,
        /// Skip the `soak --quick` run (about 60 s).
        #[arg(long)]
        no_soak: bool,
        /// Skip the short fuzz run (20 s per target).
        #[arg(long)]
        no_fuzz: bool,
        /// Extra arguments passed to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
    /// Run the libFuzzer targets of fuzz/ (installs nightly and cargo-fuzz if missing);
    /// corpus, crash inputs and logs under target/fuzz/ (docs/fuzzing.md).
    Fuzz {
        /// Minutes per target.
        #[arg(long, default_value_t = 1.0)]
        minutes: f64,
        /// Run each target for this many inputs instead (the recorded runs: 10000000).
        #[arg(long, conflicts_with = "minutes")]
        runs: Option<u64>,
        /// One target only (target_grammar, header_rewrite, framing_vs_hyper, front_end).
        #[arg(long)]
        target: Option<String>,
        /// cargo-fuzz sanitizer: none (the recorded runs) or address.
        #[arg(long, default_value = "none")]
        sanitizer: String,
    },
    /// The long fast-path torture run (many repetitions of the bulk and close cases).
    Torture,
    /// A fast-path measurement (docs/fastpath.md, "Measured"): `relays` (throughput, RTT
    /// and CPU per relay) or `stalled-memory` (memory per tunnel with stalled readers).
    Measure {
        what: measure::What,
        /// Runs of each stalled-memory case.
        #[arg(long, default_value_t = 1)]
        runs: u32,
    },
    /// Benchmark the daemon against direct, Node http-proxy, nginx and HAProxy; a full run
    /// writes bench/results/.
    Bench {
        /// A small smoke run that only checks every system moved correct bytes; results
        /// under target/bench-quick/ (tracked files untouched).
        #[arg(long)]
        quick: bool,
    },
    /// Issue 8's loopback probe: the CPU and rate of small HTTP requests through the daemon
    /// (default logging and RUST_LOG=warn), nginx and HAProxy; writes
    /// bench/results/http-cost.md.
    HttpCost {
        /// One short round that only checks the probe works; writes under target/bench-quick/.
        #[arg(long)]
        quick: bool,
        /// Rounds; every system runs once per round, interleaved.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds of each `wrk -t2 -c64` run.
        #[arg(long, default_value_t = 8)]
        secs: u32,
        /// Seconds of each `wrk -t1 -c1` latency run.
        #[arg(long, default_value_t = 5)]
        latency_secs: u32,
        /// Daemon binary to measure instead of building this workspace's.
        #[arg(long, env = "HTTP_COST_DAEMON")]
        daemon: Option<PathBuf>,
        /// Extra daemon arguments, whitespace-separated (e.g. "--splice off").
        #[arg(long, env = "HTTP_COST_DAEMON_ARGS", allow_hyphen_values = true)]
        daemon_args: Option<String>,
        /// A second daemon binary measured in the same run with default logging (compare builds).
        #[arg(long, env = "HTTP_COST_BASELINE_DAEMON")]
        baseline_daemon: Option<PathBuf>,
        /// Write the Markdown here instead of bench/results/http-cost.md.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The real daemon (default flags) under mixed traffic for N minutes, every byte
    /// checked, its memory, fds, threads, fast-path map entries and kernel memory sampled
    /// every second; writes bench/results/soak-<date>.md and .csv, and fails if anything
    /// failed or did not end flat.
    Soak {
        /// Minutes of traffic (a tenth of it, at most 3 minutes, is an unjudged warm-up).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
        minutes: u32,
        /// About 60 s, for the test suite: fails on any traffic failure or a live-object
        /// count that does not return; writes under target/soak-quick/.
        #[arg(long, conflicts_with = "minutes")]
        quick: bool,
        /// Write soak-<date>.md and .csv here instead.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::BuildEbpf => {
            let object = ebpf::build_ebpf()?;
            println!("{}", object.display());
        }
        Cmd::Build => {
            let binary = build_daemon()?;
            println!("{}", binary.display());
        }
        Cmd::Run { args } => {
            let binary = build_daemon()?;
            let status = Command::new(&binary).args(&args).status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Test {
            no_bench,
            no_soak,
            no_fuzz,
            cargo_args,
        } => {
            let binary = build_daemon()?;
            // What the integration tests run besides the daemon: namespaces (`ip`), the
            // zero-hop test apps (Python, Node and its `ws` package through npm).
            bench::install_tools(&["ip", "python3", "node", "npm"]);
            cargo_test(&binary, &cargo_args, &[])?;
            if !no_fuzz && cargo_args.is_empty() {
                fuzz::run(&fuzz::Options {
                    targets: fuzz::TARGETS.iter().map(|t| t.to_string()).collect(),
                    budget: fuzz::Budget::Seconds(20),
                    sanitizer: "none".into(),
                })?;
            }
            if !no_bench && cargo_args.is_empty() {
                bench::run(true)?;
            }
            if !no_soak && cargo_args.is_empty() {
                soak::run(soak::Options {
                    minutes: 1,
                    quick: true,
                    out: None,
                })?;
            }
        }
        Cmd::Fuzz {
            minutes,
            runs,
            target,
            sanitizer,
        } => {
            let budget = match runs {
                Some(n) => fuzz::Budget::Runs(n),
                None => fuzz::Budget::Seconds((minutes * 60.0).round().max(1.0) as u64),
            };
            let targets = match target {
                Some(t) => vec![t],
                None => fuzz::TARGETS.iter().map(|t| t.to_string()).collect(),
            };
            fuzz::run(&fuzz::Options {
                targets,
                budget,
                sanitizer,
            })?;
        }
        Cmd::Torture => {
            let binary = build_daemon()?;
            cargo_test(
                &binary,
                &["--test".into(), "fastpath".into()],
                &[("FASTPATH_TORTURE", "1")],
            )?;
        }
        Cmd::Measure { what, runs } => measure::run(what, runs)?,
        Cmd::Bench { quick } => {
            build_daemon()?;
            bench::run(quick)?;
        }
        Cmd::HttpCost {
            quick,
            rounds,
            secs,
            latency_secs,
            daemon,
            daemon_args,
            baseline_daemon,
            out,
        } => {
            let (rounds, secs, latency_secs) = if quick {
                (1, 2, 1)
            } else {
                (rounds.max(1), secs, latency_secs)
            };
            bench::http_cost::run(bench::http_cost::Options {
                quick,
                rounds,
                secs,
                latency_secs,
                daemon,
                daemon_args: daemon_args
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(String::from)
                    .collect(),
                baseline_daemon,
                out,
            })?;
        }
        Cmd::Soak {
            minutes,
            quick,
            out,
        } => soak::run(soak::Options {
            minutes,
            quick,
            out,
        })?,
    }
    Ok(())
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Builds the eBPF object, then the release daemon embedding it.
pub fn build_daemon() -> Result<PathBuf> {
    let object = ebpf::build_ebpf().context("building the eBPF object")?;
    let root = workspace_root();
    run(Command::new(cargo())
        .current_dir(&root)
        .args(["build", "--release", "-p", "proxy-daemon"])
        .env("PROXY_EBPF_OBJECT", &object))?;
    let binary = root.join("target/release/project-ingress-proxy");
    if !binary.exists() {
        bail!("{} missing after the build", binary.display());
    }
    Ok(binary)
}

fn cargo_test(binary: &Path, extra: &[String], env: &[(&str, &str)]) -> Result<()> {
    let root = workspace_root();
    let mut cmd = Command::new(cargo());
    cmd.current_dir(&root)
        .args(["test", "--release", "--workspace"])
        // The whole suite reports every failing test binary, not only the first.
        .args(extra.is_empty().then_some("--no-fail-fast"))
        .args(extra)
        .env("PROJECT_INGRESS_PROXY_BIN", binary)
        .envs(env.iter().copied());
    run(&mut cmd)
}

pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
