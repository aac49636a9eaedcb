#!/usr/bin/env bash
# Builds the npm package: the crate for wasm32 twice (pkg/dist/wasm/, and pkg/dist/wasm-threads/
# for the CPU backend on several threads), wasm-bindgen, and the JS
# wrapper and typings from pkg/src/ into pkg/dist/. Then copies pkg/dist/ to web/pkg/ (the
# demo page's import path) with a list of its files for the service worker.
# Usage: scripts/build-pkg.sh [--dev]   (--dev: unoptimised, faster to build)
set -euo pipefail
cd "$(dirname "$0")/.."
# wasm-size: release tuned for download size (opt-level z, whole-program LTO; see Cargo.toml).
profile=wasm-size
[ "${1:-}" = "--dev" ] && profile=dev
out_dir=$([ "$profile" = dev ] && echo debug || echo "$profile")

# The main build (WebGPU and the one-thread CPU backend), then the threads build: the CPU
# backend on a pool of Web Workers sharing one memory, for cross-origin isolated pages. Atomics
# need std compiled with them (-Zbuild-std), and wgpu's WebGPU backend does not build with them,
# so that build is CPU-only. Each has its target folder, so both stay incremental.
args=(build -p phi2-web --lib --target wasm32-unknown-unknown --no-default-features --profile "$profile")
# A shared memory the engine's JS makes and every pool worker imports, up to wasm32's 4 GiB, and the
# thread-local storage hooks wasm-bindgen starts each thread with.
threads_link="--shared-memory --import-memory --max-memory=4294967296 --export=__wasm_init_tls --export=__tls_size --export=__tls_align --export=__tls_base"
threads_flags="target.wasm32-unknown-unknown.rustflags=[\"-C\", \"target-feature=+atomics,+bulk-memory,+mutable-globals\", \"-C\", \"link-args=$threads_link\"]"
# Debian's compiler with cargo compiling std itself; rust-lld comes from rustup's toolchain.
lld_dir="$(rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-gnu/bin"
debian_cargo() {
    PATH="$lld_dir:$PATH" RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 cargo "$@" -Zbuild-std=std,panic_abort
}
if [ "$(cat .tools/wasm-toolchain 2>/dev/null)" = debian ]; then
    debian_cargo "${args[@]}" --features webgpu
else
    cargo "${args[@]}" --features webgpu
fi
threads_args=("${args[@]}" --features threads --target-dir target/wasm-threads --config "$threads_flags")
if [ "$(cat .tools/wasm-threads-toolchain 2>/dev/null)" = debian ]; then
    debian_cargo "${threads_args[@]}"
else
    RUSTC_BOOTSTRAP=1 cargo "${threads_args[@]}" -Zbuild-std=std,panic_abort
fi
rm -rf pkg/dist
for build in wasm wasm-threads; do
    target_dir=target
    [ "$build" = wasm-threads ] && target_dir=target/wasm-threads
    wasm-bindgen --target web --no-typescript --out-dir "pkg/dist/$build" \
        "$target_dir/wasm32-unknown-unknown/$out_dir/phi2_web.wasm"
    # The module must run its static constructors once (crate/src/wasm.rs
    # run_static_constructors): where it does not, wasm-ld wraps every export in a
    # `.command_export` that reruns them, about 1 ms per call from JS, dozens per kernel launch.
    if wasm-objdump -x "pkg/dist/$build/phi2_web_bg.wasm" | grep -q 'command_export'; then
        echo "error: $build reruns its static constructors on every export call (.command_export wrappers)" >&2
        exit 1
    fi
    # Function names are half the file; release builds go without (panic messages stay readable).
    [ "$profile" != dev ] && wasm-strip "pkg/dist/$build/phi2_web_bg.wasm"
done
cp pkg/src/*.js pkg/src/*.d.ts pkg/dist/

rm -rf web/pkg
cp -r pkg/dist web/pkg
(cd web/pkg && find . -type f | sed 's|^\./||' | sort | python3 -c \
    'import json, sys; print(json.dumps([l.strip() for l in sys.stdin]))' > files.json)
ls -l pkg/dist/wasm/phi2_web_bg.wasm pkg/dist/wasm-threads/phi2_web_bg.wasm
echo "gzipped: $(gzip -9 -c pkg/dist/wasm/phi2_web_bg.wasm | wc -c) bytes (issue 6: at most 3 MB)," \
    "threads build $(gzip -9 -c pkg/dist/wasm-threads/phi2_web_bg.wasm | wc -c) bytes"
