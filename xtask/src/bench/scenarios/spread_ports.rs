//! Small HTTP GETs spread over the upstream app's 8 ports by the target header: what
//! routing by header means (the platform's edge sends requests for any port of the
//! machine over the same connections).

use super::{Part, Scenario};
use crate::bench::context::Ctx;
use crate::bench::procs::Proc;
use crate::bench::report::{Row, Table};
use crate::bench::systems::{target, upstream_ports, System, UPSTREAM_PORT, UPSTREAM_PORT_COUNT};
use crate::bench::wrk;

pub struct SpreadPorts {
    conns: u32,
    secs: u32,
}

impl SpreadPorts {
    pub fn new(quick: bool) -> SpreadPorts {
        if quick {
            SpreadPorts { conns: 16, secs: 1 }
        } else {
            // As the largest single-port table, so the two compare.
            SpreadPorts {
                conns: 128,
                secs: 5,
            }
        }
    }
}

impl Scenario for SpreadPorts {
    fn tables(&self) -> Vec<Table> {
        vec![Table::new(
            format!(
                "Small HTTP GETs spread over {UPSTREAM_PORT_COUNT} upstream ports, {} connections",
                self.conns
            ),
            format!(
                "wrk, `GET /small`; each wrk thread sends its requests to ports {}–{} in turn \
                 (`X-Iterate-Proxy-Target-Host: localhost:<port>`, a Lua `request` hook), so \
                 every keep-alive connection carries requests for every port. The upstream app \
                 answers 421 to a request whose `Host: localhost:<port>` names another of its \
                 ports, so a misrouted request fails the run. `direct` cannot follow the header: \
                 wrk sends everything to the first port (the same upstream process). {}",
                UPSTREAM_PORT,
                UPSTREAM_PORT + UPSTREAM_PORT_COUNT - 1,
                wrk::CPU_NOTE
            ),
            wrk::columns(),
            Some(0),
        )]
    }

    fn describe(&self) -> String {
        format!(
            "small HTTP over {UPSTREAM_PORT_COUNT} ports: wrk, {}s, {} connections, 2 threads",
            self.secs, self.conns
        )
    }

    fn part(&self, sys: System) -> Part {
        if sys == System::DaemonZeroHop {
            // Zero-hop changes tunnels only (see `Scenario::tunnels`).
            Part::Absent
        } else if sys == System::NginxPooled {
            Part::NotApplicable(
                "a named `upstream` block lists its ports in the config; routing by header \
                 reaches ports no config lists",
            )
        } else {
            Part::Runs
        }
    }

    fn run(&self, ctx: &Ctx, sys: System, proxy: Option<&Proc>, _table: usize) -> Row {
        let targets: Vec<String> = upstream_ports().map(target).collect();
        wrk::small_requests(ctx, sys, proxy, self.conns, self.secs, "/small", &targets)
    }
}
