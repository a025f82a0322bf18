//! In-kernel tunnel splicing.
//!
//! Every tunnel socket sits in `TARGETS` (a SOCKHASH with no programs, keyed by socket
//! cookie): that gives it a psock whose backlog sends the skbs redirected to it. A socket
//! whose incoming bytes are spliced also sits in `SOCKS`, where a `stream_parser` and a
//! `stream_verdict` are attached: the parser makes the kernel read through strparser
//! (`tcp_read_sock()`, which honours `copied_seq`, so retransmitted overlaps are not sent
//! twice) and the verdict redirects each message to the peer's egress.
//!
//! Memory: a redirected skb is uncharged from its source socket and queued on the peer's
//! psock without limit, so the verdict keeps two budgets. Per direction: the bytes
//! redirected minus the bytes that entered the peer's TCP send stream
//! (`tcp_sock.write_seq`). Machine-wide: the sum of that over every direction
//! (`MEMORY.queued`, kept exact by the per-direction `LEDGER`). Past either, it asks the
//! daemon (ring buffer `EVENTS`, or `LEDGER.handoff` when the ring is full) to take the
//! direction over. The daemon removes the source socket from `SOCKS` (its parser and
//! verdict stop, its psock stays because it is still in `TARGETS`), waits until every
//! redirected byte is in the peer's stream, then relays the direction itself from the
//! socket's ordinary receive queue, whose window closes when the daemon falls behind. The
//! verdict never passes bytes to the socket's own psock: on this kernel that corrupts
//! `copied_seq` (see docs/fastpath.md).
#![no_std]
#![no_main]
// The BPF target offers atomic loads and stores only; read-modify-write atomics (BPF ISA
// v3: fetch-add, compare-and-swap) come from the intrinsics.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod zero_hop;

use core::ffi::c_void;
use core::intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering};
use core::sync::atomic::AtomicU64;

