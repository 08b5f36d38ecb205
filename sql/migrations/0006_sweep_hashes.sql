-- kbsync 0006: 64-bit hashes for the reconcile sweep. The sweep compares every
-- source row with its chunks; sha256 in SQL costs about 1.2 us per value on a
-- 2-core machine, which made a sweep of 1,000,000 in-sync rows ~25x one read of the
-- tables. hashtextextended (the hash behind PostgreSQL's hash partitioning) costs
-- ~0.05 us. sha256 stays what embeddings are reused by.
-- Chunks written before this migration have NULLs here; the sweep queues their
-- keys once and the daemon rewrites them, reusing their embeddings.
-- Released migrations are never edited; changes go in a new numbered file.

ALTER TABLE public.tenant_knowledge
    ADD COLUMN source_text_hash64 bigint,
    ADD COLUMN content_hash64 bigint;

COMMENT ON COLUMN public.tenant_knowledge.source_text_hash64 IS
    'kbsync: hashtextextended(text COLLATE "C", 0) of the source text the key''s chunks were cut from';
COMMENT ON COLUMN public.tenant_knowledge.content_hash64 IS
    'kbsync: hashtextextended(content COLLATE "C", 0)';
