-- Intermediate rotation with overlap. An issuer is staged (installed, not yet
-- issuing), active (the one issuer taking new issuance), previous (no new
-- issuance; still answers OCSP and publishes CRLs for its certificates) or
-- retired (its last certificate expired).
ALTER TABLE issuers ADD COLUMN state TEXT NOT NULL DEFAULT 'staged'
    CHECK (state IN ('staged', 'active', 'previous', 'retired'));
UPDATE issuers SET state = status;
ALTER TABLE issuers DROP COLUMN status;
ALTER TABLE issuers RENAME COLUMN state TO status;
CREATE UNIQUE INDEX issuers_one_active ON issuers (status) WHERE status = 'active';

-- Where the issuer's key is: a file name in the key directory, or NULL for
-- the configured ca.intermediate_key.
ALTER TABLE issuers ADD COLUMN key_ref TEXT;
-- When a staged issuer takes over issuance (unix s), once scheduled.
ALTER TABLE issuers ADD COLUMN activate_at BIGINT;
-- Last state change (unix s).
ALTER TABLE issuers ADD COLUMN changed_at BIGINT;
