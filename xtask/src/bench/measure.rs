//! What the benchmark reads from the kernel (CPU, memory) and how repeated runs are
//! summarised (medians).

use super::context::Ctx;
use super::procs::Proc;
use super::report::{Better, Column, Row};
use super::systems::System;

/// Busy clock ticks of all cores since boot (user+nice+system+irq+softirq, /proc/stat).
pub fn machine_busy_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    [0, 1, 2, 5, 6].iter().filter_map(|i| f.get(*i)).sum()
}

pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// Whole-machine kernel slab memory, bytes (/proc/meminfo `Slab`).
pub fn slab_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("Slab:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// CPU seconds (utime + stime, every thread and child process) the proxy spends while
/// `f` runs; NaN without a proxy (direct).
pub fn proxy_cpu_secs<T>(proxy: Option<&Proc>, f: impl FnOnce() -> T) -> (T, f64) {
    let before = proxy.map(|p| p.cpu_ticks());
    let out = f();
    let secs = match (proxy, before) {
        (Some(p), Some(b)) => p.cpu_ticks().saturating_sub(b) as f64 / ticks_per_sec(),
        _ => f64::NAN,
    };
    (out, secs)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Column-wise medians of several runs' rows.
pub fn medians(runs: &[Vec<f64>]) -> Vec<f64> {
    (0..runs.first().map_or(0, |r| r.len()))
        .map(|i| median(runs.iter().map(|r| r[i]).collect()))
        .collect()
}

/// Columns of every bulk-transfer table, in the order `bulk_transfer` fills them.
pub fn bulk_columns() -> Vec<Column> {
    vec![
        Column::new("Gbit/s", Better::Higher),
        Column::new("machine CPU s/GB", Better::Lower),
        Column::new("proxy process CPU s/GB", Better::Lower),
    ]
}

/// A bulk transfer by the bench_tool client (`args`), `repeats` times: the median of
/// Gbit/s, whole-machine CPU s/GB and proxy process CPU s/GB.
pub fn bulk_transfer(
    ctx: &Ctx,
    sys: System,
    proxy: Option<&Proc>,
    repeats: usize,
    args: &[&str],
) -> Row {
    let hz = ticks_per_sec();
    let mut runs = Vec::new();
    for _ in 0..repeats {
        let m0 = machine_busy_ticks();
        let (result, proxy_secs) = proxy_cpu_secs(proxy, || ctx.client(sys, args));
        let m1 = machine_busy_ticks();
        let v = match result {
            Ok(v) => v,
            Err(e) => return Row::Failed(format!("{e:#}")),
        };
        let gb = v["bytes"].as_f64().unwrap_or(0.0) / 1e9;
        runs.push(vec![
            v["gbit_s"].as_f64().unwrap_or(f64::NAN),
            m1.saturating_sub(m0) as f64 / hz / gb,
            proxy_secs / gb,
        ]);
    }
    Row::Values(medians(&runs))
}
