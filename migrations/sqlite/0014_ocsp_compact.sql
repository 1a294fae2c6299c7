-- Pre-signed OCSP responses, stored compactly. Every response a responder
-- signs ends with the same certificates (the responder's and its issuer's,
-- about four fifths of the bytes), so they are stored once, in ocsp_certs,
-- and a response row keeps the bytes before them and names them by digest.
-- A pass stores responses in serial order; keyed by serial alone (WITHOUT
-- ROWID), each batch then rewrites a run of neighbouring pages instead of a
-- page per response. The responses stored before this change are dropped,
-- not copied: copying a large CA's took minutes at start-up. Until the first
-- pre-signing pass after the upgrade (seconds to a minute), answers are
-- signed on demand.
CREATE TABLE ocsp_certs (
    digest  TEXT PRIMARY KEY,   -- hex SHA-256 of der
    der     BLOB NOT NULL,      -- the certs field: [0] EXPLICIT SEQUENCE OF Certificate
    used_at INTEGER NOT NULL    -- unix s, when responses naming it were last stored
);
CREATE TABLE ocsp_responses_compact (
    serial      TEXT NOT NULL PRIMARY KEY,
    issuer_id   TEXT NOT NULL,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    der         BLOB NOT NULL,  -- the response, or with certs the bytes before them
    certs       TEXT,           -- ocsp_certs.digest of the rest; NULL: der is whole
    stored_at   INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
DROP TABLE ocsp_responses;
ALTER TABLE ocsp_responses_compact RENAME TO ocsp_responses;
CREATE INDEX ocsp_responses_issuer ON ocsp_responses (issuer_id, next_update);
CREATE INDEX ocsp_responses_stored ON ocsp_responses (issuer_id, stored_at);
CREATE INDEX ocsp_certs_used ON ocsp_certs (used_at);
