-- Pre-signed OCSP responses, stored compactly, in a new table. Every
-- response a responder signs ends with the same certificates (the
-- responder's and its issuer's, about four fifths of the bytes), so they are
-- stored once, in ocsp_certs, and an answer row keeps the bytes before them
-- and names them by digest.
-- ocsp_responses is no longer written or loaded by this version (nor copied
-- by `sigil db migrate`). Nodes still on the previous one (a rolling
-- upgrade) keep using it, so neither kind reads bytes in the other's form;
-- until every node runs this version, each signs on demand what the other
-- stored. Its rows expire within the response validity, and the retention
-- pass deletes them keep_expired later.
CREATE TABLE ocsp_certs (
    digest  TEXT PRIMARY KEY,   -- hex SHA-256 of der
    der     BYTEA NOT NULL,     -- the certs field: [0] EXPLICIT SEQUENCE OF Certificate
    used_at BIGINT NOT NULL     -- unix s, when answers naming it were last stored
);
CREATE INDEX ocsp_certs_used ON ocsp_certs (used_at);
CREATE TABLE ocsp_answers (
    serial      TEXT PRIMARY KEY,
    issuer_id   TEXT NOT NULL,
    this_update BIGINT NOT NULL,
    next_update BIGINT NOT NULL,
    der         BYTEA NOT NULL, -- the response, or with certs the bytes before them
    certs       TEXT,           -- ocsp_certs.digest of the rest; NULL: der is whole
    stored_at   BIGINT NOT NULL
);
CREATE INDEX ocsp_answers_issuer ON ocsp_answers (issuer_id, next_update);
CREATE INDEX ocsp_answers_stored ON ocsp_answers (issuer_id, stored_at);
