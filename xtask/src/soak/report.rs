//! The soak's Markdown report and the CSV of every sample.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;

use anyhow::Result;

use super::daemon::LogTally;
use super::plan::Plan;
use super::record::{Kind, Record};
use super::sample::{Phase, Sample};
use super::traffic::Load;
use super::verdict::{self, Judgement, Quantity, Verdict};

pub struct Facts<'a> {
    pub plan: &'a Plan,
    pub load: &'a Load,
    pub record: &'a Record,
    pub samples: &'a [Sample],
    pub judged: &'a [(Quantity, Judgement)],
    pub log: &'a LogTally,
    pub daemon_command: String,
    /// The `build_info` labels: data path and why.
    pub data_path: String,
    pub daemon_exit: String,
    pub machine: String,
    pub commit: String,
    pub started: String,
    pub loadavg: String,
    pub hard_failures: &'a [String],
    /// Requests the daemon counted during the run, and requests the clients made.
    pub requests: (Option<u64>, u64),
    pub passed: bool,
}

pub fn write_csv(path: &Path, samples: &[Sample]) -> Result<()> {
    let columns: BTreeSet<&String> = samples.iter().flat_map(|s| s.values.keys()).collect();
    let mut out = String::from("t_s,phase");
    for c in &columns {
        out.push(',');
        out.push_str(c);
    }
    out.push('\n');
    for s in samples {
        let _ = write!(out, "{:.1},{}", s.t, s.phase.name());
        for c in &columns {
            out.push(',');
            if let Some(v) = s.values.get(*c) {
                let _ = write!(out, "{v}");
            }
        }
        out.push('\n');
    }
    std::fs::write(path, out)?;
    Ok(())
}

fn bytes(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    }
}

/// Seconds of the phase, from the samples.
fn phase_span(samples: &[Sample], phase: Phase) -> Option<(f64, f64)> {
    let mut ts = samples.iter().filter(|s| s.phase == phase).map(|s| s.t);
    let first = ts.next()?;
    Some((first, ts.next_back().unwrap_or(first)))
}

/// Rate of a cumulative column over a phase (per second).
fn rate(samples: &[Sample], phase: Phase, key: &str) -> Option<f64> {
    let points: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.phase == phase)
        .filter_map(|s| Some((s.t, *s.values.get(key)?)))
        .collect();
    let (a, b) = (points.first()?, points.last()?);
    (b.0 > a.0).then(|| (b.1 - a.1) / (b.0 - a.0))
}

