//! Takeover, tunnel side (SPEC §5): every live tunnel moves to the successor process
//! with its two sockets, the state of each direction and the bytes its relays held.
//!
//! Running side ([`Tunnels::hand_over`]): tunnels started from now on go straight to the
//! successor; every running tunnel pauses at its next await point (its relays keep
//! their state in `progress`, so any await point is a safe one) and sends itself; the
//! fast path's maps go first, after this process stopped adding directions to them and
//! stopped its hand-off thread. Kernel-spliced directions never leave the maps: the
//! kernel keeps moving their bytes throughout, whichever process watches them.
//!
//! Successor side ([`Tunnels::adopt_all`]): each tunnel runs on one of its workers, its
//! held bytes written first, each direction continuing on the path it was on.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::counters::{DirectionCounters, TunnelCounters};
use super::handover::{DirectionState, PathState, TunnelState};
use super::progress::{Progress, WayProgress};
use super::registry::LiveTunnel;
use super::{run, socket, Relay, Running, Start, Tunnel, Tunnels};
use crate::limits::Capacity;
use crate::takeover::wire::Channel;
use crate::takeover::ToNew;

/// A tunnel on its way to the successor: its state, its held bytes (the message's
/// blob), and this process's copies of its sockets (closed once sent).
pub struct Outgoing {
    state: TunnelState,
    blob: Vec<u8>,
    client: OwnedFd,
    upstream: OwnedFd,
}

/// A hand-over in progress (running side); [`Tunnels::finish_hand_over`] ends it.
pub struct Handover {
    forwarder: JoinHandle<io::Result<usize>>,
}

impl Tunnels {
    /// Takeover, running side: from now on new tunnels go straight to the successor and
    /// every running one pauses and follows; the fast path's maps are sent first.
    pub async fn hand_over(&self, channel: Channel) -> Handover {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.outgoing.lock().unwrap() = Some(tx);
        self.pause.cancel();
        let sent = send_fast_path(&self.relay, &channel).await;
        Handover {
            forwarder: tokio::spawn(forward(channel, rx, sent.err())),
        }
    }

    /// Takeover, running side, once no tunnel runs here and no request can open one:
    /// tells the successor nothing more comes.
    pub async fn finish_hand_over(&self, handover: Handover) -> io::Result<()> {
        self.outgoing.lock().unwrap().take();
        let result = handover
            .forwarder
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        match &result {
            Ok(n) => tracing::info!(tunnels = n, "takeover: every tunnel handed over"),
            Err(e) => tracing::error!(
                error = %e,
                "takeover: the successor stopped receiving; tunnels not sent were reset"
            ),
        }
        result.map(|_| ())
    }

    /// Takeover, successor side: runs the tunnels the daemon taken over sends, spread
    /// over `workers`, until it is done; returns how many arrived. Adopted tunnels hold
    /// their descriptors in `capacity` (they exist already: never refused).
    pub async fn adopt_all(
        &self,
        channel: Channel,
        capacity: &'static Capacity,
        workers: Vec<Handle>,
    ) -> io::Result<usize> {
        let mut n = 0;
        loop {
            let Some(m) = channel.recv::<ToNew>().await? else {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the daemon taken over closed the control connection before it was done",
                ));
            };
            let state = match m.value {
                ToNew::Done => break,
                ToNew::Tunnel(state) => *state,
                other => {
                    tracing::warn!(message = ?other, "takeover: unexpected message");
                    continue;
                }
            };
            let Ok([client, upstream]) = <[OwnedFd; 2]>::try_from(m.fds) else {
                tracing::error!(request_id = %state.request_id, "takeover: a tunnel came without its two sockets");
                continue;
            };
            if m.blob.len() != state.blob_len() {
                tracing::error!(request_id = %state.request_id, "takeover: a tunnel's held bytes do not match its state, resetting it");
                reset(client);
                reset(upstream);
                continue;
            }
            // Claimed now, before the daemon taken over is done (then the slots nobody
            // claimed are freed): the tunnel's task may start later.
            if let Some(splicer) = self.relay.splicer() {
                for d in [&state.client_to_upstream, &state.upstream_to_client] {
                    if let Some(k) = d.kernel {
                        splicer.claim_slot(k.slot);
                    }
                }
            }
            let hold = capacity.take(2);
            let tunnels = self.clone();
            let label = format!("tunnel {}", state.request_id);
            let task = crate::panic::contained(label.as_bytes(), async move {
                adopt(&tunnels, state, m.blob, client, upstream, hold).await;
            });
            workers[n % workers.len()].spawn(self.tracker.track_future(task));
            n += 1;
        }
        if let Some(splicer) = self.relay.splicer() {
            let freed = splicer.release_unclaimed_slots();
            tracing::debug!(
                freed,
                "takeover: ledger slots of tunnels that ended in the daemon taken over"
            );
        }
        Ok(n)
    }
}

