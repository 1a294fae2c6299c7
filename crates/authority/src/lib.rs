//! Sigil's registration authority: the one path every certificate takes,
//! whichever door it came through (CLI, gRPC, ACME).
//!
//! parse + verify CSR → policy (denials audited) → build template → self-check →
//! sign once → post-sign check → durable commit of certificate + audit → chain.

mod error;
pub mod issuers;
pub mod revoke;

pub use error::Error;
pub use issuers::IssuerKeys;
pub use sigil_store::{
    CrlRow, Error as StoreError, IssuerRow, IssuerState, OcspCerts, SignedOcsp, current_request_id,
    with_request_id,
};

use serde_json::json;
use sigil_core::template::{IssuerId, LeafCommon, LeafSpec, LeafTemplate, check_issued_leaf};
use sigil_core::{
    CaUrls, Clock, Csr, Identifier, IssuerInfo, KeyType, LeafInfo, Profile, PublicKey, Requester,
    Serial,
};
use sigil_policy::{Decision, Policy, Request};
use sigil_signer::{CaKey, CaSigner, SoftwareKey};
use sigil_store::{
    AuditEvent, AuditReceipt, CertificateRow, Change, NewCertificate, SpentToken, StateWrite, Store,
};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use time::OffsetDateTime;

/// Issuance settings from configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Lifetime when the request names none (capped by policy).
    pub default_lifetime: Duration,
    /// Hard ceiling for any leaf, whatever the policy says.
    pub max_lifetime: Duration,
    /// Public base URL for AIA / CRL DP.
    pub urls: CaUrls,
    /// Issuances per minute per requester on this node (a burst of one
    /// minute's worth); 0 for no limit. Operators are not limited.
    pub rate_per_minute: u32,
}

/// The online issuing CA: its signer, per-issuer leaf parts and chain.
pub struct ActiveIssuer {
    signer: CaSigner<CaKey>,
    /// The token holding the issuer key, if any: its OCSP responder keys
    /// are made there too.
    token: Option<sigil_signer::TokenHandle>,
    common: LeafCommon,
    /// The issuer certificate and, when known, its parents up to (excluding) the root, PEM.
    chain_pem: String,
    /// The same chain, DER.
    chain_der: Vec<Vec<u8>>,
}

impl std::fmt::Debug for ActiveIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ActiveIssuer({})", self.signer.info().id)
    }
}

impl ActiveIssuer {
    /// `leaf` followed by this issuer's chain (without the root): PEM, and
    /// DER each.
    fn chain_of(&self, leaf: &[u8]) -> (String, Vec<Vec<u8>>) {
        let pem = format!("{}{}", pem("CERTIFICATE", leaf), self.chain_pem);
        let der = std::iter::once(leaf.to_vec())
            .chain(self.chain_der.iter().cloned())
            .collect();
        (pem, der)
    }

    /// Pairs the intermediate certificate with its key.
    pub fn new(
        cert_der: &[u8],
        key: impl Into<CaKey>,
        urls: &CaUrls,
    ) -> Result<ActiveIssuer, Error> {
        let key = key.into();
        let token = key.token();
        let signer = CaSigner::new(cert_der, key)?;
        if !signer.info().is_ca {
            return Err(Error::Config(
                "the issuer certificate is not a CA (basicConstraints cA=FALSE)".into(),
            ));
        }
        let common = LeafCommon::new(urls, &signer.info().id)?;
        Ok(ActiveIssuer {
            chain_pem: pem("CERTIFICATE", cert_der),
            chain_der: vec![cert_der.to_vec()],
            signer,
            token,
            common,
        })
    }

    /// Facts about the issuer certificate.
    pub fn info(&self) -> &IssuerInfo {
        self.signer.info()
    }

    /// Whether the key can sign: always for a key in memory; for a token
    /// key, whether the token is still present.
    pub fn key_usable(&self) -> bool {
        self.token
            .as_ref()
            .is_none_or(sigil_signer::TokenHandle::present)
    }
}

/// Label prefix of shared OCSP responder keys kept in a PKCS#11 token.
const OCSP_KEY_PREFIX: &str = "sigil-ocsp-";

/// The label prefix of one issuer's responder keys in a token: clean-ups
/// remove only keys under it, never another issuer's.
fn ocsp_key_prefix(issuer: &IssuerId) -> String {
    let id = issuer.as_str();
    format!("{OCSP_KEY_PREFIX}{}-", id.get(..16).unwrap_or(id))
}

/// A delegated OCSP responder: its key (held here, usable only to sign) and
/// its certificate from the active issuer.
pub struct OcspSigner {
    key: CaKey,
    /// Serial of the responder certificate, lowercase hex.
    pub serial: String,
    /// Whether it is the responder stored for every node (else this node's own).
    pub shared: bool,
    /// The responder certificate, DER.
    pub cert_der: Vec<u8>,
    /// Its issuer's certificate, DER (included in responses for chaining).
    pub issuer_der: Vec<u8>,
    /// Its issuer's id.
    pub issuer_id: String,
    /// SHA-1 of the responder public key (`byKey` responder id).
    pub key_hash: Vec<u8>,
    /// When the responder certificate expires.
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for OcspSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OcspSigner(issuer {})", self.issuer_id)
    }
}

impl OcspSigner {
    /// Signs OCSP ResponseData (ECDSA P-256 with SHA-256, DER signature).
    pub fn sign(&self, tbs: &[u8]) -> Result<Vec<u8>, Error> {
        Ok(self.key.sign_bytes(tbs)?)
    }

    /// Whether its key is in a token: each signature is then a blocking
    /// round trip to the HSM, to be made off the async runtime.
    pub fn in_token(&self) -> bool {
        self.key.token().is_some()
    }
}

/// Everything a caller supplies to get a certificate.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The PKCS#10 request.
    pub csr: CsrInput,
    /// Who asks (already authenticated by the entry point).
    pub requester: Requester,
    /// Requested profile (default `mtls`).
    pub profile: Option<Profile>,
    /// Requested lifetime (default from settings, bounded by policy).
    pub lifetime: Option<Duration>,
    /// The bootstrap token that authenticated the request, if any.
    pub token: Option<TokenGrant>,
    /// Start of validity when later than now (an ACME order's notBefore);
    /// the lifetime counts from it. At most [`MAX_FUTURE_START`] ahead.
    pub not_before: Option<OffsetDateTime>,
    /// The protocol state this issuance completes (an ACME order becoming
    /// valid with the new certificate), committed with it or not at all.
    pub completes: Option<Completion>,
}

/// Builds, from the new certificate's serial (hex), the protocol-state write
/// an issuance completes: committed in the same transaction as the
/// certificate, so a crash cannot leave one without the other. If the write
/// does not take effect (the state moved on meanwhile), nothing is issued
/// and the issuance fails with a store conflict.
#[derive(Clone)]
pub struct Completion(Arc<dyn Fn(&str) -> StateWrite + Send + Sync>);

impl Completion {
    /// Wraps the builder.
    pub fn new(build: impl Fn(&str) -> StateWrite + Send + Sync + 'static) -> Completion {
        Completion(Arc::new(build))
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Completion(..)")
    }
}

/// A certificate request as the entry point has it: the bytes it received
/// (PEM or DER), or a [`Csr`] it already parsed through
/// [`Authority::check_csr`] to compare with its own records (an ACME order's
/// identifiers), so the signature is verified once.
#[derive(Debug, Clone)]
pub enum CsrInput {
    /// PKCS#10, PEM or DER, not yet parsed.
    Bytes(Vec<u8>),
    /// Parsed, with its self-signature verified.
    Parsed(Csr),
}

impl From<Vec<u8>> for CsrInput {
    fn from(bytes: Vec<u8>) -> Self {
        CsrInput::Bytes(bytes)
    }
}

impl From<Csr> for CsrInput {
    fn from(csr: Csr) -> Self {
        CsrInput::Parsed(csr)
    }
}

/// How far in the future a requested start of validity may lie.
pub const MAX_FUTURE_START: Duration = Duration::from_secs(30 * 86400);

/// A verified one-time bootstrap token presented with a request. The entry
/// point checks its signature and expiry; the authority enforces its scope and
/// spends it in the same transaction as the certificate it pays for.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    /// The token id (`jti`), accepted once.
    pub jti: String,
    /// The token's subject (the requester name).
    pub subject: String,
    /// Expiry (unix s).
    pub expires_at: i64,
    /// The only identifiers the token may obtain.
    pub sans: Vec<Identifier>,
}

/// A renewal by the holder of a current certificate.
#[derive(Debug, Clone)]
pub struct RenewRequest {
    /// The caller's current certificate, DER (as presented over mTLS).
    pub current: Vec<u8>,
    /// Who asks (the mTLS identity).
    pub caller: Requester,
    /// A CSR for a new key, with the same names; `None` keeps the key.
    pub csr: Option<Vec<u8>>,
}

