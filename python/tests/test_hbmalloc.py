"""The package on the simulated device, through ctypes (no torch needed).

Run by scripts/test-python.sh (HBMALLOC_LIB names the library built there)."""

import ctypes
import os
import subprocess
import sys
import textwrap
import unittest

os.environ.setdefault("HBMALLOC_CONF", "backend:sim,leak_report:off")

import hbmalloc  # noqa: E402
from hbmalloc import _lib  # noqa: E402

S1, S2 = 0x1000, 0x2000
MiB = 1 << 20


def torch_malloc(size, stream=S1):
    return _lib.lib().hbm_torch_malloc(size, 0, stream)


def torch_free(ptr, size, stream=S1):
    _lib.lib().hbm_torch_free(ptr, size, 0, stream)


def held_lib():
    """The library through ctypes.PyDLL, which keeps the GIL during the call (ctypes.CDLL, which
    the package uses, releases it), with the prototypes these tests call."""
    lib = ctypes.PyDLL(hbmalloc.library_path())
    lib.hbm_torch_malloc.restype = ctypes.c_void_p
    lib.hbm_torch_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    return lib


def _line():
    """The line of the caller's call."""
    return sys._getframe(1).f_lineno


class PackageTest(unittest.TestCase):
    def test_imports_and_finds_its_library(self):
        self.assertTrue(os.path.exists(hbmalloc.library_path()))
        self.assertEqual(_lib.lib().hbm_backend_name(), b"sim")

    def test_stats_move_with_torch_malloc_and_free(self):
        before = hbmalloc.stats()
        p = torch_malloc(5 * MiB)
        self.assertTrue(p)
        during = hbmalloc.stats()
        self.assertEqual(during["allocs"], before["allocs"] + 1)
        self.assertGreaterEqual(during["in_use"], before["in_use"] + 5 * MiB)
        torch_free(p, 5 * MiB)
        after = hbmalloc.stats()
        self.assertEqual(after["frees"], before["frees"] + 1)
        self.assertEqual(after["in_use"], before["in_use"])
        self.assertIsNone(torch_malloc(0), "an empty tensor gets NULL")

    def test_memory_stats_keys(self):
        p = torch_malloc(3 * MiB)
        m = hbmalloc.memory_stats()
        for key in ("allocated_bytes.all.current", "allocated_bytes.all.peak",
                    "reserved_bytes.all.current", "reserved_bytes.all.peak",
                    "num_alloc_retries", "num_ooms", "allocation.all.current"):
            self.assertIn(key, m)
            self.assertIsInstance(m[key], int)
        self.assertGreaterEqual(m["allocated_bytes.all.current"], 3 * MiB)
        self.assertGreaterEqual(m["reserved_bytes.all.current"], m["allocated_bytes.all.current"])
        self.assertGreaterEqual(m["allocated_bytes.all.peak"], m["allocated_bytes.all.current"])
        torch_free(p, 3 * MiB)

    def test_checkpoint_leaks_and_reports(self):
        mark = hbmalloc.checkpoint()
        p = torch_malloc(2 * MiB, S2)
        nbytes, count = hbmalloc.leaks(mark)
        self.assertEqual(count, 1)
        self.assertGreaterEqual(nbytes, 2 * MiB)
        doc = hbmalloc.report_json()
        allocs = [a for s in doc["sites"] for a in s["allocations"]]
        mine = [a for a in allocs if int(a["ptr"], 16) == p]
        self.assertEqual(len(mine), 1)
        self.assertEqual(mine[0]["origin"], "hbm_torch_malloc")
        self.assertEqual(int(mine[0]["stream"], 16), S2)
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"hbm-py-{os.getpid()}.txt")
        hbmalloc.report(path)
        with open(path) as f:
            self.assertTrue(f.read().startswith("hbmalloc: LEAK SUMMARY: "))
        os.remove(path)
        torch_free(p, 2 * MiB, S2)
        self.assertEqual(hbmalloc.leaks(mark), (0, 0))
        with self.assertRaises(RuntimeError):
            hbmalloc.report("/nonexistent-dir/x/report.txt")

    def test_out_of_memory_is_null_with_one_line_and_counted(self):
        # Its own process: a 64 MiB device.
        code = (
            "import hbmalloc; from hbmalloc import _lib; l = _lib.lib();"
            "assert l.hbm_torch_malloc(1 << 30, 0, 0) is None;"
            "assert hbmalloc.memory_stats()['num_ooms'] == 1;"
            # Nothing cached, and 1 GiB cannot fit a 64 MiB device: no release, no retry.
            "assert hbmalloc.memory_stats()['num_alloc_retries'] == 0"
        )
        env = dict(os.environ, HBMALLOC_CONF="backend:sim,sim_capacity:64MiB,leak_report:off")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        lines = [l for l in out.stderr.splitlines() if l.startswith("hbmalloc:")]
        self.assertEqual(len(lines), 1, out.stderr)
        self.assertIn("out of memory", lines[0])

    def test_snapshot_has_the_fields_the_viewer_reads(self):
        import pickle
        p = torch_malloc(3 * MiB, S2)
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"hbm-snap-{os.getpid()}.pickle")
        hbmalloc.dump_snapshot(path)
        with open(path, "rb") as f:
            snap = pickle.load(f)
        os.remove(path)
        self.assertEqual(snap["device_traces"], [[]])
        mine = [s for s in snap["segments"] if s["address"] == p]
        self.assertEqual(len(mine), 1)
        seg = mine[0]
        for key in ("device", "address", "total_size", "stream", "segment_type", "blocks"):
            self.assertIn(key, seg)
        self.assertEqual(seg["stream"], S2)
        (block,) = seg["blocks"]
        self.assertEqual(block["state"], "active_allocated")
        self.assertGreaterEqual(block["size"], 3 * MiB)
        self.assertEqual(sum(b["size"] for b in seg["blocks"]), seg["total_size"])
        for f in block["frames"]:
            self.assertEqual(set(f), {"filename", "line", "name"})
        torch_free(p, 3 * MiB, S2)

    def test_snapshot_blocks_name_the_python_line(self):
        p = held_lib().hbm_torch_malloc(3 * MiB, 0, S2); line = _line()  # noqa: E702
        snap = hbmalloc.snapshot()
        torch_free(p, 3 * MiB, S2)
        (seg,) = [s for s in snap["segments"] if s["address"] == p]
        (block,) = seg["blocks"]
        # co_qualname from 3.11, co_name before.
        name = "test_snapshot_blocks_name_the_python_line"
        if sys.version_info >= (3, 11):
            name = "PackageTest." + name
        self.assertEqual(block["frames"][0], {"filename": __file__, "line": line, "name": name})
        self.assertEqual(seg["frames"], block["frames"])

    def test_snapshot_device_traces_come_from_the_timeline(self):
        # Its own process: timeline:N is read once. Checks what torch.cuda._memory_viz reads:
        # segments (address, total_size, allocated_size, stream, blocks of size, requested_size,
        # state, frames) and trace entries (action, addr, size, stream, frames, time_us), and
        # segsum's invariant that a segment's blocks add up to its size.
        code = textwrap.dedent("""
            import ctypes, pickle, sys, hbmalloc
            lib = ctypes.PyDLL(hbmalloc.library_path())
            lib.hbm_torch_malloc.restype = ctypes.c_void_p
            lib.hbm_torch_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
            lib.hbm_torch_free.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
            def scratch(): return lib.hbm_torch_malloc(1 << 20, 0, None)
            def kept(): return lib.hbm_torch_malloc(2 << 20, 0, None)
            a = scratch(); lib.hbm_torch_free(a, 1 << 20, 0, None); b = kept()
            hbmalloc.dump_snapshot(sys.argv[1], device_count=2)
            print(a, b)
        """)
        import pickle
        import tempfile
        env = dict(os.environ, HBMALLOC_CONF="backend:sim,leak_report:off,timeline:100")
        # The child's working directory: the timeline it writes at exit lands there.
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "snapshot.pickle")
            out = subprocess.run([sys.executable, "-c", code, path], env=env, cwd=tmp,
                                 capture_output=True, text=True)
            self.assertEqual(out.returncode, 0, out.stderr)
            with open(path, "rb") as f:
                snap = pickle.load(f)
        a, b = map(int, out.stdout.split())
        self.assertEqual(len(snap["device_traces"]), 2)
        self.assertEqual(snap["device_traces"][1], [])
        trace = snap["device_traces"][0]
        self.assertEqual([(e["action"], e["addr"]) for e in trace],
                         [("alloc", a), ("free_requested", a), ("free_completed", a), ("alloc", b)])
        for e in trace:
            self.assertEqual(set(e), {"action", "addr", "size", "stream", "frames", "time_us"})
            self.assertIsInstance(e["time_us"], int)
        self.assertEqual(trace[0]["size"], 1 << 20)
        self.assertEqual(trace[0]["frames"][0]["name"], "scratch")
        self.assertEqual(trace[3]["frames"][0]["name"], "kept")
        self.assertEqual([t["time_us"] for t in trace], sorted(t["time_us"] for t in trace))
        (seg,) = [s for s in snap["segments"] if s["address"] == b]
        self.assertEqual(seg["blocks"][0]["frames"][0]["name"], "kept")
        for seg in snap["segments"]:
            self.assertEqual(sum(blk["size"] for blk in seg["blocks"]), seg["total_size"])
            self.assertLessEqual(seg["allocated_size"], seg["total_size"])
            for blk in seg["blocks"]:
                self.assertLessEqual(blk["requested_size"], blk["size"])
                self.assertIn(blk["state"], ("active_allocated", "active_pending_free", "inactive"))

    def test_no_timeline_means_empty_traces(self):
        self.assertIsNone(hbmalloc.timeline_json())
        self.assertEqual(hbmalloc.snapshot(device_count=3)["device_traces"], [[], [], []])

    def test_bad_free_is_harmless(self):
        torch_free(0xDEAD0000, 4096)  # one line on stderr, nothing freed
        p = torch_malloc(4096)
        self.assertTrue(p)
        torch_free(p, 4096)


if __name__ == "__main__":
    unittest.main()
