-- Warden audit log on PostgreSQL, schema version 1.
--
-- One hash chain per running Warden process (replica): audit_chains holds each chain's origin (its name in
-- checkpoints) and head; audit_records the records, keyed by (chain_id, seq); audit_checkpoints the signed
-- checkpoint notes; audit_keys the verifier keys the writers published.  Records and checkpoints are
-- append-only (the triggers below); a chain's head only moves forward.

CREATE TABLE audit_chains (
    chain_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    origin text NOT NULL UNIQUE,
    seq bigint NOT NULL DEFAULT 0,
    hash bytea NOT NULL,
    pruned_through bigint NOT NULL DEFAULT 0,
    created_us bigint NOT NULL,
    writer text NOT NULL,
    closed_us bigint
);

CREATE TABLE audit_records (
    chain_id bigint NOT NULL,
    seq bigint NOT NULL,
    ts_us bigint NOT NULL,
    kind text NOT NULL,
    request_id text,
    tenant text,
    subject text,
    tools text,
    call_ids text,
    status integer,
    prev_hash bytea NOT NULL,
    hash bytea NOT NULL,
    body bytea NOT NULL,
    PRIMARY KEY (chain_id, seq)
);
CREATE INDEX audit_records_request ON audit_records (request_id);
CREATE INDEX audit_records_tenant_ts ON audit_records (tenant, ts_us);
CREATE INDEX audit_records_ts ON audit_records (ts_us);

-- Record bodies (JSON, ~3 KB) are compressed when TOASTed: lz4 where the server has it (cheaper CPU than pglz).
DO $$
BEGIN
    ALTER TABLE audit_records ALTER COLUMN body SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available: audit record bodies use the default compression';
END $$;

CREATE TABLE audit_checkpoints (
    chain_id bigint NOT NULL,
    size bigint NOT NULL,
    hash bytea NOT NULL,
    note text NOT NULL,
    created_us bigint NOT NULL,
    reason text NOT NULL,
    PRIMARY KEY (chain_id, size)
);

CREATE TABLE audit_keys (
    key_id text PRIMARY KEY,
    verifier text NOT NULL,
    added_us bigint NOT NULL
);

CREATE FUNCTION audit_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit table % is append-only (% refused)', TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;

-- Records: never updated; deleted only at or below their chain's pruned_through (retention, up to a checkpoint).
CREATE FUNCTION audit_records_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.seq <= COALESCE((SELECT pruned_through FROM audit_chains WHERE chain_id = OLD.chain_id), 0) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit records are append-only (only retention deletes, below a chain''s pruned_through)'
        USING ERRCODE = 'insufficient_privilege';
END $$;

-- Chains: the identity never changes, the head and the prune mark only move forward.
CREATE FUNCTION audit_chains_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.chain_id <> OLD.chain_id OR NEW.origin <> OLD.origin OR NEW.created_us <> OLD.created_us
       OR NEW.seq < OLD.seq OR NEW.pruned_through < OLD.pruned_through OR NEW.pruned_through > NEW.seq
       OR (NEW.seq = OLD.seq AND NEW.hash <> OLD.hash) THEN
        RAISE EXCEPTION 'audit chain % may only move its head forward', OLD.origin USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records FOR EACH ROW EXECUTE FUNCTION audit_refuse();
CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records FOR EACH ROW EXECUTE FUNCTION audit_records_delete();
CREATE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON audit_records FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse();
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE OR DELETE ON audit_checkpoints FOR EACH ROW EXECUTE FUNCTION audit_refuse();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse();
CREATE TRIGGER audit_keys_no_update BEFORE UPDATE OR DELETE ON audit_keys FOR EACH ROW EXECUTE FUNCTION audit_refuse();
CREATE TRIGGER audit_keys_no_truncate BEFORE TRUNCATE ON audit_keys FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse();
CREATE TRIGGER audit_chains_forward BEFORE UPDATE ON audit_chains FOR EACH ROW EXECUTE FUNCTION audit_chains_update();
CREATE TRIGGER audit_chains_no_delete BEFORE DELETE ON audit_chains FOR EACH ROW EXECUTE FUNCTION audit_refuse();
CREATE TRIGGER audit_chains_no_truncate BEFORE TRUNCATE ON audit_chains FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse();
