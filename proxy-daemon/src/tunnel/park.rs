//! Parked tunnels: a tunnel whose two directions the kernel splices needs nothing from
//! the daemon until a direction ends (FIN), fails (reset, keepalive timeout) or is
//! handed over (over budget). Such a tunnel gives up its task and its sockets' event-loop
//! registrations and waits here as a plain entry: both sockets in one epoll set of the
//! parker's own (FIN, error and hang-up only; a zero-hop tunnel's upstream socket also
//! for the bytes of its normal hop), its hand-offs through the fast path's watch list. The first of those events gives it a task again on the worker it came
//! from, which continues exactly where it stood (`ebpf::resume`, `Resume::Unparked`).
//!
//! Why: an idle tunnel used to keep a task with the futures of both directions, two
//! readiness registrations and its relay's boxes (about 5.5 KiB each, issue 9 item 5);
//! parked it keeps its registry entry, its watch entries and this entry.
//!
//! A takeover or a shutdown closes the parker: every parked tunnel gets its task back
//! at once, and the task pauses (takeover) or resets it (shutdown) like any other.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::runtime::Handle;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::ebpf::Splicer;
use super::progress::Progress;
use super::registry::LiveTunnel;
use super::{run, Running, Start, Tunnels};
use crate::limits::Fds;

/// A tunnel on its way into or out of the parker: its sockets `S` are tokio's while it
/// has a task, plain ones (no event-loop registration) while parked.
pub(super) struct Parked<S> {
    pub client: S,
    pub upstream: S,
    pub tunnel: Waiting,
}

/// Everything else a parked tunnel keeps.
pub(super) struct Waiting {
    pub live: Arc<LiveTunnel>,
    pub progress: Box<Progress>,
    pub takeovers: u32,
    /// Its descriptors in the capacity budget.
    pub hold: Fds,
    /// A paired zero-hop tunnel's registration: its upstream socket is watched for the
    /// normal hop's bytes too.
    pub zero_hop: Option<super::zero_hop::Registration>,
    /// What its closing line says of zero-hop.
    pub zero_hop_state: &'static str,
    /// The worker it runs on again.
    pub worker: Handle,
}

impl Waiting {
    /// Ends a tunnel that cannot move between the parker and an event loop: its kernel
    /// state goes (while its sockets are still open: the hand-off thread uses their
    /// descriptors until then), then its closing line; the caller's last handles of the
    /// sockets close them with a reset, so bytes in flight never look delivered.
    fn reset(self, splicer: &Splicer, tunnels: &Tunnels) {
        let counters = &self.live.counters;
        super::ebpf::abandon(splicer, &self.progress, counters);
        super::end_zero_hop(self.zero_hop, counters);
        let end = super::RelayEnd::Reset(io::ErrorKind::Other);
        super::log_closed(
            &tunnels.registry,
            &self.live,
            &tunnels.relay,
            &end,
            self.takeovers,
            self.zero_hop_state,
        );
    }
}

/// A parked tunnel with what keeps the daemon's drain waiting for it.
struct Entry {
    parked: Parked<std::net::TcpStream>,
    /// It counts as a running tunnel (`Tunnels::open`, `wait_idle`).
    _token: TaskTrackerToken,
}

struct Table {
    /// Boxed: a map bucket is 16 bytes, not the entry's 160 (the map keeps up to twice
    /// the buckets it needs).
    entries: HashMap<u64, Box<Entry>>,
    next_id: u64,
    /// A takeover or shutdown began: nothing parks any more.
    closed: bool,
}

/// Where parked tunnels wait: one per daemon with the fast path, its loop a task of the
/// main runtime.
pub(super) struct Parker {
    epoll: AsyncFd<OwnedFd>,
    table: Mutex<Table>,
    splicer: Arc<Splicer>,
}

/// FIN received, error, hang-up; edge-triggered: each wakes the tunnel once, and it is
/// out of the set before anything else could happen to it here.
const EVENTS: u32 = (libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP | libc::EPOLLET) as u32;

