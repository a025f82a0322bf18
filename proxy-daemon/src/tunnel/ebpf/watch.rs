//! The fast path's one background task: reads the verdict's over-budget events and wakes
//! the tunnel that must take that direction over; finds the directions whose event was
//! lost to a full ring (their ledger says so); and, twice a second, takes off the
//! machine-wide count the bytes that quiet directions have delivered since their last
//! message (the verdict only sees delivery when a new message comes). If this task ends,
//! no direction could leave the kernel again: [`spawn`]'s receiver reports it, and the
//! daemon exits.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use aya::maps::{MapData, RingBuf};
use proxy_common::{OverBudgetEvent, HANDOFF_DIRECTION_BUDGET};
use tokio::io::unix::AsyncFd;
use tokio::sync::{watch, Notify};

use super::loader::Stats;
use super::shared::Accounting;
use super::sys;

/// How often quiet directions are settled and the ledger is checked for lost events.
const SETTLE_EVERY: Duration = Duration::from_millis(500);

/// Test-only fault (env `PROJECT_INGRESS_PROXY_TEST_FAULT=event-reader-panic`): the task
/// panics at the first event, to prove the daemon does not run on without it.
const FAULT_ENV: &str = "PROJECT_INGRESS_PROXY_TEST_FAULT";

/// A direction the kernel splices now.
struct Watched {
    slot: u32,
    /// The peer socket's fd and its send-stream position before any redirect: the
    /// direction's delivered bytes are `stream_position(to) - to_base`. The fd stays
    /// open while the entry exists (the tunnel removes the entry before it closes its
    /// sockets, and both happen under this map's lock or after it).
    to: RawFd,
    to_base: u64,
    /// Woken (with a stored permit) when the direction must leave the kernel.
    handoff: Arc<Notify>,
    /// Woken already (an event came, or the ledger scan found it).
    notified: bool,
}

/// The directions the kernel splices now, by source socket cookie.
#[derive(Default)]
pub struct LiveDirections {
    dirs: Mutex<HashMap<u64, Watched>>,
}

impl LiveDirections {
    /// Starts watching a direction; the returned notifier fires when it must leave the
    /// kernel. `to` must stay open until [`forget`](Self::forget).
    pub fn watch(&self, cookie: u64, slot: u32, to: RawFd, to_base: u64) -> Arc<Notify> {
        let handoff = Arc::new(Notify::new());
        self.dirs.lock().unwrap().insert(
            cookie,
            Watched {
                slot,
                to,
                to_base,
                handoff: handoff.clone(),
                notified: false,
            },
        );
        handoff
    }

    /// Stops watching a direction (it left the kernel, or its tunnel ends).
    pub fn forget(&self, cookie: u64) {
        self.dirs.lock().unwrap().remove(&cookie);
    }

    /// Directions the kernel splices now.
    pub(super) fn len(&self) -> usize {
        self.dirs.lock().unwrap().len()
    }

    fn hand_off(&self, cookie: u64) -> bool {
        let mut dirs = self.dirs.lock().unwrap();
        match dirs.get_mut(&cookie) {
            Some(w) if !w.notified => {
                w.notified = true;
                w.handoff.notify_one();
                true
            }
            _ => false,
        }
    }

    /// Wakes every direction whose ledger asks for a hand-off that no event announced.
    /// Returns (direction budget, memory limit) counts.
    fn hand_off_from_ledger(&self, accounting: &Accounting) -> (u64, u64) {
        let mut found = (0, 0);
        for w in self.dirs.lock().unwrap().values_mut() {
            let reason = accounting.handoff(w.slot);
            if reason != 0 && !w.notified {
                w.notified = true;
                w.handoff.notify_one();
                if reason == HANDOFF_DIRECTION_BUDGET {
                    found.0 += 1;
                } else {
                    found.1 += 1;
                }
            }
        }
        found
    }

