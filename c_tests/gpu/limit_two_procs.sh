#!/usr/bin/env bash
# Two processes on one GPU at once, each under its own HBMALLOC_CONF=limit:...: one at 0.4 of the
# device, one at 48 GiB (given in bytes). Each fills its limit with cudaMalloc (c_tests/gpu/limit_fill.cu) and holds
# it until both are full, so the two limits are held side by side; each must get about its limit,
# see it as cudaMemGetInfo's total, and print the limit-reached line exactly once.
# Usage: limit_two_procs.sh LIMIT_FILL_EXE LIBHBMALLOC   (prints one line per process; exits 1 on failure)
# Environment (for a smaller device): LIMIT_A (0.4), LIMIT_B_BYTES (48 GiB), CONF (backend:cuda).
set -uo pipefail
exe=$1 lib=$2
limit_a=${LIMIT_A:-0.4} limit_b=${LIMIT_B_BYTES:-$((48 << 30))} conf=${CONF:-backend:cuda}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
run() { # name limit-spec limit_fill-args...
    local name=$1 spec=$2
    shift 2
    HBMALLOC_CONF=$conf,backtrace:off,leak_report:off,limit:$spec LD_PRELOAD=$lib \
        "$exe" "$@" "$dir/$name.ready" "$dir/release" >"$dir/$name.out" 2>"$dir/$name.err" &
}
run a "$limit_a" fraction "$limit_a"
pid_a=$!
run b "$limit_b" bytes "$limit_b"
pid_b=$!
# Both full at once (or one already gone), at most 120 s.
for _ in $(seq 1200); do
    [[ -e $dir/a.ready && -e $dir/b.ready ]] && break
    kill -0 "$pid_a" 2>/dev/null && kill -0 "$pid_b" 2>/dev/null || break
    sleep 0.1
done
both=no
[[ -e $dir/a.ready && -e $dir/b.ready ]] && both=yes
touch "$dir/release"
wait "$pid_a"; rc_a=$?
wait "$pid_b"; rc_b=$?
status=0
for p in a b; do
    rc_var=rc_$p
    lines=$(grep -c 'memory limit reached' "$dir/$p.err")
    echo "process $p: rc=${!rc_var} limit lines=$lines $(cat "$dir/$p.out")"
    if [[ ${!rc_var} != 0 || $lines != 1 ]]; then
        status=1
        sed 's/^/    /' "$dir/$p.err" | head -20
    fi
done
[[ $both == yes ]] || { echo "the two processes never held their limits at the same time"; status=1; }
exit $status
