//! The OCSP responder (RFC 6960, RFC 5019 profile). Responses for every
//! unexpired certificate of each serving issuer (the active one and those it
//! replaced) are signed ahead of time by that issuer's delegated responder
//! and kept in memory, so answering a plain request is a
//! lookup; requests with a nonce or several certificates get a freshly signed
//! answer under a concurrency bound.
//!
//! Every response a responder signs ends with the same two certificates
//! (the responder's and its issuer's, most of its size): in memory each
//! answer keeps only what precedes them, and the certificates are kept once
//! per responder and joined back when it is sent.

use crate::{read, write};
use sigil_authority::{ActiveIssuer, Authority, OcspSigner};
use sigil_core::Serial;
use sigil_core::ocsp::{self, CertIdHash, IssuerHashes, Query, Refusal, Status};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::Semaphore;

/// How often a node without the job lock loads responses the job node stored.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(30);

/// What to do with a request nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoncePolicy {
    /// Sign a fresh response echoing it (bounded concurrency).
    Honour,
    /// Answer from the pre-signed cache without the nonce (RFC 5019 style).
    Ignore,
}

/// 128 bits of a body's SHA-256: its strong HTTP entity tag.
fn etag_bytes(body: &[u8]) -> [u8; 16] {
    etag_of_parts(body, &[])
}

/// [`etag_bytes`] of `head` followed by `tail`, without joining them.
fn etag_of_parts(head: &[u8], tail: &[u8]) -> [u8; 16] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(head);
    h.update(tail);
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&h.finalize()[..16]);
    tag
}

/// A strong HTTP entity tag for a body, quoted (see [`etag_bytes`]).
pub(crate) fn etag_of(body: &[u8]) -> String {
    format!("\"{}\"", hex::encode(etag_bytes(body)))
}

/// A signed response, what it says (`good`, `revoked`, ...), and its
/// thisUpdate and nextUpdate (unix s) when it is cacheable.
type Signed = (Vec<u8>, &'static str, Option<(i64, i64)>);

/// How many certificates a pre-signing pass signs, stores and puts in the
/// cache at a time: a pass over millions holds one batch, not all of them.
const PRESIGN_BATCH: usize = 1000;

/// What a cached answer is for: the certificate's serial (hex) and the hash
/// algorithm of the CertID that names it (a response echoes the request's).
type CacheKey = (String, CertIdHash);

/// What a remembered request asks for: issuer id and cache key.
type SeenQuery = (String, CacheKey);

/// Most distinct request encodings remembered (see [`Ocsp::seen`]).
const SEEN_MAX: usize = 32_768;

/// Longest request encoding remembered: a plain single query is about 80
/// bytes, so padding cannot make the memo large.
const SEEN_MAX_LEN: usize = 256;

/// Seconds before the newest stored response seen that loads of stored
/// responses start from, for [`LOAD_REREAD`] after it was seen: a response
/// stamped (by its node's clock) before that one but committed after it was
/// read is still picked up. It also absorbs small clock differences between
/// the nodes that store responses.
const LOAD_OVERLAP: i64 = 60;

/// How long after the newest stored response seen moved loads keep reading
/// the [`LOAD_OVERLAP`] before it; later, only what is newer.
const LOAD_REREAD: Duration = Duration::from_secs(120);

/// Where loading one issuer's stored responses stands.
#[derive(Debug, Clone, Copy)]
struct LoadCursor {
    /// The newest `stored_at` loaded (unix s).
    newest: i64,
    /// When `newest` last moved.
    moved: std::time::Instant,
}

impl LoadCursor {
    /// The next load reads responses stored after this (unix s).
    fn from(&self) -> i64 {
        if self.moved.elapsed() < LOAD_REREAD {
            self.newest.saturating_sub(LOAD_OVERLAP)
        } else {
            self.newest
        }
    }
}

/// How long a request waits for the database to confirm a cached `good`
/// answer while this node's view of revocations is stale.
const STALE_VIEW_CHECK: Duration = Duration::from_millis(500);

/// What a pre-signing pass did: answers signed (and stored), and fresh
/// stored answers it kept as they were.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Presigned {
    pub signed: usize,
    pub kept: usize,
}

/// The least time, an eighth of the response validity, that a pass keeping
/// fresh stored answers leaves the next pass to replace them and the other
/// nodes to load the replacements, before they come within the serving
/// margin ([`Ocsp::margin`]): two follow intervals. With a shorter validity
/// (under 8 minutes) every pass signs everything.
const KEEP_SLACK_MIN: Duration = Duration::from_secs(2 * FOLLOW_INTERVAL.as_secs());

/// How soon a failed pre-signing pass is tried again.
const PRESIGN_RETRY: Duration = Duration::from_secs(30);

/// How far back a load reads responder certificates at least.
const TAILS_FLOOR: Duration = Duration::from_secs(7 * 86_400);

/// `Last-Modified` and `Expires` of the cacheable answers with one window
/// (thisUpdate, nextUpdate), made once and shared by them: a pre-signing
/// pass gives all its answers the same window.
#[derive(Debug)]
struct Dates {
    window: (i64, i64),
    last_modified: axum::http::HeaderValue,
    expires: axum::http::HeaderValue,
}

impl Dates {
    fn new(window: (i64, i64)) -> Option<Dates> {
        let value = |t| axum::http::HeaderValue::try_from(crate::http_time(t)).ok();
        Some(Dates {
            window,
            last_modified: value(window.0)?,
            expires: value(window.1)?,
        })
    }
}

/// A cacheable answer as kept in memory, and the issuer whose responder
/// signed it.
#[derive(Debug, Clone)]
struct Cached {
    issuer: Arc<str>,
    /// What it says (`good` or `revoked`).
    status: &'static str,
    /// The response up to `tail`.
    head: Box<[u8]>,
    /// The rest of the response: the certificates its responder puts in
    /// every response, shared by all of them (empty when the response does
    /// not end with them, and `head` is all of it).
    tail: Arc<[u8]>,
    /// See [`etag_bytes`].
    etag: [u8; 16],
    dates: Arc<Dates>,
    /// Whether it is in the database (pre-signed and stored, or loaded from
    /// there), so other nodes and a restart can serve it too.
    stored: bool,
}

