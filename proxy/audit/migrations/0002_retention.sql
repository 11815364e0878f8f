-- Warden audit log on PostgreSQL, schema version 2: retention, up to a checkpoint.
--
-- The role Warden writes with has no DELETE on any audit table.  Retention runs through these two
-- functions, with the rights of the schema's owner (SECURITY DEFINER, search_path pinned to this schema):
--   audit_prune_mark(chain, cutoff_us)  moves the chain's pruned_through to its newest checkpoint at or
--                                        before the first record younger than the cutoff; returns the mark.
--   audit_prune_chunk(chain, max_rows)  deletes up to max_rows records at or below the mark (the delete
--                                        trigger allows nothing above it); returns how many.
-- A cutoff younger than one day is refused: a role that can call them cannot empty the log.
-- EXECUTE is revoked from PUBLIC; grant it to Warden's role only where Warden runs retention.

CREATE FUNCTION audit_prune_mark(p_chain bigint, p_cutoff_us bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_pruned bigint;
    v_head bigint;
    v_bound bigint;
    v_moved bigint;
BEGIN
    IF p_cutoff_us > (extract(epoch FROM clock_timestamp()) * 1000000)::bigint - 86400000000 THEN
        RAISE EXCEPTION 'audit retention keeps at least one day of records' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT pruned_through, seq INTO v_pruned, v_head FROM audit_chains WHERE chain_id = p_chain FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    SELECT min(seq) - 1 INTO v_bound FROM audit_records WHERE chain_id = p_chain AND ts_us >= p_cutoff_us;
    v_bound := COALESCE(v_bound, v_head);
    SELECT max(size) INTO v_moved FROM audit_checkpoints WHERE chain_id = p_chain AND size > v_pruned AND size <= v_bound;
    IF v_moved IS NULL THEN
        RETURN v_pruned;
    END IF;
    UPDATE audit_chains SET pruned_through = v_moved WHERE chain_id = p_chain;
    RETURN v_moved;
END $$;

CREATE FUNCTION audit_prune_chunk(p_chain bigint, p_max_rows integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_through bigint;
    v_low bigint;
    v_deleted integer;
BEGIN
    SELECT pruned_through INTO v_through FROM audit_chains WHERE chain_id = p_chain;
    SELECT min(seq) INTO v_low FROM audit_records WHERE chain_id = p_chain;
    IF v_through IS NULL OR v_low IS NULL OR v_low > v_through THEN
        RETURN 0;
    END IF;
    DELETE FROM audit_records WHERE chain_id = p_chain AND seq <= least(v_through, v_low + greatest(p_max_rows, 1) - 1);
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    RETURN v_deleted;
END $$;

REVOKE ALL ON FUNCTION audit_prune_mark(bigint, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION audit_prune_chunk(bigint, integer) FROM PUBLIC;
