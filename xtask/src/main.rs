//! Project tasks: `cargo xtask <command>`. Every command installs what it needs first
//! (idempotently), so each one works on a fresh machine of this kind.

mod bench;
mod ebpf;

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
    /// suite (short form) and the benchmark smoke run.
    Test {
        /// Skip the `bench --quick` smoke run.
        #[arg(long)]
        no_bench: bool,
        /// Extra arguments passed to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
    /// The long fast-path torture run (many repetitions of the bulk and close cases).
    Torture,
    /// Benchmark the daemon against direct, Node http-proxy, nginx and HAProxy; a full run
    /// writes bench/results/.
    Bench {
        /// A small smoke run that only checks every system moved correct bytes; results
        /// under target/bench-quick/ (tracked files untouched).
        #[arg(long)]
        quick: bool,
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
            cargo_args,
        } => {
            let binary = build_daemon()?;
            cargo_test(&binary, &cargo_args, &[])?;
            if !no_bench && cargo_args.is_empty() {
                bench::run(true)?;
            }
        }
        Cmd::Torture => {
            let binary = build_daemon()?;
            cargo_test(
                &binary,
                &["--test".into(), "fastpath".into()],
                &[("FASTPATH_TORTURE", "1")],
            )?;
        }
        Cmd::Bench { quick } => {
            build_daemon()?;
            bench::run(quick)?;
        }
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
        .args(extra)
        .env("PROJECT_INGRESS_PROXY_BIN", binary)
        .envs(env.iter().copied());
    run(&mut cmd)
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
