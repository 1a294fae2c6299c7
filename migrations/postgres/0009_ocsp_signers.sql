-- The delegated OCSP responder of each issuer, made and rotated by the node
-- holding the job lock and used by every node. Its private key is either
-- sealed (encrypted PKCS#8, with the intermediate key's passphrase) or a
-- persistent object in the issuer's PKCS#11 token (its label).
CREATE TABLE ocsp_signers (
    issuer_id  TEXT PRIMARY KEY,
    serial     TEXT NOT NULL,
    cert_der   BYTEA NOT NULL,
    key_kind   TEXT NOT NULL CHECK (key_kind IN ('sealed', 'pkcs11')),
    key_data   BYTEA NOT NULL,
    not_after  BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
