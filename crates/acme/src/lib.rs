//! Sigil's ACME server (RFC 8555) as an axum `Router`: JWS and nonces,
//! accounts (with EAB and key change), orders and pre-authorization,
//! http-01 / dns-01 / tls-alpn-01 validation, finalize through the one
//! issuance path, certificate download, revocation, ARI (RFC 9773) and
//! profiles. Protocol state lives in the database, so on PostgreSQL
//! consecutive requests may hit different nodes; on SQLite (one server per
//! database) nonces are checked in memory (see `nonce`).

mod ari;
mod handlers;
mod jws;
mod model;
mod nonce;
mod problem;
mod validate;

pub use ari::cert_id;
pub use problem::Problem;
pub use validate::{ChallengeType, ValidationSettings, Validator};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use jws::{AccountKey, Jws};
use sigil_authority::Authority;
use sigil_core::Requester;
use sigil_store::AcmeAccount;
use std::sync::Arc;
use std::time::Duration;

/// ACME settings from configuration.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// Public base URL of the HTTPS listener (`https://host:port`, no trailing slash).
    pub base_url: String,
    /// newAccount must carry an external account binding.
    pub eab_required: bool,
    /// How long a valid authorization is reused for new orders.
    pub authz_reuse: Duration,
    /// How long pending orders and authorizations live.
    pub order_lifetime: Duration,
    /// Largest accepted request body.
    pub max_body: usize,
    /// Seconds a nonce stays valid.
    pub nonce_ttl: Duration,
    /// `meta.termsOfService`.
    pub terms_of_service: Option<String>,
    /// `meta.website`.
    pub website: Option<String>,
    /// New orders per account per minute on this node (0: no limit).
    pub orders_per_minute: u32,
    /// Challenge validation.
    pub validation: ValidationSettings,
}

impl AcmeSettings {
    /// Defaults for a server reachable at `base_url`.
    pub fn new(base_url: &str) -> AcmeSettings {
        AcmeSettings {
            base_url: base_url.trim_end_matches('/').to_string(),
            eab_required: false,
            authz_reuse: Duration::from_secs(24 * 3600),
            order_lifetime: Duration::from_secs(24 * 3600),
            max_body: 64 * 1024,
            nonce_ttl: Duration::from_secs(3600),
            terms_of_service: None,
            website: None,
            orders_per_minute: 0,
            validation: ValidationSettings::default(),
        }
    }
}

/// The ACME service state.
pub struct Acme {
    authority: Arc<Authority>,
    settings: AcmeSettings,
    nonces: nonce::Nonces,
    validator: Validator,
    /// Accounts read recently, with when (unix ms): each signed request
    /// needs its account, and clients send several per certificate.
    accounts: std::sync::Mutex<std::collections::HashMap<String, (AcmeAccount, i64)>>,
    /// Account keys as parsed from the stored JWK (by account id, with the
    /// JWK text they came from): a key is a function of that text, so an
    /// entry is never stale, and a changed key misses.
    account_keys: std::sync::Mutex<std::collections::HashMap<String, (String, Arc<AccountKey>)>>,
    /// Per-account new-order budget.
    /// (A token bucket per account, per node.)
    order_budget: std::sync::Mutex<sigil_core::ratelimit::RateLimiter>,
    /// Authorizations being validated on this node, so a second challenge
    /// response does not start a second validation.
    validating: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// An authorization being validated; released when dropped.
pub(crate) struct Validating {
    set: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    id: String,
}

impl Drop for Validating {
    fn drop(&mut self) {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(&self.id);
    }
}

/// [`Acme::start_validating`] with `set` holding the authorizations being
/// validated, at most `max`.
fn start_validating(
    set: &Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    id: &str,
    max: usize,
) -> Result<Option<Validating>, Problem> {
    let mut running = set.lock().unwrap_or_else(|p| p.into_inner());
    if running.contains(id) {
        return Ok(None);
    }
    if running.len() >= max {
        return Err(Problem::unavailable(format!(
            "this server is running {max} validations at once; respond to the challenge again in a few seconds"
        )));
    }
    running.insert(id.to_string());
    Ok(Some(Validating {
        set: set.clone(),
        id: id.to_string(),
    }))
}

/// Validations one node runs at once. Each holds an outbound connection
/// for up to three timeouts and goes on after its client leaves, so without
/// a ceiling a client could start any number.
pub const MAX_VALIDATIONS: usize = 512;

/// How long a cached account is trusted. Changes made on this node replace
/// the entry at once; another node's deactivation or key change is seen
/// within this time.
const ACCOUNT_CACHE_MS: i64 = 1000;
/// Bound on cached accounts (the cache is cleared when full).
const ACCOUNT_CACHE_MAX: usize = 100_000;

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// How a request must be signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signer {
    /// By an existing account (`kid`).
    Account,
    /// By a key given inline (`jwk`): newAccount.
    Key,
    /// Either (revokeCert).
    Either,
}

