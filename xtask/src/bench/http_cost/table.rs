//! The probe's Markdown: medians with ratios to nginx, then every round's figures.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use super::{Options, Round, System, NGINX, TARGET};
use crate::bench::measure::median;
use crate::bench::report::fmt_num;
use crate::bench::results;

pub fn markdown(
    opts: &Options,
    daemon: &Path,
    systems: &[System],
    rounds: &[Vec<Result<Round, String>>],
    took: Duration,
    load_start: &str,
) -> String {
    let ok = |i: usize| -> Vec<Round> {
        rounds[i]
            .iter()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect()
    };
    let med = |i: usize, f: fn(&Round) -> f64| median(ok(i).iter().map(f).collect());
    let nginx = systems.iter().position(|s| s.label == NGINX);
    let ratio = |i: usize, f: fn(&Round) -> f64| match nginx {
        Some(n) if med(n, f).is_finite() && med(n, f) > 0.0 && med(i, f).is_finite() => {
            format!("{:.2}", med(i, f) / med(n, f))
        }
        _ => "–".into(),
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# HTTP cost per request on loopback (issue 8's probe), {}\n",
        results::date("+%Y-%m-%d %H:%M UTC")
    );
    let _ = writeln!(
        s,
        "- Method: one network namespace, everything on its loopback. `wrk -t2 -c64 -d{}s` `GET /` \
         of a 3-byte body from an upstream nginx (1 worker, `return 200`); every proxy routes by \
         `X-Iterate-Proxy-Target-Host: {TARGET}`, rewrites `Host`, removes the target header and \
         adds `X-Iterate-Proxy-Via` (the upstream answers 421 otherwise; any non-2xx fails the run). \
         {} round(s), systems interleaved round-robin (each round starts one system later), after a \
         1 s untimed warm-up each. Figures are medians over the rounds. Proxy CPU = utime+stime of \
         all the proxy's processes and threads (/proc/<pid>/stat) over the c=64 run / requests. \
         c=1 latency: a separate `wrk -t1 -c1 -d{}s` run right after each c=64 run. \
         Log B/req: growth of the daemon's log file (its stderr) per request.",
        opts.secs, opts.rounds, opts.latency_secs
    );
    let _ = writeln!(
        s,
        "- Daemon: `{}`{} (default `--splice auto`; default logging = no `RUST_LOG`, JSON since \
         stderr is a file).",
        daemon.display(),
        if opts.daemon_args.is_empty() {
            String::new()
        } else {
            format!(" with `{}`", opts.daemon_args.join(" "))
        }
    );
    if let Some(b) = &opts.baseline_daemon {
        let _ = writeln!(s, "- Baseline daemon build: `{}`.", b.display());
    }
    let _ = writeln!(
        s,
        "- Commit: {} · {} · {}\n- Run took {:.0} s; load average {load_start} at start, {} at \
         the end. Client, proxies and upstream share the machine's CPUs: a proxy that spends more \
         CPU leaves less for the others, so req/s falls with it. Compare within one run.\n",
        commit(),
        results::machine(),
        results::versions(),
        took.as_secs_f64(),
        results::loadavg(),
    );
    let _ = writeln!(
        s,
        "| system | req/s ↑ | ×nginx | proxy CPU µs/req ↓ | ×nginx | c=1 p50 µs ↓ | c=1 p99 µs ↓ | ×nginx (p99) | log B/req |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, sys) in systems.iter().enumerate() {
        if ok(i).is_empty() {
            let why = rounds[i]
                .iter()
                .find_map(|r| r.as_ref().err())
                .map_or("no run", |e| e.as_str());
            let _ = writeln!(
                s,
                "| {} | **FAILED**: {} | | | | | | | |",
                sys.label,
                why.replace('|', "/")
            );
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            sys.label,
            fmt_num(med(i, |r| r.req_per_s)),
            ratio(i, |r| r.req_per_s),
            fmt_num(med(i, |r| r.cpu_us_per_req)),
            ratio(i, |r| r.cpu_us_per_req),
            fmt_num(med(i, |r| r.c1_p50_us)),
            fmt_num(med(i, |r| r.c1_p99_us)),
            ratio(i, |r| r.c1_p99_us),
            fmt_num(med(i, |r| r.log_bytes_per_req)),
        );
    }
    let _ = writeln!(s, "\n## Every round\n");
    let _ = writeln!(
        s,
        "req/s · proxy CPU µs/req · c=1 p50/p99 µs, per round in order.\n"
    );
    let _ = writeln!(s, "| system | rounds |\n|---|---|");
    for (i, sys) in systems.iter().enumerate() {
        let cells: Vec<String> = rounds[i]
            .iter()
            .map(|r| match r {
                Ok(r) => format!(
                    "{} · {} · {}/{}",
                    fmt_num(r.req_per_s),
                    fmt_num(r.cpu_us_per_req),
                    fmt_num(r.c1_p50_us),
                    fmt_num(r.c1_p99_us)
                ),
                Err(_) => "FAILED".into(),
            })
            .collect();
        let _ = writeln!(s, "| {} | {} |", sys.label, cells.join(" ‖ "));
    }
    s
}

/// The workspace's commit, marked when the tree has changes.
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(crate::workspace_root())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    format!(
        "`{head}`{}",
        if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        }
    )
}
