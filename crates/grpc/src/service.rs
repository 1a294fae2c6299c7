//! The `CertificateAuthority` service.

use crate::pb::certificate_authority_server::CertificateAuthority;
use crate::pb::{
    self, CertificateResponse, RenewRequest, RevokeRequest, RevokeResponse, RotationNotice,
    SignRequest, TrustBundle, TrustBundleRequest, WatchRotationRequest, rotation_notice::Kind,
};
use crate::tokens::TokenVerifier;
use sigil_authority::{Authority, Error, IssueRequest, Issued};
use sigil_core::ratelimit::RateLimiter;
use sigil_core::template::IssuerId;
use sigil_core::{LeafInfo, Profile, Requester, Serial};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// Largest CSR accepted (bytes); larger requests get `ResourceExhausted`.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// Metadata key of a refusal that concerns the presented certificate
/// itself, with the value [`REFUSAL_CERTIFICATE`]: revoked, expired, not
/// this CA's, or otherwise never renewable. Asking again with it cannot
/// help; a new certificate (by bootstrap token) can. Other refusals (policy,
/// or an HTTP proxy's 401/403 that gRPC clients also see as such codes) may
/// pass.
pub const REFUSAL_KEY: &str = "sigil-refusal";
/// See [`REFUSAL_KEY`].
pub const REFUSAL_CERTIFICATE: &str = "certificate";
/// Metadata on a `ResourceExhausted` rate-limit answer: the seconds until
/// the call may succeed, as HTTP's `Retry-After`.
pub const RETRY_AFTER_KEY: &str = "retry-after";

/// A rate-limit refusal that says when to come back ([`RETRY_AFTER_KEY`]).
fn exhausted(message: String, retry_after: u64) -> Status {
    let mut s = Status::resource_exhausted(message);
    s.metadata_mut().insert(
        RETRY_AFTER_KEY,
        tonic::metadata::MetadataValue::from(retry_after),
    );
    s
}

/// A refusal of the presented certificate itself (see [`REFUSAL_KEY`]).
fn certificate_refused(code: tonic::Code, message: String) -> Status {
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert(
        REFUSAL_KEY,
        tonic::metadata::MetadataValue::from_static(REFUSAL_CERTIFICATE),
    );
    Status::with_metadata(code, message, md)
}

/// At most 64 characters of caller input, for messages and audit rows.
fn shown(input: &str) -> String {
    match input.char_indices().nth(64) {
        Some((cut, _)) => format!("{}… ({} bytes)", &input[..cut], input.len()),
        None => input.to_string(),
    }
}

/// Refused calls audited per claimed caller and minute. Anyone who can reach
/// the port can present a bad token or certificate; past this budget a
/// refusal is only counted (`sigil_grpc_refusals_unaudited_total`), so
/// garbage cannot grow the audit table without bound.
pub const REFUSAL_AUDITS_PER_MINUTE: u32 = 60;

/// The actor of a refusal whose caller presented no credential at all.
pub const ANONYMOUS: &str = "anonymous";

/// A call being served: its name and the caller's address, for the audit
/// of a refusal.
struct Call {
    name: &'static str,
    from: Option<std::net::SocketAddr>,
}

impl Call {
    fn of(name: &'static str, req: &Request<impl Sized>) -> Call {
        Call {
            name,
            from: req.remote_addr(),
        }
    }

    /// The caller's address as audited.
    fn peer(&self) -> String {
        self.from
            .map_or_else(|| "unknown".to_string(), |a| a.to_string())
    }
}

/// Parsed client certificates kept (see [`PeerCache`]).
const PEER_CACHE: usize = 1024;

/// Client certificates parsed recently, by their DER: a connection presents
/// the same certificate on every call, so it is parsed, and its signature
/// checked, once. An entry is only what the DER says and which issuer's key
/// verified it; validity, the issuer still being ours and revocation are
/// checked on every call.
#[derive(Debug, Default)]
struct PeerCache(std::sync::Mutex<std::collections::HashMap<Vec<u8>, Arc<PeerEntry>>>);

