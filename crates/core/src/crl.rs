//! Certificate revocation lists (RFC 5280 section 5): what goes into one.

use crate::template::IssuerInfo;
use crate::{Error, Serial};
use rcgen::{
    CertificateRevocationListParams, CrlDistributionPoint, CrlIssuingDistributionPoint, CrlScope,
    KeyIdMethod, RevocationReason, SerialNumber,
};
use time::OffsetDateTime;

/// Time-sharded CRLs, the scheme large public CAs use to keep each CRL
/// small: every certificate gets one of `count` shards by its notAfter
/// (`notAfter / width`, modulo `count`), its CRL DP names that shard's CRL,
/// and each shard CRL lists only its own certificates. Certificates expiring
/// close together share a shard, so a shard's entries age out together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrlSharding {
    count: u32,
    width_secs: u64,
}

impl CrlSharding {
    /// Most shards an issuer may have.
    pub const MAX_SHARDS: u32 = 4096;

    /// `count` shards (1 to [`Self::MAX_SHARDS`]), each covering `width` of
    /// notAfter time (at least a minute) before the shards repeat.
    pub fn new(count: u32, width: std::time::Duration) -> Result<CrlSharding, Error> {
        if count == 0 || count > Self::MAX_SHARDS {
            return Err(Error::Template(format!(
                "CRL shard count must be 1 to {} (got {count})",
                Self::MAX_SHARDS
            )));
        }
        if width.as_secs() < 60 {
            return Err(Error::Template(
                "CRL shard width must be at least 1 minute".into(),
            ));
        }
        Ok(CrlSharding {
            count,
            width_secs: width.as_secs(),
        })
    }

    /// How many shards there are.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The shard of a certificate expiring at `not_after`.
    pub fn shard_of(&self, not_after: OffsetDateTime) -> u32 {
        let t = u64::try_from(not_after.unix_timestamp()).unwrap_or(0);
        // The remainder is below `count`, a u32.
        u32::try_from((t / self.width_secs) % u64::from(self.count)).unwrap_or(0)
    }
}

/// One revoked certificate.
#[derive(Debug, Clone)]
pub struct CrlEntry {
    /// Its serial.
    pub serial: Serial,
    /// When it was revoked.
    pub revoked_at: OffsetDateTime,
    /// CRLReason code.
    pub reason: i32,
}

/// Everything a CRL states.
#[derive(Debug)]
pub struct CrlSpec<'a> {
    /// The issuing CA.
    pub issuer: &'a IssuerInfo,
    /// CRL number (grows with every CRL of this issuer).
    pub number: u64,
    /// thisUpdate.
    pub this_update: OffsetDateTime,
    /// nextUpdate.
    pub next_update: OffsetDateTime,
    /// The revoked certificates.
    pub entries: &'a [CrlEntry],
    /// Where this CRL is published (its Issuing Distribution Point, which
    /// matches the CRL DP in the issuer's certificates; unused for an ARL).
    pub url: String,
    /// A root's ARL (its revoked CA certificates; no Issuing Distribution
    /// Point) rather than an issuer's CRL of end-entity certificates.
    pub only_ca_certs: bool,
}

/// A checked CRL, ready to be signed by its issuer.
///
/// The header and CRL extensions are encoded by rcgen; the revoked entries
/// (possibly millions) are streamed into one buffer of exactly the right size,
/// so a CRL costs about twice its DER size in memory, not ten times.
#[derive(Debug)]
pub struct CrlTemplate<'a> {
    /// Everything but the entries.
    head: CertificateRevocationListParams,
    entries: &'a [CrlEntry],
}

fn reason(code: i32) -> Result<Option<RevocationReason>, Error> {
    Ok(Some(match code {
        // RFC 5280 5.3.1: the reason code extension SHOULD be absent
        // instead of using unspecified (0).
        0 => return Ok(None),
        1 => RevocationReason::KeyCompromise,
        2 => RevocationReason::CaCompromise,
        3 => RevocationReason::AffiliationChanged,
        4 => RevocationReason::Superseded,
        5 => RevocationReason::CessationOfOperation,
        9 => RevocationReason::PrivilegeWithdrawn,
        10 => RevocationReason::AaCompromise,
        other => {
            return Err(Error::Template(format!(
                "reason code {other} cannot appear in a CRL"
            )));
        }
    }))
}

