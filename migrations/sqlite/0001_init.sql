-- Sigil schema (SQLite). Times are unix seconds unless named *_ms.

CREATE TABLE issuers (
    id           TEXT PRIMARY KEY,
    cert_der     BLOB NOT NULL,
    subject      TEXT NOT NULL,
    not_before   INTEGER NOT NULL,
    not_after    INTEGER NOT NULL,
    installed_at INTEGER NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('active', 'retired'))
);

CREATE TABLE certificates (
    serial          TEXT PRIMARY KEY,
    issuer_id       TEXT NOT NULL REFERENCES issuers(id),
    profile         TEXT NOT NULL,
    requester       TEXT NOT NULL,
    names           TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    not_before      INTEGER NOT NULL,
    not_after       INTEGER NOT NULL,
    issued_at       INTEGER NOT NULL,
    der             BLOB NOT NULL
);
CREATE INDEX certificates_not_after ON certificates (not_after);

-- Append-only, hash-chained audit log: each row carries the SHA-256 of the
-- previous row. The database itself refuses UPDATE and DELETE.
CREATE TABLE audit (
    seq       INTEGER PRIMARY KEY,
    ts_ms     INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    actor     TEXT NOT NULL,
    subject   TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);

-- Rows may only be appended at the head of the chain: this also stops
-- INSERT OR REPLACE from rewriting an existing row.
CREATE TRIGGER audit_append_only BEFORE INSERT ON audit
WHEN NEW.seq <> (SELECT COALESCE(MAX(seq), 0) + 1 FROM audit)
  OR NEW.prev_hash <> COALESCE(
        (SELECT hash FROM audit ORDER BY seq DESC LIMIT 1),
        '0000000000000000000000000000000000000000000000000000000000000000')
BEGIN
    SELECT RAISE(ABORT, 'audit table is append-only: rows must extend the chain head');
END;

CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit table is append-only');
END;

CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit table is append-only');
END;
