#!/usr/bin/env bash
# The PyTorch baseline of `just bench model`: a virtual environment in
# .kbsync/venv-torch with pinned torch + transformers from PyPI, made once. Several
# GB (PyPI's torch carries its CUDA libraries); only the model benchmark uses it,
# never `just test`. Prints the environment's python.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state="${KBSYNC_STATE_DIR:-$repo/.kbsync}"
venv="$state/venv-torch"
pins=(torch==2.5.1 transformers==4.46.3 numpy==2.1.3)
stamp="$venv/.kbsync-pins"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]; then
  command -v python3 >/dev/null || { echo "torch-venv.sh: python3 (with venv and pip) is needed for the PyTorch baseline" >&2; exit 1; }
  echo "torch-venv.sh: creating $venv with ${pins[*]} (several GB from PyPI, once)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --find-links "$state/cache/torch-wheels" "${pins[@]}" >&2 \
    || { echo "torch-venv.sh: pip install ${pins[*]} failed; check access to PyPI" >&2; exit 1; }
  echo "${pins[*]}" > "$stamp"
fi
echo "$venv/bin/python"
