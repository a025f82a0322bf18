//! Small HTTP GETs over keep-alive to one upstream port, at several concurrencies.

use super::{Part, Scenario};
use crate::bench::context::Ctx;
use crate::bench::procs::Proc;
use crate::bench::report::{Row, Table};
use crate::bench::systems::{target, System, UPSTREAM_PORT};
use crate::bench::wrk;

pub struct SmallHttp {
    /// One table per concurrency (wrk threads = min(2, c)).
    conns: Vec<u32>,
    secs: u32,
}

impl SmallHttp {
    pub fn new(quick: bool) -> SmallHttp {
        if quick {
            SmallHttp {
                conns: vec![16],
                secs: 1,
            }
        } else {
            SmallHttp {
                conns: vec![1, 16, 128],
                secs: 5,
            }
        }
    }
}

impl Scenario for SmallHttp {
    fn tables(&self) -> Vec<Table> {
        self.conns
            .iter()
            .map(|c| {
                Table::new(
                    format!("Small HTTP GETs over keep-alive, {c} connection(s)"),
                    format!(
                        "wrk, `GET /small` (13-byte body); latency percentiles from wrk's histogram. \
                         Node closes every connection (platform config), so wrk reconnects per request. {}",
                        wrk::CPU_NOTE
                    ),
                    wrk::columns(),
                    Some(0),
                )
            })
            .collect()
    }

    fn describe(&self) -> String {
        format!(
            "small HTTP: wrk, {}s per concurrency {:?}, threads = min(2, c)",
            self.secs, self.conns
        )
    }

    /// Pooled nginx was added for exactly this scenario.
    fn part(&self, _sys: System) -> Part {
        Part::Runs
    }

    fn run(&self, ctx: &Ctx, sys: System, proxy: Option<&Proc>, table: usize) -> Row {
        let targets = [target(UPSTREAM_PORT)];
        wrk::small_requests(
            ctx,
            sys,
            proxy,
            self.conns[table],
            self.secs,
            "/small",
            &targets,
        )
    }
}
