#!/usr/bin/env bash
# llama.cpp on the GPU machine, for gpu-check's `llama` section (run by it; not on its own).
#   gpu-llama.sh build LOGDIR        builds llama.cpp from gpu-stage/llama-src.tar.xz with CUDA
#                                    (sm_90, the runtime linked shared so LD_PRELOAD reaches it)
#   gpu-llama.sh check LOGDIR LIB    with that build: hbmalloc's estimate against llama.cpp's own
#                                    buffer sizes, llama-bench with and without LD_PRELOAD=LIB
#                                    (interleaved rounds; the preloaded run writes a trace), and a
#                                    subset of test-backend-ops under LD_PRELOAD
# `check` prints one "RESULT|name|PASS or FAIL|detail" line per check for gpu-check's table;
# LLAMA_CHECKS (default "estimate bench ops") picks which of the three run.
set -uo pipefail
cd "$(dirname "$0")/.."
cmd=${1:?build or check} LOG=${2:?log folder}
SRC=build/llama-src BLD=build/llama BIN=build/llama/bin
result() { echo "RESULT|$1|$2|$3"; }

if [[ $cmd == build ]]; then
    [[ -f gpu-stage/llama-src.tar.xz ]] || { echo "no gpu-stage/llama-src.tar.xz (gpu-stage.sh)"; exit 1; }
    rm -rf "$SRC" && mkdir -p "$SRC" && tar xJf gpu-stage/llama-src.tar.xz -C "$SRC" || exit 1
    start=$(date +%s)
    # Only what the checks run; no network features (the machine has none), no NCCL (one GPU).
    cmake -S "$SRC/llama.cpp" -B "$BLD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_RUNTIME_LIBRARY=Shared -DGGML_CUDA_NCCL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TESTS=ON >"$LOG/llama-cmake.log" 2>&1 \
        && cmake --build "$BLD" -j "$(nproc)" --target llama-completion llama-bench test-backend-ops \
            >"$LOG/llama-build.log" 2>&1
    rc=$?
    echo "$(($(date +%s) - start)) s" >"$LOG/llama-build-time.txt"
    exit $rc
fi

LIB=${3:?library}
if [[ ! -x $BIN/llama-bench ]]; then
    result "llama.cpp build" FAIL "$(tail -3 "$LOG/llama-build.log" "$LOG/llama-cmake.log" 2>/dev/null | tr '\n' ' ' | cut -c1-300)"
    exit 0
fi
# The preloaded library replaces cudaMalloc only where libcudart is a shared dependency.
if ldd "$BLD"/bin/libggml-cuda.so 2>/dev/null | grep -q libcudart; then
    result "llama.cpp build" PASS "$(cat "$LOG/llama-build-time.txt"), libggml-cuda links libcudart.so"
else
    result "llama.cpp build" FAIL "libggml-cuda does not link libcudart shared: LD_PRELOAD would not reach it"
fi
export PYTHONPATH="$SRC/llama.cpp/gguf-py${PYTHONPATH:+:$PYTHONPATH}"
# estimate-vs-llamacpp.sh runs target/release/hbmalloc; the GPU machine has the staged CLI.
mkdir -p target/release && [[ -x target/release/hbmalloc ]] || cp gpu-stage/hbmalloc target/release/hbmalloc
checks=" ${LLAMA_CHECKS:-estimate bench ops} "
if [[ $checks != *" estimate "* ]]; then
    :
elif LLAMA_CPP_BIN=$BIN LLAMA_LOG_DIR=$LOG/estimate-llama-logs timeout 240 bash scripts/estimate-vs-llamacpp.sh "$LOG/estimate-vs-llamacpp.md" \
    >"$LOG/estimate-vs-llamacpp.log" 2>&1; then
    result "estimate vs llama.cpp" PASS "$(grep -c '^| ' "$LOG/estimate-vs-llamacpp.md") rows in estimate-vs-llamacpp.md"
else
    result "estimate vs llama.cpp" FAIL "$(tail -3 "$LOG/estimate-vs-llamacpp.log" | tr '\n' ' ' | cut -c1-300)"
fi