impl<'a> CrlTemplate<'a> {
    /// Builds the CRL: AKI from the issuer's SKI, an Issuing Distribution
    /// Point limited to end-entity certificates, reasons on each entry.
    pub fn new(spec: &CrlSpec<'a>) -> Result<CrlTemplate<'a>, Error> {
        if spec.next_update <= spec.this_update {
            return Err(Error::Template(
                "CRL nextUpdate must follow thisUpdate".into(),
            ));
        }
        for e in spec.entries {
            reason(e.reason)?;
        }
        Ok(CrlTemplate {
            head: CertificateRevocationListParams {
                this_update: crate::template::whole_seconds(spec.this_update),
                next_update: crate::template::whole_seconds(spec.next_update),
                crl_number: SerialNumber::from(spec.number),
                // An issuer's CRL names its distribution point and scope. A
                // root's ARL carries none: it must also cover the self-signed
                // root, which has no CRL DP, or `openssl verify -crl_check_all`
                // calls the scope different (RFC 5280 6.3.3 b).
                issuing_distribution_point: (!spec.only_ca_certs).then(|| {
                    CrlIssuingDistributionPoint {
                        distribution_point: CrlDistributionPoint {
                            uris: vec![spec.url.clone()],
                        },
                        scope: Some(CrlScope::UserCertsOnly),
                    }
                }),
                revoked_certs: Vec::new(),
                key_identifier_method: KeyIdMethod::PreSpecified(spec.issuer.key_id.clone()),
            },
            entries: spec.entries,
        })
    }

    /// Signs the CRL with the issuer (consuming the template).
    pub fn sign(
        self,
        issuer: &rcgen::Issuer<'_, impl rcgen::SigningKey>,
    ) -> Result<Vec<u8>, Error> {
        // rcgen signs the CRL without entries: its header, extensions and
        // signature algorithm are those of the final CRL.
        let empty = self
            .head
            .signed_by(issuer)
            .map_err(|e| Error::Template(format!("signing the CRL: {e}")))?
            .der()
            .to_vec();
        if self.entries.is_empty() {
            return Ok(empty);
        }
        with_entries(&empty, self.entries, |tbs| {
            issuer
                .key()
                .sign(tbs)
                .map_err(|e| Error::Template(format!("signing the CRL: {e}")))
        })
    }
}

/// `revokedCertificates` entry: SEQUENCE { userCertificate, revocationDate,
/// crlEntryExtensions OPTIONAL } (RFC 5280 5.1).
#[derive(der::Sequence)]
struct RevokedEntry<'a> {
    serial: der::asn1::UintRef<'a>,
    revocation_date: x509_cert::time::Time,
    extensions: Option<der::asn1::AnyRef<'a>>,
}

/// The crlEntryExtensions (one non-critical reasonCode) of each reason.
fn reason_extensions() -> Result<Vec<(i32, Vec<u8>)>, Error> {
    use der::Encode;
    use x509_cert::ext::pkix::CrlReason;
    let bad = |e: der::Error| Error::Template(format!("CRL entry extension: {e}"));
    [
        (1, CrlReason::KeyCompromise),
        (2, CrlReason::CaCompromise),
        (3, CrlReason::AffiliationChanged),
        (4, CrlReason::Superseded),
        (5, CrlReason::CessationOfOperation),
        (9, CrlReason::PrivilegeWithdrawn),
        (10, CrlReason::AaCompromise),
    ]
    .into_iter()
    .map(|(code, r)| {
        let ext = x509_cert::ext::Extension {
            extn_id: const_oid::db::rfc5280::ID_CE_CRL_REASONS,
            critical: false,
            extn_value: der::asn1::OctetString::new(r.to_der().map_err(bad)?).map_err(bad)?,
        };
        Ok((code, vec![ext].to_der().map_err(bad)?))
    })
    .collect()
}

