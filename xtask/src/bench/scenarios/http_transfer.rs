//! One large HTTP body through the proxy, downloaded or uploaded, checked byte by byte.

use super::Scenario;
use crate::bench::context::Ctx;
use crate::bench::measure::{bulk_columns, bulk_transfer};
use crate::bench::procs::Proc;
use crate::bench::report::{Row, Table};
use crate::bench::systems::System;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Download,
    Upload,
}

pub struct HttpTransfer {
    direction: Direction,
    bytes: u64,
}

fn bytes(quick: bool) -> u64 {
    if quick {
        64 << 20
    } else {
        1 << 30
    }
}

impl HttpTransfer {
    pub fn download(quick: bool) -> HttpTransfer {
        HttpTransfer {
            direction: Direction::Download,
            bytes: bytes(quick),
        }
    }

    pub fn upload(quick: bool) -> HttpTransfer {
        HttpTransfer {
            direction: Direction::Upload,
            bytes: bytes(quick),
        }
    }
}

impl Scenario for HttpTransfer {
    fn tables(&self) -> Vec<Table> {
        let mib = self.bytes >> 20;
        let (title, note) = match self.direction {
            Direction::Download => (
                format!("HTTP download, {mib} MiB"),
                "One GET, body checked byte by byte. Machine CPU = all cores from /proc/stat \
                 (user+nice+system+irq+softirq) over the transfer, client and upstream included.",
            ),
            Direction::Upload => (
                format!("HTTP upload, {mib} MiB"),
                "One POST with Content-Length; the upstream checks every byte.",
            ),
        };
        vec![Table::new(title, note.into(), bulk_columns(), Some(0))]
    }

    fn describe(&self) -> String {
        let what = match self.direction {
            Direction::Download => "HTTP download",
            Direction::Upload => "HTTP upload",
        };
        format!("{what}: {} MiB, once", self.bytes >> 20)
    }

    fn bulk(&self) -> bool {
        true
    }

    fn run(&self, ctx: &Ctx, sys: System, proxy: Option<&Proc>, _table: usize) -> Row {
        let mode = match self.direction {
            Direction::Download => "download",
            Direction::Upload => "upload",
        };
        bulk_transfer(ctx, sys, proxy, 1, &[mode, &self.bytes.to_string()])
    }
}
