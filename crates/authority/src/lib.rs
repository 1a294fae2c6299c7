//! Sigil's registration authority: the one path every certificate takes,
//! whichever door it came through (CLI, gRPC, ACME).
//!
//! parse + verify CSR → policy (denials audited) → build template → self-check →
//! sign once → post-sign check → durable commit of certificate + audit → chain.

mod error;

pub use error::Error;

use serde_json::json;
use sigil_core::template::{LeafCommon, LeafSpec, LeafTemplate, check_issued_leaf};
use sigil_core::{CaUrls, Clock, Csr, Identifier, IssuerInfo, KeyType, Profile, Requester, Serial};
use sigil_policy::{Decision, Policy, Request};
use sigil_signer::{CaSigner, SoftwareKey};
use sigil_store::{AuditEvent, AuditReceipt, Change, NewCertificate, NewIssuer, Store};
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
}

/// The online issuing CA: its signer, per-issuer leaf parts and chain.
pub struct ActiveIssuer {
    signer: CaSigner<SoftwareKey>,
    common: LeafCommon,
    /// The issuer certificate and, when known, its parents up to (excluding) the root, PEM.
    chain_pem: String,
}

impl std::fmt::Debug for ActiveIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ActiveIssuer({})", self.signer.info().id)
    }
}

impl ActiveIssuer {
    /// Pairs the intermediate certificate with its key.
    pub fn new(cert_der: &[u8], key: SoftwareKey, urls: &CaUrls) -> Result<ActiveIssuer, Error> {
        let signer = CaSigner::new(cert_der, key)?;
        if !signer.info().is_ca {
            return Err(Error::Config(
                "the issuer certificate is not a CA (basicConstraints cA=FALSE)".into(),
            ));
        }
        let common = LeafCommon::new(urls, &signer.info().id)?;
        Ok(ActiveIssuer {
            chain_pem: pem("CERTIFICATE", cert_der),
            signer,
            common,
        })
    }

    /// Facts about the issuer certificate.
    pub fn info(&self) -> &IssuerInfo {
        self.signer.info()
    }
}

/// Everything a caller supplies to get a certificate.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// PKCS#10, PEM or DER.
    pub csr: Vec<u8>,
    /// Who asks (already authenticated by the entry point).
    pub requester: Requester,
    /// Requested profile (default `mtls`).
    pub profile: Option<Profile>,
    /// Requested lifetime (default from settings, bounded by policy).
    pub lifetime: Option<Duration>,
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

