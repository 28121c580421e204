#!/usr/bin/env sh
# trunk post-build hook: shrink the wasm module with binaryen's wasm-opt (-Oz roughly halves it) when one
# is installed — `npm ci --prefix web/tests` provides binaryen 132. Debian's binaryen 108 breaks burn's
# module (a Table.set error at start-up), so only that one is used. Without it the page works, larger.
set -eu
opt="$TRUNK_SOURCE_DIR/web/tests/node_modules/.bin/wasm-opt"
if [ ! -x "$opt" ]; then
  echo "wasm-opt: $opt not found (npm ci --prefix web/tests); the wasm module stays unoptimised" >&2
  exit 0
fi
for wasm in "$TRUNK_STAGING_DIR"/*.wasm; do
  "$opt" -Oz --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext --enable-mutable-globals \
    --enable-reference-types --enable-multivalue "$wasm" -o "$wasm.opt"
  mv "$wasm.opt" "$wasm"
done
