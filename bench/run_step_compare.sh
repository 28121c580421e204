#!/usr/bin/env bash
# One training step of the same model, batch and resolution: ov3 on the CPU (flex), ov3 on wgpu, and
# PyTorch on the CPU with every core, in one go on this machine; prints each JSON line and the ratios
# against PyTorch.
#   bench/run_step_compare.sh [PRESET] [BATCH] [RES] [CONTEXT]   (PYTHON=... picks the interpreter with torch;
#   CONTEXT: caption tokens, 24 for the quick recipe's shapes; NO_WGPU=1 skips wgpu)
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-tiny} batch=${2:-8} res=${3:-128} context=${4:-80}
python=${PYTHON:-python3}
threads=$(nproc)
cargo build -q -p ov3
ov3="${CARGO_TARGET_DIR:-target}/debug/ov3"
args=(--preset "$preset" --batch "$batch" --res "$res" --context "$context")
out=$(mktemp)
"$python" bench/torch_ref.py "${args[@]}" --threads "$threads" | tee -a "$out"
"$ov3" bench step "${args[@]}" --backend cpu | tee -a "$out"
if [ -n "${NO_WGPU:-}" ]; then
  echo "(NO_WGPU set: wgpu skipped)"
elif "$ov3" bench step "${args[@]}" --backend wgpu --warmup 3 >>"$out.wgpu" 2>/dev/null; then
  tee -a "$out" <"$out.wgpu"
else
  echo "(no wgpu adapter: skipped)"
fi
"$python" - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
base = next(r for r in rows if r["impl"] == "pytorch")["ms_per_step"]
for r in rows:
    print(f'{r["impl"]:8} {r["backend"]:5} {r["adapter"][:40]:40} {r["ms_per_step"]:9.1f} ms/step '
          f'{r["images_per_s"]:7.2f} img/s  peak {r["peak_mib"]:6.0f} MiB ({r["peak_kind"]})  '
          f'x{r["ms_per_step"] / base:.2f} of PyTorch time')
PY
rm -f "$out" "$out.wgpu"
