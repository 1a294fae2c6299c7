//! Flattened JWS (RFC 7515) as ACME uses it (RFC 8555 §6.2): parsing, the
//! account key from a JWK, signature verification, and EAB's inner HMAC JWS.

use crate::problem::Problem;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::Value;

/// The signature algorithms accepted for account keys.
pub const ALGORITHMS: &[&str] = &[
    "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA",
];

/// A parsed, not yet verified, flattened JWS.
#[derive(Debug)]
pub struct Jws {
    /// The protected header.
    pub header: Protected,
    protected_b64: String,
    payload_b64: String,
    signature_b64: String,
    /// The decoded payload (empty for POST-as-GET).
    pub payload: Vec<u8>,
}

/// The protected header fields ACME uses.
#[derive(Debug, Deserialize)]
pub struct Protected {
    /// Signature algorithm.
    pub alg: String,
    /// Replay nonce.
    #[serde(default)]
    pub nonce: Option<String>,
    /// The request URL.
    #[serde(default)]
    pub url: Option<String>,
    /// The key itself (newAccount, revokeCert by certificate key).
    #[serde(default)]
    pub jwk: Option<Value>,
    /// The account URL.
    #[serde(default)]
    pub kid: Option<String>,
    /// Set when the header has `crit` (whatever its value, `null` too):
    /// extensions the signer says must be understood (RFC 7515 §4.1.11).
    /// This server understands none, so any is refused.
    #[serde(default, deserialize_with = "present")]
    crit: Option<()>,
}

/// `Some(())` for a field that is there, whatever its value: serde calls
/// this only for a field that is present (a missing one takes the default).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<()>, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| Some(()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Flattened {
    protected: String,
    payload: String,
    signature: String,
}

fn b64(field: &str, s: &str) -> Result<Vec<u8>, Problem> {
    B64.decode(s)
        .map_err(|_| Problem::malformed(format!("JWS {field} is not base64url without padding")))
}

impl Jws {
    /// Parses the flattened JSON serialization.
    pub fn parse(body: &[u8]) -> Result<Jws, Problem> {
        let f: Flattened = serde_json::from_slice(body).map_err(|e| {
            Problem::malformed(format!(
                "the body must be a flattened JWS {{protected, payload, signature}} with no unprotected header: {e}"
            ))
        })?;
        let header_json = b64("protected header", &f.protected)?;
        let header: Protected = serde_json::from_slice(&header_json)
            .map_err(|e| Problem::malformed(format!("JWS protected header is invalid: {e}")))?;
        if header.crit.is_some() {
            return Err(Problem::malformed(
                "the JWS protected header has crit, but this server supports no JWS \
                 extensions: sign without crit",
            ));
        }
        let payload = b64("payload", &f.payload)?;
        Ok(Jws {
            header,
            protected_b64: f.protected,
            payload_b64: f.payload,
            signature_b64: f.signature,
            payload,
        })
    }

    /// The payload as JSON (`{}`-like objects only); POST-as-GET has none.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Problem> {
        serde_json::from_slice(&self.payload)
            .map_err(|e| Problem::malformed(format!("request payload is invalid: {e}")))
    }

    /// True for POST-as-GET (empty payload).
    pub fn is_post_as_get(&self) -> bool {
        self.payload_b64.is_empty()
    }

    /// Checks the signature with `key`, which must suit the header's `alg`.
    pub fn verify(&self, key: &AccountKey) -> Result<(), Problem> {
        let alg = algorithm(&self.header.alg)?;
        key.check_alg(alg)?;
        let message = format!("{}.{}", self.protected_b64, self.payload_b64);
        let ok =
            jsonwebtoken::crypto::verify(&self.signature_b64, message.as_bytes(), &key.key, alg)
                .unwrap_or(false);
        if ok {
            Ok(())
        } else {
            Err(Problem::malformed("JWS signature verification failed"))
        }
    }

    /// Verifies an EAB inner JWS (HS256) with `hmac_key`.
    pub fn verify_hmac(&self, hmac_key: &[u8]) -> Result<(), Problem> {
        if self.header.alg != "HS256" {
            return Err(Problem::malformed(format!(
                "externalAccountBinding must use HS256, not {}",
                self.header.alg
            )));
        }
        let message = format!("{}.{}", self.protected_b64, self.payload_b64);
        let sig = b64("externalAccountBinding signature", &self.signature_b64)?;
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, hmac_key);
        aws_lc_rs::hmac::verify(&key, message.as_bytes(), &sig).map_err(|_| {
            Problem::unauthorized(
                "externalAccountBinding signature does not verify with that EAB key",
            )
        })
    }
}

