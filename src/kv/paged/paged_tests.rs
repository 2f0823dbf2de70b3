//! The paged cache on the simulated device: block accounting, copy-on-write, sliding windows,
//! out-of-blocks, and appends and gathers byte for byte against the CPU reference.

use super::*;
use crate::backend::sim::{SimBackend, SIM_GRANULARITY};
use crate::backend::Backend;
use crate::kv::quant::{dequantize_row, quantize_row};
use crate::kv::HbmType;
use std::sync::Arc;

fn sim(capacity: usize) -> Arc<SimBackend> {
    Arc::new(SimBackend::new(0, capacity))
}

/// 2 layers of 2 KV heads of 32, blocks of 4 tokens.
fn small(ty: HbmType, num_blocks: u32) -> PagedParams {
    let mut p = PagedParams::uniform(2, 2, 32, ty, num_blocks, 8, 64);
    p.block_tokens = 4;
    p
}

fn floats(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let scale = [1e-3f32, 1.0, 300.0, 0.0][(i / 32) % 4];
            (x as f32 / u32::MAX as f32 - 0.5) * scale
        })
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

/// Host bytes at a device address of the simulated device.
fn read(b: &dyn Backend, ptr: DevicePtr, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    b.copy_to_host(&mut out, ptr).unwrap();
    out
}

