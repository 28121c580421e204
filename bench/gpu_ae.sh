#!/usr/bin/env bash
# Continues the embedded real-photo autoencoder on a lent GPU (issue 23): PyTorch CUDA there runs
# tools/train_ae.py far faster than the 2-core CPU here. Run it AFTER bench/gpu.sh, in the device time left:
#   here:   bench/gpu_prepare.sh    (packs data/real/train + world scenes into .gpu-ae/, ~27 MB)
#   device: run(command="bash bench/gpu_ae.sh", carry=[".gpu-ae"], timeout_s=SECONDS)
# AE_MINUTES (default 4) is the training budget; the whole call takes ~1 min more (imports, loading, the
# held-out score). The weights come back as $OUT/real-w48.safetensors: check them here with
# `ov3 vae check --vae FILE --data data/real/heldout` and keep them in assets/ae/candidates/ if better
# (it continues the embedded autoencoder unless AE_INIT names another file, e.g. a candidate there; a candidate
# replaces the embedded one only with a demo checkpoint moved onto its latents: assets/ae/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ov3-gpu-out}
mkdir -p "$OUT"
[ -d .gpu-ae/train ] || { echo "no .gpu-ae/train: run bench/gpu_prepare.sh here and carry .gpu-ae"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/## nvidia-smi: /'
py=${PYTHON:-python3}
device=$($py -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
heldout=()
[ -d .gpu-ae/heldout ] && heldout=(--heldout .gpu-ae/heldout)
PYTHONUNBUFFERED=1 $py tools/train_ae.py --device "$device" \
  --init "${AE_INIT:-assets/ae/ov3_tiny_ae.safetensors}" \
  --data .gpu-ae/train --world .gpu-ae/world --world-share 0.375 --batch "${AE_BATCH:-64}" --lr 6e-4 \
  --minutes "${AE_MINUTES:-4}" --out "$OUT/real-w48.safetensors" "${heldout[@]}" 2>&1 | tee "$OUT/gpu_ae.log"
