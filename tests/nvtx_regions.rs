//! NVTX memory annotations (`hbmalloc::nvtx`) seen by a tool: a fake injection library
//! (c_tests/nvtx_fake_injection.c, built here with the system C compiler) is named in
//! `NVTX_INJECTION64_PATH`, checks each call as compute-sanitizer does and logs it. By default it
//! lays its functions out as CUDA 13.0's compute-sanitizer did on an H200 (callback id c in slot
//! c-1); `FAKE_NVTX_LAYOUT=published` as the NVTX header reads them (slot c). Each test runs its
//! scenario in a child process (the variable is read once per process) on the simulated device,
//! then checks the log against the pointers the child printed.

use hbmalloc::backend::DevicePtr;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const CHILD: &str = "HBM_NVTX_TEST_CHILD";
const CONF: &str = "backend:sim,backtrace:off,leak_report:off,nvtx:on";

fn fake_tool() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("c_tests/nvtx_fake_injection.c");
        let lib = Path::new(env!("CARGO_TARGET_TMPDIR")).join("libnvtx_fake_injection.so");
        let out = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
            .arg(&lib)
            .arg(&src)
            .output()
            .expect("a C compiler (cc) builds the fake NVTX tool");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        lib
    })
}

struct Run {
    /// The tool's log, one call a line (empty if it never wrote one).
    log: Vec<String>,
    /// What the child printed as `name=0x..` lines.
    vars: HashMap<String, usize>,
    stderr: String,
}

