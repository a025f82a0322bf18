//! Did each sampled quantity end flat? Three comparisons per quantity, each allowed a
//! tolerance (the larger of an absolute amount and a share of its level):
//!
//! 1. drift: the mean of the load's last window against its first window;
//! 2. trend: the least-squares slope over the load's second half, times that half's
//!    length (the growth the trend predicts over it);
//! 3. idle: the cool-down's value (median of its second half) against the settle
//!    phase's (the same idle state before the judged load). Live-object counts (fds,
//!    map entries, sockets, connections) must be back to exactly the settle value.
//!
//! Only growth counts. A `--quick` run is too short for 1 and 2 (warm-up effects still
//! show), so it judges only the idle check of live-object counts and reports the rest.

use super::plan::Plan;
use super::sample::{Phase, Sample};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    KiB,
    Pages,
    Count,
}

impl Unit {
    /// A value in this unit, for people.
    pub fn show(self, v: f64) -> String {
        match self {
            Unit::KiB => format!("{:.1} MiB", v / 1024.0),
            Unit::Pages => format!("{:.1} MiB", v * 4.0 / 1024.0),
            Unit::Count => {
                if (v - v.round()).abs() < 0.05 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                }
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Memory and the like: may sit at any level, must not grow beyond the tolerance.
    Level,
    /// Live objects: must not grow, and must be back to their idle value when idle.
    Objects,
}

pub struct Quantity {
    pub key: String,
    pub label: String,
    pub unit: Unit,
    pub class: Class,
    /// Tolerance: the larger of `abs` (in `unit`) and `rel` × the level.
    pub abs: f64,
    pub rel: f64,
    /// Moved by everything on the machine, not only this run.
    pub machine_wide: bool,
}

/// (key, label, unit, class, absolute tolerance, relative tolerance, machine-wide)
type Row = (&'static str, &'static str, Unit, Class, f64, f64, bool);

/// The fixed quantities, in report order; `None` marks where the fast-path maps and the
/// tunnel gauges go.
#[rustfmt::skip]
const FIXED: &[Option<Row>] = {
    use Class::*;
    use Unit::*;
    &[
        // glibc keeps its high-water mark: a rare burst steps RSS up a few MiB for good
        // (seen: +2.5 MiB at once, flat after); a leak keeps climbing.
        Some(("daemon_rss_kib", "daemon RSS", KiB, Level, 8192.0, 0.10, false)),
        Some(("daemon_fds", "daemon open fds", Count, Objects, 8.0, 0.10, false)),
        Some(("daemon_threads", "daemon threads", Count, Objects, 1.0, 0.0, false)),
        None,
        Some(("m_client_connections", "metrics: open client connections", Count, Objects, 8.0, 0.10, false)),
        Some(("m_upstream_pool_idle_connections", "metrics: idle pooled upstream connections", Count, Objects, 8.0, 0.10, false)),
        Some(("m_capacity_fds_in_use", "metrics: fds held for traffic", Count, Objects, 8.0, 0.10, false)),
        Some(("tcp_inuse", "TCP sockets in use (machine namespace)", Count, Objects, 8.0, 0.10, false)),
        Some(("upstream_connections", "upstream app: open HTTP connections", Count, Objects, 8.0, 0.10, false)),
        Some(("upstream_sessions", "upstream app: open upgraded sessions", Count, Objects, 4.0, 0.10, false)),
        Some(("socket_mem_kib", "TCP socket memory (machine namespace)", KiB, Level, 8192.0, 0.10, false)),
        Some(("client_socket_mem_kib", "TCP socket memory (client namespace)", KiB, Level, 8192.0, 0.10, false)),
        Some(("tcp_orphan", "orphaned TCP sockets", Count, Level, 4.0, 0.10, true)),
        Some(("tcp_mem", "TCP memory", Pages, Level, 2048.0, 0.10, true)),
        Some(("slab_kib", "kernel Slab", KiB, Level, 16384.0, 0.05, true)),
        Some(("sunreclaim_kib", "kernel SUnreclaim", KiB, Level, 8192.0, 0.05, true)),
    ]
};

/// The quantities judged: the fixed ones, with every fast-path map and every tunnel
/// gauge the daemon exposes (whatever the samples contain).
pub fn quantities(samples: &[Sample]) -> Vec<Quantity> {
    let mut keys: Vec<&String> = samples.iter().flat_map(|s| s.values.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut list = Vec::new();
    for row in FIXED {
        let Some((key, label, unit, class, abs, rel, machine_wide)) = *row else {
            for key in &keys {
                let label = if let Some(name) = key
                    .strip_prefix("map_")
                    .and_then(|k| k.strip_suffix("_entries"))
                {
                    format!("fast-path map `{name}` entries")
                } else if key.starts_with("m_")
                    && key.contains("tunnel")
                    && !key.ends_with("_total")
                {
                    format!("metrics: {}", &key[2..])
                } else {
                    continue;
                };
                list.push(Quantity {
                    key: key.to_string(),
                    label,
                    unit: Unit::Count,
                    class: Class::Objects,
                    abs: 8.0,
                    rel: 0.10,
                    machine_wide: false,
                });
            }
            continue;
        };
        if keys.iter().any(|k| k.as_str() == key) {
            list.push(Quantity {
                key: key.into(),
                label: label.into(),
                unit,
                class,
                abs,
                rel,
                machine_wide,
            });
        }
    }
    list
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Verdict {
    Pass,
    Fail,
    /// Shown, not judged (a quick run).
    Info,
    NoData,
}

pub struct Judgement {
    pub settle: Option<f64>,
    pub cool: Option<f64>,
    pub first: Option<f64>,
    pub last: Option<f64>,
    /// Per minute, over the load's second half.
    pub slope_per_min: Option<f64>,
    pub tolerance: f64,
    pub verdict: Verdict,
    /// Why it failed (or what would have failed, for `Info`).
    pub why: Vec<String>,
}

pub fn judge(plan: &Plan, samples: &[Sample], q: &Quantity) -> Judgement {
    let series = |phase: Phase| -> Vec<(f64, f64)> {
        samples
            .iter()
            .filter(|s| s.phase == phase)
            .filter_map(|s| Some((s.t, *s.values.get(&q.key)?)))
            .collect()
    };
    let idle_value = |points: Vec<(f64, f64)>| -> Option<f64> {
        let (t0, t1) = (points.first()?.0, points.last()?.0);
        let mid = (t0 + t1) / 2.0;
        median(points.iter().filter(|p| p.0 >= mid).map(|p| p.1).collect())
    };
    let settle = idle_value(series(Phase::Settle));
    let cool = idle_value(series(Phase::CoolDown));
    let load = series(Phase::Load);
    let w = plan.window.as_secs_f64();
    let (mut first, mut last, mut slope, mut growth) = (None, None, None, None);
    if let (Some(&(t0, _)), Some(&(t1, _))) = (load.first(), load.last()) {
        first = mean(load.iter().filter(|p| p.0 < t0 + w).map(|p| p.1));
        last = mean(load.iter().filter(|p| p.0 > t1 - w).map(|p| p.1));
        let mid = (t0 + t1) / 2.0;
        let half: Vec<(f64, f64)> = load.iter().copied().filter(|p| p.0 >= mid).collect();
        slope = linear_slope(&half);
        growth = slope.map(|s| s * (t1 - mid));
    }
    let level = [first, settle].into_iter().flatten().fold(0.0, f64::max);
    let tolerance = q.abs.max(q.rel * level);
    let mut why = Vec::new();
    let mut judged_fail = false;
    let show = |v: f64| q.unit.show(v);
    // (failed, judged in this kind of run, explanation)
    let mut check = |failed: bool, judged: bool, text: String| {
        if failed {
            why.push(text);
            judged_fail |= judged;
        }
    };
    let full = !plan.quick;
    if let (Some(f), Some(l)) = (first, last) {
        check(
            l - f > tolerance,
            full,
            format!(
                "drift: last window {} vs first {} (> {})",
                show(l),
                show(f),
                show(tolerance)
            ),
        );
    }
    if let Some(g) = growth {
        check(
            g > tolerance,
            full,
            format!(
                "trend: +{} over the second half (> {})",
                show(g),
                show(tolerance)
            ),
        );
    }
    if let (Some(s), Some(c)) = (settle, cool) {
        match q.class {
            Class::Objects => check(
                c > s,
                true,
                format!(
                    "idle: {} at the end vs {} after the warm-up (must return)",
                    show(c),
                    show(s)
                ),
            ),
            Class::Level => check(
                c - s > tolerance,
                full,
                format!(
                    "idle: {} at the end vs {} after the warm-up (> {})",
                    show(c),
                    show(s),
                    show(tolerance)
                ),
            ),
        }
    }
    let any_data = settle.is_some() || cool.is_some() || first.is_some();
    let verdict = if !any_data {
        Verdict::NoData
    } else if judged_fail {
        Verdict::Fail
    } else if plan.quick && q.class == Class::Level {
        Verdict::Info
    } else {
        Verdict::Pass
    };
    Judgement {
        settle,
        cool,
        first,
        last,
        slope_per_min: slope.map(|s| s * 60.0),
        tolerance,
        verdict,
        why,
    }
}

/// Counters that must not move at all: the fast path's dropped or misparsed bytes
/// (kernel-side loss would otherwise be silent) and upstream connect failures (every
/// upstream is up). The log's own dropped lines are left out: they measure the soak's
/// log reader. One message per counter that moved.
pub fn moved_counters(samples: &[Sample]) -> Vec<String> {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return Vec::new();
    };
    last.values
        .iter()
        .filter(|(k, _)| {
            k.starts_with("m_")
                && k.as_str() != "m_log_lines_dropped_total"
                && (k.contains("dropped")
                    || k.contains("misparsed")
                    || k.as_str() == "m_upstream_connect_failures_total")
        })
        .filter_map(|(k, end)| {
            let start = first.values.get(k).copied().unwrap_or(0.0);
            (*end > start)
                .then(|| format!("the daemon's `{}` moved from {start} to {end}", &k[2..]))
        })
        .collect()
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// Least-squares slope of y over t (per second); `None` with fewer than 3 points.
fn linear_slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mt = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mt).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mt) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn slope_of_a_line_and_median() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 + 2.0 * i as f64)).collect();
        assert!((linear_slope(&pts).unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    /// One sample a second through a 2-minute plan's phases, `value(phase, t)` for `key`.
    fn run(plan: &Plan, key: &str, value: impl Fn(Phase, f64) -> f64) -> Vec<Sample> {
        let phases = [
            (Phase::Baseline, plan.baseline),
            (Phase::WarmUp, plan.warm_up),
            (Phase::Settle, plan.settle),
            (Phase::Load, plan.load),
            (Phase::CoolDown, plan.cool_down),
        ];
        let mut t = 0.0;
        let mut samples = Vec::new();
        for (phase, length) in phases {
            for _ in 0..length.as_secs() {
                let values = BTreeMap::from([(key.to_owned(), value(phase, t))]);
                samples.push(Sample { t, phase, values });
                t += 1.0;
            }
        }
        samples
    }

    fn verdict_of(plan: &Plan, samples: &[Sample]) -> (Verdict, Vec<String>) {
        let q = quantities(samples).pop().expect("one quantity");
        let j = judge(plan, samples, &q);
        (j.verdict, j.why)
    }

    #[test]
    fn flat_memory_passes_and_growing_memory_fails() {
        let plan = Plan::minutes(2);
        let busy = |p: Phase| matches!(p, Phase::WarmUp | Phase::Load);
        // 20 MiB idle, 30 MiB under load, with a little noise.
        let flat = run(&plan, "daemon_rss_kib", |p, t| {
            let noise = (t * 7.0).sin() * 300.0;
            if busy(p) {
                30_000.0 + noise
            } else {
                20_000.0 + noise
            }
        });
        assert_eq!(verdict_of(&plan, &flat).0, Verdict::Pass);
        // A leak of 200 KiB a second under load, never given back.
        let load_start = (plan.baseline + plan.warm_up + plan.settle).as_secs_f64();
        let leak = run(&plan, "daemon_rss_kib", |p, t| {
            let leaked = (t - load_start).max(0.0) * 200.0;
            if busy(p) {
                30_000.0 + leaked
            } else {
                20_000.0 + leaked
            }
        });
        let (verdict, why) = verdict_of(&plan, &leak);
        assert_eq!(verdict, Verdict::Fail);
        assert_eq!(why.len(), 3, "drift, trend and idle all fail: {why:?}");
    }

    #[test]
    fn a_count_that_does_not_return_fails_even_in_a_quick_run() {
        let plan = Plan::quick();
        let samples = run(&plan, "daemon_fds", |p, _| match p {
            Phase::WarmUp | Phase::Load => 140.0,
            Phase::CoolDown => 35.0,
            _ => 34.0,
        });
        let (verdict, why) = verdict_of(&plan, &samples);
        assert_eq!(verdict, Verdict::Fail);
        assert!(why[0].starts_with("idle: 35"), "{why:?}");
        let back = run(&plan, "daemon_fds", |p, _| match p {
            Phase::WarmUp | Phase::Load => 140.0,
            _ => 34.0,
        });
        assert_eq!(verdict_of(&plan, &back).0, Verdict::Pass);
    }

    #[test]
    fn kernel_counters_that_move_are_reported() {
        let plan = Plan::quick();
        let mut samples = run(&plan, "m_ebpf_misparsed_bytes_total", |_, t| {
            if t > 30.0 {
                5.0
            } else {
                0.0
            }
        });
        assert_eq!(moved_counters(&samples).len(), 1);
        for s in &mut samples {
            s.values.insert("m_ebpf_misparsed_bytes_total".into(), 0.0);
        }
        assert!(moved_counters(&samples).is_empty());
    }
}
