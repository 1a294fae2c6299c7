use thiserror::Error;

/// Errors from key handling and signing. Messages never contain key material.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A cryptographic primitive failed.
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
    /// The key file could not be decrypted.
    #[error("cannot decrypt key file {0}: wrong passphrase or not an encrypted PKCS#8 key")]
    Decrypt(String),
    /// The decrypted key is not a type Sigil supports.
    #[error("key in {0} is not an ECDSA P-256/P-384, Ed25519 or RSA key usable by Sigil")]
    UnsupportedKey(String),
    /// Refusing to overwrite an existing key.
    #[error("{0} already exists; refusing to overwrite a key (move it away first)")]
    Exists(String),
    /// A key file with permissions that expose it.
    #[error("key file {0} is readable by group or others (mode {1:o}); run: chmod 600 {0}")]
    Permissions(String, u32),
    /// The passphrase is unusable.
    #[error("passphrase rejected: {0}")]
    Passphrase(String),
    /// File I/O.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The certificate does not belong to the key.
    #[error("certificate public key does not match the private key")]
    KeyMismatch,
    /// A PKCS#11 token or module problem.
    #[error("PKCS#11: {0}")]
    Pkcs11(String),
    /// The token refused the PIN (it locks after a few of these).
    #[error("PKCS#11: wrong PIN for token '{0}'")]
    WrongPin(String),
    /// rcgen refused to build or sign.
    #[error("certificate signing failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A domain-level error.
    #[error(transparent)]
    Core(#[from] sigil_core::Error),
}
