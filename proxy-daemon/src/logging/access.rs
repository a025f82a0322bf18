//! The access line: one per request, formatted straight into the thread's log batch.

use std::time::Duration;

use super::{batch, json, json_string, key, line_end, line_start, text_value};

/// What one request's line says.
pub struct AccessLine<'a> {
    pub request_id: &'a [u8],
    pub method: &'a [u8],
    /// Path only: queries can carry tokens.
    pub path: &'a [u8],
    pub port: Option<u16>,
    pub status: u16,
    /// Response body bytes sent to the client.
    pub bytes: u64,
    pub duration: Duration,
    /// How the exchange ended (`complete`, `aborted`, `client_gone`, …).
    pub outcome: &'static str,
}

/// Whether access lines are on (`RUST_LOG` at info or finer).
pub fn enabled() -> bool {
    tracing::enabled!(tracing::Level::INFO)
}

pub fn write(line: &AccessLine) {
    if !enabled() {
        return;
    }
    batch::append(|out| format(out, line));
}

fn format(out: &mut Vec<u8>, line: &AccessLine) {
    let string = |out: &mut Vec<u8>, v: &[u8]| {
        if json() {
            json_string(out, v)
        } else {
            text_value(out, v)
        }
    };
    let number =
        |out: &mut Vec<u8>, n: u64| out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    line_start(out, "INFO", "request");
    key(out, "request_id");
    string(out, line.request_id);
    key(out, "method");
    string(out, line.method);
    key(out, "path");
    string(out, line.path);
    if let Some(port) = line.port {
        key(out, "port");
        number(out, port as u64);
    }
    key(out, "status");
    number(out, line.status as u64);
    key(out, "bytes");
    number(out, line.bytes);
    key(out, "duration_ms");
    let micros = line.duration.as_micros() as u64;
    number(out, micros / 1000);
    out.push(b'.');
    let frac = micros % 1000;
    out.push(b'0' + (frac / 100) as u8);
    out.push(b'0' + (frac / 10 % 10) as u8);
    out.push(b'0' + (frac % 10) as u8);
    key(out, "outcome");
    string(out, line.outcome.as_bytes());
    line_end(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_shape() {
        let mut out = Vec::new();
        format(
            &mut out,
            &AccessLine {
                request_id: b"abc",
                method: b"GET",
                path: b"/a\"b",
                port: Some(4096),
                status: 200,
                bytes: 13,
                duration: Duration::from_micros(1_234_567),
                outcome: "complete",
            },
        );
        let line = String::from_utf8(out).unwrap();
        let tail = line.split_once(",\"level\"").unwrap().1;
        assert_eq!(
            tail,
            ":\"INFO\",\"message\":\"request\",\"request_id\":\"abc\",\"method\":\"GET\",\
\"path\":\"/a\\\"b\",\"port\":4096,\"status\":200,\"bytes\":13,\"duration_ms\":1234.567,\
\"outcome\":\"complete\"}\n"
        );
        assert!(line.starts_with("{\"timestamp\":\"20"));
    }
}
