//! `X-Iterate-Proxy-Target-Host` (SPEC §2): `target::parse_target` and `target_port` never
//! panic and agree with the reference reading of the grammar in `proxy_fuzz::grammar`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_daemon::http1::request::Occurs;
use proxy_daemon::http1::Span;
use proxy_daemon::target::{self, TargetError};
use proxy_fuzz::grammar::{reference, Verdict};

fn verdict(r: Result<u16, TargetError>) -> Verdict {
    match r {
        Ok(port) => Verdict::Port(port),
        Err(TargetError::Missing) => Verdict::Missing,
        Err(TargetError::Invalid) => Verdict::Invalid,
    }
}

fuzz_target!(|data: &[u8]| {
    // The header value as the daemon receives it: bytes. Values that are not UTF-8 carry
    // obs-text, which the daemon refuses as invalid (no target can contain it).
    let value = Occurs::Once(Span {
        start: 0,
        end: data.len() as u32,
    });
    let from_header = verdict(target::target_port(value, data));
    match std::str::from_utf8(data) {
        Ok(text) => {
            let want = reference(text);
            assert_eq!(verdict(target::parse_target(text)), want, "{text:?}");
            assert_eq!(from_header, want, "{text:?}");
        }
        Err(_) => assert_eq!(from_header, Verdict::Invalid, "{data:?}"),
    }
});
