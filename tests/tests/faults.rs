//! Faults on the HTTP path (issue 10.9): an upstream that resets before its head, in the
//! middle of its body, or after part of an upgrade answer; a client that vanishes in the
//! middle of an upload or a download. Each ends in a clear status or a reset, never a
//! hang, never a response that looks complete, and the daemon serves on.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tests::recording::{echo_reply, Recorded, RecordingApp, Reply, Then};
use tests::{v4, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: &str = "X-Iterate-Proxy-Target-Host: localhost:4096";

fn faulty(r: &Recorded) -> Reply {
    let path = r.request_line().split(' ').nth(1).unwrap_or("").to_owned();
    let (bytes, then): (&[u8], Then) = match path.as_str() {
        "/reset-before-head" => (b"", Then::Reset),
        "/reset-mid-head" => (b"HTTP/1.1 200 OK\r\nContent-Le", Then::Reset),
        "/reset-mid-body" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part",
            Then::Reset,
        ),
        "/reset-mid-chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            Then::Reset,
        ),
        "/close-mid-body" => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part",
            Then::Close,
        ),
        "/reset-mid-upgrade" => (b"HTTP/1.1 101 Switching Protocols\r\nUpgr", Then::Reset),
        "/slow-upload" => (b"", Then::Hang),
        _ => return echo_reply(r),
    };
    Reply {
        bytes: bytes.to_vec(),
        then,
    }
}

async fn ask(s: &Setup, request: &str) -> Result<Result<String, std::io::Error>> {
    let mut c = s.topo.client.connect(s.addr()).await?;
    c.write_all(request.as_bytes()).await?;
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out))
        .await
        .map_err(|_| anyhow::anyhow!("hang: {:?}", String::from_utf8_lossy(&out)))?;
    Ok(r.map(|_| String::from_utf8_lossy(&out).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_give_502_before_the_head_and_a_reset_after() -> Result<()> {
    let s = Setup::new(&[]).await?;
    let _app = RecordingApp::start_with(s.topo.machine.listen(v4(4096))?, None, Arc::new(faulty));
    for path in ["/reset-before-head", "/reset-mid-head"] {
        let got = ask(
            &s,
            &format!("GET {path} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n{T}\r\n\r\n"),
        )
        .await??;
        assert!(
            got.starts_with("HTTP/1.1 502") && got.ends_with(r#"{"error":"proxy_error"}"#),
            "{path}: {got}"
        );
    }
    for path in ["/reset-mid-body", "/reset-mid-chunked", "/close-mid-body"] {
        // The head went out; the body is cut: the client connection is reset, never ended
        // as if complete.
        match ask(
            &s,
            &format!("GET {path} HTTP/1.1\r\nHost: h\r\n{T}\r\n\r\n"),
        )
        .await?
        {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{path}"),
            Ok(got) => panic!("{path}: ended cleanly: {got:?}"),
        }
    }
    let upgrade = format!("GET /reset-mid-upgrade HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{T}\r\n\r\n");
    let got = ask(&s, &upgrade).await??;
    assert!(got.starts_with("HTTP/1.1 502"), "{got}");
    // Still serving, and keep-alive works.
    let got = ask(
        &s,
        &format!("GET /fine HTTP/1.1\r\nHost: h\r\nConnection: close\r\n{T}\r\n\r\n"),
    )
    .await??;
    assert!(got.ends_with("GET /fine body=0"), "{got}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_vanishing_mid_upload_or_mid_download_frees_both_sides() -> Result<()> {
    let s = Setup::new(&[]).await?;
    let app = RecordingApp::start_with(s.topo.machine.listen(v4(4096))?, None, Arc::new(faulty));
    // Mid-upload: the client promises 1 MB, sends 1 KB and resets.
    let mut c = s.topo.client.connect(s.addr()).await?;
    c.write_all(
        format!("POST /upload HTTP/1.1\r\nHost: h\r\n{T}\r\nContent-Length: 1000000\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    c.write_all(&[b'x'; 1024]).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO))?;
    drop(c);
    // The upstream never got a complete request, and the daemon still serves.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(app
        .requests()
        .iter()
        .all(|r| !r.request_line().contains("/upload")));
    // Mid-download: a large body, the client reads a little and leaves.
    let big = tests::upstream::HttpApp::start(s.topo.machine.listen(v4(4097))?)?;
    let mut c = s.topo.client.connect(s.addr()).await?;
    c.write_all(b"GET /download/1073741824/3 HTTP/1.1\r\nHost: h\r\nX-Iterate-Proxy-Target-Host: localhost:4097\r\n\r\n").await?;
    let mut buf = vec![0u8; 65536];
    c.read_exact(&mut buf).await?;
    drop(c);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = s
        .daemon
        .log_containing(r#""outcome":"client_gone""#)
        .await?;
    assert!(
        logs.matches(r#""outcome":"client_gone""#).count() >= 2,
        "{logs}"
    );
    let got = ask(
        &s,
        &format!("GET /after HTTP/1.1\r\nHost: h\r\nConnection: close\r\n{T}\r\n\r\n"),
    )
    .await??;
    assert!(got.ends_with("GET /after body=0"), "{got}");
    drop(big);
    Ok(())
}
