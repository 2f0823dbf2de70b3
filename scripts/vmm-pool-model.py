"""A model of the caching pool's large blocks on one VMM reservation, replayed over a trace.

    python3 scripts/vmm-pool-model.py TRACE[.gz] [--slack-divisor 40] [--slack-floor-mib 20]

Not the pool: a sketch to weigh a design (issue 13: the pool's driver churn on the infer trace)
before building it. Blocks above 1 MiB (rounded as `pool::size_class` rounds them) live in one
address range; 2 MiB pages are mapped on demand, so memory follows the pages live blocks touch
rather than whole chunks, and a long-lived block no longer pins a chunk. cudaFree's contract
holds: freed address space is reusable only after a synchronize. Per allocation: best fit in
reusable free space, fewest pages to map first; if mapping would take the pages past
peak in use + max(peak / divisor, floor) (`caching::reclaim_before_grow`'s bound), synchronize
when anything waits for one and retry; then unmap free pages (highest first) to stay within the
bound, and map what the block lacks. Prints peak mapped against peak in use, the map and unmap
calls (one per contiguous run of pages; with a physical handle per page, the pages count), and
the synchronizes. Blocks of 1 MiB or less (the small arena's 2 MiB chunks) are left out.
"""
import argparse
import gzip

MIB = 1 << 20
PAGE = 2 * MIB
TOP = 1 << 50  # the end of the reservation: address space is not what runs out


def block_size(size):
    """`pool::size_class::block_size`."""
    if size <= 4096:
        return -(-size // 512) * 512
    if size > 32 * MIB:
        return -(-size // PAGE) * PAGE
    v = size - 1
    shift = v.bit_length() - 1 - 3
    return ((v >> shift) + 1) << shift


def read(path):
    opener = gzip.open if path.endswith(".gz") else open
    events = []
    with opener(path, "rt") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            _, _, op, ptr, size, _, device = line.split()
            size = block_size(int(size))
            if int(device) >= 0 and size > MIB:
                events.append((op == "a", ptr, size))
    return events


def pages(addr, size):
    return range(addr // PAGE, (addr + size - 1) // PAGE + 1)


def runs(page_list):
    """Contiguous runs of pages: one driver call each."""
    n, prev = 0, None
    for p in sorted(page_list):
        n += prev is None or p != prev + 1
        prev = p
    return n


class Model:
    def __init__(self, divisor, floor):
        self.divisor, self.floor = divisor, floor
        # Free address space: (start, length, waits for a synchronize), sorted, merged.
        self.free = [(0, TOP, False)]
        self.mapped, self.users, self.blocks = set(), {}, {}
        self.calls = self.paged = self.syncs = 0
        self.in_use = self.peak = self.peak_mapped = 0

    def merge(self):
        self.free.sort()
        out = []
        for x in self.free:
            if out and out[-1][0] + out[-1][1] == x[0] and out[-1][2] == x[2]:
                out[-1] = (out[-1][0], out[-1][1] + x[1], x[2])
            else:
                out.append(x)
        self.free = out

    def best_fit(self, size):
        best = None
        for i, (a, n, waits) in enumerate(self.free):
            if waits or n < size:
                continue
            for start in (a, a + n - size) if a + n < TOP else (a,):
                need = sum(q not in self.mapped for q in pages(start, size))
                if best is None or (need, n) < best[0]:
                    best = ((need, n), i, start)
        return best

    def alloc(self, ptr, size):
        self.in_use += size
        self.peak = max(self.peak, self.in_use)
        bound = self.peak + max(self.peak / self.divisor, self.floor)
        (need, _), i, start = self.best_fit(size)
        if need and (len(self.mapped) + need) * PAGE > bound and any(w for *_, w in self.free):
            self.syncs += 1
            self.free = [(a, n, False) for a, n, _ in self.free]
            self.merge()
            (need, _), i, start = self.best_fit(size)
        a, n, waits = self.free.pop(i)
        if start > a:
            self.free.append((a, start - a, waits))
        if start + size < a + n:
            self.free.append((start + size, a + n - start - size, waits))
        self.merge()
        mine = set(pages(start, size))
        new = [q for q in mine if q not in self.mapped]
        excess = (len(self.mapped) + len(new)) * PAGE - bound
        if new and excess > 0:
            # Unmapping waits for the pages' last users too: only pages no free waits on.
            waiting = {q for a, n, w in self.free if w for q in pages(a, n)}
            idle = sorted((q for q in self.mapped if not self.users.get(q)
                           and q not in mine and q not in waiting), reverse=True)
            drop = idle[:int(-(-excess // PAGE))]
            self.calls += runs(drop)
            self.paged += len(drop)
            self.mapped -= set(drop)
        if new:
            self.calls += runs(new)
            self.paged += len(new)
            self.mapped |= set(new)
        for q in mine:
            self.users[q] = self.users.get(q, 0) + 1
        self.blocks[ptr] = (start, size)
        self.peak_mapped = max(self.peak_mapped, len(self.mapped) * PAGE)

    def free_block(self, ptr):
        if ptr not in self.blocks:
            return  # allocated before the trace began
        start, size = self.blocks.pop(ptr)
        self.in_use -= size
        self.free.append((start, size, True))
        self.merge()
        for q in pages(start, size):
            self.users[q] -= 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--slack-divisor", type=float, default=40)
    ap.add_argument("--slack-floor-mib", type=float, default=20)
    args = ap.parse_args()
    m = Model(args.slack_divisor, args.slack_floor_mib * MIB)
    for is_alloc, ptr, size in read(args.trace):
        if is_alloc:
            m.alloc(ptr, size)
        else:
            m.free_block(ptr)
    print(f"{args.trace}: blocks above 1 MiB: peak in use {m.peak / MIB:.1f} MiB, peak mapped "
          f"{m.peak_mapped / MIB:.1f} MiB ({m.peak_mapped / max(m.peak, 1):.3f}x), "
          f"{m.calls} map/unmap calls ({m.paged} pages), {m.syncs} synchronizes")


if __name__ == "__main__":
    main()
