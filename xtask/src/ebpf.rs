//! `cargo xtask build-ebpf`: installs the eBPF toolchain when missing (idempotent, quick
//! when already there) and builds `proxy-ebpf` for `bpfel-unknown-none`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output_ok(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin").join(name)
}

/// Installs what the eBPF build needs and is missing.
pub fn install_toolchain() -> anyhow::Result<()> {
    // LLVM 22 development files (bpf-linker links against libLLVM).
    if !Path::new(LLVM_PREFIX).join("lib/libLLVM.so").exists()
        || !Path::new("/usr/include/zstd.h").exists()
    {
        let missing: Vec<&str> = APT_PACKAGES
            .iter()
            .copied()
            .filter(|p| {
                output_ok(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                    .is_none_or(|s| !s.contains("install ok installed"))
            })
            .collect();
        if !missing.is_empty() {
            if output_ok(Command::new("apt-cache").args(["policy", missing[0]]))
                .is_none_or(|s| !s.contains("Candidate:") || s.contains("Candidate: (none)"))
            {
                run(Command::new("apt-get").arg("update"))?;
            }
            run(Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
        }
    }
    // Nightly with rust-src (build-std=core).
    let has_src = output_ok(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_some_and(|s| s.lines().any(|l| l.starts_with("rust-src")));
    if !has_src {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    // bpf-linker built against LLVM 22.
    let linker = cargo_bin("bpf-linker");
    let has_linker = output_ok(Command::new(&linker).arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !has_linker {
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
                "--locked",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX))?;
    }
    Ok(())
}

/// Builds the eBPF object and returns its path (what `proxy-daemon/build.rs` embeds by
/// default; also exported as `PROXY_EBPF_OBJECT` for later cargo runs of this process).
pub fn build_ebpf() -> anyhow::Result<PathBuf> {
    install_toolchain()?;
    let dir = workspace_root().join("proxy-ebpf");
    let linker_dir = cargo_bin("bpf-linker")
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![linker_dir];
    paths.extend(std::env::split_paths(&path));
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&dir)
        .args([
            "+nightly",
            "build",
            "--release",
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
        ])
        .env("PATH", std::env::join_paths(paths)?)
        // Do not inherit the host build's settings (xtask runs under cargo).
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    run(&mut cmd)?;
    let object = dir.join("target/bpfel-unknown-none/release/proxy-ebpf");
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but {} is missing",
            object.display()
        );
    }
    Ok(object)
}
