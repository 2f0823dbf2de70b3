"""hbmalloc from Python: statistics, leak checks and reports over libhbmalloc.so (ctypes), and
PyTorch's pluggable allocator (`hbmalloc.torch.enable()`). Needs no torch unless you use
`hbmalloc.torch`."""

import ctypes
import json
import os
import tempfile

from . import _lib
from ._lib import path as library_path

__all__ = ["snapshot", "dump_snapshot", "timeline_json", "stats", "memory_stats", "checkpoint", "leaks", "report", "report_json", "library_path"]


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


def _frames(python_frames, native_frames):
    """A call site's frames as the snapshot's viewer reads them ({filename, line, name}),
    innermost first: the Python stack, then the native one (PyTorch's own snapshots order a
    block's frames the same way when they hold both)."""
    frames = [
        {"filename": f["file"], "line": f["line"], "name": f["function"]} for f in python_frames
    ]
    frames += [
        {
            "filename": f.get("file") or f.get("library") or "??",
            "line": f.get("line") or 0,
            "name": f.get("function") or f["ip"],
        }
        for f in native_frames
    ]
    return frames


def timeline_json():
    """The alloc/free timeline as a dict (`hbm_report_timeline_json`), or None when hbmalloc keeps
    none (`timeline:N` in HBMALLOC_CONF turns it on)."""
    tmp = tempfile.mkdtemp(prefix="hbmalloc-")
    target = os.path.join(tmp, "timeline.json")
    try:
        status = _lib.lib().hbm_report_timeline_json(os.fsencode(target))
        if status == _lib.STATUS_NOT_SUPPORTED:
            return None
        _lib.check(status, "hbm_report_timeline_json")
        with open(target) as f:
            return json.load(f)
    finally:
        if os.path.exists(target):
            os.remove(target)
        os.rmdir(tmp)


def _device_traces(timeline, device_count):
    """`device_traces` from the timeline: per device, its events oldest first, as PyTorch's trace
    entries (`alloc`; a free is `free_requested` then `free_completed`, as hbmalloc reuses a
    freed block only once the stream has passed the free). hbmalloc's events carry no stream:
    every entry says stream 0."""
    traces = [[] for _ in range(device_count)]
    if timeline is None:
        return traces
    python_sites = timeline.get("python_sites", {})
    frames_of = {}
    for e in timeline["events"]:
        device = e["device"]
        if device < 0:  # pinned host memory: not a device's
            continue
        while len(traces) <= device:
            traces.append([])
        site = e.get("site")
        if site is not None and site not in frames_of:
            key = str(site)
            frames_of[site] = _frames(python_sites.get(key, []), timeline["sites"].get(key, []))
        entry = {
            "addr": int(e["ptr"], 16),
            "size": e["size"],
            "stream": 0,
            "time_us": e["t_ns"] // 1000,
            "frames": frames_of.get(site, []),
        }
        if e["op"] == "alloc":
            traces[device].append(dict(entry, action="alloc"))
        else:
            traces[device].append(dict(entry, action="free_requested"))
            traces[device].append(dict(entry, action="free_completed"))
    return traces


def snapshot(device_count=1):
    """Live memory in the format of `torch.cuda.memory._snapshot()`, for PyTorch's viewer
    (`python -m torch.cuda._memory_viz trace_plot|segment_plot`, the memory_viz page). Built from
    `report_json()`: one segment per live allocation (hbmalloc does not expose its chunks; cached
    memory shows only in `memory_stats()`), each with one active block whose `frames` are its call
    site's Python frames (when Python allocated it) and native frames, innermost first.
    `device_traces`: per device, the alloc/free events of hbmalloc's timeline when it keeps one
    (`timeline:N` in HBMALLOC_CONF), else empty lists (at least `device_count` of them)."""
    segments = []
    for site in report_json()["sites"]:
        frames = _frames(site.get("python_frames", []), site["frames"])
        for a in site["allocations"]:
            if a["device"] < 0:  # pinned host memory is no device's segment
                continue
            address, size = int(a["ptr"], 16), a["size"]
            block = {
                "address": address,
                "size": size,
                "requested_size": size,
                "state": "active_allocated",
                "frames": frames,
            }
            segments.append({
                "device": a["device"],
                "address": address,
                "total_size": size,
                "allocated_size": size,
                "active_size": size,
                "requested_size": size,
                "stream": int(a["stream"], 16),
                "segment_type": "large" if size > (1 << 20) else "small",
                "segment_pool_id": (0, 0),
                "is_expandable": False,
                "frames": frames,
                "blocks": [block],
            })
    segments.sort(key=lambda s: (s["device"], s["address"]))
    return {"segments": segments, "device_traces": _device_traces(timeline_json(), device_count)}


def dump_snapshot(path, device_count=1):
    """Writes `snapshot()` as a pickle, as `torch.cuda.memory._dump_snapshot` does."""
    import pickle

    with open(path, "wb") as f:
        pickle.dump(snapshot(device_count), f)