/// Maps a JWS `alg` to a verifier, refusing `none`, HMAC and unknown ones.
pub fn algorithm(alg: &str) -> Result<Algorithm, Problem> {
    let a = match alg {
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "EdDSA" => Algorithm::EdDSA,
        other => {
            let mut p = Problem::bad_signature_algorithm(format!(
                "JWS algorithm '{other}' is not accepted for account keys (use one of {})",
                ALGORITHMS.join(", ")
            ));
            p.algorithms = Some(ALGORITHMS);
            return Err(p);
        }
    };
    Ok(a)
}

/// An account (or certificate) public key from a JWK.
pub struct AccountKey {
    key: DecodingKey,
    jwk: Jwk,
    /// RFC 7638 thumbprint, base64url SHA-256.
    pub thumbprint: String,
    /// The subjectPublicKey contents (EC point, Ed25519 key, RSAPublicKey DER),
    /// to compare with certificate and CSR keys.
    pub raw: Vec<u8>,
    /// The JWK as stored (public members only).
    pub json: Value,
}

impl std::fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AccountKey({})", self.thumbprint)
    }
}

#[derive(der::Sequence)]
struct RsaPublicKey<'a> {
    modulus: der::asn1::UintRef<'a>,
    public_exponent: der::asn1::UintRef<'a>,
}

