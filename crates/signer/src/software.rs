//! Software keys on aws-lc-rs.

use crate::Error;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    self as sig, ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair,
    Ed25519KeyPair, KeyPair, RsaKeyPair,
};
use sigil_core::{KeySpec, PublicKey};
use std::fmt;
use zeroize::Zeroizing;

enum Inner {
    P256(EcdsaKeyPair),
    P384(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
    Rsa(RsaKeyPair),
}

/// A private key held in process memory (aws-lc-rs frees and zeroizes it on drop).
pub struct SoftwareKey {
    inner: Inner,
    public: PublicKey,
    raw_public: Vec<u8>,
}

impl fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        write!(f, "SoftwareKey({})", self.public.key_type())
    }
}

impl SoftwareKey {
    /// Generates a key; returns it with its PKCS#8 encoding (zeroized on drop).
    pub fn generate(spec: KeySpec) -> Result<(SoftwareKey, Zeroizing<Vec<u8>>), Error> {
        let rng = SystemRandom::new();
        let fail = |_| Error::Crypto("key generation failed");
        let pkcs8: Zeroizing<Vec<u8>> = match spec {
            KeySpec::EcdsaP256 => {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
                    .map_err(fail)?
                    .as_ref()
                    .to_vec()
                    .into()
            }
            KeySpec::EcdsaP384 => {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, &rng)
                    .map_err(fail)?
                    .as_ref()
                    .to_vec()
                    .into()
            }
            KeySpec::Ed25519 => Ed25519KeyPair::generate_pkcs8v1(&rng)
                .map_err(fail)?
                .as_ref()
                .to_vec()
                .into(),
            KeySpec::Rsa3072 | KeySpec::Rsa4096 => {
                let size = if spec == KeySpec::Rsa3072 {
                    KeySize::Rsa3072
                } else {
                    KeySize::Rsa4096
                };
                let kp = RsaKeyPair::generate(size).map_err(fail)?;
                kp.as_der()
                    .map_err(|_| Error::Crypto("key encoding failed"))?
                    .as_ref()
                    .to_vec()
                    .into()
            }
        };
        let key = SoftwareKey::from_pkcs8(&pkcs8, "generated key")?;
        Ok((key, pkcs8))
    }

    /// Loads an unencrypted PKCS#8 DER key (after decryption). `what` names it in errors.
    pub fn from_pkcs8(der: &[u8], what: &str) -> Result<SoftwareKey, Error> {
        let inner = if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der) {
            Inner::P256(k)
        } else if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, der) {
            Inner::P384(k)
        } else if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            Inner::Ed25519(k)
        } else if let Ok(k) = RsaKeyPair::from_pkcs8(der) {
            Inner::Rsa(k)
        } else {
            return Err(Error::UnsupportedKey(what.to_string()));
        };
        let (alg, raw_public): (&'static rcgen::SignatureAlgorithm, Vec<u8>) = match &inner {
            Inner::P256(k) => (
                &rcgen::PKCS_ECDSA_P256_SHA256,
                k.public_key().as_ref().to_vec(),
            ),
            Inner::P384(k) => (
                &rcgen::PKCS_ECDSA_P384_SHA384,
                k.public_key().as_ref().to_vec(),
            ),
            Inner::Ed25519(k) => (&rcgen::PKCS_ED25519, k.public_key().as_ref().to_vec()),
            Inner::Rsa(k) => (&rcgen::PKCS_RSA_SHA256, k.public_key().as_ref().to_vec()),
        };
        let spki = SpkiOnly {
            alg,
            raw: &raw_public,
        };
        let spki_der = rcgen::PublicKeyData::subject_public_key_info(&spki);
        let public = PublicKey::from_spki_der(&spki_der)
            .map_err(|_| Error::UnsupportedKey(what.to_string()))?;
        Ok(SoftwareKey {
            inner,
            public,
            raw_public,
        })
    }

    /// The public half.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Signs `msg` (ECDSA: DER signature over SHA-256/384; Ed25519: raw;
    /// RSA: PKCS#1 v1.5 SHA-256) for formats rcgen does not build (OCSP, JWS).
    pub fn sign_bytes(&self, msg: &[u8]) -> Result<Vec<u8>, Error> {
        rcgen::SigningKey::sign(self, msg).map_err(|_| Error::Crypto("signing failed"))
    }
}

pub(crate) struct SpkiOnly<'a> {
    pub(crate) alg: &'static rcgen::SignatureAlgorithm,
    pub(crate) raw: &'a [u8],
}

impl rcgen::PublicKeyData for SpkiOnly<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.raw
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

impl rcgen::PublicKeyData for SoftwareKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw_public
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self.inner {
            Inner::P256(_) => &rcgen::PKCS_ECDSA_P256_SHA256,
            Inner::P384(_) => &rcgen::PKCS_ECDSA_P384_SHA384,
            Inner::Ed25519(_) => &rcgen::PKCS_ED25519,
            Inner::Rsa(_) => &rcgen::PKCS_RSA_SHA256,
        }
    }
}

impl rcgen::SigningKey for SoftwareKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let rng = SystemRandom::new();
        let fail = |_| rcgen::Error::RingUnspecified;
        Ok(match &self.inner {
            Inner::P256(k) | Inner::P384(k) => k.sign(&rng, msg).map_err(fail)?.as_ref().to_vec(),
            Inner::Ed25519(k) => k.sign(msg).as_ref().to_vec(),
            Inner::Rsa(k) => {
                let mut out = vec![0u8; k.public_modulus_len()];
                k.sign(&sig::RSA_PKCS1_SHA256, &rng, msg, &mut out)
                    .map_err(fail)?;
                out
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::SigningKey;

    /// The conformance suite every signer backend must pass: it signs, the
    /// signature verifies under the advertised public key, and a different
    /// message does not verify.
    pub(crate) fn conformance(key: &dyn SigningKey, public: &PublicKey) {
        let msg = b"sigil conformance message";
        let signature = key.sign(msg).unwrap();
        let alg = crate::verification_alg(public.key_type());
        sig::UnparsedPublicKey::new(alg, public.raw())
            .verify(msg, &signature)
            .unwrap();
        assert!(
            sig::UnparsedPublicKey::new(alg, public.raw())
                .verify(b"another message", &signature)
                .is_err()
        );
        assert_eq!(key.der_bytes(), public.raw());
    }

    #[test]
    fn software_keys_pass_conformance() {
        for spec in [
            KeySpec::EcdsaP256,
            KeySpec::EcdsaP384,
            KeySpec::Ed25519,
            KeySpec::Rsa3072,
        ] {
            let (key, pkcs8) = SoftwareKey::generate(spec).unwrap();
            conformance(&key, key.public_key());
            let again = SoftwareKey::from_pkcs8(&pkcs8, "test").unwrap();
            assert_eq!(again.public_key(), key.public_key());
            assert!(!format!("{key:?}").contains(&hex::encode(&pkcs8[..])));
        }
    }
}
