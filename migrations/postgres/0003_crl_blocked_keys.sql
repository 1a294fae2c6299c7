-- CRLs and keys blocked after a keyCompromise revocation.

-- The last CRL number handed out per issuer: numbers only grow, also when
-- several nodes publish (each takes the next one atomically).
CREATE TABLE crl_numbers (
    issuer_id TEXT PRIMARY KEY REFERENCES issuers(id),
    last      BIGINT NOT NULL
);

-- The newest CRL per issuer, as served at /crl/<issuer>.crl.
CREATE TABLE crls (
    issuer_id   TEXT PRIMARY KEY,
    number      BIGINT NOT NULL,
    this_update BIGINT NOT NULL,
    next_update BIGINT NOT NULL,
    der         BYTEA NOT NULL
);

-- Public keys (SHA-256 of the SubjectPublicKeyInfo) that may never be
-- certified again.
CREATE TABLE blocked_keys (
    fingerprint TEXT PRIMARY KEY,
    serial      TEXT NOT NULL REFERENCES certificates(serial),
    blocked_at  BIGINT NOT NULL
);
