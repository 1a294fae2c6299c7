-- The certificate a bootstrap token was spent on: a holder whose reply was
-- lost may ask again with the same key and names and get that certificate,
-- instead of a replay refusal. NULL for tokens spent before this column.
ALTER TABLE used_tokens ADD COLUMN serial TEXT;
