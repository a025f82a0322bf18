//! The client end of fast-path tunnels: open one through the daemon, run a [`Plan`] with
//! both ends checked, play both ends of a handed-over tunnel, read checked bytes and how a
//! stream ended, find a tunnel's closing line, and wait until the daemon holds nothing
//! more of its tunnels.

use std::collections::BTreeSet;
use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::plan::{play, Plan};
use super::{Result, Rig, Upstream, DIRECTION_MAP, DOWN, SOCKET_MAPS, UP};
use crate::pattern::{self, Verifier};
use crate::upstream::read_head;

/// Opens an upgrade to `path` on the upstream at `port`, sending `pre` right after the
/// request; returns the stream and any bytes that came with the 101.
pub async fn open(rig: &Rig, port: u16, path: &str, pre: &[u8]) -> Result<(TcpStream, Vec<u8>)> {
    open_as(rig, port, path, pre, None).await
}

/// `open` with an `X-Request-Id` (the daemon logs the tunnel under it).
pub async fn open_as(
    rig: &Rig,
    port: u16,
    path: &str,
    pre: &[u8],
    request_id: Option<&str>,
) -> Result<(TcpStream, Vec<u8>)> {
    let s = rig.connect().await?;
    open_on(s, port, path, pre, request_id).await
}

/// Sends the upgrade request on `s` and reads the 101.
pub async fn open_on(
    mut s: TcpStream,
    port: u16,
    path: &str,
    pre: &[u8],
    request_id: Option<&str>,
) -> Result<(TcpStream, Vec<u8>)> {
    let id = request_id
        .map(|id| format!("X-Request-Id: {id}\r\n"))
        .unwrap_or_default();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nX-Iterate-Proxy-Target-Host: localhost:{port}\r\n{id}Connection: Upgrade\r\nUpgrade: test\r\n\r\n"
    )
    .into_bytes();
    req.extend_from_slice(pre);
    s.write_all(&req).await?;
    let (head, rest) = read_head(&mut s).await?;
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("no upgrade: {head}").into());
    }
    Ok((s, rest))
}

/// Runs one tunnel per `plan` and checks both ends; a tunnel that passed is recorded
/// for the rig's closing-line check (request id `plan-<seed>`).
pub async fn run_plan(rig: &Rig, upstream: &Upstream, plan: Plan) -> Result<()> {
    let pre = pattern::bytes(plan.seed ^ UP, plan.client_pre as usize);
    let id = format!("plan-{}", plan.seed);
    let (s, early) = open_as(rig, upstream.port, &plan.path(), &pre, Some(&id)).await?;
    play(s, plan.client_end(&early)).await?;
    // The upstream's verdict lands right after its own EOF.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = upstream.result(plan.seed) {
            if r.is_ok() {
                rig.expect(&id, plan.up, plan.down);
            }
            return r.map_err(Into::into);
        }
        if Instant::now() > deadline {
            return Err("upstream never finished".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `run_plan` with a deadline; on failure shows the rig's last log lines.
pub async fn check(rig: &Rig, upstream: &Upstream, plan: Plan, secs: u64) {
    let r = tokio::time::timeout(Duration::from_secs(secs), run_plan(rig, upstream, plan)).await;
    let err = match r {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "stalled".to_string(),
    };
    panic!("{plan:?}: {err}; daemon log tail:\n{}", rig.log_tail(12));
}

/// [`check`] for every plan at once.
pub async fn check_all(
    rig: &Rig,
    upstream: &Upstream,
    plans: impl IntoIterator<Item = Plan>,
    secs: u64,
) {
    futures_util::future::join_all(plans.into_iter().map(|p| check(rig, upstream, p, secs))).await;
}

/// Waits until the tunnels are gone from the daemon: no fast-path map entries, no more fds
/// than `fds_before`.
pub async fn wait_idle(rig: &Rig, fds_before: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            rig.alive(),
            "daemon exited; log tail:\n{}",
            rig.log_tail(20)
        );
        let maps = rig.map_entries();
        if rig.fast_path {
            let want: BTreeSet<String> = SOCKET_MAPS
                .into_iter()
                .chain([DIRECTION_MAP])
                .map(String::from)
                .collect();
            assert_eq!(maps.found, want, "the daemon's fast-path maps");
        }
        let fds = rig.fd_count();
        if maps.sockets == 0 && maps.directions == 0 && fds <= fds_before {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "leak: {} SOCKS+TARGETS entries, {} DIRECTIONS entries, {fds} fds (before: {fds_before}); daemon log tail:\n{}",
                maps.sockets,
                maps.directions,
                rig.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tunnel whose both ends the test plays: (client socket, upstream socket). Logged by
/// the daemon under `request_id`.
pub async fn pair(
    rig: &Rig,
    upstream: &Upstream,
    key: u64,
    request_id: &str,
) -> (TcpStream, TcpStream) {
    let (c, early) = open_as(
        rig,
        upstream.port,
        &format!("/hand/{key}"),
        b"",
        Some(request_id),
    )
    .await
    .unwrap();
    assert!(early.is_empty());
    (c, upstream.handed.take(key).await)
}

/// Both ends send `n` checked bytes, read the other's, then half-close; both EOFs checked.
pub async fn exchange(c: TcpStream, u: TcpStream, seed: u64, n: u64) {
    let end = |s: TcpStream, send_seed: u64, recv_seed: u64| async move {
        let (mut r, mut w) = s.into_split();
        let send = async {
            pattern::send(&mut w, send_seed, 0, n).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let recv = async {
            let mut v = Verifier::new(recv_seed);
            pattern::receive(&mut r, &mut v, n).await.unwrap();
        };
        tokio::join!(send, recv);
    };
    tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join(
            end(c, seed ^ UP, seed ^ DOWN),
            end(u, seed ^ DOWN, seed ^ UP),
        ),
    )
    .await
    .expect("exchange stalled");
}

/// Reads exactly `n` bytes of stream `seed` from `offset`, checking each.
pub async fn read_checked(s: &mut TcpStream, seed: u64, offset: u64, n: u64) -> io::Result<()> {
    let mut v = Verifier::new(seed);
    v.received = offset;
    let mut buf = vec![0u8; 64 * 1024];
    let end = offset + n;
    while v.received < end {
        let want = ((end - v.received) as usize).min(buf.len());
        let got = s.read(&mut buf[..want]).await?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF after {} of {end} bytes", v.received),
            ));
        }
        v.feed(&buf[..got]).map_err(io::Error::other)?;
    }
    Ok(())
}

/// How a stream ended after its last expected byte: `Ok(())` for a clean EOF. Panics on
/// any further byte, or if nothing happens within 10 s.
pub async fn read_end(s: &mut TcpStream) -> std::result::Result<(), io::ErrorKind> {
    let mut b = [0u8; 1024];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
        .await
        .expect("stream neither ended nor reset");
    match r {
        Ok(0) => Ok(()),
        Ok(n) => panic!("{n} unexpected bytes"),
        Err(e) => Err(e.kind()),
    }
}

/// The closing line of the tunnel logged under `request_id` (waits up to 10 s).
pub async fn closing_line(rig: &Rig, request_id: &str) -> serde_json::Value {
    let needle = format!("\"request_id\":\"{request_id}\"");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = rig
            .log_lines("tunnel closed")
            .into_iter()
            .find(|l| l.contains(&needle))
        {
            return serde_json::from_str(&l).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no closing line for {request_id}:\n{}",
            rig.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
