//! File-descriptor capacity. The daemon raises its soft open-file limit to the hard one
//! at start, keeps a reserve for itself, and counts every socket and splice(2) pipe it
//! holds for traffic against the rest. Past it, a new request is answered `503
//! over_capacity` from the reserve instead of failing in `accept` or `connect`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The daemon's capacity, for descriptors taken deep inside the relays (splice pipes).
static PROCESS: OnceLock<&'static Capacity> = OnceLock::new();

/// Descriptors kept out of the traffic budget: listeners, eBPF maps and programs, the
/// log, and the connections answered while over capacity.
pub const RESERVE: usize = 256;
/// Connections answered (`/health`, or 503) at once while over capacity.
pub const OVERLOAD_CONNECTIONS: usize = 128;

/// The open-file limits after start-up.
#[derive(Debug, Clone, Copy)]
pub struct FileLimits {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit.
pub fn raise_nofile() -> std::io::Result<FileLimits> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let soft_before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Ok(FileLimits {
        soft_before,
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

/// The descriptors available to traffic, shared by every worker.
#[derive(Debug)]
pub struct Capacity {
    limit: usize,
    used: AtomicUsize,
    overload: AtomicUsize,
}

/// Descriptors counted against the capacity until dropped.
#[derive(Debug)]
pub struct Fds {
    capacity: &'static Capacity,
    n: usize,
}

impl Drop for Fds {
    fn drop(&mut self) {
        self.capacity.used.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// A connection answered from the reserve while over capacity.
pub struct Overload(&'static Capacity);

impl Drop for Overload {
    fn drop(&mut self) {
        self.0.overload.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Capacity {
    /// Makes this the process's capacity: splice(2) pipes count against it too.
    pub fn install(&'static self) {
        let _ = PROCESS.set(self);
    }

    /// Two descriptors for a splice(2) pipe from the process's capacity (`None` when none
    /// is installed: nothing to count). A relay that can copy instead asks with `force`
    /// false and is refused (EMFILE) when the budget is full, so pipes never crowd out
    /// `accept`; one that cannot (zero-hop's normal hop) takes them anyway, counted.
    pub fn for_pipe(force: bool) -> std::io::Result<Option<Fds>> {
        Self::pipe_from(PROCESS.get().copied(), force)
    }

    fn pipe_from(capacity: Option<&'static Capacity>, force: bool) -> std::io::Result<Option<Fds>> {
        let Some(c) = capacity else {
            return Ok(None);
        };
        match c.try_take(2, 0) {
            Some(fds) => Ok(Some(fds)),
            None if force => Ok(Some(c.take(2))),
            None => Err(std::io::Error::from_raw_os_error(libc::EMFILE)),
        }
    }

    /// Capacity for a process allowed `soft_limit` open files.
    pub fn new(soft_limit: u64) -> &'static Capacity {
        let limit = (soft_limit as usize).saturating_sub(RESERVE).max(16);
        Box::leak(Box::new(Capacity {
            limit,
            used: AtomicUsize::new(0),
            overload: AtomicUsize::new(0),
        }))
    }

    /// Descriptors the budget allows.
    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `n` descriptors if `n + headroom` are free (headroom: what the holder will
    /// need next, e.g. the upstream connection of a new client connection).
    pub fn try_take(&'static self, n: usize, headroom: usize) -> Option<Fds> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if used + n + headroom > self.limit {
                return None;
            }
            match self.used.compare_exchange_weak(
                used,
                used + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Fds { capacity: self, n }),
                Err(now) => used = now,
            }
        }
    }

    /// Takes `n` descriptors whatever the budget says: they are open already (tunnels
    /// adopted in a takeover).
    pub fn take(&'static self, n: usize) -> Fds {
        self.used.fetch_add(n, Ordering::Relaxed);
        Fds { capacity: self, n }
    }

    /// A slot to answer one connection while over capacity, if the reserve allows.
    pub fn try_overload(&'static self) -> Option<Overload> {
        let n = self.overload.fetch_add(1, Ordering::Relaxed);
        if n >= OVERLOAD_CONNECTIONS {
            self.overload.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Overload(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_count_and_are_refused_when_the_budget_is_full() {
        let c = Capacity::new(RESERVE as u64 + 4);
        let first = Capacity::pipe_from(Some(c), false).unwrap();
        assert!(first.is_some());
        assert_eq!(c.in_use(), 2);
        let _conns = c.take(c.limit() - 2);
        // Full: a relay that can copy is refused, one that cannot still gets it, counted.
        let refused = Capacity::pipe_from(Some(c), false).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EMFILE));
        let forced = Capacity::pipe_from(Some(c), true).unwrap();
        assert_eq!(c.in_use(), c.limit() + 2);
        drop((first, forced));
        assert_eq!(c.in_use(), c.limit() - 2);
        assert!(Capacity::pipe_from(None, false).unwrap().is_none());
    }

    #[test]
    fn budget_counts_and_releases() {
        let c = Capacity::new(RESERVE as u64 + 4);
        assert_eq!(c.limit(), 16, "never below a minimum");
        let c = Capacity::new(RESERVE as u64 + 20);
        let a = c.try_take(10, 0).unwrap();
        assert!(c.try_take(9, 2).is_none(), "headroom counts");
        let b = c.try_take(9, 1).unwrap();
        assert_eq!(c.in_use(), 19);
        drop(a);
        drop(b);
        assert_eq!(c.in_use(), 0);
        let slots: Vec<_> = (0..OVERLOAD_CONNECTIONS)
            .map(|_| c.try_overload().unwrap())
            .collect();
        assert!(c.try_overload().is_none());
        drop(slots);
        assert!(c.try_overload().is_some());
    }
}
