"""hbmalloc.torch's C++ shim without torch (CI has none): what enable() does when the shim
cannot be built, and that the build names what is missing.

Run by scripts/test-python.sh (HBMALLOC_LIB names the library built there)."""

import os
import sys
import tempfile
import types
import unittest
import warnings

os.environ.setdefault("HBMALLOC_CONF", "backend:sim,leak_report:off")

from hbmalloc import _lib, _shim  # noqa: E402


class FakeTorch:
    """Just enough of torch for hbmalloc.torch.allocator() and enable(): records the
    CUDAPluggableAllocator it is asked for and the allocator made current."""

    def __init__(self, folder):
        self.made, self.current = [], []
        torch = types.ModuleType("torch")
        torch.__file__ = os.path.join(folder, "__init__.py")
        torch.__version__ = "0.0-fake"
        torch._C = types.SimpleNamespace(_GLIBCXX_USE_CXX11_ABI=True)
        made, current = self.made, self.current

        class Pluggable:
            def __init__(self, path, malloc, free):
                made.append((path, malloc, free))

            def allocator(self):
                return self

        memory = types.SimpleNamespace(CUDAPluggableAllocator=Pluggable,
                                       change_current_allocator=current.append)
        torch.cuda = types.SimpleNamespace(memory=memory)
        self.module = torch

    def __enter__(self):
        self.saved = {k: sys.modules.get(k) for k in ("torch", "hbmalloc.torch")}
        sys.modules["torch"] = self.module
        sys.modules.pop("hbmalloc.torch", None)
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class ShimTests(unittest.TestCase):
    def test_build_names_missing_headers_compiler_and_library(self):
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaisesRegex(_shim.ShimUnavailable, r"C\+\+ headers.*Exception\.h"):
                _shim.build(d, "0", True)
            os.makedirs(os.path.join(d, "include", "c10", "util"))
            open(os.path.join(d, "include", "c10", "util", "Exception.h"), "w").close()
            with self.assertRaisesRegex(_shim.ShimUnavailable, "libc10.so"):
                _shim.build(d, "0", True)
        saved = os.environ.get("CXX")
        os.environ["CXX"] = "/nonexistent/c++"
        try:
            with self.assertRaisesRegex(_shim.ShimUnavailable, r"\$CXX='/nonexistent/c\+\+'"):
                _shim.compiler()
        finally:
            if saved is None:
                del os.environ["CXX"]
            else:
                os.environ["CXX"] = saved

    def test_enable_without_the_shim_warns_and_uses_the_plain_entry_points(self):
        with tempfile.TemporaryDirectory() as d, FakeTorch(d) as fake:
            import hbmalloc.torch as ht
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ht.enable()
            texts = [str(w.message) for w in caught if w.category is RuntimeWarning]
            self.assertEqual(len(texts), 1, texts)
            self.assertIn("C++ headers are not installed", texts[0])
            self.assertIn("address 0 instead of torch.OutOfMemoryError", texts[0])
            self.assertEqual(fake.made, [(_lib.path(), "hbm_torch_malloc", "hbm_torch_free")])
            self.assertEqual(len(fake.current), 1)
            self.assertIn("Exception.h", ht.shim_missing)

    def test_the_shim_can_be_switched_off(self):
        saved = os.environ.get("HBMALLOC_TORCH_SHIM")
        os.environ["HBMALLOC_TORCH_SHIM"] = "off"
        try:
            with tempfile.TemporaryDirectory() as d, FakeTorch(d):
                import hbmalloc.torch as ht
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    ht.allocator()
                self.assertIn("HBMALLOC_TORCH_SHIM=off", str(caught[0].message))
        finally:
            if saved is None:
                del os.environ["HBMALLOC_TORCH_SHIM"]
            else:
                os.environ["HBMALLOC_TORCH_SHIM"] = saved

    def test_the_library_has_every_entry_point_the_shim_binds(self):
        lib = _lib.lib()
        for name in ("hbm_torch_try_malloc", "hbm_torch_graph_malloc", "hbm_torch_free",
                     "hbm_torch_graph_begin", "hbm_torch_graph_end", "hbm_torch_graph_release",
                     "hbm_status_str", "hbm_torch_segment_malloc"):
            self.assertIsNotNone(_shim.address(getattr(lib, name)), name)


if __name__ == "__main__":
    unittest.main()
