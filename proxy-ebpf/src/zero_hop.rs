//! Zero-hop tunnels: the app's own `sendmsg` puts its bytes straight into the client
//! socket, skipping the loopback hop and the daemon.
//!
//! - `zero_hop_capture` (cgroup `sock_ops`): when an app accepts the connection the daemon
//!   registered (the daemon binds its upstream socket U to 127.0.0.1:0, writes that port
//!   P into `ZH_TUNNELS`, then connects), it puts the app's socket A into `ZH_APPS` under
//!   P and gives A a `TCP_NOTSENT_LOWAT` (the loader's `ZH_APP_NOTSENT_LOWAT`): while the
//!   app's bytes take the normal hop it then pauses after a few KiB instead of megabytes,
//!   so the hop drains and redirects resume sooner. Nothing else is touched: every other
//!   socket returns at the first comparison.
//! - `zero_hop_send` (`sk_msg`, on `ZH_APPS`): runs inside the app's `sendmsg`, with A's
//!   lock held, once per message. It redirects the message into the client socket D's
//!   send queue only when that is sure to go through whole: D is in a sending state and
//!   has room for it, and every byte A sent through the normal hop before (A's
//!   `write_seq`) has been relayed into D by the daemon (U's `copied_seq`, and no relay
//!   of the daemon's in progress: it marks the tunnel while bytes it took from U are not
//!   all in D yet). Otherwise the message takes the
//!   normal hop (`SK_PASS`), where A's own send buffer gives the app real backpressure.
//!   Order holds: a redirect is in D before `sendmsg` returns, and a redirect never
//!   overtakes a passed byte.
//!
//! Reading D and U: an `sk_msg` program cannot look a socket up in a sockmap (the lookup
//! returns a reference it has no helper to release: `bpf_sk_release` is not allowed in
//! this program type), so the capture program records the kernel addresses of the
//! daemon's sockets when they are established (U: its registered local port; D: a
//! connection accepted on the daemon's port, in an LRU map by cookie) and the `sk_msg`
//! program reads the few fields it needs with `bpf_probe_read_kernel` (needs
//! CAP_PERFMON, as the fast path does). While a tunnel is paired both sockets are held
//! by the daemon (and D by `ZH_PEERS`), so the addresses are live; the redirect itself
//! goes through `ZH_PEERS`, so a stale address can never send bytes anywhere.
//!
//! Blocking apps: a socket in a sockmap reads through `tcp_bpf_recvmsg()`, which waits
//! once and returns EAGAIN on any wakeup that brought no data (another thread's
//! write-space wakeup, a signal, a reset): a blocking `recv()` fails. So the capture
//! program also watches the app socket's first data packet (a `sock_ops` header-option
//! callback, enabled for captured sockets only and switched off after one decision): if
//! the socket's file is blocking, it takes the socket out of `ZH_APPS` right there,
//! inside the app's own send, before the app can read again; the daemon then leaves that
//! tunnel on the ordinary relay.
//!
//! Why not redirect into a full D: the kernel then sends part, frees the rest and returns
//! a short count or `EAGAIN` while A itself looks writable, so event-loop apps spin or
//! stall (docs/zero-hop.md). A redirect the kernel cut short anyway (memory pressure)
//! is seen at the next message (D's `write_seq` short of what was expected), which then
//! takes the normal hop, so such an app retries at most once before it is back on A's
//! own flow control.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        sk_action::SK_PASS, BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, BPF_TCP_CLOSE_WAIT, BPF_TCP_ESTABLISHED,
    },
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_map_delete_elem, bpf_probe_read_kernel,
        bpf_setsockopt, bpf_skc_to_tcp_sock,
    },
    macros::{map, sk_msg, sock_ops},
    maps::{HashMap, LruHashMap, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use proxy_common::{
    ZeroHopStats, ZeroHopTunnel, MAX_SOCKETS, ZH_APP_BLOCKING, ZH_APP_LOWAT, ZH_APP_NONBLOCKING,
    ZH_CAPTURED, ZH_LAST_REDIRECTED, ZH_MAX_CLIENTS, ZH_MAX_TUNNELS, ZH_PAIRED, ZH_RELAYING,
};

use crate::{TCP_SOCK_COPIED_SEQ_OFFSET, TCP_SOCK_WRITE_SEQ_OFFSET};

/// Apps' accepted sockets of registered tunnels, keyed by registered port (`sk_msg`
/// attached).
#[map]
static ZH_APPS: SockHash<u32> = SockHash::with_max_entries(ZH_MAX_TUNNELS, 0);

/// Client sockets of paired tunnels, keyed by cookie: the redirect targets.
#[map]
static ZH_PEERS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Registered tunnels (daemon-written), keyed by registered port. Not preallocated:
/// a deleted element is freed only after the programs reading it are done.
#[map]
static ZH_TUNNELS: HashMap<u32, ZeroHopTunnel> =
    HashMap::with_max_entries(ZH_MAX_TUNNELS, BPF_F_NO_PREALLOC);

/// Per-tunnel state and counters (program-written), keyed by registered port.
#[map]
static ZH_STATS: HashMap<u32, ZeroHopStats> =
    HashMap::with_max_entries(ZH_MAX_TUNNELS, BPF_F_NO_PREALLOC);

/// Kernel address of each connection the daemon accepted, by socket cookie (the oldest
/// are forgotten first; the daemon copies a tunnel's into `ZH_TUNNELS` when it pairs).
#[map]
static ZH_CLIENT_SOCKS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(ZH_MAX_CLIENTS, 0);

/// Cookie of the daemon's network namespace (set by the loader).
#[no_mangle]
static ZH_NETNS_COOKIE: u64 = 0;

/// The daemon's listening port (set by the loader).
#[no_mangle]
static ZH_LISTEN_PORT: u32 = 0;

/// `TCP_NOTSENT_LOWAT` for captured app sockets (set by the loader; 0: not set).
#[no_mangle]
static ZH_APP_NOTSENT_LOWAT: u32 = 0;

/// `offsetof(struct sock, sk_sndbuf)` on the running kernel (set by the loader from BTF;
/// `struct sock` is at offset 0 of `struct tcp_sock`, `struct sock_common` of `sock`).
#[no_mangle]
static SOCK_SNDBUF_OFFSET: u32 = 0;

/// `offsetof(struct sock, sk_wmem_queued)`, set the same way.
#[no_mangle]
static SOCK_WMEM_QUEUED_OFFSET: u32 = 0;

/// `offsetof(struct sock_common, skc_state)`, set the same way.
#[no_mangle]
static SOCK_STATE_OFFSET: u32 = 0;

/// `offsetof(struct sock, sk_socket)`, set the same way.
#[no_mangle]
static SOCK_SK_SOCKET_OFFSET: u32 = 0;

/// `offsetof(struct socket, file)`, set the same way.
#[no_mangle]
static SOCKET_FILE_OFFSET: u32 = 0;

/// `offsetof(struct file, f_flags)`, set the same way.
#[no_mangle]
static FILE_FLAGS_OFFSET: u32 = 0;

/// `IPPROTO_TCP` and `TCP_NOTSENT_LOWAT` (bpf_setsockopt's level and name).
const IPPROTO_TCP: i32 = 6;
const TCP_NOTSENT_LOWAT: i32 = 25;

/// `O_NONBLOCK` in `file.f_flags`.
const O_NONBLOCK: u32 = 0o4000;

/// 127.0.0.1 as the context fields hold it (network byte order).
const LOOPBACK: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Room kept free in D's send buffer beyond the message itself: the skb headers the
/// kernel charges for it (one per segment of up to 64 KiB, plus one to start with).
#[inline(always)]
fn room_needed(size: u32) -> i64 {
    size as i64 + (size as i64 >> 4) + 4096
}

#[inline(always)]
fn global<T: Copy>(v: &T) -> T {
    unsafe { core::ptr::read_volatile(v) }
}

#[sock_ops]
pub fn zero_hop_capture(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            if ctx.local_port() == global(&ZH_LISTEN_PORT) {
                note_client(&ctx);
            } else {
                capture_app(&ctx);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => note_upstream(&ctx),
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => check_app_blocking(&ctx),
        _ => {}
    }
    // 1 = carry on; the reply field is never touched, so TCP keeps its defaults.
    1
}

#[inline(always)]
fn our_netns(ctx: &SockOpsContext) -> bool {
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) };
    netns == global(&ZH_NETNS_COOKIE)
}

