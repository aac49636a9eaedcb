#!/usr/bin/env bash
# The whole test suite: Rust unit + integration tests (CPU and native wgpu backends), the wasm
# build, and the browser tests in headless Chromium (WebGPU). Run scripts/setup.sh once first.
set -euo pipefail
cd "$(dirname "$0")/.."

# Native wgpu on machines without a GPU: the suite runs on Mesa's llvmpipe through GL (hiding
# the Vulkan ICDs makes wgpu pick it), the adapter closest to a browser's plain WebGPU (no
# subgroups, no shader-f16). Then the kernel tests (tests/rust/kernels.rs: every kernel
# variant, f16, per-model options) and the CLI's `--kernels` test run again on lavapipe
# (Vulkan), which has both. A machine with a real GPU can run `cargo test`.
no_gpu=""
if [ -z "${PHI2_KEEP_VULKAN:-}" ] && ! ls /dev/dri/renderD* >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null; then
    no_gpu=1
fi

echo "== Rust tests"
if [ -n "$no_gpu" ]; then
    VK_ICD_FILENAMES=/nonexistent.json cargo test --workspace --no-fail-fast
    echo "== kernel variants on lavapipe"
    lavapipe=$(ls /usr/share/vulkan/icd.d/lvp_icd.*.json | head -n1)
    VK_ICD_FILENAMES="$lavapipe" PHI2_TEST_ALL_KERNELS=1 cargo test --test kernels -- --nocapture
    VK_ICD_FILENAMES="$lavapipe" PHI2_TEST_ALL_KERNELS=1 \
        cargo test --test cli -- every_kernel_choice --nocapture
else
    cargo test --workspace --no-fail-fast
fi

echo "== wasm build"
scripts/build-pkg.sh

echo "== browser tests"
PHI2_BIN="$PWD/target/debug/phi2" node --test tests/browser/
