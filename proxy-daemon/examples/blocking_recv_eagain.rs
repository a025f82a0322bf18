//! Minimal reproduction of the kernel behaviour that keeps blocking apps off zero-hop:
//! a blocking `recv()` on a TCP socket that sits in a sockmap with an `sk_msg` program
//! returns EAGAIN when a wakeup brings no data.
//!
//! `blocking_recv_eagain [in-map|plain]` (root; the eBPF object built by
//! `cargo xtask build-ebpf`): a loopback pair; the accepted socket A is blocking. One
//! thread blocks in `recv(A)` (nothing will be sent to it until the end), another writes
//! 64 MiB to A while the peer does not read, so it blocks on A's full send buffer; after
//! 1 s the peer reads everything, the writer is woken by write space, and the peer closes.
//! The reader must see EOF (`Ok(0)`). With A in the sockmap (`in-map`, the default) it
//! gets EAGAIN instead: `tcp_bpf_recvmsg()` (net/ipv4/tcp_bpf.c) waits once in
//! `tcp_msg_wait_data()` and returns -EAGAIN when woken without data; the writer's
//! write-space wakeup on the same wait queue is such a wakeup.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use aya::maps::SockHash;
use aya::programs::SkMsg;
use aya::EbpfLoader;

fn main() -> anyhow::Result<()> {
    let in_map = std::env::args().nth(1).as_deref() != Some("plain");
    let object = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../proxy-ebpf/target/bpfel-unknown-none/release/proxy-ebpf"
    );
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut peer = TcpStream::connect(listener.local_addr()?)?;
    let (a, _) = listener.accept()?;

    // Keep the loaded programs and map alive until the end.
    let _ebpf = if in_map {
        let mut ebpf = EbpfLoader::new().load_file(object)?;
        let mut apps: SockHash<_, u32> = SockHash::try_from(ebpf.take_map("ZH_APPS").unwrap())?;
        let prog: &mut SkMsg = ebpf.program_mut("zero_hop_send").unwrap().try_into()?;
        prog.load()?;
        prog.attach(apps.fd())?;
        // The program finds no tunnel for this socket and passes every message: only the
        // socket's membership in the sockmap matters here.
        apps.insert(1u32, a.as_raw_fd(), 0)?;
        Some((ebpf, apps))
    } else {
        None
    };

    let reader = {
        let mut a = a.try_clone()?;
        std::thread::spawn(move || {
            let mut b = [0u8; 64];
            a.read(&mut b)
        })
    };
    let writer = {
        let mut a = a.try_clone()?;
        std::thread::spawn(move || a.write_all(&vec![b'x'; 64 << 20]))
    };
    std::thread::sleep(Duration::from_secs(1));
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    while got < 64 << 20 {
        got += peer.read(&mut buf)?;
    }
    writer.join().unwrap()?;
    std::thread::sleep(Duration::from_millis(200));
    peer.shutdown(std::net::Shutdown::Both)?;
    let result = reader.join().unwrap();
    println!(
        "A {}: the peer read {got} bytes; the blocked recv(A) returned {result:?} (expected Ok(0), EOF)",
        if in_map { "in a sockmap" } else { "plain" }
    );
    Ok(())
}
