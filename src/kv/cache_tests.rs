//! Tests of the KV cache on the simulated device.

use super::*;
use crate::backend::sim::{SimBackend, SIM_GRANULARITY as G};
use crate::backend::{Backend, Event, Stream};
use crate::kv::HbmType;
use std::sync::Arc;

/// 2 layers, 2 KV heads of 64: F16 rows of 256 bytes, 8192 rows per 2 MiB page.
fn params(growth: Growth) -> KvParams {
    KvParams {
        n_layer: 2,
        n_head_kv: 2,
        head_dim: 64,
        n_ctx_max: 32768,
        n_seq_max: 4,
        type_k: HbmType::F16,
        type_v: HbmType::F16,
        growth,
    }
}

fn sim(capacity: usize) -> Arc<SimBackend> {
    Arc::new(SimBackend::new(0, capacity))
}

fn write_row(b: &SimBackend, ptr: DevicePtr, row: usize, byte: u8) {
    b.copy_from_host(ptr + row * 256, &[byte; 256]).unwrap();
}

fn read_row(b: &SimBackend, ptr: DevicePtr, row: usize) -> Vec<u8> {
    let mut out = vec![0u8; 256];
    b.copy_to_host(&mut out, ptr + row * 256).unwrap();
    out
}

#[test]
fn vmm_grows_in_place_and_keeps_data() {
    let b = sim(1 << 30);
    let c = KvCache::new(b.clone(), params(Growth::Vmm)).unwrap();
    assert_eq!(b.used(), 0, "VMM reserves address space only");
    assert_eq!(
        c.stats().reserved,
        4 * 4 * 4 * G as u64,
        "4 slots x 4 tensors x 8 MiB"
    );
    c.reserve(0, 100).unwrap();
    assert_eq!(c.capacity(0).unwrap(), 8192, "one page of 256-byte rows");
    assert_eq!(b.used(), 4 * G, "one page per tensor");
    let (k, v) = c.seq_rows(1, 0).unwrap();
    write_row(&b, k, 50, 0x11);
    write_row(&b, v, 8191, 0x22);
    c.reserve(0, 20_000).unwrap();
    assert_eq!(c.capacity(0).unwrap(), 24_576);
    assert_eq!(b.used(), 4 * 3 * G);
    assert_eq!(c.seq_rows(1, 0).unwrap(), (k, v), "pointers never move");
    assert_eq!(read_row(&b, k, 50), vec![0x11; 256]);
    assert_eq!(read_row(&b, v, 8191), vec![0x22; 256]);
    write_row(&b, k, 20_000, 0x33); // the new pages are usable
    let s = c.stats();
    assert_eq!(
        (s.committed, s.cached, s.n_seq, s.generation, s.copied),
        (12 * G as u64, 0, 1, 0, 0)
    );
    drop(c);
    assert_eq!(b.used(), 0, "drop gives everything back");
}

#[test]
fn released_pages_are_reused_by_the_next_sequence() {
    let b = sim(1 << 30);
    let c = KvCache::new(b.clone(), params(Growth::Vmm)).unwrap();
    c.reserve(0, 9000).unwrap();
    let rows0 = c.seq_rows(0, 0).unwrap();
    let used = b.used();
    c.release(0).unwrap();
    assert_eq!(
        b.used(),
        used,
        "released pages stay committed, on the free list"
    );
    assert_eq!(c.stats().cached, used as u64);
    assert!(c.seq_rows(0, 0).is_err(), "a released sequence has no rows");
    assert!(c.capacity(0).is_err());
    assert!(c.release(0).is_err(), "double release");
    c.reserve(3, 10).unwrap();
    assert_eq!(
        c.seq_rows(0, 3).unwrap(),
        rows0,
        "sequence 3 took the released slot"
    );
    assert_eq!(c.capacity(3).unwrap(), 16_384, "with its two pages");
    assert_eq!(b.used(), used, "nothing new was mapped");
    assert_eq!(c.stats().cached, 0);
    // Another new sequence gets a fresh slot.
    c.reserve(1, 1).unwrap();
    assert_ne!(c.seq_rows(0, 1).unwrap().0, rows0.0);
    c.release(1).unwrap();
    assert_eq!(c.trim(), 4 * G as u64, "trim unmaps the free list");
    assert_eq!(b.used(), used);
}

