//! A test app in Rust, the twin of `tests/apps/zh_app.py`: `zh_app tokio|blocking [PORT]`
//! (listens on 127.0.0.1; `ZH_BIND=0.0.0.0` for a direct-path measurement).
//!
//! Answers one upgrade-style request head per connection with a 101, then runs the
//! command in the request path (every byte checked with `tests::stamp`):
//!
//! - `/source/SEED/N`: write N bytes, shut down writing, read to EOF
//! - `/sink/SEED/N`: read to EOF and check the N bytes
//! - `/both/S1/N1/S2/N2`: write N1 bytes of S1 while checking N2 bytes of S2
//! - `/echo`: write back everything until EOF, then shut down writing
//! - `/reset/N`: read N bytes, then reset the connection
//! - `/hold`: read to EOF
//!
//! Prints `listening PORT`, then one `done CMD ok|bad DETAIL` line per connection; a check
//! that fails resets the connection.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use anyhow::{bail, Result};
use tests::stamp::{self, Verifier};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHUNK: usize = 256 * 1024;
const RESPONSE: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: zh\r\n\r\n";

fn report(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The request path's parts, and the bytes read past the head.
fn parse(buf: &[u8]) -> Option<(Vec<String>, Vec<u8>)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let path = head.lines().next()?.split(' ').nth(1)?.to_owned();
    let cmd = path
        .split('/')
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect();
    Some((cmd, buf[end + 4..].to_vec()))
}

fn arg(cmd: &[String], i: usize) -> u64 {
    cmd.get(i).and_then(|s| s.parse().ok()).unwrap_or(0)
}

// ---------------------------------------------------------------- tokio

async fn t_head(s: &mut tokio::net::TcpStream) -> Result<(Vec<String>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(parsed) = parse(&buf) {
            return Ok(parsed);
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed in head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn t_source<W: AsyncWriteExt + Unpin>(w: &mut W, seed: u64, n: u64) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0;
    while sent < n {
        let take = (n - sent).min(CHUNK as u64) as usize;
        stamp::fill(seed, sent, &mut buf[..take]);
        w.write_all(&buf[..take]).await?;
        sent += take as u64;
    }
    w.shutdown().await?;
    Ok(())
}

async fn t_sink<R: AsyncReadExt + Unpin>(r: &mut R, seed: u64, n: u64, first: &[u8]) -> String {
    let mut v = Verifier::new(seed);
    if let Err(at) = v.feed(first) {
        return format!("bad at {at}");
    }
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => break,
            Ok(k) => {
                if let Err(at) = v.feed(&buf[..k]) {
                    return format!("bad at {at}");
                }
            }
            Err(e) => return format!("bad error {e}"),
        }
    }
    if v.received != n {
        return format!("bad count {}", v.received);
    }
    format!("ok {n}")
}

async fn t_conn(mut s: tokio::net::TcpStream) -> Result<String> {
    let (cmd, rest) = t_head(&mut s).await?;
    s.write_all(RESPONSE).await?;
    let name = cmd.first().cloned().unwrap_or_default();
    let result = match name.as_str() {
        "source" => {
            t_source(&mut s, arg(&cmd, 1), arg(&cmd, 2)).await?;
            let mut buf = vec![0u8; CHUNK];
            while s.read(&mut buf).await? > 0 {}
            format!("ok {}", arg(&cmd, 2))
        }
        "sink" => {
            let r = t_sink(&mut s, arg(&cmd, 1), arg(&cmd, 2), &rest).await;
            if r.starts_with("ok") {
                s.shutdown().await?;
            }
            r
        }
        "both" => {
            let (mut rd, mut wr) = s.split();
            let (out, inn) = tokio::join!(
                t_source(&mut wr, arg(&cmd, 1), arg(&cmd, 2)),
                t_sink(&mut rd, arg(&cmd, 3), arg(&cmd, 4), &rest)
            );
            out?;
            if inn.starts_with("ok") {
                format!("ok {}/{}", arg(&cmd, 2), arg(&cmd, 4))
            } else {
                inn
            }
        }
        "echo" => {
            let mut count = rest.len() as u64;
            s.write_all(&rest).await?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let k = s.read(&mut buf).await?;
                if k == 0 {
                    break;
                }
                s.write_all(&buf[..k]).await?;
                count += k as u64;
            }
            s.shutdown().await?;
            format!("ok {count}")
        }
        "reset" => {
            let want = arg(&cmd, 1);
            let mut got = rest.len() as u64;
            let mut buf = vec![0u8; CHUNK];
            while got < want {
                let k = s.read(&mut buf).await?;
                if k == 0 {
                    break;
                }
                got += k as u64;
            }
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            format!("ok reset after {got}")
        }
        _ => {
            let mut buf = vec![0u8; CHUNK];
            while s.read(&mut buf).await? > 0 {}
            s.shutdown().await?;
            "ok".into()
        }
    };
    if !result.starts_with("ok") {
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    }
    Ok(format!("done {name} {result}"))
}

