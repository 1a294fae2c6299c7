//! What Sigil's own TLS listeners (gRPC, HTTPS/ACME) share: their certificate,
//! issued by this CA's intermediate through the normal issuance path (policy
//! and audit included) and renewed in place with no restart, and the accept
//! loop that completes TLS handshakes off the accept path.

use anyhow::{Context, Result};
use rcgen::{CertificateParams, KeyPair};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil_authority::{Authority, IssueRequest};
use sigil_core::{Profile, Requester};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The requester name the server uses for its own listener certificates.
pub const SERVER_REQUESTER: &str = "sigil-server";

/// The rustls provider used by every listener.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A listener certificate, swapped in place when renewed.
#[derive(Debug)]
pub struct ServerCert {
    current: RwLock<Arc<CertifiedKey>>,
    /// The current certificate's notAfter (unix s).
    not_after: std::sync::atomic::AtomicI64,
    /// Which listener it serves ("gRPC", "HTTPS").
    label: &'static str,
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        })
    }
}

impl ServerCert {
    /// Issues the first certificate for `names` and starts its renewal task
    /// (at 2/3 of the lifetime; retried every minute on failure).
    pub async fn start(
        authority: Arc<Authority>,
        names: &[String],
        lifetime: Duration,
        label: &'static str,
    ) -> Result<Arc<ServerCert>> {
        let (cert, renew_at, not_after) = issue(&authority, names, lifetime, label).await?;
        let me = Arc::new(ServerCert {
            current: RwLock::new(cert),
            not_after: std::sync::atomic::AtomicI64::new(not_after),
            label,
        });
        tokio::spawn(renew_loop(
            authority,
            names.to_vec(),
            lifetime,
            label,
            me.clone(),
            renew_at,
        ));
        Ok(me)
    }

    fn set(&self, cert: Arc<CertifiedKey>, not_after: i64) {
        match self.current.write() {
            Ok(mut g) => *g = cert,
            Err(p) => *p.into_inner() = cert,
        }
        self.not_after
            .store(not_after, std::sync::atomic::Ordering::Relaxed);
    }

    /// The listener it serves ("gRPC", "HTTPS").
    pub fn label(&self) -> &'static str {
        self.label
    }

    /// The current certificate's notAfter (unix s): watched by /metrics and
    /// /readyz, since a renewal that keeps failing is otherwise only logged.
    pub fn not_after(&self) -> i64 {
        self.not_after.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Issues a listener certificate; returns the TLS key with its chain, the
/// renewal time and its notAfter (unix s).
async fn issue(
    authority: &Authority,
    names: &[String],
    lifetime: Duration,
    label: &str,
) -> Result<(Arc<CertifiedKey>, i64, i64)> {
    let key =
        KeyPair::generate().with_context(|| format!("generating the {label} listener key"))?;
    let mut params = CertificateParams::new(names.to_vec())
        .with_context(|| format!("the {label} listener's server_names hold an invalid name"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key)?.der().to_vec();
    let issued = authority
        .issue(IssueRequest {
            csr: csr.into(),
            requester: Requester::Operator(SERVER_REQUESTER.into()),
            profile: Some(Profile::Server),
            lifetime: Some(lifetime),
            token: None,
            not_before: None,
            completes: None,
        })
        .await
        .with_context(|| {
            format!(
                "cannot issue the {label} listener certificate for {}: the policy must allow requester operator:{SERVER_REQUESTER} these names",
                names.join(", ")
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
        .with_context(|| format!("loading the {label} listener key"))?;
    let renew_at = sigil_grpc::renew_after(
        issued.not_before.unix_timestamp(),
        issued.not_after.unix_timestamp(),
    );
    Ok((
        Arc::new(CertifiedKey::new(chain, signing)),
        renew_at,
        issued.not_after.unix_timestamp(),
    ))
}

async fn renew_loop(
    authority: Arc<Authority>,
    names: Vec<String>,
    lifetime: Duration,
    label: &'static str,
    cert: Arc<ServerCert>,
    mut renew_at: i64,
) {
    loop {
        let now = authority.now().unix_timestamp();
        let wait = u64::try_from(renew_at - now).unwrap_or(0);
        tokio::time::sleep(Duration::from_secs(wait)).await;
        match issue(&authority, &names, lifetime, label).await {
            Ok((next, at, not_after)) => {
                cert.set(next, not_after);
                renew_at = at;
                tracing::info!("renewed the {label} listener certificate");
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "renewing the {label} listener certificate failed; retrying in 60 s");
                renew_at = authority.now().unix_timestamp() + 60;
            }
        }
    }
}

/// TLS handshakes slower than this are dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections handshaking at once; more wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 512;

/// Accepts TCP connections and hands completed TLS handshakes to `tx`.
/// Handshakes run off the accept loop (a slow client cannot stall it), at
/// most [`MAX_HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`].
pub async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    label: &'static str,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, listener = label, "accept failed");
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
                    // The slot is kept until the server takes the
                    // connection, so connections waiting for it are bounded.
                    let _ = tx.send((tls, peer)).await;
                    drop(permit);
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}
