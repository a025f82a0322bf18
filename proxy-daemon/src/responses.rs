//! Responses the proxy makes itself: health and JSON errors.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::body::ProxyBody;

pub fn health() -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from_static(b"OK")));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
    resp
}

/// `{"error":"<code>"}` with Content-Type and Content-Length. `close` adds `Connection:
/// close`, which also makes hyper close the client connection after the response.
pub fn error(status: StatusCode, code: &str, close: bool) -> Response<ProxyBody> {
    let body = format!("{{\"error\":\"{code}\"}}");
    let len = body.len();
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}
