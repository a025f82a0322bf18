//! Requests to the upstream ports that close idle connections, spaced 0.9–1.1 × their
//! idle timer: the daemon's pooled connection is often closed just as a request goes
//! out on it. Every request must still be answered once, bodies included (the daemon
//! expires pooled connections early and retries a request that met a closed one).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{http, pause};
use crate::soak::record::Kind;
use crate::soak::wire::{self, IdleClose};
use crate::soak::Env;

pub async fn run(env: Arc<Env>, stop: CancellationToken, port: u16, id: u64) {
    let idle = match wire::idle_close(port) {
        IdleClose::Silently(d) | IdleClose::Announced(d) => d,
        IdleClose::Never => Duration::from_secs(1),
    };
    let mut rng = fastrand::Rng::with_seed(0x706F_6F6C ^ (u64::from(port) << 8) ^ id);
    let mut conn: Option<http::Sender> = None;
    loop {
        let gap = idle.mul_f64(0.9 + 0.2 * rng.f64());
        if !pause(&stop, gap).await {
            return;
        }
        let sender = match &mut conn {
            Some(s) if !s.is_closed() => s,
            _ => match http::open(&env).await {
                Ok((s, _driver)) => conn.insert(s),
                Err(e) => {
                    env.record.fail(Kind::PoolChurn, format!("{e:#}"));
                    continue;
                }
            },
        };
        let post = rng.bool();
        let result = if post {
            http::post_echo(sender, port, rng.usize(..=16 << 10), rng.bool()).await
        } else {
            http::get_small(sender, port, rng.usize(..=4 << 10), false).await
        };
        match result {
            Ok(bytes) => env.record.ok(Kind::PoolChurn, u64::from(post), bytes),
            Err(e) => {
                env.record.fail(Kind::PoolChurn, format!("{e:#}"));
                conn = None;
            }
        }
    }
}
