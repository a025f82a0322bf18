//! Small-request load with wrk: req/s and latency percentiles from wrk's own histogram
//! (a Lua `done` hook prints them as JSON), plus the proxy's CPU per request.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::Value;

use super::context::Ctx;
use super::measure::proxy_cpu_secs;
use super::procs::{run_bounded, Proc};
use super::report::{Better, Column, Row};
use super::systems::System;

/// The columns of every small-request table, in the order `small_requests` fills them.
pub fn columns() -> Vec<Column> {
    use Better::*;
    vec![
        Column::new("req/s", Higher),
        Column::new("p50 ms", Lower),
        Column::new("p99 ms", Lower),
        Column::new("p99.9 ms", Lower),
        Column::new("proxy CPU µs/req", Lower),
    ]
}

/// Column note shared by the small-request tables.
pub const CPU_NOTE: &str = "Proxy CPU = utime+stime of all the proxy's processes and threads \
     (/proc/<pid>/stat of its process tree) over the wrk run, divided by the requests wrk \
     completed; the daemon's includes writing its JSON access line per request.";

const REPORTER: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50":%d,"p99":%d,"p999":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

/// Each wrk thread sends its requests to the targets in turn (one pre-formatted request
/// per target, so the Lua cost per request is a table lookup).
fn rotation(targets: &[String]) -> String {
    let list: Vec<String> = targets.iter().map(|t| format!("{t:?}")).collect();
    format!(
        r#"local targets = {{ {} }}
local reqs = {{}}
local next_req = 0
init = function(args)
  for _, t in ipairs(targets) do
    reqs[#reqs + 1] = wrk.format(nil, nil, {{ ["X-Iterate-Proxy-Target-Host"] = t }})
  end
end
request = function()
  next_req = next_req % #reqs + 1
  return reqs[next_req]
end
"#,
        list.join(", ")
    )
}

/// `GET path` over keep-alive with `conns` connections for `secs` seconds, spread over
/// `targets` (one target: a fixed header, wrk's fastest path). Fails on any non-2xx/3xx
/// response or more than 0.1% socket errors. Values: the columns of `columns()`.
pub fn small_requests(
    ctx: &Ctx,
    sys: System,
    proxy: Option<&Proc>,
    conns: u32,
    secs: u32,
    path: &str,
    targets: &[String],
) -> Row {
    let load = || -> Result<Summary> {
        let script = write_script(ctx.dir, targets)?;
        let headers: Vec<String> = match targets {
            [target] => vec![format!("X-Iterate-Proxy-Target-Host: {target}")],
            _ => Vec::new(),
        };
        let url = format!("http://{}{path}", ctx.addr(sys));
        run(
            ctx.topo.client.command("wrk"),
            conns.min(2),
            conns,
            secs,
            &script,
            &headers,
            &url,
        )
    };
    let (result, cpu_secs) = proxy_cpu_secs(proxy, load);
    match result {
        Ok(s) => Row::Values(vec![
            s.requests / s.secs,
            s.p50_us / 1000.0,
            s.p99_us / 1000.0,
            s.p999_us / 1000.0,
            cpu_secs * 1e6 / s.requests,
        ]),
        Err(e) => Row::Failed(format!("{e:#}")),
    }
}

/// What wrk reports for one run.
pub struct Summary {
    pub requests: f64,
    pub secs: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

/// Writes the Lua script for `targets` into `dir` (the reporter, plus the rotation when
/// there is more than one target); its path.
pub fn write_script(dir: &Path, targets: &[String]) -> Result<PathBuf> {
    let (name, mut script) = match targets {
        [_] | [] => ("report.lua", String::new()),
        _ => ("rotate.lua", rotation(targets)),
    };
    script.push_str(REPORTER);
    let path = dir.join(name);
    std::fs::write(&path, script)?;
    Ok(path)
}

/// Runs `wrk` (the command, e.g. inside a namespace, without arguments) and checks its
/// result: fails on any non-2xx/3xx response or more than 0.1% socket errors.
pub fn run(
    mut cmd: Command,
    threads: u32,
    conns: u32,
    secs: u32,
    script: &Path,
    headers: &[String],
    url: &str,
) -> Result<Summary> {
    cmd.args([
        "-t",
        &threads.to_string(),
        "-c",
        &conns.to_string(),
        "-d",
        &format!("{secs}s"),
        "--timeout",
        "5s",
        "-s",
        script.to_str().unwrap(),
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(url);
    let out = run_bounded(cmd, Duration::from_secs(secs as u64 + 30))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("WRKJSON "))
        .ok_or_else(|| {
            anyhow!(
                "wrk printed no summary: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let v: Value = serde_json::from_str(line)?;
    let g = |k: &str| v[k].as_f64().unwrap_or(0.0);
    if g("requests") < 1.0 {
        bail!("no request completed");
    }
    if g("status") > 0.0 {
        bail!("{} responses were not 2xx/3xx", g("status"));
    }
    let errors = g("connect") + g("write") + g("timeout");
    if errors > g("requests") * 0.001 {
        bail!(
            "socket errors: connect {} read {} write {} timeout {}",
            g("connect"),
            g("read"),
            g("write"),
            g("timeout")
        );
    }
    Ok(Summary {
        requests: g("requests"),
        secs: g("duration_us") / 1e6,
        p50_us: g("p50"),
        p99_us: g("p99"),
        p999_us: g("p999"),
    })
}
