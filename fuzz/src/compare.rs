//! The framing guard held against hyper: the daemon's codec and hyper's server read the
//! same connection bytes; they must agree request by request on everything hyper accepts
//! (method, target, where the body ends, its bytes), except where the daemon is
//! documented to be stricter, and there the daemon must refuse. The daemon must never
//! accept what hyper refuses.

use crate::fields::{self, Parsed};
use crate::hyper_side;
use crate::ours::{self, End};
use crate::show;

/// Chunked-body refusals that are the daemon's documented strictness (hyper accepts
/// these bodies): control bytes or bare LF in extensions and trailers, folded trailers.
const STRICTER_CHUNK_ERRORS: &[&str] = &[
    "control byte in chunk extension",
    "control byte in trailer field",
    "folded trailer field",
];

/// Compares the two readings of `input`.
pub fn check(input: &[u8]) -> Result<(), String> {
    let ours = ours::read(input);
    let hyper = hyper_side::read(input);
    let fail = |why: String| {
        Err(format!(
            "{why}\n  input: {}\n  ours: {:?}\n  hyper: {:?}",
            show(input),
            ours,
            hyper
        ))
    };
    for (i, req) in ours.requests.iter().enumerate() {
        let Some(h) = hyper.requests.get(i) else {
            if hyper_refuses_target(&req.target) {
                return Ok(());
            }
            return fail(format!("request {i}: ours accepted it, hyper refused it"));
        };
        if let Err(why) = same_request(req, h) {
            return fail(format!("request {i}: {why}"));
        }
        match &h.body {
            Ok(body) if *body == req.body => {}
            Ok(_) => return fail(format!("request {i}: the bodies differ")),
            Err(e) => {
                return fail(format!(
                    "request {i}: ours accepted the body, hyper failed it ({e})"
                ))
            }
        }
    }
    let n = ours.requests.len();
    let next = hyper.requests.get(n);
    match &ours.end {
        End::Clean | End::HeadIncomplete => {
            if next.is_some() {
                return fail(format!(
                    "request {n}: hyper accepted a head ours did not see complete"
                ));
            }
        }
        End::Stopped => {
            let last = &ours.requests[n - 1];
            let tunnel = last.upgrade || last.method == b"CONNECT";
            if next.is_some() && !tunnel {
                return fail(format!(
                    "request {n}: hyper read on where ours closes the connection"
                ));
            }
        }
        End::HeadRefused { start, error } => {
            if let Some(h) = next {
                if h.body.is_ok() && !documented_head_refusal(&input[*start..]) {
                    return fail(format!(
                        "request {n}: ours refused the head ({error:?}), hyper accepted it"
                    ));
                }
            }
        }
        End::BodyIncomplete(req) | End::BodyRefused(req, _) => {
            let Some(h) = next else {
                if hyper_refuses_target(&req.target) {
                    return Ok(());
                }
                return fail(format!(
                    "request {n}: ours accepted the head, hyper refused it"
                ));
            };
            if let Err(why) = same_request(req, h) {
                return fail(format!("request {n}: {why}"));
            }
            match (&ours.end, &h.body) {
                (_, Err(_)) => {}
                (End::BodyRefused(_, e), Ok(_))
                    if STRICTER_CHUNK_ERRORS.contains(&e.0)
                        && has_control_byte(&input[req.start + req.head_len..]) => {}
                (End::BodyRefused(_, e), Ok(_)) => {
                    return fail(format!(
                        "request {n}: ours refused the body ({e}), hyper accepted it"
                    ))
                }
                (_, Ok(_)) => {
                    return fail(format!(
                        "request {n}: hyper found the body complete, ours wants more"
                    ))
                }
            }
        }
    }
    Ok(())
}

fn same_request(ours: &ours::Request, hyper: &hyper_side::Request) -> Result<(), String> {
    if ours.method != hyper.method {
        return Err(format!(
            "methods differ: {} and {}",
            show(&ours.method),
            show(&hyper.method)
        ));
    }
    // hyper keeps the target as an `http::Uri`, which drops a fragment and normalises
    // other forms: the same bytes must give the same `Uri`.
    if ours.target.starts_with(b"/") {
        let printed = http::Uri::try_from(ours.target.as_slice()).map(|u| u.to_string());
        if printed.as_ref().ok() != Some(&hyper.target) {
            return Err(format!(
                "targets differ: {} ({printed:?}) and {:?}",
                show(&ours.target),
                hyper.target
            ));
        }
    }
    Ok(())
}

/// A request target hyper refuses because `http::Uri` cannot hold it (characters such as
/// `"`, `{`, `|` or non-ASCII bytes). The daemon forwards the target byte for byte (SPEC
/// §2): a documented leniency that cannot move a message boundary (the target is inside
/// the request line httparse has already delimited).
fn hyper_refuses_target(target: &[u8]) -> bool {
    http::Uri::try_from(target).is_err()
}

/// A control byte other than CR and HTAB, or a LF without a CR before it, in a body
/// (what the stricter chunk refusals are about).
fn has_control_byte(body: &[u8]) -> bool {
    body.iter().enumerate().any(|(i, &b)| match b {
        b'\r' | b'\t' => false,
        b'\n' => i == 0 || body[i - 1] != b'\r',
        _ => b < 0x20 || b == 0x7f,
    })
}

/// A head the daemon refuses and hyper accepts: only the documented cases, checked on
/// the bytes (not on the daemon's reason): `Content-Length` with `Transfer-Encoding`, or
/// more than one `Host`.
fn documented_head_refusal(head: &[u8]) -> bool {
    match fields::parse(head) {
        Parsed::Complete(h) => {
            (h.has("content-length") && h.has("transfer-encoding")) || h.count("host") > 1
        }
        _ => false,
    }
}
