//! The gRPC listener: TLS with a certificate from this CA's own intermediate,
//! renewed in place (no restart), client certificates verified against the
//! configured roots, and the `sigil.v1` services behind it.

use crate::config::GrpcConfig;
use anyhow::{Context, Result};
use rcgen::{CertificateParams, KeyPair};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil_authority::{Authority, IssueRequest};
use sigil_core::{IssuerInfo, Profile, Requester};
use sigil_grpc::{CaService, Notifier, ServiceConfig, tokens::TokenVerifier};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The requester name the server uses for its own listener certificate.
pub const SERVER_REQUESTER: &str = "sigil-server";
/// TLS handshakes slower than this are dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listener certificate, swapped in place when renewed.
#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Issues the listener certificate through the normal issuance path (policy
/// and audit included); returns the TLS key with its chain and renewal time.
async fn issue_server_cert(
    authority: &Authority,
    grpc: &GrpcConfig,
    lifetime: Duration,
) -> Result<(Arc<CertifiedKey>, i64)> {
    let key = KeyPair::generate().context("generating the gRPC listener key")?;
    let mut params = CertificateParams::new(grpc.server_names.clone())
        .context("grpc.server_names holds an invalid name")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key)?.der().to_vec();
    let issued = authority
        .issue(IssueRequest {
            csr,
            requester: Requester::Operator(SERVER_REQUESTER.into()),
            profile: Some(Profile::Server),
            lifetime: Some(lifetime),
            token: None,
        })
        .await
        .with_context(|| {
            format!(
                "cannot issue the gRPC listener certificate for {}: the policy must allow requester operator:{SERVER_REQUESTER} these names",
                grpc.server_names.join(", ")
            )
        })?;
    let chain: Vec<CertificateDer<'static>> = issued
        .chain_der
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .context("loading the gRPC listener key")?;
    let renew_at = sigil_grpc::renew_after(
        issued.not_before.unix_timestamp(),
        issued.not_after.unix_timestamp(),
    );
    Ok((Arc::new(CertifiedKey::new(chain, signing)), renew_at))
}

/// Everything `serve` needs to run the gRPC listener.
pub struct GrpcListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    service: CaService,
}

impl GrpcListener {
    /// Binds, issues the listener certificate and starts its renewal task.
    pub async fn start(
        grpc: &GrpcConfig,
        authority: Arc<Authority>,
        roots: &[IssuerInfo],
        tokens: TokenVerifier,
        notifier: Notifier,
    ) -> Result<GrpcListener> {
        let lifetime = sigil_core::lifetime::parse_duration(&grpc.server_cert_lifetime)?;
        let (cert, renew_at) = issue_server_cert(&authority, grpc, lifetime).await?;
        let resolver = Arc::new(Resolver(RwLock::new(cert)));
        tokio::spawn(renew_loop(
            authority.clone(),
            grpc.clone(),
            lifetime,
            resolver.clone(),
            renew_at,
        ));

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
            .with_cert_resolver(resolver);
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
                operators: grpc.operators.clone(),
            },
            notifier,
        );
        Ok(GrpcListener {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            service,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<std::net::SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let (tx, rx) = tokio::sync::mpsc::channel(128);
        let acceptor = self.acceptor;
        let listener = self.listener;
        let accept = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .concurrency_limit_per_connection(256)
            .add_service(sigil_grpc::reflection_service()?)
            .add_service(sigil_grpc::server(self.service))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        accept.abort();
        result.context("gRPC server failed")
    }
}

async fn renew_loop(
    authority: Arc<Authority>,
    grpc: GrpcConfig,
    lifetime: Duration,
    resolver: Arc<Resolver>,
    mut renew_at: i64,
) {
    use sigil_core::Clock as _;
    loop {
        let now = sigil_core::SystemClock.now().unix_timestamp();
        let wait = u64::try_from(renew_at - now).unwrap_or(0);
        tokio::time::sleep(Duration::from_secs(wait)).await;
        match issue_server_cert(&authority, &grpc, lifetime).await {
            Ok((cert, next)) => {
                match resolver.0.write() {
                    Ok(mut g) => *g = cert,
                    Err(p) => *p.into_inner() = cert,
                }
                renew_at = next;
                tracing::info!("renewed the gRPC listener certificate");
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "renewing the gRPC listener certificate failed; retrying in 60 s");
                renew_at = sigil_core::SystemClock.now().unix_timestamp() + 60;
            }
        }
    }
}