#[test]
fn bad_requests_change_nothing() {
    let b = sim(1 << 30);
    let c = KvCache::new(b.clone(), params(Growth::Vmm)).unwrap();
    c.reserve(0, 10).unwrap();
    let before = (c.stats(), b.used(), c.seq_rows(0, 0).unwrap());
    assert_eq!(
        c.reserve(0, 32_769),
        Err(Error::InvalidValue("n_tokens beyond n_ctx_max"))
    );
    assert!(c.reserve(4, 1).is_err(), "seq beyond n_seq_max");
    assert!(c.seq_rows(2, 0).is_err(), "layer beyond n_layer");
    assert!(c.release(2).is_err(), "never reserved");
    assert_eq!((c.stats(), b.used(), c.seq_rows(0, 0).unwrap()), before);
    for s in 1..4 {
        c.reserve(s, 1).unwrap();
    }
    c.release(2).unwrap();
    c.reserve(2, 1).unwrap();
    assert_eq!(c.stats().n_seq, 4);
}

#[test]
fn out_of_memory_rolls_back_then_trims_the_free_list() {
    // Room for 12 pages: sequence 0 takes 8 (2 per tensor).
    let b = sim(12 * G);
    let c = KvCache::new(b.clone(), params(Growth::Vmm)).unwrap();
    c.reserve(0, 10_000).unwrap();
    let (k, _) = c.seq_rows(0, 0).unwrap();
    write_row(&b, k, 9_999, 0x44);
    // 4 pages per tensor would need 8 more: some map, then the rest fail and are rolled back.
    let err = c.reserve(0, 30_000).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{err:?}");
    assert_eq!(
        b.used(),
        8 * G,
        "pages mapped before the failure were unmapped"
    );
    assert_eq!(c.capacity(0).unwrap(), 16_384);
    assert_eq!(c.seq_rows(0, 0).unwrap().0, k);
    assert_eq!(read_row(&b, k, 9_999), vec![0x44; 256]);
    // A new sequence that cannot fit is not left bound.
    assert!(c.reserve(1, 10_000).is_err());
    assert!(c.capacity(1).is_err());
    assert_eq!(b.used(), 8 * G);
    // Sequence 1 takes the last 4 pages; sequence 0 ends and its 8 stay cached.
    c.reserve(1, 1).unwrap();
    c.release(0).unwrap();
    assert_eq!((b.used(), c.stats().cached), (12 * G, 8 * G as u64));
    // Growing sequence 1 runs out of memory, trims the free list and succeeds.
    c.reserve(1, 10_000).unwrap();
    assert_eq!((b.used(), c.stats().cached), (8 * G, 0));
    assert_eq!(c.capacity(1).unwrap(), 16_384);
}

#[test]
fn realloc_moves_copies_and_counts_generations() {
    let b = sim(1 << 30);
    let c = KvCache::new(b.clone(), params(Growth::Realloc)).unwrap();
    assert_eq!(c.params().growth, Growth::Realloc);
    c.reserve(0, 100).unwrap();
    assert_eq!((c.capacity(0).unwrap(), c.generation()), (100, 0));
    let (k, v) = c.seq_rows(1, 0).unwrap();
    write_row(&b, k, 99, 0x55);
    write_row(&b, v, 0, 0x66);
    c.reserve(0, 150).unwrap();
    assert_eq!(c.capacity(0).unwrap(), 200, "doubling");
    assert_eq!(c.generation(), 1);
    let (k2, v2) = c.seq_rows(1, 0).unwrap();
    assert!(k2 != k && v2 != v, "realloc moves the tensors");
    assert_eq!(read_row(&b, k2, 99), vec![0x55; 256]);
    assert_eq!(read_row(&b, v2, 0), vec![0x66; 256]);
    assert_eq!(c.stats().copied, 4 * 100 * 256);
    assert_eq!(b.used(), 4 * 200 * 256, "old buffers freed");
    assert!(b.sync_count() >= 1, "waited before freeing the old buffers");
    c.reserve(0, 32_768).unwrap();
    assert_eq!(c.capacity(0).unwrap(), 32_768, "capped at n_ctx_max");
    c.release(0).unwrap();
    assert_eq!(b.used(), 0, "release frees in realloc mode");
}

