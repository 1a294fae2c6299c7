-- For the retention job, which deletes ACME orders and authorizations and
-- spent bootstrap tokens some time after they expired. Orders and
-- authorizations are found by creation time (an expiry is never before it),
-- which never changes: an authorization's expiry moves when it is validated,
-- and an index on it would move with it.
CREATE INDEX acme_orders_created ON acme_orders (created_at);
CREATE INDEX acme_authzs_created ON acme_authzs (created_at);
CREATE INDEX used_tokens_expiry ON used_tokens (expires_at);
