//! Certificate templates: what goes into a root, an intermediate and a leaf, and
//! the checks a template (before signing) and a certificate (after) must pass.

use crate::key::PublicKey;
use crate::names::Identifier;
use crate::{Error, Profile, Serial};
use der::{Decode, Encode};
use rcgen::{
    BasicConstraints, CertificateParams, CrlDistributionPoint, CustomExtension, DistinguishedName,
    DnType, GeneralSubtree, IsCa, KeyIdMethod, KeyUsagePurpose, NameConstraints, SanType,
    SerialNumber,
};
use std::fmt;
use std::time::Duration;
use time::OffsetDateTime;
use x509_cert::Certificate;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AccessDescription, AuthorityInfoAccessSyntax, BasicConstraints as X509Bc, SubjectAltName,
    SubjectKeyIdentifier,
};

/// How far a leaf's notBefore is backdated to tolerate client clock skew.
pub const BACKDATE: Duration = Duration::from_secs(60);

const ID_PE_AUTHORITY_INFO_ACCESS: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 1, 1];
const ID_AD_OCSP: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1");
const ID_AD_CA_ISSUERS: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.2");

/// Stable identifier of an issuing CA certificate: first 16 bytes of the SHA-256
/// of its DER, hex. Used in URLs (`/ca/<id>.crt`, `/crl/<id>.crl`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IssuerId(String);

impl IssuerId {
    /// Derives the id of a CA certificate.
    pub fn of(cert_der: &[u8]) -> IssuerId {
        IssuerId(crate::sha256_hex(cert_der)[..32].to_string())
    }

    /// Accepts a stored or URL-supplied id (32 lowercase hex characters).
    pub fn parse(s: &str) -> Option<IssuerId> {
        (s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| IssuerId(s.to_string()))
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IssuerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The public URLs written into certificates, from the configured base URL.
#[derive(Debug, Clone)]
pub struct CaUrls {
    base: String,
    sharding: Option<crate::crl::CrlSharding>,
}

impl CaUrls {
    /// `base` is the public plain-HTTP base URL, e.g. `http://ca.internal:8080`.
    pub fn new(base: &str) -> CaUrls {
        CaUrls {
            base: base.trim_end_matches('/').to_string(),
            sharding: None,
        }
    }

    /// Leaves issued from now on name a time-sharded CRL in their CRL DP.
    pub fn with_crl_sharding(mut self, sharding: Option<crate::crl::CrlSharding>) -> CaUrls {
        self.sharding = sharding;
        self
    }

    /// The CRL sharding new leaves get, if any.
    pub fn crl_sharding(&self) -> Option<crate::crl::CrlSharding> {
        self.sharding
    }

    /// The distribution point of one time shard of an issuer's CRL.
    pub fn crl_shard(&self, id: &IssuerId, shard: u32) -> String {
        format!("{}/crl/{id}/{shard}.crl", self.base)
    }

    /// The OCSP responder URL.
    pub fn ocsp(&self) -> String {
        format!("{}/ocsp", self.base)
    }

    /// The caIssuers URL of an issuer (DER certificate).
    pub fn ca_issuers(&self, id: &IssuerId) -> String {
        format!("{}/ca/{id}.crt", self.base)
    }

    /// The CRL distribution point of an issuer.
    pub fn crl(&self, id: &IssuerId) -> String {
        format!("{}/crl/{id}.crl", self.base)
    }
}

/// Facts about a CA certificate, parsed once.
#[derive(Debug, Clone)]
pub struct IssuerInfo {
    /// Id derived from the DER.
    pub id: IssuerId,
    /// The certificate DER.
    pub der: Vec<u8>,
    /// Subject as a printable string.
    pub subject: String,
    /// Subject exactly as encoded (issuer names are compared as DER).
    pub subject_der: Vec<u8>,
    /// Issuer as a printable string.
    pub issuer: String,
    /// The subject public key.
    pub public_key: PublicKey,
    /// Subject key identifier (or the RFC 7093 id of the key if absent).
    pub key_id: Vec<u8>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// basicConstraints cA flag.
    pub is_ca: bool,
    /// pathLenConstraint if any.
    pub path_len: Option<u8>,
    /// Name constraints the CA is bound by (empty when it has none).
    pub name_constraints: crate::constraints::NameConstraints,
}

impl IssuerInfo {
    /// Parses a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<IssuerInfo, Error> {
        let cert = Certificate::from_der(der).map_err(|e| Error::Certificate(e.to_string()))?;
        let tbs = cert.tbs_certificate();
        let spki_der = tbs
            .subject_public_key_info()
            .to_der()
            .map_err(|e| Error::Certificate(e.to_string()))?;
        let public_key = PublicKey::from_spki_der(&spki_der)?;
        let key_id = match tbs.get_extension::<SubjectKeyIdentifier>() {
            Ok(Some((_, ski))) => ski.0.as_bytes().to_vec(),
            _ => public_key.key_identifier(),
        };
        let (is_ca, path_len) = match tbs.get_extension::<X509Bc>() {
            Ok(Some((_, bc))) => (bc.ca, bc.path_len_constraint),
            _ => (false, None),
        };
        let name_constraints = match tbs.get_extension::<x509_cert::ext::pkix::NameConstraints>() {
            Ok(Some((_, nc))) => crate::constraints::NameConstraints::from_x509(&nc),
            Ok(None) => Default::default(),
            Err(e) => return Err(Error::Certificate(format!("name constraints: {e}"))),
        };
        Ok(IssuerInfo {
            name_constraints,
            id: IssuerId::of(der),
            der: der.to_vec(),
            subject: tbs.subject().to_string(),
            subject_der: tbs
                .subject()
                .to_der()
                .map_err(|e| Error::Certificate(e.to_string()))?,
            issuer: tbs.issuer().to_string(),
            public_key,
            key_id,
            not_before: to_offset(tbs.validity().not_before.to_unix_duration())?,
            not_after: to_offset(tbs.validity().not_after.to_unix_duration())?,
            is_ca,
            path_len,
        })
    }

    /// Parses a PEM or DER certificate.
    pub fn parse(input: &[u8]) -> Result<IssuerInfo, Error> {
        let der =
            crate::csr::decode_pem_or_der(input).map_err(|e| Error::Certificate(e.to_string()))?;
        IssuerInfo::from_der(&der)
    }

    /// Whether the subject equals the issuer (a self-issued root).
    pub fn is_self_issued(&self) -> bool {
        self.subject == self.issuer
    }
}

fn to_offset(d: Duration) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::from_unix_timestamp(d.as_secs() as i64)
        .map_err(|e| Error::Certificate(e.to_string()))
}

