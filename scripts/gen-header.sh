#!/usr/bin/env bash
# Regenerates include/hbmalloc.h from the Rust sources (tools/gen-header: cbindgen + cbindgen.toml).
#   bash scripts/gen-header.sh           write the header; commit it with the change that caused it
#   bash scripts/gen-header.sh --check   also fail when the committed header differs (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
    "" | --check) ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

# Its own target folder: the tool has its own lock file, and must not disturb target/release.
cargo run --quiet --locked --manifest-path tools/gen-header/Cargo.toml \
    --target-dir target/gen-header -- include/hbmalloc.h

# The header is C documentation: no Rust types, syntax or rustdoc markup in its comments.
rust_isms='Option<|Result<|&mut |&self|\bSelf\b|\[`[^]]*`\]|# Safety|\bunsafe\b|\bVec<|\bBox<|::'
if grep -nE "$rust_isms" include/hbmalloc.h; then
    echo "gen-header: include/hbmalloc.h speaks Rust on the lines above: reword the doc comments in src/ffi" >&2
    exit 1
fi

if [[ "${1:-}" == --check ]]; then
    if ! git ls-files --error-unmatch include/hbmalloc.h >/dev/null 2>&1; then
        echo "gen-header: include/hbmalloc.h is not committed" >&2
        exit 1
    fi
    if ! git diff --exit-code -- include/hbmalloc.h; then
        echo "gen-header: include/hbmalloc.h is stale: run 'bash scripts/gen-header.sh' and commit it" >&2
        exit 1
    fi
    echo "gen-header: include/hbmalloc.h is up to date"
fi
