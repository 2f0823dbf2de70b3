#!/usr/bin/env bash
# Everything hbmalloc checks on a real GPU, in one run. Build first on a machine with Rust:
#   bash scripts/gpu-stage.sh          (fills gpu-stage/)
# then, from the repository root on the GPU machine (CUDA toolkit, driver, python3 + torch):
#   bash scripts/gpu-check.sh [section ...]   sections: rust c limit stream reliability sanitizer torch bench demo examples
#   (bench also runs PyTorch's and RMM's allocators and the hbm_* C API: bench/peer_bench.cpp)
#   (not run by default: `replay`, real workloads and their traces replayed against every peer,
#   after `bench`; `profile`, perf of the drop-in path, after `bench`)
# Logs go to gpu-out/ (and, packed with the summary, to $OUT where the device tool runs it); a
# table of what ran is printed last. Exits 1 if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=gpu-stage
LOG=$PWD/gpu-out
mkdir -p "$LOG" build/gpu
CUDA=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA/bin:$PATH"
# NVRTC (the KV kernels are compiled at run time) and the runtime come from the toolkit here.
export LD_LIBRARY_PATH="$CUDA/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
LIB=$PWD/$STAGE/libhbmalloc.so
SECTIONS=${*:-rust c limit stream reliability sanitizer torch bench demo examples}
declare -a ROWS=()
FAILED=0

record() { # name status detail
    ROWS+=("$(printf '| %-34s | %-4s | %s |' "$1" "$2" "$3")")
    [[ $2 == FAIL ]] && FAILED=1
    echo "== $1: $2 $3"
}

want() { [[ " $SECTIONS " == *" $1 "* ]]; }

