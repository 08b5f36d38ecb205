-- kbsync 0010: changing the embedding model blue/green (`kbsync model start`,
-- `cutover`, `rollback`, `finish`). While a migration runs, tenant_knowledge has a
-- second vector column for the other model, added by `kbsync model start` with the
-- new model's dimension (its name says its role: embedding_next before the cut-over,
-- embedding_previous after it); this row says which model is where.
-- Released migrations are never edited; changes go in a new numbered file.

-- Generations are never reused, also across migrations: a daemon that last saw one
-- cannot mistake a later migration's state for it.
CREATE SEQUENCE kbsync.model_migration_generation;

CREATE TABLE kbsync.model_migration (
    singleton       boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    from_model      text        NOT NULL,   -- the model before the migration
    from_dimensions integer     NOT NULL,
    to_model        text        NOT NULL,   -- the model migrated to ([next_embedding])
    to_dimensions   integer     NOT NULL,
    -- filling: applications read from_model's vectors (embedding), to_model's are
    --          being filled in (embedding_next);
    -- cut_over: applications read to_model's (embedding); from_model's are kept
    --          current (embedding_previous) so that a rollback costs nothing;
    -- finished: from_model's vectors are gone; [embedding] must be to_model.
    phase           text        NOT NULL CHECK (phase IN ('filling', 'cut_over', 'finished')),
    -- Bumped by every cut-over and rollback: a daemon's batch embedded with the model
    -- that was active when it started commits only if it still is.
    generation      bigint      NOT NULL DEFAULT nextval('kbsync.model_migration_generation'),
    started_at      timestamptz NOT NULL DEFAULT now(),
    changed_at      timestamptz NOT NULL DEFAULT now(),
    -- What filling the other column has cost, per model.
    to_texts        bigint      NOT NULL DEFAULT 0,
    to_tokens       bigint      NOT NULL DEFAULT 0,
    to_requests     bigint      NOT NULL DEFAULT 0,
    from_texts      bigint      NOT NULL DEFAULT 0,
    from_tokens     bigint      NOT NULL DEFAULT 0,
    from_requests   bigint      NOT NULL DEFAULT 0
);
