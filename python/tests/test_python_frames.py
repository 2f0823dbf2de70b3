"""Python call sites recorded beside native stacks (src/track/python_frames.rs), on the
simulated device, through ctypes: ctypes.PyDLL keeps the GIL during a call, ctypes.CDLL
releases it, so the two reach both branches of the capture.

Each case runs in a child process of its own, with its own HBMALLOC_CONF (read once per
process). The child prints the JSON leak report's sites; the parent checks them."""

import json
import os
import subprocess
import sys
import textwrap
import unittest

CHILD_HEAD = textwrap.dedent("""
    import ctypes, json, os, sys
    import hbmalloc
    def load(kind):
        lib = getattr(ctypes, kind)(hbmalloc.library_path())
        lib.hbm_torch_malloc.restype = ctypes.c_void_p
        lib.hbm_torch_malloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
        lib.hbm_torch_free.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
        return lib
    def cuda_malloc(lib, size):
        p = ctypes.c_void_p()
        assert lib.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(size)) == 0
        return p.value
    def sites_of(ptrs):
        out = {}
        for site in hbmalloc.report_json()["sites"]:
            for a in site["allocations"]:
                if int(a["ptr"], 16) in ptrs:
                    out[ptrs[int(a["ptr"], 16)]] = site["python_frames"]
        print(json.dumps(out))
""")


def program(body):
    return CHILD_HEAD + textwrap.dedent(body)


def line_of(body, text):
    """The line of the child program that holds `text` (as Python numbers it, from 1)."""
    (n,) = [i for i, line in enumerate(program(body).splitlines(), 1) if text in line]
    return n


def run_child(body, conf="", check=True):
    env = dict(os.environ, HBMALLOC_CONF="backend:sim,leak_report:off" + (conf and "," + conf))
    out = subprocess.run([sys.executable, "-c", program(body)], env=env,
                         capture_output=True, text=True, timeout=120)
    if check:
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.splitlines()[-1])
    return out


# One child for the four entry/GIL combinations: each allocation from a function of its own, so
# that its innermost Python frame says which it was.
FOUR_WAYS = """
    held, released = load("PyDLL"), load("CDLL")
    def torch_held(): return held.hbm_torch_malloc(1 << 20, 0, None)
    def torch_released(): return released.hbm_torch_malloc(1 << 20, 0, None)
    def cuda_held(): return cuda_malloc(held, 1 << 20)
    def cuda_released(): return cuda_malloc(released, 1 << 20)
    def outer(f): return f()
    ptrs = {outer(f): f.__name__ for f in (torch_held, torch_released, cuda_held, cuda_released)}
    # From a thread that is not the main one: the default takes the GIL back only on the main
    # thread (a daemon thread waiting for it at shutdown would be ended inside hbmalloc).
    import threading
    def torch_released_in_thread(): ptrs[torch_released()] = "torch_released_in_thread"
    t = threading.Thread(target=torch_released_in_thread); t.start(); t.join()
    sites_of(ptrs)
"""


def at(name):
    return line_of(FOUR_WAYS, f"def {name}():")


def innermost(frames):
    """The innermost frame other than the cuda_malloc helper's, as (function, line, file)."""
    frames = [f for f in frames if f["function"] != "cuda_malloc"]
    return (frames[0]["function"], frames[0]["line"], frames[0]["file"]) if frames else None


