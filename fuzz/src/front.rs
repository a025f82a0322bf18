//! The whole front end in-process: two daemons (one without a secret, one with
//! [`SECRET`]) each running one worker (`server::spawn_worker`, as `daemon::run` starts
//! them) on a fixed loopback port, and a recording upstream on `127.0.0.1:4096` and
//! `[::1]:3000` (the default port, reached through the daemon's IPv6 fallback). Everything
//! runs in a private network namespace, so fixed ports cannot collide with anything else
//! on the machine and no traffic leaves it.
//!
//! The upstream checks every head that reaches it ([`rewrite::check_forwarded`]) and
//! every body's framing, and panics on a violation (libFuzzer's panic hook turns that
//! into a crash).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use proxy_daemon::admission::Admission;
use proxy_daemon::auth::Secret;
use proxy_daemon::forward::upstream::ConnectSettings;
use proxy_daemon::forward::{ForwardSettings, Forwarder};
use proxy_daemon::limits::Capacity;
use proxy_daemon::server::{self, Shared};
use proxy_daemon::tunnel::{Relay, Tunnels};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fields::{self, Parsed};
use crate::{rewrite, show};

/// The secured daemon's `PROJECT_INGRESS_PROXY_SECRET`.
pub const SECRET: &str = "fuzz-secret";
/// Where the daemons listen (in the private namespace).
pub const OPEN_PORT: u16 = 8080;
pub const SECURED_PORT: u16 = 8081;
/// The upstream: on IPv4 at this port, and on IPv6 only at the default port 3000.
pub const UPSTREAM_PORT: u16 = 4096;
pub const UPSTREAM_V6_PORT: u16 = 3000;

/// How the upstream answers, chosen per fuzz input (its first byte).
static MODE: AtomicU8 = AtomicU8::new(0);

pub struct FrontEnd {
    runtime: tokio::runtime::Runtime,
    /// A keep-alive connection to each daemon that asks for `/health` after every input.
    health: std::sync::Mutex<[Option<TcpStream>; 2]>,
}

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\n\r\n";
const HEALTHY: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\r\nOK";

static FRONT: OnceLock<FrontEnd> = OnceLock::new();

/// The front end, started on first use.
pub fn get() -> &'static FrontEnd {
    FRONT.get_or_init(FrontEnd::start)
}

impl FrontEnd {
    fn start() -> FrontEnd {
        private_network_namespace();
        let own_ports = vec![OPEN_PORT, SECURED_PORT];
        start_daemon(OPEN_PORT, None, own_ports.clone());
        start_daemon(SECURED_PORT, Some(SECRET), own_ports);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, UPSTREAM_PORT))
                .await
                .expect("upstream listens on 127.0.0.1:4096");
            tokio::spawn(accept(v4, UPSTREAM_PORT));
            match TcpListener::bind((Ipv6Addr::LOCALHOST, UPSTREAM_V6_PORT)).await {
                Ok(v6) => {
                    tokio::spawn(accept(v6, UPSTREAM_V6_PORT));
                }
                Err(e) => eprintln!("front_end: no IPv6 upstream ({e}); port 3000 is refused"),
            }
        });
        FrontEnd {
            runtime,
            health: Default::default(),
        }
    }

    /// One client connection: `input[0]` picks the daemon (bit 7: the secured one) and
    /// how the upstream answers (bits 0-2); the rest is written, then the write side is
    /// closed and everything the daemon sends is read until it closes. Then `/health`
    /// must still be answered (on a keep-alive connection kept across inputs).
    pub fn run(&self, input: &[u8]) {
        let Some((&mode, bytes)) = input.split_first() else {
            return;
        };
        MODE.store(mode & 7, Ordering::Relaxed);
        let port = if mode & 0x80 != 0 {
            SECURED_PORT
        } else {
            OPEN_PORT
        };
        let mut health = self.health.lock().unwrap();
        let health = &mut health[usize::from(port == SECURED_PORT)];
        self.runtime.block_on(async {
            let daemon = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            exchange(daemon, bytes).await;
            let stream = match health {
                Some(s) => s,
                None => health.insert(
                    TcpStream::connect(daemon)
                        .await
                        .expect("the daemon accepts"),
                ),
            };
            let mut answer = vec![0u8; HEALTHY.len()];
            let asked = stream.write_all(HEALTH).await;
            let read = stream.read_exact(&mut answer).await;
            assert!(
                asked.is_ok() && read.is_ok() && answer == HEALTHY,
                "the daemon stopped answering /health: {asked:?} {read:?} {}",
                show(&answer)
            );
        });
    }
}

