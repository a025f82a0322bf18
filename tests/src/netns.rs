//! Network namespaces joined by veth: a "client" host and a "machine" host, like the
//! edge → machine hop. Namespaces have unique names and are removed on drop (also when a
//! test panics); traffic never leaves them.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;

use anyhow::{bail, Context, Result};

const PREFIX: &str = "ipxt";
static NEXT: AtomicU32 = AtomicU32::new(0);

/// One network namespace, with a worker thread living in it that creates sockets there.
/// A socket belongs to the namespace it was created in, whichever thread uses it later,
/// so the test's own tokio runtime can drive sockets of any namespace.
pub struct Netns {
    pub name: String,
    requests: Option<mpsc::Sender<SocketRequest>>,
    worker: Option<thread::JoinHandle<()>>,
}

struct SocketRequest {
    domain: libc::c_int,
    reply: mpsc::Sender<std::io::Result<OwnedFd>>,
}

pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    pub fn create(name: String) -> Result<Netns> {
        ip(&["netns", "add", &name])?;
        let mut ns = Netns {
            name,
            requests: None,
            worker: None,
        };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        let file = File::open(format!("/var/run/netns/{}", ns.name))?;
        let (tx, rx) = mpsc::channel::<SocketRequest>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let worker = thread::spawn(move || {
            // SAFETY: setns on this thread only; the fd is valid for the call.
            let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == 0;
            let _ = ready_tx.send(entered);
            for req in rx {
                let fd = unsafe {
                    libc::socket(
                        req.domain,
                        libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        0,
                    )
                };
                let result = if fd < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
                };
                let _ = req.reply.send(result);
            }
        });
        ns.requests = Some(tx);
        ns.worker = Some(worker);
        if !ready_rx.recv().unwrap_or(false) {
            bail!("setns into {} failed", ns.name);
        }
        Ok(ns)
    }

    /// A new non-blocking TCP socket in this namespace.
    pub fn tcp_socket(&self, ipv6: bool) -> Result<tokio::net::TcpSocket> {
        let (reply, rx) = mpsc::channel();
        let domain = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
        self.requests
            .as_ref()
            .expect("worker")
            .send(SocketRequest { domain, reply })?;
        let fd = rx.recv()??;
        Ok(tokio::net::TcpSocket::from_std_stream(
            std::net::TcpStream::from(fd),
        ))
    }

    /// Binds a listener in this namespace.
    pub fn listen(&self, addr: SocketAddr) -> Result<tokio::net::TcpListener> {
        let socket = self.tcp_socket(addr.is_ipv6())?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        Ok(socket.listen(1024)?)
    }

    /// Connects from this namespace.
    pub async fn connect(&self, addr: SocketAddr) -> Result<tokio::net::TcpStream> {
        let socket = self.tcp_socket(addr.is_ipv6())?;
        let stream = socket
            .connect(addr)
            .await
            .with_context(|| format!("connect {addr} from {}", self.name))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// `ip netns exec NAME program args…`
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// `nsenter --net=/var/run/netns/NAME program args…`: like [`Netns::command`], but
    /// the program keeps this process's mounts. `ip netns exec` remounts /sys, which
    /// hides the cgroup v2 hierarchy a program may need to attach to (zero-hop).
    pub fn enter(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.name))
            .arg(program);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Client host and machine host joined by a veth pair.
pub struct Topology {
    pub client: Netns,
    pub machine: Netns,
    /// The machine's address as the client sees it.
    pub machine_ip: IpAddr,
}

impl Topology {
    pub fn new() -> Result<Topology> {
        remove_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let client = Netns::create(format!("{PREFIX}{pid}x{n}c"))?;
        let machine = Netns::create(format!("{PREFIX}{pid}x{n}m"))?;
        ip(&[
            "-n",
            &client.name,
            "link",
            "add",
            "veth0",
            "type",
            "veth",
            "peer",
            "name",
            "veth0",
            "netns",
            &machine.name,
        ])?;
        // A private /30 that exists only inside these two namespaces.
        let (client_ip, machine_ip) = ("10.203.0.1", "10.203.0.2");
        ip(&[
            "-n",
            &client.name,
            "addr",
            "add",
            &format!("{client_ip}/30"),
            "dev",
            "veth0",
        ])?;
        ip(&[
            "-n",
            &machine.name,
            "addr",
            "add",
            &format!("{machine_ip}/30"),
            "dev",
            "veth0",
        ])?;
        ip(&["-n", &client.name, "link", "set", "veth0", "up"])?;
        ip(&["-n", &machine.name, "link", "set", "veth0", "up"])?;
        Ok(Topology {
            client,
            machine,
            machine_ip: IpAddr::V4(machine_ip.parse::<Ipv4Addr>()?),
        })
    }
}

/// Removes namespaces left by test processes that no longer exist (a killed run).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: u32 = rest
            .split('x')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if pid != 0 && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}
