-- kbsync 0005: stored embeddings found by their text. A text already embedded with
-- the configured model (in another key, another tenant, an earlier batch) is reused,
-- not sent to the provider again.
-- Released migrations are never edited; changes go in a new numbered file.

CREATE INDEX tenant_knowledge_content_hash_idx
    ON public.tenant_knowledge (content_hash);
