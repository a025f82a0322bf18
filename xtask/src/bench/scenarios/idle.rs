//! Many idle upgraded connections: the memory each one costs the proxy and the kernel.

use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::Value;

use super::Scenario;
use crate::bench::context::Ctx;
use crate::bench::measure::slab_bytes;
use crate::bench::procs::{Interactive, Proc};
use crate::bench::report::{Better, Column, Row, Table};
use crate::bench::systems::{target, System, UPSTREAM_PORT};

pub struct IdleTunnels {
    /// One table per count, each on a freshly started proxy.
    counts: Vec<usize>,
}

impl IdleTunnels {
    pub fn new(quick: bool) -> IdleTunnels {
        IdleTunnels {
            counts: if quick { vec![100] } else { vec![1000, 7500] },
        }
    }
}

impl Scenario for IdleTunnels {
    fn tunnels(&self) -> bool {
        true
    }

    fn tables(&self) -> Vec<Table> {
        self.counts
            .iter()
            .map(|n| {
                Table::new(
                    format!("{n} idle upgraded connections (WebSocket handshake, then idle)"),
                    "Measured on a freshly started proxy. RSS = VmRSS of the proxy's process tree. \
                     Kernel = whole-machine `Slab` from /proc/meminfo (includes the client's and \
                     the upstream's sockets, so `direct` is the no-proxy baseline) and TCP `mem` \
                     pages from /proc/net/sockstat. Per connection."
                        .into(),
                    vec![
                        Column::new("proxy RSS KiB/conn", Better::Lower),
                        Column::new("kernel slab KiB/conn", Better::Lower),
                        Column::new("TCP mem KiB/conn", Better::Lower),
                    ],
                    Some(0),
                )
            })
            .collect()
    }

    fn describe(&self) -> String {
        format!(
            "idle upgraded connections: {:?} (the 20k fd limit per process caps one proxy at ~9k tunnels, \
             and HAProxy's fd accounting, 2 × maxconn + ~4k, at 7,900)",
            self.counts
        )
    }

    /// Memory per connection is only meaningful on a process that has not yet grown.
    fn fresh_proxy(&self) -> bool {
        true
    }

    fn run(&self, ctx: &Ctx, sys: System, proxy: Option<&Proc>, table: usize) -> Row {
        match measure(ctx, sys, proxy, self.counts[table]) {
            Ok(r) => r,
            Err(e) => Row::Failed(format!("{e:#}")),
        }
    }
}

/// TCP memory of the machine namespace, bytes (`mem` pages in /proc/net/sockstat).
fn sockstat_mem_bytes(ctx: &Ctx) -> u64 {
    let out = ctx
        .topo
        .machine
        .command("cat")
        .arg("/proc/net/sockstat")
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|x| *x == "mem")?;
            f.get(i + 1)?.parse::<u64>().ok()
        })
        .unwrap_or(0)
        * 4096
}

fn measure(ctx: &Ctx, sys: System, proxy: Option<&Proc>, count: usize) -> Result<Row> {
    std::thread::sleep(Duration::from_millis(500));
    let rss0 = proxy.map_or(0, |p| p.rss());
    let (slab0, mem0) = (slab_bytes(), sockstat_mem_bytes(ctx));
    let mut cmd = ctx.topo.client.command(ctx.tool.to_str().unwrap());
    cmd.args([
        "client",
        "idle",
        &ctx.addr(sys),
        &target(UPSTREAM_PORT),
        &count.to_string(),
    ]);
    let mut client = Interactive::spawn(cmd)?;
    let line = client.next_line(Duration::from_secs(20 + count as u64 / 50))?;
    if !line.starts_with("READY") {
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        bail!("{}", v["error"].as_str().unwrap_or(&line));
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss1 = proxy.map_or(0, |p| p.rss());
    let fds: usize = proxy.map_or(0, |p| {
        p.tree()
            .iter()
            .filter_map(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok())
            .map(|d| d.count())
            .sum()
    });
    let (slab1, mem1) = (slab_bytes(), sockstat_mem_bytes(ctx));
    client.poke()?;
    let line = client.next_line(Duration::from_secs(20 + count as u64 / 100))?;
    let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    if v["ok"] != Value::Bool(true) {
        let why = v["error"].as_str().unwrap_or(&line);
        if proxy.is_some() {
            bail!("{why} (the proxy held {fds} fds when all {count} were open; 2 per tunnel expected)");
        }
        bail!("{why}");
    }
    let per = |a: u64, b: u64| (b as f64 - a as f64) / count as f64 / 1024.0;
    let rss = if proxy.is_some() {
        per(rss0, rss1)
    } else {
        f64::NAN
    };
    Ok(Row::Values(vec![rss, per(slab0, slab1), per(mem0, mem1)]))
}
