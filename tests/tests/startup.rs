//! SPEC §4/§5 start-up behaviour of `--splice`: `auto` uses the fast path when it can
//! load and falls back with one clear log line when it cannot; `ebpf` fails fast; and the
//! three capabilities the systemd unit grants (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON) are
//! enough for the fast path to carry a tunnel, as an unprivileged user.
//!
//! `--zero-hop on` needs the same three capabilities and nothing more; `auto` stays off.
//!
//! Privileges are dropped with util-linux `setpriv`. The daemon listens on loopback here
//! (no namespace needed: nothing leaves 127.0.0.1).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tests::pattern::{self, Verifier};
use tests::upstream::read_head;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

const CAPS: &str = "+bpf,+net_admin,+perfmon";

/// The daemon run through `setpriv` as `nobody` with exactly `caps` (e.g. "" or CAPS).
fn daemon(caps: &str, splice: &str) -> Result<(Child, TempBin)> {
    daemon_with(caps, &["--splice", splice])
}

/// `daemon` with other arguments.
fn daemon_with(caps: &str, args: &[&str]) -> Result<(Child, TempBin)> {
    // A copy the unprivileged user can execute whatever the permissions of target/
    // (removed when the returned guard drops).
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let bin = std::env::temp_dir().join(format!("ipx-startup-{}-{n}", std::process::id()));
    std::fs::copy(tests::daemon::binary(), &bin)?;
    let set = format!("-all{}{caps}", if caps.is_empty() { "" } else { "," });
    let child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg(format!("--bounding-set={set}"))
        .arg("--")
        .arg(&bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            // Several run at once in this namespace: no fixed admin port.
            "--admin-listen",
            "off",
        ])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    Ok((child?, TempBin(bin)))
}

/// The daemon's executable copy, removed when the test is done with the daemon.
struct TempBin(std::path::PathBuf);

impl Drop for TempBin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

type Log = tokio::io::Lines<BufReader<tokio::process::ChildStderr>>;

/// Next JSON log line (None at the daemon's exit).
async fn next(log: &mut Log) -> Result<Option<serde_json::Value>> {
    loop {
        let line = tokio::time::timeout(Duration::from_secs(10), log.next_line())
            .await
            .context("no log line for 10 s")??;
        let Some(line) = line else {
            return Ok(None);
        };
        if let Ok(v) = serde_json::from_str(&line) {
            return Ok(Some(v));
        }
    }
}

