"""scripts/bench-table.py on the committed raw results (bench/results-*.txt) and on lines in each
format it reads: medians and spreads, ratios, the targets, and the SVG plots. Needs no GPU, no
hbmalloc library and no torch."""

import os
import subprocess
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SCRIPT = os.path.join(ROOT, "scripts", "bench-table.py")
PEERS = os.path.join(ROOT, "bench", "results-h200-2026-12-03-peers.txt")
WORKLOADS = os.path.join(ROOT, "bench", "results-h200-2026-12-04-workloads.txt")
SVG = "{http://www.w3.org/2000/svg}"

# Two rounds of replay-peers.txt lines for one trace, and hbmalloc replay's own line.
REPLAY_LINES = """\
pytorch raw memory:gpu-out/traces/infer.trace 1.400 reserved/in-use peak 330.0 233.2 MiB
pytorch raw replay:gpu-out/traces/infer.trace 600.0 ns/op
hbmalloc-dropin raw memory:gpu-out/traces/infer.trace 1.100 reserved/in-use peak 260.0 233.2 MiB
hbmalloc-dropin raw replay:gpu-out/traces/infer.trace 150.0 ns/op
cudaMalloc raw memory:gpu-out/traces/infer.trace 1.500 reserved/in-use peak 350.0 233.2 MiB
cudaMalloc raw replay:gpu-out/traces/infer.trace 30000.0 ns/op
pytorch raw memory:gpu-out/traces/infer.trace 1.400 reserved/in-use peak 340.0 233.2 MiB
pytorch raw replay:gpu-out/traces/infer.trace 400.0 ns/op
hbmalloc-dropin raw memory:gpu-out/traces/infer.trace 1.100 reserved/in-use peak 250.0 233.2 MiB
hbmalloc-dropin raw replay:gpu-out/traces/infer.trace 100.0 ns/op
cudaMalloc raw memory:gpu-out/traces/infer.trace 1.500 reserved/in-use peak 350.0 233.2 MiB
cudaMalloc raw replay:gpu-out/traces/infer.trace 32000.0 ns/op
replay gpu-out/traces/infer.trace events=8186 threads=1 peak_requested_mib=233.2 peak_reserved_mib=264.0 syncs=1
"""


def run(*args):
    out = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"bench-table.py {args} failed: {out.stderr}")
    return out.stdout


def read(path):
    with open(path) as f:
        return f.read()


def row(text, *starts):
    """The table row whose first cells are `starts`."""
    prefix = "| " + " | ".join(starts) + " |"
    rows = [line for line in text.splitlines() if line.startswith(prefix)]
    if len(rows) != 1:
        raise AssertionError(f"{len(rows)} rows start with {prefix!r} in:\n{text}")
    return [c.strip() for c in rows[0].strip("|").split("|")]


class PairTable(unittest.TestCase):
    def test_committed_peer_run_gives_medians_spreads_and_ratios(self):
        text = run(PEERS)
        cells = row(text, "alloc+free pair, 512 B (ns/pair)")
        # Columns: runtime, async, hbmalloc off, on, async, sim, pytorch, rmm-pool, rmm-arena.
        self.assertEqual(cells[3], "96.3 (91.7-100.9)")  # hbmalloc, backtrace off
        self.assertEqual(cells[7], "592.3 (432.6-752.0)")  # PyTorch: two rounds, 752.0 and 432.6
        self.assertEqual(cells[9], "214.3 (210.2-218.4)")  # RMM arena, the fastest peer
        self.assertEqual(cells[10], "2.23x faster (rmm-arena)")  # 214.3 / 96.3
        self.assertEqual(cells[12], "6.15x faster")  # against PyTorch: 592.3 / 96.3
        threads = row(text, "16 threads, 64 KiB pairs (Mpairs/s)")
        self.assertEqual(threads[10], "54.0x the rate (rmm-arena)")  # higher is better here
        self.assertIn("up to 2 interleaved round(s)", text)

    def test_targets_say_met_or_by_how_much(self):
        text = run(PEERS, "--card", self.card_file())
        self.assertIn("card: NVIDIA H200, 580.159, 143771 MiB", text)
        pair = row(text, "pair at least 7x faster than the fastest peer, backtraces off")
        self.assertEqual(pair[2], "**missed**: 1.51x against 7x")  # the 1 MiB pair: 200.75 / 132.65
        threads = row(text, "16-thread throughput at least 20x the best peer's")
        self.assertEqual(threads[2], "met")

    def card_file(self):
        f = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        f.write("NVIDIA H200, 580.159, 143771 MiB\n")
        f.close()
        self.addCleanup(os.unlink, f.name)
        return f.name


