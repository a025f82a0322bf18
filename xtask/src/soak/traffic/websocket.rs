//! WebSocket echo sessions: text and binary messages, each compared with what was sent,
//! then the closing handshake.

use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use super::{bounded, connect, pause, steady_port};
use crate::soak::record::Kind;
use crate::soak::wire::{self, path};
use crate::soak::Env;
use tests::pattern;

pub async fn run(env: Arc<Env>, stop: CancellationToken, id: u64) {
    let mut rng = fastrand::Rng::with_seed(0x0077_7300 ^ id);
    while pause(&stop, std::time::Duration::from_millis(rng.u64(10..100))).await {
        let port = steady_port(&mut rng);
        match session(&env, &stop, &mut rng, port).await {
            Ok((messages, bytes)) => env.record.ok(Kind::WebSocket, messages, bytes),
            Err(e) => env
                .record
                .fail(Kind::WebSocket, format!("port {port}: {e:#}")),
        }
    }
}

/// One session; returns the messages and bytes echoed.
async fn session(
    env: &Env,
    stop: &CancellationToken,
    rng: &mut fastrand::Rng,
    port: u16,
) -> Result<(u64, u64)> {
    let stream = connect(env).await?;
    let mut req = format!("ws://soak.example{}", path::WS).into_client_request()?;
    req.headers_mut()
        .insert("x-iterate-proxy-target-host", wire::target(port).parse()?);
    let (mut ws, resp) = bounded("WebSocket handshake", async {
        tokio_tungstenite::client_async(req, stream)
            .await
            .map_err(Into::into)
    })
    .await?;
    ensure!(
        resp.headers()
            .get("x-port")
            .is_some_and(|p| p == &port.to_string()),
        "answered by another port: {:?}",
        resp.headers().get("x-port")
    );
    let count = rng.u64(10..=200);
    let (mut messages, mut bytes) = (0u64, 0u64);
    while messages < count && !stop.is_cancelled() {
        let len = if rng.u8(..10) == 0 {
            rng.usize(2048..=64 << 10)
        } else {
            rng.usize(1..=2048)
        };
        let seed = wire::next_seed();
        let msg = if rng.bool() {
            Message::text(wire::text_payload(seed, len))
        } else {
            Message::binary(pattern::bytes(seed, len))
        };
        bounded("send", async {
            ws.send(msg.clone()).await.map_err(Into::into)
        })
        .await?;
        let back = bounded("echo", async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(m)) => return Ok(m),
                    Some(Err(e)) => bail!("{e}"),
                    None => bail!("connection ended"),
                }
            }
        })
        .await
        .map_err(|e| e.context(format!("message {messages} of {count}")))?;
        ensure!(
            back == msg,
            "message {messages}: echo differs ({len} bytes sent)"
        );
        messages += 1;
        bytes += len as u64;
        tokio::time::sleep(env.load.ws_gap).await;
    }
    // Every echo has arrived: the next frame must be the upstream's Close (or the end).
    bounded("closing handshake", async {
        ws.close(None).await?;
        match ws.next().await {
            Some(Ok(Message::Close(_))) | None | Some(Err(WsError::ConnectionClosed)) => Ok(()),
            Some(Ok(m)) => bail!("a message after the close: {m:?}"),
            Some(Err(e)) => bail!("closing: {e}"),
        }
    })
    .await?;
    Ok((messages, bytes))
}
