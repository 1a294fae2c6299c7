//! Connection and time limits for the HTTP and HTTPS (ACME) listeners:
//! at most `max_connections` open connections per listener (more wait in
//! the kernel's backlog), a request's headers within `idle_timeout` of the
//! connection being ready for them (so idle and trickling connections are
//! closed), and every request answered within `request_timeout` (else 503).

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
/// it is dropped.
pub struct Limited<Io> {
    io: Io,
    _permit: OwnedSemaphorePermit,
}

impl<Io: AsyncRead + Unpin> AsyncRead for Limited<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Limited<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<Io> Limited<Option<Io>> {
    /// The connection, if there was one (else its permit is released).
    pub fn transpose(self) -> Option<Limited<Io>> {
        let Limited { io, _permit } = self;
        io.map(|io| Limited { io, _permit })
    }
}

/// Open-connection budget of one listener.
#[derive(Debug, Clone)]
pub struct ConnectionLimit(Arc<Semaphore>);

impl ConnectionLimit {
    /// At most `max` connections at once.
    pub fn new(max: usize) -> ConnectionLimit {
        ConnectionLimit(Arc::new(Semaphore::new(max.max(1))))
    }

    /// Waits for a free slot.
    pub async fn admit<Io>(&self, io_fut: impl Future<Output = Io>) -> Option<Limited<Io>> {
        let permit = self.0.clone().acquire_owned().await.ok()?;
        Some(Limited {
            io: io_fut.await,
            _permit: permit,
        })
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
                    return (
                        Limited {
                            io: tcp,
                            _permit: permit,
                        },
                        addr,
                    );
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

/// Serves `app` over HTTP/1.1 on the connections `listener` accepts until
/// `shutdown` completes, then lets the requests in progress finish. Like
/// `axum::serve`, plus `header_timeout` ([`Timeouts::idle`]), which
/// `axum::serve` leaves off: hyper enforces it only with a timer, and axum
/// gives it none.
pub async fn serve<L>(
    mut listener: L,
    app: axum::Router,
    header_timeout: Duration,
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
                .header_read_timeout(header_timeout)
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
    open_tx.closed().await;
}
