//! The same bytes given to hyper's HTTP/1 server (`hyper::server::conn::http1`, default
//! settings but half-close) over an in-memory stream: every request it hands to the service is recorded
//! with its body, read to the end.

use std::cell::RefCell;
use std::convert::Infallible;
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A request hyper accepted (its head; the body may still have failed).
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Vec<u8>,
    /// The request target as hyper's `Uri` prints it.
    pub target: String,
    /// The body's data, or why hyper failed it.
    pub body: Result<Vec<u8>, String>,
}

/// What hyper made of one connection.
#[derive(Debug, Clone)]
pub struct Reading {
    pub requests: Vec<Request>,
    /// How `serve_connection` ended.
    pub end: Result<(), String>,
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
}

pub fn read(input: &[u8]) -> Reading {
    RUNTIME.with(|rt| rt.block_on(serve(input)))
}

async fn serve(input: &[u8]) -> Reading {
    // Large enough that the client side never waits for hyper to read.
    let (mut client, server) = tokio::io::duplex(input.len() + 64 * 1024);
    let requests = Rc::new(RefCell::new(Vec::new()));
    let seen = requests.clone();
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            let (parts, body) = req.into_parts();
            let at = {
                let mut seen = seen.borrow_mut();
                seen.push(Request {
                    method: parts.method.as_str().as_bytes().to_vec(),
                    target: parts.uri.to_string(),
                    body: Err("not read".into()),
                });
                seen.len() - 1
            };
            let body = match body.collect().await {
                Ok(collected) => Ok(collected.to_bytes().to_vec()),
                Err(e) => Err(e.to_string()),
            };
            seen.borrow_mut()[at].body = body;
            Ok::<_, Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
        }
    });
    // The client closes its write side after its last byte: with half-close support hyper
    // still answers what it read (else it drops the request in progress at the EOF).
    let conn = http1::Builder::new()
        .half_close(true)
        .serve_connection(TokioIo::new(server), service);
    let (mut reader, mut writer) = tokio::io::split(&mut client);
    let write = async {
        let _ = writer.write_all(input).await;
        let _ = writer.shutdown().await;
    };
    let drain = async {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink).await;
    };
    let (_, _, end) = tokio::join!(write, drain, async {
        let end = conn.await.map_err(|e| e.to_string());
        end
    });
    let requests = requests.borrow().clone();
    Reading { requests, end }
}
