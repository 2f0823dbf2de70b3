#!/usr/bin/env python3
"""Writes a random-weight llama-architecture GGUF that llama.cpp loads and runs: for checks that
need a real model file without downloading one (gpu-check's `llama` section, the estimate
comparison). Needs numpy and the `gguf` package (llama.cpp's gguf-py, or .whl/py-gguf).

    write_test_gguf.py FILE [--layers 4] [--embd 512] [--heads 8] [--kv-heads 2] [--ff 1408]
                            [--vocab 2000] [--ctx 8192] [--swa 0]
"""
import argparse

import numpy as np
import gguf


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    for name, default in [("layers", 4), ("embd", 512), ("heads", 8), ("kv-heads", 2), ("ff", 1408),
                          ("vocab", 2000), ("ctx", 8192), ("swa", 0)]:
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    if a.embd % a.heads or a.heads % a.kv_heads or a.vocab < 300:
        ap.error("embd must divide by heads, heads by kv-heads, and vocab be at least 300")
    hd = a.embd // a.heads
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(a.file, "llama")
    w.add_block_count(a.layers)
    w.add_embedding_length(a.embd)
    w.add_feed_forward_length(a.ff)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_context_length(a.ctx)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    if a.swa:
        w.add_sliding_window(a.swa)
    # A byte-fallback vocabulary: every prompt tokenizes, whatever its text.
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    toks += [f"t{i}" for i in range(a.vocab - len(toks))]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * a.vocab)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (a.vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def f16(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    def ones(n):
        return np.ones(n, dtype=np.float32)

    w.add_tensor("token_embd.weight", f16(a.vocab, a.embd))
    for i in range(a.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones(a.embd))
        w.add_tensor(f"blk.{i}.attn_q.weight", f16(a.heads * hd, a.embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", f16(a.kv_heads * hd, a.embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", f16(a.kv_heads * hd, a.embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", f16(a.embd, a.heads * hd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones(a.embd))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", f16(a.ff, a.embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", f16(a.ff, a.embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", f16(a.embd, a.ff))
    w.add_tensor("output_norm.weight", ones(a.embd))
    w.add_tensor("output.weight", f16(a.vocab, a.embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
