//! The ACME resources (RFC 8555 §7).

use crate::ari::{CertId, Urgency};
use crate::jws::{AccountKey, Jws};
use crate::model::{
    AuthzBody, OrderBody, WireIdentifier, decode, encode, object_id, parse_time, pending_authz,
    random_id, rfc3339,
};
use crate::problem::{Problem, Subproblem};
use crate::validate::{ChallengeType, Target};
use crate::{Acme, Signer};
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use sigil_authority::{Completion, Error as AuthorityError, IssueRequest};
use sigil_core::{Identifier, LeafInfo, Profile, Requester};
use sigil_store::{AcmeAccount, AcmeObject, AcmeTable, AcmeWrite, AuditEvent, Change, StateWrite};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

type St = State<Arc<Acme>>;
type Reply = Result<Response, Problem>;

/// How far before its own check an order replacing a certificate looks
/// again, in the transaction that stores it, for orders that replace the
/// same one (s): more than the clock difference allowed between nodes.
const REPLACING_MARGIN: i64 = 120;
const MAX_IDENTIFIERS: usize = 100;
const MAX_CONTACTS: usize = 10;
/// A valid authorization is reused only while it has at least this long
/// (seconds, or the order lifetime if shorter) left, so that an order
/// built on it can still be finalized.
const REUSE_MARGIN: i64 = 300;
/// In an order that also needs new challenges, a valid authorization is
/// reused only while it has at least this long (seconds, or the order
/// lifetime if shorter) left: the order ends with it, and a client may take
/// minutes to pass the others (dns-01 waits for DNS to propagate).
const REUSE_MARGIN_PENDING: i64 = 3600;

