//! The few bpf(2) commands a test needs to look into a daemon's fast-path maps: find them
//! through the map ids in `/proc/<pid>/fdinfo`, name them, count their keys, read a value.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
    // SAFETY: `attr` is the repr(C) prefix of union bpf_attr that `cmd` reads; the kernel
    // reads and writes at most size_of::<T>() bytes of it.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) }
}

/// Ids of the BPF maps a process holds descriptors of.
pub fn map_ids(pid: i32) -> BTreeSet<u32> {
    object_ids(pid, "map_id:")
}

/// Ids of the BPF programs a process holds descriptors of.
pub fn prog_ids(pid: i32) -> BTreeSet<u32> {
    object_ids(pid, "prog_id:")
}

/// Ids of the BPF objects whose fdinfo line starts with `kind` (`map_id:`, `prog_id:`).
fn object_ids(pid: i32, kind: &str) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for e in dir.flatten() {
            let Ok(info) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            if let Some(id) = info
                .lines()
                .find_map(|l| l.strip_prefix(kind))
                .and_then(|v| v.trim().parse::<u32>().ok())
            {
                ids.insert(id);
            }
        }
    }
    ids
}

pub fn map_by_id(id: u32) -> Option<OwnedFd> {
    fd_by_id(BPF_MAP_GET_FD_BY_ID, id)
}

/// A map's or program's fd from its id (`BPF_MAP_GET_FD_BY_ID`, `BPF_PROG_GET_FD_BY_ID`).
fn fd_by_id(cmd: libc::c_long, id: u32) -> Option<OwnedFd> {
    #[repr(C)]
    struct GetFd {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let fd = bpf(
        cmd,
        &mut GetFd {
            id,
            next_id: 0,
            open_flags: 0,
        },
    );
    // SAFETY: a new fd the kernel just returned, owned by nobody else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A map's name and key size.
pub fn map_info(map: &OwnedFd) -> Option<(String, usize)> {
    /// The head of struct bpf_map_info (the kernel fills what fits).
    #[repr(C)]
    #[derive(Default)]
    struct MapInfo {
        map_type: u32,
        id: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        name: [u8; 16],
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = MapInfo::default();
    let r = bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        &mut InfoByFd {
            bpf_fd: map.as_raw_fd() as u32,
            info_len: std::mem::size_of::<MapInfo>() as u32,
            info: &mut info as *mut MapInfo as u64,
        },
    );
    if r < 0 {
        return None;
    }
    let len = info.name.iter().position(|&b| b == 0).unwrap_or(16);
    Some((
        String::from_utf8_lossy(&info.name[..len]).into_owned(),
        info.key_size as usize,
    ))
}

/// The map called `name` among those process `pid` holds.
pub fn map_named(pid: i32, name: &str) -> Option<OwnedFd> {
    map_ids(pid)
        .into_iter()
        .filter_map(map_by_id)
        .find(|m| map_info(m).is_some_and(|(n, _)| n == name))
}

/// Number of keys in a map.
pub fn count_keys(map: &OwnedFd) -> usize {
    #[repr(C)]
    struct NextKey {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    let key_size = map_info(map).map_or(8, |(_, k)| k);
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut n = 0;
    loop {
        let r = bpf(
            BPF_MAP_GET_NEXT_KEY,
            &mut NextKey {
                map_fd: map.as_raw_fd() as u32,
                _pad: 0,
                // The first call passes no key: the map's first key comes back.
                key: if n == 0 { 0 } else { key.as_ptr() as u64 },
                next_key: next.as_mut_ptr() as u64,
            },
        );
        if r < 0 || n > 10_000_000 {
            return n;
        }
        n += 1;
        key.copy_from_slice(&next);
    }
}

/// The head of `union bpf_attr` for element commands.
#[repr(C)]
struct Elem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Reads the value under `key` into `value`; false if there is none.
pub fn lookup(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> bool {
    let mut attr = Elem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) == 0
}

/// Bytes the fast path counts as queued in the kernel now (`MEMORY` entry 0's first
/// field), if process `pid` holds that map.
pub fn kernel_queued(pid: i32) -> Option<i64> {
    let map = map_named(pid, "MEMORY")?;
    let mut v = [0u8; 24];
    lookup(&map, &0u32.to_ne_bytes(), &mut v)
        .then(|| i64::from_ne_bytes(v[..8].try_into().unwrap()))
}

/// Keys in each of the process's maps, by map name (maps of the same name, e.g. in the
/// fast path's and zero-hop's instances of one object, are added up).
pub fn map_key_counts(pid: i32) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for map in map_ids(pid).into_iter().filter_map(map_by_id) {
        if let Some((name, _)) = map_info(&map) {
            *counts.entry(name).or_insert(0) += count_keys(&map);
        }
    }
    counts
}

/// Deletes `key` from a map; false if it was not there.
pub fn delete(map: &OwnedFd, key: &[u8]) -> bool {
    let mut attr = Elem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: 0,
        flags: 0,
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut attr) == 0
}

/// Every key of a map with u64 keys.
pub fn keys(map: &OwnedFd) -> Vec<u64> {
    #[repr(C)]
    struct NextKey {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    let mut out = Vec::new();
    let mut next = 0u64;
    loop {
        let prev = out.last().copied();
        let r = bpf(
            BPF_MAP_GET_NEXT_KEY,
            &mut NextKey {
                map_fd: map.as_raw_fd() as u32,
                _pad: 0,
                key: prev.as_ref().map_or(0, |k| k as *const u64 as u64),
                next_key: &mut next as *mut u64 as u64,
            },
        );
        if r < 0 || out.len() > 1_000_000 {
            return out;
        }
        out.push(next);
    }
}

/// Whether a program with this id still exists.
pub fn prog_exists(id: u32) -> bool {
    fd_by_id(BPF_PROG_GET_FD_BY_ID, id).is_some()
}
