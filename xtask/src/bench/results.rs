//! The results document (Markdown + SVG chart + the peers' configs as run) and where it
//! goes: a full run updates `bench/results/`; a quick run (the test suite's smoke run)
//! writes under `target/bench-quick/` and never touches tracked files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use super::report::{self, Table};
use super::systems::{self, UPSTREAM_PORT, UPSTREAM_PORT_COUNT};

/// Where a run's results go.
pub fn out_dir(root: &Path, quick: bool) -> PathBuf {
    if quick {
        root.join("target/bench-quick")
    } else {
        root.join("bench/results")
    }
}

pub struct Summary<'a> {
    pub quick: bool,
    /// One clause per scenario (and the warm-up).
    pub parameters: &'a [String],
    pub tables: &'a [Table],
    pub took: Duration,
    /// Load average at the start and at the end.
    pub load: &'a str,
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Versions of the peers and tools, one line.
pub fn versions() -> String {
    let nginx = Command::new("nginx")
        .arg("-v")
        .output()
        .map(|o| o.stderr)
        .unwrap_or_default();
    let wrk = Command::new("wrk")
        .arg("-v")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    format!(
        "{} · {} · {} · node {}",
        sh("haproxy", &["-v"]).lines().next().unwrap_or(""),
        String::from_utf8_lossy(&nginx).trim(),
        String::from_utf8_lossy(&wrk)
            .lines()
            .next()
            .unwrap_or("")
            .trim(),
        sh("node", &["--version"]),
    )
}

/// "Kernel: … · CPUs: n × model"
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let ncpu = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("Kernel: {} · CPUs: {ncpu} × {cpu}", sh("uname", &["-r"]))
}

pub fn date(format: &str) -> String {
    sh("date", &["-u", format])
}

/// The three load averages from /proc/loadavg.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes the results into `out` (see `out_dir`), prints the Markdown, and returns the
/// Markdown file's path. `root` names the folder in the text relative to the workspace.
pub fn write(root: &Path, out: &Path, s: &Summary) -> Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    let shown = out.strip_prefix(root).unwrap_or(out).display().to_string();
    let ncpu = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kind = if s.quick { "quick" } else { "full" };
    let last_port = UPSTREAM_PORT + UPSTREAM_PORT_COUNT - 1;
    let mut md = String::new();
    md.push_str(&format!(
        "# project-ingress-proxy benchmark ({kind}), {}\n\n",
        date("+%Y-%m-%d %H:%M UTC")
    ));
    md.push_str(&format!(
        "- {}\n- Versions: {} · bench_tool (Rust, hdrhistogram) clients\n\
         - Topology: client netns ⟷ veth ⟷ machine netns (proxy on :{}, upstream app on 127.0.0.1:{UPSTREAM_PORT}–{last_port}, \
         one process; `direct` reaches the upstream across the veth). Client, proxy and upstream share the same {ncpu} CPUs.\n\
         - Logging: the daemon runs with its default logging, as deployed: no `RUST_LOG` (level info), JSON \
         because its stderr is not a terminal, one access line per request, written to a file as journald \
         would receive it — so the per-request log cost is in its figures. nginx and HAProxy run with their \
         access logs off, Node with none.\n\
         - Parameters: {}\n- Run took {:.0} s; load average {} (other work on the machine \
         during the run shifts absolute figures between runs; ratios within one run are the point).\n\n",
        machine(),
        versions(),
        systems::PROXY_PORT,
        s.parameters.join("; "),
        s.took.as_secs_f64(),
        s.load,
    ));
    md.push_str("Each figure is followed by its ratio to `direct` (no proxy) and to `daemon userspace` \
                 (`--splice off`). ↑ higher is better, ↓ lower is better. A system that moved wrong or \
                 missing bytes is **FAILED**, never fast.\n\n## Systems\n\n");
    for sys in systems::ALL {
        md.push_str(&format!("- **{}**: {}\n", sys.name(), sys.describe()));
    }
    md.push_str(&format!(
        "\nConfigs as run: `{shown}/configs/`.\n\n## Results\n\n"
    ));
    for t in s.tables {
        md.push_str(&t.markdown());
    }
    print!("{md}");
    let names: Vec<&str> = systems::ALL.iter().map(|s| s.name()).collect();
    let svg = report::svg(s.tables, &names);
    let main = if s.quick {
        // The smoke run keeps only its latest result.
        out.join("latest.md")
    } else {
        let dated = date("+%Y-%m-%d");
        std::fs::write(out.join(format!("{dated}-full.svg")), &svg)?;
        let dated = out.join(format!("{dated}-full.md"));
        std::fs::write(&dated, &md)?;
        dated
    };
    std::fs::write(out.join("latest.md"), &md)?;
    std::fs::write(out.join("latest.svg"), &svg)?;
    systems::write_configs(&out.join("configs"), Path::new("/tmp/ipx-bench"))?;
    Ok(main)
}
