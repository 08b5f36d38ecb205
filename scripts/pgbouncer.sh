#!/usr/bin/env bash
# PgBouncer for the TLS and pooler tests (tests/tls.rs): the TLS front of the test server,
# whose PyPI build has no OpenSSL. Installs Debian's package when it is missing and we
# are root (as CI is); otherwise says how. Prints the binary's path.
set -euo pipefail
for candidate in /usr/sbin/pgbouncer /usr/bin/pgbouncer; do
  if [ -x "$candidate" ]; then echo "$candidate"; exit 0; fi
done
if [ "$(id -u)" != 0 ]; then
  echo "pgbouncer.sh: pgbouncer is missing; install it: sudo apt-get install pgbouncer" >&2
  exit 1
fi
echo "pgbouncer.sh: installing Debian's pgbouncer" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2 || { echo "pgbouncer.sh: apt-get update failed" >&2; exit 1; }
apt-get install -y -qq --no-install-recommends pgbouncer >&2 \
  || { echo "pgbouncer.sh: apt-get install pgbouncer failed" >&2; exit 1; }
for candidate in /usr/sbin/pgbouncer /usr/bin/pgbouncer; do
  if [ -x "$candidate" ]; then echo "$candidate"; exit 0; fi
done
echo "pgbouncer.sh: pgbouncer is still missing after apt-get install" >&2
exit 1