/// One parsed client certificate.
#[derive(Debug)]
struct PeerEntry {
    info: LeafInfo,
    /// The issuer whose key verified its signature, once one did.
    issuer: std::sync::OnceLock<IssuerId>,
}

impl PeerCache {
    fn parse(&self, der: &[u8]) -> Result<Arc<PeerEntry>, sigil_core::Error> {
        let lock = || self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = lock().get(der) {
            return Ok(entry.clone());
        }
        let entry = Arc::new(PeerEntry {
            info: LeafInfo::from_der(der)?,
            issuer: std::sync::OnceLock::new(),
        });
        let mut map = lock();
        if map.len() >= PEER_CACHE {
            map.clear();
        }
        map.insert(der.to_vec(), entry.clone());
        Ok(entry)
    }
}

/// Static settings of the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Root certificates, PEM, for `GetTrustBundle`.
    pub roots_pem: String,
    /// mTLS identities that may revoke any certificate.
    pub operators: Vec<String>,
}

/// Something connected clients should react to.
#[derive(Debug, Clone)]
pub enum Notice {
    /// A new issuer took over issuance.
    IssuerRotated {
        /// Its id.
        issuer: String,
    },
    /// Certificates issued before `before` (unix s) should be renewed by
    /// `by` (unix s).
    RenewIssuedBefore {
        /// Cut-off, unix seconds.
        before: i64,
        /// Deadline, unix seconds.
        by: i64,
        /// Why.
        reason: String,
    },
    /// One certificate was revoked; its holder should renew or re-bootstrap.
    Revoked {
        /// Serial, hex.
        serial: String,
    },
    /// The server is stopping: every watch stream ends (its client
    /// reconnects, to this node once restarted or to another), so the
    /// server does not wait on streams that never finish.
    Closing,
}

/// Fan-out of notices to `WatchRotation` streams.
#[derive(Debug, Clone)]
pub struct Notifier(broadcast::Sender<Notice>, Arc<AtomicBool>);

impl Default for Notifier {
    fn default() -> Self {
        Notifier(broadcast::channel(256).0, Arc::default())
    }
}

impl Notifier {
    /// Tells every watcher (no-op without watchers).
    pub fn send(&self, notice: Notice) {
        let _ = self.0.send(notice);
    }

    /// Ends every watch stream and refuses new ones: the server is stopping.
    pub fn close(&self) {
        self.1.store(true, Ordering::Release);
        self.send(Notice::Closing);
    }

    fn is_closed(&self) -> bool {
        self.1.load(Ordering::Acquire)
    }
}

/// The service state.
#[derive(Debug, Clone)]
pub struct CaService {
    authority: Arc<Authority>,
    tokens: TokenVerifier,
    config: Arc<ServiceConfig>,
    notifier: Notifier,
    /// Audit budget for refused calls, per claimed caller.
    refusal_audits: Arc<std::sync::Mutex<RateLimiter>>,
    /// Revocations asked with a bootstrap token, per token subject: each
    /// one refused (an unknown serial, names the token does not cover) is
    /// audited by the authority, so they are bounded here.
    revocations: Arc<std::sync::Mutex<RateLimiter>>,
    peers: Arc<PeerCache>,
}

impl CaService {
    /// Assembles the service.
    pub fn new(
        authority: Arc<Authority>,
        tokens: TokenVerifier,
        config: ServiceConfig,
        notifier: Notifier,
    ) -> CaService {
        CaService {
            authority,
            tokens,
            config: Arc::new(config),
            notifier,
            refusal_audits: Arc::new(std::sync::Mutex::new(RateLimiter::new(
                REFUSAL_AUDITS_PER_MINUTE,
            ))),
            revocations: Arc::new(std::sync::Mutex::new(RateLimiter::new(
                REFUSAL_AUDITS_PER_MINUTE,
            ))),
            peers: Arc::default(),
        }
    }

