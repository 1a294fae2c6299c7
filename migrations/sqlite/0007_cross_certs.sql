-- Cross-certificates between roots (`sigil root cross-sign`, installed with
-- `sigil cross-cert install`): during a root rotation they give clients that
-- trust only one of the roots a path to the other's intermediates.
CREATE TABLE cross_certs (
    id           TEXT PRIMARY KEY,
    der          BLOB NOT NULL,
    subject      TEXT NOT NULL,
    issuer       TEXT NOT NULL,
    not_after    INTEGER NOT NULL,
    installed_at INTEGER NOT NULL
);
