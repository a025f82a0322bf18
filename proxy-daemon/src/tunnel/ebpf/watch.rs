//! The fast path's one background thread: reads the verdict's over-budget events and wakes
//! the tunnel that must take that direction over; finds the directions whose event was
//! lost to a full ring (their ledger says so); and, twice a second, takes off the
//! machine-wide count the bytes that quiet directions have delivered since their last
//! message (the verdict only sees delivery when a new message comes). If this thread ends,
//! no direction could leave the kernel again: [`spawn`]'s receiver reports it, and the
//! daemon exits.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use aya::maps::{MapData, RingBuf, SockHash};
use proxy_common::{OverBudgetEvent, HANDOFF_DIRECTION_BUDGET};
use tokio::sync::{watch, Notify};

use super::loader::Stats;
use super::shared::Accounting;
use super::sys;
use super::unsplice::Unsplicer;

const TCP_CLOSE: u8 = 7;

/// How often quiet directions are settled and the ledger is checked for lost events.
const SETTLE_EVERY: Duration = Duration::from_millis(500);

/// Test-only fault `unsplice-from-user-space` (`crate::test_fault`): hand-offs remove
/// their socket from `SOCKS` from user space with no wait at all, to show what the
/// unsplice iterator prevents (a removal racing a parser pass loses messages).
pub fn racy_unsplice_fault() -> bool {
    crate::test_fault::active("unsplice-from-user-space")
}

/// A direction the kernel splices now.
struct Watched {
    slot: u32,
    /// The source socket's fd. Both fds stay open while the entry exists: the tunnel
    /// removes the entry (under this map's lock) before it closes its sockets, and this
    /// thread uses them only under that lock.
    from: RawFd,
    /// The peer socket's fd and its send-stream position before any redirect: the
    /// direction's delivered bytes are `stream_position(to) - to_base`.
    to: RawFd,
    to_base: u64,
    /// Woken (with a stored permit) when the direction must leave the kernel. None while
    /// its tunnel is parked (no task waits; `notified` says whether one must be woken).
    handoff: Option<Arc<Notify>>,
    /// Woken already (an event came, or the ledger scan found it).
    notified: bool,
    /// Its tunnel is parked (`tunnel::park`) under this id: no task waits on `handoff`,
    /// so a hand-off also wakes the parker.
    parked: Option<u64>,
}

/// A hand-off claimed: who to wake, and why.
struct Claimed {
    cookie: u64,
    reason: u32,
    /// The notifier of the task that waits for it (none while its tunnel is parked).
    handoff: Option<Arc<Notify>>,
    /// The parker's id of its tunnel, while parked.
    parked: Option<u64>,
}

/// The directions the kernel splices now, by source socket cookie.
#[derive(Default)]
pub struct LiveDirections {
    dirs: Mutex<HashMap<u64, Watched>>,
    /// Ids of parked tunnels a hand-off woke, for the parker to take.
    woken_parked: Mutex<Vec<u64>>,
    parked_woken: Notify,
}

impl LiveDirections {
    /// Starts watching a direction; the returned notifier fires when it must leave the
    /// kernel. `to` must stay open until [`forget`](Self::forget).
    pub fn watch(
        &self,
        cookie: u64,
        slot: u32,
        from: RawFd,
        to: RawFd,
        to_base: u64,
    ) -> Arc<Notify> {
        let handoff = Arc::new(Notify::new());
        self.dirs.lock().unwrap().insert(
            cookie,
            Watched {
                slot,
                from,
                to,
                to_base,
                handoff: Some(handoff.clone()),
                notified: false,
                parked: None,
            },
        );
        handoff
    }

    /// Marks the directions of a tunnel about to be parked under `id`. False (nothing
    /// marked) if one of them is not watched or was handed over already: that tunnel
    /// must keep its task.
    pub fn park(&self, cookies: &[u64], id: u64) -> bool {
        let mut dirs = self.dirs.lock().unwrap();
        if !cookies
            .iter()
            .all(|c| dirs.get(c).is_some_and(|w| !w.notified))
        {
            return false;
        }
        for c in cookies {
            if let Some(w) = dirs.get_mut(c) {
                w.parked = Some(id);
                // The task that waited on it is gone; `unpark` makes a new one.
                w.handoff = None;
            }
        }
        true
    }

