"""Finds and loads libhbmalloc.so: env HBMALLOC_LIB, else the copy inside this package."""

import ctypes
import os

_LIB = None

# HbmStatus values this package tells apart (include/hbmalloc.h).
STATUS_NOT_SUPPORTED = 5


class HbmStats(ctypes.Structure):
    """struct HbmStats of include/hbmalloc.h, field for field."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "in_use", "reserved", "peak_in_use", "peak_reserved", "driver_allocs",
            "driver_frees", "pool_hits", "pool_misses", "oom_retries", "syncs", "allocs", "frees",
        )
    ]


def path():
    """The library this package uses."""
    return os.environ.get("HBMALLOC_LIB") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "libhbmalloc.so"
    )


def lib():
    """The loaded library, with the prototypes this package calls."""
    global _LIB
    if _LIB is None:
        p = path()
        if not os.path.exists(p):
            raise OSError(f"hbmalloc: {p} not found (build the package, or set HBMALLOC_LIB)")
        l = ctypes.CDLL(p)
        l.hbm_torch_malloc.restype = ctypes.c_void_p
        l.hbm_torch_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
        l.hbm_torch_free.restype = None
        l.hbm_torch_free.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
        l.hbm_torch_oom_count.restype = ctypes.c_uint64
        l.hbm_stats.argtypes = [ctypes.c_int, ctypes.POINTER(HbmStats)]
        l.hbm_checkpoint.restype = ctypes.c_uint64
        l.hbm_leaks_since.argtypes = [
            ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64)
        ]
        l.hbm_report_leaks.argtypes = [ctypes.c_char_p]
        l.hbm_report_json.argtypes = [ctypes.c_char_p]
        l.hbm_report_timeline_json.argtypes = [ctypes.c_char_p]
        l.hbm_backend_name.restype = ctypes.c_char_p
        l.hbm_status_str.restype = ctypes.c_char_p
        l.hbm_status_str.argtypes = [ctypes.c_int]
        _LIB = l
    return _LIB


def check(status, what):
    """Raises RuntimeError for a non-zero HbmStatus."""
    if status != 0:
        text = lib().hbm_status_str(status).decode()
        raise RuntimeError(f"hbmalloc: {what}: {text} (status {status})")
