//! Logging: `tracing` for every event, human text on a terminal and JSON for services, all
//! written through per-thread batches by one writer thread (`batch`); the per-request
//! access line is formatted directly (`access`), in the same shape as tracing's lines,
//! without tracing's per-event formatting cost.

pub mod access;
mod batch;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;

pub use batch::{batch_this_thread, dropped_lines, flush, flush_now, stop};

static JSON: AtomicBool = AtomicBool::new(true);

/// Whether lines are JSON (services) or text (a terminal).
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Where the log filter comes from, and the handle that swaps it on SIGHUP.
struct Filter {
    file: Option<PathBuf>,
    handle: reload::Handle<EnvFilter, Registry>,
}

static FILTER: OnceLock<Filter> = OnceLock::new();

/// The filter: the level file's contents, else RUST_LOG, else `info`.
fn read_filter(file: Option<&Path>) -> Result<EnvFilter, String> {
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            EnvFilter::try_new(text.trim()).map_err(|e| format!("{}: {e}", path.display()))
        }
        None => Ok(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))),
    }
}

pub fn init(format: LogFormat, level_file: Option<&Path>) {
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    JSON.store(json, Ordering::Relaxed);
    batch::start();
    let (initial, problem) = match read_filter(level_file) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    let (filter, handle) = reload::Layer::new(initial);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(Batched)
        .with_ansi(false)
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(fmt.json().flatten_event(true)).init();
    } else {
        registry.with(fmt).init();
    }
    let _ = FILTER.set(Filter {
        file: level_file.map(Path::to_path_buf),
        handle,
    });
    if let Some(e) = problem {
        tracing::warn!(error = %e, "log level file unusable: logging at info");
    }
}

/// SIGHUP: reads the log level file again (nothing to do without one).
pub fn reload_level() {
    let Some(filter) = FILTER.get() else { return };
    let Some(file) = &filter.file else {
        tracing::info!("no --log-level-file: log level unchanged");
        return;
    };
    match read_filter(Some(file)) {
        Ok(new) => {
            let shown = new.to_string();
            match filter.handle.reload(new) {
                Ok(()) => tracing::info!(filter = %shown, "log level reloaded"),
                Err(e) => tracing::error!(error = %e, "log level not reloaded"),
            }
        }
        Err(e) => tracing::error!(error = %e, "log level not reloaded: keeping the current one"),
    }
}

/// tracing's writer: each event's bytes go to the thread's batch.
#[derive(Clone, Copy)]
struct Batched;

impl<'a> MakeWriter<'a> for Batched {
    type Writer = BatchedEvent;

    fn make_writer(&'a self) -> BatchedEvent {
        BatchedEvent { urgent: false }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> BatchedEvent {
        BatchedEvent {
            urgent: *meta.level() <= tracing::Level::WARN,
        }
    }
}

/// One event's bytes. Warnings and errors leave at once (they are rare, and an operator
/// watching the log should not wait for a batch to fill).
struct BatchedEvent {
    urgent: bool,
}

impl std::io::Write for BatchedEvent {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        batch::append(|b| b.extend_from_slice(bytes));
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for BatchedEvent {
    fn drop(&mut self) {
        if self.urgent {
            batch::flush_now();
        }
    }
}

/// `2026-11-30T16:07:33.123456Z`, as tracing's formatters write it.
pub(crate) fn timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let two = |out: &mut Vec<u8>, n: u64| {
        out.push(b'0' + (n / 10) as u8);
        out.push(b'0' + (n % 10) as u8);
    };
    out.extend_from_slice(itoa::Buffer::new().format(y).as_bytes());
    out.push(b'-');
    two(out, m);
    out.push(b'-');
    two(out, d);
    out.push(b'T');
    two(out, rem / 3600);
    out.push(b':');
    two(out, rem % 3600 / 60);
    out.push(b':');
    two(out, rem % 60);
    out.push(b'.');
    let micros = since.subsec_micros();
    let digits = itoa::Buffer::new().format(micros).len();
    out.extend(std::iter::repeat_n(b'0', 6 - digits));
    out.extend_from_slice(itoa::Buffer::new().format(micros).as_bytes());
    out.push(b'Z');
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u64, u64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A JSON string (quotes included). Bytes that are not valid UTF-8 become U+FFFD.
pub(crate) fn json_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    // Nearly always plain printable ASCII: one pass, one copy.
    if bytes
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let valid = std::str::from_utf8(bytes).is_ok();
    for &b in bytes {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..=0x1f | 0x7f => {
                out.extend_from_slice(b"\\u00");
                out.push(b"0123456789abcdef"[(b >> 4) as usize]);
                out.push(b"0123456789abcdef"[(b & 0xf) as usize]);
            }
            0x80.. if !valid => out.extend_from_slice("\u{fffd}".as_bytes()),
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// A text-format value: bare when it is a plain token, else quoted like JSON.
pub(crate) fn text_value(out: &mut Vec<u8>, bytes: &[u8]) {
    if !bytes.is_empty()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\' && b != b'=')
    {
        out.extend_from_slice(bytes);
    } else {
        json_string(out, bytes);
    }
}

/// The start of a line: timestamp, level, message (and the opening of the JSON object).
pub(crate) fn line_start(out: &mut Vec<u8>, level: &str, message: &str) {
    if json() {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(out, SystemTime::now());
        out.extend_from_slice(b"\",\"level\":\"");
        out.extend_from_slice(level.as_bytes());
        out.extend_from_slice(b"\",\"message\":");
        json_string(out, message.as_bytes());
    } else {
        timestamp(out, SystemTime::now());
        out.extend_from_slice(format!(" {level:>5} ").as_bytes());
        out.extend_from_slice(message.as_bytes());
    }
}

/// The field separator and key.
pub(crate) fn key(out: &mut Vec<u8>, name: &str) {
    if json() {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
    } else {
        out.push(b' ');
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
    }
}

pub(crate) fn line_end(out: &mut Vec<u8>) {
    if json() {
        out.push(b'}');
    }
    out.push(b'\n');
}

/// A line with numeric fields, written outside tracing (by the log writer itself).
pub(crate) fn format_notice(out: &mut Vec<u8>, level: &str, message: &str, fields: &[(&str, u64)]) {
    line_start(out, level, message);
    for (name, value) in fields {
        key(out, name);
        out.extend_from_slice(itoa::Buffer::new().format(*value).as_bytes());
    }
    line_end(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_match_the_calendar() {
        let mut out = Vec::new();
        timestamp(
            &mut out,
            UNIX_EPOCH + Duration::from_micros(1_796_054_853_000_042),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-11-30T16:07:33.000042Z"
        );
        let mut out = Vec::new();
        timestamp(&mut out, UNIX_EPOCH + Duration::from_secs(951_782_400)); // leap day
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2000-02-29T00:00:00.000000Z"
        );
    }

    #[test]
    fn json_strings_escape() {
        let mut out = Vec::new();
        json_string(&mut out, b"a\"b\\c\n\x7f");
        assert_eq!(out, br#""a\"b\\c\u000a\u007f""#);
        let mut out = Vec::new();
        json_string(&mut out, b"/caf\xc3\xa9/\xff");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\"/caf\u{fffd}\u{fffd}/\u{fffd}\""
        );
        let mut out = Vec::new();
        json_string(&mut out, "/café".as_bytes());
        assert_eq!(String::from_utf8(out).unwrap(), "\"/café\"");
    }
}
