//! Test harness: network namespaces joined by veth, the real daemon binary, upstream apps
//! on the machine's loopback, and clients that check every byte.

pub mod apps;
pub mod bpf;
pub mod client;
pub mod daemon;
pub mod fastpath;
pub mod inspect;
pub mod netns;
pub mod pattern;
pub mod recording;
pub mod stamp;
pub mod upstream;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Result;

pub use daemon::{Daemon, Launch};
pub use netns::Topology;

/// 127.0.0.1:port in `ns`, for an upstream app.
pub fn v4(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// [::1]:port in `ns`, for an upstream app that binds IPv6 loopback only.
pub fn v6(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv6Addr::LOCALHOST, port))
}

/// A topology with the daemon running in it.
pub struct Setup {
    pub daemon: Daemon,
    pub topo: Topology,
}

impl Setup {
    pub async fn new(args: &[&str]) -> Result<Setup> {
        Self::with_env(args, &[]).await
    }

    pub async fn with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Setup> {
        let topo = Topology::new()?;
        let daemon = Daemon::start(&topo, args, env).await?;
        Ok(Setup { daemon, topo })
    }

    /// The daemon with its open-file limit set to `(soft, hard)`.
    pub async fn with_nofile(args: &[&str], soft: u64, hard: u64) -> Result<Setup> {
        let topo = Topology::new()?;
        let daemon = Daemon::start_with_nofile(&topo, args, &[], Some((soft, hard))).await?;
        Ok(Setup { daemon, topo })
    }

    pub fn addr(&self) -> SocketAddr {
        self.daemon.addr
    }

    /// A GET on the daemon's admin interface (its default address), from inside the
    /// machine namespace: (status, body).
    pub async fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        admin_get(&self.topo, path).await
    }
}

/// A GET on the daemon's admin interface (its default address), from inside the machine
/// namespace of `topo`: (status, body).
pub async fn admin_get(topo: &Topology, path: &str) -> Result<(u16, String)> {
    use tokio::io::AsyncWriteExt;
    let mut c = topo.machine.connect(ADMIN.parse()?).await?;
    c.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let answer = client::read_until_close(&mut c, std::time::Duration::from_secs(3)).await;
    let status = answer.get(9..12).unwrap_or("0").parse()?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The daemon's default admin address (loopback of the machine namespace).
pub const ADMIN: &str = "127.0.0.1:9180";

/// The value of a Prometheus metric line that starts with `series` (name and labels).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}