/// Truncates to whole seconds (certificates carry seconds only).
pub fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// Parameters of a self-signed root CA certificate.
pub fn root_params(
    subject: DistinguishedName,
    key: &PublicKey,
    serial: &Serial,
    now: OffsetDateTime,
    validity: Duration,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = subject;
    p.serial_number = Some(SerialNumber::from_slice(serial.as_bytes()));
    p.not_before = whole_seconds(now - BACKDATE);
    p.not_after = whole_seconds(now + validity);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.key_identifier_method = KeyIdMethod::PreSpecified(key.key_identifier());
    p.use_authority_key_identifier_extension = false;
    p
}

/// Options for an intermediate CA certificate signed by the root.
#[derive(Debug, Clone, Default)]
pub struct IntermediateOptions {
    /// pathLenConstraint (0: may issue only leaves).
    pub path_len: u8,
    /// Permitted DNS subtrees (name constraints), e.g. `svc.internal`: the
    /// name and everything below it (RFC 5280 has no "only below" form).
    pub permitted_dns: Vec<String>,
    /// Permitted IP subtrees (name constraints).
    pub permitted_ip: Vec<ipnet::IpNet>,
    /// CRL distribution point for the root's ARL, if published.
    pub crl_url: Option<String>,
    /// The subject key identifier to carry; by default derived from the
    /// key. A cross-certificate repeats the certified CA's own, which the
    /// authority key identifiers of everything below it name (RFC 5280
    /// 4.2.1.1), or path builders never link the two.
    pub subject_key_id: Option<Vec<u8>>,
}

/// Parameters of a delegated OCSP responder certificate (RFC 6960 4.2.2.2):
/// id-kp-OCSPSigning, id-pkix-ocsp-nocheck, digitalSignature, not a CA.
pub fn ocsp_signer_params(
    issuer_subject: &str,
    key: &PublicKey,
    serial: &Serial,
    now: OffsetDateTime,
    validity: Duration,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("OCSP responder for {issuer_subject}")
            .chars()
            .take(64)
            .collect::<String>(),
    );
    p.distinguished_name = dn;
    p.serial_number = Some(SerialNumber::from_slice(serial.as_bytes()));
    p.not_before = whole_seconds(now - BACKDATE);
    p.not_after = whole_seconds(now + validity);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::OcspSigning];
    p.key_identifier_method = KeyIdMethod::PreSpecified(key.key_identifier());
    p.use_authority_key_identifier_extension = true;
    // id-pkix-ocsp-nocheck: relying parties need not check this certificate's
    // own revocation status; its short lifetime stands in for that.
    p.custom_extensions = vec![CustomExtension::from_oid_content(
        &[1, 3, 6, 1, 5, 5, 7, 48, 1, 5],
        vec![0x05, 0x00],
    )];
    p
}

