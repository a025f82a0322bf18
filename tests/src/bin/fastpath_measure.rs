//! Fast-path measurements on the tunnel harness (`tests::fastpath`), started by
//! `cargo xtask measure <what>` (as root: it builds namespaces and loads eBPF). One run
//! each; the figures go to stderr as `MEASURE ...` lines, quoted in docs/fastpath.md.
//!
//! - `fastpath_measure relays`: throughput, small-message RTT and whole-machine CPU per GB
//!   for each relay (ebpf with its default, 16 MiB and unlimited budgets, splice(2), copy).
//! - `fastpath_measure stalled-memory [RUNS]`: what tunnels with stalled readers cost in
//!   memory, fast path against the copy relay (issue 10.4); each case `RUNS` times.
//!
//! The daemon is `PROJECT_INGRESS_PROXY_BIN`, else the newest of `target/{release,debug}/`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tests::fastpath::system::{cpu_jiffies, mem_available_kib, tcp_mem_kib};
use tests::fastpath::tunnel::{open, pair, read_checked, read_end, wait_idle};
use tests::fastpath::{raw_exchange, Result, Rig, Upstream, DOWN, MIB};
use tests::pattern;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args[..] {
        ["relays"] => measure_relays().await,
        ["stalled-memory"] => measure_stalled_tunnels_memory(1).await,
        ["stalled-memory", runs] => {
            let runs = runs.parse().context("RUNS must be a number")?;
            measure_stalled_tunnels_memory(runs).await
        }
        _ => bail!("usage: fastpath_measure relays | stalled-memory [RUNS]"),
    }
    Ok(())
}

// ---------------------------------------------------------------- relays

/// Throughput, small-message RTT and whole-machine CPU per GB for each relay, one run,
/// client namespace → veth → daemon → upstream on the machine's loopback.
async fn measure_relays() {
    let size = 4096 * MIB;
    let ebpf = vec!["--splice", "ebpf"];
    for (name, args, budget) in [
        ("ebpf", ebpf.clone(), None),
        ("ebpf-16M", ebpf.clone(), Some("16777216")),
        ("ebpf-inf", ebpf, Some("4294967295")),
        (
            "splice",
            vec!["--splice", "off", "--userspace-relay", "splice"],
            None,
        ),
        (
            "copy",
            vec!["--splice", "off", "--userspace-relay", "copy"],
            None,
        ),
    ] {
        let mut env: Vec<(&str, &str)> = budget
            .map(|b| ("PROJECT_INGRESS_PROXY_EBPF_BUDGET", b))
            .into_iter()
            .collect();
        if name == "ebpf-inf" {
            // Everything in the kernel: no machine-wide limit either.
            env.push(("PROJECT_INGRESS_PROXY_EBPF_MEMORY_LIMIT", "0"));
        }
        let rig = Rig::start_with(&args, &env).await;
        let upstream = Upstream::start(&rig);
        let hz = 100.0; // USER_HZ
        for (label, up, down) in [
            ("up", size, 0),
            ("down", 0, size),
            ("both-ways", size / 2, size / 2),
        ] {
            let closed_before = rig.log_lines("tunnel closed").len();
            let j0 = cpu_jiffies();
            let t0 = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(60),
                raw_run(&rig, upstream.port, up, down),
            )
            .await;
            let secs = t0.elapsed().as_secs_f64();
            let cpu = (cpu_jiffies() - j0) as f64 / hz;
            let gb = (up + down) as f64 / 1e9;
            match r {
                Ok(Ok(())) => eprintln!(
                    "MEASURE {name:8} {label:9} {:6.2} GB/s  {:5.2} CPU-s/GB (whole machine){}",
                    gb / secs,
                    cpu / gb,
                    kernel_share(&rig, closed_before).await
                ),
                Ok(Err(e)) => eprintln!("MEASURE {name:8} {label:9} FAILED: {e}"),
                Err(_) => eprintln!("MEASURE {name:8} {label:9} STALLED (60 s)"),
            }
        }
        let (mut s, _) = open(&rig, upstream.port, "/echo", b"").await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut rtts = Vec::new();
        let j0 = cpu_jiffies();
        let msg = [42u8; 64];
        let mut b = [0u8; 64];
        let mut ok = true;
        for _ in 0..20_000 {
            let t = Instant::now();
            s.write_all(&msg).await.unwrap();
            if tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b))
                .await
                .is_err()
            {
                ok = false;
                break;
            }
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let cpu_ms = (cpu_jiffies() - j0) as f64 * 10.0; // USER_HZ = 100
        rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if ok {
            eprintln!(
                "MEASURE {name:8} rtt-64B   p50 {:.1} us  p99 {:.1} us  {:.1} ms CPU per 1000 round trips (whole machine)",
                rtts[rtts.len() / 2],
                rtts[rtts.len() * 99 / 100],
                cpu_ms * 1000.0 / rtts.len() as f64
            );
        } else {
            eprintln!(
                "MEASURE {name:8} rtt-64B   STALLED after {} round trips",
                rtts.len()
            );
        }
    }
}

/// One unverified bulk tunnel (`/raw/`): `up` zero bytes client → upstream and `down`
/// back; the idle side stays open until the busy one is done. Only the count is checked.
async fn raw_run(rig: &Rig, port: u16, up: u64, down: u64) -> Result<()> {
    let (s, early) = open(rig, port, &format!("/raw/{down}"), b"").await?;
    let got = raw_exchange(s, up).await? + early.len() as u64;
    if got != down {
        return Err(format!("received {got} of {down}").into());
    }
    Ok(())
}

