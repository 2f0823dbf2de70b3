#!/usr/bin/env python3
"""Writes the hand-made part of the seed corpus (fuzz/corpus/<target>/seed-*): small inputs that
reach every operation of each target. Inputs the fuzzer found (regress-*) are kept as they were
found and are not written here. Run from the repository root: python3 fuzz/make_seeds.py"""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    os.makedirs(os.path.join(ROOT, target), exist_ok=True)
    with open(os.path.join(ROOT, target, "seed-" + name), "wb") as f:
        f.write(data)


# ---- pool_ops: a setup byte (bit 0 device size, bits 1-2 stream safety, bit 3 pending limit,
# bit 4 KV growth, bit 5 scratch release threshold, bits 6-7 fault rules), the rules' two bytes
# each (operation, call), then operations: an opcode and an argument byte, and for allocations
# a size kind and a little-endian u16 (see src/harness/ops.rs).
def op(code, arg=0, *extra):
    return bytes([code, arg]) + bytes(extra)


def size(kind, n):
    return bytes([kind]) + struct.pack("<H", n)


ALLOC, ALLOC_ASYNC, FREE, FREE_ASYNC, TRIM, BAD_FREE = 0, 1, 2, 3, 4, 5
S_ALLOC, S_FREE, S_TRIM, KV_RESERVE, KV_RELEASE, KV_TRIM, ARM = 6, 7, 8, 9, 11, 12, 13

mixed = b"".join(
    [op(ALLOC, 0) + size(0, 1000), op(ALLOC, 0) + size(1, 4000), op(ALLOC, 0) + size(2, 100),
     op(ALLOC_ASYNC, 2) + size(1, 300), op(FREE, 1), op(FREE_ASYNC, 0x21), op(BAD_FREE, 0),
     op(BAD_FREE, 1), op(S_ALLOC, 0) + size(1, 2000), op(S_ALLOC, 1) + size(1, 5000),
     op(S_FREE, 0), op(S_FREE, 1), op(S_TRIM, 0), op(S_TRIM, 1),
     op(KV_RESERVE, 0, 0x00, 0x04), op(KV_RESERVE, 1, 0x00, 0x10), op(KV_RELEASE, 0),
     op(KV_TRIM), op(TRIM), op(FREE, 0)])
put("pool_ops", "mixed", bytes([0b00000000]) + mixed)
put("pool_ops", "mixed-eager-realloc", bytes([0b00010011]) + mixed)
put("pool_ops", "mixed-off-threshold", bytes([0b00100101]) + mixed)
# Past the device's memory: large blocks until out of memory, then frees and a trim.
storm = b"".join([op(ALLOC, 0) + size(2, 60000)] * 12 + [op(FREE, i) for i in range(6)]
                 + [op(ALLOC, 0) + size(2, 0)] * 4 + [op(TRIM)])
put("pool_ops", "out-of-memory", bytes([0]) + storm)
# One fault of each kind (alloc, reserve, map, access, event, sync) on an early call, and one
# that keeps failing.
for i, name in enumerate(["alloc", "reserve", "map", "access", "event", "sync"]):
    call = 0 if name == "event" else 2  # the mix frees asynchronously once
    put("pool_ops", "fault-" + name, bytes([0b01000000, i, call]) + mixed + storm)
    put("pool_ops", "fault-" + name + "-from-1", bytes([0b01000000, i, 0x40]) + mixed)
put("pool_ops", "fault-sync-scratch-full", bytes([0b01100000, 5, 0x40 | 4])
    + b"".join([op(S_ALLOC, 0) + size(1, 100 + i) for i in range(8)])
    + b"".join([op(S_FREE, 0)] * 8) + op(S_TRIM, 0))

