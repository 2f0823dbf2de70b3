"""BENCHMARKS.md's tables, and its plots, from the raw lines gpu-check prints.

    python3 scripts/bench-table.py [--card gpu-out/gpu.txt] [--command "..."] [--series DIR]
                                   [--plots DIR] RESULTS...

RESULTS are files of raw lines (bench/results-*.txt; gpu-out/bench.txt, workloads.txt,
replay-peers.txt), in these formats:
  <allocator> <api> <case> <value> <unit>          alloc_bench, peer_bench (api "raw")
      case pair:<bytes> | step | threads:<n> | host:<bytes> | replay:<trace> (ns/op)
  <allocator> raw memory:<trace> <ratio> reserved/in-use peak <reserved> <in use> MiB
  <allocator> workload <name> seconds=S peak_in_use_mib=U peak_reserved_mib=R [tokens_per_s=T]
  replay|replay-sim <trace> events=... peak_requested_mib=U peak_reserved_mib=R ...
                                                   hbmalloc replay, on the GPU / simulated device
  # command: <command>                             how the lines were made
Other lines are ignored. Every configuration ran once per round, rounds interleaved: each cell is
the median over rounds, with the spread (min-max) when there was more than one. Ratios compare
medians. Prints Markdown: the pair/step/threads table, the replay table, the workloads table and
issue 13's targets. --series DIR reads memory-over-replay files named <trace>.<allocator>.series
(hbmalloc replay --series, peer_bench BENCH_SERIES); --plots DIR writes the SVG plots there.
--update FILE:NAME writes the output into FILE between the lines `<!-- bench-table NAME -->` and
`<!-- bench-table NAME end -->` instead of printing it (how BENCHMARKS.md's tables are made).
"""
import argparse
import os
import re
import statistics
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_svg  # noqa: E402

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
# The allocators a user would pick instead of hbmalloc: "fastest peer" is the best of these.
PEERS = [("cudaMalloc", "malloc"), ("cudaMallocAsync", "async"), ("pytorch", "raw"), ("rmm-pool", "raw"),
         ("rmm-arena", "raw")]
# In replay-peers.txt the runtime's allocators print api "raw" too.
REPLAY_PEERS = ["cudaMalloc", "cudaMallocAsync", "pytorch", "rmm-pool", "rmm-arena"]
TORCH = ("pytorch", "raw")
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
NAMES = {
    "hbmalloc-dropin": "hbmalloc drop-in (LD_PRELOAD)", "hbmalloc": "hbmalloc C API",
    "hbmalloc-replay": "hbmalloc replay (recorded order)", "hbmalloc-sim": "hbmalloc replay, simulated",
    "pytorch": "PyTorch CUDACachingAllocator", "rmm-pool": "RMM pool", "rmm-arena": "RMM arena",
    "cudaMalloc": "cudaMalloc", "cudaMallocAsync": "cudaMallocAsync",
}


# Legend names in the plots, short enough for the margin.
SHORT = {
    ("cudaMalloc", "malloc"): "cudaMalloc", ("cudaMallocAsync", "async"): "cudaMallocAsync",
    ("hbmalloc", "malloc"): "hbmalloc drop-in", ("hbmalloc+bt", "malloc"): "hbmalloc drop-in, backtrace on",
    ("hbmalloc", "async"): "hbmalloc cudaMallocAsync", ("hbmalloc-sim", "malloc"): "hbmalloc, simulated device",
    ("hbmalloc", "raw"): "hbmalloc C API", ("pytorch", "raw"): "PyTorch", ("rmm-pool", "raw"): "RMM pool",
    ("rmm-arena", "raw"): "RMM arena",
}


