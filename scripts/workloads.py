"""Real allocation workloads for gpu-check's replay section and its memory figures.

`python3 workloads.py NAME` runs one workload on the GPU and prints one line:
`workload NAME seconds=S peak_in_use_mib=A peak_reserved_mib=R tokens_per_s=T`.
Run it plainly (PyTorch's own allocator: the peaks are torch.cuda's) or under
`LD_PRELOAD=libhbmalloc.so PYTORCH_NO_CUDA_MEMORY_CACHING=1` (every tensor is a cudaMalloc that
hbmalloc serves: the peaks are hbmalloc's, from hbm_stats), or with `HBM_PLUGGABLE=1` and
`HBMALLOC_LIB=path/libhbmalloc.so` on PyTorch's pluggable allocator (python/hbmalloc, no preload).
With `HBMALLOC_CONF=trace:FILE` the run also leaves a trace for `peer_bench replay:FILE`.

Workloads (random weights, fixed seeds, nothing downloaded):
  train     a small transformer's training steps (batch 16, sequence 256)
  infer     the same model's inference loop over varying sequence lengths (32 to 1024)
  generate  Hugging Face `generate` on a random-weight Llama (about 1.1 B parameters, batch 8,
            128 new tokens); needs `transformers`, else it prints `workload generate skipped`
"""
import ctypes
import os
import sys
import time

import torch

PLUGGABLE = bool(os.environ.get("HBM_PLUGGABLE"))
if PLUGGABLE:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import hbmalloc
    import hbmalloc.torch

    hbmalloc.torch.enable()


class HbmStats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "in_use", "reserved", "peak_in_use", "peak_reserved", "driver_allocs", "driver_frees",
        "pool_hits", "pool_misses", "oom_retries", "syncs", "allocs", "frees")]


def peaks_mib():
    """(peak in use, peak reserved) of device 0 in MiB: hbmalloc's when preloaded or plugged in,
    else torch's."""
    if PLUGGABLE:
        s = hbmalloc.stats(0)
        assert s["allocs"] > 100, f"the pluggable allocator served only {s['allocs']} allocations"
        return (s["peak_in_use"] / 2**20, s["peak_reserved"] / 2**20)
    try:
        fn = ctypes.CDLL(None).hbm_stats
    except AttributeError:
        return (torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20)
    s = HbmStats()
    assert fn(0, ctypes.byref(s)) == 0
    return (s.peak_in_use / 2**20, s.peak_reserved / 2**20)


def transformer():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048, batch_first=True)
    return torch.nn.TransformerEncoder(layer, num_layers=6).cuda()


def train():
    model = transformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(16, 256, 512, device="cuda")
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return 0


def infer():
    model = transformer().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(60):
            n = int(torch.randint(32, 1025, (1,), generator=gen))
            model(torch.randn(8, n, 512, device="cuda"))
    torch.cuda.synchronize()
    return 0


def generate():
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("workload generate skipped: transformers is not installed")
        sys.exit(0)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.float16).eval()
    ids = torch.randint(0, cfg.vocab_size, (8, 64), device="cuda")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return (out.shape[1] - ids.shape[1]) * out.shape[0]


def main(name):
    work = {"train": train, "infer": infer, "generate": generate}[name]
    t0 = time.perf_counter()
    tokens = work()
    seconds = time.perf_counter() - t0
    used, reserved = peaks_mib()
    rate = f" tokens_per_s={tokens / seconds:.1f}" if tokens else ""
    print(f"workload {name} seconds={seconds:.3f} peak_in_use_mib={used:.0f} peak_reserved_mib={reserved:.0f}{rate}")


if __name__ == "__main__":
    main(sys.argv[1])
