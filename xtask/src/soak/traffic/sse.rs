//! Server-sent event streams: each event is checked as it arrives, in order, and the
//! stream must end right after the last one. Streams reuse their keep-alive connection
//! (a new one every 10 streams).

use std::sync::Arc;

use ::http::Request;
use anyhow::{bail, ensure, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio_util::sync::CancellationToken;

use super::{bounded, http, pause, steady_port};
use crate::soak::record::Kind;
use crate::soak::wire::{self, path};
use crate::soak::Env;

pub async fn run(env: Arc<Env>, stop: CancellationToken, id: u64) {
    let mut rng = fastrand::Rng::with_seed(0x0053_5345 ^ id);
    let mut conn: Option<http::Sender> = None;
    let mut streams = 0u64;
    while pause(&stop, std::time::Duration::from_millis(rng.u64(5..50))).await {
        streams += 1;
        if streams.is_multiple_of(10) {
            conn = None;
        }
        let sender = match &mut conn {
            Some(s) if !s.is_closed() => s,
            _ => match http::open(&env).await {
                Ok((s, _driver)) => conn.insert(s),
                Err(e) => {
                    env.record.fail(Kind::Sse, format!("{e:#}"));
                    continue;
                }
            },
        };
        let port = steady_port(&mut rng);
        let events = rng.u32(10..=60);
        let interval = rng.u64(10..=50);
        match stream(sender, port, events, interval).await {
            Ok(bytes) => env.record.ok(Kind::Sse, u64::from(events), bytes),
            Err(e) => {
                env.record.fail(Kind::Sse, format!("port {port}: {e:#}"));
                conn = None;
            }
        }
    }
}

/// One stream; returns the bytes checked.
async fn stream(sender: &mut http::Sender, port: u16, events: u32, interval: u64) -> Result<u64> {
    let seed = wire::next_seed();
    let req = Request::get(path::sse(seed, events, interval))
        .header("host", "soak.example")
        .header("accept", "text/event-stream")
        .header("x-iterate-proxy-target-host", wire::target(port))
        .body(Empty::<Bytes>::new().map_err(|e| match e {}).boxed())?;
    let resp = bounded("response head", async {
        sender.ready().await?;
        sender.send_request(req).await.map_err(Into::into)
    })
    .await?;
    ensure!(resp.status() == 200, "status {}", resp.status());
    let content_type = resp.headers().get("content-type").cloned();
    ensure!(
        content_type
            .as_ref()
            .is_some_and(|v| v == "text/event-stream"),
        "content-type {content_type:?}"
    );
    let mut body = resp.into_body();
    let mut pending: Vec<u8> = Vec::new();
    let (mut next, mut bytes) = (0u32, 0u64);
    loop {
        let what = format!("event {next} of {events}");
        let frame = bounded(&what, async { Ok(body.frame().await) }).await?;
        let data = match frame {
            None => break,
            Some(Err(e)) => bail!("body failed after {next} events: {e}"),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            ensure!(
                next < events,
                "an event after the last one: {:?}",
                String::from_utf8_lossy(&event)
            );
            let expected = wire::sse_event(seed, next);
            ensure!(
                event == expected.as_bytes(),
                "event {next} wrong or out of order: got {:?}",
                String::from_utf8_lossy(&event[..event.len().min(80)])
            );
            bytes += event.len() as u64;
            next += 1;
        }
    }
    ensure!(
        next == events && pending.is_empty(),
        "stream ended after {next} of {events} events ({} stray bytes)",
        pending.len()
    );
    Ok(bytes)
}
