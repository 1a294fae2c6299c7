-- ACME (RFC 8555) state shared by every node: accounts, EAB keys, orders,
-- authorizations, spent nonces and renewal hints.

-- Server secrets shared by the nodes (the nonce MAC key), created once.
CREATE TABLE acme_secrets (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

-- Nonces already accepted: a nonce is valid once, on any node.
CREATE TABLE acme_nonces (
    nonce      TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
CREATE INDEX acme_nonces_expiry ON acme_nonces (expires_at);

-- External-account-binding keys (`sigil acme eab create`). A key binds one account.
CREATE TABLE acme_eab_keys (
    kid        TEXT PRIMARY KEY,
    hmac_key   BLOB NOT NULL,
    requester  TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    account_id TEXT UNIQUE
);

CREATE TABLE acme_accounts (
    id         TEXT PRIMARY KEY,
    thumbprint TEXT NOT NULL UNIQUE,
    jwk        TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('valid', 'deactivated', 'revoked')),
    contact    TEXT NOT NULL,
    requester  TEXT NOT NULL,
    eab_kid    TEXT,
    created_at INTEGER NOT NULL
);

CREATE TABLE acme_orders (
    id         TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES acme_accounts(id),
    status     TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX acme_orders_account ON acme_orders (account_id, created_at);

CREATE TABLE acme_authzs (
    id         TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES acme_accounts(id),
    identifier TEXT NOT NULL,
    status     TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX acme_authzs_reuse ON acme_authzs (account_id, identifier, status, expires_at);

-- Operator requests to renew early (ARI): per certificate serial or per issuer.
CREATE TABLE acme_renewal_hints (
    scope      TEXT PRIMARY KEY,
    renew_by   INTEGER NOT NULL,
    set_at     INTEGER NOT NULL
);
