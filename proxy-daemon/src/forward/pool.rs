//! Idle keep-alive upstream connections, one pool per worker thread (no lock, no
//! cross-thread wake-up), keyed by port: any port is pooled, listed nowhere.
//!
//! Servers close idle keep-alive connections on their own timers (Node: 5 s), and a
//! request written just as one does is lost. Three things keep that from failing a
//! request: a connection is expired before the upstream's own timeout (its
//! `Keep-Alive: timeout=N` hint, else `--upstream-idle-timeout`); one whose socket saw
//! data or EOF while idle is never reused; and a request that fails on a reused
//! connection before any response byte is retried once on a fresh one (`exchange`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::Interest;

use super::upstream::Upstream;

struct Idle {
    conn: Upstream,
    expires: Instant,
}

#[derive(Default)]
struct Pool {
    ports: HashMap<u16, Vec<Idle>>,
    idle: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// How long an idle connection is kept: under the upstream's own idle timeout when it
/// announced one (a second early), else `default`.
pub fn keep_for(default: Duration, hint_secs: Option<u32>) -> Duration {
    match hint_secs {
        Some(0) => Duration::ZERO,
        Some(1) => default.min(Duration::from_millis(500)),
        Some(n) => default.min(Duration::from_secs(n as u64 - 1)),
        None => default,
    }
}

/// A pooled connection to `port` that is still open, newest first.
pub fn checkout(port: u16) -> Option<Upstream> {
    let now = Instant::now();
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        let list = pool.ports.get_mut(&port)?;
        let mut found = None;
        let mut popped = 0;
        while let Some(idle) = list.pop() {
            popped += 1;
            if idle.expires > now && !saw_anything(&idle.conn) {
                found = Some(idle.conn);
                break;
            }
        }
        let empty = list.is_empty();
        if empty {
            pool.ports.remove(&port);
        }
        pool.idle -= popped;
        crate::metrics::pool_idle(-(popped as i64));
        found.map(|mut c| {
            c.reused = true;
            c
        })
    })
}

/// Returns a connection whose last exchange ended cleanly (nothing left unread).
pub fn check_in(conn: Upstream, keep_for: Duration, max_per_port: usize) {
    if keep_for.is_zero() {
        return;
    }
    // The last read may have left read readiness set: clear it (no syscall) so that only
    // data or EOF arriving from now on marks the connection as not reusable.
    let _ = conn.stream.try_io(Interest::READABLE, || {
        Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
    });
    tracing::trace!(port = conn.port, ?keep_for, "pooled connection checked in");
    let expires = Instant::now() + keep_for;
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        let list = pool.ports.entry(conn.port).or_default();
        if list.len() < max_per_port {
            list.push(Idle { conn, expires });
            pool.idle += 1;
            crate::metrics::pool_idle(1);
        }
    });
}

/// Whether the upstream sent anything (bytes, FIN, RST) on an idle connection: tokio
/// marks the socket readable when epoll reports it, with no syscall here.
fn saw_anything(conn: &Upstream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(conn.stream.poll_read_ready(&mut cx), Poll::Ready(_))
}

/// Drops expired connections and those the upstream closed (run every second or so).
pub fn sweep() {
    let now = Instant::now();
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        pool.ports.retain(|_, list| {
            list.retain(|idle| {
                let keep = idle.expires > now && !saw_anything(&idle.conn);
                if !keep {
                    tracing::trace!(
                        port = idle.conn.port,
                        expired = idle.expires <= now,
                        "pooled connection dropped"
                    );
                }
                keep
            });
            !list.is_empty()
        });
        let idle = pool.ports.values().map(Vec::len).sum();
        crate::metrics::pool_idle(idle as i64 - pool.idle as i64);
        pool.idle = idle;
    });
}

/// Closes the oldest idle connection of this worker; false if there is none.
pub fn evict_one() -> bool {
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        let oldest = pool
            .ports
            .iter()
            .filter_map(|(port, list)| list.first().map(|i| (i.expires, *port)))
            .min();
        let Some((_, port)) = oldest else {
            return false;
        };
        if let Some(list) = pool.ports.get_mut(&port) {
            list.remove(0);
            if list.is_empty() {
                pool.ports.remove(&port);
            }
        }
        pool.idle -= 1;
        crate::metrics::pool_idle(-1);
        true
    })
}

/// Idle connections in this worker's pool.
pub fn idle() -> usize {
    POOL.with(|p| p.borrow().idle)
}

/// Closes every idle connection of this worker (shutdown).
pub fn clear() {
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        crate::metrics::pool_idle(-(pool.idle as i64));
        *pool = Pool::default();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_time_stays_under_the_upstreams_hint() {
        let d = Duration::from_secs(4);
        assert_eq!(keep_for(d, None), d);
        assert_eq!(keep_for(d, Some(5)), d);
        assert_eq!(keep_for(d, Some(3)), Duration::from_secs(2));
        assert_eq!(keep_for(d, Some(1)), Duration::from_millis(500));
        assert_eq!(keep_for(d, Some(0)), Duration::ZERO);
    }
}
