//! PKCS#10 parsing: lenient about the wrapping (PEM or DER, any line width),
//! strict about the content. A `Csr` value has a verified self-signature and
//! normalized identifiers.

use crate::key::{KeyType, PublicKey};
use crate::names::{Identifier, parse_email};
use crate::{CsrError, DnsName, NameError, SpiffeId};
use aws_lc_rs::signature as sig;
use base64::Engine;
use const_oid::ObjectIdentifier;
use const_oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME;
use const_oid::db::rfc5912::{
    ECDSA_WITH_SHA_256, ECDSA_WITH_SHA_384, ECDSA_WITH_SHA_512, ID_EXTENSION_REQ,
    SHA_256_WITH_RSA_ENCRYPTION, SHA_384_WITH_RSA_ENCRYPTION, SHA_512_WITH_RSA_ENCRYPTION,
};
use der::{Decode, Encode, Tagged};
use std::collections::BTreeSet;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::request::{CertReq, ExtensionReq};

/// Largest CSR accepted, in bytes of input (PEM or DER).
pub const MAX_CSR_BYTES: usize = 64 * 1024;
/// Most identifiers one certificate may carry.
pub const MAX_IDENTIFIERS: usize = 100;

const ID_AT_COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");

/// A parsed PKCS#10 request whose self-signature has been verified.
#[derive(Debug, Clone)]
pub struct Csr {
    der: Vec<u8>,
    public_key: PublicKey,
    identifiers: Vec<Identifier>,
    common_name: Option<String>,
}

impl Csr {
    /// Parses a CSR from PEM (any line width, surrounding text ignored) or DER.
    pub fn parse(input: &[u8]) -> Result<Csr, CsrError> {
        if input.len() > MAX_CSR_BYTES {
            return Err(CsrError::TooLarge(input.len(), MAX_CSR_BYTES));
        }
        let der = decode_pem_or_der(input)?;
        Csr::from_der(&der)
    }

    /// Parses a DER CSR.
    pub fn from_der(der: &[u8]) -> Result<Csr, CsrError> {
        let (req, public_key) = parse_verified(der)?;

        let common_name = subject_common_name(&req.info.subject)?;
        let mut identifiers = BTreeSet::new();
        let mut ext_req_seen = false;
        for attr in req.info.attributes.iter() {
            if attr.oid != ID_EXTENSION_REQ {
                continue;
            }
            if ext_req_seen || attr.values.len() != 1 {
                return Err(CsrError::DuplicateExtensionRequest);
            }
            ext_req_seen = true;
            let Some(value) = attr.values.get(0) else {
                continue;
            };
            let exts: ExtensionReq = value.decode_as::<ExtensionReq>().map_err(|e| {
                CsrError::MalformedExtension("extensionRequest".into(), e.to_string())
            })?;
            let mut seen = BTreeSet::new();
            for ext in &exts.0 {
                if !seen.insert(ext.extn_id) {
                    return Err(CsrError::DuplicateExtension(ext.extn_id.to_string()));
                }
                // Every extension value must be one well-formed DER element, even
                // though only subjectAltName is used.
                if der::asn1::AnyRef::from_der(ext.extn_value.as_bytes()).is_err() {
                    return Err(CsrError::MalformedExtension(
                        ext.extn_id.to_string(),
                        "value is not well-formed DER".into(),
                    ));
                }
                if ext.extn_id == ID_CE_SUBJECT_ALT_NAME {
                    let san = SubjectAltName::from_der(ext.extn_value.as_bytes()).map_err(|e| {
                        CsrError::MalformedExtension("subjectAltName".into(), e.to_string())
                    })?;
                    for gn in san.0 {
                        identifiers.insert(general_name_to_identifier(gn)?);
                    }
                }
                // Every other requested extension is ignored on purpose: the
                // certificate's extensions come from the profile, never the CSR.
            }
        }
        // A CN that names a host is a requested name too, so it is policy-checked
        // like any SAN (a CN can never smuggle an unchecked name into a cert).
        if let Some(cn) = &common_name {
            if let Ok(id) = Identifier::parse_any(cn) {
                identifiers.insert(id);
            } else if identifiers.is_empty() {
                return Err(CsrError::Name(NameError::InvalidDns(cn.clone())));
            }
        }
        if identifiers.is_empty() {
            return Err(CsrError::NoIdentifiers);
        }
        if identifiers.len() > MAX_IDENTIFIERS {
            return Err(CsrError::TooManyIdentifiers(
                identifiers.len(),
                MAX_IDENTIFIERS,
            ));
        }
        Ok(Csr {
            der: der.to_vec(),
            public_key,
            identifiers: identifiers.into_iter().collect(),
            common_name,
        })
    }

