//! A request id for every HTTP and gRPC request: taken from a well-formed
//! `x-request-id` header or made here, echoed in the response, attached to
//! every log line written while serving it (a span), and recorded in the
//! audit rows it commits (`detail.request_id`).

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use sigil_authority::with_request_id;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tracing::Instrument;

/// The header carrying it.
pub const HEADER: &str = "x-request-id";

/// A node prefix (random, made once) and a counter: unique across nodes
/// without a random draw per request.
fn fresh() -> String {
    static PREFIX: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = PREFIX.get_or_init(|| {
        sigil_signer::random_serial()
            .map(|s| s.to_hex().chars().take(12).collect())
            .unwrap_or_else(|_| format!("{:012x}", std::process::id()))
    });
    format!("{prefix}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The caller's id when it is short and plain (so it cannot forge log or
/// audit structure), else a new one.
fn id_for(headers: &HeaderMap) -> String {
    headers
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
        .map_or_else(fresh, str::to_string)
}

fn echo(headers: &mut HeaderMap, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        headers.insert(HEADER, v);
    }
}

/// axum middleware for the HTTP and HTTPS (ACME) listeners.
pub async fn http(req: Request, next: Next) -> Response {
    let id = id_for(req.headers());
    let span = tracing::info_span!("http", request_id = %id, method = %req.method(), path = %req.uri().path());
    let mut rsp = with_request_id(id.clone(), next.run(req).instrument(span)).await;
    echo(rsp.headers_mut(), &id);
    rsp
}

/// The same for the gRPC listener, as a tower layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcLayer;

impl<S> tower::Layer<S> for GrpcLayer {
    type Service = GrpcService<S>;
    fn layer(&self, inner: S) -> GrpcService<S> {
        GrpcService { inner }
    }
}

/// See [`GrpcLayer`].
#[derive(Debug, Clone)]
pub struct GrpcService<S> {
    inner: S,
}

impl<S, B, R> tower::Service<axum::http::Request<B>> for GrpcService<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let id = id_for(req.headers());
        let span = tracing::info_span!("grpc", request_id = %id, path = %req.uri().path());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut rsp = with_request_id(id.clone(), fut.instrument(span)).await?;
            echo(rsp.headers_mut(), &id);
            Ok(rsp)
        })
    }
}
