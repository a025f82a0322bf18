//! The live tunnels, for whoever reports on them (`/debug/tunnels`, metrics): each with
//! its id, request id, port, start time and counters, plus totals of the tunnels that
//! ended, so byte counters only ever grow.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use serde::Serialize;

use super::counters::{DirectionSnapshot, TunnelCounters};
use super::ebpf::Splicer;
use super::zero_hop::ZeroHop;

/// One live tunnel.
#[derive(Debug)]
pub struct LiveTunnel {
    /// Unique for the life of the process (1, 2, …).
    pub id: u64,
    pub request_id: String,
    pub port: u16,
    pub started: Instant,
    pub started_at: SystemTime,
    pub counters: TunnelCounters,
}

/// What a reporter sees of one tunnel.
#[derive(Debug, Clone, Serialize)]
pub struct TunnelSnapshot {
    pub id: u64,
    pub request_id: String,
    pub port: u16,
    pub age_s: f64,
    pub bytes_client_to_upstream: u64,
    pub bytes_upstream_to_client: u64,
    pub client_to_upstream: DirectionSnapshot,
    pub upstream_to_client: DirectionSnapshot,
}

/// Bytes by data path, one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BytesByPath {
    pub kernel: u64,
    pub splice: u64,
    pub copy: u64,
    pub zero_hop: u64,
}

impl BytesByPath {
    fn add(&mut self, d: &DirectionSnapshot) {
        self.kernel += d.kernel;
        self.splice += d.splice;
        self.copy += d.copy;
        self.zero_hop += d.zero_hop;
    }
}

/// Bytes each way by data path, over every tunnel since start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TunnelBytes {
    pub client_to_upstream: BytesByPath,
    pub upstream_to_client: BytesByPath,
}

#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Arc<LiveTunnel>>>,
    /// Bytes of the tunnels that ended.
    ended: Mutex<TunnelBytes>,
    splicer: Option<Arc<Splicer>>,
    zero_hop: Option<Arc<ZeroHop>>,
}

impl Registry {
    pub fn new(splicer: Option<Arc<Splicer>>, zero_hop: Option<Arc<ZeroHop>>) -> Self {
        Registry {
            splicer,
            zero_hop,
            ..Default::default()
        }
    }

    pub(super) fn open(&self, request_id: String, port: u16) -> Arc<LiveTunnel> {
        let tunnel = Arc::new(LiveTunnel {
            id: self.next_id.fetch_add(1, Relaxed) + 1,
            request_id,
            port,
            started: Instant::now(),
            started_at: SystemTime::now(),
            counters: TunnelCounters::default(),
        });
        self.live.lock().unwrap().insert(tunnel.id, tunnel.clone());
        tunnel
    }

    /// A tunnel adopted from the daemon taken over: opened then, with its counters so far.
    pub(super) fn adopt(
        &self,
        request_id: String,
        port: u16,
        started_at: SystemTime,
        counters: TunnelCounters,
    ) -> Arc<LiveTunnel> {
        let age = SystemTime::now()
            .duration_since(started_at)
            .unwrap_or_default();
        let now = Instant::now();
        let tunnel = Arc::new(LiveTunnel {
            id: self.next_id.fetch_add(1, Relaxed) + 1,
            request_id,
            port,
            started: now.checked_sub(age).unwrap_or(now),
            started_at,
            counters,
        });
        self.live.lock().unwrap().insert(tunnel.id, tunnel.clone());
        tunnel
    }

    /// Removes an ended tunnel; its final counts join the totals.
    pub(super) fn close(&self, tunnel: &LiveTunnel) -> TunnelSnapshot {
        // `ended` first, as in `bytes`: a reader never sees the tunnel in neither place.
        let mut ended = self.ended.lock().unwrap();
        let snapshot = self.snapshot_of(tunnel);
        self.live.lock().unwrap().remove(&tunnel.id);
        ended.client_to_upstream.add(&snapshot.client_to_upstream);
        ended.upstream_to_client.add(&snapshot.upstream_to_client);
        snapshot
    }

    /// Tunnels open now.
    pub fn len(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live tunnel, oldest first.
    pub fn snapshot(&self) -> Vec<TunnelSnapshot> {
        let live: Vec<Arc<LiveTunnel>> = self.live.lock().unwrap().values().cloned().collect();
        let mut out: Vec<TunnelSnapshot> = live.iter().map(|t| self.snapshot_of(t)).collect();
        out.sort_by_key(|t| t.id);
        out
    }

    /// Bytes each way by data path since start-up (ended tunnels plus live ones now).
    pub fn bytes(&self) -> TunnelBytes {
        let ended = self.ended.lock().unwrap();
        let mut total = *ended;
        for t in self.snapshot() {
            total.client_to_upstream.add(&t.client_to_upstream);
            total.upstream_to_client.add(&t.upstream_to_client);
        }
        total
    }

    fn snapshot_of(&self, t: &LiveTunnel) -> TunnelSnapshot {
        let (splicer, zero_hop) = (self.splicer.as_deref(), self.zero_hop.as_deref());
        let up = t.counters.client_to_upstream.snapshot(splicer, zero_hop);
        let down = t.counters.upstream_to_client.snapshot(splicer, zero_hop);
        TunnelSnapshot {
            id: t.id,
            request_id: t.request_id.clone(),
            port: t.port,
            age_s: t.started.elapsed().as_secs_f64(),
            bytes_client_to_upstream: up.bytes,
            bytes_upstream_to_client: down.bytes,
            client_to_upstream: up,
            upstream_to_client: down,
        }
    }
}
