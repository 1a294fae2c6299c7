//! Orders and authorizations as stored (JSON bodies) and as served.

use crate::Acme;
use crate::problem::Problem;
use crate::validate::ChallengeType;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sigil_core::{DnsName, Identifier};
use sigil_store::{AcmeObject, AcmeTable};
use std::net::IpAddr;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// An ACME identifier as on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireIdentifier {
    /// `dns` or `ip`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The name or address.
    pub value: String,
}

impl WireIdentifier {
    /// Normalizes and checks one identifier (RFC 8555 §9.7.7, RFC 8738).
    pub fn parse(&self) -> Result<Identifier, Problem> {
        let sub = |kind: fn(String) -> Problem, why: String| {
            let mut p = kind(format!("identifier {}:{}: {why}", self.kind, self.value));
            p.subproblems.push(crate::problem::Subproblem {
                kind: p.kind,
                detail: why,
                identifier: (self.kind.clone(), self.value.clone()),
            });
            p
        };
        match self.kind.as_str() {
            "dns" => DnsName::parse(&self.value)
                .map(Identifier::Dns)
                .map_err(|e| sub(Problem::rejected_identifier, e.to_string())),
            "ip" => self
                .value
                .parse::<IpAddr>()
                .map(|ip| Identifier::Ip(ip.to_canonical()))
                .map_err(|_| sub(Problem::rejected_identifier, "not an IP address".into())),
            other => Err(sub(
                Problem::unsupported_identifier,
                format!("identifier type '{other}' is not supported (use dns or ip)"),
            )),
        }
    }

    /// The wire form of a normalized identifier.
    pub fn of(id: &Identifier) -> WireIdentifier {
        WireIdentifier {
            kind: id.kind().to_string(),
            value: id.to_string(),
        }
    }

    /// The key used to find reusable authorizations (`dns:name`, `ip:addr`).
    pub fn key(&self) -> String {
        format!("{}:{}", self.kind, self.value)
    }

    /// A wildcard DNS name.
    pub fn is_wildcard(&self) -> bool {
        self.kind == "dns" && self.value.starts_with("*.")
    }
}

/// Stored order fields beyond the indexed columns.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OrderBody {
    /// Requested identifiers, normalized.
    pub identifiers: Vec<WireIdentifier>,
    /// Authorization ids, one per identifier.
    pub authzs: Vec<String>,
    /// Requested notBefore (RFC 3339), echoed back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// Requested notAfter (RFC 3339), echoed back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// Lifetime to ask for at finalize (s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<u64>,
    /// Issuance profile.
    pub profile: String,
    /// ARI certificate ID this order replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    /// notAfter (unix s) of the certificate it replaces: once finalized, the
    /// order is kept (its expiry moved) until then, so that certificate
    /// cannot be replaced a second time after the retention pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_until: Option<i64>,
    /// Why the order failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    /// Serial (hex) of the issued certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// When processing started (unix s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processing_since: Option<i64>,
}

/// One challenge inside an authorization.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Challenge {
    /// Wire type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Token (128+ random bits).
    pub token: String,
    /// pending, processing, valid, invalid.
    pub status: String,
    /// When validated (unix s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validated: Option<i64>,
    /// Why validation failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

/// Stored authorization fields beyond the indexed columns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthzBody {
    /// The identifier (with `*.` for wildcards).
    pub identifier: WireIdentifier,
    /// Offered challenges.
    pub challenges: Vec<Challenge>,
    /// Until when later orders may reuse it (unix s): `acme.authz_reuse`
    /// after its validation, which may end before the authorization does
    /// (it stays valid as long as the order it was made for). None: until
    /// it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reuse_until: Option<i64>,
}

impl AuthzBody {
    /// Until when a valid authorization may complete orders other than its
    /// own (unix s).
    pub fn reusable_until(a: &AcmeObject) -> i64 {
        let reuse = decode::<AuthzBody>(a)
            .ok()
            .and_then(|b| b.reuse_until)
            .unwrap_or(i64::MAX);
        a.expires_at.min(reuse)
    }
}

pub fn decode<T: serde::de::DeserializeOwned>(o: &AcmeObject) -> Result<T, Problem> {
    serde_json::from_str(&o.body).map_err(|e| {
        Problem::server_internal(format!("stored ACME object {} is corrupt: {e}", o.id))
    })
}

pub fn encode<T: Serialize>(t: &T) -> String {
    serde_json::to_string(t).unwrap_or_else(|_| "{}".into())
}

pub fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

pub fn parse_time(field: &str, s: &str) -> Result<OffsetDateTime, Problem> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|_| Problem::malformed(format!("{field} '{s}' is not an RFC 3339 time")))
}