    /// The caller's client certificate, if it presented one (the TLS layer has
    /// already verified the chain and validity against Sigil's roots). A
    /// certificate this CA revoked is refused here.
    async fn peer(&self, req: &Request<impl Sized>, call: &Call) -> Result<Option<Peer>, Status> {
        let Some(certs) = req.peer_certs() else {
            return Ok(None);
        };
        let Some(leaf) = certs.first() else {
            return Ok(None);
        };
        let entry = match self.peers.parse(leaf.as_ref()) {
            Ok(entry) => entry,
            Err(e) => {
                let reason = format!("client certificate unreadable: {e}");
                let actor = Requester::Mtls(String::new()).to_string();
                self.audit_auth_failure(call, &actor, &reason).await;
                return Err(certificate_refused(tonic::Code::Unauthenticated, reason));
            }
        };
        let info = &entry.info;
        // Refusals are audited under the name the certificate claims.
        let claimed = Requester::Mtls(info.identity().unwrap_or_else(|| info.serial.to_hex()));
        // The handshake checked validity once; a long-lived connection must
        // not outlast the certificate.
        let now = self.authority.now();
        if now < info.not_before || now > info.not_after {
            let reason = format!(
                "client certificate {} is not valid now (valid {} to {})",
                info.serial, info.not_before, info.not_after
            );
            self.audit_auth_failure(call, &claimed.to_string(), &reason)
                .await;
            return Err(certificate_refused(tonic::Code::Unauthenticated, reason));
        }
        let issuer = self
            .authority
            .issuer_of(leaf.as_ref(), info, entry.issuer.get())
            .await
            .map_err(status)?;
        let Some(issuer) = issuer else {
            let reason = "client certificate was not issued by one of this CA's intermediates";
            self.audit_auth_failure(call, &claimed.to_string(), reason)
                .await;
            return Err(certificate_refused(
                tonic::Code::Unauthenticated,
                reason.into(),
            ));
        };
        let _ = entry.issuer.set(issuer);
        // A certificate with neither (IP or email names only) may still renew
        // or revoke itself; only Sign needs an identity the policy can match.
        let identified = info.identity().is_some();
        let requester = claimed;
        if self
            .authority
            .is_revoked(&info.serial)
            .await
            .map_err(status)?
        {
            self.audit_auth_failure(
                call,
                &requester.to_string(),
                "client certificate is revoked",
            )
            .await;
            return Err(certificate_refused(
                tonic::Code::Unauthenticated,
                format!(
                    "client certificate {} is revoked; obtain a new one with a bootstrap token",
                    info.serial
                ),
            ));
        }
        // A keyCompromise revokes every certificate of the key; this also
        // covers one issued while that revocation was being made.
        if self
            .authority
            .key_blocked(&info.public_key)
            .await
            .map_err(status)?
        {
            let reason = "client certificate's key was revoked as compromised";
            self.audit_auth_failure(call, &requester.to_string(), reason)
                .await;
            return Err(certificate_refused(
                tonic::Code::Unauthenticated,
                format!(
                    "the key of client certificate {} was revoked as compromised; obtain a certificate for a new key with a bootstrap token",
                    info.serial
                ),
            ));
        }
        Ok(Some(Peer {
            requester,
            identified,
            der: leaf.as_ref().to_vec(),
            serial: info.serial.clone(),
        }))
    }

    /// An authenticated call refused before it reached the authority (which
    /// audits its own refusals).
    async fn audit_refusal(&self, call: &Call, actor: &str, reason: &str) {
        self.audit("grpc.refused", call, actor, reason).await;
    }

    /// A call refused for its credential: none, unreadable, or not good.
    async fn audit_auth_failure(&self, call: &Call, actor: &str, reason: &str) {
        self.audit("grpc.auth_failed", call, actor, reason).await;
    }