impl Parker {
    /// A parker for the fast path's tunnels; its loop runs on the current runtime until
    /// the tunnels pause or shut down.
    pub(super) fn start(splicer: Arc<Splicer>, tunnels: &Tunnels) -> io::Result<Arc<Parker>> {
        // SAFETY: epoll_create1 has no preconditions; the fd is ours on success.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the epoll descriptor is owned by the AsyncFd and closed only when the
        // AsyncFd (which deregisters it first) is dropped.
        let epoll =
            unsafe { AsyncFd::register_with_interest(epoll, tokio::io::Interest::READABLE) }?;
        let parker = Arc::new(Parker {
            epoll,
            table: Mutex::new(Table {
                entries: HashMap::new(),
                next_id: 1,
                closed: false,
            }),
            splicer,
        });
        tokio::spawn(parker.clone().run(tunnels.clone()));
        Ok(parker)
    }

    /// Tunnels parked now.
    pub(super) fn len(&self) -> usize {
        self.table.lock().unwrap().entries.len()
    }

    /// Parks a tunnel whose relay returned `RelayEnd::Parked`. Gives it back when it
    /// cannot wait here (the parker is closed, a hand-off came first, epoll refused a
    /// socket): its task then continues it.
    // The tunnel goes straight back to its caller (once per attempt): no box for it.
    #[allow(clippy::result_large_err)]
    pub(super) fn park(
        &self,
        parked: Parked<tokio::net::TcpStream>,
        tunnels: &Tunnels,
    ) -> Result<(), Parked<tokio::net::TcpStream>> {
        let mut table = self.table.lock().unwrap();
        if table.closed {
            return Err(parked);
        }
        let progress = &parked.tunnel.progress;
        let cookies: Vec<u64> = [&progress.client_to_upstream, &progress.upstream_to_client]
            .iter()
            .filter_map(|w| w.kernel().map(|k| k.cookie))
            .collect();
        // Never reused, even when this attempt fails: a hand-off for this tunnel must not
        // wake another.
        let id = table.next_id;
        table.next_id += 1;
        if !self.splicer.live().park(&cookies, id) {
            return Err(parked);
        }
        let (c, u) = (parked.client.as_raw_fd(), parked.upstream.as_raw_fd());
        // A zero-hop tunnel's app → client direction waits for bytes on its normal hop.
        let upstream_events = match parked.tunnel.zero_hop {
            Some(_) => EVENTS | libc::EPOLLIN as u32,
            None => EVENTS,
        };
        let added = self.add(c, id, EVENTS).and_then(|()| {
            self.add(u, id, upstream_events).inspect_err(|_| {
                self.delete(c);
            })
        });
        if let Err(e) = added {
            tracing::debug!(error = %e, "tunnel not parked: epoll refused a socket");
            return Err(parked);
        }
        let token = tunnels.tracker.token();
        let Parked {
            client,
            upstream,
            tunnel,
        } = parked;
        // Out of the worker's event loop (its readiness registrations are what parking
        // saves). Deregistering cannot fail for a socket that is registered; if it did,
        // that socket is closed already, and the tunnel is reset.
        let (client, upstream) = match (client.into_std(), upstream.into_std()) {
            (Ok(c), Ok(u)) => (c, u),
            (c, u) => {
                drop(table);
                tracing::error!(request_id = %tunnel.live.request_id, "a tunnel could not leave its event loop to park, resetting it");
                // The one that failed was closed (which left the epoll set too).
                let rest: Vec<_> = [c.ok(), u.ok()].into_iter().flatten().collect();
                for s in &rest {
                    self.delete(s.as_raw_fd());
                    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
                }
                tunnel.reset(&self.splicer, tunnels);
                drop((rest, token));
                return Ok(());
            }
        };
        let parked = Parked {
            client,
            upstream,
            tunnel,
        };
        table.entries.insert(
            id,
            Box::new(Entry {
                parked,
                _token: token,
            }),
        );
        Ok(())
    }

