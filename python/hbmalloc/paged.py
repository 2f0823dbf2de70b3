"""The paged KV cache (`hbm_paged_kv_*`) from Python: a thin ctypes wrapper, and the block pool
and block tables as tensors an attention kernel takes (vLLM's `[num_blocks, block_tokens,
n_kv_heads, head_dim]` K and V per layer, `int32 [max_seqs, max_blocks_per_seq]` tables).

The tensors are views of the cache's own device memory, nothing copied: their pointers never
move while the cache lives, and they are invalid once it is closed. Without torch, the same
views are `__cuda_array_interface__` dicts (`k_interface` and friends), which CuPy, Numba and
torch all read.

    from hbmalloc.paged import PagedKvCache, Layer, F16
    kv = PagedKvCache([Layer(8, 128)] * 32, F16, num_blocks=4096, max_seqs=256,
                      max_seq_tokens=4096)
    kv.add_tokens(0, 100)
    k0 = kv.k_cache(0)          # torch.float16 [4096, 16, 8, 128] on the cache's device
    tables = kv.block_tables(0) # torch.int32 [256, 256]
"""

import ctypes
from collections import namedtuple

from . import _lib

__all__ = ["PagedKvCache", "Layer", "F32", "F16", "Q4_0", "Q8_0", "BF16"]

# Element types, ggml's numbering (HBM_TYPE_* in include/hbmalloc.h).
F32, F16, Q4_0, Q8_0, BF16 = 0, 1, 2, 8, 30
_TYPES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q8_0: "Q8_0", BF16: "BF16"}
# Bytes per element of the unquantized types, and the array-interface type string each is viewed
# as (BF16 as int16: the interface has no bfloat16; k_cache reinterprets it).
_PLAIN = {F32: (4, "<f4"), F16: (2, "<f2"), BF16: (2, "<i2")}

Layer = namedtuple("Layer", "n_kv_heads head_dim_k head_dim_v window")
Layer.__new__.__defaults__ = (None, 0)
Layer.__doc__ = """One layer: KV heads, K head size, V head size (None: the K head size; 0: no V,
as DeepSeek's MLA), sliding window in tokens (0: full attention)."""


class _Layer(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("n_kv_heads", "head_dim_k", "head_dim_v", "window")]


class _Params(ctypes.Structure):
    _fields_ = [
        ("layers", ctypes.POINTER(_Layer)),
        ("n_layer", ctypes.c_uint32),
        ("type_k", ctypes.c_int32),
        ("type_v", ctypes.c_int32),
        ("block_tokens", ctypes.c_uint32),
        ("num_blocks", ctypes.c_uint32),
        ("max_seqs", ctypes.c_uint32),
        ("max_seq_tokens", ctypes.c_uint32),
        ("device", ctypes.c_int32),
    ]


_STATS = ("blocks_total", "blocks_used", "blocks_free", "blocks_shared", "bytes_committed",
          "bytes_reserved", "bytes_tables", "tokens", "cow_copies")


class _Stats(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in _STATS] + [("n_seq", ctypes.c_uint32)]


_P = ctypes.c_void_p
_U32 = ctypes.c_uint32
_PROTOTYPES = {
    "hbm_paged_kv_create": [ctypes.POINTER(_Params), ctypes.POINTER(_P)],
    "hbm_paged_kv_seq_add_tokens": [_P, _U32, _U32, _P],
    "hbm_paged_kv_seq_fork": [_P, _U32, _U32],
    "hbm_paged_kv_seq_truncate": [_P, _U32, _U32],
    "hbm_paged_kv_seq_free": [_P, _U32],
    "hbm_paged_kv_seq_len": [_P, _U32, ctypes.POINTER(_U32)],
    "hbm_paged_kv_block_table": [_P, _U32, ctypes.POINTER(_P), ctypes.POINTER(_U32)],
    "hbm_paged_kv_layer": [_P, _U32, ctypes.POINTER(_P), ctypes.POINTER(_P),
                           ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
    "hbm_paged_kv_slot_mapping": [_P, _U32, ctypes.POINTER(_U32), ctypes.POINTER(_U32),
                                  ctypes.c_size_t, ctypes.POINTER(ctypes.c_int64),
                                  ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)],
    "hbm_paged_kv_append": [_P, _U32, _P, _P, ctypes.c_int32, _P, _U32, _P],
    "hbm_paged_kv_trim": [_P, ctypes.POINTER(ctypes.c_uint64)],
    "hbm_paged_kv_stats": [_P, ctypes.POINTER(_Stats)],
}


def _c():
    """The library, with the prototypes of this module set once."""
    lib = _lib.lib()
    if not getattr(lib, "_hbm_paged_prototypes", False):
        for name, args in _PROTOTYPES.items():
            f = getattr(lib, name)
            f.argtypes = args
            f.restype = ctypes.c_int
        lib.hbm_paged_kv_destroy.argtypes = [_P]
        lib.hbm_paged_kv_destroy.restype = None
        lib._hbm_paged_prototypes = True
    return lib