    /// One from `key`'s budget in `limiter`; `Err` holds the seconds to wait.
    fn take(&self, limiter: &std::sync::Mutex<RateLimiter>, key: &str) -> Result<(), u64> {
        let now_ms = i64::try_from(self.authority.now().unix_timestamp_nanos() / 1_000_000)
            .unwrap_or(i64::MAX);
        limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(key, now_ms)
    }

    /// One of `actor`'s revocation requests for this minute (each may end
    /// in an audited refusal), or `ResourceExhausted` saying when to retry.
    fn take_revocation(&self, actor: &str) -> Result<(), Status> {
        self.take(&self.revocations, actor).map_err(|wait| {
            metrics::counter!("sigil_grpc_refusals_unaudited_total", "kind" => "cert.revoke_denied")
                .increment(1);
            exhausted(
                format!(
                    "{actor} asked for more than {REFUSAL_AUDITS_PER_MINUTE} revocations a minute; retry in {wait} s"
                ),
                wait,
            )
        })
    }

    /// Records a refusal within the caller's audit budget; a failure to
    /// record is logged, the refusal stands.
    async fn audit(&self, kind: &str, call: &Call, actor_name: &str, reason: &str) {
        if self.take(&self.refusal_audits, actor_name).is_err() {
            metrics::counter!("sigil_grpc_refusals_unaudited_total", "kind" => kind.to_string())
                .increment(1);
            tracing::debug!(kind, actor = %actor_name, "refusal over the audit budget; counted only");
            return;
        }
        let detail =
            serde_json::json!({ "call": call.name, "reason": reason, "peer": call.peer() });
        let r = self.authority.record(kind, actor_name, "", detail).await;
        if let Err(e) = r {
            tracing::error!(error = %e, kind, "could not audit a refused call");
        }
    }

    /// The bearer token, if the call carries one; a malformed
    /// `authorization` is refused (and audited).
    async fn bearer(
        &self,
        req: &Request<impl Sized>,
        call: &Call,
    ) -> Result<Option<String>, Status> {
        let Some(v) = req.metadata().get("authorization") else {
            return Ok(None);
        };
        let token = v
            .to_str()
            .map_err(|_| "authorization metadata is not text")
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .ok_or("authorization must be 'Bearer <token>'")
            });
        match token {
            Ok(t) => Ok(Some(t.trim().to_string())),
            Err(reason) => {
                self.audit_auth_failure(call, ANONYMOUS, reason).await;
                Err(Status::unauthenticated(reason))
            }
        }
    }

    /// A call that presented no credential: refused, and audited as
    /// [`ANONYMOUS`] with the caller's address.
    async fn no_credential(&self, call: &Call, reason: &'static str) -> Status {
        self.audit_auth_failure(call, ANONYMOUS, reason).await;
        Status::unauthenticated(reason)
    }
}

struct Peer {
    /// `Mtls` with the certificate's identity, or its serial when it has none.
    requester: Requester,
    /// Whether the certificate has an identity (SPIFFE URI or DNS SAN).
    identified: bool,
    der: Vec<u8>,
    serial: Serial,
}

fn response(issued: Issued) -> CertificateResponse {
    let nb = issued.not_before.unix_timestamp();
    let na = issued.not_after.unix_timestamp();
    CertificateResponse {
        chain_pem: issued.chain_pem,
        chain_der: issued.chain_der,
        serial: issued.serial.to_hex(),
        not_before: nb,
        not_after: na,
        renew_after: crate::renew_after(nb, na),
    }
}

