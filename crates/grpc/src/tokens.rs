//! Bootstrap tokens: short-lived EdDSA JWTs, bound to a subject and the names it
//! may obtain, each accepted once (the authority spends its `jti`).
//!
//! This module builds the unsigned token and verifies signed ones; the signature
//! itself is made by the token-signing key, which only `sigil-signer` holds.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sigil_authority::TokenGrant;
use sigil_core::Identifier;

/// `iss` of every Sigil bootstrap token.
pub const ISSUER: &str = "sigil";
/// `aud` of every Sigil bootstrap token: the gRPC CSR API.
pub const AUDIENCE: &str = "sigil-grpc";
/// Longest token lifetime `sigil token create` accepts.
pub const MAX_TTL_SECS: i64 = 7 * 24 * 3600;
/// Largest encoded token accepted (bytes).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The claims of a bootstrap token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// `sigil`.
    pub iss: String,
    /// `sigil-grpc`.
    pub aud: String,
    /// The service the token is for; the requester name in policies (`token:SUB`).
    pub sub: String,
    /// The names the token may obtain, normalized.
    pub sans: Vec<String>,
    /// Unique id, accepted once.
    pub jti: String,
    /// Issued at (unix s).
    pub iat: i64,
    /// Not before (unix s).
    pub nbf: i64,
    /// Expiry (unix s).
    pub exp: i64,
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Signature, format, audience, issuer or time checks failed.
    #[error("bootstrap token rejected: {0}")]
    Invalid(String),
}

impl Claims {
    /// Claims for a new token. `sans` are parsed and normalized here so the
    /// server compares like with like.
    pub fn new(
        subject: &str,
        sans: &[String],
        jti: String,
        now: i64,
        ttl_secs: i64,
    ) -> Result<Claims, String> {
        if subject.is_empty() || subject.len() > 256 || subject.chars().any(char::is_control) {
            return Err("the token subject must be 1-256 printable characters".into());
        }
        if sans.is_empty() {
            return Err("a token must name at least one SAN (--san)".into());
        }
        if !(60..=MAX_TTL_SECS).contains(&ttl_secs) {
            return Err(format!(
                "token lifetime must be between 1 minute and {} days",
                MAX_TTL_SECS / 86400
            ));
        }
        let sans = sans
            .iter()
            .map(|s| {
                Identifier::parse_any(s)
                    .map(|i| i.to_string())
                    .map_err(|e| format!("--san {s}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: subject.into(),
            sans,
            jti,
            iat: now,
            nbf: now - 30,
            exp: now + ttl_secs,
        })
    }

    /// The JWS signing input `base64url(header) "." base64url(claims)` for an
    /// EdDSA signature by the key with id `kid`.
    pub fn signing_input(&self, kid: &str) -> Result<String, serde_json::Error> {
        let header = serde_json::json!({ "alg": "EdDSA", "typ": "JWT", "kid": kid });
        Ok(format!(
            "{}.{}",
            B64.encode(serde_json::to_vec(&header)?),
            B64.encode(serde_json::to_vec(self)?)
        ))
    }
}

/// Appends the signature to a signing input: the compact JWS.
pub fn assemble(signing_input: &str, signature: &[u8]) -> String {
    format!("{signing_input}.{}", B64.encode(signature))
}

/// Verifies tokens against the server's token-signing public key.
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenVerifier")
    }
}

impl TokenVerifier {
    /// From the raw 32-byte Ed25519 public key.
    pub fn new(ed25519_public: &[u8]) -> TokenVerifier {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        TokenVerifier {
            key: DecodingKey::from_ed_der(ed25519_public),
            validation,
        }
    }

    /// Checks signature, issuer, audience and times; returns what the token grants.
    pub fn verify(&self, token: &str) -> Result<TokenGrant, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Invalid("token is too long".into()));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| TokenError::Invalid(describe(&e)))?;
        let c = data.claims;
        if c.exp - c.iat > MAX_TTL_SECS || c.iat > c.exp {
            return Err(TokenError::Invalid(format!(
                "token lifetime exceeds the {} day maximum",
                MAX_TTL_SECS / 86400
            )));
        }
        if c.jti.is_empty() || c.jti.len() > 128 {
            return Err(TokenError::Invalid("token has no usable jti".into()));
        }
        let sans = c
            .sans
            .iter()
            .map(|s| Identifier::parse_any(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TokenError::Invalid(format!("token names an invalid SAN: {e}")))?;
        Ok(TokenGrant {
            jti: c.jti,
            subject: c.sub,
            expires_at: c.exp,
            sans,
        })
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => {
            "token has expired; create a new one with `sigil token create`".into()
        }
        K::ImmatureSignature => "token is not valid yet (check the clocks)".into(),
        K::InvalidSignature => "token signature does not verify (was it made by this CA?)".into(),
        K::InvalidAudience => "token is not meant for the gRPC CSR API".into(),
        K::InvalidIssuer => "token was not issued by Sigil".into(),
        K::InvalidAlgorithm => "token algorithm must be EdDSA".into(),
        K::MissingRequiredClaim(c) => format!("token lacks the '{c}' claim"),
        _ => format!("token is malformed ({e})"),
    }
}
