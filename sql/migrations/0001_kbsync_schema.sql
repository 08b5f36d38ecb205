-- kbsync 0001: the knowledge table, the outbox, dead letters, reconcile runs.
-- Released migrations are never edited; changes go in a new numbered file.

CREATE EXTENSION IF NOT EXISTS vector;

-- The knowledge base. One row per chunk of a source row.
-- `embedding` gets its dimension (vector(N)) from `kbsync install`, which reads it from
-- the config and refuses to change it silently; see crates/kbsync-core/src/install.rs.
CREATE TABLE public.tenant_knowledge (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       text        NOT NULL,
    source          text        NOT NULL,   -- chunk type: faq, product, page, manual, ...
    source_key      text        NOT NULL,   -- the source row's key, as text
    chunk_index     integer     NOT NULL CHECK (chunk_index >= 0),
    content         text        NOT NULL,
    content_hash    bytea       NOT NULL,   -- sha256 of content
    embedding       vector,
    embedding_model text,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tenant_knowledge_chunk_key UNIQUE (source, source_key, chunk_index)
);
CREATE INDEX tenant_knowledge_tenant_source_idx
    ON public.tenant_knowledge (tenant_id, source);

CREATE SCHEMA IF NOT EXISTS kbsync;  -- may exist already: install creates it for its bookkeeping

-- Durable change log, written by the capture triggers in the writer's transaction.
-- One row per (source, key): later edits of the same key fold into it (version + 1),
-- so ten saves are one row and a restart forgets nothing. scope = 'source' is a whole
-- source (TRUNCATE) with source_key ''.
CREATE TABLE kbsync.outbox (
    source           text        NOT NULL,
    scope            text        NOT NULL DEFAULT 'row' CHECK (scope IN ('row', 'source')),
    source_key       text        NOT NULL,
    deleted          boolean     NOT NULL DEFAULT false,  -- last change was a delete / left the filter
    first_changed_at timestamptz NOT NULL DEFAULT now(),
    last_changed_at  timestamptz NOT NULL DEFAULT now(),
    version          bigint      NOT NULL DEFAULT 1,
    claim_token      uuid,                  -- the daemon working on it, if any
    claimed_until    timestamptz,           -- lease; after it, another daemon may take it
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    last_error       text,
    PRIMARY KEY (source, scope, source_key)
);
CREATE INDEX outbox_ready_idx ON kbsync.outbox (source, last_changed_at);

-- Keys that kept failing, with their error; replayable with `kbsync errors retry`.
CREATE TABLE kbsync.dead_letters (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source          text        NOT NULL,
    source_key      text        NOT NULL,
    error           text        NOT NULL,
    attempts        integer     NOT NULL,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at  timestamptz NOT NULL DEFAULT now(),
    next_retry_at   timestamptz,
    CONSTRAINT dead_letters_key UNIQUE (source, source_key)
);

-- One row per reconciliation sweep.
CREATE TABLE kbsync.reconcile_runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    dry_run     boolean     NOT NULL,
    counts      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    error       text
);