#[test]
fn realloc_out_of_memory_keeps_the_old_buffers() {
    let b = sim(4 * 100 * 256 + 1000);
    let c = KvCache::new(b.clone(), params(Growth::Realloc)).unwrap();
    c.reserve(0, 100).unwrap();
    let (k, _) = c.seq_rows(0, 0).unwrap();
    write_row(&b, k, 7, 0x77);
    assert!(matches!(c.reserve(0, 101), Err(Error::OutOfMemory { .. })));
    assert_eq!(
        (c.seq_rows(0, 0).unwrap().0, c.capacity(0).unwrap()),
        (k, 100)
    );
    assert_eq!(read_row(&b, k, 7), vec![0x77; 256]);
    assert_eq!(b.used(), 4 * 100 * 256, "partial new buffers were freed");
}

#[test]
fn prealloc_commits_everything_up_front() {
    let b = sim(1 << 30);
    let c = KvCache::new(b.clone(), params(Growth::Prealloc)).unwrap();
    let full = 4 * 4 * 32_768 * 256;
    assert_eq!(b.used(), full);
    c.reserve(2, 32_768).unwrap();
    assert_eq!(c.capacity(2).unwrap(), 32_768);
    assert_eq!(b.used(), full);
    assert_eq!(c.stats().committed, full as u64);
    assert!(matches!(
        KvCache::new(sim(full - 1), params(Growth::Prealloc)),
        Err(Error::OutOfMemory { .. })
    ));
}

#[test]
fn invalid_shapes_are_refused() {
    let b = sim(1 << 30);
    let mut p = params(Growth::Vmm);
    p.type_k = HbmType::Q8_0;
    p.n_head_kv = 1;
    p.head_dim = 40;
    assert!(matches!(
        KvCache::new(b.clone(), p),
        Err(Error::InvalidValue(_))
    ));
    p.head_dim = 64; // 64 = 2 blocks of 32
    let c = KvCache::new(b.clone(), p).unwrap();
    assert_eq!((c.row_bytes_k(), c.row_bytes_v()), (2 * 34, 128));
    let mut p = params(Growth::Vmm);
    p.n_seq_max = 0;
    assert!(KvCache::new(b.clone(), p).is_err());
}

/// The simulated device without VMM; logs synchronizes and copies, and fails every synchronize
/// once `syncs_left` reaches 0.
struct NoVmm {
    sim: SimBackend,
    log: std::sync::Mutex<Vec<&'static str>>,
    syncs_left: std::sync::atomic::AtomicUsize,
}

impl NoVmm {
    fn new(capacity: usize) -> NoVmm {
        NoVmm {
            sim: SimBackend::new(0, capacity),
            log: Default::default(),
            syncs_left: usize::MAX.into(),
        }
    }

    fn take_log(&self) -> Vec<&'static str> {
        std::mem::take(&mut self.log.lock().unwrap())
    }
}

