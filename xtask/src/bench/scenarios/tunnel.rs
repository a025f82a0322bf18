//! Raw bytes through an upgraded connection (after a WebSocket 101), one way or both
//! ways at once: the fast path's scenario.

use super::Scenario;
use crate::bench::context::Ctx;
use crate::bench::measure::{bulk_columns, bulk_transfer};
use crate::bench::procs::Proc;
use crate::bench::report::{Better, Column, Row, Table};
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
                 kernel work a fast path moves out of the proxy process. Zero-hop share: of \
                 the upstream→client bytes of these runs, those the app's own sends put into \
                 the client socket (the daemon's closing lines); the rest took the normal hop."
                    .into(),
                tunnel_columns(),
                Some(0),
            )
            } else {
                Table::new(
                    format!(
                        "Tunnel throughput both ways at once, {} MiB each way",
                        self.down >> 20
                    ),
                    "Gbit/s counts both directions. Median of the repeats. Zero-hop share: of \
                     the upstream→client bytes, those the app's own sends put into the client \
                     socket."
                        .into(),
                    tunnel_columns(),
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
        let log_start = proxy
            .and_then(|p| std::fs::metadata(&p.log).ok())
            .map(|m| m.len());
        match bulk_transfer(ctx, sys, proxy, self.repeats, &["tunnel", &down, &up]) {
            Row::Values(mut v) => {
                let share = match (sys, proxy, log_start) {
                    (System::DaemonZeroHop, Some(p), Some(start)) => zero_hop_share(&p.log, start),
                    _ => f64::NAN,
                };
                v.push(share);
                Row::Values(v)
            }
            other => other,
        }
    }
}

fn tunnel_columns() -> Vec<Column> {
    let mut columns = bulk_columns();
    columns.push(Column::new("zero-hop share %", Better::Higher));
    columns
}

/// Percent of the upstream→client bytes that zero-hop moved, over the tunnels whose
/// closing lines the daemon logged after byte `start` of its log (JSON lines).
fn zero_hop_share(log: &std::path::Path, start: u64) -> f64 {
    let Ok(text) = std::fs::read(log) else {
        return f64::NAN;
    };
    let text = String::from_utf8_lossy(text.get(start as usize..).unwrap_or_default());
    let (mut zero_hop, mut total) = (0u64, 0u64);
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["message"] != "tunnel closed" {
            continue;
        }
        zero_hop += v["zero_hop_bytes"].as_u64().unwrap_or(0);
        total += v["upstream_to_client"].as_u64().unwrap_or(0);
    }
    if total == 0 {
        return f64::NAN;
    }
    100.0 * zero_hop as f64 / total as f64
}