class PythonFramesTest(unittest.TestCase):
    def test_default_gil_held_and_the_pluggable_path(self):
        sites = run_child(FOUR_WAYS)
        # With the GIL held, every entry point records the Python stack, innermost first.
        for name in ("torch_held", "cuda_held"):
            frames = sites[name]
            self.assertEqual(innermost(frames), (name, at(name), "<string>"), frames)
            self.assertIn("outer", [f["function"] for f in frames[1:3]])
            self.assertEqual(frames[-1]["function"], "<module>")
        # GIL released on the main thread: hbm_torch_malloc (PyTorch's path) takes it back...
        self.assertEqual(innermost(sites["torch_released"]),
                         ("torch_released", at("torch_released"), "<string>"))
        # ... cudaMalloc (LD_PRELOAD's path, inside PyTorch's allocator lock) does not, and
        # neither does a thread other than the main one.
        self.assertEqual(sites["cuda_released"], [])
        self.assertEqual(sites["torch_released_in_thread"], [])

    def test_acquire_takes_the_gil_back_everywhere(self):
        sites = run_child(FOUR_WAYS, "python_frames:acquire")
        self.assertEqual(innermost(sites["cuda_released"]),
                         ("cuda_released", at("cuda_released"), "<string>"))
        self.assertEqual(innermost(sites["torch_held"]), ("torch_held", at("torch_held"), "<string>"))
        frames = sites["torch_released_in_thread"]
        self.assertEqual([f["function"] for f in frames[:2]],
                         ["torch_released", "torch_released_in_thread"])

    def test_off_and_backtrace_off_record_none(self):
        for conf in ("python_frames:off", "backtrace:off"):
            sites = run_child(FOUR_WAYS, conf)
            self.assertEqual(set(sites), {"torch_held", "torch_released", "cuda_held",
                                          "cuda_released", "torch_released_in_thread"})
            self.assertTrue(all(frames == [] for frames in sites.values()), (conf, sites))

    def test_max_frames_bounds_the_python_stack(self):
        body = """
            held = load("PyDLL")
            def deep(n): return deep(n - 1) if n else held.hbm_torch_malloc(4096, 0, None)
            sites_of({deep(50): "deep"})
        """
        frames = run_child(body, "max_frames:6")["deep"]
        self.assertEqual(len(frames), 6)
        self.assertTrue(all(f["function"] == "deep" for f in frames))

    def test_a_pending_exception_survives_the_name_lookups(self):
        # A code object seen for the first time is named while an exception is being handled.
        body = """
            held = load("PyDLL")
            def fresh(): return held.hbm_torch_malloc(4096, 0, None)
            try:
                raise KeyError("kept")
            except KeyError as e:
                p = fresh()
                assert str(e) == "'kept'" and sys.exc_info()[0] is KeyError
            sites_of({p: "fresh"})
        """
        self.assertEqual(run_child(body)["fresh"][0]["function"], "fresh")

    def test_a_double_free_names_the_allocating_python_line(self):
        body = """
            held = load("PyDLL")
            def make(): return held.hbm_torch_malloc(4096, 0, None)
            p = make()
            held.hbm_torch_free(p, 4096, 0, None); held.hbm_torch_free(p, 4096, 0, None)
            sites_of({})
        """
        out = run_child(body, check=False)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("double free of", out.stderr)
        self.assertIn(f"py#0  make at <string>:{line_of(body, 'def make():')}", out.stderr)

    def test_allocations_while_python_finalizes_never_crash(self):
        # Daemon threads allocating through both paths while the interpreter shuts down, and an
        # allocation from an atexit handler and from a __del__ run at finalization.
        body = """
            import atexit, threading
            held, released = load("PyDLL"), load("CDLL")
            def churn(lib):
                while True:
                    p = lib.hbm_torch_malloc(4096, 0, None)
                    lib.hbm_torch_free(p, 4096, 0, None)
            for lib in (held, released, held, released):
                threading.Thread(target=churn, args=(lib,), daemon=True).start()
            class Late:
                def __del__(self):
                    held.hbm_torch_malloc(4096, 0, None)
            keep = Late()
            atexit.register(lambda: held.hbm_torch_malloc(4096, 0, None))
            sites_of({})
        """
        for _ in range(5):
            out = run_child(body, check=False)
            self.assertEqual(out.returncode, 0, out.stderr[-2000:])
            self.assertNotIn("panicked", out.stderr)


if __name__ == "__main__":
    unittest.main()
