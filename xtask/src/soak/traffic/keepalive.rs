//! Small requests on long-lived keep-alive connections, spread over the steady ports:
//! GETs of 0–16 KiB and POSTs of 0–64 KiB echoed back (half of them chunked).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{http, pause, steady_port};
use crate::soak::record::Kind;
use crate::soak::Env;

pub async fn run(env: Arc<Env>, stop: CancellationToken, id: u64) {
    let mut rng = fastrand::Rng::with_seed(0x6B65_6570 ^ id);
    let mut conn: Option<http::Sender> = None;
    while pause(&stop, env.load.keepalive_gap).await {
        let sender = match &mut conn {
            Some(s) if !s.is_closed() => s,
            _ => match http::open(&env).await {
                Ok((s, _driver)) => conn.insert(s),
                Err(e) => {
                    env.record.fail(Kind::KeepAlive, format!("{e:#}"));
                    continue;
                }
            },
        };
        let port = steady_port(&mut rng);
        let post = rng.u8(..10) < 4;
        let result = if post {
            http::post_echo(sender, port, rng.usize(..=64 << 10), rng.bool()).await
        } else {
            http::get_small(sender, port, rng.usize(..=16 << 10), false).await
        };
        match result {
            Ok(bytes) => env.record.ok(Kind::KeepAlive, u64::from(post), bytes),
            Err(e) => {
                env.record.fail(Kind::KeepAlive, format!("{e:#}"));
                conn = None;
            }
        }
    }
}
