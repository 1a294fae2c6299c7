//! Revocation as the records have it. It needs only the store: an operator
//! revokes from the CLI with no issuer key, HSM or policy at hand (a
//! compromised key is revoked when those may be what is broken). The
//! [`crate::Authority`] wraps these and keeps its in-memory view current.

use crate::{Error, Revoked, TokenGrant, unix_ms};
use serde_json::json;
use sigil_core::{Requester, Serial};
use sigil_store::{AuditEvent, CertificateRow, Change, NewRevocation, Store};
use time::OffsetDateTime;

/// Revokes a certificate at `now`. `by` is who asks; the entry point has
/// already established that they may (their own certificate, or an
/// operator). A refusal is audited (`cert.revoke_denied`).
pub async fn revoke(
    store: &Store,
    now: OffsetDateTime,
    serial: &Serial,
    reason: i32,
    by: &Requester,
) -> Result<Revoked, Error> {
    let result = revoke_unaudited_refusal(store, now, serial, reason, by).await;
    audit_refusal(store, now, result, serial, by).await
}

/// Revokes a certificate on the strength of an unspent bootstrap token whose
/// names cover every name in the certificate. The token is not spent, so
/// the holder can still obtain a replacement with it.
pub async fn revoke_with_token(
    store: &Store,
    now: OffsetDateTime,
    serial: &Serial,
    reason: i32,
    grant: &TokenGrant,
) -> Result<Revoked, Error> {
    let by = Requester::Token(grant.subject.clone());
    let result = match store.certificate(&serial.to_hex()).await? {
        None => Err(Error::NotFound(format!(
            "no certificate with serial {serial}"
        ))),
        Some(_) if store.token_spent(&grant.jti).await? => Err(Error::TokenReplayed(format!(
            "token {} was already used; bootstrap tokens are accepted once",
            grant.jti
        ))),
        Some(row) => {
            let allowed: Vec<String> = grant.sans.iter().map(|i| i.to_string()).collect();
            match row.names.iter().find(|n| !allowed.contains(n)) {
                Some(n) => Err(Error::TokenScope(format!(
                    "the token for '{}' does not cover {n}, a name in certificate {serial}",
                    grant.subject
                ))),
                None => revoke_unaudited_refusal(store, now, serial, reason, &by).await,
            }
        }
    };
    audit_refusal(store, now, result, serial, &by).await
}

async fn audit_refusal(
    store: &Store,
    now: OffsetDateTime,
    result: Result<Revoked, Error>,
    serial: &Serial,
    by: &Requester,
) -> Result<Revoked, Error> {
    let e = match result {
        Ok(r) => return Ok(r),
        Err(e @ (Error::Store(_) | Error::Internal(_) | Error::Signer(_))) => return Err(e),
        Err(e) => e,
    };
    let recorded = store
        .commit(Change::Record(AuditEvent {
            ts_ms: unix_ms(now),
            kind: "cert.revoke_denied".into(),
            actor: by.to_string(),
            subject: serial.to_hex(),
            detail: json!({ "reason": e.to_string() }),
        }))
        .await;
    match recorded {
        Ok(_) => Err(e),
        Err(store) => Err(store.into()),
    }
}