/// The registration authority.
pub struct Authority {
    clock: Arc<dyn Clock>,
    policy: RwLock<Arc<Policy>>,
    issuer: RwLock<Arc<ActiveIssuer>>,
    store: Store,
    settings: Settings,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Assembles the authority. The issuer must already be installed in `store`.
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
            issuer: RwLock::new(Arc::new(issuer)),
            store,
            settings,
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The issuer currently taking new issuance.
    pub fn active_issuer(&self) -> Arc<ActiveIssuer> {
        match self.issuer.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
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
            key_type,
            lifetime,
        })
    }

    /// Issues a certificate. Returns only after certificate and audit row are durable.
    /// Every refusal of a well-formed request (policy, lifetime, name constraints)
    /// is audited before the error is returned.
    pub async fn issue(&self, req: IssueRequest) -> Result<Issued, Error> {
        let csr = Csr::parse(&req.csr)?;
        let profile = req.profile.unwrap_or_default();
        let now = self.clock.now();
        let names: Vec<String> = csr.identifiers().iter().map(|i| i.to_string()).collect();
        let issuer = self.active_issuer();
        let decision = match self.admit(&req, &csr, profile, &issuer) {
            Ok(d) => d,
            Err(e) => return Err(self.refuse(&req, &csr, &names, profile, now, e).await),
        };
        let info = issuer.info();
        let mut lifetime = req.lifetime.unwrap_or_else(|| {
            decision
                .max_lifetime
                .map_or(self.settings.default_lifetime, |m| {
                    m.min(self.settings.default_lifetime)
                })
        });
        // Never outlive the issuer: truncate to its notAfter.
        let until_issuer_end = info.not_after - now;
        if until_issuer_end <= time::Duration::minutes(1) {
            return Err(Error::Unavailable(
                "the issuing CA has expired; install a new intermediate".into(),
            ));
        }
        if time::Duration::try_from(lifetime).is_ok_and(|l| l > until_issuer_end) {
            lifetime = until_issuer_end.try_into().unwrap_or(lifetime);
        }

        let serial = sigil_signer::random_serial()?;
        let spec = LeafSpec {
            identifiers: csr.identifiers(),
            public_key: csr.public_key(),
            profile,
            serial: &serial,
            now,
            lifetime,
            preferred_cn: csr.common_name(),
        };
        let template = LeafTemplate::new(&spec, &issuer.common)?;
        let der = issuer.signer.sign_leaf(template)?;
        check_issued_leaf(&der, &spec, info)?;
        let (not_before, not_after) = spec.validity();
        let receipt = self
            .store
            .commit(Change::Issue {
                cert: NewCertificate {
                    serial: serial.to_hex(),
                    issuer_id: info.id.to_string(),
                    profile: profile.name().to_string(),
                    requester: req.requester.to_string(),
                    names: names.clone(),
                    key_fingerprint: csr.public_key().fingerprint(),
                    not_before: not_before.unix_timestamp(),
                    not_after: not_after.unix_timestamp(),
                    issued_at: now.unix_timestamp(),
                    der: der.clone(),
                },
                event: AuditEvent {
                    ts_ms: unix_ms(now),
                    kind: "cert.issued".into(),
                    actor: req.requester.to_string(),
                    subject: serial.to_hex(),
                    detail: json!({
                        "issuer": info.id.as_str(),
                        "names": names,
                        "profile": profile.name(),
                        "key_type": csr.key_type().to_string(),
                        "not_after": not_after.unix_timestamp(),
                        "rules": decision.allowing_rules(),
                    }),
                },
            })
            .await?;
        let chain_pem = format!("{}{}", pem("CERTIFICATE", &der), issuer.chain_pem);
        Ok(Issued {
            serial,
            der,
            chain_pem,
            not_before,
            not_after,
            identifiers: csr.identifiers().to_vec(),
            issuer_id: info.id.to_string(),
            receipt,
        })
    }

    /// The checks that may refuse a well-formed request; returns the policy decision.
    fn admit(
        &self,
        req: &IssueRequest,
        csr: &Csr,
        profile: Profile,
        issuer: &ActiveIssuer,
    ) -> Result<Decision, Error> {
        if let Some(l) = req.lifetime {
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
        let decision = self.check(
            &req.requester,
            csr.identifiers(),
            profile,
            csr.key_type(),
            req.lifetime,
        );
        if !decision.allowed {
            let reason = decision
                .denial_reason()
                .unwrap_or_else(|| "request not allowed".to_string());
            return Err(Error::Denied { reason, decision });
        }
        let info = issuer.info();
        if let Some(id) = csr
            .identifiers()
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

    /// Audits a refusal; returns the error for the caller (or the store's, if
    /// the refusal could not be recorded).
    async fn refuse(
        &self,
        req: &IssueRequest,
        csr: &Csr,
        names: &[String],
        profile: Profile,
        now: OffsetDateTime,
        err: Error,
    ) -> Error {
        let reason = match &err {
            Error::Denied { reason, .. } => reason.clone(),
            other => other.to_string(),
        };
        let recorded = self
            .store
            .commit(Change::Record(AuditEvent {
                ts_ms: unix_ms(now),
                kind: "cert.denied".into(),
                actor: req.requester.to_string(),
                subject: names.first().cloned().unwrap_or_default(),
                detail: json!({
                    "names": names,
                    "profile": profile.name(),
                    "key_type": csr.key_type().to_string(),
                    "reason": reason,
                }),
            }))
            .await;
        match recorded {
            Ok(_) => err,
            Err(e) => e.into(),
        }
    }

    /// Records a ceremony install: the issuer row and its audit event, atomically.
    pub async fn install_issuer(
        store: &Store,
        info: &IssuerInfo,
        actor: &str,
        now: OffsetDateTime,
    ) -> Result<AuditReceipt, Error> {
        Ok(store
            .commit(Change::InstallIssuer {
                issuer: NewIssuer {
                    id: info.id.to_string(),
                    cert_der: info.der.clone(),
                    subject: info.subject.clone(),
                    not_before: info.not_before.unix_timestamp(),
                    not_after: info.not_after.unix_timestamp(),
                    installed_at: now.unix_timestamp(),
                },
                event: AuditEvent {
                    ts_ms: unix_ms(now),
                    kind: "issuer.installed".into(),
                    actor: actor.to_string(),
                    subject: info.id.to_string(),
                    detail: json!({
                        "subject": info.subject,
                        "issuer": info.issuer,
                        "not_after": info.not_after.unix_timestamp(),
                        "sha256": sigil_core::sha256_hex(&info.der),
                    }),
                },
            })
            .await?)
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
