use thiserror::Error;

/// Why an authority operation failed. Entry points map these to their own
/// error formats (CLI text, gRPC status, ACME problem) in one place each.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The CSR is unusable.
    #[error(transparent)]
    Csr(#[from] sigil_core::CsrError),
    /// The policy refused; `reason` names the identifier and rule.
    #[error("policy denied the request: {reason}")]
    Denied {
        /// One-sentence reason.
        reason: String,
        /// The full decision, for explanations.
        decision: sigil_policy::Decision,
    },
    /// A name the issuing CA itself may not certify.
    #[error("{0}")]
    OutsideConstraints(String),
    /// A lifetime outside what the CA allows.
    #[error("{0}")]
    Lifetime(String),
    /// The presented bootstrap token does not cover the requested names.
    #[error("{0}")]
    TokenScope(String),
    /// The bootstrap token was already spent.
    #[error("{0}")]
    TokenReplayed(String),
    /// The certificate cannot be renewed, whatever is asked (revoked,
    /// expired, not ours, unreadable).
    #[error("{0}")]
    NotRenewable(String),
    /// A renewal's CSR names other identifiers than the certificate.
    #[error("{0}")]
    NamesChanged(String),
    /// A revocation request that cannot be carried out as asked.
    #[error("{0}")]
    InvalidRevocation(String),
    /// The key was revoked for keyCompromise and may not be certified again.
    #[error("{0}")]
    KeyCompromised(String),
    /// The certificate was already revoked.
    #[error("{0}")]
    AlreadyRevoked(String),
    /// No such certificate.
    #[error("{0}")]
    NotFound(String),
    /// The CA cannot issue right now.
    #[error("CA unavailable: {0}")]
    Unavailable(String),
    /// Misconfiguration detected at startup.
    #[error("configuration: {0}")]
    Config(String),
    /// The requester used up its issuance budget; retry after the delay.
    #[error("{message}")]
    RateLimited {
        /// What to tell the caller.
        message: String,
        /// Seconds until the next issuance is allowed.
        retry_after: u64,
    },
    /// An issuer lifecycle step out of order (activating what is not staged,
    /// staging an issuer already in use).
    #[error("{0}")]
    Rotation(String),
    /// Storage failed; nothing was issued.
    #[error(transparent)]
    Store(#[from] sigil_store::Error),
    /// Key or signing failure.
    #[error(transparent)]
    Signer(#[from] sigil_signer::Error),
    /// Template or certificate self-check failure (never released).
    #[error("internal certificate check failed: {0}")]
    Internal(#[from] sigil_core::Error),
}

impl Error {
    /// Whether the store is shutting down (the caller may retry elsewhere).
    pub fn is_shutting_down(&self) -> bool {
        matches!(self, Error::Store(sigil_store::Error::Closed))
    }
}