/// Parameters of an intermediate CA certificate.
pub fn intermediate_params(
    subject: DistinguishedName,
    key: &PublicKey,
    serial: &Serial,
    now: OffsetDateTime,
    validity: Duration,
    opts: &IntermediateOptions,
) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::default();
    p.distinguished_name = subject;
    p.serial_number = Some(SerialNumber::from_slice(serial.as_bytes()));
    p.not_before = whole_seconds(now - BACKDATE);
    p.not_after = whole_seconds(now + validity);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(opts.path_len));
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    p.key_identifier_method = KeyIdMethod::PreSpecified(
        opts.subject_key_id
            .clone()
            .unwrap_or_else(|| key.key_identifier()),
    );
    p.use_authority_key_identifier_extension = true;
    if !opts.permitted_dns.is_empty() || !opts.permitted_ip.is_empty() {
        let mut permitted = Vec::new();
        for d in &opts.permitted_dns {
            // RFC 5280 dNSName constraint "corp.example": the name and everything
            // below it. The syntax has no "only below" form (a leading dot is
            // invalid there), so one is refused rather than silently widened.
            if let Some(bare) = d.strip_prefix('.') {
                return Err(Error::Template(format!(
                    "name constraint {d}: an RFC 5280 DNS constraint always permits the name \
                     itself and every name below it, and cannot be written with a leading dot; \
                     use {bare}"
                )));
            }
            let n = crate::DnsName::parse(d)?;
            if n.is_wildcard() {
                return Err(Error::Template(format!(
                    "name constraint {d} may not be a wildcard"
                )));
            }
            permitted.push(GeneralSubtree::DnsName(n.as_str().to_string()));
        }
        for net in &opts.permitted_ip {
            let subnet = match net {
                ipnet::IpNet::V4(n) => {
                    rcgen::CidrSubnet::from_v4_prefix(n.network().octets(), n.prefix_len())
                }
                ipnet::IpNet::V6(n) => {
                    rcgen::CidrSubnet::from_v6_prefix(n.network().octets(), n.prefix_len())
                }
            };
            permitted.push(GeneralSubtree::IpAddress(subnet));
        }
        p.name_constraints = Some(NameConstraints {
            permitted_subtrees: permitted,
            excluded_subtrees: vec![],
        });
    }
    if let Some(url) = &opts.crl_url {
        p.crl_distribution_points = vec![CrlDistributionPoint {
            uris: vec![url.clone()],
        }];
    }
    Ok(p)
}

/// Everything that decides a leaf certificate's content. Built by the authority
/// from a policy-approved request; nothing here is copied from a CSR unchecked.
#[derive(Debug, Clone)]
pub struct LeafSpec<'a> {
    /// Policy-approved identifiers (the SANs, exactly).
    pub identifiers: &'a [Identifier],
    /// The subject public key (from the verified CSR).
    pub public_key: &'a PublicKey,
    /// The profile.
    pub profile: Profile,
    /// The serial.
    pub serial: &'a Serial,
    /// Issuance time (from the injected clock).
    pub now: OffsetDateTime,
    /// Lifetime from `now`.
    pub lifetime: Duration,
    /// The requester's preferred subject CN (used only if it is an approved DNS name).
    pub preferred_cn: Option<&'a str>,
}

impl LeafSpec<'_> {
    /// notBefore (backdated) and notAfter, in whole seconds.
    pub fn validity(&self) -> (OffsetDateTime, OffsetDateTime) {
        (
            whole_seconds(self.now - BACKDATE),
            whole_seconds(self.now + self.lifetime),
        )
    }
}

/// Per-issuer parts of every leaf, computed once per issuer.
#[derive(Debug, Clone)]
pub struct LeafCommon {
    aia: CustomExtension,
    crl_url: String,
    /// Sharding and the URL prefix of the shard CRLs (`.../crl/<id>/`).
    shards: Option<(crate::crl::CrlSharding, String)>,
}

