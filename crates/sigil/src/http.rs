//! The plain-HTTP surface: health, readiness, metrics, trust anchors, issuer
//! certificates.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use sigil_authority::{Authority, pem};
use sigil_core::{Clock, IssuerId, IssuerInfo, SystemClock};
use sigil_revocation::{Ocsp, Revocation};
use std::sync::Arc;

/// Shared state of the HTTP routes.
pub struct HttpState {
    /// The authority (store and active issuer).
    pub authority: Arc<Authority>,
    /// Configured roots.
    pub roots: Vec<IssuerInfo>,
    /// CRL publisher (for freshness).
    pub revocation: Arc<Revocation>,
    /// OCSP responder (for freshness).
    pub responder: Arc<Ocsp>,
    /// The Prometheus recorder's handle; `None` serves no /metrics.
    pub metrics: Option<PrometheusHandle>,
    /// The TLS listeners' own certificates (gRPC, HTTPS).
    pub listeners: Vec<Arc<crate::tls_cert::ServerCert>>,
    /// The last readiness check and when it ran (see [`readiness`]).
    pub readiness: tokio::sync::Mutex<Option<(std::time::Instant, Arc<Vec<String>>)>>,
}

/// How long a readiness check's result is reused.
const READINESS_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// [`not_ready`], run at most once per [`READINESS_TTL`]: the routes are
/// public and unauthenticated, and each check takes database connections
/// that issuance and OCSP share. Requests arriving while one runs wait for
/// its result rather than start their own.
async fn readiness(s: &HttpState) -> Arc<Vec<String>> {
    let mut last = s.readiness.lock().await;
    if let Some((at, why)) = last.as_ref()
        && at.elapsed() < READINESS_TTL
    {
        return why.clone();
    }
    let why = Arc::new(not_ready(s).await);
    *last = Some((std::time::Instant::now(), why.clone()));
    why
}

/// Builds the router.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/roots.pem", get(bundle_pem))
        .route("/bundle.pem", get(bundle_pem))
        .route("/ca/{file}", get(ca_cert))
        .with_state(state)
}

/// What keeps this node from serving, one line each; empty when ready.
async fn not_ready(s: &HttpState) -> Vec<String> {
    let mut why = Vec::new();
    if let Err(e) = s.authority.store().ping().await {
        tracing::warn!(error = %e, "readiness: database unreachable");
        why.push("database unreachable".to_string());
    }
    let now = SystemClock.now();
    let issuer = s.authority.active_issuer();
    if issuer.info().not_after <= now {
        why.push(format!("issuing CA {} expired", issuer.info().id));
    }
    // A node that could not load the issuer the database made active (its
    // key file is missing here) must not keep issuing from the old one.
    match s.authority.store().issuers().await {
        Ok(rows) => {
            if let Some(active) = rows
                .iter()
                .find(|r| r.state == sigil_authority::IssuerState::Active)
                && active.id != issuer.info().id.as_str()
            {
                why.push(format!(
                    "the active issuer is {} but this node still issues with {} (cannot load its key?)",
                    active.id,
                    issuer.info().id
                ));
            }
        }
        Err(e) => tracing::warn!(error = %e, "readiness: reading issuers failed"),
    }
    if !issuer.key_usable() {
        why.push(format!(
            "the key of issuing CA {} is unusable (its PKCS#11 token is gone)",
            issuer.info().id
        ));
    }
    let t = now.unix_timestamp();
    for l in &s.listeners {
        if l.not_after() <= t {
            why.push(format!(
                "the {} listener's certificate expired (its renewal keeps failing; see the log)",
                l.label()
            ));
        }
    }
    let crls = s.revocation.published();
    let signers = s.responder.signers();
    for i in s.authority.serving_issuers() {
        let id = i.info().id.to_string();
        if !crls.iter().any(|c| c.issuer == id && c.shard.is_none()) {
            why.push(format!("no CRL published for issuer {id}"));
        }
        for c in crls.iter().filter(|c| c.issuer == id && c.next_update <= t) {
            why.push(match c.shard {
                Some(k) => format!("CRL shard {k} of issuer {id} is past its nextUpdate"),
                None => format!("CRL of issuer {id} is past its nextUpdate"),
            });
        }
        match signers.iter().find(|(sid, _)| *sid == id) {
            Some((_, until)) if *until > now => {}
            Some(_) => why.push(format!("OCSP responder certificate of issuer {id} expired")),
            None => why.push(format!("no OCSP responder for issuer {id}")),
        }
    }
    why
}

async fn readyz(State(s): State<Arc<HttpState>>) -> Response {
    let why = readiness(&s).await;
    if why.is_empty() {
        return "ready\n".into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{}\n", why.join("\n")),
    )
        .into_response()
}