#[inline(always)]
fn loopback_v4(ctx: &SockOpsContext) -> bool {
    ctx.family() == 2 /* AF_INET */ && ctx.remote_ip4() == LOOPBACK && ctx.local_ip4() == LOOPBACK
}

#[inline(always)]
fn sock_addr(ctx: &SockOpsContext) -> u64 {
    unsafe { (*ctx.ops).__bindgen_anon_2.sk as u64 }
}

/// A connection accepted on the daemon's port: remember its socket's address.
#[inline(always)]
fn note_client(ctx: &SockOpsContext) {
    if !our_netns(ctx) {
        return;
    }
    let sk = sock_addr(ctx);
    if sk == 0 {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    let _ = ZH_CLIENT_SOCKS.insert(&cookie, &sk, 0);
}

/// The daemon's registered upstream connection: remember its socket's address.
#[inline(always)]
fn note_upstream(ctx: &SockOpsContext) {
    if !loopback_v4(ctx) {
        return;
    }
    let port = ctx.local_port();
    let Some(tunnel) = (unsafe { ZH_TUNNELS.get(&port) }) else {
        return;
    };
    if tunnel.target_port != u32::from_be(ctx.remote_port()) || !our_netns(ctx) {
        return;
    }
    let Some(stats) = ZH_STATS.get_ptr_mut(&port) else {
        return;
    };
    unsafe { (*stats).upstream_sk = sock_addr(ctx) };
}

/// The app's end of a registered connection: put it into `ZH_APPS`.
#[inline(always)]
fn capture_app(ctx: &SockOpsContext) {
    if !loopback_v4(ctx) {
        return;
    }
    let mut port = u32::from_be(ctx.remote_port());
    let Some(tunnel) = (unsafe { ZH_TUNNELS.get(&port) }) else {
        return;
    };
    if tunnel.target_port != ctx.local_port() || !our_netns(ctx) {
        return;
    }
    let Some(stats) = ZH_STATS.get_ptr_mut(&port) else {
        return;
    };
    let stats = unsafe { &mut *stats };
    if stats.flags & ZH_CAPTURED != 0 {
        return;
    }
    if ZH_APPS
        .update(&mut port, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64)
        .is_ok()
    {
        stats.flags |= ZH_CAPTURED;
        stats.app_sk = sock_addr(ctx);
        let mut lowat = global(&ZH_APP_NOTSENT_LOWAT);
        if lowat != 0
            && unsafe {
                bpf_setsockopt(
                    ctx.ops as *mut c_void,
                    IPPROTO_TCP,
                    TCP_NOTSENT_LOWAT,
                    &mut lowat as *mut u32 as *mut c_void,
                    4,
                )
            } == 0
        {
            stats.flags |= ZH_APP_LOWAT;
        }
        // Be called for the app's outgoing packets until its first data shows whether
        // the socket is blocking (`check_app_blocking`).
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG as i32);
    }
}

