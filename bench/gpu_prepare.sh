#!/usr/bin/env bash
# Run HERE (the 2-core machine) before a GPU session's one call: builds the `ov3` binary, strips and
# compresses it into .gpu/ (16 MB instead of 141), and downloads the Vulkan loader packages into .gl/ (the
# lent machine is bare and may lack libvulkan). Both folders are git-ignored locally and travel with `carry`.
# Then, through the device tool:  run(command="bash bench/gpu.sh", carry=[".gpu", ".gl"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gl/' .git/info/exclude 2>/dev/null || echo /.gl/ >>.git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >>.git/info/exclude
cargo build -q -p ov3
mkdir -p .gpu .gl /tmp/amd64/partial
cp "${CARGO_TARGET_DIR:-target}/debug/ov3" .gpu/ov3
strip .gpu/ov3
xz -f -T2 -6 .gpu/ov3
o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
apt-get "${o[@]}" update -qq
(cd .gl && apt-get "${o[@]}" download libvulkan1 >/dev/null)
git rev-parse --short HEAD >.gpu/commit
ls -l .gpu .gl