async fn tokio_main(port: u16) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((bind_host(), port)).await?;
    report(format!("listening {}", listener.local_addr()?.port()));
    loop {
        let (s, _) = listener.accept().await?;
        tokio::spawn(async move {
            match t_conn(s).await {
                Ok(line) => report(line),
                Err(e) => report(format!("done error {e}")),
            }
        });
    }
}

// ---------------------------------------------------------------- blocking

fn b_head(s: &mut std::net::TcpStream) -> Result<(Vec<String>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(parsed) = parse(&buf) {
            return Ok(parsed);
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("closed in head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn b_source(mut s: &std::net::TcpStream, seed: u64, n: u64) -> Result<()> {
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

fn b_sink(mut s: &std::net::TcpStream, seed: u64, n: u64, first: &[u8]) -> String {
    let mut v = Verifier::new(seed);
    if let Err(at) = v.feed(first) {
        return format!("bad at {at}");
    }
    let mut buf = vec![0u8; CHUNK];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                if let Err(at) = v.feed(&buf[..k]) {
                    return format!("bad at {at}");
                }
            }
            Err(e) => return format!("bad error {e}"),
        }
    }
    if v.received != n {
        return format!("bad count {}", v.received);
    }
    format!("ok {n}")
}

fn b_conn(mut s: std::net::TcpStream) -> Result<String> {
    let (cmd, rest) = b_head(&mut s)?;
    s.write_all(RESPONSE)?;
    let name = cmd.first().cloned().unwrap_or_default();
    let result = match name.as_str() {
        "source" => {
            b_source(&s, arg(&cmd, 1), arg(&cmd, 2))?;
            let mut buf = vec![0u8; CHUNK];
            while s.read(&mut buf)? > 0 {}
            format!("ok {}", arg(&cmd, 2))
        }
        "sink" => {
            let r = b_sink(&s, arg(&cmd, 1), arg(&cmd, 2), &rest);
            if r.starts_with("ok") {
                s.shutdown(Shutdown::Write)?;
            }
            r
        }
        "both" => {
            let writer = s.try_clone()?;
            let (seed, n) = (arg(&cmd, 1), arg(&cmd, 2));
            let out = std::thread::spawn(move || b_source(&writer, seed, n));
            let inn = b_sink(&s, arg(&cmd, 3), arg(&cmd, 4), &rest);
            out.join()
                .map_err(|_| anyhow::anyhow!("writer panicked"))??;
            if inn.starts_with("ok") {
                format!("ok {}/{}", arg(&cmd, 2), arg(&cmd, 4))
            } else {
                inn
            }
        }
        "echo" => {
            let mut count = rest.len() as u64;
            s.write_all(&rest)?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let k = s.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                s.write_all(&buf[..k])?;
                count += k as u64;
            }
            s.shutdown(Shutdown::Write)?;
            format!("ok {count}")
        }
        "reset" => {
            let want = arg(&cmd, 1);
            let mut got = rest.len() as u64;
            let mut buf = vec![0u8; CHUNK];
            while got < want {
                let k = s.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                got += k as u64;
            }
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            format!("ok reset after {got}")
        }
        _ => {
            let mut buf = vec![0u8; CHUNK];
            while s.read(&mut buf)? > 0 {}
            s.shutdown(Shutdown::Write)?;
            "ok".into()
        }
    };
    if !result.starts_with("ok") {
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    }
    Ok(format!("done {name} {result}"))
}

fn blocking_main(port: u16) -> Result<()> {
    let listener = std::net::TcpListener::bind((bind_host(), port))?;
    report(format!("listening {}", listener.local_addr()?.port()));
    for s in listener.incoming() {
        let s = s?;
        std::thread::spawn(move || match b_conn(s) {
            Ok(line) => report(line),
            Err(e) => report(format!("done error {e}")),
        });
    }
    Ok(())
}

fn bind_host() -> String {
    std::env::var("ZH_BIND").unwrap_or_else(|_| "127.0.0.1".into())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(0);
    match args.get(1).map(String::as_str) {
        Some("tokio") => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(tokio_main(port)),
        Some("blocking") => blocking_main(port),
        _ => bail!("usage: zh_app tokio|blocking [PORT]"),
    }
}
