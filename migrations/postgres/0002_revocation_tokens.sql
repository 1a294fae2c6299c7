-- Revocations and one-time bootstrap tokens.

-- One row per revoked certificate. Rows are never updated or deleted: a
-- revocation is final (RFC 5280 has no un-revoke except certificateHold,
-- which Sigil does not issue).
CREATE TABLE revocations (
    serial     TEXT PRIMARY KEY REFERENCES certificates(serial),
    issuer_id  TEXT NOT NULL REFERENCES issuers(id),
    reason     BIGINT NOT NULL CHECK (reason BETWEEN 0 AND 5 OR reason IN (9, 10)),
    revoked_at BIGINT NOT NULL,
    revoked_by TEXT NOT NULL,
    -- The seq of the audit row recording it: increases in commit order, so
    -- readers can follow new revocations without trusting node clocks.
    audit_seq  BIGINT NOT NULL UNIQUE
);
CREATE INDEX revocations_issuer ON revocations (issuer_id, revoked_at);

CREATE FUNCTION revocations_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'revocations are final';
END;
$$;
CREATE TRIGGER revocations_final BEFORE UPDATE OR DELETE ON revocations
    FOR EACH ROW EXECUTE FUNCTION revocations_final();
CREATE TRIGGER revocations_no_truncate BEFORE TRUNCATE ON revocations
    FOR EACH STATEMENT EXECUTE FUNCTION revocations_final();

-- Bootstrap-token ids (jti) already spent: a token is accepted once.
CREATE TABLE used_tokens (
    jti        TEXT PRIMARY KEY,
    subject    TEXT NOT NULL,
    used_at    BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
