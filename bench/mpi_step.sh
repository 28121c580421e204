#!/usr/bin/env bash
# `ov3 bench step` as one process and under `mpirun -np N` with the same GLOBAL batch, alternating ROUNDS
# times on this machine; prints every JSON line, the median images/s of each, and their ratio.
#   bench/mpi_step.sh [N] [PRESET] [BATCH] [RES] [ROUNDS]     (needs Open MPI; builds with --features mpi)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2} preset=${2:-tiny} batch=${3:-16} res=${4:-64} rounds=${5:-3}
cargo build -q -p ov3 --features mpi
ov3="${CARGO_TARGET_DIR:-target}/debug/ov3"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
args=(bench step --preset "$preset" --batch "$batch" --res "$res" --backend cpu --steps 8 --warmup 2)
out=$(mktemp)
for _ in $(seq "$rounds"); do
  "$ov3" "${args[@]}" 2>/dev/null | tee -a "$out"
  # Unpinned: Open MPI would bind each rank to one core; flex is faster free to move.
  mpirun -np "$n" --oversubscribe --bind-to none "$ov3" "${args[@]}" 2>/dev/null | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {}
for r in rows:
    by.setdefault(r["ranks"], []).append(r["images_per_s"])
one = statistics.median(by[1])
for ranks, v in sorted(by.items()):
    m = statistics.median(v)
    print(f"{ranks} process(es): median {m:6.2f} img/s over {len(v)} runs {v}  x{m / one:.2f} of one process")
PY
rm -f "$out"
