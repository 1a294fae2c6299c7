//! Leaf certificate profiles.

use crate::{Error, KeyType};
use rcgen::{ExtendedKeyUsagePurpose as Eku, KeyUsagePurpose as Ku};
use std::fmt;
use std::str::FromStr;

/// A leaf certificate profile: which extended key usages the certificate gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Profile {
    /// serverAuth + clientAuth: a service that both serves and calls over mTLS.
    #[default]
    Mtls,
    /// serverAuth only.
    Server,
    /// clientAuth only.
    Client,
}

impl Profile {
    /// All profiles, in display order.
    pub const ALL: [Profile; 3] = [Profile::Mtls, Profile::Server, Profile::Client];

    /// The profile's name as used in CLI, policy and API.
    pub fn name(&self) -> &'static str {
        match self {
            Profile::Mtls => "mtls",
            Profile::Server => "server",
            Profile::Client => "client",
        }
    }

    /// One-line description for directories and help.
    pub fn description(&self) -> &'static str {
        match self {
            Profile::Mtls => "TLS server and client authentication (service-to-service mTLS)",
            Profile::Server => "TLS server authentication only",
            Profile::Client => "TLS client authentication only",
        }
    }

    /// Extended key usages for this profile.
    pub fn extended_key_usages(&self) -> Vec<Eku> {
        match self {
            Profile::Mtls => vec![Eku::ServerAuth, Eku::ClientAuth],
            Profile::Server => vec![Eku::ServerAuth],
            Profile::Client => vec![Eku::ClientAuth],
        }
    }

    /// Whether a certificate of this profile can do all that one of `other`
    /// can (`mtls` covers `server` and `client`). A deny rule naming a
    /// profile denies every profile that covers it.
    pub fn covers(&self, other: Profile) -> bool {
        let mine = self.extended_key_usages();
        other.extended_key_usages().iter().all(|u| mine.contains(u))
    }

    /// Key usages for a subject key of `key_type` under this profile. RSA server
    /// keys also get keyEncipherment for TLS 1.2 RSA key exchange.
    pub fn key_usages(&self, key_type: KeyType) -> Vec<Ku> {
        match (key_type, self) {
            (KeyType::Rsa(_), Profile::Mtls | Profile::Server) => {
                vec![Ku::DigitalSignature, Ku::KeyEncipherment]
            }
            _ => vec![Ku::DigitalSignature],
        }
    }
}

impl FromStr for Profile {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Profile::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::Profile(s.to_string()))
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