/// An authenticated request.
#[derive(Debug)]
struct Authed {
    jws: Jws,
    key: Arc<AccountKey>,
    account: Option<AcmeAccount>,
}

impl Authed {
    fn account(&self) -> Result<&AcmeAccount, Problem> {
        self.account
            .as_ref()
            .ok_or_else(|| Problem::malformed("this request must be signed by an account (kid)"))
    }
}

impl Acme {
    /// Loads the shared nonce key and builds the validator.
    pub async fn new(
        authority: Arc<Authority>,
        settings: AcmeSettings,
    ) -> Result<Arc<Acme>, String> {
        let nonces = nonce::Nonces::new(
            authority.store().clone(),
            i64::try_from(settings.nonce_ttl.as_secs()).unwrap_or(3600),
        )
        .await
        .map_err(|e| e.to_string())?;
        let validator = Validator::new(settings.validation.clone())?;
        let order_budget = std::sync::Mutex::new(sigil_core::ratelimit::RateLimiter::new(
            settings.orders_per_minute,
        ));
        Ok(Arc::new(Acme {
            authority,
            settings,
            nonces,
            validator,
            accounts: std::sync::Mutex::new(std::collections::HashMap::new()),
            account_keys: std::sync::Mutex::new(std::collections::HashMap::new()),
            order_budget,
            validating: Arc::default(),
        }))
    }

    /// Marks authorization `id` as being validated, unless it already is
    /// (`None`). Refused while [`MAX_VALIDATIONS`] run on this node.
    pub(crate) fn start_validating(&self, id: &str) -> Result<Option<Validating>, Problem> {
        start_validating(&self.validating, id, MAX_VALIDATIONS)
    }

    fn now(&self) -> i64 {
        self.authority.now().unix_timestamp()
    }

