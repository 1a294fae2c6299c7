-- Pre-signed OCSP responses, stored compactly. Every response a responder
-- signs ends with the same certificates (the responder's and its issuer's,
-- about four fifths of the bytes), so they are stored once, in ocsp_certs,
-- and a response row keeps the bytes before them and names them by digest.
-- Responses stored before this change keep their whole bytes (certs NULL);
-- the next pre-signing pass replaces them.
CREATE TABLE ocsp_certs (
    digest  TEXT PRIMARY KEY,   -- hex SHA-256 of der
    der     BYTEA NOT NULL,     -- the certs field: [0] EXPLICIT SEQUENCE OF Certificate
    used_at BIGINT NOT NULL     -- unix s, when responses naming it were last stored
);
ALTER TABLE ocsp_responses ADD COLUMN certs TEXT;
CREATE INDEX ocsp_certs_used ON ocsp_certs (used_at);
