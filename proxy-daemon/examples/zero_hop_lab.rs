//! Zero-hop laboratory: a bare TCP relay (no HTTP) that makes every connection a zero-hop
//! tunnel, to study the kernel's behaviour with real apps before (and apart from) the
//! daemon. Not part of the product.
//!
//! `zero_hop_lab LISTEN APP_PORT [zero-hop|plain] [CGROUP]`: for each client connection
//! on LISTEN, connects to 127.0.0.1:APP_PORT (registered, in zero-hop mode), pairs at once,
//! relays client→app with a plain copy and app→client with zero-hop, and prints one JSON
//! line per connection with the programs' counters.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use proxy_daemon::tunnel::counters::DirectionCounters;
use proxy_daemon::tunnel::handover::PathState;
use proxy_daemon::tunnel::progress::WayProgress;
use proxy_daemon::tunnel::zero_hop::{self, ZeroHop};
use tokio::net::{TcpListener, TcpStream};

async fn copy_one_way(from: &TcpStream, to: &TcpStream, moved: &AtomicU64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        from.readable().await?;
        match from.try_read(&mut buf) {
            Ok(0) => {
                return socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            }
            Ok(mut n) => {
                let mut at = 0;
                while n > 0 {
                    to.writable().await?;
                    match to.try_write(&buf[at..at + n]) {
                        Ok(w) => {
                            at += w;
                            n -= w;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                moved.fetch_add(at as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen = args.get(1).expect("LISTEN").clone();
    let app_port: u16 = args.get(2).expect("APP_PORT").parse()?;
    let mode = args.get(3).cloned().unwrap_or_else(|| "zero-hop".into());
    let listen_port: u16 = listen.rsplit(':').next().unwrap().parse()?;
    let zh = if mode == "zero-hop" {
        let zh = match args.get(4) {
            Some(cg) => ZeroHop::load_at(std::path::Path::new(cg), listen_port)?,
            None => ZeroHop::load(listen_port)?,
        };
        eprintln!(
            "zero-hop loaded, capture attached to {}",
            zh.cgroup().display()
        );
        Some(Arc::new(zh))
    } else {
        None
    };
    let listener = TcpListener::bind(&listen).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (client, _) = listener.accept().await?;
        client.set_nodelay(true)?;
        if let Some(size) = std::env::var("LAB_SNDBUF")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            socket2::SockRef::from(&client).set_send_buffer_size(size)?;
        }
        let zh = zh.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let up = AtomicU64::new(0);
            let down = AtomicU64::new(0);
            // The normal hop's counters and pipe (the daemon keeps them per direction).
            let down_counters = DirectionCounters::default();
            let down_progress = WayProgress::new(PathState::Start, Vec::new(), None);
            let (upstream, mut reg) = match &zh {
                Some(zh) => match zh.connect_registered(app_port).await {
                    Ok((u, r)) => (u, Some(r)),
                    Err(e) => {
                        eprintln!("connect: {e}");
                        return;
                    }
                },
                None => match TcpStream::connect(("127.0.0.1", app_port)).await {
                    Ok(u) => (u, None),
                    Err(e) => {
                        eprintln!("connect: {e}");
                        return;
                    }
                },
            };
            upstream.set_nodelay(true).ok();
            // Pair once the app has answered: its first send shows whether its socket is
            // blocking (a blocking one is left on the plain relay).
            let _ = upstream.readable().await;
            let paired = match &mut reg {
                Some(r) => r.pair(&client, &upstream).map_err(|e| e.to_string()),
                None => Err("plain".into()),
            };
            let result = tokio::try_join!(copy_one_way(&client, &upstream, &up), async {
                if let (Some(r), true) = (&reg, paired.is_ok()) {
                    zero_hop::app_to_client(r, &upstream, &client, &down_counters, &down_progress)
                        .await
                } else {
                    copy_one_way(&upstream, &client, &down).await
                }
            });
            if result.is_err() {
                for s in [&client, &upstream] {
                    let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
                }
            }
            let stats = reg.as_ref().map(|r| (r.captured(), r.stats()));
            println!(
                "{{\"secs\":{:.3},\"result\":\"{:?}\",\"paired\":\"{:?}\",\"up\":{},\"relayed_down\":{},\"stats\":\"{:?}\"}}",
                started.elapsed().as_secs_f64(),
                result.map(|_| ()),
                paired,
                up.load(Ordering::Relaxed),
                down.load(Ordering::Relaxed) + down_counters.snapshot(None, None).splice,
                stats
            );
        });
    }
}
