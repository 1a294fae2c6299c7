//! Sigil's key custody. This is the only crate that holds private keys: software
//! keys on aws-lc-rs (constant-time, zeroized on drop), stored as encrypted
//! PKCS#8 files (PBES2: PBKDF2-HMAC-SHA256 + AES-256-CBC) with mode 0600.
//!
//! Every signature goes through [`rcgen::SigningKey`], so a hardware-backed key
//! can plug in beside [`SoftwareKey`] without touching certificate code.

mod ceremony;
mod error;
mod keyfile;
mod pkcs11;
mod software;

pub use ceremony::{CaSigner, intermediate_csr, self_signed_root, sign_intermediate};
pub use error::Error;
pub use keyfile::{Passphrase, read_encrypted_key, seal_key, unseal_key, write_encrypted_key};
pub use pkcs11::{Pkcs11Key, Pkcs11Uri, TokenHandle};
pub use software::SoftwareKey;

use sigil_core::Serial;

/// A CA's private key: in software (an encrypted key file) or in a PKCS#11
/// token. Everything that signs for a CA takes this.
#[derive(Debug)]
pub enum CaKey {
    /// In memory, from an encrypted PKCS#8 file.
    Software(SoftwareKey),
    /// In a PKCS#11 token.
    Pkcs11(Pkcs11Key),
}

impl From<SoftwareKey> for CaKey {
    fn from(k: SoftwareKey) -> CaKey {
        CaKey::Software(k)
    }
}

impl From<Pkcs11Key> for CaKey {
    fn from(k: Pkcs11Key) -> CaKey {
        CaKey::Pkcs11(k)
    }
}

impl CaKey {
    /// The public half.
    pub fn public_key(&self) -> &sigil_core::PublicKey {
        match self {
            CaKey::Software(k) => k.public_key(),
            CaKey::Pkcs11(k) => k.public_key(),
        }
    }

    /// Signs `msg` (see [`SoftwareKey::sign_bytes`]).
    pub fn sign_bytes(&self, msg: &[u8]) -> Result<Vec<u8>, Error> {
        match self {
            CaKey::Software(k) => k.sign_bytes(msg),
            CaKey::Pkcs11(k) => k.sign_bytes(msg),
        }
    }

    /// The token holding this key, if it is in one.
    pub fn token(&self) -> Option<TokenHandle> {
        match self {
            CaKey::Software(_) => None,
            CaKey::Pkcs11(k) => Some(k.token()),
        }
    }

    /// Signs a probe message and verifies the signature under the public
    /// key: proves the key (and its token) works before it is relied on.
    pub fn self_test(&self) -> Result<(), Error> {
        let msg = b"sigil key self-test";
        let signature = self.sign_bytes(msg)?;
        verify(self.public_key(), msg, &signature)
    }
}

/// Checks `signature` over `msg` under `public` (as this crate's keys sign).
pub(crate) fn verify(
    public: &sigil_core::PublicKey,
    msg: &[u8],
    signature: &[u8],
) -> Result<(), Error> {
    use aws_lc_rs::signature as sig;
    sig::UnparsedPublicKey::new(verification_alg(public.key_type()), public.raw())
        .verify(msg, signature)
        .map_err(|_| Error::Crypto("the key's signature does not verify under its public key"))
}

impl rcgen::PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            CaKey::Software(k) => k.der_bytes(),
            CaKey::Pkcs11(k) => k.der_bytes(),
        }
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            CaKey::Software(k) => k.algorithm(),
            CaKey::Pkcs11(k) => k.algorithm(),
        }
    }
}

impl rcgen::SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            CaKey::Software(k) => k.sign(msg),
            CaKey::Pkcs11(k) => k.sign(msg),
        }
    }
}

/// How signatures of a key type are verified (the algorithms Sigil signs with).
pub(crate) fn verification_alg(
    key_type: sigil_core::KeyType,
) -> &'static dyn aws_lc_rs::signature::VerificationAlgorithm {
    use aws_lc_rs::signature as sig;
    match key_type {
        sigil_core::KeyType::EcdsaP256 => &sig::ECDSA_P256_SHA256_ASN1,
        sigil_core::KeyType::EcdsaP384 => &sig::ECDSA_P384_SHA384_ASN1,
        sigil_core::KeyType::Ed25519 => &sig::ED25519,
        sigil_core::KeyType::Rsa(_) => &sig::RSA_PKCS1_2048_8192_SHA256,
    }
}

/// Draws a fresh 128-bit positive serial from the system CSPRNG.
pub fn random_serial() -> Result<Serial, Error> {
    loop {
        let mut b = [0u8; 16];
        aws_lc_rs::rand::fill(&mut b).map_err(|_| Error::Crypto("random generator failed"))?;
        if let Some(s) = Serial::from_random(b) {
            return Ok(s);
        }
    }
}

