//! Dead peers (SPEC §5, issue 10.5): TCP keepalive on client and upstream sockets, so a
//! tunnel whose client vanished without FIN or RST (a laptop gone to sleep) is closed
//! within the configured probe time, the upstream is told with a reset, and the close is
//! logged with its cause.

use std::time::{Duration, Instant};

use anyhow::Result;
use tests::client;
use tests::netns::ip;
use tests::upstream::RawUpgradeApp;
use tests::{v4, Setup};
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_whose_client_vanished_is_closed_by_keepalive() -> Result<()> {
    for mode in [&["--splice", "off"][..], &["--splice", "auto"][..]] {
        let mut args = mode.to_vec();
        args.extend([
            "--tcp-keepalive",
            "1s",
            "--tcp-keepalive-interval",
            "1s",
            "--tcp-keepalive-probes",
            "2",
        ]);
        let s = Setup::new(&args).await?;
        let mut app = RawUpgradeApp::start(s.topo.machine.listen(v4(5000))?, vec![])?;
        let (_client, head, _) =
            client::upgrade(&s.topo.client, s.addr(), "localhost:5000", "websocket", "").await?;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let mut upstream = tokio::time::timeout(Duration::from_secs(5), app.accepted.recv())
            .await?
            .expect("upstream side")
            .stream;
        // The client's machine drops off the network: no FIN, no RST, nothing.
        ip(&["-n", &s.topo.client.name, "link", "set", "veth0", "down"])?;
        let started = Instant::now();
        let mut buf = [0u8; 16];
        let seen = tokio::time::timeout(Duration::from_secs(15), upstream.read(&mut buf)).await;
        assert!(
            matches!(seen, Ok(Ok(0)) | Ok(Err(_))),
            "{mode:?}: the upstream was not told: {seen:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(15));
        let logs = s.daemon.log_containing("tunnel closed").await?;
        let line = logs.lines().find(|l| l.contains("tunnel closed")).unwrap();
        assert!(line.contains("TimedOut"), "{mode:?}: {line}");
    }
    Ok(())
}
