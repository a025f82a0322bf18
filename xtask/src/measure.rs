//! `cargo xtask measure relays|stalled-memory`: the fast-path measurements on the tunnel
//! harness (`tests/src/fastpath/`), one run each, figures on stderr (`MEASURE ...` lines,
//! quoted in docs/fastpath.md). Builds the daemon and `tests/src/bin/fastpath_measure.rs`,
//! then runs the latter as this user (root: it builds namespaces and loads eBPF).

use std::process::Command;

use anyhow::Result;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum What {
    /// Throughput, small-message RTT and machine CPU per GB of each relay (ebpf with
    /// three budgets, splice(2), copy), 4 GiB per bulk case.
    Relays,
    /// Memory per tunnel with stalled readers (64 and 256 tunnels), fast path vs copy.
    StalledMemory,
}

pub fn run(what: What, runs: u32) -> Result<()> {
    let daemon = crate::build_daemon()?;
    let root = crate::workspace_root();
    crate::run(Command::new(crate::cargo()).current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "tests",
        "--bin",
        "fastpath_measure",
    ]))?;
    let mut cmd = Command::new(root.join("target/release/fastpath_measure"));
    cmd.env("PROJECT_INGRESS_PROXY_BIN", &daemon);
    match what {
        What::Relays => cmd.arg("relays"),
        What::StalledMemory => cmd.args(["stalled-memory", &runs.to_string()]),
    };
    crate::run(&mut cmd)
}