[[ -f $LIB ]] || { echo "gpu-check: $LIB missing: run scripts/gpu-stage.sh on the build machine"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG/gpu.txt"
CARD=$(head -1 "$LOG/gpu.txt")
# The host's cores matter to the thread-scaling figures (hyperthreads are not cores).
lscpu 2>/dev/null | grep -E '^(Model name|CPU\(s\)|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\))' | tee "$LOG/cpu.txt"

if want rust; then
    for t in "$STAGE"/tests/*; do
        name=$(basename "$t")
        # Only binaries with GPU tests (marked #[ignore = "needs a CUDA GPU"]) run here.
        "$t" --list --ignored 2>/dev/null | grep -q ': test' || continue
        if "$t" --ignored --test-threads=1 >"$LOG/rust-$name.log" 2>&1; then
            record "rust $name (GPU tests)" PASS "$(grep -o '[0-9]* passed' "$LOG/rust-$name.log" | tail -1)"
        else
            record "rust $name (GPU tests)" FAIL "see rust-$name.log: $(grep -E '^test .* FAILED' "$LOG/rust-$name.log" | head -3 | tr '\n' ' ')"
        fi
    done
    # The paged KV cache's figures for BENCHMARKS.md (decode step, append/gather bandwidth as a
    # fraction of copy, attention error), printed by its GPU tests: run again with their output.
    if [[ -x $STAGE/tests/paged_kv_gpu ]]; then
        if "$STAGE/tests/paged_kv_gpu" --ignored --nocapture --test-threads=1 figures_ paged_attention_ \
            >"$LOG/paged-kv-figures.log" 2>&1; then
            grep -E '^(figure|paged attention)' "$LOG/paged-kv-figures.log"
            record "rust paged KV figures" PASS "$(grep -c '^figure' "$LOG/paged-kv-figures.log") figures in paged-kv-figures.log"
        else
            record "rust paged KV figures" FAIL "see paged-kv-figures.log"
        fi
    fi
fi

if want c; then
    for src in c_tests/interpose_runtime.c; do
        [[ -f $src ]] || continue
        exe=build/gpu/$(basename "$src" .c)
        if gcc -O1 -g -I"$CUDA/include" -Iinclude "$src" -o "$exe" -L"$CUDA/lib64" -lcudart -lpthread -ldl -Wl,-rpath,"$CUDA/lib64" 2>"$LOG/c-build.log"; then
            if HBMALLOC_CONF=backend:cuda,backtrace:off LD_PRELOAD=$LIB "$exe" cuda >"$LOG/c-$(basename "$exe").log" 2>&1; then
                record "C $(basename "$src") on cuda" PASS "$(tail -1 "$LOG/c-$(basename "$exe").log")"
            else
                record "C $(basename "$src") on cuda" FAIL "$(tail -3 "$LOG/c-$(basename "$exe").log" | tr '\n' ' ')"
            fi
        else
            record "C $(basename "$src") build" FAIL "$(head -3 "$LOG/c-build.log" | tr '\n' ' ')"
        fi
    done
    # Pitched and 3D allocations, cuMemAlloc_v2 (linked against libcuda) and the forwarded calls
    # (arrays, pool memory, registered host ranges), with real copies, against the runtime's own
    # pitch answers.
    if nvcc -O2 -cudart shared -o build/gpu/pitch3d c_tests/gpu/pitch3d.cu -lcuda -ldl 2>"$LOG/pitch3d-build.log"; then
        out=$(HBMALLOC_CONF=backend:cuda,backtrace:off LD_PRELOAD=$LIB build/gpu/pitch3d 2>&1)
        rc=$?
        echo "$out" >"$LOG/c-pitch3d.log"
        [[ $rc == 0 ]] && record "C pitch3d on cuda" PASS "$(tail -1 <<<"$out")" || record "C pitch3d on cuda" FAIL "rc=$rc $(grep -E 'FAIL|failures|CUresult|error' <<<"$out" | head -4 | tr '\n' ' ')"
    else
        record "C pitch3d build" FAIL "$(head -3 "$LOG/pitch3d-build.log" | tr '\n' ' ')"
    fi
fi

if want limit; then
    # HBMALLOC_CONF=limit: two processes on the GPU at once, each held to its own limit.
    if nvcc -O2 -cudart shared -o build/gpu/limit_fill c_tests/gpu/limit_fill.cu 2>"$LOG/limit-build.log"; then
        if bash c_tests/gpu/limit_two_procs.sh build/gpu/limit_fill "$LIB" >"$LOG/limit.log" 2>&1; then
            record "limit: two processes" PASS "$(grep -o 'got [0-9]* MiB' "$LOG/limit.log" | tr '\n' ' ')"
        else
            record "limit: two processes" FAIL "see limit.log: $(tail -3 "$LOG/limit.log" | tr '\n' ' ')"
        fi
    else
        record "limit build" FAIL "$(head -3 "$LOG/limit-build.log" | tr '\n' ' ')"
    fi
fi

# A safety test, c_tests/gpu/<name>.cu: must pass in each given stream_safety mode, and must
# fail (exit 1, corrupt data) with stream safety off, which proves that it can.
safety_test() { # name label mode...
    local name=$1 label=$2 exe=build/gpu/$1 mode out rc
    shift 2
    if ! nvcc -O2 -cudart shared -o "$exe" "c_tests/gpu/$name.cu" 2>"$LOG/$name-build.log"; then
        record "$label build" FAIL "$(head -3 "$LOG/$name-build.log" | tr '\n' ' ')"
        return
    fi
    for mode in "$@" off; do
        out=$(HBMALLOC_CONF=stream_safety:$mode LD_PRELOAD=$LIB "$exe" 2>&1)
        rc=$?
        if [[ $mode == off ]]; then
            [[ $rc == 1 ]] && record "$label off (must corrupt)" PASS "$out" || record "$label off (must corrupt)" FAIL "rc=$rc $out"
        else
            [[ $rc == 0 ]] && record "$label ($mode)" PASS "$out" || record "$label ($mode)" FAIL "rc=$rc $out"
        fi
    done
}

if want stream; then
    # A kernel still writing a block when cudaFree returns must never corrupt the next owner's.
    safety_test stream_safety "stream safety" batched eager "batched,pending_limit:1GiB"
    # A copy from a pinned block still queued when cudaFreeHost returns must never read the next
    # cudaMallocHost's data.
    safety_test pinned_safety "pinned safety" batched eager
fi

if want reliability; then
    # Verified churn: every block's pattern checked before its free; zero wrong words allowed.
    if nvcc -O2 -cudart shared -o build/gpu/churn c_tests/gpu/churn.cu 2>"$LOG/churn-build.log"; then
        out=$(CHURN_OPS=${CHURN_OPS:-10000000} HBMALLOC_CONF=backtrace:off LD_PRELOAD=$LIB build/gpu/churn 2>&1)
        [[ $? == 0 ]] && record "verified churn" PASS "$out" || record "verified churn" FAIL "$out"
        # The same under compute-sanitizer, shorter: it must report no error at all.
        for tool in memcheck racecheck; do
            CHURN_OPS=2000 CHURN_THREADS=4 HBMALLOC_CONF=backtrace:off,leak_report:off LD_PRELOAD=$LIB \
                compute-sanitizer --tool "$tool" --error-exitcode 3 build/gpu/churn >"$LOG/churn-$tool.log" 2>&1
            rc=$?
            summary=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|ops=' "$LOG/churn-$tool.log" | tr '\n' ' ')
            [[ $rc == 0 ]] && record "churn under $tool" PASS "$summary" || record "churn under $tool" FAIL "rc=$rc $summary"
        done
    else
        record "verified churn build" FAIL "$(head -3 "$LOG/churn-build.log" | tr '\n' ' ')"
    fi
    # Out-of-memory storm: right codes, nothing sticky, nothing leaked, memory back at the end.
    if nvcc -O2 -cudart shared -o build/gpu/oom_storm c_tests/gpu/oom_storm.cu 2>"$LOG/storm-build.log"; then
        out=$(HBMALLOC_CONF=backtrace:off LD_PRELOAD=$LIB build/gpu/oom_storm 2>&1)
        rc=$?
        # Storms and cache releases per round: at most one release per storm.
        grep '^round' <<<"$out" | tee "$LOG/storm-rounds.txt"
        [[ $rc == 0 ]] && record "out-of-memory storm" PASS "$(tail -1 <<<"$out")" || record "out-of-memory storm" FAIL "$out"
    else
        record "out-of-memory storm build" FAIL "$(head -3 "$LOG/storm-build.log" | tr '\n' ' ')"
    fi
fi

if want sanitizer; then
    # compute-sanitizer sees pool blocks as the allocations they stand for (NVTX heaps and
    # regions, src/nvtx/, docs/tools.md): one float written past a 1000-float block is 1 invalid
    # write and the clean twin 0 errors under memcheck and initcheck, for a cudaMalloc block plain
    # (the baseline) and under hbmalloc, and for scratch-pool and KV cache blocks under hbmalloc.
    if nvcc -O2 -cudart shared -Iinclude -o build/gpu/oob c_tests/gpu/oob.cu 2>"$LOG/oob-build.log" &&
        nvcc -O2 -cudart shared -Iinclude -DOOB_CLEAN -o build/gpu/oob_clean c_tests/gpu/oob.cu 2>>"$LOG/oob-build.log"; then
        declare -A baseline=()
        for how in plain hbmalloc; do
            pre=(env OOB_EXPECT=$how)
            targets=cudaMalloc
            if [[ $how == hbmalloc ]]; then
                pre+=(HBMALLOC_CONF=backtrace:off,leak_report:off,nvtx:on LD_PRELOAD=$LIB)
                targets="cudaMalloc pool-legacy pool-vmm kv-prealloc kv-vmm"
            fi
            for target in $targets; do
                for run in "oob memcheck 1" "oob_clean memcheck 0" "oob_clean initcheck 0"; do
                    read -r exe tool want <<<"$run"
                    log=$LOG/sanitizer-$exe-$tool-$target-$how.log
                    "${pre[@]}" compute-sanitizer --tool "$tool" "build/gpu/$exe" "$target" >"$log" 2>&1
                    rc=$?
                    errors=$(grep -o 'ERROR SUMMARY: [0-9]*' "$log" | grep -o '[0-9]*$')
                    writes=$(grep -c 'Invalid __global__ write of size 4' "$log")
                    ok=0
                    if [[ $want == 0 ]]; then
                        [[ $rc == 0 && $errors == 0 ]] && ok=1
                    elif [[ $how == plain ]]; then
                        # The baseline: the stray write, and whatever memcheck adds after it
                        # (the failed launch reported at the next API call).
                        [[ $writes == 1 ]] && ok=1 && baseline[$tool]=$errors
                    else
                        [[ $writes == 1 && $errors == "${baseline[$tool]:-none}" ]] && ok=1
                    fi
                    detail="$writes invalid write(s); $(grep -o 'ERROR SUMMARY: .*' "$log"); $(grep '^oob:' "$log" | head -1)"
                    [[ $ok == 1 ]] && record "$tool $exe $target ($how)" PASS "$detail" ||
                        record "$tool $exe $target ($how)" FAIL "rc=$rc, want $want invalid write(s) and the plain run's error count (${baseline[$tool]:-none}): $detail (see $(basename "$log"))"
                done
            done
        done
    else
        record "sanitizer oob build" FAIL "$(head -3 "$LOG/oob-build.log" | tr '\n' ' ')"
    fi
fi

if want torch; then
    if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
        export CUBLAS_WORKSPACE_CONFIG=:4096:8
        python3 scripts/torch_check.py run build/gpu/plain.pt >"$LOG/torch.log" 2>&1
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 HBMALLOC_CONF=leak_report:summary LD_PRELOAD=$LIB \
            python3 scripts/torch_check.py run build/gpu/hbm.pt >>"$LOG/torch.log" 2>&1
        rc=$?
        if [[ $rc == 0 ]] && python3 scripts/torch_check.py compare build/gpu/plain.pt build/gpu/hbm.pt >>"$LOG/torch.log" 2>&1; then
            record "pytorch fwd+bwd under LD_PRELOAD" PASS "$(grep 'served' "$LOG/torch.log" | head -1)"
        else
            record "pytorch fwd+bwd under LD_PRELOAD" FAIL "rc=$rc; $(tail -4 "$LOG/torch.log" | tr '\n' ' ')"
        fi
        # The pluggable allocator (python/hbmalloc), no preload: the same results bit for bit.
        HBM_PLUGGABLE=1 HBMALLOC_LIB=$LIB HBMALLOC_CONF=leak_report:summary \
            python3 scripts/torch_check.py run build/gpu/pluggable.pt >"$LOG/torch-pluggable.log" 2>&1
        rc=$?
        if [[ $rc == 0 ]] && python3 scripts/torch_check.py compare build/gpu/plain.pt build/gpu/pluggable.pt >>"$LOG/torch-pluggable.log" 2>&1; then
            record "pytorch fwd+bwd, pluggable allocator" PASS "$(grep 'served' "$LOG/torch-pluggable.log" | head -1)"
        else
            record "pytorch fwd+bwd, pluggable allocator" FAIL "rc=$rc; $(tail -4 "$LOG/torch-pluggable.log" | tr '\n' ' ')"
        fi
        # python_frames:acquire: PyTorch's operators release the GIL, and under the preload the
        # default takes it back only on the pluggable path (docs/pytorch.md).
        if PYTORCH_NO_CUDA_MEMORY_CACHING=1 HBMALLOC_CONF=leak_report:summary,python_frames:acquire LD_PRELOAD=$LIB \
            python3 scripts/torch_check.py leaks "$LOG/torch-leaks.txt" >"$LOG/torch-leaks.log" 2>&1; then
            record "pytorch leak tracking" PASS "$(grep -h 'after freed' "$LOG/torch-leaks.log")"
        else
            record "pytorch leak tracking" FAIL "$(tail -4 "$LOG/torch-leaks.log" | tr '\n' ' ')"
        fi
        grep -h 'report frames' "$LOG/torch-leaks.log"
        # The pluggable allocator in depth (scripts/torch_pluggable_check.py): training and
        # inference bit for bit with step times and peak reserved beside PyTorch's allocator, the
        # Python line of a kept tensor, the snapshot viewer, CUDA graph capture, out of memory.
        HBMALLOC_LIB=$LIB python3 scripts/torch_pluggable_check.py all "$LOG/torch-pluggable-check" \
            >"$LOG/torch-pluggable-check.log" 2>&1
        rc=$?
        grep -h '^pluggable_check:' "$LOG/torch-pluggable-check.log"
        if [[ $rc == 0 ]]; then
            record "pytorch pluggable: train, infer, leak, viz, graph, oom" PASS "$(grep -h '^pluggable_check: graph' "$LOG/torch-pluggable-check.log" | cut -c1-120)"
        else
            record "pytorch pluggable: train, infer, leak, viz, graph, oom" FAIL "$(grep -h 'FAIL' "$LOG/torch-pluggable-check.log" | head -3 | tr '\n' ' ' | cut -c1-400)"
        fi
    else
        record "pytorch" FAIL "torch with CUDA not importable"
    fi
fi

# Builds bench/peer_bench.cpp once per peer library into build/gpu/peer_bench_<lib> and lists
# what built in PEERS as "<lib>:<allocator>". A peer that does not build is a SKIP row, not a failure.
declare -a PEERS=()
build_peers() {
    local cxx="g++ -O2 -std=c++17 -I$CUDA/include bench/peer_bench.cpp -lpthread"
    # hbmalloc through its C API: linked, not preloaded, so its cudaMalloc serves nobody else.
    if $cxx -DPEER_HBM -Iinclude -o build/gpu/peer_bench_hbm -L"$STAGE" -lhbmalloc -Wl,-rpath,"$PWD/$STAGE" \
        -L"$CUDA/lib64" -lcudart -Wl,-rpath,"$CUDA/lib64" 2>"$LOG/peer-hbm-build.log"; then
        PEERS+=("hbm:hbmalloc")
    else
        record "peer hbmalloc C API build" FAIL "$(head -3 "$LOG/peer-hbm-build.log" | tr '\n' ' ')"
    fi
    local torch_lib torch_inc abi
    if torch_lib=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null); then
        torch_inc=$(dirname "$torch_lib")/include
        abi=$(python3 -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
        if $cxx -DPEER_TORCH -D_GLIBCXX_USE_CXX11_ABI="$abi" -I"$torch_inc" -o build/gpu/peer_bench_torch \
            -L"$torch_lib" -lc10_cuda -lc10 -Wl,-rpath,"$torch_lib" -L"$CUDA/lib64" -lcudart -Wl,-rpath,"$CUDA/lib64" \
            2>"$LOG/peer-torch-build.log"; then
            PEERS+=("torch:pytorch")
        else
            record "peer PyTorch build" FAIL "$(grep -m2 error "$LOG/peer-torch-build.log" | tr '\n' ' ')"
        fi
    else
        record "peer PyTorch" SKIP "torch not importable"
    fi
    local rmm=build/gpu/rmm
    if ls "$STAGE"/peers/librmm*.whl >/dev/null 2>&1; then
        mkdir -p "$rmm"
        for whl in "$STAGE"/peers/*.whl; do python3 -m zipfile -e "$whl" "$rmm"; done
        if $cxx -DPEER_RMM -I"$rmm/librmm/include" -I"$rmm/librmm/include/rapids" -I"$rmm/rapids_logger/include" \
            -o build/gpu/peer_bench_rmm -L"$rmm/librmm/lib64" -L"$rmm/rapids_logger/lib64" -lrmm -lrapids_logger \
            -Wl,-rpath,"$PWD/$rmm/librmm/lib64:$PWD/$rmm/rapids_logger/lib64" -L"$CUDA/lib64" -lcudart -Wl,-rpath,"$CUDA/lib64" \
            2>"$LOG/peer-rmm-build.log"; then
            PEERS+=("rmm:rmm-pool" "rmm:rmm-arena")
        else
            record "peer RMM build" FAIL "$(grep -m2 error "$LOG/peer-rmm-build.log" | tr '\n' ' ')"
        fi
    else
        record "peer RMM" SKIP "no wheels in $STAGE/peers (gpu-stage.sh downloads them)"
    fi
}

if want bench; then
    exe=build/gpu/alloc_bench
    if gcc -O2 -I"$CUDA/include" bench/alloc_bench.c -o "$exe" -L"$CUDA/lib64" -lcudart -lpthread -ldl -Wl,-rpath,"$CUDA/lib64" 2>"$LOG/bench-build.log"; then
        build_peers
        : >"$LOG/bench.txt"
        export BENCH_SECONDS=${BENCH_SECONDS:-1}
        # Several rounds, every configuration once per round, so that a noisy neighbour on the
        # host hits them all alike; bench-table.py keeps each configuration's best round.
        # Each $STAGE/ref/<name>/libhbmalloc.so (scripts/gpu-stage.sh with HBM_REF="name=commit")
        # runs beside the current library as hbmalloc-<name>: before/after from the same run.
        for round in $(seq "${BENCH_ROUNDS:-3}"); do
            for c in ${BENCH_CASES:-pair:512 pair:1048576 pair:16777216 step threads:1 threads:4 threads:8 threads:16 host:4096 host:16777216}; do
                HBMALLOC_CONF=backtrace:off,leak_report:off LD_PRELOAD=$LIB "$exe" malloc "$c" >>"$LOG/bench.txt" 2>&1
                # BENCH_AB=1: only the current library against the reference builds.
                if [[ -z ${BENCH_AB:-} ]]; then
                    "$exe" malloc "$c" >>"$LOG/bench.txt" 2>&1
                    "$exe" async "$c" >>"$LOG/bench.txt" 2>&1
                    HBMALLOC_CONF=backtrace:on,leak_report:off LD_PRELOAD=$LIB "$exe" malloc "$c" | sed 's/^hbmalloc/hbmalloc+bt/' >>"$LOG/bench.txt" 2>&1
                    HBMALLOC_CONF=backtrace:off,leak_report:off LD_PRELOAD=$LIB "$exe" async "$c" >>"$LOG/bench.txt" 2>&1
                    # The same code on the simulated device, on this host: what the driver calls cost.
                    HBMALLOC_CONF=backend:sim,backtrace:off,leak_report:off LD_PRELOAD=$LIB "$exe" malloc "$c" 2>&1 | sed 's/^hbmalloc/hbmalloc-sim/' >>"$LOG/bench.txt"
                fi
                # Peers with their own entry points (bench/peer_bench.cpp); no host case there.
                if [[ -z ${BENCH_AB:-} && $c != host:* ]]; then
                    for peer in "${PEERS[@]}"; do
                        HBMALLOC_CONF=backtrace:off,leak_report:off "build/gpu/peer_bench_${peer%%:*}" "${peer#*:}" "$c" >>"$LOG/bench.txt" 2>>"$LOG/bench-peers.log"
                    done
                fi
                for ref in "$STAGE"/ref/*/libhbmalloc.so; do
                    [[ -f $ref ]] || continue
                    name=$(basename "$(dirname "$ref")")
                    HBMALLOC_CONF=backtrace:off,leak_report:off LD_PRELOAD=$PWD/$ref "$exe" malloc "$c" 2>&1 | sed "s/^hbmalloc/hbmalloc-$name/" >>"$LOG/bench.txt"
                done
            done
        done
        record "alloc benchmark" PASS "$(wc -l <"$LOG/bench.txt") figures in bench.txt"
        cat "$LOG/bench.txt"
    else
        record "alloc benchmark build" FAIL "$(head -3 "$LOG/bench-build.log" | tr '\n' ' ')"
    fi
fi

# Real workloads (scripts/workloads.py) on PyTorch's allocator and on hbmalloc, in interleaved
# rounds: time and peak memory. hbmalloc's runs leave traces, replayed against every peer
# (bench/peer_bench.cpp replay: and memory:). Needs the bench section's peers: run with bench.
if want replay; then
    if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
        : >"$LOG/replay.txt"
        [[ ${#PEERS[@]} -gt 0 ]] || build_peers
        g++ -O2 -std=c++17 -I"$CUDA/include" bench/peer_bench.cpp -lpthread -ldl -o build/gpu/peer_bench_rt \
            -L"$CUDA/lib64" -lcudart -Wl,-rpath,"$CUDA/lib64" 2>"$LOG/peer-rt-build.log" || record "peer runtime build" FAIL "see peer-rt-build.log"
        for round in $(seq "${BENCH_ROUNDS:-3}"); do
            for w in ${WORKLOADS:-train infer generate}; do
                python3 scripts/workloads.py "$w" 2>>"$LOG/workloads.log" | sed 's/^workload/pytorch workload/' >>"$LOG/replay.txt"
                PYTORCH_NO_CUDA_MEMORY_CACHING=1 HBMALLOC_CONF=backtrace:off,leak_report:off,trace:$LOG/$w.trace LD_PRELOAD=$LIB \
                    python3 scripts/workloads.py "$w" 2>>"$LOG/workloads.log" | sed 's/^workload/hbmalloc workload/' >>"$LOG/replay.txt"
                PYTORCH_NO_CUDA_MEMORY_CACHING=1 HBMALLOC_CONF=leak_report:off LD_PRELOAD=$LIB \
                    python3 scripts/workloads.py "$w" 2>>"$LOG/workloads.log" | sed 's/^workload/hbmalloc+bt workload/' >>"$LOG/replay.txt"
                HBM_PLUGGABLE=1 HBMALLOC_LIB=$LIB HBMALLOC_CONF=backtrace:off,leak_report:off \
                    python3 scripts/workloads.py "$w" 2>>"$LOG/workloads.log" | sed 's/^workload/hbmalloc-pluggable workload/' >>"$LOG/replay.txt"
                # Reference builds (gpu-stage.sh HBM_REF=...): before/after in the same rounds.
                for ref in "$STAGE"/ref/*/libhbmalloc.so; do
                    [[ -f $ref ]] || continue
                    name=$(basename "$(dirname "$ref")")
                    PYTORCH_NO_CUDA_MEMORY_CACHING=1 HBMALLOC_CONF=backtrace:off,leak_report:off LD_PRELOAD=$PWD/$ref \
                        python3 scripts/workloads.py "$w" 2>>"$LOG/workloads.log" | sed "s/^workload/hbmalloc-$name workload/" >>"$LOG/replay.txt"
                done
            done
        done
        # The seed's 100-allocation step, as a trace too.
        HBMALLOC_CONF=backtrace:off,leak_report:off,trace:$LOG/step.trace BENCH_SECONDS=0.05 LD_PRELOAD=$LIB build/gpu/alloc_bench malloc step >/dev/null 2>&1
        for trace in "$LOG"/*.trace; do
            [[ -s $trace ]] || continue
            for round in $(seq "${BENCH_ROUNDS:-3}"); do
                for mode in replay memory; do
                    for peer in rt:cudaMalloc rt:cudaMallocAsync "${PEERS[@]}"; do
                        HBMALLOC_CONF=backtrace:off,leak_report:off "build/gpu/peer_bench_${peer%%:*}" "${peer#*:}" "$mode:$trace" >>"$LOG/replay.txt" 2>>"$LOG/replay-errors.log"
                    done
                    HBMALLOC_CONF=backtrace:off,leak_report:off LD_PRELOAD=$LIB build/gpu/peer_bench_rt cudaMalloc "$mode:$trace" >>"$LOG/replay.txt" 2>>"$LOG/replay-errors.log"
                done
            done
        done
        record "workloads and trace replay" PASS "$(grep -c . "$LOG/replay.txt") figures in replay.txt; traces: $(ls "$LOG"/*.trace 2>/dev/null | xargs -n1 basename | tr '\n' ' ')"
        cat "$LOG/replay.txt"
    else
        record "workloads and trace replay" FAIL "torch with CUDA not importable"
    fi
fi

# Where the drop-in path's time goes on this host (needs perf; skipped without it).
if want profile; then
    exe=build/gpu/alloc_bench
    if command -v perf >/dev/null && [[ -x $exe ]]; then
        for c in pair:1048576 step; do
            HBMALLOC_CONF=backtrace:off,leak_report:off BENCH_SECONDS=1 perf record -q -o "$LOG/perf.data" \
                -- env LD_PRELOAD=$LIB "$exe" malloc "$c" >>"$LOG/profile.txt" 2>&1
            perf report -i "$LOG/perf.data" --no-children --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -25 >>"$LOG/profile.txt"
        done
        rm -f "$LOG/perf.data"
        record "profile" PASS "see profile.txt"
    else
        record "profile" SKIP "no perf, or run with the bench section"
    fi
fi

if want demo; then
    if "$STAGE/hbmalloc" demo >"$LOG/demo.log" 2>&1 && grep -q 'backend cuda' "$LOG/demo.log"; then
        record "hbmalloc demo on cuda" PASS "$(grep 'step time' "$LOG/demo.log" | tr -s ' ')"
    else
        record "hbmalloc demo on cuda" FAIL "$(tail -3 "$LOG/demo.log" | tr '\n' ' ')"
    fi
    cat "$LOG/demo.log"
fi

if want examples; then
    for ex in "$STAGE"/examples/*; do
        [[ -x $ex ]] || continue
        name=$(basename "$ex")
        if "$ex" >"$LOG/example-$name.log" 2>&1; then
            record "example $name" PASS "see example-$name.log"
        else
            record "example $name" FAIL "$(tail -2 "$LOG/example-$name.log" | tr '\n' ' ')"
        fi
        cat "$LOG/example-$name.log"
    done
fi

if [[ -n ${OUT:-} ]]; then
    tar czf "$OUT/gpu-logs.tgz" -C "$LOG" .
    cp "$LOG/bench.txt" "$OUT/" 2>/dev/null
    cp "$LOG/replay.txt" "$OUT/" 2>/dev/null
    cp "$LOG/profile.txt" "$OUT/" 2>/dev/null
fi
echo
echo "gpu-check on $CARD"
printf '| %-34s | %-4s | %s |\n' check result detail
printf '|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..36})" "------" "--------"
printf '%s\n' "${ROWS[@]}"
exit $FAILED
