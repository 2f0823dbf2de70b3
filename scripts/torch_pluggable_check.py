"""PyTorch on hbmalloc's pluggable allocator (python/hbmalloc, no LD_PRELOAD), on a GPU.

    HBMALLOC_LIB=gpu-stage/libhbmalloc.so python3 scripts/torch_pluggable_check.py all OUTDIR

Each check runs in a child process of its own (PyTorch chooses its allocator once per process),
prints one line starting with "pluggable_check:" per result, and the run exits 1 if any failed:
- train / infer: a training loop (a small transformer, AdamW, sequence lengths that vary every
  step) and an inference loop (varying batch and sequence lengths, a growing cache tensor) give
  results bit for bit identical to PyTorch's own allocator; step times (median) and peak reserved
  memory of both allocators, from interleaved rounds (torch, hbm, hbm, torch, ...).
- leak: a tensor kept alive on purpose is reported (leak report and JSON) with this file and the
  line that allocated it.
- viz: a snapshot dumped with a timeline on renders with `python -m torch.cuda._memory_viz`
  trace_plot and segment_plot.
- graph: CUDA graph capture under hbmalloc.torch.enable() and into hbmalloc.torch.pool() works:
  the capture is served by hbmalloc, 20 replays on new inputs each equal eager, and tensors
  allocated while the graph lives never share its memory.
- oom: an allocation larger than the device: hbm_torch_malloc releases its cache and returns
  NULL (counted in num_ooms), and PyTorch raises torch.OutOfMemoryError, with
  hbmalloc.torch.enable() (through its C++ shim, which throws PyTorch's OutOfMemoryError) and
  (PyTorch 2.5+) inside `torch.cuda.use_mem_pool(hbmalloc.torch.pool())`. A tensor at address 0
  instead fails the check and says so.
Set CUBLAS_WORKSPACE_CONFIG=:4096:8 (gpu-check.sh does) for deterministic cuBLAS.
"""
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
ROUNDS = 3
REPLAYS = 20
TAG = "pluggable_check:"


def use_allocator(alloc):
    """Makes `alloc` ('torch' or 'hbm') this process's CUDA allocator; returns torch."""
    if alloc == "hbm":
        import hbmalloc.torch
        hbmalloc.torch.enable()
    import torch
    torch.manual_seed(1234)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    return torch


def peak_reserved(torch, alloc):
    if alloc == "hbm":
        import hbmalloc
        return hbmalloc.stats(0)["peak_reserved"]
    return torch.cuda.max_memory_reserved(0)


def make_model(torch, dim=256):
    layers = [torch.nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
              for _ in range(3)]
    return torch.nn.Sequential(*layers, torch.nn.Linear(dim, 1000)).cuda()


