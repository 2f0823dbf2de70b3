"""Builds and loads torch_shim.cpp (see its header): compiled once per torch install against
that torch's C++ headers and libc10, then cached (`$HBMALLOC_CACHE`, else
`$XDG_CACHE_HOME/hbmalloc`, else `~/.cache/hbmalloc`)."""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

from . import _lib

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_shim.cpp")

# Hook numbers of hbm_shim_hook, in the order of PyTorch's setters.
HOOK_SETTERS = ("set_begin_allocate_to_pool", "set_end_allocate_to_pool_fn", "set_release_pool")


class ShimUnavailable(RuntimeError):
    """The shim cannot be built here; the message names what is missing."""


def compiler():
    """The C++ compiler to use: $CXX, else c++, g++ or clang++ on PATH; ShimUnavailable if none."""
    cxx = os.environ.get("CXX")
    if cxx:
        if shutil.which(cxx) is None:
            raise ShimUnavailable(f"the C++ compiler $CXX={cxx!r} is not found")
        return cxx
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return name
    raise ShimUnavailable("no C++ compiler found (c++, g++ or clang++ on PATH, or set $CXX)")


def cache_dir():
    base = os.environ.get("HBMALLOC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "hbmalloc")
    return base


def build(torch_dir, torch_version, cxx11_abi, cxx=None):
    """The path of the shim built for the torch installed at `torch_dir` (the package folder:
    its include/ and lib/ are used), building it on first use; ShimUnavailable when it cannot."""
    include = os.path.join(torch_dir, "include")
    libdir = os.path.join(torch_dir, "lib")
    if not os.path.exists(os.path.join(include, "c10", "util", "Exception.h")):
        raise ShimUnavailable(f"torch's C++ headers are not installed ({include}/c10/util/Exception.h)")
    if not os.path.exists(os.path.join(libdir, "libc10.so")):
        raise ShimUnavailable(f"torch's libc10.so is not in {libdir}")
    cxx = cxx or compiler()
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([
        source, torch_version.encode(), os.path.realpath(torch_dir).encode(),
        str(int(cxx11_abi)).encode(), cxx.encode()])).hexdigest()[:16]
    out_dir = cache_dir()
    target = os.path.join(out_dir, f"torch-shim-{key}.so")
    if os.path.exists(target):
        return target
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ShimUnavailable(f"cannot create the cache folder {out_dir}: {e}") from e
    # Built under a temporary name, then renamed: processes building at once never load half a file.
    fd, tmp = tempfile.mkstemp(prefix=".torch-shim-", suffix=".so", dir=out_dir)
    os.close(fd)
    errors = []
    try:
        for std in ("c++17", "c++20"):
            cmd = [cxx, "-shared", "-fPIC", "-O2", f"-std={std}",
                   f"-D_GLIBCXX_USE_CXX11_ABI={int(cxx11_abi)}", "-I", include, SOURCE,
                   "-L", libdir, "-lc10", f"-Wl,-rpath,{libdir}", "-o", tmp]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise ShimUnavailable(f"running {cxx} failed: {e}") from e
            if r.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append(r.stderr.strip().splitlines()[-3:])
        tail = " | ".join(" ".join(e) for e in errors)[-600:]
        raise ShimUnavailable(f"compiling {SOURCE} with {cxx} failed: {tail}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def address(fn):
    return ctypes.cast(fn, ctypes.c_void_p).value


def load(path):
    """Loads a built shim and binds it to the libhbmalloc this package uses; returns the CDLL."""
    shim = ctypes.CDLL(path)
    shim.hbm_shim_hook.restype = ctypes.c_void_p
    shim.hbm_shim_hook.argtypes = [ctypes.c_int]
    shim.hbm_shim_bind.argtypes = [ctypes.c_void_p] * 7
    lib = _lib.lib()
    status = shim.hbm_shim_bind(*(address(getattr(lib, name)) for name in (
        "hbm_torch_try_malloc", "hbm_torch_graph_malloc", "hbm_torch_free",
        "hbm_torch_graph_begin", "hbm_torch_graph_end", "hbm_torch_graph_release",
        "hbm_status_str")))
    if status != 0:
        raise ShimUnavailable(f"{_lib.path()} lacks the entry points the shim needs")
    return shim
