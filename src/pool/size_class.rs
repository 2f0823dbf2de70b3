//! Size rounding: which block size a request gets, and which chunk the pool asks the driver for.
//!
//! Requests up to 4 KiB round to multiples of 512 bytes; above that, each power of two is split
//! into 8 classes, so rounding wastes at most 12.5%. Requests above `MAX_CLASS_SIZE` round to
//! 2 MiB and bypass the per-thread caches (they are rare, and large enough that the driver's own
//! granularity dominates).

/// The smallest block, and the alignment of every block handed out.
pub const MIN_BLOCK: usize = 512;
/// Largest size served from per-thread caches.
pub const MAX_CLASS_SIZE: usize = 32 << 20;
/// Requests up to this size come from the small arena's 2 MiB chunks.
pub const SMALL_LIMIT: usize = 1 << 20;
const SMALL_CHUNK: usize = 2 << 20;
const MEDIUM_LIMIT: usize = 10 << 20;
const MEDIUM_CHUNK: usize = 20 << 20;
const LARGE_ROUND: usize = 2 << 20;
const SUBCLASS_BITS: u32 = 3;
/// Classes up to 4 KiB are 512-byte steps (8 of them).
const LINEAR_LIMIT: usize = 4096;

/// Number of size classes (index 0..N_CLASSES).
pub const N_CLASSES: usize = class_of(MAX_CLASS_SIZE) + 1;

/// The class index of a request of `size` bytes (1..=MAX_CLASS_SIZE).
pub const fn class_of(size: usize) -> usize {
    if size <= LINEAR_LIMIT {
        return (size.saturating_sub(1)) / MIN_BLOCK;
    }
    // Position of the highest set bit of (size-1) picks the doubling; the next 3 bits the subclass.
    let v = size - 1;
    let msb = usize::BITS - 1 - v.leading_zeros();
    let shift = msb - SUBCLASS_BITS;
    let sub = (v >> shift) & ((1 << SUBCLASS_BITS) - 1);
    let base = (LINEAR_LIMIT / MIN_BLOCK) as u32 + (msb - 12) * (1 << SUBCLASS_BITS);
    (base as usize) + sub
}

/// The block size of class `class`.
pub const fn class_size(class: usize) -> usize {
    let linear = LINEAR_LIMIT / MIN_BLOCK;
    if class < linear {
        return (class + 1) * MIN_BLOCK;
    }
    let k = class - linear;
    let msb = 12 + (k >> SUBCLASS_BITS);
    let sub = k & ((1 << SUBCLASS_BITS) - 1);
    (1 << msb) + ((sub + 1) << (msb - SUBCLASS_BITS as usize))
}

/// Rounded block size for a request, or `None` if rounding overflows.
pub fn block_size(size: usize) -> Option<usize> {
    if size <= MAX_CLASS_SIZE {
        Some(class_size(class_of(size.max(1))))
    } else {
        size.checked_next_multiple_of(LARGE_ROUND)
    }
}

/// How much the pool asks the driver for when no cached block fits `block` bytes.
/// Small blocks share 2 MiB chunks and medium ones chunks of about 20 MiB, as PyTorch's allocator does,
/// so a burst of small requests costs one driver call; large blocks get a chunk of their own.
pub fn chunk_size(block: usize) -> usize {
    if block <= SMALL_LIMIT {
        SMALL_CHUNK
    } else if block < MEDIUM_LIMIT {
        // A whole number of blocks (then 2 MiB pages): 8 MiB blocks in 20 MiB chunks left 4 MiB
        // of every chunk to smaller requests, which a training step did not have.
        (MEDIUM_CHUNK.div_ceil(block) * block).next_multiple_of(LARGE_ROUND)
    } else {
        block.next_multiple_of(LARGE_ROUND)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_monotonic_and_tight() {
        let mut prev = 0;
        for c in 0..N_CLASSES {
            let s = class_size(c);
            assert!(s > prev, "class {c} size {s} not above {prev}");
            assert_eq!(class_of(s), c, "class_of(class_size({c}))");
            assert_eq!(class_of(prev + 1), c, "first size of class {c}");
            assert_eq!(s % MIN_BLOCK, 0);
            prev = s;
        }
        assert_eq!(class_size(N_CLASSES - 1), MAX_CLASS_SIZE);
    }

    #[test]
    fn rounding_wastes_at_most_an_eighth() {
        for size in [
            1,
            511,
            512,
            513,
            4097,
            65_536,
            1_000_000,
            3 << 20,
            MAX_CLASS_SIZE - 1,
        ] {
            let b = block_size(size).unwrap();
            assert!(b >= size && b >= MIN_BLOCK);
            assert!(
                b <= (size + size / 8).max(MIN_BLOCK).next_multiple_of(MIN_BLOCK),
                "{size} -> {b}"
            );
        }
        assert_eq!(block_size(usize::MAX), None);
        assert_eq!(
            block_size(MAX_CLASS_SIZE + 1),
            Some(MAX_CLASS_SIZE + (2 << 20))
        );
    }

    #[test]
    fn chunks_hold_their_blocks() {
        for size in [512, 1 << 20, (1 << 20) + 1, 9 << 20, 10 << 20, 100 << 20] {
            let b = block_size(size).unwrap();
            assert!(chunk_size(b) >= b);
        }
    }
}