impl Backend for NoVmm {
    fn name(&self) -> &'static str {
        "sim-novmm"
    }
    fn device(&self) -> i32 {
        0
    }
    fn alloc(&self, size: usize) -> Result<DevicePtr> {
        self.sim.alloc(size)
    }
    fn free(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        self.sim.free(ptr, size)
    }
    fn mem_info(&self) -> Result<(usize, usize)> {
        self.sim.mem_info()
    }
    fn synchronize(&self) -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        self.log.lock().unwrap().push("sync");
        let left = self.syncs_left.load(SeqCst);
        if left == 0 {
            return Err(Error::Driver {
                call: "cuCtxSynchronize",
                code: 700,
            });
        }
        if left != usize::MAX {
            self.syncs_left.store(left - 1, SeqCst);
        }
        self.sim.synchronize()
    }
    fn event_record(&self, stream: Stream) -> Result<Event> {
        self.sim.event_record(stream)
    }
    fn event_done(&self, event: Event) -> Result<bool> {
        self.sim.event_done(event)
    }
    fn event_release(&self, event: Event) {
        self.sim.event_release(event)
    }
    fn vmm_granularity(&self) -> Option<usize> {
        None
    }
    fn vmm_reserve(&self, _: usize) -> Result<DevicePtr> {
        Err(Error::NotSupported("vmm"))
    }
    fn vmm_release(&self, _: DevicePtr, _: usize) -> Result<()> {
        Err(Error::NotSupported("vmm"))
    }
    fn vmm_map(&self, _: DevicePtr, _: usize) -> Result<()> {
        Err(Error::NotSupported("vmm"))
    }
    fn vmm_unmap(&self, _: DevicePtr, _: usize) -> Result<()> {
        Err(Error::NotSupported("vmm"))
    }
    fn copy_d2d(&self, dst: DevicePtr, src: DevicePtr, size: usize, s: Stream) -> Result<()> {
        self.log.lock().unwrap().push("copy");
        self.sim.copy_d2d(dst, src, size, s)
    }
    fn copy_to_host(&self, dst: &mut [u8], src: DevicePtr) -> Result<()> {
        self.sim.copy_to_host(dst, src)
    }
    fn copy_from_host(&self, dst: DevicePtr, src: &[u8]) -> Result<()> {
        self.sim.copy_from_host(dst, src)
    }
}

#[test]
fn vmm_falls_back_to_realloc_without_vmm() {
    let b = Arc::new(NoVmm::new(1 << 30));
    let c = KvCache::new(b.clone(), params(Growth::Vmm)).unwrap();
    assert_eq!(c.params().growth, Growth::Realloc);
    c.reserve(0, 10).unwrap();
    c.reserve(0, 11).unwrap();
    assert_eq!(c.generation(), 1);
    drop(c);
    assert_eq!(b.sim.used(), 0);
}

/// A realloc copy is ordered after the caller's stream: a device synchronize comes before it
/// (appends queued on a non-blocking stream land first), and another before the old buffers go.
#[test]
fn realloc_synchronizes_before_it_copies() {
    let b = Arc::new(NoVmm::new(1 << 30));
    let c = KvCache::new(b.clone(), params(Growth::Realloc)).unwrap();
    c.reserve(0, 10).unwrap();
    b.take_log();
    c.reserve(0, 30).unwrap();
    let log = b.take_log();
    let first_copy = log.iter().position(|&e| e == "copy").expect("rows copied");
    assert!(log[..first_copy].contains(&"sync"), "{log:?}");
    assert_eq!(log.last(), Some(&"sync"), "{log:?}");
}

/// A synchronize that fails (before the copies or after them) fails the growth and leaves the
/// sequence as it was: same buffers, capacity and rows; growth works once the device does.
#[test]
fn realloc_with_a_failing_synchronize_keeps_the_old_buffers() {
    use std::sync::atomic::Ordering::SeqCst;
    let b = Arc::new(NoVmm::new(1 << 30));
    let c = KvCache::new(b.clone(), params(Growth::Realloc)).unwrap();
    c.reserve(0, 10).unwrap();
    let (k, v) = c.seq_rows(0, 0).unwrap();
    write_row(&b.sim, k, 9, 0x5a);
    let used = b.sim.used();
    for ok_syncs in [0, 1] {
        b.syncs_left.store(ok_syncs, SeqCst);
        assert!(
            matches!(c.reserve(0, 30), Err(Error::Driver { code: 700, .. })),
            "after {ok_syncs} good synchronizes"
        );
        assert_eq!(c.capacity(0).unwrap(), 10);
        assert_eq!(c.seq_rows(0, 0).unwrap(), (k, v));
        assert_eq!(c.generation(), 0);
        assert_eq!(b.sim.used(), used, "the new buffers were given back");
        let mut back = [0u8; 256];
        b.sim.copy_to_host(&mut back, k + 9 * 256).unwrap();
        assert_eq!(back, [0x5a; 256]);
    }
    b.syncs_left.store(usize::MAX, SeqCst);
    c.reserve(0, 30).unwrap();
    let (k2, _) = c.seq_rows(0, 0).unwrap();
    let mut back = [0u8; 256];
    b.sim.copy_to_host(&mut back, k2 + 9 * 256).unwrap();
    assert_eq!(back, [0x5a; 256], "rows copied once the device works");
}

