//! ACME Renewal Information (RFC 9773): certificate IDs and suggested windows.

use crate::problem::Problem;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use der::Decode;
use x509_cert::Certificate;
use x509_cert::ext::pkix::AuthorityKeyIdentifier;

/// id-ce-authorityKeyIdentifier.
const AKI_OID: der::asn1::ObjectIdentifier = der::asn1::ObjectIdentifier::new_unwrap("2.5.29.35");

/// The ARI certificate ID of a certificate (DER): `base64url(AKI keyIdentifier)
/// "." base64url(serial)`, or `None` without an AKI key identifier.
pub fn cert_id(der: &[u8]) -> Option<String> {
    let (aki, serial) = aki_and_serial(der)?;
    Some(format!("{}.{}", B64.encode(aki), B64.encode(serial)))
}

fn aki_and_serial(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let cert = Certificate::from_der(der).ok()?;
    let tbs = cert.tbs_certificate();
    let ext = tbs.extensions()?.iter().find(|e| e.extn_id == AKI_OID)?;
    let aki = AuthorityKeyIdentifier::from_der(ext.extn_value.as_bytes()).ok()?;
    let kid = aki.key_identifier?.as_bytes().to_vec();
    Some((kid, tbs.serial_number().as_bytes().to_vec()))
}

/// A parsed certificate ID.
#[derive(Debug, Clone)]
pub struct CertId {
    /// AKI keyIdentifier.
    pub aki: Vec<u8>,
    /// Serial, lowercase hex without leading zero bytes.
    pub serial_hex: String,
}

impl CertId {
    /// Parses `aki.serial` (both base64url, no padding).
    pub fn parse(s: &str) -> Result<CertId, Problem> {
        let bad = || {
            Problem::malformed(format!(
                "'{s}' is not an ARI certificate ID (base64url(AKI).base64url(serial))"
            ))
        };
        let (a, b) = s.split_once('.').ok_or_else(bad)?;
        let aki = B64.decode(a).map_err(|_| bad())?;
        let serial = B64.decode(b).map_err(|_| bad())?;
        // The serial is its DER INTEGER contents (RFC 9773 §4.1): positive and
        // minimal, so one certificate has one ID (no extra leading zero bytes).
        let redundant_zero = serial.len() > 1 && serial[0] == 0 && serial[1] & 0x80 == 0;
        if aki.is_empty() || serial.is_empty() || serial[0] & 0x80 != 0 || redundant_zero {
            return Err(bad());
        }
        Ok(CertId {
            aki,
            serial_hex: trimmed_hex(&serial),
        })
    }

    /// Whether a certificate (DER) is the one identified.
    pub fn matches(&self, der: &[u8]) -> bool {
        aki_and_serial(der)
            .is_some_and(|(aki, serial)| aki == self.aki && trimmed_hex(&serial) == self.serial_hex)
    }
}

/// Hex without leading zero bytes (the stored serial form).
pub fn trimmed_hex(bytes: &[u8]) -> String {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    hex::encode(&bytes[first..])
}

/// Why a window moved earlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// The default: the last third of the lifetime.
    None,
    /// Renew now (revoked, issuer retired).
    Now,
    /// Renew soon, spread out (the issuer was replaced by a rotation): the
    /// window opens now and closes halfway to its normal end, so a fleet
    /// moves to the new issuer well before expiry without all renewing at
    /// once.
    Soon,
    /// An operator's renew-by time (unix s).
    By(i64),
}

/// The suggested window `(start, end)` in unix seconds.
pub fn window(not_before: i64, not_after: i64, now: i64, urgency: Urgency) -> (i64, i64) {
    let life = (not_after - not_before).max(1);
    let start = not_before + life * 2 / 3;
    let end = (not_after - life / 10).max(start + 1);
    match urgency {
        Urgency::None => (start, end),
        Urgency::Now => (now - 3600, now),
        Urgency::Soon => {
            let start = start.min(now);
            (start, (now + (end - now) / 2).min(end).max(start + 60))
        }
        Urgency::By(t) if t < end => {
            let end = t.max(now + 60);
            let start = start.min(now.max(end - 3600)).min(end - 1);
            (start, end)
        }
        Urgency::By(_) => (start, end),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_window_is_in_the_last_third() {
        let (s, e) = window(0, 90, 10, Urgency::None);
        assert_eq!((s, e), (60, 81));
    }

    #[test]
    fn revoked_means_now() {
        let (s, e) = window(0, 9000, 100, Urgency::Now);
        assert!(s < e && e == 100);
    }

    #[test]
    fn a_replaced_issuer_opens_the_window_now_and_halves_it() {
        // 90 days of life, 10 days in: normally days 60..81.
        let day = 86_400;
        let (s, e) = window(0, 90 * day, 10 * day, Urgency::Soon);
        assert_eq!((s, e), (10 * day, 10 * day + 71 * day / 2));
        // Already inside the normal window: it starts as before, ends sooner.
        let (s, e) = window(0, 90 * day, 70 * day, Urgency::Soon);
        assert_eq!(s, 60 * day);
        assert_eq!(e, 70 * day + 11 * day / 2);
        // Past the normal end: a short window from now.
        let (s, e) = window(0, 90, 89, Urgency::Soon);
        assert!(s <= 89 && e > s, "{s}..{e}");
    }

    #[test]
    fn operator_deadline_pulls_the_window_in() {
        let (s, e) = window(0, 90_000, 1000, Urgency::By(5000));
        assert_eq!(e, 5000);
        assert!(s < e && s >= 1000);
        // A deadline after the default window changes nothing.
        assert_eq!(window(0, 90, 10, Urgency::By(1000)), (60, 81));
    }

    #[test]
    fn cert_id_parsing_rejects_garbage() {
        assert!(CertId::parse("nodot").is_err());
        assert!(CertId::parse("!!.AQ").is_err());
        let id = CertId::parse("AQID.AQI").unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(id.serial_hex, "0102");
        // A leading zero only where the DER needs it (high bit of the next byte).
        let id = CertId::parse("AQID.AIA").unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(id.serial_hex, "80");
        // The same serial with extra zero bytes is not another ID of it.
        assert!(CertId::parse("AQID.AAEC").is_err());
        assert!(CertId::parse("AQID.AAAB").is_err());
        // Negative serials are not serials.
        assert!(CertId::parse("AQID.gA").is_err());
    }
}