/// Splits DER into its top-level TLVs.
fn tlvs(mut input: &[u8]) -> Result<Vec<&[u8]>, Error> {
    use der::{Decode, Encode};
    let bad = |e: der::Error| Error::Template(format!("CRL encoding: {e}"));
    let mut out = Vec::new();
    while !input.is_empty() {
        let header = der::Header::from_der_partial(input).map_err(bad)?.0;
        let total = (header.encoded_len().map_err(bad)? + header.length()).map_err(bad)?;
        let n = usize::try_from(total).map_err(bad)?;
        let (tlv, rest) = input
            .split_at_checked(n)
            .ok_or_else(|| Error::Template("CRL encoding: truncated".into()))?;
        out.push(tlv);
        input = rest;
    }
    Ok(out)
}

/// The value of one TLV (its header removed).
fn value_of(tlv: &[u8]) -> Result<&[u8], Error> {
    use der::{Decode, Encode};
    let bad = |e: der::Error| Error::Template(format!("CRL encoding: {e}"));
    let header = der::Header::from_der_partial(tlv).map_err(bad)?.0;
    let skip = usize::try_from(header.encoded_len().map_err(bad)?).map_err(bad)?;
    tlv.get(skip..)
        .ok_or_else(|| Error::Template("CRL encoding: truncated".into()))
}

fn header_der(tag: der::Tag, len: usize) -> Result<Vec<u8>, Error> {
    use der::Encode;
    let bad = |e: der::Error| Error::Template(format!("CRL encoding: {e}"));
    der::Header::new(tag, der::Length::try_from(len).map_err(bad)?)
        .to_der()
        .map_err(bad)
}

fn revoked_entry<'x>(
    e: &'x CrlEntry,
    extensions: &[(i32, der::asn1::AnyRef<'x>)],
) -> Result<RevokedEntry<'x>, Error> {
    let bad = |e: der::Error| Error::Template(format!("CRL entry: {e}"));
    let secs = u64::try_from(crate::template::whole_seconds(e.revoked_at).unix_timestamp())
        .map_err(|_| Error::Template("revocation time before 1970".into()))?;
    let when =
        der::DateTime::from_unix_duration(std::time::Duration::from_secs(secs)).map_err(bad)?;
    Ok(RevokedEntry {
        serial: der::asn1::UintRef::new(e.serial.as_bytes()).map_err(bad)?,
        revocation_date: when.into(),
        extensions: extensions
            .iter()
            .find(|(c, _)| *c == e.reason)
            .map(|(_, ext)| *ext),
    })
}