# ---- conf: HBMALLOC_CONF values, good and bad.
for name, text in {
    "documented": b"backend:sim,sim_capacity:4GiB,stream_safety:eager",
    "every-key": b"backend:sim, backtrace:off,leak_report:summary,report_path:/tmp/a.txt,"
                 b"report_json:/tmp/a.json,report_svg:/tmp/a.svg,trace:/tmp/t,sim_capacity:2GiB,"
                 b"max_frames:8,stream_safety:batched,timeline:1000,pending_limit:64MiB,"
                 b"verbose:on,unwinder:dwarf,fault:alloc@2+sync@3..",
    "bad-entries": b"backend:gpu,nonsense,colour:blue,sim_capacity:lots,,max_frames:0,timeline:-1",
    "sizes": b"sim_capacity:16 GiB,pending_limit:0,sim_capacity:99999999999999999999TiB",
    "faults": b"fault:alloc+reserve@1+map@2..5+access@3..+event@9+sync@1,fault:x@0",
    "non-utf8": b"report_path:/tmp/r\xe9sum\xe9.txt,ba\xffckend:sim,leak_report:s\xffmmary",
}.items():
    put("conf", name, text)


# ---- model_files: byte 0 even = GGUF file; odd = safetensors: u16 length of config.json, the
# JSON, then the safetensors file.
def gstr(x):
    return struct.pack("<Q", len(x)) + x.encode()


def gguf(kvs, tensors):
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for k, (t, v) in kvs.items():
        out += gstr(k) + struct.pack("<I", t) + v
    off = 0
    for name, dims, ty, nbytes in tensors:
        out += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, off)
        off += (nbytes + 31) // 32 * 32
    out += b"\0" * ((-len(out)) % 32)
    return out + b"\0" * off


U32, F32, STR, ARR, U64 = 4, 6, 8, 9, 10
llama = {
    "general.architecture": (STR, gstr("llama")),
    "llama.block_count": (U32, struct.pack("<I", 2)),
    "llama.embedding_length": (U32, struct.pack("<I", 64)),
    "llama.attention.head_count": (U32, struct.pack("<I", 4)),
    "llama.attention.head_count_kv": (U32, struct.pack("<I", 2)),
    "llama.context_length": (U32, struct.pack("<I", 512)),
    "llama.feed_forward_length": (U32, struct.pack("<I", 128)),
    "llama.rope.freq_base": (F32, struct.pack("<f", 10000.0)),
    "tokenizer.ggml.tokens": (ARR, struct.pack("<IQ", STR, 3) + gstr("a") + gstr("b") + gstr("c")),
}
tensors = [("token_embd.weight", [64, 3], 1, 64 * 3 * 2),
           ("blk.0.attn_q.weight", [64, 64], 2, 64 * 64 // 32 * 18),
           ("blk.1.attn_q.weight", [64, 64], 8, 64 * 64 // 32 * 34)]
put("model_files", "gguf-llama", b"\0" + gguf(llama, tensors))
moe = dict(llama)
moe["llama.expert_count"] = (U32, struct.pack("<I", 8))
moe["llama.expert_used_count"] = (U32, struct.pack("<I", 2))
moe["llama.expert_feed_forward_length"] = (U64, struct.pack("<Q", 32))
moe["llama.attention.head_count_kv"] = (ARR, struct.pack("<IQ", U32, 2) + struct.pack("<II", 2, 1))
put("model_files", "gguf-moe-per-layer-heads", b"\0" + gguf(moe, tensors))

config = json.dumps({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2,
    "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 512,
    "torch_dtype": "bfloat16", "tie_word_embeddings": False}).encode()
header = {"__metadata__": {"format": "pt"}}
off = 0
for name, shape in [("model.embed_tokens.weight", [100, 64]),
                    ("model.layers.0.self_attn.q_proj.weight", [64, 64]),
                    ("model.layers.1.self_attn.q_proj.weight", [64, 64]),
                    ("lm_head.weight", [100, 64])]:
    n = shape[0] * shape[1] * 2
    header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
    off += n
h = json.dumps(header).encode()
st = struct.pack("<Q", len(h)) + h + b"\0" * off
put("model_files", "safetensors-llama", b"\1" + struct.pack("<H", len(config)) + config + st)
