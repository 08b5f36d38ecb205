-- kbsync 0008: full-text search beside the vectors. Each chunk records the text search
-- configuration of its source (`text_search` in the source's config; the daemon writes
-- it), and a stored generated tsvector of its content in that configuration, indexed
-- with GIN. Hybrid ranking (`kbsync.search`, created by `kbsync install` from the
-- config) fuses it with the vector ranking.
-- Released migrations are never edited; changes go in a new numbered file.

ALTER TABLE public.tenant_knowledge
    ADD COLUMN text_search_config regconfig NOT NULL DEFAULT 'simple',
    ADD COLUMN content_tsv tsvector
        GENERATED ALWAYS AS (to_tsvector(text_search_config, content)) STORED;
CREATE INDEX tenant_knowledge_content_tsv_idx
    ON public.tenant_knowledge USING gin (content_tsv);