async fn revoke_unaudited_refusal(
    store: &Store,
    now: OffsetDateTime,
    serial: &Serial,
    reason: i32,
    by: &Requester,
) -> Result<Revoked, Error> {
    let hex = serial.to_hex();
    if matches!(reason, 6 | 8) {
        return Err(Error::InvalidRevocation(format!(
            "reason {} is not accepted: a revocation here is final (no holds)",
            sigil_core::revocation::reason_name(reason)
        )));
    }
    if !sigil_core::revocation::is_valid_reason(reason) {
        return Err(Error::InvalidRevocation(format!(
            "reason code {reason} is not a CRLReason Sigil accepts (0-5, 9, 10)"
        )));
    }
    // These say a CA or an attribute authority was compromised: an
    // operator's finding, not one a certificate's holder can make.
    if matches!(reason, 2 | 10) && !matches!(by, Requester::Operator(_)) {
        return Err(Error::InvalidRevocation(format!(
            "reason {} is for operators; give unspecified, keyCompromise, affiliationChanged, superseded, cessationOfOperation or privilegeWithdrawn",
            sigil_core::revocation::reason_name(reason)
        )));
    }
    let row = store
        .certificate(&hex)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no certificate with serial {hex}")))?;
    let receipt = store
        .commit(Change::Revoke {
            revocation: NewRevocation {
                serial: hex.clone(),
                issuer_id: row.issuer_id.clone(),
                reason,
                revoked_at: now.unix_timestamp(),
                revoked_by: by.to_string(),
                // keyCompromise: that key is never certified again.
                block_key: (reason == 1).then(|| row.key_fingerprint.clone()),
            },
            event: AuditEvent {
                ts_ms: unix_ms(now),
                kind: "cert.revoked".into(),
                actor: by.to_string(),
                subject: hex.clone(),
                detail: json!({
                    "issuer": row.issuer_id,
                    "names": row.names,
                    "reason": sigil_core::revocation::reason_name(reason),
                }),
            },
        })
        .await;
    let receipt = match receipt {
        Ok(r) => r,
        Err(sigil_store::Error::Conflict(_)) if reason == 1 => {
            // Revoked before for another reason: the key is blocked and its
            // other certificates revoked all the same.
            let others = compromised(store, now, &row, by).await?;
            return Err(Error::AlreadyRevoked(format!(
                "certificate {hex} is already revoked (its reason stays); its key is now blocked{}",
                listed(&others)
            )));
        }
        Err(sigil_store::Error::Conflict(_)) => {
            return Err(Error::AlreadyRevoked(format!(
                "certificate {hex} is already revoked"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let (same_key, blocked_key) = if reason == 1 {
        (
            compromised(store, now, &row, by).await?,
            Some(row.key_fingerprint.clone()),
        )
    } else {
        (Vec::new(), None)
    };
    Ok(Revoked {
        serial: serial.clone(),
        revoked_at: now,
        receipt,
        same_key,
        blocked_key,
    })
}

/// After a keyCompromise naming `row`: blocks its key (if not yet) and
/// revokes every other unexpired certificate of that key, each with its own
/// audit record. A compromised key is compromised in all of them: renewals
/// that kept the key, or a request that reused it. Returns the serials
/// revoked here.
async fn compromised(
    store: &Store,
    now: OffsetDateTime,
    row: &CertificateRow,
    by: &Requester,
) -> Result<Vec<String>, Error> {
    let fp = &row.key_fingerprint;
    if !store.key_blocked(fp).await? {
        store
            .commit(Change::BlockKey {
                fingerprint: fp.clone(),
                serial: row.serial.clone(),
                at: now.unix_timestamp(),
                event: AuditEvent {
                    ts_ms: unix_ms(now),
                    kind: "key.blocked".into(),
                    actor: by.to_string(),
                    subject: row.serial.clone(),
                    detail: json!({ "key": fp, "reason": "keyCompromise" }),
                },
            })
            .await?;
    }
    let mut revoked = Vec::new();
    for c in store.unrevoked_of_key(fp, now.unix_timestamp()).await? {
        let committed = store
            .commit(Change::Revoke {
                revocation: NewRevocation {
                    serial: c.serial.clone(),
                    issuer_id: c.issuer_id.clone(),
                    reason: 1,
                    revoked_at: now.unix_timestamp(),
                    revoked_by: by.to_string(),
                    block_key: None,
                },
                event: AuditEvent {
                    ts_ms: unix_ms(now),
                    kind: "cert.revoked".into(),
                    actor: by.to_string(),
                    subject: c.serial.clone(),
                    detail: json!({
                        "issuer": c.issuer_id,
                        "names": c.names,
                        "reason": "keyCompromise",
                        "same_key_as": row.serial,
                    }),
                },
            })
            .await;
        match committed {
            Ok(_) => revoked.push(c.serial),
            // Revoked meanwhile by someone else.
            Err(sigil_store::Error::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(revoked)
}

/// ", and N other certificates of it were revoked: A, B" (or nothing).
fn listed(others: &[String]) -> String {
    match others {
        [] => String::new(),
        [one] => format!(", and certificate {one} of the same key was revoked"),
        many => format!(
            ", and {} other certificates of the same key were revoked: {}",
            many.len(),
            many.join(", ")
        ),
    }
}
