//! The real daemon binary, started in the machine namespace.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::Topology;

pub const PORT: u16 = 8080;

/// Path of the daemon under test: $PROJECT_INGRESS_PROXY_BIN, else the newest build in target/.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PROJECT_INGRESS_PROXY_BIN") {
        return path.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target");
    ["release", "debug"]
        .iter()
        .map(|p| root.join(p).join("project-ingress-proxy"))
        .filter(|p| p.exists())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .expect("daemon binary not built: run `cargo xtask test` or `cargo build -p proxy-daemon`")
}

/// How the daemon is put into the machine namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// `ip netns exec` (its own /sys: no cgroup hierarchy visible).
    IpNetnsExec,
    /// `nsenter --net=` (the host's mounts: the cgroup v2 hierarchy is visible, as zero-hop
    /// needs). Like `ip netns exec`, nsenter execs the daemon: the child is the daemon.
    Nsenter,
}

pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    log_path: PathBuf,
    _dir: TempDir,
}

impl Daemon {
    /// Starts the daemon in the machine namespace with extra args and env, and waits until
    /// /health answers from the client namespace.
    pub async fn start(topo: &Topology, args: &[&str], env: &[(&str, &str)]) -> Result<Daemon> {
        Self::start_with_nofile(topo, args, env, None).await
    }

    /// `start`, choosing how the daemon enters the machine namespace.
    pub async fn start_with(
        topo: &Topology,
        args: &[&str],
        env: &[(&str, &str)],
        launch: Launch,
    ) -> Result<Daemon> {
        Self::spawn(topo, args, env, None, launch).await
    }

    /// Like [`Daemon::start`], with the process's open-file limit set to `(soft, hard)`.
    pub async fn start_with_nofile(
        topo: &Topology,
        args: &[&str],
        env: &[(&str, &str)],
        nofile: Option<(u64, u64)>,
    ) -> Result<Daemon> {
        Self::spawn(topo, args, env, nofile, Launch::IpNetnsExec).await
    }

    async fn spawn(
        topo: &Topology,
        args: &[&str],
        env: &[(&str, &str)],
        nofile: Option<(u64, u64)>,
        launch: Launch,
    ) -> Result<Daemon> {
        let dir = TempDir::new()?;
        let log_path = dir.0.join("daemon.log");
        let log = std::fs::File::create(&log_path)?;
        let binary = binary();
        let mut cmd = match launch {
            Launch::IpNetnsExec => topo.machine.command(binary.to_str().unwrap()),
            Launch::Nsenter => topo.machine.enter(binary.to_str().unwrap()),
        };
        cmd.args([
            "--listen",
            &format!("0.0.0.0:{PORT}"),
            "--log-format",
            "json",
        ])
        .args(args)
        .env_remove("PROJECT_INGRESS_PROXY_SECRET")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        if let Some((soft, hard)) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; the limit is inherited across exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().context("spawning the daemon")?;
        let mut daemon = Daemon {
            child,
            addr: SocketAddr::new(topo.machine_ip, PORT),
            log_path,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = daemon.child.try_wait()? {
                bail!("daemon exited at start-up ({status}):\n{}", daemon.logs());
            }
            if let Ok(stream) = topo.client.connect(daemon.addr).await {
                drop(stream);
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                bail!("daemon did not start listening:\n{}", daemon.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn logs(&self) -> String {
        // Whole lines only: a read racing the daemon's `writev` may end mid-line, and a
        // half line would fail a JSON parse that the next read would pass.
        let mut bytes = std::fs::read(&self.log_path).unwrap_or_default();
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        bytes.truncate(whole);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The log once it contains `needle` (lines are written in batches, a few
    /// milliseconds after the event); fails after 5 s.
    pub async fn log_containing(&self, needle: &str) -> Result<String> {
        self.log_with_count(needle, 1).await
    }

    /// The log once `needle` occurs in it `n` times or more; fails after 5 s.
    pub async fn log_with_count(&self, needle: &str, n: usize) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let logs = self.logs();
            if logs.matches(needle).count() >= n {
                return Ok(logs);
            }
            if Instant::now() > deadline {
                let times = logs.matches(needle).count();
                bail!("the log contained {needle:?} {times} times, not {n}:\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Long enough for any line already logged to have reached the file (the daemon
    /// writes its log in batches, at most 100 ms apart): for checks that a line is absent.
    pub async fn settle_log(&self) {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// SIGSTOP, then waits until every thread of the daemon is stopped: `kill` returns
    /// before the group stop reaches each thread, and a thread still running (the fast
    /// path's real-time hand-off thread wins a CPU first) could act on what the test
    /// does next. Panics after 5 s.
    pub async fn stop_process(&self) {
        self.signal(libc::SIGSTOP);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid()))
                .expect("the daemon's threads")
                .filter_map(|t| t.ok())
                .map(|t| std::fs::read_to_string(t.path().join("stat")).unwrap_or_default());
            // The state follows the command name's closing parenthesis.
            let running = tasks
                .filter(|stat| {
                    let state = stat.rsplit_once(") ").map(|(_, rest)| rest.as_bytes()[0]);
                    state != Some(b'T') && state.is_some()
                })
                .count();
            if running == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{running} daemon threads still running 5 s after SIGSTOP"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn pid(&self) -> i32 {
        // `ip netns exec` execs the program, so the child is the daemon itself.
        self.child.id() as i32
    }

    pub fn signal(&self, sig: libc::c_int) {
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for exit (bounded) and returns the exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                bail!("daemon did not exit within {limit:?}:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Open file descriptors of the daemon process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("SHOW_DAEMON_LOGS").is_some() {
            let logs = self.logs();
            // Warnings and errors first: a CI report that keeps only the start of a long
            // output still shows why a tunnel ended badly.
            let notable: String = logs
                .lines()
                .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
                .map(|l| format!("{l}\n"))
                .collect();
            eprintln!(
                "---- daemon warnings and errors ----\n{notable}---- daemon log ----\n{logs}---- end of daemon log ----"
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Result<TempDir> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ipx-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
