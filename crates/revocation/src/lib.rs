//! Revocation publishing for relying parties: per-issuer CRLs, regenerated
//! shortly after each revocation and before their nextUpdate, and an OCSP
//! responder with pre-signed responses, both over plain HTTP at the URLs
//! written into every certificate (RFC 5280 / RFC 6960 practice).
//!
//! Signing goes through the authority; this crate holds no key.

pub mod ocsp;

pub use ocsp::{FOLLOW_INTERVAL, NoncePolicy, Ocsp, OcspSettings, Presigned};

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sigil_authority::Authority;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::Notify;

/// A read guard even if a writer panicked (the maps stay usable).
pub(crate) fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    match l.read() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A write guard even if a writer panicked.
pub(crate) fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    match l.write() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Whether this node holds the background-job lock (CRL publishing, OCSP
/// pre-signing). Shared by the publisher, the responder and whoever holds
/// the lock; a new one leads until told otherwise (single node).
#[derive(Debug, Clone)]
pub struct Leader {
    leading: Arc<std::sync::atomic::AtomicBool>,
    changed: Arc<Notify>,
}

impl Default for Leader {
    fn default() -> Self {
        Leader {
            leading: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            changed: Arc::new(Notify::new()),
        }
    }
}

impl Leader {
    /// Whether this node runs the jobs now.
    pub fn is_leading(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records a change of leadership and wakes the job loops.
    pub fn set(&self, leading: bool) {
        let was = self
            .leading
            .swap(leading, std::sync::atomic::Ordering::AcqRel);
        if was != leading {
            self.changed.notify_waiters();
        }
    }

    /// Resolves at the next change of leadership.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// The next change of leadership, as a future that sees changes from
    /// when it is made (not first polled): made before reading
    /// [`Leader::is_leading`], no change in between is missed.
    pub fn next_change(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

/// How soon a staged issuer's CRL is tried again after it failed.
const STAGED_RETRY: Duration = Duration::from_secs(60);
/// How soon a serving issuer's CRL is tried again after it failed.
const FAILED_RETRY: Duration = Duration::from_secs(10);

/// When each issuer's CRL is next to be signed. An issuer that fails is
/// retried on its own, soon; the others keep their own times.
#[derive(Debug, Default)]
struct Schedule(HashMap<String, tokio::time::Instant>);

impl Schedule {
    /// Whether `id` is to be signed at `now` (never scheduled: yes).
    fn is_due(&self, id: &str, now: tokio::time::Instant) -> bool {
        self.0.get(id).is_none_or(|at| *at <= now)
    }

    fn set(&mut self, id: String, at: tokio::time::Instant) {
        self.0.insert(id, at);
    }

    /// Forgets issuers not in `ids` (retired meanwhile).
    fn keep(&mut self, ids: &[String]) {
        self.0.retain(|id, _| ids.contains(id));
    }

    /// The soonest time any issuer is due.
    fn next(&self) -> Option<tokio::time::Instant> {
        self.0.values().min().copied()
    }
}

/// CRL timing.
#[derive(Debug, Clone)]
pub struct CrlSettings {
    /// nextUpdate − thisUpdate.
    pub validity: Duration,
    /// How long after a certificate expires its entry stays listed.
    pub grace: Duration,
    /// Wait after a revocation before regenerating, to batch bursts.
    pub debounce: Duration,
}

impl Default for CrlSettings {
    fn default() -> Self {
        CrlSettings {
            validity: Duration::from_secs(24 * 3600),
            grace: Duration::from_secs(3600),
            debounce: Duration::from_secs(2),
        }
    }
}

/// A CRL ready to serve.
#[derive(Debug, Clone)]
struct Published {
    der: Bytes,
    etag: String,
    number: i64,
    this_update: i64,
    next_update: i64,
}

/// Facts about a published CRL, for status and metrics.
#[derive(Debug, Clone)]
pub struct CrlFacts {
    /// Issuer id.
    pub issuer: String,
    /// Time shard; `None` for the issuer's full CRL.
    pub shard: Option<i64>,
    /// CRL number.
    pub number: i64,
    /// thisUpdate (unix s).
    pub this_update: i64,
    /// nextUpdate (unix s).
    pub next_update: i64,
    /// DER size in bytes.
    pub bytes: usize,
}

impl Published {
    fn from_row(row: sigil_authority::CrlRow) -> Published {
        Published {
            etag: ocsp::etag_of(&row.der),
            der: row.der.into(),
            number: row.number,
            this_update: row.this_update,
            next_update: row.next_update,
        }
    }
}

/// Publishes CRLs and serves them.
#[derive(Debug)]
pub struct Revocation {
    authority: Arc<Authority>,
    settings: CrlSettings,
    /// Per issuer and shard (`None`: the full CRL).
    crls: RwLock<HashMap<(String, Option<i64>), Published>>,
    wake: Notify,
    leader: Leader,
}

impl Revocation {
    /// Creates the publisher (call [`Revocation::run`] to start it).
    pub fn new(
        authority: Arc<Authority>,
        settings: CrlSettings,
        leader: Leader,
    ) -> Arc<Revocation> {
        Arc::new(Revocation {
            authority,
            settings,
            crls: RwLock::new(HashMap::new()),
            wake: Notify::new(),
            leader,
        })
    }

    /// Signals that revocations changed: a new CRL follows within the debounce.
    pub fn revocations_changed(&self) {
        self.wake.notify_one();
    }

    /// Publishes once now (at startup), then keeps the CRL of every issuer
    /// this node holds (staged ones included) fresh: after each change (debounced) and at half its validity.
    pub async fn run(self: Arc<Self>) {
        let mut schedule = Schedule::default();
        // Every issuer at first and after a change; otherwise those due.
        let mut every = true;
        loop {
            if !self.leader.is_leading() {
                // Another node publishes: serve what it stored.
                self.load_stored().await;
                schedule = Schedule::default();
                every = true;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = self.leader.changed() => {}
                }
                continue;
            }
            if let Err(e) = self.publish_all(&mut schedule, every).await {
                tracing::error!(error = %e, "CRL publication incomplete; failed issuers are tried again in {} s", FAILED_RETRY.as_secs());
            }
            every = false;
            let next = schedule
                .next()
                .unwrap_or_else(|| tokio::time::Instant::now() + FAILED_RETRY);
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.wake.notified() => {
                    tokio::time::sleep(self.settings.debounce).await;
                    every = true;
                }
            }
        }
    }

    /// Caches the newest stored CRLs (full and shards) of every issuer not
    /// retired (published by the node holding the job lock).
    async fn load_stored(&self) {
        self.forget_retired();
        self.load_stored_of(&self.issuer_ids()).await;
    }

    /// Ids of the issuers whose CRLs are served and watched: the ones this
    /// node holds keys for, then the ones it does not (their stored CRLs).
    fn issuer_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .authority
            .issuer_states()
            .iter()
            .map(|(_, i)| i.info().id.to_string())
            .collect();
        ids.extend(self.authority.unheld_issuers());
        ids
    }

    /// Caches the newest stored CRLs of these issuers. Only the numbers are
    /// read each time; a CRL's DER only when a newer one is stored.
    async fn load_stored_of(&self, ids: &[String]) {
        for id in ids {
            let versions = match self.authority.crl_versions(id).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(issuer = %id, error = %e, "reading the stored CRLs failed");
                    continue;
                }
            };
            for (shard, number) in versions {
                let key = (id.clone(), shard);
                if read(&self.crls)
                    .get(&key)
                    .is_some_and(|p| p.number >= number)
                {
                    continue;
                }
                let row = match shard {
                    Some(k) => self.authority.shard_crl(id, k).await,
                    None => self.authority.latest_crl(id).await,
                };
                match row {
                    Ok(Some(row)) => {
                        let mut crls = write(&self.crls);
                        if crls.get(&key).is_none_or(|p| p.number < row.number) {
                            crls.insert(key, Published::from_row(row));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(issuer = %id, ?shard, error = %e, "reading a stored CRL failed");
                    }
                }
            }
        }
    }

    /// Signs, stores and caches a fresh CRL for every issuer it holds now
    /// (on the job node), or loads the stored ones (on the others).
    pub async fn publish_now(&self) -> Result<(), sigil_authority::Error> {
        if !self.leader.is_leading() {
            self.load_stored().await;
            return Ok(());
        }
        self.publish_all(&mut Schedule::default(), true).await
    }

    /// Publishes for the active, previous and staged issuers: all of them
    /// (`every`), or those `schedule` says are due; sets when each is due
    /// next (at half its CRL's validity). An issuer that fails does not hold
    /// up the others, and is retried on its own within [`FAILED_RETRY`]; the
    /// first error of an issuer that serves is returned after all were
    /// tried. A staged issuer's failure is only reported (it issues nothing
    /// yet, so it must not stop a server from starting) and retried within
    /// [`STAGED_RETRY`].
    async fn publish_all(
        &self,
        schedule: &mut Schedule,
        every: bool,
    ) -> Result<(), sigil_authority::Error> {
        let mut failed = None;
        self.forget_retired();
        let states = self.authority.issuer_states();
        let ids: Vec<String> = states
            .iter()
            .map(|(_, i)| i.info().id.to_string())
            .collect();
        schedule.keep(&ids);
        for ((state, _), id) in states.iter().zip(ids) {
            let now = tokio::time::Instant::now();
            if !every && !schedule.is_due(&id, now) {
                continue;
            }
            let next = match self.publish(&id).await {
                Ok(p) => {
                    let half = (p.next_update - p.this_update) / 2;
                    Duration::from_secs(u64::try_from(half).unwrap_or(60).max(1))
                }
                Err(e) if *state == sigil_authority::IssuerState::Staged => {
                    tracing::error!(issuer = %id, error = %e, "publishing the first CRL of a staged issuer failed; retrying within a minute");
                    STAGED_RETRY
                }
                Err(e) => {
                    tracing::error!(issuer = %id, error = %e, "publishing a CRL failed; retrying in {} s", FAILED_RETRY.as_secs());
                    // A replaced issuer's failure is reported and retried, but
                    // does not stop a server from starting for its successor.
                    if *state == sigil_authority::IssuerState::Active {
                        failed.get_or_insert(e);
                    }
                    FAILED_RETRY
                }
            };
            schedule.set(id, now + next);
        }
        // Issuers whose keys this node does not hold: their CRLs cannot be
        // signed here. Their last stored CRLs are cached, so they are served
        // and their age shows in the metrics (and `SigilCrlStale` fires)
        // before relying parties start refusing their certificates.
        let unheld = self.authority.unheld_issuers();
        if !unheld.is_empty() {
            for id in &unheld {
                tracing::error!(
                    issuer = %id,
                    "this node runs the CRL jobs but cannot load this issuer's key, so its CRL is not re-signed; \
                     make the key available to every node (see `sigil status`)"
                );
            }
            self.load_stored_of(&unheld).await;
        }
        match failed {
            Some(e) => Err(e),
            None if states.is_empty() => Err(sigil_authority::Error::Unavailable(
                "no issuer to publish a CRL for".into(),
            )),
            None => Ok(()),
        }
    }

    /// Publishes an issuer's full CRL and its shards; returns the full one.
    async fn publish(&self, issuer_id: &str) -> Result<Published, sigil_authority::Error> {
        let rows = self
            .authority
            .publish_crl(issuer_id, self.settings.validity, self.settings.grace)
            .await?;
        let shards = rows.len().saturating_sub(1);
        let mut full = None;
        let mut crls = write(&self.crls);
        for row in rows {
            let key = (row.issuer_id.clone(), row.shard);
            let p = Published::from_row(row);
            if key.1.is_none() {
                tracing::info!(issuer = %key.0, number = p.number, shards, "published CRL");
                full = Some(p.clone());
            }
            crls.insert(key, p);
        }
        full.ok_or_else(|| sigil_authority::Error::Unavailable("no CRL was signed".into()))
    }

    /// Drops cached CRLs of issuers that no longer publish (retired): their
    /// last CRL is still served from the database, but it no longer counts
    /// for freshness.
    fn forget_retired(&self) {
        let ids = self.issuer_ids();
        write(&self.crls).retain(|(id, _), _| ids.contains(id));
    }

    /// The CRLs this node published, per issuer.
    pub fn published(&self) -> Vec<CrlFacts> {
        read(&self.crls)
            .iter()
            .map(|((issuer, shard), p)| CrlFacts {
                issuer: issuer.clone(),
                shard: *shard,
                number: p.number,
                this_update: p.this_update,
                next_update: p.next_update,
                bytes: p.der.len(),
            })
            .collect()
    }

    async fn get(&self, issuer: &str, shard: Option<i64>) -> Option<Published> {
        let cached = read(&self.crls).get(&(issuer.to_string(), shard)).cloned();
        if cached.is_some() {
            return cached;
        }
        // Another node's or a retired issuer's CRL: from the database.
        let stored = match shard {
            Some(k) => self.authority.shard_crl(issuer, k).await,
            None => self.authority.latest_crl(issuer).await,
        };
        match stored {
            Ok(row) => row.map(Published::from_row),
            Err(e) => {
                tracing::error!(error = %e, "reading a stored CRL failed");
                None
            }
        }
    }
}

