-- kbsync 0003: fair scheduling across tenants and a rate limit shared by all daemons.

-- The tenant of each outbox entry, written by the capture trigger, so that claims can
-- take work round-robin across tenants (one tenant's bulk import does not hold up
-- another tenant's edit). '' when unknown (TRUNCATE, repairs queued by the sweep).
ALTER TABLE kbsync.outbox ADD COLUMN tenant text NOT NULL DEFAULT '';
CREATE INDEX outbox_tenant_idx ON kbsync.outbox (source, tenant, last_changed_at);

-- One token bucket per provider budget, refilled continuously; every daemon reserves
-- from it in one UPDATE, so the configured requests/min and tokens/min hold for all
-- daemons together.
CREATE TABLE kbsync.rate_budget (
    name       text PRIMARY KEY,
    requests   float8      NOT NULL,
    tokens     float8      NOT NULL,
    updated_at timestamptz NOT NULL
);
