//! Public-key types: what a CSR carries, and what CA keys may be generated as.

use crate::Error;
use const_oid::ObjectIdentifier;
use const_oid::db::rfc5912::{ID_EC_PUBLIC_KEY, RSA_ENCRYPTION, SECP_256_R_1, SECP_384_R_1};
use der::{Decode, Encode};
use std::fmt;
use std::str::FromStr;
use x509_cert::spki::SubjectPublicKeyInfoOwned;

/// Ed25519 algorithm identifier (RFC 8410).
pub const ID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

/// The type of a subject public key, as the policy engine matches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// ECDSA on NIST P-256.
    EcdsaP256,
    /// ECDSA on NIST P-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// RSA with the given modulus size in bits.
    Rsa(usize),
}

impl KeyType {
    /// Policy name: `ecdsa-p256`, `ecdsa-p384`, `ed25519`, `rsa`.
    pub fn family(&self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Ed25519 => "ed25519",
            KeyType::Rsa(_) => "rsa",
        }
    }

    /// The rcgen algorithm whose key OIDs describe this key in a SubjectPublicKeyInfo.
    pub fn rcgen_algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Ed25519 => &rcgen::PKCS_ED25519,
            KeyType::Rsa(_) => &rcgen::PKCS_RSA_SHA256,
        }
    }
}

impl FromStr for KeyType {
    type Err = Error;
    /// Parses `ecdsa-p256`, `ecdsa-p384`, `ed25519` or `rsa-BITS`.
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "ecdsa-p256" => KeyType::EcdsaP256,
            "ecdsa-p384" => KeyType::EcdsaP384,
            "ed25519" => KeyType::Ed25519,
            // The sizes a CSR may carry (2048 to 8192 bits): a smaller one
            // would pass `policy check` and then be refused at issuance.
            other => match other
                .strip_prefix("rsa-")
                .and_then(|b| b.parse::<usize>().ok())
                .filter(|b| (2048..=8192).contains(b))
            {
                Some(bits) => KeyType::Rsa(bits),
                None => return Err(Error::KeySpec(s.to_string())),
            },
        })
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyType::Rsa(bits) => write!(f, "rsa-{bits}"),
            other => f.write_str(other.family()),
        }
    }
}

/// A key type Sigil can generate for a CA (root, intermediate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySpec {
    /// ECDSA P-256 with SHA-256.
    EcdsaP256,
    /// ECDSA P-384 with SHA-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// RSA 3072 with PKCS#1 v1.5 SHA-256.
    Rsa3072,
    /// RSA 4096 with PKCS#1 v1.5 SHA-256.
    Rsa4096,
}

impl FromStr for KeySpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "ecdsa-p256" | "p256" | "p-256" => KeySpec::EcdsaP256,
            "ecdsa-p384" | "p384" | "p-384" => KeySpec::EcdsaP384,
            "ed25519" => KeySpec::Ed25519,
            "rsa-3072" => KeySpec::Rsa3072,
            "rsa-4096" | "rsa" => KeySpec::Rsa4096,
            _ => return Err(Error::KeySpec(s.to_string())),
        })
    }
}

impl fmt::Display for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeySpec::EcdsaP256 => "ecdsa-p256",
            KeySpec::EcdsaP384 => "ecdsa-p384",
            KeySpec::Ed25519 => "ed25519",
            KeySpec::Rsa3072 => "rsa-3072",
            KeySpec::Rsa4096 => "rsa-4096",
        })
    }
}

/// A subject public key, parsed once from a SubjectPublicKeyInfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    key_type: KeyType,
    /// The subjectPublicKey BIT STRING contents (EC point, Ed25519 key, RSAPublicKey).
    raw: Vec<u8>,
    /// The full SubjectPublicKeyInfo DER.
    spki_der: Vec<u8>,
}

#[derive(der::Sequence)]
struct RsaPublicKeyAsn1<'a> {
    modulus: der::asn1::UintRef<'a>,
    public_exponent: der::asn1::UintRef<'a>,
}

