//! Distinguished names: parse `CN=...,O=...` strings and convert parsed names.

use crate::Error;
use const_oid::ObjectIdentifier;
use der::Tagged;
use rcgen::{DistinguishedName, DnType, DnValue};

/// A distinguished name ready for a certificate template.
pub type Dn = DistinguishedName;

/// Parses an RFC 4514-style subject such as `CN=Corp Root CA,O=Corp,C=US`.
/// Supported attributes: CN, O, OU, C, ST, L. Backslash escapes a comma.
pub fn parse_subject(s: &str) -> Result<DistinguishedName, Error> {
    let err = |why: &str| Error::Subject(s.to_string(), why.to_string());
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.push(chars.next().ok_or_else(|| err("dangling backslash"))?),
            ',' => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    let mut dn = DistinguishedName::new();
    for part in parts {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| err("each part must be KEY=value"))?;
        let v = v.trim();
        if v.is_empty() || v.len() > 64 {
            return Err(err("values must be 1-64 characters"));
        }
        let ty = match k.trim().to_ascii_uppercase().as_str() {
            "CN" => DnType::CommonName,
            "O" => DnType::OrganizationName,
            "OU" => DnType::OrganizationalUnitName,
            "ST" => DnType::StateOrProvinceName,
            "L" => DnType::LocalityName,
            "C" => {
                if v.len() != 2 || !v.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(err("C must be a two-letter country code such as US"));
                }
                let ps = rcgen::string::PrintableString::try_from(v)
                    .map_err(|_| err("C must be printable"))?;
                dn.push(DnType::CountryName, DnValue::PrintableString(ps));
                continue;
            }
            _ => return Err(err("supported attributes are CN, O, OU, C, ST, L")),
        };
        dn.push(ty, DnValue::Utf8String(v.to_string()));
    }
    if dn.get(&DnType::CommonName).is_none() {
        return Err(err("a CN is required"));
    }
    Ok(dn)
}

/// The subject of a certificate (DER), kept with its string types, e.g. to
/// certify the same name again (a cross-certificate).
pub fn subject_of_certificate(der: &[u8]) -> Result<DistinguishedName, Error> {
    use ::der::Decode;
    let cert =
        x509_cert::Certificate::from_der(der).map_err(|e| Error::Certificate(e.to_string()))?;
    from_x509_name(cert.tbs_certificate().subject())
}

/// Converts a parsed X.509 name (e.g. from an intermediate's CSR) to rcgen's form,
/// keeping each value's string type.
pub fn from_x509_name(name: &x509_cert::name::Name) -> Result<DistinguishedName, Error> {
    let mut dn = DistinguishedName::new();
    let mut seen = std::collections::BTreeSet::new();
    {
        for atv in name.iter() {
            // rcgen keeps one value per attribute type; refuse rather than drop one.
            if !seen.insert(atv.oid) {
                return Err(Error::Subject(
                    name.to_string(),
                    format!(
                        "attribute {} appears more than once; use each attribute type once",
                        atv.oid
                    ),
                ));
            }
            let ty = dn_type(&atv.oid);
            let text = crate::csr::directory_string(&atv.value).ok_or_else(|| {
                Error::Subject(atv.oid.to_string(), "unsupported string type".into())
            })?;
            let value = match atv.value.tag() {
                der::Tag::PrintableString => DnValue::PrintableString(
                    rcgen::string::PrintableString::try_from(text.as_str())
                        .map_err(|_| Error::Subject(text.clone(), "not printable".into()))?,
                ),
                _ => DnValue::Utf8String(text),
            };
            dn.push(ty, value);
        }
    }
    Ok(dn)
}

fn dn_type(oid: &ObjectIdentifier) -> DnType {
    match oid.to_string().as_str() {
        "2.5.4.3" => DnType::CommonName,
        "2.5.4.6" => DnType::CountryName,
        "2.5.4.7" => DnType::LocalityName,
        "2.5.4.8" => DnType::StateOrProvinceName,
        "2.5.4.10" => DnType::OrganizationName,
        "2.5.4.11" => DnType::OrganizationalUnitName,
        _ => DnType::CustomDnType(oid.arcs().map(u64::from).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subjects() {
        let dn = parse_subject("CN=Corp Root CA,O=Corp\\, Inc.,C=US").unwrap();
        assert!(dn.get(&DnType::CommonName).is_some());
        assert!(parse_subject("O=NoCN").is_err());
        assert!(parse_subject("CN=x,C=usa").is_err());
        assert!(parse_subject("CN").is_err());
    }
}
