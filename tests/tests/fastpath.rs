//! Fast-path torture tests (SPEC §4): tunnels through the real daemon binary, every byte
//! checked end to end (both directions, EOF included) against seeded pseudo-random
//! streams, plus memory bounds under stalled readers and leak checks (BPF map entries,
//! file descriptors) once tunnels are gone.
//!
//! Runs on the netns harness like production (`tests::fastpath`): the client sits in its
//! own network namespace joined by veth to the machine namespace, where the daemon
//! (`--splice <mode>`) runs and the in-process upstream app listens on loopback. Every
//! test ends with the rig's closing-line check when its `Rig` is dropped.
//!
//! Needs root (namespaces, eBPF) and the daemon built with the eBPF object embedded
//! (`cargo xtask build`). Binary: `PROJECT_INGRESS_PROXY_BIN`, else the newest of
//! `target/{release,debug}/`. Measurements on the same harness:
//! `cargo xtask measure relays` and `cargo xtask measure stalled-memory`.
//!
//! - `FASTPATH_SPLICE`: mode under test (default `ebpf`; `off` runs the same suite on the
//!   userspace relay).
//! - `FASTPATH_TORTURE=1`: longer repetitions.
//! - `FASTPATH_DAEMON_LOG`: the daemon's `RUST_LOG` (default `info`).
//! - `FASTPATH_ECHO_LOG=1`: echo daemon log lines to stderr as they come (with
//!   `--nocapture`); `SHOW_DAEMON_LOGS=1` prints the whole log when each daemon stops (the
//!   harness always does when a test fails).

use std::collections::BTreeSet;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::fastpath::faults::{cont_on_drop, FdLimit};
use tests::fastpath::system::mem_available_kib;
use tests::fastpath::tunnel::{
    check, check_all, closing_line, exchange, open, open_on, pair, read_checked, read_end,
    run_plan, wait_idle,
};
use tests::fastpath::{mode, torture, Plan, Rig, Upstream, DIRECTION_MAP, DOWN, HOLD, MIB, UP};
use tests::pattern::{self, Verifier};
use tests::{bpf, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------- tunnels

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_many_tunnels() {
    let rig = Rig::start(&mode()).await;
    bulk_both_ways(&rig, 1000).await;
}

/// The same with the budgets off, so every byte of the bulk stays in the kernel (with the
/// default budget a bulk direction leaves it within milliseconds): the kernel's own
/// bulk path, where published sockmap deployments lost and duplicated data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_all_in_kernel() {
    if mode() != "ebpf" {
        return;
    }
    let rig = Rig::start_with(
        &["--splice", "ebpf"],
        &[
            ("PROJECT_INGRESS_PROXY_EBPF_BUDGET", "4294967295"),
            ("PROJECT_INGRESS_PROXY_EBPF_MEMORY_LIMIT", "0"),
        ],
    )
    .await;
    bulk_both_ways(&rig, 5000).await;
    let json = |l: &String| serde_json::from_str::<serde_json::Value>(l).unwrap();
    let leftovers: std::collections::HashMap<String, u64> = rig
        .log_lines("tunnel opened")
        .iter()
        .map(json)
        .map(|v| {
            let n =
                v["client_leftover"].as_u64().unwrap() + v["upstream_leftover"].as_u64().unwrap();
            (v["request_id"].as_str().unwrap().to_owned(), n)
        })
        .collect();
    let closed = rig.log_lines("tunnel closed");
    assert!(!closed.is_empty());
    for line in &closed {
        let v = json(line);
        let total =
            v["client_to_upstream"].as_u64().unwrap() + v["upstream_to_client"].as_u64().unwrap();
        // Every byte but those hyper had read past the upgrade moved in the kernel.
        let leftover = leftovers[v["request_id"].as_str().unwrap()];
        assert_eq!(v["in_kernel"].as_u64().unwrap(), total - leftover, "{line}");
    }
}

/// 4 tunnels at once, each `size` bytes both ways, for several rounds.
async fn bulk_both_ways(rig: &Rig, seed: u64) {
    let upstream = Upstream::start(rig);
    let fds = rig.fd_count();
    let (rounds, size) = if torture() {
        (40, 256 * MIB)
    } else {
        (8, 48 * MIB)
    };
    for round in 0..rounds {
        let plans = (0..4u64).map(|t| Plan::new(seed + round * 10 + t, size, size));
        check_all(rig, &upstream, plans, 60).await;
    }
    wait_idle(rig, fds).await;
}