/// Runs test `name` of this binary alone in a child, with the fake tool attached when `tool`,
/// and `extra` in its environment.
fn run_child(name: &str, tool: bool, extra: &[(&str, &str)]) -> Run {
    // One log per run: several tests run the same child at once, with different tools.
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nvtx-{name}-{n}.log"));
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("HBMALLOC_CONF", CONF)
        .env("FAKE_NVTX_LOG", &log)
        .env_remove("NVTX_INJECTION64_PATH")
        .env_remove("FAKE_NVTX_REFUSE");
    if tool {
        cmd.env("NVTX_INJECTION64_PATH", fake_tool());
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = output_within(cmd, std::time::Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("1 passed"),
        "the child ran no test: {stdout}"
    );
    let vars = stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        // The harness's "test NAME ... " may precede the first line on the same line.
        .filter_map(|(k, v)| Some((k.rsplit(' ').next()?.to_string(), parse_hex(v.trim())?)))
        .collect();
    let log = std::fs::read_to_string(&log)
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default();
    Run { log, vars, stderr }
}

/// Runs `cmd` to completion, killing it after `limit`: a child that deadlocks fails its test
/// (with what it printed) instead of hanging the suite.
fn output_within(mut cmd: Command, limit: std::time::Duration) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the child ran past {limit:?} (deadlocked?): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn is_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

fn parse_hex(s: &str) -> Option<usize> {
    usize::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

fn show(name: &str, v: usize) {
    println!("{name}={v:#x}");
}

/// A heap the log registered: its id, range and name.
#[derive(Debug, Clone)]
struct LoggedHeap {
    id: String,
    base: usize,
    size: usize,
    name: String,
}

impl Run {
    fn var(&self, k: &str) -> usize {
        self.vars[k]
    }

    fn heaps(&self) -> Vec<LoggedHeap> {
        self.log
            .iter()
            .filter_map(|l| l.strip_prefix("heap_register "))
            .map(|rest| {
                let f: Vec<&str> = rest.splitn(4, ' ').collect();
                LoggedHeap {
                    id: f[0].to_string(),
                    base: parse_hex(f[1]).unwrap(),
                    size: f[2].parse().unwrap(),
                    name: f[3].to_string(),
                }
            })
            .collect()
    }

    fn heap_holding(&self, ptr: usize) -> LoggedHeap {
        self.heaps()
            .into_iter()
            .rev()
            .find(|h| h.base <= ptr && ptr < h.base + h.size)
            .unwrap_or_else(|| panic!("no heap holds {ptr:#x}: {:#?}", self.log))
    }

    fn count(&self, line: &str) -> usize {
        self.log.iter().filter(|l| *l == line).count()
    }

    fn assert_clean(&self) {
        assert!(
            self.log.iter().all(|l| !l.starts_with("bad")),
            "the tool saw a malformed call: {:#?}",
            self.log
        );
        // The first call, the tool's own call-backs (FAKE_NVTX_REENTER) aside, creates our domain.
        assert_eq!(
            self.log
                .iter()
                .find(|l| !l.starts_with("reenter"))
                .map(String::as_str),
            Some("domain hbmalloc")
        );
        assert_eq!(self.count("attached"), 1, "{:#?}", self.log);
    }

    /// Every heap registered is unregistered by the end.
    fn assert_all_heaps_gone(&self) {
        for h in self.heaps() {
            assert_eq!(
                self.count(&format!("heap_unregister {}", h.id)),
                1,
                "{h:?}: {:#?}",
                self.log
            );
        }
    }
}

fn region(heap: &LoggedHeap, ptr: DevicePtr, size: usize) -> String {
    format!("region_register {} {ptr:#x} {size}", heap.id)
}

fn unregion(ptr: DevicePtr) -> String {
    format!("region_unregister {ptr:#x}")
}

/// `cudaMalloc` blocks are regions of the size asked for, in the caching-pool chunk that holds
/// them; `cudaFree` unregisters them; a chunk going back to the driver (`hbm_trim`) is
/// unregistered as a heap.
#[test]
fn cuda_malloc_blocks_are_regions_of_their_chunk() {
    if is_child() {
        use hbmalloc::ffi::cuda_api::{cudaFree, cudaMalloc};
        let (mut p, mut q) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: valid out-pointers; the blocks are freed below.
        unsafe {
            assert_eq!(cudaMalloc(&mut p, 4000), 0);
            assert_eq!(cudaMalloc(&mut q, 3 << 20), 0);
            assert_eq!(cudaFree(p), 0);
            assert_eq!(cudaFree(q), 0);
        }
        show("p", p as usize);
        show("q", q as usize);
        hbmalloc::runtime::pool(0).unwrap().trim().unwrap();
        return;
    }
    // Before the layout was read from the tool, the calls reached the wrong functions here:
    // "bad heap_unregister: ... is no heap" and "bad unexpected nvtxMemRegionsResize", where the
    // real tool printed "Call to nvtxMemHeapUnregister failed" and crashed.
    let run = run_child("cuda_malloc_blocks_are_regions_of_their_chunk", true, &[]);
    assert_cuda_malloc_run(&run);
}

/// A tool that puts its functions where the NVTX header reads them (callback id c in slot c) is
/// read there: the same calls, the same log.
#[test]
fn tools_of_the_published_slot_layout_are_read_at_theirs() {
    let run = run_child(
        "cuda_malloc_blocks_are_regions_of_their_chunk",
        true,
        &[("FAKE_NVTX_LAYOUT", "published")],
    );
    assert_cuda_malloc_run(&run);
}

/// What the `cudaMalloc` scenario must have told the tool.
fn assert_cuda_malloc_run(run: &Run) {
    run.assert_clean();
    let (p, q) = (run.var("p"), run.var("q"));
    let hp = run.heap_holding(p);
    assert_eq!(hp.name, "hbmalloc caching pool chunk");
    assert_eq!(run.count(&region(&hp, p, 4000)), 1, "{:#?}", run.log);
    assert_eq!(run.count(&region(&run.heap_holding(q), q, 3 << 20)), 1);
    assert_eq!(run.count(&unregion(p)), 1);
    assert_eq!(run.count(&unregion(q)), 1);
    // Registered before handed out, unregistered before given back.
    let at = |l: &str| run.log.iter().position(|x| x == l).unwrap();
    assert!(
        at(&format!(
            "heap_register {} {:#x} {} {}",
            hp.id, hp.base, hp.size, hp.name
        )) < at(&region(&hp, p, 4000))
    );
    assert!(at(&region(&hp, p, 4000)) < at(&unregion(p)));
    assert!(at(&unregion(p)) < at(&format!("heap_unregister {}", hp.id)));
    run.assert_all_heaps_gone();
}

/// A heap the tool refuses (NULL back from `nvtxMemHeapRegister`) is not booked: no region is
/// registered in it (NULL would be the process-wide heap) and it is never unregistered (the real
/// tool refuses `nvtxMemHeapUnregister(NULL)`); one line on stderr says so.
#[test]
fn heaps_the_tool_refuses_get_no_regions_and_no_unregister() {
    let run = run_child(
        "cuda_malloc_blocks_are_regions_of_their_chunk",
        true,
        // The published layout, so that this checks the refused handle alone.
        &[
            ("FAKE_NVTX_REJECT_HEAPS", "1"),
            ("FAKE_NVTX_LAYOUT", "published"),
        ],
    );
    assert!(
        run.log.iter().all(|l| !l.starts_with("bad")),
        "{:#?}",
        run.log
    );
    assert!(
        run.log.iter().any(|l| l.starts_with("heap_refused")),
        "{:#?}",
        run.log
    );
    assert!(
        run.log
            .iter()
            .all(|l| !l.starts_with("region_") && !l.starts_with("heap_unregister")),
        "{:#?}",
        run.log
    );
    let lines: Vec<_> = run
        .stderr
        .lines()
        .filter(|l| l.contains("refused the heap"))
        .collect();
    assert_eq!(lines.len(), 1, "{}", run.stderr);
}

/// The tool calls back into CUDA from its initialization and from a heap registration (as one
/// that allocates device memory there would, reaching our hooks): the nested calls are served,
/// unannotated, and nothing deadlocks (the look-up in progress, the book's lock). Their blocks
/// (8 MiB: a chunk of their own, apart from the program's 4000 bytes) are no regions.
#[test]
fn a_tool_calling_back_into_cuda_neither_deadlocks_nor_recurses() {
    use hbmalloc::ffi::cuda_api::{cudaFree, cudaMalloc};
    const NESTED: usize = 8 << 20;
    extern "C" fn reenter() {
        let mut p = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; freed right away.
        unsafe {
            assert_eq!(cudaMalloc(&mut p, NESTED), 0);
            assert_eq!(cudaFree(p), 0);
        }
    }
    if is_child() {
        std::env::set_var(
            "FAKE_NVTX_REENTER",
            format!("{:#x}", reenter as *const () as usize),
        );
        let mut p = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; freed below.
        unsafe {
            assert_eq!(cudaMalloc(&mut p, 4000), 0);
            assert_eq!(cudaFree(p), 0);
        }
        show("p", p as usize);
        return;
    }
    let run = run_child(
        "a_tool_calling_back_into_cuda_neither_deadlocks_nor_recurses",
        true,
        &[],
    );
    run.assert_clean();
    for at in ["InitializeInjectionNvtx2", "heap_register"] {
        assert!(
            run.count(&format!("reentered {at}")) >= 1,
            "{at}: {:#?}",
            run.log
        );
    }
    let p = run.var("p");
    assert_eq!(
        run.count(&region(&run.heap_holding(p), p, 4000)),
        1,
        "{:#?}",
        run.log
    );
    assert_eq!(run.count(&unregion(p)), 1, "{:#?}", run.log);
    assert!(
        run.log.iter().all(|l| !l.ends_with(&format!(" {NESTED}"))),
        "the tool's own blocks are not annotated: {:#?}",
        run.log
    );
}

/// Scratch-pool blocks (both kinds) are regions of the size asked for, not the `actual` size the
/// pool rounds to; destroying the pool unregisters its heaps.
#[test]
fn scratch_pool_blocks_are_regions_of_their_pool() {
    use hbmalloc::pool::{ScratchKind, ScratchOptions, ScratchPool};
    use hbmalloc::tracked::scratch;
    if is_child() {
        for (kind, name) in [(ScratchKind::Legacy, "legacy"), (ScratchKind::Vmm, "vmm")] {
            let backend = hbmalloc::runtime::backend(0).unwrap();
            let options = ScratchOptions {
                reserve_size: 64 << 20,
                ..ScratchOptions::default()
            };
            let pool = ScratchPool::new(backend, kind, options).unwrap();
            let (a, actual_a) = scratch::alloc(&pool, 1000).unwrap();
            let (b, _) = scratch::alloc(&pool, 5000).unwrap();
            assert!(actual_a > 1000, "the pool rounds up");
            scratch::free(&pool, a, actual_a).unwrap();
            show(&format!("{name}_a"), a);
            show(&format!("{name}_b"), b);
            // Destroyed with `b` live: its region goes with the heap.
            scratch::forget_pool(&pool);
            drop(pool);
        }
        return;
    }
    let run = run_child("scratch_pool_blocks_are_regions_of_their_pool", true, &[]);
    run.assert_clean();
    for kind in ["legacy", "vmm"] {
        let (a, b) = (run.var(&format!("{kind}_a")), run.var(&format!("{kind}_b")));
        let (ha, hb) = (run.heap_holding(a), run.heap_holding(b));
        assert_eq!(ha.name, "hbmalloc scratch pool", "{kind}");
        assert_eq!(
            run.count(&region(&ha, a, 1000)),
            1,
            "{kind}: {:#?}",
            run.log
        );
        assert_eq!(
            run.count(&region(&hb, b, 5000)),
            1,
            "{kind}: {:#?}",
            run.log
        );
        assert_eq!(run.count(&unregion(a)), 1, "{kind}");
        assert_eq!(run.count(&unregion(b)), 0, "{kind}: dropped with its heap");
    }
    run.assert_all_heaps_gone();
}

/// A KV cache's tensors are heaps; each bound sequence's rows (its slot, `capacity` rows) are a
/// region of each tensor, resized as the sequence grows, gone when it is released; destroying the
/// cache unregisters the heaps. Under realloc growth every buffer is a whole allocation: no heaps.
#[test]
fn kv_cache_sequences_are_regions_of_their_tensors() {
    use hbmalloc::kv::cache::{Growth, KvParams};
    use hbmalloc::kv::types::HbmType;
    use hbmalloc::tracked::kv;
    if is_child() {
        for growth in [Growth::Vmm, Growth::Realloc] {
            let params = KvParams {
                n_layer: 2,
                n_head_kv: 8,
                head_dim: 128,
                n_ctx_max: 4096,
                n_seq_max: 2,
                type_k: HbmType::F16,
                type_v: HbmType::F16,
                growth,
            };
            let backend = hbmalloc::runtime::backend(0).unwrap();
            let cache = kv::create(backend, params, 0).unwrap();
            let g = if growth == Growth::Vmm {
                "vmm"
            } else {
                "realloc"
            };
            cache.reserve(0, 10).unwrap();
            kv::resized(&cache);
            let cap0 = cache.capacity(0).unwrap() as usize;
            cache.reserve(0, cap0 as u32 + 1).unwrap();
            kv::resized(&cache);
            cache.reserve(1, 10).unwrap();
            kv::resized(&cache);
            for layer in 0..2 {
                let (k0, v0) = cache.seq_rows(layer, 0).unwrap();
                let (k1, _) = cache.seq_rows(layer, 1).unwrap();
                show(&format!("{g}_k0_{layer}"), k0);
                show(&format!("{g}_v0_{layer}"), v0);
                show(&format!("{g}_k1_{layer}"), k1);
            }
            show(&format!("{g}_cap0"), cap0);
            show(&format!("{g}_cap0b"), cache.capacity(0).unwrap() as usize);
            show(&format!("{g}_cap1"), cache.capacity(1).unwrap() as usize);
            show(&format!("{g}_row"), cache.row_bytes_k());
            cache.release(0).unwrap();
            kv::resized(&cache);
            kv::destroy(cache);
        }
        return;
    }
    let run = run_child("kv_cache_sequences_are_regions_of_their_tensors", true, &[]);
    run.assert_clean();
    let row = run.var("vmm_row");
    let (cap0, cap0b, cap1) = (
        run.var("vmm_cap0"),
        run.var("vmm_cap0b"),
        run.var("vmm_cap1"),
    );
    assert!(cap0b > cap0, "the sequence grew");
    let kv_heaps: Vec<_> = run
        .heaps()
        .into_iter()
        .filter(|h| h.name == "hbmalloc KV cache tensor")
        .collect();
    assert_eq!(kv_heaps.len(), 4, "2 layers x (K, V): {:#?}", run.log);
    for layer in 0..2 {
        let k0 = run.var(&format!("vmm_k0_{layer}"));
        let v0 = run.var(&format!("vmm_v0_{layer}"));
        let k1 = run.var(&format!("vmm_k1_{layer}"));
        let hk = run.heap_holding(k0);
        assert_eq!(hk.name, "hbmalloc KV cache tensor");
        assert_eq!(
            run.heap_holding(k1).id,
            hk.id,
            "one tensor holds every slot"
        );
        // Registered at each capacity, the old size unregistered when it grew.
        assert_eq!(run.count(&region(&hk, k0, cap0 * row)), 1, "{:#?}", run.log);
        assert_eq!(
            run.count(&region(&hk, k0, cap0b * row)),
            1,
            "{:#?}",
            run.log
        );
        assert_eq!(
            run.count(&region(&run.heap_holding(v0), v0, cap0b * row)),
            1
        );
        assert_eq!(run.count(&region(&hk, k1, cap1 * row)), 1);
        // Grown once and released once.
        assert_eq!(run.count(&unregion(k0)), 2, "{:#?}", run.log);
        assert_eq!(run.count(&unregion(k1)), 0, "live until the heap goes");
    }
    // The VMM cache's heaps are unregistered before the realloc cache exists, and their address
    // ranges may come back for its buffers (this test failed so, now and then): only heaps
    // registered after the last of them goes count.
    let vmm_gone = run
        .log
        .iter()
        .rposition(|l| {
            kv_heaps
                .iter()
                .any(|h| *l == format!("heap_unregister {}", h.id))
        })
        .expect("the VMM cache's heaps are unregistered when it is destroyed");
    let later: Vec<&str> = run.log[vmm_gone + 1..]
        .iter()
        .filter_map(|l| l.strip_prefix("heap_register "))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    for layer in 0..2 {
        let k0 = run.var(&format!("realloc_k0_{layer}"));
        assert!(
            run.heaps()
                .iter()
                .filter(|h| later.contains(&h.id.as_str()))
                .all(|h| !(h.base <= k0 && k0 < h.base + h.size)),
            "a realloc buffer is a whole allocation, no heap: {:#?}",
            run.log
        );
    }
    run.assert_all_heaps_gone();
}

/// Without `NVTX_INJECTION64_PATH` nothing is loaded or called; a tool that refuses the memory
/// extension, or a path that does not load, costs one line on stderr and nothing else; a tool
/// that makes no domain is used in the default one.
#[test]
fn no_tool_no_calls_and_bad_tools_are_one_line() {
    if is_child() {
        use hbmalloc::ffi::cuda_api::{cudaFree, cudaMalloc};
        let mut p = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; freed below.
        unsafe {
            assert_eq!(cudaMalloc(&mut p, 4000), 0);
            assert_eq!(cudaFree(p), 0);
        }
        // Only the tool without a domain is used (in the default domain).
        let used = std::env::var_os("FAKE_NVTX_NO_DOMAIN").is_some();
        assert_eq!(hbmalloc::nvtx::active(), used);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let loaded = maps.contains("libnvtx_fake_injection");
        let named =
            std::env::var_os("NVTX_INJECTION64_PATH").is_some_and(|p| Path::new(&p).exists());
        assert_eq!(
            loaded, named,
            "the tool is loaded if and only if it is named (and exists)"
        );
        return;
    }
    let name = "no_tool_no_calls_and_bad_tools_are_one_line";
    let none = run_child(name, false, &[]);
    assert!(none.log.is_empty(), "{:#?}", none.log);
    assert!(!none.stderr.contains("NVTX"), "{}", none.stderr);

    let refused = run_child(name, true, &[("FAKE_NVTX_REFUSE", "1")]);
    assert!(refused
        .log
        .iter()
        .all(|l| !l.starts_with("heap") && !l.starts_with("region")));
    let lines: Vec<_> = refused
        .stderr
        .lines()
        .filter(|l| l.contains("NVTX_INJECTION64_PATH"))
        .collect();
    assert_eq!(lines.len(), 1, "{}", refused.stderr);
    assert!(
        lines[0].contains("refused the memory extension"),
        "{}",
        lines[0]
    );

    let missing = run_child(
        name,
        false,
        &[("NVTX_INJECTION64_PATH", "/nonexistent/libtool.so")],
    );
    let lines: Vec<_> = missing
        .stderr
        .lines()
        .filter(|l| l.contains("NVTX_INJECTION64_PATH"))
        .collect();
    assert_eq!(lines.len(), 1, "{}", missing.stderr);
    assert!(lines[0].contains("cannot load it"), "{}", lines[0]);

    // A tool that makes no domain (compute-sanitizer 2025.3 fills no slot while it initializes)
    // gets its calls in the default (NULL) domain, which that tool takes.
    let no_domain = run_child(
        name,
        true,
        &[
            ("FAKE_NVTX_NO_DOMAIN", "1"),
            ("FAKE_NVTX_LAYOUT", "published"),
        ],
    );
    assert!(
        no_domain.log.iter().any(|l| l.starts_with("heap"))
            && no_domain.log.iter().any(|l| l.starts_with("region"))
            && no_domain.log.iter().all(|l| !l.starts_with("bad")),
        "{:#?}",
        no_domain.log
    );
    assert!(
        !no_domain.stderr.contains("NVTX_INJECTION64_PATH"),
        "{}",
        no_domain.stderr
    );
}

/// With the switch off (`nvtx:off`) and a tool named, nothing is loaded and nothing is called.
#[test]
fn without_the_switch_a_named_tool_is_not_loaded() {
    if is_child() {
        use hbmalloc::ffi::cuda_api::{cudaFree, cudaMalloc};
        let mut p = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; freed below.
        unsafe {
            assert_eq!(cudaMalloc(&mut p, 4000), 0);
            assert_eq!(cudaFree(p), 0);
        }
        assert!(!hbmalloc::nvtx::active());
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(
            !maps.contains("libnvtx_fake_injection"),
            "the tool was loaded"
        );
        return;
    }
    let off = run_child(
        "without_the_switch_a_named_tool_is_not_loaded",
        true,
        &[(
            "HBMALLOC_CONF",
            "backend:sim,backtrace:off,leak_report:off,nvtx:off",
        )],
    );
    assert!(off.log.is_empty(), "{:#?}", off.log);
}
