"""torch.distributed with NCCL under hbmalloc: one process per GPU, an all-reduce and a few
DistributedDataParallel steps, plainly and under LD_PRELOAD=libhbmalloc.so with PyTorch's caching
off (every tensor a cudaMalloc/cudaFree). Checks: each rank's results are bit for bit those of the
plain run; hbmalloc served each rank on that rank's own device; each process's leak report is its
own (a rank keeps a tensor of a size only it uses, and only its report names that size).

    python3 torch_distributed_check.py LIB OUTDIR [WORLD]     WORLD: default, every visible GPU

On one GPU this runs with one rank: NCCL then reduces over one process, which still exercises its
buffers and communicator under the preload, but not the cross-device paths (those need two GPUs).
NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0), as the machines it runs on require.
"""
import ctypes
import os
import socket
import subprocess
import sys

KEPT_BYTES = 3 << 20  # rank r keeps (r + 1) * KEPT_BYTES + r * 4096 bytes alive at exit


def kept_bytes(rank):
    return (rank + 1) * KEPT_BYTES + rank * 4096


class HbmStats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "in_use", "reserved", "peak_in_use", "peak_reserved", "driver_allocs", "driver_frees",
        "pool_hits", "pool_misses", "oom_retries", "syncs", "allocs", "frees")]


def child(out_path):
    import torch
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=dev)
    # All-reduce of values exact in float32: the sum over ranks is known.
    t = torch.arange(1 << 20, dtype=torch.float32, device=dev) * (rank + 1)
    dist.all_reduce(t)
    want = torch.arange(1 << 20, dtype=torch.float32, device=dev) * (world * (world + 1) // 2)
    assert torch.equal(t, want), "all-reduce gave a wrong sum"
    # Data-parallel steps: same initial weights on every rank, each rank its own data.
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10)).to(dev)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local])
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    gen = torch.Generator(device=dev).manual_seed(100 + rank)
    losses = []
    for _ in range(5):
        x = torch.randn(64, 256, device=dev, generator=gen)
        y = torch.randint(0, 10, (64,), device=dev, generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    torch.cuda.synchronize()
    torch.save({"allreduce": t.cpu(), "losses": torch.stack(losses).cpu(),
                "params": [p.detach().cpu() for p in model.parameters()]}, out_path)
    lib = ctypes.CDLL(None)
    if "libhbmalloc" in os.environ.get("LD_PRELOAD", ""):
        stats = HbmStats()
        assert lib.hbm_stats(local, ctypes.byref(stats)) == 0
        assert stats.allocs > 20, f"rank {rank}: hbmalloc served only {stats.allocs} allocations on device {local}"
        print(f"distributed_check: rank {rank} device {local}: hbmalloc served {stats.allocs} allocs, "
              f"peak reserved {stats.peak_reserved >> 20} MiB", flush=True)
    dist.destroy_process_group()
    # The deliberate leak: alive at exit, so it is in this process's report only. A reference
    # no one drops (Py_IncRef): a module global would be freed as the interpreter shuts down,
    # before hbmalloc's exit report, and the report would rightly not list it.
    kept = torch.empty(kept_bytes(rank), dtype=torch.uint8, device=dev)
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(kept))


def launch(lib, out, world, preload):
    mode = "hbmalloc" if preload else "plain"
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NCCL_NVLS_ENABLE="0")
        if preload:
            # The full report with backtraces (the defaults): leaks are grouped by call stack, so
            # the kept tensor is a group of its own with its size; a summary would only total.
            env.update(LD_PRELOAD=lib, PYTORCH_NO_CUDA_MEMORY_CACHING="1",
                       HBMALLOC_CONF=f"report_path:{out}/leaks-rank{rank}.txt")
        log = open(f"{out}/{mode}-rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, __file__, "child", f"{out}/{mode}-rank{rank}.pt"],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=240) for p in procs]
    for rank, code in enumerate(codes):
        if code != 0:
            tail = open(f"{out}/{mode}-rank{rank}.log").read()[-1500:]
            sys.exit(f"distributed_check: {mode} rank {rank} exited {code}:\n{tail}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(lib, out, world):
    import torch
    os.makedirs(out, exist_ok=True)
    world = world or torch.cuda.device_count()
    launch(lib, out, world, preload=False)
    launch(lib, out, world, preload=True)
    failures = []
    for rank in range(world):
        a, b = torch.load(f"{out}/plain-rank{rank}.pt"), torch.load(f"{out}/hbmalloc-rank{rank}.pt")
        same = torch.equal(a["allreduce"], b["allreduce"]) and torch.equal(a["losses"], b["losses"])
        same = same and all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
        if not same:
            failures.append(f"rank {rank}: results differ from the plain run")
        report = open(f"{out}/leaks-rank{rank}.txt").read()
        mine = f"{kept_bytes(rank)} bytes"
        others = [f"{kept_bytes(r)} bytes" for r in range(world) if r != rank]
        if mine not in report or any(o in report for o in others):
            failures.append(f"rank {rank}: its report does not name its own kept tensor alone "
                            f"(want {mine}): {report[:400]!r}")
        print(open(f"{out}/hbmalloc-rank{rank}.log").read().strip())
    if failures:
        sys.exit("distributed_check: FAILED: " + "; ".join(failures))
    print(f"distributed_check: {world} rank(s), NCCL all-reduce and 5 DDP steps identical with and "
          f"without hbmalloc; each rank's leak report names its own kept tensor only")


if __name__ == "__main__":
    if sys.argv[1] == "child":
        child(sys.argv[2])
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
