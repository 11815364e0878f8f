-- Retrieval: the store of record shared by every replica (documents, chunks with
-- their vectors, ACLs, counters and the change log).  Which position each
-- replica's engines have applied is NOT kept here: it lives in each replica's
-- index directory.

CREATE TABLE retrieval_documents (
    tenant text NOT NULL,
    doc_id text NOT NULL,
    source text NOT NULL DEFAULT '',
    uri text NOT NULL DEFAULT '',
    title text NOT NULL DEFAULT '',
    updated_at text,
    content_hash text NOT NULL,
    labels text NOT NULL DEFAULT '[]',
    acl jsonb NOT NULL,
    indexed_at double precision NOT NULL,
    embedding_model text,
    n_chunks integer NOT NULL,
    n_vectors integer NOT NULL DEFAULT 0,
    tokens integer NOT NULL,
    size integer NOT NULL,
    PRIMARY KEY (tenant, doc_id)
);
CREATE INDEX retrieval_documents_source ON retrieval_documents (tenant, source);
CREATE INDEX retrieval_documents_updated ON retrieval_documents (updated_at);
CREATE INDEX retrieval_documents_tenant_updated ON retrieval_documents (tenant, updated_at);

-- vector: little-endian float32, embedded once for the fleet by the replica
-- that ingested the document (its model is the document's embedding_model).
CREATE TABLE retrieval_chunks (
    chunk_id text PRIMARY KEY,
    tenant text NOT NULL,
    doc_id text NOT NULL,
    n integer NOT NULL,
    heading_path text NOT NULL,
    start_offset integer NOT NULL,
    end_offset integer NOT NULL,
    kind text NOT NULL,
    text text NOT NULL,
    index_text text NOT NULL,
    tokens integer NOT NULL,
    vector bytea
);
CREATE INDEX retrieval_chunks_doc ON retrieval_chunks (tenant, doc_id, n);

-- Counters per tenant, maintained by every write in its own transaction (no recount).
CREATE TABLE retrieval_stats (
    tenant text PRIMARY KEY,
    documents bigint NOT NULL DEFAULT 0,
    chunks bigint NOT NULL DEFAULT 0,
    vectors bigint NOT NULL DEFAULT 0,
    last_ingest double precision
);

-- store_id: which store a replica's local index was built from; pruned_upto:
-- the newest position removed from the change log; vectors_generation: changes
-- when every vector was replaced (a new embedding model).
CREATE TABLE retrieval_meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO retrieval_meta (key, value) VALUES ('store_id', replace(gen_random_uuid()::text, '-', '')), ('pruned_upto', '0');

CREATE SEQUENCE retrieval_changes_pos AS bigint;
CREATE TABLE retrieval_changes (
    pos bigint PRIMARY KEY,
    tenant text NOT NULL,
    doc_id text NOT NULL,
    op text NOT NULL CHECK (op IN ('upsert', 'delete', 'acl')),
    at double precision NOT NULL
);
CREATE INDEX retrieval_changes_at ON retrieval_changes (at);

-- Positions become visible in order.  A position taken from a sequence alone
-- could commit after a higher one (transaction A takes 10, B takes 11 and
-- commits, a follower reads "after 9", sees 11 and moves past 10 before A
-- commits).  So every insert takes this schema's change-log lock first; the
-- lock is held until the transaction ends and released only after its commit
-- is visible, so a transaction holding position p is visible before any
-- transaction can take a position above p.  Writers insert their change rows
-- last, right before COMMIT, so the lock covers only that step.
CREATE FUNCTION retrieval_changes_position() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1465011271, hashtext(TG_TABLE_SCHEMA));
    NEW.pos := nextval('retrieval_changes_pos');
    RETURN NEW;
END
$$;
CREATE TRIGGER retrieval_changes_position BEFORE INSERT ON retrieval_changes
    FOR EACH ROW EXECUTE FUNCTION retrieval_changes_position();

-- The wake-up of every replica: the newest position of the statement, on a
-- channel of this schema (delivered at commit; lost while a listener is
-- disconnected, which is why followers also catch up by position).
CREATE FUNCTION retrieval_changes_notify() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_notify('warden_retrieval_' || md5(TG_TABLE_SCHEMA), (SELECT max(pos) FROM new_rows)::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER retrieval_changes_notify AFTER INSERT ON retrieval_changes
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION retrieval_changes_notify();