    /// An absolute URL for a path under the listener.
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.settings.base_url)
    }

    fn account_url(&self, id: &str) -> String {
        self.url(&format!("/acme/account/{id}"))
    }

    /// Forgets expired nonces; call now and then.
    pub async fn prune(&self) {
        if let Err(e) = self.nonces.prune(self.now()).await {
            tracing::warn!(error = %e, "pruning spent ACME nonces failed");
        }
    }

    /// RFC 8555 §6.2–6.5: content type, size, JWS form, algorithm, exactly one
    /// of jwk/kid, url, signature, then the nonce (spent last, so a forged
    /// request cannot burn one).
    async fn authenticate(
        &self,
        path: &str,
        headers: &HeaderMap,
        body: Body,
        signer: Signer,
    ) -> Result<Authed, Problem> {
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ct
            .split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/jose+json"))
        {
            let mut p = Problem::malformed(format!(
                "Content-Type must be application/jose+json (got '{ct}')"
            ));
            p.status = axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
            return Err(p);
        }
        let bytes = axum::body::to_bytes(body, self.settings.max_body)
            .await
            .map_err(|_| {
                let mut p = Problem::malformed(format!(
                    "request body exceeds {} bytes",
                    self.settings.max_body
                ));
                p.status = axum::http::StatusCode::PAYLOAD_TOO_LARGE;
                p
            })?;
        let jws = Jws::parse(&bytes)?;
        jws::algorithm(&jws.header.alg)?;
        let want_url = self.url(path);
        match jws.header.url.as_deref() {
            Some(u) if u == want_url => {}
            Some(u) => {
                return Err(Problem::unauthorized(format!(
                    "JWS url '{u}' does not match the request URL '{want_url}'"
                )));
            }
            None => return Err(Problem::malformed("JWS protected header has no url")),
        }
        let (key, account) = match (&jws.header.jwk, &jws.header.kid, signer) {
            (Some(_), Some(_), _) => {
                return Err(Problem::malformed(
                    "JWS protected header must have exactly one of jwk and kid, not both",
                ));
            }
            (None, None, _) => {
                return Err(Problem::malformed(
                    "JWS protected header must have one of jwk or kid",
                ));
            }
            (Some(_), None, Signer::Account) => {
                return Err(Problem::malformed(
                    "this request must be signed by an account: use kid, not jwk",
                ));
            }
            (None, Some(_), Signer::Key) => {
                return Err(Problem::malformed(
                    "newAccount must be signed with jwk (the new account's key), not kid",
                ));
            }
            (Some(jwk), None, _) => (Arc::new(AccountKey::from_jwk(jwk)?), None),
            (None, Some(kid), _) => {
                let account = self.account_by_kid(kid).await?;
                (self.account_key(&account)?, Some(account))
            }
        };
        jws.verify(&key)?;
        let nonce = jws
            .header
            .nonce
            .as_deref()
            .ok_or_else(|| Problem::bad_nonce("JWS protected header has no nonce"))?;
        self.nonces.spend(nonce, self.now()).await?;
        Ok(Authed { jws, key, account })
    }

    fn now_ms(&self) -> i64 {
        (self.authority.now().unix_timestamp_nanos() / 1_000_000) as i64
    }

    /// The account's key, parsed from its stored JWK (once per JWK).
    fn account_key(&self, account: &AcmeAccount) -> Result<Arc<AccountKey>, Problem> {
        let lock = || self.account_keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((jwk, key)) = lock().get(&account.id)
            && *jwk == account.jwk
        {
            return Ok(key.clone());
        }
        let stored: serde_json::Value = serde_json::from_str(&account.jwk)
            .map_err(|e| Problem::server_internal(format!("stored account key: {e}")))?;
        let key = Arc::new(AccountKey::from_jwk(&stored)?);
        let mut keys = lock();
        if keys.len() >= ACCOUNT_CACHE_MAX {
            keys.clear();
        }
        keys.insert(account.id.clone(), (account.jwk.clone(), key.clone()));
        Ok(key)
    }

    fn cached_account(&self, id: &str) -> Option<AcmeAccount> {
        let map = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id)
            .filter(|(_, at)| self.now_ms() - at < ACCOUNT_CACHE_MS)
            .map(|(a, _)| a.clone())
    }

    /// Takes one new-order token for `account`, or `rateLimited` with the
    /// seconds until the next one.
    pub(crate) fn take_order_token(&self, account: &str) -> Result<(), Problem> {
        let mut limiter = self.order_budget.lock().unwrap_or_else(|p| p.into_inner());
        limiter.take(account, self.now_ms()).map_err(|wait| {
            let mut p = Problem::rate_limited(format!(
                "this account may place {} orders or pre-authorizations per minute; retry in {wait} s",
                self.settings.orders_per_minute
            ));
            p.retry_after = Some(wait);
            p
        })
    }

    /// Records an account as just read or written.
    /// Drops `id`'s cached account, so the next request reads the database.
    pub(crate) fn forget_account(&self, id: &str) {
        let mut map = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(id);
    }

    pub(crate) fn remember_account(&self, account: &AcmeAccount) {
        let mut map = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= ACCOUNT_CACHE_MAX {
            map.clear();
        }
        map.insert(account.id.clone(), (account.clone(), self.now_ms()));
    }

    async fn account_by_kid(&self, kid: &str) -> Result<AcmeAccount, Problem> {
        let prefix = self.url("/acme/account/");
        let id = kid.strip_prefix(&prefix).filter(|id| !id.contains('/'));
        let account = match id {
            Some(id) => match self.cached_account(id) {
                Some(a) => Some(a),
                None => {
                    let a = self.authority.store().acme_account(id).await?;
                    if let Some(a) = &a {
                        self.remember_account(a);
                    }
                    a
                }
            },
            None => None,
        };
        let account = account
            .ok_or_else(|| Problem::account_does_not_exist(format!("no account at '{kid}'")))?;
        if account.status != "valid" {
            // RFC 8555 §7.3.6: 401 with type unauthorized.
            return Err(Problem::account_not_valid(format!(
                "account {kid} is {}; register a new account",
                account.status
            )));
        }
        Ok(account)
    }

    fn requester(account: &AcmeAccount) -> Result<Requester, Problem> {
        Requester::parse(&account.requester).ok_or_else(|| {
            Problem::server_internal(format!(
                "account {} records an unknown requester",
                account.id
            ))
        })
    }
}