class Results:
    """Every figure of the given files, each configuration's rounds in file order."""

    def __init__(self):
        self.values = defaultdict(list)  # (who, api, case) -> [value]; pairs, step, threads, replay
        self.units = {}
        self.memory = defaultdict(list)  # (who, trace) -> [(reserved MiB, in use MiB)]
        self.workloads = defaultdict(list)  # (who, workload) -> [{field: value}]
        self.commands = {}  # file -> the command its "# command:" line names

    def read(self, path):
        with open(path) as f:
            lines = f.readlines()
        for line in lines:
            if line.startswith("# command:"):
                self.commands.setdefault(path, line.split(":", 1)[1].strip())
            else:
                self.parse(line)

    def parse(self, line):
        f = line.split()
        if len(f) == 9 and f[1] == "raw" and f[2].startswith("memory:") and f[8] == "MiB":
            self.memory[(f[0], trace_name(f[2][7:]))].append((float(f[6]), float(f[7])))
        elif len(f) >= 4 and f[1] == "workload" and "=" in f[3]:
            fields = dict(kv.split("=", 1) for kv in f[3:] if "=" in kv)
            self.workloads[(f[0], f[2])].append({k: float(v) for k, v in fields.items()})
        elif len(f) >= 3 and f[0] in ("replay", "replay-sim") and "=" in f[2]:
            fields = dict(kv.split("=", 1) for kv in f[2:] if "=" in kv)
            who = "hbmalloc-replay" if f[0] == "replay" else "hbmalloc-sim"
            if float(fields.get("peak_requested_mib", 0)) > 0:
                self.memory[(who, trace_name(f[1]))].append(
                    (float(fields["peak_reserved_mib"]), float(fields["peak_requested_mib"])))
        elif len(f) == 5 and re.fullmatch(r"[0-9.e+-]+|inf", f[3]):
            case = f[2]
            if case.startswith("replay:"):
                case = "replay:" + trace_name(case[7:])
            self.values[(f[0], f[1], case)].append(float(f[3]))
            self.units[(f[0], f[1], case)] = f[4]

    def median(self, key):
        v = self.values.get(key)
        return statistics.median(v) if v else None


def trace_name(path):
    """`gpu-out/traces/train.trace` -> `train`."""
    base = os.path.basename(path)
    return base[:-len(".trace")] if base.endswith(".trace") else base


def num(v):
    """Four significant figures or so, never an exponent."""
    a = abs(v)
    return f"{v:.0f}" if a >= 1000 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1 else f"{v:.3f}"


def cell(values, digits=None):
    """Median, and the spread over rounds when there was more than one."""
    fmt = (lambda v: f"{v:.{digits}f}") if digits is not None else num
    m = statistics.median(values)
    return fmt(m) if min(values) == max(values) else f"{fmt(m)} ({fmt(min(values))}-{fmt(max(values))})"


def faster(ours, theirs, higher_is_better=False):
    """How `ours` compares with `theirs`: "2.1x faster", "1.3x slower", "54.0x the rate"."""
    if ours is None or theirs is None or ours == 0 or theirs == 0:
        return "-"
    if higher_is_better:
        return f"{num(ours / theirs)}x the rate"
    return f"{num(theirs / ours)}x faster" if ours <= theirs else f"{num(ours / theirs)}x slower"


def best_peer(res, case, peers=PEERS):
    """(name, median) of the fastest peer measured for `case`."""
    unit = next((res.units[(w, a, case)] for w, a in peers if (w, a, case) in res.units), "")
    medians = [(w, res.median((w, a, case))) for w, a in peers if (w, a, case) in res.values]
    if not medians:
        return None, None
    pick = max if unit.startswith("Mpairs") else min
    return pick(medians, key=lambda m: m[1])


