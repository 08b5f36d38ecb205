-- kbsync 0002: what the reconciliation sweep needs to tell, set-wise in SQL, whether a
-- key's chunks are still what its row and the config would produce today.

-- Per chunk, what the key's chunks were cut from and how: the sha256 of the row's
-- whole text, the chunking settings (see chunk::fingerprint) and the number of chunks
-- the key had. NULL on chunks written before 0002: the sweep re-queues those once, and
-- reprocessing them costs no embedding call (unchanged chunk texts are reused by hash).
ALTER TABLE public.tenant_knowledge
    ADD COLUMN source_text_hash bytea,
    ADD COLUMN chunking         text,
    ADD COLUMN chunk_count      integer;

-- A parked key is retried by the sweep once `next_retry_at` has come, at most
-- `reconcile.dead_letter_retries` times; `retries` counts those replays.
ALTER TABLE kbsync.dead_letters
    ADD COLUMN retries integer NOT NULL DEFAULT 0;

-- Who started a sweep (`schedule` inside `kbsync run`, or `cli`) and how it was narrowed.
ALTER TABLE kbsync.reconcile_runs
    ADD COLUMN origin  text  NOT NULL DEFAULT 'cli' CHECK (origin IN ('cli', 'schedule')),
    ADD COLUMN options jsonb NOT NULL DEFAULT '{}'::jsonb;
