//! [`Rig`]: the daemon in the machine namespace of a fresh client/machine topology, and
//! the check every fast-path test ends with: each tunnel's closing line.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::task::JoinHandle;

use super::Result;
use crate::Setup;

/// The daemon in the machine namespace of a fresh client/machine topology.
pub struct Rig {
    pub setup: Setup,
    /// The start line reported the in-kernel fast path: its maps must exist.
    pub fast_path: bool,
    /// FASTPATH_ECHO_LOG: copies the daemon's log lines to stderr.
    echo: Option<JoinHandle<()>>,
    /// Request id → (bytes client → upstream, bytes upstream → client) of every tunnel
    /// the test moved and checked: its closing line must say exactly that.
    expected: Mutex<HashMap<String, (u64, u64)>>,
    /// This test provokes kernel-side loss on purpose.
    pub allow_kernel_loss: bool,
    /// Last: released once the daemon is gone.
    _turn: Turn,
}

/// Which tests of the binary may run beside this one. A bound that the daemon's reaction
/// time decides (the slow-reader tests' kernel queue peak: what arrives between the
/// verdict's request and the hand-off) is checked with the machine to itself: on these 2
/// CPUs the other tests' load would decide it, not the daemon. The same bound under load
/// is measured, not asserted (`cargo xtask measure stalled-memory`).
static TURNS: RwLock<()> = RwLock::const_new(());

enum Turn {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(echo) = self.echo.take() {
            echo.abort();
        }
        if !std::thread::panicking() {
            self.check_closing_lines();
        }
    }
}

