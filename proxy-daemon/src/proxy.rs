//! The request path, top to bottom: health → request-target checks → framing checks →
//! secret → target port → plain forward or upgrade.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::auth::Secret;
use crate::body::{AccessLog, InboundBody, LoggedBody, ProxyBody};
use crate::headers::{self, REQUEST_ID_HEADER};
use crate::responses;
use crate::target;
use crate::tunnel::Tunnels;
use crate::upgrade;
use crate::upstream::{UpstreamError, Upstreams};

pub struct Proxy {
    pub upstreams: Arc<Upstreams>,
    pub secret: Option<Secret>,
    pub tunnels: Tunnels,
}

impl Proxy {
    /// hyper's service entry point: every request gets exactly one response and one log line.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        ambiguous_framing: bool,
    ) -> Result<Response<LoggedBody>, std::convert::Infallible> {
        let log = AccessLog {
            request_id: String::new(),
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            port: None,
            started: Instant::now(),
        };
        let (response, log) = self.route(request, ambiguous_framing, log).await;
        let (parts, body) = response.into_parts();
        let status = parts.status;
        Ok(Response::from_parts(
            parts,
            LoggedBody::new(body, status, log),
        ))
    }

    async fn route(
        &self,
        mut request: Request<Incoming>,
        ambiguous_framing: bool,
        mut log: AccessLog,
    ) -> (Response<ProxyBody>, AccessLog) {
        if request.uri().path() == "/health" && request.uri().scheme().is_none() {
            return (responses::health(), log);
        }

        let request_id = request_id(request.headers());
        log.request_id = request_id.to_str().unwrap_or_default().to_owned();

        // Not an open proxy: only origin-form (and `*`) request targets.
        if request.method() == Method::CONNECT || request.uri().authority().is_some() {
            let resp =
                responses::error(StatusCode::BAD_REQUEST, "unsupported_request_target", true);
            return (resp, log);
        }
        // Request smuggling guard: hyper refuses most ambiguous framing itself; a request
        // with both Content-Length and Transfer-Encoding (see `framing`) is refused here.
        if ambiguous_framing {
            let resp = responses::error(StatusCode::BAD_REQUEST, "ambiguous_framing", true);
            return (resp, log);
        }

        let is_upgrade = headers::is_upgrade_request(request.headers());
        if let Some(secret) = &self.secret {
            if !secret.admits(request.headers()) {
                let resp = responses::error(StatusCode::UNAUTHORIZED, "unauthorized", is_upgrade);
                return (resp, log);
            }
        }
        let port = match target::target_port(request.headers()) {
            Ok(port) => port,
            Err(e) => {
                let resp = responses::error(StatusCode::BAD_REQUEST, e.code(), is_upgrade);
                return (resp, log);
            }
        };
        log.port = Some(port);

        headers::rewrite_request(request.headers_mut(), port, is_upgrade, &request_id);
        // Upstream connections are always HTTP/1.1 keep-alive, whatever the client spoke.
        *request.version_mut() = Version::HTTP_11;
        let response = if is_upgrade {
            upgrade::proxy(self, port, request, log.request_id.clone()).await
        } else {
            self.forward(port, request).await
        };
        (response, log)
    }

    /// A plain request: streamed to a pooled upstream connection, response streamed back.
    async fn forward(&self, port: u16, request: Request<Incoming>) -> Response<ProxyBody> {
        let (parts, body) = request.into_parts();
        let (body, client_body_failed) = InboundBody::new(body);
        match self
            .upstreams
            .send(port, Request::from_parts(parts, body))
            .await
        {
            Ok(response) => relay_response(response),
            Err(e) if client_body_failed.load(Ordering::Relaxed) => {
                tracing::debug!(port, error = %e, "client request body failed");
                responses::error(StatusCode::BAD_REQUEST, "bad_request_body", true)
            }
            Err(e) => upstream_failed(port, &e),
        }
    }
}

/// Upstream response → client response: hop-by-hop headers dropped, body streamed. An
/// upstream failing mid-body makes the body fail, and hyper aborts the client connection.
pub fn relay_response<B>(response: Response<B>) -> Response<ProxyBody>
where
    B: http_body::Body<Data = bytes::Bytes, Error = hyper::Error> + Send + Sync + 'static,
{
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let (mut parts, body) = response.into_parts();
    // hyper answers HTTP/1.0 clients in kind; an HTTP/1.0 upstream must not cost the
    // client its keep-alive.
    parts.version = Version::HTTP_11;
    headers::rewrite_response(&mut parts.headers, switching);
    Response::from_parts(parts, body.map_err(Into::into).boxed())
}

pub fn upstream_failed(port: u16, error: &UpstreamError) -> Response<ProxyBody> {
    tracing::warn!(port, error = %error, "upstream failed before response headers");
    responses::error(StatusCode::BAD_GATEWAY, "proxy_error", false)
}

/// Reuse the client's `X-Request-Id` when it is sane, or make one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(REQUEST_ID_HEADER)
        .filter(|v| !v.is_empty() && v.len() <= 200 && v.to_str().is_ok())
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::try_from(uuid::Uuid::new_v4().simple().to_string()).expect("hex")
        })
}
