-- kbsync 0011: sources a daemon cannot process until someone fixes something (a
-- column the config names is missing, the role may not read the table), so that
-- `kbsync status` shows them beside the daemon's /readyz and metrics; and sweeps
-- started by `kbsync install` (which queues the rows that existed before it).
-- Released migrations are never edited; changes go in a new numbered file.

CREATE TABLE kbsync.source_problems (
    source     text        PRIMARY KEY,
    error      text        NOT NULL,   -- the server's own message
    fix        text        NOT NULL,   -- what to do about it
    since      timestamptz NOT NULL DEFAULT now(),
    checked_at timestamptz NOT NULL DEFAULT now()   -- the latest failed attempt
);

ALTER TABLE kbsync.reconcile_runs DROP CONSTRAINT reconcile_runs_origin_check;
ALTER TABLE kbsync.reconcile_runs
    ADD CONSTRAINT reconcile_runs_origin_check CHECK (origin IN ('cli', 'schedule', 'install'));
