//! The gRPC listener: TLS with a certificate from this CA's own intermediate,
//! renewed in place (no restart), client certificates verified against the
//! configured roots, and the `sigil.v1` services behind it.

use crate::config::GrpcConfig;
use crate::tls_cert::{ServerCert, accept_loop, provider};
use anyhow::{Context, Result};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;
use sigil_authority::Authority;
use sigil_core::IssuerInfo;
use sigil_grpc::{CaService, Notifier, ServiceConfig, tokens::TokenVerifier};
use std::sync::Arc;
use std::time::Duration;

/// HTTP/2 streams one gRPC connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// How long a gRPC connection may last before the server asks the client
/// to reconnect (GOAWAY), and how long its open calls then have to finish.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(3600);
const MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(60);
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Everything `serve` needs to run the gRPC listener.
pub struct GrpcListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    service: CaService,
    notifier: Notifier,
    timeout: Duration,
    limit: crate::limits::ConnectionLimit,
    certificate: Arc<crate::tls_cert::ServerCert>,
}

impl GrpcListener {
    /// Binds, issues the listener certificate and starts its renewal task.
    pub async fn start(
        grpc: &GrpcConfig,
        authority: Arc<Authority>,
        roots: &[IssuerInfo],
        tokens: TokenVerifier,
        notifier: Notifier,
        timeout: Duration,
        limit: crate::limits::ConnectionLimit,
    ) -> Result<GrpcListener> {
        let lifetime = sigil_core::lifetime::parse_duration(&grpc.server_cert_lifetime)?;
        let resolver =
            ServerCert::start(authority.clone(), &grpc.server_names, lifetime, "gRPC").await?;

        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store
                .add(CertificateDer::from(r.der.clone()))
                .context("a configured root is not a usable trust anchor")?;
        }
        // Client certificates are optional at the TLS layer (Sign may use a
        // bootstrap token instead); each RPC decides what it requires.
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
            .allow_unauthenticated()
            .build()
            .context("building the client-certificate verifier")?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(resolver.clone());
        tls.alpn_protocols = vec![b"h2".to_vec()];

        let listener = TcpListener::bind(grpc.addr).await.with_context(|| {
            format!("cannot listen on {} (grpc.addr or --grpc-addr)", grpc.addr)
        })?;
        let roots_pem: String = roots
            .iter()
            .map(|r| sigil_authority::pem("CERTIFICATE", &r.der))
            .collect();
        let service = CaService::new(
            authority,
            tokens,
            ServiceConfig {
                roots_pem,
                // In the form client identities take (the trust domain
                // lowercased), so `SPIFFE://Corp.Example/ops` still matches.
                operators: grpc
                    .operators
                    .iter()
                    .map(|o| {
                        sigil_core::SpiffeId::parse(o).map_or_else(|_| o.clone(), |s| s.to_string())
                    })
                    .collect(),
            },
            notifier.clone(),
        );
        Ok(GrpcListener {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            service,
            notifier,
            // A unary call's deadline; a WatchRotation stream is not cut by
            // it (the timeout covers producing the response headers).
            timeout,
            limit,
            certificate: resolver,
        })
    }

    /// Its TLS certificate (renewed in place).
    pub fn certificate(&self) -> Arc<crate::tls_cert::ServerCert> {
        self.certificate.clone()
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<std::net::SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        // Watch streams never finish on their own; ending them lets the
        // graceful shutdown complete.
        let notifier = self.notifier.clone();
        let shutdown = async move {
            shutdown.await;
            notifier.close();
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(128);
        let accept = tokio::spawn(accept_loop(self.listener, self.acceptor, tx, "gRPC"));
        // New connections stop as soon as the shutdown starts.
        let stop_accepting = accept.abort_handle();
        let shutdown = async move {
            shutdown.await;
            stop_accepting.abort();
        };
        // Open connections are bounded like the other listeners'; over the
        // limit, handshaken connections wait here (and then the handshake
        // slots run out, and the accept loop waits).
        let (admitted_tx, admitted_rx) = tokio::sync::mpsc::channel(1);
        let limit = self.limit;
        let gate = tokio::spawn(async move {
            loop {
                let next = limit
                    .admit(async { rx.recv().await.map(|(tls, _peer)| tls) })
                    .await
                    .and_then(crate::limits::Limited::transpose);
                let Some(conn) = next else { return };
                if admitted_tx
                    .send(Ok::<_, std::io::Error>(conn))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let incoming = tokio_stream::wrappers::ReceiverStream::new(admitted_rx);
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .concurrency_limit_per_connection(256)
            // Open streams per connection (tonic would leave them
            // unlimited): a watch stream holds its slot while it lasts,
            // which the concurrency limit above does not count.
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            // Every connection ends after a while (clients reconnect; watch
            // streams resume with what they missed), so connections that
            // stay open doing nothing cannot hold the listener's slots for good.
            .max_connection_age(MAX_CONNECTION_AGE)
            .max_connection_age_grace(MAX_CONNECTION_AGE_GRACE)
            .timeout(self.timeout)
            .layer(crate::request_id::GrpcLayer)
            .add_service(sigil_grpc::reflection_service()?)
            .add_service(sigil_grpc::server(self.service))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        accept.abort();
        gate.abort();
        result.context("gRPC server failed")
    }
}
