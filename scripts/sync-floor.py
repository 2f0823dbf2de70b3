"""The fewest device synchronizes any pool needs to replay a trace under cudaFree's contract.

    python3 scripts/sync-floor.py TRACE[.gz] [--reserved MIB ...] [--syncs N ...]

The caching pool behind cudaMalloc reuses a freed block only after a device synchronize that
began after the free (docs/architecture.md, "Stream safety"). Between two synchronizes, then,
every allocation comes from memory that was free at the first one and not handed out since:
what a pool holding R bytes can allocate between synchronizes is R minus what was in use when
the first began. The floor below is that rule alone, on a pool that packs perfectly (any free
byte serves any request; no rounding, no chunks): no real pool of R bytes synchronizes less.
Synchronizing as late as possible is optimal there (a later synchronize leaves a superset of
memory reusable), so the count is exact for that ideal pool, not merely a bound.

--reserved: the floor for pools of these sizes (MiB; default 1.05, 1.10, 1.132, 1.25, 1.5 and
2 times the trace's peak in use). --syncs: the least memory that gets within N synchronizes.
Events on pinned host memory (device -1) are skipped, as `hbmalloc replay` does.
"""
import argparse
import gzip

MIB = 1 << 20


def read(path):
    """The trace's device events as (is_alloc, size), frees given the size allocated."""
    opener = gzip.open if path.endswith(".gz") else open
    live, events = {}, []
    with opener(path, "rt") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            _, _, op, ptr, size, _, device = line.split()
            if int(device) < 0:
                continue
            if op == "a":
                live[ptr] = int(size)
                events.append((True, int(size)))
            elif ptr in live:
                events.append((False, live.pop(ptr)))
    return events


def floor(events, reserved):
    """Synchronizes an ideal pool of `reserved` bytes needs; None if the trace never fits."""
    in_use = dirty = syncs = 0
    for is_alloc, size in events:
        if is_alloc:
            if reserved - in_use - dirty < size:
                syncs += 1
                dirty = 0
                if reserved - in_use < size:
                    return None
            in_use += size
        else:
            in_use -= size
            dirty += size
    return syncs


def least_reserved(events, syncs, peak):
    """The least memory (in bytes) whose floor is at most `syncs` (the floor only falls as
    memory grows)."""
    def enough(r):
        n = floor(events, r)
        return n is not None and n <= syncs

    if enough(peak):
        return peak
    lo, hi = peak, 2 * peak
    while not enough(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--reserved", type=float, nargs="*", metavar="MIB")
    ap.add_argument("--syncs", type=int, nargs="*", default=[])
    args = ap.parse_args()
    events = read(args.trace)
    in_use = peak = total = 0
    for is_alloc, size in events:
        in_use += size if is_alloc else -size
        peak = max(peak, in_use)
        total += size if is_alloc else 0
    print(f"{args.trace}: {len(events)} events, peak in use {peak / MIB:.1f} MiB, "
          f"{total / MIB:.0f} MiB allocated in all")
    sizes = [r * MIB for r in args.reserved] if args.reserved else [
        peak * k for k in (1.05, 1.10, 1.132, 1.25, 1.5, 2.0)]
    for r in sizes:
        n = floor(events, int(r))
        print(f"  reserved {r / MIB:8.1f} MiB ({r / peak:.3f}x): "
              f"{'does not fit' if n is None else f'at least {n} synchronizes'}")
    for n in args.syncs:
        r = least_reserved(events, n, peak)
        print(f"  at most {n} synchronizes: at least {r / MIB:.1f} MiB ({r / peak:.3f}x)")


if __name__ == "__main__":
    main()
