//! Accept loop and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::framing::Watched;
use crate::proxy::Proxy;

pub struct ServerSettings {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests and
/// tunnels finish within the grace period, closes what is left and returns.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    settings: ServerSettings,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes)
        .keep_alive(true);
    // hyper-util's GracefulShutdown does not take upgradeable connections: track our own.
    let connections = TaskTracker::new();
    let stop_connections = CancellationToken::new();
    let sweeper = {
        let upstreams = proxy.upstreams.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(15));
            loop {
                tick.tick().await;
                upstreams.sweep_idle();
            }
        })
    };

    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let (stream, framing) = Watched::new(stream, settings.max_header_bytes);
        let service = service_fn(move |request| {
            let ambiguous = framing.next_is_ambiguous();
            proxy.clone().handle(request, ambiguous)
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let stop = stop_connections.clone();
        connections.spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = stop.cancelled() => {
                    // Finish the request in flight, then close instead of keeping alive.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(
        grace_ms = settings.shutdown_grace.as_millis() as u64,
        open_tunnels = proxy.tunnels.open(),
        "shutting down: stopped accepting"
    );

    stop_connections.cancel();
    connections.close();
    let drain = async {
        connections.wait().await;
        proxy.tunnels.wait_idle().await;
    };
    if tokio::time::timeout(settings.shutdown_grace, drain)
        .await
        .is_err()
    {
        tracing::info!(
            open_tunnels = proxy.tunnels.open(),
            "grace period over: closing what is left"
        );
    }
    proxy.tunnels.close_all().await;
    proxy.upstreams.clear();
    sweeper.abort();
}