def train(alloc, out):
    torch = use_allocator(alloc)
    model = make_model(torch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator(device="cuda").manual_seed(7)
    losses, times = [], []
    for step, seq in enumerate([17, 64, 129, 256, 33, 200, 96, 5, 255, 128] * 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = torch.randn(8, seq, 256, device="cuda", generator=gen)
        y = torch.randint(0, 1000, (8, seq), device="cuda", generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    torch.save({"losses": torch.stack(losses).cpu(),
                "params": [p.detach().cpu() for p in model.parameters()]}, out)
    return times[3:], peak_reserved(torch, alloc)


def infer(alloc, out):
    torch = use_allocator(alloc)
    model = make_model(torch).eval()
    gen = torch.Generator(device="cuda").manual_seed(11)
    outputs, times = [], []
    with torch.no_grad():
        for batch, seq in [(1, 7), (4, 300), (16, 33), (2, 511), (8, 128), (1, 1024), (32, 16)] * 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            x = torch.randn(batch, seq, 256, device="cuda", generator=gen)
            cache = torch.empty(batch, 0, 256, device="cuda")
            for chunk in x.split(64, dim=1):  # a cache that grows as a prompt is consumed
                cache = torch.cat([cache, chunk], dim=1)
                logits = model(cache)[:, -1]
            outputs.append(logits.softmax(-1).cpu())
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    torch.save({"outputs": outputs}, out)
    return times[3:], peak_reserved(torch, alloc)


def leak(_alloc, _out):
    torch = use_allocator("hbm")
    import hbmalloc
    mark = hbmalloc.checkpoint()
    kept = torch.empty(3 << 20, dtype=torch.uint8, device="cuda"); line = sys._getframe().f_lineno  # noqa: E702
    ptr = kept.data_ptr()
    doc = hbmalloc.report_json()
    (site,) = [s for s in doc["sites"] if any(int(a["ptr"], 16) == ptr for a in s["allocations"])]
    frames = site["python_frames"]
    assert frames, f"no Python frames for the kept tensor: {site['frames'][:3]}"
    assert (frames[0]["file"], frames[0]["line"]) == (__file__, line), frames[:3]
    path = os.path.join(os.environ["CHECK_OUT"], "leak-report.txt")
    hbmalloc.report(path)
    text = open(path).read()
    assert f"{__file__}:{line}" in text, text[:3000]
    nbytes, count = hbmalloc.leaks(mark)
    assert count == 1 and nbytes >= 3 << 20, (nbytes, count)
    print(f"{TAG} leak: kept tensor reported at {os.path.basename(__file__)}:{line} "
          f"({frames[0]['function']}), {len(frames)} Python frames")


def viz(_alloc, _out):
    torch = use_allocator("hbm")
    import hbmalloc
    model = make_model(torch)
    for seq in (16, 64, 32):
        model(torch.randn(4, seq, 256, device="cuda")).sum().backward()
    kept = torch.empty(1 << 20, device="cuda")  # noqa: F841, shows as a live block
    path = os.path.join(os.environ["CHECK_OUT"], "snapshot.pickle")
    hbmalloc.dump_snapshot(path)
    snap = hbmalloc.snapshot()
    assert snap["device_traces"][0], "timeline on, but no trace entries"
    mine = [b for s in snap["segments"] for b in s["blocks"]
            if b["frames"] and b["frames"][0]["filename"] == __file__]
    assert mine, "no block names this file"
    for kind in ("trace_plot", "segment_plot"):
        html = os.path.join(os.environ["CHECK_OUT"], f"{kind}.html")
        r = subprocess.run([sys.executable, "-m", "torch.cuda._memory_viz", kind, path, "-o", html],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        size = os.path.getsize(html)
        assert size > 1000 and "snapshot.pickle" in open(html).read(), size
        print(f"{TAG} viz: {kind} rendered {size} bytes from {len(snap['device_traces'][0])} "
              f"trace entries, {len(snap['segments'])} segments")


def graph(alloc, _out):
    """alloc 'hbm': capture under hbmalloc.torch.enable() (the shim passes PyTorch's graph hooks
    on); 'pool': PyTorch's own allocator capturing into hbmalloc.torch.pool(). A small forward
    pass is captured, replayed REPLAYS times on new inputs, each replay equal to eager; tensors
    allocated after the capture must not land in the graph's memory."""
    torch = use_allocator("hbm" if alloc == "hbm" else "torch")
    import hbmalloc
    import hbmalloc.torch
    if alloc == "hbm" and hbmalloc.torch.shim_missing:
        raise AssertionError(f"no shim: {hbmalloc.torch.shim_missing}")
    if alloc == "pool" and not hasattr(torch.cuda, "MemPool"):
        print(f"{TAG} graph pool: skipped, torch {torch.__version__} has no MemPool")
        return
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.GELU(),
                                torch.nn.Linear(512, 512)).cuda().eval()
    static_x = torch.randn(64, 512, device="cuda")
    pool = hbmalloc.torch.pool() if alloc == "pool" else None
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model(static_x)
        torch.cuda.current_stream().wait_stream(side)
        before = hbmalloc.stats(0)["allocs"]
        g = torch.cuda.CUDAGraph()
        if pool is not None:
            # graph(pool=...) itself routes the capture's allocations into the pool (inside
            # use_mem_pool as well, PyTorch 2.11 refused: "already recording to mempool_id").
            with torch.cuda.graph(g, pool=pool.id):
                static_y = model(static_x)
        else:
            with torch.cuda.graph(g):
                static_y = model(static_x)
        served = hbmalloc.stats(0)["allocs"] - before
        assert served > 0, "the capture allocated nothing from hbmalloc"
        graph_ptr = static_y.data_ptr()
        for i in range(REPLAYS):
            new_x = torch.randn(64, 512, device="cuda")
            static_x.copy_(new_x)
            g.replay()
            # Allocated while the graph lives: must not be the graph's memory.
            other = torch.full((64, 512), float(i), device="cuda")
            eager = model(new_x)
            torch.cuda.synchronize()
            assert other.data_ptr() != graph_ptr
            assert torch.equal(static_y, eager), f"replay {i} differs from eager"
            assert torch.equal(other, torch.full_like(other, float(i))), "graph wrote other memory"
        del g, static_y
        torch.cuda.synchronize()
        assert torch.ones(1 << 20, device="cuda").sum().item() == 1 << 20
    print(f"{TAG} graph {alloc}: capture works ({served} allocations from hbmalloc); "
          f"{REPLAYS} replays equal eager")


def oom(alloc, _out):
    """alloc 'hbm': hbmalloc.torch.enable(); 'pool': PyTorch's own allocator, with
    hbmalloc.torch.pool() around the allocation (its segments come from hbm_torch_malloc)."""
    torch = use_allocator("hbm" if alloc == "hbm" else "torch")
    import hbmalloc
    import hbmalloc.torch
    if alloc == "pool" and not hasattr(torch.cuda, "MemPool"):
        print(f"{TAG} oom pool: skipped, torch {torch.__version__} has no MemPool")
        return
    total = torch.cuda.get_device_properties(0).total_memory
    before = hbmalloc.memory_stats()["num_ooms"]
    pool = hbmalloc.torch.pool() if alloc == "pool" else None
    try:
        if pool is not None:
            with torch.cuda.use_mem_pool(pool):
                held = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # noqa: F841
                x = torch.empty(2 * total, dtype=torch.uint8, device="cuda")
        else:
            held = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # noqa: F841
            x = torch.empty(2 * total, dtype=torch.uint8, device="cuda")
        raise AssertionError(f"{alloc}: no error; tensor at {x.data_ptr():#x} (PyTorch "
                             f"{torch.__version__} did not check the allocator's NULL)")
    except torch.OutOfMemoryError as e:
        print(f"{TAG} oom {alloc}: torch.OutOfMemoryError: {' '.join(str(e).split())[:160]}")
    after = hbmalloc.memory_stats()["num_ooms"]
    assert after > before, (before, after)
    y = torch.ones(64 << 20, dtype=torch.uint8, device="cuda")
    assert y.sum().item() == 64 << 20, "allocations after the OOM work"
    print(f"{TAG} oom {alloc}: hbm_torch_malloc returned NULL {after - before} times; "
          "allocating afterwards works")


def child(args):
    fn = {"train": train, "infer": infer, "leak": leak, "viz": viz, "graph": graph, "oom": oom}
    kind, alloc, out = args
    result = fn[kind](alloc, out)
    if result is not None:
        times, peak = result
        print(json.dumps({"median_s": statistics.median(times), "peak_reserved": peak}))


def spawn(kind, alloc, out, extra_conf=""):
    env = dict(os.environ)
    env["HBMALLOC_CONF"] = "leak_report:off" + extra_conf
    # In the output folder: a timeline is written to the working directory at exit.
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "child", kind, alloc, out],
                       env=env, cwd=env["CHECK_OUT"], capture_output=True, text=True, timeout=600)
    return r


def main(outdir):
    import torch
    os.makedirs(outdir, exist_ok=True)
    os.environ["CHECK_OUT"] = os.path.abspath(outdir)
    failed = 0

    def fail(what, r):
        nonlocal failed
        failed = 1
        tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-6:])
        print(f"{TAG} {what}: FAIL (rc {r.returncode}): {tail}")

    for kind in ("train", "infer"):
        stats = {"torch": [], "hbm": []}
        for rnd in range(ROUNDS):
            order = ("torch", "hbm") if rnd % 2 == 0 else ("hbm", "torch")
            for alloc in order:
                out = os.path.join(os.environ["CHECK_OUT"], f"{kind}-{alloc}-{rnd}.pt")
                r = spawn(kind, alloc, out)
                if r.returncode != 0:
                    fail(f"{kind} {alloc}", r)
                    continue
                stats[alloc].append(json.loads(r.stdout.strip().splitlines()[-1]))
        if not (stats["torch"] and stats["hbm"]):
            continue
        ref = torch.load(os.path.join(outdir, f"{kind}-torch-0.pt"))
        same = True
        for rnd in range(ROUNDS):
            path = os.path.join(outdir, f"{kind}-hbm-{rnd}.pt")
            if os.path.exists(path):
                got = torch.load(path)
                same = same and all(torch.equal(a, b) for key in ref
                                    for a, b in zip(ref[key], got[key]))
        line = ", ".join(
            f"{alloc} step {1e3 * statistics.median(s['median_s'] for s in stats[alloc]):.2f} ms "
            f"peak reserved {max(s['peak_reserved'] for s in stats[alloc]) >> 20} MiB"
            for alloc in ("torch", "hbm"))
        print(f"{TAG} {kind}: identical to PyTorch's allocator: {same}; {line}")
        if not same:
            failed = 1
    for kind, alloc, conf in (("leak", "hbm", ""), ("viz", "hbm", ",timeline:200000"),
                              ("graph", "hbm", ""), ("graph", "pool", ""), ("oom", "hbm", ""),
                              ("oom", "pool", "")):
        r = spawn(kind, alloc, "-", conf)
        for line in r.stdout.splitlines():
            if line.startswith(TAG):
                print(line)
        if r.returncode != 0:
            fail(f"{kind} {alloc}", r)
    print(f"{TAG} {'FAILED' if failed else 'all passed'}")
    return failed


if __name__ == "__main__":
    if sys.argv[1] == "child":
        child(sys.argv[2:])
    else:
        sys.exit(main(sys.argv[2]))