/// Routes: `GET /crl/<issuer-id>.crl` and, with time-sharded CRLs,
/// `GET /crl/<issuer-id>/<shard>.crl` (DER, `application/pkix-crl`), and
/// OCSP by `POST /ocsp` and `GET /ocsp/<base64 request>`.
pub fn router(state: Arc<Revocation>, responder: Arc<Ocsp>) -> Router {
    let crls = Router::new()
        .route("/crl/{file}", get(crl))
        .route("/crl/{issuer}/{file}", get(shard_crl))
        .with_state(state);
    let ocsp = Router::new()
        .route("/ocsp", axum::routing::post(ocsp_post))
        .route("/ocsp/{*request}", get(ocsp_get))
        .layer(DefaultBodyLimit::max(sigil_core::ocsp::MAX_REQUEST_LEN))
        .with_state(responder);
    crls.merge(ocsp)
}

async fn ocsp_post(State(o): State<Arc<Ocsp>>, body: Bytes) -> Response {
    ocsp_response(&o, o.answer(&body).await)
}

async fn ocsp_get(State(o): State<Arc<Ocsp>>, Path(request): Path<String>) -> Response {
    ocsp_response(&o, o.answer(&get_request_der(&request)).await)
}

/// The DER of a GET request's path (RFC 6960 appendix A.1: base64, then
/// URL-encoded, which the router has undone): the standard or URL-safe
/// alphabet, padded or not, line breaks ignored. Anything else is empty,
/// which the responder answers as `malformedRequest`.
fn get_request_der(path: &str) -> Vec<u8> {
    use base64::Engine;
    use base64::alphabet::{STANDARD, URL_SAFE};
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const EITHER: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let text: String = path
        .trim_start_matches('/')
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    GeneralPurpose::new(&STANDARD, EITHER)
        .decode(&text)
        .or_else(|_| GeneralPurpose::new(&URL_SAFE, EITHER).decode(&text))
        .unwrap_or_default()
}