/// A packet leaves a captured app socket. On its first data packet (the app is inside a
/// send, so its socket has a file and the file its mode), a blocking socket is taken out
/// of `ZH_APPS` (the app's next `recv()` is an ordinary TCP one); either way the callback
/// is switched off.
#[inline(always)]
fn check_app_blocking(ctx: &SockOpsContext) {
    if unsafe { (*ctx.ops).skb_len } == 0 {
        // A pure ACK (the kernel acks the request before the app accepted): no answer yet.
        return;
    }
    let mut port = u32::from_be(ctx.remote_port());
    let Some(stats) = ZH_STATS.get_ptr_mut(&port) else {
        let _ = ctx.set_cb_flags(0);
        return;
    };
    let stats = unsafe { &mut *stats };
    // The address as a number (read back from the map: the verifier allows no arithmetic
    // on the context's socket pointer).
    let sk = stats.app_sk;
    if sk == 0 {
        let _ = ctx.set_cb_flags(0);
        return;
    }
    let Ok(socket) = read_u64(sk, global(&SOCK_SK_SOCKET_OFFSET)) else {
        return;
    };
    if socket == 0 {
        return;
    }
    let Ok(file) = read_u64(socket, global(&SOCKET_FILE_OFFSET)) else {
        return;
    };
    if file == 0 {
        return;
    }
    let Ok(flags) = read_u32(file, global(&FILE_FLAGS_OFFSET)) else {
        return;
    };
    let _ = ctx.set_cb_flags(0);
    if flags & O_NONBLOCK != 0 {
        stats.flags |= ZH_APP_NONBLOCKING;
    } else {
        stats.flags |= ZH_APP_BLOCKING;
        unsafe {
            bpf_map_delete_elem(
                &ZH_APPS as *const _ as *mut c_void,
                &mut port as *mut u32 as *const c_void,
            )
        };
    }
}

/// Why a message takes the normal hop.
enum Pass {
    Unpaired,
    Pending,
    Full,
    State,
    Partial,
    Refused,
}

#[sk_msg]
pub fn zero_hop_send(ctx: SkMsgContext) -> u32 {
    let port = u32::from_be(unsafe { (*ctx.msg).remote_port });
    let Some(stats) = ZH_STATS.get_ptr_mut(&port) else {
        return SK_PASS;
    };
    let stats = unsafe { &mut *stats };
    let size = ctx.size();
    if size > stats.max_msg {
        stats.max_msg = size;
    }
    match decide(&ctx, port, stats, size) {
        Ok(()) => {
            stats.redirected_bytes += size as u64;
            stats.redirects += 1;
        }
        Err(reason) => {
            stats.flags &= !ZH_LAST_REDIRECTED;
            stats.passed_bytes += size as u64;
            stats.passes += 1;
            match reason {
                Pass::Unpaired => stats.pass_unpaired += 1,
                Pass::Pending => stats.pass_pending += 1,
                Pass::Full => stats.pass_full += 1,
                Pass::State => stats.pass_state += 1,
                Pass::Partial => stats.pass_partial += 1,
                Pass::Refused => stats.pass_refused += 1,
            }
        }
    }
    // With a redirect target set, SK_PASS means "redirect"; without, "normal hop".
    SK_PASS
}