    /// The CSR's DER encoding.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The subject public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// The key type.
    pub fn key_type(&self) -> KeyType {
        self.public_key.key_type()
    }

    /// Normalized, de-duplicated identifiers from the SAN extension and subject CN.
    pub fn identifiers(&self) -> &[Identifier] {
        &self.identifiers
    }

    /// The subject common name as sent (informational; never copied to a cert).
    pub fn common_name(&self) -> Option<&str> {
        self.common_name.as_deref()
    }
}

/// A CA's certificate request (for an intermediate): verified key and full subject.
#[derive(Debug, Clone)]
pub struct CaRequest {
    /// The verified public key.
    pub public_key: PublicKey,
    /// The requested subject, kept with its string types.
    pub subject: rcgen::DistinguishedName,
    /// The subject as text, for operators to review.
    pub subject_text: String,
}

impl CaRequest {
    /// Parses and verifies a CSR for a CA certificate. Extensions are ignored:
    /// a CA certificate's extensions come from the signing ceremony's options.
    pub fn parse(input: &[u8]) -> Result<CaRequest, crate::Error> {
        if input.len() > MAX_CSR_BYTES {
            return Err(CsrError::TooLarge(input.len(), MAX_CSR_BYTES).into());
        }
        let der = decode_pem_or_der(input)?;
        let (req, public_key) = parse_verified(&der)?;
        if subject_common_name(&req.info.subject)?.is_none() {
            return Err(CsrError::Malformed("a CA request needs a subject CN".into()).into());
        }
        Ok(CaRequest {
            public_key,
            subject: crate::dn::from_x509_name(&req.info.subject)?,
            subject_text: req.info.subject.to_string(),
        })
    }
}

/// The three parts of any signed X.509 structure, with the signed part's bytes
/// exactly as received (decoding may normalize, e.g. sort SET OF, so the
/// signature is checked over the original bytes, never a re-encoding).
#[derive(der::Sequence)]
struct SignedParts<'a> {
    tbs: der::asn1::AnyRef<'a>,
    algorithm: x509_cert::spki::AlgorithmIdentifierRef<'a>,
    signature: der::asn1::BitStringRef<'a>,
}

/// Verifies `der`'s signature with `key`; returns nothing on success.
pub(crate) fn verify_signed(der: &[u8], key: &PublicKey) -> Result<(), CsrError> {
    let parts = SignedParts::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    let tbs = parts
        .tbs
        .to_der()
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    let signature = parts
        .signature
        .as_bytes()
        .ok_or_else(|| CsrError::Malformed("signature is not octet-aligned".into()))?;
    verify_signature(key, &parts.algorithm.oid, &tbs, signature)
}

/// Decodes a CSR, classifies its key and verifies its self-signature.
fn parse_verified(der: &[u8]) -> Result<(CertReq, PublicKey), CsrError> {
    if der.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(der.len(), MAX_CSR_BYTES));
    }
    let req = CertReq::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    let public_key = PublicKey::from_spki(&req.info.public_key)?;
    verify_signed(der, &public_key)?;
    Ok((req, public_key))
}

/// Accepts DER, or PEM with any label spelling, line width or surrounding text.
pub fn decode_pem_or_der(input: &[u8]) -> Result<Vec<u8>, CsrError> {
    if input.first() == Some(&0x30) {
        return Ok(input.to_vec());
    }
    let text = std::str::from_utf8(input)
        .map_err(|_| CsrError::Malformed("neither DER nor UTF-8 PEM".into()))?;
    let begin = text
        .find("-----BEGIN ")
        .ok_or_else(|| CsrError::Malformed("no PEM BEGIN line".into()))?;
    let after_begin = &text[begin..];
    let body_start = after_begin
        .find('\n')
        .ok_or_else(|| CsrError::Malformed("truncated PEM".into()))?;
    let body = &after_begin[body_start..];
    let end = body
        .find("-----END ")
        .ok_or_else(|| CsrError::Malformed("no PEM END line".into()))?;
    let b64: String = body[..end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| CsrError::Malformed(format!("bad base64 in PEM: {e}")))
}