impl Cached {
    /// Keeps the response `der`, sharing `tail` if it ends with it.
    fn new(
        issuer: Arc<str>,
        status: &'static str,
        der: &[u8],
        tail: &Arc<[u8]>,
        dates: Arc<Dates>,
    ) -> Cached {
        let (head, tail) = match der.strip_suffix(&tail[..]) {
            Some(head) if !tail.is_empty() => (head, tail.clone()),
            _ => (der, Arc::from(&[][..])),
        };
        Cached::from_parts(issuer, status, head, tail, dates)
    }

    /// The response that is `head` then `tail`.
    fn from_parts(
        issuer: Arc<str>,
        status: &'static str,
        head: &[u8],
        tail: Arc<[u8]>,
        dates: Arc<Dates>,
    ) -> Cached {
        Cached {
            issuer,
            status,
            etag: etag_of_parts(head, &tail),
            head: head.into(),
            tail,
            dates,
            stored: false,
        }
    }

    /// The same answer, known to be in the database.
    fn in_store(mut self) -> Cached {
        self.stored = true;
        self
    }

    fn revoked(&self) -> bool {
        self.status == "revoked"
    }

    fn this_update(&self) -> i64 {
        self.dates.window.0
    }

    /// Whether it is worth keeping at `now`: unexpired, and its issuer (one
    /// of `serving`) still serves.
    fn live(&self, now: i64, serving: &[String]) -> bool {
        self.dates.window.1 > now && serving.iter().any(|id| id.as_str() == &*self.issuer)
    }

    /// The whole DER response.
    fn der(&self) -> Vec<u8> {
        let mut der = Vec::with_capacity(self.head.len() + self.tail.len());
        der.extend_from_slice(&self.head);
        der.extend_from_slice(&self.tail);
        der
    }

    /// The answer to send.
    fn answer(&self) -> Answer {
        let mut tag = [b'"'; 34];
        let etag = hex::encode_to_slice(self.etag, &mut tag[1..33])
            .ok()
            .and_then(|()| axum::http::HeaderValue::from_bytes(&tag).ok());
        Answer {
            der: self.der().into(),
            window: Some(self.dates.window),
            status: self.status,
            headers: etag.map(|etag| CacheHeaders {
                etag,
                last_modified: self.dates.last_modified.clone(),
                expires: self.dates.expires.clone(),
            }),
        }
    }
}

/// Puts an answer in the cache unless the one there should stay: a
/// revocation is final, so a `good` answer never replaces a `revoked` one
/// (whatever order the signers finished in), and an older answer never
/// replaces a newer one. Returns whether it went in.
fn put(cache: &mut HashMap<CacheKey, Cached>, key: CacheKey, new: Cached) -> bool {
    if let Some(old) = cache.get(&key)
        && ((old.revoked() && !new.revoked())
            || (old.revoked() == new.revoked() && old.this_update() > new.this_update()))
    {
        return false;
    }
    cache.insert(key, new);
    true
}

/// Responder settings.
#[derive(Debug, Clone)]
pub struct OcspSettings {
    /// nextUpdate − thisUpdate of each response.
    pub validity: Duration,
    /// Lifetime of the delegated responder certificate.
    pub signer_lifetime: Duration,
    /// Nonce handling.
    pub nonce: NoncePolicy,
    /// Freshly signed responses in progress at once; beyond it: tryLater.
    pub max_fresh: usize,
}

impl Default for OcspSettings {
    fn default() -> Self {
        OcspSettings {
            validity: Duration::from_secs(3600),
            signer_lifetime: Duration::from_secs(2 * 24 * 3600),
            nonce: NoncePolicy::Honour,
            max_fresh: 64,
        }
    }
}

/// A signed response ready to send.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The DER `OCSPResponse` (shared, so serving it copies nothing).
    pub der: axum::body::Bytes,
    /// thisUpdate and nextUpdate (unix s) when the response is cacheable.
    pub window: Option<(i64, i64)>,
    /// What it says, for metrics: `good`, `revoked`, `unknown`, `multiple`,
    /// or the refusal (`malformed`, `unauthorized`, `error`, `try_later`).
    pub status: &'static str,
    /// `ETag`, `Last-Modified` and `Expires` of a cacheable answer.
    pub headers: Option<CacheHeaders>,
}

/// The fixed HTTP caching headers of a cacheable answer (RFC 5019 6.2).
#[derive(Debug, Clone)]
pub struct CacheHeaders {
    /// Strong entity tag of the body.
    pub etag: axum::http::HeaderValue,
    /// thisUpdate as an HTTP date.
    pub last_modified: axum::http::HeaderValue,
    /// nextUpdate as an HTTP date.
    pub expires: axum::http::HeaderValue,
}

impl Answer {
    /// An answer; with a window it is cacheable and gets its headers now.
    pub fn new(status: &'static str, der: Vec<u8>, window: Option<(i64, i64)>) -> Answer {
        let headers = window.and_then(|(this_update, next_update)| {
            let value = |s: String| axum::http::HeaderValue::try_from(s).ok();
            Some(CacheHeaders {
                etag: value(etag_of(&der))?,
                last_modified: value(crate::http_time(this_update))?,
                expires: value(crate::http_time(next_update))?,
            })
        });
        Answer {
            der: der.into(),
            window,
            status,
            headers,
        }
    }
}

/// The responder in use: its key and certificate, and its issuer's CertID hashes.
pub struct Current {
    signer: OcspSigner,
    hashes: IssuerHashes,
    /// The end of every response it signs: the certificates it includes.
    tail: Arc<[u8]>,
    /// [`sigil_authority::OcspCerts`] digest of `tail`, which stored
    /// responses name instead of repeating it.
    tail_digest: String,
}

/// The responder.
pub struct Ocsp {
    authority: Arc<Authority>,
    settings: OcspSettings,
    leader: crate::Leader,
    /// The delegated responder of each serving issuer, by issuer id.
    current: RwLock<HashMap<String, Arc<Current>>>,
    cache: RwLock<HashMap<CacheKey, Cached>>,
    /// How far loading each issuer's stored responses has come.
    cursors: RwLock<HashMap<String, LoadCursor>>,
    /// The dates last made for cached answers (see [`Dates`]).
    dates: RwLock<Option<Arc<Dates>>>,
    /// Request encodings already parsed: issuer id and serial (hex) of a
    /// plain single query. Clients repeat the same bytes for a certificate,
    /// so a repeated request is answered without parsing it again.
    seen: RwLock<HashMap<Box<[u8]>, SeenQuery>>,
    fresh: Semaphore,
    /// Metric handles, made once: the hot path only bumps them.
    counters: HashMap<&'static str, metrics::Counter>,
    latency: metrics::Histogram,
}