    fn add(&self, fd: RawFd, id: u64, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: id };
        // SAFETY: valid epoll and socket descriptors, an event valid for the call.
        let r = unsafe {
            libc::epoll_ctl(
                self.epoll.get_ref().as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd,
                &mut event,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn delete(&self, fd: RawFd) {
        // SAFETY: valid descriptors; a null event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(
                self.epoll.get_ref().as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Wakes tunnels until the tunnels pause (takeover) or shut down; then wakes them all
    /// and parks nothing more.
    async fn run(self: Arc<Self>, tunnels: Tunnels) {
        loop {
            let woken = tokio::select! {
                biased;
                _ = tunnels.pause.cancelled() => None,
                _ = tunnels.shutdown.cancelled() => None,
                ids = self.splicer.live().woken_parked() => Some(ids),
                ready = self.epoll.readable() => match ready {
                    Ok(mut guard) => {
                        let ids = self.ready_ids();
                        guard.clear_ready();
                        Some(ids)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "parked tunnels: waiting on epoll failed, waking every tunnel");
                        None
                    }
                },
            };
            let closing = woken.is_none();
            let entries: Vec<Box<Entry>> = {
                let mut table = self.table.lock().unwrap();
                match woken {
                    Some(ids) => ids
                        .iter()
                        .filter_map(|id| table.entries.remove(id))
                        .collect(),
                    None => {
                        table.closed = true;
                        table.entries.drain().map(|(_, e)| e).collect()
                    }
                }
            };
            for entry in entries {
                self.wake(*entry, &tunnels);
            }
            if closing {
                return;
            }
        }
    }

    /// Ids of the tunnels with a socket event (every event waiting).
    fn ready_ids(&self) -> Vec<u64> {
        let mut ids = Vec::new();
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            // SAFETY: a valid epoll descriptor and a buffer of 64 events.
            let n = unsafe {
                libc::epoll_wait(self.epoll.get_ref().as_raw_fd(), events.as_mut_ptr(), 64, 0)
            };
            if n <= 0 {
                return ids;
            }
            ids.extend(events[..n as usize].iter().map(|e| e.u64));
            if (n as usize) < events.len() {
                return ids;
            }
        }
    }

    /// Gives a parked tunnel its task again, on its worker.
    fn wake(&self, entry: Entry, tunnels: &Tunnels) {
        let Entry { parked, _token } = entry;
        self.delete(parked.client.as_raw_fd());
        self.delete(parked.upstream.as_raw_fd());
        let Parked {
            client,
            upstream,
            tunnel,
        } = parked;
        let label = format!("tunnel {}", tunnel.live.request_id);
        let worker = tunnel.worker.clone();
        let tracker = tunnels.tracker.clone();
        let tunnels = tunnels.clone();
        let splicer = self.splicer.clone();
        let task = async move {
            let (client, upstream) = match register(client, upstream) {
                Ok(sockets) => sockets,
                Err(spares) => {
                    tracing::error!(
                        request_id = %tunnel.live.request_id,
                        "a parked tunnel could not get its task back (event-loop registration failed), resetting it"
                    );
                    tunnel.reset(&splicer, &tunnels);
                    drop(spares);
                    return;
                }
            };
            let Waiting {
                live,
                progress,
                takeovers,
                hold,
                zero_hop,
                zero_hop_state,
                worker: _,
            } = tunnel;
            let running = Running {
                live,
                client,
                upstream,
                progress: *progress,
                takeovers,
                start: Start::Unparked { zero_hop_state },
                zero_hop,
                hold,
            };
            run(&tunnels, running).await;
        };
        // Tracked before the token goes: a drain never sees the tunnel missing.
        let task = tracker.track_future(crate::panic::contained(label.as_bytes(), task));
        worker.spawn(task);
    }
}

/// Registers a woken tunnel's sockets with the current worker's event loop. On failure
/// returns spare handles (dups) of both sockets, set to close with a reset: a failed
/// registration closes the socket it was given. (Dups, not setting the linger before: a
/// socket option takes the owner lock of a socket the kernel may still be splicing,
/// which moves its parser passes to a workqueue, `sys::rdhup`.)
/// both are closed with a reset (set before the attempt: a failed registration closes
/// the socket it consumed).
fn register(
    client: std::net::TcpStream,
    upstream: std::net::TcpStream,
) -> Result<(tokio::net::TcpStream, tokio::net::TcpStream), Vec<std::net::TcpStream>> {
    let spares: Vec<std::net::TcpStream> = [&client, &upstream]
        .iter()
        .filter_map(|s| s.try_clone().ok())
        .collect();
    match (
        tokio::net::TcpStream::from_std(client),
        tokio::net::TcpStream::from_std(upstream),
    ) {
        // The spares close here: only dups, the sockets stay open.
        (Ok(client), Ok(upstream)) => Ok((client, upstream)),
        (client, upstream) => {
            for s in &spares {
                let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
            }
            // A socket that did register closes when this returns; its spare resets it.
            drop((client, upstream));
            Err(spares)
        }
    }
}
