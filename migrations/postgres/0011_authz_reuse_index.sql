-- The authorization-reuse index holds the account and the name only. With
-- status and expiry in it, every status change of an authorization
-- (pending to valid, for one) moved its index entry; now the entry stays
-- put, and the few rows per account and name are filtered as they are read.
DROP INDEX acme_authzs_reuse;
CREATE INDEX acme_authzs_reuse ON acme_authzs (account_id, identifier);
