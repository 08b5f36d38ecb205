# kbsync tasks. `just run` and `just test` bootstrap what they need by themselves:
# without DATABASE_URL they start a throwaway PostgreSQL with pgvector (scripts/pg.sh).

set shell := ["bash", "-euo", "pipefail", "-c"]

kbsync := "target/debug/kbsync"

# List the recipes.
default:
    @just --list

# Start the throwaway PostgreSQL (idempotent) and print its DATABASE_URL.
db:
    @scripts/pg.sh start

# Stop the throwaway PostgreSQL.
db-stop:
    @scripts/pg.sh stop

# Fetch the offline embedding model (all-MiniLM-L6-v2) into .kbsync/models.
model:
    @scripts/model.sh

# Database, schema, demo sources and data, then the daemon with the local model.
run:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -z "${DATABASE_URL:-}" ]; then DATABASE_URL=$(scripts/pg.sh start); export DATABASE_URL; fi
    scripts/model.sh >/dev/null
    cargo build -p kbsync
    {{kbsync}} demo schema
    {{kbsync}} demo data
    {{kbsync}} config check --quiet
    # Rows that exist before install are queued by it, as on a team's own database.
    {{kbsync}} install
    exec {{kbsync}} run

# One reconciliation sweep (options: --dry-run, --source NAME, --tenant ID, --json, --force).
reconcile *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -z "${DATABASE_URL:-}" ]; then DATABASE_URL=$(scripts/pg.sh start); export DATABASE_URL; fi
    cargo build -p kbsync
    exec {{kbsync}} reconcile {{ARGS}}

# Format check, clippy, and every test against a real PostgreSQL with pgvector.
test:
    #!/usr/bin/env bash
    set -euo pipefail
    # Without DATABASE_URL: the whole suite on PostgreSQL 18, then the parts that lean
    # on the server (install, both capture modes, sync, search, reconcile, model
    # migration, related rows) on PostgreSQL 16 too; both bundled with pgvector 0.8.5.
    stop=()
    if [ -z "${DATABASE_URL:-}" ]; then
      if ! scripts/pg.sh status; then stop+=("scripts/pg.sh stop"); fi
      DATABASE_URL=$(scripts/pg.sh start); export DATABASE_URL
      also_16=1
    fi
    trap 'for s in "${stop[@]}"; do $s || true; done' EXIT
    scripts/model.sh >/dev/null
    # The TLS front of tests/tls.rs (installed when missing, as root).
    scripts/pgbouncer.sh >/dev/null
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo build --workspace
    scripts/verify-units.sh
    if cargo nextest --version >/dev/null 2>&1; then
      cargo nextest run --workspace --no-fail-fast
    else
      echo "cargo-nextest not found; running cargo test (cargo install cargo-nextest --locked for per-test processes)" >&2
      cargo test --workspace --no-fail-fast
    fi
    if [ -n "${also_16:-}" ]; then
      pg16() { env -u KBSYNC_PG_PORT KBSYNC_PG_MAJOR=16 ${KBSYNC_PG16_PORT:+KBSYNC_PG_PORT=$KBSYNC_PG16_PORT} scripts/pg.sh "$@"; }
      if ! pg16 status; then stop+=("env -u KBSYNC_PG_PORT KBSYNC_PG_MAJOR=16 ${KBSYNC_PG16_PORT:+KBSYNC_PG_PORT=$KBSYNC_PG16_PORT} scripts/pg.sh stop"); fi
      url16=$(pg16 start)
      echo "just test: the server-facing tests again, on PostgreSQL 16 ($url16)" >&2
      parts=(install capture logical_capture sync search reconcile model_migration related_rows existing_rows)
      filter=$(printf 'binary(%s) | ' "${parts[@]}"); filter="package(kbsync-tests) & (${filter% | })"
      # --workspace, as the run above: the same features, so nothing is built again.
      if cargo nextest --version >/dev/null 2>&1; then
        DATABASE_URL=$url16 KBSYNC_PG_MAJOR=16 cargo nextest run --workspace --no-fail-fast -E "$filter"
      else
        for part in "${parts[@]}"; do
          DATABASE_URL=$url16 KBSYNC_PG_MAJOR=16 cargo test --workspace --no-fail-fast --test "$part"
        done
      fi
    fi

# The model-based convergence test over many seeds (200 unless SEEDS says otherwise), in
# both capture modes, or in one: `just soak 200 logical` / `just soak 200 trigger`.
soak SEEDS="200" CAPTURE="":
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -z "${DATABASE_URL:-}" ]; then
      if ! scripts/pg.sh status; then trap 'scripts/pg.sh stop' EXIT; fi
      DATABASE_URL=$(scripts/pg.sh start); export DATABASE_URL
    fi
    cargo build --workspace
    KBSYNC_CONVERGENCE_SEEDS={{SEEDS}} cargo test -p kbsync-tests --test convergence -- --nocapture {{CAPTURE}}

# Benchmarks of the release build against a real PostgreSQL; prints a table and writes
# BENCHMARKS.md (sections: triggers, latency, backfill, concurrency, coalescing, model, reconcile, search, migrate;
# all by default, and only then is the file written).
bench *SECTIONS:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -z "${DATABASE_URL:-}" ]; then
      if ! scripts/pg.sh status; then trap 'scripts/pg.sh stop' EXIT; fi
      DATABASE_URL=$(scripts/pg.sh start); export DATABASE_URL
    fi
    scripts/model.sh >/dev/null
    # The release profile: what the README's systemd section deploys.
    cargo build --release -p kbsync -p kbsync-bench
    target/release/kbsync-bench {{SECTIONS}}

# Apply formatting and clippy's fixes.
fmt:
    cargo fmt --all
