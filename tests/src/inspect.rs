//! What a test reads about a running daemon, from its log and from `/proc`: log lines,
//! liveness, its accepted connections, and the wait for a freshly started daemon to settle
//! before a test takes its descriptor baseline. These are methods of [`Daemon`], kept
//! apart from how the daemon is started (`daemon.rs`).

use std::time::{Duration, Instant};

use crate::Daemon;

impl Daemon {
    /// The log lines containing `needle`, in order.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.logs()
            .lines()
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect()
    }

    /// The `nth` (from 0) log line containing `needle`, waiting up to 10 s for it.
    pub async fn wait_log_line(&self, needle: &str, nth: usize) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.log_lines(needle).into_iter().nth(nth) {
                return Some(l);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Still running (not a zombie): `/proc/<pid>/stat`'s state follows the ")".
    pub fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    }

    /// The daemon's accepted connections that may still hold an fd (ESTABLISHED or
    /// CLOSE_WAIT on its listening port), from its namespace's /proc/net/tcp{,6}.
    pub fn open_connections(&self) -> usize {
        let port = format!(":{:04X}", self.addr.port());
        ["tcp", "tcp6"]
            .iter()
            .filter_map(|t| std::fs::read_to_string(format!("/proc/{}/net/{t}", self.pid())).ok())
            .map(|table| {
                table
                    .lines()
                    .skip(1)
                    .filter(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        f.len() > 3 && f[1].ends_with(&port) && (f[3] == "01" || f[3] == "08")
                    })
                    .count()
            })
            .sum()
    }

    /// Waits until the daemon is fully up before a test takes its fd baseline: the fast
    /// path finishes loading after the start line (its descriptors come then), and the
    /// harness's start-up probe connection must be gone, or a leaked fd could hide
    /// behind it. Panics if the daemon never logged its start line.
    pub async fn settle(&self) {
        let start = self
            .wait_log_line("project-ingress-proxy started", 0)
            .await
            .unwrap_or_else(|| panic!("no start line from the daemon:\n{}", self.logs()));
        let v: serde_json::Value = serde_json::from_str(&start).unwrap();
        if v["data_path"] == "ebpf" {
            self.wait_log_line("in-kernel fast path loaded", 0)
                .await
                .expect("no fast-path line after the start line");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.open_connections() > 0 {
            assert!(
                Instant::now() < deadline,
                "start-up probe connection still open"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The worker threads build their runtimes (an epoll and an eventfd each) after
        // the start line: wait for the descriptor count to hold still.
        let mut last = self.open_fds();
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.open_fds();
            if now == last {
                break;
            }
            last = now;
        }
    }
}
