#!/usr/bin/env bash
# Idempotent set-up for building and testing phi2-web on a Debian-like machine (CI included):
# system packages (Chromium, Firefox, Mesa), the wasm32 toolchain (rustup, or Debian's rustc-web when the
# Rust distribution server is unreachable), wasm-bindgen-cli at the exact version Cargo.lock
# pins, and the test harness's npm packages (playwright-core drives Chromium, puppeteer-core
# Firefox).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tools
log() { echo "setup: $*"; }

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_updated=""
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ -z "$apt_updated" ]; then
        $SUDO apt-get update -qq
        apt_updated=1
    fi
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Chromium and Firefox run the browser tests (WebGPU on SwiftShader and on lavapipe); Mesa's
# EGL/GL (llvmpipe) gives native wgpu an adapter on machines without a GPU, and its lavapipe
# (Vulkan, with subgroups and shader-f16) runs every 4-bit kernel variant and Firefox's
# WebGPU; wabt's wasm-strip drops the wasm's name section (half the file) from release builds.
apt_install chromium firefox-esr libegl1 libegl-mesa0 libgl1-mesa-dri mesa-vulkan-drivers wabt

# wasm32 target: rustup when its server answers, otherwise Debian's rustc-web (same 1.9x
# compiler) with the std sources, built by cargo's -Zbuild-std.
if rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
    echo rustup > .tools/wasm-toolchain
elif timeout 90 rustup target add wasm32-unknown-unknown >/dev/null 2>&1; then
    echo rustup > .tools/wasm-toolchain
else
    log "rustup cannot fetch wasm32-unknown-unknown; using Debian rustc-web + rust-web-src"
    apt_install rustc-web rust-web-src
    test -d /usr/lib/rustlib/src/rust/library || { echo "setup: rust-web-src has no std sources" >&2; exit 1; }
    echo debian > .tools/wasm-toolchain
fi
log "wasm toolchain: $(cat .tools/wasm-toolchain)"

# The threads build compiles std with atomics, from std's sources: rustup's rust-src where it
# can be had, otherwise Debian's rustc-web with rust-web-src.
if [ "$(cat .tools/wasm-toolchain)" = debian ] \
    || ! { rustup component list --installed 2>/dev/null | grep '^rust-src' >/dev/null \
        || timeout 90 rustup component add rust-src >/dev/null 2>&1; }; then
    apt_install rustc-web rust-web-src
    test -d /usr/lib/rustlib/src/rust/library || { echo "setup: rust-web-src has no std sources" >&2; exit 1; }
    echo debian > .tools/wasm-threads-toolchain
else
    echo rustup > .tools/wasm-threads-toolchain
fi
log "wasm threads toolchain: $(cat .tools/wasm-threads-toolchain)"

# wasm-bindgen-cli must match the wasm-bindgen crate exactly.
bindgen_version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
if [ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen $bindgen_version" ]; then
    log "building wasm-bindgen-cli $bindgen_version (a few minutes)"
    # --locked fails when the CLI's lockfile pins a crate the registry no longer serves.
    cargo install -q wasm-bindgen-cli --version "=$bindgen_version" --locked 2>/dev/null \
        || cargo install -q wasm-bindgen-cli --version "=$bindgen_version"
fi

(cd tests && npm ci --no-audit --no-fund --loglevel=error)
log "done"
