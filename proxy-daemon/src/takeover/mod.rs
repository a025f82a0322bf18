//! Zero-downtime takeover (SPEC §5): a new process started with `--takeover` and the same
//! `--control-socket` receives, from the running one, the listening sockets, the admin
//! socket, the fast path's maps and every live tunnel; the old process finishes its
//! in-flight requests within the shutdown grace and exits 0. The listening sockets never
//! close (their descriptors move), so no connection attempt is refused; kernel-spliced
//! tunnels keep moving bytes throughout (the maps move with their sockets).
//!
//! Protocol (`wire`): new → `Hello`; old → `Sockets` (+ listener and admin descriptors),
//! `FastPath` (+ map descriptors, when the old one runs it), then one `Tunnel` (+ its two
//! sockets) per live tunnel, including tunnels its draining requests still open, then
//! `Done`. See `docs/operations.md`.

pub mod wire;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};

use wire::{Channel, Received};

/// Successor → running daemon.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToOld {
    Hello { pid: u32, version: String },
}

/// Running daemon → successor.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToNew {
    /// Descriptors: `listeners` proxy listening sockets, then the admin one if `admin`.
    Sockets { listeners: usize, admin: bool },
    /// Descriptors: the fast path's maps, named in order (none when the running daemon
    /// has no fast path). Blob: the ledger slots in use, `used_slots` u32s
    /// (little-endian); slot allocation is frozen in the running daemon from now on.
    FastPath {
        maps: Vec<String>,
        settings: Option<crate::tunnel::ebpf::Settings>,
        used_slots: usize,
    },
    /// A live tunnel; descriptors: its client and upstream sockets; blob: the bytes its
    /// relays held (`TunnelState::blob_len`).
    Tunnel(Box<crate::tunnel::handover::TunnelState>),
    /// Nothing more: the old process is exiting.
    Done,
}

/// What a successor receives before it starts serving.
pub struct Inherited {
    pub listeners: Vec<std::net::TcpListener>,
    pub admin: Option<std::net::TcpListener>,
    /// The fast path's maps, when the running daemon has one.
    pub fast_path: Option<InheritedFastPath>,
    /// Tunnels follow on this channel.
    pub channel: Channel,
}

/// The fast path of the daemon taken over: its maps by name, the settings they were
/// built with, the ledger slots its directions use.
pub struct InheritedFastPath {
    pub maps: Vec<(String, OwnedFd)>,
    pub settings: crate::tunnel::ebpf::Settings,
    pub used_slots: Vec<u32>,
}

/// Successor side: asks the running daemon for its sockets and maps.
pub async fn connect(path: &Path) -> anyhow::Result<Inherited> {
    let stream = UnixStream::connect(path)
        .await
        .with_context(|| format!("--takeover: no daemon answers on {}", path.display()))?;
    let channel = Channel::new(stream);
    channel
        .send(
            &ToOld::Hello {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
            b"",
            &[],
        )
        .await?;
    let Some(Received { value, fds, .. }) = channel.recv::<ToNew>().await? else {
        bail!("--takeover: the running daemon closed the control connection");
    };
    let ToNew::Sockets { listeners, admin } = value else {
        bail!("--takeover: unexpected first message {value:?}");
    };
    if fds.len() != listeners + usize::from(admin) || listeners == 0 {
        bail!(
            "--takeover: got {} descriptors for {listeners} listeners",
            fds.len()
        );
    }
    let mut fds = fds.into_iter();
    let listeners: Vec<std::net::TcpListener> =
        fds.by_ref().take(listeners).map(Into::into).collect();
    let admin = fds.next().map(Into::into);
    let Some(Received { value, blob, fds }) = channel.recv::<ToNew>().await? else {
        bail!("--takeover: the running daemon closed the control connection");
    };
    let ToNew::FastPath {
        maps,
        settings,
        used_slots,
    } = value
    else {
        bail!("--takeover: unexpected message {value:?}");
    };
    let fast_path = match settings {
        None => None,
        Some(settings) => {
            if maps.len() != fds.len() || blob.len() != used_slots * 4 {
                bail!("--takeover: the fast path's maps and descriptors do not match");
            }
            let used_slots = blob
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            Some(InheritedFastPath {
                maps: maps.into_iter().zip(fds).collect(),
                settings,
                used_slots,
            })
        }
    };
    Ok(Inherited {
        listeners,
        admin,
        fast_path,
        channel,
    })
}

/// Whether a daemon answers on the control socket `path`.
pub async fn answers(path: &Path) -> bool {
    UnixStream::connect(path).await.is_ok()
}

/// Running side: the control socket, root-only. A stale socket file (nobody answers) is
/// replaced; a live one means another daemon runs there, unless `replacing` it (a
/// successor binds the path the daemon it took over still holds open).
pub async fn bind(path: &Path, replacing: bool) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if !replacing && answers(path).await {
            bail!(
                "another daemon answers on {}: start with --takeover to replace it",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    // Created with mode 0600 (a umask for the bind alone is process-wide; chmod after
    // bind leaves a window only for the owner's group, which root-only dirs close).
    let listener =
        UnixListener::bind(path).with_context(|| format!("control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts a successor: only the same user (or root) may take over.
pub async fn accept(listener: &UnixListener) -> anyhow::Result<(Channel, u32)> {
    loop {
        let (stream, _) = listener.accept().await?;
        let cred = stream.peer_cred()?;
        if cred.uid() != 0 && cred.uid() != unsafe { libc::getuid() } {
            tracing::warn!(
                uid = cred.uid(),
                "control socket: refused a peer of another user"
            );
            continue;
        }
        let channel = Channel::new(stream);
        match channel.recv::<ToOld>().await {
            Ok(Some(Received {
                value: ToOld::Hello { pid, version },
                ..
            })) => {
                tracing::info!(successor_pid = pid, successor_version = %version, "takeover requested");
                return Ok((channel, pid));
            }
            // Someone checking whether a daemon answers (`--takeover-if-running`).
            Ok(None) => tracing::debug!("control socket: probed"),
            other => tracing::warn!(ok = other.is_ok(), "control socket: not a takeover request"),
        }
    }
}

/// Sends the listening sockets (and the admin one).
pub async fn send_sockets(
    channel: &Channel,
    listeners: &[OwnedFd],
    admin: Option<&OwnedFd>,
) -> std::io::Result<()> {
    let mut fds: Vec<BorrowedFd<'_>> = listeners.iter().map(AsFd::as_fd).collect();
    fds.extend(admin.map(AsFd::as_fd));
    channel
        .send(
            &ToNew::Sockets {
                listeners: listeners.len(),
                admin: admin.is_some(),
            },
            b"",
            &fds,
        )
        .await
}