/// Every `status` label of `sigil_ocsp_requests_total`.
const STATUSES: [&str; 8] = [
    "good",
    "revoked",
    "unknown",
    "multiple",
    "malformed",
    "unauthorized",
    "error",
    "try_later",
];

impl std::fmt::Debug for Ocsp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ocsp")
    }
}

impl Ocsp {
    /// A responder; [`Ocsp::refresh`] makes it ready.
    pub fn new(
        authority: Arc<Authority>,
        settings: OcspSettings,
        leader: crate::Leader,
    ) -> Arc<Ocsp> {
        Arc::new(Ocsp {
            authority,
            leader,
            fresh: Semaphore::new(settings.max_fresh.max(1)),
            settings,
            current: RwLock::new(HashMap::new()),
            cache: RwLock::new(HashMap::new()),
            cursors: RwLock::new(HashMap::new()),
            dates: RwLock::new(None),
            seen: RwLock::new(HashMap::new()),
            counters: STATUSES
                .iter()
                .map(|s| {
                    (
                        *s,
                        metrics::counter!("sigil_ocsp_requests_total", "status" => *s),
                    )
                })
                .collect(),
            latency: metrics::histogram!("sigil_ocsp_response_seconds"),
        })
    }

    /// Makes sure every loaded issuer (staged ones included, so the
    /// first certificates of an activated issuer find one) has a responder
    /// certificate with at least half its life left, and drops those of
    /// issuers no longer loaded. Quick when nothing is due: call it
    /// before serving.
    /// A staged issuer whose responder cannot be made is reported and left
    /// out (tried again at the next call): it issues nothing yet, so it must
    /// not stop a server from starting or the others' responses.
    pub async fn ensure_signers(&self) -> Result<Vec<Arc<Current>>, sigil_authority::Error> {
        let (out, failed) = self.ensure_each_signer().await;
        failed.map_or(Ok(out), Err)
    }

