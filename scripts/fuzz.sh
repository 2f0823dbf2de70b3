#!/usr/bin/env bash
# A bounded run of every fuzz target (fuzz/: pool_ops, conf, model_files) from the committed seed
# corpus, with libFuzzer through cargo-fuzz. Installs cargo-fuzz from crates.io when it is
# missing. A crash fails the run; libFuzzer leaves the input under fuzz/artifacts/<target>/: add
# it to fuzz/corpus/<target>/ as regress-<what> with the fix, so tests/fuzz_corpus.rs replays it.
#
#   bash scripts/fuzz.sh [seconds per target]      (default 60; FUZZ_SECONDS also sets it)
#
# cargo-fuzz needs nightly flags (the sanitizer, -Z options). CI's machine has one stable
# toolchain and can fetch no other, so RUSTC_BOOTSTRAP=1 lets the stable compiler accept them
# (its standard library ships the sanitizer runtimes); the same everywhere, so a run here is the
# run CI makes.
# The run's corpus grows in a scratch copy: the committed corpus changes only by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH="${1:-${FUZZ_SECONDS:-60}}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --version '^0.13'
fi
export RUSTC_BOOTSTRAP=1

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
total_runs=0
for target in pool_ops conf model_files; do
    mkdir -p "$work/$target"
    cp fuzz/corpus/"$target"/* "$work/$target/"
    log="$work/$target.log"
    # -O with debug assertions: the harness's checks and overflow checks stay on, at speed.
    if ! cargo fuzz run -O --debug-assertions "$target" "$work/$target" \
        fuzz/corpus/"$target" -- -max_total_time="$SECONDS_EACH" -rss_limit_mb=4096 \
        -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz: $target FAILED (input under fuzz/artifacts/$target/)"
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    echo "fuzz: $target: ${runs:-?} executions in ${SECONDS_EACH} s, no crash; corpus $(ls fuzz/corpus/"$target" | wc -l) -> $(ls "$work/$target" | wc -l) inputs"
    total_runs=$((total_runs + ${runs:-0}))
done
echo "fuzz: $total_runs executions in all, no crash"
