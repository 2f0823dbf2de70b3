"""PyTorch on hbmalloc through `torch.cuda.memory.CUDAPluggableAllocator`.

`enable()` goes through a small C++ shim (torch_shim.cpp, built by `_shim` against the installed
torch on first use and cached): it turns an allocation hbmalloc refuses into
`torch.OutOfMemoryError` (PyTorch's pluggable allocator does not check for NULL) and passes
PyTorch's CUDA graph hooks on to hbmalloc. `pool()` needs no shim: PyTorch's own caching
allocator sits above it and checks every segment it asks for."""

import os
import warnings

from . import _lib, _shim

_ALLOCATOR = None
_SEGMENTS = None
# Why enable() runs without the shim, if it does (for tests and diagnostics).
shim_missing = None


def _pluggable(path, malloc, free):
    import torch

    return torch.cuda.memory.CUDAPluggableAllocator(path, malloc, free)


def shim_path():
    """The built shim for the installed torch (building it on first use); raises
    `_shim.ShimUnavailable` saying what is missing."""
    import torch

    if os.environ.get("HBMALLOC_TORCH_SHIM") == "off":
        raise _shim.ShimUnavailable("HBMALLOC_TORCH_SHIM=off")
    return _shim.build(os.path.dirname(torch.__file__), torch.__version__,
                       torch._C._GLIBCXX_USE_CXX11_ABI)


def allocator():
    """The CUDAPluggableAllocator that `enable()` installs: over the shim when it can be built,
    else over libhbmalloc.so's hbm_torch_malloc / hbm_torch_free, with a warning naming what is
    missing and what is lost."""
    global _ALLOCATOR, shim_missing
    if _ALLOCATOR is None:
        try:
            path = shim_path()
            shim = _shim.load(path)
            alloc = _pluggable(path, "hbm_shim_malloc", "hbm_shim_free")
            _install_graph_hooks(alloc, shim)
        except _shim.ShimUnavailable as e:
            shim_missing = str(e)
            warnings.warn(
                f"hbmalloc.torch: {e}. Running without the shim: an allocation hbmalloc refuses "
                "becomes a tensor at address 0 instead of torch.OutOfMemoryError (the refusal "
                "is still printed on stderr), and memory allocated during CUDA graph capture is "
                "never reused. Install a C++ compiler (or set CXX) and torch's headers to get "
                "both; hbmalloc.torch.pool() needs neither.",
                RuntimeWarning, stacklevel=3)
            alloc = _pluggable(_lib.path(), "hbm_torch_malloc", "hbm_torch_free")
        _ALLOCATOR = alloc
    return _ALLOCATOR


def _install_graph_hooks(alloc, shim):
    hooks = alloc.allocator()
    missing = [name for name in _shim.HOOK_SETTERS if not hasattr(hooks, name)]
    if missing:
        import torch

        warnings.warn(
            f"hbmalloc.torch: torch {torch.__version__} lacks {', '.join(missing)}: memory "
            "allocated during CUDA graph capture is never reused", RuntimeWarning, stacklevel=4)
        return
    for number, name in enumerate(_shim.HOOK_SETTERS):
        getattr(hooks, name)(shim.hbm_shim_hook(number))


def enable():
    """Makes hbmalloc PyTorch's CUDA allocator. Call it before the first CUDA allocation."""
    import torch

    alloc = allocator()
    try:
        torch.cuda.memory.change_current_allocator(alloc)
    except RuntimeError as e:
        raise RuntimeError(
            "hbmalloc.torch.enable() must run before PyTorch's first CUDA allocation (PyTorch "
            "cannot swap an allocator in use); call it right after `import torch`, or use "
            "hbmalloc.torch.pool() for scoped use"
        ) from e
    return alloc


def pool():
    """A torch.cuda.MemPool over hbmalloc, for `with torch.cuda.use_mem_pool(hbmalloc.torch.pool()):`
    (PyTorch 2.5 and later)."""
    global _SEGMENTS
    import torch

    if not hasattr(torch.cuda, "MemPool"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.cuda.MemPool (2.5+ needed)")
    if _SEGMENTS is None:
        _SEGMENTS = _pluggable(_lib.path(), "hbm_torch_segment_malloc", "hbm_torch_free")
    return torch.cuda.MemPool(_SEGMENTS.allocator())
