#!/usr/bin/env bash
# The Python package's tests on the simulated device, with no torch: builds libhbmalloc.so
# (debug), then runs python/tests with the package on PYTHONPATH and HBMALLOC_LIB naming the
# library just built.
#   bash scripts/test-python.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --lib
export HBMALLOC_LIB="$PWD/target/debug/libhbmalloc.so"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export HBMALLOC_CONF="backend:sim,leak_report:off"
python3 -m unittest discover -s python/tests -v
