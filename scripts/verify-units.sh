#!/usr/bin/env bash
# Check the systemd units in deploy/ with `systemd-analyze verify`, against the
# binary this checkout built (the units name /usr/local/bin/kbsync and /etc/kbsync).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$PWD/target/debug/kbsync"
[ -x "$bin" ] || { echo "verify-units: $bin missing: run cargo build -p kbsync first" >&2; exit 1; }
if ! command -v systemd-analyze >/dev/null; then
  echo "verify-units: systemd-analyze not found; the units in deploy/ were NOT verified (apt-get install systemd)" >&2
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
touch "$work/kbsync.env"
mkdir -p "$work/lib"
for unit in deploy/*.service deploy/*.timer; do
  sed -e "s#/usr/local/bin/kbsync#$bin#g" \
      -e "s#/etc/kbsync/kbsync.env#$work/kbsync.env#g" \
      -e "s#/var/lib/kbsync#$work/lib#g" "$unit" > "$work/$(basename "$unit")"
done
out=$(systemd-analyze verify "$work"/*.service "$work"/*.timer 2>&1) || { echo "$out" >&2; exit 1; }
# verify exits 0 on some warnings; any line about our units is a failure.
if echo "$out" | grep -E "kbsync" >&2; then exit 1; fi
echo "verify-units: $(ls deploy/*.service deploy/*.timer | wc -l) units OK"
