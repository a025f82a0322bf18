//! The framing guard against hyper's own parser: the same connection bytes read by the
//! daemon's codec (heads, then bodies through `BodyProgress`/`Chunked`, request after
//! request) and by hyper's HTTP/1 server agree request by request (`proxy_fuzz::compare`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(why) = proxy_fuzz::compare::check(data) {
        panic!("{why}");
    }
});
