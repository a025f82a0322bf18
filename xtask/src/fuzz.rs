//! `cargo xtask fuzz`: the libFuzzer targets of `fuzz/` (docs/fuzzing.md). Installs the
//! nightly toolchain and cargo-fuzz when missing, builds every target (release, debug
//! assertions and overflow checks on), replays `fuzz/regressions/<target>/`, then fuzzes
//! each target in turn from its committed seeds. Everything it writes (build, corpus,
//! crash artifacts, logs) goes under `target/fuzz/`: the tracked tree is never touched.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Every target, in the order they run.
pub const TARGETS: &[&str] = &[
    "target_grammar",
    "header_rewrite",
    "framing_vs_hyper",
    "front_end",
];

/// How long each target runs.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    Seconds(u64),
    /// Until this many inputs were run (the recorded runs of docs/fuzzing.md).
    Runs(u64),
}

pub struct Options {
    pub targets: Vec<String>,
    pub budget: Budget,
    /// A libFuzzer sanitizer for cargo-fuzz (`none`, `address`).
    pub sanitizer: String,
}

/// What one target's run printed at its end.
pub struct Summary {
    pub target: String,
    pub lines: Vec<String>,
}

pub fn run(options: &Options) -> Result<Vec<Summary>> {
    for t in &options.targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("no fuzz target {t:?} (targets: {})", TARGETS.join(", "));
        }
    }
    install()?;
    let root = crate::workspace_root();
    let fuzz = root.join("fuzz");
    let out = root.join("target/fuzz");
    std::fs::create_dir_all(&out)?;
    // The fuzz targets run the daemon without the fast path: an empty eBPF object that
    // exists keeps the daemon's build script from rerunning (and rebuilding) every time.
    let no_ebpf = out.join("no-ebpf.o");
    if !no_ebpf.exists() {
        File::create(&no_ebpf)?;
    }
    crate::run(
        Command::new("cargo")
            .current_dir(&fuzz)
            .args([
                "+nightly",
                "fuzz",
                "build",
                "--sanitizer",
                &options.sanitizer,
            ])
            .arg("--target-dir")
            .arg(&out)
            .env("PROXY_EBPF_OBJECT", &no_ebpf)
            // Not the host build's settings (xtask runs under cargo, on stable).
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET"),
    )
    .context("building the fuzz targets")?;
    let bin_dir = out.join("x86_64-unknown-linux-gnu/release");
    let mut summaries = Vec::new();
    for target in &options.targets {
        summaries.push(run_target(&fuzz, &out, &bin_dir, target, options.budget)?);
    }
    for s in &summaries {
        println!("{}:", s.target);
        for line in &s.lines {
            println!("  {line}");
        }
    }
    Ok(summaries)
}

fn run_target(
    fuzz: &Path,
    out: &Path,
    bin_dir: &Path,
    target: &str,
    budget: Budget,
) -> Result<Summary> {
    let binary = bin_dir.join(target);
    let corpus = out.join("corpus").join(target);
    let artifacts = out.join("artifacts").join(target);
    let logs = out.join("logs");
    for dir in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(dir)?;
    }
    let regressions = fuzz.join("regressions").join(target);
    if regressions.is_dir() {
        // Run each once: inputs too large to mutate, kept for what they pin down.
        crate::run(Command::new(&binary).arg("-runs=0").arg(&regressions))
            .with_context(|| format!("{target}: a regression input failed"))?;
    }
    let dict = if target == "target_grammar" {
        "target.dict"
    } else {
        "http.dict"
    };
    let mut cmd = Command::new("nice");
    cmd.arg("-n19")
        .arg(&binary)
        .arg(match budget {
            Budget::Seconds(s) => format!("-max_total_time={s}"),
            Budget::Runs(n) => format!("-runs={n}"),
        })
        // A hang is a bug (the front end must never hang); 30 s is far beyond any input.
        .arg("-timeout=30")
        .arg("-print_final_stats=1")
        .arg(format!("-dict={}", fuzz.join("dict").join(dict).display()))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // New inputs go to the first directory; the committed seeds are only read.
        .arg(&corpus)
        .arg(fuzz.join("seeds").join(target))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("+ {cmd:?}");
    let log_path = logs.join(format!("{target}.log"));
    let mut log = File::create(&log_path)?;
    let mut child = cmd.spawn().with_context(|| format!("starting {target}"))?;
    // libFuzzer reports on stderr; stdout carries what the target prints.
    let stdout = child.stdout.take().expect("piped");
    let echo = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
        }
    });
    let mut summary = Vec::new();
    for line in BufReader::new(child.stderr.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        writeln!(log, "{line}")?;
        // Progress lines (`#N\tNEW …`) go to the log only, but for the periodic pulse.
        let progress = line.starts_with('#');
        let last =
            line.contains("DONE ") || line.starts_with("Done ") || line.starts_with("stat::");
        if last || (progress && line.contains("pulse ")) {
            eprintln!("{target}: {line}");
        } else if !progress {
            eprintln!("{line}");
        }
        if last {
            summary.push(line);
        }
    }
    let status = child.wait()?;
    let _ = echo.join();
    if !status.success() {
        bail!(
            "fuzz target {target} failed ({status}): see {} and the input saved under {}",
            log_path.display(),
            artifacts.display()
        );
    }
    Ok(Summary {
        target: target.to_string(),
        lines: summary,
    })
}

/// The nightly toolchain and cargo-fuzz, when missing.
fn install() -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !nightly {
        crate::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let cargo_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !cargo_fuzz {
        crate::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}
