//! Client for the zero-hop test apps (measurements and the lab): blocking sockets, every
//! byte checked with `tests::stamp`, one JSON line out.
//!
//! - `zh_client ADDR source SEED N [STALL_AT STALL_MS]`: ask for N bytes and check them;
//!   optionally stop reading for STALL_MS after STALL_AT bytes
//! - `zh_client ADDR sink SEED N`: send N bytes, then wait for the app's clean end
//! - `zh_client ADDR both S1 N1 S2 N2`: send N2 bytes of S2 while checking N1 of S1
//! - `zh_client ADDR echo COUNT SIZE`: COUNT round trips of SIZE bytes (p50/p99 in µs)
//!
//! With a TARGET environment variable the request carries `X-Iterate-Proxy-Target-Host`
//! (to go through the daemon).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tests::stamp::{self, Verifier};

const CHUNK: usize = 256 * 1024;

fn connect(addr: &str, path: &str) -> Result<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    let target = std::env::var("TARGET").unwrap_or_default();
    let extra = if target.is_empty() {
        String::new()
    } else {
        format!("X-Iterate-Proxy-Target-Host: {target}\r\n")
    };
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: zh\r\nConnection: Upgrade\r\nUpgrade: zh\r\n{extra}\r\n"
    )?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("closed before the 101");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        bail!("no 101: {head}");
    }
    Ok((s, buf[end + 4..].to_vec()))
}

fn receive(
    s: &mut TcpStream,
    v: &mut Verifier,
    stall: Option<(u64, u64)>,
) -> Result<Option<(f64, f64)>> {
    let mut buf = vec![0u8; CHUNK];
    let mut stalled = None;
    loop {
        if let Some((at, ms)) = stall {
            if stalled.is_none() && v.received >= at {
                let t0 = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs_f64();
                std::thread::sleep(Duration::from_millis(ms));
                stalled = Some((t0, t0 + ms as f64 / 1e3));
            }
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(stalled);
        }
        v.feed(&buf[..n])
            .map_err(|at| anyhow::anyhow!("wrong byte at offset {at}"))?;
    }
}

fn send(mut s: &TcpStream, seed: u64, n: u64) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0;
    while sent < n {
        let take = (n - sent).min(CHUNK as u64) as usize;
        stamp::fill(seed, sent, &mut buf[..take]);
        s.write_all(&buf[..take])?;
        sent += take as u64;
    }
    s.shutdown(Shutdown::Write)?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let addr = args.get(1).context("ADDR")?.clone();
    let cmd = args.get(2).context("CMD")?.clone();
    let num = |i: usize| -> u64 { args.get(i).and_then(|s| s.parse().ok()).unwrap_or(0) };
    let started = Instant::now();
    let out = match cmd.as_str() {
        "source" => {
            let (seed, n) = (num(3), num(4));
            let stall = (args.len() > 6).then(|| (num(5), num(6)));
            let (mut s, rest) = connect(&addr, &format!("/source/{seed}/{n}"))?;
            let mut v = Verifier::new(seed);
            v.feed(&rest)
                .map_err(|at| anyhow::anyhow!("wrong byte at {at}"))?;
            let stalled = receive(&mut s, &mut v, stall)?;
            if v.received != n {
                bail!("received {} of {n}", v.received);
            }
            let secs = started.elapsed().as_secs_f64();
            json!({"cmd": cmd, "ok": true, "bytes": n, "secs": secs,
                   "gbps": n as f64 * 8.0 / secs / 1e9, "stall": stalled})
        }
        "sink" => {
            let (seed, n) = (num(3), num(4));
            let (mut s, _) = connect(&addr, &format!("/sink/{seed}/{n}"))?;
            send(&s, seed, n)?;
            let mut tail = Vec::new();
            s.read_to_end(&mut tail)?;
            if !tail.is_empty() {
                bail!("unexpected bytes after the sink: {tail:?}");
            }
            let secs = started.elapsed().as_secs_f64();
            json!({"cmd": cmd, "ok": true, "bytes": n, "secs": secs, "gbps": n as f64 * 8.0 / secs / 1e9})
        }
        "both" => {
            let (s1, n1, s2, n2) = (num(3), num(4), num(5), num(6));
            let (mut s, rest) = connect(&addr, &format!("/both/{s1}/{n1}/{s2}/{n2}"))?;
            let writer = s.try_clone()?;
            let out = std::thread::spawn(move || send(&writer, s2, n2));
            let mut v = Verifier::new(s1);
            v.feed(&rest)
                .map_err(|at| anyhow::anyhow!("wrong byte at {at}"))?;
            receive(&mut s, &mut v, None)?;
            out.join()
                .map_err(|_| anyhow::anyhow!("sender panicked"))??;
            if v.received != n1 {
                bail!("received {} of {n1}", v.received);
            }
            let secs = started.elapsed().as_secs_f64();
            json!({"cmd": cmd, "ok": true, "bytes": n1 + n2, "secs": secs, "gbps": (n1 + n2) as f64 * 8.0 / secs / 1e9})
        }
        "echo" => {
            let (count, size) = (num(3) as usize, num(4) as usize);
            let (mut s, rest) = connect(&addr, "/echo")?;
            if !rest.is_empty() {
                bail!("bytes before the first echo");
            }
            let mut lat = Vec::with_capacity(count);
            let mut msg = vec![0u8; size];
            let mut got = vec![0u8; size];
            for i in 0..count {
                stamp::fill(i as u64, 0, &mut msg);
                let t = Instant::now();
                s.write_all(&msg)?;
                s.read_exact(&mut got)?;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
                if got != msg {
                    bail!("echo {i} came back wrong");
                }
            }
            s.shutdown(Shutdown::Write)?;
            let mut tail = Vec::new();
            s.read_to_end(&mut tail)?;
            if !tail.is_empty() {
                bail!("bytes after the last echo");
            }
            lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
            json!({"cmd": cmd, "ok": true, "p50_us": lat[count / 2], "p99_us": lat[count * 99 / 100]})
        }
        other => bail!("unknown command {other}"),
    };
    println!("{out}");
    Ok(())
}