/// Whether an `If-None-Match` value names `etag`: weak comparison (RFC 9110
/// §13.1.2), so a tag a proxy marked weak (`W/"…"`, as compressing proxies
/// do) still matches, and `*` matches any.
fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    let etag = etag.trim_start_matches("W/");
    if_none_match
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == etag)
}

pub(crate) fn http_time(t: i64) -> String {
    httpdate::fmt_http_date(
        std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0)),
    )
}

fn ocsp_response(o: &Ocsp, a: ocsp::Answer) -> Response {
    let mut h = HeaderMap::with_capacity(6);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/ocsp-response"),
    );
    match (a.window, &a.headers) {
        (Some((_, next_update)), Some(c)) => {
            let max_age = (next_update - o.now()).max(0);
            if let Ok(v) = HeaderValue::try_from(format!(
                "public, max-age={max_age}, no-transform, must-revalidate"
            )) {
                h.insert(header::CACHE_CONTROL, v);
            }
            h.insert(header::LAST_MODIFIED, c.last_modified.clone());
            h.insert(header::EXPIRES, c.expires.clone());
            h.insert(header::ETAG, c.etag.clone());
        }
        _ => {
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("no-cache, no-store"),
            );
        }
    }
    (StatusCode::OK, h, a.der).into_response()
}

