//! What every scenario gets: the namespaces, the tools, a scratch directory, and the
//! bench_tool client runner with its time-out accounting.

use std::cell::Cell;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use tests::Topology;

use super::procs::run_bounded;
use super::systems::{self, System, UPSTREAM_PORT};

pub struct Ctx<'a> {
    /// The smoke run of the test suite (small sizes, shorter time-outs).
    pub quick: bool,
    pub topo: &'a Topology,
    /// target/release/bench_tool
    pub tool: &'a Path,
    /// Scratch directory for configs, scripts and logs of this run.
    pub dir: &'a Path,
    pub rt: &'a tokio::runtime::Runtime,
    /// Timed-out transfers of the current system; after three, its remaining transfers
    /// are marked failed without running (keeps a wedged system from eating the run).
    strikes: Cell<u32>,
}

impl<'a> Ctx<'a> {
    pub fn new(
        quick: bool,
        topo: &'a Topology,
        tool: &'a Path,
        dir: &'a Path,
        rt: &'a tokio::runtime::Runtime,
    ) -> Ctx<'a> {
        Ctx {
            quick,
            topo,
            tool,
            dir,
            rt,
            strikes: Cell::new(0),
        }
    }

    pub fn strikes(&self) -> u32 {
        self.strikes.get()
    }

    pub fn set_strikes(&self, n: u32) {
        self.strikes.set(n);
    }

    /// Where clients send traffic for `sys` ("ip:port").
    pub fn addr(&self, sys: System) -> String {
        systems::address(self.topo, sys).to_string()
    }

    /// Runs one bench_tool client (`mode args…`) in the client namespace against the
    /// first upstream port; its JSON line, or why it failed.
    pub fn client(&self, sys: System, args: &[&str]) -> Result<Value> {
        if self.strikes.get() >= 3 {
            bail!("not run: three earlier transfers of this system timed out");
        }
        // Generous for the slowest peer (≥ 100 MB/s), but bounded.
        let bytes: u64 = args[1..]
            .iter()
            .filter_map(|a| a.parse::<u64>().ok())
            .filter(|n| *n >= 1 << 20)
            .sum();
        let base = if self.quick { 8 } else { 15 };
        let limit = Duration::from_secs(base + bytes / 100_000_000);
        let mut cmd = self.topo.client.command(self.tool.to_str().unwrap());
        cmd.args([
            "client",
            args[0],
            &self.addr(sys),
            &systems::target(UPSTREAM_PORT),
        ])
        .args(&args[1..]);
        let out = run_bounded(cmd, limit).inspect_err(|_| {
            self.strikes.set(self.strikes.get() + 1);
        })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or("");
        let v: Value = serde_json::from_str(line).map_err(|_| {
            anyhow!(
                "client printed no result: {} {}",
                line,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        if v["ok"] != Value::Bool(true) {
            bail!("{}", v["error"].as_str().unwrap_or("failed"));
        }
        Ok(v)
    }
}