use aya_ebpf::{
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
    helpers::{
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_map_delete_elem, bpf_map_lookup_elem,
        bpf_sk_release, bpf_skc_to_tcp_sock,
    },
    macros::{map, stream_parser, stream_verdict},
    maps::{Array, HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::info;
use proxy_common::{
    Direction, KernelMemory, Ledger, OverBudgetEvent, BPF_F_MMAPABLE, FLAG_BASE_SET,
    FLAG_OVER_BUDGET, FLAG_PEER_GONE, FLAG_SEQ_SET, HANDOFF_DIRECTION_BUDGET, HANDOFF_MEMORY_LIMIT,
    MAX_SOCKETS, UNSPLICE_MAX,
};

// The loader may resize every map below (`--ebpf-max-sockets`, event ring size).

/// Sockets whose incoming bytes are spliced (parser and verdict attached).
#[map]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Every socket of a spliced tunnel: redirect targets (no programs).
#[map]
static TARGETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Directions that should leave the kernel ([`OverBudgetEvent`]), for the daemon.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[map]
static DIRECTIONS: HashMap<u64, Direction> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Per direction slot: its share of the machine-wide queued bytes (see [`Ledger`]).
#[map]
static LEDGER: Array<Ledger> = Array::with_max_entries(MAX_SOCKETS, BPF_F_MMAPABLE);

/// Entry 0: the machine-wide counters (see [`KernelMemory`]).
#[map]
static MEMORY: Array<KernelMemory> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Sockets the daemon asks to leave `SOCKS` (cookie → 0), and those the `unsplice`
/// iterator took out (→ 1). Key 0 (no socket has cookie 0) counts the requests not served
/// yet: the walk stops when it reaches 0.
#[map]
static UNSPLICE: HashMap<u64, u32> = HashMap::with_max_entries(UNSPLICE_MAX, 0);

/// `offsetof(struct tcp_sock, write_seq)` on the running kernel; set by the loader from
/// the kernel's BTF (read-only data, so the verifier sees a constant offset).
#[no_mangle]
static TCP_SOCK_WRITE_SEQ_OFFSET: u32 = 0;

/// `offsetof(struct tcp_sock, copied_seq)`, set the same way.
#[no_mangle]
static TCP_SOCK_COPIED_SEQ_OFFSET: u32 = 0;

/// Most bytes queued in the kernel over every direction (`u64::MAX`: no limit); set by
/// the loader (`--ebpf-memory-limit`).
#[no_mangle]
static MEMORY_LIMIT: u64 = u64::MAX;

#[stream_parser]
pub fn parser(ctx: SkBuffContext) -> u32 {
    // One message per skb, holding every byte of it not yet handed out. strparser gives
    // the parser a clone of the whole queued skb, and the message starts at an offset
    // into it whenever part of that skb was consumed before (bytes userspace read before
    // the handoff, a retransmit overlapping bytes already read, data TCP coalesced onto a
    // partly read skb). Returning `skb->len` there claims `offset` bytes too many, so
    // strparser waits for that many more bytes before it delivers anything: the tail of
    // every burst is held back until the next one arrives, and a tunnel whose peers wait
    // on each other stalls. So the parser tracks, per socket, the sequence number where
    // the next message starts and returns the bytes from there to the skb's end.
    let len = ctx.len();
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
    let Some(dir) = DIRECTIONS.get_ptr_mut(&cookie) else {
        return len;
    };
    let dir = unsafe { &mut *dir };
    // `TCP_SKB_CB(skb)->seq`: the first word of skb->cb, which strparser's clone copies
    // and never overwrites (its own state lives after the 20 bytes the program sees).
    let Some(&seq) = ctx.cb().first() else {
        return len;
    };
    let start = if dir.flags & FLAG_SEQ_SET != 0 {
        dir.next_seq
    } else {
        // First message since the socket entered the map: strparser starts reading at
        // the socket's `copied_seq` (whatever userspace read before stays read).
        let off = unsafe { core::ptr::read_volatile(&TCP_SOCK_COPIED_SEQ_OFFSET) };
        sock_u32(&cookie, off).unwrap_or(seq)
    };
    let offset = start.wrapping_sub(seq);
    dir.next_seq = seq.wrapping_add(len);
    dir.flags |= FLAG_SEQ_SET;
    let msg_len = if offset < len {
        len - offset
    } else {
        // Cannot happen (strparser only reads skbs with unread bytes); count it so the
        // tests see it, and fall back to the whole skb.
        dir.misparsed += 1;
        len
    };
    dir.msg_len = msg_len;
    msg_len
}

#[stream_verdict]
pub fn verdict(ctx: SkBuffContext) -> u32 {
    if ctx.len() == 0 {
        // An empty skb (a FIN): redirecting it breaks the peer, passing it stalls.
        return SK_DROP;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
    let Some(dir) = DIRECTIONS.get_ptr_mut(&cookie) else {
        // Not paired (cannot happen: the daemon writes directions first): keep the bytes.
        return SK_PASS;
    };
    let dir = unsafe { &mut *dir };
    let (Some(ledger), Some(memory)) = (LEDGER.get_ptr(dir.slot), MEMORY.get_ptr(0)) else {
        // Cannot happen (the daemon allocates slots within the map): keep the bytes.
        return SK_PASS;
    };
    let (ledger, memory) = unsafe { (&*ledger, &*memory) };
    // The message's length as the parser computed it (the skb may start with bytes
    // that were consumed before; the kernel sends only the message's own bytes).
    let len = dir.msg_len as u64;
    let limit = unsafe { core::ptr::read_volatile(&MEMORY_LIMIT) };
    let mut peer = dir.peer;
    let mut handoff = 0;
    if dir.budget != u32::MAX || limit != u64::MAX {
        match peer_write_seq(&peer) {
            Some(peer_seq) => {
                if dir.flags & FLAG_BASE_SET == 0 {
                    dir.base_seq = peer_seq;
                    dir.flags |= FLAG_BASE_SET;
                }
                let in_stream = peer_seq.wrapping_sub(dir.base_seq);
                let outstanding = (dir.redirected as u32).wrapping_sub(in_stream) as i32;
                let outstanding = if outstanding < 0 {
                    0
                } else {
                    outstanding as u64
                };
                // Every byte redirected before this message that is not outstanding is
                // in the peer's stream: it no longer counts against the machine.
                settle(ledger, memory, dir.redirected - outstanding);
                let queued = outstanding + len;
                if queued > dir.max_outstanding {
                    dir.max_outstanding = queued;
                }
                // Asked at half the budget: bytes keep coming while the daemon takes the
                // direction out (0.1-1.3 ms, finding 6 in docs/fastpath.md), and the
                // other half is room for them.
                if queued > (dir.budget / 2) as u64 {
                    handoff = HANDOFF_DIRECTION_BUDGET;
                }
            }
            None => dir.flags |= FLAG_PEER_GONE,
        }
    }
    // Counted as queued before the kernel can send it, so a delivery is never seen
    // before the redirect it belongs to is counted.
    let machine = fetch_add(&memory.queued, len).wrapping_add(len) as i64;
    store(&ledger.redirected, load(&ledger.redirected) + len);
    if machine > load(&memory.peak) as i64 {
        store(&memory.peak, machine as u64);
    }
    if handoff == 0 && machine as u64 > limit && machine > 0 {
        handoff = HANDOFF_MEMORY_LIMIT;
    }
    if handoff != 0 && dir.flags & FLAG_OVER_BUDGET == 0 {
        // Keep redirecting (nothing else is lossless here) until the daemon takes the
        // socket out of SOCKS; tell it once. With the ring full (many directions over
        // at once) the daemon finds the direction through its ledger instead.
        dir.flags |= FLAG_OVER_BUDGET;
        store(&ledger.handoff, handoff as u64);
        let event = OverBudgetEvent {
            cookie,
            reason: handoff,
            _pad: 0,
            at_ns: unsafe { bpf_ktime_get_ns() },
        };
        if EVENTS.output::<OverBudgetEvent>(&event, 0).is_err() {
            fetch_add(&memory.events_missed, 1);
        }
        info!(
            &ctx,
            "fastpath: socket {} over budget (reason {}, {} bytes queued machine-wide), handing the direction to the daemon",
            cookie,
            handoff,
            machine
        );
    }
    let ret = TARGETS.redirect_skb(&ctx, &mut peer, 0);
    if ret == SK_PASS as i64 {
        dir.redirected += len;
    } else {
        dir.dropped += len;
        fetch_add(&memory.queued, len.wrapping_neg());
        store(&ledger.redirected, load(&ledger.redirected) - len);
    }
    ret as u32
}

/// Records that the first `delivered` bytes of a direction are in its peer's stream and
/// takes what was not known yet off the machine-wide count. One compare-and-swap: if the
/// daemon moved `delivered` meanwhile, it took those bytes off itself.
#[inline(always)]
fn settle(ledger: &Ledger, memory: &KernelMemory, delivered: u64) {
    let known = load(&ledger.delivered);
    if delivered > known && compare_exchange(&ledger.delivered, known, delivered) {
        fetch_add(&memory.queued, (delivered - known).wrapping_neg());
    }
}

/// Atomic load (the BPF backend selects no atomic load instruction; an aligned 64-bit
/// load is one instruction anyway).
#[inline(always)]
fn load(a: &AtomicU64) -> u64 {
    // SAFETY: `a` is a valid, aligned u64.
    unsafe { core::ptr::read_volatile(a.as_ptr()) }
}

/// Atomic store, likewise.
#[inline(always)]
fn store(a: &AtomicU64, v: u64) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(a.as_ptr(), v) }
}

/// Atomic add (wrapping); returns the previous value.
///
/// Sequentially consistent on purpose: with `Relaxed`, LLVM 22's BPF backend emits the
/// non-fetching `lock +=` and then uses the register as if it held the previous value.
/// (Every BPF atomic is a full barrier anyway.)
#[inline(always)]
fn fetch_add(a: &AtomicU64, v: u64) -> u64 {
    // SAFETY: `a` is a valid, aligned u64 for the whole call.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(a.as_ptr(), v) }
}

/// Atomic compare-and-swap; true when `a` held `old` and now holds `new`.
#[inline(always)]
fn compare_exchange(a: &AtomicU64, old: u64, new: u64) -> bool {
    // SAFETY: as above.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            a.as_ptr(),
            old,
            new,
        )
        .1
    }
}

