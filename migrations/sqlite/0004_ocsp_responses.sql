-- Pre-signed OCSP responses, newest per certificate: a restarted node answers
-- from here at once instead of waiting for a full re-signing pass.
CREATE TABLE ocsp_responses (
    serial      TEXT PRIMARY KEY,
    issuer_id   TEXT NOT NULL,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    der         BLOB NOT NULL
);
CREATE INDEX ocsp_responses_issuer ON ocsp_responses (issuer_id, next_update);
