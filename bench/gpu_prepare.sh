#!/usr/bin/env bash
# Run HERE (the 2-core machine) before a GPU session's one call: builds the `ov3` binary, strips and
# compresses it into .gpu/ (16 MB instead of 141), and downloads the Vulkan loader packages into .gl/ (the
# lent machine is bare and may lack libvulkan). Both folders are git-ignored locally and travel with `carry`.
# Then, through the device tool:  run(command="bash bench/gpu.sh", carry=[".gpu", ".gl"], timeout_s=560)
# and, in the device time left, run(command="bash bench/gpu_ae.sh", carry=[".gpu-ae"], timeout_s=...)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${OV3_GPU_BUILD:-}" in "" | vulkan) ;; *) echo "OV3_GPU_BUILD must be unset or vulkan, not '$OV3_GPU_BUILD'" >&2; exit 2 ;; esac
grep -qx '/.gl/' .git/info/exclude 2>/dev/null || echo /.gl/ >>.git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >>.git/info/exclude
# OV3_GPU_FUSION=1 builds with burn's kernel fusion (`--features fusion`, a cold build of the burn stack the
# first time: ~45 min on 2 cores), the comparison issue 22 needs next (docs/GPU.md).
# OV3_GPU_BUILD=vulkan builds `--features vulkan` (cubecl compiles SPIR-V on Vulkan: cooperative-matrix
# matmuls, burn's ops in place of our WGSL kernels) into .gpu-vk/ instead, for the second call:
#   run(command="OV3_GPU_BUILD=vulkan bash bench/gpu.sh", carry=[".gpu-vk", ".gl"], timeout_s=...)
# (two binaries do not fit one transfer beside the tracked tree). Its features rebuild cubecl and burn (12 min
# on 2 cores after the default build, in the same target dir: cargo keeps both sets of artifacts, and switching
# back to the default build relinks nothing).
features=()
dir=.gpu
[ "${OV3_GPU_FUSION:-0}" = 1 ] && features=(--features fusion)
[ "${OV3_GPU_BUILD:-}" = vulkan ] && features=(--features vulkan) && dir=.gpu-vk
grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >>.git/info/exclude
cargo build -q -p ov3 "${features[@]}"
mkdir -p "$dir" .gl /tmp/amd64/partial
cp "${CARGO_TARGET_DIR:-target}/debug/ov3" "$dir/ov3"
strip "$dir/ov3"
xz -f -T2 -6 "$dir/ov3"
o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
apt-get "${o[@]}" update -qq
# libvulkan1 and glvnd: NVIDIA's Vulkan ICD (libGLX_nvidia) needs libGLdispatch; without it the loader says
# "Could not get 'vkCreateInstance'" and wgpu finds no adapter (session 22, H100).
(cd .gl && apt-get "${o[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 >/dev/null)
echo "$(git rev-parse --short HEAD)${features:+ ${features[*]}}" >"$dir/commit"
ls -l "$dir" .gl
[ "$dir" = .gpu ] || exit 0

# The autoencoder's training images for bench/gpu_ae.sh (issue 23), if `ov3 data prepare real` can run here
# (it needs the Debian/PyPI packages the README names): real photographs + 1200 world scenes, shrunk to
# JPEG (tools/pack_ae_data.py), as many as fit beside the tracked tree in one transfer (the device tool refused 64.2 MB in all
# and took 59.6 MB in session 22, so the pack stays 3 MB under 64 MB).
grep -qx '/.gpu-ae/' .git/info/exclude 2>/dev/null || echo /.gpu-ae/ >>.git/info/exclude
real=${OV3_REAL:-/tmp/ov3-real}
ov3=${CARGO_TARGET_DIR:-target}/debug/ov3
if [ -d "$real/train" ] || "$ov3" data prepare real --out "$real"; then
  [ -d /tmp/ov3-world ] || "$ov3" datagen --n 1200 --res 128 --out /tmp/ov3-world
  rm -rf .gpu-ae
  tracked=$(git ls-files -z | xargs -0 cat | wc -c)
  python3 tools/pack_ae_data.py --out .gpu-ae "$real/train" /tmp/ov3-world \
    --max-mb "$(python3 -c "print(round(64 - $tracked / 1e6 - 3, 1))")"
  mv .gpu-ae/ov3-world .gpu-ae/world
  du -sh .gpu-ae
else
  echo "no real photographs here: bench/gpu_ae.sh cannot run (bench/gpu.sh can)"
fi
