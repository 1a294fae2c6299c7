-- Revocations and one-time bootstrap tokens.

-- One row per revoked certificate. Rows are never updated or deleted: a
-- revocation is final (RFC 5280 has no un-revoke except certificateHold,
-- which Sigil does not issue).
CREATE TABLE revocations (
    serial     TEXT PRIMARY KEY REFERENCES certificates(serial),
    issuer_id  TEXT NOT NULL REFERENCES issuers(id),
    reason     INTEGER NOT NULL CHECK (reason BETWEEN 0 AND 5 OR reason IN (9, 10)),
    revoked_at INTEGER NOT NULL,
    revoked_by TEXT NOT NULL,
    -- The seq of the audit row recording it: increases in commit order, so
    -- readers can follow new revocations without trusting node clocks.
    audit_seq  INTEGER NOT NULL UNIQUE
);
CREATE INDEX revocations_issuer ON revocations (issuer_id, revoked_at);

CREATE TRIGGER revocations_final_update BEFORE UPDATE ON revocations
BEGIN
    SELECT RAISE(ABORT, 'revocations are final');
END;
CREATE TRIGGER revocations_final_delete BEFORE DELETE ON revocations
BEGIN
    SELECT RAISE(ABORT, 'revocations are final');
END;

-- Bootstrap-token ids (jti) already spent: a token is accepted once.
CREATE TABLE used_tokens (
    jti        TEXT PRIMARY KEY,
    subject    TEXT NOT NULL,
    used_at    INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
