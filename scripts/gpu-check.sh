#!/usr/bin/env bash
# Everything hbmalloc checks on a real GPU, in one run. Build first on a machine with Rust:
#   bash scripts/gpu-stage.sh          (fills gpu-stage/)
# then, from the repository root on the GPU machine (CUDA toolkit, driver, python3 + torch):
#   bash scripts/gpu-check.sh [section ...]   sections: rust c limit stream reliability sanitizer torch paged-torch bench demo examples
#   (bench also runs PyTorch's and RMM's allocators and the hbm_* C API: bench/peer_bench.cpp)
#   (not run by default: `overhead`, what the CUDA context and cuBLAS hold (c_tests/gpu/context_overhead.cu);
#   `llama`, llama.cpp built with CUDA and run with and without hbmalloc
#   (scripts/gpu-llama.sh), ~8 min, before `replay-peers` so that its trace is replayed too;
#   `distributed`, torch.distributed with NCCL, one rank per GPU (scripts/torch_distributed_check.py);
#   `workloads`, real PyTorch programs end to end, ~7 min; `replay-peers`, the recorded traces
#   replayed against every peer, ~4 min; `replay`, both; `profile`, perf of the drop-in path, after
#   `bench`; `replay` takes longer than one 10-minute call: run the two in separate calls)
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
SECTIONS=${*:-rust c limit stream reliability sanitizer torch paged-torch bench demo examples}
declare -a ROWS=()
FAILED=0

record() { # name status detail
    ROWS+=("$(printf '| %-34s | %-4s | %s |' "$1" "$2" "$3")")
    [[ $2 == FAIL ]] && FAILED=1
    echo "== $1: $2 $3"
}

want() { [[ " $SECTIONS " == *" $1 "* ]]; }

[[ -f $LIB ]] || { echo "gpu-check: $LIB missing: run scripts/gpu-stage.sh on the build machine"; exit 2; }
# llama.cpp's CUDA build takes minutes of every core: beside correctness sections it runs in the
# background from the start; beside a timing section (bench, replay, replay-peers, workloads,
# profile) it runs alone, after bench and before the replays.
LLAMA_BUILD_PID=
if want llama && ! want bench && ! want replay && ! want replay-peers && ! want workloads && ! want profile; then
    bash scripts/gpu-llama.sh build "$LOG" >"$LOG/llama-build.out" 2>&1 &
    LLAMA_BUILD_PID=$!
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG/gpu.txt"
CARD=$(head -1 "$LOG/gpu.txt")
# The host's cores matter to the thread-scaling figures (hyperthreads are not cores).
lscpu 2>/dev/null | grep -E '^(Model name|CPU\(s\)|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\))' | tee "$LOG/cpu.txt"