/// The fast path's maps (frozen, this process's hand-off thread stopped), or word that
/// there is none.
async fn send_fast_path(relay: &Relay, channel: &Channel) -> io::Result<()> {
    let Some(splicer) = relay.splicer() else {
        let none = ToNew::FastPath {
            maps: vec![],
            settings: None,
            used_slots: 0,
        };
        return channel.send(&none, b"", &[]).await;
    };
    let handed = splicer.hand_over().await?;
    let blob: Vec<u8> = handed
        .used_slots
        .iter()
        .flat_map(|s| s.to_le_bytes())
        .collect();
    let names = handed.maps.iter().map(|(n, _)| n.clone()).collect();
    let fds: Vec<_> = handed.maps.iter().map(|(_, fd)| fd.as_fd()).collect();
    let message = ToNew::FastPath {
        maps: names,
        settings: Some(handed.settings.clone()),
        used_slots: handed.used_slots.len(),
    };
    channel.send(&message, &blob, &fds).await
}

/// Sends the tunnels as they come, then `Done` once every sender is gone. Closes this
/// process's copies of the sockets once sent (the successor holds them: the connections
/// stay up). If the successor stops receiving, the tunnels not sent are reset.
async fn forward(
    channel: Channel,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    mut failed: Option<io::Error>,
) -> io::Result<usize> {
    let mut sent = 0;
    while let Some(out) = rx.recv().await {
        if failed.is_none() {
            let fds = [out.client.as_fd(), out.upstream.as_fd()];
            match channel
                .send(&ToNew::Tunnel(Box::new(out.state)), &out.blob, &fds)
                .await
            {
                Ok(()) => {
                    sent += 1;
                    continue;
                }
                Err(e) => failed = Some(e),
            }
        }
        reset(out.client);
        reset(out.upstream);
    }
    match failed {
        Some(e) => Err(e),
        None => {
            channel.send(&ToNew::Done, b"", &[]).await?;
            Ok(sent)
        }
    }
}

/// Closes a socket with RST: its peer must not take the close for the end of its stream.
fn reset(fd: OwnedFd) {
    let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
}

/// A paused tunnel moves on (running side): its relays are stopped and their fast-path
/// guards disarmed (`progress.start_handing_over`).
pub(super) fn hand_over(
    tunnels: &Tunnels,
    live: &LiveTunnel,
    client: TcpStream,
    upstream: TcpStream,
    progress: &Progress,
    takeovers: u32,
) {
    let (up, down) = match (
        progress.client_to_upstream.take(),
        progress.upstream_to_client.take(),
    ) {
        (Ok(up), Ok(down)) => (up, down),
        (Err(e), _) | (_, Err(e)) => {
            // Cannot happen (the pipe holds what was counted in): the stream is not
            // whole, so both ends get a reset.
            tracing::error!(request_id = %live.request_id, error = %e, "takeover: a tunnel's held bytes could not be read back, resetting it");
            socket::reset_on_close(&client);
            socket::reset_on_close(&upstream);
            tunnels.registry.close(live);
            return;
        }
    };
    let counters = &live.counters;
    let state = TunnelState {
        request_id: live.request_id.clone(),
        port: live.port,
        opened_unix_ms: unix_ms(live.started_at),
        takeovers: takeovers + 1,
        client_to_upstream: DirectionState {
            path: up.0,
            held: up.1.len(),
            kernel: up.2,
            counters: counters.client_to_upstream.to_state(),
        },
        upstream_to_client: DirectionState {
            path: down.0,
            held: down.1.len(),
            kernel: down.2,
            counters: counters.upstream_to_client.to_state(),
        },
        targets: progress.targets(),
        kernel_queue_peak: counters.kernel_queue_peak.load(Relaxed),
        kernel_dropped: counters.kernel_dropped.load(Relaxed),
        kernel_misparsed: counters.kernel_misparsed.load(Relaxed),
    };
    // Its bytes so far join this process's totals (counters only grow here); the
    // successor carries them on.
    let snapshot = tunnels.registry.close(live);
    tracing::info!(
        request_id = %live.request_id,
        tunnel_id = live.id,
        client_to_upstream = snapshot.bytes_client_to_upstream,
        upstream_to_client = snapshot.bytes_upstream_to_client,
        client_to_upstream_state = ?up.0,
        upstream_to_client_state = ?down.0,
        client_to_upstream_held = up.1.len(),
        upstream_to_client_held = down.1.len(),
        "tunnel handed over"
    );
    let mut blob = up.1;
    blob.extend_from_slice(&down.1);
    send(tunnels, state, blob, client, upstream);
}

