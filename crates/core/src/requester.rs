//! Who asks for a certificate. Later entry points (gRPC, ACME) supply these.

use std::fmt;

/// The authenticated identity behind a request, as the policy engine sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Requester {
    /// A local operator using the admin CLI.
    Operator(String),
    /// The subject of a bootstrap token.
    Token(String),
    /// The identity of an mTLS client certificate (SPIFFE URI or DNS name).
    Mtls(String),
    /// An ACME account without external binding.
    AcmeAccount(String),
    /// An ACME account bound to an external-account (EAB) key id.
    Eab(String),
}

impl Requester {
    /// The selector kind used in policy files (`operator`, `token`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Requester::Operator(_) => "operator",
            Requester::Token(_) => "token",
            Requester::Mtls(_) => "mtls",
            Requester::AcmeAccount(_) => "acme",
            Requester::Eab(_) => "eab",
        }
    }

    /// The identity within its kind.
    pub fn name(&self) -> &str {
        match self {
            Requester::Operator(n)
            | Requester::Token(n)
            | Requester::Mtls(n)
            | Requester::AcmeAccount(n)
            | Requester::Eab(n) => n,
        }
    }

    /// Parses `kind:name` as printed by `Display`.
    pub fn parse(s: &str) -> Option<Requester> {
        let (kind, name) = s.split_once(':').unwrap_or((s, ""));
        let name = name.to_string();
        Some(match kind {
            "operator" => Requester::Operator(name),
            "token" => Requester::Token(name),
            "mtls" => Requester::Mtls(name),
            "acme" => Requester::AcmeAccount(name),
            "eab" => Requester::Eab(name),
            _ => return None,
        })
    }
}

impl fmt::Display for Requester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind(), self.name())
    }
}
