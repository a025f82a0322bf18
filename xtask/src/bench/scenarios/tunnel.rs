//! Raw bytes through an upgraded connection (after a WebSocket 101), one way or both
//! ways at once: the fast path's scenario.

use super::Scenario;
use crate::bench::context::Ctx;
use crate::bench::measure::{bulk_columns, bulk_transfer};
use crate::bench::procs::Proc;
use crate::bench::report::{Row, Table};
use crate::bench::systems::System;

pub struct Tunnel {
    /// Bytes upstream → client.
    down: u64,
    /// Bytes client → upstream, at the same time.
    up: u64,
    /// Runs; the median is reported.
    repeats: usize,
}

impl Tunnel {
    pub fn one_way(quick: bool) -> Tunnel {
        let down = if quick { 64 << 20 } else { 2 << 30 };
        Tunnel {
            down,
            up: 0,
            repeats: repeats(quick),
        }
    }

    pub fn both_ways(quick: bool) -> Tunnel {
        let each = if quick { 32 << 20 } else { 1 << 30 };
        Tunnel {
            down: each,
            up: each,
            repeats: repeats(quick),
        }
    }
}

fn repeats(quick: bool) -> usize {
    if quick {
        1
    } else {
        3
    }
}

impl Scenario for Tunnel {
    fn tunnels(&self) -> bool {
        true
    }

    fn tables(&self) -> Vec<Table> {
        let table =
            if self.up == 0 {
                Table::new(
                format!("Tunnel throughput one way, {} MiB upstream → client", self.down >> 20),
                "Raw bytes after a WebSocket 101 (no framing), checked on receipt; the upstream's \
                 verdict closes the run. Median of the repeats. Whole-machine CPU counts the \
                 kernel work a fast path moves out of the proxy process."
                    .into(),
                bulk_columns(),
                Some(0),
            )
            } else {
                Table::new(
                    format!(
                        "Tunnel throughput both ways at once, {} MiB each way",
                        self.down >> 20
                    ),
                    "Gbit/s counts both directions. Median of the repeats.".into(),
                    bulk_columns(),
                    Some(0),
                )
            };
        vec![table]
    }

    fn describe(&self) -> String {
        if self.up == 0 {
            format!(
                "tunnel one way: {} MiB upstream→client, median of {}",
                self.down >> 20,
                self.repeats
            )
        } else {
            format!(
                "tunnel both ways: {} MiB each direction at once, median of {}",
                self.down >> 20,
                self.repeats
            )
        }
    }

    fn bulk(&self) -> bool {
        true
    }

    fn run(&self, ctx: &Ctx, sys: System, proxy: Option<&Proc>, _table: usize) -> Row {
        let (down, up) = (self.down.to_string(), self.up.to_string());
        bulk_transfer(ctx, sys, proxy, self.repeats, &["tunnel", &down, &up])
    }
}
