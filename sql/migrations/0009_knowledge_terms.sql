-- kbsync 0009: the full-text index moves to a narrow table of its own.
-- Ranking a common word reads every chunk that has it: in tenant_knowledge each such
-- row carries its embedding inline (1.5 KB at 384 dimensions, below the size
-- PostgreSQL moves out of line), so a query matching 30,000 chunks read ~45 MB and
-- took ~100 ms. kbsync.knowledge_terms holds only what full-text ranking reads, one
-- row per chunk, kept by triggers on tenant_knowledge: whoever
-- writes a chunk (daemon, reconcile, adopt, a hand fix) keeps its terms right.
-- Released migrations are never edited; changes go in a new numbered file.

CREATE TABLE kbsync.knowledge_terms (
    id                 bigint   PRIMARY KEY,  -- tenant_knowledge.id
    tenant_id          text     NOT NULL,
    source             text     NOT NULL,
    text_search_config regconfig NOT NULL,
    content_tsv        tsvector NOT NULL
);
-- The GIN index finds the chunks with the words; the tenant index lets PostgreSQL
-- AND the two bitmaps, so other tenants' matches are never read.
CREATE INDEX knowledge_terms_tsv_idx ON kbsync.knowledge_terms USING gin (content_tsv);
CREATE INDEX knowledge_terms_tenant_idx ON kbsync.knowledge_terms (tenant_id, source);

INSERT INTO kbsync.knowledge_terms (id, tenant_id, source, text_search_config, content_tsv)
SELECT id, tenant_id, source, text_search_config, content_tsv FROM public.tenant_knowledge;

CREATE FUNCTION kbsync.knowledge_terms_inserted() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    INSERT INTO kbsync.knowledge_terms (id, tenant_id, source, text_search_config, content_tsv)
    SELECT n.id, n.tenant_id, n.source, n.text_search_config, to_tsvector(n.text_search_config, n.content)
      FROM new_chunks n;
    RETURN NULL;
END $$;

-- Per row, and only for rows whose words, tenant, source or configuration changed
-- (the WHEN clause of its trigger): an update that stores an embedding, which is most
-- updates, queues nothing; a statement-level trigger would have copied every updated
-- row, vector and all, into its transition tables.
CREATE FUNCTION kbsync.knowledge_terms_updated() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    UPDATE kbsync.knowledge_terms
       SET tenant_id = NEW.tenant_id, source = NEW.source, text_search_config = NEW.text_search_config,
           content_tsv = to_tsvector(NEW.text_search_config, NEW.content)
     WHERE id = NEW.id;
    RETURN NULL;
END $$;

CREATE FUNCTION kbsync.knowledge_terms_deleted() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    DELETE FROM kbsync.knowledge_terms k USING old_chunks o WHERE k.id = o.id;
    RETURN NULL;
END $$;

CREATE FUNCTION kbsync.knowledge_terms_truncated() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    TRUNCATE kbsync.knowledge_terms;
    RETURN NULL;
END $$;

CREATE TRIGGER kbsync_knowledge_terms_insert AFTER INSERT ON public.tenant_knowledge
    REFERENCING NEW TABLE AS new_chunks
    FOR EACH STATEMENT EXECUTE FUNCTION kbsync.knowledge_terms_inserted();
CREATE TRIGGER kbsync_knowledge_terms_update AFTER UPDATE ON public.tenant_knowledge
    FOR EACH ROW
    WHEN (NEW.content IS DISTINCT FROM OLD.content OR NEW.tenant_id IS DISTINCT FROM OLD.tenant_id
          OR NEW.source IS DISTINCT FROM OLD.source
          OR NEW.text_search_config IS DISTINCT FROM OLD.text_search_config)
    EXECUTE FUNCTION kbsync.knowledge_terms_updated();
CREATE TRIGGER kbsync_knowledge_terms_delete AFTER DELETE ON public.tenant_knowledge
    REFERENCING OLD TABLE AS old_chunks
    FOR EACH STATEMENT EXECUTE FUNCTION kbsync.knowledge_terms_deleted();
CREATE TRIGGER kbsync_knowledge_terms_truncate AFTER TRUNCATE ON public.tenant_knowledge
    FOR EACH STATEMENT EXECUTE FUNCTION kbsync.knowledge_terms_truncated();

-- Roles that read tenant_knowledge (applications calling kbsync.search()) read the
-- terms too, or text and hybrid search would fail for them after this upgrade.
DO $$
DECLARE
    reader regrole;
BEGIN
    FOR reader IN
        SELECT DISTINCT a.grantee::regrole
          FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = 'public.tenant_knowledge'::regclass
           AND a.privilege_type = 'SELECT' AND a.grantee <> 0 AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT SELECT ON kbsync.knowledge_terms TO %s', reader);
    END LOOP;
    IF has_table_privilege('public', 'public.tenant_knowledge', 'SELECT') THEN
        GRANT SELECT ON kbsync.knowledge_terms TO PUBLIC;
    END IF;
END $$;

-- The terms are read from kbsync.knowledge_terms now.
DROP INDEX public.tenant_knowledge_content_tsv_idx;
ALTER TABLE public.tenant_knowledge DROP COLUMN content_tsv;