/// Writes `bytes` (then FIN) while reading the answer; returns what was read before the
/// daemon closed (a reset ends it too).
async fn exchange(daemon: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(daemon)
        .await
        .expect("the daemon accepts");
    let (mut reader, mut writer) = stream.split();
    let mut answer = Vec::new();
    tokio::join!(
        async {
            let _ = writer.write_all(bytes).await;
            let _ = writer.shutdown().await;
        },
        async {
            let _ = reader.read_to_end(&mut answer).await;
        }
    );
    answer
}

fn start_daemon(port: u16, secret: Option<&str>, own_ports: Vec<u16>) {
    let capacity = Capacity::new(1 << 16);
    let max_head = 64 * 1024;
    let shared: &'static Shared = Box::leak(Box::new(Shared {
        admission: Admission {
            secret: secret
                .map(|s| std::sync::Arc::new(Secret::new(s.as_bytes())))
                .into(),
            own_ports,
            allowed: None,
        },
        forwarder: Forwarder {
            settings: ForwardSettings {
                connect: ConnectSettings {
                    timeout: Duration::from_secs(5),
                    keepalive: None,
                },
                idle_timeout: Duration::from_secs(4),
                max_idle_per_port: 64,
                max_response_head: max_head * 4,
            },
            capacity,
            zero_hop: None,
        },
        tunnels: Tunnels::new(Relay::Copy, None),
        capacity,
        max_head,
        max_response_head: max_head * 4,
        header_read_timeout: Duration::from_secs(30),
        keepalive: None,
        connections: TaskTracker::new(),
        stop_accepting: CancellationToken::new(),
        draining: AtomicBool::new(false),
        force_close: CancellationToken::new(),
    }));
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut listeners = server::bind(addr, 1).expect("the daemon binds its port");
    let listener = listeners.pop().expect("one listener");
    // Never cancelled: the daemon lives as long as the fuzz process.
    server::spawn_worker(0, listener, shared, CancellationToken::new()).expect("a worker");
}

/// Moves this thread (and the threads it starts later) into a new network namespace with
/// its loopback up. Needs root (CAP_SYS_ADMIN); without it the fixed ports are used in the
/// current namespace.
fn private_network_namespace() {
    // SAFETY: plain syscalls with valid arguments.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            eprintln!(
                "front_end: no private network namespace ({}); using the machine's loopback",
                std::io::Error::last_os_error()
            );
            return;
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0, "a socket for ioctl");
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        assert_eq!(
            libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr),
            0,
            "reading lo's flags"
        );
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr),
            0,
            "bringing lo up"
        );
        libc::close(fd);
    }
    // Many short connections: a wide ephemeral range (this namespace only).
    let _ = std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65000");
}

/// `FUZZ_VERBOSE=1`: print every head the upstream receives (reproducing an input).
fn verbose() -> bool {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("FUZZ_VERBOSE").is_some_and(|v| v == "1"))
}

async fn accept(listener: TcpListener, port: u16) {
    loop {
        if let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(upstream(stream, port));
        }
    }
}

/// Why the upstream stopped reading a body.
enum BodyEnd {
    /// The daemon closed or reset the connection (a client that went away, a request
    /// refused after its head was forwarded): nothing to check.
    Closed,
    /// Bytes the framing forbids: the daemon forwarded a malformed body.
    Malformed(String),
}