/// Prometheus text format. Gauges that describe state (expiry, CRL
/// freshness, pool use, readiness) are set at scrape time; counters and
/// histograms accumulate as requests are served.
async fn metrics(State(s): State<Arc<HttpState>>) -> Response {
    let Some(handle) = &s.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are off\n").into_response();
    };
    let now = SystemClock.now();
    let t = now.unix_timestamp();
    let expiry = |kind: &'static str, id: String, subject: String, not_after: i64| {
        metrics::gauge!(
            "sigil_certificate_expiry_seconds",
            "kind" => kind,
            "id" => id,
            "subject" => subject
        )
        .set((not_after - t) as f64);
    };
    for r in &s.roots {
        expiry(
            "root",
            r.id.to_string(),
            r.subject.clone(),
            r.not_after.unix_timestamp(),
        );
    }
    for (state, i) in s.authority.issuer_states() {
        let info = i.info();
        expiry(
            "issuer",
            info.id.to_string(),
            info.subject.clone(),
            info.not_after.unix_timestamp(),
        );
        metrics::gauge!("sigil_issuer_active", "id" => info.id.to_string()).set(
            if state == sigil_authority::IssuerState::Active {
                1.0
            } else {
                0.0
            },
        );
    }
    for l in &s.listeners {
        expiry(
            "listener",
            l.label().to_string(),
            format!("{} listener", l.label()),
            l.not_after(),
        );
    }
    for (issuer, until) in s.responder.signers() {
        expiry(
            "ocsp_signer",
            issuer,
            "OCSP responder".into(),
            until.unix_timestamp(),
        );
    }
    // Per issuer: its full CRL (shards are published with it).
    for c in s
        .revocation
        .published()
        .into_iter()
        .filter(|c| c.shard.is_none())
    {
        metrics::gauge!("sigil_crl_age_seconds", "issuer" => c.issuer.clone())
            .set((t - c.this_update) as f64);
        metrics::gauge!("sigil_crl_next_update_seconds", "issuer" => c.issuer.clone())
            .set((c.next_update - t) as f64);
        metrics::gauge!("sigil_crl_bytes", "issuer" => c.issuer.clone()).set(c.bytes as f64);
        metrics::gauge!("sigil_crl_number", "issuer" => c.issuer).set(c.number as f64);
    }
    let (open, idle) = s.authority.store().pool_use();
    metrics::gauge!("sigil_db_pool_connections", "state" => "idle").set(idle as f64);
    metrics::gauge!("sigil_db_pool_connections", "state" => "in_use")
        .set(f64::from(open).max(idle as f64) - idle as f64);
    let ready = readiness(&s).await.is_empty();
    metrics::gauge!("sigil_ready").set(if ready { 1.0 } else { 0.0 });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// The trust bundle, at `/roots.pem` (and `/bundle.pem`): the roots first,
/// then every issuer relying parties should accept now: staged (so peers
/// trust it before it issues), active and previous ones, then
/// cross-certificates between roots (during a root rotation). Issuers leave
/// it when they retire. gRPC `GetTrustBundle` returns the same, with roots
/// and intermediates apart.
async fn bundle_pem(State(s): State<Arc<HttpState>>) -> Response {
    let issuers = match s.authority.trusted_issuers().await {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "issuer lookup failed");
            return (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response();
        }
    };
    let cross = match s.authority.cross_certs().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cross-certificate lookup failed");
            return (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response();
        }
    };
    let body: String = s
        .roots
        .iter()
        .map(|r| pem("CERTIFICATE", &r.der))
        .chain(issuers.iter().map(|der| pem("CERTIFICATE", der)))
        .chain(cross.iter().map(|der| pem("CERTIFICATE", der)))
        .collect();
    (
        [
            (header::CONTENT_TYPE, "application/pem-certificate-chain"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn ca_cert(State(s): State<Arc<HttpState>>, Path(file): Path<String>) -> Response {
    let Some(id) = file.strip_suffix(".crt").and_then(IssuerId::parse) else {
        return (StatusCode::NOT_FOUND, "unknown issuer\n").into_response();
    };
    let der = if let Some(root) = s.roots.iter().find(|r| r.id == id) {
        Some(root.der.clone())
    } else {
        match s.authority.store().issuer(id.as_str()).await {
            Ok(row) => row.map(|r| r.cert_der),
            Err(e) => {
                tracing::error!(error = %e, "issuer lookup failed");
                return (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response();
            }
        }
    };
    match der {
        Some(der) => (
            [
                (header::CONTENT_TYPE, "application/pkix-cert"),
                (header::CACHE_CONTROL, "public, max-age=3600"),
            ],
            der,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "unknown issuer\n").into_response(),
    }
}
