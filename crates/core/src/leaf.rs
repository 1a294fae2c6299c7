//! Facts read back from an issued leaf certificate: what renewal reuses and what
//! an mTLS peer is identified by.

use crate::key::PublicKey;
use crate::names::{DnsName, Identifier, SpiffeId};
use crate::{Error, Serial};
use der::{Decode, Encode};
use time::OffsetDateTime;
use x509_cert::Certificate;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

/// A parsed leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    /// Serial.
    pub serial: Serial,
    /// Subject public key.
    pub public_key: PublicKey,
    /// SAN identifiers, normalized, in certificate order.
    pub identifiers: Vec<Identifier>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// The issuer name, DER.
    pub issuer_der: Vec<u8>,
    /// The subject's common name, if it has one.
    pub common_name: Option<String>,
}

impl LeafInfo {
    /// Parses a certificate (DER).
    pub fn from_der(der: &[u8]) -> Result<LeafInfo, Error> {
        let bad = |e: &dyn std::fmt::Display| Error::Certificate(e.to_string());
        let cert = Certificate::from_der(der).map_err(|e| bad(&e))?;
        let tbs = cert.tbs_certificate();
        let serial = Serial::parse_hex(&hex::encode(tbs.serial_number().as_bytes()))
            .ok_or_else(|| Error::Certificate("certificate serial is empty or too long".into()))?;
        let spki = tbs
            .subject_public_key_info()
            .to_der()
            .map_err(|e| bad(&e))?;
        let public_key = PublicKey::from_spki_der(&spki).map_err(|e| bad(&e))?;
        let mut identifiers = Vec::new();
        if let Ok(Some((_, san))) = tbs.get_extension::<SubjectAltName>() {
            for gn in san.0 {
                let id = match gn {
                    GeneralName::DnsName(s) => DnsName::parse(s.as_str()).map(Identifier::Dns),
                    GeneralName::UniformResourceIdentifier(s) => {
                        SpiffeId::parse(s.as_str()).map(Identifier::Uri)
                    }
                    GeneralName::IpAddress(o) => Identifier::from_ip_bytes(o.as_bytes()),
                    GeneralName::Rfc822Name(s) => {
                        crate::names::parse_email(s.as_str()).map(Identifier::Email)
                    }
                    _ => continue,
                };
                identifiers.push(id.map_err(|e| bad(&e))?);
            }
        }
        let validity = tbs.validity();
        let ts = |t: &x509_cert::time::Time| {
            OffsetDateTime::from_unix_timestamp(t.to_unix_duration().as_secs() as i64)
                .map_err(|e| bad(&e))
        };
        let common_name = crate::csr::subject_common_name(tbs.subject())
            .ok()
            .flatten();
        Ok(LeafInfo {
            common_name,
            serial,
            public_key,
            identifiers,
            not_before: ts(&validity.not_before)?,
            not_after: ts(&validity.not_after)?,
            issuer_der: tbs.issuer().to_der().map_err(|e| bad(&e))?,
        })
    }

    /// The identity a policy sees for this certificate's holder: its SPIFFE URI
    /// SAN if it has one, else its first DNS SAN.
    pub fn identity(&self) -> Option<String> {
        self.identifiers
            .iter()
            .find(|i| matches!(i, Identifier::Uri(_)))
            .or_else(|| {
                self.identifiers
                    .iter()
                    .find(|i| matches!(i, Identifier::Dns(_)))
            })
            .map(|i| i.to_string())
    }
}