fn device_table(c: &PagedKvCache, b: &dyn Backend, layer: u32, seq: u32, n: usize) -> Vec<i32> {
    let row = seq as usize * c.max_blocks_per_seq() as usize * 4;
    read(b, c.block_table(layer).unwrap() + row, n * 4)
        .chunks_exact(4)
        .map(|w| i32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
        .collect()
}

#[test]
fn add_fork_truncate_free_account_blocks() {
    let b = sim(1 << 30);
    let c = PagedKvCache::new(b.clone(), small(HbmType::F16, 16)).unwrap();
    c.add_tokens(0, 10, 0).unwrap();
    assert_eq!(c.seq_blocks(0, 0).unwrap(), vec![0, 1, 2], "ceil(10 / 4)");
    assert_eq!(device_table(&c, b.as_ref(), 1, 0, 4), vec![0, 1, 2, -1]);
    c.fork(0, 1).unwrap();
    let s = c.stats();
    assert_eq!(
        (s.blocks_used, s.blocks_shared, s.n_seq, s.tokens),
        (3, 3, 2, 20)
    );
    assert_eq!(c.refcount(0, 2).unwrap(), 2);
    // Seq 1 appends into the shared partial block 2: it gets a copy, block 3.
    c.add_tokens(1, 1, 0).unwrap();
    assert_eq!(c.seq_blocks(0, 1).unwrap(), vec![0, 1, 3]);
    assert_eq!(device_table(&c, b.as_ref(), 0, 1, 4), vec![0, 1, 3, -1]);
    assert_eq!((c.stats().blocks_shared, c.stats().cow_copies), (2, 1));
    // Seq 0 now holds block 2 alone and writes it in place.
    c.add_tokens(0, 2, 0).unwrap();
    assert_eq!(c.seq_blocks(0, 0).unwrap(), vec![0, 1, 2]);
    assert_eq!(c.stats().cow_copies, 1);
    c.truncate(0, 4).unwrap();
    assert_eq!(c.seq_blocks(0, 0).unwrap(), vec![0]);
    assert_eq!(device_table(&c, b.as_ref(), 0, 0, 3), vec![0, -1, -1]);
    assert_eq!(c.refcount(0, 1).unwrap(), 1, "still held by seq 1");
    assert_eq!(c.refcount(0, 2).unwrap(), 0, "given back");
    c.free(1).unwrap();
    c.free(0).unwrap();
    let s = c.stats();
    assert_eq!((s.blocks_used, s.blocks_free, s.n_seq), (0, 16, 0));
    assert_eq!(device_table(&c, b.as_ref(), 0, 1, 3), vec![-1, -1, -1]);
    assert!(c.free(0).is_err(), "not live");
    assert!(c.fork(0, 2).is_err(), "fork of a dead sequence");
    assert!(c.add_tokens(8, 1, 0).is_err(), "beyond max_seqs");
    assert!(c.add_tokens(0, 65, 0).is_err(), "beyond max_seq_tokens");
}

#[test]
fn committed_memory_follows_blocks_and_trim_gives_it_back() {
    let b = sim(1 << 30);
    // 2 heads of 32, F32: 256-byte rows, 1 KiB blocks: 2048 blocks per 2 MiB granule.
    let c = PagedKvCache::new(b.clone(), small(HbmType::F32, 4096)).unwrap();
    assert_eq!(c.stats().bytes_committed, 0, "nothing mapped at creation");
    assert_eq!(c.stats().bytes_reserved, 4 * 4096 * 1024);
    c.add_tokens(0, 4, 0).unwrap();
    let one = 4 * SIM_GRANULARITY as u64;
    assert_eq!(c.stats().bytes_committed, one, "one granule per tensor");
    assert_eq!(b.used() as u64, one + c.stats().bytes_tables);
    c.free(0).unwrap();
    assert_eq!(c.stats().bytes_committed, one, "kept for the next blocks");
    assert_eq!(c.trim(), one);
    assert_eq!(c.stats().bytes_committed, 0);
    drop(c);
    assert_eq!(b.used(), 0, "everything given back");
}

#[test]
fn out_of_blocks_changes_nothing() {
    let b = sim(1 << 30);
    let c = PagedKvCache::new(b.clone(), small(HbmType::F16, 4)).unwrap();
    c.add_tokens(0, 6, 0).unwrap();
    c.fork(0, 1).unwrap();
    let before = (c.stats(), c.seq_blocks(0, 1).unwrap());
    let table = device_table(&c, b.as_ref(), 0, 1, 4);
    // 6 more tokens for seq 1: a copy of the shared partial block and one more block; 2 are free.
    assert!(c.add_tokens(1, 7, 0).is_err());
    match c.add_tokens(1, 11, 0) {
        Err(Error::OutOfMemory { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!((c.stats(), c.seq_blocks(0, 1).unwrap()), before);
    assert_eq!(device_table(&c, b.as_ref(), 0, 1, 4), table);
    assert!(
        c.add_tokens(2, 17, 0).is_err(),
        "a new sequence is not started"
    );
    assert!(c.seq_len(2).is_err());
    c.add_tokens(1, 6, 0).unwrap();
    assert_eq!(c.stats().blocks_free, 0);
}

#[test]
fn device_full_changes_nothing() {
    // Room for the tables and two granules: the third tensor's first granule fails.
    let b = sim(2 * SIM_GRANULARITY + 4096);
    let c = PagedKvCache::new(b.clone(), small(HbmType::F16, 64)).unwrap();
    let used = b.used();
    assert!(matches!(
        c.add_tokens(0, 1, 0),
        Err(Error::OutOfMemory { .. })
    ));
    assert_eq!(
        b.used(),
        used,
        "granules mapped by the failed call are unmapped"
    );
    assert_eq!(c.stats().blocks_used, 0);
    assert!(c.seq_len(0).is_err());
}

#[test]
fn sliding_window_gives_back_old_blocks() {
    let b = sim(1 << 30);
    let mut p = small(HbmType::F16, 32);
    p.layers[1].window = 8;
    let c = PagedKvCache::new(b.clone(), p).unwrap();
    c.add_tokens(0, 10, 0).unwrap();
    // Full layer: 3 blocks. Window 8 of 10 tokens keeps tokens 2..10: blocks 0, 1, 2.
    assert_eq!(c.seq_blocks(1, 0).unwrap(), vec![0, 1, 2]);
    c.add_tokens(0, 3, 0).unwrap();
    // 13 tokens: the window keeps 5..13, blocks 1..4; block 0 goes back.
    assert_eq!(c.seq_blocks(1, 0).unwrap(), vec![-1, 1, 2, 3]);
    assert_eq!(device_table(&c, b.as_ref(), 1, 0, 4), vec![-1, 1, 2, 3]);
    assert_eq!(
        c.seq_blocks(0, 0).unwrap().len(),
        4,
        "the full layer keeps all"
    );
    assert_eq!(c.refcount(1, 0).unwrap(), 0);
    let s = c.stats();
    assert_eq!(s.blocks_used, 4 + 3);
    // Slots of the last 3 tokens in the window layer: tokens 10, 11 in block 2, 12 in block 3.
    assert_eq!(c.slot_mapping(1, &[0], &[3]).unwrap(), vec![10, 11, 12]);
    // A prefill longer than the window never takes the blocks that fall out of it: 23 tokens
    // keep 15..23, blocks 3..6.
    c.add_tokens(1, 23, 0).unwrap();
    let t = c.seq_blocks(1, 1).unwrap();
    assert_eq!(t.len(), 6);
    assert_eq!(&t[..3], &[-1, -1, -1]);
    assert!(t[3..].iter().all(|&id| id >= 0));
    let slots = c.slot_mapping(1, &[1], &[23]).unwrap();
    assert!(slots[..12].iter().all(|&s| s == -1));
    assert!(slots[12..].iter().all(|&s| s >= 0));
    // Truncating into released blocks is refused; 20 tokens need blocks 3.. only.
    assert!(c.truncate(1, 19).is_err());
    assert_eq!(c.seq_len(1).unwrap(), 23);
    c.truncate(1, 20).unwrap();
    assert_eq!(c.seq_blocks(1, 1).unwrap(), t[..5].to_vec());
    assert!(
        c.gather(1, 0, 0, 4, 4096, 0, HbmType::F32, 0).is_err(),
        "released"
    );
}

/// Appends to two sequences through one slot mapping, then checks the cache bytes against
/// `quantize_row` and the gather against `dequantize_row`.
fn append_matches_reference(ty: HbmType) {
    let b = sim(1 << 30);
    let c = PagedKvCache::new(b.clone(), small(ty, 32)).unwrap();
    let elems = 64;
    c.add_tokens(0, 3, 0).unwrap();
    c.add_tokens(1, 6, 0).unwrap();
    let slots = c.slot_mapping(1, &[0, 1], &[3, 6]).unwrap();
    let k = floats(9 * elems, 1);
    let v = floats(9 * elems, 2);
    let (kb, vb) = (f32_bytes(&k), f32_bytes(&v));
    let (ks, vs) = (b.alloc(kb.len()).unwrap(), b.alloc(vb.len()).unwrap());
    b.copy_from_host(ks, &kb).unwrap();
    b.copy_from_host(vs, &vb).unwrap();
    c.append(1, ks, vs, HbmType::F32, &slots, 0).unwrap();
    let (kbase, vbase, row_k, row_v) = c.layer_tensors(1).unwrap();
    assert_eq!(row_k, ty.row_bytes(elems).unwrap());
    for (i, &s) in slots.iter().enumerate() {
        for (base, src, row) in [(kbase, &k, row_k), (vbase, &v, row_v)] {
            let mut want = vec![0u8; row];
            quantize_row(ty, &src[i * elems..(i + 1) * elems], &mut want).unwrap();
            assert_eq!(
                read(b.as_ref(), base + s as usize * row, row),
                want,
                "{ty:?} token {i}"
            );
        }
    }
    // Gather seq 1 (6 tokens over two blocks) back as F32.
    let out = b.alloc(6 * elems * 4).unwrap();
    c.gather(1, 1, 0, 6, out, 0, HbmType::F32, 0).unwrap();
    let got = read(b.as_ref(), out, 6 * elems * 4);
    let mut want = Vec::new();
    for t in 0..6 {
        let mut q = vec![0u8; row_k];
        quantize_row(ty, &k[(3 + t) * elems..(4 + t) * elems], &mut q).unwrap();
        let mut back = vec![0f32; elems];
        dequantize_row(ty, &q, &mut back).unwrap();
        want.extend(f32_bytes(&back));
    }
    assert_eq!(got, want, "{ty:?} gather");
    // Layer 0 was never written: a slot there is another tensor.
    assert_ne!(c.layer_tensors(0).unwrap().0, kbase);
}

#[test]
fn append_and_gather_are_byte_exact_for_every_type() {
    for ty in HbmType::ALL {
        append_matches_reference(ty);
    }
}

#[test]
fn append_refuses_shared_free_and_foreign_slots() {
    let b = sim(1 << 30);
    let c = PagedKvCache::new(b.clone(), small(HbmType::F16, 8)).unwrap();
    c.add_tokens(0, 4, 0).unwrap();
    c.fork(0, 1).unwrap();
    let src = b.alloc(64 * 4).unwrap();
    let shared = c.slot_mapping(0, &[1], &[1]).unwrap();
    assert!(
        c.append(0, src, 0, HbmType::F32, &shared, 0).is_err(),
        "block 0 is shared"
    );
    assert!(
        c.append(0, src, 0, HbmType::F32, &[4], 0).is_err(),
        "block 1 is free"
    );
    assert!(
        c.append(0, src, 0, HbmType::F32, &[8 * 4], 0).is_err(),
        "past the pool"
    );
    assert!(
        c.append(0, 0, 0, HbmType::F32, &[], 0).is_err(),
        "no source"
    );
    assert!(
        c.append(9, src, 0, HbmType::F32, &[], 0).is_err(),
        "no such layer"
    );
    c.add_tokens(1, 1, 0).unwrap();
    let own = c.slot_mapping(0, &[1], &[1]).unwrap();
    assert!(
        c.append(0, src, 0, HbmType::Q8_0, &own, 0).is_err(),
        "source type"
    );
    assert!(
        c.append(0, src + 1, 0, HbmType::F32, &own, 0).is_err(),
        "misaligned"
    );
    c.append(0, src, 0, HbmType::F32, &[-1, -1], 0).unwrap();
    c.append(0, src, 0, HbmType::F32, &own, 0).unwrap();
}

#[test]
fn copy_on_write_keeps_the_other_sequence_s_rows() {
    let b = sim(1 << 30);
    let c = PagedKvCache::new(b.clone(), small(HbmType::Q8_0, 16)).unwrap();
    let elems = 64;
    let upload = |v: &[f32]| {
        let p = b.alloc(v.len() * 4).unwrap();
        b.copy_from_host(p, &f32_bytes(v)).unwrap();
        p
    };
    let gather = |seq, n: usize| {
        let out = b.alloc(n * elems * 4).unwrap();
        c.gather(0, seq, 0, n as u32, out, 0, HbmType::F32, 0)
            .unwrap();
        read(b.as_ref(), out, n * elems * 4)
    };
    c.add_tokens(0, 2, 0).unwrap();
    let first = upload(&floats(2 * elems, 7));
    c.append(
        0,
        first,
        0,
        HbmType::F32,
        &c.slot_mapping(0, &[0], &[2]).unwrap(),
        0,
    )
    .unwrap();
    c.fork(0, 1).unwrap();
    let prefix = gather(0, 2);
    c.add_tokens(1, 1, 0).unwrap();
    let third = upload(&floats(elems, 8));
    c.append(
        0,
        third,
        0,
        HbmType::F32,
        &c.slot_mapping(0, &[1], &[1]).unwrap(),
        0,
    )
    .unwrap();
    assert_eq!(gather(0, 2), prefix, "seq 0 does not see seq 1's append");
    assert_eq!(
        &gather(1, 3)[..prefix.len()],
        &prefix[..],
        "the copy kept the prefix"
    );
    assert_ne!(c.seq_blocks(0, 0).unwrap(), c.seq_blocks(0, 1).unwrap());
}

#[test]
fn mla_layer_has_k_only_and_heads_differ_per_layer() {
    let b = sim(1 << 30);
    let mut p = small(HbmType::F16, 8);
    p.layers[0] = LayerSpec {
        n_kv_heads: 1,
        head_dim_k: 576,
        head_dim_v: 0,
        window: 0,
    };
    p.layers[1].n_kv_heads = 4;
    let c = PagedKvCache::new(b.clone(), p).unwrap();
    let (k, v, rk, rv) = c.layer_tensors(0).unwrap();
    assert_eq!((v, rk, rv), (0, 1152, 0));
    assert_ne!(k, 0);
    assert_eq!(c.layer_tensors(1).unwrap().2, 4 * 32 * 2);
    c.add_tokens(0, 1, 0).unwrap();
    let src = b.alloc(576 * 4).unwrap();
    let slots = c.slot_mapping(0, &[0], &[1]).unwrap();
    assert!(
        c.append(0, src, src, HbmType::F32, &slots, 0).is_err(),
        "no V"
    );
    c.append(0, src, 0, HbmType::F32, &slots, 0).unwrap();
    // K only: 3 tensors in all (layer 0 K, layer 1 K and V), one granule each.
    assert_eq!(c.stats().bytes_committed, 3 * SIM_GRANULARITY as u64);
}

#[test]
fn no_vmm_allocates_every_block_up_front() {
    struct NoVmm(SimBackend);
    impl Backend for NoVmm {
        fn name(&self) -> &'static str {
            "no-vmm"
        }
        fn device(&self) -> i32 {
            0
        }
        fn alloc(&self, size: usize) -> crate::error::Result<DevicePtr> {
            self.0.alloc(size)
        }
        fn free(&self, ptr: DevicePtr, size: usize) -> crate::error::Result<()> {
            self.0.free(ptr, size)
        }
        fn mem_info(&self) -> crate::error::Result<(usize, usize)> {
            self.0.mem_info()
        }
        fn synchronize(&self) -> crate::error::Result<()> {
            Ok(())
        }
        fn event_record(&self, s: usize) -> crate::error::Result<usize> {
            self.0.event_record(s)
        }
        fn event_done(&self, e: usize) -> crate::error::Result<bool> {
            self.0.event_done(e)
        }
        fn event_release(&self, _e: usize) {}
        fn vmm_granularity(&self) -> Option<usize> {
            None
        }
        fn vmm_reserve(&self, _: usize) -> crate::error::Result<DevicePtr> {
            Err(Error::NotSupported("vmm"))
        }
        fn vmm_release(&self, _: DevicePtr, _: usize) -> crate::error::Result<()> {
            Err(Error::NotSupported("vmm"))
        }
        fn vmm_map(&self, _: DevicePtr, _: usize) -> crate::error::Result<()> {
            Err(Error::NotSupported("vmm"))
        }
        fn vmm_unmap(&self, _: DevicePtr, _: usize) -> crate::error::Result<()> {
            Err(Error::NotSupported("vmm"))
        }
        fn copy_d2d(
            &self,
            d: DevicePtr,
            s: DevicePtr,
            n: usize,
            st: usize,
        ) -> crate::error::Result<()> {
            self.0.copy_d2d(d, s, n, st)
        }
        fn copy_to_host(&self, d: &mut [u8], s: DevicePtr) -> crate::error::Result<()> {
            self.0.copy_to_host(d, s)
        }
        fn copy_from_host(&self, d: DevicePtr, s: &[u8]) -> crate::error::Result<()> {
            self.0.copy_from_host(d, s)
        }
    }
    let b = Arc::new(NoVmm(SimBackend::new(0, 1 << 30)));
    let c = PagedKvCache::new(b.clone(), small(HbmType::F16, 8)).unwrap();
    // 4 tensors of 8 blocks of 4 rows of 128 bytes.
    assert_eq!(c.stats().bytes_committed, 4 * 8 * 4 * 128);
    assert_eq!(c.stats().bytes_reserved, 0);
    c.add_tokens(0, 5, 0).unwrap();
    c.fork(0, 1).unwrap();
    c.add_tokens(1, 1, 0).unwrap();
    assert_eq!(c.stats().cow_copies, 1);
    drop(c);
    assert_eq!(b.0.used(), 0);
}