fn json_reply(status: StatusCode, v: &Value, location: Option<&str>) -> Response {
    let mut resp = (status, v.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(loc) = location.and_then(|l| HeaderValue::from_str(l).ok()) {
        h.insert(header::LOCATION, loc);
    }
    resp
}

fn link(resp: &mut Response, url: &str, rel: &str) {
    if let Ok(v) = HeaderValue::from_str(&format!("<{url}>;rel=\"{rel}\"")) {
        resp.headers_mut().append(header::LINK, v);
    }
}

fn ms(t: i64) -> i64 {
    t * 1000
}

pub async fn directory(State(acme): St) -> Response {
    let profiles: serde_json::Map<String, Value> = Profile::ALL
        .iter()
        .map(|p| (p.name().to_string(), json!(p.description())))
        .collect();
    let mut meta = json!({
        "externalAccountRequired": acme.settings.eab_required,
        "profiles": profiles,
    });
    if let Some(t) = &acme.settings.terms_of_service {
        meta["termsOfService"] = json!(t);
    }
    if let Some(w) = &acme.settings.website {
        meta["website"] = json!(w);
    }
    let v = json!({
        "newNonce": acme.url("/acme/new-nonce"),
        "newAccount": acme.url("/acme/new-account"),
        "newOrder": acme.url("/acme/new-order"),
        "newAuthz": acme.url("/acme/new-authz"),
        "revokeCert": acme.url("/acme/revoke-cert"),
        "keyChange": acme.url("/acme/key-change"),
        "renewalInfo": acme.url("/acme/renewal-info"),
        "meta": meta,
    });
    json_reply(StatusCode::OK, &v, None)
}

pub async fn new_nonce_head() -> StatusCode {
    StatusCode::OK
}

pub async fn new_nonce_get() -> StatusCode {
    StatusCode::NO_CONTENT
}

fn account_json(acme: &Acme, a: &AcmeAccount) -> Value {
    let contact: Value = serde_json::from_str(&a.contact).unwrap_or_else(|_| json!([]));
    json!({
        "status": a.status,
        "contact": contact,
        "orders": acme.url(&format!("/acme/account/{}/orders", a.id)),
        "createdAt": rfc3339(a.created_at),
    })
}

/// Checks contact URLs: `mailto:` only, a few of them.
fn contacts(v: Option<&Value>) -> Result<Vec<String>, Problem> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let list: Vec<String> = serde_json::from_value(v.clone())
        .map_err(|_| Problem::malformed("contact must be an array of URL strings"))?;
    if list.len() > MAX_CONTACTS {
        return Err(Problem::malformed(format!(
            "at most {MAX_CONTACTS} contacts are accepted"
        )));
    }
    for c in &list {
        let Some(addr) = c.strip_prefix("mailto:") else {
            return Err(Problem::unsupported_contact(format!(
                "contact '{c}' is not supported; use mailto: URLs"
            )));
        };
        if addr.contains(',') || sigil_core::names::parse_email(addr).is_err() {
            return Err(Problem::invalid_contact(format!(
                "contact '{c}' is not a single valid email address"
            )));
        }
    }
    Ok(list)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewAccount {
    #[serde(default)]
    contact: Option<Value>,
    #[serde(default)]
    only_return_existing: bool,
    #[serde(default)]
    external_account_binding: Option<Value>,
}

pub async fn new_account(State(acme): St, headers: HeaderMap, body: Body) -> Reply {
    let req = acme
        .authenticate("/acme/new-account", &headers, body, Signer::Key)
        .await?;
    let payload: NewAccount = req.jws.json()?;
    let store = acme.authority.store();
    if let Some(existing) = store.acme_account_by_key(&req.key.thumbprint).await? {
        let url = acme.account_url(&existing.id);
        // RFC 8555 §7.3.6: a deactivated account's key is refused everywhere.
        if existing.status != "valid" {
            return Err(Problem::account_not_valid(format!(
                "the account of this key ({url}) is {}; register a new account with a new key",
                existing.status
            )));
        }
        return Ok(json_reply(
            StatusCode::OK,
            &account_json(&acme, &existing),
            Some(&url),
        ));
    }
    if payload.only_return_existing {
        return Err(Problem::account_does_not_exist(
            "no account exists for this key (onlyReturnExisting)",
        ));
    }
    let contact = contacts(payload.contact.as_ref())?;
    let id = random_id()?;
    let (requester, eab_kid) = match &payload.external_account_binding {
        Some(eab) => {
            let key = check_eab(&acme, eab, &req.key).await?;
            (format!("eab:{}", key.requester), Some(key.kid))
        }
        None if acme.settings.eab_required => {
            return Err(Problem::external_account_required(
                "this CA requires an external account binding: ask its operators for an EAB key id and HMAC key (sigil acme eab create)",
            ));
        }
        None => (format!("acme:{id}"), None),
    };
    let now = acme.now();
    let account = AcmeAccount {
        id: id.clone(),
        thumbprint: req.key.thumbprint.clone(),
        jwk: req.key.json.to_string(),
        status: "valid".into(),
        contact: serde_json::to_string(&contact).unwrap_or_else(|_| "[]".into()),
        requester: requester.clone(),
        eab_kid: eab_kid.clone(),
        created_at: now,
    };
    let event = AuditEvent {
        ts_ms: ms(now),
        kind: "acme.account.created".into(),
        actor: requester,
        subject: id.clone(),
        detail: json!({"thumbprint": req.key.thumbprint, "eab_kid": eab_kid, "contacts": contact.len()}),
    };
    match store
        .commit(Change::Acme {
            write: AcmeWrite::NewAccount(account.clone()),
            event,
        })
        .await
    {
        Ok(_) => {}
        Err(sigil_store::Error::Conflict(m)) if m.contains("EAB") => {
            return Err(Problem::unauthorized(format!(
                "{m}; each EAB key binds one account"
            )));
        }
        Err(sigil_store::Error::Conflict(_)) => {
            // The same key registered concurrently: return that account.
            if let Some(existing) = store.acme_account_by_key(&req.key.thumbprint).await? {
                let url = acme.account_url(&existing.id);
                return Ok(json_reply(
                    StatusCode::OK,
                    &account_json(&acme, &existing),
                    Some(&url),
                ));
            }
            return Err(Problem::server_internal(
                "account creation conflicted; retry",
            ));
        }
        Err(e) => return Err(e.into()),
    }
    let url = acme.account_url(&id);
    Ok(json_reply(
        StatusCode::CREATED,
        &account_json(&acme, &account),
        Some(&url),
    ))
}

/// RFC 8555 §7.3.4: the inner JWS is HS256 over the account key, by an EAB
/// key that is not yet bound.
async fn check_eab(
    acme: &Acme,
    eab: &Value,
    account_key: &AccountKey,
) -> Result<sigil_store::EabKey, Problem> {
    let inner = Jws::parse(eab.to_string().as_bytes())
        .map_err(|p| Problem::malformed(format!("externalAccountBinding: {}", p.detail)))?;
    let kid = inner.header.kid.as_deref().ok_or_else(|| {
        Problem::malformed("externalAccountBinding must name the EAB key id in kid")
    })?;
    if inner.header.url.as_deref() != Some(acme.url("/acme/new-account").as_str()) {
        return Err(Problem::malformed(
            "externalAccountBinding url must be the newAccount URL",
        ));
    }
    if inner.header.nonce.is_some() || inner.header.jwk.is_some() {
        return Err(Problem::malformed(
            "externalAccountBinding must not carry a nonce or jwk",
        ));
    }
    let bound: Value = inner.json()?;
    let bound = AccountKey::from_jwk(&bound)?;
    if bound.thumbprint != account_key.thumbprint {
        return Err(Problem::malformed(
            "externalAccountBinding payload must be the account key (the outer jwk)",
        ));
    }
    let key = acme
        .authority
        .store()
        .acme_eab_key(kid)
        .await?
        .ok_or_else(|| Problem::unauthorized(format!("unknown EAB key id '{kid}'")))?;
    inner.verify_hmac(&key.hmac_key)?;
    if key.account_id.is_some() {
        return Err(Problem::unauthorized(format!(
            "EAB key '{kid}' is already bound to another account; ask for a new one"
        )));
    }
    Ok(key)
}

#[derive(Deserialize)]
struct AccountUpdate {
    #[serde(default)]
    contact: Option<Value>,
    #[serde(default)]
    status: Option<String>,
}

/// A refused account change: when the account was deactivated or rekeyed
/// after this request was authenticated, the request no longer speaks for
/// it (RFC 8555 §7.3.6) and the cached copy is dropped.
fn account_write_failed(acme: &Acme, id: &str, e: sigil_store::Error) -> Problem {
    match e {
        sigil_store::Error::Stale(_) => {
            acme.forget_account(id);
            Problem::unauthorized(format!(
                "{} was deactivated or given a new key while this request was in flight; \
                 fetch the account and sign with its current key",
                acme.account_url(id)
            ))
        }
        other => other.into(),
    }
}

fn same_account(acme: &Acme, account: &AcmeAccount, id: &str) -> Result<(), Problem> {
    if account.id == id {
        Ok(())
    } else {
        Err(Problem::unauthorized(format!(
            "the request is signed by {}, not by the account it addresses",
            acme.account_url(&account.id)
        )))
    }
}

pub async fn account(
    State(acme): St,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Reply {
    let path = format!("/acme/account/{id}");
    let req = acme
        .authenticate(&path, &headers, body, Signer::Account)
        .await?;
    let current = req.account()?.clone();
    same_account(&acme, &current, &id)?;
    let url = acme.account_url(&id);
    if req.jws.is_post_as_get() {
        return Ok(json_reply(
            StatusCode::OK,
            &account_json(&acme, &current),
            Some(&url),
        ));
    }
    let update: AccountUpdate = req.jws.json()?;
    let mut next = current.clone();
    let mut kind = "acme.account.updated";
    if let Some(status) = update.status.as_deref() {
        if status != "deactivated" {
            return Err(Problem::malformed(format!(
                "an account's status can only be set to deactivated (not '{status}')"
            )));
        }
        next.status = "deactivated".into();
        kind = "acme.account.deactivated";
    }
    if update.contact.is_some() {
        let list = contacts(update.contact.as_ref())?;
        next.contact = serde_json::to_string(&list).unwrap_or_else(|_| "[]".into());
    }
    if next != current {
        acme.authority
            .store()
            .commit(Change::Acme {
                write: AcmeWrite::UpdateAccount {
                    next: next.clone(),
                    was: current.clone(),
                },
                event: AuditEvent {
                    ts_ms: ms(acme.now()),
                    kind: kind.into(),
                    actor: current.requester.clone(),
                    subject: id.clone(),
                    detail: json!({"status": next.status}),
                },
            })
            .await
            .map_err(|e| account_write_failed(&acme, &id, e))?;
        acme.remember_account(&next);
    }
    Ok(json_reply(
        StatusCode::OK,
        &account_json(&acme, &next),
        Some(&url),
    ))
}

/// Orders listed per page of an account's orders list.
const ORDERS_PAGE: usize = 1000;

/// The account's orders list (RFC 8555 §7.1.2.1), newest first, a page at a
/// time: `?cursor=ID` continues after order ID, and a page with more after
/// it links to the next (`Link: rel="next"`).
pub async fn account_orders(
    State(acme): St,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Reply {
    let mut path = format!("/acme/account/{id}/orders");
    if let Some(q) = &query {
        path = format!("{path}?{q}");
    }
    let req = acme
        .authenticate(&path, &headers, body, Signer::Account)
        .await?;
    same_account(&acme, req.account()?, &id)?;
    let cursor = match query.as_deref() {
        None => None,
        Some(q) => match q.strip_prefix("cursor=") {
            Some(c)
                if !c.is_empty()
                    && c.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
            {
                Some(c)
            }
            _ => {
                return Err(Problem::malformed(format!(
                    "the orders list takes only ?cursor=ORDER-ID (from its Link rel=\"next\"), not ?{}",
                    shown_query(q)
                )));
            }
        },
    };
    let page = i64::try_from(ORDERS_PAGE + 1).unwrap_or(i64::MAX);
    let mut ids = acme
        .authority
        .store()
        .acme_order_ids(&id, cursor, page)
        .await?;
    let more = ids.len() > ORDERS_PAGE;
    ids.truncate(ORDERS_PAGE);
    let urls: Vec<String> = ids.iter().map(|o| acme.order_url(o)).collect();
    let mut resp = json_reply(StatusCode::OK, &json!({"orders": urls}), None);
    if let (true, Some(last)) = (more, ids.last()) {
        let next = acme.url(&format!("/acme/account/{id}/orders?cursor={last}"));
        link(&mut resp, &next, "next");
    }
    Ok(resp)
}

/// At most 64 characters of a query string, for a problem's detail.
fn shown_query(q: &str) -> &str {
    match q.char_indices().nth(64) {
        Some((cut, _)) => &q[..cut],
        None => q,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyChange {
    account: String,
    old_key: Value,
}

pub async fn key_change(State(acme): St, headers: HeaderMap, body: Body) -> Reply {
    let req = acme
        .authenticate("/acme/key-change", &headers, body, Signer::Account)
        .await?;
    let account = req.account()?.clone();
    let inner = Jws::parse(&req.jws.payload)
        .map_err(|p| Problem::malformed(format!("keyChange inner JWS: {}", p.detail)))?;
    if inner.header.url != req.jws.header.url {
        return Err(Problem::malformed(
            "keyChange inner JWS url must equal the outer url",
        ));
    }
    if inner.header.kid.is_some() || inner.header.nonce.is_some() {
        return Err(Problem::malformed(
            "keyChange inner JWS must carry jwk (the new key) and no kid or nonce",
        ));
    }
    let new_jwk =
        inner.header.jwk.as_ref().ok_or_else(|| {
            Problem::malformed("keyChange inner JWS must carry the new key as jwk")
        })?;
    let new_key = AccountKey::from_jwk(new_jwk)?;
    inner.verify(&new_key)?;
    let change: KeyChange = inner.json()?;
    let url = acme.account_url(&account.id);
    if change.account != url {
        return Err(Problem::unauthorized(
            "keyChange inner payload names another account",
        ));
    }
    if AccountKey::from_jwk(&change.old_key)?.thumbprint != req.key.thumbprint {
        return Err(Problem::unauthorized(
            "keyChange oldKey is not the account's current key",
        ));
    }
    let store = acme.authority.store();
    if let Some(other) = store.acme_account_by_key(&new_key.thumbprint).await? {
        let mut p = Problem::new(
            "malformed",
            StatusCode::CONFLICT,
            "the new key already belongs to an account",
        );
        p.detail = format!(
            "the new key already belongs to {}",
            acme.account_url(&other.id)
        );
        let mut resp = p.into_response();
        if let Ok(v) = HeaderValue::from_str(&acme.account_url(&other.id)) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        return Ok(resp);
    }
    let next = AcmeAccount {
        thumbprint: new_key.thumbprint.clone(),
        jwk: new_key.json.to_string(),
        ..account.clone()
    };
    store
        .commit(Change::Acme {
            write: AcmeWrite::UpdateAccount {
                next: next.clone(),
                was: account.clone(),
            },
            event: AuditEvent {
                ts_ms: ms(acme.now()),
                kind: "acme.account.key_changed".into(),
                actor: account.requester.clone(),
                subject: account.id.clone(),
                detail: json!({"old_thumbprint": account.thumbprint, "new_thumbprint": new_key.thumbprint}),
            },
        })
        .await
        .map_err(|e| match e {
            sigil_store::Error::Conflict(_) => {
                Problem::new("malformed", StatusCode::CONFLICT, "the new key already belongs to an account")
            }
            other => account_write_failed(&acme, &account.id, other),
        })?;
    acme.remember_account(&next);
    Ok(json_reply(
        StatusCode::OK,
        &account_json(&acme, &next),
        Some(&url),
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewOrder {
    identifiers: Vec<WireIdentifier>,
    #[serde(default)]
    not_before: Option<String>,
    #[serde(default)]
    not_after: Option<String>,
    #[serde(default)]
    profile: Option<String>,
    #[serde(default)]
    replaces: Option<String>,
}

/// Maps an authority refusal to an ACME problem (with per-identifier
/// subproblems for policy denials).
fn authority_problem(e: AuthorityError) -> Problem {
    match e {
        AuthorityError::Denied { reason, decision } => {
            let mut p = Problem::rejected_identifier(format!("the CA's policy refuses: {reason}"));
            for f in decision
                .findings
                .iter()
                .filter(|f| f.outcome != sigil_policy_outcome_allowed())
            {
                p.subproblems.push(Subproblem {
                    kind: "rejectedIdentifier",
                    detail: f.reason.clone(),
                    identifier: (f.identifier.kind().into(), f.identifier.to_string()),
                });
            }
            p
        }
        AuthorityError::OutsideConstraints(m) => Problem::rejected_identifier(m),
        AuthorityError::Lifetime(m) => Problem::malformed(m),
        AuthorityError::Csr(e) => Problem::bad_csr(e.to_string()),
        AuthorityError::KeyCompromised(m) => Problem::bad_csr(m),
        AuthorityError::AlreadyRevoked(m) => Problem::already_revoked(m),
        AuthorityError::InvalidRevocation(m) => Problem::bad_revocation_reason(m),
        AuthorityError::NotFound(m) => Problem::not_found(m),
        AuthorityError::Unavailable(m) => Problem::unavailable(m),
        AuthorityError::RateLimited {
            message,
            retry_after,
        } => {
            let mut p = Problem::rate_limited(message);
            p.retry_after = Some(retry_after);
            p
        }
        e if e.is_shutting_down() => Problem::unavailable("the CA is shutting down; retry"),
        other => {
            tracing::error!(error = %other, "ACME request failed inside the authority");
            Problem::server_internal("the CA failed to process the request; retry later")
        }
    }
}

fn sigil_policy_outcome_allowed() -> sigil_policy::Outcome {
    sigil_policy::Outcome::Allowed
}

/// Parses, normalizes and de-duplicates requested identifiers.
fn order_identifiers(
    list: &[WireIdentifier],
) -> Result<(Vec<WireIdentifier>, Vec<Identifier>), Problem> {
    if list.is_empty() {
        return Err(Problem::malformed("an order needs at least one identifier"));
    }
    if list.len() > MAX_IDENTIFIERS {
        return Err(Problem::rejected_identifier(format!(
            "at most {MAX_IDENTIFIERS} identifiers per order"
        )));
    }
    let mut seen = BTreeSet::new();
    let mut wire = Vec::new();
    let mut ids = Vec::new();
    // Every unusable identifier is named (RFC 8555 §6.7.1), not just the first.
    let mut refused: Vec<Subproblem> = Vec::new();
    let mut first: Option<Problem> = None;
    for w in list {
        match w.parse() {
            Ok(id) => {
                if seen.insert(id.clone()) {
                    wire.push(WireIdentifier::of(&id));
                    ids.push(id);
                }
            }
            Err(p) => {
                refused.push(Subproblem {
                    kind: p.kind,
                    detail: p.detail.clone(),
                    identifier: (w.kind.clone(), w.value.clone()),
                });
                first.get_or_insert(p);
            }
        }
    }
    if let Some(mut p) = first {
        if refused.len() > 1 {
            p.detail = format!(
                "{} of the {} identifiers cannot be ordered; see subproblems",
                refused.len(),
                list.len()
            );
        }
        p.subproblems = refused;
        return Err(p);
    }
    Ok((wire, ids))
}

fn profile_of(name: Option<&str>) -> Result<Profile, Problem> {
    match name {
        None => Ok(Profile::default()),
        Some(n) => n.parse().map_err(|_| {
            Problem::invalid_profile(format!(
                "unknown profile '{n}' (this CA offers: {})",
                Profile::ALL.map(|p| p.name()).join(", ")
            ))
        }),
    }
}

pub async fn new_order(State(acme): St, headers: HeaderMap, body: Body) -> Reply {
    let req = acme
        .authenticate("/acme/new-order", &headers, body, Signer::Account)
        .await?;
    let account = req.account()?.clone();
    let requester = Acme::requester(&account)?;
    acme.take_order_token(&account.id)?;
    let payload: NewOrder = req.jws.json()?;
    let (wire, ids) = order_identifiers(&payload.identifiers)?;
    let profile = profile_of(payload.profile.as_deref())?;
    let now = acme.now();
    let not_before = payload
        .not_before
        .as_deref()
        .map(|s| parse_time("notBefore", s))
        .transpose()?;
    let not_after = payload
        .not_after
        .as_deref()
        .map(|s| parse_time("notAfter", s))
        .transpose()?;
    let max_ahead = i64::try_from(sigil_authority::MAX_FUTURE_START.as_secs()).unwrap_or(0);
    if not_before.is_some_and(|nb| nb.unix_timestamp() > now + max_ahead) {
        return Err(Problem::malformed(format!(
            "notBefore may be at most {} days ahead",
            max_ahead / 86400
        )));
    }
    // The lifetime counts from the later of notBefore and the time of issuance.
    let start = not_before.map_or(now, |nb| nb.unix_timestamp().max(now));
    let lifetime = match not_after {
        Some(na) if na.unix_timestamp() <= start + 60 => {
            return Err(Problem::malformed(
                "notAfter must be more than a minute after notBefore and in the future",
            ));
        }
        Some(na) => Some(Duration::from_secs(
            u64::try_from(na.unix_timestamp() - start).unwrap_or(60),
        )),
        None => None,
    };
    let (replaced, replacing) = match payload.replaces.as_deref() {
        Some(r) => {
            let (row, failed) = check_replaces(&acme, r, &account, &ids).await?;
            let claim = sigil_store::Replacing {
                requester: account.requester.clone(),
                cert_id: r.to_string(),
                now,
                // Orders made since the check above, by this node or
                // another (whose clock may differ by up to a minute).
                since: now - REPLACING_MARGIN,
                failed,
            };
            (Some(row), Some(claim))
        }
        None => (None, None),
    };
    acme.authority
        .check_names(&requester, &ids, profile, lifetime)
        .await
        .map_err(authority_problem)?;

    let store = acme.authority.store();
    let life = i64::try_from(acme.settings.order_lifetime.as_secs()).unwrap_or(86400);
    let mut authz_ids = Vec::with_capacity(wire.len());
    let mut fresh = Vec::new();
    let mut all_valid = true;
    // The order lives no longer than the authorizations it reuses
    // (RFC 8555 §7.1.3: `expires` is when the server considers it invalid).
    let mut expires = now + life;
    let reusable_until = now + REUSE_MARGIN.min(life);
    let mut reusable = Vec::with_capacity(wire.len());
    for w in &wire {
        reusable.push(reusable_authz(&acme, &account.id, &w.key(), reusable_until).await?);
    }
    if reusable.iter().any(Option::is_none) {
        let until = now + REUSE_MARGIN_PENDING.min(life);
        for r in &mut reusable {
            if r.as_ref()
                .is_some_and(|a| AuthzBody::reusable_until(a) < until)
            {
                *r = None;
            }
        }
    }
    for (w, found) in wire.iter().zip(reusable) {
        match found {
            Some(a) => {
                expires = expires.min(a.expires_at);
                authz_ids.push(a.id);
            }
            None => {
                let a = pending_authz(&account.id, w, acme.now_ms(), now + life)?;
                authz_ids.push(a.id.clone());
                fresh.push((a, w.key()));
                all_valid = false;
            }
        }
    }
    let order = AcmeObject {
        id: object_id(acme.now_ms())?,
        account_id: account.id.clone(),
        status: if all_valid { "ready" } else { "pending" }.into(),
        expires_at: expires,
        body: encode(&OrderBody {
            identifiers: wire,
            authzs: authz_ids,
            not_before: payload.not_before.clone(),
            not_after: payload.not_after.clone(),
            lifetime: lifetime.map(|l| l.as_secs()),
            profile: profile.name().into(),
            replaces: replacing.as_ref().map(|r| r.cert_id.clone()),
            replaced_until: replaced.as_ref().map(|r| r.not_after),
            ..OrderBody::default()
        }),
        created_at: now,
    };
    if !store
        .acme_insert_order(Some(&order), &fresh, replacing)
        .await?
    {
        // Another order for the same certificate was stored between the
        // check above and this one's insert.
        return Err(Problem::already_replaced(format!(
            "certificate {} is already replaced by an order made meanwhile",
            replaced.map_or_else(String::new, |r| r.serial)
        )));
    }
    metrics::counter!("sigil_acme_orders_total", "status" => if all_valid { "ready" } else { "pending" })
        .increment(1);
    let url = acme.order_url(&order.id);
    Ok(json_reply(
        StatusCode::CREATED,
        &acme.order_json(&order)?,
        Some(&url),
    ))
}

/// The certificate an ARI certificate ID names, if this CA issued it.
async fn replaced_certificate(
    acme: &Acme,
    cert_id: &str,
) -> Result<sigil_store::CertificateRow, Problem> {
    let id = CertId::parse(cert_id)?;
    acme.authority
        .store()
        .certificate(&id.serial_hex)
        .await?
        .filter(|r| id.matches(&r.der))
        .ok_or_else(|| {
            Problem::malformed(format!(
                "replaces: no certificate of this CA has ID '{cert_id}'"
            ))
        })
}

/// RFC 9773 §5: the replaced certificate must exist and belong to this
/// account's requester or share a name with the order. Returns it, and the
/// orders that named it but have failed since they were stored.
async fn check_replaces(
    acme: &Acme,
    cert_id: &str,
    account: &AcmeAccount,
    ids: &[Identifier],
) -> Result<(sigil_store::CertificateRow, Vec<String>), Problem> {
    let row = replaced_certificate(acme, cert_id).await?;
    // RFC 9773 §5: the same account (for EAB accounts: the same external
    // account), at least one shared identifier, and not replaced already.
    if row.requester != account.requester {
        return Err(Problem::unauthorized(format!(
            "replaces: certificate {} was issued to another account",
            row.serial
        )));
    }
    let names: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    if !row.names.iter().any(|n| names.contains(n)) {
        return Err(Problem::malformed(format!(
            "replaces: certificate {} shares no identifier with this order (it names {})",
            row.serial,
            row.names.join(", ")
        )));
    }
    let candidates = acme
        .authority
        .store()
        .acme_orders_replacing(&account.requester, cert_id, acme.now())
        .await?;
    let mut failed = Vec::new();
    for id in candidates {
        // An order whose authorization failed is invalid (RFC 8555 7.1.6)
        // even while stored as pending: it replaces nothing.
        let Some(order) = acme.current_order(&id).await? else {
            continue;
        };
        if order.status == "invalid" {
            failed.push(id);
        } else {
            return Err(Problem::already_replaced(format!(
                "certificate {} is already replaced by order {}",
                row.serial,
                acme.order_url(&order.id)
            )));
        }
    }
    Ok((row, failed))
}

#[derive(Deserialize)]
struct NewAuthz {
    identifier: WireIdentifier,
}

pub async fn new_authz(State(acme): St, headers: HeaderMap, body: Body) -> Reply {
    let req = acme
        .authenticate("/acme/new-authz", &headers, body, Signer::Account)
        .await?;
    let account = req.account()?.clone();
    let requester = Acme::requester(&account)?;
    // Each pre-authorization may start a validation, as an order does: one
    // budget for both, or newAuthz would be a way around the order limit.
    acme.take_order_token(&account.id)?;
    let payload: NewAuthz = req.jws.json()?;
    let id = payload.identifier.parse()?;
    let wire = WireIdentifier::of(&id);
    if wire.is_wildcard() {
        return Err(Problem::rejected_identifier(
            "pre-authorization cannot be for a wildcard name (RFC 8555 §7.4.1); order it instead",
        ));
    }
    // An authorization is not tied to a profile: it is granted if the
    // requester may have the name under any profile (the order's own
    // profile is checked again at newOrder and at finalize).
    let policy = acme.authority.policy();
    let profile = Profile::ALL
        .into_iter()
        .find(|p| {
            policy
                .evaluate(&sigil_policy::Request {
                    requester: &requester,
                    identifiers: std::slice::from_ref(&id),
                    profile: *p,
                    key_type: None,
                    lifetime: None,
                })
                .allowed
        })
        .unwrap_or_default();
    acme.authority
        .check_names(&requester, std::slice::from_ref(&id), profile, None)
        .await
        .map_err(authority_problem)?;
    let now = acme.now();
    let store = acme.authority.store();
    let life = i64::try_from(acme.settings.order_lifetime.as_secs()).unwrap_or(86400);
    if let Some(a) = reusable_authz(
        &acme,
        &account.id,
        &wire.key(),
        now + REUSE_MARGIN.min(life),
    )
    .await?
    {
        let url = acme.authz_url(&a.id);
        return Ok(json_reply(
            StatusCode::OK,
            &acme.authz_json(&a)?,
            Some(&url),
        ));
    }
    let a = pending_authz(&account.id, &wire, acme.now_ms(), now + life)?;
    store
        .acme_insert_order(None, &[(a.clone(), wire.key())], None)
        .await?;
    let url = acme.authz_url(&a.id);
    Ok(json_reply(
        StatusCode::CREATED,
        &acme.authz_json(&a)?,
        Some(&url),
    ))
}

/// Loads an object the account owns (others' objects look absent).
async fn owned(
    acme: &Acme,
    table: AcmeTable,
    id: &str,
    account: &AcmeAccount,
) -> Result<AcmeObject, Problem> {
    let obj = match table {
        AcmeTable::Orders => acme.current_order(id).await?,
        AcmeTable::Authzs => acme.authority.store().acme_object(table, id).await?,
    };
    obj.filter(|o| o.account_id == account.id).ok_or_else(|| {
        Problem::not_found(format!(
            "no such {} for this account",
            match table {
                AcmeTable::Orders => "order",
                AcmeTable::Authzs => "authorization",
            }
        ))
    })
}

pub async fn order(
    State(acme): St,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Reply {
    let req = acme
        .authenticate(
            &format!("/acme/order/{id}"),
            &headers,
            body,
            Signer::Account,
        )
        .await?;
    if !req.jws.is_post_as_get() {
        return Err(Problem::malformed(
            "fetch an order with POST-as-GET (empty payload)",
        ));
    }
    let o = owned(&acme, AcmeTable::Orders, &id, req.account()?).await?;
    let mut resp = json_reply(
        StatusCode::OK,
        &acme.order_json(&o)?,
        Some(&acme.order_url(&id)),
    );
    if o.status == "processing" {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    Ok(resp)
}

/// The lifetime to ask for at finalize: a requested notAfter is kept as
/// the end of validity, counted from the later of notBefore and now (not
/// from when the order was placed, which would move the end later by the
/// time validation took).
fn finalize_lifetime(
    body: &OrderBody,
    not_before: Option<OffsetDateTime>,
    now: i64,
) -> Result<Option<Duration>, Problem> {
    let Some(not_after) = body.not_after.as_deref() else {
        return Ok(body.lifetime.map(Duration::from_secs));
    };
    let end = parse_time("notAfter", not_after)?.unix_timestamp();
    let start = not_before.map_or(now, |nb| nb.unix_timestamp().max(now));
    if end <= start + 60 {
        return Err(Problem::malformed(format!(
            "the order's notAfter ({not_after}) is less than a minute away; place a new order with a later notAfter"
        )));
    }
    Ok(Some(Duration::from_secs(
        u64::try_from(end - start).unwrap_or(60),
    )))
}

#[derive(Deserialize)]
struct Finalize {
    csr: String,
}

pub async fn finalize(
    State(acme): St,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Reply {
    use base64::Engine;
    let req = acme
        .authenticate(
            &format!("/acme/order/{id}/finalize"),
            &headers,
            body,
            Signer::Account,
        )
        .await?;
    let account = req.account()?.clone();
    let order = owned(&acme, AcmeTable::Orders, &id, &account).await?;
    if order.status != "ready" {
        return Err(Problem::order_not_ready(format!(
            "the order is {}, not ready: {}",
            order.status,
            match order.status.as_str() {
                "pending" => "complete its authorizations first",
                "valid" => "it was already finalized; download the certificate",
                "processing" => "it is being finalized; poll the order",
                _ => "place a new order",
            }
        )));
    }
    let payload: Finalize = req.jws.json()?;
    let der = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.csr.trim_end_matches('='))
        .map_err(|_| Problem::bad_csr("csr must be base64url-encoded DER"))?;
    let mut body: OrderBody = decode(&order)?;
    let requester = Acme::requester(&account)?;
    let profile = profile_of(Some(&body.profile))?;
    // Parsed (and a client's unusable CSR audited) by the authority, which
    // then issues from this parse: the signature is verified once.
    let csr = acme
        .authority
        .check_csr(&der, &requester, profile)
        .await
        .map_err(authority_problem)?;
    let want: BTreeSet<String> = body.identifiers.iter().map(|i| i.value.clone()).collect();
    let got: BTreeSet<String> = csr.identifiers().iter().map(|i| i.to_string()).collect();
    if want != got {
        let missing: Vec<&String> = want.difference(&got).collect();
        let extra: Vec<&String> = got.difference(&want).collect();
        return Err(Problem::bad_csr(format!(
            "the CSR must name exactly the order's identifiers; missing {missing:?}, not in the order {extra:?}"
        )));
    }
    if csr.public_key().raw() == req.key.raw.as_slice() {
        return Err(Problem::bad_csr(
            "the CSR uses the account key; certificates need a key of their own",
        ));
    }
    let now = acme.now();
    let not_before = body
        .not_before
        .as_deref()
        .map(|s| parse_time("notBefore", s))
        .transpose()?;
    let lifetime = finalize_lifetime(&body, not_before, now)?;
    // An order placed before `replaced_until` was recorded.
    if let (Some(r), None) = (&body.replaces, body.replaced_until) {
        body.replaced_until = replaced_certificate(&acme, r)
            .await
            .ok()
            .map(|row| row.not_after);
    }
    body.processing_since = Some(now);
    // From here on the order is processing: run apart from the request, so a
    // client that goes away (or a request timeout) cannot leave it
    // processing with no issuance under way.
    let work = settle_order(
        acme.clone(),
        order,
        body,
        Settle {
            csr,
            requester,
            profile,
            lifetime,
            not_before,
        },
    );
    let done = detached(work, "finalization").await?;
    let url = acme.order_url(&id);
    Ok(json_reply(
        StatusCode::OK,
        &acme.order_json(&done)?,
        Some(&url),
    ))
}

/// What a finalization issues.
struct Settle {
    csr: sigil_core::Csr,
    requester: Requester,
    profile: Profile,
    lifetime: Option<Duration>,
    not_before: Option<OffsetDateTime>,
}

/// Moves `order` to processing, issues, and records the outcome; returns the
/// order as it stands afterwards.
async fn settle_order(
    acme: Arc<Acme>,
    order: AcmeObject,
    mut body: OrderBody,
    ask: Settle,
) -> Result<AcmeObject, Problem> {
    let Settle {
        csr,
        requester,
        profile,
        lifetime,
        not_before,
    } = ask;
    let processing = AcmeObject {
        status: "processing".into(),
        body: encode(&body),
        ..order.clone()
    };
    let store = acme.authority.store();
    // Stored as pending (ready is derived from its authorizations) or as
    // ready (created with reused authorizations).
    let moved = store
        .acme_update(AcmeTable::Orders, "pending", &processing)
        .await?
        || store
            .acme_update(AcmeTable::Orders, "ready", &processing)
            .await?;
    if !moved {
        return Err(Problem::order_not_ready(
            "the order is already being finalized",
        ));
    }
    // The order becomes valid in the same transaction as its certificate.
    let valid = {
        let mut body = body.clone();
        body.processing_since = None;
        let processing = processing.clone();
        move |serial: &str| {
            let mut body = body.clone();
            body.certificate = Some(serial.to_string());
            AcmeObject {
                status: "valid".into(),
                // Kept while the replaced certificate lives (see
                // `OrderBody::replaced_until`).
                expires_at: processing
                    .expires_at
                    .max(body.replaced_until.unwrap_or(i64::MIN)),
                body: encode(&body),
                ..processing.clone()
            }
        }
    };
    let completes = {
        let valid = valid.clone();
        Completion::new(move |serial| StateWrite::Update {
            table: AcmeTable::Orders,
            from: "processing".into(),
            to: valid(serial),
        })
    };
    let order_ids = csr.identifiers().to_vec();
    let issued = acme
        .authority
        .issue(IssueRequest {
            csr: csr.into(),
            requester: requester.clone(),
            profile: Some(profile),
            lifetime,
            token: None,
            not_before,
            completes: Some(completes),
        })
        .await;
    let done = match issued {
        Ok(cert) => valid(&cert.serial.to_hex()),
        Err(e) => {
            let p = match e {
                // Only the order's own compare-and-set can conflict here:
                // it left processing (timed out) before the issuance landed.
                AuthorityError::Store(sigil_store::Error::Conflict(m)) => {
                    Problem::order_not_ready(format!(
                        "the order changed while it was being finalized ({m}); place a new order"
                    ))
                }
                // The names pass without a key: the CSR's key is what the
                // policy refuses (RFC 8555 §7.4: badCSR), and another may do.
                AuthorityError::Denied { reason, .. }
                    if acme
                        .authority
                        .policy_allows_names(&requester, &order_ids, profile, lifetime) =>
                {
                    Problem::bad_csr(format!(
                        "the CA's policy refuses this CSR's key ({reason}); finalize again with a CSR for another key"
                    ))
                }
                e => authority_problem(e),
            };
            // A refusal ends the order; a transient failure, the
            // requester's issuance rate, or a refused key lets the client
            // retry (after Retry-After, or with another key).
            let transient = p.status.is_server_error()
                || p.status == StatusCode::TOO_MANY_REQUESTS
                || p.kind == "badCSR";
            body.processing_since = None;
            if !transient {
                body.error = Some(p.to_json());
            }
            let status = if transient { "ready" } else { "invalid" };
            let failed = AcmeObject {
                status: status.into(),
                body: encode(&body),
                ..processing
            };
            store
                .acme_update(AcmeTable::Orders, "processing", &failed)
                .await?;
            metrics::counter!("sigil_acme_orders_total", "status" => status).increment(1);
            return Err(p);
        }
    };
    metrics::counter!("sigil_acme_orders_total", "status" => "valid").increment(1);
    Ok(done)
}

#[derive(Deserialize)]
struct AuthzUpdate {
    status: String,
}

pub async fn authz(
    State(acme): St,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Reply {
    let req = acme
        .authenticate(
            &format!("/acme/authz/{id}"),
            &headers,
            body,
            Signer::Account,
        )
        .await?;
    let a = owned(&acme, AcmeTable::Authzs, &id, req.account()?).await?;
    let url = acme.authz_url(&id);
    if req.jws.is_post_as_get() {
        return Ok(json_reply(
            StatusCode::OK,
            &acme.authz_json(&a)?,
            Some(&url),
        ));
    }
    let update: AuthzUpdate = req.jws.json()?;
    if update.status != "deactivated" {
        return Err(Problem::malformed(
            "an authorization's status can only be set to deactivated",
        ));
    }
    if a.status != "pending" && a.status != "valid" {
        return Err(Problem::malformed(format!(
            "the authorization is {} and cannot be deactivated",
            a.status
        )));
    }
    let next = AcmeObject {
        status: "deactivated".into(),
        ..a.clone()
    };
    if !acme
        .authority
        .store()
        .acme_update(AcmeTable::Authzs, &a.status, &next)
        .await?
    {
        return Err(Problem::malformed(
            "the authorization changed meanwhile; fetch it again",
        ));
    }
    Ok(json_reply(
        StatusCode::OK,
        &acme.authz_json(&next)?,
        Some(&url),
    ))
}

pub async fn challenge(
    State(acme): St,
    Path((authz_id, kind)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Reply {
    let path = format!("/acme/chall/{authz_id}/{kind}");
    let req = acme
        .authenticate(&path, &headers, body, Signer::Account)
        .await?;
    let a = owned(&acme, AcmeTable::Authzs, &authz_id, req.account()?).await?;
    let ab: AuthzBody = decode(&a)?;
    let idx = ab
        .challenges
        .iter()
        .position(|c| c.kind == kind)
        .ok_or_else(|| {
            Problem::not_found(format!("this authorization offers no {kind} challenge"))
        })?;
    let reply = |a: &AcmeObject| -> Reply {
        let ab: AuthzBody = decode(a)?;
        let c = ab
            .challenges
            .iter()
            .find(|c| c.kind == kind)
            .ok_or_else(|| Problem::server_internal("the stored authorization lost a challenge"))?;
        let mut resp = json_reply(StatusCode::OK, &acme.challenge_json(&a.id, c), None);
        link(&mut resp, &acme.authz_url(&a.id), "up");
        Ok(resp)
    };
    if req.jws.is_post_as_get() || acme.authz_status(&a) != "pending" {
        return reply(&a);
    }
    // RFC 8555 §7.5.1: the client says it is ready; validate now.
    let ctype = ChallengeType::parse(&kind)
        .ok_or_else(|| Problem::malformed(format!("unknown challenge type {kind}")))?;
    // One validation at a time per authorization (on this node): a repeated
    // response while it runs gets the authorization as it stands.
    let Some(validating) = acme.start_validating(&authz_id)? else {
        return reply(&a);
    };
    let key_auth = req.key.key_authorization(&ab.challenges[idx].token);
    // Run apart from the request, so the outcome is recorded even if the
    // client goes away (or the request times out) meanwhile: otherwise a
    // client could abandon every attempt that was going to fail, and retry
    // the challenge for ever.
    let work = validate_and_record(acme.clone(), a, ab, idx, ctype, key_auth, validating);
    let settled = detached(work, "validation").await?;
    reply(&settled)
}

/// Runs `work` as its own task (keeping the request id for its audit rows)
/// and waits for it: dropping the request then no longer cancels it.
async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T, Problem>> + Send + 'static,
    what: &str,
) -> Result<T, Problem> {
    let task = match sigil_store::current_request_id() {
        Some(id) => tokio::spawn(sigil_store::with_request_id(id, work)),
        None => tokio::spawn(work),
    };
    task.await
        .map_err(|_| Problem::server_internal(format!("the {what} task failed")))?
}

/// A valid authorization of the account for `identifier` that later orders
/// may still reuse at `until` (unix s).
async fn reusable_authz(
    acme: &Acme,
    account_id: &str,
    identifier: &str,
    until: i64,
) -> Result<Option<AcmeObject>, Problem> {
    let found = acme
        .authority
        .store()
        .acme_valid_authz(account_id, identifier, until)
        .await?;
    Ok(found.filter(|a| AuthzBody::reusable_until(a) > until))
}

/// Validates challenge `idx` of authorization `a` and records the outcome;
/// returns the authorization as stored afterwards.
async fn validate_and_record(
    acme: Arc<Acme>,
    a: AcmeObject,
    ab: AuthzBody,
    idx: usize,
    ctype: ChallengeType,
    key_auth: String,
    _validating: crate::Validating,
) -> Result<AcmeObject, Problem> {
    let c = &ab.challenges[idx];
    let kind = c.kind.clone();
    let target = Target {
        kind: ab.identifier.kind.clone(),
        value: ab
            .identifier
            .value
            .strip_prefix("*.")
            .unwrap_or(&ab.identifier.value)
            .to_string(),
    };
    let outcome = acme
        .validator
        .validate(ctype, &target, &c.token, &key_auth)
        .await;
    let now = acme.now();
    let reuse = i64::try_from(acme.settings.authz_reuse.as_secs()).unwrap_or(86400);
    let mut next_body = ab.clone();
    let next_status = match &outcome {
        Ok(()) => {
            next_body.challenges[idx].status = "valid".into();
            next_body.challenges[idx].validated = Some(now);
            next_body.reuse_until = Some(now + reuse);
            "valid"
        }
        Err(p) => {
            tracing::info!(authz = %a.id, challenge = %kind, detail = %p.detail, "challenge failed");
            next_body.challenges[idx].status = "invalid".into();
            next_body.challenges[idx].error = Some(p.to_json());
            "invalid"
        }
    };
    metrics::counter!(
        "sigil_acme_challenges_total",
        "type" => kind,
        "status" => next_status
    )
    .increment(1);
    let next = AcmeObject {
        status: next_status.into(),
        // Valid for acme.authz_reuse (reused by later orders that long),
        // and at least as long as it was offered for: a short reuse window
        // must not end it inside the order it was made for (which would
        // then turn invalid).
        expires_at: if next_status == "valid" {
            (now + reuse).max(a.expires_at)
        } else {
            a.expires_at
        },
        body: encode(&next_body),
        ..a.clone()
    };
    if acme
        .authority
        .store()
        .acme_update(AcmeTable::Authzs, "pending", &next)
        .await?
    {
        return Ok(next);
    }
    // Another request settled it first: report what is stored.
    acme.authority
        .store()
        .acme_object(AcmeTable::Authzs, &a.id)
        .await?
        .ok_or_else(|| Problem::not_found("the authorization is gone"))
}

pub async fn certificate(
    State(acme): St,
    Path(serial): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Reply {
    let path = format!("/acme/cert/{serial}");
    let row = owned_certificate(&acme, &path, &serial, &headers, body).await?;
    let chain = acme
        .authority
        .chain_pem(&row)
        .await
        .map_err(authority_problem)?;
    let alternates = acme
        .authority
        .alternate_chains(&row)
        .await
        .map_err(authority_problem)?;
    let mut resp = pem_chain(chain);
    // RFC 8555 §7.4.2: other chains to other roots, by Link rel="alternate".
    for n in 0..alternates.len() {
        let link = format!(
            "<{}>;rel=\"alternate\"",
            acme.url(&format!("{path}/alt/{n}"))
        );
        if let Ok(v) = HeaderValue::from_str(&link) {
            resp.headers_mut().append(header::LINK, v);
        }
    }
    Ok(resp)
}

/// An alternate chain of a certificate (see [`certificate`]).
pub async fn alternate_certificate(
    State(acme): St,
    Path((serial, n)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Reply {
    let path = format!("/acme/cert/{serial}/alt/{n}");
    let n: usize = n.parse().map_err(|_| {
        Problem::not_found(format!(
            "no ACME resource at {path}: alternate chains are numbered from 0"
        ))
    })?;
    let row = owned_certificate(&acme, &path, &serial, &headers, body).await?;
    let chain = acme
        .authority
        .alternate_chains(&row)
        .await
        .map_err(authority_problem)?
        .into_iter()
        .nth(n)
        .ok_or_else(|| {
            Problem::not_found(format!("certificate {serial} has no alternate chain {n}"))
        })?;
    Ok(pem_chain(chain))
}

/// The certificate `serial`, if the authenticated account's requester got it.
async fn owned_certificate(
    acme: &Acme,
    path: &str,
    serial: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<sigil_store::CertificateRow, Problem> {
    let req = acme
        .authenticate(path, headers, body, Signer::Account)
        .await?;
    let account = req.account()?;
    acme.authority
        .store()
        .certificate(serial)
        .await?
        .filter(|r| r.requester == account.requester)
        .ok_or_else(|| Problem::not_found(format!("no certificate {serial} for this account")))
}

fn pem_chain(chain: String) -> Response {
    let mut resp = (StatusCode::OK, chain).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/pem-certificate-chain"),
    );
    resp
}

/// RFC 5280 CRLReason keyCompromise.
const KEY_COMPROMISE: i32 = 1;

#[derive(Deserialize)]
struct RevokeCert {
    certificate: String,
    #[serde(default)]
    reason: Option<i32>,
}

pub async fn revoke_cert(State(acme): St, headers: HeaderMap, body: Body) -> Reply {
    use base64::Engine;
    let req = acme
        .authenticate("/acme/revoke-cert", &headers, body, Signer::Either)
        .await?;
    let payload: RevokeCert = req.jws.json()?;
    let der = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.certificate.trim_end_matches('='))
        .map_err(|_| Problem::malformed("certificate must be base64url-encoded DER"))?;
    let leaf = LeafInfo::from_der(&der)
        .map_err(|e| Problem::malformed(format!("certificate is unreadable: {e}")))?;
    let serial = leaf.serial.to_hex();
    let row = acme
        .authority
        .store()
        .certificate(&serial)
        .await?
        .filter(|r| r.der == der)
        .ok_or_else(|| Problem::not_found("this certificate was not issued by this CA"))?;
    let reason = payload.reason.unwrap_or(0);
    let by = match &req.account {
        None => {
            if leaf.public_key.raw() != req.key.raw.as_slice() {
                return Err(Problem::unauthorized(
                    "the request is signed with a jwk that is not the certificate's key",
                ));
            }
            Requester::AcmeAccount(format!("certificate-key:{}", leaf.public_key.fingerprint()))
        }
        Some(account) => {
            if row.requester != account.requester {
                let held = acme
                    .authority
                    .store()
                    .acme_authorized_identifiers(&account.id, acme.now())
                    .await?;
                let lacking: Vec<&String> = row
                    .names
                    .iter()
                    .filter(|n| {
                        !held
                            .iter()
                            .any(|h| h.split_once(':').map(|(_, v)| v) == Some(n.as_str()))
                    })
                    .collect();
                if !lacking.is_empty() {
                    return Err(Problem::unauthorized(format!(
                        "this account neither obtained the certificate nor holds valid authorizations for {lacking:?}"
                    )));
                }
                // Controlling the names says nothing about the key, and a
                // keyCompromise revocation blocks the key for good.
                if reason == KEY_COMPROMISE {
                    return Err(Problem::bad_revocation_reason(
                        "an account that did not obtain the certificate may not claim keyCompromise: sign the request with the certificate's key instead, or give another reason",
                    ));
                }
            }
            Acme::requester(account)?
        }
    };
    acme.authority
        .revoke(&leaf.serial, reason, &by)
        .await
        .map_err(authority_problem)?;
    Ok(StatusCode::OK.into_response())
}

pub async fn renewal_info(State(acme): St, Path(id): Path<String>) -> Reply {
    let cert_id = CertId::parse(&id)?;
    let store = acme.authority.store();
    let row = store
        .certificate(&cert_id.serial_hex)
        .await?
        .filter(|r| cert_id.matches(&r.der))
        .ok_or_else(|| Problem::not_found(format!("no certificate of this CA has ID '{id}'")))?;
    let now = acme.now();
    let issuer_state = store.issuer(&row.issuer_id).await?.map(|i| i.state);
    let retired = issuer_state == Some(sigil_authority::IssuerState::Retired);
    let replaced = issuer_state == Some(sigil_authority::IssuerState::Previous);
    let revoked = store.revocation(&row.serial).await?.is_some();
    let hint = store
        .acme_renewal_hint(&[
            format!("serial:{}", row.serial),
            format!("issuer:{}", row.issuer_id),
        ])
        .await?;
    let urgency = if revoked || retired {
        Urgency::Now
    } else if let Some(by) = hint {
        Urgency::By(by)
    } else if replaced {
        Urgency::Soon
    } else {
        Urgency::None
    };
    let (start, end) = crate::ari::window(row.not_before, row.not_after, now, urgency);
    let life = (row.not_after - row.not_before).max(60);
    let retry = (life / 20).clamp(60, 21600);
    let mut resp = json_reply(
        StatusCode::OK,
        &json!({"suggestedWindow": {"start": rfc3339(start), "end": rfc3339(end)}}),
        None,
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry));
    Ok(resp)
}

/// A path that is not an ACME resource: a problem document, as every error
/// here is (RFC 8555 §6.7), rather than the framework's plain text.
pub async fn no_such_resource(uri: axum::http::Uri) -> Problem {
    Problem::not_found(format!(
        "no ACME resource at {}; the directory is at /acme/directory",
        uri.path()
    ))
}

/// A resource asked with a method it does not take.
pub async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> Problem {
    Problem::new(
        "malformed",
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} does not take {method}: ACME resources take POST (the directory, new-nonce and renewal-info take GET)",
            uri.path()
        ),
    )
}