/// Maps an authority error to a status, in one place.
fn status(e: Error) -> Status {
    match e {
        Error::Csr(e) => Status::invalid_argument(format!("bad CSR: {e}")),
        Error::Denied { reason, .. } => Status::permission_denied(format!("policy: {reason}")),
        Error::NotRenewable(m) => certificate_refused(tonic::Code::PermissionDenied, m),
        Error::OutsideConstraints(m)
        | Error::TokenScope(m)
        | Error::NamesChanged(m)
        | Error::KeyCompromised(m) => Status::permission_denied(m),
        Error::TokenReplayed(m) => Status::unauthenticated(m),
        Error::Lifetime(m) | Error::InvalidRevocation(m) => Status::invalid_argument(m),
        Error::AlreadyRevoked(m) => Status::failed_precondition(m),
        Error::NotFound(m) => Status::not_found(m),
        Error::Unavailable(m) => Status::unavailable(m),
        Error::RateLimited {
            message,
            retry_after,
        } => exhausted(message, retry_after),
        e if e.is_shutting_down() => Status::unavailable("the CA is shutting down; retry"),
        Error::Store(sigil_authority::StoreError::Uncertain(m)) => Status::unavailable(m),
        Error::Store(e) if e.is_unavailable() => {
            tracing::warn!(error = %e, "database unavailable");
            Status::unavailable("the CA's database is unavailable; retry shortly")
        }
        other => {
            tracing::error!(error = %other, "internal error");
            Status::internal("internal error; the CA's log has details")
        }
    }
}

fn check_csr_len(csr: &[u8]) -> Result<(), Status> {
    if csr.len() > MAX_CSR_LEN {
        return Err(Status::resource_exhausted(format!(
            "CSR is {} bytes; the limit is {MAX_CSR_LEN}",
            csr.len()
        )));
    }
    Ok(())
}

type NoticeStream = Pin<Box<dyn Stream<Item = Result<RotationNotice, Status>> + Send>>;

