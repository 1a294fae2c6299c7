-- A blocked key stays blocked, like the revocation that blocked it.
CREATE FUNCTION blocked_keys_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'blocked keys stay blocked';
END;
$$;
CREATE TRIGGER blocked_keys_final BEFORE UPDATE OR DELETE ON blocked_keys
    FOR EACH ROW EXECUTE FUNCTION blocked_keys_final();
CREATE TRIGGER blocked_keys_no_truncate BEFORE TRUNCATE ON blocked_keys
    FOR EACH STATEMENT EXECUTE FUNCTION blocked_keys_final();
