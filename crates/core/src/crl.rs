//! Certificate revocation lists (RFC 5280 section 5): what goes into one.

use crate::template::IssuerInfo;
use crate::{Error, Serial};
use rcgen::{
    CertificateRevocationListParams, CrlDistributionPoint, CrlIssuingDistributionPoint, CrlScope,
    KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
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
#[derive(Debug)]
pub struct CrlTemplate(CertificateRevocationListParams);

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

impl CrlTemplate {
    /// Builds the CRL: AKI from the issuer's SKI, an Issuing Distribution
    /// Point limited to end-entity certificates, reasons on each entry.
    pub fn new(spec: &CrlSpec<'_>) -> Result<CrlTemplate, Error> {
        if spec.next_update <= spec.this_update {
            return Err(Error::Template(
                "CRL nextUpdate must follow thisUpdate".into(),
            ));
        }
        let revoked_certs = spec
            .entries
            .iter()
            .map(|e| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(e.serial.as_bytes()),
                    revocation_time: crate::template::whole_seconds(e.revoked_at),
                    reason_code: reason(e.reason)?,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(CrlTemplate(CertificateRevocationListParams {
            this_update: crate::template::whole_seconds(spec.this_update),
            next_update: crate::template::whole_seconds(spec.next_update),
            crl_number: SerialNumber::from(spec.number),
            // An issuer's CRL names its distribution point and scope. A root's
            // ARL carries none: it must also cover the self-signed root, which
            // has no CRL DP, or `openssl verify -crl_check_all` calls the scope
            // different (RFC 5280 6.3.3 b).
            issuing_distribution_point: (!spec.only_ca_certs).then(|| {
                CrlIssuingDistributionPoint {
                    distribution_point: CrlDistributionPoint {
                        uris: vec![spec.url.clone()],
                    },
                    scope: Some(CrlScope::UserCertsOnly),
                }
            }),
            revoked_certs,
            key_identifier_method: KeyIdMethod::PreSpecified(spec.issuer.key_id.clone()),
        }))
    }

    /// Signs the CRL with the issuer (consuming the template).
    pub fn sign(
        self,
        issuer: &rcgen::Issuer<'_, impl rcgen::SigningKey>,
    ) -> Result<Vec<u8>, Error> {
        Ok(self
            .0
            .signed_by(issuer)
            .map_err(|e| Error::Template(format!("signing the CRL: {e}")))?
            .der()
            .to_vec())
    }
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
