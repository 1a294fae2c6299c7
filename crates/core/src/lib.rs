//! Sigil's pure domain: parsed CSRs, normalized names, key types, serials,
//! certificate profiles and the templates the signer turns into certificates.
//!
//! Nothing here does I/O or holds a private key. Signature *verification*
//! (CSR self-signatures) uses aws-lc-rs public-key operations only.

pub mod clock;
pub mod constraints;
pub mod crl;
pub mod csr;
pub mod dn;
mod error;
pub mod key;
pub mod leaf;
pub mod lifetime;
pub mod names;
pub mod ocsp;
pub mod profile;
pub mod ratelimit;
pub mod requester;
pub mod revocation;
pub mod serial;
pub mod template;

pub use clock::{Clock, SystemClock};
pub use crl::CrlSharding;
pub use csr::CaRequest;
pub use csr::Csr;
pub use error::{CsrError, Error, NameError};
pub use key::{KeySpec, KeyType, PublicKey};
pub use leaf::LeafInfo;
pub use names::{DnsName, Identifier, SpiffeId};
pub use profile::Profile;
pub use requester::Requester;
pub use serial::Serial;
pub use template::{CaUrls, IssuerId, IssuerInfo, LeafCommon, LeafSpec, LeafTemplate};

/// Hex-encoded SHA-256 of `data`, the fingerprint format Sigil prints everywhere.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