impl LeafCommon {
    /// Builds the AIA (OCSP + caIssuers) and CRL DP for leaves of `issuer`.
    pub fn new(urls: &CaUrls, issuer: &IssuerId) -> Result<LeafCommon, Error> {
        let uri = |s: String| -> Result<GeneralName, Error> {
            Ok(GeneralName::UniformResourceIdentifier(
                der::asn1::Ia5String::new(&s).map_err(|e| Error::Template(e.to_string()))?,
            ))
        };
        let aia = AuthorityInfoAccessSyntax(vec![
            AccessDescription {
                access_method: ID_AD_OCSP,
                access_location: uri(urls.ocsp())?,
            },
            AccessDescription {
                access_method: ID_AD_CA_ISSUERS,
                access_location: uri(urls.ca_issuers(issuer))?,
            },
        ]);
        let der = aia.to_der().map_err(|e| Error::Template(e.to_string()))?;
        Ok(LeafCommon {
            aia: CustomExtension::from_oid_content(ID_PE_AUTHORITY_INFO_ACCESS, der),
            crl_url: urls.crl(issuer),
            shards: urls.crl_sharding().map(|s| {
                let url = urls.crl_shard(issuer, 0);
                let prefix = url.strip_suffix("0.crl").unwrap_or(&url).to_string();
                (s, prefix)
            }),
        })
    }

    /// The CRL shard of a leaf expiring at `not_after`, when sharding is on.
    pub fn crl_shard(&self, not_after: OffsetDateTime) -> Option<u32> {
        self.shards.as_ref().map(|(s, _)| s.shard_of(not_after))
    }

    /// The CRL distribution point of a leaf expiring at `not_after`.
    fn crl_url(&self, not_after: OffsetDateTime) -> String {
        match &self.shards {
            Some((s, prefix)) => format!("{prefix}{}.crl", s.shard_of(not_after)),
            None => self.crl_url.clone(),
        }
    }
}

/// A leaf template that passed its profile check. It can only be consumed by
/// [`LeafTemplate::sign`], so nothing unchecked is signed and nothing is signed twice.
#[derive(Debug)]
pub struct LeafTemplate {
    params: CertificateParams,
    public_key: PublicKey,
}

impl LeafTemplate {
    /// Builds and checks the template for `spec`.
    pub fn new(spec: &LeafSpec<'_>, common: &LeafCommon) -> Result<LeafTemplate, Error> {
        Ok(LeafTemplate {
            params: leaf_params(spec, common)?,
            public_key: spec.public_key.clone(),
        })
    }

    /// Signs the template once with the issuer's key; returns the certificate DER.
    pub fn sign(
        self,
        issuer: &rcgen::Issuer<'_, impl rcgen::SigningKey>,
    ) -> Result<Vec<u8>, Error> {
        let cert = self
            .params
            .signed_by(&self.public_key, issuer)
            .map_err(|e| Error::Template(format!("signing failed: {e}")))?;
        Ok(cert.der().to_vec())
    }
}

fn leaf_params(spec: &LeafSpec<'_>, common: &LeafCommon) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // CN is the first DNS name when it fits (64 chars max); otherwise the subject
    // is empty and the SAN extension becomes critical (RFC 5280 §4.1.2.6).
    let fits = |i: &&Identifier| matches!(i, Identifier::Dns(d) if d.as_str().len() <= 64);
    let preferred = spec.preferred_cn.and_then(|cn| {
        let cn = crate::DnsName::parse(cn).ok()?;
        spec.identifiers
            .iter()
            .filter(fits)
            .find(|i| matches!(i, Identifier::Dns(d) if *d == cn))
    });
    if let Some(Identifier::Dns(d)) = preferred.or_else(|| spec.identifiers.iter().find(fits)) {
        dn.push(DnType::CommonName, d.as_str());
    }
    p.distinguished_name = dn;
    p.subject_alt_names = spec
        .identifiers
        .iter()
        .map(san_of)
        .collect::<Result<_, _>>()?;
    p.serial_number = Some(SerialNumber::from_slice(spec.serial.as_bytes()));
    (p.not_before, p.not_after) = spec.validity();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = spec.profile.key_usages(spec.public_key.key_type());
    p.extended_key_usages = spec.profile.extended_key_usages();
    p.key_identifier_method = KeyIdMethod::PreSpecified(spec.public_key.key_identifier());
    p.use_authority_key_identifier_extension = true;
    p.crl_distribution_points = vec![CrlDistributionPoint {
        uris: vec![common.crl_url(p.not_after)],
    }];
    p.custom_extensions = vec![common.aia.clone()];
    check_leaf_params(&p, spec)?;
    Ok(p)
}

