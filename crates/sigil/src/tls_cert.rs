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
/// A client that has sent nothing this long after connecting is dropped,
/// freeing its handshake slot well before [`HANDSHAKE_TIMEOUT`].
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections handshaking at once; more wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 512;
/// Handshakes at once from one client address (an IPv6 /64 counts as one):
/// one client cannot take every slot.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = MAX_HANDSHAKES / 8;

/// Accepts TCP connections and hands completed TLS handshakes to `tx`.
/// Handshakes run off the accept loop (a slow client cannot stall it), at
/// most [`MAX_HANDSHAKES`] at once and [`MAX_HANDSHAKES_PER_ADDRESS`] per
/// client address, each within [`HANDSHAKE_TIMEOUT`] (the first byte within
/// [`FIRST_BYTE_TIMEOUT`]).
pub async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    label: &'static str,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let per_address = Arc::new(PerAddress::new(MAX_HANDSHAKES_PER_ADDRESS));
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
        let Some(slot) = per_address.take(peer.ip()) else {
            tracing::debug!(%peer, listener = label, "too many handshakes from this address; connection closed");
            metrics::counter!("sigil_tls_handshakes_refused_total", "listener" => label, "reason" => "per_address")
                .increment(1);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(FIRST_BYTE_TIMEOUT, tcp.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return,
                Err(_) => {
                    tracing::debug!(%peer, "nothing sent after connecting; connection closed");
                    return;
                }
            }
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    // The slots are kept until the server takes the
                    // connection, so connections waiting for it are bounded.
                    let _ = tx.send((tls, peer)).await;
                    drop((permit, slot));
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// Handshakes in flight per client address.
#[derive(Debug)]
struct PerAddress {
    counts: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    max: usize,
}

/// One handshake's place in [`PerAddress`], given back when dropped.
#[derive(Debug)]
struct AddressSlot {
    table: Arc<PerAddress>,
    key: std::net::IpAddr,
}

impl PerAddress {
    fn new(max: usize) -> PerAddress {
        PerAddress {
            counts: std::sync::Mutex::new(std::collections::HashMap::new()),
            max,
        }
    }

    /// A place for a handshake from `ip`, unless its address has `max`.
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<AddressSlot> {
        let key = address_key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: self.clone(),
            key,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// The address a client is counted under: IPv4 as is (also when mapped
/// into IPv6, or translated by NAT64's well-known prefix 64:ff9b::/96),
/// other IPv6 by its /64, the usual size of one site's network.
fn address_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    const NAT64: u128 = 0x0064_ff9b_0000_0000_0000_0000_0000_0000;
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            if let Some(v4) = v6.to_ipv4_mapped() {
                IpAddr::V4(v4)
            } else if bits >> 32 == NAT64 >> 32 {
                IpAddr::V4(Ipv4Addr::from((bits & 0xffff_ffff) as u32))
            } else {
                IpAddr::V6(Ipv6Addr::from(bits & !((1u128 << 64) - 1)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn each_address_gets_its_share_of_handshakes() {
        let t = Arc::new(PerAddress::new(2));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = t.take(a).unwrap();
        let s2 = t.take(a).unwrap();
        assert!(t.take(a).is_none(), "a third from one address");
        // Mapped into IPv6, the same address.
        assert!(t.take("::ffff:192.0.2.1".parse().unwrap()).is_none());
        let _other = t.take(b).unwrap();
        drop(s1);
        let s3 = t.take(a).unwrap();
        drop((s2, s3));
        assert!(
            !t.counts.lock().unwrap().contains_key(&a),
            "emptied entries go"
        );
        // One IPv6 /64 is one client; the next /64 is another.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let _x = t.take(v6("2001:db8:0:1::1")).unwrap();
        let _y = t.take(v6("2001:db8:0:1:ffff::2")).unwrap();
        assert!(t.take(v6("2001:db8:0:1::3")).is_none());
        assert!(t.take(v6("2001:db8:0:2::1")).is_some());
        // IPv4 clients behind NAT64 are told apart by their IPv4 address.
        let _n1 = t.take(v6("64:ff9b::c000:201")).unwrap();
        let _n2 = t.take(v6("64:ff9b::c000:202")).unwrap();
        assert!(
            t.take(v6("64:ff9b::c000:202")).is_none(),
            "192.0.2.2 twice already"
        );
    }
}