/// A recorded revocation.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// The revoked serial.
    pub serial: Serial,
    /// When.
    pub revoked_at: OffsetDateTime,
    /// Where it sits in the audit chain.
    pub receipt: AuditReceipt,
    /// For keyCompromise: the other unexpired certificates of the same key,
    /// revoked with it (serials, hex).
    pub same_key: Vec<String>,
    /// For keyCompromise: the fingerprint of the key now blocked.
    pub blocked_key: Option<String>,
}

/// What the shared issuance path needs besides the subject.
struct Ask<'a> {
    /// Who is asking, for the audit record.
    actor: &'a Requester,
    /// Who the policy is asked about (the original requester for renewals).
    policy_requester: &'a Requester,
    profile: Profile,
    lifetime: Option<Duration>,
    /// Audit kind on success.
    kind: &'static str,
    /// The serial being renewed.
    renews: Option<&'a str>,
    token: Option<&'a TokenGrant>,
    /// Requested start of validity (None or past: now).
    not_before: Option<OffsetDateTime>,
    /// Protocol state committed with the certificate.
    completes: Option<&'a Completion>,
}

/// Names and key to certify.
struct Applicant<'a> {
    identifiers: &'a [Identifier],
    public_key: &'a PublicKey,
    common_name: Option<&'a str>,
}

/// A freshly issued, durably stored certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Serial.
    pub serial: Serial,
    /// Leaf DER.
    pub der: Vec<u8>,
    /// Leaf followed by its chain (without the root), PEM.
    pub chain_pem: String,
    /// Leaf followed by its chain (without the root), DER each.
    pub chain_der: Vec<Vec<u8>>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// The names it was issued for.
    pub identifiers: Vec<Identifier>,
    /// The issuing CA.
    pub issuer_id: String,
    /// Where it sits in the audit chain.
    pub receipt: AuditReceipt,
}

/// Which door a request came through, for metrics.
fn entry_point(r: &Requester) -> &'static str {
    match r {
        Requester::Operator(_) => "cli",
        Requester::Token(_) | Requester::Mtls(_) => "grpc",
        Requester::AcmeAccount(_) | Requester::Eab(_) => "acme",
        _ => "other",
    }
}

/// Counts a policy refusal per deciding rule.
fn count_denials(decision: &Decision) {
    for f in decision
        .findings
        .iter()
        .filter(|f| f.outcome != sigil_policy::Outcome::Allowed)
    {
        let rule = f.rule.clone().unwrap_or_else(|| "(no rule allows)".into());
        metrics::counter!("sigil_policy_denials_total", "rule" => rule).increment(1);
    }
}

/// The registration authority.
pub struct Authority {
    clock: Arc<dyn Clock>,
    policy: RwLock<Arc<Policy>>,
    issuers: RwLock<issuers::IssuerSet>,
    keys: Option<Arc<dyn IssuerKeys>>,
    store: Store,
    settings: Settings,
    cache: Cache,
    limiter: std::sync::Mutex<sigil_core::ratelimit::RateLimiter>,
    /// Audit budget for rate-limited requests, per requester.
    rate_limited_audits: std::sync::Mutex<sigil_core::ratelimit::RateLimiter>,
}

/// What a [`Authority::sync`] found.
#[derive(Debug, Default)]
pub struct Synced {
    /// Serials newly seen revoked.
    pub revoked: Vec<String>,
    /// Whether the set or states of issuers changed.
    pub issuers_changed: bool,
    /// Whether another issuer took over issuance.
    pub rotated: bool,
}

/// Rate-limited requests audited per requester and minute; the rest are
/// counted only (`sigil_refusals_unaudited_total`).
pub const RATE_LIMITED_AUDITS_PER_MINUTE: u32 = 60;

/// How often a server should call [`Authority::sync`].
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// What the per-request client-certificate checks read from memory.
#[derive(Debug, Default)]
struct Cache {
    /// Revoked serials (hex).
    revoked: RwLock<std::collections::HashSet<String>>,
    /// This CA's issuers, active and retired.
    issuers: RwLock<Vec<Arc<IssuerInfo>>>,
    /// Key fingerprints blocked by keyCompromise revocations.
    blocked_keys: RwLock<std::collections::HashSet<String>>,
    /// Audit seq of the last revocation loaded.
    revoked_upto: AtomicI64,
    /// When the last sync started (unix ms); 0 = never.
    synced_at_ms: AtomicI64,
    /// When previous issuers were last checked for retirement (unix s).
    retire_checked: AtomicI64,
    /// Issuers whose key failed to load, and when to try again (unix s).
    load_failures: RwLock<std::collections::HashMap<String, i64>>,
    /// Installed cross-certificates as of the last sync (None before it),
    /// for certificate downloads' alternate chains.
    cross_certs: RwLock<Option<Arc<Vec<IssuerInfo>>>>,
    /// Ids of the issuers not retired in the database as of the last sync,
    /// whether or not this node holds their keys.
    listed: RwLock<Vec<String>>,
}

pub(crate) fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    match l.read() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

