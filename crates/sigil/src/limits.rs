//! Connection and time limits for the HTTP and HTTPS (ACME) listeners:
//! at most `max_connections` open connections per listener (more wait in
//! the kernel's backlog), a request's headers within `idle_timeout` of the
//! connection being ready for them (so idle and trickling connections are
//! closed), a response's bytes taken by the peer with no pause longer than
//! `idle_timeout` (so a peer that stops reading cannot hold a slot either),
//! and every request answered within `request_timeout` (else 503).

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A connection that holds one of its listener's connection permits until
/// it is dropped; it fails when the peer sends nothing at all for
/// `timeout` after it was admitted, or takes nothing of a write for
/// `timeout`.
pub struct Limited<Io> {
    io: Io,
    _permit: OwnedSemaphorePermit,
    timeout: Duration,
    /// Running until the peer sends its first bytes.
    silent: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Running while a write waits for the peer to read.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<Io> Limited<Io> {
    fn new(io: Io, permit: OwnedSemaphorePermit, timeout: Duration) -> Limited<Io> {
        Limited {
            io,
            _permit: permit,
            timeout,
            silent: Some(Box::pin(tokio::time::sleep(timeout))),
            stalled: None,
        }
    }

    /// `r`, or an error once writes have waited `write_timeout` in a row.
    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.timeout;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer took nothing of the response for too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Limited<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let Some(timer) = self.silent.as_mut() else {
            return r;
        };
        match r {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.silent = None;
                r
            }
            Poll::Pending if timer.as_mut().poll(cx).is_ready() => Poll::Ready(Err(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "the peer sent nothing"),
            )),
            r => r,
        }
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Limited<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.bounded(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.bounded(cx, r)
    }

    // Closing TLS writes an alert, which waits on the peer as any write.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.bounded(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.bounded(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A gRPC connection's information (client certificates) is its stream's.
impl<Io: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<Io> {
    type ConnectInfo = Io::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<Io> Limited<Option<Io>> {
    /// The connection, if there was one (else its permit is released).
    pub fn transpose(self) -> Option<Limited<Io>> {
        let Limited {
            io,
            _permit,
            timeout,
            ..
        } = self;
        io.map(|io| Limited::new(io, _permit, timeout))
    }
}

/// Open-connection budget of one listener, and how long its connections'
/// writes may wait for the peer.
#[derive(Debug, Clone)]
pub struct ConnectionLimit(Arc<Semaphore>, Duration);

impl ConnectionLimit {
    /// At most `max` connections at once; one whose peer sends nothing for
    /// `timeout` after it was admitted, or takes nothing of a write for
    /// `timeout`, fails (and ends).
    pub fn new(max: usize, timeout: Duration) -> ConnectionLimit {
        ConnectionLimit(Arc::new(Semaphore::new(max.max(1))), timeout)
    }

    /// Waits for a free slot.
    pub async fn admit<Io>(&self, io_fut: impl Future<Output = Io>) -> Option<Limited<Io>> {
        let permit = self.0.clone().acquire_owned().await.ok()?;
        Some(Limited::new(io_fut.await, permit, self.1))
    }
}

/// A plain TCP listener under a [`ConnectionLimit`], for `axum::serve`.
pub struct LimitedTcp {
    pub listener: tokio::net::TcpListener,
    pub limit: ConnectionLimit,
}

impl axum::serve::Listener for LimitedTcp {
    type Io = Limited<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok(permit) = self.limit.0.clone().acquire_owned().await else {
                return std::future::pending().await;
            };
            match self.listener.accept().await {
                Ok((tcp, addr)) => {
                    let _ = tcp.set_nodelay(true);
                    return (Limited::new(tcp, permit, self.limit.1), addr);
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// Middleware: answers 503 when a request takes longer than `limit`.
pub async fn request_timeout(limit: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(rsp) => rsp,
        Err(_) => {
            tracing::warn!(seconds = limit.as_secs(), "request timed out");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(axum::http::header::RETRY_AFTER, "5")],
                "request timed out; retry\n",
            )
                .into_response()
        }
    }
}

/// The time limits of one listener (`[server]` settings).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How long a request may take once its headers are in (then 503).
    pub request: Duration,
    /// How long a connection may take to send a request's headers, counted
    /// from when it is ready for one: a new connection, or one that answered
    /// its previous request. Silent, idle and trickling connections are
    /// closed after it, so they cannot hold the listener's connection slots.
    pub idle: Duration,
}

/// Largest request head (request line and headers) read: an OCSP GET, the
/// longest legitimate one, is a few KiB.
const MAX_HEAD: usize = 64 * 1024;

/// Serves `app` over HTTP/1.1 on the connections `listener` accepts until
/// `shutdown` completes, then lets the requests in progress finish (for at
/// most the request timeout and the idle timeout together; then the rest
/// are left to the process's exit). Like `axum::serve`, plus the header
/// timeout ([`Timeouts::idle`]), which `axum::serve` leaves off: hyper
/// enforces it only with a timer, and axum gives it none.
pub async fn serve<L>(
    mut listener: L,
    app: axum::Router,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()>,
) where
    L: axum::serve::Listener,
{
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Each connection holds a receiver; `closed()` waits for the last one.
    let (open_tx, open_rx) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, _) = tokio::select! {
            c = listener.accept() => c,
            () = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        let open = open_rx.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeouts.idle)
                .max_buf_size(MAX_HEAD)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::trace!(error = %e, "connection ended");
                        }
                        break;
                    }
                    _ = stop.wait_for(|s| *s), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(open);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_rx);
    if tokio::time::timeout(timeouts.request + timeouts.idle, open_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open after the shutdown grace period; closing them with the process"
        );
    }
}
