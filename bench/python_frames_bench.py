"""What recording Python call sites costs per allocation (docs/pytorch.md quotes it).

Each configuration runs in its own process (HBMALLOC_CONF is read once), on the simulated device:
N hbm_torch_malloc+hbm_torch_free pairs of 4 KiB from a Python stack DEPTH frames deep, called
through ctypes.PyDLL (the GIL held: the walk runs at once) and ctypes.CDLL (the GIL released: the
pluggable allocator's path takes it back for the walk, as under PyTorch). The figure is the time
per pair with python_frames:on minus the same with python_frames:off, median of interleaved
rounds; the ctypes call itself (~1 us) is in both.

    HBMALLOC_LIB=target/release/libhbmalloc.so python3 bench/python_frames_bench.py [N] [DEPTH]
"""
import ctypes
import os
import statistics
import subprocess
import sys
import time

LIB = os.environ.get("HBMALLOC_LIB", "target/release/libhbmalloc.so")


def child(kind, n, depth):
    cls = ctypes.PyDLL if kind == "pydll" else ctypes.CDLL
    lib = cls(os.path.abspath(LIB))
    lib.hbm_torch_malloc.restype = ctypes.c_void_p
    lib.hbm_torch_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    lib.hbm_torch_free.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    malloc, free = lib.hbm_torch_malloc, lib.hbm_torch_free

    def loop():
        t0 = time.perf_counter_ns()
        for _ in range(n):
            free(malloc(4096, 0, None), 4096, 0, None)
        return time.perf_counter_ns() - t0

    def nest(d):
        return loop() if d == 0 else nest(d - 1)

    nest(depth)  # warm: code objects named, pool filled
    print(nest(depth) / n)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    depth = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    results = {}
    for _ in range(5):
        for kind in ("pydll", "cdll"):
            for mode in ("off", "on"):
                env = dict(os.environ, HBMALLOC_CONF=f"backend:sim,leak_report:off,python_frames:{mode}")
                out = subprocess.run([sys.executable, __file__, "child", kind, str(n), str(depth)],
                                     env=env, capture_output=True, text=True, check=True)
                results.setdefault((kind, mode), []).append(float(out.stdout))
    for kind in ("pydll", "cdll"):
        off = statistics.median(results[(kind, "off")])
        on = statistics.median(results[(kind, "on")])
        print(f"python_frames {kind}: depth {depth}: off {off:.0f} ns/pair, on {on:.0f} ns/pair, "
              f"cost {on - off:.0f} ns per allocation ({(on - off) / (depth + 3):.1f} ns per frame)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
