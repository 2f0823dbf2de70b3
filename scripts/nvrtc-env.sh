# Source this file: installs NVRTC from PyPI (no CUDA toolkit needed) and exports LD_LIBRARY_PATH
# so that `cargo test --test nvrtc_compile` finds libnvrtc.so.13.
#
#   source scripts/nvrtc-env.sh
#
# 13.0.x matches CUDA 13.0 (driver 580): PTX from a newer NVRTC may not load on an older driver.
HBM_NVRTC_WHEEL="${HBM_NVRTC_WHEEL:-nvidia-cuda-nvrtc==13.0.88}"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$HBM_NVRTC_WHEEL" || return 1 2>/dev/null || exit 1
HBM_NVRTC_LIB="$(python3 -c 'import nvidia, os, glob; print(next(os.path.dirname(p) for d in nvidia.__path__ for p in sorted(glob.glob(os.path.join(d, "*", "lib", "libnvrtc.so.*")))))')" \
    || { echo "nvrtc-env.sh: libnvrtc not found in the wheel" >&2; return 1 2>/dev/null || exit 1; }
export LD_LIBRARY_PATH="$HBM_NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "nvrtc-env.sh: LD_LIBRARY_PATH has $HBM_NVRTC_LIB"