pub(crate) fn verify_signature(
    key: &PublicKey,
    alg: &ObjectIdentifier,
    msg: &[u8],
    signature: &[u8],
) -> Result<(), CsrError> {
    let unsupported = || CsrError::UnsupportedSignatureAlgorithm(alg.to_string());
    // The curve comes from the key and the hash from the signature algorithm:
    // OpenSSL signs P-384 requests with SHA-256 by default.
    let verifier: &'static dyn sig::VerificationAlgorithm = match key.key_type() {
        KeyType::EcdsaP256 => match *alg {
            ECDSA_WITH_SHA_256 => &sig::ECDSA_P256_SHA256_ASN1,
            ECDSA_WITH_SHA_384 => &sig::ECDSA_P256_SHA384_ASN1,
            ECDSA_WITH_SHA_512 => &sig::ECDSA_P256_SHA512_ASN1,
            _ => return Err(unsupported()),
        },
        KeyType::EcdsaP384 => match *alg {
            ECDSA_WITH_SHA_256 => &sig::ECDSA_P384_SHA256_ASN1,
            ECDSA_WITH_SHA_384 => &sig::ECDSA_P384_SHA384_ASN1,
            ECDSA_WITH_SHA_512 => &sig::ECDSA_P384_SHA512_ASN1,
            _ => return Err(unsupported()),
        },
        KeyType::Ed25519 => {
            if *alg != crate::key::ID_ED25519 {
                return Err(unsupported());
            }
            &sig::ED25519
        }
        KeyType::Rsa(_) => match *alg {
            SHA_256_WITH_RSA_ENCRYPTION => &sig::RSA_PKCS1_2048_8192_SHA256,
            SHA_384_WITH_RSA_ENCRYPTION => &sig::RSA_PKCS1_2048_8192_SHA384,
            SHA_512_WITH_RSA_ENCRYPTION => &sig::RSA_PKCS1_2048_8192_SHA512,
            _ => return Err(unsupported()),
        },
    };
    sig::UnparsedPublicKey::new(verifier, key.raw())
        .verify(msg, signature)
        .map_err(|_| CsrError::BadSignature)
}

pub(crate) fn subject_common_name(
    name: &x509_cert::name::Name,
) -> Result<Option<String>, CsrError> {
    let mut cn = None;
    {
        for atv in name.iter() {
            if atv.oid != ID_AT_COMMON_NAME {
                continue;
            }
            let value = directory_string(&atv.value).ok_or_else(|| {
                CsrError::MalformedExtension("subject CN".into(), "not a string".into())
            })?;
            if cn.replace(value).is_some() {
                return Err(CsrError::MalformedExtension(
                    "subject CN".into(),
                    "more than one common name".into(),
                ));
            }
        }
    }
    Ok(cn)
}

/// Reads UTF8String, PrintableString, IA5String or TeletexString (as Latin-1) values.
pub(crate) fn directory_string(any: &der::Any) -> Option<String> {
    use der::Tag;
    let bytes = any.value();
    match any.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String => {
            std::str::from_utf8(bytes).ok().map(str::to_string)
        }
        Tag::TeletexString => Some(bytes.iter().map(|&b| b as char).collect()),
        _ => None,
    }
}

fn general_name_to_identifier(gn: GeneralName) -> Result<Identifier, CsrError> {
    Ok(match gn {
        GeneralName::DnsName(s) => Identifier::Dns(DnsName::parse(s.as_str())?),
        GeneralName::IpAddress(o) => Identifier::from_ip_bytes(o.as_bytes())?,
        GeneralName::UniformResourceIdentifier(s) => Identifier::Uri(SpiffeId::parse(s.as_str())?),
        GeneralName::Rfc822Name(s) => Identifier::Email(parse_email(s.as_str())?),
        GeneralName::OtherName(_) => return Err(CsrError::UnsupportedSan("otherName")),
        GeneralName::DirectoryName(_) => return Err(CsrError::UnsupportedSan("directoryName")),
        GeneralName::EdiPartyName(_) => return Err(CsrError::UnsupportedSan("ediPartyName")),
        GeneralName::RegisteredId(_) => return Err(CsrError::UnsupportedSan("registeredID")),
    })
}