    /// A parked direction gets a task again: returns its hand-off notifier (with the
    /// permit of a hand-off that came while it was parked). None if it is not watched.
    pub fn unpark(&self, cookie: u64) -> Option<Arc<Notify>> {
        let mut dirs = self.dirs.lock().unwrap();
        let w = dirs.get_mut(&cookie)?;
        w.parked = None;
        let handoff = w.handoff.get_or_insert_with(|| {
            let handoff = Arc::new(Notify::new());
            if w.notified {
                // Handed over while parked: its permit waits for the task.
                handoff.notify_one();
            }
            handoff
        });
        Some(handoff.clone())
    }

    /// Waits until a hand-off wakes a parked tunnel, then returns the ids of those woken.
    pub async fn woken_parked(&self) -> Vec<u64> {
        loop {
            let woken = std::mem::take(&mut *self.woken_parked.lock().unwrap());
            if !woken.is_empty() {
                return woken;
            }
            self.parked_woken.notified().await;
        }
    }

    /// Stops watching a direction (it left the kernel, or its tunnel ends).
    pub fn forget(&self, cookie: u64) {
        self.dirs.lock().unwrap().remove(&cookie);
    }

    /// Directions the kernel splices now.
    pub(super) fn len(&self) -> usize {
        self.dirs.lock().unwrap().len()
    }

    /// Claims the hand-off of each requested `(cookie, reason)` whose direction is
    /// watched and was not handed over yet (once each).
    fn claim(&self, requests: &[(u64, u32)]) -> Vec<Claimed> {
        let mut dirs = self.dirs.lock().unwrap();
        requests
            .iter()
            .filter_map(|&(cookie, reason)| {
                let w = dirs.get_mut(&cookie).filter(|w| !w.notified)?;
                w.notified = true;
                Some(Claimed {
                    cookie,
                    reason,
                    handoff: w.handoff.clone(),
                    parked: w.parked,
                })
            })
            .collect()
    }

    /// Wakes the parker for these parked tunnels.
    fn wake_parked(&self, ids: impl Iterator<Item = u64>) {
        let mut woken = self.woken_parked.lock().unwrap();
        let before = woken.len();
        woken.extend(ids);
        if woken.len() != before {
            drop(woken);
            self.parked_woken.notify_one();
        }
    }

    /// Removes a source from `SOCKS` from user space (no unsplice iterator, or it did not
    /// find the socket): first waits for a stream-parser pass that holds the owner lock
    /// (`TCP_INFO` takes it), which narrows the race of finding 6 but cannot close it.
    /// `iterator_missed`: the unsplice iterator did not serve it: it failed, or did not
    /// find the socket, which only a socket that is closing explains (it left the
    /// kernel's TCP tables).
    fn remove_from_user_space(
        &self,
        cookie: u64,
        socks: &Mutex<SockHash<MapData, u64>>,
        iterator_missed: bool,
    ) {
        // Under the lock: the fd cannot close meanwhile.
        let dirs = self.dirs.lock().unwrap();
        if let Some(w) = dirs.get(&cookie).filter(|_| !racy_unsplice_fault()) {
            let _ = sys::stream_position(&w.from);
            let closing = sys::tcp_state(&w.from).map_or(true, |s| s == TCP_CLOSE);
            if iterator_missed && !closing {
                tracing::warn!(
                    cookie,
                    "fast path: a hand-off removed a live socket from SOCKS from user space (the unsplice iterator could not), which can race a parser pass"
                );
            }
        }
        let _ = socks.lock().unwrap().remove(&cookie);
    }

    /// Wakes every direction whose ledger asks for a hand-off that no event announced.
    /// Returns their cookies and reasons.
    fn over_budget_in_ledger(&self, accounting: &Accounting) -> Vec<(u64, u32)> {
        self.dirs
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, w)| !w.notified)
            .filter_map(|(&cookie, w)| {
                let reason = accounting.handoff(w.slot);
                (reason != 0).then_some((cookie, reason))
            })
            .collect()
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

/// What the thread needs of the loaded fast path.
pub struct Shared {
    pub live: Arc<LiveDirections>,
    pub accounting: Arc<Accounting>,
    pub stats: Arc<Stats>,
    /// `SOCKS`: a direction handed over leaves it here at once (the verdict keeps
    /// redirecting until then), before its tunnel's task even wakes.
    pub socks: Arc<Mutex<SockHash<MapData, u64>>>,
    /// Removes sockets from `SOCKS` under their owner lock (`None`: the kernel refused
    /// the iterator; removals from user space then).
    pub unsplicer: Option<Arc<Unsplicer>>,
}

