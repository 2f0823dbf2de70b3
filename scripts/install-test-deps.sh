#!/usr/bin/env bash
# Installs what the tests need beyond the Rust toolchain, gcc and python3 with pip, and only what
# is missing:
#  - cmake and pkg-config, from Debian's packages (needs root, or sudo);
#  - the CUDA runtime's headers and libcudart.so.13 (PyPI wheels nvidia-cuda-runtime, and
#    nvidia-cuda-crt for the crt/*.h headers that cuda_runtime.h includes), and NVRTC
#    (nvidia-cuda-nvrtc, for the NVRTC tests), into .whl/ of this checkout (git ignores it).
#    `pip install --target` keeps it out of any Python environment, so it works on a system
#    python marked externally managed (PEP 668) as well.
# After it: .whl/nvidia/cu13/{include,lib}. scripts/test.sh calls it; so does .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if ((${#missing[@]})); then
    echo "install-test-deps: installing ${missing[*]} (apt-get)"
    sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "install-test-deps: need ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
            exit 1
        fi
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# 13.0.x: the CUDA release docs/contract.md's contract was measured on, and the NVRTC that
# scripts/nvrtc-env.sh pins (PTX from a newer NVRTC may not load on a CUDA 13.0 driver).
V="${HBM_CUDA_WHEEL_VERSION:-13.0.88}"
WHEELS=("nvidia-cuda-runtime==$V" "nvidia-cuda-crt==$V" "nvidia-cuda-nvrtc==$V")
WHEEL_DIR=.whl
CU="$WHEEL_DIR/nvidia/cu13"
STAMP="$WHEEL_DIR/.installed"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "${WHEELS[*]}" && -f "$CU/include/cuda_runtime.h" ]]; then
    echo "install-test-deps: ${WHEELS[*]} already in $WHEEL_DIR/"
else
    echo "install-test-deps: pip install --target $WHEEL_DIR ${WHEELS[*]}"
    rm -rf "$WHEEL_DIR"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --root-user-action=ignore --target "$WHEEL_DIR" "${WHEELS[@]}"
    echo "${WHEELS[*]}" >"$STAMP"
fi
for f in "$CU/include/cuda_runtime.h" "$CU/include/crt/host_config.h" "$CU/lib/libcudart.so.13" \
         "$CU/lib/libnvrtc.so.13"; do
    if [[ ! -f "$f" ]]; then
        echo "install-test-deps: $f is missing after installing the wheel" >&2
        exit 1
    fi
done

# The `gguf` Python package (llama.cpp's GGUF writer), for tests/estimate_gguf.rs, into .whl/py-gguf
# (after the CUDA wheels, whose reinstall empties .whl/).
GGUF_DIR="$WHEEL_DIR/py-gguf"
if [[ -d "$GGUF_DIR/gguf" ]]; then
    echo "install-test-deps: gguf already in $GGUF_DIR/"
else
    echo "install-test-deps: pip install --target $GGUF_DIR gguf==0.19.0"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --root-user-action=ignore --target "$GGUF_DIR" "gguf==0.19.0"
fi