#[tonic::async_trait]
impl CertificateAuthority for CaService {
    async fn sign(
        &self,
        req: Request<SignRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        let call = Call::of("Sign", &req);
        let bearer = self.bearer(&req, &call).await?;
        // A token, when present, is the credential: the client certificate
        // (perhaps revoked, which is why a token is being used) is not consulted.
        let peer = match bearer {
            Some(_) => None,
            None => self.peer(&req, &call).await?,
        };
        let body = req.into_inner();
        let (requester, token) = match (bearer, peer) {
            (Some(t), _) => match self.tokens.verify(&t) {
                Ok(grant) => (Requester::Token(grant.subject.clone()), Some(grant)),
                Err(e) => {
                    let reason = e.to_string();
                    let actor = Requester::Token(String::new()).to_string();
                    self.audit_auth_failure(&call, &actor, &reason).await;
                    return Err(Status::unauthenticated(reason));
                }
            },
            (None, Some(p)) if !p.identified => {
                let reason = "client certificate has no SPIFFE URI or DNS SAN to identify it; \
                              Sign with a bootstrap token instead";
                self.audit_auth_failure(&call, &p.requester.to_string(), reason)
                    .await;
                return Err(Status::unauthenticated(reason));
            }
            (None, Some(p)) => (p.requester, None),
            (None, None) => {
                return Err(self
                    .no_credential(
                        &call,
                        "Sign needs a bootstrap token (authorization: Bearer ...) or a client certificate",
                    )
                    .await);
            }
        };
        // The credential first: an unauthenticated caller learns nothing
        // about its request, and an authenticated one's refusal is audited.
        let csr_problem = if body.csr.is_empty() {
            Some(Status::invalid_argument(
                "csr is empty: send a PKCS#10 CSR (DER or PEM)",
            ))
        } else {
            check_csr_len(&body.csr).err()
        };
        if let Some(s) = csr_problem {
            self.audit_refusal(&call, &requester.to_string(), s.message())
                .await;
            return Err(s);
        }
        let profile = match body.profile.as_str() {
            "" => None,
            p => match p.parse::<Profile>() {
                Ok(p) => Some(p),
                Err(_) => {
                    let reason =
                        format!("unknown profile '{}': use mtls, server or client", shown(p));
                    self.audit_refusal(&call, &requester.to_string(), &reason)
                        .await;
                    return Err(Status::invalid_argument(reason));
                }
            },
        };
        let lifetime =
            (body.lifetime_seconds > 0).then(|| Duration::from_secs(body.lifetime_seconds));
        let issued = self
            .authority
            .issue(IssueRequest {
                csr: body.csr.into(),
                requester,
                profile,
                lifetime,
                token,
                not_before: None,
                completes: None,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(response(issued)))
    }

    async fn renew(
        &self,
        req: Request<RenewRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        let call = Call::of("Renew", &req);
        let Some(peer) = self.peer(&req, &call).await? else {
            return Err(self
                .no_credential(
                    &call,
                    "Renew needs the current certificate as the TLS client certificate",
                )
                .await);
        };
        let body = req.into_inner();
        if let Err(s) = check_csr_len(&body.csr) {
            self.audit_refusal(&call, &peer.requester.to_string(), s.message())
                .await;
            return Err(s);
        }
        let issued = self
            .authority
            .renew(sigil_authority::RenewRequest {
                current: peer.der,
                caller: peer.requester,
                csr: (!body.csr.is_empty()).then_some(body.csr),
            })
            .await
            .map_err(status)?;
        Ok(Response::new(response(issued)))
    }

    async fn revoke(
        &self,
        req: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let call = Call::of("Revoke", &req);
        if let Some(token) = self.bearer(&req, &call).await? {
            // A token whose names cover the certificate's may revoke it.
            let grant = match self.tokens.verify(&token) {
                Ok(g) => g,
                Err(e) => {
                    let reason = e.to_string();
                    let actor = Requester::Token(String::new()).to_string();
                    self.audit_auth_failure(&call, &actor, &reason).await;
                    return Err(Status::unauthenticated(reason));
                }
            };
            let body = req.into_inner();
            let Some(serial) = Serial::parse_hex(&body.serial) else {
                let reason = "with a token, name the certificate to revoke by its hex serial";
                let actor = Requester::Token(grant.subject.clone()).to_string();
                self.audit_refusal(&call, &actor, reason).await;
                return Err(Status::invalid_argument(reason));
            };
            let actor = Requester::Token(grant.subject.clone()).to_string();
            self.take_revocation(&actor)?;
            let revoked = self
                .authority
                .revoke_with_token(&serial, body.reason, &grant)
                .await
                .map_err(status)?;
            return Ok(Response::new(RevokeResponse {
                serial: revoked.serial.to_hex(),
                revoked_at: revoked.revoked_at.unix_timestamp(),
            }));
        }
        let Some(peer) = self.peer(&req, &call).await? else {
            return Err(self
                .no_credential(
                    &call,
                    "Revoke needs a client certificate (the one to revoke, or an operator's), \
                     or a bootstrap token whose names cover it",
                )
                .await);
        };
        let body = req.into_inner();
        let serial = if body.serial.is_empty() {
            peer.serial.clone()
        } else if let Some(s) = Serial::parse_hex(&body.serial) {
            s
        } else {
            let reason = format!("'{}' is not a hex serial", shown(&body.serial));
            self.audit_refusal(&call, &peer.requester.to_string(), &reason)
                .await;
            return Err(Status::invalid_argument(reason));
        };
        // Operators are SPIFFE IDs only: a DNS name is too easy to obtain.
        let is_operator = peer.requester.name().starts_with("spiffe://")
            && self
                .config
                .operators
                .iter()
                .any(|o| o == peer.requester.name());
        // Refusals are audited, so a caller's revocations are budgeted as
        // with a token.
        let actor = peer.requester.to_string();
        self.take_revocation(&actor)?;
        if serial != peer.serial && !is_operator {
            let reason = format!(
                "{} may revoke only its own certificate ({}), not {serial}",
                peer.requester.name(),
                peer.serial
            );
            self.audit_refusal(&call, &actor, &reason).await;
            return Err(Status::permission_denied(reason));
        }
        let revoked = self
            .authority
            .revoke(&serial, body.reason, &peer.requester)
            .await
            .map_err(status)?;
        // Watchers hear of it from the server's sync loop, which sees every
        // revocation: this node's, another node's and the CLI's.
        Ok(Response::new(RevokeResponse {
            serial: revoked.serial.to_hex(),
            revoked_at: revoked.revoked_at.unix_timestamp(),
        }))
    }

    async fn get_trust_bundle(
        &self,
        _req: Request<TrustBundleRequest>,
    ) -> Result<Response<TrustBundle>, Status> {
        let mut issuers = self.authority.trusted_issuers().await.map_err(status)?;
        // Cross-certificates between roots: the path to a new root's
        // intermediates for clients that still trust only the old one.
        issuers.extend(self.authority.cross_certs().await.map_err(status)?);
        let intermediates_pem = issuers
            .iter()
            .map(|der| sigil_authority::pem("CERTIFICATE", der))
            .collect::<String>();
        Ok(Response::new(TrustBundle {
            roots_pem: self.config.roots_pem.clone(),
            intermediates_pem,
            active_issuer: self.authority.active_issuer().info().id.to_string(),
        }))
    }

    type WatchRotationStream = NoticeStream;

    async fn watch_rotation(
        &self,
        req: Request<WatchRotationRequest>,
    ) -> Result<Response<NoticeStream>, Status> {
        // In the form revocation notices carry (any form `parse_hex` takes);
        // none for an unreadable one.
        let mine = Serial::parse_hex(&req.into_inner().serial)
            .map(|s| s.to_hex())
            .unwrap_or_default();
        let active = self.authority.active_issuer().info().id.to_string();
        let first = RotationNotice {
            kind: Kind::Current as i32,
            active_issuer: active.clone(),
            renew_issued_before: 0,
            message: String::new(),
            renew_by: 0,
        };
        let rx = self.notifier.0.subscribe();
        // Checked after subscribing, so a stream cannot miss the close.
        if self.notifier.is_closed() {
            return Err(Status::unavailable(
                "the server is stopping; watch another node or retry shortly",
            ));
        }
        // Subscribed first, so nothing falls between what was missed and what follows.
        let missed = self.missed_notices(&mine, &active).await;
        let authority = self.authority.clone();
        let updates = tokio_stream::wrappers::BroadcastStream::new(rx)
            .take_while(|n| !matches!(n, Ok(Notice::Closing)))
            .filter_map(move |n| {
                let active = authority.active_issuer().info().id.to_string();
                match n {
                    Ok(Notice::IssuerRotated { issuer }) => Some(Ok(RotationNotice {
                        kind: Kind::IssuerRotated as i32,
                        active_issuer: issuer,
                        renew_issued_before: 0,
                        message: "a new intermediate issues certificates now".into(),
                        renew_by: 0,
                    })),
                    Ok(Notice::RenewIssuedBefore { before, by, reason }) => {
                        Some(Ok(RotationNotice {
                            kind: Kind::RenewNow as i32,
                            active_issuer: active,
                            renew_issued_before: before,
                            message: reason,
                            renew_by: by,
                        }))
                    }
                    Ok(Notice::Revoked { serial }) if serial == mine => Some(Ok(RotationNotice {
                        kind: Kind::RenewNow as i32,
                        active_issuer: active,
                        renew_issued_before: 0,
                        message: format!("certificate {serial} was revoked"),
                        renew_by: 0,
                    })),
                    Ok(Notice::Revoked { .. } | Notice::Closing) => None,
                    // Lagged (a burst of revocations pushed notices out): the
                    // call ends with this error (tonic sends nothing after an
                    // error), and the watcher's next call
                    // starts with what concerns its certificate
                    // (`missed_notices`), so a rotation or revocation notice
                    // is not silently lost.
                    Err(_) => Some(Err(Status::aborted(
                        "this watch fell behind and missed notices; watch again to catch up",
                    ))),
                }
            });
        let stream =
            tokio_stream::iter(std::iter::once(first).chain(missed).map(Ok)).chain(updates);
        Ok(Response::new(Box::pin(stream)))
    }
}

impl CaService {
    /// What a watcher missed while it was not listening (an agent restarted,
    /// or its stream broke during a rotation): its certificate's issuer was
    /// replaced, with the operator's renew-by deadline if one was given, or
    /// its certificate was revoked. Sent right after the first notice, as the
    /// live notices would have been. Nothing for an unknown serial.
    async fn missed_notices(&self, serial: &str, active: &str) -> Vec<RotationNotice> {
        let Some(serial) = Serial::parse_hex(serial) else {
            return Vec::new();
        };
        let looked_up = async {
            let Some(cert) = self.authority.certificate(&serial).await? else {
                return Ok::<_, Error>(Vec::new());
            };
            let hex = serial.to_hex();
            if self.authority.is_revoked(&serial).await? {
                return Ok(vec![RotationNotice {
                    kind: Kind::RenewNow as i32,
                    active_issuer: active.to_string(),
                    renew_issued_before: 0,
                    message: format!("certificate {hex} was revoked"),
                    renew_by: 0,
                }]);
            }
            if cert.issuer_id == active {
                return Ok(Vec::new());
            }
            let mut out = vec![RotationNotice {
                kind: Kind::IssuerRotated as i32,
                active_issuer: active.to_string(),
                renew_issued_before: 0,
                message: format!(
                    "certificate {hex} is from issuer {}, replaced by {active}",
                    cert.issuer_id
                ),
                renew_by: 0,
            }];
            let scope = format!("issuer:{}", cert.issuer_id);
            if let Some(by) = self.authority.store().acme_renewal_hint(&[scope]).await? {
                out.push(RotationNotice {
                    kind: Kind::RenewNow as i32,
                    active_issuer: active.to_string(),
                    renew_issued_before: self.authority.now().unix_timestamp(),
                    message: format!(
                        "issuer {active} replaced {}: renew onto it by {by} (unix time)",
                        cert.issuer_id
                    ),
                    renew_by: by,
                });
            }
            Ok(out)
        };
        looked_up.await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "looking up a watcher's certificate failed; sending live notices only");
            Vec::new()
        })
    }
}

