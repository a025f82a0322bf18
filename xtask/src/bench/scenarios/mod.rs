//! The benchmark's scenarios, one file each: its result tables, its parameters for the
//! quick and the full run, and how it measures one system. To add a scenario, write its
//! file and list it in `all()`; the orchestrator (`bench/mod.rs`) does the rest.

mod http_transfer;
mod idle;
mod small_http;
mod spread_ports;
mod tunnel;
pub mod warm_up;
mod ws_echo;

use super::context::Ctx;
use super::procs::Proc;
use super::report::{Row, Table};
use super::systems::System;

/// How a system takes part in a scenario.
pub enum Part {
    Runs,
    /// No row at all (pooled nginx outside the small-request scenario it was added for).
    Absent,
    /// A row that says why the scenario does not apply to this system.
    NotApplicable(&'static str),
}

pub trait Scenario {
    /// The result tables, in output order (e.g. one per concurrency or size).
    fn tables(&self) -> Vec<Table>;

    /// One clause for the results' parameter line.
    fn describe(&self) -> String;

    /// Measures table `table` of this scenario on `sys`. `proxy` is the running proxy
    /// process (None for direct), for its CPU and memory.
    fn run(&self, ctx: &Ctx, sys: System, proxy: Option<&Proc>, table: usize) -> Row;

    fn part(&self, sys: System) -> Part {
        if sys == System::NginxPooled || (sys == System::DaemonZeroHop && !self.tunnels()) {
            Part::Absent
        } else {
            Part::Runs
        }
    }

    /// It measures upgraded connections (tunnels). Zero-hop changes nothing else, so
    /// `daemon zero-hop` has rows only in such scenarios.
    fn tunnels(&self) -> bool {
        false
    }

    /// Each table is measured on a freshly started proxy; such scenarios run first.
    fn fresh_proxy(&self) -> bool {
        false
    }

    /// A timed bulk transfer: the untimed warm-up (`warm_up`) runs before the first one.
    fn bulk(&self) -> bool {
        false
    }
}

/// Every scenario, in the order its tables appear in the results.
pub fn all(quick: bool) -> Vec<Box<dyn Scenario>> {
    vec![
        Box::new(small_http::SmallHttp::new(quick)),
        Box::new(spread_ports::SpreadPorts::new(quick)),
        Box::new(http_transfer::HttpTransfer::download(quick)),
        Box::new(http_transfer::HttpTransfer::upload(quick)),
        Box::new(ws_echo::WsEcho::one_socket(quick)),
        Box::new(ws_echo::WsEcho::many_sockets(quick)),
        Box::new(tunnel::Tunnel::one_way(quick)),
        Box::new(tunnel::Tunnel::both_ways(quick)),
        Box::new(idle::IdleTunnels::new(quick)),
    ]
}