/// A tunnel that a draining request opened during a takeover goes to the successor
/// without running here.
pub(super) fn send_straight_on(tunnel: Tunnel, outgoing: &mpsc::UnboundedSender<Outgoing>) {
    let Tunnel {
        request_id,
        port,
        client,
        client_leftover,
        upstream,
        upstream_leftover,
        zero_hop,
    } = tunnel;
    // Nothing was redirected yet (pairing comes after the leftovers): the app's socket
    // leaves zero-hop's maps and the successor relays the tunnel as usual.
    drop(zero_hop);
    let way = |held: usize| DirectionState {
        path: PathState::Start,
        held,
        kernel: None,
        counters: Default::default(),
    };
    let state = TunnelState {
        request_id,
        port,
        opened_unix_ms: unix_ms(SystemTime::now()),
        takeovers: 1,
        client_to_upstream: way(client_leftover.len()),
        upstream_to_client: way(upstream_leftover.len()),
        targets: vec![],
        kernel_queue_peak: 0,
        kernel_dropped: 0,
        kernel_misparsed: 0,
    };
    tracing::info!(
        request_id = %state.request_id,
        port,
        "tunnel handed over (opened during the takeover)"
    );
    let mut blob = client_leftover.to_vec();
    blob.extend_from_slice(&upstream_leftover);
    match (client.into_std(), upstream.into_std()) {
        (Ok(client), Ok(upstream)) => queue(
            outgoing,
            Outgoing {
                state,
                blob,
                client: client.into(),
                upstream: upstream.into(),
            },
        ),
        _ => {
            tracing::error!(request_id = %state.request_id, "takeover: a socket could not leave this process's event loop")
        }
    }
}

fn send(
    tunnels: &Tunnels,
    state: TunnelState,
    blob: Vec<u8>,
    client: TcpStream,
    upstream: TcpStream,
) {
    let outgoing = tunnels.outgoing.lock().unwrap().clone();
    let (Some(outgoing), Ok(client), Ok(upstream)) =
        (outgoing, client.into_std(), upstream.into_std())
    else {
        tracing::error!(request_id = %state.request_id, "takeover: a paused tunnel has nowhere to go");
        return;
    };
    queue(
        &outgoing,
        Outgoing {
            state,
            blob,
            client: client.into(),
            upstream: upstream.into(),
        },
    );
}

/// Queues a tunnel for the sender (whose receiver lives until every tunnel task has
/// ended); if it is gone, the tunnel is reset.
fn queue(outgoing: &mpsc::UnboundedSender<Outgoing>, tunnel: Outgoing) {
    if let Err(mpsc::error::SendError(t)) = outgoing.send(tunnel) {
        tracing::error!(request_id = %t.state.request_id, "takeover: the tunnel sender is gone, resetting the tunnel");
        reset(t.client);
        reset(t.upstream);
    }
}

/// Runs a tunnel adopted from the daemon taken over (successor side, on a worker).
async fn adopt(
    tunnels: &Tunnels,
    state: TunnelState,
    mut blob: Vec<u8>,
    client: OwnedFd,
    upstream: OwnedFd,
    hold: crate::limits::Fds,
) {
    let streams = (stream(client), stream(upstream));
    let (client, upstream) = match streams {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(request_id = %state.request_id, error = %e, "takeover: an adopted socket cannot join this event loop");
            return;
        }
    };
    let down_held = blob.split_off(state.client_to_upstream.held);
    let up_held = blob;
    let counters = TunnelCounters {
        client_to_upstream: DirectionCounters::from_state(&state.client_to_upstream.counters),
        upstream_to_client: DirectionCounters::from_state(&state.upstream_to_client.counters),
        kernel_queue_peak: state.kernel_queue_peak.into(),
        kernel_dropped: state.kernel_dropped.into(),
        kernel_misparsed: state.kernel_misparsed.into(),
    };
    let started_at = UNIX_EPOCH + Duration::from_millis(state.opened_unix_ms);
    let live = tunnels
        .registry
        .adopt(state.request_id.clone(), state.port, started_at, counters);
    let (up, down) = (&state.client_to_upstream, &state.upstream_to_client);
    // No relay ran yet: it starts here as in a new tunnel.
    let fresh = up.path == PathState::Start && down.path == PathState::Start;
    let progress = if fresh {
        Progress::new(up_held, down_held)
    } else {
        Progress::adopted(
            WayProgress::new(up.path, up_held, up.kernel),
            WayProgress::new(down.path, down_held, down.kernel),
            state.targets.clone(),
        )
    };
    tracing::info!(
        request_id = %live.request_id,
        tunnel_id = live.id,
        port = live.port,
        relay = tunnels.relay.name(),
        client_to_upstream_state = ?up.path,
        upstream_to_client_state = ?down.path,
        client_to_upstream_held = up.held,
        upstream_to_client_held = down.held,
        takeovers = state.takeovers,
        age_ms = live.started.elapsed().as_millis() as u64,
        "tunnel adopted"
    );
    run(
        tunnels,
        Running {
            live,
            client,
            upstream,
            progress,
            takeovers: state.takeovers,
            start: if fresh { Start::New } else { Start::Adopted },
            hold,
            // Adopted tunnels are never zero-hop (they were switched back to the normal
            // hop before they were sent).
            zero_hop: None,
        },
    )
    .await;
}

/// A received socket, registered with this worker's event loop.
fn stream(fd: OwnedFd) -> io::Result<TcpStream> {
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