impl Shared {
    /// Takes directions out of the kernel (each once) and counts why; returns the cookies
    /// of those it handed over now.
    pub(super) fn hand_off(&self, requests: &[(u64, u32)]) -> Vec<u64> {
        let claimed = self.live.claim(requests);
        if claimed.is_empty() {
            return Vec::new();
        }
        let claimed_cookies: Vec<u64> = claimed.iter().map(|c| c.cookie).collect();
        let by_user_space = match &self.unsplicer {
            Some(u) => u.unsplice(&claimed_cookies),
            None => claimed_cookies.clone(),
        };
        for &cookie in &by_user_space {
            self.live
                .remove_from_user_space(cookie, &self.socks, self.unsplicer.is_some());
        }
        self.stats
            .unsplices_from_user_space
            .fetch_add(by_user_space.len() as u64, Relaxed);
        // The direction is out of `SOCKS`: its tunnel may take it over now (a parked
        // tunnel once the parker gave it a task again).
        self.live
            .wake_parked(claimed.iter().filter_map(|c| c.parked));
        for Claimed {
            reason, handoff, ..
        } in &claimed
        {
            if let Some(handoff) = handoff {
                handoff.notify_one();
            }
            let counter = if *reason == HANDOFF_DIRECTION_BUDGET {
                &self.stats.handoffs_direction_budget
            } else {
                &self.stats.handoffs_memory_limit
            };
            counter.fetch_add(1, Relaxed);
        }
        claimed_cookies
    }
}

/// The running thread: [`stop`](Self::stop) ends it without the fatal report.
pub struct Thread {
    /// Written to wake the thread and make it return.
    stop: std::os::fd::OwnedFd,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Thread {
    /// Stops the thread (a takeover: the successor's thread takes over the ring and the
    /// directions) and waits until it has returned. Whatever it has not read stays in
    /// the ring for the successor.
    pub async fn stop(&mut self) {
        let one: u64 = 1;
        // SAFETY: an 8-byte write to our eventfd.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        if let Some(handle) = self.handle.take() {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

/// Starts the thread. The receiver turns `Some(reason)` if it ever fails.
///
/// A thread of its own rather than a tokio task: between the verdict's request and the
/// removal from `SOCKS` the kernel keeps redirecting at line rate, so the reaction time
/// is memory; a thread blocked in `poll(2)` on the ring runs as soon as it gets a CPU,
/// never behind other tasks. To get one at once on a busy machine it asks for real-time
/// scheduling ([`raise_priority`]): at normal priority it waited behind the workers and
/// the kernel's own workers, and a stalled reader's direction overshot its 2 MiB budget
/// by up to 7 MiB.
pub fn spawn(
    events: RingBuf<MapData>,
    shared: Arc<Shared>,
) -> anyhow::Result<(Thread, watch::Receiver<Option<String>>)> {
    // Test-only fault: the thread panics at the first event, to prove the daemon does not
    // run on without it.
    let fault = crate::test_fault::active("event-reader-panic");
    let (tx, rx) = watch::channel(None);
    // SAFETY: eventfd has no preconditions; the fd is ours on success.
    let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if stop < 0 {
        return Err(std::io::Error::last_os_error()).context("eventfd for the hand-off thread");
    }
    // SAFETY: a new fd, owned by nobody else.
    let stop = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(stop) };
    let stop_raw = stop.as_raw_fd();
    let handle = std::thread::Builder::new()
        .name("fastpath-handoff".into())
        .spawn(move || {
            // Its end, panic or not, is reported through `tx`: the daemon stops in order.
            crate::panic::owner_handles_this_thread();
            raise_priority();
            let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(events, &shared, stop_raw, fault)
            }));
            let reason = match ended {
                Ok(None) => return,
                Ok(Some(e)) => format!("{e:#}"),
                Err(_) => "it panicked".to_string(),
            };
            tracing::error!(
                reason,
                "fast path: the thread that hands directions over from the kernel stopped"
            );
            let _ = tx.send(Some(reason));
        })
        .context("starting the fast path's hand-off thread")?;
    Ok((
        Thread {
            stop,
            handle: Some(handle),
        },
        rx,
    ))
}

