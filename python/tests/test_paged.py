"""hbmalloc.paged on the simulated device, where device memory is host memory: the views'
pointers and shapes, the block tables' contents and an append seen through the view, read with
ctypes (no torch needed). With torch and a CUDA device (scripts/gpu-check.sh, section
paged-torch), the same views as torch tensors over the cache's own memory.

Run by scripts/test-python.sh (HBMALLOC_LIB names the library built there)."""

import ctypes
import os
import struct
import unittest

os.environ.setdefault("HBMALLOC_CONF", "backend:sim,leak_report:off")

from hbmalloc import _lib  # noqa: E402
from hbmalloc.paged import BF16, F16, F32, Q8_0, Layer, PagedKvCache  # noqa: E402

try:
    import torch  # noqa: F401

    CUDA = torch.cuda.is_available() and "backend:sim" not in os.environ["HBMALLOC_CONF"]
except ImportError:
    CUDA = False


def device_alloc(size):
    lib = _lib.lib()
    lib.hbm_device_alloc.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
    lib.hbm_device_free.argtypes = [ctypes.c_void_p]
    p = ctypes.c_void_p()
    _lib.check(lib.hbm_device_alloc(0, size, ctypes.byref(p)), "hbm_device_alloc")
    return p.value


def int32s(ptr, n):
    return list(struct.unpack(f"<{n}i", ctypes.string_at(ptr, 4 * n)))


# Two full layers (4 heads of 32), an MLA layer (K only, 64 wide), a layer with a 8-token window.
LAYERS = [Layer(4, 32), Layer(4, 32), Layer(1, 64, 0), Layer(4, 32, 32, 8)]


def small(ty=F16, **kw):
    args = dict(block_tokens=4, num_blocks=32, max_seqs=4, max_seq_tokens=64)
    args.update(kw)
    return PagedKvCache(LAYERS, ty, **args)


