//! The plain-HTTP surface: health, readiness, trust anchors, issuer certificates.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sigil_authority::{Authority, pem};
use sigil_core::{Clock, IssuerId, IssuerInfo, SystemClock};
use std::sync::Arc;

/// Shared state of the HTTP routes.
pub struct HttpState {
    /// The authority (store and active issuer).
    pub authority: Arc<Authority>,
    /// Configured roots.
    pub roots: Vec<IssuerInfo>,
}

/// Builds the router.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/roots.pem", get(roots_pem))
        .route("/bundle.pem", get(bundle_pem))
        .route("/ca/{file}", get(ca_cert))
        .with_state(state)
}

async fn readyz(State(s): State<Arc<HttpState>>) -> Response {
    if let Err(e) = s.authority.store().ping().await {
        tracing::warn!(error = %e, "readiness: database unreachable");
        return (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n").into_response();
    }
    let issuer = s.authority.active_issuer();
    if issuer.info().not_after <= SystemClock.now() {
        return (StatusCode::SERVICE_UNAVAILABLE, "issuing CA expired\n").into_response();
    }
    "ready\n".into_response()
}

async fn roots_pem(State(s): State<Arc<HttpState>>) -> Response {
    let body: String = s.roots.iter().map(|r| pem("CERTIFICATE", &r.der)).collect();
    (
        [(header::CONTENT_TYPE, "application/pem-certificate-chain")],
        body,
    )
        .into_response()
}

/// Roots, then every issuer relying parties should accept now: staged (so
/// peers trust it before it issues), active, and previous ones. Roots alone
/// stay at /roots.pem: trusting an intermediate as an anchor would outlive
/// its revocation by the root.
async fn bundle_pem(State(s): State<Arc<HttpState>>) -> Response {
    let issuers = match s.authority.trusted_issuers().await {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "issuer lookup failed");
            return (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n").into_response();
        }
    };
    let body: String = s
        .roots
        .iter()
        .map(|r| pem("CERTIFICATE", &r.der))
        .chain(issuers.iter().map(|der| pem("CERTIFICATE", der)))
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