/// Until told to stop (`None`) or failing (`Some`).
fn run(
    mut events: RingBuf<MapData>,
    shared: &Shared,
    stop: RawFd,
    fault: bool,
) -> Option<anyhow::Error> {
    let fd = events.as_raw_fd();
    let mut settled = Instant::now();
    let mut missed_seen = 0;
    loop {
        let wait = SETTLE_EVERY.saturating_sub(settled.elapsed());
        let mut pfd = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two pollfds, valid for the call.
        if unsafe { libc::poll(pfd.as_mut_ptr(), 2, wait.as_millis() as libc::c_int) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Some(anyhow::Error::new(e).context("waiting on the event ring"));
        }
        if pfd[1].revents != 0 {
            return None;
        }
        // Every event waiting, then one removal for all of them (one iterator walk).
        let mut batch = Vec::new();
        while let Some(item) = events.next() {
            assert!(!fault, "test fault: event reader panics");
            match parse(&item) {
                Some(event) => batch.push(event),
                None => tracing::warn!(len = item.len(), "fast path: malformed event ignored"),
            }
        }
        if !batch.is_empty() {
            let requests: Vec<(u64, u32)> = batch.iter().map(|e| (e.cookie, e.reason)).collect();
            let handed = shared.hand_off(&requests);
            let now = monotonic_ns();
            for event in batch.iter().filter(|e| handed.contains(&e.cookie)) {
                let waited = now.saturating_sub(event.at_ns);
                shared
                    .stats
                    .handoff_latency_max_ns
                    .fetch_max(waited, Relaxed);
                tracing::debug!(
                    cookie = event.cookie,
                    reason = event.reason,
                    latency_us = waited / 1000,
                    "fast path: direction taken out of the kernel"
                );
            }
        }
        // An event the ring had no room for: the ledger still says which direction.
        let missed = shared.accounting.events_missed();
        if missed != missed_seen {
            missed_seen = missed;
            let found = scan_ledger(shared);
            tracing::warn!(
                events_missed = missed,
                found,
                "fast path: the event ring was full; directions over budget found through the ledger"
            );
        }
        if settled.elapsed() >= SETTLE_EVERY {
            shared.live.settle_quiet(&shared.accounting);
            // Also a request whose event went to a process that stopped reading the
            // ring before it acted (a takeover), or came before its direction was
            // watched here.
            let found = scan_ledger(shared);
            if found > 0 {
                tracing::debug!(found, "fast path: hand-offs found through the ledger");
            }
            settled = Instant::now();
        }
    }
}

/// Real-time priority for the calling thread (`SCHED_FIFO`, lowest level: above every
/// normal thread, below the kernel's own real-time threads), else the highest nice value
/// allowed. Both need `CAP_SYS_NICE`, which the shipped units grant; without it the
/// thread runs at normal priority and says so once. Safe as real-time: it sleeps in
/// `poll(2)` and its work per wake-up is bounded (one pass over the ring, a settle
/// pass every 500 ms).
fn raise_priority() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pid 0 is this thread; `param` is valid for the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        tracing::debug!("fast path: hand-off thread runs SCHED_FIFO");
        return;
    }
    let fifo = std::io::Error::last_os_error();
    // SAFETY: setpriority on this thread (tid); a failure changes nothing.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, -10) } == 0 {
        tracing::info!(
            error = %fifo,
            "fast path: hand-off thread cannot run real-time, runs at nice -10"
        );
        return;
    }
    tracing::info!(
        error = %fifo,
        "fast path: hand-off thread runs at normal priority (no CAP_SYS_NICE): a stalled reader's direction may overshoot its budget while it waits for a CPU"
    );
}

/// Hands over every watched direction whose ledger asks for it; returns how many.
fn scan_ledger(shared: &Shared) -> usize {
    let requests = shared.live.over_budget_in_ledger(&shared.accounting);
    let found = if requests.is_empty() {
        0
    } else {
        shared.hand_off(&requests).len()
    };
    shared
        .stats
        .handoffs_found_by_scan
        .fetch_add(found as u64, Relaxed);
    found
}

/// `CLOCK_MONOTONIC` in nanoseconds (the clock of `bpf_ktime_get_ns`).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn parse(item: &[u8]) -> Option<OverBudgetEvent> {
    if item.len() != size_of::<OverBudgetEvent>() {
        return None;
    }
    Some(OverBudgetEvent {
        cookie: u64::from_ne_bytes(item[0..8].try_into().ok()?),
        reason: u32::from_ne_bytes(item[8..12].try_into().ok()?),
        _pad: 0,
        at_ns: u64::from_ne_bytes(item[16..24].try_into().ok()?),
    })
}