/// One upstream connection: heads checked, bodies read by their framing, answers by mode.
async fn upstream(mut s: TcpStream, port: u16) {
    let mut buf = Vec::new();
    loop {
        let head = loop {
            match fields::parse(&buf) {
                Parsed::Complete(head) => break head,
                Parsed::Partial => {}
                Parsed::Error(e) => panic!(
                    "the daemon forwarded an unparseable head ({e}): {}",
                    show(&buf)
                ),
            }
            if !read_more(&mut s, &mut buf).await {
                return;
            }
        };
        if verbose() {
            eprintln!("upstream {port} got: {}", show(&buf[..head.len]));
        }
        if let Err(why) = rewrite::check_forwarded(&buf[..head.len], port) {
            panic!("the daemon forwarded a bad head: {why}");
        }
        buf.drain(..head.len);
        let mode = MODE.load(Ordering::Relaxed);
        if mode == 7 {
            // Answer before reading the body, then close.
            let _ = s
                .write_all(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
            return;
        }
        match read_body(&mut s, &mut buf, &head).await {
            Ok(()) => {}
            Err(BodyEnd::Closed) => return,
            Err(BodyEnd::Malformed(why)) => panic!("the daemon forwarded a malformed body: {why}"),
        }
        let (answer, body, close): (&[u8], &[u8], bool) = match mode {
            1 => (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"2\r\nok\r\n0\r\n\r\n", false),
            2 => (b"HTTP/1.1 200 OK\r\n\r\n", b"ok", true),
            3 => (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n", b"ok", false),
            4 => (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", b"ok", true),
            5 if head.has("upgrade") => {
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: fuzz\r\n\r\n")
                    .await;
                echo(s, buf).await;
                return;
            }
            6 => (b"HTTP/1.1 204 No Content\r\n\r\n", b"", false),
            _ => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", b"ok", false),
        };
        let mut out = answer.to_vec();
        if head.method != b"HEAD" {
            out.extend_from_slice(body);
        }
        if s.write_all(&out).await.is_err() || close {
            return;
        }
    }
}

/// A tunnel's upstream end: sends back every byte until the client's FIN, then closes.
async fn echo(mut s: TcpStream, first: Vec<u8>) {
    if s.write_all(&first).await.is_err() {
        return;
    }
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown().await;
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match s.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// Reads (and drops) the request body `head` announces; an independent, plain reading
/// of RFC 9112 §6-7 (CRLF line ends, hex sizes, anything in extensions and trailers).
async fn read_body(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    head: &fields::Head,
) -> Result<(), BodyEnd> {
    if head.has("transfer-encoding") {
        loop {
            let line = read_line(s, buf).await?;
            let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
            let (size, rest) = line.split_at(digits);
            if size.is_empty() || !matches!(rest.first(), None | Some(b' ' | b'\t' | b';')) {
                return Err(BodyEnd::Malformed(format!(
                    "chunk size line {}",
                    show(&line)
                )));
            }
            let size = std::str::from_utf8(size).unwrap().trim_start_matches('0');
            if size.len() > 16 {
                return Err(BodyEnd::Malformed(format!("chunk size {size} overflows")));
            }
            let mut left = u64::from_str_radix(size, 16).unwrap_or(0);
            if left == 0 {
                // Trailer fields, then the empty line.
                while !read_line(s, buf).await?.is_empty() {}
                return Ok(());
            }
            while left > 0 {
                if buf.is_empty() && !read_more(s, buf).await {
                    return Err(BodyEnd::Closed);
                }
                let n = (buf.len() as u64).min(left) as usize;
                buf.drain(..n);
                left -= n as u64;
            }
            if !read_line(s, buf).await?.is_empty() {
                return Err(BodyEnd::Malformed("chunk data not followed by CRLF".into()));
            }
        }
    }
    let Some(length) = head.values("content-length").next() else {
        return Ok(());
    };
    let mut left: u64 = std::str::from_utf8(length)
        .ok()
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| BodyEnd::Malformed(format!("Content-Length {}", show(length))))?;
    while left > 0 {
        if buf.is_empty() && !read_more(s, buf).await {
            return Err(BodyEnd::Closed);
        }
        let n = (buf.len() as u64).min(left) as usize;
        buf.drain(..n);
        left -= n as u64;
    }
    Ok(())
}

/// One CRLF-terminated line (without the CRLF); a bare LF is malformed.
async fn read_line(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Vec<u8>, BodyEnd> {
    loop {
        if let Some(lf) = buf.iter().position(|&b| b == b'\n') {
            if lf == 0 || buf[lf - 1] != b'\r' {
                return Err(BodyEnd::Malformed(format!(
                    "bare LF in {}",
                    show(&buf[..=lf])
                )));
            }
            let line = buf[..lf - 1].to_vec();
            buf.drain(..=lf);
            return Ok(line);
        }
        if !read_more(s, buf).await {
            return Err(BodyEnd::Closed);
        }
    }
}