pub fn markdown(f: &Facts) -> String {
    let mut o = String::new();
    let verdict = if f.passed { "PASS" } else { "FAIL" };
    let kind_of_run = if f.plan.quick {
        "quick run (`cargo xtask soak --quick`: only the hard checks decide)".to_owned()
    } else {
        format!(
            "{m} minutes of traffic (`cargo xtask soak --minutes {m}`)",
            m = f.plan.minutes
        )
    };
    let _ = writeln!(o, "# Soak: {verdict}\n");
    let _ = writeln!(o, "Started {} · {kind_of_run}.\n", f.started);
    let _ = writeln!(
        o,
        "- Daemon: {} (commit {}), data path: **{}**",
        f.daemon_command, f.commit, f.data_path
    );
    let _ = writeln!(o, "- Exit after SIGTERM at the end: {}", f.daemon_exit);
    let _ = writeln!(o, "- {}; load average {}", f.machine, f.loadavg);
    let _ = writeln!(o, "- Phases: {}", f.plan.describe());
    let _ = writeln!(o, "- Topology: clients in their own network namespace, across a veth to the machine namespace, where the daemon listens on :8080 and the upstream app on 127.0.0.1 ports 9101–9106 (in the soak process, like the clients)");
    let _ = writeln!(o, "\n## Traffic\n");
    for line in f.load.describe() {
        let _ = writeln!(o, "- {line}");
    }
    let _ = writeln!(o, "\nEvery byte is checked: bodies, events and echoes by the client, uploads and tunnel bytes by the upstream app (which answers with a verdict the client checks).\n");
    let _ = writeln!(
        o,
        "| kind | operations | second count | bytes checked | failures |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|");
    let (mut total_bytes, mut total_ops) = (0u64, 0u64);
    for kind in Kind::ALL {
        let c = f.record.counts(kind);
        let (ops_unit, items_unit) = kind.units();
        let (ops, items, b, fails) = (
            c.ops.load(Ordering::Relaxed),
            c.items.load(Ordering::Relaxed),
            c.bytes.load(Ordering::Relaxed),
            c.failures.load(Ordering::Relaxed),
        );
        if kind != Kind::Monitor {
            total_bytes += b;
            total_ops += ops;
        }
        let items = if kind == Kind::Monitor {
            "-".to_owned()
        } else {
            format!("{items} {items_unit}")
        };
        let _ = writeln!(
            o,
            "| {} | {ops} {ops_unit} | {items} | {} | {fails} |",
            kind.name(),
            bytes(b)
        );
    }
    let _ = writeln!(
        o,
        "| **all** | {total_ops} | | **{}** | **{}** |",
        bytes(total_bytes),
        f.record.total_failures()
    );
    if let (Some(counted), sent) = f.requests {
        let _ = writeln!(o, "\nThe daemon's `requests_total` grew by {counted} during the run; the clients made {sent} requests.");
    }
    if let Some(r) = rate(f.samples, Phase::Load, "m_requests_total") {
        let _ = writeln!(
            o,
            "During the load the daemon answered {r:.0} requests/s (its own `requests_total`)."
        );
    }
    let last = f.samples.last().map(|s| &s.values);
    let metric = |k: &str| last.and_then(|v| v.get(k)).copied();
    if let Some(n) = metric("m_upstream_retries_total") {
        let _ = writeln!(o, "Requests the daemon retried after meeting a pooled connection the upstream had closed: {n:.0}.");
    }
    if let Some(n) = metric("m_requests_not_1xx_2xx") {
        let _ = writeln!(
            o,
            "Requests the daemon answered with a status outside 1xx/2xx: {n:.0}."
        );
    }

    let _ = writeln!(o, "\n## Failures\n");
    let failures = f.record.failures();
    if failures.is_empty() && f.hard_failures.is_empty() {
        let _ = writeln!(o, "None.");
    }
    for h in f.hard_failures {
        let _ = writeln!(o, "- {h}");
    }
    for (at, kind, what) in &failures {
        let _ = writeln!(
            o,
            "- {:.1} s, {}: {}",
            at.as_secs_f64(),
            kind.name(),
            what.replace('\n', " ")
        );
    }
    if f.record.total_failures() as usize > failures.len() {
        let _ = writeln!(
            o,
            "- … {} more",
            f.record.total_failures() as usize - failures.len()
        );
    }

    let _ = writeln!(o, "\n## Did everything end flat?\n");
    let _ = writeln!(o, "Sampled every second (CSV next to this file). *Settle* and *cool-down* are the medians of the second half of the idle phases before and after the judged load; *first*/*last* are the means of the load's first and last {} s; *trend* is the least-squares slope over the load's second half. Growth beyond the tolerance fails; live-object counts must also return exactly to their settle value. Machine-wide quantities (†) also move with whatever else runs on the machine.\n", f.plan.window.as_secs());
    let _ = writeln!(
        o,
        "| quantity | settle | cool-down | first | last | trend /min | tolerance | verdict |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---|");
    for (q, j) in f.judged {
        let show = |v: Option<f64>| v.map_or("–".to_owned(), |v| q.unit.show(v));
        let trend = j.slope_per_min.map_or("–".to_owned(), |s| {
            let sign = if s >= 0.0 { "+" } else { "−" };
            format!("{sign}{}", q.unit.show(s.abs()))
        });
        let verdict = match j.verdict {
            Verdict::Pass => "PASS".to_owned(),
            Verdict::Fail => format!("**FAIL**: {}", j.why.join("; ")),
            Verdict::Info => {
                if j.why.is_empty() {
                    "info (not judged in a quick run)".to_owned()
                } else {
                    format!("info (not judged in a quick run): {}", j.why.join("; "))
                }
            }
            Verdict::NoData => "no data".to_owned(),
        };
        let dagger = if q.machine_wide { " †" } else { "" };
        let _ = writeln!(
            o,
            "| {}{dagger} | {} | {} | {} | {} | {trend} | {} | {verdict} |",
            q.label,
            show(j.settle),
            show(j.cool),
            show(j.first),
            show(j.last),
            q.unit.show(j.tolerance),
        );
    }

    let others: Vec<f64> = f
        .samples
        .iter()
        .filter(|s| s.phase == Phase::Load)
        .filter_map(|s| s.values.get("other_tcp_sockets").copied())
        .collect();
    if !others.is_empty() {
        let max = others.iter().copied().fold(0.0, f64::max);
        let mean = others.iter().sum::<f64>() / others.len() as f64;
        let _ = writeln!(o, "\nThe rest of the machine during the load (†): {mean:.0} TCP sockets on average outside the soak's namespaces, {max:.0} at most (sockstat `alloc` minus the soak's sockets; near 0 on a quiet machine).");
    }

    let _ = writeln!(o, "\n## CPU\n");
    for (key, who) in [
        (
            "generator_cpu_s",
            "clients and upstream app (the soak process, sampler excluded)",
        ),
        ("daemon_cpu_s", "daemon"),
    ] {
        if let Some(r) = rate(f.samples, Phase::Load, key) {
            let _ = writeln!(o, "- {who}: {:.0}% of one core during the load", r * 100.0);
        }
    }
    if let Some((a, b)) = phase_span(f.samples, Phase::Load) {
        let _ = writeln!(o, "- load phase sampled from {a:.0} s to {b:.0} s");
    }

    let _ = writeln!(o, "\n## Daemon log\n");
    let levels: Vec<String> = f
        .log
        .by_level
        .iter()
        .map(|(l, n)| format!("{l}: {n}"))
        .collect();
    let _ = writeln!(
        o,
        "Lines by level: {}.",
        if levels.is_empty() {
            "none".to_owned()
        } else {
            levels.join(", ")
        }
    );
    if !f.log.notable.is_empty() {
        let _ = writeln!(o, "\nFirst warnings and errors (up to 50):\n\n```");
        for line in &f.log.notable {
            let _ = writeln!(o, "{line}");
        }
        let _ = writeln!(o, "```");
    }
    o
}

/// The judged quantities, in report order.
pub fn judge_all(plan: &Plan, samples: &[Sample]) -> Vec<(Quantity, Judgement)> {
    verdict::quantities(samples)
        .into_iter()
        .map(|q| {
            let j = verdict::judge(plan, samples, &q);
            (q, j)
        })
        .collect()
}
