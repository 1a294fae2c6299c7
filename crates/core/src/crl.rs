//! Certificate revocation lists (RFC 5280 section 5): what goes into one.

use crate::template::IssuerInfo;
use crate::{Error, Serial};
use rcgen::{
    CertificateRevocationListParams, CrlDistributionPoint, CrlIssuingDistributionPoint, CrlScope,
    KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};
use time::OffsetDateTime;

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
    /// matches the CRL DP in the issuer's certificates).
    pub url: String,
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
            issuing_distribution_point: Some(CrlIssuingDistributionPoint {
                distribution_point: CrlDistributionPoint {
                    uris: vec![spec.url.clone()],
                },
                scope: Some(CrlScope::UserCertsOnly),
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
