//! Taking a socket out of `SOCKS` without losing a message.
//!
//! A removal from user space (`bpf(BPF_MAP_DELETE_ELEM)`) detaches the socket's parser and
//! verdict under `sk_callback_lock` only. A stream-parser pass that runs from the `kstrp`
//! workqueue holds the socket's owner lock instead, and one that is under way meanwhile
//! hands its next messages to a verdict that is gone: the kernel drops them
//! (docs/fastpath.md, finding 6). Such passes are common exactly when hand-offs happen
//! (bulk data arriving while anything, even a `TCP_INFO`, holds the owner lock).
//!
//! So the hand-off thread asks the kernel to do the removal under that lock: it lists the
//! sockets in `UNSPLICE` and runs the `unsplice` TCP iterator, which visits every TCP
//! socket of this network namespace with its owner lock held (`bpf_iter_tcp`) and deletes
//! the listed ones from `SOCKS`. While it holds the lock no parser pass runs or starts; a
//! pass queued meanwhile finds the parser stopped. The walk costs a lock and a map lookup
//! per TCP socket of the namespace (measured in docs/fastpath.md), once per batch of
//! hand-offs, never on the data path.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use anyhow::Context;
use aya::maps::{HashMap, IterableMap, MapData};
use aya::programs::Iter;
use aya::Ebpf;
use proxy_common::{UNSPLICE_MAP, UNSPLICE_PROGRAM};

/// Name under which the iterator's link travels to a successor (with the maps).
pub const UNSPLICE_LINK: &str = "unsplice-link";

/// The `UNSPLICE` key that counts the requests not served yet (no socket has cookie 0).
const LEFT: u64 = 0;

const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;

/// The `unsplice` iterator and its request map.
pub struct Unsplicer {
    requests: Mutex<HashMap<MapData, u64, u32>>,
    /// The iterator's link: each walk is a new iterator made from it.
    link: OwnedFd,
    /// A descriptor kept in reserve: each walk needs a new one (the iterator), and a
    /// hand-off must still work when the process is out of descriptors (issue 10.3).
    spare: Mutex<Option<OwnedFd>>,
}

impl Unsplicer {
    /// Loads the iterator program of `ebpf` and links it.
    pub fn load(ebpf: &mut Ebpf) -> anyhow::Result<Unsplicer> {
        let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let prog: &mut Iter = ebpf
            .program_mut(UNSPLICE_PROGRAM)
            .with_context(|| format!("program {UNSPLICE_PROGRAM} missing"))?
            .try_into()?;
        prog.load("tcp", &btf)
            .with_context(|| format!("loading program {UNSPLICE_PROGRAM}"))?;
        let link = link_create(prog.fd()?.as_fd().as_raw_fd())
            .with_context(|| format!("linking program {UNSPLICE_PROGRAM}"))?;
        let map = ebpf
            .take_map(UNSPLICE_MAP)
            .with_context(|| format!("map {UNSPLICE_MAP} missing"))?;
        Ok(Unsplicer {
            requests: Mutex::new(HashMap::try_from(map)?),
            link,
            spare: Mutex::new(spare_fd()),
        })
    }

    /// The iterator of a daemon taken over: its request map and link.
    pub fn adopt(map: OwnedFd, link: OwnedFd) -> anyhow::Result<Unsplicer> {
        let data = MapData::from_fd(map).with_context(|| format!("map {UNSPLICE_MAP}"))?;
        let map = aya::maps::Map::from_map_data(data)?;
        Ok(Unsplicer {
            requests: Mutex::new(HashMap::try_from(map)?),
            link,
            spare: Mutex::new(spare_fd()),
        })
    }

    /// Descriptors for a successor, named as [`adopt`](Self::adopt) finds them.
    pub fn hand_over(&self) -> io::Result<Vec<(String, OwnedFd)>> {
        Ok(vec![
            (
                UNSPLICE_MAP.to_owned(),
                self.requests
                    .lock()
                    .unwrap()
                    .map()
                    .fd()
                    .as_fd()
                    .try_clone_to_owned()?,
            ),
            (UNSPLICE_LINK.to_owned(), self.link.try_clone()?),
        ])
    }

    /// Takes the sockets `cookies` out of `SOCKS`, each under its owner lock. Returns the
    /// cookies it could not serve (not listed for want of room, or not found by the walk:
    /// a socket that is closing); the caller removes those itself.
    pub fn unsplice(&self, cookies: &[u64]) -> Vec<u64> {
        let mut requests = self.requests.lock().unwrap();
        // Listed, or missed for want of room in the map.
        let (listed, mut missed): (Vec<u64>, Vec<u64>) = cookies
            .iter()
            .partition(|&&c| c != LEFT && requests.insert(c, 0, 0).is_ok());
        // The walk stops once it has served them all.
        let _ = requests.insert(LEFT, listed.len() as u32, 0);
        let started = std::time::Instant::now();
        if let Err(e) = self.walk() {
            tracing::warn!(error = %e, "fast path: the unsplice iterator failed; removing from user space");
        }
        let walk_us = started.elapsed().as_micros() as u64;
        for c in listed {
            if requests.get(&c, 0).ok() != Some(1) {
                missed.push(c);
            }
            let _ = requests.remove(&c);
        }
        let _ = requests.remove(&LEFT);
        tracing::debug!(
            asked = cookies.len(),
            missed = missed.len(),
            walk_us,
            "fast path: unsplice walk"
        );
        missed
    }
}

/// `bpf(BPF_LINK_CREATE)` for a TCP iterator program.
fn link_create(prog_fd: i32) -> io::Result<OwnedFd> {
    // union bpf_attr, link_create: prog_fd, target_fd, attach_type, flags, then the
    // iterator's (empty) info.
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&(prog_fd as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_TRACE_ITER.to_ne_bytes());
    bpf_fd(BPF_LINK_CREATE, &attr)
}

impl Unsplicer {
    /// One walk over the TCP sockets of the namespace, until every request is served
    /// (the program writes nothing: the read ends with the walk; `EAGAIN` is the program
    /// stopping it early). Out of descriptors, it gives up its spare for the iterator.
    fn walk(&self) -> io::Result<()> {
        let mut attr = [0u8; 16];
        attr[0..4].copy_from_slice(&(self.link.as_raw_fd() as u32).to_ne_bytes());
        let iter = match bpf_fd(BPF_ITER_CREATE, &attr) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                let mut spare = self.spare.lock().unwrap();
                if spare.take().is_none() {
                    return Err(e);
                }
                let iter = bpf_fd(BPF_ITER_CREATE, &attr);
                // The iterator is closed before the spare is taken again.
                let walked = iter.and_then(read_to_end);
                *spare = spare_fd();
                return walked;
            }
            other => other?,
        };
        read_to_end(iter)
    }
}

fn read_to_end(iter: OwnedFd) -> io::Result<()> {
    let mut file = std::fs::File::from(iter);
    let mut buf = [0u8; 64];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn spare_fd() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}

fn bpf_fd(cmd: libc::c_long, attr: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` prefix of the length passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor, ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
