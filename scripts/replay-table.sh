#!/usr/bin/env bash
# Memory held on the recorded traces (bench/traces/*.trace.gz), replayed on the simulated device
# by this tree's `hbmalloc replay` and by a reference commit's, in the same run:
#   bash scripts/replay-table.sh [REF]     (REF: a commit, default fac8d49, before defect 13)
# Prints a Markdown table: per trace, peak in use, then peak reserved and its ratio for each.
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${1:-fac8d49}
work=$(mktemp -d)
trap 'git worktree remove --force "$work/ref" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add --detach "$work/ref" "$REF" >/dev/null 2>&1
(cd "$work/ref" && CARGO_TARGET_DIR=$work/ref-target cargo build --release --quiet --bin hbmalloc)
# The reference may predate `hbmalloc replay`: it gets this tree's replay command.
if ! "$work/ref-target/release/hbmalloc" replay --help >/dev/null 2>&1; then
    cp src/bin/hbmalloc/replay.rs "$work/ref/src/bin/hbmalloc/replay.rs"
    git diff "$REF" HEAD -- src/bin/hbmalloc.rs | (cd "$work/ref" && git apply)
    (cd "$work/ref" && CARGO_TARGET_DIR=$work/ref-target cargo build --release --quiet --bin hbmalloc)
fi
cargo build --release --quiet --bin hbmalloc
conf=backend:sim,sim_capacity:140GiB,backtrace:off,leak_report:off
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
echo "| trace | peak in use (MiB) | $REF reserved (MiB) | ratio | $(git rev-parse --short HEAD) reserved (MiB) | ratio | syncs before / after |"
echo "|---|---|---|---|---|---|---|"
for gz in bench/traces/*.trace.gz; do
    t=$work/$(basename "$gz" .gz)
    gunzip -c "$gz" >"$t"
    old=$(HBMALLOC_CONF=$conf "$work/ref-target/release/hbmalloc" replay "$t")
    new=$(HBMALLOC_CONF=$conf target/release/hbmalloc replay "$t")
    echo "| $(basename "$t" .trace) | $(echo "$new" | field peak_requested_mib) | $(echo "$old" | field peak_reserved_mib) | $(echo "$old" | field reserved_over_requested) | $(echo "$new" | field peak_reserved_mib) | $(echo "$new" | field reserved_over_requested) | $(echo "$old" | field syncs) / $(echo "$new" | field syncs) |"
done
