#!/usr/bin/env bash
# Prepares scripts/gpu-run.py's run on a lent GPU machine: the release binary of this tree and,
# to compare, of an older commit (default: the one before the GPU kernels of issue #19),
# xz-compressed into .gpu/, and the Vulkan/EGL loaders the GPU machine's image lacks into .gl/
# (Debian packages, amd64). Both folders are ignored by git and carried by the run:
#   scripts/gpu-prepare.sh [OLD_COMMIT]
#   then, on the device: PYTHONUNBUFFERED=1 DEADLINE=480 python3 scripts/gpu-run.py
set -euo pipefail
cd "$(dirname "$0")/.."
old="${1:-5992f22}"

grep -qx '/.gl/' .git/info/exclude 2>/dev/null || echo /.gl/ >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
mkdir -p .gl .gpu /tmp/amd64-lists/partial

if ! ls .gl/libvulkan1_*.deb >/dev/null 2>&1; then
    apt=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64-lists)
    apt-get "${apt[@]}" update >/dev/null
    (cd .gl && apt-get "${apt[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
fi

cargo build --release
xz -T2 -6 -c target/release/phi2 > .gpu/phi2.xz

# The old binary from a worktree of its own, in its own target folder (a second full build).
if [ -n "$old" ] && [ ! -f .gpu/phi2-old.xz ]; then
    worktree=/tmp/phi2-old-worktree
    [ -d "$worktree" ] || git worktree add --detach "$worktree" "$old"
    (cd "$worktree" && cargo build --release --target-dir /tmp/phi2-old-target)
    xz -T2 -6 -c /tmp/phi2-old-target/release/phi2 > .gpu/phi2-old.xz
fi
ls -la .gpu .gl
