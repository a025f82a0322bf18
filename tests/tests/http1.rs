//! The daemon's HTTP/1.1 codec through the real binary: versions, framing conversions,
//! bodiless responses, interim responses, pipelining, broken upstreams and clients that
//! leave. The upstream is a raw app with scripted replies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tests::client::read_until_close;
use tests::recording::{echo_reply, Recorded, RecordingApp, Reply, Then};
use tests::upstream::header_value;
use tests::{v4, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PORT: u16 = 4096;
const T: &str = "X-Iterate-Proxy-Target-Host: localhost:4096";

/// Replies by path: `/chunked`, `/close-delimited`, `/interim`, `/garbage`, `/cl-te`,
/// `/hang`, `/head` (Content-Length without body), `/204`, `/304`; else the echo.
fn scripted(r: &Recorded) -> Reply {
    let path = r.request_line().split(' ').nth(1).unwrap_or("").to_owned();
    let (bytes, then): (&[u8], Then) = match path.as_str() {
        "/chunked" => (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", Then::KeepAlive),
        "/close-delimited" => (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close", Then::Close),
        "/interim" => (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", Then::KeepAlive),
        "/garbage" => (b"this is not HTTP\r\n\r\n", Then::Close),
        "/cl-te" => (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", Then::KeepAlive),
        "/hang" => (b"", Then::Hang),
        "/head" => (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", Then::KeepAlive),
        "/204" => (b"HTTP/1.1 204 No Content\r\n\r\n", Then::KeepAlive),
        "/304" => (b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n", Then::KeepAlive),
        _ => return echo_reply(r),
    };
    Reply {
        bytes: bytes.to_vec(),
        then,
    }
}

async fn setup() -> Result<(Setup, RecordingApp)> {
    let s = Setup::new(&[]).await?;
    let app = RecordingApp::start_with(s.topo.machine.listen(v4(PORT))?, None, Arc::new(scripted));
    Ok((s, app))
}

/// Reads one response (head + body by Content-Length or chunked) from a raw stream.
async fn response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(String, Vec<u8>)> {
    response_to(stream, buf, "GET").await
}

/// The same, for a request of `method` (a response to HEAD has no body).
async fn response_to(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    method: &str,
) -> Result<(String, Vec<u8>)> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(stream, buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let status: u16 = head[9..12].parse()?;
    let mut body = Vec::new();
    if (100..200).contains(&status) || status == 204 || status == 304 || method == "HEAD" {
        return Ok((head, body));
    }
    if let Some(n) = header_value(&head, "content-length") {
        let n: usize = n.parse()?;
        while buf.len() < n {
            fill(stream, buf).await?;
        }
        body = buf.drain(..n).collect();
    } else if header_value(&head, "transfer-encoding").is_some() {
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(stream, buf).await?;
            };
            let size = usize::from_str_radix(std::str::from_utf8(&buf[..line_end])?, 16)?;
            buf.drain(..line_end + 2);
            while buf.len() < size + 2 {
                fill(stream, buf).await?;
            }
            body.extend(buf.drain(..size));
            buf.drain(..2);
            if size == 0 {
                break;
            }
        }
    } else {
        body = std::mem::take(buf);
        body.extend(
            read_until_close(stream, Duration::from_secs(3))
                .await
                .into_bytes(),
        );
    }
    Ok((head, body))
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 8192];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await??;
    anyhow::ensure!(n > 0, "closed; had {:?}", String::from_utf8_lossy(buf));
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// True when the daemon has closed `stream` (EOF within a second).
async fn closed(stream: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_get_what_http10_can_frame() -> Result<()> {
    let (s, _app) = setup().await?;
    // Keep-alive asked for, length known: kept, and said so.
    let mut c = s.topo.client.connect(s.addr()).await?;
    let mut buf = Vec::new();
    c.write_all(format!("GET /a HTTP/1.0\r\nConnection: keep-alive\r\n{T}\r\n\r\n").as_bytes())
        .await?;
    let (head, body) = response(&mut c, &mut buf).await?;
    assert_eq!(
        header_value(&head, "connection").as_deref(),
        Some("keep-alive"),
        "{head}"
    );
    assert_eq!(body, b"GET /a body=0");
    // A chunked body is decoded for it, and the connection ends the body.
    c.write_all(
        format!("GET /chunked HTTP/1.0\r\nConnection: keep-alive\r\n{T}\r\n\r\n").as_bytes(),
    )
    .await?;
    let (head, body) = response(&mut c, &mut buf).await?;
    assert!(header_value(&head, "transfer-encoding").is_none(), "{head}");
    assert_eq!(
        header_value(&head, "connection").as_deref(),
        Some("close"),
        "{head}"
    );
    assert_eq!(body, b"hello world");
    // No keep-alive asked: closed after the response.
    let mut c = s.topo.client.connect(s.addr()).await?;
    c.write_all(format!("GET /b HTTP/1.0\r\n{T}\r\n\r\n").as_bytes())
        .await?;
    let (_, body) = response(&mut c, &mut Vec::new()).await?;
    assert_eq!(body, b"GET /b body=0");
    assert!(closed(&mut c).await);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_is_converted_where_needed_and_keep_alive_survives() -> Result<()> {
    let (s, _app) = setup().await?;
    let mut c = s.topo.client.connect(s.addr()).await?;
    let mut buf = Vec::new();
    // The upstream ends its body by closing: chunk-encoded for this HTTP/1.1 client,
    // whose connection stays open.
    c.write_all(format!("GET /close-delimited HTTP/1.1\r\nHost: h\r\n{T}\r\n\r\n").as_bytes())
        .await?;
    let (head, body) = response(&mut c, &mut buf).await?;
    assert_eq!(
        header_value(&head, "transfer-encoding").as_deref(),
        Some("chunked"),
        "{head}"
    );
    assert_eq!(body, b"until close");
    // Chunked passes through as chunked; Content-Length next to Transfer-Encoding is
    // not relayed.
    c.write_all(format!("GET /cl-te HTTP/1.1\r\nHost: h\r\n{T}\r\n\r\n").as_bytes())
        .await?;
    let (head, body) = response(&mut c, &mut buf).await?;
    assert!(header_value(&head, "content-length").is_none(), "{head}");
    assert_eq!(body, b"abc");
    // HEAD, 204 and 304 have no body whatever their fields say; the connection goes on.
    for (method, path) in [("HEAD", "/head"), ("GET", "/204"), ("GET", "/304")] {
        c.write_all(format!("{method} {path} HTTP/1.1\r\nHost: h\r\n{T}\r\n\r\n").as_bytes())
            .await?;
        let (head, body) = response_to(&mut c, &mut buf, method).await?;
        assert!(body.is_empty(), "{path}: {head}");
        if path == "/head" {
            assert_eq!(
                header_value(&head, "content-length").as_deref(),
                Some("100")
            );
        }
    }
    c.write_all(format!("GET /last HTTP/1.1\r\nHost: h\r\n{T}\r\n\r\n").as_bytes())
        .await?;
    assert_eq!(response(&mut c, &mut buf).await?.1, b"GET /last body=0");
    assert!(
        buf.is_empty(),
        "nothing extra: {:?}",
        String::from_utf8_lossy(&buf)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_responses_and_pipelined_requests_arrive_in_order() -> Result<()> {
    let (s, app) = setup().await?;
    let mut c = s.topo.client.connect(s.addr()).await?;
    let mut buf = Vec::new();
    c.write_all(format!("POST /interim HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n{T}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await?;
    let statuses = [100, 103, 200];
    for want in statuses {
        let (head, _) = response(&mut c, &mut buf).await?;
        assert!(head.starts_with(&format!("HTTP/1.1 {want}")), "{head}");
        if want == 103 {
            assert_eq!(
                header_value(&head, "link").as_deref(),
                Some("</a.css>; rel=preload")
            );
        }
    }
    let expect = app.requests().last().unwrap().clone();
    assert!(
        expect.has_field("expect"),
        "Expect is forwarded: {}",
        expect.head
    );
    // Three requests in one write: three answers, in order.
    let three: String = (0..3)
        .map(|i| format!("GET /p{i} HTTP/1.1\r\nHost: h\r\n{T}\r\n\r\n"))
        .collect();
    c.write_all(three.as_bytes()).await?;
    for i in 0..3 {
        assert_eq!(
            response(&mut c, &mut buf).await?.1,
            format!("GET /p{i} body=0").as_bytes()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_upstreams_and_heads_are_refused_cleanly() -> Result<()> {
    let (s, _app) = setup().await?;
    let mut c = s.topo.client.connect(s.addr()).await?;
    let mut buf = Vec::new();
    c.write_all(format!("GET /garbage HTTP/1.1\r\nHost: h\r\n{T}\r\n\r\n").as_bytes())
        .await?;
    let (head, body) = response(&mut c, &mut buf).await?;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert_eq!(body, br#"{"error":"proxy_error"}"#);
    // The client connection survives a 502.
    c.write_all(format!("GET /ok HTTP/1.1\r\nHost: h\r\n{T}\r\n\r\n").as_bytes())
        .await?;
    assert_eq!(response(&mut c, &mut buf).await?.1, b"GET /ok body=0");
    // Two Host fields: refused (RFC 9112 §3.2), closed.
    let mut c = s.topo.client.connect(s.addr()).await?;
    c.write_all(format!("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n{T}\r\n\r\n").as_bytes())
        .await?;
    let (head, body) = response(&mut c, &mut Vec::new()).await?;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(body, br#"{"error":"bad_request"}"#);
    assert!(closed(&mut c).await);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_frees_the_upstream_it_was_waiting_for() -> Result<()> {
    let (s, app) = setup().await?;
    let mut c = s.topo.client.connect(s.addr()).await?;
    c.write_all(format!("GET /hang HTTP/1.1\r\nHost: h\r\n{T}\r\n\r\n").as_bytes())
        .await?;
    let started = Instant::now();
    while app.requests().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Past the daemon's delay before it watches the client.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c);
    let started = Instant::now();
    while app.closed_by_peer().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the upstream connection is still held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.daemon
        .log_containing(r#""outcome":"client_gone""#)
        .await?;
    Ok(())
}
