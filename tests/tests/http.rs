//! SPEC §2 and §5 through the real daemon: client namespace → veth → daemon → upstream
//! apps on the machine's loopback.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tests::client::{self, empty, raw_exchange};
use tests::upstream::HttpApp;
use tests::{pattern, v4, v6, Setup};

const PORT: u16 = 4096;

async fn setup_with_app(args: &[&str]) -> Result<(Setup, HttpApp)> {
    let s = Setup::new(args).await?;
    let app = HttpApp::start(s.topo.machine.listen(v4(PORT))?)?;
    Ok((s, app))
}

fn get(path: &str, target: &str) -> Request<client::ClientBody> {
    Request::get(path)
        .header("host", "4096__mach_1.iterate.town")
        .header("x-iterate-proxy-target-host", target)
        .body(empty())
        .unwrap()
}

async fn body_string(resp: hyper::Response<hyper::body::Incoming>) -> Result<String> {
    Ok(String::from_utf8(
        resp.into_body().collect().await?.to_bytes().to_vec(),
    )?)
}

/// (status, content-type, content-length, body) of one request on a fresh connection.
async fn call(
    s: &Setup,
    req: Request<client::ClientBody>,
) -> Result<(u16, String, String, String)> {
    let (mut sender, _) = client::http1(&s.topo.client, s.addr()).await?;
    let resp = client::send(&mut sender, req).await?;
    let status = resp.status().as_u16();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (ct, cl) = (header("content-type"), header("content-length"));
    Ok((status, ct, cl, body_string(resp).await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_needs_no_target_and_ignores_query_and_method() -> Result<()> {
    let s = Setup::with_env(&[], &[("PROJECT_INGRESS_PROXY_SECRET", "s3cret")]).await?;
    for (method, path) in [
        ("GET", "/health"),
        ("POST", "/health?x=1"),
        ("HEAD", "/health"),
    ] {
        let req = Request::builder().method(method).uri(path).body(empty())?;
        let (status, ct, cl, body) = call(&s, req).await?;
        assert_eq!(status, 200, "{method} {path}");
        assert_eq!(ct, "text/plain; charset=utf-8");
        assert_eq!(cl, "2");
        if method != "HEAD" {
            assert_eq!(body, "OK");
        }
    }
    // Not exactly /health: a normal request (here: unauthorized, secret is on).
    let req = Request::get("/health/").body(empty())?;
    assert_eq!(call(&s, req).await?.0, 401);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_header_errors_are_json_400() -> Result<()> {
    let (s, app) = setup_with_app(&[]).await?;
    let missing = r#"{"error":"missing_proxy_target_host"}"#;
    let invalid = r#"{"error":"invalid_proxy_target_host"}"#;
    let cases: &[(&[&str], &str)] = &[
        (&[], missing),
        (&["   "], missing),
        (&["abc__x"], invalid),
        (&["70000__x"], invalid),
        (&["0__x"], invalid),
        (&["80__"], invalid),
        (&["example.com:80"], invalid),
        (&["[::1]:80"], invalid),
        (&["127.0.0.2:80"], invalid),
        (&["localhost.evil.com:80"], invalid),
        (&["localhost:4096", "localhost:4096"], invalid),
    ];
    for (values, expected) in cases {
        let mut req = Request::get("/x").header("host", "h");
        for v in values.iter() {
            req = req.header("X-Iterate-Proxy-Target-Host", *v);
        }
        let (status, ct, cl, body) = call(&s, req.body(empty())?).await?;
        assert_eq!(status, 400, "{values:?}");
        assert_eq!(ct, "application/json");
        assert_eq!(cl, expected.len().to_string());
        assert_eq!(body, *expected, "{values:?}");
    }
    assert_eq!(
        app.connections.load(Ordering::Relaxed),
        0,
        "nothing forwarded"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_rewritten_as_specified() -> Result<()> {
    let (s, _app) = setup_with_app(&[]).await?;
    let req = Request::get("/inspect")
        .header("host", "4096__mach_1.iterate.town")
        .header("X-ITERATE-PROXY-TARGET-HOST", " 4096__mach_1.iterate.town ")
        .header("x-iterate-project-ingress-secret", "unused")
        .header("x-iterate-proxy-via", "spoofed")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("origin", "https://4096__mach_1.iterate.town")
        .header("cookie", "a=1; b=2")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-request-id", "req-abc-123")
        .body(empty())?;
    let (status, _, _, seen) = call(&s, req).await?;
    assert_eq!(status, 200);
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines[0], "GET /inspect HTTP/1.1");
    let has = |l: &str| lines.contains(&l);
    assert!(has("host: localhost:4096"), "{seen}");
    assert!(
        has("x-iterate-proxy-via: 4096__mach_1.iterate.town"),
        "{seen}"
    );
    assert!(has("origin: https://4096__mach_1.iterate.town"), "{seen}");
    assert!(has("cookie: a=1; b=2"), "{seen}");
    assert!(has("x-forwarded-for: 203.0.113.7"), "{seen}");
    assert!(has("x-request-id: req-abc-123"), "{seen}");
    for gone in [
        "x-iterate-proxy-target-host",
        "x-iterate-project-ingress-secret",
        "x-hop",
        "keep-alive",
        "te:",
        "connection",
        "spoofed",
    ] {
        assert!(!seen.to_lowercase().contains(gone), "{gone} leaked: {seen}");
    }
    // A request without X-Request-Id gets one, and the log line carries it.
    let (_, _, _, seen) = call(&s, get("/inspect", "localhost:4096")).await?;
    let id = seen
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("request id")
        .to_owned();
    assert!(id.len() >= 16);
    let logs = s.daemon.log_containing(&id).await?;
    let line = logs
        .lines()
        .find(|l| l.contains(&id))
        .expect("access log line");
    for field in [
        "\"method\":\"GET\"",
        "\"path\":\"/inspect\"",
        "\"port\":4096",
        "\"status\":200",
        "\"bytes\":",
        "\"duration_ms\":",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_target_is_forwarded_byte_for_byte() -> Result<()> {
    let (s, _app) = setup_with_app(&[]).await?;
    for target in [
        "//double//slash",
        "/a/..%2F..%2fetc/%2F?q=%2F&x=*",
        "/back\\slash\\path",
        "/./dot/../seg?",
        "*",
    ] {
        let method = if target == "*" { "OPTIONS" } else { "GET" };
        let raw = format!(
            "{method} {target} HTTP/1.1\r\nHost: h\r\nX-Iterate-Proxy-Target-Host: localhost:{PORT}\r\nConnection: close\r\n\r\n"
        );
        let resp = raw_exchange(&s.topo.client, s.addr(), raw.as_bytes()).await?;
        assert!(resp.starts_with("HTTP/1.1 200"), "{target}: {resp}");
        assert!(
            resp.contains(&format!("\r\n\r\n{method} {target} HTTP/1.1\n")),
            "{target} was changed: {resp}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_gigabyte_bodies_stream_both_ways() -> Result<()> {
    let (s, _app) = setup_with_app(&[]).await?;
    let size: u64 = 2 << 30;
    let (mut sender, _) = client::http1(&s.topo.client, s.addr()).await?;

    // Downloads, chunked and with Content-Length, checked byte by byte.
    for query in ["", "?length"] {
        let req = get(&format!("/download/{size}/7{query}"), "localhost:4096");
        let resp = client::send(&mut sender, req).await?;
        assert_eq!(resp.status(), 200);
        let mut verifier = pattern::Verifier::new(7);
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame?.data_ref() {
                verifier.feed(data)?;
            }
        }
        assert_eq!(verifier.received, size, "download{query}");
    }

    // Uploads: chunked (no length known) and with Content-Length.
    for with_length in [false, true] {
        let body = tests::upstream::pattern_body(size, 11, None);
        let mut req =
            Request::post("/upload/11").header("x-iterate-proxy-target-host", "localhost:4096");
        if with_length {
            req = req.header("content-length", size);
        }
        let resp = client::send(&mut sender, req.body(body)?).await?;
        assert_eq!(
            body_string(resp).await?,
            format!("ok {size}"),
            "upload length={with_length}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_arrive_one_by_one() -> Result<()> {
    let (s, app) = setup_with_app(&[]).await?;
    let (mut sender, _) = client::http1(&s.topo.client, s.addr()).await?;
    let resp = client::send(&mut sender, get("/sse/5", "localhost:4096")).await?;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    for i in 0..5 {
        // The upstream sends event i+1 only after we have seen event i: a proxy that
        // buffered would never deliver it and this would time out.
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("event did not arrive on its own")
            .expect("stream ended")?;
        let data = frame.into_data().unwrap();
        assert_eq!(data, Bytes::from(format!("id: {i}\ndata: event {i}\n\n")));
        app.sse_gate.add_permits(1);
    }
    assert!(body.frame().await.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled_and_client_keep_alive_survives_upstream_close(
) -> Result<()> {
    let (s, app) = setup_with_app(&[]).await?;
    let (mut sender, conn_done) = client::http1(&s.topo.client, s.addr()).await?;
    for _ in 0..20 {
        let resp = client::send(&mut sender, get("/inspect", "localhost:4096")).await?;
        assert_eq!(resp.status(), 200);
        body_string(resp).await?;
    }
    assert_eq!(
        app.connections.load(Ordering::Relaxed),
        1,
        "one pooled upstream connection"
    );

    // The upstream closes its connection after this response: the client's stays open.
    let resp = client::send(&mut sender, get("/close", "localhost:4096")).await?;
    assert!(
        !resp.headers().contains_key("connection"),
        "upstream's Connection: close relayed"
    );
    body_string(resp).await?;
    for _ in 0..3 {
        let resp = client::send(&mut sender, get("/inspect", "localhost:4096")).await?;
        assert_eq!(resp.status(), 200);
        body_string(resp).await?;
    }
    assert!(
        !conn_done.is_finished(),
        "client connection must stay keep-alive"
    );
    assert_eq!(
        app.connections.load(Ordering::Relaxed),
        2,
        "reconnected once, then pooled"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_only_upstream_is_reached_and_proxy_env_is_ignored() -> Result<()> {
    // Proxy variables point at an address where nothing listens: using them would fail.
    let env = [
        ("HTTP_PROXY", "http://10.203.0.1:9"),
        ("http_proxy", "http://10.203.0.1:9"),
        ("ALL_PROXY", "http://10.203.0.1:9"),
        ("HTTPS_PROXY", "http://10.203.0.1:9"),
    ];
    let s = Setup::with_env(&[], &env).await?;
    let _v6 = HttpApp::start(s.topo.machine.listen(v6(5173))?)?;
    let _v4 = HttpApp::start(s.topo.machine.listen(v4(4096))?)?;
    let (mut sender, _) = client::http1(&s.topo.client, s.addr()).await?;
    let resp = client::send(&mut sender, get("/x", "localhost:5173")).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-upstream-family"], "v6");
    body_string(resp).await?;
    let resp = client::send(&mut sender, get("/x", "127.0.0.1:4096")).await?;
    assert_eq!(resp.headers()["x-upstream-family"], "v4");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_502_before_headers_abort_after() -> Result<()> {
    let (s, _app) = setup_with_app(&[]).await?;
    let (status, ct, _, body) = call(&s, get("/", "localhost:4999")).await?;
    assert_eq!(
        (status, ct.as_str(), body.as_str()),
        (502, "application/json", r#"{"error":"proxy_error"}"#)
    );

    let (mut sender, conn_done) = client::http1(&s.topo.client, s.addr()).await?;
    let resp = client::send(&mut sender, get("/abort-after-headers", "localhost:4096")).await?;
    assert_eq!(resp.status(), 200);
    let result = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("client connection left hanging");
    assert!(result.is_err(), "a truncated body must not end as complete");
    tokio::time::timeout(Duration::from_secs(5), conn_done).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_proxy_forms_and_ambiguous_framing_are_refused() -> Result<()> {
    let (s, app) = setup_with_app(&[]).await?;
    let t = format!("X-Iterate-Proxy-Target-Host: localhost:{PORT}\r\n");
    let refused: Vec<(&str, String)> = vec![
        ("absolute-form", format!("GET http://other.example/ HTTP/1.1\r\nHost: other.example\r\n{t}\r\n")),
        ("CONNECT", format!("CONNECT other.example:443 HTTP/1.1\r\nHost: other.example:443\r\n{t}\r\n")),
        ("CL+TE", format!("POST / HTTP/1.1\r\nHost: h\r\n{t}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")),
        ("TE+CL", format!("POST / HTTP/1.1\r\nHost: h\r\n{t}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n")),
        ("two CLs", format!("POST / HTTP/1.1\r\nHost: h\r\n{t}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")),
        ("CL list", format!("POST / HTTP/1.1\r\nHost: h\r\n{t}Content-Length: 5, 6\r\n\r\nhello!")),
        ("obs-fold", format!("GET / HTTP/1.1\r\nHost: h\r\n{t}X-Folded: a\r\n b\r\n\r\n")),
        ("bare CR", format!("GET / HTTP/1.1\r\nHost: h\r\n{t}X-A: a\rb\r\n\r\n")),
        ("TE not chunked", format!("POST / HTTP/1.1\r\nHost: h\r\n{t}Transfer-Encoding: gzip\r\n\r\n")),
    ];
    for (name, raw) in &refused {
        let resp = raw_exchange(&s.topo.client, s.addr(), raw.as_bytes()).await?;
        assert!(resp.starts_with("HTTP/1.1 400"), "{name}: {resp:?}");
    }
    assert_eq!(
        app.connections.load(Ordering::Relaxed),
        0,
        "nothing reached the upstream"
    );

    // A bad chunk size mid-body: 400 and close, never a complete request upstream.
    let raw = format!("POST /upload/1 HTTP/1.1\r\nHost: h\r\n{t}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n");
    let resp = raw_exchange(&s.topo.client, s.addr(), raw.as_bytes()).await?;
    assert!(resp.starts_with("HTTP/1.1 400"), "bad chunk: {resp:?}");
    assert!(
        !resp.contains("ok "),
        "upstream saw a complete body: {resp:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_is_required_compared_and_stripped_and_never_logged() -> Result<()> {
    let secret = "correct-horse-battery-staple";
    let s = Setup::with_env(&[], &[("PROJECT_INGRESS_PROXY_SECRET", secret)]).await?;
    let _app = HttpApp::start(s.topo.machine.listen(v4(PORT))?)?;
    let unauthorized = r#"{"error":"unauthorized"}"#;
    for presented in [None, Some("wrong"), Some("correct-horse-battery-stapl")] {
        let mut req = get("/x", "localhost:4096");
        if let Some(p) = presented {
            req.headers_mut()
                .insert("x-iterate-project-ingress-secret", p.parse()?);
        }
        let (status, ct, _, body) = call(&s, req).await?;
        assert_eq!(
            (status, ct.as_str(), body.as_str()),
            (401, "application/json", unauthorized)
        );
    }
    let mut req = get("/x", "localhost:4096");
    req.headers_mut()
        .insert("x-iterate-project-ingress-secret", secret.parse()?);
    let (status, _, _, seen) = call(&s, req).await?;
    assert_eq!(status, 200);
    assert!(!seen.contains(secret), "secret forwarded: {seen}");
    // Upgrades need it too.
    let (_, head, _) =
        client::upgrade(&s.topo.client, s.addr(), "localhost:4096", "websocket", "").await?;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    // Lines reach the file in batches: wait for the start line, then read everything.
    s.daemon
        .log_containing("project-ingress-proxy started")
        .await?;
    let logs = s.daemon.logs();
    assert!(!logs.contains(secret), "secret in logs");
    let start = logs
        .lines()
        .find(|l| l.contains("project-ingress-proxy started"))
        .expect("start line");
    assert!(
        start.contains("\"secret_auth\":true")
            && start.contains("\"listen\":\"0.0.0.0:8080\"")
            && start.contains("data_path"),
        "{start}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431_and_slow_heads_time_out() -> Result<()> {
    let (s, _app) =
        setup_with_app(&["--max-header-bytes", "16384", "--header-read-timeout", "1s"]).await?;
    let big = "a".repeat(20_000);
    let raw = format!("GET / HTTP/1.1\r\nHost: h\r\nX-Big: {big}\r\nX-Iterate-Proxy-Target-Host: localhost:{PORT}\r\n\r\n");
    let resp = raw_exchange(&s.topo.client, s.addr(), raw.as_bytes()).await?;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:?}");

    // Slowloris: half a head, then nothing. The daemon must close within its timeout.
    let mut stream = s.topo.client.connect(s.addr()).await?;
    tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET / HTTP/1.1\r\nHost: h\r\n").await?;
    let started = Instant::now();
    let _ = client::read_until_close(&mut stream, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "slow head not timed out"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() -> Result<()> {
    let (mut s, app) = setup_with_app(&["--shutdown-grace", "10s"]).await?;
    let (mut sender, _) = client::http1(&s.topo.client, s.addr()).await?;
    let resp = client::send(&mut sender, get("/sse/3", "localhost:4096")).await?;
    let mut body = resp.into_body();
    body.frame().await.unwrap()?;
    s.daemon.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No longer accepting…
    assert!(
        s.topo.client.connect(s.addr()).await.is_err(),
        "still accepting after SIGTERM"
    );
    // …but the in-flight stream completes.
    app.sse_gate.add_permits(2);
    let mut events = 1;
    while let Some(frame) = body.frame().await {
        if frame?.is_data() {
            events += 1;
        }
    }
    assert_eq!(events, 3);
    assert_eq!(s.daemon.wait_exit(Duration::from_secs(5)).await?, Some(0));
    Ok(())
}

/// A connection accepted just before SIGTERM, whose first request arrives just after it,
/// is answered (and closed after the answer), not closed unanswered: its client could
/// not tell that from a failure. (A connection idle after a request is closed at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_a_first_request_on_its_way() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let (mut s, _app) = setup_with_app(&["--shutdown-grace", "10s"]).await?;
    let mut fresh = s.topo.client.connect(s.addr()).await?;
    // Accepted by now; then the daemon stops accepting before the request comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.daemon.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    fresh
        .write_all(
            b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Iterate-Proxy-Target-Host: localhost:4096\r\n\r\n",
        )
        .await?;
    let answer = client::read_until_close(&mut fresh, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert_eq!(s.daemon.wait_exit(Duration::from_secs(5)).await?, Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_request_body_is_echoed_while_it_is_sent() -> Result<()> {
    let (s, _app) = setup_with_app(&[]).await?;
    let (mut sender, _) = client::http1(&s.topo.client, s.addr()).await?;
    // Echo: each chunk sent comes back before the next is sent (no full buffering).
    let (chunk_tx, mut chunk_rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| {
        chunk_rx
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok::<_, std::io::Error>(Frame::data(b))))
    }));
    let req = Request::post("/echo")
        .header("x-iterate-proxy-target-host", "localhost:4096")
        .body(BodyExt::boxed(body))?;
    let pending = tokio::spawn(async move { sender.send_request(req).await });
    chunk_tx.send(Bytes::from_static(b"first")).await?;
    let resp = pending.await??;
    let mut body = resp.into_body();
    for next in ["second", "third"] {
        let got = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await?
            .unwrap()?;
        assert!(got.is_data());
        chunk_tx.send(Bytes::from(next)).await?;
    }
    drop(chunk_tx);
    let rest = body.collect().await?.to_bytes();
    assert!(rest.ends_with(b"third"), "{rest:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connect_timeout_is_502() -> Result<()> {
    let s = Setup::new(&["--upstream-connect-timeout", "1s"]).await?;
    // A listener that never accepts, its accept queue filled: further SYNs are dropped,
    // so connecting hangs until the daemon's timeout.
    let socket = s.topo.machine.tcp_socket(false)?;
    socket.bind(v4(6000))?;
    let _listener = socket.listen(1)?;
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_millis(300), s.topo.machine.connect(v4(6000))).await
        {
            fillers.push(c);
        }
    }
    let started = Instant::now();
    let (status, _, _, body) = call(&s, get("/", "localhost:6000")).await?;
    assert_eq!((status, body.as_str()), (502, r#"{"error":"proxy_error"}"#));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    s.daemon.log_containing("timed out").await?;
    Ok(())
}
