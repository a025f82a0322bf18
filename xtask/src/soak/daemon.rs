//! The daemon under soak: the release binary with default flags (so the eBPF fast path
//! is on when it loads, and logging is the production default: JSON, info, one access
//! line per request) in the machine namespace. Its log is read through a pipe and
//! tallied by level instead of stored: a 30-minute run writes hundreds of MB of it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bench::procs;
use tests::Topology;

/// Warning and error lines kept in full for the report.
const NOTABLE_KEPT: usize = 50;

#[derive(Default)]
pub struct LogTally {
    /// Lines per level (`INFO`, `WARN`…; `other` for lines that are not the daemon's JSON).
    pub by_level: BTreeMap<String, u64>,
    /// The first warning and error lines.
    pub notable: Vec<String>,
}

pub struct Daemon {
    child: Mutex<Child>,
    pub pid: i32,
    pub log: std::sync::Arc<Mutex<LogTally>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Daemon {
    pub async fn start(topo: &Topology, binary: &Path) -> Result<Daemon> {
        let mut cmd = topo
            .machine
            .command(binary.to_str().context("binary path")?);
        // Default flags and the production log settings: nothing set from this shell.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PROJECT_INGRESS_PROXY_") {
                cmd.env_remove(key);
            }
        }
        cmd.env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        procs::prepare(&mut cmd);
        let mut child = cmd.spawn().context("spawning the daemon")?;
        let pid = child.id() as i32;
        procs::live(pid, true);
        let log = std::sync::Arc::new(Mutex::new(LogTally::default()));
        let mut readers = Vec::new();
        let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
        for pipe in [out, err] {
            let log = log.clone();
            readers.push(std::thread::spawn(move || tally(pipe, &log)));
        }
        let daemon = Daemon {
            child: Mutex::new(child),
            pid,
            log,
            readers,
        };
        daemon.wait_serving(topo).await?;
        Ok(daemon)
    }

    /// Waits (bounded) until `/health` answers from the client namespace and the admin
    /// port's `/ready` from the machine namespace.
    async fn wait_serving(&self, topo: &Topology) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let health = std::net::SocketAddr::new(topo.machine_ip, super::wire::PROXY_PORT);
        let admin = std::net::SocketAddr::from(super::wire::ADMIN_ADDR);
        loop {
            if let Some(status) = self.exited() {
                bail!("the daemon exited at start-up ({status})");
            }
            let ok = get(topo.client.connect(health), "/health")
                .await
                .is_ok_and(|r| r.0 == 200)
                && get(topo.machine.connect(admin), "/ready")
                    .await
                    .is_ok_and(|r| r.0 == 200);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the daemon did not answer /health and /ready within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `Some(status)` once the daemon has exited.
    pub fn exited(&self) -> Option<String> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }

    /// SIGTERM, then waits (bounded) for the exit; returns how it ended.
    pub async fn stop(&self, limit: Duration) -> String {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            if Instant::now() > deadline {
                return format!("still running {limit:?} after SIGTERM (killed)");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The log tally once both pipes are closed (after the exit).
    pub fn finish_log(mut self) -> LogTally {
        self.kill();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: our child's own process group.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        let _ = child.kill();
        let _ = child.wait();
        procs::live(self.pid, false);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tally(pipe: Box<dyn std::io::Read + Send>, log: &Mutex<LogTally>) {
    for line in BufReader::new(pipe).lines().map_while(|l| l.ok()) {
        let level = line
            .split_once("\"level\":\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map_or("other", |(level, _)| level)
            .to_owned();
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        let notable = level != "INFO" && level != "DEBUG" && level != "TRACE";
        if notable && log.notable.len() < NOTABLE_KEPT {
            log.notable.push(line.clone());
        }
        *log.by_level.entry(level).or_default() += 1;
    }
}

/// A one-shot HTTP/1.1 GET on a fresh connection: status and body (bounded: 3 s).
pub async fn get(
    connect: impl std::future::Future<Output = Result<tokio::net::TcpStream>>,
    path: &str,
) -> Result<(u16, String)> {
    let exchange = async {
        let mut stream = connect.await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no status line")?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("GET {path}: no answer within 3 s"))?
}

/// How the daemon was started, for the report.
pub fn command_line(binary: &Path) -> String {
    format!(
        "`{}` with no flags, and no PROJECT_INGRESS_PROXY_* or RUST_LOG in its environment",
        binary.display()
    )
}
