//! SPEC §3 through the real daemon: upgrades of any protocol and method, 101 → raw tunnel,
//! non-101 relayed, leftover bytes, half-close and reset, every byte checked. Runs on each
//! userspace relay; the eBPF fast path has its own suite (fastpath.rs).

use std::time::Duration;

use anyhow::{ensure, Result};
use futures_util::{SinkExt, StreamExt};
use tests::client;
use tests::pattern::{self, Verifier};
use tests::upstream::{header_value, HttpApp, RawUpgrade, RawUpgradeApp};
use tests::{v4, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The userspace data paths these tests pin down: `--splice off` with each relay.
const MODES: &[&[&str]] = &[
    &["--splice", "off", "--userspace-relay", "splice"],
    &["--splice", "off", "--userspace-relay", "copy"],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_with_subprotocol_and_origin() -> Result<()> {
    let s = Setup::new(&["--splice", "off"]).await?;
    let _app = HttpApp::start(s.topo.machine.listen(v4(7681))?)?;
    let stream = s.topo.client.connect(s.addr()).await?;
    let mut req = format!("ws://{}/ws", s.addr()).into_client_request()?;
    let h = req.headers_mut();
    h.insert("host", "7681__mach_1.iterate.town".parse()?);
    h.insert(
        "x-iterate-proxy-target-host",
        "7681__mach_1.iterate.town".parse()?,
    );
    h.insert("origin", "https://7681__mach_1.iterate.town".parse()?);
    h.insert("sec-websocket-protocol", "tty".parse()?);
    let (mut ws, resp) = tokio_tungstenite::client_async(req, stream).await?;
    assert_eq!(resp.headers()["sec-websocket-protocol"], "tty");
    let seen = resp.headers()["x-inspect"].to_str()?.to_owned();
    assert!(
        seen.contains("origin: https://7681__mach_1.iterate.town"),
        "{seen}"
    );
    assert!(seen.contains("host: localhost:7681"), "{seen}");
    assert!(!seen.contains("x-iterate-proxy-target-host"), "{seen}");
    for i in 0..500u64 {
        let mut payload = vec![0u8; (i as usize * 37) % 3000 + 1];
        pattern::fill(i, 0, &mut payload);
        ws.send(Message::binary(payload.clone())).await?;
        let echoed = ws.next().await.expect("echo")?;
        assert_eq!(
            echoed.into_data().as_ref(),
            payload.as_slice(),
            "message {i}"
        );
    }
    ws.close(None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_goes_to_its_own_target_and_non_101_is_relayed() -> Result<()> {
    let s = Setup::new(&["--splice", "off"]).await?;
    let _http = HttpApp::start(s.topo.machine.listen(v4(4096))?)?;
    let mut raw = RawUpgradeApp::start(s.topo.machine.listen(v4(5000))?, vec![])?;

    // On one keep-alive connection: a plain request to 4096, then an upgrade to 5000.
    let mut stream = s.topo.client.connect(s.addr()).await?;
    stream
        .write_all(b"GET /first HTTP/1.1\r\nHost: h\r\nX-Iterate-Proxy-Target-Host: localhost:4096\r\n\r\n")
        .await?;
    let (head, already) = tests::upstream::read_head(&mut stream).await?;
    let len: usize = header_value(&head, "content-length").unwrap().parse()?;
    let mut body = vec![0u8; len - already.len()];
    stream.read_exact(&mut body).await?;
    stream
        .write_all(b"POST /rpc HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: x-custom/1\r\nX-Iterate-Proxy-Target-Host: localhost:5000\r\nContent-Length: 0\r\n\r\n")
        .await?;
    let (head, _) = tests::upstream::read_head(&mut stream).await?;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let accepted = tokio::time::timeout(Duration::from_secs(5), raw.accepted.recv())
        .await?
        .expect("upgrade reached port 5000");
    assert!(
        accepted.head.starts_with("POST /rpc HTTP/1.1"),
        "{}",
        accepted.head
    );
    assert_eq!(
        header_value(&accepted.head, "upgrade").as_deref(),
        Some("x-custom/1")
    );
    assert_eq!(
        header_value(&accepted.head, "host").as_deref(),
        Some("localhost:5000")
    );
    exchange_and_close(stream, Vec::new(), accepted.stream, 1 << 20).await?;

    // Upstream refuses the upgrade: its answer reaches the client as-is.
    let (_, head, _) =
        client::upgrade(&s.topo.client, s.addr(), "localhost:4096", "websocket", "").await?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut stream = s.topo.client.connect(s.addr()).await?;
    stream
        .write_all(b"GET /status/403 HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX-Iterate-Proxy-Target-Host: localhost:4096\r\n\r\n")
        .await?;
    let (head, _) = tests::upstream::read_head(&mut stream).await?;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_target_on_upgrade_is_400_with_close() -> Result<()> {
    let s = Setup::new(&["--splice", "off"]).await?;
    let (mut stream, head, already) =
        client::upgrade(&s.topo.client, s.addr(), "example.com:80", "websocket", "").await?;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(header_value(&head, "connection").as_deref(), Some("close"));
    assert_eq!(
        header_value(&head, "content-type").as_deref(),
        Some("application/json")
    );
    let rest = String::from_utf8(already)?
        + &client::read_until_close(&mut stream, Duration::from_secs(3)).await;
    assert_eq!(
        rest, r#"{"error":"invalid_proxy_target_host"}"#,
        "then closed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_bytes_on_both_sides_arrive_first_and_in_order() -> Result<()> {
    for mode in MODES {
        let s = Setup::new(mode).await?;
        // The upstream writes 64 KiB in the same write as its 101.
        let mut first = vec![0u8; 65536];
        pattern::fill(21, 0, &mut first);
        let mut raw = RawUpgradeApp::start(s.topo.machine.listen(v4(5000))?, first)?;
        let mut stream = s.topo.client.connect(s.addr()).await?;
        // The client pipelines 16 KiB right behind its request, before any 101.
        let mut request = b"GET /t HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: x\r\nX-Iterate-Proxy-Target-Host: localhost:5000\r\n\r\n".to_vec();
        let mut early = vec![0u8; 16384];
        pattern::fill(22, 0, &mut early);
        request.extend_from_slice(&early);
        // The raw app asserts that it sees no byte before its 101; the pipelined bytes must
        // therefore be held by the proxy until the tunnel exists.
        stream.write_all(&request).await?;
        let (head, after) = tests::upstream::read_head(&mut stream).await?;
        assert!(head.starts_with("HTTP/1.1 101"), "{mode:?}: {head}");
        let RawUpgrade { stream: up, .. } = raw.accepted.recv().await.expect("accepted");
        // Both streams continue past the leftovers: the sender keeps going from there.
        let up_to_client = async {
            let mut v = Verifier::new(21);
            v.feed(&after)?;
            let mut c = stream;
            read_verify(&mut c, &mut v, 65536 + (4 << 20)).await?;
            Ok::<_, anyhow::Error>(c)
        };
        let client_to_up = async {
            let mut v = Verifier::new(22);
            let mut u = up;
            read_verify(&mut u, &mut v, 16384).await?;
            Ok::<_, anyhow::Error>(u)
        };
        let (mut c, mut u) = tokio::try_join!(
            async {
                let c = up_to_client.await?;
                Ok::<_, anyhow::Error>(c)
            },
            async {
                let mut u = client_to_up.await?;
                write_pattern(&mut u, 21, 65536, 4 << 20).await?;
                Ok::<_, anyhow::Error>(u)
            }
        )?;
        c.shutdown().await?;
        u.shutdown().await?;
        expect_eof(&mut c).await?;
        expect_eof(&mut u).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_on_many_tunnels_is_byte_exact() -> Result<()> {
    for mode in MODES {
        let s = Setup::new(mode).await?;
        let mut raw = RawUpgradeApp::start(s.topo.machine.listen(v4(5000))?, vec![])?;
        let mut pairs = Vec::new();
        for _ in 0..8 {
            let (c, head, rest) =
                client::upgrade(&s.topo.client, s.addr(), "localhost:5000", "x", "").await?;
            assert!(head.starts_with("HTTP/1.1 101") && rest.is_empty());
            let u = raw.accepted.recv().await.expect("accepted").stream;
            pairs.push((c, u));
        }
        let runs = pairs
            .into_iter()
            .map(|(c, u)| tokio::spawn(exchange_and_close(c, Vec::new(), u, 64 << 20)));
        for run in runs {
            run.await??;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_each_way_delivers_every_byte_first() -> Result<()> {
    let s = Setup::new(&["--splice", "off"]).await?;
    let mut raw = RawUpgradeApp::start(s.topo.machine.listen(v4(5000))?, vec![])?;
    for client_closes_first in [true, false] {
        let (c, _, _) =
            client::upgrade(&s.topo.client, s.addr(), "localhost:5000", "x", "").await?;
        let u = raw.accepted.recv().await.expect("accepted").stream;
        let (mut first, mut second) = if client_closes_first { (c, u) } else { (u, c) };
        // First side sends 3 MiB and half-closes; second reads all of it and sees EOF,
        // then answers 2 MiB over the still-open direction and closes.
        write_pattern(&mut first, 1, 0, 3 << 20).await?;
        first.shutdown().await?;
        let mut v = Verifier::new(1);
        read_verify(&mut second, &mut v, 3 << 20).await?;
        expect_eof(&mut second).await?;
        write_pattern(&mut second, 2, 0, 2 << 20).await?;
        second.shutdown().await?;
        let mut v = Verifier::new(2);
        read_verify(&mut first, &mut v, 2 << 20).await?;
        expect_eof(&mut first).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_on_one_side_resets_the_other() -> Result<()> {
    let s = Setup::new(&["--splice", "off"]).await?;
    let mut raw = RawUpgradeApp::start(s.topo.machine.listen(v4(5000))?, vec![])?;
    for client_resets in [true, false] {
        let (c, _, _) =
            client::upgrade(&s.topo.client, s.addr(), "localhost:5000", "x", "").await?;
        let u = raw.accepted.recv().await.expect("accepted").stream;
        let (resetter, mut other) = if client_resets { (c, u) } else { (u, c) };
        socket2::SockRef::from(&resetter).set_linger(Some(Duration::ZERO))?;
        drop(resetter);
        let mut buf = [0u8; 16];
        let result = tokio::time::timeout(Duration::from_secs(5), other.read(&mut buf)).await?;
        match result {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
            Ok(n) => panic!("expected a reset, read {n} bytes (clean EOF hides the failure)"),
        }
    }
    let logs = s.daemon.log_with_count("tunnel closed", 2).await?;
    assert_eq!(logs.matches("tunnel opened").count(), 2, "{logs}");
    assert_eq!(logs.matches("tunnel closed").count(), 2, "{logs}");
    assert!(logs.contains("client_to_upstream"), "{logs}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_tunnels_at_the_end_of_the_grace_period() -> Result<()> {
    let mut s = Setup::new(&["--splice", "off", "--shutdown-grace", "1s"]).await?;
    let mut raw = RawUpgradeApp::start(s.topo.machine.listen(v4(5000))?, vec![])?;
    let (mut c, _, _) =
        client::upgrade(&s.topo.client, s.addr(), "localhost:5000", "x", "").await?;
    let _u = raw.accepted.recv().await.expect("accepted").stream;
    s.daemon.signal(libc::SIGTERM);
    assert_eq!(s.daemon.wait_exit(Duration::from_secs(5)).await?, Some(0));
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf)).await?;
    assert!(matches!(n, Ok(0) | Err(_)), "tunnel still open after exit");
    Ok(())
}

// ---- helpers ------------------------------------------------------------------------

/// Both ends send `size` pattern bytes at once, verify what they receive, half-close and
/// expect EOF.
pub async fn exchange_and_close(
    client: TcpStream,
    client_seen_already: Vec<u8>,
    upstream: TcpStream,
    size: u64,
) -> Result<()> {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let c_send = async {
        write_pattern(&mut cw, 100, 0, size).await?;
        cw.shutdown().await?;
        Ok::<_, anyhow::Error>(())
    };
    let u_send = async {
        write_pattern(&mut uw, 200, 0, size).await?;
        uw.shutdown().await?;
        Ok::<_, anyhow::Error>(())
    };
    let c_recv = async {
        let mut v = Verifier::new(200);
        v.feed(&client_seen_already)?;
        read_verify(&mut cr, &mut v, size).await?;
        expect_eof(&mut cr).await
    };
    let u_recv = async {
        let mut v = Verifier::new(100);
        read_verify(&mut ur, &mut v, size).await?;
        expect_eof(&mut ur).await
    };
    tokio::time::timeout(Duration::from_secs(120), async {
        tokio::try_join!(c_send, u_send, c_recv, u_recv).map(|_| ())
    })
    .await?
}

pub async fn write_pattern(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    seed: u64,
    from: u64,
    len: u64,
) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut offset = from;
    while offset < from + len {
        let n = (buf.len() as u64).min(from + len - offset) as usize;
        pattern::fill(seed, offset, &mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        offset += n as u64;
    }
    Ok(())
}

/// Reads until `v` has seen `total` bytes, checking each.
pub async fn read_verify(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    v: &mut Verifier,
    total: u64,
) -> Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    while v.received < total {
        let want = (buf.len() as u64).min(total - v.received) as usize;
        let n = r.read(&mut buf[..want]).await?;
        ensure!(n > 0, "EOF after {} of {total} bytes", v.received);
        v.feed(&buf[..n])?;
    }
    Ok(())
}

pub async fn expect_eof(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<()> {
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), r.read(&mut buf)).await??;
    ensure!(
        n == 0,
        "{n} unexpected extra bytes (duplication?) instead of EOF"
    );
    Ok(())
}

/// Not a test: `RELAY_MEASURE=1 cargo test --release -p tests --test upgrade -- --ignored`
/// prints throughput and whole-machine CPU per GB of each userspace relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_userspace_relays() -> Result<()> {
    let size: u64 = 1 << 30;
    for mode in MODES {
        let s = Setup::new(mode).await?;
        let mut raw = RawUpgradeApp::start(s.topo.machine.listen(v4(5000))?, vec![])?;
        for both_ways in [false, true] {
            let (c, _, _) =
                client::upgrade(&s.topo.client, s.addr(), "localhost:5000", "x", "").await?;
            let u = raw.accepted.recv().await.expect("accepted").stream;
            let cpu0 = machine_cpu_seconds();
            let t0 = std::time::Instant::now();
            if both_ways {
                exchange_and_close(c, Vec::new(), u, size).await?;
            } else {
                let (mut c, mut u) = (c, u);
                let send = async {
                    write_pattern(&mut c, 5, 0, size).await?;
                    c.shutdown().await?;
                    Ok::<_, anyhow::Error>(())
                };
                let recv = async {
                    let mut v = Verifier::new(5);
                    read_verify(&mut u, &mut v, size).await
                };
                tokio::try_join!(send, recv)?;
            }
            let secs = t0.elapsed().as_secs_f64();
            let cpu = machine_cpu_seconds() - cpu0;
            let gb = if both_ways { 2.0 } else { 1.0 } * size as f64 / 1e9;
            println!(
                "{mode:?} both_ways={both_ways}: {:.2} Gbit/s, {:.2} machine CPU-s/GB (incl. test client+upstream)",
                gb * 8.0 / secs,
                cpu / gb
            );
        }
    }
    Ok(())
}

/// Busy CPU seconds of the whole machine (all cores) from /proc/stat.
fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu: Vec<f64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6] + cpu[7];
    busy / 100.0
}
