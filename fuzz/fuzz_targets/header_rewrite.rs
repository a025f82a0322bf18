//! The header rewrite (SPEC §2): any bytes the daemon accepts as a request head are
//! written as an upstream head (`http1::write::upstream_request`, with what the connection
//! loop adds) that httparse reads as one complete head with only the fields the SPEC lets
//! through (`proxy_fuzz::rewrite`). Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_daemon::http1::request::{self, Occurs};
use proxy_daemon::http1::write::{self, UpstreamRequest};
use proxy_fuzz::rewrite::check_rewrite;

/// The id the proxy would make (the connection loop makes 32 hex digits).
const MADE_ID: &[u8] = b"0123456789abcdef0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    // Two bytes of port, then the head.
    let Some((port, buf)) = data.split_first_chunk::<2>() else {
        return;
    };
    let port = u16::from_le_bytes(*port).max(1);
    let Ok(Some(head)) = request::parse(buf, 64 * 1024) else {
        return;
    };
    // As `server::connection` does: the client's id when the parser kept it, else a new one.
    let made_id = match head.request_id {
        Occurs::Once(_) => None,
        _ => Some(MADE_ID),
    };
    let add = UpstreamRequest {
        port,
        new_request_id: made_id,
        upgrade: head.upgrade,
    };
    let mut out = Vec::new();
    write::upstream_request(&mut out, buf, &head, &add);
    if let Err(why) = check_rewrite(buf, port, made_id, &out) {
        panic!("{why}");
    }
});
