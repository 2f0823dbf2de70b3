#!/usr/bin/env bash
# The library must build and install on a machine without the CUDA runtime (no .whl/, no nvidia
# wheel in python3): configures a copy of this tree that has no .whl/ (as a fresh clone), with
# python3's wheels out of reach, checks that configuring warns exactly once and names what is
# missing and how to get it, installs with `cmake --install` alone (no explicit build), runs the
# remaining C tests, then checks the installed package with scripts/test-package.sh.
#
#   bash scripts/test-install-no-runtime.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
fail() { echo "test-install-no-runtime: FAIL: $*" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
SRC="$WORK/src"
BUILD="$WORK/build"
mkdir "$SRC"
# Tracked files and new ones not ignored (what a clone of this branch would hold; no .whl/),
# less those deleted in the working tree.
git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
    | xargs -0 cp --parents -t "$SRC"
[[ -f "$SRC/Cargo.toml" && ! -e "$SRC/.whl" ]] || fail "the copy of the tree is wrong"

# cargo's target folder is this tree's, so the dependencies are not built again.
env -u HBMALLOC_CUDA_RUNTIME_DIR cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_DISABLE_FIND_PACKAGE_Python3=ON -DHBMALLOC_CARGO_TARGET_DIR="$ROOT/target" \
    >"$WORK/configure.log" 2>&1 || { cat "$WORK/configure.log"; fail "configuring failed"; }
cat "$WORK/configure.log"
warnings="$(grep -c '^CMake Warning' "$WORK/configure.log" || true)"
((warnings == 1)) || fail "configuring printed $warnings warnings, want exactly 1"
# CMake wraps a warning's text: compare with the line breaks taken out.
flat="$(tr -s ' \n' ' ' <"$WORK/configure.log")"
grep -q 'interposition tests (interpose_runtime\*) skipped: no CUDA runtime found' <<<"$flat" \
    || fail "the warning does not say what is missing"
grep -q 'bash scripts/install-test-deps.sh' <<<"$flat" \
    || fail "the warning does not say how to get the runtime"

cmake --install "$BUILD" --prefix "$WORK/prefix"
[[ -f "$WORK/prefix/include/hbmalloc.h" ]] || fail "cmake --install installed no header"
cmake --build "$BUILD" --parallel "$(nproc)"
(cd "$BUILD" && ctest --output-on-failure) || fail "the C tests that need no runtime failed"
if (cd "$BUILD" && ctest -N | grep -q interpose_runtime); then
    fail "the interposition tests are registered without a runtime"
fi
bash scripts/test-package.sh "$BUILD"
echo "test-install-no-runtime: configured, installed and used without the CUDA runtime"
