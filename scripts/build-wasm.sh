#!/usr/bin/env bash
# Builds the crate for wasm32 and runs wasm-bindgen into web/pkg (the page's import path).
# Usage: scripts/build-wasm.sh [--dev]   (--dev: unoptimised, faster to build)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
[ "${1:-}" = "--dev" ] && profile=dev
out_dir=$([ "$profile" = dev ] && echo debug || echo release)

args=(build -p phi2-web --lib --target wasm32-unknown-unknown --no-default-features --profile "$profile")
if [ "$(cat .tools/wasm-toolchain 2>/dev/null)" = debian ]; then
    # Debian's compiler with cargo compiling std itself; rust-lld comes from rustup's toolchain.
    lld_dir="$(rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-gnu/bin"
    PATH="$lld_dir:$PATH" RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
        cargo "${args[@]}" -Zbuild-std=std,panic_abort
else
    cargo "${args[@]}"
fi
wasm-bindgen --target web --out-dir web/pkg \
    "target/wasm32-unknown-unknown/$out_dir/phi2_web.wasm"
ls -l web/pkg/phi2_web_bg.wasm
