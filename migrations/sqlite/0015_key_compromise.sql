-- A blocked key stays blocked, like the revocation that blocked it.
CREATE TRIGGER blocked_keys_final_update BEFORE UPDATE ON blocked_keys
BEGIN
    SELECT RAISE(ABORT, 'blocked keys stay blocked');
END;
CREATE TRIGGER blocked_keys_final_delete BEFORE DELETE ON blocked_keys
BEGIN
    SELECT RAISE(ABORT, 'blocked keys stay blocked');
END;
