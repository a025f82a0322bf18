//! Types shared by the eBPF programs (`proxy-ebpf`) and the daemon's loader.
//! `no_std` so the kernel side can use them; `#[repr(C)]` so both sides agree on layout.
#![no_std]