/// Log lines up to and including the start line (or until the daemon exits).
async fn lines_until_started(child: &mut Child) -> Result<(Vec<serde_json::Value>, Log)> {
    let mut log = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let mut seen = Vec::new();
    while let Some(v) = next(&mut log).await? {
        let started = v["message"] == "project-ingress-proxy started";
        seen.push(v);
        if started {
            break;
        }
    }
    Ok((seen, log))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_without_privileges_falls_back_with_one_line() -> Result<()> {
    let (mut child, _bin) = daemon("", "auto")?;
    let (lines, _log) = lines_until_started(&mut child).await?;
    let start = lines.last().context("no log")?;
    ensure!(
        start["message"] == "project-ingress-proxy started",
        "{lines:?}"
    );
    assert_eq!(start["data_path"], "userspace-copy");
    let warnings: Vec<_> = lines.iter().filter(|v| v["level"] == "WARN").collect();
    assert_eq!(warnings.len(), 1, "{lines:?}");
    let w = warnings[0];
    assert_eq!(
        w["message"],
        "in-kernel fast path unavailable, tunnels use the userspace relay"
    );
    assert!(
        w["error"].as_str().unwrap_or("").contains("CAP_BPF"),
        "the line says what is missing: {w}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_without_privileges_fails_fast() -> Result<()> {
    let (mut child, _bin) = daemon("", "ebpf")?;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .context("--splice ebpf without privileges kept running")??;
    assert!(!status.success());
    Ok(())
}

/// The unit grants no capability it does not need: without any one of the three,
/// `--splice ebpf` cannot start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_needs_each_of_the_units_capabilities() -> Result<()> {
    for missing in ["bpf", "net_admin", "perfmon"] {
        let caps: Vec<String> = ["bpf", "net_admin", "perfmon"]
            .iter()
            .filter(|c| **c != missing)
            .map(|c| format!("+{c}"))
            .collect();
        let (mut child, _bin) = daemon(&caps.join(","), "ebpf")?;
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .with_context(|| format!("--splice ebpf without CAP_{missing} kept running"))??;
        assert!(!status.success(), "started without CAP_{missing}");
    }
    Ok(())
}

/// As `nobody` with the unit's three capabilities, `auto` loads the fast path and a
/// tunnel's bytes (1 MiB each way, checked) move in the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_with_the_units_capabilities_splices_in_the_kernel() -> Result<()> {
    let (mut child, _bin) = daemon(CAPS, "auto")?;
    let (lines, mut log) = lines_until_started(&mut child).await?;
    let start = lines.last().context("no log")?;
    ensure!(
        start["message"] == "project-ingress-proxy started",
        "{lines:?}"
    );
    assert_eq!(start["data_path"], "ebpf", "{lines:?}");
    let addr: std::net::SocketAddr = start["listen"].as_str().context("listen")?.parse()?;

    // Upstream: answers 101, then echoes.
    let upstream = TcpListener::bind("127.0.0.1:0").await?;
    let port = upstream.local_addr()?.port();
    let echo = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await?;
        read_head(&mut s).await?;
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n",
        )
        .await?;
        let (mut r, mut w) = s.split();
        tokio::io::copy(&mut r, &mut w).await?;
        w.shutdown().await?;
        anyhow::Ok(())
    });

    let mut c = TcpStream::connect(addr).await?;
    c.write_all(
        format!(
            "GET /t HTTP/1.1\r\nHost: x\r\nX-Iterate-Proxy-Target-Host: localhost:{port}\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let (head, early) = read_head(&mut c).await?;
    ensure!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (mut r, mut w) = c.into_split();
    let total = 1u64 << 20;
    let send = async {
        pattern::send(&mut w, 7, 0, total).await?;
        w.shutdown().await?;
        anyhow::Ok(())
    };
    let mut v = Verifier::new(7);
    let recv = async {
        v.feed(&early)?;
        pattern::receive(&mut r, &mut v, total).await
    };
    let (a, got) =
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(send, recv) })
            .await
            .context("tunnel stalled")?;
    a?;
    assert_eq!(got?, total);
    echo.await??;
    let closed = loop {
        let v = next(&mut log).await?.context("daemon exited")?;
        if v["message"] == "tunnel closed" {
            break v;
        }
    };
    assert_eq!(closed["relay"], "ebpf", "{closed}");
    assert_eq!(closed["end"], "closed", "{closed}");
    assert_eq!(
        closed["in_kernel"],
        2 * total,
        "every byte moved in the kernel: {closed}"
    );
    Ok(())
}

/// `--zero-hop on` starts as `nobody` with the unit's three capabilities (it loads its
/// programs and attaches the capture program to the cgroup v2 root), and exits at start-up
/// without any one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_hop_on_needs_exactly_the_units_capabilities() -> Result<()> {
    let (mut child, _bin) = daemon_with(CAPS, &["--zero-hop", "on"])?;
    let (lines, _log) = lines_until_started(&mut child).await?;
    let start = lines.last().context("no log")?;
    ensure!(
        start["message"] == "project-ingress-proxy started",
        "{lines:?}"
    );
    assert!(
        start["zero_hop"]
            .as_str()
            .is_some_and(|c| c.starts_with('/')),
        "zero-hop attached to a cgroup: {start}"
    );
    for missing in ["bpf", "net_admin", "perfmon"] {
        let caps: Vec<String> = ["bpf", "net_admin", "perfmon"]
            .iter()
            .filter(|c| **c != missing)
            .map(|c| format!("+{c}"))
            .collect();
        let (mut child, _bin) = daemon_with(&caps.join(","), &["--zero-hop", "on"])?;
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .with_context(|| format!("--zero-hop on without CAP_{missing} kept running"))??;
        assert!(!status.success(), "started without CAP_{missing}");
    }
    Ok(())
}

/// `--zero-hop auto` (the default) does not turn zero-hop on (docs/zero-hop.md): no
/// capture program is attached, and the start line says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_hop_auto_stays_off() -> Result<()> {
    let (mut child, _bin) = daemon_with(CAPS, &[])?;
    let (lines, _log) = lines_until_started(&mut child).await?;
    let start = lines.last().context("no log")?;
    ensure!(
        start["message"] == "project-ingress-proxy started",
        "{lines:?}"
    );
    assert!(start["zero_hop"].is_null(), "{start}");
    assert!(
        start["zero_hop_reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("auto: off")),
        "{start}"
    );
    Ok(())
}
