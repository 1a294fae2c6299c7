-- For the retention job, which deletes ACME orders and authorizations and
-- spent bootstrap tokens some time after they expired. Orders by expiry
-- (set when made, and moved once when an order replacing a certificate is
-- finalized). Authorizations by creation time (an expiry is never before
-- it), which never changes: an authorization's expiry moves when it is
-- validated, and an index on it would move with it.
CREATE INDEX acme_orders_expiry ON acme_orders (expires_at);
CREATE INDEX acme_authzs_created ON acme_authzs (created_at);
CREATE INDEX used_tokens_expiry ON used_tokens (expires_at);
