//! Child processes of the benchmark: each in its own process group, killed (the whole
//! group, by its id) when dropped, so nothing outlives the run even on error.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use std::os::unix::process::CommandExt as _;

static LIVE: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static NETNS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static TEMP: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Adds (or removes) a process group that the signal handler kills.
pub(crate) fn live(pgid: i32, add: bool) {
    let mut l = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    if add {
        l.push(pgid);
    } else {
        l.retain(|p| *p != pgid);
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: plain sigset manipulation on a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread (and the threads it starts later) and
/// starts a thread that, on one of them, kills every process group we started, deletes
/// the namespaces and temp dirs, and exits. Call before starting other threads.
pub fn install_cleanup() {
    let set = signal_set();
    // SAFETY: set is initialised.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: set is initialised; sig is a valid out pointer.
        unsafe { libc::sigwait(&set, &mut sig) };
        eprintln!("[bench] signal {sig}: cleaning up");
        for pgid in LIVE.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            // SAFETY: process groups we started.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(200));
        for ns in NETNS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for dir in TEMP.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(128 + sig);
    });
}

/// Namespaces and directories the signal handler removes.
pub fn register_cleanup(netns: &[&str], dirs: &[&Path]) {
    NETNS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(netns.iter().map(|s| s.to_string()));
    TEMP.lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(dirs.iter().map(|d| d.to_path_buf()));
}

/// Own process group, default signal mask.
pub(crate) fn prepare(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let set = signal_set();
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
}

pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with output to `log`, in a new process group.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let file = std::fs::File::create(log)?;
        prepare(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        live(child.id() as i32, true);
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} {status}", self.name)),
            _ => None,
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// The process and all its descendants (nginx workers).
    pub fn tree(&self) -> Vec<i32> {
        let mut parents: Vec<(i32, i32)> = Vec::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse().ok()) {
                    parents.push((pid, ppid));
                }
            }
        }
        let mut tree = vec![self.pid()];
        let mut i = 0;
        while i < tree.len() {
            let p = tree[i];
            tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
            i += 1;
        }
        tree
    }

    /// Resident memory of the process tree, bytes.
    pub fn rss(&self) -> u64 {
        self.tree()
            .iter()
            .filter_map(|pid| {
                let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .sum::<u64>()
            * 1024
    }

    /// CPU time (user + system, all threads) of the process tree, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        self.tree()
            .iter()
            .filter_map(|pid| {
                let f = stat_fields(*pid)?;
                // After "pid (comm)": state=0 ppid=1 ... utime=11 stime=12
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .sum()
    }
}

/// Fields of /proc/PID/stat after the command name.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(String::from).collect())
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signals our own child's process group (its pgid is its pid).
        let tree = self.tree();
        unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        for pid in &tree {
            // SAFETY: descendants of our own child.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        live(self.pid(), false);
        // Wait until every process of the tree is gone (nginx workers outlive the master
        // for a moment and would keep the port for the next system).
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && tree
                .iter()
                .any(|pid| stat_fields(*pid).is_some_and(|f| f.first().is_some_and(|st| st != "Z")))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `cmd` to completion, killing its process group after `limit`.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Result<Output> {
    prepare(&mut cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("spawning a client")?;
    let pid = child.id() as i32;
    live(pid, true);
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = child.wait();
            live(pid, false);
            bail!("client timed out after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    live(pid, false);
    Ok(Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

/// A long-running client that prints a line when ready and waits for a line on stdin.
pub struct Interactive {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Interactive {
    pub fn spawn(mut cmd: Command) -> Result<Interactive> {
        prepare(&mut cmd);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("spawning a client")?;
        live(child.id() as i32, true);
        let stdin = child.stdin.take();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Interactive {
            child,
            stdin,
            lines,
        })
    }

    pub fn next_line(&mut self, limit: Duration) -> Result<String> {
        self.lines
            .recv_timeout(limit)
            .context("client went silent or exited")
    }

    pub fn poke(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        Ok(())
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        self.stdin.take();
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
        live(self.child.id() as i32, false);
    }
}