    /// Takes off the machine-wide count what quiet directions have delivered.
    fn settle_quiet(&self, accounting: &Accounting) {
        let cookies: Vec<u64> = self.dirs.lock().unwrap().keys().copied().collect();
        for cookie in cookies {
            // One direction at a time under the lock: its fd cannot close meanwhile.
            let dirs = self.dirs.lock().unwrap();
            let Some(w) = dirs.get(&cookie) else {
                continue;
            };
            if accounting.outstanding(w.slot) == 0 {
                continue;
            }
            let redirected = accounting.redirected(w.slot);
            if let Ok(pos) = sys::stream_position(&w.to) {
                accounting.settle(w.slot, pos.saturating_sub(w.to_base).min(redirected));
            }
        }
    }
}

/// Starts the task. The receiver turns `Some(reason)` if it ever stops.
pub fn spawn(
    events: RingBuf<MapData>,
    live: Arc<LiveDirections>,
    accounting: Arc<Accounting>,
    stats: Arc<Stats>,
) -> anyhow::Result<watch::Receiver<Option<String>>> {
    // SAFETY: the ring buffer owns its map fd and keeps it open until it is dropped
    // together with the AsyncFd.
    let ring = unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
        .context("watching the eBPF event ring buffer")?;
    let fault = std::env::var(FAULT_ENV).is_ok_and(|f| f == "event-reader-panic");
    let task = tokio::spawn(run(ring, live, accounting, stats, fault));
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let reason = match task.await {
            Ok(e) => format!("{e:#}"),
            Err(e) if e.is_panic() => "it panicked".to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!(
            reason,
            "fast path: the task that hands directions over from the kernel stopped"
        );
        let _ = tx.send(Some(reason));
    });
    Ok(rx)
}

async fn run(
    mut ring: AsyncFd<RingBuf<MapData>>,
    live: Arc<LiveDirections>,
    accounting: Arc<Accounting>,
    stats: Arc<Stats>,
    fault: bool,
) -> anyhow::Error {
    let mut tick = tokio::time::interval(SETTLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut missed_seen = 0;
    loop {
        tokio::select! {
            ready = ring.readable_mut() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => return anyhow::Error::new(e).context("waiting on the event ring"),
                };
                let events = guard.get_inner_mut();
                while let Some(item) = events.next() {
                    assert!(!fault, "test fault: event reader panics");
                    let Some(event) = parse(&item) else {
                        tracing::warn!(len = item.len(), "fast path: malformed event ignored");
                        continue;
                    };
                    if live.hand_off(event.cookie) {
                        let counter = if event.reason == HANDOFF_DIRECTION_BUDGET {
                            &stats.handoffs_direction_budget
                        } else {
                            &stats.handoffs_memory_limit
                        };
                        counter.fetch_add(1, Relaxed);
                    }
                }
                guard.clear_ready();
            }
            _ = tick.tick() => live.settle_quiet(&accounting),
        }
        // An event the ring had no room for: the ledger still says which direction.
        let missed = accounting.events_missed();
        if missed != missed_seen {
            missed_seen = missed;
            let (budget, limit) = live.hand_off_from_ledger(&accounting);
            stats.handoffs_direction_budget.fetch_add(budget, Relaxed);
            stats.handoffs_memory_limit.fetch_add(limit, Relaxed);
            stats
                .handoffs_found_by_scan
                .fetch_add(budget + limit, Relaxed);
            tracing::warn!(
                events_missed = missed,
                found = budget + limit,
                "fast path: the event ring was full; directions over budget found through the ledger"
            );
        }
    }
}

fn parse(item: &[u8]) -> Option<OverBudgetEvent> {
    if item.len() != size_of::<OverBudgetEvent>() {
        return None;
    }
    Some(OverBudgetEvent {
        cookie: u64::from_ne_bytes(item[0..8].try_into().ok()?),
        reason: u32::from_ne_bytes(item[8..12].try_into().ok()?),
        _pad: 0,
    })
}
