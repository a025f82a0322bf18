//! Security defaults (issue 10.7): a warning when listening beyond loopback without a
//! secret; `--allow-ports`; the daemon's own port is never a target; repeated 401s close
//! the connection.

use std::time::Duration;

use anyhow::Result;
use tests::client::read_until_close;
use tests::recording::RecordingApp;
use tests::{v4, Setup};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_outside_the_allowed_ports_and_the_daemons_own_port_are_forbidden() -> Result<()> {
    let s = Setup::new(&["--allow-ports", "4096,5000-5001"]).await?;
    let _a = RecordingApp::start(s.topo.machine.listen(v4(4096))?, None);
    let _b = RecordingApp::start(s.topo.machine.listen(v4(4097))?, None);
    let logs = s
        .daemon
        .log_containing("listening beyond loopback without")
        .await?;
    assert!(logs.contains(r#""level":"WARN""#));
    for (target, want) in [
        ("localhost:4096", "HTTP/1.1 200"),
        ("4097__x", "HTTP/1.1 403"),
        ("localhost:8080", "HTTP/1.1 403"),
        ("5001__x", "HTTP/1.1 502"),
    ] {
        let mut c = s.topo.client.connect(s.addr()).await?;
        c.write_all(format!("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\nX-Iterate-Proxy-Target-Host: {target}\r\n\r\n").as_bytes()).await?;
        let answer = read_until_close(&mut c, Duration::from_secs(3)).await;
        assert!(answer.starts_with(want), "{target}: {answer}");
        if want.ends_with("403") {
            assert!(
                answer.ends_with(r#"{"error":"forbidden_target"}"#),
                "{answer}"
            );
        }
    }
    // Without --allow-ports, the own port is still refused.
    let s = Setup::new(&[]).await?;
    let mut c = s.topo.client.connect(s.addr()).await?;
    c.write_all(
        b"GET / HTTP/1.1\r\nConnection: close\r\nX-Iterate-Proxy-Target-Host: 8080__m\r\n\r\n",
    )
    .await?;
    assert!(read_until_close(&mut c, Duration::from_secs(3))
        .await
        .starts_with("HTTP/1.1 403"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_unauthorized_requests_close_the_connection() -> Result<()> {
    let s = Setup::with_env(&[], &[("PROJECT_INGRESS_PROXY_SECRET", "s3cret")]).await?;
    let mut c = s.topo.client.connect(s.addr()).await?;
    let wrong = "GET / HTTP/1.1\r\nHost: h\r\nX-Iterate-Proxy-Target-Host: localhost:4096\r\nX-Iterate-Project-Ingress-Secret: guess\r\n\r\n";
    c.write_all(wrong.repeat(5).as_bytes()).await?;
    let answer = read_until_close(&mut c, Duration::from_secs(3)).await;
    assert_eq!(answer.matches("HTTP/1.1 401").count(), 3, "{answer}");
    assert_eq!(answer.matches("Connection: close").count(), 1, "{answer}");
    s.daemon.log_with_count(r#""status":401"#, 3).await?;
    s.daemon.settle_log().await;
    assert!(
        !s.daemon.logs().contains("guess"),
        "presented secrets are never logged"
    );
    Ok(())
}
