//! The admin interface, on its own listener (default loopback): `GET /metrics`
//! (Prometheus text), `GET /debug/tunnels` (JSON, one object per live tunnel),
//! `GET /ready` (200 while serving, 503 while draining or handing over), `GET /health`.
//! Served by the main thread with the proxy's own codec; never reachable through the
//! proxy (its port is a forbidden target).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::net::{TcpListener, TcpStream};

use crate::http1::request;
use crate::http1::write::local_response;
use crate::io::{read_some, write_all};

/// Whether the daemon takes new work; `/ready` reports it.
pub static READY: AtomicBool = AtomicBool::new(false);

/// What `/debug/tunnels` lists (set once the tunnel layer is up).
pub trait TunnelList: Send + Sync + 'static {
    /// The live tunnels as a JSON array.
    fn json(&self) -> String;
}

pub async fn serve(listener: TcpListener, tunnels: &'static dyn TunnelList) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(30), connection(stream, tunnels)).await;
        });
    }
}

async fn connection(stream: TcpStream, tunnels: &'static dyn TunnelList) {
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::new();
    loop {
        let head = loop {
            match request::parse(&buf, 16 * 1024) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(_) => return,
            }
            match read_some(&stream, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let get = head.is_method(&buf, b"GET") || head.is_method(&buf, b"HEAD");
        let with_body = !head.is_method(&buf, b"HEAD");
        let path = head.path(&buf).to_vec();
        let keep = head.keep_alive;
        buf.advance(head.len);
        let (status, reason, content_type, body) = match (get, path.as_slice()) {
            (true, b"/metrics") => (
                200,
                "OK",
                "text/plain; version=0.0.4; charset=utf-8",
                crate::metrics::render(),
            ),
            (true, b"/debug/tunnels") => (200, "OK", "application/json", tunnels.json()),
            (true, b"/ready") if READY.load(Ordering::Relaxed) => {
                (200, "OK", "text/plain; charset=utf-8", "ready".into())
            }
            (true, b"/ready") => (
                503,
                "Service Unavailable",
                "text/plain; charset=utf-8",
                "draining".into(),
            ),
            (true, b"/health") => (200, "OK", "text/plain; charset=utf-8", "OK".into()),
            (false, _) => (
                405,
                "Method Not Allowed",
                "application/json",
                r#"{"error":"method_not_allowed"}"#.into(),
            ),
            _ => (
                404,
                "Not Found",
                "application/json",
                r#"{"error":"not_found"}"#.into(),
            ),
        };
        out.clear();
        local_response(
            &mut out,
            status,
            reason,
            content_type,
            body.as_bytes(),
            !keep,
            with_body,
        );
        if write_all(&stream, &out).await.is_err() || !keep {
            return;
        }
    }
}
