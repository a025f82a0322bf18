//! The run's phases and the windows the verdicts compare.
//!
//! baseline (idle) → warm-up (traffic, not judged) → settle (idle: the reference) →
//! load (traffic, judged) → cool-down (idle: the end state). Both idle phases last as
//! long, so "end vs start" compares the same state (no traffic, idle connections expired
//! and TIME_WAIT equally old) across the whole judged load.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    /// Minutes of traffic asked for (0: quick).
    pub minutes: u32,
    pub baseline: Duration,
    pub warm_up: Duration,
    pub settle: Duration,
    pub load: Duration,
    pub cool_down: Duration,
    /// Length of the first and last windows of the load compared with each other.
    pub window: Duration,
}

fn clamp(d: Duration, lo: u64, hi: u64) -> Duration {
    d.clamp(Duration::from_secs(lo), Duration::from_secs(hi))
}

impl Plan {
    /// About 60 s in all: for the test suite; only the hard checks decide (see `verdict`).
    pub fn quick() -> Plan {
        Plan {
            quick: true,
            minutes: 0,
            baseline: Duration::from_secs(3),
            warm_up: Duration::from_secs(10),
            settle: Duration::from_secs(8),
            load: Duration::from_secs(30),
            cool_down: Duration::from_secs(8),
            window: Duration::from_secs(10),
        }
    }

    /// `minutes` of traffic in all (warm-up included), plus the idle phases.
    pub fn minutes(minutes: u32) -> Plan {
        let traffic = Duration::from_secs(u64::from(minutes.max(1)) * 60);
        let warm_up = clamp(traffic / 10, 10, 180);
        let load = traffic - warm_up;
        let idle = clamp(traffic / 20, 10, 60);
        Plan {
            quick: false,
            minutes,
            baseline: Duration::from_secs(5),
            warm_up,
            settle: idle,
            load,
            cool_down: idle,
            window: clamp(load / 6, 10, 180),
        }
    }

    pub fn total(&self) -> Duration {
        self.baseline + self.warm_up + self.settle + self.load + self.cool_down
    }

    pub fn describe(&self) -> String {
        let s = |d: Duration| format!("{} s", d.as_secs());
        format!(
            "baseline idle {} → warm-up traffic {} (not judged) → settle idle {} → load {} (judged; first and last windows of {}) → cool-down idle {}",
            s(self.baseline),
            s(self.warm_up),
            s(self.settle),
            s(self.load),
            s(self.window),
            s(self.cool_down)
        )
    }
}
