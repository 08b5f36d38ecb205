-- kbsync 0007: embeddings adopted from an existing table (`kbsync adopt`). Each row is a
-- vector someone already paid for, made with `embedding_model`, for a text that
-- kbsync's chunking produces (found by its sha256): the daemon reuses it like a
-- stored chunk's embedding instead of sending the text to the provider again.
-- Released migrations are never edited; changes go in a new numbered file.

CREATE TABLE kbsync.adopted_embeddings (
    embedding_model text        NOT NULL,
    content_hash    bytea       NOT NULL,   -- sha256 of the chunk text
    embedding       vector      NOT NULL,
    adopted_from    text        NOT NULL,   -- the table it was read from
    adopted_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (embedding_model, content_hash)
);