impl PublicKey {
    /// Parses and classifies a SubjectPublicKeyInfo.
    pub fn from_spki(spki: &SubjectPublicKeyInfoOwned) -> Result<PublicKey, crate::CsrError> {
        use crate::CsrError;
        let raw = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| CsrError::UnsupportedKey("with a non-octet-aligned key".into()))?
            .to_vec();
        let alg = spki.algorithm.oid;
        let key_type = if alg == ID_EC_PUBLIC_KEY {
            let curve: ObjectIdentifier = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as().ok())
                .ok_or_else(|| CsrError::UnsupportedKey("EC key without a named curve".into()))?;
            let (kt, len) = if curve == SECP_256_R_1 {
                (KeyType::EcdsaP256, 65)
            } else if curve == SECP_384_R_1 {
                (KeyType::EcdsaP384, 97)
            } else {
                return Err(CsrError::UnsupportedKey(format!("EC curve {curve}")));
            };
            if raw.len() != len || raw[0] != 4 {
                return Err(CsrError::UnsupportedKey(
                    "EC point that is not an uncompressed point of the curve's size".into(),
                ));
            }
            kt
        } else if alg == ID_ED25519 {
            if spki.algorithm.parameters.is_some() || raw.len() != 32 {
                return Err(CsrError::UnsupportedKey("malformed Ed25519 key".into()));
            }
            KeyType::Ed25519
        } else if alg == RSA_ENCRYPTION {
            // RFC 3279 §2.3.1: the parameters are NULL. Without them the same
            // key would have another SubjectPublicKeyInfo (and fingerprint).
            if !spki
                .algorithm
                .parameters
                .as_ref()
                .is_some_and(|p| der::Tagged::tag(p) == der::Tag::Null && p.value().is_empty())
            {
                return Err(CsrError::UnsupportedKey(
                    "RSA key whose algorithm parameters are not NULL (RFC 3279)".into(),
                ));
            }
            let key = RsaPublicKeyAsn1::from_der(&raw)
                .map_err(|e| CsrError::UnsupportedKey(format!("malformed RSA key ({e})")))?;
            let m = key.modulus.as_bytes();
            let bits = m.len() * 8 - m.first().map_or(8, |b| b.leading_zeros() as usize);
            if !(2048..=8192).contains(&bits) {
                return Err(CsrError::RsaKeySize(bits));
            }
            KeyType::Rsa(bits)
        } else {
            return Err(CsrError::UnsupportedKey(format!("algorithm {alg}")));
        };
        let spki_der = spki
            .to_der()
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        Ok(PublicKey {
            key_type,
            raw,
            spki_der,
        })
    }

    /// Parses a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(der: &[u8]) -> Result<PublicKey, crate::CsrError> {
        let spki = SubjectPublicKeyInfoOwned::from_der(der)
            .map_err(|e| crate::CsrError::Malformed(e.to_string()))?;
        PublicKey::from_spki(&spki)
    }

    /// The key's type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The subjectPublicKey contents.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// The SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// SHA-256 of the SubjectPublicKeyInfo, hex (used to block compromised keys).
    pub fn fingerprint(&self) -> String {
        crate::sha256_hex(&self.spki_der)
    }

    /// Subject key identifier: SHA-256 of the subjectPublicKey truncated to 160 bits
    /// (RFC 7093 method 1).
    pub fn key_identifier(&self) -> Vec<u8> {
        use sha2::Digest;
        sha2::Sha256::digest(&self.raw)[..20].to_vec()
    }
}

impl rcgen::PublicKeyData for PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.key_type.rcgen_algorithm()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_type_names_accept_only_issuable_rsa_sizes() {
        assert_eq!("rsa-2048".parse::<KeyType>().ok(), Some(KeyType::Rsa(2048)));
        assert_eq!("rsa-8192".parse::<KeyType>().ok(), Some(KeyType::Rsa(8192)));
        for bad in ["rsa-1024", "rsa-16384", "rsa-", "rsa-x", "p256"] {
            assert!(bad.parse::<KeyType>().is_err(), "{bad}");
        }
        assert_eq!("ed25519".parse::<KeyType>().ok(), Some(KeyType::Ed25519));
    }

    #[test]
    fn an_rsa_key_needs_null_parameters() {
        // A 2048-bit modulus (its value does not matter here).
        let mut modulus = vec![0u8; 257];
        modulus[1] = 0xc1;
        modulus[256] = 0x01;
        let rsa = RsaPublicKeyAsn1 {
            modulus: der::asn1::UintRef::new(&modulus[1..]).unwrap(),
            public_exponent: der::asn1::UintRef::new(&[1, 0, 1]).unwrap(),
        }
        .to_der()
        .unwrap();
        let spki = |parameters: Option<der::Any>| SubjectPublicKeyInfoOwned {
            algorithm: x509_cert::spki::AlgorithmIdentifierOwned {
                oid: RSA_ENCRYPTION,
                parameters,
            },
            subject_public_key: der::asn1::BitString::from_bytes(&rsa).unwrap(),
        };
        let with_null = PublicKey::from_spki(&spki(Some(der::Any::from(der::asn1::Null))));
        assert_eq!(with_null.unwrap().key_type(), KeyType::Rsa(2048));
        let e = PublicKey::from_spki(&spki(None)).err().unwrap();
        assert!(e.to_string().contains("NULL"), "{e}");
    }
}