/// Host f32 data as the simulated device would hold it, with a spread of block scales.
fn floats(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let scale = [0.01f32, 1.0, 300.0][(i / 32) % 3];
            (x as f32 / u32::MAX as f32 - 0.5) * scale
        })
        .collect()
}

#[test]
fn append_and_dequantize_match_the_cpu_reference_for_every_type() {
    use crate::kv::quant::{dequantize_row, quantize_row};
    let b = sim(1 << 30);
    for ty in HbmType::ALL {
        let mut p = params(Growth::Vmm);
        (p.type_k, p.type_v) = (ty, HbmType::F16);
        let c = KvCache::new(b.clone(), p).unwrap();
        c.reserve(1, 40).unwrap();
        let n = 128; // elements per row
        let src = floats(8 * n, ty as u32);
        let (k, v) = c.seq_rows(1, 1).unwrap();
        c.append(1, 1, 30, 8, src.as_ptr() as usize, 0, HbmType::F32, 0)
            .unwrap();
        let rb = ty.row_bytes(n).unwrap();
        for r in 0..8 {
            let mut want = vec![0u8; rb];
            quantize_row(ty, &src[r * n..(r + 1) * n], &mut want).unwrap();
            let mut got = vec![0u8; rb];
            b.copy_to_host(&mut got, k + (30 + r) * rb).unwrap();
            assert_eq!(got, want, "{ty:?} row {r}");
            let mut back = vec![0.0f32; n];
            dequantize_row(ty, &want, &mut back).unwrap();
            let mut out = vec![0.0f32; n];
            c.dequantize(
                1,
                1,
                30 + r as u32,
                1,
                out.as_mut_ptr() as usize,
                0,
                HbmType::F32,
                0,
            )
            .unwrap();
            assert_eq!(out, back, "{ty:?} row {r} dequantized");
        }
        // V was skipped: still the zeros of fresh pages.
        assert_eq!(read_row(&b, v, 30), vec![0u8; 256]);
    }
}

#[test]
fn bad_appends_write_nothing() {
    let b = sim(1 << 30);
    let c = KvCache::new(b.clone(), params(Growth::Vmm)).unwrap();
    c.reserve(0, 16).unwrap();
    let src = floats(4 * 128, 7);
    let (k, _) = c.seq_rows(0, 0).unwrap();
    let ok = src.as_ptr() as usize;
    let bad = [
        (2, 0, 0, ok, ok, HbmType::F32),        // layer
        (0, 1, 0, ok, ok, HbmType::F32),        // sequence not bound
        (0, 9, 0, ok, ok, HbmType::F32),        // sequence beyond n_seq_max
        (0, 0, 8190, ok, ok, HbmType::F32),     // past the capacity (one page: 8192 rows)
        (0, 0, u32::MAX, ok, ok, HbmType::F32), // overflowing positions
        (0, 0, 0, ok, ok, HbmType::Q8_0),       // not a source type
        (0, 0, 0, ok, ok + 1, HbmType::F32),    // misaligned V: K must stay unwritten too
    ];
    for (layer, seq, pos, ks, vs, ty) in bad {
        assert!(
            matches!(
                c.append(layer, seq, pos, 4, ks, vs, ty, 0),
                Err(Error::InvalidValue(_))
            ),
            "layer {layer} seq {seq} pos {pos} {ty:?}"
        );
    }
    assert_eq!(read_row(&b, k, 0), vec![0u8; 256], "nothing written");
    c.append(0, 0, 8188, 4, ok, ok, HbmType::F32, 0).unwrap();
    c.append(0, 0, 8192, 0, ok, ok, HbmType::F32, 0).unwrap();
}