impl AccountKey {
    /// Reads a public JWK: EC P-256/P-384, RSA 2048–8192 bits, or Ed25519.
    pub fn from_jwk(v: &Value) -> Result<AccountKey, Problem> {
        let bad = |why: String| Problem::bad_public_key(why);
        if v.get("d").is_some() {
            return Err(bad(
                "the JWK holds a private key; send only the public key".into()
            ));
        }
        let jwk: Jwk = serde_json::from_value(v.clone())
            .map_err(|e| bad(format!("the JWK is not a usable public key: {e}")))?;
        let (raw, json) = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(p) => {
                let len = match p.curve {
                    EllipticCurve::P256 => 32,
                    EllipticCurve::P384 => 48,
                    _ => return Err(bad("EC keys must be on P-256 or P-384".into())),
                };
                let x = b64("JWK x", &p.x)?;
                let y = b64("JWK y", &p.y)?;
                if x.len() != len || y.len() != len {
                    return Err(bad("EC JWK coordinates have the wrong length".into()));
                }
                let mut raw = vec![4u8];
                raw.extend_from_slice(&x);
                raw.extend_from_slice(&y);
                let crv = if len == 32 { "P-256" } else { "P-384" };
                (
                    raw,
                    serde_json::json!({"kty": "EC", "crv": crv, "x": p.x, "y": p.y}),
                )
            }
            AlgorithmParameters::RSA(p) => {
                let n = b64("JWK n", &p.n)?;
                let e = b64("JWK e", &p.e)?;
                let n_trim: &[u8] = {
                    let first = n.iter().position(|b| *b != 0).unwrap_or(n.len());
                    &n[first..]
                };
                // n_trim starts with a non-zero byte, or is empty (an all-zero n).
                let bits = n_trim
                    .first()
                    .map_or(0, |b| n_trim.len() * 8 - b.leading_zeros() as usize);
                if !(2048..=8192).contains(&bits) {
                    return Err(bad(format!(
                        "RSA account keys must have 2048 to 8192 bits (this one has {bits})"
                    )));
                }
                let der = der::Encode::to_der(&RsaPublicKey {
                    modulus: der::asn1::UintRef::new(n_trim)
                        .map_err(|_| bad("RSA modulus is invalid".into()))?,
                    public_exponent: der::asn1::UintRef::new(&e)
                        .map_err(|_| bad("RSA exponent is invalid".into()))?,
                })
                .map_err(|_| bad("RSA key cannot be encoded".into()))?;
                (der, serde_json::json!({"kty": "RSA", "n": p.n, "e": p.e}))
            }
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                let x = b64("JWK x", &p.x)?;
                if x.len() != 32 {
                    return Err(bad("Ed25519 JWK has the wrong length".into()));
                }
                (
                    x,
                    serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": p.x}),
                )
            }
            _ => {
                return Err(bad(
                    "account keys must be EC (P-256, P-384), RSA or Ed25519".into(),
                ));
            }
        };
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| bad(format!("the JWK is not a usable public key: {e}")))?;
        let thumbprint = jwk
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|e| bad(format!("cannot compute the JWK thumbprint: {e}")))?;
        Ok(AccountKey {
            key,
            jwk,
            thumbprint,
            raw,
            json,
        })
    }

    /// Refuses an `alg` that does not fit this key.
    fn check_alg(&self, alg: Algorithm) -> Result<(), Problem> {
        let fits = match &self.jwk.algorithm {
            AlgorithmParameters::EllipticCurve(p) => {
                matches!(
                    (p.curve.clone(), alg),
                    (EllipticCurve::P256, Algorithm::ES256)
                        | (EllipticCurve::P384, Algorithm::ES384)
                )
            }
            AlgorithmParameters::RSA(_) => matches!(
                alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            AlgorithmParameters::OctetKeyPair(_) => alg == Algorithm::EdDSA,
            _ => false,
        };
        if fits {
            Ok(())
        } else {
            let mut p = Problem::bad_signature_algorithm(format!(
                "JWS algorithm {alg:?} does not fit the key (an EC P-256 key signs ES256, P-384 ES384, RSA RS*/PS*, Ed25519 EdDSA)"
            ));
            p.algorithms = Some(ALGORITHMS);
            Err(p)
        }
    }

    /// The key authorization for a challenge token (RFC 8555 §8.1).
    pub fn key_authorization(&self, token: &str) -> String {
        format!("{token}.{}", self.thumbprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rsa_key_with_an_empty_or_zero_modulus_is_refused() {
        for n in ["", "AA", "AAAA"] {
            let jwk = serde_json::json!({"kty": "RSA", "n": n, "e": "AQAB"});
            let err = AccountKey::from_jwk(&jwk).err().map(|p| p.detail);
            assert!(
                err.as_deref().is_some_and(|d| d.contains("has 0)")),
                "n = {n:?}: {err:?}"
            );
        }
    }

    #[test]
    fn a_header_with_critical_extensions_is_refused() {
        let jws = |header: serde_json::Value| {
            let body = serde_json::json!({
                "protected": B64.encode(header.to_string()),
                "payload": "",
                "signature": "AA",
            });
            Jws::parse(body.to_string().as_bytes()).map(|_| ())
        };
        let plain = serde_json::json!({"alg": "ES256", "nonce": "n", "url": "u", "kid": "k"});
        assert!(jws(plain.clone()).is_ok());
        let mut crit = plain.clone();
        crit["crit"] = serde_json::json!(["b64"]);
        crit["b64"] = serde_json::json!(false);
        let err = jws(crit).unwrap_err();
        assert!(err.detail.contains("crit"), "{}", err.detail);
        // Present but null is still present.
        let mut null = plain;
        null["crit"] = serde_json::Value::Null;
        assert!(jws(null).unwrap_err().detail.contains("crit"));
    }
}
