//! The request filter: decides, from the parsed head alone, whether a request is the
//! proxy's own (`/health`), refused (and with which JSON error), or routed to a local
//! port. Nothing here does I/O; `forward` carries a route out.

use std::str::FromStr;

use arc_swap::ArcSwapOption;

use crate::auth::Secret;
use crate::http1::request::RequestHead;
use crate::http1::Framing;
use crate::target;

/// A request the proxy answers itself with `{"error":"<code>"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    pub code: &'static str,
    /// Close the connection after the answer.
    pub close: bool,
}

impl Refusal {
    pub const fn new(status: u16, reason: &'static str, code: &'static str, close: bool) -> Self {
        Refusal {
            status,
            reason,
            code,
            close,
        }
    }
}

pub const BAD_GATEWAY: Refusal = Refusal::new(502, "Bad Gateway", "proxy_error", false);
pub const OVER_CAPACITY: Refusal = Refusal::new(503, "Service Unavailable", "over_capacity", true);

/// Where a routed request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub port: u16,
    /// An upgrade request (tunnelled on a 101).
    pub upgrade: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Health,
    Refuse(Refusal),
    Forward(Route),
}

/// A set of ports (`--allow-ports 3000,4000-4999`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSet(Vec<(u16, u16)>);

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&port))
    }
}

impl FromStr for PortSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let port = |p: &str| match p.trim().parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{p:?} is not a port (1-65535)")),
            };
            let (lo, hi) = (port(lo)?, port(hi)?);
            if lo > hi {
                return Err(format!("empty range {part:?}"));
            }
            ranges.push((lo, hi));
        }
        if ranges.is_empty() {
            return Err("no ports given".into());
        }
        Ok(PortSet(ranges))
    }
}

pub struct Admission {
    /// Swapped on SIGHUP when `--secret-file` is re-read.
    pub secret: ArcSwapOption<Secret>,
    /// The daemon's own ports (listen, admin): never a target.
    pub own_ports: Vec<u16>,
    /// `--allow-ports`: when set, the only targets allowed.
    pub allowed: Option<PortSet>,
}

impl Admission {
    /// Decides a request from its head (`buf` is the buffer the head was parsed from).
    pub fn decide(&self, head: &RequestHead, buf: &[u8]) -> Decision {
        let target = head.target.of(buf);
        if head.path(buf) == b"/health" && target.starts_with(b"/") {
            return Decision::Health;
        }
        // Error answers close the connection when a body would follow that the proxy
        // does not read, and for upgrade requests (their client expects a tunnel).
        let close = head.upgrade || head.framing != Framing::Empty;
        // Not an open proxy: only origin-form targets (and `*`).
        if head.is_method(buf, b"CONNECT") || !(target.starts_with(b"/") || target == b"*") {
            return Decision::Refuse(Refusal::new(
                400,
                "Bad Request",
                "unsupported_request_target",
                true,
            ));
        }
        if let Some(secret) = &*self.secret.load() {
            if !secret.admits(head.secret, buf) {
                return Decision::Refuse(Refusal::new(401, "Unauthorized", "unauthorized", close));
            }
        }
        let port = match target::target_port(head.target_host, buf) {
            Ok(port) => port,
            Err(e) => return Decision::Refuse(Refusal::new(400, "Bad Request", e.code(), close)),
        };
        let allowed = self.allowed.as_ref().is_none_or(|set| set.contains(port));
        if self.own_ports.contains(&port) || !allowed {
            return Decision::Refuse(Refusal::new(403, "Forbidden", "forbidden_target", close));
        }
        Decision::Forward(Route {
            port,
            upgrade: head.upgrade,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::request;

    fn decide(a: &Admission, raw: &str) -> Decision {
        let head = request::parse(raw.as_bytes(), 65536).unwrap().unwrap();
        a.decide(&head, raw.as_bytes())
    }

    fn code(d: Decision) -> &'static str {
        match d {
            Decision::Refuse(r) => r.code,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn order_of_checks() {
        let a = Admission {
            secret: ArcSwapOption::from_pointee(Secret::new(b"s")),
            own_ports: vec![8080, 9090],
            allowed: Some("3000,4000-4999".parse().unwrap()),
        };
        assert_eq!(
            decide(&a, "POST /health?x=1 HTTP/1.1\r\n\r\n"),
            Decision::Health
        );
        assert_eq!(
            code(decide(&a, "GET /health/ HTTP/1.1\r\n\r\n")),
            "unauthorized"
        );
        assert_eq!(
            code(decide(&a, "GET http://x/ HTTP/1.1\r\n\r\n")),
            "unsupported_request_target"
        );
        assert_eq!(
            code(decide(&a, "CONNECT x:443 HTTP/1.1\r\n\r\n")),
            "unsupported_request_target"
        );
        let t = |v: &str| {
            format!("GET / HTTP/1.1\r\nX-Iterate-Project-Ingress-Secret: s\r\nX-Iterate-Proxy-Target-Host: {v}\r\n\r\n")
        };
        assert_eq!(code(decide(&a, &t("localhost:8080"))), "forbidden_target");
        assert_eq!(code(decide(&a, &t("9090__x"))), "forbidden_target");
        assert_eq!(code(decide(&a, &t("5000__x"))), "forbidden_target");
        assert_eq!(code(decide(&a, &t("x:1"))), "invalid_proxy_target_host");
        assert_eq!(
            decide(&a, &t("4096__x")),
            Decision::Forward(Route {
                port: 4096,
                upgrade: false
            })
        );
        assert_eq!(
            decide(&a, &t("mach.iterate.town")),
            Decision::Forward(Route {
                port: 3000,
                upgrade: false
            })
        );
    }

    #[test]
    fn port_sets() {
        let s: PortSet = " 80, 3000-3005 ,9000".parse().unwrap();
        assert!(s.contains(80) && s.contains(3003) && s.contains(9000));
        assert!(!s.contains(81) && !s.contains(3006));
        for bad in ["", "0", "70000", "5-3", "x"] {
            assert!(bad.parse::<PortSet>().is_err(), "{bad:?}");
        }
    }
}