if want rust; then
    for t in "$STAGE"/tests/*; do
        name=$(basename "$t")
        # Only binaries with GPU tests (marked #[ignore = "needs a CUDA GPU"]) run here.
        # (Read whole: `grep -q` in a pipe under pipefail can SIGPIPE the binary and skip it.)
        listing=$("$t" --list --ignored 2>/dev/null || true)
        [[ $listing == *': test'* ]] || continue
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
        # Each round is one storm: at most one cache release per round.
        grep '^round' <<<"$out" | tee "$LOG/storm-rounds.txt"
        [[ $rc == 0 ]] && record "out-of-memory storm" PASS "$(tail -1 <<<"$out")" || record "out-of-memory storm" FAIL "$out"
    else
        record "out-of-memory storm build" FAIL "$(head -3 "$LOG/storm-build.log" | tr '\n' ' ')"
    fi
fi

if want overhead; then
    # What a process holds besides its allocations (the context, cuBLAS): the figure behind
    # `hbmalloc estimate --overhead`'s default (docs/estimate.md). Idle use from nvidia-smi first.
    if nvcc -O2 -cudart shared -o build/gpu/context_overhead c_tests/gpu/context_overhead.cu -lcublas 2>"$LOG/overhead-build.log"; then
        idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1)
        out=$(build/gpu/context_overhead "$idle" 2>&1)
        [[ $? == 0 ]] && record "context overhead" PASS "$out" || record "context overhead" FAIL "$out"
    else
        record "context overhead build" FAIL "$(head -3 "$LOG/overhead-build.log" | tr '\n' ' ')"
    fi
fi

if want sanitizer; then
    # compute-sanitizer sees pool blocks as the allocations they stand for (NVTX heaps and
    # regions, src/nvtx/, docs/tools.md): one float written past a 1000-float block is 1 invalid
    # write and the clean twin 0 errors under memcheck and initcheck, for a cudaMalloc block plain
    # (the baseline) and under hbmalloc, and for scratch-pool and KV cache blocks under hbmalloc.
    # Any "Call to nvtx... failed" from the tool fails a run under hbmalloc, and each FAIL names
    # the tool's first complaint. First a probe (clean block, verbose): hbmalloc's attach line says
    # which slot layout the tool used (docs/tools.md); `--print-level info` shows the tool's notes.
    # `--nvtx yes` on every run: without it the tool takes no NVTX call at all (it attaches, asks
    # for no NVTX module and creates no domain: seen on the H200).
    first_complaint() { grep -m1 -E '(Warning|Error):' "$1" | sed 's/^=* *//'; }
    if nvcc -O2 -cudart shared -Iinclude -o build/gpu/oob c_tests/gpu/oob.cu 2>"$LOG/oob-build.log" &&
        nvcc -O2 -cudart shared -Iinclude -DOOB_CLEAN -o build/gpu/oob_clean c_tests/gpu/oob.cu 2>>"$LOG/oob-build.log"; then
        log=$LOG/sanitizer-probe.log
        OOB_EXPECT=hbmalloc HBMALLOC_CONF=backtrace:off,leak_report:off,nvtx:on,verbose:on LD_PRELOAD=$LIB \
            compute-sanitizer --nvtx yes --tool memcheck --print-level info --show-backtrace device \
            build/gpu/oob_clean cudaMalloc >"$log" 2>&1
        rc=$?
        attach=$(grep -m1 'NVTX tool attached' "$log")
        complaints=$(grep -c 'Call to nvtx' "$log")
        if [[ $rc == 0 && -n $attach && $complaints == 0 ]]; then
            record "sanitizer NVTX attach" PASS "$attach"
        else
            record "sanitizer NVTX attach" FAIL "rc=$rc, ${attach:-no attach line (see sanitizer-probe.log)}; $complaints NVTX call(s) refused; first complaint: $(first_complaint "$log"); $(grep -m1 '^hbmalloc:' "$log")"
        fi
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
                    # VMM-backed memory is not annotated (compute-sanitizer refuses a reserved
                    # address range as a heap): there the planted write goes unseen, as without
                    # hbmalloc's annotations, and the runs must still be clean otherwise.
                    [[ $target == *-vmm && $exe == oob ]] && want=unseen
                    log=$LOG/sanitizer-$exe-$tool-$target-$how.log
                    "${pre[@]}" compute-sanitizer --nvtx yes --tool "$tool" "build/gpu/$exe" "$target" >"$log" 2>&1
                    rc=$?
                    errors=$(grep -o 'ERROR SUMMARY: [0-9]*' "$log" | grep -o '[0-9]*$')
                    writes=$(grep -c 'Invalid __global__ write of size 4' "$log")
                    refused=$(grep -c 'Call to nvtx' "$log")
                    ok=0
                    if [[ $refused != 0 ]]; then
                        ok=0
                    elif [[ $want == 0 || $want == unseen ]]; then
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
                        record "$tool $exe $target ($how)" FAIL "rc=$rc, want $want invalid write(s) and the plain run's error count (${baseline[$tool]:-none}): $detail; $refused NVTX call(s) refused; first complaint: $(first_complaint "$log") (see $(basename "$log"))"
                done
            done
        done
        # Many threads, chunks taken and given back, every block annotated: no error, no refused
        # NVTX call (the churn of the reliability section, with annotations on).
        if [[ -x build/gpu/churn ]] || nvcc -O2 -cudart shared -o build/gpu/churn c_tests/gpu/churn.cu 2>"$LOG/churn-build.log"; then
            log=$LOG/sanitizer-churn-nvtx.log
            CHURN_OPS=2000 CHURN_THREADS=4 HBMALLOC_CONF=backtrace:off,leak_report:off,nvtx:on LD_PRELOAD=$LIB \
                compute-sanitizer --nvtx yes --tool memcheck --error-exitcode 3 build/gpu/churn >"$log" 2>&1
            rc=$?
            refused=$(grep -c 'Call to nvtx' "$log")
            summary=$(grep -E 'ERROR SUMMARY|ops=' "$log" | tr '\n' ' ')
            [[ $rc == 0 && $refused == 0 ]] && record "memcheck churn (nvtx:on)" PASS "$summary" ||
                record "memcheck churn (nvtx:on)" FAIL "rc=$rc, $refused NVTX call(s) refused; $summary; first complaint: $(first_complaint "$log")"
        fi
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