def pair_table(res):
    refs = sorted({k[0] for k in res.values if k[0].startswith("hbmalloc-") and k[0] != "hbmalloc-sim"
                   and k[1] == "malloc"})
    extra = [(r, "malloc", f"{r[len('hbmalloc-'):]} (reference build), backtrace off") for r in refs]
    columns = [c for c in COLUMNS + extra if any(k[:2] == c[:2] and k[2] in CASES for k in res.values)]
    if not columns:
        return []
    out = ["| case | " + " | ".join(c[2] for c in columns)
           + " | hbmalloc vs fastest peer, backtrace off | backtrace on | hbmalloc vs PyTorch's allocator |",
           "|---" * (len(columns) + 4) + "|"]
    for case, label in CASES.items():
        keys = [(w, a, case) for w, a, _ in columns]
        if not any(k in res.values for k in keys):
            continue
        unit = next(res.units[k] for k in keys if k in res.units)
        rate = unit.startswith("Mpairs")
        cells = [cell(res.values[k]) if k in res.values else "-" for k in keys]
        peer, peer_v = best_peer(res, case)
        ours, ours_bt = res.median(("hbmalloc", "malloc", case)), res.median(("hbmalloc+bt", "malloc", case))
        ratios = [faster(ours, peer_v, rate) + (f" ({peer})" if peer and ours else ""),
                  faster(ours_bt, peer_v, rate), faster(ours, res.median(TORCH[:2] + (case,)), rate)]
        out.append(f"| {label} ({unit}) | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return out


def replay_rows(res):
    """(trace, allocator, time cell, median ns/op, reserved, in use) for every replayed trace."""
    traces = sorted({t for _, t in res.memory} | {k[2][7:] for k in res.values if k[2].startswith("replay:")})
    whos = sorted({w for w, _ in res.memory} | {k[0] for k in res.values if k[2].startswith("replay:")},
                  key=lambda w: (w not in NAMES, list(NAMES).index(w) if w in NAMES else 0, w))
    rows = []
    for t in traces:
        for w in whos:
            times = res.values.get((w, "raw", "replay:" + t))
            mem = res.memory.get((w, t))
            if times or mem:
                rows.append((t, w, times, mem))
    return rows


def replay_table(res):
    rows = replay_rows(res)
    if not rows:
        return []
    out = ["| trace | allocator | time per op (ns) | vs fastest peer | vs PyTorch's | peak reserved (MiB) "
           "| peak in use (MiB) | reserved / in use |", "|---" * 8 + "|"]
    for t, w, times, mem in rows:
        case = "replay:" + t
        peer, peer_v = best_peer(res, case, [(p, "raw") for p in REPLAY_PEERS])
        ours = statistics.median(times) if times else None
        vs_peer = faster(ours, peer_v) + (f" ({peer})" if peer and ours and peer != w else "")
        vs_torch = faster(ours, res.median(("pytorch", "raw", case))) if w != "pytorch" else "-"
        if mem:
            reserved, in_use = [m[0] for m in mem], [m[1] for m in mem]
            ratio = statistics.median(reserved) / statistics.median(in_use)
            mem_cells = f"{cell(reserved, 1)} | {statistics.median(in_use):.1f} | {ratio:.3f}"
        else:
            mem_cells = "- | - | -"
        out.append(f"| {t} | {NAMES.get(w, w)} | {cell(times, 1) if times else '-'} | "
                   f"{vs_peer if w != peer else 'fastest'} | {vs_torch} | {mem_cells} |")
    return out


def workload_table(res):
    if not res.workloads:
        return []
    names = sorted({n for _, n in res.workloads})
    whos = sorted({w for w, _ in res.workloads}, key=lambda w: (w != "pytorch", w))
    out = ["| workload | allocator | seconds | vs PyTorch's allocator | tokens/s | peak reserved / in use (MiB) |",
           "|---" * 6 + "|"]
    for n in names:
        torch_runs = res.workloads.get(("pytorch", n))
        torch_s = statistics.median(r["seconds"] for r in torch_runs) if torch_runs else None
        for w in whos:
            runs = res.workloads.get((w, n))
            if not runs:
                continue
            secs = [r["seconds"] for r in runs]
            vs = "-" if w == "pytorch" or torch_s is None else faster(statistics.median(secs), torch_s)
            tokens = [r["tokens_per_s"] for r in runs if "tokens_per_s" in r]
            reserved = [r["peak_reserved_mib"] for r in runs]
            in_use = [r["peak_in_use_mib"] for r in runs]
            out.append(f"| {n} | {w} | {cell(secs, 3)} | {vs} | {cell(tokens, 1) if tokens else '-'} | "
                       f"{cell(reserved, 0)} / {cell(in_use, 0)} |")
    return out


def torch_memory(res, trace):
    """PyTorch's allocator's (reserved, in use) peaks on `trace`, and where they come from: its
    replay of the trace, else its own run of the program the trace was recorded from."""
    if ("pytorch", trace) in res.memory:
        return ratio_of(res.memory[("pytorch", trace)]), "PyTorch's"
    runs = res.workloads.get(("pytorch", trace))
    if runs:
        mem = [(r["peak_reserved_mib"], r["peak_in_use_mib"]) for r in runs]
        return ratio_of(mem), "PyTorch's own run"
    return None, None


def targets(res, tables):
    """Issue 13's targets against these results, those of the chosen tables:
    [(target, measured, verdict)]."""
    rows = []
    pair_cases = [c for c in CASES if c.startswith("pair:") and ("hbmalloc", "malloc", c) in res.values]
    if "pairs" not in tables:
        pair_cases = []

    def pair_target(who, want, label):
        if not pair_cases:
            return
        worst = None
        parts = []
        for c in pair_cases:
            peer, peer_v = best_peer(res, c)
            ours = res.median((who, "malloc", c))
            if ours is None or peer_v is None:
                continue
            r = peer_v / ours
            parts.append(f"{CASES[c].split(', ')[1]} {r:.2f}x ({peer})")
            worst = r if worst is None else min(worst, r)
        if worst is not None:
            rows.append((label, "; ".join(parts), verdict(worst >= want, f"{worst:.2f}x", f"{want}x")))

    pair_target("hbmalloc", 7, "pair at least 7x faster than the fastest peer, backtraces off")
    pair_target("hbmalloc+bt", 1, "pair no slower than the fastest peer, backtraces on")
    if "pairs" in tables and ("hbmalloc", "malloc", "threads:16") in res.values:
        peer, peer_v = best_peer(res, "threads:16")
        ours = res.median(("hbmalloc", "malloc", "threads:16"))
        if peer_v:
            r = ours / peer_v
            rows.append(("16-thread throughput at least 20x the best peer's",
                         f"{num(ours)} against {num(peer_v)} M pairs/s ({peer}): {r:.1f}x", verdict(r >= 20, f"{r:.1f}x", "20x")))
    for w in ("hbmalloc-dropin", "hbmalloc", "hbmalloc-replay", "hbmalloc-sim"):
        traces = sorted(t for who, t in res.memory if who == w)
        if not traces or "replay" not in tables:
            continue
        parts, worst, worse_than_torch = [], 0.0, []
        for t in traces:
            r = ratio_of(res.memory[(w, t)])
            worst = max(worst, r)
            tr, whose = torch_memory(res, t)
            parts.append(f"{t} {r:.3f}" + (f" ({whose} {tr:.3f})" if tr else ""))
            if tr is not None and r > tr:
                worse_than_torch.append(t)
        ok = worst <= 1.10 and not worse_than_torch
        why = f"{worst:.3f} at worst" + (f", worse than PyTorch's on {', '.join(worse_than_torch)}" if worse_than_torch else "")
        rows.append((f"peak reserved / peak in use at most 1.10 on every trace, never worse than PyTorch's ({NAMES.get(w, w)})",
                     "; ".join(parts), verdict(ok, why, "1.10")))
    for n in sorted({n for _, n in res.workloads} if "workloads" in tables else ()):
        torch_runs = res.workloads.get(("pytorch", n))
        ours = [(w, statistics.median(r["seconds"] for r in res.workloads[(w, n)]))
                for w in ("hbmalloc", "hbmalloc-pluggable") if (w, n) in res.workloads]
        if not torch_runs or not ours:
            continue
        torch_s = statistics.median(r["seconds"] for r in torch_runs)
        w, best = min(ours, key=lambda o: o[1])
        r = best / torch_s
        rows.append((f"{n} end to end within 5% of PyTorch's allocator (either way in)",
                     f"{w} {best:.3f} s against {torch_s:.3f} s: {(r - 1) * 100:+.1f}%",
                     verdict(r <= 1.05, f"{(r - 1) * 100:+.1f}%", "+5%")))
    return rows


def ratio_of(mem):
    return statistics.median(m[0] for m in mem) / statistics.median(m[1] for m in mem)


def verdict(ok, measured, target):
    return "met" if ok else f"**missed**: {measured} against {target}"


def targets_table(res, tables):
    rows = targets(res, tables)
    if not rows:
        return []
    return ["| target (issue 13) | measured (medians) | |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]


def read_series(directory):
    """{trace: {allocator: [(op, in use MiB, reserved MiB)]}} from <trace>.<allocator>.series files."""
    out = defaultdict(dict)
    if not directory:
        return out
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".series"):
            continue
        trace, _, who = name[:-len(".series")].partition(".")
        points = []
        with open(os.path.join(directory, name)) as f:
            lines = f.readlines()
        for line in lines:
            if line.startswith("#") or not line.strip():
                continue
            op, in_use, reserved = (int(v) for v in line.split())
            points.append((op, in_use / 2**20, reserved / 2**20))
        if points:
            out[trace][who] = points
    return out


def size_label(b):
    b = int(b)
    for unit, n in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= n:
            return f"{b / n:g} {unit}"
    return f"{b} B"


def plots(res, series, directory, source):
    """The SVG plots; returns [(file name, what it shows)]."""
    os.makedirs(directory, exist_ok=True)
    written = []
    whos = [c for c in COLUMNS if any(k[:2] == c[:2] for k in res.values)]
    pair_lines = []
    for w, a, _ in whos:
        pts = sorted((int(k[2][5:]), res.median(k)) for k in res.values
                     if k[:2] == (w, a) and k[2].startswith("pair:"))
        if pts:
            pair_lines.append((SHORT[(w, a)], pts, w in ("hbmalloc+bt", "hbmalloc-sim")))
    if pair_lines:
        bench_svg.line_chart(os.path.join(directory, "latency-by-size.svg"),
                             "alloc+free pair by block size (lower is better)", "block size",
                             "ns per pair (log)", pair_lines, log_x=True, log_y=True, x_format=size_label,
                             note=f"median over interleaved rounds; {source}")
        written.append(("latency-by-size.svg", "alloc+free pair time by block size, per allocator"))
    thread_lines = []
    for w, a, _ in whos:
        pts = sorted((int(k[2][8:]), res.median(k)) for k in res.values
                     if k[:2] == (w, a) and k[2].startswith("threads:"))
        if pts:
            thread_lines.append((SHORT[(w, a)], pts, w in ("hbmalloc+bt", "hbmalloc-sim")))
    if thread_lines:
        bench_svg.line_chart(os.path.join(directory, "throughput-by-threads.svg"),
                             "64 KiB alloc+free pairs from n threads (higher is better)", "threads",
                             "M pairs/s, all threads (log)", thread_lines, log_x=True, log_y=True,
                             x_format=lambda v: f"{v:g}", note=f"median over interleaved rounds; {source}")
        written.append(("throughput-by-threads.svg", "pair throughput by thread count, per allocator"))
    for trace in sorted(series):
        by_who = series[trace]
        # The trace's own live bytes: from hbmalloc's replay in recorded order when present.
        live_from = next((w for w in ("hbmalloc-sim", "hbmalloc-replay") if w in by_who), sorted(by_who)[0])
        lines = [("in use (the trace's live bytes)", [(p[0], p[1]) for p in by_who[live_from]], True, "in use")]
        sources = sorted(by_who)
        lines += [(f"{NAMES.get(w, w)}, reserved", [(p[0], p[2]) for p in pts], False, w)
                  for w, pts in sorted(by_who.items())]
        hlines = []
        torch_runs = res.workloads.get(("pytorch", trace))
        if torch_runs and ("pytorch", trace) not in res.memory:
            hlines.append(("PyTorch, peak reserved (its own run)",
                           statistics.median(r["peak_reserved_mib"] for r in torch_runs), "pytorch"))
        bench_svg.line_chart(os.path.join(directory, f"memory-{trace}.svg"),
                             f"memory reserved over the {trace} replay", "operations replayed", "MiB", lines,
                             hlines=hlines, note=f"series: {', '.join(sources)}; {source}")
        written.append((f"memory-{trace}.svg", f"memory reserved over the {trace} trace, per allocator"))
    return written


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--card", help="the card the figures come from: gpu-out/gpu.txt, or its text")
    ap.add_argument("--command", help="the command that made them (else the files' '# command:' lines)")
    ap.add_argument("--series", help="a directory of <trace>.<allocator>.series files")
    ap.add_argument("--plots", help="write the SVG plots into this directory")
    ap.add_argument("--tables", default="pairs,replay,workloads,targets",
                    help="which tables, comma-separated (default all; 'none' for the plots alone)")
    ap.add_argument("--update", metavar="FILE:NAME", help="write into FILE's block NAME instead of printing")
    args = ap.parse_args(argv)
    text = report(args)
    if not args.update:
        print(text)
        return
    path, _, name = args.update.rpartition(":")
    begin, end = f"<!-- bench-table {name} -->", f"<!-- bench-table {name} end -->"
    with open(path) as f:
        doc = f.read()
    if doc.count(begin) != 1 or doc.count(end) != 1 or doc.index(begin) > doc.index(end):
        sys.exit(f"bench-table.py: {path} needs one '{begin}' line and one '{end}' line after it")
    head, rest = doc.split(begin, 1)
    with open(path, "w") as f:
        f.write(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])


