#!/usr/bin/env bash
# The whole test suite: Rust unit + integration tests (CPU and native wgpu backends), the wasm
# build, and the browser tests in headless Chromium (WebGPU). Run scripts/setup.sh once first.
set -euo pipefail
cd "$(dirname "$0")/.."

# Native wgpu on machines without a GPU: Mesa's lavapipe (Vulkan) crashes building cubecl's
# pipelines, llvmpipe through GL works. Hiding the Vulkan ICDs makes wgpu pick GL. A machine
# with a real GPU can run `cargo test` directly.
if [ -z "${PHI2_KEEP_VULKAN:-}" ] && ! ls /dev/dri/renderD* >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null; then
    export VK_ICD_FILENAMES=/nonexistent.json
fi

echo "== Rust tests"
cargo test --workspace --no-fail-fast

echo "== wasm build"
scripts/build-pkg.sh

echo "== browser tests"
PHI2_BIN="$PWD/target/debug/phi2" node --test tests/browser/