# llama-bench on a 0.85 B-parameter random model (large enough that a 512-token prompt takes tens
# of milliseconds: a 150 M one ran in 3 ms, all noise): prompt processing and generation, plain and
# preloaded in interleaved rounds (the preloaded rounds' allocations traced for `replay`).
if [[ $checks == *" bench "* ]]; then
model=$BLD/bench-model.gguf  # not in LOG: the logs travel back, 300 MiB would not
python3 scripts/write_test_gguf.py "$model" --layers 16 --embd 2048 --heads 16 --kv-heads 4 --ff 5632 --vocab 32000
: >"$LOG/llama-bench.txt"
for round in 1 2 3; do
    "$BIN/llama-bench" -m "$model" -ngl 99 -p 512 -n 128 -r 5 -o csv 2>>"$LOG/llama-bench.err" \
        | sed "s/^/plain,$round,/" >>"$LOG/llama-bench.txt"
    HBMALLOC_CONF=backtrace:off,trace:$LOG/llama-bench.trace LD_PRELOAD=$LIB \
        "$BIN/llama-bench" -m "$model" -ngl 99 -p 512 -n 128 -r 5 -o csv 2>>"$LOG/llama-bench.err" \
        | sed "s/^/hbmalloc,$round,/" >>"$LOG/llama-bench.txt"
done
# The csv's avg_ts column, per configuration and test (pp512, tg128).
summary=$(python3 - "$LOG/llama-bench.txt" <<'PY'
import csv, sys, statistics
rows = list(csv.reader(open(sys.argv[1])))
head = next((r for r in rows if "avg_ts" in r), None)
if head is None:
    sys.exit("no csv header in llama-bench output")
col, ptk, ntk = head.index("avg_ts"), head.index("n_prompt"), head.index("n_gen")
runs = {}
for r in rows:
    if r is head or r[2:] == head[2:] or len(r) != len(head):
        continue
    test = f"pp{r[ptk]}" if r[ntk] == "0" else f"tg{r[ntk]}"
    runs.setdefault((r[0], test), []).append(float(r[col]))
out = []
for test in sorted({t for _, t in runs}):
    p, h = runs.get(("plain", test), []), runs.get(("hbmalloc", test), [])
    if not p or not h:
        sys.exit(f"missing rounds for {test}")
    out.append(f"{test} plain {statistics.median(p):.0f} t/s ({min(p):.0f}-{max(p):.0f}), "
               f"hbmalloc {statistics.median(h):.0f} ({min(h):.0f}-{max(h):.0f}), "
               f"ratio {statistics.median(h) / statistics.median(p):.3f}")
print("; ".join(out))
PY
)
if [[ $? -eq 0 && -s $LOG/llama-bench.trace ]]; then
    result "llama-bench plain vs LD_PRELOAD" PASS "$summary; trace $(wc -l <"$LOG/llama-bench.trace") lines"
else
    result "llama-bench plain vs LD_PRELOAD" FAIL "${summary:-no figures} (trace: $(wc -l <"$LOG/llama-bench.trace" 2>/dev/null || echo none))"
fi
fi

# test-backend-ops, CUDA0 against the CPU, under LD_PRELOAD; its trace proves hbmalloc served it
# (a clean run prints nothing of ours).
# FLASH_ATTN_EXT is left out: its 10^4 cases alone outlast the time box (6765 cases of the others
# passed in 200 s while it ran).
[[ $checks == *" ops "* ]] || exit 0
ops=MUL_MAT,GET_ROWS,CPY,ADD,MUL,SOFT_MAX,ROPE,RMS_NORM,SET_ROWS
rm -f "$LOG/test-backend-ops.trace"
HBMALLOC_CONF=backtrace:off,trace:$LOG/test-backend-ops.trace LD_PRELOAD=$LIB timeout 240 \
    "$BIN/test-backend-ops" test -b CUDA0 -o "$ops" >"$LOG/test-backend-ops.log" 2>&1
rc=$?
traced=$(wc -l <"$LOG/test-backend-ops.trace" 2>/dev/null || echo 0)
if [[ $rc -eq 0 ]] && grep -q 'backends passed' "$LOG/test-backend-ops.log" && [[ $traced -gt 0 ]]; then
    result "test-backend-ops under LD_PRELOAD" PASS "$(grep -E 'tests passed' "$LOG/test-backend-ops.log" | tail -1 | tr -s ' '); $traced trace lines"
else
    result "test-backend-ops under LD_PRELOAD" FAIL "rc $rc, $traced trace lines: $(grep -E 'FAIL|passed' "$LOG/test-backend-ops.log" | tail -3 | tr '\n' ' ' | cut -c1-300)"
fi
