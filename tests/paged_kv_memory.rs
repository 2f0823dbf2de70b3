//! Memory the paged KV cache commits for the Llama-3-8B shape (32 layers, 8 KV heads of 128, F16)
//! on the simulated device, against the bytes of the rows it holds: 256 sequences of 100 tokens,
//! and the same with half of them forked from a shared 2048-token prefix.

use hbmalloc::backend::sim::SimBackend;
use hbmalloc::kv::layout::KvShape;
use hbmalloc::kv::paged::{PagedKvCache, PagedParams, PagedStats};
use hbmalloc::kv::HbmType;
use std::sync::Arc;

const SHAPE: KvShape = KvShape {
    n_layer: 32,
    n_head_kv: 8,
    head_dim: 128,
    type_k: HbmType::F16,
    type_v: HbmType::F16,
};

fn cache(block_tokens: u32) -> (Arc<SimBackend>, PagedKvCache) {
    let b = Arc::new(SimBackend::new(0, 64 << 30));
    let mut p = PagedParams::uniform(32, 8, 128, HbmType::F16, 8192, 257, 4096);
    p.block_tokens = block_tokens;
    (b.clone(), PagedKvCache::new(b, p).unwrap())
}

/// Committed bytes over the bytes of `rows` distinct token rows (every layer, K and V).
fn ratio(s: &PagedStats, rows: u64) -> f64 {
    s.bytes_committed as f64 / SHAPE.bytes_for_tokens(rows).unwrap() as f64
}

fn independent(block_tokens: u32) -> (PagedStats, f64) {
    let (b, c) = cache(block_tokens);
    for seq in 0..256 {
        c.add_tokens(seq, 100, 0).unwrap();
    }
    let s = c.stats();
    assert_eq!(s.tokens, 25_600);
    assert_eq!(s.n_seq, 256);
    // Blocks and tables are all the simulated device handed out.
    assert_eq!(b.used() as u64, s.bytes_committed + s.bytes_tables);
    (s, ratio(&s, 25_600))
}

fn with_prefix(block_tokens: u32) -> (PagedStats, f64) {
    let (_b, c) = cache(block_tokens);
    // Seq 256 holds the prefix; seqs 0..128 fork it and add 100 tokens each, 128..256 are fresh.
    c.add_tokens(256, 2048, 0).unwrap();
    for seq in 0..128 {
        c.fork(256, seq).unwrap();
        c.add_tokens(seq, 100, 0).unwrap();
    }
    c.free(256).unwrap();
    for seq in 128..256 {
        c.add_tokens(seq, 100, 0).unwrap();
    }
    let s = c.stats();
    assert_eq!(s.n_seq, 256);
    assert_eq!(s.tokens, 128 * 2148 + 128 * 100);
    assert_eq!(s.cow_copies, 0, "2048 is whole blocks: nothing to copy");
    (s, ratio(&s, 2048 + 256 * 100))
}

#[test]
fn independent_sequences_commit_at_most_1_1x_their_rows() {
    let (s, r) = independent(8);
    // 100 tokens are 13 blocks of 8 (104 rows); 3328 blocks of 16 KiB fill 26 granules exactly.
    assert_eq!(s.blocks_used, 256 * 13);
    assert_eq!(s.blocks_shared, 0);
    assert!(r <= 1.1, "committed {r:.3}x the rows held");
    assert!((r - 104.0 / 100.0).abs() < 1e-9, "{r}");
    // vLLM's 16-token blocks hold 112 rows for 100 tokens: the tail of the last block is the
    // whole overhead, granules add nothing.
    let (_, r16) = independent(16);
    assert!((r16 - 112.0 / 100.0).abs() < 1e-9, "{r16}");
}

#[test]
fn forks_of_a_shared_prefix_commit_at_most_1_1x_their_rows() {
    let (s, r) = with_prefix(8);
    // The prefix's 256 blocks are held once, by the 128 forks.
    assert_eq!(s.blocks_shared, 256);
    assert_eq!(s.blocks_used, 256 + 256 * 13);
    assert!(r <= 1.1, "committed {r:.3}x the rows held");
    // Without sharing, the forks would hold 128 more copies of 2048 rows: about 10x the memory.
    let unshared = SHAPE.bytes_for_tokens(256 * 100 + 128 * 2048).unwrap();
    assert!(s.bytes_committed * 10 < unshared);
    // With 16-token blocks: the prefix's 128 blocks plus 7 per sequence, 30 720 rows for 27 648
    // (1.11x): each sequence's last block is 4 of 16 tokens full, which no block size of 16 avoids.
    let (s16, r16) = with_prefix(16);
    assert_eq!(s16.blocks_used, 128 + 256 * 7);
    assert!((r16 - 30_720.0 / 27_648.0).abs() < 1e-9, "{r16}");
}