/// Redirects the message into D (Ok) or says why it takes the normal hop.
#[inline(always)]
fn decide(ctx: &SkMsgContext, port: u32, stats: &mut ZeroHopStats, size: u32) -> Result<(), Pass> {
    let Some(tunnel) = (unsafe { ZH_TUNNELS.get(&port) }) else {
        return Err(Pass::Unpaired);
    };
    if tunnel.flags & ZH_PAIRED == 0 || tunnel.client_sk == 0 || stats.upstream_sk == 0 {
        return Err(Pass::Unpaired);
    }
    let mut client = tunnel.client;
    let d = tunnel.client_sk;

    // The app's socket A: still sending (after shutdown(SHUT_WR) the normal path
    // returns EPIPE), and where its send stream stands.
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk };
    if !sending_state(unsafe { (*sk).state }) {
        return Err(Pass::State);
    }
    let a_write_seq = unsafe {
        let tp = bpf_skc_to_tcp_sock(sk as *mut c_void) as *const u8;
        if tp.is_null() {
            return Err(Pass::State);
        }
        *(tp.add(global(&TCP_SOCK_WRITE_SEQ_OFFSET) as usize) as *const u32)
    };

    // Every byte A passed must already be in D. The daemon marks the tunnel `RELAYING`
    // before it takes bytes out of U and clears the mark only once all of them are in D;
    // so if U's copied_seq (read first) has reached A's write_seq and the mark (read
    // after it, in a fresh lookup) is clear, D holds everything A passed. (The daemon's
    // two stores are ordered, and so are these two loads on x86.)
    let u_copied_seq = read_u32(stats.upstream_sk, global(&TCP_SOCK_COPIED_SEQ_OFFSET))?;
    if u_copied_seq != a_write_seq {
        return Err(Pass::Pending);
    }
    match unsafe { ZH_TUNNELS.get(&port) } {
        Some(t) if t.flags & ZH_RELAYING == 0 => {}
        _ => return Err(Pass::Pending),
    }

    let d_state = read_u8(d, global(&SOCK_STATE_OFFSET))?;
    if !sending_state(d_state as u32) {
        return Err(Pass::State);
    }
    let d_write_seq = read_u32(d, global(&TCP_SOCK_WRITE_SEQ_OFFSET))?;
    if stats.flags & ZH_LAST_REDIRECTED != 0 && d_write_seq != stats.expected_seq {
        // The kernel took only part of the last redirect (it returned a short count or
        // EAGAIN to the app): let this one take A's own flow control.
        return Err(Pass::Partial);
    }
    let sndbuf = read_u32(d, global(&SOCK_SNDBUF_OFFSET))? as i32;
    let wmem_queued = read_u32(d, global(&SOCK_WMEM_QUEUED_OFFSET))? as i32;
    if (sndbuf as i64) - (wmem_queued as i64) < room_needed(size) {
        return Err(Pass::Full);
    }
    if ZH_PEERS.redirect_msg(ctx, &mut client, 0) != SK_PASS as i64 {
        return Err(Pass::Refused);
    }
    stats.expected_seq = d_write_seq.wrapping_add(size);
    stats.flags |= ZH_LAST_REDIRECTED;
    Ok(())
}

#[inline(always)]
fn sending_state(state: u32) -> bool {
    state == BPF_TCP_ESTABLISHED || state == BPF_TCP_CLOSE_WAIT
}

/// The `u32` at `offset` of the kernel socket at `sk`.
#[inline(always)]
fn read_u32(sk: u64, offset: u32) -> Result<u32, Pass> {
    unsafe { bpf_probe_read_kernel((sk + offset as u64) as *const u32) }.map_err(|_| Pass::State)
}

/// The `u64` (a pointer) at `offset` of the kernel object at `at`.
#[inline(always)]
fn read_u64(at: u64, offset: u32) -> Result<u64, Pass> {
    unsafe { bpf_probe_read_kernel((at + offset as u64) as *const u64) }.map_err(|_| Pass::State)
}

/// The byte at `offset` of the kernel socket at `sk`.
#[inline(always)]
fn read_u8(sk: u64, offset: u32) -> Result<u8, Pass> {
    unsafe { bpf_probe_read_kernel((sk + offset as u64) as *const u8) }.map_err(|_| Pass::State)
}
