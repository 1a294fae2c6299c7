//! Sigil's naming policy: which requester may get which names, for how long,
//! with which profiles and key types. Deny wins; every decision says why.
//!
//! Policies are TOML files (`policies/*.toml`), each holding `[[rule]]` tables:
//!
//! ```toml
//! [[rule]]
//! name = "payments-services"
//! effect = "allow"                       # or "deny"
//! requesters = ["mtls:spiffe://corp/ns/payments/*", "token:payments-*"]
//! dns = ["*.payments.svc.internal", ".payments.internal", "api.corp.internal"]
//! ip = ["10.20.0.0/16"]
//! uri = ["spiffe://corp/ns/payments/sa/*"]
//! max_lifetime = "72h"
//! profiles = ["mtls", "server"]
//! key_types = ["ecdsa-p256", "ed25519", "rsa-3072"]
//! ```

mod error;
mod pattern;
mod rules;

pub use error::Error;
pub use pattern::{DnsPattern, RequesterSelector, UriPattern};
pub use rules::{Decision, Effect, Finding, Outcome, Policy, Request, Rule, sources_digest};