fn issuer_id(id: &str) -> Option<String> {
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

async fn crl(
    State(s): State<Arc<Revocation>>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(id) = file.strip_suffix(".crl").and_then(issuer_id) else {
        return (StatusCode::NOT_FOUND, "no such CRL\n").into_response();
    };
    serve_crl(&s, &id, None, &headers).await
}

async fn shard_crl(
    State(s): State<Arc<Revocation>>,
    Path((issuer, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let shard = file
        .strip_suffix(".crl")
        .filter(|n| !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<i64>().ok());
    let (Some(id), Some(shard)) = (issuer_id(&issuer), shard) else {
        return (StatusCode::NOT_FOUND, "no such CRL\n").into_response();
    };
    serve_crl(&s, &id, Some(shard), &headers).await
}

async fn serve_crl(s: &Revocation, id: &str, shard: Option<i64>, headers: &HeaderMap) -> Response {
    let Some(p) = s.get(id, shard).await else {
        return (StatusCode::NOT_FOUND, "no CRL for this issuer\n").into_response();
    };
    let now = s.authority.now().unix_timestamp();
    let max_age = (p.next_update - now).clamp(0, 300);
    let mut h = HeaderMap::new();
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    };
    set(&mut h, header::CONTENT_TYPE, "application/pkix-crl".into());
    set(&mut h, header::ETAG, p.etag.clone());
    set(
        &mut h,
        header::CACHE_CONTROL,
        format!("public, max-age={max_age}, no-transform"),
    );
    set(&mut h, header::LAST_MODIFIED, http_time(p.this_update));
    set(&mut h, header::EXPIRES, http_time(p.next_update));
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| etag_matches(v, &p.etag))
    {
        return (StatusCode::NOT_MODIFIED, h).into_response();
    }
    (StatusCode::OK, h, p.der).into_response()
}

#[cfg(test)]
mod tests {
    use super::{Schedule, etag_matches, get_request_der};
    use std::time::Duration;

    /// Both alphabets, padded or not, with line breaks: one request.
    #[test]
    fn get_requests_decode_in_every_base64_form() {
        // 0xfb 0xff 0xbf encodes with '+' and '/' (or '-' and '_').
        let der = vec![0x30, 0x03, 0xfb, 0xff, 0xbf];
        for form in [
            "MAP7/78=",
            "MAP7/78",
            "MAP7_78=",
            "MAP7_78",
            "/MAP7/78=",
            "MAP7\n/78=",
        ] {
            assert_eq!(get_request_der(form), der, "{form}");
        }
        assert!(get_request_der("MAP7*78").is_empty());
    }

    /// A failing issuer is retried on its own: the others stay at their own
    /// times, and retired issuers drop out.
    #[test]
    fn each_issuer_keeps_its_own_time() {
        let t0 = tokio::time::Instant::now();
        let mut s = Schedule::default();
        assert!(s.is_due("a", t0), "never published: due");
        s.set("a".into(), t0 + Duration::from_secs(3600));
        s.set("b".into(), t0 + Duration::from_secs(10));
        assert_eq!(s.next(), Some(t0 + Duration::from_secs(10)));
        let later = t0 + Duration::from_secs(10);
        assert!(s.is_due("b", later));
        assert!(!s.is_due("a", later));
        s.keep(&["a".to_string()]);
        assert_eq!(s.next(), Some(t0 + Duration::from_secs(3600)));
        assert!(s.is_due("b", t0), "forgotten: due again");
    }

    #[test]
    fn if_none_match_compares_weakly() {
        let tag = "\"abc\"";
        for (header, hit) in [
            ("\"abc\"", true),
            ("W/\"abc\"", true),
            ("\"x\", W/\"abc\"", true),
            ("*", true),
            ("\"abd\"", false),
            ("abc", false),
        ] {
            assert_eq!(etag_matches(header, tag), hit, "{header}");
        }
    }
}
