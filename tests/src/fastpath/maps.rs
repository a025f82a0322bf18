//! The daemon's fast-path maps as a test sees them (through `tests::bpf`): entry counts
//! for leak checks, the verdict's per-direction state and machine-wide memory counters,
//! and deleting entries for fault injection.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::OwnedFd;

use super::Rig;
use crate::bpf;

/// The fast path's socket maps, by the names the eBPF object gives them.
pub const SOCKET_MAPS: [&str; 2] = ["SOCKS", "TARGETS"];
/// The fast path's per-direction state map.
pub const DIRECTION_MAP: &str = "DIRECTIONS";

/// Entries in the daemon's fast-path maps.
#[derive(Debug)]
pub struct MapEntries {
    /// SOCKS + TARGETS (sockhash) entries.
    pub sockets: usize,
    /// DIRECTIONS (hash) entries.
    pub directions: usize,
    /// Which of the three maps the daemon holds.
    pub found: BTreeSet<String>,
}

impl Rig {
    /// One of the daemon's fast-path maps, by name.
    pub fn map(&self, name: &str) -> Option<OwnedFd> {
        bpf::map_named(self.pid(), name)
    }

    /// The machine-wide counters the verdict keeps: (bytes queued in the kernel now,
    /// most at once, over-budget events lost to a full ring).
    pub fn kernel_memory(&self) -> (i64, u64, u64) {
        let map = self.map("MEMORY").expect("MEMORY map");
        let mut v = [0u64; 3];
        assert!(bpf::lookup(
            &map,
            &0u32.to_ne_bytes(),
            u64s_as_bytes(&mut v)
        ));
        (v[0] as i64, v[1], v[2])
    }

    /// The verdict's state of every direction, by source socket cookie.
    pub fn directions(&self) -> HashMap<u64, proxy_common::Direction> {
        let map = self.map(DIRECTION_MAP).expect("DIRECTIONS map");
        bpf::keys(&map)
            .into_iter()
            .filter_map(|k| {
                let mut d = proxy_common::Direction::default();
                // SAFETY: Direction is repr(C) plain data; the kernel writes its bytes.
                let bytes = unsafe {
                    std::slice::from_raw_parts_mut(
                        &mut d as *mut proxy_common::Direction as *mut u8,
                        std::mem::size_of::<proxy_common::Direction>(),
                    )
                };
                bpf::lookup(&map, &k.to_ne_bytes(), bytes).then_some((k, d))
            })
            .collect()
    }

    /// Deletes every key of one of the daemon's maps (fault injection); returns how many.
    pub fn clear_map(&self, name: &str) -> usize {
        let map = self.map(name).unwrap_or_else(|| panic!("{name} map"));
        let keys = bpf::keys(&map);
        for k in &keys {
            assert!(bpf::delete(&map, &k.to_ne_bytes()), "deleting from {name}");
        }
        keys.len()
    }

    /// Finds the daemon's maps through the map ids in /proc/<pid>/fdinfo, names them with
    /// BPF_OBJ_GET_INFO_BY_FD and counts their keys.
    pub fn map_entries(&self) -> MapEntries {
        let ids = bpf::map_ids(self.pid());
        let mut m = MapEntries {
            sockets: 0,
            directions: 0,
            found: BTreeSet::new(),
        };
        for id in ids {
            let Some(map) = bpf::map_by_id(id) else {
                continue;
            };
            let Some((name, _)) = bpf::map_info(&map) else {
                continue;
            };
            if SOCKET_MAPS.contains(&name.as_str()) {
                m.sockets += bpf::count_keys(&map);
            } else if name == DIRECTION_MAP {
                m.directions += bpf::count_keys(&map);
            } else {
                continue;
            }
            m.found.insert(name);
        }
        m
    }
}

/// `v` as bytes (for a map lookup into u64s).
fn u64s_as_bytes(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: any bytes are valid u64s; same memory, length in bytes.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}
