"""PyTorch on hbmalloc through `torch.cuda.memory.CUDAPluggableAllocator`."""

from . import _lib

_ALLOCATOR = None


def allocator():
    """The CUDAPluggableAllocator over libhbmalloc.so's hbm_torch_malloc / hbm_torch_free."""
    global _ALLOCATOR
    if _ALLOCATOR is None:
        import torch

        _ALLOCATOR = torch.cuda.memory.CUDAPluggableAllocator(
            _lib.path(), "hbm_torch_malloc", "hbm_torch_free"
        )
    return _ALLOCATOR


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
    import torch

    if not hasattr(torch.cuda, "MemPool"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.cuda.MemPool (2.5+ needed)")
    return torch.cuda.MemPool(allocator().allocator())
