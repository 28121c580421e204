#!/usr/bin/env bash
# ov3 on a GPU through wgpu/Vulkan against PyTorch CUDA eager on the same card, in one run (issue 22).
# Runs ON the lent GPU machine (bare: PyTorch + CUDA, no Rust), from the repo root, after
# bench/gpu_prepare.sh here:   run(command="bash bench/gpu.sh", carry=[".gpu", ".gl"], timeout_s=560)
# Prints and writes $OUT/gpu.jsonl (every JSON line) and $OUT/gpu.md (the table with ratios), within ~8 min.
#   OV3_GPU_SMOKE=1 bench/gpu.sh    tiny sizes, CPU torch, lavapipe: the local end-to-end test of this script
#   OV3_GPU_BUILD=vulkan            the second call: the `--features vulkan` binary from .gpu-vk/ (cubecl's SPIR-V
#                                   compiler, cooperative-matrix matmuls; burn's ops stand in for our WGSL kernels,
#                                   AdamW's and clipping's CubeCL kernels run),
#                                   fewer rows
# PyTorch's rows are measured once per machine: a second call while it is still warm reuses the first's.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${OV3_GPU_BUILD:-}" in "" | vulkan) ;; *) echo "OV3_GPU_BUILD must be unset or vulkan, not '$OV3_GPU_BUILD'" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/ov3-gpu-out}
mkdir -p "$OUT"
log="$OUT/gpu.jsonl"
: >"$log"
start=$(date +%s)
note() { echo "## $*"; }

