//! Loads the zero-hop programs from the embedded eBPF object, attaches the `sk_msg`
//! program to `ZH_APPS` and the capture program to a cgroup, and owns the maps.
//!
//! The object is loaded on its own (the fast path's `Splicer` loads another instance);
//! the maps zero-hop does not use are created with one entry. Nothing is pinned: the maps
//! and the cgroup link go away with the process, so a crash never leaves an app's socket
//! redirected or the capture program attached.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context};
use aya::maps::{HashMap, MapData, SockHash};
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use proxy_common::{
    ZeroHopStats, ZeroHopTunnel, COPIED_SEQ_OFFSET_GLOBAL, DIRECTIONS_MAP, EVENTS_MAP,
    FILE_FLAGS_OFFSET_GLOBAL, LEDGER_MAP, SK_SOCKET_OFFSET_GLOBAL, SNDBUF_OFFSET_GLOBAL,
    SOCKET_FILE_OFFSET_GLOBAL, SOCKS_MAP, STATE_OFFSET_GLOBAL, TARGETS_MAP, UNSPLICE_MAP,
    WMEM_QUEUED_OFFSET_GLOBAL, WRITE_SEQ_OFFSET_GLOBAL, ZH_APPS_MAP, ZH_APP_NOTSENT_LOWAT_GLOBAL,
    ZH_CLIENT_SOCKS_MAP, ZH_LISTEN_PORT_GLOBAL, ZH_NETNS_COOKIE_GLOBAL, ZH_PEERS_MAP, ZH_STATS_MAP,
    ZH_TUNNELS_MAP,
};

use crate::tunnel::ebpf::{btf, sys, OBJECT};

/// The loaded zero-hop programs and their maps.
pub struct Maps {
    pub(super) apps: Mutex<SockHash<MapData, u32>>,
    pub(super) peers: Mutex<SockHash<MapData, u64>>,
    pub(super) tunnels: Mutex<HashMap<MapData, u32, ZeroHopTunnel>>,
    pub(super) stats: Mutex<HashMap<MapData, u32, ZeroHopStats>>,
    /// Kernel addresses of the daemon's accepted connections, by cookie.
    pub(super) client_socks: Mutex<HashMap<MapData, u64, u64>>,
    /// The cgroup the capture program is attached to.
    pub cgroup: PathBuf,
    _ebpf: Ebpf,
}

impl Maps {
    /// Loads the programs and attaches the capture program to `cgroup` (a cgroup v2
    /// directory). `listen_port`: the daemon's port (its accepted connections are the
    /// client sockets). Needs CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON (and CAP_SYS_ADMIN or
    /// ownership of the cgroup to attach to it).
    pub fn load(cgroup: &Path, listen_port: u16) -> anyhow::Result<Maps> {
        if OBJECT.is_empty() {
            bail!("the eBPF object was not embedded in this build (build it with `cargo xtask build-ebpf`, then rebuild)");
        }
        let offset = |s: &str, m: &str| {
            btf::member_offset(s, m).with_context(|| format!("finding {s}.{m} in the kernel's BTF"))
        };
        let write_seq = offset("tcp_sock", "write_seq")?;
        let copied_seq = offset("tcp_sock", "copied_seq")?;
        let sndbuf = offset("sock", "sk_sndbuf")?;
        let wmem_queued = offset("sock", "sk_wmem_queued")?;
        let state = offset("sock_common", "skc_state")?;
        let sk_socket = offset("sock", "sk_socket")?;
        let socket_file = offset("socket", "file")?;
        let file_flags = offset("file", "f_flags")?;
        let listen_port = listen_port as u32;
        let app_lowat = super::APP_NOTSENT_LOWAT;
        let netns = sys::netns_cookie().context("reading this network namespace's cookie")?;
        let cgroup_dir = std::fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let mut ebpf = EbpfLoader::new()
            .override_global(WRITE_SEQ_OFFSET_GLOBAL, &write_seq, true)
            .override_global(COPIED_SEQ_OFFSET_GLOBAL, &copied_seq, true)
            .override_global(SNDBUF_OFFSET_GLOBAL, &sndbuf, true)
            .override_global(WMEM_QUEUED_OFFSET_GLOBAL, &wmem_queued, true)
            .override_global(STATE_OFFSET_GLOBAL, &state, true)
            .override_global(SK_SOCKET_OFFSET_GLOBAL, &sk_socket, true)
            .override_global(SOCKET_FILE_OFFSET_GLOBAL, &socket_file, true)
            .override_global(FILE_FLAGS_OFFSET_GLOBAL, &file_flags, true)
            .override_global(ZH_NETNS_COOKIE_GLOBAL, &netns, true)
            .override_global(ZH_LISTEN_PORT_GLOBAL, &listen_port, true)
            .override_global(ZH_APP_NOTSENT_LOWAT_GLOBAL, &app_lowat, true)
            // The fast path's maps: unused by this instance (the ring at its minimum,
            // one page).
            .map_max_entries(SOCKS_MAP, 1)
            .map_max_entries(TARGETS_MAP, 1)
            .map_max_entries(DIRECTIONS_MAP, 1)
            .map_max_entries(LEDGER_MAP, 1)
            .map_max_entries(UNSPLICE_MAP, 1)
            .map_max_entries(EVENTS_MAP, 4096)
            .load(OBJECT)
            .context("loading the eBPF object (needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)")?;
        let apps: SockHash<MapData, u32> = SockHash::try_from(take(&mut ebpf, ZH_APPS_MAP)?)?;
        let peers: SockHash<MapData, u64> = SockHash::try_from(take(&mut ebpf, ZH_PEERS_MAP)?)?;
        let tunnels = HashMap::try_from(take(&mut ebpf, ZH_TUNNELS_MAP)?)?;
        let stats = HashMap::try_from(take(&mut ebpf, ZH_STATS_MAP)?)?;
        let client_socks = HashMap::try_from(take(&mut ebpf, ZH_CLIENT_SOCKS_MAP)?)?;

        let send: &mut SkMsg = ebpf
            .program_mut("zero_hop_send")
            .context("program zero_hop_send missing")?
            .try_into()?;
        send.load().context("loading program zero_hop_send")?;
        send.attach(apps.fd())
            .context("attaching zero_hop_send to ZH_APPS")?;
        let capture: &mut SockOps = ebpf
            .program_mut("zero_hop_capture")
            .context("program zero_hop_capture missing")?
            .try_into()?;
        capture.load().context("loading program zero_hop_capture")?;
        // A bpf_link (kernel ≥ 5.7): it coexists with other programs on the cgroup and
        // is detached when the daemon exits.
        capture
            .attach(cgroup_dir.as_fd(), CgroupAttachMode::Single)
            .with_context(|| {
                format!("attaching zero_hop_capture to cgroup {}", cgroup.display())
            })?;
        Ok(Maps {
            apps: Mutex::new(apps),
            peers: Mutex::new(peers),
            tunnels: Mutex::new(tunnels),
            stats: Mutex::new(stats),
            client_socks: Mutex::new(client_socks),
            cgroup: cgroup.to_path_buf(),
            _ebpf: ebpf,
        })
    }
}

fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}