/// Inserts `entries` into a signed CRL without entries and signs it again:
/// the TBS gets `revokedCertificates` before its `[0] crlExtensions`.
fn with_entries(
    empty: &[u8],
    entries: &[CrlEntry],
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, Error>,
) -> Result<Vec<u8>, Error> {
    use der::Encode;
    let bad = |e: der::Error| Error::Template(format!("CRL entry: {e}"));
    let outer = tlvs(value_of(empty)?)?;
    let [tbs, algorithm, _signature] = outer.as_slice() else {
        return Err(Error::Template(
            "CRL encoding: not a CertificateList".into(),
        ));
    };
    let fields = tlvs(value_of(tbs)?)?;
    let split = fields
        .iter()
        .position(|f| f.first() == Some(&0xa0))
        .unwrap_or(fields.len());
    let (before, after) = fields.split_at(split);

    let encoded = reason_extensions()?;
    let extensions = encoded
        .iter()
        .map(|(code, d)| {
            use der::Decode;
            Ok((*code, der::asn1::AnyRef::from_der(d).map_err(bad)?))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let entry = |e| revoked_entry(e, &extensions);
    // Pass 1: sizes, so that each buffer is allocated once at its final size.
    let mut revoked_len = 0usize;
    for e in entries {
        let n = entry(e)?.encoded_len().map_err(bad)?;
        revoked_len += usize::try_from(n).map_err(bad)?;
    }
    let revoked_header = header_der(der::Tag::Sequence, revoked_len)?;
    let tbs_len = before.iter().chain(after).map(|f| f.len()).sum::<usize>()
        + revoked_header.len()
        + revoked_len;
    let tbs_header = header_der(der::Tag::Sequence, tbs_len)?;
    let mut tbs = Vec::with_capacity(tbs_header.len() + tbs_len);
    tbs.extend_from_slice(&tbs_header);
    for f in before {
        tbs.extend_from_slice(f);
    }
    tbs.extend_from_slice(&revoked_header);
    // Pass 2: the entries themselves.
    for e in entries {
        entry(e)?.encode_to_vec(&mut tbs).map_err(bad)?;
    }
    for f in after {
        tbs.extend_from_slice(f);
    }
    let signature = sign(&tbs)?;
    let bits = der::asn1::BitStringRef::from_bytes(&signature)
        .map_err(bad)?
        .to_der()
        .map_err(bad)?;
    let list_len = tbs.len() + algorithm.len() + bits.len();
    let list_header = header_der(der::Tag::Sequence, list_len)?;
    let mut out = Vec::with_capacity(list_header.len() + list_len);
    out.extend_from_slice(&list_header);
    out.extend_from_slice(&tbs);
    drop(tbs);
    out.extend_from_slice(algorithm);
    out.extend_from_slice(&bits);
    Ok(out)
}

/// What a relying party checks on a CRL before publishing it.
#[derive(Debug, Clone)]
pub struct CrlFacts {
    /// CRL number.
    pub number: u64,
    /// thisUpdate.
    pub this_update: OffsetDateTime,
    /// nextUpdate.
    pub next_update: OffsetDateTime,
    /// How many certificates it lists.
    pub entries: usize,
}

/// Parses a CRL (DER or PEM) and checks that `issuer` signed it and is named
/// as its issuer; returns its number and validity.
pub fn verify_crl(input: &[u8], issuer: &IssuerInfo) -> Result<(CrlFacts, Vec<u8>), Error> {
    use der::{Decode, Encode};
    use x509_cert::crl::CertificateList;
    use x509_cert::ext::pkix::CrlNumber;
    let der = crate::csr::decode_pem_or_der(input)
        .map_err(|e| Error::Certificate(format!("not a CRL: {e}")))?;
    let crl = CertificateList::<x509_cert::certificate::Rfc5280>::from_der(&der)
        .map_err(|e| Error::Certificate(format!("not a CRL: {e}")))?;
    crate::csr::verify_signed(&der, &issuer.public_key).map_err(|_| {
        Error::Certificate(format!(
            "the CRL is not signed by {} (signature does not verify)",
            issuer.subject
        ))
    })?;
    let tbs = &crl.tbs_cert_list;
    if tbs.issuer.to_der().ok().as_deref() != Some(issuer.subject_der.as_slice()) {
        return Err(Error::Certificate(format!(
            "the CRL names issuer '{}', expected '{}'",
            tbs.issuer, issuer.subject
        )));
    }
    let number = tbs
        .crl_extensions
        .iter()
        .flatten()
        .find(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_CRL_NUMBER)
        .and_then(|e| CrlNumber::from_der(e.extn_value.as_bytes()).ok())
        .and_then(|n| {
            let b = n.0.as_bytes();
            (b.len() <= 8).then(|| b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
        })
        .ok_or_else(|| Error::Certificate("the CRL has no usable CRL number".into()))?;
    let ts = |t: &x509_cert::time::Time| {
        OffsetDateTime::from_unix_timestamp(t.to_unix_duration().as_secs() as i64)
            .map_err(|e| Error::Certificate(e.to_string()))
    };
    let next_update = tbs
        .next_update
        .as_ref()
        .ok_or_else(|| Error::Certificate("the CRL has no nextUpdate".into()))?;
    Ok((
        CrlFacts {
            number,
            this_update: ts(&tbs.this_update)?,
            next_update: ts(next_update)?,
            entries: tbs.revoked_certificates.as_ref().map_or(0, Vec::len),
        },
        der,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed expectation is a failure
    use super::*;
    use std::time::Duration;

    /// The streamed encoding is byte for byte the one rcgen makes with the
    /// same entries (both time forms, every reason, serials with the top bit
    /// set), and the signature verifies.
    #[test]
    fn streamed_entries_encode_as_rcgen_does() {
        use der::{Decode, Encode};
        use x509_cert::crl::CertificateList;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "CRL test CA");
        let der = ca.self_signed(&key).unwrap().der().to_vec();
        let info = IssuerInfo::from_der(&der).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_der(&der.clone().into(), key).unwrap();
        let now = OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap();
        let late = OffsetDateTime::from_unix_timestamp(2_600_000_000).unwrap(); // 2052
        let reasons = [0, 1, 2, 3, 4, 5, 9, 10];
        let entries: Vec<CrlEntry> = (0..40u8)
            .map(|i| CrlEntry {
                serial: Serial::parse_hex(&format!("{:02x}{}", 0x70 + i * 3, "ab".repeat(15)))
                    .unwrap(),
                revoked_at: if i % 7 == 0 {
                    late
                } else {
                    now - Duration::from_secs(u64::from(i))
                },
                reason: reasons[usize::from(i) % reasons.len()],
            })
            .collect();
        let spec = CrlSpec {
            issuer: &info,
            number: 42,
            this_update: now,
            next_update: now + Duration::from_secs(86_400),
            entries: &entries,
            url: "http://ca.test/crl/x.crl".into(),
            only_ca_certs: false,
        };
        let ours = CrlTemplate::new(&spec).unwrap().sign(&issuer).unwrap();
        let mut reference = CrlTemplate::new(&spec).unwrap().head;
        reference.revoked_certs = entries
            .iter()
            .map(|e| rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(e.serial.as_bytes()),
                revocation_time: e.revoked_at,
                reason_code: reason(e.reason).unwrap(),
                invalidity_date: None,
            })
            .collect();
        let theirs = reference.signed_by(&issuer).unwrap().der().to_vec();
        let tbs = |d: &[u8]| {
            CertificateList::<x509_cert::certificate::Rfc5280>::from_der(d)
                .unwrap()
                .tbs_cert_list
                .to_der()
                .unwrap()
        };
        assert_eq!(tbs(&ours), tbs(&theirs));
        let (facts, _) = verify_crl(&ours, &info).unwrap();
        assert_eq!((facts.number, facts.entries), (42, 40));
        // No entries: the CRL rcgen signed, as is.
        let none = CrlSpec {
            entries: &[],
            ..spec
        };
        let (facts, _) = verify_crl(
            &CrlTemplate::new(&none).unwrap().sign(&issuer).unwrap(),
            &info,
        )
        .unwrap();
        assert_eq!(facts.entries, 0);
    }

    #[test]
    fn shards_follow_not_after_and_repeat() {
        let s = CrlSharding::new(4, Duration::from_secs(3600)).unwrap();
        let t = |secs: i64| OffsetDateTime::from_unix_timestamp(secs).unwrap();
        assert_eq!(s.shard_of(t(0)), 0);
        assert_eq!(s.shard_of(t(3599)), 0);
        assert_eq!(s.shard_of(t(3600)), 1);
        assert_eq!(s.shard_of(t(3 * 3600 + 5)), 3);
        assert_eq!(
            s.shard_of(t(4 * 3600)),
            0,
            "shards repeat after count x width"
        );
        assert!(CrlSharding::new(0, Duration::from_secs(3600)).is_err());
        assert!(CrlSharding::new(CrlSharding::MAX_SHARDS + 1, Duration::from_secs(3600)).is_err());
        assert!(CrlSharding::new(4, Duration::from_secs(59)).is_err());
    }
}
