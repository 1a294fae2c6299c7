-- Pre-signed OCSP responses, stored compactly, in a new table. Every
-- response a responder signs ends with the same certificates (the
-- responder's and its issuer's, about four fifths of the bytes), so they are
-- stored once, in ocsp_certs, and an answer row keeps the bytes before them
-- and names them by digest. A pass stores answers in serial order; keyed by
-- serial alone (WITHOUT ROWID), each batch then rewrites a run of
-- neighbouring pages instead of a page per answer.
-- ocsp_responses is no longer written or loaded (nor copied by `sigil db
-- migrate`): copying a large CA's rows would hold up the start for minutes,
-- and they are only a cache. Its rows expire within the response validity,
-- and the retention pass deletes them keep_expired later.
CREATE TABLE ocsp_certs (
    digest  TEXT PRIMARY KEY,   -- hex SHA-256 of der
    der     BLOB NOT NULL,      -- the certs field: [0] EXPLICIT SEQUENCE OF Certificate
    used_at INTEGER NOT NULL    -- unix s, when answers naming it were last stored
);
CREATE INDEX ocsp_certs_used ON ocsp_certs (used_at);
CREATE TABLE ocsp_answers (
    serial      TEXT NOT NULL PRIMARY KEY,
    issuer_id   TEXT NOT NULL,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    der         BLOB NOT NULL,  -- the response, or with certs the bytes before them
    certs       TEXT,           -- ocsp_certs.digest of the rest; NULL: der is whole
    stored_at   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX ocsp_answers_issuer ON ocsp_answers (issuer_id, next_update);
CREATE INDEX ocsp_answers_stored ON ocsp_answers (issuer_id, stored_at);