@unittest.skipIf(CUDA, "the simulated device's memory is readable from the host; see PagedTorch")
class PagedOnSim(unittest.TestCase):
    def test_views_describe_the_layers_memory(self):
        with small() as kv:
            k, v, rk, rv = kv.layer_pointers(0)
            a = kv.k_interface(0).__cuda_array_interface__
            self.assertEqual(a["data"], (k, False))
            self.assertEqual(a["shape"], (32, 4, 4, 32))
            self.assertEqual(a["typestr"], "<f2")
            self.assertEqual(rk, 4 * 32 * 2)
            self.assertEqual(kv.v_interface(0).__cuda_array_interface__["data"][0], v)
            # MLA: K only.
            self.assertEqual(kv.k_interface(2).__cuda_array_interface__["shape"], (32, 4, 1, 64))
            with self.assertRaises(ValueError):
                kv.v_interface(2)
            with self.assertRaises(IndexError):
                kv.k_interface(4)
        with small(Q8_0) as kv:
            a = kv.k_interface(1).__cuda_array_interface__
            self.assertEqual((a["shape"], a["typestr"]), ((32, 4, 4 * 34), "|u1"))
        with small(BF16, type_v=F32) as kv:
            self.assertEqual(kv.k_interface(0).__cuda_array_interface__["typestr"], "<i2")
            self.assertEqual(kv.v_interface(0).__cuda_array_interface__["typestr"], "<f4")

    def test_block_tables_hold_the_sequences_blocks(self):
        with small() as kv:
            kv.add_tokens(0, 9)  # 3 blocks of 4
            kv.add_tokens(1, 2)
            kv.fork(0, 2)  # shares seq 0's blocks
            t = kv.block_table_interface(0).__cuda_array_interface__
            self.assertEqual(t["shape"], (4, 16))
            self.assertEqual(t["typestr"], "<i4")
            rows = [int32s(t["data"][0] + 4 * 16 * s, 16) for s in range(4)]
            self.assertEqual(rows[0][:4], [0, 1, 2, -1])
            self.assertEqual(rows[1][:2], [3, -1])
            self.assertEqual(rows[2], rows[0])
            self.assertEqual(rows[3], [-1] * 16)
            s = kv.stats()
            # Summed over the two pools (full layers, the windowed layer): 3 shared in each.
            self.assertEqual((s["blocks_shared"], s["n_seq"], s["tokens"]), (6, 3, 20))
            # The windowed layer's table is its own group's: seq 0 holds only its last 8 tokens.
            kv.add_tokens(0, 8)  # 17 tokens: blocks 0..4, the window keeps tokens 9..16
            w = kv.block_table_interface(3).__cuda_array_interface__["data"][0]
            self.assertEqual(int32s(w, 16)[:2], [-1, -1])

    def test_an_append_is_seen_through_the_view(self):
        with small() as kv:
            kv.add_tokens(0, 5)
            slots = kv.slot_mapping(1, [0], [2])  # tokens 3 and 4: block 0 offset 3, block 1 0
            self.assertEqual(slots, [3, 4])
            row = 4 * 32
            values = [(i % 64) * 0.25 - 8 for i in range(2 * row)]  # exact in F16
            src = device_alloc(4 * len(values))
            ctypes.memmove(src, struct.pack(f"<{len(values)}f", *values), 4 * len(values))
            dev_slots = device_alloc(16)
            ctypes.memmove(dev_slots, struct.pack("<2q", *slots), 16)
            kv.append(1, src, 0, F32, (dev_slots, 2))
            a = kv.k_interface(1).__cuda_array_interface__
            base, row_bytes = a["data"][0], row * 2
            got = ctypes.string_at(base + slots[0] * row_bytes, 2 * row_bytes)  # consecutive
            self.assertEqual(got, struct.pack(f"<{len(values)}e", *values))

    def test_bad_input_raises_and_changes_nothing(self):
        with small() as kv:
            with self.assertRaisesRegex(RuntimeError, "hbm_paged_kv_seq_add_tokens"):
                kv.add_tokens(4, 1)  # max_seqs is 4
            with self.assertRaisesRegex(RuntimeError, "hbm_paged_kv_seq_fork"):
                kv.fork(0, 1)  # 0 is not live
            self.assertEqual(kv.stats()["n_seq"], 0)
            with self.assertRaises(ValueError):
                kv.slot_mapping(0, [0, 1], [1])
            with self.assertRaises(ValueError):
                kv.slot_mapping(0, [-1], [1])
        with self.assertRaises(ValueError):
            PagedKvCache(LAYERS, 3)  # not a type
        with self.assertRaisesRegex(RuntimeError, "hbm_paged_kv_create"):
            PagedKvCache([Layer(1, 33)], Q8_0)  # rows not whole Q8_0 blocks
        kv = small()
        kv.close()
        kv.close()
        with self.assertRaises(ValueError):
            kv.stats()


@unittest.skipUnless(CUDA, "needs torch with a CUDA device and HBMALLOC_CONF without backend:sim")
class PagedTorch(unittest.TestCase):
    def test_tensors_view_the_caches_memory(self):
        import torch

        with small() as kv:
            kv.add_tokens(0, 5)
            k = kv.k_cache(1)
            self.assertEqual((k.dtype, tuple(k.shape)), (torch.float16, (32, 4, 4, 32)))
            self.assertEqual(k.data_ptr(), kv.layer_pointers(1)[0])
            tables = kv.block_tables(0)
            self.assertEqual(tables.dtype, torch.int32)
            self.assertEqual(tables[0, :3].tolist(), [0, 1, -1])
            # An append by hbmalloc is read through the torch view.
            slots = torch.tensor(kv.slot_mapping(1, [0], [2]), dtype=torch.int64, device="cuda")
            src = torch.randn(2, 4 * 32, device="cuda", dtype=torch.float16)
            kv.append(1, src.data_ptr(), 0, F16, slots)
            torch.cuda.synchronize()
            flat = k.view(-1, 4 * 32)
            self.assertTrue(torch.equal(flat[slots], src))
            with small(BF16) as kb:
                self.assertEqual(kb.v_cache(0).dtype, torch.bfloat16)
        print("paged-torch: k_cache/block_tables view hbmalloc's paged cache")


if __name__ == "__main__":
    unittest.main()