# The binary and, if the machine has none, the Vulkan loader.
# OV3=path uses that binary instead (the local smoke test: .gpu/ may hold an older build).
vulkan=0 dir=.gpu
[ "${OV3_GPU_BUILD:-}" = vulkan ] && vulkan=1 dir=.gpu-vk
if [ -n "${OV3:-}" ]; then ov3=$OV3
elif [ -f $dir/ov3.xz ]; then xz -dc $dir/ov3.xz >/tmp/ov3-$dir && chmod +x /tmp/ov3-$dir; ov3=/tmp/ov3-$dir
else ov3=${CARGO_TARGET_DIR:-target}/debug/ov3; fi
# The loader and glvnd (libGLX_nvidia, NVIDIA's Vulkan ICD, needs libGLdispatch): unpacked always, since a
# machine with libvulkan may still lack glvnd ("Could not get 'vkCreateInstance'" from the loader).
if [ "${OV3_GPU_SMOKE:-0}" != 1 ] && ls .gl/*.deb >/dev/null 2>&1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
note "commit $( { [ -z "${OV3:-}" ] && cat $dir/commit 2>/dev/null; } || git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/## nvidia-smi: /'
info=$("$ov3" info --backend wgpu 2>&1)
if ! grep -q "wgpu on" <<<"$info" && [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  echo "## no adapter at first: $(echo "$info" | tail -1)"
  # No adapter found: point the loader at NVIDIA's ICD (the device notes' recipe).
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  info=$("$ov3" info --backend wgpu 2>&1)
fi
echo "$info" | grep -iE "adapter|wgpu|backend|driver|limit|f16|compiled" | head -20

if [ "${OV3_GPU_SMOKE:-0}" = 1 ]; then
  torch_dev=cpu seqs=64 step_steps=1 warm=1
  shapes=("tiny 2 32")
  kernel_shapes=("tiny 2 32")
else
  torch_dev=cuda seqs=64,256,1024 step_steps=5 warm=3
  shapes=("tiny 8 128" "tiny 64 128" "small 64 128" "base 32 256")
  kernel_shapes=("tiny 8 128" "base 32 256")
fi
# The rows' variants (attention, precision, our kernels or burn's): both attention paths, burn's ops in place of
# every kernel of ours (norm, softmax, GELU, head split, AdamW, clipping), mixed precision on the reference path.
variants=("reference f32 ov3" "reference f32 burn" "fused f32 ov3" "reference f16 ov3")
# Fused attention with each row shared by 4 lanes (OV3_FLASH_SPLIT=4, subgroup shuffles) at the smallest and the
# largest shape, beside the fused rows' one row per lane.
split_shapes=("tiny 8 128" "base 32 256" "tiny 2 32")
# What stays on the machine between calls while it is warm (the same card): PyTorch's rows, measured once and
# reused by the other call, and every call's lines, so the last call's tables hold both builds side by side.
state=${OV3_GPU_STATE:-/tmp/ov3-gpu-state}
mkdir -p "$state"
baseline=$state/pytorch.jsonl
if [ $vulkan = 1 ]; then
  # SPIR-V: no fused attention or WGSL kernels of ours, only the CubeCL ones, AdamW's and clipping's (what a user
  # of that build gets: the rows say "burn's ops but our AdamW and clipping"); bf16 where the driver has bfloat16.
  variants=("reference f32 ov3" "reference f16 ov3" "reference bf16 ov3")
  [ "${OV3_GPU_SMOKE:-0}" = 1 ] || shapes=("tiny 8 128" "base 32 256")
  kernel_shapes=("${kernel_shapes[-1]}")
fi

# Each command has its own time limit, so one hang costs its slot, not the whole call.
run() { # run SECONDS CMD...: JSON lines to the log and stdout, the rest to stdout
  local secs=$1; shift
  timeout "$secs" "$@" 2>&1 | tee -a "$log.raw" | grep -E '^\{' | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "## FAILED ($rc, limit ${secs}s): $*"
}

note "attention ($([ $vulkan = 1 ] || echo "fused WGSL vs ")burn unfused vs burn built-in), seq $seqs"
run 120 "$ov3" bench attention --seq "$seqs"

for shape in "${shapes[@]}"; do
  read -r preset batch res <<<"$shape"
  note "step: $preset batch $batch at $res px ($(( $(date +%s) - start )) s so far)"
  shape_rows=$(grep -F "\"preset\": \"$preset\", \"batch\": $batch, \"res\": $res," "$baseline" 2>/dev/null)
  kept=$(for p in f32 "bf16 autocast"; do grep -F "\"precision\": \"$p\"" <<<"$shape_rows" | tail -1; done)
  if [ "$(grep -c . <<<"$kept")" = 2 ]; then
    echo "## PyTorch rows from an earlier call on this machine"
    echo "$kept" | tee -a "$log"
  else
    for amp in "" --amp; do
      n=$(wc -l <"$log")
      run 150 python3 bench/torch_ref.py --device "$torch_dev" $amp --preset "$preset" --batch "$batch" --res "$res" \
        --steps "$step_steps" --warmup "$warm" --threads 16
      tail -n +$((n + 1)) "$log" | grep -F '"impl": "pytorch"' >>"$baseline"
    done
  fi
  shape_variants=("${variants[@]}")
  if [ $vulkan = 0 ] && [[ " ${split_shapes[*]/%/,} " == *" $shape,"* ]]; then
    shape_variants+=("fused f32 ov3 4")
  fi
  for variant in "${shape_variants[@]}"; do
    read -r attention precision ops split <<<"$variant"
    OV3_FLASH_SPLIT=${split:-1} run 150 "$ov3" bench step --backend wgpu --attention "$attention" \
      --precision "$precision" --preset "$preset" --batch "$batch" --res "$res" --steps "$step_steps" \
      --warmup "$warm" --kernels count --wgpu-ops "$ops"
  done
done

# Where a step's time goes: every kernel of one more step timed on the device, one at a time (their sum is
# the device's share of the step; the rest is host and dispatch cost).
for shape in "${kernel_shapes[@]}"; do
  read -r preset batch res <<<"$shape"
  note "kernels: $preset batch $batch at $res px ($(( $(date +%s) - start )) s so far)"
  run 150 "$ov3" bench step --backend wgpu --preset "$preset" --batch "$batch" --res "$res" \
    --steps "$step_steps" --warmup "$warm" --kernels time
done

# The host's share of a step: the smallest shape on wgpu's no-op adapter (dressed as this card; every command
# validated and recorded, none run: the step's host cost on this machine's CPU, the floor under its GPU step), with
# cubecl's default memory pool and with exclusive pages (less host work per allocation, more memory), and the card's
# own step with exclusive pages at the smallest and (time allowing) the largest shape (docs/PERFORMANCE.md, "The
# host's share of a step").
if [ $vulkan = 0 ]; then
  read -r preset batch res <<<"${shapes[0]}"
  note "host: $preset batch $batch at $res px on the no-op adapter, and exclusive memory pages ($(( $(date +%s) - start )) s so far)"
  for memory in adaptive exclusive; do
    OV3_WGPU_MEMORY=$memory run 90 "$ov3" bench step --noop --preset "$preset" --batch "$batch" --res "$res" \
      --steps 20 --warmup "$warm" --kernels count
  done
  host_shapes=("${shapes[0]}")
  [ "${shapes[-1]}" = "${shapes[0]}" ] || host_shapes+=("${shapes[-1]}")
  for shape in "${host_shapes[@]}"; do
    read -r preset batch res <<<"$shape"
    if [ "$shape" = "${shapes[0]}" ] || (( $(date +%s) - start <= 300 )); then
      OV3_WGPU_MEMORY=exclusive run 150 "$ov3" bench step --backend wgpu --preset "$preset" --batch "$batch" \
        --res "$res" --steps "$step_steps" --warmup "$warm" --kernels count
    fi
  done
  # AdamW one launch per parameter (OV3_ADAMW_GATHER=off) at the smallest shape, beside its default row (on a
  # card, 7-16 parameters a launch): what the ~200 launches it saves are worth here (on lavapipe it costs, so
  # CPU adapters do not gather; docs/PERFORMANCE.md, "AdamW's shared launches on a CPU adapter").
  read -r preset batch res <<<"${shapes[0]}"
  OV3_ADAMW_GATHER=off run 150 "$ov3" bench step --backend wgpu --preset "$preset" --batch "$batch" --res "$res" \
    --steps "$step_steps" --warmup "$warm" --kernels count
fi

# The largest shape once more with cubecl's most thorough matmul autotuning (every candidate kernel timed per
# shape, instead of the first within 60% of its roofline): whether better matmul kernels exist for this card.
# Skipped past 330 s, so the call still ends with the tables inside its ~560 s.
read -r preset batch res <<<"${kernel_shapes[-1]}"
if [ $vulkan = 0 ] && (( $(date +%s) - start <= 330 )); then
  note "autotune full: $preset batch $batch at $res px ($(( $(date +%s) - start )) s so far)"
  CUBECL_AUTOTUNE_LEVEL=full run 200 "$ov3" bench step --backend wgpu --preset "$preset" --batch "$batch" \
    --res "$res" --steps "$step_steps" --warmup "$warm" --kernels time
else
  note "autotune full: skipped ($(( $(date +%s) - start )) s so far)"
fi

cat "$log" >>"$state/calls.jsonl"
python3 - "$state/calls.jsonl" "$OUT/gpu.md" <<'PY'
import json, sys
# Every call's lines on this machine, in order; a PyTorch row a later call reused appears once.
lines = [l.strip() for l in open(sys.argv[1]) if l.strip().startswith("{")]
rows = [json.loads(l) for i, l in enumerate(lines) if not ('"impl": "pytorch"' in l and l in lines[:i])]
out = []
# The step's kernel launches (`--kernels count`) printed right after it; the rows of the timed-kernels runs
# (`--kernels time`) repeat a step above and go in the last table only.
for r, nxt in zip(rows, rows[1:] + [{}]):
    if r.get("bench") == "step" and nxt.get("bench") == "kernels":
        r["launches"] = nxt["launches_per_step"]
        r["timed_run"] = bool(nxt.get("timing"))
# A timed run repeats a row above unless it tuned its matmuls differently from the script's level (minimal).
import os
levels = {"0": "minimal", "1": "balanced", "2": "extensive", "3": "full"}
script_level = levels.get(os.environ.get("CUBECL_AUTOTUNE_LEVEL", ""), os.environ.get("CUBECL_AUTOTUNE_LEVEL", ""))
if script_level not in levels.values():
    script_level = "balanced"  # cubecl's default, as `ov3 bench step` reports it
tuned = lambda r: r["impl"] != "pytorch" and r.get("autotune", script_level) != script_level
# Which ov3 build: burn's kernel fusion (`--features fusion`), cubecl's SPIR-V compiler (`--features vulkan`).
build = lambda r: (" (fusion)" if r.get("fusion") else "") + (" (SPIR-V)" if r.get("compiler") == "wgpu<spirv>" else "")
steps = [r for r in rows if r.get("bench") == "step" and (not r.get("timed_run") or tuned(r))]
if steps:
    out += ["| preset | batch | res | implementation | precision | ms / step | images / s | peak MiB | kernel launches | vs PyTorch f32 | vs PyTorch bf16 |",
            "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for key in sorted({(r["preset"], r["batch"], r["res"]) for r in steps}, key=lambda k: (k[0] != "tiny", k)):
        group = [r for r in steps if (r["preset"], r["batch"], r["res"]) == key]
        base = {r.get("precision"): r["ms_per_step"] for r in group if r["impl"] == "pytorch"}
        for r in group:
            impl = "PyTorch eager" if r["impl"] == "pytorch" else f'ov3 wgpu{build(r)}, {r.get("attention", "")} attention'
            if r.get("attention") == "fused" and r.get("split", 1) > 1:
                impl += f', rows over {r["split"]} lanes'
            if r.get("wgpu_ops") == "burn":
                impl += ", burn's ops (none of our kernels)"
            elif r.get("wgpu_ops") == "cubecl":
                impl += ", burn's ops but our AdamW and clipping (CubeCL)"
            if tuned(r):
                impl += f', matmuls autotuned {r["autotune"]}'
            if r.get("adamw_per_launch") == 1 and r.get("wgpu_ops") == "ov3" and not build(r):
                impl += ", AdamW a launch per parameter"
            if r.get("memory") == "exclusive":
                impl += ", exclusive memory pages"
            if r.get("noop"):
                impl += ", NO-OP ADAPTER: host cost only, nothing ran"
            prec = r.get("precision", "f32")
            ratio = lambda p: f'{r["ms_per_step"] / base[p]:.2f}x' if p in base else "-"
            out.append(f'| {key[0]} | {key[1]} | {key[2]} | {impl} | {prec} | {r["ms_per_step"]:.1f} | '
                       f'{r["images_per_s"]:.1f} | {r["peak_mib"]:.0f} | {r.get("launches", "-")} | {ratio("f32")} | {ratio("bf16 autocast")} |')
att = [r for r in rows if r.get("bench") == "attention"]
if att:
    out += ["", "| attention seq | implementation | forward ms | fwd+bwd ms | held for backward MiB | fwd+bwd speed vs unfused (>1 faster) | error vs unfused |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for r in att:
        # Against the unfused path of the same build.
        unfused = next((u for u in att if u["seq"] == r["seq"] and u["impl"].startswith("unfused") and build(u) == build(r)), None)
        speed = f'{unfused["forward_backward_ms"] / r["forward_backward_ms"]:.2f}x' if unfused else "-"
        out.append(f'| {r["seq"]} | {r["impl"]}{build(r)} | {r["forward_ms"]:.2f} | {r["forward_backward_ms"]:.2f} | '
                   f'{r["held_for_backward_mib"]:.1f} | {speed} | {r.get("error_vs_unfused") if r.get("error_vs_unfused") is not None else "-"} |')
timed = [r for r in rows if r.get("bench") == "kernels" and r.get("timing")]
if timed:
    out += ["", "| preset | batch | res | build | autotune | launches / step | device ms (kernels one at a time) | step ms | device share | top kernels (ms) |",
            "|---|---:|---:|---|---|---:|---:|---:|---:|---|"]
    for r in timed:
        top = "; ".join(f'{k["kernel"].replace(" | ", "/")} x{k["launches"]} {k["ms"]:.1f}' for k in r["top"][:4])
        out.append(f'| {r["preset"]} | {r["batch"]} | {r["res"]} | wgpu{build(r)} | {r.get("autotune", script_level)} | {r["launches_per_step"]} | '
                   f'{r["device_ms_per_step"]:.1f} | {r["step_ms"]:.1f} | {r["device_ms_per_step"] / r["step_ms"]:.0%} | {top} |')
text = "\n".join(out)
print(text)
open(sys.argv[2], "w").write(text + "\n")
PY
note "done in $(( $(date +%s) - start )) s; results in $OUT/gpu.jsonl and $OUT/gpu.md"
