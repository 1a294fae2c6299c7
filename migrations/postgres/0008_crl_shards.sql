-- Time-sharded CRLs (opt-in, `[revocation] crl_shards`): each certificate is
-- assigned a shard by its notAfter at issuance and its CRL DP names that
-- shard's CRL. NULL: the issuer's full CRL only.
ALTER TABLE certificates ADD COLUMN crl_shard BIGINT;
CREATE INDEX certificates_crl_shard ON certificates (issuer_id, crl_shard);

-- The newest CRL per issuer and shard, as served at /crl/<issuer>/<shard>.crl.
-- Numbers come from crl_numbers, shared with the issuer's full CRL.
CREATE TABLE crl_shards (
    issuer_id   TEXT NOT NULL,
    shard       BIGINT NOT NULL,
    number      BIGINT NOT NULL,
    this_update BIGINT NOT NULL,
    next_update BIGINT NOT NULL,
    der         BYTEA NOT NULL,
    PRIMARY KEY (issuer_id, shard)
);