/// The pre-signing check: the template says exactly what the spec approved.
fn check_leaf_params(p: &CertificateParams, spec: &LeafSpec<'_>) -> Result<(), Error> {
    let fail = |m: &str| Err(Error::Template(m.to_string()));
    if spec.identifiers.is_empty() || p.subject_alt_names.len() != spec.identifiers.len() {
        return fail("SANs differ from the approved identifiers");
    }
    if !matches!(p.is_ca, IsCa::ExplicitNoCa) {
        return fail("leaf must be CA:FALSE");
    }
    if p.not_after <= p.not_before || spec.now - p.not_before > BACKDATE + Duration::from_secs(1) {
        return fail("validity window is wrong");
    }
    if p.serial_number.is_none() || p.extended_key_usages.is_empty() {
        return fail("serial or EKU missing");
    }
    Ok(())
}

fn san_of(id: &Identifier) -> Result<SanType, Error> {
    let ia5 =
        |s: &str| rcgen::string::Ia5String::try_from(s).map_err(|e| Error::Template(e.to_string()));
    Ok(match id {
        Identifier::Dns(d) => SanType::DnsName(ia5(d.as_str())?),
        Identifier::Ip(ip) => SanType::IpAddress(*ip),
        Identifier::Uri(u) => SanType::URI(ia5(u.as_str())?),
        Identifier::Email(e) => SanType::Rfc822Name(ia5(e)?),
    })
}

/// The post-signing check: parse what was signed and compare it with the spec.
/// A mismatch means a bug; the certificate must then not be released.
pub fn check_issued_leaf(
    der: &[u8],
    spec: &LeafSpec<'_>,
    issuer: &IssuerInfo,
) -> Result<(), Error> {
    let cert = Certificate::from_der(der).map_err(|e| Error::Certificate(e.to_string()))?;
    let tbs = cert.tbs_certificate();
    let fail = |m: &str| Err(Error::Template(format!("issued certificate check: {m}")));
    let got = tbs.serial_number().as_bytes();
    let got = got.strip_prefix(&[0u8]).unwrap_or(got);
    if got != spec.serial.as_bytes() {
        return fail("serial differs");
    }
    let spki = tbs
        .subject_public_key_info()
        .to_der()
        .map_err(|e| Error::Certificate(e.to_string()))?;
    if spki != spec.public_key.spki_der() {
        return fail("public key differs from the CSR's");
    }
    if tbs.issuer().to_der().ok().as_deref() != Some(issuer.subject_der.as_slice()) {
        return fail("issuer name differs from the issuing CA's subject");
    }
    let sans = match tbs.get_extension::<SubjectAltName>() {
        Ok(Some((_, san))) => san.0,
        _ => return fail("subjectAltName missing"),
    };
    // The template writes the approved identifiers in order, already normalized,
    // so each SAN must equal its identifier exactly.
    let same = |gn: &GeneralName, id: &Identifier| match (gn, id) {
        (GeneralName::DnsName(s), Identifier::Dns(d)) => s.as_str() == d.as_str(),
        (GeneralName::IpAddress(o), Identifier::Ip(_)) => {
            Identifier::from_ip_bytes(o.as_bytes()).ok().as_ref() == Some(id)
        }
        (GeneralName::UniformResourceIdentifier(s), Identifier::Uri(u)) => s.as_str() == u.as_str(),
        (GeneralName::Rfc822Name(s), Identifier::Email(e)) => s.as_str() == e,
        _ => false,
    };
    if sans.len() != spec.identifiers.len()
        || !sans
            .iter()
            .zip(spec.identifiers)
            .all(|(gn, id)| same(gn, id))
    {
        return fail("subjectAltName differs from the approved identifiers");
    }
    match tbs.get_extension::<X509Bc>() {
        Ok(Some((true, bc))) if !bc.ca => {}
        _ => return fail("basicConstraints must be critical CA:FALSE"),
    }
    Ok(())
}

/// Verifies that `child_der` was signed by `parent`'s key and names it as issuer.
pub fn verify_issued_by(child_der: &[u8], parent: &IssuerInfo) -> Result<(), Error> {
    let cert = Certificate::from_der(child_der).map_err(|e| Error::Certificate(e.to_string()))?;
    crate::csr::verify_signed(child_der, &parent.public_key).map_err(|_| {
        Error::Certificate(format!(
            "certificate is not signed by {} (signature does not verify)",
            parent.subject
        ))
    })?;
    let issuer = cert.tbs_certificate().issuer();
    if issuer.to_der().ok().as_deref() != Some(parent.subject_der.as_slice()) {
        return Err(Error::Certificate(format!(
            "certificate names issuer '{issuer}', expected '{}'",
            parent.subject
        )));
    }
    Ok(())
}