    /// [`Ocsp::ensure_signers`], going on past an issuer that fails: the
    /// responders made, and the first failure.
    async fn ensure_each_signer(&self) -> (Vec<Arc<Current>>, Option<sigil_authority::Error>) {
        let publishing = self.authority.issuer_states();
        let mut out = Vec::with_capacity(publishing.len());
        let mut failed = None;
        for (state, issuer) in &publishing {
            match self.ensure_signer(issuer).await {
                Ok(cur) => out.push(cur),
                Err(e) if *state == sigil_authority::IssuerState::Staged => {
                    tracing::error!(issuer = %issuer.info().id, error = %e, "the OCSP responder of a staged issuer could not be made; retrying later");
                }
                Err(e) => {
                    tracing::error!(issuer = %issuer.info().id, error = %e, "the OCSP responder could not be made; retrying later");
                    // Only the active issuer's failure stops a server from
                    // starting: a replaced one's is retried meanwhile.
                    if *state == sigil_authority::IssuerState::Active {
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        write(&self.current)
            .retain(|id, _| publishing.iter().any(|(_, i)| i.info().id.as_str() == id));
        (out, failed)
    }

    /// The responder of one issuer. Every node uses the one stored in the
    /// database; the job node makes a new one when it has less than half its
    /// life left (or none is stored), so rotation runs on one node at a
    /// time. A node that cannot open the stored one (or where none can be
    /// stored) uses its own.
    async fn ensure_signer(
        &self,
        issuer: &ActiveIssuer,
    ) -> Result<Arc<Current>, sigil_authority::Error> {
        let now = self.authority.now();
        let id = issuer.info().id.as_str();
        let half = self.settings.signer_lifetime / 2;
        let leading = self.leader.is_leading();
        let current = read(&self.current).get(id).cloned();
        // Followers take any stored responder that still outlives the
        // responses it signs; the job node wants half its life left.
        let enough = if leading {
            half
        } else {
            self.settings.validity
        };
        // A responder certificate lasts at most as long as its issuer: one
        // that does is as fresh as any new one could be.
        let issuer_end = issuer.info().not_after;
        let stored = self.authority.stored_ocsp_signer(id).await?;
        if let Some((serial, not_after)) = &stored
            && (*not_after - now.unix_timestamp()
                >= i64::try_from(enough.as_secs()).unwrap_or(i64::MAX)
                || *not_after >= issuer_end.unix_timestamp())
        {
            if let Some(c) = &current
                && c.signer.serial == *serial
            {
                return Ok(c.clone());
            }
            match self.authority.open_ocsp_signer(id).await {
                Ok(Some(signer)) => {
                    tracing::info!(issuer = %id, serial = %signer.serial, "using the shared OCSP responder");
                    return self.install(issuer, signer);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(issuer = %id, error = %e, "cannot open the shared OCSP responder; using this node's own")
                }
            }
        }
        // This node's own responder, while fresh: kept by a follower when
        // nothing usable is stored, and by the job node when it cannot share.
        let own = current.filter(|c| {
            !c.signer.shared
                && (c.signer.not_after - now >= half || c.signer.not_after >= issuer_end)
        });
        if let Some(c) = own
            && (!leading || !self.authority.shares_ocsp_signers())
        {
            return Ok(c);
        }
        let signer = self
            .authority
            .new_ocsp_signer(id, self.settings.signer_lifetime, leading)
            .await?;
        self.install(issuer, signer)
    }

    fn install(
        &self,
        issuer: &ActiveIssuer,
        signer: sigil_authority::OcspSigner,
    ) -> Result<Arc<Current>, sigil_authority::Error> {
        let hashes = IssuerHashes::of(issuer.info());
        let certs = sigil_authority::OcspCerts::new(ocsp::certs_field(&[
            &signer.cert_der,
            &signer.issuer_der,
        ])?);
        let cur = Arc::new(Current {
            signer,
            hashes,
            tail: Arc::from(certs.der),
            tail_digest: certs.digest,
        });
        write(&self.current).insert(issuer.info().id.to_string(), cur.clone());
        Ok(cur)
    }

    /// Signs responses for every unexpired certificate of every serving
    /// issuer again, but for stored answers signed moments ago (a restart,
    /// or a new job node, right after a pass), which stay. Until it
    /// completes, requests are answered by fresh signatures.
    /// An issuer that fails does not hold up the others; the first failure
    /// is returned after all were tried.
    pub async fn refresh(&self) -> Result<Presigned, sigil_authority::Error> {
        let mut n = Presigned::default();
        let (serving, mut failed) = self.ensure_each_signer().await;
        for cur in serving {
            match self.refresh_issuer(&cur).await {
                Ok(k) => {
                    n.signed += k.signed;
                    n.kept += k.kept;
                }
                Err(e) => {
                    tracing::error!(issuer = %cur.signer.issuer_id, error = %e, "pre-signing OCSP responses failed");
                    failed.get_or_insert(e);
                }
            }
        }
        self.sweep();
        failed.map_or(Ok(n), Err)
    }

    /// Drops answers that expired or whose issuer no longer serves.
    fn sweep(&self) {
        let now = self.now();
        let serving: Vec<String> = read(&self.current).keys().cloned().collect();
        write(&self.cache).retain(|_, c| c.live(now, &serving));
        self.report_size();
    }

    /// How many answers are kept ready, and how many bytes of response they
    /// hold (the certificates their responder includes counted once).
    pub fn cached_size(&self) -> (usize, usize) {
        let cache = read(&self.cache);
        let mut tails: Vec<*const u8> = Vec::new();
        let mut bytes = 0;
        for c in cache.values() {
            bytes += c.head.len();
            if !c.tail.is_empty() && !tails.contains(&c.tail.as_ptr()) {
                tails.push(c.tail.as_ptr());
                bytes += c.tail.len();
            }
        }
        (cache.len(), bytes)
    }

    fn report_size(&self) {
        let (answers, bytes) = self.cached_size();
        metrics::gauge!("sigil_ocsp_cached_responses").set(answers as f64);
        metrics::gauge!("sigil_ocsp_cached_bytes").set(bytes as f64);
    }

    /// Seconds before its nextUpdate that a cached answer stops being served
    /// (it is signed again instead): pre-signed answers are replaced at half
    /// their validity, so only answers whose refresh failed get this old.
    fn margin(&self) -> i64 {
        i64::try_from((self.settings.validity / 4).as_secs()).unwrap_or(i64::MAX)
    }

    /// The cached answer for `key` from `issuer`'s responder, while it has
    /// more than [`Ocsp::margin`] left. A `good` answer is served only while
    /// this node's view of the revocations is current and does not list the
    /// certificate; otherwise the database is asked first.
    async fn cached(&self, issuer: &str, key: &CacheKey, now: i64) -> Option<Answer> {
        let (answer, good) = {
            let cache = read(&self.cache);
            let c = cache.get(key)?;
            let fresh = c.dates.window.1 - now > self.margin();
            if !fresh || &*c.issuer != issuer {
                return None;
            }
            (c.answer(), c.status == "good")
        };
        if !good {
            return Some(answer);
        }
        match self.authority.revoked_in_memory(&key.0) {
            Some(false) => Some(answer),
            // Revoked, its answer not re-signed yet (a long list in progress,
            // or a failed signature): signed anew.
            Some(true) => None,
            // The view is stale (sync has not run for a while): a revocation
            // made since, here or on another node, is in the database only.
            // If the database does not answer promptly, nothing newer can be
            // learnt from it, and the answer stands until its nextUpdate (as
            // a CRL would): served rather than make the responder fail with it.
            None => {
                let serial = Serial::parse_hex(&key.0)?;
                let asked =
                    tokio::time::timeout(STALE_VIEW_CHECK, self.authority.is_revoked(&serial))
                        .await;
                match asked {
                    Ok(Ok(true)) => None,
                    Ok(Ok(false)) => Some(answer),
                    Ok(Err(_)) | Err(_) => Some(answer),
                }
            }
        }
    }

    /// The dates of a pre-signed answer (which always has a window).
    fn presigned_dates(
        &self,
        window: Option<(i64, i64)>,
    ) -> Result<Arc<Dates>, sigil_authority::Error> {
        window.and_then(|w| self.dates(w)).ok_or_else(|| {
            sigil_authority::Error::Internal(sigil_core::Error::Template(
                "a pre-signed OCSP answer without a validity window".into(),
            ))
        })
    }

    /// Shared dates for answers with `window` (the last ones made, when it
    /// is theirs).
    fn dates(&self, window: (i64, i64)) -> Option<Arc<Dates>> {
        if let Some(d) = read(&self.dates).as_ref().filter(|d| d.window == window) {
            return Some(d.clone());
        }
        let d = Arc::new(Dates::new(window)?);
        *write(&self.dates) = Some(d.clone());
        Some(d)
    }

    /// Signs responses for every unexpired certificate of one issuer (two
    /// queries, then one signature each) that has no fresh stored `good`
    /// answer from the current responder, and drops the answers of its
    /// certificates that expired. Every answer carries the time of the
    /// snapshot (thisUpdate is a minute before it), so none claims to be
    /// newer than the status it was read with. Answers are stored and cached
    /// [`PRESIGN_BATCH`] at a time.
    async fn refresh_issuer(
        &self,
        cur: &Arc<Current>,
    ) -> Result<Presigned, sigil_authority::Error> {
        let now = self.authority.now();
        let id = &cur.signer.issuer_id;
        let mut serials = self
            .authority
            .unexpired_serials(id, now.unix_timestamp())
            .await?;
        // In key order, each batch of stored answers changes a run of
        // neighbouring index pages instead of one page per answer.
        serials.sort_unstable();
        let revoked: HashMap<String, (i64, i32)> = self
            .authority
            .revocations_of(id, now.unix_timestamp())
            .await?
            .into_iter()
            .map(|e| (e.serial, (e.revoked_at, e.reason)))
            .collect();
        let issuer: Arc<str> = Arc::from(id.as_str());
        let mut done = Presigned::default();
        // A stored `good` answer from this responder signed moments ago (a
        // pass just before a restart, or by the job node before this one took
        // over) stays: at the next pass, half the validity from now, it still
        // has more than the serving margin (a quarter) left, and an eighth
        // for that pass to reach it and for the other nodes to load what it
        // signs. Only with this node's validity (an answer signed with a
        // longer one before the setting was shortened is replaced), and only
        // when an eighth is time enough for that.
        let validity = self.settings.validity;
        let keep_after = (now + validity * 7 / 8).unix_timestamp();
        let span = i64::try_from(validity.as_secs()).unwrap_or(i64::MAX) + 60;
        let keeping = validity / 8 >= KEEP_SLACK_MIN;
        let mut kept: HashSet<&str> = HashSet::new();
        // The pass's answers share one window, so one set of dates.
        let mut dates: Option<Arc<Dates>> = None;
        // After a failed store the rest of the pass is kept in memory only
        // (another try per batch would wait on the database each time), and
        // the pass fails, so it is run again soon.
        let mut storing = true;
        for batch in serials.chunks(PRESIGN_BATCH) {
            let keep: Vec<bool> = {
                let cache = read(&self.cache);
                batch
                    .iter()
                    .map(|hex| {
                        keeping
                            && !revoked.contains_key(hex)
                            && cache
                                .get(&(hex.clone(), CertIdHash::Sha1))
                                .is_some_and(|c| {
                                    c.stored
                                        && !c.revoked()
                                        && *c.issuer == *issuer
                                        && Arc::ptr_eq(&c.tail, &cur.tail)
                                        && c.dates.window.1 > keep_after
                                        && c.dates.window.1 - c.dates.window.0 <= span
                                })
                    })
                    .collect()
            };
            let mut fresh = Vec::with_capacity(batch.len());
            for (hex, keep) in batch.iter().zip(keep) {
                if keep {
                    kept.insert(hex);
                    continue;
                }
                let Some(serial) = Serial::parse_hex(hex) else {
                    continue;
                };
                let status = match revoked.get(hex) {
                    None => Status::Good,
                    Some((at, reason)) => Status::Revoked {
                        at: OffsetDateTime::from_unix_timestamp(*at).unwrap_or(now),
                        reason: *reason,
                    },
                };
                let q = cur.hashes.cert_id(&serial, CertIdHash::Sha1)?;
                let (der, status, window) = self.sign_der(cur, &[(&q, status)], None, now).await?;
                let d = match &dates {
                    Some(d) if Some(d.window) == window => d.clone(),
                    _ => dates.insert(self.presigned_dates(window)?).clone(),
                };
                let cached = Cached::new(issuer.clone(), status, &der, &cur.tail, d);
                fresh.push((hex.clone(), cached));
            }
            done.signed += fresh.len();
            if storing && !fresh.is_empty() {
                storing = self.persist(cur, &fresh).await;
            }
            let mut cache = write(&self.cache);
            for (k, c) in fresh {
                let c = if storing { c.in_store() } else { c };
                put(&mut cache, (k, CertIdHash::Sha1), c);
            }
        }
        done.kept = kept.len();
        // Drop this issuer's SHA-1 answers older than the snapshot and not
        // kept: every certificate still unexpired got a new answer or kept a
        // fresh one (or has one signed meanwhile, for a new certificate or a
        // revocation, which is newer); the others expired. Answers for
        // SHA-256 CertIDs (signed on demand, never pre-signed) stay until
        // their nextUpdate.
        let snapshot = (now - Duration::from_secs(60)).unix_timestamp();
        write(&self.cache).retain(|(serial, hash), c| {
            *c.issuer != *issuer
                || *hash != CertIdHash::Sha1
                || c.this_update() >= snapshot
                || kept.contains(serial.as_str())
        });
        if !storing {
            // Served from memory; the pass runs again soon, so that other
            // nodes (and a restart) get the answers too.
            return Err(sigil_authority::Error::Unavailable(format!(
                "{} OCSP responses were signed but not all could be stored",
                done.signed
            )));
        }
        Ok(done)
    }

    /// Re-signs the responses of newly revoked certificates at once. Every
    /// cached answer about them goes first, in one step, so none is served
    /// as `good` while a long list (a mass revocation) is worked through;
    /// the new answers are stored [`PRESIGN_BATCH`] at a time.
    pub async fn revoked(&self, serials: &[String]) {
        let now = self.authority.now();
        let serials: Vec<(&String, Serial)> = serials
            .iter()
            .filter_map(|hex| Serial::parse_hex(hex).map(|s| (hex, s)))
            .collect();
        // Answers naming them with another hash are signed again on demand.
        let forget = |hexes: &mut dyn Iterator<Item = &String>| {
            let mut cache = write(&self.cache);
            for hex in hexes {
                cache.remove(&(hex.clone(), CertIdHash::Sha1));
                cache.remove(&(hex.clone(), CertIdHash::Sha256));
            }
        };
        forget(&mut serials.iter().map(|(hex, _)| *hex));
        let mut signed: Vec<(String, Cached)> = Vec::new();
        let mut signed_by: Option<Arc<Current>> = None;
        for (hex, serial) in &serials {
            let issuer = match self.authority.certificate(serial).await {
                Ok(Some(row)) => row.issuer_id,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(error = %e, serial = %hex, "looking up a revoked certificate failed");
                    continue;
                }
            };
            let Some(cur) = read(&self.current).get(&issuer).cloned() else {
                // Not serving (yet) on this node: answered by a fresh signature.
                continue;
            };
            // Stored per responder: a list of another issuer's goes first.
            if (signed.len() >= PRESIGN_BATCH
                || signed_by.as_ref().is_some_and(|c| !Arc::ptr_eq(c, &cur)))
                && let Some(by) = signed_by.take()
            {
                self.keep_revoked(&by, std::mem::take(&mut signed)).await;
            }
            let one = async {
                let q = cur.hashes.cert_id(serial, CertIdHash::Sha1)?;
                let status = self
                    .authority
                    .ocsp_status(&cur.signer.issuer_id, serial)
                    .await?;
                let (der, status, window) = self.sign_der(&cur, &[(&q, status)], None, now).await?;
                let dates = self.presigned_dates(window)?;
                let issuer = Arc::from(cur.signer.issuer_id.as_str());
                Ok::<_, sigil_authority::Error>(Cached::new(issuer, status, &der, &cur.tail, dates))
            };
            match one.await {
                Ok(cached) => {
                    signed.push(((*hex).clone(), cached));
                    signed_by = Some(cur);
                }
                Err(e) => {
                    tracing::error!(error = %e, serial = %hex, "re-signing an OCSP response failed");
                    // Never keep serving `good` for a revoked certificate
                    // (a pass may have cached one meanwhile).
                    forget(&mut std::iter::once(*hex));
                }
            }
        }
        if let Some(by) = signed_by {
            self.keep_revoked(&by, signed).await;
        }
    }

    /// Stores re-signed answers of revoked certificates, then serves them.
    async fn keep_revoked(&self, cur: &Current, mut signed: Vec<(String, Cached)>) {
        let stored = self.persist(cur, &signed).await;
        let mut cache = write(&self.cache);
        for (key, mut cached) in signed.drain(..) {
            cached.stored = stored;
            put(&mut cache, (key, CertIdHash::Sha1), cached);
        }
    }

    /// Answers from the responses stored by an earlier run (or another node)
    /// until the first pre-signing pass completes. A revoked certificate's
    /// response is loaded only if it says revoked (one signed before the
    /// revocation is left out; it is signed on demand).
    /// Call after the authority's first sync. Returns how many were loaded.
    pub async fn load_stored(&self) -> Result<usize, sigil_authority::Error> {
        self.load(true).await
    }

    /// Loads the responses stored since the last load (by the node running
    /// the background jobs). Each issuer's are followed by when they were
    /// stored, not by thisUpdate, so a pass that stores its answers over
    /// minutes is followed to its end; see [`LOAD_OVERLAP`] for ones
    /// committed late.
    pub async fn load_new(&self) -> Result<usize, sigil_authority::Error> {
        self.load(false).await
    }

    async fn load(&self, all: bool) -> Result<usize, sigil_authority::Error> {
        let serving: Vec<Arc<Current>> = read(&self.current).values().cloned().collect();
        if serving.is_empty() {
            return Ok(0);
        }
        // The certificates the stored answers end with, by digest: those used
        // within the validity, with a minute's margin (the rows are read
        // after these), and at least a week back, for answers signed with a
        // longer validity than this node's.
        let within = self.settings.validity.max(TAILS_FLOOR) + Duration::from_secs(60);
        let tails: HashMap<String, Arc<[u8]>> = self
            .authority
            .ocsp_certs(within)
            .await?
            .into_iter()
            .map(|c| (c.digest, Arc::from(c.der)))
            .collect();
        let mut loaded = 0;
        for cur in serving {
            let id = &cur.signer.issuer_id;
            let from = match read(&self.cursors).get(id) {
                Some(c) if !all => c.from(),
                _ => -1,
            };
            let (n, newest) = self.load_issuer(&cur, from, &tails).await?;
            loaded += n;
            if let Some(newest) = newest {
                let mut cursors = write(&self.cursors);
                let moved = cursors.get(id).is_none_or(|c| newest > c.newest);
                if moved {
                    let c = LoadCursor {
                        newest,
                        moved: std::time::Instant::now(),
                    };
                    cursors.insert(id.clone(), c);
                }
            }
        }
        write(&self.cursors).retain(|id, _| read(&self.current).contains_key(id));
        if loaded > 0 {
            self.report_size();
        }
        Ok(loaded)
    }

    /// Loads one issuer's responses stored after `stored_after` (unix s),
    /// keeping whichever of stored and in-memory is newer. They are read one
    /// at a time, so a load holds one response beyond the cache. Each is
    /// checked against this node's view of the revocations as it is read.
    /// Returns how many were loaded and the newest `stored_at` read, which is
    /// `None` when some could not be checked (that view was stale): the next
    /// load reads them again, and until then they are signed on demand, with
    /// the status read from the database.
    async fn load_issuer(
        &self,
        cur: &Current,
        stored_after: i64,
        tails: &HashMap<String, Arc<[u8]>>,
    ) -> Result<(usize, Option<i64>), sigil_authority::Error> {
        let mut loaded = 0;
        let mut unchecked = 0;
        let mut newest = None;
        let issuer: Arc<str> = Arc::from(cur.signer.issuer_id.as_str());
        let margin = self.settings.validity / 4;
        self.authority
            .stored_ocsp(&cur.signer.issuer_id, margin, stored_after, |r| {
                newest = newest.max(Some(r.stored_at));
                let tail = match &r.certs {
                    None => None,
                    // This responder's, shared with the answers it signs.
                    Some(digest) if *digest == cur.tail_digest => Some(cur.tail.clone()),
                    Some(digest) => match tails.get(digest) {
                        Some(t) => Some(t.clone()),
                        // Stored (with its certificates) after they were
                        // read: read again at the next load.
                        None => {
                            unchecked += 1;
                            return;
                        }
                    },
                };
                // Not one whole response once joined: never served.
                if !ocsp::joins(&r.der, tail.as_ref().map_or(0, |t| t.len())) {
                    return;
                }
                let status = match self.authority.revoked_in_memory(&r.serial) {
                    Some(false) => "good",
                    // One signed before the revocation is left out.
                    Some(true) => {
                        let whole = [&r.der[..], tail.as_deref().unwrap_or_default()].concat();
                        if !ocsp::summarize(&whole).is_some_and(|s| s.revoked) {
                            return;
                        }
                        "revoked"
                    }
                    None => {
                        unchecked += 1;
                        return;
                    }
                };
                let Some(dates) = self.dates((r.this_update, r.next_update)) else {
                    return;
                };
                let c = match tail {
                    Some(tail) => Cached::from_parts(issuer.clone(), status, &r.der, tail, dates),
                    None => Cached::new(issuer.clone(), status, &r.der, &cur.tail, dates),
                }
                .in_store();
                if put(&mut write(&self.cache), (r.serial, CertIdHash::Sha1), c) {
                    loaded += 1;
                }
            })
            .await?;
        if unchecked > 0 {
            tracing::warn!(
                issuer = %cur.signer.issuer_id,
                responses = unchecked,
                "stored OCSP responses left unloaded for now: this node's view of the revocations is stale, or they name responder certificates it has not read"
            );
            return Ok((loaded, None));
        }
        Ok((loaded, newest))
    }

    /// Stores signed answers so a restarted node can serve them at once.
    /// Failures are logged: the in-memory answers stay authoritative.
    /// Returns whether they were stored.
    async fn persist(&self, cur: &Current, answers: &[(String, Cached)]) -> bool {
        let stored_at = self.now();
        let mut named = false;
        let rows: Vec<sigil_authority::SignedOcsp> = answers
            .iter()
            .map(|(serial, c)| {
                // Ending with the responder's certificates: stored without
                // them, naming them instead. Otherwise (none, or another
                // responder's): stored whole.
                let (der, certs) = if Arc::ptr_eq(&c.tail, &cur.tail) {
                    named = true;
                    (c.head.to_vec(), Some(cur.tail_digest.clone()))
                } else {
                    (c.der(), None)
                };
                sigil_authority::SignedOcsp {
                    serial: serial.clone(),
                    issuer_id: cur.signer.issuer_id.clone(),
                    this_update: c.dates.window.0,
                    next_update: c.dates.window.1,
                    der,
                    certs,
                    stored_at,
                }
            })
            .collect();
        let certs = if named {
            vec![sigil_authority::OcspCerts {
                digest: cur.tail_digest.clone(),
                der: cur.tail.to_vec(),
            }]
        } else {
            Vec::new()
        };
        for chunk in rows.chunks(1000) {
            if let Err(e) = self.authority.save_ocsp(chunk, &certs).await {
                tracing::warn!(error = %e, "storing pre-signed OCSP responses failed");
                return false;
            }
        }
        true
    }

    /// Pre-signs now, then keeps responses and the responder certificate
    /// fresh (at half the response validity).
    /// On the node holding the background-job lock, pre-signs now and then
    /// at half the response validity; on the others, loads what it stored
    /// (every [`FOLLOW_INTERVAL`]). Every node keeps its own responder
    /// certificate, for nonce requests and on-demand answers.
    pub async fn run(self: Arc<Self>) {
        let mut next_presign: Option<std::time::Instant> = None;
        let mut last_sweep = std::time::Instant::now();
        loop {
            if let Err(e) = self.ensure_signers().await {
                tracing::error!(error = %e, "renewing OCSP responder certificates failed");
            }
            let due = next_presign.is_none_or(|t| std::time::Instant::now() >= t);
            if self.leader.is_leading() && due {
                // A failed pass is tried again soon: the answers it would
                // have replaced expire at the next regular pass.
                let wait = match self.refresh().await {
                    Ok(n) => {
                        tracing::info!(
                            responses = n.signed,
                            kept = n.kept,
                            "pre-signed OCSP responses"
                        );
                        self.settings.validity / 2
                    }
                    Err(_) => PRESIGN_RETRY,
                };
                next_presign = Some(std::time::Instant::now() + wait);
            } else if !self.leader.is_leading() {
                next_presign = None;
                if last_sweep.elapsed() >= self.settings.validity / 4 {
                    self.sweep();
                    last_sweep = std::time::Instant::now();
                }
                match self.load_new().await {
                    Ok(n) if n > 0 => tracing::debug!(
                        responses = n,
                        "loaded OCSP responses signed by the job node"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "loading stored OCSP responses failed"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_INTERVAL) => {}
                _ = self.leader.changed() => {}
            }
        }
    }

    async fn sign(
        &self,
        cur: &Arc<Current>,
        answers: &[(&Query, Status)],
        nonce: Option<&[u8]>,
        now: OffsetDateTime,
    ) -> Result<Answer, sigil_authority::Error> {
        let (der, status, window) = self.sign_der(cur, answers, nonce, now).await?;
        Ok(Answer::new(status, der, window))
    }

    /// A signed response, what it says, and its window when cacheable
    /// (without a nonce).
    async fn sign_der(
        &self,
        cur: &Arc<Current>,
        answers: &[(&Query, Status)],
        nonce: Option<&[u8]>,
        now: OffsetDateTime,
    ) -> Result<Signed, sigil_authority::Error> {
        // Backdated a minute for relying parties whose clocks are a little
        // behind, but never to before a revocation it reports (as CRLs).
        let revoked_at = answers
            .iter()
            .filter_map(|(_, s)| match s {
                Status::Revoked { at, .. } => Some(*at),
                _ => None,
            })
            .max();
        let floor = now - Duration::from_secs(60);
        let this_update = revoked_at.map_or(floor, |t| t.max(floor)).min(now);
        let next_update = now + self.settings.validity;
        let tbs = ocsp::response_data(
            &cur.signer.key_hash,
            now,
            answers,
            this_update,
            next_update,
            nonce,
        )?;
        let (tbs, sig) = if cur.signer.in_token() {
            let c = cur.clone();
            tokio::task::spawn_blocking(move || {
                let sig = c.signer.sign(&tbs);
                (tbs, sig)
            })
            .await
            .map_err(|_| {
                sigil_authority::Error::Unavailable("the OCSP signing task failed".into())
            })?
        } else {
            let sig = cur.signer.sign(&tbs);
            (tbs, sig)
        };
        let der = ocsp::successful(&tbs, &sig?, &cur.tail)?;
        let status = match answers {
            [(_, Status::Good)] => "good",
            [(_, Status::Revoked { .. })] => "revoked",
            [(_, Status::Unknown)] => "unknown",
            _ => "multiple",
        };
        let window = nonce
            .is_none()
            .then(|| (this_update.unix_timestamp(), next_update.unix_timestamp()));
        Ok((der, status, window))
    }

    /// The delegated responder of each serving issuer: issuer id and the
    /// responder certificate's notAfter.
    pub fn signers(&self) -> Vec<(String, OffsetDateTime)> {
        read(&self.current)
            .iter()
            .map(|(id, c)| (id.clone(), c.signer.not_after))
            .collect()
    }

    /// The current time by the authority's clock (unix s).
    pub fn now(&self) -> i64 {
        self.authority.now().unix_timestamp()
    }

    /// Answers a DER request. Never fails: problems become OCSP error statuses.
    pub async fn answer(&self, request: &[u8]) -> Answer {
        let started = std::time::Instant::now();
        let a = self.answer_or_refuse(request).await;
        if let Some(c) = self.counters.get(a.status) {
            c.increment(1);
        }
        self.latency.record(started.elapsed().as_secs_f64());
        a
    }

    async fn answer_or_refuse(&self, request: &[u8]) -> Answer {
        match self.try_answer(request).await {
            Ok(a) => a,
            Err(r) => Answer::new(
                match r {
                    Refusal::Malformed => "malformed",
                    Refusal::Unauthorized => "unauthorized",
                    Refusal::Internal => "error",
                    Refusal::TryLater => "try_later",
                },
                ocsp::refusal(r),
                None,
            ),
        }
    }

    /// The pre-signed answer for a request seen before, if any.
    async fn seen(&self, request: &[u8], now: i64) -> Option<Answer> {
        let (issuer, key) = read(&self.seen).get(request).cloned()?;
        if !read(&self.current).contains_key(&issuer) {
            return None;
        }
        self.cached(&issuer, &key, now).await
    }

    /// Remembers what a short plain single-query request asks for.
    fn remember(&self, request: &[u8], issuer: &str, key: CacheKey) {
        if request.len() > SEEN_MAX_LEN {
            return;
        }
        let mut seen = write(&self.seen);
        if seen.len() >= SEEN_MAX {
            seen.clear();
        }
        seen.insert(request.into(), (issuer.to_string(), key));
    }

    async fn try_answer(&self, request: &[u8]) -> Result<Answer, Refusal> {
        let now = self.now();
        if let Some(a) = self.seen(request, now).await {
            return Ok(a);
        }
        let req = ocsp::parse_request(request)?;
        // One responder signs the whole answer, so every query must name the
        // same issuer (RFC 6960 §4.2.1 leaves mixed requests to the responder).
        let cur = {
            let current = read(&self.current);
            let first = req.queries.first().ok_or(Refusal::Malformed)?;
            current
                .values()
                .find(|c| c.hashes.matches(first))
                .cloned()
                .ok_or(Refusal::Unauthorized)?
        };
        if !req.queries.iter().all(|q| cur.hashes.matches(q)) {
            return Err(Refusal::Unauthorized);
        }
        let nonce = match self.settings.nonce {
            // A nonce that cannot be echoed is refused only when nonces are
            // honoured; otherwise it is ignored like any other.
            NoncePolicy::Honour => req
                .nonce
                .as_ref()
                .map(|n| n.as_deref().map_err(|e| *e))
                .transpose()?,
            NoncePolicy::Ignore => None,
        };
        if let ([q], None) = (req.queries.as_slice(), nonce)
            && q.canonical()
        {
            let key = (q.serial.to_hex(), q.hash().ok_or(Refusal::Unauthorized)?);
            if let Some(a) = self.cached(&cur.signer.issuer_id, &key, now).await {
                self.remember(request, &cur.signer.issuer_id, key);
                return Ok(a);
            }
        }
        // Signed now: bounded, so floods of nonces or unknown serials cannot
        // take the responder down.
        let _permit = self.fresh.try_acquire().map_err(|_| Refusal::TryLater)?;
        let mut answers = Vec::with_capacity(req.queries.len());
        for q in &req.queries {
            let status = self
                .authority
                .ocsp_status(&cur.signer.issuer_id, &q.serial)
                .await
                .map_err(|_| Refusal::Internal)?;
            answers.push((q, status));
        }
        let now = self.authority.now();
        let a = self
            .sign(&cur, &answers, nonce, now)
            .await
            .map_err(|_| Refusal::Internal)?;
        // Cache a plain single answer for a certificate we issued, its CertID
        // in the form answers are pre-signed in.
        if let ([(q, Status::Good | Status::Revoked { .. })], None) = (answers.as_slice(), nonce)
            && q.canonical()
            && let Some(hash) = q.hash()
            && let Some(dates) = a.window.and_then(|w| self.dates(w))
        {
            let issuer = Arc::from(cur.signer.issuer_id.as_str());
            let cached = Cached::new(issuer, a.status, &a.der, &cur.tail, dates);
            put(&mut write(&self.cache), (q.serial.to_hex(), hash), cached);
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: &'static str, this_update: i64) -> Cached {
        let dates = Dates::new((this_update, this_update + 3600)).unwrap();
        Cached::new(
            Arc::from("issuer-a"),
            status,
            &[0x30, 0x00],
            &Arc::from(&[][..]),
            Arc::new(dates),
        )
    }

    fn stored(cache: &HashMap<CacheKey, Cached>) -> (&'static str, i64) {
        let c = &cache[&("01".to_string(), CertIdHash::Sha1)];
        (c.status, c.this_update())
    }

    #[test]
    fn a_revocation_stays_and_newer_answers_replace_older_ones() {
        let key = || ("01".to_string(), CertIdHash::Sha1);
        let mut cache = HashMap::new();
        assert!(put(&mut cache, key(), answer("good", 100)));
        assert!(!put(&mut cache, key(), answer("good", 50)), "older good");
        assert_eq!(stored(&cache), ("good", 100));
        assert!(put(&mut cache, key(), answer("good", 100)), "same age");
        assert!(
            put(&mut cache, key(), answer("revoked", 90)),
            "a revocation wins"
        );
        assert!(
            !put(&mut cache, key(), answer("good", 500)),
            "good after revoked"
        );
        assert_eq!(stored(&cache), ("revoked", 90));
        assert!(
            !put(&mut cache, key(), answer("revoked", 80)),
            "older revoked"
        );
        assert!(
            put(&mut cache, key(), answer("revoked", 200)),
            "re-signed revoked"
        );
        assert_eq!(stored(&cache), ("revoked", 200));
    }

    #[test]
    fn expired_answers_and_retired_issuers_are_not_kept() {
        let serving = vec!["issuer-a".to_string()];
        let a = answer("good", 1000);
        assert!(a.live(1000, &serving));
        assert!(a.live(4599, &serving));
        assert!(!a.live(4600, &serving), "at nextUpdate");
        assert!(!a.live(1000, &["issuer-b".to_string()]), "issuer retired");
    }

    #[test]
    fn loads_read_the_overlap_again_only_for_a_while() {
        let now = std::time::Instant::now();
        let fresh = LoadCursor {
            newest: 10_000,
            moved: now,
        };
        assert_eq!(fresh.from(), 10_000 - LOAD_OVERLAP);
        let settled = LoadCursor {
            moved: now.checked_sub(LOAD_REREAD).unwrap(),
            ..fresh
        };
        assert_eq!(settled.from(), 10_000);
    }

    /// The shared certificates are kept once and the answer sent is the
    /// response as signed, with the headers of the whole of it.
    #[test]
    fn answers_keep_their_own_part_and_are_sent_whole() {
        let tail: Arc<[u8]> = Arc::from(&b"-certificates"[..]);
        let dates = Arc::new(Dates::new((1_000, 4_600)).unwrap());
        let issuer: Arc<str> = Arc::from("issuer-a");
        let der = b"response-certificates";
        let c = Cached::new(issuer.clone(), "good", der, &tail, dates.clone());
        assert_eq!(&c.head[..], b"response");
        assert!(Arc::ptr_eq(&c.tail, &tail), "shared, not copied");
        let a = c.answer();
        assert_eq!(&a.der[..], &der[..]);
        assert_eq!((a.status, a.window), ("good", Some((1_000, 4_600))));
        let whole = Answer::new("good", der.to_vec(), Some((1_000, 4_600)));
        let (h, w) = (a.headers.unwrap(), whole.headers.unwrap());
        assert_eq!(
            (h.etag, h.last_modified, h.expires),
            (w.etag, w.last_modified, w.expires)
        );

        // A response that does not end with them (another responder's) is
        // kept whole.
        let other = b"response-other-certs";
        let c = Cached::new(issuer, "good", other, &tail, dates);
        assert_eq!((&c.head[..], c.tail.len()), (&other[..], 0));
        assert_eq!(&c.answer().der[..], &other[..]);
    }
}