pub(crate) fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    match l.write() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Assembles the authority around one active issuer, which must already
    /// be installed in `store`. Without [`Authority::with_keys`] it cannot
    /// follow a rotation.
    pub fn new(
        clock: Arc<dyn Clock>,
        policy: Policy,
        issuer: ActiveIssuer,
        store: Store,
        settings: Settings,
    ) -> Authority {
        Authority {
            clock,
            policy: RwLock::new(Arc::new(policy)),
            issuers: RwLock::new(issuers::IssuerSet::single(issuer)),
            keys: None,
            store,
            limiter: std::sync::Mutex::new(sigil_core::ratelimit::RateLimiter::new(
                settings.rate_per_minute,
            )),
            rate_limited_audits: std::sync::Mutex::new(sigil_core::ratelimit::RateLimiter::new(
                RATE_LIMITED_AUDITS_PER_MINUTE,
            )),
            settings,
            cache: Cache::default(),
        }
    }

    /// Lets the authority load the keys of issuers staged or activated later.
    pub fn with_keys(mut self, keys: Arc<dyn IssuerKeys>) -> Authority {
        self.keys = Some(keys);
        self
    }

    /// Assembles the authority from the issuers recorded in `store`: the
    /// active one, and the staged and previous ones it holds keys for.
    pub async fn open(
        clock: Arc<dyn Clock>,
        policy: Policy,
        store: Store,
        settings: Settings,
        keys: Arc<dyn IssuerKeys>,
    ) -> Result<Authority, Error> {
        let rows = store.issuers().await?;
        let Some(row) = rows
            .iter()
            .find(|r| r.state == IssuerState::Active)
            .cloned()
        else {
            return Err(Error::Config(if rows.is_empty() {
                "no intermediate is installed: run `sigil intermediate csr`, sign it offline, then `sigil intermediate install`".into()
            } else {
                "no intermediate is active: activate the staged one with `sigil intermediate activate`".into()
            }));
        };
        let urls = settings.urls.clone();
        let k = keys.clone();
        let active = tokio::task::spawn_blocking(move || {
            let key = k.load(&row)?;
            ActiveIssuer::new(&row.cert_der, key, &urls)
        })
        .await
        .map_err(|e| Error::Unavailable(format!("loading the issuer key failed: {e}")))??;
        let authority = Authority::new(clock, policy, active, store, settings).with_keys(keys);
        authority.sync().await?;
        Ok(authority)
    }

    /// The current time by the authority's clock.
    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the naming policy (a reload), audited as `policy.reloaded`
    /// with the rule count and a digest of the files. Requests already
    /// evaluating keep the policy they started with.
    pub async fn replace_policy(
        &self,
        policy: Policy,
        actor: &str,
        detail: serde_json::Value,
    ) -> Result<AuditReceipt, Error> {
        let mut detail = detail;
        detail["rules"] = json!(policy.rules().len());
        let receipt = self
            .record("policy.reloaded", actor, "policy", detail)
            .await?;
        *write(&self.policy) = Arc::new(policy);
        Ok(receipt)
    }

    /// Asks the policy without issuing (for `sigil policy check`).
    pub fn check(
        &self,
        requester: &Requester,
        identifiers: &[Identifier],
        profile: Profile,
        key_type: KeyType,
        lifetime: Option<Duration>,
    ) -> Decision {
        self.policy().evaluate(&Request {
            requester,
            identifiers,
            profile,
            key_type: Some(key_type),
            lifetime,
        })
    }

    /// Whether the policy alone (nothing audited) lets `requester` have these
    /// names with some key: when a request with a particular key was denied
    /// but this holds, the key (its type) is what the policy refused.
    pub fn policy_allows_names(
        &self,
        requester: &Requester,
        identifiers: &[Identifier],
        profile: Profile,
        lifetime: Option<Duration>,
    ) -> bool {
        self.policy()
            .evaluate(&Request {
                requester,
                identifiers,
                profile,
                key_type: None,
                lifetime,
            })
            .allowed
    }

    /// Decides whether `requester` may have these names before any key is known
    /// (an ACME order or pre-authorization): the policy as far as it does not
    /// depend on the key, and the issuer's name constraints. A refusal is
    /// audited (`cert.denied`, stage `order`) and returned; the full check runs
    /// again at issuance.
    pub async fn check_names(
        &self,
        requester: &Requester,
        identifiers: &[Identifier],
        profile: Profile,
        lifetime: Option<Duration>,
    ) -> Result<(), Error> {
        let decision = self.policy().evaluate(&Request {
            requester,
            identifiers,
            profile,
            key_type: None,
            lifetime,
        });
        let refusal = if !decision.allowed {
            count_denials(&decision);
            let reason = decision
                .denial_reason()
                .unwrap_or_else(|| "request not allowed".to_string());
            Some(Error::Denied { reason, decision })
        } else {
            let issuer = self.active_issuer();
            let info = issuer.info();
            identifiers
                .iter()
                .find(|id| !info.name_constraints.permits(id))
                .map(|id| {
                    Error::OutsideConstraints(format!(
                        "{id} is outside the name constraints of the issuing CA {} (it may only issue for the names its root allowed)",
                        info.subject
                    ))
                })
        };
        let Some(e) = refusal else {
            return Ok(());
        };
        let names: Vec<String> = identifiers.iter().map(|i| i.to_string()).collect();
        let mut detail = json!({
            "names": names,
            "profile": profile.name(),
            "stage": "order",
        });
        add_refusal(&mut detail, &e);
        self.store
            .commit(Change::Record(AuditEvent {
                ts_ms: unix_ms(self.clock.now()),
                kind: "cert.denied".into(),
                actor: requester.to_string(),
                subject: names.first().cloned().unwrap_or_default(),
                detail,
            }))
            .await?;
        Err(e)
    }

    /// A stored certificate followed by its issuer chain (without the root), PEM.
    pub async fn chain_pem(&self, row: &CertificateRow) -> Result<String, Error> {
        if let Some(issuer) = self.loaded_issuer(&row.issuer_id) {
            return Ok(issuer.chain_of(&row.der).0);
        }
        let issuer = self.store.issuer(&row.issuer_id).await?.ok_or_else(|| {
            Error::Unavailable(format!("issuer {} is not recorded", row.issuer_id))
        })?;
        Ok(format!(
            "{}{}",
            pem("CERTIFICATE", &row.der),
            pem("CERTIFICATE", &issuer.cert_der)
        ))
    }

    /// Issues a certificate. Returns only after certificate and audit row are durable.
    /// Every refusal of a well-formed request (policy, lifetime, name constraints,
    /// a token's scope or reuse) is audited before the error is returned.
    pub async fn issue(&self, req: IssueRequest) -> Result<Issued, Error> {
        let profile = req.profile.unwrap_or_default();
        let parsed;
        let csr = match &req.csr {
            CsrInput::Parsed(csr) => csr,
            CsrInput::Bytes(bytes) => {
                parsed = self.check_csr(bytes, &req.requester, profile).await?;
                &parsed
            }
        };
        if let Some(token) = &req.token
            && let Some(issued) = self
                .reply_again(token, csr, &req.requester, profile)
                .await?
        {
            return Ok(issued);
        }
        let applicant = Applicant {
            identifiers: csr.identifiers(),
            public_key: csr.public_key(),
            common_name: csr.common_name(),
        };
        let ask = Ask {
            actor: &req.requester,
            policy_requester: &req.requester,
            profile,
            lifetime: req.lifetime,
            kind: "cert.issued",
            renews: None,
            token: req.token.as_ref(),
            not_before: req.not_before,
            completes: req.completes.as_ref(),
        };
        self.issue_for(&applicant, ask).await
    }

    /// A bootstrap token's holder asking again after the reply to its first
    /// request was lost (a dropped connection, a timeout), when the token is
    /// already spent: the same key (the CSR's signature proves it is held)
    /// asking for the same names and profile gets the certificate the token
    /// was spent on, if that is still valid and not revoked, and the repeat
    /// is audited. Anything else (another key, other names) is left to the
    /// usual checks, which refuse it as a replay.
    async fn reply_again(
        &self,
        token: &TokenGrant,
        csr: &Csr,
        requester: &Requester,
        profile: Profile,
    ) -> Result<Option<Issued>, Error> {
        let Some(hex) = self.store.token_certificate(&token.jti).await? else {
            return Ok(None);
        };
        let (Some(row), Some(serial)) =
            (self.store.certificate(&hex).await?, Serial::parse_hex(&hex))
        else {
            return Ok(None);
        };
        let asked: std::collections::BTreeSet<String> =
            csr.identifiers().iter().map(|i| i.to_string()).collect();
        let now = self.clock.now();
        let same = row.key_fingerprint == csr.public_key().fingerprint()
            && row.requester == requester.to_string()
            && row.profile == profile.name()
            && row
                .names
                .iter()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
                == asked;
        if !same || row.not_after <= now.unix_timestamp() || self.is_revoked(&serial).await? {
            return Ok(None);
        }
        let Some(issuer) = self.loaded_issuer(&row.issuer_id) else {
            return Ok(None);
        };
        // Each repeat writes an audit row: it counts against the holder's
        // issuance rate like a new certificate would.
        self.take_rate_token(requester)?;
        let time = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t)
                .map_err(|_| Error::Unavailable(format!("certificate {hex} has a bad stored time")))
        };
        let (not_before, not_after) = (time(row.not_before)?, time(row.not_after)?);
        let receipt = self
            .store
            .commit(Change::Record(AuditEvent {
                ts_ms: unix_ms(now),
                kind: "token.repeated".into(),
                actor: requester.to_string(),
                subject: hex.clone(),
                detail: json!({ "token": token.jti, "names": row.names }),
            }))
            .await?;
        let (chain_pem, chain_der) = issuer.chain_of(&row.der);
        Ok(Some(Issued {
            serial,
            chain_pem,
            chain_der,
            der: row.der,
            not_before,
            not_after,
            identifiers: csr.identifiers().to_vec(),
            issuer_id: row.issuer_id,
            receipt,
        }))
    }

    /// Parses a CSR that `requester` sent for `profile`. One that cannot be
    /// used is refused as [`Authority::issue`] refuses it (audited when a
    /// client sent it).
    pub async fn check_csr(
        &self,
        bytes: &[u8],
        requester: &Requester,
        profile: Profile,
    ) -> Result<Csr, Error> {
        match Csr::parse(bytes) {
            Ok(csr) => Ok(csr),
            Err(e) => Err(self.reject_csr(requester, profile.name(), e).await),
        }
    }

    /// A CSR that cannot be used: audited (`cert.rejected`) when a client
    /// sent it, within its issuance budget so garbage cannot flood the
    /// audit table; an operator's CLI mistake is only reported to them.
    async fn reject_csr(
        &self,
        requester: &Requester,
        profile: &str,
        e: sigil_core::CsrError,
    ) -> Error {
        let e = Error::Csr(e);
        if matches!(requester, Requester::Operator(_)) {
            return e;
        }
        if let Err(limited) = self.take_rate_token(requester) {
            return self
                .record_rate_limited(requester, &[], "cert.rate_limited", profile, limited)
                .await;
        }
        let detail = json!({ "profile": profile, "reason": e.to_string() });
        match self
            .record("cert.rejected", &requester.to_string(), "", detail)
            .await
        {
            Ok(_) => e,
            Err(store) => store,
        }
    }

    /// Renews the caller's current certificate: same names, same profile, the
    /// same key unless a CSR brings a new one. The current certificate must be
    /// one of ours, unexpired and unrevoked. The policy is asked again, as the
    /// requester that originally obtained the certificate, so tightening a rule
    /// also stops renewals; deny rules selecting the caller apply too. The
    /// lifetime it had is kept, cut to the policy's current maximum.
    pub async fn renew(&self, req: RenewRequest) -> Result<Issued, Error> {
        let now = self.clock.now();
        let current = LeafInfo::from_der(&req.current).map_err(|e| {
            Error::NotRenewable(format!("the presented certificate is unreadable: {e}"))
        })?;
        let serial = current.serial.to_hex();
        let row = self
            .store
            .certificate(&serial)
            .await?
            .filter(|r| r.der == req.current);
        let Some(row) = row else {
            let e = Error::NotRenewable(format!("certificate {serial} was not issued by this CA"));
            let names: Vec<String> = current.identifiers.iter().map(|i| i.to_string()).collect();
            return Err(self
                .record_refusal(
                    &req.caller,
                    &names,
                    "cert.renewal_denied",
                    current.public_key.key_type(),
                    "",
                    &e,
                )
                .await
                .err()
                .map_or(e, Error::from));
        };
        let refuse = |e: Error| async {
            self.record_refusal(
                &req.caller,
                &row.names,
                "cert.renewal_denied",
                current.public_key.key_type(),
                &row.profile,
                &e,
            )
            .await
            .err()
            .map_or(e, Error::from)
        };
        if let Some(rev) = self.store.revocation(&serial).await? {
            let e = Error::NotRenewable(format!(
                "certificate {serial} is revoked ({}); request a new one with a bootstrap token",
                sigil_core::revocation::reason_name(rev.reason)
            ));
            return Err(refuse(e).await);
        }
        if current.not_after <= now {
            let e = Error::NotRenewable(format!(
                "certificate {serial} expired at {}; request a new one with a bootstrap token",
                current.not_after
            ));
            return Err(refuse(e).await);
        }
        // A refused CSR is audited, so it takes from the caller's issuance
        // budget (as on Sign): repeating it cannot flood the audit log.
        let csr = match &req.csr {
            Some(bytes) => match Csr::parse(bytes) {
                Ok(csr) => Some(csr),
                Err(e) => {
                    self.take_rate_token(&req.caller)?;
                    return Err(refuse(Error::Csr(e)).await);
                }
            },
            None => None,
        };
        if let Some(csr) = &csr {
            let mut want: Vec<String> = current.identifiers.iter().map(|i| i.to_string()).collect();
            let mut got: Vec<String> = csr.identifiers().iter().map(|i| i.to_string()).collect();
            want.sort();
            got.sort();
            if want != got {
                let e = Error::NamesChanged(format!(
                    "a renewal keeps the certificate's names ({}); the CSR asks for {}",
                    want.join(", "),
                    got.join(", ")
                ));
                self.take_rate_token(&req.caller)?;
                return Err(refuse(e).await);
            }
        }
        let applicant = Applicant {
            identifiers: &current.identifiers,
            public_key: csr.as_ref().map_or(&current.public_key, |c| c.public_key()),
            // The subject stays what it was (services that identify peers by
            // CN or by the whole subject keep working), unless the renewal
            // CSR names another of the certificate's DNS names.
            common_name: csr
                .as_ref()
                .and_then(|c| c.common_name())
                .or(current.common_name.as_deref()),
        };
        let original = Requester::parse(&row.requester).ok_or_else(|| {
            Error::NotRenewable(format!(
                "certificate {serial} records an unknown requester '{}'",
                row.requester
            ))
        })?;
        let profile: Profile = row.profile.parse().map_err(|_| {
            Error::NotRenewable(format!(
                "certificate {serial} records an unknown profile '{}'",
                row.profile
            ))
        })?;
        // Keep the lifetime the certificate was issued with, unless it was cut
        // short at its issuer's expiry: then fall back to the default.
        let truncated = self
            .store
            .issuer(&row.issuer_id)
            .await?
            .is_some_and(|i| i.not_after == row.not_after);
        let lifetime = (!truncated).then(|| {
            Duration::from_secs(
                u64::try_from(row.not_after - row.not_before)
                    .unwrap_or(0)
                    .saturating_sub(sigil_core::template::BACKDATE.as_secs())
                    .max(60),
            )
            .min(self.settings.max_lifetime)
        });
        let ask = Ask {
            actor: &req.caller,
            policy_requester: &original,
            profile,
            lifetime,
            kind: "cert.renewed",
            renews: Some(&serial),
            token: None,
            not_before: None,
            completes: None,
        };
        self.issue_for(&applicant, ask).await
    }

    /// Revokes a certificate (see [`revoke::revoke`]); this node knows of it
    /// at once.
    pub async fn revoke(
        &self,
        serial: &Serial,
        reason: i32,
        by: &Requester,
    ) -> Result<Revoked, Error> {
        let r = revoke::revoke(&self.store, self.clock.now(), serial, reason, by).await;
        self.remember(r)
    }

    /// Revokes a certificate with a bootstrap token (see
    /// [`revoke::revoke_with_token`]); this node knows of it at once.
    pub async fn revoke_with_token(
        &self,
        serial: &Serial,
        reason: i32,
        grant: &TokenGrant,
    ) -> Result<Revoked, Error> {
        let r =
            revoke::revoke_with_token(&self.store, self.clock.now(), serial, reason, grant).await;
        self.remember(r)
    }

    /// Adds a revocation made here to the in-memory view (others arrive
    /// with the next sync).
    fn remember(&self, r: Result<Revoked, Error>) -> Result<Revoked, Error> {
        if let Ok(done) = &r {
            let mut revoked = write(&self.cache.revoked);
            revoked.insert(done.serial.to_hex());
            revoked.extend(done.same_key.iter().cloned());
            drop(revoked);
            if let Some(fp) = &done.blocked_key {
                write(&self.cache.blocked_keys).insert(fp.clone());
            }
        }
        r
    }

    /// Whether this node's view of the revocations is current (synced within
    /// a few [`SYNC_INTERVAL`]s).
    pub fn revocations_current(&self) -> bool {
        self.cache_is_fresh()
    }

    /// Whether a certificate (serial, lowercase hex) is revoked, from this
    /// node's view of the revocations (see [`Authority::is_revoked`]); `None`
    /// while that view is stale, when only the database can tell.
    pub fn revoked_in_memory(&self, serial_hex: &str) -> Option<bool> {
        self.cache_is_fresh()
            .then(|| read(&self.cache.revoked).contains(serial_hex))
    }

    /// Whether a certificate is revoked. Answered from memory while
    /// [`Authority::sync`] runs at least every [`SYNC_INTERVAL`] (a revocation
    /// made elsewhere, by another node or the CLI, is seen within about that
    /// long; one made here at once); otherwise from the database.
    pub async fn is_revoked(&self, serial: &Serial) -> Result<bool, Error> {
        let hex = serial.to_hex();
        if self.cache_is_fresh() {
            return Ok(read(&self.cache.revoked).contains(&hex));
        }
        Ok(self.store.revocation(&hex).await?.is_some())
    }

    /// Which of this CA's issuers (active or retired) signed `leaf` (whose
    /// DER is `der`): its issuer name must be that issuer's subject and its
    /// signature must verify with that issuer's key. A name alone is not
    /// enough: intermediates of other deployments under the same root may
    /// carry the same name. `known` is an issuer that verified this same
    /// certificate before: it is only checked to still be one of ours.
    pub async fn issuer_of(
        &self,
        der: &[u8],
        leaf: &LeafInfo,
        known: Option<&IssuerId>,
    ) -> Result<Option<IssuerId>, Error> {
        let issuers = if self.cache_is_fresh() {
            read(&self.cache.issuers).clone()
        } else {
            self.issuer_infos().await?
        };
        let mut named = issuers
            .iter()
            .filter(|i| i.subject_der == leaf.issuer_der)
            .peekable();
        if let Some(id) = known
            && let Some(i) = named.clone().find(|i| &i.id == id)
        {
            return Ok(Some(i.id.clone()));
        }
        if named.peek().is_none() {
            return Ok(None);
        }
        Ok(named
            .find(|i| sigil_core::template::verify_issued_by(der, i).is_ok())
            .map(|i| i.id.clone()))
    }

    fn cache_is_fresh(&self) -> bool {
        self.cache.synced_at_ms.load(Ordering::Acquire)
            > unix_ms(self.clock.now()) - 3 * SYNC_INTERVAL.as_millis() as i64
    }

    async fn issuer_infos(&self) -> Result<Vec<Arc<IssuerInfo>>, Error> {
        Ok(self
            .store
            .issuers()
            .await?
            .iter()
            .filter_map(|i| IssuerInfo::from_der(&i.cert_der).ok())
            .map(Arc::new)
            .collect())
    }

    /// Issues a new delegated OCSP responder for a loaded issuer. With
    /// `share`, it becomes the responder of every node: its key is kept in
    /// the issuer's token (a persistent object) or sealed in the database,
    /// and the row and its audit record are written together. Without, or
    /// when this node cannot share keys, the key stays with this process
    /// (in memory, or as a token session object).
    pub async fn new_ocsp_signer(
        &self,
        issuer_id: &str,
        lifetime: Duration,
        share: bool,
    ) -> Result<OcspSigner, Error> {
        let issuer = self.held_issuer(issuer_id)?;
        let info = issuer.info();
        // Not beyond the issuer's own expiry (RFC 5280 §6.1.3: a path is
        // valid only within every certificate's validity).
        let now = self.clock.now();
        let left = Duration::try_from(info.not_after - now).unwrap_or(Duration::ZERO);
        if left.is_zero() {
            return Err(Error::Unavailable(format!(
                "issuer {} has expired; it cannot certify an OCSP responder",
                info.id
            )));
        }
        let lifetime = lifetime.min(left);
        let serial = sigil_signer::random_serial()?;
        let keys = self.keys.clone().filter(|_| share);
        let label = format!("{}{}", ocsp_key_prefix(&info.id), serial.to_hex());
        // The key, where it lives, and what the database keeps of it.
        let (key, store, shared): (CaKey, &str, Option<(&str, Vec<u8>)>) =
            match (&issuer.token, keys) {
                (Some(token), Some(_)) => {
                    let t = token.clone();
                    let l = label.clone();
                    let key = tokio::task::spawn_blocking(move || {
                        t.token_key(sigil_core::KeySpec::EcdsaP256, &l)
                    })
                    .await
                    .map_err(|e| Error::Unavailable(format!("making a token key: {e}")))??;
                    (
                        key.into(),
                        "pkcs11",
                        Some(("pkcs11", label.clone().into_bytes())),
                    )
                }
                (Some(token), None) => (
                    token.session_key(sigil_core::KeySpec::EcdsaP256)?.into(),
                    "pkcs11-session",
                    None,
                ),
                (None, keys) => {
                    let (key, pkcs8) = SoftwareKey::generate(sigil_core::KeySpec::EcdsaP256)?;
                    // Sealing is deliberately slow (PBKDF2): off the runtime.
                    let sealed = match keys {
                        Some(k) => tokio::task::spawn_blocking(move || k.seal(&pkcs8))
                            .await
                            .map_err(|e| Error::Unavailable(format!("sealing a key: {e}")))?
                            .transpose()?,
                        None => None,
                    };
                    match sealed {
                        Some(blob) => (key.into(), "database", Some(("sealed", blob))),
                        None => (key.into(), "memory", None),
                    }
                }
            };
        let params = sigil_core::template::ocsp_signer_params(
            &info.subject,
            key.public_key(),
            &serial,
            now,
            lifetime,
        );
        let cert_der = issuer.signer.sign_ocsp_signer(&params, &key)?;
        let leaf = LeafInfo::from_der(&cert_der)?;
        let detail = json!({
            "issuer": info.id.as_str(),
            "not_after": leaf.not_after.unix_timestamp(),
            "sha256": sigil_core::sha256_hex(&cert_der),
            "key_store": store,
            "shared": shared.is_some(),
        });
        let event = AuditEvent {
            ts_ms: unix_ms(now),
            kind: "ocsp_signer.issued".into(),
            actor: "system".into(),
            subject: serial.to_hex(),
            detail,
        };
        let is_shared = shared.is_some();
        let previous = match &shared {
            Some(_) => self.store.ocsp_signer(info.id.as_str()).await?,
            None => None,
        };
        let committed = match shared {
            Some((kind, data)) => {
                self.store
                    .commit(Change::OcspSigner {
                        row: sigil_store::OcspSignerRow {
                            issuer_id: info.id.to_string(),
                            serial: serial.to_hex(),
                            cert_der: cert_der.clone(),
                            key_kind: kind.into(),
                            key_data: data,
                            not_after: leaf.not_after.unix_timestamp(),
                            created_at: now.unix_timestamp(),
                        },
                        event,
                    })
                    .await
            }
            None => self.store.commit(Change::Record(event)).await,
        };
        if let Err(e) = committed {
            if let Some(token) = issuer.token.as_ref().filter(|_| store == "pkcs11") {
                let _ = token.destroy_key(&label);
            }
            return Err(e.into());
        }
        // This issuer's responder keys in the token other than the new and
        // the replaced one (which other nodes may still use for a few
        // seconds) are from responders whose successor has long taken over:
        // remove them. Other issuers' responders (in overlap after a
        // rotation, or of another deployment) have their own prefix.
        if store == "pkcs11"
            && let Some(token) = issuer.token.clone()
        {
            let old = previous
                .filter(|p| p.key_kind == "pkcs11")
                .and_then(|p| String::from_utf8(p.key_data).ok());
            let keep: Vec<String> = [Some(label.clone()), old].into_iter().flatten().collect();
            let prefix = ocsp_key_prefix(&info.id);
            let cleaned = tokio::task::spawn_blocking(move || {
                let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
                token.destroy_keys_except(&prefix, &keep)
            })
            .await;
            match cleaned {
                Ok(Ok(n)) if n > 0 => tracing::info!(
                    removed = n,
                    "removed old OCSP responder keys from the token"
                ),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "removing old OCSP responder keys from the token failed")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "removing old OCSP responder keys from the token failed")
                }
            }
        }
        Ok(OcspSigner {
            key_hash: sigil_core::ocsp::key_hash(key.public_key()),
            key,
            serial: serial.to_hex(),
            shared: is_shared,
            cert_der,
            issuer_der: info.der.clone(),
            issuer_id: info.id.to_string(),
            not_after: leaf.not_after,
        })
    }

    /// Whether this node can make OCSP responders every node uses (it has a
    /// key store to seal their keys with, or a token to keep them in).
    pub fn shares_ocsp_signers(&self) -> bool {
        self.keys.is_some()
    }

    /// The shared OCSP responder stored for an issuer: its serial and
    /// notAfter (unix s), without opening its key.
    pub async fn stored_ocsp_signer(
        &self,
        issuer_id: &str,
    ) -> Result<Option<(String, i64)>, Error> {
        Ok(self
            .store
            .ocsp_signer(issuer_id)
            .await?
            .map(|r| (r.serial, r.not_after)))
    }

    /// Opens the shared OCSP responder stored for a loaded issuer: unseals
    /// its key, or opens it in the issuer's token.
    pub async fn open_ocsp_signer(&self, issuer_id: &str) -> Result<Option<OcspSigner>, Error> {
        let issuer = self.held_issuer(issuer_id)?;
        let Some(row) = self.store.ocsp_signer(issuer_id).await? else {
            return Ok(None);
        };
        let keys = self.keys.clone();
        let token = issuer.token.clone();
        let kind = row.key_kind.clone();
        let data = row.key_data.clone();
        let key: CaKey = tokio::task::spawn_blocking(move || -> Result<CaKey, Error> {
            match (kind.as_str(), token, keys) {
                ("pkcs11", Some(token), _) => {
                    let label = String::from_utf8(data).map_err(|_| {
                        Error::Unavailable("stored responder key label is not text".into())
                    })?;
                    Ok(token.open_key(&label)?.into())
                }
                ("sealed", _, Some(keys)) => keys.unseal(&data),
                (kind, _, _) => Err(Error::Unavailable(format!(
                    "this node cannot open the stored OCSP responder key ({kind})"
                ))),
            }
        })
        .await
        .map_err(|e| Error::Unavailable(format!("opening the responder key: {e}")))??;
        let leaf = LeafInfo::from_der(&row.cert_der)?;
        if leaf.public_key.raw() != key.public_key().raw() {
            return Err(Error::Unavailable(format!(
                "the stored OCSP responder {} does not match its key",
                row.serial
            )));
        }
        Ok(Some(OcspSigner {
            key_hash: sigil_core::ocsp::key_hash(key.public_key()),
            key,
            serial: row.serial,
            shared: true,
            cert_der: row.cert_der,
            issuer_der: issuer.info().der.clone(),
            issuer_id: issuer_id.to_string(),
            not_after: leaf.not_after,
        }))
    }

    fn held_issuer(&self, id: &str) -> Result<Arc<ActiveIssuer>, Error> {
        self.loaded_issuer(id)
            .ok_or_else(|| Error::Unavailable(format!("issuer {id} is not loaded on this node")))
    }

    /// What OCSP says about a serial of `issuer_id`: good, revoked, or unknown
    /// (never issued by it).
    pub async fn ocsp_status(
        &self,
        issuer_id: &str,
        serial: &Serial,
    ) -> Result<sigil_core::ocsp::Status, Error> {
        use sigil_core::ocsp::Status;
        let hex = serial.to_hex();
        let Some(row) = self.store.certificate(&hex).await? else {
            return Ok(Status::Unknown);
        };
        if row.issuer_id != issuer_id {
            return Ok(Status::Unknown);
        }
        Ok(match self.store.revocation(&hex).await? {
            Some(r) => Status::Revoked {
                at: OffsetDateTime::from_unix_timestamp(r.revoked_at)
                    .map_err(|e| Error::Internal(sigil_core::Error::Certificate(e.to_string())))?,
                reason: r.reason,
            },
            None => Status::Good,
        })
    }

    /// Revocations of an issuer's certificates that expire after `after` (unix s).
    pub async fn revocations_of(
        &self,
        issuer_id: &str,
        after: i64,
    ) -> Result<Vec<sigil_store::RevokedEntry>, Error> {
        Ok(self.store.crl_entries(issuer_id, after).await?)
    }

    /// Keeps pre-signed OCSP responses in the database.
    pub async fn save_ocsp(
        &self,
        rows: &[sigil_store::SignedOcsp],
        certs: &[sigil_store::OcspCerts],
    ) -> Result<(), Error> {
        Ok(self.store.save_ocsp(rows, certs).await?)
    }

    /// The stored responder `certs` fields that OCSP answers stored within
    /// the last `within` name.
    pub async fn ocsp_certs(&self, within: Duration) -> Result<Vec<sigil_store::OcspCerts>, Error> {
        let after = (self.clock.now().unix_timestamp())
            .saturating_sub(i64::try_from(within.as_secs()).unwrap_or(i64::MAX));
        Ok(self.store.ocsp_certs(after).await?)
    }

    /// Passes each stored OCSP response of an issuer valid for at least
    /// `margin` more and stored after `stored_after` (unix s; -1 for all) to
    /// `each`, one at a time.
    pub async fn stored_ocsp<F: FnMut(sigil_store::SignedOcsp) + Send>(
        &self,
        issuer_id: &str,
        margin: Duration,
        stored_after: i64,
        each: F,
    ) -> Result<(), Error> {
        let after =
            self.clock.now().unix_timestamp() + i64::try_from(margin.as_secs()).unwrap_or(0);
        Ok(self
            .store
            .stored_ocsp(issuer_id, after, stored_after, each)
            .await?)
    }

    /// Serials of an issuer's certificates that expire after `after` (unix s).
    pub async fn unexpired_serials(
        &self,
        issuer_id: &str,
        after: i64,
    ) -> Result<Vec<String>, Error> {
        Ok(self.store.unexpired_serials(issuer_id, after).await?)
    }

    /// The newest stored CRL of an issuer.
    pub async fn latest_crl(&self, issuer_id: &str) -> Result<Option<CrlRow>, Error> {
        Ok(self.store.latest_crl(issuer_id).await?)
    }

    /// Whether a public key was blocked by a keyCompromise revocation.
    pub async fn key_blocked(&self, key: &PublicKey) -> Result<bool, Error> {
        let fp = key.fingerprint();
        if self.cache_is_fresh() {
            return Ok(read(&self.cache.blocked_keys).contains(&fp));
        }
        Ok(self.store.key_blocked(&fp).await?)
    }

    /// The newest stored CRL of one time shard of an issuer.
    pub async fn shard_crl(&self, issuer_id: &str, shard: i64) -> Result<Option<CrlRow>, Error> {
        Ok(self.store.shard_crl(issuer_id, shard).await?)
    }

    /// The numbers of an issuer's newest stored CRLs (`None`: the full
    /// CRL, `Some(k)`: shard `k`), without their DER.
    pub async fn crl_versions(&self, issuer_id: &str) -> Result<Vec<(Option<i64>, i64)>, Error> {
        Ok(self.store.crl_versions(issuer_id).await?)
    }

    /// Signs and stores fresh CRLs for a loaded issuer, valid for
    /// `validity`: its full CRL first, then one per time shard (the shards
    /// configured now, and any shard a stored certificate names). Entries
    /// stay listed until `grace`, and at least `validity`, after their
    /// certificate expires. CRL
    /// numbers are taken from the database, so they grow across nodes too.
    pub async fn publish_crl(
        &self,
        issuer_id: &str,
        validity: Duration,
        grace: Duration,
    ) -> Result<Vec<CrlRow>, Error> {
        let issuer = self.held_issuer(issuer_id)?;
        let info = issuer.info();
        let id = info.id.to_string();
        // An entry stays until a regularly scheduled CRL (every validity/2)
        // issued after its certificate expired has listed it (RFC 5280 3.3).
        let keep = grace.max(validity);
        let min_not_after =
            self.clock.now().unix_timestamp() - i64::try_from(keep.as_secs()).unwrap_or(i64::MAX);
        let configured = self
            .settings
            .urls
            .crl_sharding()
            .map_or(0, |s| i64::from(s.count()));
        // The entries and the numbers come together, so a CRL numbered
        // higher than another never lists less.
        let snapshot = self
            .store
            .crl_snapshot(
                &id,
                min_not_after,
                configured,
                i64::from(sigil_core::CrlSharding::MAX_SHARDS),
            )
            .await?;
        let (first, shards, stored) = (snapshot.first_number, snapshot.shards, snapshot.entries);
        // Taken after the entries were read, and backdated like certificates
        // for relying parties whose clocks are a little behind, but never to
        // before the newest revocation it lists.
        let now = self.clock.now();
        let floor = now - sigil_core::template::BACKDATE;
        let this_update = stored
            .iter()
            .map(|e| e.revoked_at)
            .max()
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
            .map_or(floor, |t| t.max(floor))
            .min(now);
        let mut shard_of = Vec::with_capacity(stored.len());
        let mut entries = Vec::with_capacity(stored.len());
        for e in stored {
            shard_of.push(e.crl_shard);
            entries.push(sigil_core::crl::CrlEntry {
                serial: Serial::parse_hex(&e.serial).ok_or_else(|| {
                    Error::Internal(sigil_core::Error::Certificate(format!(
                        "stored serial '{}' is not hex",
                        e.serial
                    )))
                })?,
                revoked_at: OffsetDateTime::from_unix_timestamp(e.revoked_at).map_err(|err| {
                    Error::Internal(sigil_core::Error::Certificate(err.to_string()))
                })?,
                reason: e.reason,
            });
        }
        let next_update = now + validity;
        let urls = self.settings.urls.clone();
        // Building and signing a large CRL takes a while: off the runtime.
        let signer = issuer.clone();
        let rows = tokio::task::spawn_blocking(move || -> Result<Vec<CrlRow>, Error> {
            let info = signer.info();
            let sign = |shard: Option<i64>, number: i64, entries: &[sigil_core::crl::CrlEntry]| {
                let url = match shard {
                    Some(k) => urls.crl_shard(&info.id, u32::try_from(k).unwrap_or(0)),
                    None => urls.crl(&info.id),
                };
                let template = sigil_core::crl::CrlTemplate::new(&sigil_core::crl::CrlSpec {
                    issuer: info,
                    number: u64::try_from(number).unwrap_or(0),
                    this_update,
                    next_update,
                    entries,
                    url,
                    only_ca_certs: false,
                })?;
                Ok::<_, Error>(CrlRow {
                    issuer_id: info.id.to_string(),
                    shard,
                    number,
                    this_update: this_update.unix_timestamp(),
                    next_update: next_update.unix_timestamp(),
                    der: signer.signer.sign_crl(template)?,
                })
            };
            let mut by_shard: Vec<Vec<sigil_core::crl::CrlEntry>> =
                (0..shards).map(|_| Vec::new()).collect();
            for (e, shard) in entries.iter().zip(&shard_of) {
                if let Some(list) = shard
                    .and_then(|k| usize::try_from(k).ok())
                    .and_then(|k| by_shard.get_mut(k))
                {
                    list.push(e.clone());
                }
            }
            let mut rows = vec![sign(None, first, &entries)?];
            for (k, list) in (0i64..).zip(&by_shard) {
                rows.push(sign(Some(k), first + 1 + k, list)?);
            }
            Ok(rows)
        })
        .await
        .map_err(|e| Error::Unavailable(format!("signing CRLs: {e}")))??;
        self.store.save_crls(&rows).await?;
        Ok(rows)
    }

    /// Brings the in-memory view of revocations, blocked keys and issuers up
    /// to date with the database (revocations in commit order, so none is
    /// skipped whatever the nodes' clocks say), and carries out due issuer
    /// lifecycle steps. A server runs it every [`SYNC_INTERVAL`].
    pub async fn sync(&self) -> Result<Synced, Error> {
        let started = unix_ms(self.clock.now());
        let after = self.cache.revoked_upto.load(Ordering::Acquire);
        let rows = self.store.revoked_after(after).await?;
        let new: Vec<String> = rows.iter().map(|(s, _)| s.clone()).collect();
        let issuer_rows = self.store.issuers().await?;
        let issuers: Vec<Arc<IssuerInfo>> = issuer_rows
            .iter()
            .filter_map(|i| IssuerInfo::from_der(&i.cert_der).ok())
            .map(Arc::new)
            .collect();
        let cross: Vec<IssuerInfo> = self
            .store
            .cross_certs(self.clock.now().unix_timestamp())
            .await?
            .iter()
            .filter_map(|der| IssuerInfo::from_der(der).ok())
            .collect();
        // A key may also be blocked without a new revocation (a certificate
        // revoked earlier, found compromised later).
        let known = i64::try_from(read(&self.cache.blocked_keys).len()).unwrap_or(i64::MAX);
        let blocked = if !new.is_empty()
            || self.cache.synced_at_ms.load(Ordering::Acquire) == 0
            || self.store.blocked_key_count().await? != known
        {
            Some(self.store.blocked_keys().await?)
        } else {
            None
        };
        // Last of the fallible steps: once it has swapped in a new issuer
        // set, this sync must report it (a later one sees nothing changed).
        // A staged key this node cannot open must not stop it from seeing
        // revocations: report, keep the issuers it has, retry next time.
        let (issuers_changed, rotated) = match self.sync_issuers(issuer_rows).await {
            Ok(changed) => changed,
            Err(e) => {
                tracing::error!(error = %e, "following the issuers in the database failed; retrying");
                (false, false)
            }
        };
        let mut upto = after;
        {
            let mut set = write(&self.cache.revoked);
            for (serial, seq) in rows {
                upto = upto.max(seq);
                set.insert(serial);
            }
        }
        *write(&self.cache.issuers) = issuers;
        *write(&self.cache.cross_certs) = Some(Arc::new(cross));
        if let Some(b) = blocked {
            *write(&self.cache.blocked_keys) = b.into_iter().collect();
        }
        self.cache.revoked_upto.store(upto, Ordering::Release);
        self.cache.synced_at_ms.store(started, Ordering::Release);
        Ok(Synced {
            revoked: new,
            issuers_changed,
            rotated,
        })
    }

    /// Issuers not retired in the database (staged, active, previous) whose
    /// keys this node does not hold, as of the last sync: it cannot sign
    /// their CRLs or OCSP responses.
    pub fn unheld_issuers(&self) -> Vec<String> {
        read(&self.cache.listed)
            .iter()
            .filter(|id| self.loaded_issuer(id).is_none())
            .cloned()
            .collect()
    }

    /// The certificate row for a serial, if this CA issued it.
    pub async fn certificate(&self, serial: &Serial) -> Result<Option<CertificateRow>, Error> {
        Ok(self.store.certificate(&serial.to_hex()).await?)
    }

    /// Issuers that relying parties should trust now (staged, active and
    /// previous ones that have not expired), newest first, DER.
    pub async fn trusted_issuers(&self) -> Result<Vec<Vec<u8>>, Error> {
        let now = self.clock.now().unix_timestamp();
        Ok(self
            .store
            .issuers()
            .await?
            .into_iter()
            .filter(|i| i.state != IssuerState::Retired && i.not_after > now)
            .map(|i| i.cert_der)
            .collect())
    }

    /// Issues and counts the outcome (`sigil_issuances_total`, and
    /// `sigil_policy_denials_total` per deciding rule).
    async fn issue_for(&self, applicant: &Applicant<'_>, ask: Ask<'_>) -> Result<Issued, Error> {
        let profile = ask.profile.name();
        let entry_point = entry_point(ask.actor);
        let result = match self.take_rate_token(ask.actor) {
            Ok(()) => self.issue_inner(applicant, ask).await,
            Err(e) => {
                let names: Vec<String> = applicant
                    .identifiers
                    .iter()
                    .map(|i| i.to_string())
                    .collect();
                let kind = match ask.renews {
                    Some(_) => "cert.renewal_rate_limited",
                    None => "cert.rate_limited",
                };
                Err(self
                    .record_rate_limited(ask.actor, &names, kind, profile, e)
                    .await)
            }
        };
        let outcome = match &result {
            Ok(_) => "issued",
            Err(Error::Denied { decision, .. }) => {
                count_denials(decision);
                "denied"
            }
            Err(
                Error::Csr(_)
                | Error::OutsideConstraints(_)
                | Error::Lifetime(_)
                | Error::TokenScope(_)
                | Error::TokenReplayed(_)
                | Error::NotRenewable(_)
                | Error::NamesChanged(_)
                | Error::KeyCompromised(_),
            ) => "refused",
            Err(Error::RateLimited { .. }) => "rate_limited",
            Err(_) => "error",
        };
        metrics::counter!(
            "sigil_issuances_total",
            "profile" => profile,
            "entry_point" => entry_point,
            "result" => outcome
        )
        .increment(1);
        result
    }

    /// One issuance from `requester`'s per-minute budget (operators are
    /// not limited).
    fn take_rate_token(&self, requester: &Requester) -> Result<(), Error> {
        if matches!(requester, Requester::Operator(_)) {
            return Ok(());
        }
        let now_ms = unix_ms(self.clock.now());
        let mut limiter = self.limiter.lock().unwrap_or_else(|p| p.into_inner());
        limiter
            .take(&requester.to_string(), now_ms)
            .map_err(|retry_after| Error::RateLimited {
                message: format!(
                    "{requester} may have {} certificates per minute; retry in {retry_after} s",
                    limiter.rate()
                ),
                retry_after,
            })
    }

    async fn issue_inner(&self, applicant: &Applicant<'_>, ask: Ask<'_>) -> Result<Issued, Error> {
        let now = self.clock.now();
        let names: Vec<String> = applicant
            .identifiers
            .iter()
            .map(|i| i.to_string())
            .collect();
        let key_type = applicant.public_key.key_type();
        let issuer = self.active_issuer();
        let decision = match self.admit(applicant, &ask, &issuer).await {
            Ok(d) => d,
            Err(e) => return Err(self.refused(&ask, &names, key_type, e).await),
        };
        let profile = ask.profile;
        let info = issuer.info();
        let mut lifetime = ask.lifetime.unwrap_or_else(|| {
            decision
                .max_lifetime
                .map_or(self.settings.default_lifetime, |m| {
                    m.min(self.settings.default_lifetime)
                })
        });
        if let Some(m) = decision.max_lifetime {
            lifetime = lifetime.min(m);
        }
        // Validity starts now, or at a requested later time.
        let start = ask.not_before.map_or(now, |nb| nb.max(now));
        // Never outlive the issuer: truncate to its notAfter.
        let until_issuer_end = info.not_after - start;
        if info.not_after - now <= time::Duration::minutes(1) {
            return Err(Error::Unavailable(
                "the issuing CA has expired; install a new intermediate".into(),
            ));
        }
        if until_issuer_end <= time::Duration::minutes(1) {
            return Err(Error::Lifetime(format!(
                "the requested start {start} is after the issuing CA expires ({})",
                info.not_after
            )));
        }
        if time::Duration::try_from(lifetime).is_ok_and(|l| l > until_issuer_end) {
            lifetime = until_issuer_end.try_into().unwrap_or(lifetime);
        }

        let serial = sigil_signer::timed_serial(u64::try_from(unix_ms(now)).unwrap_or(0))?;
        let spec = LeafSpec {
            identifiers: applicant.identifiers,
            public_key: applicant.public_key,
            profile,
            serial: &serial,
            now: start,
            lifetime,
            preferred_cn: applicant.common_name,
        };
        let template = LeafTemplate::new(&spec, &issuer.common)?;
        // A key in a token signs by a blocking call (a network round trip
        // to an HSM, one session at a time): off the runtime. A software
        // key signs in microseconds, in place.
        let der = if issuer.token.is_some() {
            let signer = issuer.clone();
            tokio::task::spawn_blocking(move || signer.signer.sign_leaf(template))
                .await
                .map_err(|_| Error::Unavailable("the signing task failed".into()))??
        } else {
            issuer.signer.sign_leaf(template)?
        };
        check_issued_leaf(&der, &spec, info)?;
        let (not_before, not_after) = spec.validity();
        let mut detail = json!({
            "issuer": info.id.as_str(),
            "names": names,
            "profile": profile.name(),
            "key_type": key_type.to_string(),
            "not_after": not_after.unix_timestamp(),
            "rules": decision.allowing_rules(),
            "policy": &*decision.policy,
            // Lets `audit verify` tell the certificate row was not edited.
            "sha256": sigil_core::sha256_hex(&der),
        });
        if let Some(old) = ask.renews {
            detail["renews"] = json!(old);
        }
        if let Some(t) = ask.token {
            detail["token"] = json!(t.jti);
        }
        let hex = serial.to_hex();
        let committed = self
            .store
            .commit(Change::Issue {
                cert: NewCertificate {
                    serial: hex.clone(),
                    issuer_id: info.id.to_string(),
                    profile: profile.name().to_string(),
                    requester: ask.policy_requester.to_string(),
                    names: names.clone(),
                    key_fingerprint: applicant.public_key.fingerprint(),
                    not_before: not_before.unix_timestamp(),
                    not_after: not_after.unix_timestamp(),
                    issued_at: now.unix_timestamp(),
                    der: der.clone(),
                    crl_shard: issuer.common.crl_shard(not_after).map(i64::from),
                },
                token: ask.token.map(|t| SpentToken {
                    jti: t.jti.clone(),
                    subject: t.subject.clone(),
                    used_at: now.unix_timestamp(),
                    expires_at: t.expires_at,
                    serial: Some(hex.clone()),
                }),
                renews: ask.renews.map(str::to_string),
                completes: ask.completes.map(|c| Box::new((c.0)(&hex))),
                event: AuditEvent {
                    ts_ms: unix_ms(now),
                    kind: ask.kind.into(),
                    actor: ask.actor.to_string(),
                    subject: hex,
                    detail,
                },
            })
            .await;
        let receipt = match (committed, ask.token) {
            (Ok(r), _) => r,
            // Only the token's uniqueness can conflict here (serials are 128
            // random bits): another request spent it first.
            (Err(sigil_store::Error::Conflict(_)), Some(t)) => {
                let e = Error::TokenReplayed(format!("token {} was already used", t.jti));
                return Err(self.refused(&ask, &names, key_type, e).await);
            }
            // Revoked while this request was being made (it was checked on
            // arrival): refused, as it would have been a moment later.
            (Err(sigil_store::Error::KeyBlocked(fp)), _) => {
                write(&self.cache.blocked_keys).insert(fp.clone());
                let e = Error::KeyCompromised(format!(
                    "this public key (SHA-256 {fp}) was found compromised (a certificate of it was revoked for keyCompromise) while this request was being made; generate a new key"
                ));
                return Err(self.refused(&ask, &names, key_type, e).await);
            }
            (Err(sigil_store::Error::Revoked(old)), _) => {
                let e = Error::NotRenewable(format!(
                    "certificate {old} was revoked while its renewal was being made; request a new one with a bootstrap token"
                ));
                return Err(self.refused(&ask, &names, key_type, e).await);
            }
            (Err(e), _) => return Err(e.into()),
        };
        let (chain_pem, chain_der) = issuer.chain_of(&der);
        Ok(Issued {
            serial,
            der,
            chain_pem,
            chain_der,
            not_before,
            not_after,
            identifiers: applicant.identifiers.to_vec(),
            issuer_id: info.id.to_string(),
            receipt,
        })
    }

    /// Audits a refused request (on arrival, or when it was stored) and
    /// returns its error (or the audit's, if that failed).
    async fn refused(&self, ask: &Ask<'_>, names: &[String], key_type: KeyType, e: Error) -> Error {
        let kind = match (&e, ask.renews) {
            (Error::TokenReplayed(_), _) => "token.replayed",
            (_, Some(_)) => "cert.renewal_denied",
            _ => "cert.denied",
        };
        self.record_refusal(ask.actor, names, kind, key_type, ask.profile.name(), &e)
            .await
            .err()
            .map_or(e, Error::from)
    }

    /// The checks that may refuse a well-formed request; returns the policy decision.
    async fn admit(
        &self,
        applicant: &Applicant<'_>,
        ask: &Ask<'_>,
        issuer: &ActiveIssuer,
    ) -> Result<Decision, Error> {
        if let Some(nb) = ask.not_before {
            let ahead = nb - self.clock.now();
            if time::Duration::try_from(MAX_FUTURE_START).is_ok_and(|m| ahead > m) {
                return Err(Error::Lifetime(format!(
                    "a certificate may start at most {} from now (asked {nb})",
                    sigil_core::lifetime::format_duration(MAX_FUTURE_START)
                )));
            }
        }
        if let Some(l) = ask.lifetime {
            if l > self.settings.max_lifetime {
                return Err(Error::Lifetime(format!(
                    "requested lifetime {} exceeds this CA's maximum of {}",
                    sigil_core::lifetime::format_duration(l),
                    sigil_core::lifetime::format_duration(self.settings.max_lifetime)
                )));
            }
            if l < Duration::from_secs(60) {
                return Err(Error::Lifetime("lifetime must be at least 1 minute".into()));
            }
        }
        if let Some(token) = ask.token {
            if let Some(id) = applicant
                .identifiers
                .iter()
                .find(|id| !token.sans.contains(id))
            {
                return Err(Error::TokenScope(format!(
                    "the bootstrap token for '{}' does not cover {id} (it allows: {})",
                    token.subject,
                    token
                        .sans
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            if self.store.token_spent(&token.jti).await? {
                return Err(Error::TokenReplayed(format!(
                    "token {} was already used; bootstrap tokens are accepted once",
                    token.jti
                )));
            }
        }
        if self.key_blocked(applicant.public_key).await? {
            return Err(Error::KeyCompromised(format!(
                "this public key (SHA-256 {}) belongs to a certificate revoked for keyCompromise; generate a new key",
                applicant.public_key.fingerprint()
            )));
        }
        // A renewal keeps the certificate's lifetime as a preference: it is
        // cut to what the policy allows now (issue_for) rather than refused
        // when a rule's max_lifetime was lowered since.
        let asked_lifetime = ask.lifetime.filter(|_| ask.renews.is_none());
        let decision = self.check(
            ask.policy_requester,
            applicant.identifiers,
            ask.profile,
            applicant.public_key.key_type(),
            asked_lifetime,
        );
        if !decision.allowed {
            let reason = decision
                .denial_reason()
                .unwrap_or_else(|| "request not allowed".to_string());
            return Err(Error::Denied { reason, decision });
        }
        // A renewal is judged as the requester that first obtained the
        // certificate; deny rules that select the caller presenting it
        // apply too (deny wins, whoever asks).
        if ask.renews.is_some() && ask.actor != ask.policy_requester {
            let as_caller = self.check(
                ask.actor,
                applicant.identifiers,
                ask.profile,
                applicant.public_key.key_type(),
                asked_lifetime,
            );
            if let Some(f) = as_caller
                .findings
                .iter()
                .find(|f| f.outcome == sigil_policy::Outcome::Denied)
            {
                let reason = format!("{}: {} (as {})", f.identifier, f.reason, ask.actor);
                return Err(Error::Denied {
                    reason,
                    decision: as_caller,
                });
            }
        }
        let info = issuer.info();
        if let Some(id) = applicant
            .identifiers
            .iter()
            .find(|id| !info.name_constraints.permits(id))
        {
            return Err(Error::OutsideConstraints(format!(
                "{id} is outside the name constraints of the issuing CA {} (it may only issue for the names its root allowed)",
                info.subject
            )));
        }
        Ok(decision)
    }

    /// A request refused for going over the issuance rate: audited like any
    /// refusal, but only [`RATE_LIMITED_AUDITS_PER_MINUTE`] a minute per
    /// requester (a client retrying in a loop must not grow the audit table
    /// without bound); past that it is counted
    /// (`sigil_refusals_unaudited_total`). Returns the refusal, also when it
    /// could not be recorded (that is logged).
    async fn record_rate_limited(
        &self,
        actor: &Requester,
        names: &[String],
        kind: &str,
        profile: &str,
        limited: Error,
    ) -> Error {
        let within = self
            .rate_limited_audits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(&actor.to_string(), unix_ms(self.clock.now()))
            .is_ok();
        if !within {
            metrics::counter!("sigil_refusals_unaudited_total", "kind" => kind.to_string())
                .increment(1);
            return limited;
        }
        let mut detail = json!({ "names": names, "profile": profile });
        add_refusal(&mut detail, &limited);
        if let Error::RateLimited { retry_after, .. } = &limited {
            detail["retry_after"] = json!(retry_after);
        }
        let recorded = self.record_about(actor, names, kind, detail).await;
        // The caller hears of its limit (with when to retry) even if the
        // record failed.
        if let Err(e) = recorded {
            tracing::error!(error = %e, kind, "could not audit a rate-limited request");
        }
        limited
    }

    /// Audits a refusal. Returns the store's error if it could not be recorded.
    async fn record_refusal(
        &self,
        actor: &Requester,
        names: &[String],
        kind: &str,
        key_type: KeyType,
        profile: &str,
        err: &Error,
    ) -> Result<(), sigil_store::Error> {
        let mut detail = json!({
            "names": names,
            "profile": profile,
            "key_type": key_type.to_string(),
        });
        add_refusal(&mut detail, err);
        self.record_about(actor, names, kind, detail).await
    }

    /// Records an event about a request for `names` (its subject: the first).
    async fn record_about(
        &self,
        actor: &Requester,
        names: &[String],
        kind: &str,
        detail: serde_json::Value,
    ) -> Result<(), sigil_store::Error> {
        self.store
            .commit(Change::Record(AuditEvent {
                ts_ms: unix_ms(self.clock.now()),
                kind: kind.into(),
                actor: actor.to_string(),
                subject: names.first().cloned().unwrap_or_default(),
                detail,
            }))
            .await
            .map(|_| ())
    }

    /// Records an event with no other row (config changes, startup).
    pub async fn record(
        &self,
        kind: &str,
        actor: &str,
        subject: &str,
        detail: serde_json::Value,
    ) -> Result<AuditReceipt, Error> {
        Ok(self
            .store
            .commit(Change::Record(AuditEvent {
                ts_ms: unix_ms(self.clock.now()),
                kind: kind.into(),
                actor: actor.into(),
                subject: subject.into(),
                detail,
            }))
            .await?)
    }
}

/// Adds a refusal's reason to its audit detail and, for a policy denial,
/// the digest of the policy that decided.
fn add_refusal(detail: &mut serde_json::Value, err: &Error) {
    match err {
        Error::Denied { reason, decision } => {
            detail["reason"] = json!(reason);
            detail["policy"] = json!(&*decision.policy);
        }
        other => detail["reason"] = json!(other.to_string()),
    }
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// PEM-encodes DER with 64-column lines.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed expectation is a failure
    use super::*;

    /// Clean-up after making one issuer's responder matches only its keys:
    /// the other issuer's (in overlap, in the same token) are outside it.
    #[test]
    fn responder_key_prefixes_are_per_issuer() {
        let a = IssuerId::parse("0123456789abcdef0123456789abcdef").unwrap();
        let b = IssuerId::parse("fedcba98765432100123456789abcdef").unwrap();
        let serial = "5f3a";
        let label_a = format!("{}{serial}", ocsp_key_prefix(&a));
        let label_b = format!("{}{serial}", ocsp_key_prefix(&b));
        assert!(label_a.starts_with(OCSP_KEY_PREFIX));
        assert!(label_a.starts_with(&ocsp_key_prefix(&a)));
        assert!(!label_b.starts_with(&ocsp_key_prefix(&a)));
        assert!(!label_a.starts_with(&ocsp_key_prefix(&b)));
    }
}
