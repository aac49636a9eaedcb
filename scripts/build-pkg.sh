#!/usr/bin/env bash
# Builds the npm package: the crate for wasm32, wasm-bindgen into pkg/dist/wasm/, and the JS
# wrapper and typings from pkg/src/ into pkg/dist/. Then copies pkg/dist/ to web/pkg/ (the
# demo page's import path) with a list of its files for the service worker.
# Usage: scripts/build-pkg.sh [--dev]   (--dev: unoptimised, faster to build)
set -euo pipefail
cd "$(dirname "$0")/.."
# wasm-size: release tuned for download size (opt-level z, whole-program LTO; see Cargo.toml).
profile=wasm-size
[ "${1:-}" = "--dev" ] && profile=dev
out_dir=$([ "$profile" = dev ] && echo debug || echo "$profile")

args=(build -p phi2-web --lib --target wasm32-unknown-unknown --no-default-features --profile "$profile")
if [ "$(cat .tools/wasm-toolchain 2>/dev/null)" = debian ]; then
    # Debian's compiler with cargo compiling std itself; rust-lld comes from rustup's toolchain.
    lld_dir="$(rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-gnu/bin"
    PATH="$lld_dir:$PATH" RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
        cargo "${args[@]}" -Zbuild-std=std,panic_abort
else
    cargo "${args[@]}"
fi
rm -rf pkg/dist
wasm-bindgen --target web --no-typescript --out-dir pkg/dist/wasm \
    "target/wasm32-unknown-unknown/$out_dir/phi2_web.wasm"
# The module must run its static constructors once (crate/src/wasm.rs run_static_constructors):
# where it does not, wasm-ld wraps every export in a `.command_export` that reruns them, about
# 1 ms per call from JS, dozens of calls per kernel launch.
if wasm-objdump -x pkg/dist/wasm/phi2_web_bg.wasm | grep -q 'command_export'; then
    echo "error: the wasm reruns its static constructors on every export call (.command_export wrappers)" >&2
    exit 1
fi
# Function names are half the file; release builds go without (panic messages stay readable).
[ "$profile" != dev ] && wasm-strip pkg/dist/wasm/phi2_web_bg.wasm
cp pkg/src/*.js pkg/src/*.d.ts pkg/dist/

rm -rf web/pkg
cp -r pkg/dist web/pkg
(cd web/pkg && find . -type f | sed 's|^\./||' | sort | python3 -c \
    'import json, sys; print(json.dumps([l.strip() for l in sys.stdin]))' > files.json)
ls -l pkg/dist/wasm/phi2_web_bg.wasm
echo "gzipped: $(gzip -9 -c pkg/dist/wasm/phi2_web_bg.wasm | wc -c) bytes (issue 6: at most 3 MB)"