impl Rig {
    /// Every test's last check: each tunnel logs exactly one closing line; those the test
    /// planned log the bytes it moved each way, exactly; the kernel dropped and misparsed
    /// nothing (SPEC §4: kernel-side loss must never be silent).
    fn check_closing_lines(&self) {
        let expected = self.expected.lock().unwrap().clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        let by_id = loop {
            let mut by_id: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
            for line in self.log_lines("tunnel closed") {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let id = v["request_id"].as_str().unwrap_or_default().to_owned();
                by_id.entry(id).or_default().push(v);
            }
            let missing = expected
                .keys()
                .filter(|id| !by_id.contains_key(*id))
                .count();
            if missing == 0 || Instant::now() > deadline {
                break by_id;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for (id, (up, down)) in &expected {
            let lines = by_id
                .get(id)
                .unwrap_or_else(|| panic!("tunnel {id} logged no closing line"));
            let v = &lines[0];
            assert_eq!(v["end"], "closed", "{v}");
            assert_eq!(v["client_to_upstream"].as_u64(), Some(*up), "{v}");
            assert_eq!(v["upstream_to_client"].as_u64(), Some(*down), "{v}");
        }
        for (id, lines) in &by_id {
            assert_eq!(
                lines.len(),
                1,
                "tunnel {id} logged {} closing lines",
                lines.len()
            );
            let v = &lines[0];
            for (total, kernel) in [
                ("client_to_upstream", "client_to_upstream_kernel"),
                ("upstream_to_client", "upstream_to_client_kernel"),
            ] {
                assert!(v[kernel].as_u64() <= v[total].as_u64(), "{v}");
            }
            if !self.allow_kernel_loss {
                assert_eq!(
                    v["kernel_dropped"], 0,
                    "the kernel dropped tunnel bytes: {v}"
                );
                assert_eq!(
                    v["kernel_misparsed"], 0,
                    "the kernel misparsed tunnel bytes: {v}"
                );
            }
        }
        if !self.allow_kernel_loss {
            let warned = self.log_lines("the kernel lost or misparsed");
            assert!(warned.is_empty(), "{warned:?}");
        }
        // Every hand-off took its socket out of the kernel's map under the socket's lock
        // (the unsplice iterator), never by the racy removal from user space.
        let racy = self.log_lines("removed a live socket from SOCKS from user space");
        assert!(racy.is_empty(), "{racy:?}");
        if self.fast_path {
            let unguarded = self.log_lines("no unsplice iterator");
            assert!(unguarded.is_empty(), "{unguarded:?}");
        }
    }

    /// Records what a tunnel moved, for the closing-line check when the rig is dropped.
    pub fn expect(&self, request_id: &str, up: u64, down: u64) {
        self.expected
            .lock()
            .unwrap()
            .insert(request_id.to_owned(), (up, down));
    }
}

impl Rig {
    /// The daemon with `--splice <splice>`.
    pub async fn start(splice: &str) -> Rig {
        Self::start_args(&["--splice", splice]).await
    }

    pub async fn start_args(args: &[&str]) -> Rig {
        Self::start_with(args, &[]).await
    }

    /// The daemon with `args` and extra environment; with `--splice ebpf`, the start line
    /// must report the in-kernel fast path.
    pub async fn start_with(args: &[&str], env: &[(&str, &str)]) -> Rig {
        Self::start_turn(args, env, false).await
    }

    /// [`start`](Self::start), once no other test of the binary runs, and none starts
    /// until this rig is dropped (see [`TURNS`]).
    pub async fn start_alone(splice: &str) -> Rig {
        Self::start_turn(&["--splice", splice], &[], true).await
    }

    async fn start_turn(args: &[&str], env: &[(&str, &str)], alone: bool) -> Rig {
        let turn = if alone {
            Turn::Alone(TURNS.write().await)
        } else {
            Turn::Shared(TURNS.read().await)
        };
        let splice = args
            .iter()
            .skip_while(|a| **a != "--splice")
            .nth(1)
            .copied()
            .unwrap_or("");
        let level = daemon_log_level();
        let mut env = env.to_vec();
        env.push(("RUST_LOG", level.as_str()));
        let setup = Setup::with_env(args, &env)
            .await
            .expect("starting the daemon in the machine namespace");
        let echo = std::env::var_os("FASTPATH_ECHO_LOG")
            .is_some_and(|v| v != "0")
            .then(|| echo_logs(setup.daemon.pid()));
        let mut rig = Rig {
            setup,
            fast_path: false,
            echo,
            expected: Mutex::new(HashMap::new()),
            allow_kernel_loss: false,
            _turn: turn,
        };
        // The harness returns once the listener answers; the start line follows the bind.
        let Some(start) = rig.wait_log("project-ingress-proxy started", 0).await else {
            panic!("no start line from the daemon:\n{}", rig.logs());
        };
        let v: serde_json::Value = serde_json::from_str(&start).unwrap();
        if splice == "ebpf" {
            assert_eq!(v["data_path"], "ebpf", "{start}");
        }
        rig.fast_path = v["data_path"] == "ebpf";
        rig.setup.daemon.settle().await;
        rig
    }

    /// Starts the daemon again on the same topology (after the previous one died).
    pub async fn restart(&mut self, args: &[&str]) {
        let level = daemon_log_level();
        self.setup.daemon = crate::Daemon::start(&self.setup.topo, args, &[("RUST_LOG", &level)])
            .await
            .expect("restarting the daemon");
        self.expected.lock().unwrap().clear();
        let start = self
            .wait_log("project-ingress-proxy started", 0)
            .await
            .expect("no start line");
        let v: serde_json::Value = serde_json::from_str(&start).unwrap();
        self.fast_path = v["data_path"] == "ebpf";
        self.setup.daemon.settle().await;
    }

    /// A TCP connection to the daemon from the client namespace, across the veth.
    pub async fn connect(&self) -> Result<TcpStream> {
        let socket = self.setup.topo.client.tcp_socket(false)?;
        Ok(socket.connect(self.setup.addr()).await?)
    }

    pub fn pid(&self) -> i32 {
        self.setup.daemon.pid()
    }

    pub fn alive(&self) -> bool {
        self.setup.daemon.alive()
    }

    /// The daemon's open descriptors (panics once the process is gone).
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    pub fn logs(&self) -> String {
        self.setup.daemon.logs()
    }

    /// The `nth` (from 0) daemon log line containing `needle`, waiting up to 10 s for it.
    pub async fn wait_log(&self, needle: &str, nth: usize) -> Option<String> {
        self.setup.daemon.wait_log_line(needle, nth).await
    }

    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.setup.daemon.log_lines(needle)
    }

    pub fn log_tail(&self, n: usize) -> String {
        self.setup.daemon.log_tail(n)
    }
}

/// `FASTPATH_DAEMON_LOG`: the daemon's `RUST_LOG` (default `info`).
fn daemon_log_level() -> String {
    std::env::var("FASTPATH_DAEMON_LOG").unwrap_or_else(|_| "info".into())
}

/// Copies the daemon's log (its stderr, a file the harness owns) to our stderr as it grows.
fn echo_logs(pid: i32) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut f) = tokio::fs::File::open(format!("/proc/{pid}/fd/2")).await else {
            eprintln!("FASTPATH_ECHO_LOG: cannot open the daemon's log");
            return;
        };
        let mut pending = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match f.read(&mut buf).await {
                Ok(0) => tokio::time::sleep(Duration::from_millis(50)).await,
                Ok(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=i).collect();
                        eprintln!("daemon: {}", String::from_utf8_lossy(&line[..i]));
                    }
                }
                Err(_) => return,
            }
        }
    })
}
