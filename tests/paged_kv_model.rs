//! The paged KV cache against a model, under random add / fork / truncate / free sequences on the
//! simulated device (held to CUDA's unmap rule): no block lost or shared wrongly, reference
//! counts equal to the model's, copy-on-write correct (appended rows visible only to the writer),
//! out of blocks changing nothing, sliding-window blocks given back.

mod common;

use common::Strict;
use hbmalloc::backend::sim::SimBackend;
use hbmalloc::backend::{Backend, DevicePtr, Event, KvRows, Stream};
use hbmalloc::error::{Error, Result};
use hbmalloc::kv::paged::{LayerSpec, PagedKvCache, PagedParams};
use hbmalloc::kv::HbmType;
use std::collections::HashMap;
use std::sync::Arc;

/// `Strict` (the simulated device held to CUDA's unmap rule) with the simulated device's KV row
/// conversions, which `Strict` does not forward; they touch only the rows they are given.
struct Device {
    strict: Arc<Strict>,
    kernels: SimBackend,
}

impl Device {
    fn new(capacity: usize) -> Arc<Device> {
        Arc::new(Device {
            strict: Strict::new(capacity),
            kernels: SimBackend::new(0, 0),
        })
    }
}

impl Backend for Device {
    fn name(&self) -> &'static str {
        "strict-sim-kv"
    }
    fn device(&self) -> i32 {
        0
    }
    fn alloc(&self, size: usize) -> Result<DevicePtr> {
        self.strict.alloc(size)
    }
    fn free(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        self.strict.free(ptr, size)
    }
    fn mem_info(&self) -> Result<(usize, usize)> {
        self.strict.mem_info()
    }
    fn synchronize(&self) -> Result<()> {
        self.strict.synchronize()
    }
    fn event_record(&self, stream: Stream) -> Result<Event> {
        self.strict.event_record(stream)
    }
    fn event_done(&self, event: Event) -> Result<bool> {
        self.strict.event_done(event)
    }
    fn event_release(&self, event: Event) {
        self.strict.event_release(event)
    }
    fn vmm_granularity(&self) -> Option<usize> {
        self.strict.vmm_granularity()
    }
    fn vmm_reserve(&self, size: usize) -> Result<DevicePtr> {
        self.strict.vmm_reserve(size)
    }
    fn vmm_release(&self, base: DevicePtr, size: usize) -> Result<()> {
        self.strict.vmm_release(base, size)
    }
    fn vmm_map(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        self.strict.vmm_map(ptr, size)
    }
    fn vmm_unmap(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        self.strict.vmm_unmap(ptr, size)
    }
    fn copy_d2d(&self, dst: DevicePtr, src: DevicePtr, size: usize, stream: Stream) -> Result<()> {
        self.strict.copy_d2d(dst, src, size, stream)
    }
    fn copy_to_host(&self, dst: &mut [u8], src: DevicePtr) -> Result<()> {
        self.strict.copy_to_host(dst, src)
    }
    fn copy_from_host(&self, dst: DevicePtr, src: &[u8]) -> Result<()> {
        self.strict.copy_from_host(dst, src)
    }
    fn kv_append(&self, src: DevicePtr, ty: HbmType, dst: &KvRows, stream: Stream) -> Result<()> {
        self.kernels.kv_append(src, ty, dst, stream)
    }
    fn kv_dequantize(
        &self,
        src: &KvRows,
        dst: DevicePtr,
        ty: HbmType,
        stream: Stream,
    ) -> Result<()> {
        self.kernels.kv_dequantize(src, dst, ty, stream)
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const BT: u32 = 4;
const WINDOW: u32 = 10;
const ELEMS: usize = 32;
const MAX_SEQS: u32 = 8;
const NUM_BLOCKS: u32 = 48;

/// A model sequence: each token's tag (what its K row holds) and each logical block's model
/// object (objects are shared by forks, replaced by copy-on-write).
#[derive(Clone, Debug)]
struct ModelSeq {
    tags: Vec<f32>,
    blocks: Vec<u64>,
}

struct Model {
    seqs: Vec<Option<ModelSeq>>,
    next_object: u64,
    next_tag: f32,
}

impl Model {
    fn refs(&self) -> HashMap<u64, u32> {
        let mut refs = HashMap::new();
        for s in self.seqs.iter().flatten() {
            for &o in &s.blocks {
                *refs.entry(o).or_insert(0) += 1;
            }
        }
        refs
    }

    /// Blocks `add(seq, n)` takes in the full-attention pool.
    fn blocks_needed(&self, seq: usize, n: u32) -> usize {
        let (len, blocks) = match &self.seqs[seq] {
            Some(s) => (s.tags.len() as u32, s.blocks.clone()),
            None => (0, Vec::new()),
        };
        let refs = self.refs();
        let cow = len % BT != 0 && n > 0 && refs[&blocks[(len / BT) as usize]] > 1;
        ((len + n).div_ceil(BT) - len.div_ceil(BT)) as usize + cow as usize
    }

    fn add(&mut self, seq: usize, n: u32) -> Vec<f32> {
        let refs = self.refs();
        let s = self.seqs[seq].get_or_insert(ModelSeq {
            tags: Vec::new(),
            blocks: Vec::new(),
        });
        let len = s.tags.len() as u32;
        if len % BT != 0 && n > 0 && refs[&s.blocks[(len / BT) as usize]] > 1 {
            s.blocks[(len / BT) as usize] = self.next_object;
            self.next_object += 1;
        }
        while (s.blocks.len() as u32) < (len + n).div_ceil(BT) {
            s.blocks.push(self.next_object);
            self.next_object += 1;
        }
        let new: Vec<f32> = (0..n)
            .map(|_| {
                self.next_tag += 1.0;
                self.next_tag
            })
            .collect();
        s.tags.extend(&new);
        new
    }
}

fn keep_from(len: u32) -> usize {
    (len.saturating_sub(WINDOW) / BT) as usize
}

/// Rows of `ELEMS` floats: K holds the tag, V its negative.
fn rows(tags: &[f32], sign: f32) -> Vec<u8> {
    tags.iter()
        .flat_map(|&t| std::iter::repeat(t * sign).take(ELEMS))
        .flat_map(|x| x.to_ne_bytes())
        .collect()
}

struct Harness {
    b: Arc<Device>,
    c: PagedKvCache,
}

impl Harness {
    /// Writes the last `tags.len()` tokens of `seq` in both layers through slot mapping + append.
    fn write(&self, seq: u32, tags: &[f32]) {
        if tags.is_empty() {
            return;
        }
        let k = rows(tags, 1.0);
        let v = rows(tags, -1.0);
        let (kd, vd) = (
            self.b.alloc(k.len()).unwrap(),
            self.b.alloc(v.len()).unwrap(),
        );
        self.b.copy_from_host(kd, &k).unwrap();
        self.b.copy_from_host(vd, &v).unwrap();
        for layer in 0..2 {
            let slots = self
                .c
                .slot_mapping(layer, &[seq], &[tags.len() as u32])
                .unwrap();
            self.c
                .append(layer, kd, vd, HbmType::F32, &slots, 0)
                .unwrap();
        }
        self.b.free(kd, k.len()).unwrap();
        self.b.free(vd, v.len()).unwrap();
    }

    /// K and V of `seq`'s tokens `start..start + n` in `layer`, as tags.
    fn read(&self, layer: u32, seq: u32, start: u32, n: u32) -> (Vec<f32>, Vec<f32>) {
        if n == 0 {
            return (Vec::new(), Vec::new());
        }
        let bytes = n as usize * ELEMS * 4;
        let (kd, vd) = (self.b.alloc(bytes).unwrap(), self.b.alloc(bytes).unwrap());
        self.c
            .gather(layer, seq, start, n, kd, vd, HbmType::F32, 0)
            .unwrap();
        let tags = |p| {
            let mut out = vec![0u8; bytes];
            self.b.copy_to_host(&mut out, p).unwrap();
            self.b.free(p, bytes).unwrap();
            out.chunks_exact(ELEMS * 4)
                .map(|r| f32::from_ne_bytes([r[0], r[1], r[2], r[3]]))
                .collect::<Vec<f32>>()
        };
        (tags(kd), tags(vd))
    }
}

/// Everything the cache shows agrees with the model.
fn check(h: &Harness, m: &Model) {
    let refs = m.refs();
    let mut object_to_id = HashMap::new();
    let mut id_to_object = HashMap::new();
    let mut window_refs: HashMap<i32, u32> = HashMap::new();
    for (seq, s) in m.seqs.iter().enumerate() {
        let seq = seq as u32;
        let Some(s) = s else {
            assert!(h.c.seq_len(seq).is_err(), "seq {seq} should be dead");
            continue;
        };
        let len = s.tags.len() as u32;
        assert_eq!(h.c.seq_len(seq).unwrap(), len);
        let ids = h.c.seq_blocks(0, seq).unwrap();
        assert_eq!(ids.len(), s.blocks.len(), "seq {seq} block count");
        for (&o, &id) in s.blocks.iter().zip(&ids) {
            assert!(id >= 0 && (id as u32) < NUM_BLOCKS);
            // Same model object <=> same block: nothing shared wrongly, nothing split wrongly.
            assert_eq!(*object_to_id.entry(o).or_insert(id), id, "object {o}");
            assert_eq!(*id_to_object.entry(id).or_insert(o), o, "block {id}");
            assert_eq!(
                h.c.refcount(0, id as u32).unwrap(),
                refs[&o],
                "refcount of {id}"
            );
        }
        let (k, v) = h.read(0, seq, 0, len);
        assert_eq!(k, s.tags, "seq {seq} K rows");
        assert!(
            v.iter().zip(&s.tags).all(|(v, t)| *v == -t),
            "seq {seq} V rows"
        );
        // The window layer: blocks from the window's start on are present; its rows are right.
        let wt = h.c.seq_blocks(1, seq).unwrap();
        assert_eq!(wt.len(), s.blocks.len());
        assert!(
            wt[keep_from(len)..].iter().all(|&id| id >= 0),
            "seq {seq} window {wt:?}"
        );
        for &id in wt.iter().filter(|&&id| id >= 0) {
            *window_refs.entry(id).or_insert(0) += 1;
        }
        let from = len.saturating_sub(WINDOW);
        let (k, _) = h.read(1, seq, from, len - from);
        assert_eq!(k, s.tags[from as usize..], "seq {seq} window K rows");
    }
    for (&id, &n) in &window_refs {
        assert_eq!(h.c.refcount(1, id as u32).unwrap(), n, "window block {id}");
    }
    let s = h.c.stats();
    let full_used = refs.len() as u64;
    assert_eq!(
        s.blocks_used,
        full_used + window_refs.len() as u64,
        "no block lost"
    );
    let shared = refs.values().filter(|&&n| n > 1).count()
        + window_refs.values().filter(|&&n| n > 1).count();
    assert_eq!(s.blocks_shared, shared as u64);
    assert_eq!(s.blocks_used + s.blocks_free, 2 * NUM_BLOCKS as u64);
    assert_eq!(s.n_seq as usize, m.seqs.iter().flatten().count());
}

fn run(seed: u64, steps: usize) {
    let b = Device::new(1 << 30);
    let mut p = PagedParams {
        layers: vec![LayerSpec::full(1, ELEMS as u32); 2],
        type_k: HbmType::F32,
        type_v: HbmType::F32,
        block_tokens: BT,
        num_blocks: NUM_BLOCKS,
        max_seqs: MAX_SEQS,
        max_seq_tokens: 120,
    };
    p.layers[1].window = WINDOW;
    let h = Harness {
        b: b.clone(),
        c: PagedKvCache::new(b.clone(), p).unwrap(),
    };
    let mut m = Model {
        seqs: vec![None; MAX_SEQS as usize],
        next_object: 0,
        next_tag: 0.0,
    };
    let mut rng = Rng(seed);
    let (mut refused, mut cows) = (0, 0);
    for _ in 0..steps {
        let seq = rng.below(MAX_SEQS as u64) as usize;
        let live = m.seqs[seq].is_some();
        match rng.below(10) {
            0..=4 => {
                let span = if rng.below(4) == 0 { 30 } else { 3 };
                let n = 1 + rng.below(span) as u32;
                let len = m.seqs[seq].as_ref().map_or(0, |s| s.tags.len() as u32);
                let free = NUM_BLOCKS as usize - m.refs().len();
                let before = h.c.stats();
                let got = h.c.add_tokens(seq as u32, n, 0);
                if len + n > 120 {
                    assert!(matches!(got, Err(Error::InvalidValue(_))));
                } else if m.blocks_needed(seq, n) > free {
                    assert!(matches!(got, Err(Error::OutOfMemory { .. })), "{got:?}");
                    assert_eq!(h.c.stats(), before, "out of blocks changed something");
                    refused += 1;
                } else {
                    got.unwrap();
                    let tags = m.add(seq, n);
                    h.write(seq as u32, &tags);
                    // After an add, the window layer holds nothing before its window.
                    let wt = h.c.seq_blocks(1, seq as u32).unwrap();
                    assert!(wt[..keep_from(len + n)].iter().all(|&id| id == -1));
                }
                cows = h.c.stats().cow_copies;
            }
            5 | 6 if live => {
                let Some(dst) = (0..MAX_SEQS as usize).find(|&d| m.seqs[d].is_none()) else {
                    continue;
                };
                h.c.fork(seq as u32, dst as u32).unwrap();
                m.seqs[dst] = m.seqs[seq].clone();
            }
            7 | 8 if live => {
                let s = m.seqs[seq].as_mut().unwrap();
                let n = rng.below(s.tags.len() as u64 + 1) as u32;
                let wt = h.c.seq_blocks(1, seq as u32).unwrap();
                let into_released = (keep_from(n)..n.div_ceil(BT) as usize).any(|i| wt[i] < 0);
                let before = h.c.stats();
                match h.c.truncate(seq as u32, n) {
                    Ok(()) => {
                        assert!(!into_released);
                        s.tags.truncate(n as usize);
                        s.blocks.truncate(n.div_ceil(BT) as usize);
                    }
                    Err(e) => {
                        assert!(into_released, "{e:?}");
                        assert_eq!(h.c.stats(), before);
                    }
                }
            }
            9 if live => {
                h.c.free(seq as u32).unwrap();
                m.seqs[seq] = None;
            }
            _ => {
                assert!(h.c.free(seq as u32).is_err() || live);
                if !live {
                    assert!(h.c.fork(seq as u32, seq as u32).is_err());
                }
                continue;
            }
        }
        check(&h, &m);
    }
    assert!(
        refused > 0 && cows > 0,
        "seed {seed}: refused {refused}, cows {cows}: the mix reached neither"
    );
    drop(h);
    assert_eq!(b.strict.violations(), 0, "an unmap cut a mapping");
    assert_eq!(b.strict.used(), 0, "everything given back");
}

#[test]
fn random_operations_match_the_model() {
    for seed in [0x9e37_79b9_7f4a_7c15, 12345, 0xdead_beef, 42, 7] {
        run(seed, 600);
    }
}

#[test]
fn trim_gives_back_idle_granules() {
    let b = Device::new(1 << 30);
    // One layer, K only, 256 KiB rows: blocks of 2 tokens are 512 KiB, 4 to a 2 MiB granule.
    let p = PagedParams {
        layers: vec![LayerSpec {
            n_kv_heads: 1,
            head_dim_k: 65536,
            head_dim_v: 0,
            window: 0,
        }],
        type_k: HbmType::F32,
        type_v: HbmType::F32,
        block_tokens: 2,
        num_blocks: 64,
        max_seqs: 4,
        max_seq_tokens: 64,
    };
    let c = PagedKvCache::new(b.clone(), p).unwrap();
    let g = 2u64 << 20;
    c.add_tokens(0, 32, 0).unwrap(); // blocks 0..16: granules 0, 1, 2, 3
    c.add_tokens(1, 2, 0).unwrap(); // block 16: granule 4
    assert_eq!(c.stats().bytes_committed, 5 * g);
    c.free(0).unwrap();
    assert_eq!(c.trim(), 4 * g, "granule 4 holds seq 1's block");
    assert_eq!(c.stats().bytes_committed, g);
    c.add_tokens(2, 2, 0).unwrap();
    assert_eq!(
        c.seq_blocks(0, 2).unwrap(),
        vec![0],
        "the lowest free id, remapped"
    );
    assert_eq!(c.stats().bytes_committed, 2 * g);
    drop(c);
    assert_eq!((b.strict.violations(), b.strict.used()), (0, 0));
}
