//! Body wrappers on the request path: the boxed response body type, a client request body
//! that remembers whether the client broke its framing, and a response body that writes
//! the access-log line when it ends.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// The client's request body on its way upstream. If reading it fails (bad chunk size,
/// client gone) the flag is set, so a failed upstream exchange can be blamed on the client.
pub struct InboundBody {
    inner: Incoming,
    failed: Arc<AtomicBool>,
}

impl InboundBody {
    pub fn new(inner: Incoming) -> (Self, Arc<AtomicBool>) {
        let failed = Arc::new(AtomicBool::new(false));
        (
            InboundBody {
                inner,
                failed: failed.clone(),
            },
            failed,
        )
    }
}

impl Body for InboundBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let result = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Err(_)) = &result {
            self.failed.store(true, Ordering::Relaxed);
        }
        Poll::Ready(result)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What the access-log line says about one request.
pub struct AccessLog {
    pub request_id: String,
    pub method: http::Method,
    /// Path only: queries can carry tokens.
    pub path: String,
    pub port: Option<u16>,
    pub started: Instant,
}

/// The response body as sent to the client; logs the request once, when the body ends,
/// fails or is dropped (client gone).
pub struct LoggedBody {
    inner: ProxyBody,
    log: Option<AccessLog>,
    status: StatusCode,
    bytes: u64,
}

impl LoggedBody {
    pub fn new(inner: ProxyBody, status: StatusCode, log: AccessLog) -> Self {
        LoggedBody {
            inner,
            log: Some(log),
            status,
            bytes: 0,
        }
    }

    fn finish(&mut self, outcome: &'static str) {
        if let Some(log) = self.log.take() {
            tracing::info!(
                request_id = %log.request_id,
                method = %log.method,
                path = %log.path,
                port = log.port,
                status = self.status.as_u16(),
                bytes = self.bytes,
                duration_ms = log.started.elapsed().as_secs_f64() * 1e3,
                outcome,
                "request"
            );
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let result = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &result {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Some(Err(_)) => self.finish("aborted"),
            None => self.finish("complete"),
        }
        Poll::Ready(result)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // A body hyper never polled to the end (HEAD, 204/304, client gone).
        let outcome = if self.inner.is_end_stream() {
            "complete"
        } else {
            "client_gone"
        };
        self.finish(outcome);
    }
}