class ReplayAndWorkloads(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)
        self.replay = os.path.join(self.dir.name, "replay-peers.txt")
        with open(self.replay, "w") as f:
            f.write("# command: bash scripts/gpu-check.sh replay-peers\n" + REPLAY_LINES)

    def test_replay_table_per_allocator_per_trace(self):
        text = run(self.replay)
        self.assertIn("`replay-peers.txt` from `bash scripts/gpu-check.sh replay-peers`", text)
        ours = row(text, "infer", "hbmalloc drop-in (LD_PRELOAD)")
        # time (median, spread), vs fastest peer (PyTorch at 500), vs PyTorch, reserved, in use, ratio
        self.assertEqual(ours[2:], ["125.0 (100.0-150.0)", "4.00x faster (pytorch)", "4.00x faster",
                                    "255.0 (250.0-260.0)", "233.2", "1.093"])
        torch = row(text, "infer", "PyTorch CUDACachingAllocator")
        self.assertEqual(torch[3], "fastest")
        own = row(text, "infer", "hbmalloc replay (recorded order)")
        self.assertEqual(own[5:], ["264.0", "233.2", "1.132"])
        target = row(text, "peak reserved / peak in use at most 1.10 on every trace, never worse than "
                           "PyTorch's (hbmalloc drop-in (LD_PRELOAD))")
        self.assertEqual(target[1], "infer 1.093 (PyTorch's 1.437)")
        self.assertEqual(target[2], "met")

    def test_committed_workloads_give_the_medians_benchmarks_md_quotes(self):
        text = run(WORKLOADS)
        torch = row(text, "infer", "pytorch")
        self.assertEqual(torch[2], "0.775 (0.762-0.776)")
        ours = row(text, "train", "hbmalloc")
        self.assertEqual(ours[2:4], ["4.243 (4.209-4.344)", "1.04x slower"])
        target = row(text, "train end to end within 5% of PyTorch's allocator (either way in)")
        self.assertEqual(target[1:], ["hbmalloc-pluggable 4.007 s against 4.088 s: -2.0%", "met"])


class Update(unittest.TestCase):
    def test_update_replaces_only_its_block(self):
        with tempfile.TemporaryDirectory() as d:
            doc = os.path.join(d, "BENCH.md")
            with open(doc, "w") as f:
                f.write("# B\nkept\n<!-- bench-table peers -->\nold table\n<!-- bench-table peers end -->\nafter\n")
            self.assertEqual(run(PEERS, "--update", doc + ":peers"), "")
            text = read(doc)
            self.assertTrue(text.startswith("# B\nkept\n<!-- bench-table peers -->\nRaw lines:"), text)
            self.assertTrue(text.endswith("<!-- bench-table peers end -->\nafter\n"), text)
            self.assertNotIn("old table", text)
            self.assertIn("| alloc+free pair, 512 B (ns/pair) | 73278 (64198-82359) |", text)
            out = subprocess.run([sys.executable, SCRIPT, PEERS, "--update", doc + ":other"],
                                 capture_output=True, text=True)
            self.assertNotEqual(out.returncode, 0)
            self.assertIn("needs one '<!-- bench-table other -->' line", out.stderr)
            self.assertEqual(read(doc), text, "a failed update changed the file")


class Plots(unittest.TestCase):
    def test_svg_plots_have_a_line_per_allocator(self):
        with tempfile.TemporaryDirectory() as d:
            series = os.path.join(d, "series")
            os.mkdir(series)
            for who, scale in (("hbmalloc-sim", 1), ("pytorch", 2)):
                with open(os.path.join(series, f"infer.{who}.series"), "w") as f:
                    f.write("# hbmalloc series v1: op in_use_bytes reserved_bytes\n")
                    for op in range(1, 50):
                        f.write(f"{op} {op << 20} {scale * (op << 20)}\n")
            plots = os.path.join(d, "plots")
            text = run(PEERS, WORKLOADS, "--series", series, "--plots", plots)
            self.assertEqual(sorted(os.listdir(plots)),
                             ["latency-by-size.svg", "memory-infer.svg", "throughput-by-threads.svg"])
            self.assertIn("(" + os.path.join(plots, "memory-infer.svg") + ")", text)

            def lines(name):
                root = ET.parse(os.path.join(plots, name)).getroot()
                return {p.get("data-name"): p.get("points").split() for p in root.iter(SVG + "polyline")}

            pairs = lines("latency-by-size.svg")
            self.assertEqual(len(pairs), 9)  # every allocator of the peers run
            self.assertEqual([len(p) for p in pairs.values()], [3] * 9)  # 512 B, 1 MiB, 16 MiB
            # Lower on the page is faster: hbmalloc's 512 B point sits below PyTorch's.
            y = {name: float(pts[0].split(",")[1]) for name, pts in pairs.items()}
            self.assertGreater(y["hbmalloc drop-in"], y["PyTorch"])
            self.assertEqual(len(lines("throughput-by-threads.svg")["RMM arena"]), 4)
            memory = ET.parse(os.path.join(plots, "memory-infer.svg")).getroot()
            names = {p.get("data-name") for p in memory.iter(SVG + "polyline")}
            self.assertEqual(names, {"in use (the trace's live bytes)", "hbmalloc replay, simulated, reserved",
                                     "PyTorch CUDACachingAllocator, reserved"})
            # PyTorch's own workload run (no replay of it here) is a reference line.
            self.assertEqual(len([l for l in memory.iter(SVG + "line") if l.get("class") == "reference"]), 1)


if __name__ == "__main__":
    unittest.main()
