//! What the upstream request head the daemon writes must look like (SPEC §2), checked
//! from the bytes alone with [`crate::fields`].

use crate::fields::{
    self, is_one_of, Head, Parsed, HOP_BY_HOP, REQUEST_ID, SECRET, TARGET_HOST, VIA,
};
use crate::show;

/// Invariants of any head the daemon sends upstream, for the request routed to `port`:
/// one complete head that httparse reads to its last byte, HTTP/1.1, one
/// `Host: localhost:<port>`, one `X-Request-Id`, at most one `X-Iterate-Proxy-Via`, never
/// the target or secret field, never `Content-Length` with `Transfer-Encoding`, no
/// hop-by-hop field except an upgrade's `Connection: Upgrade` + `Upgrade` and a chunked
/// body's `Transfer-Encoding`.
pub fn check_forwarded(out: &[u8], port: u16) -> Result<Head, String> {
    let head = match fields::parse(out) {
        Parsed::Complete(h) if h.len == out.len() => h,
        Parsed::Complete(h) => {
            return Err(format!(
                "the written head ends after {} of {} bytes: {}",
                h.len,
                out.len(),
                show(out)
            ))
        }
        Parsed::Partial => return Err(format!("the written head is incomplete: {}", show(out))),
        Parsed::Error(e) => {
            return Err(format!(
                "the written head does not parse ({e}): {}",
                show(out)
            ))
        }
    };
    let fail = |why: &str| Err(format!("{why}: {}", show(out)));
    if head.version != 1 {
        return fail("not HTTP/1.1");
    }
    if head.has(TARGET_HOST) || head.has(SECRET) {
        return fail("target or secret field forwarded");
    }
    let hosts: Vec<&[u8]> = head.values("host").collect();
    if hosts != [format!("localhost:{port}").as_bytes()] {
        return fail("Host is not exactly one localhost:<port>");
    }
    if head.count(VIA) > 1 {
        return fail("more than one X-Iterate-Proxy-Via");
    }
    if head.count(REQUEST_ID) != 1 {
        return fail("not exactly one X-Request-Id");
    }
    if head.has("content-length") && head.has("transfer-encoding") {
        return fail("Content-Length and Transfer-Encoding");
    }
    let upgrade = head.has("upgrade");
    let connection: Vec<&[u8]> = head.values("connection").collect();
    if upgrade != (connection == [&b"Upgrade"[..]]) {
        return fail("Connection/Upgrade not exactly the upgrade pair");
    }
    if let Some(te) = head.values("transfer-encoding").last() {
        let last = te.rsplit(|&b| b == b',').next().unwrap_or_default();
        if !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return fail("Transfer-Encoding forwarded without chunked last");
        }
    }
    for (name, _) in &head.fields {
        if is_one_of(name, HOP_BY_HOP)
            && !is_one_of(name, &["connection", "upgrade", "transfer-encoding"])
        {
            return fail("hop-by-hop field forwarded");
        }
    }
    Ok(head)
}

/// [`check_forwarded`], and the rewrite of `input` (the client's head, accepted by the
/// daemon) field by field: method and target byte for byte; `X-Iterate-Proxy-Via` is the
/// client's `Host`; the request id is the client's reusable one or `made_id`; framing
/// fields and the upgrade pair as sent; every other field the client sent, in order and
/// byte for byte, except hop-by-hop ones and those its `Connection` names.
pub fn check_rewrite(
    input: &[u8],
    port: u16,
    made_id: Option<&[u8]>,
    out: &[u8],
) -> Result<(), String> {
    let fwd = check_forwarded(out, port)?;
    let Parsed::Complete(inp) = fields::parse(input) else {
        return Err(format!(
            "the daemon accepted a head httparse does not: {}",
            show(input)
        ));
    };
    let fail = |why: String| {
        Err(format!(
            "{why}\n  client: {}\n  upstream: {}",
            show(&input[..inp.len]),
            show(out)
        ))
    };
    if fwd.method != inp.method || fwd.target != inp.target {
        return fail("method or target changed".into());
    }
    let via: Vec<&[u8]> = fwd.values(VIA).collect();
    let hosts: Vec<&[u8]> = inp.values("host").collect();
    if via != hosts {
        return fail("X-Iterate-Proxy-Via is not the client's Host".into());
    }
    let nominated = inp.connection_tokens();
    let is_nominated = |name: &[u8]| nominated.iter().any(|t| t.eq_ignore_ascii_case(name));
    // The request id: the client's, if it sent one reusable id that is not hop-by-hop.
    let client_ids: Vec<&[u8]> = inp.values(REQUEST_ID).collect();
    let reusable =
        |v: &[u8]| (1..=200).contains(&v.len()) && v.iter().all(|b| (0x20..0x7f).contains(b));
    let want_id = match client_ids[..] {
        [id] if reusable(id) && !is_nominated(REQUEST_ID.as_bytes()) => id,
        _ => match made_id {
            Some(id) => id,
            None => {
                return fail(
                    "the daemon made no request id where the client's cannot be kept".into(),
                )
            }
        },
    };
    if fwd.values(REQUEST_ID).next() != Some(want_id) {
        return fail(format!("X-Request-Id is not {}", show(want_id)));
    }
    // Framing fields pass whatever `Connection` says: the body keeps its framing.
    let lengths: Vec<&[u8]> = inp.values("content-length").take(1).collect();
    if fwd.values("content-length").collect::<Vec<_>>() != lengths {
        return fail("Content-Length is not the client's (one line)".into());
    }
    let codings: Vec<&[u8]> = inp.values("transfer-encoding").collect();
    if fwd.values("transfer-encoding").collect::<Vec<_>>() != codings {
        return fail("Transfer-Encoding is not the client's".into());
    }
    let upgrade = inp.version == 1
        && inp.has("upgrade")
        && inp
            .connection_options()
            .iter()
            .any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    let upgrades: Vec<&[u8]> = if upgrade {
        inp.values("upgrade").collect()
    } else {
        vec![]
    };
    if fwd.values("upgrade").collect::<Vec<_>>() != upgrades {
        return fail("Upgrade fields are not the client's upgrade".into());
    }
    // Everything else: the client's fields, minus hop-by-hop and nominated ones.
    let handled = [
        "host",
        TARGET_HOST,
        SECRET,
        VIA,
        REQUEST_ID,
        "content-length",
        "transfer-encoding",
    ];
    let others = |h: &Head, drop_nominated: bool| -> Vec<(Vec<u8>, Vec<u8>)> {
        h.fields
            .iter()
            .filter(|(n, _)| !is_one_of(n, &handled) && !is_one_of(n, HOP_BY_HOP))
            .filter(|(n, _)| !(drop_nominated && is_nominated(n)))
            .cloned()
            .collect()
    };
    if others(&fwd, false) != others(&inp, true) {
        return fail("the end-to-end fields are not the client's, in order, byte for byte".into());
    }
    Ok(())
}