/// Draws a leaf serial: issuance time in milliseconds, then 80 bits from the
/// system CSPRNG (see [`Serial::from_time_and_random`]).
pub fn timed_serial(unix_ms: u64) -> Result<Serial, Error> {
    let mut b = [0u8; 10];
    random_bytes(&mut b)?;
    Ok(Serial::from_time_and_random(unix_ms, b))
}

/// Fills `buf` from the system CSPRNG (tokens, passphrases, salts).
pub fn random_bytes(buf: &mut [u8]) -> Result<(), Error> {
    aws_lc_rs::rand::fill(buf).map_err(|_| Error::Crypto("random generator failed"))
}

/// Throwaway CAs for test suites and benchmarks.
#[doc(hidden)]
pub mod testing {
    /// A fresh SoftHSM token with user PIN `pin`, when the environment
    /// provides SoftHSM (`SOFTHSM2_CONF`, set by scripts/test): a key URI
    /// template (`OBJ` stands for the key label) and the PIN.
    #[allow(clippy::expect_used)] // test support: a failed setup is a failure
    pub fn softhsm_token(name: &str, pin: &str) -> Option<(String, String)> {
        let module = std::env::var("SIGIL_TEST_PKCS11_MODULE")
            .unwrap_or_else(|_| "/usr/lib/softhsm/libsofthsm2.so".into());
        let ready =
            std::env::var_os("SOFTHSM2_CONF").is_some() && std::path::Path::new(&module).exists();
        if !ready {
            assert!(
                std::env::var("SIGIL_REQUIRE_EXTERNAL").as_deref() != Ok("1"),
                "SIGIL_REQUIRE_EXTERNAL=1 but SoftHSM is not set up (SOFTHSM2_CONF, {module})"
            );
            eprintln!("SoftHSM not set up: skipped");
            return None;
        }
        let mut tag = [0u8; 6];
        crate::random_bytes(&mut tag).expect("random bytes");
        let label = format!(
            "{name}-{}",
            tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let out = std::process::Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                &label,
                "--pin",
                pin,
                "--so-pin",
                "so-pin-0815",
            ])
            .output()
            .expect("softhsm2-util");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some((
            format!("pkcs11:token={label};object=OBJ?module-path={module}"),
            pin.to_string(),
        ))
    }

    use crate::{
        CaSigner, SoftwareKey, intermediate_csr, random_serial, self_signed_root, sign_intermediate,
    };
    use sigil_core::dn::parse_subject;
    use sigil_core::template::IntermediateOptions;
    use sigil_core::{CaRequest, KeySpec};
    use std::time::Duration;
    use time::OffsetDateTime;
    use zeroize::Zeroizing;

    /// An in-memory root (P-384) and intermediate (P-256) it signed.
    pub struct TestCa {
        /// The root, able to sign.
        pub root: CaSigner,
        /// The intermediate certificate.
        pub intermediate_der: Vec<u8>,
        /// The intermediate's PKCS#8 key.
        pub intermediate_pkcs8: Zeroizing<Vec<u8>>,
    }

    impl TestCa {
        /// Creates the pair, valid from `now` (root 10 years, intermediate 1 year).
        pub fn new(now: OffsetDateTime) -> Result<TestCa, crate::Error> {
            let (root_key, _) = SoftwareKey::generate(KeySpec::EcdsaP384)?;
            let root_der = self_signed_root(
                &root_key,
                parse_subject("CN=Test Root")?,
                &random_serial()?,
                now,
                Duration::from_secs(86400 * 3650),
            )?;
            let root = CaSigner::new(&root_der, root_key)?;
            let (int_key, intermediate_pkcs8) = SoftwareKey::generate(KeySpec::EcdsaP256)?;
            let csr = intermediate_csr(&int_key, parse_subject("CN=Test Issuing CA")?)?;
            let intermediate_der = sign_intermediate(
                &root,
                &CaRequest::parse(&csr)?,
                &random_serial()?,
                now,
                Duration::from_secs(86400 * 365),
                &IntermediateOptions::default(),
            )?;
            Ok(TestCa {
                root,
                intermediate_der,
                intermediate_pkcs8,
            })
        }

        /// Another intermediate under the same root (a rotation's next
        /// issuer): its certificate and PKCS#8 key.
        pub fn another_intermediate(
            &self,
            now: OffsetDateTime,
        ) -> Result<(Vec<u8>, Zeroizing<Vec<u8>>), crate::Error> {
            let (key, pkcs8) = SoftwareKey::generate(KeySpec::EcdsaP256)?;
            let csr = intermediate_csr(&key, parse_subject("CN=Test Issuing CA 2")?)?;
            let der = sign_intermediate(
                &self.root,
                &CaRequest::parse(&csr)?,
                &random_serial()?,
                now,
                Duration::from_secs(86400 * 365),
                &IntermediateOptions::default(),
            )?;
            Ok((der, pkcs8))
        }

        /// A fresh handle on the intermediate's key.
        pub fn intermediate_key(&self) -> Result<SoftwareKey, crate::Error> {
            SoftwareKey::from_pkcs8(&self.intermediate_pkcs8, "test intermediate")
        }
    }
}
