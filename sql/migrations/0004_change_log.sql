-- kbsync 0004: a capture that adds the least to the writer's transaction.
--
-- The capture triggers append "key K of source S may have changed" here instead of
-- upserting the outbox: an INSERT into a table with no index writes one heap tuple
-- and waits on nothing (the outbox upsert wrote three index entries per captured row
-- and waited for the row lock of an entry a batch was writing). The daemon moves
-- these rows into the outbox, folding repeated changes of a key into its entry
-- (outbox::collect), in transactions of its own.
CREATE TABLE kbsync.changes (
    source     text        NOT NULL,
    scope      text        NOT NULL DEFAULT 'row' CHECK (scope IN ('row', 'source')),
    source_key text        NOT NULL,
    deleted    boolean     NOT NULL,
    tenant     text        NOT NULL DEFAULT '',
    changed_at timestamptz NOT NULL DEFAULT now()  -- the writer's transaction start, as the outbox's last_changed_at was
);
-- A queue: rows live for milliseconds, so vacuum it often rather than by table size.
ALTER TABLE kbsync.changes SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
                                autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000);

-- Changes the triggers recorded before this migration are already in the outbox.
