#!/usr/bin/env bash
# Builds the demo page into dist/ (or the folder given as $1): the ov3-web crate for wasm32 with the `web`
# profile, wasm-bindgen's ES-module glue, binaryen's wasm-opt -Oz when `npm ci --prefix web/tests` has
# installed it (roughly halves the module; OV3_WASM_OPT=0 skips it, as CI does), then index.html, the
# stylesheet, the demo checkpoint, the embedded autoencoder, the samples and the photos beside it.
# Needs: `rustup target add wasm32-unknown-unknown` and wasm-bindgen-cli at the version in Cargo.lock.
set -euo pipefail
cd "$(dirname "$0")/.."
dist="${1:-dist}"
target="${CARGO_TARGET_DIR:-target}"

want=$(sed -n '/^name = "wasm-bindgen"$/{n;s/^version = "\(.*\)"$/\1/p;}' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
  echo "web/build.sh: needs wasm-bindgen $want (found: ${have:-none}); cargo install wasm-bindgen-cli --version $want" >&2
  exit 1
fi

cargo build --locked -p ov3-web --target wasm32-unknown-unknown --profile web
rm -rf "$dist"
mkdir -p "$dist"
wasm-bindgen --target web --no-typescript --out-dir "$dist" --out-name ov3-web \
  "$target/wasm32-unknown-unknown/web/ov3_web.wasm"

opt=web/tests/node_modules/.bin/wasm-opt
# Debian's binaryen 108 breaks burn's module (a Table.set error at start-up): only npm's 132 is used.
if [ "${OV3_WASM_OPT:-1}" != 0 ] && [ -x "$opt" ]; then
  "$opt" -Oz --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext --enable-mutable-globals \
    --enable-reference-types --enable-multivalue "$dist/ov3-web_bg.wasm" -o "$dist/ov3-web_bg.wasm.opt"
  mv "$dist/ov3-web_bg.wasm.opt" "$dist/ov3-web_bg.wasm"
elif [ "${OV3_WASM_OPT:-1}" != 0 ]; then
  echo "web/build.sh: no $opt (npm ci --prefix web/tests): the wasm module stays unoptimised (2x larger)" >&2
fi

cp index.html web/style.css assets/demo/ov3-tiny-demo.safetensors assets/ae/ov3_tiny_ae.safetensors "$dist/"
cp -r web/samples assets/photos "$dist/"
echo "web/build.sh: $dist/ ($(du -sh "$dist" | cut -f1)); serve it with any static server, e.g. python3 -m http.server -d $dist 8080"
