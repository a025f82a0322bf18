//! Request smuggling (SPEC §2, issue 10.1): the daemon's parser is the only one that
//! decides where a request ends. Heads with ambiguous framing are refused in every
//! spelling, line ending, split and pipelining, and nothing after them reaches the
//! upstream; innocent requests around them are served. The upstream records every head
//! exactly as it arrived.

use std::time::Duration;

use anyhow::Result;
use futures_util::future::join_all;
use tests::netns::Netns;
use tests::recording::RecordingApp;
use tests::{v4, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 4096;
const T: &str = "X-Iterate-Proxy-Target-Host: localhost:4096";

/// Writes `pieces` one by one (a pause between them, so each arrives in its own read),
/// then reads until the daemon closes or 1.5 s pass. Returns the status codes answered.
async fn statuses(ns: &Netns, addr: std::net::SocketAddr, pieces: &[Vec<u8>]) -> Result<Vec<u16>> {
    let mut stream = ns.connect(addr).await?;
    for p in pieces {
        stream.write_all(p).await?;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(1500), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    Ok(text
        .split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|s| s.get(..3)?.parse().ok())
        .collect())
}

fn smuggled_forwarded(app: &RecordingApp) -> Vec<String> {
    app.requests()
        .iter()
        .filter(|r| {
            r.request_line().contains("smuggled")
                || (r.has_field("content-length") && r.has_field("transfer-encoding"))
        })
        .map(|r| r.head.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lf_only_heads_cannot_hide_or_smuggle_a_request() -> Result<()> {
    let s = Setup::new(&[]).await?;
    let app = RecordingApp::start(s.topo.machine.listen(v4(PORT))?, None);
    // An LF-only request whose body looks like a CRLF head with CL+TE, an innocent
    // request, then a real CL+TE request: the body is a body, the innocent request is
    // served, the CL+TE one refused. Each head written apart from its body.
    let fake =
        "POST /smuggled-fake HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let pieces = vec![
        format!(
            "POST /a HTTP/1.1\nHost: h\n{T}\nContent-Length: {}\n\n",
            fake.len()
        )
        .into_bytes(),
        fake.as_bytes().to_vec(),
        format!("GET /innocent HTTP/1.1\r\nHost: h\r\n{T}\r\n\r\n").into_bytes(),
        format!("POST /smuggled HTTP/1.1\r\nHost: h\r\n{T}\r\nContent-Length: 5\r\n").into_bytes(),
        b"Transfer-Encoding: chunked\r\n\r\n".to_vec(),
        b"0\r\n\r\n".to_vec(),
    ];
    assert_eq!(
        statuses(&s.topo.client, s.addr(), &pieces).await?,
        [200, 200, 400]
    );
    let seen: Vec<String> = app
        .requests()
        .iter()
        .map(|r| r.request_line().to_owned())
        .collect();
    assert_eq!(seen, ["POST /a HTTP/1.1", "GET /innocent HTTP/1.1"]);
    assert_eq!(
        app.requests()[0].body,
        fake.as_bytes(),
        "the body stayed a body"
    );

    // A leading empty line, and `Upgrade` without `Connection: upgrade` (a plain request
    // with a body), keep the connection in step.
    let pieces = vec![
        format!("\r\nGET /after-empty-line HTTP/1.1\r\nHost: h\r\n{T}\r\n\r\n").into_bytes(),
        format!("POST /not-an-upgrade HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n{T}\r\nContent-Length: 4\r\n\r\n").into_bytes(),
        b"abcd".to_vec(),
        format!("POST /smuggled HTTP/1.1\r\nHost: h\r\n{T}\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n").into_bytes(),
    ];
    assert_eq!(
        statuses(&s.topo.client, s.addr(), &pieces).await?,
        [200, 200, 400]
    );
    assert!(
        smuggled_forwarded(&app).is_empty(),
        "{:?}",
        smuggled_forwarded(&app)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_lengths_and_chunk_sizes_close_the_connection() -> Result<()> {
    let s = Setup::new(&[]).await?;
    let app = RecordingApp::start(s.topo.machine.listen(v4(PORT))?, None);
    let after = format!("GET /smuggled-after HTTP/1.1\r\nHost: h\r\n{T}\r\n\r\n").into_bytes();
    // `Content-Length: 5, 5`: refused like hyper does, and the connection closed.
    let pieces = vec![
        format!("POST /x HTTP/1.1\r\nHost: h\r\n{T}\r\nContent-Length: 5, 5\r\n\r\nhello")
            .into_bytes(),
        after.clone(),
    ];
    assert_eq!(statuses(&s.topo.client, s.addr(), &pieces).await?, [400]);
    // A chunk size of 17 hex digits (overflow) and a bare-LF chunk line: the body stops
    // there, the client gets 400, nothing after it is read.
    for bad in ["10000000000000000\r\n", "5\nhello\r\n0\r\n\r\n", "zz\r\n"] {
        let pieces = vec![
            format!("POST /u HTTP/1.1\r\nHost: h\r\n{T}\r\nTransfer-Encoding: chunked\r\n\r\n")
                .into_bytes(),
            bad.as_bytes().to_vec(),
            after.clone(),
        ];
        assert_eq!(
            statuses(&s.topo.client, s.addr(), &pieces).await?,
            [400],
            "{bad:?}"
        );
    }
    // The largest chunk size there is: a size, not a crash.
    let pieces = vec![format!(
        "POST /u HTTP/1.1\r\nHost: h\r\n{T}\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc"
    )
    .into_bytes()];
    statuses(&s.topo.client, s.addr(), &pieces).await?;
    assert_eq!(
        statuses(
            &s.topo.client,
            s.addr(),
            &[b"GET /health HTTP/1.1\r\n\r\n".to_vec()]
        )
        .await?,
        [200],
        "still serving"
    );
    assert!(
        smuggled_forwarded(&app).is_empty(),
        "{:?}",
        smuggled_forwarded(&app)
    );
    Ok(())
}

/// Every spelling of a head carrying both framings, each delivered three ways.
fn cl_te_variants() -> Vec<Vec<Vec<u8>>> {
    let cl_names = ["Content-Length", "content-length", "CONTENT-LENGTH"];
    let te_values = [
        "chunked",
        "Chunked",
        "chunked ",
        "\tchunked",
        "gzip, chunked",
        "chunked, identity",
        "identity",
        "",
    ];
    let endings = [("\r\n", "\r\n"), ("\n", "\n"), ("\n", "\r\n")];
    let mut out = Vec::new();
    let mut n = 0;
    for cl in cl_names {
        for te in te_values {
            for te_first in [false, true] {
                for (line, last) in endings {
                    n += 1;
                    let (a, b) = (format!("{cl}: 5"), format!("Transfer-Encoding: {te}"));
                    let (f1, f2) = if te_first { (b, a) } else { (a, b) };
                    let head = format!(
                        "POST /smuggled-{n} HTTP/1.1{line}Host: h{line}{T}{line}{f1}{line}{f2}{line}{last}"
                    );
                    let body = b"0\r\n\r\nGET /smuggled-tail HTTP/1.1\r\n\r\n".to_vec();
                    // Alone, head and body in separate writes.
                    out.push(vec![head.clone().into_bytes(), body.clone()]);
                    // Pipelined behind an LF-only request, in one write.
                    let mut one = format!("GET /lf HTTP/1.1\nHost: h\n{T}\n\n").into_bytes();
                    one.extend_from_slice(head.as_bytes());
                    one.extend_from_slice(&body);
                    out.push(vec![one]);
                    // Behind a CRLF request whose body looks like the head.
                    let mut hidden = format!(
                        "POST /carrier HTTP/1.1\r\nHost: h\r\n{T}\r\nContent-Length: {}\r\n\r\n",
                        head.len()
                    )
                    .into_bytes();
                    hidden.extend_from_slice(head.as_bytes());
                    out.push(vec![hidden, head.into_bytes(), body]);
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spelling_of_content_length_with_transfer_encoding_reaches_the_upstream() -> Result<()> {
    let s = Setup::new(&[]).await?;
    let app = RecordingApp::start(s.topo.machine.listen(v4(PORT))?, None);
    let variants = cl_te_variants();
    assert_eq!(variants.len(), 432);
    for batch in variants.chunks(48) {
        let results = join_all(
            batch
                .iter()
                .map(|pieces| statuses(&s.topo.client, s.addr(), pieces)),
        )
        .await;
        for (pieces, r) in batch.iter().zip(results) {
            let got = r?;
            // Whatever came before it was served; the ambiguous head itself got 400.
            assert_eq!(
                got.last(),
                Some(&400),
                "{:?}: {got:?}",
                String::from_utf8_lossy(&pieces.concat())
            );
            assert!(got[..got.len() - 1].iter().all(|&c| c == 200), "{got:?}");
        }
    }
    assert!(
        smuggled_forwarded(&app).is_empty(),
        "{:?}",
        smuggled_forwarded(&app)
    );
    // The carriers and LF-only requests in front were served.
    assert_eq!(app.requests().len(), 2 * 432 / 3);
    Ok(())
}
