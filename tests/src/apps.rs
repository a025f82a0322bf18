//! Test apps as separate processes (`tests/apps/`, `zh_app`): the same small protocol in
//! Python asyncio, Python blocking sockets, Node `net`, Node `ws`, tokio and Rust blocking
//! sockets, so a test can run one scenario against each kind of app (event loops,
//! edge-triggered and level-triggered, threads with blocking calls).
//!
//! Each app answers an upgrade-style request with a 101 and runs the command in the path
//! (`/source/SEED/N`, `/sink/SEED/N`, `/both/S1/N1/S2/N2`, `/echo`, `/reset/N`, `/hold`),
//! checks every byte it receives (`tests::stamp`) and prints one `done …` line per
//! connection.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppKind {
    PyAsyncio,
    PyBlocking,
    NodeNet,
    NodeWs,
    Tokio,
    RustBlocking,
}

impl AppKind {
    pub const ALL: [AppKind; 6] = [
        AppKind::PyAsyncio,
        AppKind::PyBlocking,
        AppKind::NodeNet,
        AppKind::NodeWs,
        AppKind::Tokio,
        AppKind::RustBlocking,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AppKind::PyAsyncio => "python-asyncio",
            AppKind::PyBlocking => "python-blocking",
            AppKind::NodeNet => "node-net",
            AppKind::NodeWs => "node-ws",
            AppKind::Tokio => "tokio",
            AppKind::RustBlocking => "rust-blocking",
        }
    }

    /// Speaks WebSocket (binary messages) after the upgrade instead of raw bytes.
    pub fn websocket(self) -> bool {
        self == AppKind::NodeWs
    }

    /// Reads with blocking sockets in one thread while another writes.
    pub fn blocking(self) -> bool {
        matches!(self, AppKind::PyBlocking | AppKind::RustBlocking)
    }

    /// Produces and checks bytes at memory speed (the others are interpreted).
    pub fn fast(self) -> bool {
        matches!(self, AppKind::Tokio | AppKind::RustBlocking)
    }
}

fn apps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("apps")
}

/// Installs the Node apps' one dependency (`ws`) from the lock file when missing.
fn ensure_node_modules() -> Result<()> {
    let dir = apps_dir().join("node");
    if dir.join("node_modules/ws").exists() {
        return Ok(());
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--silent"])
        .current_dir(&dir)
        .status()
        .context("running npm ci in tests/apps/node")?;
    if !status.success() {
        bail!("npm ci in tests/apps/node failed");
    }
    Ok(())
}

/// A running app.
pub struct App {
    pub kind: AppKind,
    pub port: u16,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl App {
    /// Starts an app in `ns`, listening on all its addresses (127.0.0.1 for the daemon,
    /// the veth address for a direct connection). `rust_app`: the `zh_app` binary.
    pub fn start(kind: AppKind, ns: &Netns, rust_app: &Path) -> Result<App> {
        let dir = apps_dir();
        let mut cmd = match kind {
            AppKind::PyAsyncio | AppKind::PyBlocking => {
                let mut c = ns.command("python3");
                c.arg("-u")
                    .arg(dir.join("zh_app.py"))
                    .arg(if kind == AppKind::PyAsyncio {
                        "asyncio"
                    } else {
                        "blocking"
                    });
                c
            }
            AppKind::NodeNet | AppKind::NodeWs => {
                ensure_node_modules()?;
                let mut c = ns.command("node");
                c.arg(dir.join("node/zh_app.js"))
                    .arg(if kind == AppKind::NodeWs { "ws" } else { "net" });
                c
            }
            AppKind::Tokio | AppKind::RustBlocking => {
                let mut c = ns.command(rust_app.to_str().unwrap());
                c.arg(if kind == AppKind::Tokio {
                    "tokio"
                } else {
                    "blocking"
                });
                c
            }
        };
        cmd.arg("0")
            .env("ZH_BIND", "0.0.0.0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", kind.name()))?;
        let stdout = child.stdout.take().unwrap();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if let Some(p) = line.strip_prefix("listening ") {
                    let _ = port_tx.send(p.trim().parse::<u16>().ok());
                } else {
                    sink.lock().unwrap().push(line);
                }
            }
        });
        let port = port_rx
            .recv_timeout(Duration::from_secs(20))
            .ok()
            .flatten()
            .with_context(|| format!("{} did not start listening", kind.name()))?;
        Ok(App {
            kind,
            port,
            child,
            lines,
        })
    }

    pub fn pid(&self) -> i32 {
        // `ip netns exec` execs the program: the child is the app itself.
        self.child.id() as i32
    }

    /// CPU time the app has used so far (user + system), in clock ticks (1/100 s).
    pub fn cpu_ticks(&self) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // After the command: state is field 3, utime 14 and stime 15 (1-based, whole line).
        let get = |i: usize| {
            fields
                .get(i - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        get(14) + get(15)
    }

    /// The `done …` lines printed so far.
    pub fn done_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits (at most `limit`) until the app printed `n` `done` lines in all; returns them.
    pub async fn wait_done(&self, n: usize, limit: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + limit;
        loop {
            let lines = self.done_lines();
            if lines.len() >= n {
                return Ok(lines);
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: {} of {n} connections finished: {lines:?}",
                    self.kind.name(),
                    lines.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
