//! The whole front end: arbitrary bytes on a client connection of a real daemon
//! (in-process, `proxy_fuzz::front`). Never a panic or a hang, never a forwarded head with
//! `Content-Length` and `Transfer-Encoding`, the target field or the secret, every
//! forwarded head and body well formed, `/health` answered after every input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    proxy_fuzz::front::get().run(data);
});
