//! RFC 7807 problem documents with the RFC 8555 error types.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An ACME error: its `urn:ietf:params:acme:error:` type, HTTP status and a
/// detail a person can act on.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The error name after `urn:ietf:params:acme:error:`.
    pub kind: &'static str,
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable explanation.
    pub detail: String,
    /// Per-identifier problems.
    pub subproblems: Vec<Subproblem>,
    /// Seconds a client should wait (`rateLimited`, busy).
    pub retry_after: Option<u64>,
    /// For `badSignatureAlgorithm`: what is accepted.
    pub algorithms: Option<&'static [&'static str]>,
}

/// A problem about one identifier.
#[derive(Debug, Clone)]
pub struct Subproblem {
    /// Error name.
    pub kind: &'static str,
    /// Explanation.
    pub detail: String,
    /// `(type, value)` of the identifier.
    pub identifier: (String, String),
}

macro_rules! problems {
    ($($fn_name:ident => $kind:literal, $status:ident;)*) => {
        impl Problem {
            $(
                #[doc = concat!("`", $kind, "`")]
                pub fn $fn_name(detail: impl Into<String>) -> Problem {
                    Problem::new($kind, StatusCode::$status, detail)
                }
            )*
        }
    };
}

problems! {
    malformed => "malformed", BAD_REQUEST;
    unauthorized => "unauthorized", FORBIDDEN;
    bad_nonce => "badNonce", BAD_REQUEST;
    bad_signature_algorithm => "badSignatureAlgorithm", BAD_REQUEST;
    bad_public_key => "badPublicKey", BAD_REQUEST;
    account_does_not_exist => "accountDoesNotExist", BAD_REQUEST;
    external_account_required => "externalAccountRequired", UNAUTHORIZED;
    rejected_identifier => "rejectedIdentifier", BAD_REQUEST;
    unsupported_identifier => "unsupportedIdentifier", BAD_REQUEST;
    bad_csr => "badCSR", BAD_REQUEST;
    order_not_ready => "orderNotReady", FORBIDDEN;
    already_revoked => "alreadyRevoked", BAD_REQUEST;
    bad_revocation_reason => "badRevocationReason", BAD_REQUEST;
    server_internal => "serverInternal", INTERNAL_SERVER_ERROR;
    connection => "connection", BAD_REQUEST;
    dns => "dns", BAD_REQUEST;
    incorrect_response => "incorrectResponse", FORBIDDEN;
    tls => "tls", BAD_REQUEST;
    unsupported_contact => "unsupportedContact", BAD_REQUEST;
    invalid_contact => "invalidContact", BAD_REQUEST;
    invalid_profile => "invalidProfile", BAD_REQUEST;
    already_replaced => "alreadyReplaced", CONFLICT;
    rate_limited => "rateLimited", TOO_MANY_REQUESTS;
}

impl Problem {
    /// `unauthorized` with 401: a request from a deactivated (or revoked)
    /// account (RFC 8555 §7.3.6).
    pub fn account_not_valid(detail: impl Into<String>) -> Problem {
        Problem::new("unauthorized", StatusCode::UNAUTHORIZED, detail)
    }

    /// A problem of any type.
    pub fn new(kind: &'static str, status: StatusCode, detail: impl Into<String>) -> Problem {
        Problem {
            kind,
            status,
            detail: detail.into(),
            subproblems: Vec::new(),
            retry_after: None,
            algorithms: None,
        }
    }

    /// Not found (a plain 404 with a malformed-type problem, as RFC 8555 has no type for it).
    pub fn not_found(what: impl Into<String>) -> Problem {
        Problem::new("malformed", StatusCode::NOT_FOUND, what)
    }

    /// The CA cannot serve the request right now.
    pub fn unavailable(detail: impl Into<String>) -> Problem {
        let mut p = Problem::new("serverInternal", StatusCode::SERVICE_UNAVAILABLE, detail);
        p.retry_after = Some(5);
        p
    }

    /// The full `type` URN.
    pub fn type_urn(&self) -> String {
        format!("urn:ietf:params:acme:error:{}", self.kind)
    }

    /// The JSON document (also used inside orders, authorizations, challenges).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = json!({
            "type": self.type_urn(),
            "detail": self.detail,
            "status": self.status.as_u16(),
        });
        if !self.subproblems.is_empty() {
            v["subproblems"] = self
                .subproblems
                .iter()
                .map(|s| {
                    json!({
                        "type": format!("urn:ietf:params:acme:error:{}", s.kind),
                        "detail": s.detail,
                        "identifier": {"type": s.identifier.0, "value": s.identifier.1},
                    })
                })
                .collect();
        }
        if let Some(algs) = self.algorithms {
            v["algorithms"] = json!(algs);
        }
        v
    }
}

impl From<sigil_store::Error> for Problem {
    fn from(e: sigil_store::Error) -> Problem {
        tracing::error!(error = %e, "ACME storage error");
        Problem::unavailable("the CA's database is unavailable; retry shortly")
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = self.to_json().to_string();
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}
