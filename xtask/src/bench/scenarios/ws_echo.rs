//! WebSocket echo round trips, 64-byte messages, one in flight per socket.

use super::Scenario;
use crate::bench::context::Ctx;
use crate::bench::measure::medians;
use crate::bench::procs::Proc;
use crate::bench::report::{Better, Column, Row, Table};
use crate::bench::systems::System;

pub struct WsEcho {
    sockets: u64,
    secs: f64,
    repeats: usize,
}

impl WsEcho {
    pub fn one_socket(quick: bool) -> WsEcho {
        WsEcho::new(quick, 1)
    }

    pub fn many_sockets(quick: bool) -> WsEcho {
        WsEcho::new(quick, if quick { 8 } else { 64 })
    }

    fn new(quick: bool, sockets: u64) -> WsEcho {
        if quick {
            WsEcho {
                sockets,
                secs: 0.5,
                repeats: 1,
            }
        } else {
            WsEcho {
                sockets,
                secs: 2.0,
                repeats: 3,
            }
        }
    }
}

impl Scenario for WsEcho {
    fn tunnels(&self) -> bool {
        true
    }

    fn tables(&self) -> Vec<Table> {
        let (title, chart) = if self.sockets == 1 {
            // One socket: latency is the point.
            ("WebSocket echo, 64 B messages, 1 socket".to_string(), 0)
        } else {
            let title = format!("WebSocket echo, 64 B messages, {} sockets", self.sockets);
            (title, 2)
        };
        vec![Table::new(
            title,
            "One message in flight per socket; every echo compared. Median of the repeats.".into(),
            vec![
                Column::new("RTT p50 µs", Better::Lower),
                Column::new("RTT p99 µs", Better::Lower),
                Column::new("msgs/s", Better::Higher),
            ],
            Some(chart),
        )]
    }

    fn describe(&self) -> String {
        format!(
            "WebSocket echo, {} socket(s): 64 B messages, {}s per run, median of {}",
            self.sockets, self.secs, self.repeats
        )
    }

    fn run(&self, ctx: &Ctx, sys: System, _proxy: Option<&Proc>, _table: usize) -> Row {
        let (sockets, secs) = (self.sockets.to_string(), self.secs.to_string());
        let args = ["wsecho", &sockets, &secs, "10000000"];
        let mut runs = Vec::new();
        for _ in 0..self.repeats {
            match ctx.client(sys, &args) {
                Ok(v) => runs.push(vec![
                    v["p50_us"].as_f64().unwrap_or(f64::NAN),
                    v["p99_us"].as_f64().unwrap_or(f64::NAN),
                    v["msgs_per_s"].as_f64().unwrap_or(f64::NAN),
                ]),
                Err(e) => return Row::Failed(format!("{e:#}")),
            }
        }
        Row::Values(medians(&runs))
    }
}
