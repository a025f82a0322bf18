//! What the traffic did: counts per traffic kind and every failure with its time.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The kinds of traffic (and the monitor, for failures no client saw).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    KeepAlive,
    PoolChurn,
    Sse,
    WebSocket,
    Bulk,
    HttpChurn,
    UpgradeChurn,
    Monitor,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::KeepAlive,
        Kind::PoolChurn,
        Kind::Sse,
        Kind::WebSocket,
        Kind::Bulk,
        Kind::HttpChurn,
        Kind::UpgradeChurn,
        Kind::Monitor,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::KeepAlive => "http keep-alive",
            Kind::PoolChurn => "http pool churn",
            Kind::Sse => "sse",
            Kind::WebSocket => "websocket echo",
            Kind::Bulk => "bulk tunnel",
            Kind::HttpChurn => "connection churn",
            Kind::UpgradeChurn => "upgrade churn",
            Kind::Monitor => "monitor",
        }
    }

    /// A short column name for the CSV.
    pub fn key(self) -> &'static str {
        match self {
            Kind::KeepAlive => "keepalive",
            Kind::PoolChurn => "pool_churn",
            Kind::Sse => "sse",
            Kind::WebSocket => "websocket",
            Kind::Bulk => "bulk",
            Kind::HttpChurn => "http_churn",
            Kind::UpgradeChurn => "upgrade_churn",
            Kind::Monitor => "monitor",
        }
    }

    /// What one operation is, and what the second count counts.
    pub fn units(self) -> (&'static str, &'static str) {
        match self {
            Kind::KeepAlive => ("requests", "of them POSTs"),
            Kind::PoolChurn => ("requests", "of them POSTs"),
            Kind::Sse => ("streams", "events"),
            Kind::WebSocket => ("sessions", "messages echoed"),
            Kind::Bulk => ("tunnels", "of them both ways"),
            Kind::HttpChurn => ("connections", "closed by Connection: close"),
            Kind::UpgradeChurn => ("upgrades", "ended by a reset"),
            Kind::Monitor => ("samples", "-"),
        }
    }
}

#[derive(Default)]
pub struct Counts {
    pub ops: AtomicU64,
    pub items: AtomicU64,
    /// Bytes compared with what was sent (either end).
    pub bytes: AtomicU64,
    pub failures: AtomicU64,
}

pub struct Failure {
    /// Since the start of the run.
    pub at: Duration,
    pub kind: Kind,
    pub what: String,
}

/// Failures kept in full (the count goes on).
const KEPT: usize = 200;

pub struct Record {
    pub start: Instant,
    counts: [Counts; Kind::ALL.len()],
    failures: Mutex<Vec<Failure>>,
}

impl Record {
    pub fn new() -> Record {
        Record {
            start: Instant::now(),
            counts: Default::default(),
            failures: Mutex::new(Vec::new()),
        }
    }

    pub fn counts(&self, kind: Kind) -> &Counts {
        &self.counts[kind as usize]
    }

    /// One operation done and checked.
    pub fn ok(&self, kind: Kind, items: u64, bytes: u64) {
        let c = self.counts(kind);
        c.ops.fetch_add(1, Ordering::Relaxed);
        c.items.fetch_add(items, Ordering::Relaxed);
        c.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes checked by the other end of an operation counted elsewhere.
    pub fn checked(&self, kind: Kind, bytes: u64) {
        self.counts(kind).bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn fail(&self, kind: Kind, what: impl Display) {
        let at = self.start.elapsed();
        let what = what.to_string();
        eprintln!(
            "[soak] {:>8.1}s FAILURE {}: {what}",
            at.as_secs_f64(),
            kind.name()
        );
        self.counts(kind).failures.fetch_add(1, Ordering::Relaxed);
        let mut kept = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < KEPT {
            kept.push(Failure { at, kind, what });
        }
    }

    /// Requests the clients made and saw answered: every operation is one request (a
    /// stream, a session and a tunnel each begin with one).
    pub fn requests_sent(&self) -> u64 {
        Kind::ALL
            .iter()
            .filter(|k| **k != Kind::Monitor)
            .map(|k| self.counts(*k).ops.load(Ordering::Relaxed))
            .sum()
    }

    pub fn total_failures(&self) -> u64 {
        self.counts
            .iter()
            .map(|c| c.failures.load(Ordering::Relaxed))
            .sum()
    }

    /// The failures kept (the first `KEPT`).
    pub fn failures(&self) -> Vec<(Duration, Kind, String)> {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|f| (f.at, f.kind, f.what.clone()))
            .collect()
    }
}
