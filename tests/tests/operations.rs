//! The operator's side (SPEC §5, issue 11): admin endpoints, readiness across a drain,
//! systemd notifications, SIGHUP reloads, `check`, metrics that agree with the traffic.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use anyhow::Result;
use tests::client::read_until_close;
use tests::daemon::TempDir;
use tests::recording::RecordingApp;
use tests::{metric, v4, Setup};
use tokio::io::AsyncWriteExt;

/// A GET on the admin interface, from inside the machine namespace: (status, body).
async fn admin_get(s: &Setup, path: &str) -> Result<(u16, String)> {
    s.admin_get(path).await
}

async fn proxied(s: &Setup, target: &str, extra: &str) -> Result<String> {
    let mut c = s.topo.client.connect(s.addr()).await?;
    c.write_all(format!("GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\nX-Iterate-Proxy-Target-Host: {target}\r\n{extra}\r\n").as_bytes())
        .await?;
    Ok(read_until_close(&mut c, Duration::from_secs(3)).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_the_traffic_and_the_admin_port_is_no_target() -> Result<()> {
    let s = Setup::new(&[]).await?;
    let _app = RecordingApp::start(s.topo.machine.listen(v4(4096))?, None);
    for _ in 0..7 {
        assert!(proxied(&s, "localhost:4096", "")
            .await?
            .starts_with("HTTP/1.1 200"));
    }
    for _ in 0..3 {
        assert!(proxied(&s, "localhost:4999", "")
            .await?
            .starts_with("HTTP/1.1 502"));
    }
    let forbidden = proxied(&s, "localhost:9180", "").await?;
    assert!(
        forbidden.starts_with("HTTP/1.1 403")
            && forbidden.ends_with(r#"{"error":"forbidden_target"}"#)
    );
    let (status, text) = admin_get(&s, "/metrics").await?;
    assert_eq!(status, 200);
    let p = "project_ingress_proxy_";
    assert_eq!(
        metric(
            &text,
            &format!(r#"{p}requests_total{{class="2xx",port="4096"}}"#)
        ),
        Some(7.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            &format!(r#"{p}requests_total{{class="5xx",port="4999"}}"#)
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, &format!("{p}upstream_connect_failures_total")),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, &format!("{p}request_duration_seconds_count")),
        Some(11.0)
    );
    assert!(metric(&text, &format!("{p}open_fds")).unwrap() > 0.0);
    assert_eq!(metric(&text, &format!("{p}open_fds_limit")), Some(20000.0));
    assert!(text.contains(&format!("{p}build_info{{version=")), "{text}");
    assert!(
        metric(&text, &format!("{p}upstream_pool_idle_connections")).unwrap() >= 1.0,
        "{text}"
    );
    assert_eq!(admin_get(&s, "/ready").await?, (200, "ready".into()));
    assert_eq!(admin_get(&s, "/nope").await?.0, 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_systemd_notifications_follow_the_lifecycle() -> Result<()> {
    let dir = TempDir::new()?;
    let socket_path = dir.0.join("notify.sock");
    let notify = UnixDatagram::bind(&socket_path)?;
    notify.set_read_timeout(Some(Duration::from_secs(5)))?;
    let path = socket_path.to_str().unwrap();
    let mut s = Setup::with_env(
        &["--shutdown-grace", "3s"],
        &[("NOTIFY_SOCKET", path), ("WATCHDOG_USEC", "1000000")],
    )
    .await?;
    let mut got = String::new();
    let mut buf = [0u8; 256];
    while !(got.contains("READY=1") && got.contains("WATCHDOG=1")) {
        let n = notify.recv(&mut buf)?;
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
        got.push('\n');
    }
    assert_eq!(admin_get(&s, "/ready").await?.0, 200);
    // An open connection keeps the daemon draining for a while.
    let _app = RecordingApp::start(s.topo.machine.listen(v4(4096))?, None);
    let mut held = s.topo.client.connect(s.addr()).await?;
    held.write_all(b"GET /x HTTP/1.1\r\nHost: h\r\nX-Iterate-Proxy-Target-Host: localhost:4096\r\nContent-Length: 10\r\n\r\nhalf").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.daemon.signal(libc::SIGTERM);
    loop {
        let n = notify.recv(&mut buf)?;
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    assert_eq!(admin_get(&s, "/ready").await?, (503, "draining".into()));
    assert_eq!(s.daemon.wait_exit(Duration::from_secs(8)).await?, Some(0));
    drop(held);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_secret_file_and_the_log_level_without_dropping_anything() -> Result<()>
{
    let dir = TempDir::new()?;
    let secret = dir.0.join("secret");
    let level = dir.0.join("level");
    std::fs::write(&secret, "first\n")?;
    std::fs::write(&level, "warn")?;
    let args = [
        "--secret-file",
        secret.to_str().unwrap(),
        "--log-level-file",
        level.to_str().unwrap(),
    ];
    let s = Setup::new(&args).await?;
    let _app = RecordingApp::start(s.topo.machine.listen(v4(4096))?, None);
    // A keep-alive connection open across the reload keeps working.
    let mut kept = s.topo.client.connect(s.addr()).await?;
    let ask = |secret: &str| {
        format!("GET /k HTTP/1.1\r\nHost: h\r\nX-Iterate-Proxy-Target-Host: localhost:4096\r\nX-Iterate-Project-Ingress-Secret: {secret}\r\n\r\n")
    };
    kept.write_all(ask("first").as_bytes()).await?;
    let mut b = [0u8; 4096];
    let n = tokio::io::AsyncReadExt::read(&mut kept, &mut b).await?;
    assert!(String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 200"));
    assert!(proxied(
        &s,
        "localhost:4096",
        "X-Iterate-Project-Ingress-Secret: first\r\n"
    )
    .await?
    .starts_with("HTTP/1.1 200"));
    s.daemon.settle_log().await;
    assert!(
        !s.daemon.logs().contains(r#""message":"request""#),
        "warn level: no access lines"
    );

    std::fs::write(&secret, "second\n")?;
    std::fs::write(&level, "info")?;
    s.daemon.signal(libc::SIGHUP);
    s.daemon.log_containing("secret reloaded").await?;
    assert!(proxied(
        &s,
        "localhost:4096",
        "X-Iterate-Project-Ingress-Secret: first\r\n"
    )
    .await?
    .starts_with("HTTP/1.1 401"));
    assert!(proxied(
        &s,
        "localhost:4096",
        "X-Iterate-Project-Ingress-Secret: second\r\n"
    )
    .await?
    .starts_with("HTTP/1.1 200"));
    kept.write_all(ask("second").as_bytes()).await?;
    let n = tokio::io::AsyncReadExt::read(&mut kept, &mut b).await?;
    assert!(
        String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 200"),
        "kept connection"
    );
    s.daemon.log_containing(r#""message":"request""#).await?;
    let logs = s.daemon.logs();
    assert!(
        !logs.contains("first") && !logs.contains("second"),
        "secrets never logged"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_choice_and_fails_on_a_bad_configuration() -> Result<()> {
    let bin = tests::daemon::binary();
    let run = |args: &[&str]| {
        std::process::Command::new(&bin)
            .arg("check")
            .args(args)
            .env_remove("PROJECT_INGRESS_PROXY_SECRET")
            .output()
            .unwrap()
    };
    let ok = run(&[]);
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{text}");
    assert!(text.contains("--splice auto chooses: ebpf"), "{text}");
    let bad = run(&["--secret-file", "/nonexistent/secret"]);
    assert_eq!(
        bad.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&bad.stdout)
    );
    assert!(String::from_utf8_lossy(&bad.stdout).contains("secret: ERROR"));
    Ok(())
}

/// Tunnel counters agree with the bytes a test moved, live (`/debug/tunnels`) and after
/// the end (`/metrics`), on the fast path and on the userspace relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_counters_agree_with_the_bytes_moved() -> Result<()> {
    use tests::upstream::RawUpgradeApp;
    use tokio::io::AsyncReadExt;
    for mode in [&["--splice", "auto"][..], &["--splice", "off"][..]] {
        let s = Setup::new(mode).await?;
        let mut app = RawUpgradeApp::start(s.topo.machine.listen(v4(5000))?, vec![])?;
        let (up, down) = (300_000usize, 700_000usize);
        let mut pairs = Vec::new();
        for i in 0..2 {
            let extra = format!("X-Request-Id: counted-{i}\r\n");
            let (client, head, _) = tests::client::upgrade(
                &s.topo.client,
                s.addr(),
                "localhost:5000",
                "websocket",
                &extra,
            )
            .await?;
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            let upstream = tokio::time::timeout(Duration::from_secs(5), app.accepted.recv())
                .await?
                .expect("upstream")
                .stream;
            pairs.push((client, upstream));
        }
        for (client, upstream) in pairs.iter_mut() {
            let (mut cr, mut cw) = client.split();
            let (mut ur, mut uw) = upstream.split();
            let mut a = vec![0u8; up];
            tests::pattern::fill(1, 0, &mut a);
            let mut b = vec![0u8; down];
            tests::pattern::fill(2, 0, &mut b);
            let (mut ra, mut rb) = (vec![0u8; up], vec![0u8; down]);
            tokio::try_join!(
                cw.write_all(&a),
                uw.write_all(&b),
                ur.read_exact(&mut ra),
                cr.read_exact(&mut rb)
            )?;
            assert!(ra == a && rb == b, "{mode:?}: bytes changed in transit");
        }
        // Live: both tunnels, with their request ids and exact counts (kernel bytes are
        // read from the maps; give the kernel's sender a moment).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let list = loop {
            let (status, body) = admin_get(&s, "/debug/tunnels").await?;
            assert_eq!(status, 200);
            let list: serde_json::Value = serde_json::from_str(&body)?;
            let exact = list.as_array().is_some_and(|a| {
                a.len() == 2
                    && a.iter().all(|t| {
                        t["bytes_client_to_upstream"] == up as u64
                            && t["bytes_upstream_to_client"] == down as u64
                    })
            });
            if exact || std::time::Instant::now() > deadline {
                break list;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Listed by tunnel id: ids are taken as the tunnels start, on either worker, so
        // the order of their request ids is not fixed.
        let mut tunnels = list.as_array().expect("array").clone();
        assert_eq!(tunnels.len(), 2, "{mode:?}: {list}");
        tunnels.sort_by_key(|t| t["request_id"].as_str().unwrap_or_default().to_owned());
        for (i, t) in tunnels.iter().enumerate() {
            assert_eq!(t["request_id"], format!("counted-{i}"), "{t}");
            assert_eq!(t["port"], 5000);
            assert!(t["age_s"].as_f64().unwrap() >= 0.0);
            assert_eq!(t["bytes_client_to_upstream"], up as u64, "{mode:?}: {t}");
            assert_eq!(t["bytes_upstream_to_client"], down as u64, "{mode:?}: {t}");
            assert!(t["client_to_upstream"]["path"].is_string(), "{t}");
        }
        drop(pairs);
        // Ended: the totals by path add up to what moved.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (_, text) = admin_get(&s, "/metrics").await?;
            let sum = |direction: &str| -> f64 {
                ["kernel", "splice", "copy"]
                    .iter()
                    .filter_map(|p| {
                        metric(&text, &format!(r#"project_ingress_proxy_tunnel_bytes_total{{direction="{direction}",path="{p}"}}"#))
                    })
                    .sum()
            };
            let open = metric(&text, "project_ingress_proxy_tunnels");
            if open == Some(0.0) {
                assert_eq!(
                    sum("client_to_upstream"),
                    (2 * up) as f64,
                    "{mode:?}: {text}"
                );
                assert_eq!(
                    sum("upstream_to_client"),
                    (2 * down) as f64,
                    "{mode:?}: {text}"
                );
                if mode[1] == "auto" {
                    assert_eq!(
                        metric(&text, "project_ingress_proxy_fastpath_dropped_bytes_total"),
                        Some(0.0)
                    );
                }
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "tunnels never closed: {text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}