/// The largest request message decoded: a request is a CSR (at most
/// [`MAX_CSR_LEN`]) and a few short fields, and messages are decoded before
/// the caller is authenticated.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// The tonic server for the service, with Sigil's message-size limit.
pub fn server(
    svc: CaService,
) -> pb::certificate_authority_server::CertificateAuthorityServer<CaService> {
    pb::certificate_authority_server::CertificateAuthorityServer::new(svc)
        .max_decoding_message_size(MAX_MESSAGE_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_authority::StoreError;

    #[test]
    fn echoed_input_is_cut_to_64_characters() {
        assert_eq!(shown("abc"), "abc");
        let long = "é".repeat(100);
        let s = shown(&long);
        assert!(s.starts_with(&"é".repeat(64)), "{s}");
        assert!(s.ends_with("… (200 bytes)"), "{s}");
    }

    #[test]
    fn database_outages_are_unavailable_and_certificate_refusals_marked() {
        let unavailable = [
            Error::Store(StoreError::Uncertain("commit unconfirmed".into())),
            Error::Store(StoreError::Closed),
        ];
        for e in unavailable {
            assert_eq!(status(e).code(), tonic::Code::Unavailable);
        }
        let corrupt = status(Error::Store(StoreError::Corrupt("x".into())));
        assert_eq!(corrupt.code(), tonic::Code::Internal);
        let marked = |s: &Status| s.metadata().get(REFUSAL_KEY).is_some();
        let gone = status(Error::NotRenewable("revoked".into()));
        assert_eq!(gone.code(), tonic::Code::PermissionDenied);
        assert!(marked(&gone));
        let renamed = status(Error::NamesChanged("other names".into()));
        assert_eq!(renamed.code(), tonic::Code::PermissionDenied);
        assert!(!marked(&renamed));
    }
}
