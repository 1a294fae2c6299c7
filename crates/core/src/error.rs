use thiserror::Error;

/// Why a name (DNS, IP, URI, email) was rejected during normalization.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty or consists only of a dot.
    #[error("empty name")]
    Empty,
    /// The name is longer than DNS allows.
    #[error("name '{0}' is longer than 253 characters")]
    TooLong(String),
    /// A wildcard appears somewhere other than as the whole leftmost label.
    #[error("name '{0}': a wildcard is only allowed as the whole leftmost label ('*.example.com')")]
    BadWildcard(String),
    /// IDNA processing or hostname syntax rejected the name.
    #[error(
        "name '{0}' is not a valid DNS hostname (letters, digits and hyphens per label, IDNA for unicode)"
    )]
    InvalidDns(String),
    /// An IP address was given where a DNS name is expected.
    #[error("'{0}' is an IP address; request it as an IP SAN, not a DNS name")]
    IpInDns(String),
    /// A URI SAN that is not a well-formed SPIFFE ID.
    #[error("URI '{0}' is not a valid SPIFFE ID (spiffe://trust-domain/path): {1}")]
    InvalidUri(String, &'static str),
    /// An email SAN that is not `local@domain`.
    #[error("email '{0}' is not a valid address")]
    InvalidEmail(String),
    /// A raw IP SAN of the wrong length.
    #[error("IP SAN of {0} bytes: must be 4 (IPv4) or 16 (IPv6)")]
    BadIpLength(usize),
}

/// Why a certificate signing request was refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CsrError {
    /// Input larger than the limit.
    #[error("CSR is {0} bytes; the limit is {1} bytes")]
    TooLarge(usize, usize),
    /// Neither valid PEM nor DER.
    #[error("CSR is not PKCS#10 in PEM or DER: {0}")]
    Malformed(String),
    /// The self-signature does not verify.
    #[error(
        "CSR signature does not verify with its own public key (the CSR was altered or signed with another key)"
    )]
    BadSignature,
    /// Signature algorithm Sigil does not accept.
    #[error(
        "CSR signature algorithm {0} is not supported (use ECDSA with SHA-256/384/512, Ed25519, or RSA PKCS#1 v1.5 with SHA-256/384/512)"
    )]
    UnsupportedSignatureAlgorithm(String),
    /// Public key algorithm or curve Sigil does not accept.
    #[error(
        "CSR public key {0} is not supported (use ECDSA P-256/P-384, Ed25519, or RSA 2048-8192)"
    )]
    UnsupportedKey(String),
    /// RSA key outside the accepted size.
    #[error("CSR RSA key is {0} bits; Sigil requires 2048 to 8192 bits")]
    RsaKeySize(usize),
    /// An extension appears twice.
    #[error("CSR requests extension {0} more than once")]
    DuplicateExtension(String),
    /// The extension request attribute appears twice.
    #[error("CSR has more than one extensionRequest attribute")]
    DuplicateExtensionRequest,
    /// An extension that cannot be decoded.
    #[error("CSR extension {0} is malformed: {1}")]
    MalformedExtension(String, String),
    /// A subjectAltName type Sigil does not issue.
    #[error(
        "CSR subjectAltName contains a {0}; Sigil issues only DNS, IP, URI (SPIFFE) and email names"
    )]
    UnsupportedSan(&'static str),
    /// A name in the CSR failed normalization.
    #[error("CSR name rejected: {0}")]
    Name(#[from] NameError),
    /// No identifiers at all.
    #[error("CSR names no identity: put names in subjectAltName (or the subject CN)")]
    NoIdentifiers,
    /// Too many identifiers.
    #[error("CSR names {0} identities; the limit is {1}")]
    TooManyIdentifiers(usize, usize),
}

/// Errors from the rest of the domain layer.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A malformed duration string.
    #[error("invalid duration '{0}': use forms like 15m, 24h, 90d, 3y (at most 100y)")]
    Duration(String),
    /// A malformed distinguished-name string.
    #[error("invalid subject '{0}': {1}")]
    Subject(String, String),
    /// An unknown profile name.
    #[error("unknown profile '{0}' (known: mtls, server, client)")]
    Profile(String),
    /// An unknown key type name.
    #[error("unknown key type '{0}' (known: ecdsa-p256, ecdsa-p384, ed25519, rsa-3072, rsa-4096)")]
    KeySpec(String),
    /// A certificate that cannot be parsed.
    #[error("certificate could not be parsed: {0}")]
    Certificate(String),
    /// A template that fails its own profile check (a bug, never signed).
    #[error("certificate template failed its profile check: {0}")]
    Template(String),
    /// A name problem.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A CSR problem.
    #[error(transparent)]
    Csr(#[from] CsrError),
}