def report(args):
    """The Markdown for `args`' results (and the plots, written as a side effect)."""
    out = []
    res = Results()
    for path in args.results:
        res.read(path)
    card = None
    if args.card:
        if os.path.isfile(args.card):
            with open(args.card) as f:
                card = f.readline().strip()
        else:
            card = args.card
    if args.command:
        command = f"command: `{args.command}`"
    elif res.commands:
        command = "; ".join(f"`{os.path.basename(p)}` from `{c}`" for p, c in res.commands.items())
    else:
        command = None
    rounds = max((len(v) for v in list(res.values.values()) + list(res.workloads.values())), default=0)
    out.append(f"Raw lines: {', '.join(f'`{p}`' for p in args.results)}"
               + (f"; card: {card}" if card else "") + (f"; {command}" if command else "")
               + f"; up to {rounds} interleaved round(s): median (min-max).")
    tables = args.tables.split(",")
    for name, title, make in (("pairs", "Pairs, step, threads", pair_table), ("replay", "Trace replay", replay_table),
                              ("workloads", "Workloads end to end", workload_table),
                              ("targets", "Targets", lambda r: targets_table(r, tables))):
        table = make(res) if name in tables else []
        if table:
            out += ["", f"**{title}**", ""] + table
    if args.plots:
        source = ", ".join(os.path.basename(p) for p in args.results)
        written = plots(res, read_series(args.series), args.plots, source)
        if written:
            out += ["", "**Plots**", ""]
            out += [f"- [{what}]({os.path.join(args.plots, name)})" for name, what in written]
    return "\n".join(out)


if __name__ == "__main__":
    main(sys.argv[1:])
