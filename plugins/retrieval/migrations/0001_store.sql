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

-- Counters: add each tenant's deltas (documents, chunks, vectors); p_now, when
-- given, is the tenant's last ingest.
CREATE FUNCTION retrieval_adjust_stats(s_tenant text[], s_docs bigint[], s_chunks bigint[], s_vectors bigint[], p_now double precision)
RETURNS void LANGUAGE sql SET search_path FROM CURRENT AS $$
    INSERT INTO retrieval_stats AS s (tenant, documents, chunks, vectors, last_ingest)
    SELECT t, d, c, v, p_now FROM unnest(s_tenant, s_docs, s_chunks, s_vectors) AS x(t, d, c, v) ORDER BY t
    ON CONFLICT (tenant) DO UPDATE SET documents = s.documents + excluded.documents, chunks = s.chunks + excluded.chunks,
        vectors = s.vectors + excluded.vectors, last_ingest = greatest(s.last_ingest, excluded.last_ingest);
$$;

-- One write of documents with all their chunks, in the caller's transaction
-- (one statement: one round trip).  Returns the last change-log position.
-- force_custom_plan (here and on the store's connections): a plan cached
-- while the tables were small (a seq scan) would stay in use as they grow,
-- and every write would then scan the whole table.
CREATE FUNCTION retrieval_write_documents(
    d_tenant text[], d_doc_id text[], d_source text[], d_uri text[], d_title text[], d_updated_at text[], d_hash text[],
    d_labels text[], d_acl text[], d_indexed_at double precision[], d_model text[], d_n_chunks integer[], d_tokens integer[],
    d_size integer[], d_n_vectors integer[],
    c_chunk_id text[], c_tenant text[], c_doc_id text[], c_n integer[], c_heading_path text[], c_start integer[], c_end integer[],
    c_kind text[], c_text text[], c_index_text text[], c_tokens integer[], c_vector bytea[],
    p_now double precision)
RETURNS bigint LANGUAGE plpgsql SET search_path FROM CURRENT SET plan_cache_mode = force_custom_plan AS $$
DECLARE
    v_tenant text[]; v_docs bigint[]; v_chunks bigint[]; v_vectors bigint[]; v_pos bigint;
BEGIN
    -- Writers of the same document take turns (a lock per document, taken in one
    -- order): the later one's DELETE below sees the earlier one's row, so the
    -- counters count a replacement, not two additions.
    PERFORM pg_advisory_xact_lock(1465011272, h)
    FROM (SELECT DISTINCT hashtext(current_schema() || chr(31) || t || chr(31) || i) AS h
          FROM unnest(d_tenant, d_doc_id) AS k(t, i) ORDER BY 1) s;
    WITH old AS (
        DELETE FROM retrieval_documents d USING unnest(d_tenant, d_doc_id) AS k(t, i)
        WHERE d.tenant = k.t AND d.doc_id = k.i
        RETURNING d.tenant, d.n_chunks, d.n_vectors
    ), delta AS (
        SELECT tenant, sum(docs) AS docs, sum(chunks) AS chunks, sum(vectors) AS vectors FROM (
            SELECT tenant, -1 AS docs, -n_chunks AS chunks, -n_vectors AS vectors FROM old
            UNION ALL
            SELECT t, 1, nc, nv FROM unnest(d_tenant, d_n_chunks, d_n_vectors) AS x(t, nc, nv)
        ) u GROUP BY tenant
    )
    SELECT array_agg(tenant), array_agg(docs), array_agg(chunks), array_agg(vectors)
    INTO v_tenant, v_docs, v_chunks, v_vectors FROM delta;
    DELETE FROM retrieval_chunks c USING unnest(d_tenant, d_doc_id) AS k(t, i) WHERE c.tenant = k.t AND c.doc_id = k.i;
    INSERT INTO retrieval_documents (tenant, doc_id, source, uri, title, updated_at, content_hash, labels, acl, indexed_at,
                                     embedding_model, n_chunks, tokens, size, n_vectors)
    SELECT t, i, s, u, ti, up, h, l, a::jsonb, ia, m, nc, tk, sz, nv
    FROM unnest(d_tenant, d_doc_id, d_source, d_uri, d_title, d_updated_at, d_hash, d_labels, d_acl, d_indexed_at, d_model,
                d_n_chunks, d_tokens, d_size, d_n_vectors) AS x(t, i, s, u, ti, up, h, l, a, ia, m, nc, tk, sz, nv);
    INSERT INTO retrieval_chunks (chunk_id, tenant, doc_id, n, heading_path, start_offset, end_offset, kind, text, index_text, tokens, vector)
    SELECT * FROM unnest(c_chunk_id, c_tenant, c_doc_id, c_n, c_heading_path, c_start, c_end, c_kind, c_text, c_index_text, c_tokens, c_vector);
    -- Last, so the change-log lock (taken by the trigger) is held only from here to COMMIT.
    WITH ins AS (
        INSERT INTO retrieval_changes (tenant, doc_id, op, at)
        SELECT t, i, 'upsert', p_now FROM unnest(d_tenant, d_doc_id) AS k(t, i) RETURNING pos
    )
    SELECT max(pos) INTO v_pos FROM ins;
    PERFORM retrieval_adjust_stats(v_tenant, v_docs, v_chunks, v_vectors, p_now);
    RETURN v_pos;
END
$$;

-- Delete documents and their chunks in the caller's transaction; returns how
-- many existed and the last change-log position.
CREATE FUNCTION retrieval_delete_documents(d_tenant text[], d_doc_id text[], p_now double precision, OUT o_deleted integer, OUT o_pos bigint)
LANGUAGE plpgsql SET search_path FROM CURRENT SET plan_cache_mode = force_custom_plan AS $$
DECLARE
    v_tenant text[]; v_docs bigint[]; v_chunks bigint[]; v_vectors bigint[];
BEGIN
    WITH old AS (
        DELETE FROM retrieval_documents d USING unnest(d_tenant, d_doc_id) AS k(t, i)
        WHERE d.tenant = k.t AND d.doc_id = k.i
        RETURNING d.tenant, d.n_chunks, d.n_vectors
    )
    SELECT array_agg(tenant), array_agg(docs), array_agg(chunks), array_agg(vectors), coalesce(sum(-docs), 0)
    INTO v_tenant, v_docs, v_chunks, v_vectors, o_deleted
    FROM (SELECT tenant, -count(*) AS docs, -sum(n_chunks) AS chunks, -sum(n_vectors) AS vectors FROM old GROUP BY tenant) g;
    DELETE FROM retrieval_chunks c USING unnest(d_tenant, d_doc_id) AS k(t, i) WHERE c.tenant = k.t AND c.doc_id = k.i;
    WITH ins AS (
        INSERT INTO retrieval_changes (tenant, doc_id, op, at)
        SELECT t, i, 'delete', p_now FROM unnest(d_tenant, d_doc_id) AS k(t, i) RETURNING pos
    )
    SELECT max(ins.pos) INTO o_pos FROM ins;
    IF v_tenant IS NOT NULL THEN
        PERFORM retrieval_adjust_stats(v_tenant, v_docs, v_chunks, v_vectors, NULL);
    END IF;
END
$$;
