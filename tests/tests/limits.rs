//! Limits (SPEC §5, issue 10.3): the soft open-file limit is raised to the hard one and
//! logged; past its descriptor capacity a new request gets `503 over_capacity` at once,
//! never a hang; `/health` keeps answering; it recovers by itself when load falls.

use std::time::Duration;

use anyhow::Result;
use tests::client::read_until_close;
use tests::recording::RecordingApp;
use tests::{v4, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PORT: u16 = 4096;

/// Sends one request on `c` and reads the answer's status and body (bounded: a hang
/// fails the test).
async fn ask(c: &mut TcpStream, path: &str) -> Result<(u16, String)> {
    c.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: h\r\nX-Iterate-Proxy-Target-Host: localhost:4096\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut chunk))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 2 s"))??;
        anyhow::ensure!(n > 0, "closed without an answer");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return Ok((head[9..12].parse()?, body[..len].to_owned()));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_capacity_requests_get_503_at_once_health_answers_and_it_recovers() -> Result<()> {
    let s = Setup::with_nofile(&["--workers", "2"], 300, 400).await?;
    let _app = RecordingApp::start(s.topo.machine.listen(v4(PORT))?, None);
    let start = s
        .daemon
        .log_containing("project-ingress-proxy started")
        .await?;
    assert!(
        start.contains(r#""open_files_soft_limit_at_start":300"#)
            && start.contains(r#""open_files_limit":400"#),
        "the soft limit is raised to the hard one and logged: {start}"
    );

    // Keep-alive clients, each with one request answered, until well past capacity.
    let mut held = Vec::new();
    let (mut ok, mut over) = (0, 0);
    for i in 0..220 {
        let mut c = s.topo.client.connect(s.addr()).await?;
        let (status, body) = ask(&mut c, &format!("/c{i}")).await?;
        match status {
            200 => ok += 1,
            503 => {
                assert_eq!(body, r#"{"error":"over_capacity"}"#);
                over += 1;
            }
            other => panic!("request {i}: status {other}"),
        }
        held.push(c);
    }
    assert!(ok >= 100, "served {ok} before the limit");
    assert!(over >= 50, "{over} refused past the limit");

    // At the limit, /health still answers.
    let mut c = s.topo.client.connect(s.addr()).await?;
    c.write_all(b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n")
        .await?;
    let answer = read_until_close(&mut c, Duration::from_secs(2)).await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("OK"),
        "{answer:?}"
    );

    // Load falls: served again, without a restart.
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..20 {
        let mut c = s.topo.client.connect(s.addr()).await?;
        assert_eq!(ask(&mut c, &format!("/after{i}")).await?.0, 200);
    }
    s.daemon.log_containing("over capacity").await?;
    Ok(())
}