/// `N` random bytes, base64url.
fn random_b64<const N: usize>() -> Result<String, Problem> {
    use base64::Engine;
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| Problem::server_internal("no randomness"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

/// A random URL-safe id with 128 bits of entropy.
pub fn random_id() -> Result<String, Problem> {
    random_b64::<16>()
}

/// A new order or authorization id: the time in milliseconds (12 hex
/// digits), then 96 random bits (16 base64url characters). Ids made close
/// together sort together, so a table's id index grows at one place
/// instead of changing a random page per insert; the random part keeps
/// them unguessable.
pub fn object_id(now_ms: i64) -> Result<String, Problem> {
    Ok(format!(
        "{:012x}{}",
        now_ms & 0xffff_ffff_ffff,
        random_b64::<12>()?
    ))
}

/// The challenges offered for an identifier: wildcards only by dns-01
/// (RFC 8555 §7.1.3), IPs never by dns-01 (RFC 8738 §7).
pub fn offered(id: &WireIdentifier) -> Vec<ChallengeType> {
    if id.is_wildcard() {
        vec![ChallengeType::Dns01]
    } else if id.kind == "ip" {
        vec![ChallengeType::Http01, ChallengeType::TlsAlpn01]
    } else {
        vec![
            ChallengeType::Http01,
            ChallengeType::Dns01,
            ChallengeType::TlsAlpn01,
        ]
    }
}

/// A new pending authorization, made at `now_ms` (unix ms).
pub fn pending_authz(
    account_id: &str,
    id: &WireIdentifier,
    now_ms: i64,
    expires_at: i64,
) -> Result<AcmeObject, Problem> {
    let challenges = offered(id)
        .into_iter()
        .map(|c| {
            Ok(Challenge {
                kind: c.name().into(),
                token: random_id()?,
                status: "pending".into(),
                validated: None,
                error: None,
            })
        })
        .collect::<Result<Vec<_>, Problem>>()?;
    Ok(AcmeObject {
        id: object_id(now_ms)?,
        account_id: account_id.into(),
        status: "pending".into(),
        expires_at,
        body: encode(&AuthzBody {
            identifier: id.clone(),
            challenges,
            reuse_until: None,
        }),
        created_at: now_ms.div_euclid(1000),
    })
}

impl Acme {
    pub(crate) fn order_url(&self, id: &str) -> String {
        self.url(&format!("/acme/order/{id}"))
    }

    pub(crate) fn authz_url(&self, id: &str) -> String {
        self.url(&format!("/acme/authz/{id}"))
    }

    pub(crate) fn challenge_url(&self, authz: &str, kind: &str) -> String {
        self.url(&format!("/acme/chall/{authz}/{kind}"))
    }

    /// The status a client sees: pending or valid authorizations past their
    /// expiry are expired.
    pub(crate) fn authz_status(&self, a: &AcmeObject) -> String {
        if (a.status == "pending" || a.status == "valid") && a.expires_at <= self.now() {
            "expired".into()
        } else {
            a.status.clone()
        }
    }

    pub(crate) fn challenge_json(&self, authz_id: &str, c: &Challenge) -> Value {
        let mut v = json!({
            "type": c.kind,
            "url": self.challenge_url(authz_id, &c.kind),
            "token": c.token,
            "status": c.status,
        });
        if let Some(t) = c.validated {
            v["validated"] = json!(rfc3339(t));
        }
        if let Some(e) = &c.error {
            v["error"] = e.clone();
        }
        v
    }

    pub(crate) fn authz_json(&self, a: &AcmeObject) -> Result<Value, Problem> {
        let body: AuthzBody = decode(a)?;
        let status = self.authz_status(a);
        let wildcard = body.identifier.is_wildcard();
        let value = body
            .identifier
            .value
            .strip_prefix("*.")
            .unwrap_or(&body.identifier.value);
        // A valid authorization lists only the challenge that validated it.
        let challenges: Vec<Value> = body
            .challenges
            .iter()
            .filter(|c| status != "valid" || c.status == "valid")
            .map(|c| self.challenge_json(&a.id, c))
            .collect();
        let mut v = json!({
            "identifier": {"type": body.identifier.kind, "value": value},
            "status": status,
            "expires": rfc3339(a.expires_at),
            "challenges": challenges,
        });
        if wildcard {
            v["wildcard"] = json!(true);
        }
        Ok(v)
    }

    pub(crate) fn order_json(&self, o: &AcmeObject) -> Result<Value, Problem> {
        let body: OrderBody = decode(o)?;
        let mut v = json!({
            "status": o.status,
            "expires": rfc3339(o.expires_at),
            "identifiers": body.identifiers.iter().map(|i| json!({"type": i.kind, "value": i.value})).collect::<Vec<_>>(),
            "authorizations": body.authzs.iter().map(|a| self.authz_url(a)).collect::<Vec<_>>(),
            "finalize": self.url(&format!("/acme/order/{}/finalize", o.id)),
            "profile": body.profile,
        });
        if let Some(t) = &body.not_before {
            v["notBefore"] = json!(t);
        }
        if let Some(t) = &body.not_after {
            v["notAfter"] = json!(t);
        }
        if let Some(r) = &body.replaces {
            v["replaces"] = json!(r);
        }
        if let Some(e) = &body.error {
            v["error"] = e.clone();
        }
        if let Some(serial) = &body.certificate {
            v["certificate"] = json!(self.url(&format!("/acme/cert/{serial}")));
        }
        Ok(v)
    }

    /// Loads an order and brings its status up to date with its
    /// authorizations and expiry (RFC 8555 §7.1.6), storing any change.
    pub(crate) async fn current_order(&self, id: &str) -> Result<Option<AcmeObject>, Problem> {
        let store = self.authority.store();
        let Some(mut order) = store.acme_object(AcmeTable::Orders, id).await? else {
            return Ok(None);
        };
        let now = self.now();
        for _ in 0..3 {
            let mut body: OrderBody = decode(&order)?;
            let next = match order.status.as_str() {
                "pending" | "ready" if order.expires_at <= now => {
                    body.error = Some(
                        Problem::malformed("the order expired before it was finalized").to_json(),
                    );
                    Some("invalid")
                }
                // A ready order is checked again too: one of its
                // authorizations may have been deactivated or have expired
                // since it became ready.
                "pending" | "ready" => {
                    let mut all_valid = true;
                    let mut failed = None;
                    for aid in &body.authzs {
                        // Gone: it expired long ago and the retention pass
                        // deleted it (an order can outlive its authorizations
                        // when acme.order_lifetime exceeds acme.authz_reuse).
                        let Some(a) = store.acme_object(AcmeTable::Authzs, aid).await? else {
                            failed = Some(
                                Problem::unauthorized(format!(
                                    "authorization {aid} expired and was deleted"
                                ))
                                .to_json(),
                            );
                            break;
                        };
                        match self.authz_status(&a).as_str() {
                            "valid" => {}
                            "pending" => all_valid = false,
                            other => {
                                let ab: AuthzBody = decode(&a)?;
                                let err = ab
                                    .challenges
                                    .iter()
                                    .find_map(|c| c.error.clone())
                                    .unwrap_or_else(|| {
                                        Problem::unauthorized(format!(
                                            "the authorization for {} is {other}",
                                            ab.identifier.value
                                        ))
                                        .to_json()
                                    });
                                failed = Some(err);
                                break;
                            }
                        }
                    }
                    if let Some(err) = failed {
                        body.error = Some(err);
                        Some("invalid")
                    } else if all_valid {
                        // Derived, not stored: finalize moves a pending order
                        // with valid authorizations straight to processing.
                        return Ok(Some(AcmeObject {
                            status: "ready".into(),
                            ..order
                        }));
                    } else {
                        None
                    }
                }
                "processing"
                    if body.processing_since.is_some_and(|t| t + 600 < now)
                        && body.certificate.is_none() =>
                {
                    body.error = Some(
                        Problem::server_internal("issuance was interrupted; place a new order")
                            .to_json(),
                    );
                    Some("invalid")
                }
                _ => None,
            };
            let Some(next) = next else {
                return Ok(Some(order));
            };
            let updated = AcmeObject {
                status: next.into(),
                body: encode(&body),
                ..order.clone()
            };
            if store
                .acme_update(AcmeTable::Orders, &order.status, &updated)
                .await?
            {
                return Ok(Some(updated));
            }
            // Another request moved it first: read again.
            match store.acme_object(AcmeTable::Orders, id).await? {
                Some(o) => order = o,
                None => return Ok(None),
            }
        }
        Ok(Some(order))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_ids_lead_with_the_time_and_stay_unguessable() {
        let now_ms = 1_795_000_000_123;
        let (a, b) = (object_id(now_ms).unwrap(), object_id(now_ms).unwrap());
        assert_eq!(a.len(), 28, "{a}");
        assert_eq!(a[..12], format!("{now_ms:012x}"));
        assert_ne!(a[12..], b[12..]);
        // Later ids sort after earlier ones (a millisecond apart or more).
        assert!(object_id(now_ms + 1).unwrap() > a);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }
}
