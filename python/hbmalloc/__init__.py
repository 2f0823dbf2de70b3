"""hbmalloc from Python: statistics, leak checks and reports over libhbmalloc.so (ctypes), and
PyTorch's pluggable allocator (`hbmalloc.torch.enable()`). Needs no torch unless you use
`hbmalloc.torch`."""

import ctypes
import json
import os
import tempfile

from . import _lib
from ._lib import path as library_path

__all__ = ["stats", "memory_stats", "checkpoint", "leaks", "report", "report_json", "library_path"]


def stats(device=0):
    """The figures of `hbm_stats` for `device`'s caching pool, as a dict (bytes are block sizes)."""
    s = _lib.HbmStats()
    _lib.check(_lib.lib().hbm_stats(device, ctypes.byref(s)), "hbm_stats")
    return {name: getattr(s, name) for name, _ in _lib.HbmStats._fields_}


def memory_stats(device=0):
    """The keys of `torch.cuda.memory_stats()` that hbmalloc's figures answer (PyTorch cannot ask
    a pluggable allocator for them). Allocation counts are the pool's; `num_ooms` counts the
    NULLs `hbm_torch_malloc` returned."""
    s = stats(device)
    return {
        "allocated_bytes.all.current": s["in_use"],
        "allocated_bytes.all.peak": s["peak_in_use"],
        "active_bytes.all.current": s["in_use"],
        "active_bytes.all.peak": s["peak_in_use"],
        "reserved_bytes.all.current": s["reserved"],
        "reserved_bytes.all.peak": s["peak_reserved"],
        "allocation.all.current": s["allocs"] - s["frees"],
        "allocation.all.allocated": s["allocs"],
        "allocation.all.freed": s["frees"],
        "segment.all.current": s["driver_allocs"] - s["driver_frees"],
        "segment.all.allocated": s["driver_allocs"],
        "segment.all.freed": s["driver_frees"],
        "num_alloc_retries": s["oom_retries"],
        "num_ooms": _lib.lib().hbm_torch_oom_count(),
        "num_sync_all_streams": s["syncs"],
        "num_device_alloc": s["driver_allocs"],
        "num_device_free": s["driver_frees"],
    }


def checkpoint():
    """A mark for `leaks(mark)`: allocations made after it that are still live are its leaks."""
    return _lib.lib().hbm_checkpoint()


def leaks(mark=0):
    """(bytes, count) of the allocations made after `mark` (0: all) that are still live."""
    b, c = ctypes.c_uint64(), ctypes.c_uint64()
    _lib.check(_lib.lib().hbm_leaks_since(mark, ctypes.byref(b), ctypes.byref(c)), "hbm_leaks_since")
    return b.value, c.value


def report(path=None):
    """Writes the text leak report of every live allocation to `path` (None: stderr)."""
    _lib.check(_lib.lib().hbm_report_leaks(_encode(path)), "hbm_report_leaks")


def report_json(path=None):
    """The JSON leak report (call sites with frames, and their allocations) as a dict; also
    written to `path` when given."""
    target = path or os.path.join(tempfile.mkdtemp(prefix="hbmalloc-"), "report.json")
    _lib.check(_lib.lib().hbm_report_json(_encode(target)), "hbm_report_json")
    with open(target) as f:
        doc = json.load(f)
    if path is None:
        os.remove(target)
        os.rmdir(os.path.dirname(target))
    return doc


def _encode(path):
    return None if path is None else os.fsencode(path)
