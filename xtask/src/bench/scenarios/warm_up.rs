//! The untimed warm-up before a system's first timed bulk transfer: the first large
//! transfer after a wrk phase was several times slower (peers-and-limits notes).

use crate::bench::context::Ctx;
use crate::bench::systems::System;

pub struct WarmUp {
    bytes: u64,
}

impl WarmUp {
    pub fn new(quick: bool) -> WarmUp {
        WarmUp {
            bytes: if quick { 16 << 20 } else { 256 << 20 },
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "untimed warm-up of {} MiB download + tunnel per system before the timed bulk runs",
            self.bytes >> 20
        )
    }

    /// Runs the warm-up transfers; their results (and failures) are not recorded.
    pub fn run(&self, ctx: &Ctx, sys: System) {
        let n = self.bytes.to_string();
        let _ = ctx.client(sys, &["download", &n]);
        let _ = ctx.client(sys, &["tunnel", &n, &n]);
    }
}
