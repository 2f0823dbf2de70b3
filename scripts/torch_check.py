"""PyTorch under hbmalloc: a small model's forward and backward, bit for bit.

`python3 torch_check.py leaks REPORT.txt` (under the preload) checks the leak tracking: a training
step whose tensors are all freed leaves no leak behind hbm_checkpoint(), and one tensor kept
alive is reported with its size and native frames, and with its Python line under
HBMALLOC_CONF=python_frames:acquire.

`python3 torch_check.py run OUT.pt` trains a few steps of a small conv+MLP model with a fixed seed
and deterministic kernels, and saves the loss, outputs and gradients. Run it once plainly and once
under LD_PRELOAD=libhbmalloc.so with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (every tensor is then a
cudaMalloc/cudaFree), then `python3 torch_check.py compare A.pt B.pt`.
Under the preload, `run` also asserts that hbmalloc really served the allocations.
"""
import ctypes
import gc
import os
import sys

import torch


class HbmStats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "in_use", "reserved", "peak_in_use", "peak_reserved", "driver_allocs", "driver_frees",
        "pool_hits", "pool_misses", "oom_retries", "syncs", "allocs", "frees")]


def hbm_stats():
    """hbmalloc's statistics for device 0, or None when it is not loaded."""
    lib = ctypes.CDLL(None)
    try:
        fn = lib.hbm_stats
    except AttributeError:
        return None
    stats = HbmStats()
    assert fn(0, ctypes.byref(stats)) == 0
    return stats


def run(path):
    # HBM_PLUGGABLE=1 (with HBMALLOC_LIB): hbmalloc as PyTorch's pluggable allocator, no preload.
    pluggable = bool(os.environ.get("HBM_PLUGGABLE"))
    if pluggable:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
        import hbmalloc.torch
        hbmalloc.torch.enable()
    torch.manual_seed(1234)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    dev = torch.device("cuda")
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(32 * 16 * 16, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10),
    ).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(64, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (64,), device=dev)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    torch.cuda.synchronize()
    result = {
        "losses": torch.stack(losses).cpu(),
        "out": out.detach().cpu(),
        "grads": [p.grad.detach().cpu() for p in model.parameters()],
        "params": [p.detach().cpu() for p in model.parameters()],
    }
    torch.save(result, path)
    stats = hbm_stats()
    if pluggable:
        import hbmalloc
        s = hbmalloc.stats(0)
        assert s["allocs"] > 100, f"the pluggable allocator served only {s['allocs']} allocations"
        print(f"torch_check: pluggable hbmalloc served {s['allocs']} allocs, {s['frees']} frees, "
              f"hits {s['pool_hits']}, driver allocs {s['driver_allocs']}, syncs {s['syncs']}, "
              f"peak reserved {s['peak_reserved'] >> 20} MiB")
    elif "libhbmalloc" in os.environ.get("LD_PRELOAD", ""):
        assert stats is not None, "hbmalloc preloaded but hbm_stats not found"
        assert stats.allocs > 100, f"hbmalloc served only {stats.allocs} allocations"
        print(f"torch_check: hbmalloc served {stats.allocs} allocs, {stats.frees} frees, "
              f"hits {stats.pool_hits}, driver allocs {stats.driver_allocs}, syncs {stats.syncs}, "
              f"peak reserved {stats.peak_reserved >> 20} MiB")
    print(f"torch_check: final loss {losses[-1].item():.6f}")


def leaks(report_path):
    lib = ctypes.CDLL(None)
    lib.hbm_checkpoint.restype = ctypes.c_uint64
    lib.hbm_leaks_since.argtypes = [ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64),
                                    ctypes.POINTER(ctypes.c_uint64)]
    lib.hbm_report_leaks.argtypes = [ctypes.c_char_p]

    def since(mark):
        b, n = ctypes.c_uint64(), ctypes.c_uint64()
        assert lib.hbm_leaks_since(mark, ctypes.byref(b), ctypes.byref(n)) == 0
        return b.value, n.value

    dev = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10)).to(dev)

    def step():
        x = torch.randn(256, 512, device=dev)
        loss = model(x).square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # library workspaces (cuBLAS) are created once, here
    torch.cuda.synchronize()
    mark = lib.hbm_checkpoint()
    for _ in range(3):
        step()
    gc.collect()
    torch.cuda.synchronize()
    clean = since(mark)
    mark = lib.hbm_checkpoint()
    kept = torch.empty(3 << 20, dtype=torch.uint8, device=dev); line = sys._getframe().f_lineno  # noqa: E702,F841 the deliberate leak
    leaked = since(mark)
    assert lib.hbm_report_leaks(report_path.encode()) == 0
    report = open(report_path).read()
    print(f"torch_check: after freed steps: {clean[1]} leaks ({clean[0]} bytes); "
          f"kept tensor: {leaked[1]} leak ({leaked[0]} bytes)")
    assert clean == (0, 0), f"a step that frees everything leaked {clean}"
    assert leaked[1] == 1 and leaked[0] == 3 << 20, leaked
    assert "LEAK SUMMARY" in report and "3145728 bytes (3.0 MiB) in 1 allocation" in report, report[:2000]
    native = [ln for ln in report.splitlines() if "#0" in ln and "3.0 MiB" not in ln]
    print("torch_check: report frames: " + " | ".join(ln.strip() for ln in native[:3]))
    # With python_frames:acquire (gpu-check.sh sets it) the kept tensor's Python line is named.
    if "python_frames:acquire" in os.environ.get("HBMALLOC_CONF", ""):
        assert f"{__file__}:{line}" in report, f"no {__file__}:{line} in the report: {report[:2000]}"
        print(f"torch_check: kept tensor reported at {__file__}:{line}")


def compare(a, b):
    ra, rb = torch.load(a), torch.load(b)
    same = torch.equal(ra["losses"], rb["losses"]) and torch.equal(ra["out"], rb["out"])
    same = same and all(torch.equal(x, y) for x, y in zip(ra["grads"], rb["grads"]))
    same = same and all(torch.equal(x, y) for x, y in zip(ra["params"], rb["params"]))
    print(f"torch_check: results identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2])
    elif sys.argv[1] == "leaks":
        leaks(sys.argv[2])
    else:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