def _u32s(values, what):
    values = [int(v) for v in values]
    if any(v < 0 or v > 0xFFFFFFFF for v in values):
        raise ValueError(f"hbmalloc.paged: {what} must be 32-bit unsigned integers")
    return (_U32 * len(values))(*values)


class _DeviceArray:
    """A `__cuda_array_interface__` (version 3) over memory the cache owns; it holds the cache,
    so a tensor made from it keeps the cache from being garbage-collected."""

    def __init__(self, owner, ptr, shape, typestr):
        self._owner = owner
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": typestr,
            "data": (ptr, False),
            "strides": None,  # C-contiguous
            "version": 3,
        }


class PagedKvCache:
    """A paged KV cache (`hbm_paged_kv_create`). `layers`: `Layer`s; `type_k`/`type_v`: F32, F16,
    BF16, Q8_0 or Q4_0 (`type_v` defaults to `type_k`); `block_tokens` 0 means 16. Errors of the
    library raise RuntimeError with its status text; nothing is changed then. Use as a context
    manager or call `close()`; the views it gave are invalid afterwards."""

    def __init__(self, layers, type_k, type_v=None, block_tokens=0, num_blocks=1024,
                 max_seqs=256, max_seq_tokens=4096, device=0):
        type_v = type_k if type_v is None else type_v
        for t in (type_k, type_v):
            if t not in _TYPES:
                raise ValueError(f"hbmalloc.paged: unknown element type {t!r}")
        layers = [Layer(*l) if not isinstance(l, Layer) else l for l in layers]
        if not layers:
            raise ValueError("hbmalloc.paged: at least one layer")
        self.layers = [l._replace(head_dim_v=l.head_dim_k if l.head_dim_v is None else l.head_dim_v)
                       for l in layers]
        c_layers = (_Layer * len(layers))()
        for dst, l in zip(c_layers, self.layers):
            for name in _Layer._fields_:
                setattr(dst, name[0], int(getattr(l, name[0])))
        params = _Params(ctypes.cast(c_layers, ctypes.POINTER(_Layer)), len(layers), type_k,
                         type_v, block_tokens, num_blocks, max_seqs, max_seq_tokens, device)
        handle = _P()
        _lib.check(_c().hbm_paged_kv_create(ctypes.byref(params), ctypes.byref(handle)),
                   "hbm_paged_kv_create")
        self._h = handle.value
        self.type_k, self.type_v = type_k, type_v
        self.block_tokens = block_tokens or 16
        self.num_blocks, self.max_seqs, self.device = num_blocks, max_seqs, device

    # -- lifetime --
    def close(self):
        """Destroys the cache (after the device is done with it). Idempotent."""
        h, self._h = getattr(self, "_h", None), None
        if h:
            _c().hbm_paged_kv_destroy(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone; the OS reclaims all
            pass

    def _handle(self):
        if not self._h:
            raise ValueError("hbmalloc.paged: the cache is closed")
        return self._h

    def _layer_index(self, layer):
        if not 0 <= layer < len(self.layers):
            raise IndexError(f"hbmalloc.paged: layer {layer} out of range")
        return layer

    # -- sequences --
    def add_tokens(self, seq, n_tokens, stream=0):
        """Makes `seq` `n_tokens` longer (starting it), copy-on-write queued on `stream`."""
        _lib.check(_c().hbm_paged_kv_seq_add_tokens(self._handle(), seq, n_tokens, stream or None),
                   "hbm_paged_kv_seq_add_tokens")

    def fork(self, src, dst):
        """Starts `dst` sharing all of `src`'s blocks."""
        _lib.check(_c().hbm_paged_kv_seq_fork(self._handle(), src, dst), "hbm_paged_kv_seq_fork")

    def truncate(self, seq, n_tokens):
        _lib.check(_c().hbm_paged_kv_seq_truncate(self._handle(), seq, n_tokens),
                   "hbm_paged_kv_seq_truncate")

    def free(self, seq):
        _lib.check(_c().hbm_paged_kv_seq_free(self._handle(), seq), "hbm_paged_kv_seq_free")

    def seq_len(self, seq):
        n = _U32()
        _lib.check(_c().hbm_paged_kv_seq_len(self._handle(), seq, ctypes.byref(n)),
                   "hbm_paged_kv_seq_len")
        return n.value

    def slot_mapping(self, layer, seqs, n_new):
        """The slots (`block * block_tokens + offset`, -1: dropped by a window) of each sequence's
        last `n_new[i]` tokens, sequence after sequence, as a list."""
        s, n = _u32s(seqs, "seqs"), _u32s(n_new, "n_new")
        if len(s) != len(n):
            raise ValueError("hbmalloc.paged: seqs and n_new differ in length")
        cap = sum(n)
        out, got = (ctypes.c_int64 * max(cap, 1))(), ctypes.c_size_t()
        _lib.check(_c().hbm_paged_kv_slot_mapping(self._handle(), self._layer_index(layer), s, n,
                                                  len(s), out, cap, ctypes.byref(got)),
                   "hbm_paged_kv_slot_mapping")
        return list(out[: got.value])

    def append(self, layer, k_src, v_src, src_type, slots, stream=0):
        """Writes `len(slots)` rows of `layer` from device pointers `k_src`/`v_src` (F32 or F16,
        contiguous; 0 skips one) through `slots`, a device pointer to `int64`s or an object with
        `data_ptr()` and `numel()` (a torch tensor). Returns nothing; queued on `stream`."""
        if hasattr(slots, "data_ptr"):
            ptr, n = slots.data_ptr(), slots.numel()
        else:
            ptr, n = slots
        _lib.check(_c().hbm_paged_kv_append(self._handle(), self._layer_index(layer), k_src or None,
                                            v_src or None, src_type, ptr or None, n,
                                            stream or None),
                   "hbm_paged_kv_append")

    # -- memory --
    def trim(self):
        """Unmaps granules no live block uses; returns the bytes given back."""
        released = ctypes.c_uint64()
        _lib.check(_c().hbm_paged_kv_trim(self._handle(), ctypes.byref(released)), "hbm_paged_kv_trim")
        return released.value

    def stats(self):
        """`hbm_paged_kv_stats` as a dict."""
        s = _Stats()
        _lib.check(_c().hbm_paged_kv_stats(self._handle(), ctypes.byref(s)), "hbm_paged_kv_stats")
        return {name: getattr(s, name) for name, _ in _Stats._fields_}

    # -- the views --
    def layer_pointers(self, layer):
        """(K base, V base or None, K row bytes, V row bytes) of `layer`: `hbm_paged_kv_layer`."""
        k, v, rk, rv = _P(), _P(), ctypes.c_size_t(), ctypes.c_size_t()
        _lib.check(_c().hbm_paged_kv_layer(self._handle(), self._layer_index(layer), ctypes.byref(k),
                                           ctypes.byref(v), ctypes.byref(rk), ctypes.byref(rv)),
                   "hbm_paged_kv_layer")
        return k.value, v.value, rk.value, rv.value

    def _interface(self, layer, which):
        k, v, rk, rv = self.layer_pointers(layer)
        l = self.layers[layer]
        ptr, row, ty, dim = (k, rk, self.type_k, l.head_dim_k) if which == "k" else (
            v, rv, self.type_v, l.head_dim_v)
        if not ptr:
            raise ValueError(f"hbmalloc.paged: layer {layer} has no V (head_dim_v = 0)")
        lead = (self.num_blocks, self.block_tokens)
        if ty in _PLAIN:
            size, typestr = _PLAIN[ty]
            if row != l.n_kv_heads * dim * size:
                raise RuntimeError(f"hbmalloc.paged: layer {layer} rows are {row} bytes, not "
                                   f"{l.n_kv_heads} x {dim} x {size}")
            return _DeviceArray(self, ptr, lead + (l.n_kv_heads, dim), typestr)
        # Q8_0/Q4_0: ggml blocks, no element dtype; each token row as its bytes.
        return _DeviceArray(self, ptr, lead + (row,), "|u1")

    def k_interface(self, layer):
        """`layer`'s K block pool as a `__cuda_array_interface__` object: `[num_blocks,
        block_tokens, n_kv_heads, head_dim_k]` (`<f4`, `<f2`, BF16 as `<i2`), or `[num_blocks,
        block_tokens, row_bytes]` bytes for Q8_0/Q4_0."""
        return self._interface(layer, "k")

    def v_interface(self, layer):
        """As `k_interface`, for V; ValueError for a layer without V."""
        return self._interface(layer, "v")

    def block_table_interface(self, layer):
        """The block table `layer` reads: `int32 [max_seqs, max_blocks_per_seq]`, -1 where no
        block is."""
        ptr, width = _P(), _U32()
        _lib.check(_c().hbm_paged_kv_block_table(self._handle(), self._layer_index(layer),
                                                 ctypes.byref(ptr), ctypes.byref(width)),
                   "hbm_paged_kv_block_table")
        return _DeviceArray(self, ptr.value, (self.max_seqs, width.value), "<i4")

    def _tensor(self, array, ty=None):
        import torch  # only here: the rest of the module needs no torch

        t = torch.as_tensor(array, device=torch.device("cuda", self.device))
        ptr = array.__cuda_array_interface__["data"][0]
        if t.data_ptr() != ptr:  # a copy would not be the cache
            raise RuntimeError("hbmalloc.paged: torch copied the cache instead of viewing it")
        return t.view(torch.bfloat16) if ty == BF16 else t

    def k_cache(self, layer):
        """`layer`'s K block pool as a torch tensor viewing the cache (float32, float16 or
        bfloat16 `[num_blocks, block_tokens, n_kv_heads, head_dim_k]`; uint8 rows for
        Q8_0/Q4_0)."""
        return self._tensor(self.k_interface(layer), self.type_k)

    def v_cache(self, layer):
        """As `k_cache`, for V."""
        return self._tensor(self.v_interface(layer), self.type_v)

    def block_tables(self, layer):
        """The block table of `layer` as a torch int32 tensor viewing the cache's."""
        return self._tensor(self.block_table_interface(layer))
