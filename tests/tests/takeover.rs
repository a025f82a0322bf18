//! Zero-downtime takeover (SPEC §5, issue 11.6): a new daemon started with `--takeover`
//! and the same control socket receives the listening sockets (and everything live), the
//! old one finishes and exits 0; clients never see a refused connection.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use tests::daemon::{Daemon, TempDir};
use tests::recording::RecordingApp;
use tests::{v4, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REQ: &[u8] =
    b"GET /t HTTP/1.1\r\nHost: h\r\nX-Iterate-Proxy-Target-Host: localhost:4096\r\n\r\n";

/// One response on `c`: `Ok(true)` answered 200, `Ok(false)` closed (FIN or RST) before
/// any byte of it: a draining daemon closed the idle connection as the request went out,
/// which an HTTP client answers by sending again on a new connection.
async fn one(c: &mut TcpStream) -> Result<bool> {
    let closed = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        )
    };
    match c.write_all(REQ).await {
        Err(e) if closed(&e) => return Ok(false),
        other => other?,
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(5), c.read(&mut chunk)).await? {
            Err(e) if closed(&e) && buf.is_empty() => 0,
            other => other?,
        };
        if n == 0 {
            ensure!(
                buf.is_empty(),
                "closed mid-response: {:?}",
                String::from_utf8_lossy(&buf)
            );
            return Ok(false);
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
            if body.len() >= "GET /t body=0".len() {
                return Ok(true);
            }
        }
    }
}

/// Requests on keep-alive connections until `stop`: a connection the daemon closed
/// between requests is replaced (what every HTTP client does); anything else fails.
async fn client_loop(s: Arc<Setup>, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> Result<()> {
    while !stop.load(Ordering::Relaxed) {
        let mut c = s.topo.client.connect(s.addr()).await?; // a refusal fails the test
        let mut fresh = true;
        while !stop.load(Ordering::Relaxed) {
            if one(&mut c).await? {
                done.fetch_add(1, Ordering::Relaxed);
                fresh = false;
                tokio::time::sleep(Duration::from_millis(2)).await;
            } else {
                ensure!(!fresh, "a new connection was closed without an answer");
                break;
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_takeovers_under_load_refuse_nothing() -> Result<()> {
    let dir = TempDir::new()?;
    let ctl = dir.0.join("control.sock");
    let ctl = ctl.to_str().unwrap().to_owned();
    let args = ["--control-socket", ctl.as_str(), "--shutdown-grace", "5s"];
    let s = Arc::new(Setup::new(&args).await?);
    let _app = RecordingApp::start(s.topo.machine.listen(v4(4096))?, None);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|_| tokio::spawn(client_loop(s.clone(), stop.clone(), done.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut previous: Option<Daemon> = None;
    let takeover_args = [
        "--control-socket",
        ctl.as_str(),
        "--takeover",
        "--shutdown-grace",
        "5s",
    ];
    for round in 0..10 {
        let before = done.load(Ordering::Relaxed);
        let next = Daemon::start(&s.topo, &takeover_args, &[]).await?;
        next.log_containing("takeover complete").await?;
        // The daemon taken over exits 0.
        match previous.as_mut() {
            Some(old) => assert_eq!(
                old.wait_exit(Duration::from_secs(10)).await?,
                Some(0),
                "round {round}"
            ),
            None => {
                // The first daemon is the Setup's; it must exit too.
                let pid = s.daemon.pid();
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
                    && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .unwrap_or_default()
                        .contains(") Z")
                {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "first daemon did not exit"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        previous = Some(next);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            done.load(Ordering::Relaxed) > before,
            "round {round}: traffic kept flowing"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await??;
    }
    assert!(done.load(Ordering::Relaxed) > 100);
    Ok(())
}