/// The `u32` at byte `offset` of the `tcp_sock` of the tunnel socket stored under `cookie`.
#[inline(always)]
fn sock_u32(cookie: &u64, offset: u32) -> Option<u32> {
    unsafe {
        let sk = bpf_map_lookup_elem(
            &TARGETS as *const _ as *mut c_void,
            cookie as *const u64 as *const c_void,
        );
        if sk.is_null() {
            return None;
        }
        let tp = bpf_skc_to_tcp_sock(sk);
        let value = if tp.is_null() {
            None
        } else {
            Some(*((tp as *const u8).add(offset as usize) as *const u32))
        };
        bpf_sk_release(sk);
        value
    }
}

/// The peer socket's `write_seq` (bytes that entered its TCP send stream).
#[inline(always)]
fn peer_write_seq(peer: &u64) -> Option<u32> {
    let off = unsafe { core::ptr::read_volatile(&TCP_SOCK_WRITE_SEQ_OFFSET) };
    sock_u32(peer, off)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// `struct bpf_iter__tcp`: the context of a TCP iterator program.
#[repr(C)]
pub struct IterTcp {
    meta: *mut c_void,
    sk_common: *mut c_void,
    uid: u32,
}

/// Takes the sockets listed in `UNSPLICE` out of `SOCKS`. A TCP iterator runs this
/// program for each TCP socket of the daemon's network namespace while it holds that
/// socket's owner lock (`lock_sock`), so no stream-parser pass is running on it and none
/// can start before the parser and verdict are detached. A removal from user space has no
/// such guard: a parser pass running from the `kstrp` workqueue meanwhile hands its next
/// messages to a verdict that is gone, and the kernel drops them (docs/fastpath.md,
/// finding 6).
#[no_mangle]
#[link_section = "iter/tcp"]
pub fn unsplice(ctx: *mut IterTcp) -> i32 {
    // SAFETY: the kernel passes a valid context; `sk_common` may be null (end of the walk).
    let sk = unsafe { (*ctx).sk_common };
    if sk.is_null() {
        return 0;
    }
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    let (Some(state), Some(left)) = (UNSPLICE.get_ptr_mut(&cookie), UNSPLICE.get_ptr_mut(&0))
    else {
        return 0;
    };
    // SAFETY: valid map values for the duration of the program; one walk runs at a time
    // (the daemon's hand-off thread), so plain reads and writes.
    unsafe {
        if cookie == 0 || *state != 0 {
            return 0;
        }
        // Not in SOCKS (any more) is as good: nothing splices it.
        bpf_map_delete_elem(
            &SOCKS as *const _ as *mut c_void,
            &cookie as *const u64 as *const c_void,
        );
        *state = 1;
        *left = (*left).saturating_sub(1);
        // Non-zero stops the walk: every request is served (the buckets after this one
        // are not visited; the read returns EAGAIN).
        (*left == 0) as i32
    }
}
