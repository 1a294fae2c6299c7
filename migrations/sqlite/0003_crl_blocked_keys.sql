-- CRLs and keys blocked after a keyCompromise revocation.

-- The last CRL number handed out per issuer: numbers only grow, also when
-- several nodes publish (each takes the next one atomically).
CREATE TABLE crl_numbers (
    issuer_id TEXT PRIMARY KEY REFERENCES issuers(id),
    last      INTEGER NOT NULL
);

-- The newest CRL per issuer, as served at /crl/<issuer>.crl.
CREATE TABLE crls (
    issuer_id   TEXT PRIMARY KEY,
    number      INTEGER NOT NULL,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    der         BLOB NOT NULL
);

-- Public keys (SHA-256 of the SubjectPublicKeyInfo) that may never be
-- certified again.
CREATE TABLE blocked_keys (
    fingerprint TEXT PRIMARY KEY,
    serial      TEXT NOT NULL REFERENCES certificates(serial),
    blocked_at  INTEGER NOT NULL
);
