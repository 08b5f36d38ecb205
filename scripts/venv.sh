#!/usr/bin/env bash
# A git-ignored Python virtual environment, .kbsync/venv-NAME, with the pinned packages of
# a requirements file from PyPI: made once, made again when the file changes. Prints the
# environment's python. Nothing pre-installed is assumed beyond python3 with venv and pip.
#
#   scripts/venv.sh django examples/django/requirements.txt    the Django example (just test)
#   scripts/venv.sh torch tools/bench-model/requirements.txt   PyTorch baseline of `just bench
#                                                              model` only: several GB
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: scripts/venv.sh NAME REQUIREMENTS_FILE" >&2; exit 2; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state="${KBSYNC_STATE_DIR:-$repo/.kbsync}"
name=$1
requirements=$2
[ -f "$requirements" ] || requirements="$repo/$2"
[ -f "$requirements" ] || { echo "venv.sh: no requirements file $2" >&2; exit 2; }
venv="$state/venv-$name"
stamp="$venv/.kbsync-requirements"
mkdir -p "$state"
# Tests run in parallel processes: one of them builds the environment, the others wait.
exec 9>"$state/venv-$name.lock"
flock 9
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$requirements" "$stamp"; then
  command -v python3 >/dev/null || { echo "venv.sh: python3 (with venv and pip) is needed for $venv" >&2; exit 1; }
  echo "venv.sh: creating $venv from $2 (PyPI, once)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2 \
    || { rm -rf "$venv"; echo "venv.sh: pip install -r $2 failed; check access to PyPI" >&2; exit 1; }
  cp "$requirements" "$stamp"
fi
echo "$venv/bin/python"
