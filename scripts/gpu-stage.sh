#!/usr/bin/env bash
# Builds everything the GPU machine runs (it has no Rust toolchain) into gpu-stage/, which git
# ignores and the device tool carries: the library, the CLI, the example benchmarks and the
# integration-test binaries. Then run `bash scripts/gpu-check.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gpu-stage && mkdir -p gpu-stage/tests gpu-stage/examples
# --lib too: without it the cdylib is built only as a dependency and target/release/libhbmalloc.so
# is not refreshed (a stale library was once staged that way).
cargo build --release --lib --bins --examples
cp target/release/libhbmalloc.so target/release/hbmalloc gpu-stage/
for ex in target/release/examples/*; do
    [[ -f $ex && -x $ex && $ex != *.d && $(basename "$ex") != *-* ]] && cp "$ex" gpu-stage/examples/
done
cargo test --release --no-run --message-format=json 2>/dev/null | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    if msg["profile"]["test"] and "test" in msg["target"]["kind"]:
        shutil.copy(msg["executable"], "gpu-stage/tests/" + msg["target"]["name"])
'
# Only test binaries with GPU tests (#[ignore = "needs a CUDA GPU"]) run there; the rest, and the
# CLI's debug info, would take the stage past the device tool's 64 MiB carry limit.
# (The listing is read whole first: `grep -q` in a pipeline under pipefail can stop the binary
# with SIGPIPE and drop a binary that has GPU tests, as paged_kv_gpu once was.)
for t in gpu-stage/tests/*; do
    listing=$("$t" --list --ignored 2>/dev/null || true)
    [[ $listing == *': test'* ]] || rm -f "$t"
done
strip --strip-debug gpu-stage/hbmalloc gpu-stage/tests/* gpu-stage/examples/* 2>/dev/null || true
# RMM, a peer in gpu-check's benchmark: its wheels carry headers and libraries (the GPU machine
# has no network). Skipped, with a line, where PyPI cannot be reached.
mkdir -p gpu-stage/peers
pip download --quiet --no-deps --dest gpu-stage/peers librmm-cu13==26.10.0 rapids-logger==0.3.0 \
    || echo "gpu-stage: could not download the RMM wheels; the benchmark will run without RMM"
# llama.cpp, for gpu-check's `llama` section (built there with CUDA, the runtime linked shared so
# LD_PRELOAD reaches it): its source ships in the llama-cpp-python source distribution. Only what
# a CUDA build needs travels (models, docs, other backends left out: 5 MiB instead of 176).
# Cached in target/ (keyed by version); skipped, with a line, where PyPI cannot be reached.
LLAMA_CPP_PY=${LLAMA_CPP_PY:-0.3.36}
llama_tar=target/llama-src-$LLAMA_CPP_PY.tar.xz
if [[ ! -f $llama_tar ]]; then
    sdist=$(mktemp -d)
    # The sdist's address from PyPI's simple index, fetched as a plain file: `pip download` of an
    # sdist prepares its metadata, which builds the build backend from source (and can hang).
    url=$(curl -fsS -m 60 https://pypi.org/simple/llama-cpp-python/ 2>/dev/null \
        | grep -o "https://[^\"#]*/llama_cpp_python-$LLAMA_CPP_PY\.tar\.gz" | head -n 1)
    if [[ -n $url ]] && curl -fsS -m 600 -o "$sdist/llama_cpp_python-$LLAMA_CPP_PY.tar.gz" "$url"; then
        tar xzf "$sdist"/llama_cpp_python-*.tar.gz -C "$sdist"
        tar cJf "$llama_tar" -C "$sdist"/llama_cpp_python-*/vendor \
            --exclude=llama.cpp/models --exclude=llama.cpp/docs --exclude=llama.cpp/media \
            --exclude=llama.cpp/tools/ui --exclude='llama.cpp/.git*' \
            $(for b in sycl vulkan opencl metal cann musa webgpu hexagon; do echo "--exclude=llama.cpp/ggml/src/ggml-$b"; done) \
            llama.cpp
    else
        echo "gpu-stage: could not download llama-cpp-python $LLAMA_CPP_PY; gpu-check's llama section will skip"
    fi
    rm -rf "$sdist"
fi
[[ -f $llama_tar ]] && cp "$llama_tar" gpu-stage/llama-src.tar.xz
# HBM_REF="name=commit ...": those commits' libraries too, as gpu-stage/ref/<name>/libhbmalloc.so,
# for gpu-check's benchmark to run beside the current one (before/after from the same run).
for ref in ${HBM_REF:-}; do
    name=${ref%%=*} commit=${ref#*=}
    ref_tree=$(mktemp -d)
    git worktree add --detach "$ref_tree" "$commit" >/dev/null
    (cd "$ref_tree" && CARGO_TARGET_DIR=/tmp/hbm-ref-target cargo build --release --lib --quiet)
    mkdir -p "gpu-stage/ref/$name"
    cp /tmp/hbm-ref-target/release/libhbmalloc.so "gpu-stage/ref/$name/"
    strip --strip-debug "gpu-stage/ref/$name/libhbmalloc.so"
    git worktree remove --force "$ref_tree"
done
ls -R gpu-stage | head -40
du -sh gpu-stage
