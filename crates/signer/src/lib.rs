//! Sigil's key custody. This is the only crate that holds private keys: software
//! keys on aws-lc-rs (constant-time, zeroized on drop), stored as encrypted
//! PKCS#8 files (PBES2: PBKDF2-HMAC-SHA256 + AES-256-CBC) with mode 0600.
//!
//! Every signature goes through [`rcgen::SigningKey`], so a hardware-backed key
//! can plug in beside [`SoftwareKey`] without touching certificate code.

mod ceremony;
mod error;
mod keyfile;
mod software;

pub use ceremony::{CaSigner, intermediate_csr, self_signed_root, sign_intermediate};
pub use error::Error;
pub use keyfile::{Passphrase, read_encrypted_key, write_encrypted_key};
pub use software::SoftwareKey;

use sigil_core::Serial;

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

/// Fills `buf` from the system CSPRNG (tokens, passphrases, salts).
pub fn random_bytes(buf: &mut [u8]) -> Result<(), Error> {
    aws_lc_rs::rand::fill(buf).map_err(|_| Error::Crypto("random generator failed"))
}
