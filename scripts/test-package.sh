#!/usr/bin/env bash
# Tests the installed package the way another project uses it: `cmake --install` into a temporary
# prefix, then build and run c_tests/package/consumer.c twice, once with CMake's
# find_package(hbmalloc) + hbmalloc::hbmalloc and once with `pkg-config --cflags --libs hbmalloc`.
# The prefix is moved after installing, so both ways must also be relocatable.
#
#   bash scripts/test-package.sh [BUILD_DIR]   (default build/cmake; configured and built if absent)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
BUILD_DIR="${1:-build/cmake}"

if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
    cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DHBMALLOC_BUILD_TESTS=OFF
fi
cmake --build "$BUILD_DIR" --parallel "$(nproc)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cmake --install "$BUILD_DIR" --prefix "$WORK/staging"
# Installed somewhere, used from somewhere else: nothing may point back at the staging prefix.
mv "$WORK/staging" "$WORK/prefix"
PREFIX="$WORK/prefix"

fail() { echo "test-package: FAIL: $*" >&2; exit 1; }
LIBDIR="$(cd "$PREFIX" && ls -d lib*/ | head -n1)"
LIBDIR="${LIBDIR%/}"
for f in include/hbmalloc.h "$LIBDIR/libhbmalloc.so" "$LIBDIR/cmake/hbmalloc/hbmallocConfig.cmake" \
         "$LIBDIR/cmake/hbmalloc/hbmallocConfigVersion.cmake" "$LIBDIR/pkgconfig/hbmalloc.pc" bin/hbmalloc; do
    [[ -f "$PREFIX/$f" ]] || fail "$f is not installed"
done
if [[ -f include/hbmalloc.hpp && ! -f "$PREFIX/include/hbmalloc.hpp" ]]; then
    fail "include/hbmalloc.hpp exists but is not installed"
fi
echo "test-package: installed files present under $PREFIX"

export HBMALLOC_CONF=backend:sim
unset LD_PRELOAD

# find_package(hbmalloc 0.1) + target_link_libraries(... hbmalloc::hbmalloc)
cmake -S c_tests/package -B "$WORK/consumer-cmake" -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_TYPE=Release
cmake --build "$WORK/consumer-cmake"
readelf -d "$WORK/consumer-cmake/consumer" | grep -q 'NEEDED.*\[libhbmalloc.so\]' \
    || fail "the CMake consumer does not record libhbmalloc.so as NEEDED"
"$WORK/consumer-cmake/consumer" cmake || fail "the CMake consumer failed"

# pkg-config --cflags --libs hbmalloc
export PKG_CONFIG_PATH="$PREFIX/$LIBDIR/pkgconfig"
pkg-config --exists --print-errors hbmalloc || fail "pkg-config does not find hbmalloc"
[[ "$(pkg-config --modversion hbmalloc)" == "$(grep -m1 '^version' Cargo.toml | cut -d'"' -f2)" ]] \
    || fail "pkg-config --modversion $(pkg-config --modversion hbmalloc) is not Cargo.toml's version"
LIBS_DIR="$(pkg-config --variable=libdir hbmalloc)"
# shellcheck disable=SC2046 # word splitting of the flags is intended
cc -std=c11 -Wall -Wextra -Werror -o "$WORK/consumer-pc" c_tests/package/consumer.c \
    $(pkg-config --cflags --libs hbmalloc) -Wl,-rpath,"$LIBS_DIR"
"$WORK/consumer-pc" pkg-config || fail "the pkg-config consumer failed"

cd "$ROOT"
echo "test-package: find_package and pkg-config consumers built and ran against the installed package"
