//! Embeds the eBPF object built by `cargo xtask build-ebpf` (or the one named by
//! `PROXY_EBPF_OBJECT`). Without it, an empty file is embedded so the daemon still builds;
//! it then reports at start-up that the fast path is unavailable.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=PROXY_EBPF_OBJECT");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let source = match std::env::var_os("PROXY_EBPF_OBJECT") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => manifest.join("../proxy-ebpf/target/bpfel-unknown-none/release/proxy-ebpf"),
    };
    println!("cargo:rerun-if-changed={}", source.display());
    let bytes = std::fs::read(&source).unwrap_or_default();
    if bytes.is_empty() {
        println!(
            "cargo:warning=eBPF object {} not found: building without the in-kernel fast path (run `cargo xtask build-ebpf`)",
            source.display()
        );
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("proxy-ebpf.o");
    // Rewrite only on change, so an unchanged object does not recompile the daemon.
    if std::fs::read(&out).ok().as_deref() != Some(&bytes[..]) {
        std::fs::write(&out, &bytes).expect("writing the embedded eBPF object");
    }
}
