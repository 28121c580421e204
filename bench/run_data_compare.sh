#!/usr/bin/env bash
# Decode + resize + crop to 256 px: ov3 against PIL, 1 and 2 workers, on the same JPEG files, in one run.
#   bench/run_data_compare.sh [N]        (PYTHON=... picks the interpreter with Pillow)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200}
python=${PYTHON:-python3}
cargo build -q -p ov3
ov3="${CARGO_TARGET_DIR:-target}/debug/ov3"
dir=$(mktemp -d)
"$ov3" datagen --n "$n" --res 512 --format jpg --out "$dir" 2>/dev/null
for t in 1 2; do
  "$python" bench/data_ref.py "$dir" --threads "$t"
  "$ov3" bench data --dir "$dir" --threads "$t"
done
rm -rf "$dir"