/// ", N% of bytes in the kernel, queue peak P" from the tunnel that closed after
/// `closed_before` others (empty for the userspace relays).
async fn kernel_share(rig: &Rig, closed_before: usize) -> String {
    let Some(line) = rig.wait_log("tunnel closed", closed_before).await else {
        return ", no tunnel-closed line".into();
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let total = v["client_to_upstream"].as_u64().unwrap_or(0)
        + v["upstream_to_client"].as_u64().unwrap_or(0);
    match (v["in_kernel"].as_u64(), v["relay"].as_str()) {
        (Some(k), Some("ebpf")) if total > 0 => format!(
            ", {:.0}% in kernel, queue peak {:.1} MiB",
            k as f64 * 100.0 / total as f64,
            v["kernel_queue_peak"].as_u64().unwrap_or(0) as f64 / MIB as f64
        ),
        _ => String::new(),
    }
}

// ---------------------------------------------------------------- stalled readers

/// Issue 10.4's measurement: `n` tunnels whose clients never read while their upstreams
/// push as much as TCP lets them, on the fast path (default budgets) and on the
/// userspace copy relay, once every sender is blocked: the machine's `MemAvailable` drop
/// per tunnel (everything, but shared with whatever else runs on the machine), TCP socket
/// memory (`/proc/net/sockstat`, charged to sockets) and the bytes the fast path holds
/// queued in the kernel (charged to nothing). Then every client reads and checks every
/// byte. Numbers in docs/fastpath.md. Each case runs `runs` times.
async fn measure_stalled_tunnels_memory(runs: u32) {
    for n in [64u64, 256] {
        for _ in 0..runs {
            for (name, args) in [
                ("ebpf", vec!["--splice", "ebpf"]),
                ("copy", vec!["--splice", "off", "--userspace-relay", "copy"]),
            ] {
                let m = stalled_tunnels_memory(n, &args).await;
                let per = |kib: i64| kib as f64 / 1024.0 / n as f64;
                eprintln!(
                    "MEASURE stalled {n:3} tunnels {name:4}: per tunnel MemAvailable -{:.2} MiB, TCP sockets {:.2} MiB, fast-path queue {:.2} MiB (kernel peak {:.1} MiB in all)",
                    per(m.mem_available_drop_kib),
                    per(m.tcp_kib),
                    per(m.kernel_queued_kib),
                    m.kernel_peak as f64 / MIB as f64
                );
            }
        }
    }
}

/// What `n` stalled tunnels cost, in KiB over all of them.
struct StalledMemory {
    mem_available_drop_kib: i64,
    tcp_kib: i64,
    kernel_queued_kib: i64,
    kernel_peak: u64,
}

/// Opens `n` stalled tunnels on a fresh daemon started with `args` and measures them.
async fn stalled_tunnels_memory(n: u64, args: &[&str]) -> StalledMemory {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let rig = Rig::start_args(args).await;
    let upstream = Upstream::start(&rig);
    let fds = rig.fd_count();
    let size = 24 * MIB;
    let mut pairs = Vec::new();
    for i in 0..n {
        pairs.push(pair(&rig, &upstream, i, &format!("stalled-{i}")).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (before, tcp_before) = (mem_available_kib(), tcp_mem_kib());
    let sent = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    let mut clients = Vec::new();
    for (i, (c, mut u)) in pairs.into_iter().enumerate() {
        let sent = sent.clone();
        let seed = 100_000 + i as u64;
        writers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut at = 0;
            while at < size {
                pattern::fill(seed ^ DOWN, at, &mut buf);
                u.write_all(&buf).await.unwrap();
                at += buf.len() as u64;
                sent.fetch_add(buf.len() as u64, Relaxed);
            }
            u.shutdown().await.unwrap();
            u
        }));
        clients.push((seed, c));
    }
    // Every sender blocked: nothing moved for a second and a half.
    let mut last = 0;
    let mut still = 0;
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = sent.load(Relaxed);
        still = if now == last { still + 1 } else { 0 };
        last = now;
        if still >= 15 {
            break;
        }
    }
    assert!(still >= 15, "the senders never stopped ({last} bytes sent)");
    let mut m = StalledMemory {
        mem_available_drop_kib: 0,
        tcp_kib: tcp_mem_kib() - tcp_before,
        kernel_queued_kib: 0,
        kernel_peak: 0,
    };
    for _ in 0..5 {
        m.mem_available_drop_kib = m.mem_available_drop_kib.max(before - mem_available_kib());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if rig.fast_path {
        let (queued, peak, _) = rig.kernel_memory();
        m.kernel_queued_kib = queued / 1024;
        m.kernel_peak = peak;
    }
    let readers = clients.into_iter().map(|(seed, mut c)| async move {
        read_checked(&mut c, seed ^ DOWN, 0, size).await.unwrap();
        assert_eq!(read_end(&mut c).await, Ok(()));
        c.shutdown().await.unwrap();
        c
    });
    let done = tokio::time::timeout(
        Duration::from_secs(600),
        futures_util::future::join_all(readers),
    )
    .await
    .expect("stalled readers never finished");
    for w in writers {
        let mut u = w.await.unwrap();
        assert_eq!(read_end(&mut u).await, Ok(()));
    }
    drop(done);
    for i in 0..n {
        rig.expect(&format!("stalled-{i}"), 0, size);
    }
    wait_idle(&rig, fds).await;
    m
}
