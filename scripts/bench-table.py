"""Turns the lines alloc_bench printed (bench.txt) into the markdown table of BENCHMARKS.md.

Each line is "<allocator> <api> <case> <value> <unit>"; every configuration of one case was
measured in the same gpu-check run, in several interleaved rounds: each cell is the
configuration's best round (lowest time, highest rate). Usage: python3 scripts/bench-table.py bench.txt
"""
import sys

COLUMNS = [
    ("cudaMalloc", "malloc", "cudaMalloc/cudaFree"),
    ("cudaMallocAsync", "async", "cudaMallocAsync (pool, no release threshold)"),
    ("hbmalloc", "malloc", "hbmalloc cudaMalloc, backtrace off"),
    ("hbmalloc+bt", "malloc", "hbmalloc cudaMalloc, backtrace on"),
    ("hbmalloc", "async", "hbmalloc cudaMallocAsync, backtrace off"),
    ("hbmalloc-sim", "malloc", "hbmalloc on its simulated device (CPU cost alone)"),
    ("hbmalloc", "raw", "hbmalloc C API (hbm_device_alloc), backtrace off"),
    ("pytorch", "raw", "PyTorch CUDACachingAllocator (raw_alloc_with_stream)"),
    ("rmm-pool", "raw", "RMM pool_memory_resource"),
    ("rmm-arena", "raw", "RMM arena_memory_resource"),
]
# The allocators a user would pick instead of hbmalloc: the ratio columns compare with the best.
PEERS = [("cudaMalloc", "malloc"), ("cudaMallocAsync", "async"), ("pytorch", "raw"), ("rmm-pool", "raw"), ("rmm-arena", "raw")]
CASES = {
    "pair:512": "alloc+free pair, 512 B",
    "pair:1048576": "alloc+free pair, 1 MiB",
    "pair:16777216": "alloc+free pair, 16 MiB",
    "step": "100 allocs (1-16 MiB) then frees",
    "threads:1": "1 thread, 64 KiB pairs",
    "threads:4": "4 threads, 64 KiB pairs",
    "threads:8": "8 threads, 64 KiB pairs",
    "threads:16": "16 threads, 64 KiB pairs",
    "host:4096": "pinned host pair (cudaMallocHost+cudaFreeHost), 4 KiB",
    "host:16777216": "pinned host pair (cudaMallocHost+cudaFreeHost), 16 MiB",
}


def main(path):
    values = {}
    for line in open(path):
        parts = line.split()
        if len(parts) == 5:
            who, api, case, value, unit = parts
            key, v = (who, api, case), float(value)
            better = max if unit.startswith("Mpairs") else min
            values[key] = (better(v, values[key][0]) if key in values else v, unit)
    # Reference builds (gpu-stage.sh HBM_REF) get a column each, after the fixed ones.
    refs = sorted({k[0] for k in values if k[0].startswith("hbmalloc-") and k[0] != "hbmalloc-sim"})
    extra = [(r, "malloc", f"{r[len('hbmalloc-'):]} (reference build), backtrace off") for r in refs]
    columns = [c for c in COLUMNS + extra if any(k[:2] == c[:2] for k in values)]
    print("| case | " + " | ".join(c[2] for c in columns) + " | hbmalloc vs best peer, backtrace off | backtrace on |")
    print("|---" * (len(columns) + 3) + "|")
    for case, label in CASES.items():
        if not any(k[2] == case for k in values):
            continue
        cells, unit = [], ""
        for who, api, _ in columns:
            v = values.get((who, api, case))
            cells.append("-" if v is None else f"{v[0]:g}")
            unit = v[1] if v else unit
        peers = [values[(w, a, case)] for w, a in PEERS if (w, a, case) in values]
        ratios = [ratio(values.get((who, "malloc", case)), peers, unit) for who in ("hbmalloc", "hbmalloc+bt")]
        print(f"| {label} ({unit}) | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


def ratio(ours, peers, unit):
    """How hbmalloc compares with the best of the peers measured for this case."""
    if not ours or not peers:
        return "-"
    if unit.startswith("Mpairs"):  # higher is better
        best = max(p[0] for p in peers)
        return f"{ours[0] / best:.1f}x the rate"
    best = min(p[0] for p in peers)
    return f"{best / ours[0]:.1f}x faster" if ours[0] <= best else f"{ours[0] / best:.1f}x slower"

if __name__ == "__main__":
    main(sys.argv[1])