/// Adds `Replay-Nonce`, `Cache-Control: no-store` and the directory link to
/// every ACME response (RFC 8555 §6.5, §7.1).
async fn common_headers(State(acme): State<Arc<Acme>>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let nonce = acme.nonces.issue(acme.now());
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&nonce) {
        h.insert("replay-nonce", v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) =
        HeaderValue::from_str(&format!("<{}>;rel=\"index\"", acme.url("/acme/directory")))
    {
        h.append(header::LINK, v);
    }
    resp
}

/// A request that takes longer than `limit` once its headers are in (a body
/// that never finishes arriving, a stuck database) is answered 503 with a
/// problem document and `Retry-After`, inside [`common_headers`], so the
/// answer still carries a fresh nonce.
async fn request_timeout(limit: Duration, req: Request, next: Next) -> Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            tracing::warn!(seconds = limit.as_secs(), "request timed out");
            Problem::unavailable(format!(
                "request timed out after {} s; retry",
                limit.as_secs()
            ))
            .into_response()
        }
    }
}

/// The ACME routes under `/acme`; each request may take up to
/// `request_timeout` (see [`request_timeout`]).
pub fn router(acme: Arc<Acme>, request_timeout: Duration) -> Router {
    use handlers as h;
    Router::new()
        .route("/acme/directory", get(h::directory))
        .route(
            "/acme/new-nonce",
            get(h::new_nonce_get).head(h::new_nonce_head),
        )
        .route("/acme/new-account", post(h::new_account))
        .route("/acme/account/{id}", post(h::account))
        .route("/acme/account/{id}/orders", post(h::account_orders))
        .route("/acme/key-change", post(h::key_change))
        .route("/acme/new-order", post(h::new_order))
        .route("/acme/new-authz", post(h::new_authz))
        .route("/acme/order/{id}", post(h::order))
        .route("/acme/order/{id}/finalize", post(h::finalize))
        .route("/acme/authz/{id}", post(h::authz))
        .route("/acme/chall/{authz}/{kind}", post(h::challenge))
        .route("/acme/cert/{serial}", post(h::certificate))
        .route(
            "/acme/cert/{serial}/alt/{n}",
            post(h::alternate_certificate),
        )
        .route("/acme/revoke-cert", post(h::revoke_cert))
        .route("/acme/renewal-info/{id}", get(h::renewal_info))
        .fallback(h::no_such_resource)
        .method_not_allowed_fallback(h::wrong_method)
        .layer(axum::middleware::from_fn(move |req, next| {
            self::request_timeout(request_timeout, req, next)
        }))
        .layer(axum::middleware::from_fn_with_state(
            acme.clone(),
            common_headers,
        ))
        .with_state(acme)
}

#[cfg(test)]
mod validating_tests {
    #![allow(clippy::unwrap_used)]
    use super::start_validating;

    #[test]
    fn validations_run_once_per_authorization_and_up_to_a_ceiling() {
        let set = std::sync::Arc::default();
        let a = start_validating(&set, "a", 2).unwrap().unwrap();
        assert!(start_validating(&set, "a", 2).unwrap().is_none(), "a runs");
        let b = start_validating(&set, "b", 2).unwrap().unwrap();
        let full = start_validating(&set, "c", 2).err().unwrap();
        assert_eq!(full.status.as_u16(), 503);
        assert_eq!(full.retry_after, Some(5));
        drop(a);
        let _c = start_validating(&set, "c", 2).unwrap().unwrap();
        drop(b);
        assert!(start_validating(&set, "a", 2).unwrap().is_some());
    }
}
