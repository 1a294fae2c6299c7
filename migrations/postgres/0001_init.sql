-- Sigil schema (PostgreSQL). Times are unix seconds unless named *_ms.

CREATE TABLE issuers (
    id           TEXT PRIMARY KEY,
    cert_der     BYTEA NOT NULL,
    subject      TEXT NOT NULL,
    not_before   BIGINT NOT NULL,
    not_after    BIGINT NOT NULL,
    installed_at BIGINT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('active', 'retired'))
);

CREATE TABLE certificates (
    serial          TEXT PRIMARY KEY,
    issuer_id       TEXT NOT NULL REFERENCES issuers(id),
    profile         TEXT NOT NULL,
    requester       TEXT NOT NULL,
    names           TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    not_before      BIGINT NOT NULL,
    not_after       BIGINT NOT NULL,
    issued_at       BIGINT NOT NULL,
    der             BYTEA NOT NULL
);
CREATE INDEX certificates_not_after ON certificates (not_after);

-- Append-only, hash-chained audit log: each row carries the SHA-256 of the
-- previous row. The database itself refuses UPDATE, DELETE and TRUNCATE.
CREATE TABLE audit (
    seq       BIGINT PRIMARY KEY,
    ts_ms     BIGINT NOT NULL,
    kind      TEXT NOT NULL,
    actor     TEXT NOT NULL,
    subject   TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);

CREATE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit table is append-only';
END;
$$;

-- Rows may only be appended at the head of the chain.
CREATE FUNCTION audit_check_append() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    head_seq  BIGINT;
    head_hash TEXT;
BEGIN
    SELECT seq, hash INTO head_seq, head_hash FROM audit ORDER BY seq DESC LIMIT 1;
    IF NEW.seq <> COALESCE(head_seq, 0) + 1
       OR NEW.prev_hash <> COALESCE(head_hash, repeat('0', 64)) THEN
        RAISE EXCEPTION 'audit table is append-only: rows must extend the chain head';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER audit_append_only BEFORE INSERT ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_check_append();
CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- Roles other than the owner may only read and append.
REVOKE UPDATE, DELETE, TRUNCATE ON audit FROM PUBLIC;