/// Hand-offs while the stream parser runs from the `kstrp` workqueue (docs/fastpath.md,
/// finding 6): both directions of every tunnel are bulk, so the psock worker that sends
/// one direction out of a socket holds its owner lock while the other direction's bytes
/// arrive on it, and their parser passes go to the workqueue; both readers stall at the
/// start and the budget is small, so every direction is handed over mid-stream. A removal
/// from `SOCKS` that races such a pass drops its next messages (the tunnel is reset, or a
/// check finds the gap); taken out under the socket's lock, every byte arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoffs_during_workqueue_parser_passes_lose_nothing() {
    if mode() != "ebpf" {
        return;
    }
    let _heavy = MEMORY_HEAVY.lock().await;
    let rig = Rig::start_args(&[
        "--splice",
        "ebpf",
        "--ebpf-budget",
        "65536",
        "--ebpf-memory-limit",
        "524288",
    ])
    .await;
    let upstream = Upstream::start(&rig);
    let fds = rig.fd_count();
    let (rounds, tunnels) = if torture() { (40, 24u64) } else { (6, 24u64) };
    for round in 0..rounds {
        let plans = (0..tunnels).map(|t| {
            let mut plan = Plan::new(70_000 + round * 100 + t, 4 * MIB + t, 4 * MIB + round);
            // Sent with the 101, before the daemon splices: the parser's first pass (the
            // poke, from the workqueue) reads all of it and crosses the budget mid-pass.
            plan.upstream_pre = MIB + t * 4096;
            plan.client_pre = MIB / 2 + t;
            plan.client_stall_ms = 5 + t % 7;
            plan.upstream_stall_ms = 5 + (t + 3) % 7;
            plan
        });
        check_all(&rig, &upstream, plans, 60).await;
    }
    wait_idle(&rig, fds).await;
    let total = (rounds * tunnels) as usize;
    assert!(
        rig.wait_log("tunnel closed", total - 1).await.is_some(),
        "not every tunnel logged its closing line"
    );
    let handed = rig
        .log_lines("tunnel closed")
        .iter()
        .filter(|l| {
            l.contains("_handoff\":\"budget\"") || l.contains("_handoff\":\"memory_limit\"")
        })
        .count();
    assert!(
        handed >= total / 2,
        "only {handed} of {total} tunnels had a direction handed over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_ping_pong() {
    let rig = Rig::start(&mode()).await;
    let upstream = Upstream::start(&rig);
    let (mut s, early) = open(&rig, upstream.port, "/echo", b"").await.unwrap();
    assert!(early.is_empty());
    s.set_nodelay(true).unwrap();
    let n = if torture() { 20_000 } else { 3_000 };
    let mut b = [0u8; 1];
    for i in 0..n {
        let x = (i % 251) as u8;
        s.write_all(&[x]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .expect("stalled")
            .unwrap();
        assert_eq!(b[0], x, "round trip {i}");
    }
    s.shutdown().await.unwrap();
    assert_eq!(s.read(&mut b).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_small_messages() {
    let rig = Rig::start(&mode()).await;
    let upstream = Upstream::start(&rig);
    for seed in 0..if torture() { 20 } else { 4 } {
        let (s, _) = open(&rig, upstream.port, "/echo", b"").await.unwrap();
        s.set_nodelay(true).unwrap();
        let (mut r, mut w) = s.into_split();
        let total = 4 * MIB;
        let writer = async move {
            // Message sizes 1..=300 from a second stream, data from the checked one.
            let mut sent = 0u64;
            let mut k = 0u64;
            let mut buf = vec![0u8; 300];
            while sent < total {
                let sz = [pattern::byte_at(seed, k), pattern::byte_at(seed, k + 1)];
                k += 2;
                let n = ((u16::from_le_bytes(sz) as u64 % 300) + 1).min(total - sent) as usize;
                pattern::fill(seed ^ 0x77, sent, &mut buf[..n]);
                w.write_all(&buf[..n]).await.unwrap();
                sent += n as u64;
                if sz[0].is_multiple_of(16) {
                    tokio::task::yield_now().await;
                }
            }
            w.shutdown().await.unwrap();
        };
        let reader = async move {
            let mut v = Verifier::new(seed ^ 0x77);
            pattern::receive(&mut r, &mut v, total).await.unwrap();
        };
        tokio::time::timeout(Duration::from_secs(60), async {
            tokio::join!(writer, reader)
        })
        .await
        .expect("stalled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_and_queued_bytes() {
    let rig = Rig::start(&mode()).await;
    let upstream = Upstream::start(&rig);
    let mut seed = 50_000;
    for (upstream_pre, client_pre, up, down) in [
        (1000, 1000, 1000, 1000), // only leftovers, nothing after: handoff must not wait for more
        (1, 1, 1, 1),
        (5000, 0, 5000, 5000), // upstream speaks right after its 101, nothing else
        (0, 3000, 3000, 0),    // client speaks with its request, nothing else
        (60_000, 60_000, 8 * MIB, 8 * MIB),
    ] {
        for _ in 0..if torture() { 50 } else { 5 } {
            seed += 1;
            let mut plan = Plan::new(seed, up, down);
            plan.upstream_pre = upstream_pre;
            plan.client_pre = client_pre;
            tokio::time::timeout(Duration::from_secs(30), run_plan(&rig, &upstream, plan))
                .await
                .unwrap_or_else(|_| panic!("stalled: {plan:?}"))
                .unwrap_or_else(|e| panic!("{plan:?}: {e}"));
        }
    }
    // Client sends right after receiving the 101 (bytes queued before the splice),
    // upstream replies only when it has them: nothing more comes to kick the kernel.
    for i in 0..if torture() { 200 } else { 30 } {
        let (mut s, _) = open(&rig, upstream.port, "/echo", b"").await.unwrap();
        let msg = format!("hello {i}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut b = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .expect("queued bytes stalled")
            .unwrap();
        assert_eq!(b, msg.as_bytes());
    }
}

async fn slow_reader(client_slow: bool) {
    let _heavy = MEMORY_HEAVY.lock().await;
    // Its kernel-queue bound depends on how fast the daemon reacts: no other test's load.
    let rig = Rig::start_alone(&mode()).await;
    let upstream = Upstream::start(&rig);
    let total = 512 * MIB;
    let stall = 3000;
    let mut plan = if client_slow {
        Plan::new(70_001, 0, total)
    } else {
        Plan::new(70_002, total, 0)
    };
    // The idle direction closes only after the busy one: a socket whose FIN has
    // arrived cannot enter a sockmap, which would leave the whole tunnel in userspace.
    if client_slow {
        plan.client_stall_ms = stall;
        plan.up_after_eof = true;
    } else {
        plan.upstream_stall_ms = stall;
        plan.down_after_eof = true;
    }
    let before = mem_available_kib();
    let d = &rig;
    let u = &upstream;
    let run = run_plan(d, u, plan);
    let sampler = async {
        let mut worst = 0i64;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(stall - 200) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            worst = worst.max(before - mem_available_kib());
        }
        worst
    };
    let (r, worst_kib) = tokio::join!(tokio::time::timeout(Duration::from_secs(60), run), sampler);
    r.expect("stalled").unwrap();
    eprintln!(
        "slow reader ({}): memory grew by at most {} MiB while stalled",
        if client_slow { "client" } else { "upstream" },
        worst_kib / 1024
    );
    // Socket buffers (a few MiB each) + the fast-path budget; without the budget this was
    // gigabytes.
    assert!(
        worst_kib < 96 * 1024,
        "memory grew by {} MiB with a stalled reader",
        worst_kib / 1024
    );
    if mode() == "ebpf" {
        // The kernel's own count: the most bytes queued in a psock at once (memory no
        // socket is charged for). The verdict asks for the hand-off at half the 2 MiB
        // budget and keeps redirecting until the daemon has taken the socket out of the
        // map: the walk of the TCP tables (0.2-1.2 ms here), and a parser pass running
        // meanwhile moves whatever the source's receive queue holds before the walk can
        // take its lock. At this test's loopback line rate (about 2.7 GB/s) that put the
        // peak at 1.1-4.3 MB on an idle machine (the daemon before parked tunnels
        // passed 4 MiB in 1 of 8 runs, this one too) and 5.6 MB once in a suite run.
        // Bounded, not tight: allowed 8 MiB (4 budgets); without the budget it was
        // gigabytes. The peak itself is measured by `cargo xtask measure
        // stalled-memory` (docs/fastpath.md, finding 6).
        let line = rig
            .wait_log("tunnel closed", 0)
            .await
            .expect("no tunnel-closed line");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let peak = v["kernel_queue_peak"].as_u64().expect("kernel_queue_peak");
        let in_kernel = v["in_kernel"].as_u64().expect("in_kernel");
        eprintln!(
            "slow reader: kernel queue peak {peak} bytes, {in_kernel} bytes moved in the kernel"
        );
        assert!(peak <= 8 * MIB, "kernel queued {peak} bytes for one socket");
        assert!(
            in_kernel < total,
            "a stalled reader must move the direction out of the kernel ({in_kernel} bytes stayed in it)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_reader_bounded_memory() {
    slow_reader(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_reader_bounded_memory() {
    slow_reader(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_each_way() {
    let rig = Rig::start(&mode()).await;
    let upstream = Upstream::start(&rig);
    for i in 0..if torture() { 100 } else { 10 } {
        // Client half-closes first, upstream answers after it saw the EOF.
        let mut plan = Plan::new(80_000 + i, 2 * MIB + i, 3 * MIB);
        plan.down_after_eof = true;
        check(&rig, &upstream, plan, 30).await;
        // Upstream half-closes first, client answers after it saw the EOF.
        let mut plan = Plan::new(81_000 + i, 3 * MIB, 2 * MIB + i);
        plan.up_after_eof = true;
        check(&rig, &upstream, plan, 30).await;
        // Tiny: a few bytes and EOF right away (FIN possibly before the splice).
        let mut plan = Plan::new(82_000 + i, 10, 10);
        plan.client_pre = 10;
        plan.upstream_pre = 10;
        check(&rig, &upstream, plan, 30).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_propagate() {
    let rig = Rig::start(&mode()).await;
    let upstream = Upstream::start(&rig);
    let fds = rig.fd_count();
    for _ in 0..if torture() { 50 } else { 5 } {
        // Upstream resets: the client sees its bytes then a reset (not a clean EOF).
        let (mut s, early) = open(&rig, upstream.port, "/reset/100000", b"")
            .await
            .unwrap();
        let mut got = early.len();
        let mut b = vec![0u8; 65536];
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut b).await {
                    Ok(0) => return Err("clean EOF instead of reset".to_string()),
                    Ok(n) => got += n,
                    Err(e) => return Ok(e.kind()),
                }
            }
        })
        .await
        .expect("reset not propagated");
        assert_eq!(end, Ok(io::ErrorKind::ConnectionReset), "after {got} bytes");
        // Client resets: the upstream sees a reset.
        upstream.results.lock().unwrap().remove(&HOLD);
        let (s, _) = open(&rig, upstream.port, "/hold", b"").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(r) = upstream.result(HOLD) {
                r.unwrap();
                break;
            }
            assert!(Instant::now() < deadline, "client reset not propagated");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    wait_idle(&rig, fds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_concurrent_tunnels_leave_nothing_behind() {
    let rig = Rig::start(&mode()).await;
    let upstream = Upstream::start(&rig);
    let fds = rig.fd_count();
    let n = if torture() { 10_000 } else { 2_000 };
    let sem = Arc::new(tokio::sync::Semaphore::new(500));
    let mut tasks = Vec::new();
    let d = Arc::new(rig);
    let u = Arc::new(upstream);
    for i in 0..n {
        let sem = sem.clone();
        let d = d.clone();
        let u = u.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let plan = Plan::new(1_000_000 + i, 1000 + i % 5000, 2000 + i % 3000);
            tokio::time::timeout(Duration::from_secs(60), run_plan(&d, &u, plan))
                .await
                .map_err(|_| format!("tunnel {i} stalled"))?
                .map_err(|e| format!("tunnel {i}: {e}"))
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    wait_idle(&d, fds).await;
    // Log lines leave the daemon in batches: give the last ones a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let closed = loop {
        let closed = d.log_lines("tunnel closed").len();
        if closed >= n as usize - 10 || Instant::now() > deadline {
            break closed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        closed >= n as usize - 10,
        "only {closed} tunnels logged closed"
    );
}

/// Issue 9.5: a tunnel spliced in the kernel both ways waits without a task ("parked":
/// no futures, no event-loop registrations) and gets one back for each thing that can
/// happen to it: its client's or its upstream's FIN, a reset from either side, a
/// direction over its budget (handed over while parked). Every byte is checked, each
/// end is the one the peer caused, and nothing is left parked, open or in the maps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnels_park_and_wake_for_every_event() {
    if mode() != "ebpf" {
        return;
    }
    let rig = Rig::start("ebpf").await;
    let upstream = Upstream::start(&rig);
    let fds = rig.fd_count();
    const EACH: u64 = 8;
    const SMALL: u64 = 16 * 1024;
    // Over the default 2 MiB budget: handed over to splice(2) while parked.
    const BULK: u64 = 6 * MIB;
    let groups = [
        "client-fin",
        "upstream-fin",
        "client-rst",
        "upstream-rst",
        "handoff",
    ];
    let mut tunnels = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        for i in 0..EACH {
            let key = 7_000 + g as u64 * 100 + i;
            let id = format!("park-{group}-{i}");
            let (c, u) = pair(&rig, &upstream, key, &id).await;
            tunnels.push((*group, id, key, c, u));
        }
    }
    let n = tunnels.len();
    // A little traffic each way, in the kernel (parked tunnels are not woken by it).
    for (_, _, key, c, u) in &mut tunnels {
        let (up, down) = (*key ^ UP, *key ^ DOWN);
        pattern::send(c, up, 0, SMALL).await.unwrap();
        read_checked(u, up, 0, SMALL).await.unwrap();
        pattern::send(u, down, 0, SMALL).await.unwrap();
        read_checked(c, down, 0, SMALL).await.unwrap();
    }
    wait_parked(&rig, n, n).await;
    let mut ends = Vec::new();
    for (group, id, key, mut c, mut u) in tunnels {
        let (up, down) = (key ^ UP, key ^ DOWN);
        let rig = &rig;
        ends.push(async move {
            match group {
                // One side's FIN wakes it; the other side answers after the EOF.
                "client-fin" | "upstream-fin" => {
                    let (first, first_seed, second, second_seed) = if group == "client-fin" {
                        (&mut c, up, &mut u, down)
                    } else {
                        (&mut u, down, &mut c, up)
                    };
                    pattern::send(first, first_seed, SMALL, 2 * SMALL)
                        .await
                        .unwrap();
                    first.shutdown().await.unwrap();
                    read_checked(second, first_seed, SMALL, SMALL)
                        .await
                        .unwrap();
                    assert_eq!(read_end(second).await, Ok(()), "{id}");
                    pattern::send(second, second_seed, SMALL, 2 * SMALL)
                        .await
                        .unwrap();
                    second.shutdown().await.unwrap();
                    read_checked(first, second_seed, SMALL, SMALL)
                        .await
                        .unwrap();
                    assert_eq!(read_end(first).await, Ok(()), "{id}");
                    rig.expect(&id, 2 * SMALL, 2 * SMALL);
                }
                // A reset wakes it and reaches the other side as a reset.
                "client-rst" | "upstream-rst" => {
                    let (gone, other) = if group == "client-rst" {
                        (c, &mut u)
                    } else {
                        (u, &mut c)
                    };
                    socket2::SockRef::from(&gone)
                        .set_linger(Some(Duration::ZERO))
                        .unwrap();
                    drop(gone);
                    assert_eq!(
                        read_end(other).await,
                        Err(io::ErrorKind::ConnectionReset),
                        "{id}"
                    );
                    assert_eq!(closing_line(rig, &id).await["end"], "reset", "{id}");
                }
                // Over budget while parked: handed over, then ends cleanly both ways.
                _ => {
                    let send = async {
                        pattern::send(&mut u, down, SMALL, SMALL + BULK)
                            .await
                            .unwrap();
                        u.shutdown().await.unwrap();
                    };
                    let recv = read_checked(&mut c, down, SMALL, BULK);
                    let (_, got) = tokio::join!(send, recv);
                    got.unwrap();
                    assert_eq!(read_end(&mut c).await, Ok(()), "{id}");
                    c.shutdown().await.unwrap();
                    assert_eq!(read_end(&mut u).await, Ok(()), "{id}");
                    rig.expect(&id, SMALL, SMALL + BULK);
                    let line = closing_line(rig, &id).await;
                    assert_eq!(line["upstream_to_client_handoff"], "budget", "{line}");
                }
            }
        });
    }
    tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(ends),
    )
    .await
    .expect("a parked tunnel did not wake");
    wait_parked(&rig, 0, 0).await;
    wait_idle(&rig, fds).await;
}

/// Waits until the daemon reports `parked` parked tunnels out of `open`.
async fn wait_parked(rig: &Rig, parked: usize, open: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = rig.setup.admin_get("/metrics").await.unwrap();
        let now = (
            metric(&body, "project_ingress_proxy_tunnels_parked"),
            metric(&body, "project_ingress_proxy_tunnels"),
        );
        if now == (Some(parked as f64), Some(open as f64)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {parked} parked of {open} open tunnels, the daemon reports {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- hardening

/// Tests that hold or measure large amounts of memory run one at a time (the slow-reader
/// tests bound the machine's `MemAvailable`, which every other such test would move).
static MEMORY_HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Issue 10.4: the machine-wide budget. 48 stalled readers, each direction under its own
/// 32 MiB budget (asked to leave at 16 MiB; together they could hold 768 MiB): with an
/// 8 MiB machine-wide limit
/// most directions must leave the kernel for the limit, long before their own budget
/// (not all: a tunnel opened last may find the queue drained by then). With the default
/// 2 MiB budget, whether a direction crossed its own budget or the limit first depended
/// on how fast the daemon handed directions over: the test measured timing. How far the kernel's peak goes past the limit depends on how fast the daemon
/// reacts (line rate meanwhile) and so on the machine's load: it is printed and measured
/// by `cargo xtask measure stalled-memory`, not asserted. Once every tunnel is gone the
/// count is back to exactly 0: the ledger neither leaks nor double-counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_bounds_kernel_memory_across_tunnels() {
    if mode() != "ebpf" {
        return;
    }
    let _heavy = MEMORY_HEAVY.lock().await;
    let (for_limit, _) = stalled_readers_kernel_peak(8 * MIB).await;
    assert!(
        for_limit >= 24,
        "only {for_limit} of 48 directions left the kernel for the machine-wide limit"
    );
}

/// 48 tunnels whose clients stall 2 s while their upstreams send 32 MiB each, with
/// `--ebpf-memory-limit limit`: directions handed over for the limit, and the kernel's
/// machine-wide peak of queued bytes.
async fn stalled_readers_kernel_peak(limit: u64) -> (usize, u64) {
    let tunnels = 48u64;
    let rig = Rig::start_with(
        // The verdict asks at half of it, 16 MiB: well past the machine-wide limit.
        &["--splice", "ebpf", "--ebpf-budget", &(32 * MIB).to_string()],
        &[(
            "PROJECT_INGRESS_PROXY_EBPF_MEMORY_LIMIT",
            &limit.to_string(),
        )],
    )
    .await;
    let upstream = Upstream::start(&rig);
    let fds = rig.fd_count();
    let plans = (0..tunnels).map(|i| {
        let mut plan = Plan::new(90_000 + i, 0, 32 * MIB);
        plan.client_stall_ms = 2000;
        plan.up_after_eof = true;
        plan
    });
    check_all(&rig, &upstream, plans, 90).await;
    wait_idle(&rig, fds).await;
    // Every closing line, not those written so far (the log writer batches them).
    assert!(
        rig.wait_log("tunnel closed", tunnels as usize - 1)
            .await
            .is_some(),
        "not every tunnel logged its closing line"
    );
    let (queued, peak, _) = rig.kernel_memory();
    let handed: Vec<String> = rig
        .log_lines("tunnel closed")
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["upstream_to_client_handoff"].as_str().unwrap().to_owned()
        })
        .collect();
    let for_limit = handed.iter().filter(|h| *h == "memory_limit").count();
    eprintln!(
        "memory limit {:.0} MiB, {tunnels} stalled readers: kernel peak {:.1} MiB machine-wide; {for_limit} directions handed over for the limit, {} for their own budget",
        limit as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        handed.iter().filter(|h| *h == "budget").count(),
    );
    assert_eq!(
        queued, 0,
        "bytes still counted as queued with no tunnel left"
    );
    (for_limit, peak)
}

/// Issue 10.9: the maps full. With room for 4 tunnels (8 sockets), 10 tunnels open at once
/// all carry every byte; the 4 first are spliced in the kernel, the rest fall back to the
/// userspace relay; once they are gone the kernel takes tunnels again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_full_fall_back_to_userspace() {
    if mode() != "ebpf" {
        return;
    }
    let rig = Rig::start_args(&["--splice", "ebpf", "--ebpf-max-sockets", "8"]).await;
    let upstream = Upstream::start(&rig);
    let fds = rig.fd_count();
    let mut pairs = Vec::new();
    for i in 0..10u64 {
        let id = format!("full-{i}");
        let (c, u) = pair(&rig, &upstream, i, &id).await;
        pairs.push((id, c, u));
    }
    let n = 256 * 1024;
    let tasks = pairs.into_iter().enumerate().map(|(i, (id, c, u))| {
        let rig = &rig;
        async move {
            exchange(c, u, 91_000 + i as u64, n).await;
            rig.expect(&id, n, n);
            id
        }
    });
    let ids = futures_util::future::join_all(tasks).await;
    let mut kernel = 0;
    for id in &ids {
        let v = closing_line(&rig, id).await;
        match (
            v["client_to_upstream_path"].as_str(),
            v["upstream_to_client_path"].as_str(),
        ) {
            (Some("kernel"), Some("kernel")) => kernel += 1,
            (Some("copy"), Some("copy")) => {}
            other => panic!("unexpected data paths {other:?}: {v}"),
        }
    }
    assert_eq!(kernel, 4, "tunnels spliced in the kernel with room for 4");
    wait_idle(&rig, fds).await;
    let (c, u) = pair(&rig, &upstream, 99, "full-after").await;
    exchange(c, u, 91_999, n).await;
    rig.expect("full-after", n, n);
    let v = closing_line(&rig, "full-after").await;
    assert_eq!(v["client_to_upstream_path"], "kernel", "{v}");
}

/// Issue 10.9: the event ring full. With a one-page ring (about 170 events) and the daemon
/// stopped, 192 upstreams push 1 MiB each into clients that do not read: 192 directions go
/// over their 64 KiB budget while nobody drains the ring. Once the daemon runs again,
/// every one of them must still leave the kernel (before: those whose event was lost
/// stayed there, holding their bytes), and every byte arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_ring_full_still_hands_every_direction_over() {
    if mode() != "ebpf" {
        return;
    }
    let _heavy = MEMORY_HEAVY.lock().await;
    let rig = Rig::start_with(
        &[
            "--splice",
            "ebpf",
            "--ebpf-budget",
            "65536",
            "--ebpf-event-ring-bytes",
            "4096",
        ],
        &[],
    )
    .await;
    let upstream = Upstream::start(&rig);
    let fds = rig.fd_count();
    let tunnels = 192u64;
    let n = MIB;
    let mut pairs = Vec::new();
    for i in 0..tunnels {
        // A tiny receive window, so the bytes redirected to the client queue in the
        // kernel (the daemon's client socket sends little over the veth).
        let sock = rig.setup.topo.client.tcp_socket(false).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let c = sock.connect(rig.setup.addr()).await.unwrap();
        let id = format!("ring-{i}");
        let (c, early) = open_on(c, upstream.port, &format!("/hand/{i}"), b"", Some(&id))
            .await
            .unwrap();
        assert!(early.is_empty());
        pairs.push((id, c, upstream.handed.take(i).await));
    }
    // Every tunnel's directions in the kernel before the daemon stops: one whose relay
    // had not inserted its sockets yet would wait for the stopped daemon (under load,
    // the 101 reaches the client before the relay task runs).
    let deadline = Instant::now() + Duration::from_secs(20);
    while (rig.directions().len() as u64) < 2 * tunnels {
        assert!(
            Instant::now() < deadline,
            "{} of {} directions entered the kernel",
            rig.directions().len(),
            2 * tunnels
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rig.setup.daemon.stop_process().await;
    let resumed = cont_on_drop(rig.pid());
    // The upstreams write while the daemon is stopped; the kernel splices on.
    let mut ends = Vec::new();
    for (i, (id, c, mut u)) in pairs.into_iter().enumerate() {
        let seed = 92_000 + i as u64;
        pattern::send(&mut u, seed ^ DOWN, 0, n).await.unwrap();
        ends.push((id, seed, c, u));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let redirected: u64 = rig.directions().values().map(|d| d.redirected).sum();
        if redirected == tunnels * n {
            break;
        }
        if Instant::now() > deadline {
            let short: Vec<String> = rig
                .directions()
                .iter()
                .filter(|(_, d)| d.redirected != 0 && d.redirected != n)
                .map(|(k, d)| format!("{k}: {} bytes, flags {:#x}", d.redirected, d.flags))
                .collect();
            panic!(
                "the kernel redirected {redirected} of {} bytes; short directions: {short:?}",
                tunnels * n
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, _, missed) = rig.kernel_memory();
    let over = rig
        .directions()
        .values()
        .filter(|d| d.flags & proxy_common::FLAG_OVER_BUDGET != 0)
        .count();
    assert_eq!(over as u64, tunnels, "directions over budget");
    assert!(missed > 0, "the ring never filled; the test proves nothing");
    drop(resumed);
    let tasks = ends.into_iter().map(|(id, seed, mut c, mut u)| {
        let rig = &rig;
        async move {
            tokio::time::timeout(Duration::from_secs(60), async {
                read_checked(&mut c, seed ^ DOWN, 0, n).await.unwrap();
                u.shutdown().await.unwrap();
                assert_eq!(read_end(&mut c).await, Ok(()));
                c.shutdown().await.unwrap();
                assert_eq!(read_end(&mut u).await, Ok(()));
            })
            .await
            .expect("stalled");
            rig.expect(&id, 0, n);
            id
        }
    });
    let ids = futures_util::future::join_all(tasks).await;
    for id in &ids {
        let v = closing_line(&rig, id).await;
        assert_ne!(
            v["upstream_to_client_handoff"], "none",
            "{id}: a direction over budget stayed in the kernel: {v}"
        );
    }
    assert!(!rig.log_lines("event ring was full").is_empty());
    wait_idle(&rig, fds).await;
}

/// Issue 10.9: `kill -9` with spliced tunnels. The kernel frees every map and program of
/// the dead daemon (nothing is pinned), its clients see their connections end instead of
/// hanging, and a daemon started again on the same address serves tunnels in the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_frees_kernel_state_and_a_restart_serves() {
    if mode() != "ebpf" {
        return;
    }
    let mut rig = Rig::start("ebpf").await;
    let upstream = Upstream::start(&rig);
    let mut live = Vec::new();
    for i in 0..8u64 {
        let (mut c, mut u) = pair(&rig, &upstream, i, &format!("k9-{i}")).await;
        // Bytes both ways through the kernel, checked, then the tunnel stays open.
        let seed = 93_000 + i;
        pattern::send(&mut c, seed ^ UP, 0, 100_000).await.unwrap();
        read_checked(&mut u, seed ^ UP, 0, 100_000).await.unwrap();
        pattern::send(&mut u, seed ^ DOWN, 0, 100_000)
            .await
            .unwrap();
        read_checked(&mut c, seed ^ DOWN, 0, 100_000).await.unwrap();
        live.push((c, u));
    }
    assert_eq!(rig.map_entries().sockets, 32, "8 tunnels spliced");
    let maps = bpf::map_ids(rig.pid());
    let progs: BTreeSet<u32> = bpf::prog_ids(rig.pid());
    assert!(
        maps.len() >= 6 && !progs.is_empty(),
        "maps {maps:?} programs {progs:?}"
    );
    rig.setup.daemon.signal(libc::SIGKILL);
    let code = rig
        .setup
        .daemon
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(code, None, "killed by a signal");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left_maps: Vec<u32> = maps
            .iter()
            .copied()
            .filter(|&id| bpf::map_by_id(id).is_some())
            .collect();
        let left_progs: Vec<u32> = progs
            .iter()
            .copied()
            .filter(|&id| bpf::prog_exists(id))
            .collect();
        if left_maps.is_empty() && left_progs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the kernel kept maps {left_maps:?} and programs {left_progs:?} of the killed daemon"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (mut c, mut u) in live {
        // The daemon died: each side's connection ends (either way), none hangs.
        let _ = read_end(&mut c).await;
        let _ = read_end(&mut u).await;
    }
    rig.restart(&["--splice", "ebpf"]).await;
    let fds = rig.fd_count();
    check(&rig, &upstream, Plan::new(93_100, 3 * MIB, 3 * MIB), 30).await;
    let v = closing_line(&rig, "plan-93100").await;
    assert!(
        v["client_to_upstream_path"]
            .as_str()
            .unwrap()
            .starts_with("kernel"),
        "{v}"
    );
    wait_idle(&rig, fds).await;
}

/// Issues 10.3 and 10.9: a hand-off to splice(2) that cannot get a pipe (the daemon is at
/// its fd limit) relays that direction with the copy relay, never resets the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_without_a_pipe_copies_instead() {
    if mode() != "ebpf" {
        return;
    }
    let rig = Rig::start("ebpf").await;
    let upstream = Upstream::start(&rig);
    let (mut c, mut u) = pair(&rig, &upstream, 1, "nopipe").await;
    let n = 32 * MIB;
    // From here on the daemon cannot open a single fd.
    let limit = FdLimit::squeeze(rig.pid());
    let seed = 94_000;
    let send = async {
        pattern::send(&mut u, seed ^ DOWN, 0, n).await.unwrap();
        u.shutdown().await.unwrap();
    };
    let recv = async {
        // A reader that starts late: the direction goes over its budget.
        tokio::time::sleep(Duration::from_millis(500)).await;
        read_checked(&mut c, seed ^ DOWN, 0, n).await.unwrap();
        assert_eq!(read_end(&mut c).await, Ok(()));
    };
    tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(send, recv) })
        .await
        .expect("stalled");
    drop(limit);
    // The idle direction closes cleanly too.
    c.shutdown().await.unwrap();
    assert_eq!(read_end(&mut u).await, Ok(()));
    rig.expect("nopipe", 0, n);
    let v = closing_line(&rig, "nopipe").await;
    assert_eq!(v["upstream_to_client_path"], "kernel+copy", "{v}");
    assert!(!rig.log_lines("cannot get a pipe").is_empty());
}

/// Issue 10.6: if the task that hands directions over from the kernel stops (here: a
/// test-only fault makes it panic at its first event), directions over budget could never
/// leave the kernel again. The daemon must log it and exit non-zero, and reset its
/// tunnels on the way out rather than let them look complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_task_failure_is_fatal() {
    if mode() != "ebpf" {
        return;
    }
    let mut rig = Rig::start_with(
        &["--splice", "ebpf"],
        &[("PROJECT_INGRESS_PROXY_TEST_FAULT", "event-reader-panic")],
    )
    .await;
    let upstream = Upstream::start(&rig);
    let (mut c, mut u) = pair(&rig, &upstream, 1, "fatal").await;
    let seed = 95_000;
    // A reader that does not read: the direction goes over budget, the event kills the task.
    let send = async {
        let _ = pattern::send(&mut u, seed ^ DOWN, 0, 64 * MIB).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), send).await;
    let code = rig
        .setup
        .daemon
        .wait_exit(Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!(code, Some(1), "exit status");
    assert!(
        !rig.log_lines("stopped handing directions over").is_empty(),
        "{}",
        rig.log_tail(10)
    );
    // Every byte the client got is right, and the stream ends in a reset.
    let mut v = Verifier::new(seed ^ DOWN);
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("hang")
        {
            Ok(0) => break Ok(()),
            Ok(n) => v.feed(&buf[..n]).unwrap(),
            Err(e) => break Err(e.kind()),
        }
    };
    assert_eq!(
        end,
        Err(io::ErrorKind::ConnectionReset),
        "after {} bytes",
        v.received
    );
    let v = closing_line(&rig, "fatal").await;
    assert_eq!(v["end"], "shutdown", "{v}");
}

/// Issue 10.6: the verdict's state of a direction is gone when its EOF comes (simulated by
/// deleting it from the map). The daemon cannot know whether every byte went through, so
/// it must reset the tunnel, not shut it down as if the stream were complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_direction_state_resets_the_tunnel() {
    if mode() != "ebpf" {
        return;
    }
    let rig = Rig::start("ebpf").await;
    let upstream = Upstream::start(&rig);
    let (mut c, mut u) = pair(&rig, &upstream, 1, "lost").await;
    let seed = 96_000;
    pattern::send(&mut c, seed ^ UP, 0, 50_000).await.unwrap();
    read_checked(&mut u, seed ^ UP, 0, 50_000).await.unwrap();
    pattern::send(&mut u, seed ^ DOWN, 0, 50_000).await.unwrap();
    read_checked(&mut c, seed ^ DOWN, 0, 50_000).await.unwrap();
    assert_eq!(rig.clear_map(DIRECTION_MAP), 2);
    c.shutdown().await.unwrap();
    assert_eq!(read_end(&mut u).await, Err(io::ErrorKind::ConnectionReset));
    let v = closing_line(&rig, "lost").await;
    assert_eq!(v["end"], "reset", "{v}");
}

/// Issue 10.6: bytes the kernel failed to redirect (simulated by taking both sockets out
/// of the redirect map) are counted, logged as a warning, and the tunnel is reset instead
/// of closed as if complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_loss_is_reported_and_resets_the_tunnel() {
    if mode() != "ebpf" {
        return;
    }
    let mut rig = Rig::start("ebpf").await;
    rig.allow_kernel_loss = true;
    let upstream = Upstream::start(&rig);
    let (mut c, mut u) = pair(&rig, &upstream, 1, "loss").await;
    let seed = 97_000;
    pattern::send(&mut c, seed ^ UP, 0, 20_000).await.unwrap();
    read_checked(&mut u, seed ^ UP, 0, 20_000).await.unwrap();
    assert_eq!(rig.clear_map("TARGETS"), 2);
    pattern::send(&mut c, seed ^ UP, 20_000, 21_000)
        .await
        .unwrap();
    // Wait until the verdict has seen (and dropped) them, then end the stream.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.directions().values().map(|d| d.dropped).sum::<u64>() < 1000 {
        assert!(Instant::now() < deadline, "the verdict never saw the bytes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.shutdown().await.unwrap();
    assert_eq!(read_end(&mut u).await, Err(io::ErrorKind::ConnectionReset));
    let v = closing_line(&rig, "loss").await;
    assert_eq!(v["kernel_dropped"], 1000, "{v}");
    assert_eq!(v["end"], "reset", "{v}");
    assert_eq!(rig.log_lines("the kernel lost or misparsed").len(), 1);
}

/// Issue 11.8: a kernel-spliced tunnel that ends in a reset logs the bytes each way that
/// went through (before: 0 each way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_tunnel_logs_true_byte_counts() {
    let rig = Rig::start(&mode()).await;
    let upstream = Upstream::start(&rig);
    for i in 0..if torture() { 20 } else { 3 } {
        let id = format!("reset-{i}");
        let (mut c, mut u) = pair(&rig, &upstream, i, &id).await;
        let seed = 98_000 + i;
        pattern::send(&mut c, seed ^ UP, 0, 5000).await.unwrap();
        read_checked(&mut u, seed ^ UP, 0, 5000).await.unwrap();
        pattern::send(&mut u, seed ^ DOWN, 0, 100_000)
            .await
            .unwrap();
        read_checked(&mut c, seed ^ DOWN, 0, 100_000).await.unwrap();
        // One more byte up, so the test knows everything arrived before the reset.
        pattern::send(&mut c, seed ^ UP, 5000, 5001).await.unwrap();
        read_checked(&mut u, seed ^ UP, 5000, 1).await.unwrap();
        socket2::SockRef::from(&u)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(u);
        assert_eq!(read_end(&mut c).await, Err(io::ErrorKind::ConnectionReset));
        let v = closing_line(&rig, &id).await;
        assert_eq!(v["end"], "reset", "{v}");
        assert_eq!(v["client_to_upstream"], 5001, "{v}");
        assert_eq!(v["upstream_to_client"], 100_000, "{v}");
        if rig.fast_path {
            assert_eq!(v["client_to_upstream_path"], "kernel", "{v}");
            assert_eq!(v["upstream_to_client_kernel"], 100_000, "{v}");
        }
    }
}

/// Issues 10.6 and 11.8: tunnels still open when the shutdown grace ends are reset (never
/// closed as if complete) and each logs its closing line with its byte counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_end_resets_and_logs_each_tunnel() {
    let splice = mode();
    let mut rig = Rig::start_args(&["--splice", &splice, "--shutdown-grace", "1s"]).await;
    let upstream = Upstream::start(&rig);
    let mut open = Vec::new();
    for i in 0..3u64 {
        let id = format!("grace-{i}");
        let (mut c, mut u) = pair(&rig, &upstream, i, &id).await;
        let seed = 99_000 + i;
        pattern::send(&mut c, seed ^ UP, 0, 3000).await.unwrap();
        read_checked(&mut u, seed ^ UP, 0, 3000).await.unwrap();
        pattern::send(&mut u, seed ^ DOWN, 0, 7000).await.unwrap();
        read_checked(&mut c, seed ^ DOWN, 0, 7000).await.unwrap();
        open.push((id, c, u));
    }
    rig.setup.daemon.signal(libc::SIGTERM);
    let code = rig
        .setup
        .daemon
        .wait_exit(Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    for (id, mut c, mut u) in open {
        assert_eq!(
            read_end(&mut c).await,
            Err(io::ErrorKind::ConnectionReset),
            "{id} client"
        );
        assert_eq!(
            read_end(&mut u).await,
            Err(io::ErrorKind::ConnectionReset),
            "{id} upstream"
        );
        let v = closing_line(&rig, &id).await;
        assert_eq!(v["end"], "shutdown", "{v}");
        assert_eq!(v["client_to_upstream"], 3000, "{v}");
        assert_eq!(v["upstream_to_client"], 7000, "{v}");
    }
}
