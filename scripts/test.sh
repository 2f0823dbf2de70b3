#!/usr/bin/env bash
# Every test, on a machine with no GPU: cargo's tests, then the C tests under CTest (the C API
# through the header; the real CUDA runtime's entry points served by hbmalloc under LD_PRELOAD),
# then the installed package as another project sees it, and once more built and installed
# without the CUDA runtime. Installs what is missing first
# (scripts/install-test-deps.sh). Exits non-zero on the first failure.
#
#   bash scripts/test.sh
#
# Environment: BUILD_DIR (default build/cmake), JOBS (default: all cores).
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR="${BUILD_DIR:-build/cmake}"
JOBS="${JOBS:-$(nproc)}"
step() { printf '\n==== %s\n' "$*"; }

step "dependencies"
bash scripts/install-test-deps.sh

# Debug, the profile the tests are written and run in day to day (they pass in release too);
# the CMake build below builds the release library that the C tests use.
# The wheel's lib/ is on the library path for tests that load NVRTC (libnvrtc.so.13) at run time.
step "cargo test"
# Quiet when clean: a report of ours among passing tests reads like a failure, so one fails the run.
cargo_log=$(mktemp)
LD_LIBRARY_PATH="$PWD/.whl/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cargo test --locked 2>&1 | tee "$cargo_log"
if grep -n '^hbmalloc: ' "$cargo_log"; then
    echo "scripts/test.sh: cargo test printed the hbmalloc lines above among passing tests" >&2
    exit 1
fi
rm -f "$cargo_log"

step "cmake configure + build ($BUILD_DIR)"
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release \
    -DHBMALLOC_CUDA_RUNTIME_DIR="$PWD/.whl/nvidia/cu13"
cmake --build "$BUILD_DIR" --parallel "$JOBS"

step "ctest"
(cd "$BUILD_DIR" && ctest --output-on-failure --parallel "$JOBS")

step "package: install, then find_package and pkg-config consumers"
bash scripts/test-package.sh "$BUILD_DIR"

step "without the CUDA runtime: configure, install, use the package"
bash scripts/test-install-no-runtime.sh

step "python package (python/hbmalloc) on the simulated device"
bash scripts/test-python.sh

step "all tests passed"
