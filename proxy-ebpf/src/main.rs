//! In-kernel tunnel splicing.
//!
//! Both sockets of a tunnel sit in `SOCKS` (a SOCKHASH keyed by socket cookie). For every
//! socket, a `stream_parser` that returns the whole skb makes the kernel read through
//! `tcp_read_sock()` (which honours `copied_seq`, so retransmitted overlaps are not sent
//! twice), and the `stream_verdict` redirects each non-empty skb to the peer's egress.
//!
//! Memory: a redirected skb is uncharged from its source socket and queued on the peer's
//! psock without limit. The verdict therefore keeps, per direction, the bytes redirected
//! minus the bytes that entered the peer's TCP send stream (`tcp_sock.write_seq`, read
//! through `bpf_skc_to_tcp_sock`). When one more skb would exceed the direction's budget,
//! the direction flips to `SK_PASS` for good: bytes go to the source socket's own queue
//! (charged to it, so its receive window closes) and the daemon relays them once every
//! redirected byte is in the peer's stream. Order holds: strparser hands skbs over in
//! sequence, and every byte after the flip is passed.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
    helpers::{bpf_get_socket_cookie, bpf_map_lookup_elem, bpf_sk_release, bpf_skc_to_tcp_sock},
    macros::{map, stream_parser, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::info;
use proxy_common::{Direction, FLAG_BASE_SET, FLAG_PASSING, FLAG_PEER_GONE, MAX_SOCKETS};

#[map]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static DIRECTIONS: HashMap<u64, Direction> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// `offsetof(struct tcp_sock, write_seq)` on the running kernel; set by the loader from
/// the kernel's BTF (read-only data, so the verifier sees a constant offset).
#[no_mangle]
static TCP_SOCK_WRITE_SEQ_OFFSET: u32 = 0;

#[stream_parser]
pub fn parser(ctx: SkBuffContext) -> u32 {
    // One message per skb: no framing, just make strparser (tcp_read_sock) do the reads.
    ctx.len()
}

#[stream_verdict]
pub fn verdict(ctx: SkBuffContext) -> u32 {
    let len = ctx.len();
    if len == 0 {
        // The FIN's empty skb: redirecting it breaks the peer, passing it stalls.
        return SK_DROP;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
    let Some(dir) = DIRECTIONS.get_ptr_mut(&cookie) else {
        // Not paired (cannot happen: the daemon writes directions first): keep the bytes.
        return SK_PASS;
    };
    let dir = unsafe { &mut *dir };
    if dir.flags & FLAG_PASSING != 0 {
        dir.passed += len as u64;
        return SK_PASS;
    }
    let mut peer = dir.peer;
    if dir.budget == u32::MAX {
        // Unlimited budget: plain redirect, no accounting (diagnostics / A-B runs).
        let ret = SOCKS.redirect_skb(&ctx, &mut peer, 0);
        if ret == SK_PASS as i64 {
            dir.redirected += len as u64;
        } else {
            dir.dropped += len as u64;
        }
        return ret as u32;
    }
    let Some(peer_seq) = peer_write_seq(&peer) else {
        dir.flags |= FLAG_PASSING | FLAG_PEER_GONE;
        dir.passed += len as u64;
        return SK_PASS;
    };
    if dir.flags & FLAG_BASE_SET == 0 {
        dir.base_seq = peer_seq;
        dir.flags |= FLAG_BASE_SET;
    }
    let in_stream = peer_seq.wrapping_sub(dir.base_seq);
    let outstanding = (dir.redirected as u32).wrapping_sub(in_stream) as i32;
    let outstanding = if outstanding < 0 { 0 } else { outstanding as u64 };
    if outstanding + len as u64 > dir.budget as u64 {
        dir.flags |= FLAG_PASSING;
        dir.passed += len as u64;
        info!(
            &ctx,
            "fastpath: socket {} over budget ({} bytes queued for peer), relaying in userspace",
            cookie,
            outstanding
        );
        return SK_PASS;
    }
    let ret = SOCKS.redirect_skb(&ctx, &mut peer, 0);
    if ret == SK_PASS as i64 {
        dir.redirected += len as u64;
        let queued = outstanding + len as u64;
        if queued > dir.max_outstanding {
            dir.max_outstanding = queued;
        }
    } else {
        dir.dropped += len as u64;
    }
    ret as u32
}

/// The peer socket's `write_seq` (bytes that entered its TCP send stream).
#[inline(always)]
fn peer_write_seq(peer: &u64) -> Option<u32> {
    unsafe {
        let sk = bpf_map_lookup_elem(
            &SOCKS as *const _ as *mut c_void,
            peer as *const u64 as *const c_void,
        );
        if sk.is_null() {
            return None;
        }
        let tp = bpf_skc_to_tcp_sock(sk);
        let seq = if tp.is_null() {
            None
        } else {
            let off = core::ptr::read_volatile(&TCP_SOCK_WRITE_SEQ_OFFSET) as usize;
            Some(*((tp as *const u8).add(off) as *const u32))
        };
        bpf_sk_release(sk);
        seq
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