# Builds bench/peer_bench.cpp once per peer library into build/gpu/peer_bench_<lib>, the
# compiles in parallel (RMM's and PyTorch's headers take most of the time), once per call, and
# lists what built in PEERS as "<lib>:<allocator>". peer_bench_rt (the runtime's own entry points,
# and hbmalloc's drop-in under LD_PRELOAD) is always built. A peer that does not build is a FAIL
# or SKIP row of its own; the others still run.
declare -a PEERS=()
PEERS_BUILT=0
build_peers() {
    [[ $PEERS_BUILT == 1 ]] && return
    PEERS_BUILT=1
    local started=$SECONDS cxx="g++ -O2 -std=c++17 -I$CUDA/include bench/peer_bench.cpp -lpthread -ldl"
    local cudart="-L$CUDA/lib64 -lcudart -Wl,-rpath,$CUDA/lib64"
    local -A pid=() label=()
    # The runtime only: under LD_PRELOAD its cudaMalloc is hbmalloc's drop-in path.
    $cxx -o build/gpu/peer_bench_rt $cudart 2>"$LOG/peer-rt-build.log" &
    pid[rt]=$!
    # hbmalloc through its C API: linked, not preloaded, so its cudaMalloc serves nobody else.
    $cxx -DPEER_HBM -Iinclude -o build/gpu/peer_bench_hbm -L"$STAGE" -lhbmalloc -Wl,-rpath,"$PWD/$STAGE" \
        $cudart 2>"$LOG/peer-hbm-build.log" &
    pid[hbm]=$! label[hbm]="hbm:hbmalloc"
    local torch_lib torch_inc abi
    if torch_lib=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null); then
        torch_inc=$(dirname "$torch_lib")/include
        abi=$(python3 -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
        $cxx -DPEER_TORCH -D_GLIBCXX_USE_CXX11_ABI="$abi" -I"$torch_inc" -o build/gpu/peer_bench_torch \
            -L"$torch_lib" -lc10_cuda -lc10 -Wl,-rpath,"$torch_lib" $cudart 2>"$LOG/peer-torch-build.log" &
        pid[torch]=$! label[torch]="torch:pytorch"
    else
        record "peer PyTorch" SKIP "torch not importable"
    fi
    local rmm=build/gpu/rmm
    if ls "$STAGE"/peers/librmm*.whl >/dev/null 2>&1; then
        mkdir -p "$rmm"
        for whl in "$STAGE"/peers/*.whl; do python3 -m zipfile -e "$whl" "$rmm"; done
        $cxx -DPEER_RMM -I"$rmm/librmm/include" -I"$rmm/librmm/include/rapids" -I"$rmm/rapids_logger/include" \
            -o build/gpu/peer_bench_rmm -L"$rmm/librmm/lib64" -L"$rmm/rapids_logger/lib64" -lrmm -lrapids_logger \
            -Wl,-rpath,"$PWD/$rmm/librmm/lib64:$PWD/$rmm/rapids_logger/lib64" $cudart 2>"$LOG/peer-rmm-build.log" &
        pid[rmm]=$! label[rmm]="rmm:rmm-pool rmm:rmm-arena"
    else
        record "peer RMM" SKIP "no wheels in $STAGE/peers (gpu-stage.sh downloads them)"
    fi
    local lib built="" more
    for lib in rt hbm torch rmm; do
        [[ -n ${pid[$lib]:-} ]] || continue
        if wait "${pid[$lib]}"; then
            # rt is not in PEERS: the sections that use it name its allocators themselves.
            if [[ $lib != rt ]]; then
                read -r -a more <<<"${label[$lib]}"
                PEERS+=("${more[@]}")
            fi
            built+="$lib "
        else
            record "peer_bench $lib build" FAIL "$(grep -m2 error "$LOG/peer-$lib-build.log" | tr '\n' ' ')"
        fi
    done
    record "peer_bench builds" PASS "built ${built}in $((SECONDS - started)) s (in parallel)"
}

if want paged-torch; then
    # hbmalloc.paged's torch views (python/tests/test_paged.py, class PagedTorch): the block
    # pool and block tables as tensors over the paged cache's own memory, an append read back.
    if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
        if HBMALLOC_LIB=$LIB PYTHONPATH=$PWD/python HBMALLOC_CONF=backend:cuda,leak_report:off \
            python3 -m unittest -v python/tests/test_paged.py >"$LOG/paged-torch.log" 2>&1 \
            && grep -q 'paged-torch: ' "$LOG/paged-torch.log"; then
            # (unittest -v puts the test's print after "... " on its own line: no ^ anchor.)
            record "python paged KV torch views" PASS "$(grep -o 'paged-torch: .*' "$LOG/paged-torch.log" | head -1)"
        else
            record "python paged KV torch views" FAIL "see paged-torch.log: $(tail -3 "$LOG/paged-torch.log" | tr '\n' ' ')"
        fi
    else
        record "python paged KV torch views" FAIL "torch with CUDA not importable"
    fi
fi

if want bench; then
    exe=build/gpu/alloc_bench
    if gcc -O2 -I"$CUDA/include" bench/alloc_bench.c -o "$exe" -L"$CUDA/lib64" -lcudart -lpthread -ldl -Wl,-rpath,"$CUDA/lib64" 2>"$LOG/bench-build.log"; then
        build_peers
        : >"$LOG/bench.txt"
        export BENCH_SECONDS=${BENCH_SECONDS:-1}
        # Several rounds, every configuration once per round, so that a noisy neighbour on the
        # host hits them all alike; bench-table.py gives each configuration's median and spread.
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

if want distributed; then
    # One rank per visible GPU (one on a one-GPU machine: NCCL and DDP under the preload, not the
    # cross-device paths). NCCL_NVLS_ENABLE=0 is set in every rank's environment by the script.
    if python3 scripts/torch_distributed_check.py "$LIB" "$LOG/distributed" >"$LOG/distributed.log" 2>&1; then
        record "torch.distributed NCCL+DDP" PASS "$(tail -1 "$LOG/distributed.log")"
    else
        record "torch.distributed NCCL+DDP" FAIL "$(tail -3 "$LOG/distributed.log" | tr '\n' ' ' | cut -c1-400)"
    fi
fi

# Before the replays: the llama-bench trace it writes is one of theirs.
if want llama; then
    if [[ -n $LLAMA_BUILD_PID ]]; then wait "$LLAMA_BUILD_PID"; else bash scripts/gpu-llama.sh build "$LOG" >"$LOG/llama-build.out" 2>&1; fi
    while IFS='|' read -r _ name status detail; do
        record "$name" "$status" "$detail"
    done < <(bash scripts/gpu-llama.sh check "$LOG" "$LIB" 2>"$LOG/llama-check.err" | tee "$LOG/llama-check.out" | grep '^RESULT|')
fi

# `replay` is both sections below, in this order.
if want replay; then
    SECTIONS+=" workloads replay-peers"
fi

# Real workloads (scripts/workloads.py) end to end on PyTorch's allocator and on hbmalloc (drop-in
# with backtraces off and on, and the pluggable allocator), in interleaved rounds: time and peak
# memory, into workloads.txt. Round 1's drop-in run records each workload's trace
# (gpu-out/recorded/<name>.trace, to refresh bench/traces/) and is labelled hbmalloc+trace, so
# tracing's cost stays out of hbmalloc's own figures. A round starts only while the time spent
# plus the last round's stays within WORKLOADS_BUDGET_S (default 420: generate alone takes about
# 30 s a run); WORKLOADS (default "train infer generate"), WORKLOAD_ROUNDS (default 3).
if want workloads; then
    if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
        : >"$LOG/workloads.txt"
        mkdir -p "$LOG/recorded"
        started=$SECONDS last=0 rounds=0
        for round in $(seq "${WORKLOAD_ROUNDS:-3}"); do
            (( SECONDS - started + last <= ${WORKLOADS_BUDGET_S:-420} )) || break
            round_start=$SECONDS
            for w in ${WORKLOADS:-train infer generate}; do
                w_start=$SECONDS
                python3 scripts/workloads.py "$w" 2>>"$LOG/workloads.log" | sed 's/^workload/pytorch workload/' >>"$LOG/workloads.txt"
                if [[ $round == 1 ]]; then
                    PYTORCH_NO_CUDA_MEMORY_CACHING=1 HBMALLOC_CONF=backtrace:off,leak_report:off,trace:$LOG/recorded/$w.trace LD_PRELOAD=$LIB \
                        python3 scripts/workloads.py "$w" 2>>"$LOG/workloads.log" | sed 's/^workload/hbmalloc+trace workload/' >>"$LOG/workloads.txt"
                else
                    PYTORCH_NO_CUDA_MEMORY_CACHING=1 HBMALLOC_CONF=backtrace:off,leak_report:off LD_PRELOAD=$LIB \
                        python3 scripts/workloads.py "$w" 2>>"$LOG/workloads.log" | sed 's/^workload/hbmalloc workload/' >>"$LOG/workloads.txt"
                fi
                PYTORCH_NO_CUDA_MEMORY_CACHING=1 HBMALLOC_CONF=leak_report:off LD_PRELOAD=$LIB \
                    python3 scripts/workloads.py "$w" 2>>"$LOG/workloads.log" | sed 's/^workload/hbmalloc+bt workload/' >>"$LOG/workloads.txt"
                HBM_PLUGGABLE=1 HBMALLOC_LIB=$LIB HBMALLOC_CONF=backtrace:off,leak_report:off \
                    python3 scripts/workloads.py "$w" 2>>"$LOG/workloads.log" | sed 's/^workload/hbmalloc-pluggable workload/' >>"$LOG/workloads.txt"
                # Reference builds (gpu-stage.sh HBM_REF=...): before/after in the same rounds.
                for ref in "$STAGE"/ref/*/libhbmalloc.so; do
                    [[ -f $ref ]] || continue
                    name=$(basename "$(dirname "$ref")")
                    PYTORCH_NO_CUDA_MEMORY_CACHING=1 HBMALLOC_CONF=backtrace:off,leak_report:off LD_PRELOAD=$PWD/$ref \
                        python3 scripts/workloads.py "$w" 2>>"$LOG/workloads.log" | sed "s/^workload/hbmalloc-$name workload/" >>"$LOG/workloads.txt"
                done
                echo "workloads: $w, every allocator once: $((SECONDS - w_start)) s"
            done
            last=$((SECONDS - round_start)) rounds=$round
            echo "workloads: round $round took $last s"
        done
        cat "$LOG/workloads.txt"
        if [[ $rounds -gt 0 ]] && grep -q '^pytorch workload' "$LOG/workloads.txt"; then
            record "workloads end to end" PASS "$rounds round(s) in $((SECONDS - started)) s, $(grep -c . "$LOG/workloads.txt") lines in workloads.txt"
        else
            record "workloads end to end" FAIL "no figures: see workloads.log: $(tail -2 "$LOG/workloads.log" | tr '\n' ' ')"
        fi
    else
        record "workloads end to end" FAIL "torch with CUDA not importable"
    fi
fi

# The committed traces (bench/traces/*.trace.gz, decompressed into gpu-out/traces), the seed's
# 100-allocation step (recorded here with alloc_bench) and llama-bench's
# (gpu-out/llama-bench.trace, left by the llama section when it ran earlier in this call or in an
# earlier call on the same machine) replayed against every peer in interleaved rounds, into
# replay-peers.txt: for each, one process replays the trace untimed reading the device's memory
# after every allocation (memory:, peak reserved / peak in use, and in round 1 the series for the
# plots, gpu-out/series/<trace>.<allocator>.series), then times BENCH_REPLAYS replays (replay:,
# ns per operation). The runtime's cudaMalloc, at ~60 us a call, times one replay instead of 3.
# hbmalloc's own `hbmalloc replay` (recorded order, pool statistics) runs once per trace on the
# GPU and on the simulated device. A round starts only while the time spent plus the last round's
# stays within REPLAY_BUDGET_S (default 240): REPLAY_ROUNDS (default 5) is a ceiling.
if want replay-peers; then
    build_peers
    started=$SECONDS
    : >"$LOG/replay-peers.txt"
    mkdir -p "$LOG/traces" "$LOG/series"
    conf=${REPLAY_CONF:-backtrace:off,leak_report:off}
    for gz in bench/traces/*.trace.gz; do gunzip -c "$gz" >"$LOG/traces/$(basename "$gz" .gz)"; done
    # The seed's step through alloc_bench, which exits normally (peer_bench's _exit would lose the
    # trace's buffer): four steps (three warm-up, one timed), 800 events.
    if [[ -x build/gpu/alloc_bench ]] || gcc -O2 -I"$CUDA/include" bench/alloc_bench.c -o build/gpu/alloc_bench \
        -L"$CUDA/lib64" -lcudart -lpthread -ldl -Wl,-rpath,"$CUDA/lib64" 2>"$LOG/bench-build.log"; then
        BENCH_SECONDS=0 HBMALLOC_CONF=$conf,trace:$LOG/traces/step.trace LD_PRELOAD=$LIB \
            build/gpu/alloc_bench malloc step >/dev/null 2>>"$LOG/replay-errors.log"
    else
        record "alloc_bench build (the step trace)" FAIL "$(head -3 "$LOG/bench-build.log" | tr '\n' ' ')"
    fi
    [[ -s $LOG/llama-bench.trace ]] && cp "$LOG/llama-bench.trace" "$LOG/traces/llama-bench.trace"
    traces=$(ls "$LOG"/traces/*.trace)
    for t in $traces; do
        name=$(basename "$t" .trace)
        HBMALLOC_CONF=$conf "$STAGE/hbmalloc" replay "$t" --series "$LOG/series/$name.hbmalloc-replay.series" \
            >>"$LOG/replay-peers.txt" 2>>"$LOG/replay-errors.log"
        HBMALLOC_CONF=backend:sim,sim_capacity:140GiB,$conf "$STAGE/hbmalloc" replay "$t" --series "$LOG/series/$name.hbmalloc-sim.series" \
            2>>"$LOG/replay-errors.log" | sed 's/^replay/replay-sim/' >>"$LOG/replay-peers.txt"
    done
    last=0 rounds=0 failures=0
    for round in $(seq "${REPLAY_ROUNDS:-5}"); do
        (( SECONDS - started + last <= ${REPLAY_BUDGET_S:-240} )) || break
        round_start=$SECONDS
        for t in $traces; do
            name=$(basename "$t" .trace)
            # Every allocator on one trace, then the next trace: a noisy moment hits all alike.
            for peer in rt:cudaMalloc rt:cudaMallocAsync "${PEERS[@]}" dropin:cudaMalloc; do
                exe=build/gpu/peer_bench_${peer%%:*} who=${peer#*:} pre=() reps=${BENCH_REPLAYS:-3}
                if [[ $peer == dropin:* ]]; then
                    exe=build/gpu/peer_bench_rt pre=(LD_PRELOAD=$LIB) who=hbmalloc-dropin
                fi
                [[ $peer == rt:cudaMalloc ]] && reps=1
                [[ -x $exe ]] || continue
                series=/dev/null
                [[ $round == 1 ]] && series=$LOG/series/$name.$who.series
                env "${pre[@]}" HBMALLOC_CONF=$conf BENCH_REPLAYS=$reps BENCH_SERIES=$series \
                    "$exe" "${peer#*:}" "memory:$t" "replay:$t" >>"$LOG/replay-peers.txt" 2>>"$LOG/replay-errors.log" ||
                    failures=$((failures + 1))
            done
        done
        last=$((SECONDS - round_start)) rounds=$round
        echo "replay-peers: round $round took $last s"
    done
    cat "$LOG/replay-peers.txt"
    detail="$rounds round(s) of $(wc -w <<<"$traces") traces in $((SECONDS - started)) s (builds apart); $(grep -c ' raw ' "$LOG/replay-peers.txt") figures in replay-peers.txt"
    if [[ $rounds -gt 0 && $failures == 0 ]]; then
        record "trace replay against every peer" PASS "$detail"
    else
        record "trace replay against every peer" FAIL "$failures peer runs failed (replay-errors.log: $(tail -2 "$LOG/replay-errors.log" | tr '\n' ' ')); $detail"
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
    # Without the tensors the PyTorch checks save (60 MiB: past what comes back from $OUT).
    tar czf "$OUT/gpu-logs.tgz" -C "$LOG" --exclude='*.pt' --exclude='*.gguf' .
    cp "$LOG/bench.txt" "$OUT/" 2>/dev/null
    cp "$LOG/workloads.txt" "$LOG/replay-peers.txt" "$OUT/" 2>/dev/null
    [[ -d $LOG/series ]] && tar czf "$OUT/series.tgz" -C "$LOG" series
    cp "$LOG/profile.txt" "$OUT/" 2>/dev/null
fi
echo
echo "gpu-check on $CARD"
printf '| %-34s | %-4s | %s |\n' check result detail
printf '|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..36})" "------" "--------"
printf '%s\n' "${ROWS[@]}"
exit $FAILED
